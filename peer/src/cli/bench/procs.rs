//! `weft bench --processes`: every peer in a process of its own, as services run.
//!
//! The parent keeps the directory (embedded, or the one of `--directory`) and runs
//! this binary again once per peer with `--role`. It starts the subscribers, waits
//! until all of them are registered, then starts the publishers. A publisher publishes
//! its share, waits until every group acknowledged everything, prints its report as
//! one JSON line and exits. Then the parent closes the subscribers' standard input,
//! and each prints its report (deliveries, latency histogram) and exits. A child that
//! exits before its turn fails the run, with its name and exit status.
//!
//! Send times are `CLOCK_MONOTONIC` nanoseconds (see [`payload`](super::payload)),
//! which every process of the machine shares, so a subscriber measures latency from
//! a publisher in another process.

use super::fabric::{await_route, OutboxLimits};
use super::host::CpuTimes;
use super::report::{ProcessRow, Report};
use super::{
    durability, echo_loop, flag_value, histogram, now_ns, pacing_extra, publish_all,
    receive_batches, receive_each, recorded, round_trips, show_progress, system_name, thr_extra,
    BenchArgs, Fabric, PeerThread, PublishPlan,
};
use anyhow::{Context, Result};
use clap::ValueEnum;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use weft_peer::Durability;

/// What a child process of a `--processes` run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Publishes its share, waits until it is acknowledged, reports.
    Publisher,
    /// Receives and acknowledges until its standard input closes, reports.
    Subscriber,
    /// `--mode lat`: measures round trips through the pong process, reports.
    Ping,
    /// `--mode lat`: echoes every request until its standard input closes.
    Pong,
}

/// The one JSON line a child prints when it is done.
#[derive(Debug, Serialize, Deserialize)]
struct ChildReport {
    role: Role,
    name: String,
    pid: u32,
    /// Messages published (publisher) or delivered (subscriber).
    messages: u64,
    /// Publisher: when it started publishing, returned from its last publish, and
    /// saw every message acknowledged (`CLOCK_MONOTONIC` ns).
    start_ns: u64,
    published_ns: u64,
    drained_ns: u64,
    /// Publisher: group commits that ended in an fdatasync.
    commits: u64,
    cpu_s: f64,
    peak_rss_mib: f64,
    /// Subscriber: publish-to-delivery latencies; publisher with `--rate`: how late
    /// publishes started. An hdrhistogram, V2-serialized, in hex (empty: none).
    histogram: String,
}

impl ChildReport {
    /// The report of a child that is done: this process's usage, no timings.
    fn finished(
        role: Role,
        name: &str,
        messages: u64,
        histogram: Option<&Histogram<u64>>,
    ) -> Result<ChildReport> {
        let (cpu_s, peak_rss_mib) = super::report::process_usage();
        Ok(ChildReport {
            role,
            name: name.to_string(),
            pid: std::process::id(),
            messages,
            start_ns: 0,
            published_ns: 0,
            drained_ns: 0,
            commits: 0,
            cpu_s,
            peak_rss_mib,
            histogram: histogram.map(encode).transpose()?.unwrap_or_default(),
        })
    }
}

/// Returns when the parent closes this process's standard input (its signal to stop).
async fn until_stdin_closes() {
    let mut rest = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut rest).await;
}

/// Runs one peer of a `--processes` run (`--role`).
pub(super) async fn child(args: &BenchArgs, role: Role) -> Result<()> {
    let fabric = Fabric::child(args)?;
    let name = args.name.as_deref().context("--role needs --name")?;
    let topic = args.topic.as_deref().context("--role needs --topic")?;
    let report = match role {
        Role::Publisher => publisher(args, &fabric, name, topic).await?,
        Role::Subscriber => subscriber(args, &fabric, name, topic).await?,
        Role::Ping => ping(args, &fabric, name, topic).await?,
        Role::Pong => pong(args, &fabric, name, topic).await?,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn publisher(
    args: &BenchArgs,
    fabric: &Fabric,
    name: &str,
    topic: &str,
) -> Result<ChildReport> {
    let thread = PeerThread::new(args.thread_layout(), name)?;
    let peer = fabric
        .peer(
            &thread,
            name,
            durability(args.durability),
            OutboxLimits::of(args),
        )
        .await?;
    await_route(&peer, topic, args.groups * args.members).await?;
    let count = args.duration.map_or(args.count, |_| u64::MAX);
    let stop_at = args.duration.map(|d| now_ns() + (d * 1e9) as u64);
    let (plan, pacer) = PublishPlan::new(args, topic, count, stop_at)?;
    let start_ns = now_ns();
    let (messages, lag) = thread.run(publish_all(peer.clone(), plan, pacer)).await??;
    let published_ns = now_ns();
    while !peer.drain(Duration::from_millis(200)).await {}
    let drained_ns = now_ns();
    let commits = peer.outbox_stats().commits;
    let _ = thread.run(peer.close()).await;
    let histogram = lag.as_ref();
    Ok(ChildReport {
        start_ns,
        published_ns,
        drained_ns,
        commits,
        ..ChildReport::finished(Role::Publisher, name, messages, histogram)?
    })
}

async fn subscriber(
    args: &BenchArgs,
    fabric: &Fabric,
    name: &str,
    topic: &str,
) -> Result<ChildReport> {
    let group = args
        .group
        .clone()
        .context("--role subscriber needs --group")?;
    let thread = PeerThread::new(args.thread_layout(), name)?;
    let peer = fabric
        .peer(&thread, name, Durability::Memory, OutboxLimits::default())
        .await?;
    let subscribing = peer
        .subscribe(topic.to_string())
        .group(group)
        .credit(args.credit)
        .start();
    let sub = thread.run(subscribing).await??;
    let delivered = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Mutex::new(histogram()));
    let (d, l) = (delivered.clone(), latency.clone());
    let receiving = if args.batch > 1 {
        thread.handle.spawn(receive_batches(sub, d, l))
    } else {
        thread.handle.spawn(receive_each(sub, d, l))
    };
    let progress = (!args.json).then(|| show_progress(delivered.clone(), format!("{name}: ")));
    // Until the parent says every publisher is done (closes our standard input).
    until_stdin_closes().await;
    if let Some(progress) = progress {
        progress.abort();
    }
    // Closing the peer ends the subscription, and the loop adds its last deliveries.
    let _ = thread.run(peer.close()).await;
    let _ = receiving.await;
    let h = recorded(&latency);
    let delivered = delivered.load(Ordering::Relaxed);
    ChildReport::finished(Role::Subscriber, name, delivered, Some(&h))
}

/// `--mode lat`: subscribes to `topic.pong`, waits until both topics have their
/// member, then measures round trips through the pong process on `topic.ping`.
async fn ping(args: &BenchArgs, fabric: &Fabric, name: &str, topic: &str) -> Result<ChildReport> {
    let thread = PeerThread::new(args.thread_layout(), name)?;
    let peer = fabric
        .peer(
            &thread,
            name,
            durability(args.durability),
            OutboxLimits::default(),
        )
        .await?;
    let (ping_topic, pong_topic) = (format!("{topic}.ping"), format!("{topic}.pong"));
    let replies = thread
        .run(peer.subscribe(pong_topic.clone()).group("ping").start())
        .await??;
    for t in [&ping_topic, &pong_topic] {
        await_route(&peer, t, 1).await?;
    }
    let measuring = round_trips(
        peer.clone(),
        replies,
        ping_topic,
        args.warmup,
        args.count,
        args.size,
    );
    let (h, elapsed) = thread.run(measuring).await??;
    let _ = thread.run(peer.close()).await;
    Ok(ChildReport {
        // The measured round trips took this long.
        drained_ns: elapsed.as_nanos() as u64,
        ..ChildReport::finished(Role::Ping, name, args.count, Some(&h))?
    })
}

/// `--mode lat`: echoes `topic.ping` requests on `topic.pong` until its standard input
/// closes.
async fn pong(args: &BenchArgs, fabric: &Fabric, name: &str, topic: &str) -> Result<ChildReport> {
    let thread = PeerThread::new(args.thread_layout(), name)?;
    let peer = fabric
        .peer(
            &thread,
            name,
            durability(args.durability),
            OutboxLimits::default(),
        )
        .await?;
    let requests = thread
        .run(
            peer.subscribe(format!("{topic}.ping"))
                .group("pong")
                .start(),
        )
        .await??;
    let echoing = thread
        .handle
        .spawn(echo_loop(peer.clone(), requests, format!("{topic}.pong")));
    until_stdin_closes().await;
    let _ = thread.run(peer.close()).await;
    let echoed = echoing.await.unwrap_or(0);
    ChildReport::finished(Role::Pong, name, echoed, None)
}

fn encode(h: &Histogram<u64>) -> Result<String> {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .map_err(|e| anyhow::anyhow!("serializing a histogram: {e:?}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn decode(hex: &str) -> Result<Histogram<u64>> {
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .context("a child's histogram is not hex")?;
    Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| anyhow::anyhow!("a child's histogram does not decode: {e:?}"))
}

/// A child process that ended: its name, how, and what it printed.
struct Exit {
    role: Role,
    name: String,
    status: std::io::Result<std::process::ExitStatus>,
    stdout: Vec<u8>,
}

impl Exit {
    /// Its report, or why there is none.
    fn report(self) -> Result<ChildReport> {
        let status = self
            .status
            .with_context(|| format!("waiting for {}", self.name))?;
        anyhow::ensure!(
            status.success(),
            "{} {} exited ({status}) before reporting (its own errors, if any, are above)",
            role_name(self.role),
            self.name
        );
        let out = String::from_utf8_lossy(&self.stdout);
        let line = out.lines().last().unwrap_or_default();
        serde_json::from_str(line)
            .with_context(|| format!("{} printed no report: {line:?}", self.name))
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Publisher => "publisher",
        Role::Subscriber => "subscriber",
        Role::Ping => "ping",
        Role::Pong => "pong",
    }
}

/// Starts the children of a run; each sends one [`Exit`] when it ends. A child is
/// killed if its watcher task is dropped (when a failed or timed-out run returns and
/// the runtime shuts down), so no process outlives the run.
struct Children {
    exe: std::path::PathBuf,
    exits: tokio::sync::mpsc::UnboundedSender<Exit>,
}

impl Children {
    /// No children yet, and where their exits will arrive (one each).
    fn new() -> Result<(Children, tokio::sync::mpsc::UnboundedReceiver<Exit>)> {
        let (exits, exited) = tokio::sync::mpsc::unbounded_channel();
        let exe = std::env::current_exe().context("finding this binary to run its peers")?;
        Ok((Children { exe, exits }, exited))
    }

    /// Starts `this binary bench --role ROLE ...` and watches it; returns its
    /// standard input (open until dropped).
    fn spawn(
        &self,
        role: Role,
        name: &str,
        flags: Vec<String>,
    ) -> Result<tokio::process::ChildStdin> {
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("bench")
            .arg("--role")
            .arg(role_name(role))
            .arg("--name")
            .arg(name)
            .args(flags)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if std::env::var_os("RUST_LOG").is_none() {
            // Each child would warn again about the development CA.
            cmd.env("RUST_LOG", "error");
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} {name}", role_name(role)))?;
        let stdin = child.stdin.take().context("child stdin")?;
        let exits = self.exits.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let (status, stdout) = match child.wait_with_output().await {
                Ok(out) => (Ok(out.status), out.stdout),
                Err(e) => (Err(e), Vec::new()),
            };
            let _ = exits.send(Exit {
                role,
                name,
                status,
                stdout,
            });
        });
        Ok(stdin)
    }
}

/// Runs a throughput benchmark with every peer in its own process.
pub(super) async fn parent(args: &BenchArgs) -> Result<()> {
    let fabric = Fabric::start(args).await?;
    let topic = fabric.topic("bench");
    let (children, mut exits) = Children::new()?;
    let shared = common_flags(args, &fabric, &topic);
    let mut stdins = Vec::new();
    for g in 0..args.groups {
        for m in 0..args.members {
            let mut flags = shared.clone();
            flags.extend(["--group".to_string(), format!("group-{g}")]);
            let name = format!("sub-{g}-{m}");
            stdins.push(children.spawn(Role::Subscriber, &name, flags)?);
        }
    }
    wait_registered(&fabric, &topic, args.groups * args.members, &mut exits).await?;
    // From the publishers' start (their processes' start-up included) to their end.
    let host = CpuTimes::now();
    for p in 0..args.publishers {
        let mut flags = shared.clone();
        flags.extend([
            "--count".to_string(),
            super::share(args, p).min(args.count).to_string(),
        ]);
        children.spawn(Role::Publisher, &format!("pub-{p}"), flags)?;
    }
    drop(children);
    let mut reports = Vec::new();
    while reports.len() < args.publishers {
        let exit = exits.recv().await.context("child watchers ended")?;
        let role = exit.role;
        let report = exit.report()?;
        anyhow::ensure!(
            role == Role::Publisher,
            "subscriber {} exited while the publishers ran",
            report.name
        );
        reports.push(report);
    }
    let host = host.and_then(|h| h.share_until_now());
    // Every message is acknowledged by every group: the subscribers may stop.
    drop(stdins);
    while let Some(exit) = exits.recv().await {
        reports.push(exit.report()?);
    }
    let mut report = summarize(args, &reports)?;
    report.host = host;
    report.print(args.json);
    Ok(())
}

/// Waits until `topic` has `members` registered, failing if a child exits first.
async fn wait_registered(
    fabric: &Fabric,
    topic: &str,
    members: usize,
    exits: &mut tokio::sync::mpsc::UnboundedReceiver<Exit>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while fabric.members(topic).await? < members {
        if let Ok(exit) = exits.try_recv() {
            let which = format!("{} {}", role_name(exit.role), exit.name);
            // A failed child's report is the error that says so.
            exit.report()?;
            anyhow::bail!("{which} exited before the run started");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{topic}: the child processes did not register within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Runs a latency benchmark with the sender (ping) and the echo (pong) in processes
/// of their own.
pub(super) async fn parent_latency(args: &BenchArgs) -> Result<()> {
    let fabric = Fabric::start(args).await?;
    let topic = fabric.topic("bench");
    let (children, mut exits) = Children::new()?;
    let mut flags = common_flags(args, &fabric, &topic);
    let pong_stdin = children.spawn(Role::Pong, "pong", flags.clone())?;
    wait_registered(&fabric, &format!("{topic}.ping"), 1, &mut exits).await?;
    flags.extend([
        format!("--count={}", args.count),
        format!("--warmup={}", args.warmup),
    ]);
    // From the ping process's start (its start-up and warm-up included) to its end.
    let host = CpuTimes::now();
    children.spawn(Role::Ping, "ping", flags)?;
    drop(children);
    let exit = exits.recv().await.context("child watchers ended")?;
    let host = host.and_then(|h| h.share_until_now());
    let role = exit.role;
    let ping = exit.report()?;
    anyhow::ensure!(role == Role::Ping, "pong exited while ping measured");
    drop(pong_stdin);
    let pong = exits
        .recv()
        .await
        .context("child watchers ended")?
        .report()?;
    let elapsed_s = (ping.drained_ns as f64 / 1e9).max(1e-9);
    let mut report = Report::new(
        system_name(args.durability),
        "lat",
        (args.size, args.count, elapsed_s),
        &decode(&ping.histogram)?,
        "round_trip",
    );
    report.processes = [&ping, &pong].iter().map(|r| process_row(r)).collect();
    report.host = host;
    report.print(args.json);
    Ok(())
}

fn process_row(r: &ChildReport) -> ProcessRow {
    ProcessRow {
        role: role_name(r.role),
        name: r.name.clone(),
        pid: r.pid,
        messages: r.messages,
        cpu_s: r.cpu_s,
        peak_rss_mib: r.peak_rss_mib,
    }
}

/// The flags every child gets: where the fabric is, and the run's shape.
fn common_flags(args: &BenchArgs, fabric: &Fabric, topic: &str) -> Vec<String> {
    let mut flags = vec![
        format!("--directory={}", fabric.addr),
        format!("--dev-ca={}", fabric.dev_ca.display()),
        format!("--data-dir={}", fabric.root.display()),
        format!("--topic={topic}"),
        format!("--size={}", args.size),
        format!("--batch={}", args.batch),
        format!("--credit={}", args.credit),
        format!("--keys={}", args.keys),
        format!("--compressible={}", args.compressible),
        format!("--timeout-s={}", args.timeout_s),
        format!("--durability={}", flag_value(&args.durability)),
        format!("--threads={}", flag_value(&args.thread_layout())),
    ];
    let optional = [
        ("--window", args.window.map(|v| v.to_string())),
        ("--rate", args.rate.map(|v| v.to_string())),
        ("--duration", args.duration.map(|v| v.to_string())),
        (
            "--outbox-messages",
            args.outbox_messages.map(|v| v.to_string()),
        ),
        (
            "--memory-messages",
            args.memory_messages.map(|v| v.to_string()),
        ),
        ("--segment-bytes", args.segment_bytes.map(|v| v.to_string())),
    ];
    flags.extend(
        optional
            .into_iter()
            .filter_map(|(flag, value)| value.map(|v| format!("{flag}={v}"))),
    );
    if args.json {
        // Without it, each subscriber prints its progress (on the shared stderr).
        flags.push("--json".to_string());
    }
    flags
}

/// The run's figures from its children's reports.
fn summarize(args: &BenchArgs, reports: &[ChildReport]) -> Result<Report> {
    let publishers: Vec<&ChildReport> = reports
        .iter()
        .filter(|r| r.role == Role::Publisher)
        .collect();
    let start = publishers.iter().map(|r| r.start_ns).min().unwrap_or(0);
    let published = publishers.iter().map(|r| r.published_ns).max().unwrap_or(0);
    let drained = publishers.iter().map(|r| r.drained_ns).max().unwrap_or(0);
    let elapsed_s = (drained.saturating_sub(start) as f64 / 1e9).max(1e-9);
    let total: u64 = publishers.iter().map(|r| r.messages).sum();
    let commits: u64 = publishers.iter().map(|r| r.commits).sum();
    let delivered: u64 = reports
        .iter()
        .filter(|r| r.role == Role::Subscriber)
        .map(|r| r.messages)
        .sum();
    let merged = |role: Role| -> Result<Histogram<u64>> {
        let mut h = histogram();
        for r in reports
            .iter()
            .filter(|r| r.role == role && !r.histogram.is_empty())
        {
            h.add(decode(&r.histogram)?)
                .map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))?;
        }
        Ok(h)
    };
    let latency = merged(Role::Subscriber)?;
    let send_lag = merged(Role::Publisher)?;
    let expected = total * args.groups as u64;
    let mut report = Report::new(
        system_name(args.durability),
        "thr",
        (args.size, total, elapsed_s),
        &latency,
        "publish_to_delivery",
    );
    let publish_s = published.saturating_sub(start) as f64 / 1e9;
    report.extra = thr_extra(
        args,
        delivered as f64 / elapsed_s,
        publish_s,
        commits,
        expected,
    ) + &pacing_extra(args, Some(&send_lag))
        + &format!(",\"delivered\":{delivered}");
    report.processes = reports.iter().map(process_row).collect();
    Ok(report)
}
