//! `weft bench`: an in-process Weft fabric (embedded directory, publisher and subscriber
//! peers over real QUIC on loopback) measuring throughput and latency. Its `--json`
//! output has the fields of `../shared/bench-peers` so Weft lands in the same table.

use anyhow::{Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Args, ValueEnum};
use futures::StreamExt;
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weft_directory::Directory;
use weft_peer::{Delivery, Durability, Message, Peer, Subscription, WhenFull};

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
    /// Messages (thr) or measured round trips (lat).
    #[arg(long, default_value_t = 200_000)]
    pub count: u64,
    /// lat: unrecorded warm-up round trips.
    #[arg(long, default_value_t = 1000)]
    pub warmup: u64,
    /// thr: messages in flight at once per publisher (publishes not yet returned; 1 =
    /// each awaited in turn, as a plain publish loop). Default: 512 for single
    /// publishes, 4096 with `--batch` (the best measured on 2 cores; see
    /// docs/benchmarks.md, sessions 18 and 19), at most 8 MiB of payload and at
    /// least one batch.
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
    /// Size of the outbox segment files of every bench peer (default: the peer's
    /// default, 64 MiB). Smaller segments roll, settle and are recycled sooner, so a
    /// short run measures the steady state of a long-running sender.
    #[arg(long)]
    pub segment_bytes: Option<u64>,
    /// Thread layout of the peers (measured on 2 cores: `shared` was as fast or
    /// faster, and much faster for latency; see docs/benchmarks.md).
    #[arg(long, value_enum, default_value = "shared")]
    pub threads: Threads,
    /// Print one JSON line (bench-peers fields) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Accepted for compatibility with the bench-peers harness; ignored.
    #[arg(long, hide = true)]
    pub url: Option<String>,
}

/// Runs the benchmark and prints its result.
pub async fn run(args: BenchArgs) -> Result<()> {
    let timeout = Duration::from_secs(args.timeout_s);
    match tokio::time::timeout(timeout, run_inner(&args)).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!(
            "benchmark did not finish within --timeout-s {}",
            args.timeout_s
        ),
    }
}

/// Where one peer runs: its own thread with a current-thread runtime
/// ([`Threads::PerPeer`]), or the caller's runtime ([`Threads::Shared`]). Everything
/// touching the peer (start, its loops, close) is spawned here, so its tasks stay put.
struct PeerThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeerThread {
    fn new(layout: Threads, name: &str) -> Result<PeerThread> {
        if layout == Threads::Shared {
            return Ok(PeerThread {
                handle: tokio::runtime::Handle::current(),
                stop: None,
                thread: None,
            });
        }
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        let _ = handle_tx.send(Ok(rt.handle().clone()));
                        rt.block_on(async {
                            let _ = stopped.await;
                        });
                    }
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                    }
                }
            })
            .context("starting a peer thread")?;
        let handle = handle_rx
            .recv()
            .context("peer thread ended at start")?
            .context("starting a peer runtime")?;
        Ok(PeerThread {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs `work` on this peer's runtime and waits for its result.
    async fn run<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        self.handle
            .spawn(work)
            .await
            .context("a peer thread's task failed")
    }
}

impl Drop for PeerThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Fabric {
    _dir: tempfile::TempDir,
    directory: Directory,
    root: std::path::PathBuf,
    /// `--segment-bytes` of every peer.
    segment_bytes: Option<u64>,
}

impl Fabric {
    async fn start(segment_bytes: Option<u64>) -> Result<Fabric> {
        let dir = tempfile::tempdir().context("temporary directory")?;
        let root = dir.path().to_path_buf();
        let directory = Directory::builder("bench-directory")
            .listen("127.0.0.1:0".parse()?)
            .dev(root.join("dev-ca"))
            .start()
            .await?;
        Ok(Fabric {
            _dir: dir,
            directory,
            root,
            segment_bytes,
        })
    }

    /// Starts a peer on `thread`.
    async fn peer(
        &self,
        thread: &PeerThread,
        name: &str,
        durability: Durability,
        outbox_messages: Option<u64>,
    ) -> Result<Peer> {
        let segment_bytes = self.segment_bytes;
        let builder = Peer::builder(name)
            .directory([self.directory.local_addr()])
            .dev_ca(self.root.join("dev-ca"))
            .data_dir(self.root.join(name))
            .durability(durability)
            .when_full(WhenFull::Wait)
            .outbox(move |mut cfg| {
                if let Some(n) = outbox_messages {
                    cfg.max_messages = n;
                }
                if let Some(n) = segment_bytes {
                    cfg.segment_bytes = n;
                }
                cfg
            });
        Ok(thread.run(builder.start()).await??)
    }

    async fn wait_members(&self, topic: &str, members: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self
            .directory
            .route(topic)
            .groups
            .iter()
            .map(|g| g.members.len())
            .sum::<usize>()
            < members
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "subscribers did not register in time"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}

fn durability(d: BenchDurability) -> Durability {
    match d {
        BenchDurability::Memory => Durability::Memory,
        BenchDurability::Disk => Durability::Disk,
        BenchDurability::Confirmed => Durability::Confirmed,
    }
}

fn system_name(d: BenchDurability) -> &'static str {
    match d {
        BenchDurability::Memory => "weft_memory",
        BenchDurability::Disk => "weft_disk",
        BenchDurability::Confirmed => "weft_confirmed",
    }
}

/// Messages in flight per publisher unless `--window` says otherwise. Single disk
/// publishes peaked at 512 in flight: with fewer, the group commit's latency limits;
/// with more, the sender runs ahead of its receiver, and the growing backlog cost
/// 1.6 × the CPU per message in the same instructions (more page faults and context
/// switches). Batches did best at 4,096. Single `memory` publishes keep 512 too: on
/// the shared runtime, one at a time (`--window 1`) hands each few messages to the
/// link on the other worker thread and stays near 0.75 M msgs/s, while 512 in flight
/// let a backlog form and ran at ~1.5 M in four runs out of five; with
/// `--threads per-peer`, one at a time is the faster (~1.8 M against ~1.7 M). Large
/// messages are capped at [`DEFAULT_WINDOW_BYTES`] of payload, and never under one
/// batch.
fn default_window(batch: usize, size: usize) -> usize {
    let messages = if batch > 1 { 4096 } else { 512 };
    messages.min(DEFAULT_WINDOW_BYTES / size.max(1)).max(batch)
}

/// Payload bytes in flight per publisher unless `--window` says otherwise: past this,
/// a deeper window only queues. 16 KiB `disk` batches of 256 ran at 1.13–1.25 GB/s
/// with 512 in flight, 1.06–1.08 with 1,024 and 0.88–0.97 with 4,096 (peak RSS 80,
/// 120 and 170–220 MiB); `memory` ones alike at all three (3.1–3.3 GB/s).
const DEFAULT_WINDOW_BYTES: usize = 8 * 1024 * 1024;

/// How long single publishes share one payload buffer (and so one send time).
const PAYLOAD_REUSE: Duration = Duration::from_micros(100);

/// The payloads of one-message-at-a-time throughput publishes: a buffer is shared by
/// the messages published within [`PAYLOAD_REUSE`] of its send time, as the batches of
/// `--batch` share one, so that the benchmark does not write a fresh payload per
/// message (the bench-peers programs send one buffer over and over). A message's
/// recorded latency is at most `PAYLOAD_REUSE` too long, never too short.
struct ReusedPayload {
    size: usize,
    epoch: Instant,
    last: Option<(u64, Bytes)>,
}

impl ReusedPayload {
    fn new(size: usize, epoch: Instant) -> Self {
        ReusedPayload {
            size,
            epoch,
            last: None,
        }
    }

    fn next(&mut self) -> Bytes {
        self.at(self.epoch.elapsed().as_nanos() as u64)
    }

    /// The payload for a message sent `now` (ns since the epoch).
    fn at(&mut self, now: u64) -> Bytes {
        match &self.last {
            Some((sent, body)) if now.saturating_sub(*sent) < PAYLOAD_REUSE.as_nanos() as u64 => {
                body.clone()
            }
            _ => {
                let body = payload_sent_at(self.size, now);
                self.last = Some((now, body.clone()));
                body
            }
        }
    }
}

/// `count` payloads as [`payload_sent_at`] makes them, with one clock reading for the batch:
/// every message of a batch carries the same bytes, so they share one buffer, as the
/// bench-peers programs send one payload buffer over and over. (Weft still copies each
/// message into its outbox record; what this leaves out is the benchmark writing
/// `count` fresh payloads, which at 16 KiB was 14 % of the run's CPU.)
fn payloads(size: usize, count: usize, epoch: Instant) -> Vec<Bytes> {
    vec![payload_sent_at(size, epoch.elapsed().as_nanos() as u64); count]
}

/// A payload of `size` bytes (at least 8) whose first 8 bytes carry the send time
/// `sent` (ns since the benchmark's epoch).
fn payload_sent_at(size: usize, sent: u64) -> Bytes {
    let size = size.max(8);
    let mut one = BytesMut::with_capacity(size);
    one.put_u64(sent);
    one.put_bytes(0x5a, size - 8);
    one.freeze()
}

fn sent_ns(payload: &[u8]) -> u64 {
    payload
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn histogram() -> Histogram<u64> {
    // 1 ns .. 100 s, 3 significant digits: valid constant bounds.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

async fn run_inner(args: &BenchArgs) -> Result<()> {
    match args.mode {
        Mode::Thr => throughput(args).await,
        Mode::Lat => latency(args).await,
    }
}

async fn throughput(args: &BenchArgs) -> Result<()> {
    let fabric = Fabric::start(args.segment_bytes).await?;
    let topic = "bench";
    let epoch = Instant::now();
    let delivered = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Mutex::new(histogram()));
    let mut subscribers = Vec::new();
    let batch = args.batch.max(1);
    let window = args.window.unwrap_or(default_window(batch, args.size));
    for g in 0..args.groups {
        for m in 0..args.members {
            let name = format!("sub-{g}-{m}");
            let thread = PeerThread::new(args.threads, &name)?;
            let peer = fabric
                .peer(&thread, &name, Durability::Memory, None)
                .await?;
            let subscribing = peer
                .subscribe(topic)
                .group(format!("group-{g}"))
                .credit(args.credit)
                .start();
            let mut sub = thread.run(subscribing).await??;
            let delivered = delivered.clone();
            let latency = latency.clone();
            if batch > 1 {
                thread
                    .handle
                    .spawn(receive_batches(sub, epoch, delivered, latency));
                subscribers.push((thread, peer));
                continue;
            }
            thread.handle.spawn(async move {
                let mut local = histogram();
                let mut n = 0u64;
                while let Some(d) = sub.next().await {
                    let sent = sent_ns(d.payload());
                    let now = epoch.elapsed().as_nanos() as u64;
                    let _ = local.record(now.saturating_sub(sent).max(1));
                    d.ack();
                    n += 1;
                    if n.is_multiple_of(1024) {
                        delivered.fetch_add(1024, Ordering::Relaxed);
                        if let Ok(mut h) = latency.lock() {
                            let _ = h.add(&local);
                        }
                        local.reset();
                    }
                }
            });
            subscribers.push((thread, peer));
        }
    }
    fabric
        .wait_members(topic, args.groups * args.members)
        .await?;
    let mut publishers = Vec::new();
    for p in 0..args.publishers {
        let name = format!("pub-{p}");
        let thread = PeerThread::new(args.threads, &name)?;
        let peer = fabric
            .peer(
                &thread,
                &name,
                durability(args.durability),
                args.outbox_messages,
            )
            .await?;
        publishers.push((thread, peer));
    }
    let per_publisher = args.count / args.publishers as u64;
    let total = per_publisher * args.publishers as u64;
    let start = Instant::now();
    let progress = !args.json;
    let mut tasks = Vec::new();
    for (thread, publisher) in &publishers {
        let publisher = publisher.clone();
        let (size, keys) = (args.size, args.keys);
        let batch = batch as u64;
        let batches_in_flight = (window as u64).div_ceil(batch).max(1) as usize;
        let message = move |i: u64, payload: Bytes| {
            let m = Message::new(payload);
            if keys > 0 {
                m.key(format!("k{}", i % keys))
            } else {
                m
            }
        };
        tasks.push(thread.handle.spawn(async move {
            let mut single = ReusedPayload::new(size, epoch);
            let publish = |first: u64, one: Option<Bytes>| {
                let publisher = publisher.clone();
                async move {
                    if let Some(body) = one {
                        let m = message(first, body);
                        return publisher.publish("bench", m).await.map(|_| ());
                    }
                    let end = (first + batch).min(per_publisher);
                    let bodies = payloads(size, (end - first) as usize, epoch);
                    let messages = (first..end).zip(bodies).map(|(i, p)| message(i, p));
                    publisher.publish_batch("bench", messages).await.map(|_| ())
                }
            };
            let firsts = (0..per_publisher).step_by(batch as usize);
            if batches_in_flight == 1 {
                // Each publish awaited in turn, as an application's publish loop is
                // written (and without a `FuturesUnordered` task per publish).
                for first in firsts {
                    publish(first, (batch == 1).then(|| single.next())).await?;
                }
                return Ok(());
            }
            futures::stream::iter(firsts)
                .map(|first| publish(first, (batch == 1).then(|| single.next())))
                .buffer_unordered(batches_in_flight)
                .fold(
                    Ok(()),
                    |acc: weft_peer::Result<()>, r| async move { acc.and(r) },
                )
                .await
        }));
    }
    for t in tasks {
        t.await.context("publisher task")??;
    }
    let published_in = start.elapsed();
    // Done when every message is acknowledged by every group (the outboxes drained).
    let mut last_report = Instant::now();
    for (_, publisher) in &publishers {
        while !publisher.drain(Duration::from_millis(200)).await {
            if progress && last_report.elapsed() > Duration::from_secs(1) {
                eprintln!("  ... {} delivered", delivered.load(Ordering::Relaxed));
                last_report = Instant::now();
            }
        }
    }
    let elapsed = start.elapsed();
    let expected = total * args.groups as u64;
    let h = latency
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| histogram());
    let msgs_per_s = total as f64 / elapsed.as_secs_f64();
    // Group commits that ended in an fdatasync (lease renewals included for `memory`).
    let commits: u64 = publishers
        .iter()
        .map(|(_, p)| p.outbox_stats().commits)
        .sum();
    let report = Report {
        system: system_name(args.durability),
        mode: "thr",
        size: args.size,
        count: total,
        elapsed_s: elapsed.as_secs_f64(),
        msgs_per_s,
        mb_per_s: msgs_per_s * args.size as f64 / 1e6,
        p50_us: h.value_at_quantile(0.50) as f64 / 1e3,
        p90_us: h.value_at_quantile(0.90) as f64 / 1e3,
        p99_us: h.value_at_quantile(0.99) as f64 / 1e3,
        p999_us: h.value_at_quantile(0.999) as f64 / 1e3,
        max_us: h.max() as f64 / 1e3,
        latency_kind: "publish_to_delivery",
        extra: format!(
            "\"delivered_msgs_per_s\":{:.0},\"publish_s\":{:.3},\"groups\":{},\"members\":{},\"publishers\":{},\"batch\":{},\"outbox_commits\":{commits},\"expected_deliveries\":{expected}",
            expected as f64 / elapsed.as_secs_f64(),
            published_in.as_secs_f64(),
            args.groups,
            args.members,
            args.publishers,
            batch
        ),
    };
    report.print(args.json);
    for (thread, peer) in publishers.into_iter().chain(subscribers) {
        let _ = thread.run(peer.close()).await;
    }
    Ok(())
}

/// The subscriber loop of `--batch` runs: deliveries taken and acknowledged in batches
/// ([`Subscription::recv_many`], [`Delivery::ack_all`]), latencies recorded into the
/// shared histogram under one lock per batch.
async fn receive_batches(
    mut sub: Subscription,
    epoch: Instant,
    delivered: Arc<AtomicU64>,
    latency: Arc<Mutex<Histogram<u64>>>,
) {
    let mut batch = Vec::with_capacity(RECEIVE_BATCH);
    while sub.recv_many(&mut batch, RECEIVE_BATCH).await > 0 {
        let now = epoch.elapsed().as_nanos() as u64;
        if let Ok(mut h) = latency.lock() {
            // The messages of one publish batch carry one send time: one record per run.
            let mut sent = batch.iter().map(|d| sent_ns(d.payload())).peekable();
            while let Some(t) = sent.next() {
                let mut n = 1;
                while sent.next_if_eq(&t).is_some() {
                    n += 1;
                }
                let _ = h.record_n(now.saturating_sub(t).max(1), n);
            }
        }
        delivered.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Delivery::ack_all(batch.drain(..));
    }
}

/// Most deliveries a `--batch` subscriber takes at once.
const RECEIVE_BATCH: usize = 1024;

async fn latency(args: &BenchArgs) -> Result<()> {
    let fabric = Fabric::start(args.segment_bytes).await?;
    let sender_thread = PeerThread::new(args.threads, "ping")?;
    let echo_thread = PeerThread::new(args.threads, "pong")?;
    let sender = fabric
        .peer(&sender_thread, "ping", durability(args.durability), None)
        .await?;
    let echo = fabric
        .peer(&echo_thread, "pong", durability(args.durability), None)
        .await?;
    let mut requests = echo_thread
        .run(echo.subscribe("bench.ping").group("pong").start())
        .await??;
    let replies = sender_thread
        .run(sender.subscribe("bench.pong").group("ping").start())
        .await??;
    fabric.wait_members("bench.ping", 1).await?;
    fabric.wait_members("bench.pong", 1).await?;
    let echo_task = {
        let echo = echo.clone();
        echo_thread.handle.spawn(async move {
            while let Some(d) = requests.next().await {
                let body = d.payload().clone();
                d.ack();
                if echo
                    .publish("bench.pong", Message::new(body))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    // The measuring loop runs on the sender's thread, like its application would.
    let (warmup, count, size) = (args.warmup, args.count, args.size);
    let round_trips = {
        let sender = sender.clone();
        async move {
            let mut replies = replies;
            let mut h = histogram();
            let body = Bytes::from(vec![0x5au8; size]);
            let mut measured_from = Instant::now();
            for i in 0..(warmup + count) {
                if i == warmup {
                    measured_from = Instant::now();
                }
                let t0 = Instant::now();
                sender
                    .publish("bench.ping", Message::new(body.clone()))
                    .await?;
                let reply = replies.next().await.context("reply stream ended")?;
                reply.ack();
                if i >= warmup {
                    let _ = h.record((t0.elapsed().as_nanos() as u64).max(1));
                }
            }
            Ok::<_, anyhow::Error>((h, measured_from))
        }
    };
    let (h, measured_from) = sender_thread.run(round_trips).await??;
    let elapsed = measured_from.elapsed();
    let report = Report {
        system: system_name(args.durability),
        mode: "lat",
        size: args.size,
        count: args.count,
        elapsed_s: elapsed.as_secs_f64(),
        msgs_per_s: args.count as f64 / elapsed.as_secs_f64(),
        mb_per_s: args.count as f64 * args.size as f64 / elapsed.as_secs_f64() / 1e6,
        p50_us: h.value_at_quantile(0.50) as f64 / 1e3,
        p90_us: h.value_at_quantile(0.90) as f64 / 1e3,
        p99_us: h.value_at_quantile(0.99) as f64 / 1e3,
        p999_us: h.value_at_quantile(0.999) as f64 / 1e3,
        max_us: h.max() as f64 / 1e3,
        latency_kind: "round_trip",
        extra: String::new(),
    };
    report.print(args.json);
    echo_task.abort();
    let _ = sender_thread.run(sender.close()).await;
    let _ = echo_thread.run(echo.close()).await;
    Ok(())
}

struct Report {
    system: &'static str,
    mode: &'static str,
    size: usize,
    count: u64,
    elapsed_s: f64,
    msgs_per_s: f64,
    mb_per_s: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    latency_kind: &'static str,
    extra: String,
}

impl Report {
    fn print(&self, json: bool) {
        let (cpu, rss) = process_usage();
        if json {
            let extra = if self.extra.is_empty() {
                String::new()
            } else {
                format!(",{}", self.extra)
            };
            println!(
                "{{\"system\":\"{}\",\"mode\":\"{}\",\"size\":{},\"count\":{},\"elapsed_s\":{:.4},\"msgs_per_s\":{:.1},\"mb_per_s\":{:.2},\"rtt_p50_us\":{:.1},\"rtt_p99_us\":{:.1},\"rtt_p999_us\":{:.1},\"lat_p90_us\":{:.1},\"lat_max_us\":{:.1},\"latency_kind\":\"{}\",\"cpu_s\":{:.2},\"peak_rss_mib\":{:.1}{}}}",
                self.system, self.mode, self.size, self.count, self.elapsed_s, self.msgs_per_s, self.mb_per_s,
                self.p50_us, self.p99_us, self.p999_us, self.p90_us, self.max_us, self.latency_kind, cpu, rss, extra
            );
        } else {
            println!(
                "{} {} size={} count={}",
                self.system, self.mode, self.size, self.count
            );
            println!(
                "  {:>14} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                "msgs/s", "MB/s", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs"
            );
            println!(
                "  {:>14.0} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                self.msgs_per_s,
                self.mb_per_s,
                self.p50_us,
                self.p90_us,
                self.p99_us,
                self.p999_us,
                self.max_us
            );
            println!("  latency: {}; elapsed {:.3} s; process CPU {:.2} s, peak RSS {:.1} MiB (all peers share this process)", self.latency_kind, self.elapsed_s, cpu, rss);
            if !self.extra.is_empty() {
                println!("  {}", self.extra.replace('"', ""));
            }
        }
    }
}

/// (CPU seconds used by this process, peak RSS in MiB) from /proc; zeros elsewhere.
fn process_usage() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let cpu_ticks: f64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0);
    (cpu_ticks / 100.0, rss_kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_window_caps_payload_bytes_in_flight_but_keeps_a_batch() {
        assert_eq!(default_window(1, 128), 512);
        assert_eq!(default_window(256, 128), 4096);
        assert_eq!(default_window(1, 16384), 512);
        assert_eq!(default_window(256, 16384), 512);
        assert_eq!(default_window(1, 1 << 20), 8);
        assert_eq!(default_window(64, 1 << 20), 64, "at least one batch");
        assert_eq!(default_window(1, 64 << 20), 1);
    }

    #[test]
    fn single_publishes_share_a_payload_only_within_the_reuse_window() {
        let window = PAYLOAD_REUSE.as_nanos() as u64;
        let mut payloads = ReusedPayload::new(128, Instant::now());
        let a = payloads.at(1_000);
        let b = payloads.at(1_000 + window - 1);
        assert_eq!(a.as_ptr(), b.as_ptr(), "within the window: one buffer");
        assert_eq!((a.len(), sent_ns(&a)), (128, 1_000));
        let c = payloads.at(1_000 + window);
        assert_ne!(a.as_ptr(), c.as_ptr(), "past the window: a fresh buffer");
        assert_eq!(sent_ns(&c), 1_000 + window);
    }
}
