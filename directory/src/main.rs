//! `weft-directory`: runs one directory node from a TOML config file and flags.

use anyhow::{Context, Result};
use clap::Parser;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use weft_directory::{Directory, GossipTuning};

/// Run a Weft directory node.
///
/// Examples:
///   weft-directory --dev                          # development node on 127.0.0.1:7400
///   weft-directory --config dir-1.toml            # production node (see docs/operations.md)
///   weft-directory --dev --name dir-2 --listen 127.0.0.1:7402 \
///       --gossip-listen 127.0.0.1:7502 --seed 127.0.0.1:7501   # join a cluster
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// TOML configuration file; flags override its values.
    #[arg(long, short, env = "WEFT_DIRECTORY_CONFIG")]
    config: Option<PathBuf>,
    /// Node name (its certificate identity).
    #[arg(long)]
    name: Option<String>,
    /// Address to accept peers on.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Development mode: create a CA and certificates in --dev-ca (never in production).
    #[arg(long)]
    dev: bool,
    /// Where development mode keeps its CA.
    #[arg(long, env = "WEFT_DEV_CA", default_value = ".weft/dev-ca")]
    dev_ca: PathBuf,
    /// Milliseconds a disconnected peer's registrations are kept.
    #[arg(long)]
    grace_period_ms: Option<u64>,
    /// UDP address to gossip with other directory nodes on (enables cluster mode; keep
    /// it on a private interface).
    #[arg(long)]
    gossip_listen: Option<SocketAddr>,
    /// Gossip address of another directory node to join through (repeatable).
    #[arg(long = "seed")]
    seeds: Vec<SocketAddr>,
    /// Cluster id: nodes only gossip with nodes of the same id.
    #[arg(long)]
    cluster_id: Option<String>,
    /// Milliseconds a dead directory node's registrations stay in routes while its
    /// peers move to another node (default 15000).
    #[arg(long)]
    dead_node_route_grace_ms: Option<u64>,
    /// Print the bound address as `listening <addr>` on stdout once ready.
    #[arg(long)]
    print_addr: bool,
}

/// The configuration file (every field optional; see docs/operations.md).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    name: Option<String>,
    listen: Option<SocketAddr>,
    grace_period_ms: Option<u64>,
    max_frame_bytes: Option<usize>,
    max_subscriptions_per_peer: Option<usize>,
    max_connections: Option<usize>,
    gossip_listen: Option<SocketAddr>,
    gossip_advertise: Option<SocketAddr>,
    #[serde(default)]
    seeds: Vec<SocketAddr>,
    cluster_id: Option<String>,
    gossip_interval_ms: Option<u64>,
    phi_threshold: Option<f64>,
    dead_node_grace_period_ms: Option<u64>,
    marked_for_deletion_grace_period_ms: Option<u64>,
    dead_node_route_grace_ms: Option<u64>,
    tls: Option<TlsConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsConfig {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,quinn=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config: Config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("parsing config file {}", path.display()))?
        }
        None => Config::default(),
    };
    let name = args
        .name
        .or(config.name)
        .unwrap_or_else(|| "directory-1".to_string());
    let mut builder = Directory::builder(name);
    if let Some(listen) = args.listen.or(config.listen) {
        builder = builder.listen(listen);
    }
    if let Some(ms) = args.grace_period_ms.or(config.grace_period_ms) {
        builder = builder.grace_period(Duration::from_millis(ms));
    }
    if let Some(n) = config.max_frame_bytes {
        builder = builder.max_frame(n);
    }
    if let Some(n) = config.max_subscriptions_per_peer {
        builder = builder.max_subscriptions_per_peer(n);
    }
    if let Some(n) = config.max_connections {
        builder = builder.max_connections(n);
    }
    if let Some(gossip_listen) = args.gossip_listen.or(config.gossip_listen) {
        let seeds = if args.seeds.is_empty() {
            config.seeds
        } else {
            args.seeds
        };
        builder = builder.gossip(gossip_listen, seeds);
        if let Some(addr) = config.gossip_advertise {
            builder = builder.gossip_advertise(addr);
        }
        let mut tuning = GossipTuning::default();
        if let Some(ms) = config.gossip_interval_ms {
            tuning.interval = Duration::from_millis(ms.max(1));
        }
        if let Some(phi) = config.phi_threshold {
            anyhow::ensure!(phi > 0.0, "phi_threshold must be positive, got {phi}");
            tuning.phi_threshold = phi;
        }
        if let Some(ms) = config.dead_node_grace_period_ms {
            tuning.dead_node_grace_period = Duration::from_millis(ms);
        }
        if let Some(ms) = config.marked_for_deletion_grace_period_ms {
            tuning.marked_for_deletion_grace_period = Duration::from_millis(ms);
        }
        if let Some(ms) = args
            .dead_node_route_grace_ms
            .or(config.dead_node_route_grace_ms)
        {
            tuning.dead_node_route_grace = Duration::from_millis(ms);
        }
        builder = builder.gossip_tuning(tuning);
    } else if !args.seeds.is_empty() || !config.seeds.is_empty() {
        anyhow::bail!("seeds are configured but gossip_listen is not: set gossip_listen (or --gossip-listen) to join a cluster");
    }
    if let Some(id) = args.cluster_id.or(config.cluster_id) {
        builder = builder.cluster_id(id);
    }
    builder = match (args.dev, config.tls) {
        (true, _) => builder.dev(&args.dev_ca),
        (false, Some(tls)) => builder.tls_files(tls.ca, tls.cert, tls.key),
        (false, None) => anyhow::bail!(
            "no certificates configured: add a [tls] section (ca, cert, key) to the config file, or pass --dev for development"
        ),
    };
    let directory = builder
        .start()
        .await
        .context("starting the directory node")?;
    if args.print_addr {
        println!("listening {}", directory.local_addr());
        if let Some(gossip) = directory.gossip_addr() {
            println!("gossip {gossip}");
        }
    }
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    tracing::info!("shutting down");
    directory.shutdown().await;
    Ok(())
}
