//! `dir-scale`: a scale benchmark of a 3-node directory cluster (not a test).
//!
//! Starts three directory nodes in this process (gossip over UDP on 127.0.0.1), issues
//! one certificate per simulated peer, attaches every peer over its own QUIC connection
//! (round-robin over the nodes, multiplexed over a few client endpoints), registers
//! `--subs` subscriptions per peer and reports:
//!
//! - certificate issuing time;
//! - time until every node resolves every route completely;
//! - time from a peer's death (connection closed) until a watcher on another node hears
//!   of it (p50/p99; includes the grace period, which is reported separately);
//! - RSS (whole process: the three nodes *and* the simulated peers) and CPU at rest.
//!
//! Run: `cargo run --release -p weft-directory --bin dir-scale -- --peers 10000`
//! (see docs/operations.md).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::StreamExt;
use weft_directory::{Directory, GossipTuning};
use weft_proto::certs;
use weft_proto::tls::{self, Credentials};
use weft_proto::wire::{
    self, DirRequest, DirResponse, Frame, FrameReader, FrameWriter, Hello, Role, Subscription,
    DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};

/// Scale benchmark of a 3-node directory cluster.
#[derive(Parser, Debug)]
struct Args {
    /// Simulated peers (each with its own certificate and QUIC connection).
    #[arg(long, default_value_t = 10_000)]
    peers: usize,
    /// Subscriptions per peer.
    #[arg(long, default_value_t = 10)]
    subs: usize,
    /// Distinct topics the subscriptions are spread over.
    #[arg(long, default_value_t = 1_000)]
    topics: usize,
    /// QUIC client endpoints the peers are multiplexed over.
    #[arg(long, default_value_t = 8)]
    endpoints: usize,
    /// Peers attaching concurrently.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Peer deaths to measure.
    #[arg(long, default_value_t = 30)]
    deaths: usize,
    /// Directory grace period for disconnected peers, in milliseconds.
    #[arg(long, default_value_t = 500)]
    grace_ms: u64,
    /// Gossip interval, in milliseconds.
    #[arg(long, default_value_t = 100)]
    gossip_interval_ms: u64,
    /// Seconds to measure CPU at rest.
    #[arg(long, default_value_t = 10)]
    rest_secs: u64,
    /// Where to keep certificates (default: a temporary directory).
    #[arg(long)]
    cert_dir: Option<std::path::PathBuf>,
}

struct Peer {
    name: String,
    conn: quinn::Connection,
    _writer: FrameWriter,
    _reader: FrameReader,
    topics: Vec<String>,
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) of this process, in clock ticks (1/100 s on Linux).
fn cpu_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the ')'.
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn topic_of(peer: usize, k: usize, topics: usize) -> String {
    format!("topic-{}", (peer * 7 + k * 131) % topics)
}

fn subscriptions(i: usize, args: &Args) -> Vec<Subscription> {
    (0..args.subs)
        .map(|k| Subscription {
            topic: topic_of(i, k, args.topics),
            group: format!("group-{}", i % 50),
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn attach(
    endpoint: &quinn::Endpoint,
    ca: &Path,
    name: String,
    addr: SocketAddr,
    subs: Vec<Subscription>,
) -> Result<Peer> {
    let paths = certs::CertPaths {
        ca: ca.join(certs::CA_CERT_FILE),
        cert: ca.join(format!("{name}.pem")),
        key: ca.join(format!("{name}.key")),
    };
    let creds = Credentials::from_paths(&paths)?;
    let cfg = tls::client_config(&creds, Arc::new(tls::transport_config()))?;
    let conn = endpoint
        .connect_with(cfg, addr, weft_proto::DIRECTORY_IDENTITY)?
        .await
        .with_context(|| format!("connecting {name}"))?;
    let (send, recv) = conn.open_bi().await?;
    let mut writer = FrameWriter::new(send, DEFAULT_MAX_FRAME);
    let mut reader = FrameReader::new(recv, DEFAULT_MAX_FRAME);
    let hello = Hello {
        version: PROTOCOL_VERSION,
        identity: name.clone(),
        incarnation: 1,
        role: Role::Peer,
        listen_addrs: vec![SocketAddr::from(([127, 0, 0, 1], 20_000))],
        zone: None,
    };
    wire::open_handshake(&mut writer, &mut reader, &hello).await?;
    let topics: Vec<String> = subs.iter().map(|s| s.topic.clone()).collect();
    let n = subs.len() as u64;
    for (id, sub) in subs.into_iter().enumerate() {
        writer.queue(&Frame::Request {
            id: id as u64,
            body: DirRequest::Register(sub),
        })?;
    }
    writer.flush().await?;
    for _ in 0..n {
        match reader.next().await? {
            Some(Frame::Response {
                body: DirResponse::Ok,
                ..
            }) => {}
            other => bail!("{name}: unexpected answer to Register: {other:?}"),
        }
    }
    Ok(Peer {
        name,
        conn,
        _writer: writer,
        _reader: reader,
        topics,
    })
}

fn complete(node: &Directory, expected: &[(String, usize)]) -> bool {
    expected.iter().all(|(topic, n)| {
        node.route(topic)
            .groups
            .iter()
            .map(|g| g.members.len())
            .sum::<usize>()
            == *n
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,quinn=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let tmp = tempfile_dir(&args)?;
    let ca = tmp.as_path();
    println!(
        "dir-scale: {} peers x {} subscriptions over {} topics, 3 nodes, grace {} ms, gossip {} ms",
        args.peers, args.subs, args.topics, args.grace_ms, args.gossip_interval_ms
    );
    let rss0 = rss_kib();

    // Nodes.
    let grace = Duration::from_millis(args.grace_ms);
    let tuning = GossipTuning {
        interval: Duration::from_millis(args.gossip_interval_ms),
        ..GossipTuning::default()
    };
    let mut nodes: Vec<Directory> = Vec::new();
    let mut seeds = Vec::new();
    for i in 1..=3 {
        let node = Directory::builder(format!("dir-{i}"))
            .listen("127.0.0.1:0".parse()?)
            .dev(ca)
            .grace_period(grace)
            .cluster_id("scale")
            .gossip_tuning(tuning.clone())
            .gossip("127.0.0.1:0".parse()?, seeds.clone())
            .start()
            .await?;
        if let Some(a) = node.gossip_addr() {
            seeds.push(a);
        }
        nodes.push(node);
    }
    let t = Instant::now();
    while !nodes.iter().all(|n| n.live_nodes().len() == 3) {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the cluster did not form within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("cluster formed in {:?}", t.elapsed());
    let rss_nodes = rss_kib();

    // Certificates.
    let t = Instant::now();
    let names: Vec<String> = (0..args.peers).map(|i| format!("peer-{i}")).collect();
    {
        let dir = ca.to_path_buf();
        let names = names.clone();
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        let chunk = names.len().div_ceil(workers).max(1);
        let handles: Vec<_> = names
            .chunks(chunk)
            .map(|c| {
                let c = c.to_vec();
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || -> Result<()> {
                    for n in c {
                        if !dir.join(format!("{n}.pem")).exists() {
                            certs::issue(&dir, &n, &[])?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.await??;
        }
    }
    println!(
        "issued {} peer certificates in {:?} ({:.0}/s)",
        args.peers,
        t.elapsed(),
        args.peers as f64 / t.elapsed().as_secs_f64()
    );

    // Expected routes.
    let mut counts: std::collections::HashMap<String, usize> = Default::default();
    for i in 0..args.peers {
        for s in subscriptions(i, &args) {
            *counts.entry(s.topic).or_default() += 1;
        }
    }
    let expected: Vec<(String, usize)> = counts.into_iter().collect();

    // Attach and register.
    let endpoints: Vec<quinn::Endpoint> = (0..args.endpoints.max(1))
        .map(|_| quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")))
        .collect::<Result<_, _>>()?;
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.local_addr()).collect();
    let t = Instant::now();
    let progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let results: Vec<Result<Peer>> = futures::stream::iter(0..args.peers)
        .map(|i| {
            let ep = endpoints[i % endpoints.len()].clone();
            let addr = addrs[i % addrs.len()];
            let subs = subscriptions(i, &args);
            let name = names[i].clone();
            let progress = progress.clone();
            async move {
                let mut attempt = 0;
                let peer = loop {
                    attempt += 1;
                    match attach(&ep, ca, name.clone(), addr, subs.clone()).await {
                        Ok(p) => break Ok(p),
                        Err(e) if attempt < 3 => {
                            eprintln!("{name}: attempt {attempt} failed: {e:#}; retrying");
                        }
                        Err(e) => break Err(e),
                    }
                };
                let n = progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if n.is_multiple_of(1000) {
                    println!("  {n} peers attached ({:?})", t.elapsed());
                }
                peer
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let registered = t.elapsed();
    let mut peers = Vec::with_capacity(results.len());
    for r in results {
        peers.push(r?);
    }
    peers.sort_by_key(|p| {
        p.name
            .trim_start_matches("peer-")
            .parse::<usize>()
            .unwrap_or(0)
    });
    println!(
        "attached and registered {} peers in {registered:?} ({:.0} peers/s)",
        peers.len(),
        peers.len() as f64 / registered.as_secs_f64()
    );
    let mut done = [None; 3];
    loop {
        for (i, n) in nodes.iter().enumerate() {
            if done[i].is_none() && complete(n, &expected) {
                done[i] = Some(t.elapsed());
            }
        }
        if done.iter().all(Option::is_some) {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("routes incomplete after 600 s: {done:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = done.iter().flatten().max().copied().unwrap_or_default();
    println!(
        "every node resolves every route {all:?} after the first registration (per node: {:?})",
        done.iter().flatten().collect::<Vec<_>>()
    );
    let rss_loaded = rss_kib();

    // CPU at rest.
    let c0 = cpu_ticks();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.rest_secs)).await;
    let cpu = (cpu_ticks() - c0) as f64 / 100.0 / t.elapsed().as_secs_f64();
    println!(
        "CPU at rest: {:.1} % of one core (process total: 3 nodes + {} client connections with 1 s QUIC keep-alives)",
        cpu * 100.0,
        peers.len()
    );

    // Deaths: a watcher on node B hears that a peer attached to node A died.
    let watcher_certs = certs::issue(ca, "watcher", &[])?;
    let wcreds = Credentials::from_paths(&watcher_certs)?;
    let mut latencies = Vec::new();
    let victims: Vec<usize> = (0..args.deaths.min(peers.len()))
        .map(|k| k * (peers.len() / args.deaths.max(1)).max(1))
        .filter(|i| *i < peers.len())
        .collect();
    let wep = tls::endpoint("127.0.0.1:0".parse()?, &wcreds)?;
    let mut watchers = Vec::new();
    for addr in &addrs {
        let conn = tls::connect(&wep, *addr, weft_proto::DIRECTORY_IDENTITY).await?;
        let (send, recv) = conn.open_bi().await?;
        let mut w = FrameWriter::new(send, DEFAULT_MAX_FRAME);
        let mut r = FrameReader::new(recv, DEFAULT_MAX_FRAME);
        let hello = Hello {
            version: PROTOCOL_VERSION,
            identity: "watcher".into(),
            incarnation: 1,
            role: Role::Peer,
            listen_addrs: vec![],
            zone: None,
        };
        wire::open_handshake(&mut w, &mut r, &hello).await?;
        watchers.push((conn, w, r));
    }
    let mut next_id = 1_000u64;
    for v in victims {
        let home = v % addrs.len();
        let (_, w, r) = &mut watchers[(home + 1) % addrs.len()];
        let peer = &peers[v];
        let topic = peer.topics[0].clone();
        next_id += 1;
        w.send(&Frame::Request {
            id: next_id,
            body: DirRequest::Watch {
                topic: topic.clone(),
            },
        })
        .await?;
        loop {
            match r.next().await? {
                Some(Frame::Response { id, body }) if id == next_id => {
                    if let DirResponse::Route(route) = body {
                        let present = route
                            .groups
                            .iter()
                            .any(|g| g.members.iter().any(|m| m.identity == peer.name));
                        if !present {
                            bail!("{} not in the route of {topic} before dying", peer.name);
                        }
                    }
                    break;
                }
                Some(_) => {}
                None => bail!("watcher stream closed"),
            }
        }
        let t0 = Instant::now();
        peer.conn.close(0u32.into(), b"dying");
        loop {
            match tokio::time::timeout(Duration::from_secs(60), r.next()).await {
                Err(_) => bail!("no route change for {topic} within 60 s"),
                Ok(frame) => match frame? {
                    Some(Frame::RouteChanged(route)) if route.topic == topic => {
                        let present = route
                            .groups
                            .iter()
                            .any(|g| g.members.iter().any(|m| m.identity == peer.name));
                        if !present {
                            latencies.push(t0.elapsed());
                            break;
                        }
                    }
                    Some(_) => {}
                    None => bail!("watcher stream closed"),
                },
            }
        }
    }
    latencies.sort();
    println!(
        "peer death -> watcher on another node: p50 {:?}, p99 {:?}, max {:?} over {} deaths (includes the {grace:?} grace period)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        latencies.len()
    );
    println!(
        "RSS (whole process): before nodes {} MiB, 3 idle nodes {} MiB, loaded {} MiB (3 nodes + {} client connections)",
        rss0 / 1024,
        rss_nodes / 1024,
        rss_loaded / 1024,
        peers.len()
    );
    for n in &nodes {
        println!(
            "{}: accepted {} gossip values, rejected {}",
            n.name(),
            n.accepted_gossip_values(),
            n.rejected_gossip_values()
        );
    }
    drop(peers);
    for n in nodes {
        n.shutdown().await;
    }
    if args.cert_dir.is_none() {
        let _ = std::fs::remove_dir_all(ca);
    }
    Ok(())
}

fn tempfile_dir(args: &Args) -> Result<std::path::PathBuf> {
    match &args.cert_dir {
        Some(d) => Ok(d.clone()),
        None => {
            let d = std::env::temp_dir().join(format!("dir-scale-{}", std::process::id()));
            std::fs::create_dir_all(&d)?;
            Ok(d)
        }
    }
}
