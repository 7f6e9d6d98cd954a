//! `weft bench`: a local Weft fabric (an embedded directory or `--directory`, publisher
//! and subscriber peers over real QUIC on loopback, in this process or each in its own
//! with `--processes`) measuring throughput and latency. Its `--json` output has the
//! fields of `../shared/bench-peers` so Weft lands in the same table.

mod fabric;
mod host;
mod pacer;
mod payload;
mod procs;
mod publish;
mod report;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use futures::StreamExt;
use hdrhistogram::Histogram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weft_peer::{Durability, Message, Peer, Subscription};

use fabric::{await_route, Fabric, OutboxLimits, PeerThread, Placement};
use host::CpuTimes;
use payload::now_ns;
use publish::{publish_all, receive_batches, receive_each, recorded, PublishPlan};
use report::Report;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Throughput: publish `count` messages as fast as the fabric takes them.
    Thr,
    /// Latency: one message at a time, sender → receiver → sender round trips.
    Lat,
}

/// Durability of the benchmark's publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchDurability {
    /// In memory only.
    Memory,
    /// Group-committed to the outbox on disk.
    Disk,
    /// On disk, and each publish waits for every group's ack.
    Confirmed,
}

/// How the benchmark's peers share threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Threads {
    /// Each peer on its own thread with a single-threaded runtime, as a service running
    /// one peer per process would be laid out: a peer's tasks (QUIC driver, links,
    /// streams, the application's loop) hand work to each other without crossing
    /// threads.
    PerPeer,
    /// Every peer on one shared multi-threaded runtime.
    Shared,
    /// Every peer on one thread with a single-threaded runtime (with `--processes`,
    /// each process's one peer on its own: as `per-peer`). A round trip is serial
    /// work: one thread hands it from task to task without waking another thread at
    /// each hop.
    Single,
}

/// Flags of `weft bench` (a superset of the bench-peers harness flags).
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// thr (throughput) or lat (round-trip latency).
    #[arg(long, value_enum, default_value = "thr")]
    pub mode: Mode,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Messages (thr: in all, shared evenly among the publishers) or measured round
    /// trips (lat).
    #[arg(long, default_value_t = 200_000)]
    pub count: u64,
    /// thr: publish for this many seconds instead of `--count` messages (then wait
    /// until every message is delivered and acknowledged).
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// thr: messages per second per publisher, at fixed intervals, instead of as fast
    /// as the fabric takes them. Latencies then count from when each message was due,
    /// not from when it went out (corrected for coordinated omission): a fabric that
    /// holds the sender back shows as latency. A pacing thread releases what is due
    /// at most every 100 µs. With `--batch`, a batch goes out when its first message
    /// is due, and all its messages carry that time.
    #[arg(long, value_name = "MSGS_PER_S")]
    pub rate: Option<f64>,
    /// Percentage of each payload (after its 8-byte send time) that repeats one byte;
    /// the rest is random. Weft does not compress, so this only changes what the
    /// bytes are.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub compressible: u8,
    /// lat: unrecorded warm-up round trips.
    #[arg(long, default_value_t = 1000)]
    pub warmup: u64,
    /// thr: messages in flight at once per publisher (receipts not yet resolved; 1 =
    /// each publish awaited in turn, as a plain publish loop; more: single publishes
    /// pipelined with `Peer::submit`, the oldest receipt awaited when the window is
    /// full). Default: 1 for single `memory` publishes, 2048 for single `disk` ones,
    /// 512 for `confirmed` ones, 4096 with `--batch` (the best measured on 2 cores; see
    /// docs/benchmarks.md and docs/benchmarks-history.md, sessions 18, 19, 29 and 33),
    /// at most 8 MiB of payload and at least one batch.
    #[arg(long)]
    pub window: Option<usize>,
    /// thr: messages per `publish_batch` call (1 = one `publish` per message). A batch
    /// shares one outbox append and group commit; each message keeps its own
    /// guarantees. Above 1, subscribers also take and acknowledge deliveries in
    /// batches (`recv_many`, `Delivery::ack_all`).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Hard wall-clock limit for the whole run.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
    /// Outbox durability.
    #[arg(long, value_enum, default_value = "memory")]
    pub durability: BenchDurability,
    /// Publishing peers (thr).
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Subscribed groups (each gets every message).
    #[arg(long, default_value_t = 1)]
    pub groups: usize,
    /// Members per group.
    #[arg(long, default_value_t = 1)]
    pub members: usize,
    /// Distinct ordering keys (0 = unkeyed).
    #[arg(long, default_value_t = 0)]
    pub keys: u64,
    /// Credit window each subscription grants.
    #[arg(long, default_value_t = weft_peer::DEFAULT_CREDIT)]
    pub credit: u32,
    /// Quota of messages in each publisher's outbox (default: the peer's default). A
    /// publisher that is this far ahead of its receivers waits.
    #[arg(long)]
    pub outbox_messages: Option<u64>,
    /// `Memory` messages each publisher holds before `publish` waits (default: the
    /// peer's, 65,536). Under saturation this backlog is the queue a message waits in:
    /// smaller means lower publish-to-delivery latency (docs/benchmarks.md).
    #[arg(long)]
    pub memory_messages: Option<u64>,
    /// Size of the outbox segment files of every bench peer (default: the peer's
    /// default, 64 MiB). Smaller segments roll, settle and are recycled sooner, so a
    /// short run measures the steady state of a long-running sender.
    #[arg(long)]
    pub segment_bytes: Option<u64>,
    /// Thread layout of the peers. Default: `shared` for thr (as fast as `per-peer`
    /// or faster on 2 cores), `single` for lat (37–53 µs round trips against 55–69
    /// with `shared`, in session 29); see docs/benchmarks.md.
    #[arg(long, value_enum)]
    pub threads: Option<Threads>,
    /// Run every peer in a process of its own (this binary again), as services run;
    /// the report adds each process's CPU and peak RSS. The directory stays in
    /// this process (or is the one of `--directory`).
    #[arg(long)]
    pub processes: bool,
    /// Use this running directory node instead of one embedded in the benchmark (it
    /// must run with a development CA: `weft-directory --dev --dev-ca DIR`).
    #[arg(long, value_name = "ADDR", requires = "dev_ca")]
    pub directory: Option<std::net::SocketAddr>,
    /// With `--directory`: the directory's development CA, which issues the bench
    /// peers' certificates.
    #[arg(long, value_name = "DIR")]
    pub dev_ca: Option<PathBuf>,
    /// Print one JSON line (bench-peers fields) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Internal: run one peer of a `--processes` run, for the parent process.
    #[arg(long, value_enum, hide = true)]
    pub role: Option<procs::Role>,
    /// Internal (`--role`): the peer's name.
    #[arg(long, hide = true)]
    pub name: Option<String>,
    /// Internal (`--role subscriber`): the peer's group.
    #[arg(long, hide = true)]
    pub group: Option<String>,
    /// Internal (`--role`): the topic of the run.
    #[arg(long, hide = true)]
    pub topic: Option<String>,
    /// Internal (`--role`): where peers keep their data (`DIR/NAME`).
    #[arg(long, hide = true)]
    pub data_dir: Option<PathBuf>,
    /// Accepted for compatibility with the bench-peers harness; ignored.
    #[arg(long, hide = true)]
    pub url: Option<String>,
}

/// Runs the benchmark and prints its result.
pub async fn run(args: BenchArgs) -> Result<()> {
    check_args(&args)?;
    let timeout = Duration::from_secs(args.timeout_s);
    match tokio::time::timeout(timeout, run_inner(&args)).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!(
            "benchmark did not finish within --timeout-s {}",
            args.timeout_s
        ),
    }
}

/// Refuses flag values that cannot run.
fn check_args(args: &BenchArgs) -> Result<()> {
    if let Some(rate) = args.rate {
        anyhow::ensure!(
            rate.is_finite() && rate > 0.0,
            "--rate must be a positive number of messages per second, not {rate}"
        );
    }
    if let Some(d) = args.duration {
        anyhow::ensure!(
            d.is_finite() && d > 0.0 && d < args.timeout_s as f64,
            "--duration must be positive and below --timeout-s ({} s), not {d}",
            args.timeout_s
        );
    }
    anyhow::ensure!(
        args.publishers > 0 && args.groups > 0 && args.members > 0,
        "--publishers, --groups and --members must be at least 1"
    );
    Ok(())
}

fn durability(d: BenchDurability) -> Durability {
    match d {
        BenchDurability::Memory => Durability::Memory,
        BenchDurability::Disk => Durability::Disk,
        BenchDurability::Confirmed => Durability::Confirmed,
    }
}

impl BenchArgs {
    /// The thread layout: `--threads`, or the default of the mode.
    pub(crate) fn thread_layout(&self) -> Threads {
        self.threads.unwrap_or(match self.mode {
            Mode::Thr => Threads::Shared,
            Mode::Lat => Threads::Single,
        })
    }
}

/// How `value` is spelled on the command line.
pub(crate) fn flag_value(value: &impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

fn system_name(d: BenchDurability) -> &'static str {
    match d {
        BenchDurability::Memory => "weft_memory",
        BenchDurability::Disk => "weft_disk",
        BenchDurability::Confirmed => "weft_confirmed",
    }
}

/// Messages in flight per publisher unless `--window` says otherwise. Single `memory`
/// publishes go one at a time, as an application's publish loop awaits each: such a
/// publish returns once its message is in the outbox, so more in flight only adds a
/// `FuturesUnordered` task per message. In session 29, alternating runs (`--size 128
/// --count 1000000`, four each) gave 624–706 k msgs/s one at a time against 555–634 k
/// with 512 in flight, and ~10 % less CPU (sessions before 28 measured the reverse,
/// while the first window of every run still waited for the directory). Single disk
/// publishes wait for a group commit, which takes those gathered while the one before
/// it was under way (about half the window): in session 33 (three runs each) 512 in
/// flight gave 483–515 k msgs/s, 1,024 551–677 k, 2,048 583–690 k and 4,096 635–667 k
/// with 1.7 × the latency and peak RSS. Confirmed publishes wait for the groups' acks
/// and peaked at 512 (session 21: with more, the sender runs ahead of its receiver and
/// the growing backlog cost 1.6 × the CPU per message). Batches did best
/// at 4,096 (session 29: 256 and 4,096 alike in `memory`). Large messages are capped
/// at [`DEFAULT_WINDOW_BYTES`] of payload, and never under one batch.
fn default_window(batch: usize, size: usize, durability: BenchDurability) -> usize {
    let messages = match (batch > 1, durability) {
        (true, _) => 4096,
        (false, BenchDurability::Memory) => 1,
        (false, BenchDurability::Disk) => 2048,
        (false, BenchDurability::Confirmed) => 512,
    };
    messages.min(DEFAULT_WINDOW_BYTES / size.max(1)).max(batch)
}

/// Payload bytes in flight per publisher unless `--window` says otherwise: past this,
/// a deeper window only queues. 16 KiB `disk` batches of 256 ran at 1.13–1.25 GB/s
/// with 512 in flight, 1.06–1.08 with 1,024 and 0.88–0.97 with 4,096 (peak RSS 80,
/// 120 and 170–220 MiB); `memory` ones alike at all three (3.1–3.3 GB/s).
const DEFAULT_WINDOW_BYTES: usize = 8 * 1024 * 1024;

fn histogram() -> Histogram<u64> {
    // 1 ns .. 100 s, 3 significant digits: valid constant bounds.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

async fn run_inner(args: &BenchArgs) -> Result<()> {
    if let Some(role) = args.role {
        return procs::child(args, role).await;
    }
    match args.mode {
        Mode::Thr if args.processes => procs::parent(args).await,
        Mode::Thr => throughput(args).await,
        Mode::Lat if args.processes => procs::parent_latency(args).await,
        Mode::Lat => latency(args).await,
    }
}

async fn throughput(args: &BenchArgs) -> Result<()> {
    let fabric = Fabric::start(args).await?;
    let topic = fabric.topic("bench");
    let delivered = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Mutex::new(histogram()));
    let mut subscribers = Vec::new();
    let mut placement = Placement::new(args.thread_layout());
    let batch = args.batch.max(1);
    for g in 0..args.groups {
        for m in 0..args.members {
            let name = format!("sub-{g}-{m}");
            let thread = placement.thread(&name)?;
            let peer = fabric
                .peer(&thread, &name, Durability::Memory, OutboxLimits::default())
                .await?;
            let subscribing = peer
                .subscribe(topic.clone())
                .group(format!("group-{g}"))
                .credit(args.credit)
                .start();
            let sub = thread.run(subscribing).await??;
            let (delivered, latency) = (delivered.clone(), latency.clone());
            let receiving = if batch > 1 {
                thread
                    .handle
                    .spawn(receive_batches(sub, delivered, latency))
            } else {
                thread.handle.spawn(receive_each(sub, delivered, latency))
            };
            subscribers.push((thread, peer, receiving));
        }
    }
    fabric
        .wait_members(&topic, args.groups * args.members)
        .await?;
    let mut publishers = Vec::new();
    for p in 0..args.publishers {
        let name = format!("pub-{p}");
        let thread = placement.thread(&name)?;
        let peer = fabric
            .peer(
                &thread,
                &name,
                durability(args.durability),
                OutboxLimits::of(args),
            )
            .await?;
        await_route(&peer, &topic, args.groups * args.members).await?;
        publishers.push((thread, peer));
    }
    let stop_at = args.duration.map(|d| now_ns() + (d * 1e9) as u64);
    let start = Instant::now();
    let host = CpuTimes::now();
    let progress = (!args.json).then(|| show_progress(delivered.clone(), String::new()));
    let mut tasks = Vec::new();
    for (p, (thread, publisher)) in publishers.iter().enumerate() {
        let count = share(args, p);
        let (plan, pacer) = PublishPlan::new(args, &topic, count, stop_at)?;
        tasks.push(
            thread
                .handle
                .spawn(publish_all(publisher.clone(), plan, pacer)),
        );
    }
    let mut total = 0;
    let mut send_lag: Option<Histogram<u64>> = None;
    for t in tasks {
        let (published, lag) = t.await.context("publisher task")??;
        total += published;
        if let Some(lag) = lag {
            let merged = send_lag.get_or_insert_with(histogram);
            let _ = merged.add(&lag);
        }
    }
    let pacing = pacing_extra(args, send_lag.as_ref());
    let published_in = start.elapsed();
    // Done when every message is acknowledged by every group (the outboxes drained).
    for (_, publisher) in &publishers {
        while !publisher.drain(Duration::from_millis(200)).await {}
    }
    if let Some(progress) = progress {
        progress.abort();
    }
    let elapsed = start.elapsed();
    let host = host.and_then(|h| h.share_until_now());
    let expected = total * args.groups as u64;
    // Group commits that ended in an fdatasync (lease renewals included for `memory`).
    let commits: u64 = publishers
        .iter()
        .map(|(_, p)| p.outbox_stats().commits)
        .sum();
    // Everything is acknowledged, so delivered. Publishers first (their links close),
    // then the subscribers, whose loops then add the latencies they hold yet.
    for (thread, peer) in publishers {
        let _ = thread.run(peer.close()).await;
    }
    for (thread, peer, receiving) in subscribers {
        let _ = thread.run(peer.close()).await;
        let _ = receiving.await;
    }
    let h = recorded(&latency);
    let elapsed_s = elapsed.as_secs_f64();
    let mut report = Report::new(
        system_name(args.durability),
        "thr",
        (args.size, total, elapsed_s),
        &h,
        "publish_to_delivery",
    );
    let delivered_per_s = expected as f64 / elapsed_s;
    let publish_s = published_in.as_secs_f64();
    report.extra = thr_extra(args, delivered_per_s, publish_s, commits, expected) + &pacing;
    report.host = host;
    report.threads = Some(flag_value(&args.thread_layout()));
    report.print(args.json);
    Ok(())
}

/// Prints `who`'s deliveries so far once a second (on standard error), until aborted.
fn show_progress(delivered: Arc<AtomicU64>, who: String) -> tokio::task::JoinHandle<()> {
    let start = Instant::now();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            let n = delivered.load(Ordering::Relaxed);
            let s = start.elapsed().as_secs_f64();
            eprintln!(
                "  {s:5.1} s: {who}{n} delivered ({:.0} msgs/s)",
                n as f64 / s
            );
        }
    })
}

/// The messages publisher `p` publishes: an even share of `--count`, the first
/// publishers taking one more each until the remainder is gone (`u64::MAX` with
/// `--duration`, which bounds the run instead).
fn share(args: &BenchArgs, p: usize) -> u64 {
    if args.duration.is_some() {
        return u64::MAX;
    }
    let n = args.publishers as u64;
    args.count / n + u64::from((p as u64) < args.count % n)
}

/// The JSON extras of a `--rate` run: the rate and how late publishes started after
/// they were due (`lag`, ns, every publisher's); empty without `--rate`.
fn pacing_extra(args: &BenchArgs, lag: Option<&Histogram<u64>>) -> String {
    match (args.rate, lag) {
        (Some(rate), Some(h)) => format!(
            ",\"rate_per_publisher\":{rate:.0},\"send_lag_p50_us\":{:.1},\"send_lag_p99_us\":{:.1}",
            h.value_at_quantile(0.5) as f64 / 1e3,
            h.value_at_quantile(0.99) as f64 / 1e3
        ),
        _ => String::new(),
    }
}

/// The JSON extras of a throughput run (after the bench-peers fields).
fn thr_extra(
    args: &BenchArgs,
    delivered_per_s: f64,
    publish_s: f64,
    commits: u64,
    expected: u64,
) -> String {
    format!(
        "\"delivered_msgs_per_s\":{delivered_per_s:.0},\"publish_s\":{publish_s:.3},\"groups\":{},\"members\":{},\"publishers\":{},\"batch\":{},\"outbox_commits\":{commits},\"expected_deliveries\":{expected}",
        args.groups,
        args.members,
        args.publishers,
        args.batch.max(1)
    )
}

async fn latency(args: &BenchArgs) -> Result<()> {
    let fabric = Fabric::start(args).await?;
    let mut placement = Placement::new(args.thread_layout());
    let sender_thread = placement.thread("ping")?;
    let echo_thread = placement.thread("pong")?;
    let sender = fabric
        .peer(
            &sender_thread,
            "ping",
            durability(args.durability),
            OutboxLimits::default(),
        )
        .await?;
    let echo = fabric
        .peer(
            &echo_thread,
            "pong",
            durability(args.durability),
            OutboxLimits::default(),
        )
        .await?;
    let (ping, pong) = (fabric.topic("bench.ping"), fabric.topic("bench.pong"));
    let requests = echo_thread
        .run(echo.subscribe(ping.clone()).group("pong").start())
        .await??;
    let replies = sender_thread
        .run(sender.subscribe(pong.clone()).group("ping").start())
        .await??;
    fabric.wait_members(&ping, 1).await?;
    fabric.wait_members(&pong, 1).await?;
    let echo_task = echo_thread
        .handle
        .spawn(echo_loop(echo.clone(), requests, pong.clone()));
    // The measuring loop runs on the sender's thread, like its application would.
    let measuring = round_trips(
        sender.clone(),
        replies,
        ping,
        args.warmup,
        args.count,
        args.size,
    );
    let host = CpuTimes::now();
    let (h, elapsed) = sender_thread.run(measuring).await??;
    let mut report = Report::new(
        system_name(args.durability),
        "lat",
        (args.size, args.count, elapsed.as_secs_f64()),
        &h,
        "round_trip",
    );
    report.host = host.and_then(|h| h.share_until_now());
    report.threads = Some(flag_value(&args.thread_layout()));
    report.print(args.json);
    echo_task.abort();
    let _ = sender_thread.run(sender.close()).await;
    let _ = echo_thread.run(echo.close()).await;
    Ok(())
}

/// The echo side of a latency run: re-publishes each request's payload on `pong`.
/// Returns how many it echoed when the subscription or the peer ends.
async fn echo_loop(echo: Peer, mut requests: Subscription, pong: String) -> u64 {
    let mut echoed = 0;
    while let Some(d) = requests.next().await {
        let body = d.payload().clone();
        d.ack();
        if echo.publish(&pong, Message::new(body)).await.is_err() {
            break;
        }
        echoed += 1;
    }
    echoed
}

/// The measuring side of a latency run: `warmup` unrecorded, then `count` recorded
/// round trips (publish on `ping`, wait for the echo); returns the round-trip
/// latencies (ns) and how long the recorded ones took.
async fn round_trips(
    sender: Peer,
    mut replies: Subscription,
    ping: String,
    warmup: u64,
    count: u64,
    size: usize,
) -> Result<(Histogram<u64>, Duration)> {
    let mut h = histogram();
    let body = Bytes::from(vec![0x5au8; size]);
    let mut measured_from = Instant::now();
    for i in 0..(warmup + count) {
        if i == warmup {
            measured_from = Instant::now();
        }
        let t0 = Instant::now();
        sender.publish(&ping, Message::new(body.clone())).await?;
        let reply = replies.next().await.context("reply stream ended")?;
        reply.ack();
        if i >= warmup {
            let _ = h.record((t0.elapsed().as_nanos() as u64).max(1));
        }
    }
    Ok((h, measured_from.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_window_caps_payload_bytes_in_flight_but_keeps_a_batch() {
        use BenchDurability::{Confirmed, Disk, Memory};
        assert_eq!(default_window(1, 128, Disk), 2048);
        assert_eq!(default_window(1, 128, Confirmed), 512);
        assert_eq!(default_window(1, 128, Memory), 1, "a publish loop");
        assert_eq!(default_window(256, 128, Memory), 4096);
        assert_eq!(default_window(1, 16384, Disk), 512);
        assert_eq!(default_window(256, 16384, Disk), 512);
        assert_eq!(default_window(1, 1 << 20, Disk), 8);
        assert_eq!(default_window(64, 1 << 20, Disk), 64, "at least one batch");
        assert_eq!(default_window(1, 64 << 20, Disk), 1);
    }
}
