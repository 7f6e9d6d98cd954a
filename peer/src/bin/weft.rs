//! `weft`: the Weft command-line tool — publish, subscribe, and manage certificates.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use weft_peer::{Delivery, Durability, Message, Peer, Receipt, WhenFull, DEFAULT_CREDIT};
use weft_proto::certs;
use weft_proto::tls::Credentials;

/// Keeps glibc's allocator from mapping and unmapping memory per batch. Its defaults
/// serve every allocation above 128 KiB (a batch of 256 payloads of 16 KiB is 4 MiB, a
/// `Deliver` frame up to 512 KiB) with a fresh `mmap` that is faulted in page by page
/// and unmapped on free, and give freed heap memory back above 128 KiB, to fault it in
/// again at the next batch: about a quarter of the CPU of `weft bench --size 16384`.
/// Up to 32 MiB (glibc's largest threshold) now comes from the heap, and up to 64 MiB
/// of free heap is kept for reuse. An application linking `weft-peer` chooses its own
/// allocator; see docs/operations.md ("Allocator").
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 64 << 20;
        // SAFETY: `mallopt` only sets allocator parameters; called before any thread
        // starts. It returns 0 when it refuses a value, which leaves glibc's default.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

/// Exit code when `weft pub` published everything but could not deliver it all before
/// `--drain-timeout-s` passed.
const EXIT_NOT_DRAINED: u8 = 2;

/// How long `weft sub` lets its last acknowledgements and its unregistration reach the
/// network before it closes the connections (the peer has no "flush acks" call yet).
const SUB_LINGER: Duration = Duration::from_millis(200);

const EXAMPLES: &str = "\
Examples (development fabric, after `weft-directory --dev` on 127.0.0.1:7400):
  weft sub orders --group billing --dev                # print deliveries, ack each
  weft pub orders 'order #1' --key user-42 --dev       # publish one message
  seq 3 | weft pub orders --dev                        # one message per stdin line
  weft pub orders 'order {{\x1b[0mn}}' --count 1000 --dev     # templated bodies, n = 0..999
  weft sub orders --group audit --count 10 --json --dev

Production certificates:
  weft certs init --dir ./certs                        # the fabric CA (keep ca.key safe)
  weft certs issue dir-1 --dir ./certs --directory     # a directory node's certificate
  weft certs issue billing-1 --dir ./certs             # a peer's certificate
  weft pub orders hello --name billing-1 \\
      --ca certs/ca.pem --cert certs/billing-1.pem --cert-key certs/billing-1.key

Every connection flag has an environment variable (WEFT_DIRECTORY, WEFT_NAME,
WEFT_DATA_DIR, WEFT_DEV, WEFT_DEV_CA, WEFT_CA, WEFT_CERT, WEFT_CERT_KEY).
Logs go to stderr: -v (info), -vv (debug), -vvv (trace), or RUST_LOG.";

/// Weft command-line tool: publish and subscribe on a Weft fabric, manage certificates.
#[derive(Parser, Debug)]
#[command(name = "weft", version, after_long_help = EXAMPLES)]
struct Cli {
    /// More logs on stderr: -v info, -vv debug, -vvv trace (default: warnings only, or
    /// RUST_LOG when set).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[path = "../cli/bench/mod.rs"]
mod bench;

#[derive(Subcommand, Debug)]
enum Command {
    /// Publish messages to a topic (from an argument or stdin, one per line).
    Pub(PubArgs),
    /// Subscribe to a topic in a group and print deliveries.
    Sub(SubArgs),
    /// Create a fabric CA and issue node certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Measure throughput and latency on a local fabric: an embedded directory (or
    /// --directory), publishers and subscribers over real QUIC on loopback, in this
    /// process or each in its own (--processes).
    ///
    /// Examples:
    ///   weft bench --mode thr --size 128 --count 200000 --durability disk
    ///   weft bench --mode lat --size 128 --count 10000
    ///   weft bench --groups 3 --count 100000            # fan-out
    ///   weft bench --rate 50000 --duration 10           # fixed rate, latency from due time
    ///   weft bench --processes --groups 2 --count 500000  # one process per peer
    ///   weft bench --json --mode thr --size 16384 --count 20000
    #[command(verbatim_doc_comment)]
    Bench(bench::BenchArgs),
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Create a new fabric CA (ca.pem, ca.key) in --dir; refuses to overwrite one.
    #[command(after_long_help = "Example:\n  weft certs init --dir ./certs")]
    Init {
        /// Certificate directory (created if missing).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue (or renew) the certificate of identity NAME, signed by the CA in --dir.
    #[command(
        after_long_help = "Examples:\n  weft certs issue billing-1 --dir ./certs\n  weft certs issue dir-1 --dir ./certs --directory"
    )]
    Issue {
        /// The identity (a DNS-like name: letters, digits, '-', '.').
        name: String,
        /// Certificate directory holding the CA; NAME.pem and NAME.key are written there.
        #[arg(long)]
        dir: PathBuf,
        /// Also allow the certificate to serve as a directory node.
        #[arg(long)]
        directory: bool,
    },
}

/// How to reach and join the fabric (shared by `pub` and `sub`).
#[derive(Args, Debug)]
struct ConnArgs {
    /// Directory node address, host:port (repeatable, or comma-separated in the
    /// environment variable).
    #[arg(
        long = "directory",
        env = "WEFT_DIRECTORY",
        value_delimiter = ',',
        default_value = "127.0.0.1:7400",
        value_name = "ADDR"
    )]
    directories: Vec<String>,
    /// This peer's identity [default: weft-cli-<pid> in --dev mode, the certificate's
    /// name with --cert].
    #[arg(long, env = "WEFT_NAME")]
    name: Option<String>,
    /// Where the outbox and state live [default: .weft/<name>].
    #[arg(long, env = "WEFT_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Development mode: create a CA and this peer's certificate in --dev-ca if missing
    /// (never in production).
    #[arg(
        long,
        env = "WEFT_DEV",
        value_parser = clap::builder::BoolishValueParser::new(),
        conflicts_with_all = ["ca", "cert", "cert_key"]
    )]
    dev: bool,
    /// Where development mode keeps its CA (the same default as `weft-directory --dev`).
    #[arg(
        long,
        env = "WEFT_DEV_CA",
        default_value = ".weft/dev-ca",
        value_name = "DIR"
    )]
    dev_ca: PathBuf,
    /// Fabric CA certificate (PEM).
    #[arg(long, env = "WEFT_CA", requires_all = ["cert", "cert_key"], value_name = "FILE")]
    ca: Option<PathBuf>,
    /// This peer's certificate (PEM).
    #[arg(long, env = "WEFT_CERT", requires_all = ["ca", "cert_key"], value_name = "FILE")]
    cert: Option<PathBuf>,
    /// This peer's private key (PEM). (Not `--key`: that is the message key of `pub`.)
    #[arg(
        long = "cert-key",
        env = "WEFT_CERT_KEY",
        requires_all = ["ca", "cert"],
        value_name = "FILE"
    )]
    cert_key: Option<PathBuf>,
}

#[derive(Args, Debug)]
#[command(after_long_help = "\
Examples:
  weft pub orders 'order #1' --key user-42 -H trace:abc --dev
  seq 100 | weft pub orders --dev --json
  weft pub orders 'order {{\x1b[0mn}}' --count 10000 --concurrency 256 --dev

Exit codes: 0 every message was acknowledged by every subscribed group; 1 error;
2 published, but some messages were still unacknowledged after --drain-timeout-s
(they stay in the outbox and are resent when a peer with the same --name starts).")]
struct PubArgs {
    /// Topic to publish to.
    topic: String,
    // (`{{n}}` is split by an ANSI reset, or clap would turn its `{n}` into a newline.)
    #[arg(
        help = "Message body; `-` or absent reads stdin, one message per line. `{{\x1b[0mn}}` is \
                replaced by the message's number in this run (from 0)"
    )]
    message: Option<String>,
    /// Ordering key: messages with the same key reach the same group member, in order.
    #[arg(long = "key", value_name = "KEY")]
    msg_key: Option<String>,
    /// Header NAME:VALUE (repeatable).
    #[arg(short = 'H', long = "header", value_name = "NAME:VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Tag (repeatable); subscriptions may filter on tags.
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Publish every message this many times.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// How far a message must get before it counts as published.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Disk)]
    durability: DurabilityArg,
    /// Publishes in flight at once. Above 1, messages may be sequenced out of input
    /// order (so per-key order follows completion, not input, order).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,
    /// Print one JSON object per published message: {"id":"..","groups":N}.
    #[arg(long)]
    json: bool,
    /// Seconds to wait, before exiting, for every group to acknowledge.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    drain_timeout_s: u64,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args, Debug)]
#[command(after_long_help = "\
Examples:
  weft sub orders --group billing --dev
  weft sub orders --group audit --count 10 --json --dev
  weft sub jobs --group workers --raw --dev > jobs.txt

Output: `[group] id key payload` per delivery (key `-` when absent); --raw prints
only the payload; --json prints {\"topic\",\"group\",\"id\",\"key\",\"headers\",\"tags\",
\"publish_time_ms\",\"payload\"} (payload as UTF-8, invalid bytes replaced).
Every delivery is acknowledged after it was printed, unless --no-ack.")]
struct SubArgs {
    /// Topic to subscribe to.
    topic: String,
    /// Group to join: every group gets every message, members of a group share them.
    #[arg(long, short)]
    group: String,
    /// Exit after this many deliveries.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Print only the payload bytes, followed by a newline.
    #[arg(long, conflicts_with = "json")]
    raw: bool,
    /// Print one JSON object per delivery.
    #[arg(long)]
    json: bool,
    /// Do not acknowledge: the sender redelivers after its ack timeout.
    #[arg(long)]
    no_ack: bool,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum DurabilityArg {
    /// Kept in memory only until every group acknowledged (lost if this process dies).
    Memory,
    /// Written and synced to the local outbox (default).
    Disk,
    /// As disk, and only counts as published once every group acknowledged it.
    Confirmed,
}

impl From<DurabilityArg> for Durability {
    fn from(d: DurabilityArg) -> Self {
        match d {
            DurabilityArg::Memory => Durability::Memory,
            DurabilityArg::Disk => Durability::Disk,
            DurabilityArg::Confirmed => Durability::Confirmed,
        }
    }
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("header {s:?} must be NAME:VALUE"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("header {s:?} has an empty name"));
    }
    Ok((name.to_string(), value.trim().to_string()))
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    init_logs(cli.verbose);
    let result = match cli.command {
        Command::Certs(cmd) => certs_command(cmd).map(|()| ExitCode::SUCCESS),
        Command::Pub(args) => run_async(pub_command(args)),
        Command::Sub(args) => run_async(sub_command(args)),
        Command::Bench(args) => {
            run_async(async move { bench::run(args).await.map(|()| ExitCode::SUCCESS) })
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn init_logs(verbose: u8) {
    let filter = match verbose {
        0 => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        1 => tracing_subscriber::EnvFilter::new("info,quinn=warn"),
        2 => tracing_subscriber::EnvFilter::new("debug,quinn=info"),
        _ => tracing_subscriber::EnvFilter::new("trace"),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn run_async(fut: impl std::future::Future<Output = Result<ExitCode>>) -> Result<ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(fut)
}

/// The error and its causes on one line. Library errors often already include their
/// source in their own message, so causes already shown are skipped.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

// ---------------------------------------------------------------------------------------
// certs

fn certs_command(cmd: CertsCommand) -> Result<()> {
    match cmd {
        CertsCommand::Init { dir } => {
            let paths = certs::init_ca(&dir)
                .with_context(|| format!("creating a fabric CA in {}", dir.display()))?;
            println!("CA certificate: {}", paths.cert.display());
            println!("CA private key: {}", paths.key.display());
            eprintln!(
                "Distribute {} to every node; keep {} off the nodes and safe.",
                paths.cert.display(),
                paths.key.display()
            );
        }
        CertsCommand::Issue {
            name,
            dir,
            directory,
        } => {
            let extra: &[&str] = if directory {
                &[weft_proto::DIRECTORY_IDENTITY]
            } else {
                &[]
            };
            let paths = certs::issue(&dir, &name, extra).with_context(|| {
                format!(
                    "issuing a certificate for {name:?} from the CA in {}",
                    dir.display()
                )
            })?;
            println!("certificate: {}", paths.cert.display());
            println!("private key: {}", paths.key.display());
            println!("CA:          {}", paths.ca.display());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Connecting

/// A started peer, plus what to clean up after it.
struct Connected {
    peer: Peer,
    data_dir: PathBuf,
    /// Files and directories that exist only for this run (a default `weft-cli-<pid>`
    /// identity): removed after a clean exit.
    ephemeral: Vec<PathBuf>,
}

impl Connected {
    async fn close(self, clean: bool) -> Result<()> {
        self.peer.close().await.context("closing the peer")?;
        if clean {
            remove_all(&self.ephemeral);
        }
        Ok(())
    }
}

fn remove_all(paths: &[PathBuf]) {
    for path in paths {
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        };
    }
}

fn resolve_directories(addrs: &[String]) -> Result<Vec<SocketAddr>> {
    let mut out = Vec::new();
    for a in addrs {
        let resolved = a
            .to_socket_addrs()
            .with_context(|| format!("invalid directory address {a:?} (expected host:port)"))?;
        out.extend(resolved);
    }
    if out.is_empty() {
        bail!("no directory address: pass --directory HOST:PORT or set WEFT_DIRECTORY");
    }
    Ok(out)
}

async fn connect(conn: &ConnArgs, durability: Durability) -> Result<Connected> {
    let directories = resolve_directories(&conn.directories)?;
    let mut ephemeral = Vec::new();
    let (name, creds) = match (&conn.ca, &conn.cert, &conn.cert_key) {
        (Some(ca), Some(cert), Some(key)) => {
            let creds = Credentials::load(ca, cert, key).with_context(|| {
                format!(
                    "loading the certificate {} and key {}",
                    cert.display(),
                    key.display()
                )
            })?;
            let identity = creds.identity().to_string();
            if let Some(name) = &conn.name {
                if *name != identity {
                    bail!("--name {name:?} differs from the certificate's identity {identity:?}");
                }
            }
            (identity, Some(creds))
        }
        _ if conn.dev => {
            let name = match &conn.name {
                Some(n) => n.clone(),
                None => {
                    let name = format!("weft-cli-{}", std::process::id());
                    for ext in ["pem", "key"] {
                        let p = conn.dev_ca.join(format!("{name}.{ext}"));
                        if !p.exists() {
                            ephemeral.push(p);
                        }
                    }
                    name
                }
            };
            certs::validate_name(&name).context("invalid --name")?;
            (name, None)
        }
        _ => bail!(
            "no credentials: pass --dev for a development fabric, or --ca, --cert and --cert-key \
             (see `weft certs --help`)"
        ),
    };
    let data_dir = match &conn.data_dir {
        Some(d) => d.clone(),
        None => {
            let d = Path::new(".weft").join(&name);
            if conn.name.is_none() && creds.is_none() && !d.exists() {
                ephemeral.push(d.clone());
            }
            d
        }
    };
    let mut builder = Peer::builder(&name)
        .directory(directories.iter().copied())
        .data_dir(&data_dir)
        .durability(durability);
    builder = match creds {
        Some(creds) => builder.credentials(creds),
        None => builder.dev_ca(&conn.dev_ca),
    };
    let started = builder.start().await;
    let peer = started
        .inspect_err(|_| remove_all(&ephemeral))
        .with_context(|| {
            format!(
                "starting peer {name:?} (data in {}, directory {})",
                data_dir.display(),
                conn.directories.join(",")
            )
        })?;
    Ok(Connected {
        peer,
        data_dir,
        ephemeral,
    })
}

// ---------------------------------------------------------------------------------------
// pub

/// Replaces every `{{n}}` in `template` by `n`.
fn render(template: &Bytes, n: u64) -> Bytes {
    const PAT: &[u8] = b"{{n}}";
    if !template.windows(PAT.len()).any(|w| w == PAT) {
        return template.clone();
    }
    let number = n.to_string();
    let mut out = Vec::with_capacity(template.len() + number.len());
    let mut rest: &[u8] = template;
    while let Some(pos) = rest.windows(PAT.len()).position(|w| w == PAT) {
        out.extend_from_slice(&rest[..pos]);
        out.extend_from_slice(number.as_bytes());
        rest = &rest[pos + PAT.len()..];
    }
    out.extend_from_slice(rest);
    Bytes::from(out)
}

/// Feeds message bodies (each `count` times, templated) into `tx`.
async fn read_messages(message: Option<String>, count: u64, tx: mpsc::Sender<Result<Bytes>>) {
    let mut n = 0u64;
    let mut emit = |body: Bytes| {
        let out: Vec<Bytes> = (0..count)
            .map(|_| {
                let b = render(&body, n);
                n += 1;
                b
            })
            .collect();
        out
    };
    match message.as_deref() {
        Some(m) if m != "-" => {
            for b in emit(Bytes::from(m.to_string())) {
                if tx.send(Ok(b)).await.is_err() {
                    return;
                }
            }
        }
        _ => {
            if std::io::stdin().is_terminal() {
                eprintln!("reading messages from stdin, one per line (Ctrl-D to finish)");
            }
            let mut reader = tokio::io::BufReader::new(tokio::io::stdin());
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line).await {
                    Ok(0) => return,
                    Ok(_) => {
                        if line.last() == Some(&b'\n') {
                            line.pop();
                            if line.last() == Some(&b'\r') {
                                line.pop();
                            }
                        }
                        for b in emit(Bytes::copy_from_slice(&line)) {
                            if tx.send(Ok(b)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(anyhow::Error::new(e).context("reading stdin")))
                            .await;
                        return;
                    }
                }
            }
        }
    }
}

fn print_line(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

async fn pub_command(args: PubArgs) -> Result<ExitCode> {
    let durability: Durability = args.durability.into();
    let connected = connect(&args.conn, durability).await?;
    let peer = connected.peer.clone();

    let (tx, mut rx) = mpsc::channel(args.concurrency as usize);
    let reader = tokio::spawn(read_messages(args.message.clone(), args.count, tx));

    let started = Instant::now();
    let mut in_flight = FuturesOrdered::new();
    let mut input_open = true;
    let mut published = 0u64;
    let mut to_nobody = 0u64;
    let mut failure: Option<anyhow::Error> = None;
    let mut handle = |receipt: Receipt| -> Result<()> {
        published += 1;
        if receipt.groups == 0 {
            to_nobody += 1;
        }
        let line = if args.json {
            serde_json::json!({"id": receipt.id.to_string(), "groups": receipt.groups}).to_string()
        } else {
            format!(
                "published {} to {} ({} group{})",
                receipt.id,
                args.topic,
                receipt.groups,
                if receipt.groups == 1 { "" } else { "s" }
            )
        };
        print_line(&line).context("writing to stdout")
    };
    loop {
        tokio::select! {
            r = in_flight.next(), if !in_flight.is_empty() => {
                let r: Option<weft_peer::Result<Receipt>> = r;
                let outcome = match r {
                    Some(Ok(receipt)) => handle(receipt),
                    Some(Err(e)) => Err(anyhow::Error::new(e)
                        .context(format!("publishing to {:?}", args.topic))),
                    None => Ok(()),
                };
                if let Err(e) = outcome {
                    failure = Some(e);
                    break;
                }
            }
            m = rx.recv(), if input_open && in_flight.len() < args.concurrency as usize => {
                match m {
                    Some(Ok(payload)) => {
                        let mut msg = Message::new(payload);
                        if let Some(k) = &args.msg_key {
                            msg = msg.key(k.clone());
                        }
                        for t in &args.tags {
                            msg = msg.tag(t.clone());
                        }
                        for (k, v) in &args.headers {
                            msg = msg.header(k.clone(), v.clone());
                        }
                        let peer = peer.clone();
                        let topic = args.topic.clone();
                        in_flight.push_back(async move {
                            peer.publish_with(&topic, msg, durability, WhenFull::Wait).await
                        });
                    }
                    Some(Err(e)) => {
                        failure = Some(e);
                        break;
                    }
                    None => input_open = false,
                }
            }
            else => break,
        }
    }
    reader.abort();
    // After a failure, let the publishes already under way finish (a cancelled publish
    // would leave its message in the outbox undispatched until the next start).
    while let Some(r) = in_flight.next().await {
        if let Ok(receipt) = r {
            let _ = handle(receipt);
        }
    }
    let elapsed = started.elapsed();
    if to_nobody > 0 {
        eprintln!(
            "warning: no group subscribes to {:?}: {to_nobody} message(s) went to nobody",
            args.topic
        );
    }
    tracing::info!(published, ?elapsed, "publishing done; draining");
    let timeout = Duration::from_secs(args.drain_timeout_s);
    let drained = peer.drain(timeout).await;
    let pending = peer.outbox_stats().pending_messages;
    drop(peer);
    let data_dir = connected.data_dir.clone();
    // With nothing pending, a default identity's data is disposable.
    connected.close(drained).await?;
    if let Some(e) = failure {
        return Err(e);
    }
    if !drained {
        eprintln!(
            "error: {pending} message(s) still unacknowledged after {}s; they stay in the \
             outbox in {} and are resent when a peer starts with the same --name/--data-dir",
            args.drain_timeout_s,
            data_dir.display()
        );
        return Ok(ExitCode::from(EXIT_NOT_DRAINED));
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------
// sub

fn format_delivery(d: &Delivery, raw: bool, json: bool) -> Vec<u8> {
    if raw {
        let mut out = Vec::with_capacity(d.payload().len() + 1);
        out.extend_from_slice(d.payload());
        out.push(b'\n');
        return out;
    }
    let payload = String::from_utf8_lossy(d.payload());
    let mut line = if json {
        // Repeated header names are combined with ", " (as HTTP does).
        let mut headers = serde_json::Map::new();
        for (k, v) in d.headers() {
            match headers.get_mut(k) {
                Some(serde_json::Value::String(prev)) => {
                    prev.push_str(", ");
                    prev.push_str(v);
                }
                _ => {
                    headers.insert(k.clone(), serde_json::Value::String(v.clone()));
                }
            }
        }
        serde_json::json!({
            "topic": d.topic(),
            "group": d.group(),
            "id": d.id().to_string(),
            "key": d.key(),
            "headers": headers,
            "tags": d.tags(),
            "publish_time_ms": d.publish_time_ms(),
            "payload": payload,
        })
        .to_string()
    } else {
        format!(
            "[{}] {} {} {}",
            d.group(),
            d.id(),
            d.key().unwrap_or("-"),
            payload
        )
    };
    line.push('\n');
    line.into_bytes()
}

async fn sub_command(args: SubArgs) -> Result<ExitCode> {
    let connected = connect(&args.conn, Durability::Disk).await?;
    // Take no more in flight than we will consume.
    let credit = args
        .count
        .map_or(DEFAULT_CREDIT, |c| c.min(u64::from(DEFAULT_CREDIT)) as u32);
    let mut sub = connected
        .peer
        .subscribe(args.topic.clone())
        .group(args.group.clone())
        .credit(credit)
        .start()
        .await
        .with_context(|| format!("subscribing to {:?} in group {:?}", args.topic, args.group))?;
    eprintln!(
        "subscribed to {:?} in group {:?} as {}",
        args.topic,
        args.group,
        connected.peer.identity()
    );
    let mut received = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut failure = None;
    while args.count.is_none_or(|c| received < c) {
        let delivery = tokio::select! {
            d = sub.next() => d,
            _ = &mut ctrl_c => break,
        };
        let Some(delivery) = delivery else {
            failure = Some(anyhow::anyhow!(
                "the subscription ended: the peer shut down"
            ));
            break;
        };
        let bytes = format_delivery(&delivery, args.raw, args.json);
        let written = {
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes).and_then(|()| out.flush())
        };
        match written {
            Ok(()) => {}
            // The reader went away (e.g. `| head`): stop without acking this one.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
            Err(e) => {
                failure = Some(anyhow::Error::new(e).context("writing to stdout"));
                break;
            }
        }
        received += 1;
        if !args.no_ack {
            delivery.ack();
        }
    }
    drop(sub);
    tokio::time::sleep(SUB_LINGER).await;
    // A subscriber's outbox is empty: a default identity's data is disposable.
    connected.close(true).await?;
    match failure {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_replaces_every_placeholder() {
        assert_eq!(render(&Bytes::from("a{{n}}b{{n}}"), 7), "a7b7");
        assert_eq!(render(&Bytes::from("plain"), 7), "plain");
        assert_eq!(render(&Bytes::from("{{n}}"), 0), "0");
    }

    #[test]
    fn headers_parse() {
        assert_eq!(
            parse_header("trace: abc:d").unwrap(),
            ("trace".into(), "abc:d".into())
        );
        assert!(parse_header("novalue").is_err());
        assert!(parse_header(":v").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
