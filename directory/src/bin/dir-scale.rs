//! `dir-scale`: a scale benchmark of a 3-node directory cluster (not a test).
//!
//! Starts three `weft-directory` processes (the binary next to this one; gossip over UDP
//! on 127.0.0.1, one development CA shared by the nodes and the simulated peers), issues
//! one certificate per simulated peer, attaches every peer over its own QUIC connection
//! (round-robin over the nodes, multiplexed over a few client endpoints), registers
//! `--subs` subscriptions per peer and reports:
//!
//! - certificate issuing time;
//! - time from the last registration acknowledged (and from the first registration)
//!   until every node resolves every route completely, checked from outside over the
//!   directory protocol (one connection per node, pipelined `Resolve` requests);
//! - time from a peer's death (connection closed) until a watcher on another node hears
//!   of it (p50/p99; includes the grace period, which is reported separately);
//! - RSS (VmRSS, and the peak VmHWM) and CPU at rest of each directory node process, and
//!   of this benchmark process (the simulated peers) for reference.
//!
//! Build both binaries, then run this one:
//! `cargo build --release -p weft-directory --bins && target/release/dir-scale --peers 10000`
//! (see docs/operations.md).

use std::collections::{BTreeSet, HashMap};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use futures::StreamExt;
use weft_proto::certs;
use weft_proto::tls::{self, Credentials};
use weft_proto::wire::{
    self, DirRequest, DirResponse, Frame, FrameReader, FrameWriter, Hello, Role, Subscription,
    DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};

/// Name of the directory node binary, looked up next to this executable.
const DIRECTORY_BIN: &str = "weft-directory";
/// Resolve requests in flight per node connection while checking routes.
const RESOLVE_BATCH: usize = 256;
/// Attempts to attach a peer before giving up (a handshake times out after 10 s when the
/// nodes are overloaded).
const ATTACH_ATTEMPTS: u64 = 6;
/// Cluster id given to the node processes.
const CLUSTER_ID: &str = "scale";

/// Scale benchmark of a 3-node directory cluster.
///
/// The three nodes run as separate `weft-directory` processes (found next to this
/// executable: build them together with `cargo build --release -p weft-directory
/// --bins`); the simulated peers, the route checks and the watchers run in this process.
#[derive(Parser, Debug)]
#[command(verbatim_doc_comment)]
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
    /// QUIC client endpoints the simulated peers are multiplexed over.
    #[arg(long, default_value_t = 8)]
    endpoints: usize,
    /// Peers attaching concurrently.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Peer deaths to measure.
    #[arg(long, default_value_t = 30)]
    deaths: usize,
    /// Directory grace period for disconnected peers, in milliseconds (passed to the
    /// nodes as --grace-period-ms).
    #[arg(long, default_value_t = 500)]
    grace_ms: u64,
    /// Gossip interval of the nodes, in milliseconds (written to each node's config
    /// file as gossip_interval_ms).
    #[arg(long, default_value_t = 100)]
    gossip_interval_ms: u64,
    /// Seconds to measure CPU at rest (after every route converged).
    #[arg(long, default_value_t = 10)]
    rest_secs: u64,
    /// Working directory: the development CA shared by the nodes and the simulated
    /// peers, all certificates, the nodes' config files and logs (`dir-N.log`). Reuse it
    /// to keep issued certificates between runs. Default: a temporary directory, removed
    /// after a successful run (kept on failure, for the logs).
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// The `weft-directory` binary to run (default: the one next to this executable).
    #[arg(long)]
    directory_bin: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------
// Node processes.

/// One `weft-directory` child process.
struct NodeProc {
    name: String,
    child: Child,
    /// Kept open so that the child never writes into a closed pipe.
    _stdout: Option<std::io::BufReader<ChildStdout>>,
    addr: SocketAddr,
    gossip: SocketAddr,
    log: PathBuf,
}

impl NodeProc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The node processes; kills (and reaps) every child when dropped, including on errors
/// and panics.
#[derive(Default)]
struct Nodes(Vec<NodeProc>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for n in &mut self.0 {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
    }
}

impl Nodes {
    /// Fails (with the tail of its log) if a node process has exited.
    fn ensure_running(&mut self) -> Result<()> {
        for n in &mut self.0 {
            if let Some(status) = n.child.try_wait()? {
                bail!(
                    "directory node {} exited ({status}); last lines of {}:\n{}",
                    n.name,
                    n.log.display(),
                    log_tail(&n.log, 20)
                );
            }
        }
        Ok(())
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn directory_binary(args: &Args) -> Result<PathBuf> {
    let path = match &args.directory_bin {
        Some(p) => p.clone(),
        None => {
            let exe = std::env::current_exe().context("locating the dir-scale executable")?;
            exe.parent()
                .context("the dir-scale executable has no parent directory")?
                .join(DIRECTORY_BIN)
        }
    };
    ensure!(
        path.is_file(),
        "directory node binary {} not found: build it with `cargo build --release -p \
         weft-directory` (or `--bins` to build it together with dir-scale), or pass \
         --directory-bin",
        path.display()
    );
    Ok(path)
}

/// Starts node `name` and waits until it prints its addresses. The child is pushed into
/// `nodes` before waiting, so it is killed if anything fails.
async fn spawn_node(
    nodes: &mut Nodes,
    bin: &Path,
    dir: &Path,
    name: &str,
    seeds: &[SocketAddr],
    args: &Args,
) -> Result<()> {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "cluster_id = \"{CLUSTER_ID}\"\ngossip_interval_ms = {}\n",
            args.gossip_interval_ms
        ),
    )
    .with_context(|| format!("writing {}", config.display()))?;
    let log = dir.join(format!("{name}.log"));
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(&config)
        .arg("--dev")
        .arg("--dev-ca")
        .arg(dir)
        .args(["--name", name])
        .args(["--listen", "127.0.0.1:0"])
        .args(["--gossip-listen", "127.0.0.1:0"])
        .args(["--grace-period-ms", &args.grace_ms.to_string()])
        .arg("--print-addr");
    for s in seeds {
        cmd.args(["--seed", &s.to_string()]);
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn,quinn=error");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {} for {name}", bin.display()))?;
    let stdout = child.stdout.take().context("child stdout")?;
    nodes.0.push(NodeProc {
        name: name.to_string(),
        child,
        _stdout: None,
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        gossip: SocketAddr::from(([0, 0, 0, 0], 0)),
        log: log.clone(),
    });
    // Reads `listening <addr>` and `gossip <addr>`; ends at EOF if the child dies (which
    // the guard also causes on timeout).
    let reader = tokio::task::spawn_blocking(move || {
        let mut out = std::io::BufReader::new(stdout);
        let (mut listen, mut gossip) = (None, None);
        let mut line = String::new();
        while listen.is_none() || gossip.is_none() {
            line.clear();
            if out.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            match line.trim().split_once(' ') {
                Some(("listening", a)) => listen = a.parse::<SocketAddr>().ok(),
                Some(("gossip", a)) => gossip = a.parse::<SocketAddr>().ok(),
                _ => {}
            }
        }
        (listen, gossip, out)
    });
    let (listen, gossip, out) = match tokio::time::timeout(Duration::from_secs(30), reader).await {
        Ok(r) => r?,
        Err(_) => bail!(
            "directory node {name} did not print its addresses within 30 s; last lines of {}:\n{}",
            log.display(),
            log_tail(&log, 20)
        ),
    };
    let (Some(listen), Some(gossip)) = (listen, gossip) else {
        nodes.ensure_running()?;
        bail!(
            "directory node {name} did not print its addresses; last lines of {}:\n{}",
            log.display(),
            log_tail(&log, 20)
        );
    };
    let node = nodes.0.last_mut().expect("pushed above");
    node.addr = listen;
    node.gossip = gossip;
    node._stdout = Some(out);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// /proc readings.

/// A `kB` field (`VmRSS`, `VmHWM`) of /proc/PID/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (utime + stime) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the ')'.
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 if that fails, as on every common
/// Linux configuration).
fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// The processes measured: the nodes, then this benchmark.
fn measured(nodes: &Nodes) -> Vec<(String, u32)> {
    nodes
        .0
        .iter()
        .map(|n| (n.name.clone(), n.pid()))
        .chain(std::iter::once((
            "dir-scale".to_string(),
            std::process::id(),
        )))
        .collect()
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

fn fmt_dur(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else if d < Duration::from_secs(20) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{:.0} s", d.as_secs_f64())
    }
}

// ---------------------------------------------------------------------------------------
// Peers and clients.

struct Peer {
    name: String,
    conn: quinn::Connection,
    _writer: FrameWriter,
    _reader: FrameReader,
    topics: Vec<String>,
    /// When its Register requests were sent.
    sent: Instant,
    /// When the last of its Register requests was acknowledged.
    acked: Instant,
}

/// A protocol session with a directory node (certificate `name` from the CA in `ca`).
struct Client {
    conn: quinn::Connection,
    writer: FrameWriter,
    reader: FrameReader,
    next_id: u64,
}

impl Client {
    async fn connect(
        endpoint: &quinn::Endpoint,
        ca: &Path,
        name: &str,
        addr: SocketAddr,
        listen_addrs: Vec<SocketAddr>,
    ) -> Result<Client> {
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
            .with_context(|| format!("connecting {name} to {addr}"))?;
        let (send, recv) = conn.open_bi().await?;
        let mut writer = FrameWriter::new(send, DEFAULT_MAX_FRAME);
        let mut reader = FrameReader::new(recv, DEFAULT_MAX_FRAME);
        let hello = Hello {
            version: PROTOCOL_VERSION,
            identity: name.to_string(),
            incarnation: 1,
            role: Role::Peer,
            listen_addrs,
            zone: None,
        };
        wire::open_handshake(&mut writer, &mut reader, &hello).await?;
        Ok(Client {
            conn,
            writer,
            reader,
            next_id: 1,
        })
    }

    /// One request and its response (pushed `RouteChanged` frames are skipped).
    async fn request(&mut self, body: DirRequest) -> Result<DirResponse> {
        let id = self.next_id;
        self.next_id += 1;
        self.writer.send(&Frame::Request { id, body }).await?;
        loop {
            match self.reader.next().await? {
                Some(Frame::Response { id: got, body }) if got == id => return Ok(body),
                Some(Frame::RouteChanged(_)) => {}
                Some(other) => bail!("unexpected frame {}", other.kind()),
                None => bail!("directory closed the stream"),
            }
        }
    }

    /// Members (over all groups) of each topic, resolving `RESOLVE_BATCH` topics per
    /// round trip.
    async fn member_counts(&mut self, topics: &[&str]) -> Result<Vec<usize>> {
        let mut out = Vec::with_capacity(topics.len());
        for chunk in topics.chunks(RESOLVE_BATCH) {
            let first = self.next_id;
            for topic in chunk {
                self.writer.queue(&Frame::Request {
                    id: self.next_id,
                    body: DirRequest::Resolve {
                        topic: topic.to_string(),
                    },
                })?;
                self.next_id += 1;
            }
            self.writer.flush().await?;
            let mut counts: Vec<Option<usize>> = vec![None; chunk.len()];
            let mut missing = chunk.len();
            while missing > 0 {
                match self.reader.next().await? {
                    Some(Frame::Response { id, body })
                        if id >= first && id - first < chunk.len() as u64 =>
                    {
                        let DirResponse::Route(route) = body else {
                            bail!("unexpected answer to Resolve: {body:?}");
                        };
                        let slot = &mut counts[(id - first) as usize];
                        if slot.is_none() {
                            missing -= 1;
                        }
                        *slot = Some(route.groups.iter().map(|g| g.members.len()).sum());
                    }
                    Some(Frame::RouteChanged(_)) => {}
                    Some(other) => bail!("unexpected frame {} while resolving", other.kind()),
                    None => bail!("directory closed the stream"),
                }
            }
            out.extend(counts.into_iter().flatten());
        }
        Ok(out)
    }
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
    let listen = vec![SocketAddr::from(([127, 0, 0, 1], 20_000))];
    let Client {
        conn,
        mut writer,
        mut reader,
        ..
    } = Client::connect(endpoint, ca, &name, addr, listen).await?;
    let topics: Vec<String> = subs.iter().map(|s| s.topic.clone()).collect();
    let n = subs.len() as u64;
    for (id, sub) in subs.into_iter().enumerate() {
        writer.queue(&Frame::Request {
            id: id as u64,
            body: DirRequest::Register(sub),
        })?;
    }
    let sent = Instant::now();
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
        sent,
        acked: Instant::now(),
    })
}

/// Resolves the still incomplete topics of one node until all of them have their
/// expected member count; returns when the last one was seen complete and the number
/// of check rounds.
async fn await_complete(
    client: &mut Client,
    expected: &[(String, usize)],
    deadline: Instant,
) -> Result<(Instant, usize)> {
    let mut pending: Vec<usize> = (0..expected.len()).collect();
    let mut rounds = 0;
    loop {
        rounds += 1;
        let topics: Vec<&str> = pending.iter().map(|&i| expected[i].0.as_str()).collect();
        let counts = client.member_counts(&topics).await?;
        let now = Instant::now();
        pending = pending
            .into_iter()
            .zip(counts)
            .filter(|(i, n)| *n != expected[*i].1)
            .map(|(i, _)| i)
            .collect();
        if pending.is_empty() {
            return Ok((now, rounds));
        }
        if now > deadline {
            let (topic, n) = &expected[pending[0]];
            bail!(
                "{} topics still incomplete (e.g. {topic}: expected {n} members)",
                pending.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issues certificates for `names` missing in `dir` (in parallel).
async fn issue_all(dir: &Path, names: &[String]) -> Result<()> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = names.len().div_ceil(workers).max(1);
    let handles: Vec<_> = names
        .chunks(chunk)
        .map(|c| {
            let c = c.to_vec();
            let dir = dir.to_path_buf();
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
    Ok(())
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
    let dir = work_dir(&args)?;
    // On Ctrl-C or SIGTERM the run is dropped, and with it the guard that kills the
    // node processes.
    let result = tokio::select! {
        r = run(&args, &dir) => r,
        s = interrupted() => Err(anyhow::anyhow!("interrupted by {s}")),
    };
    match &result {
        Ok(()) if args.cert_dir.is_none() => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(()) => {}
        Err(_) => eprintln!(
            "dir-scale failed; certificates and node logs are in {}",
            dir.display()
        ),
    }
    result
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM, naming it.
async fn interrupted() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            return tokio::select! {
                _ = tokio::signal::ctrl_c() => "Ctrl-C",
                _ = term.recv() => "SIGTERM",
            };
        }
    }
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
    "Ctrl-C"
}

async fn run(args: &Args, ca: &Path) -> Result<()> {
    let bin = directory_binary(args)?;
    let tick = clock_ticks_per_sec();
    println!(
        "dir-scale: {} peers x {} subscriptions over {} topics, 3 node processes ({}), grace {} ms, gossip {} ms",
        args.peers,
        args.subs,
        args.topics,
        bin.display(),
        args.grace_ms,
        args.gossip_interval_ms
    );
    let rss0 = status_kib(std::process::id(), "VmRSS");

    // The CA (shared by the nodes and the peers) and the benchmark's own identities,
    // created before the nodes start so that they do not race to create the CA.
    if !ca.join(certs::CA_CERT_FILE).exists() {
        certs::init_ca(ca).context("creating the development CA")?;
    }
    let node_names: Vec<String> = (1..=3).map(|i| format!("dir-{i}")).collect();
    let probe_names: Vec<String> = node_names.iter().map(|n| format!("probe-{n}")).collect();
    let mut own: Vec<String> = probe_names.clone();
    own.push("watcher".into());
    issue_all(ca, &own).await?;

    // Nodes.
    let mut nodes = Nodes::default();
    let t = Instant::now();
    let mut seeds = Vec::new();
    for name in &node_names {
        spawn_node(&mut nodes, &bin, ca, name, &seeds, args).await?;
        seeds.push(nodes.0.last().expect("spawned").gossip);
    }
    let addrs: Vec<SocketAddr> = nodes.0.iter().map(|n| n.addr).collect();
    for n in &nodes.0 {
        println!(
            "  {} pid {} peers {} gossip {} log {}",
            n.name,
            n.pid(),
            n.addr,
            n.gossip,
            n.log.display()
        );
    }
    println!("3 node processes started in {}", fmt_dur(t.elapsed()));

    // One probe connection per node: registers `probe-<node>`; the cluster has formed
    // once every node resolves the probes of all three. Reused to check routes.
    let probe_ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let mut probes = Vec::new();
    for (name, addr) in probe_names.iter().zip(&addrs) {
        let mut c = Client::connect(&probe_ep, ca, name, *addr, vec![]).await?;
        let body = c
            .request(DirRequest::Register(Subscription {
                topic: name.clone(),
                group: "probe".into(),
            }))
            .await?;
        ensure!(
            body == DirResponse::Ok,
            "probe registration refused: {body:?}"
        );
        probes.push(c);
    }
    let probe_topics: Vec<&str> = probe_names.iter().map(String::as_str).collect();
    loop {
        let mut formed = true;
        for c in &mut probes {
            formed &= c
                .member_counts(&probe_topics)
                .await?
                .iter()
                .all(|n| *n == 1);
        }
        if formed {
            break;
        }
        nodes.ensure_running()?;
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the cluster did not form within 30 s (a probe registered on each node did not reach every node)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "cluster formed (every node resolves a probe registered on each node) {} after starting the nodes",
        fmt_dur(t.elapsed())
    );
    let procs = measured(&nodes);
    let rss_idle: Vec<u64> = procs.iter().map(|(_, p)| status_kib(*p, "VmRSS")).collect();

    // Certificates.
    let t = Instant::now();
    let names: Vec<String> = (0..args.peers).map(|i| format!("peer-{i}")).collect();
    issue_all(ca, &names).await?;
    let issued = t.elapsed();
    println!(
        "issued {} peer certificates in {} ({:.0}/s)",
        args.peers,
        fmt_dur(issued),
        args.peers as f64 / issued.as_secs_f64()
    );

    // Expected routes.
    let mut counts: HashMap<String, usize> = Default::default();
    for i in 0..args.peers {
        for s in subscriptions(i, args) {
            *counts.entry(s.topic).or_default() += 1;
        }
    }
    let mut expected: Vec<(String, usize)> = counts.into_iter().collect();
    expected.sort();

    // Attach and register.
    let endpoints: Vec<quinn::Endpoint> = (0..args.endpoints.max(1))
        .map(|_| quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")))
        .collect::<Result<_, _>>()?;
    let cpu_before_attach: Vec<u64> = procs.iter().map(|(_, p)| cpu_ticks(*p)).collect();
    let t = Instant::now();
    let progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let results: Vec<Result<Peer>> = futures::stream::iter(0..args.peers)
        .map(|i| {
            let ep = endpoints[i % endpoints.len()].clone();
            let addr = addrs[i % addrs.len()];
            let subs = subscriptions(i, args);
            let name = names[i].clone();
            let progress = progress.clone();
            async move {
                let mut attempt = 0;
                let peer = loop {
                    attempt += 1;
                    match attach(&ep, ca, name.clone(), addr, subs.clone()).await {
                        Ok(p) => break Ok(p),
                        Err(e) if attempt < ATTACH_ATTEMPTS => {
                            eprintln!("{name}: attempt {attempt} failed: {e:#}; retrying");
                            tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
                        }
                        Err(e) => break Err(e),
                    }
                };
                let n = progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if n.is_multiple_of(1000) {
                    println!("  {n} peers attached ({})", fmt_dur(t.elapsed()));
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
    let first_reg = peers.iter().map(|p| p.sent).min().unwrap_or(t);
    let last_ack = peers.iter().map(|p| p.acked).max().unwrap_or(t);
    peers.sort_by_key(|p| {
        p.name
            .trim_start_matches("peer-")
            .parse::<usize>()
            .unwrap_or(0)
    });
    println!(
        "attached and registered {} peers in {} ({:.0} peers/s)",
        peers.len(),
        fmt_dur(registered),
        peers.len() as f64 / registered.as_secs_f64()
    );

    // Convergence, checked from outside on each node concurrently.
    nodes.ensure_running()?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let checks = probes
        .iter_mut()
        .map(|c| await_complete(c, &expected, deadline));
    let mut done = Vec::new();
    for (r, n) in futures::future::join_all(checks)
        .await
        .into_iter()
        .zip(&nodes.0)
    {
        done.push(r.with_context(|| format!("routes on {}", n.name))?);
    }
    let converged = done.iter().map(|(at, _)| *at).max().unwrap_or(last_ack);
    let after_last = converged.saturating_duration_since(last_ack);
    let after_first = converged.saturating_duration_since(first_reg);
    println!(
        "every node resolves every route ({} topics) {} after the last registration was acknowledged, {} after the first registration",
        expected.len(),
        fmt_dur(after_last),
        fmt_dur(after_first)
    );
    for ((at, rounds), n) in done.iter().zip(&nodes.0) {
        println!(
            "  {}: {} after the last registration ({rounds} check rounds)",
            n.name,
            fmt_dur(at.saturating_duration_since(last_ack))
        );
    }
    // Every route once more, all nodes (not timed): nothing regressed.
    let all_topics: Vec<&str> = expected.iter().map(|(t, _)| t.as_str()).collect();
    for (c, n) in probes.iter_mut().zip(&nodes.0) {
        let counts = c.member_counts(&all_topics).await?;
        let wrong = expected
            .iter()
            .zip(&counts)
            .filter(|((_, want), got)| *want != **got)
            .count();
        ensure!(
            wrong == 0,
            "{}: {wrong} routes incomplete on re-check",
            n.name
        );
    }
    let cpu_after_attach: Vec<u64> = procs.iter().map(|(_, p)| cpu_ticks(*p)).collect();
    let loaded_secs = t.elapsed().as_secs_f64();
    let rss_loaded: Vec<u64> = procs.iter().map(|(_, p)| status_kib(*p, "VmRSS")).collect();

    // CPU at rest.
    nodes.ensure_running()?;
    let c0: Vec<u64> = procs.iter().map(|(_, p)| cpu_ticks(*p)).collect();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.rest_secs)).await;
    let rest = t.elapsed().as_secs_f64();
    let cpu_rest: Vec<f64> = procs
        .iter()
        .zip(&c0)
        .map(|((_, p), c0)| cpu_ticks(*p).saturating_sub(*c0) as f64 / tick / rest)
        .collect();
    let rss_rest: Vec<u64> = procs.iter().map(|(_, p)| status_kib(*p, "VmRSS")).collect();

    // Deaths: a watcher on node B hears that a peer attached to node A died.
    let mut latencies = Vec::new();
    let victims: Vec<usize> = (0..args.deaths.min(peers.len()))
        .map(|k| k * (peers.len() / args.deaths.max(1)).max(1))
        .filter(|i| *i < peers.len())
        .collect();
    let mut watchers = Vec::new();
    for addr in &addrs {
        watchers.push(Client::connect(&probe_ep, ca, "watcher", *addr, vec![]).await?);
    }
    let grace = Duration::from_millis(args.grace_ms);
    for v in victims {
        let home = v % addrs.len();
        let w = &mut watchers[(home + 1) % addrs.len()];
        let peer = &peers[v];
        let topic = peer.topics[0].clone();
        let body = w
            .request(DirRequest::Watch {
                topic: topic.clone(),
            })
            .await?;
        if let DirResponse::Route(route) = body {
            let present = route
                .groups
                .iter()
                .any(|g| g.members.iter().any(|m| m.identity == peer.name));
            if !present {
                bail!("{} not in the route of {topic} before dying", peer.name);
            }
        }
        let t0 = Instant::now();
        peer.conn.close(0u32.into(), b"dying");
        loop {
            match tokio::time::timeout(Duration::from_secs(60), w.reader.next()).await {
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
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    println!(
        "peer death -> watcher on another node: p50 {}, p99 {}, max {} over {} deaths (includes the {} grace period)",
        fmt_dur(p50),
        fmt_dur(p99),
        fmt_dur(latencies.last().copied().unwrap_or_default()),
        latencies.len(),
        fmt_dur(grace)
    );
    nodes.ensure_running()?;

    // Per-process report.
    println!(
        "per process (RSS idle = cluster formed, before any peer; loaded = routes converged; \
         peak = VmHWM at the end; CPU at rest over {rest:.0} s; dir-scale = the {} simulated peers \
         with 1 s QUIC keep-alives, started at {}):",
        peers.len(),
        mib(rss0)
    );
    println!(
        "  {:<10} {:>9} {:>9} {:>9} {:>9} {:>14} {:>24}",
        "process", "RSS idle", "loaded", "at rest", "peak", "CPU at rest", "CPU attach..converged"
    );
    for (i, (name, pid)) in procs.iter().enumerate() {
        let attach_cpu = cpu_after_attach[i].saturating_sub(cpu_before_attach[i]) as f64 / tick;
        println!(
            "  {:<10} {:>9} {:>9} {:>9} {:>9} {:>12.1} % {:>9.1} s ({:.0} % of a core)",
            name,
            mib(rss_idle[i]),
            mib(rss_loaded[i]),
            mib(rss_rest[i]),
            mib(status_kib(*pid, "VmHWM")),
            cpu_rest[i] * 100.0,
            attach_cpu,
            attach_cpu / loaded_secs * 100.0
        );
    }
    let node_count = nodes.0.len();
    let max_rss = rss_rest[..node_count]
        .iter()
        .chain(&rss_loaded[..node_count])
        .max()
        .copied()
        .unwrap_or(0);
    let cpus: Vec<String> = cpu_rest[..node_count]
        .iter()
        .map(|c| format!("{:.0}", c * 100.0))
        .collect();
    println!("summary (targets: convergence < 3 s, death p99 < 3 s, RSS < 200 MiB per node):");
    println!(
        "  convergence after the last registration {} ({}), death p99 {} ({}), max node RSS {} ({})",
        fmt_dur(after_last),
        if after_last < Duration::from_secs(3) { "ok" } else { "MISSED" },
        fmt_dur(p99),
        if p99 < Duration::from_secs(3) { "ok" } else { "MISSED" },
        mib(max_rss),
        if max_rss < 200 * 1024 { "ok" } else { "MISSED" },
    );
    println!("table row:");
    println!(
        "| {} × {} | {} | {} | {} ({} after the first registration) | {} / {} | {} | {} % of a core | {} / {} % of a core |",
        group_digits(args.peers),
        args.subs,
        fmt_dur(issued),
        fmt_dur(registered),
        fmt_dur(after_last),
        fmt_dur(after_first),
        fmt_dur(p50),
        fmt_dur(p99),
        rss_rest[..node_count]
            .iter()
            .map(|k| mib(*k).replace(" MiB", ""))
            .collect::<Vec<_>>()
            .join(" / ")
            + " MiB",
        cpus.join(" / "),
        mib(rss_rest[node_count]),
        format_args!("{:.0}", cpu_rest[node_count] * 100.0),
    );

    drop(watchers);
    drop(peers);
    drop(probes);
    drop(nodes);
    Ok(())
}

fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn work_dir(args: &Args) -> Result<PathBuf> {
    let d = match &args.cert_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("dir-scale-{}", std::process::id())),
    };
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    // Absolute, since the nodes get it as --dev-ca.
    d.canonicalize()
        .with_context(|| format!("resolving {}", d.display()))
}
