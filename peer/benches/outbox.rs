//! Micro-benchmarks of the outbox: group-committed appends (`Memory` and `Disk`),
//! settling (acking) appended messages, and reading a cached body.
//! Run with `cargo bench -p weft-peer --bench outbox`.
//!
//! Uses only the public `weft_peer::outbox` API: `OutboxConfig::new`, `Outbox::open`,
//! `Outbox::append`, `Outbox::try_submit`, `Outbox::try_reserve_disk`,
//! `Outbox::try_gather`, `Outbox::settle`, `Outbox::read`, `Outbox::stats` and
//! `Outbox::close`. The outbox lives in a temporary directory (on the same file system as
//! `/tmp`, which decides what an `fdatasync` costs).

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use std::time::{Duration, Instant};
use weft_peer::outbox::{
    AppendDone, Durability, GatheredAppend, Outbox, OutboxConfig, OutboxError, Sealed, WhenFull,
};

/// Appends in flight at once: enough for group commit to batch them.
const CONCURRENT: usize = 256;
/// Body size of every message.
const BODY: usize = 128;
const GROUP: &str = "g";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn open(dir: &tempfile::TempDir) -> Outbox {
    let (outbox, _recovery) = Outbox::open(OutboxConfig::new(dir.path()))
        .await
        .expect("open outbox");
    outbox
}

/// `CONCURRENT` appends at once; returns their sequence numbers.
async fn append_batch(outbox: &Outbox, body: &Bytes, durability: Durability) -> Vec<u64> {
    let appends = (0..CONCURRENT).map(|_| {
        outbox.append(
            vec![GROUP.to_string()],
            body.clone(),
            durability,
            WhenFull::Wait,
        )
    });
    futures::future::join_all(appends)
        .await
        .into_iter()
        .map(|r| r.expect("append"))
        .collect()
}

/// `CONCURRENT` appends handed over with `try_submit` (the path of a `Disk` publish
/// while the quota has room), then their tickets awaited; returns their sequence
/// numbers.
async fn try_submit_batch(outbox: &Outbox, body: &Bytes) -> Vec<u64> {
    let targets = outbox
        .target_groups(vec![GROUP.to_string()])
        .expect("a valid group");
    let mut tickets: Vec<_> = (0..CONCURRENT)
        .map(|_| {
            outbox
                .try_submit(&targets, body.clone(), Durability::Disk)
                .expect("try_submit")
                .expect("room in the quota and the writer channel")
        })
        .collect();
    let mut seqs = Vec::with_capacity(CONCURRENT);
    for ticket in &mut tickets {
        seqs.push(ticket.wait().await.expect("stored").start);
    }
    seqs
}

/// The bodies of one gathering, as a peer gathers single `Disk` publishes.
struct BenchGathering {
    bodies: Vec<Bytes>,
    done: Option<tokio::sync::oneshot::Sender<Result<std::ops::Range<u64>, OutboxError>>>,
}

impl GatheredAppend for BenchGathering {
    fn seal(&mut self) -> Sealed {
        Sealed {
            bodies: std::mem::take(&mut self.bodies),
            unused: (0, 0),
        }
    }
}

impl AppendDone for BenchGathering {
    fn done(mut self: Box<Self>, result: Result<std::ops::Range<u64>, OutboxError>) {
        if let Some(done) = self.done.take() {
            let _ = done.send(result);
        }
    }
}

/// `CONCURRENT` bodies gathered into one append (`try_reserve_disk` for all of them
/// at once, then `try_gather`: the path of pipelined single `Disk` publishes), its
/// continuation awaited; returns their sequence numbers.
async fn gathered_batch(outbox: &Outbox, body: &Bytes) -> Vec<u64> {
    let targets = outbox
        .target_groups(vec![GROUP.to_string()])
        .expect("a valid group");
    let n = CONCURRENT as u64;
    let reserved = outbox
        .try_reserve_disk(&targets, n, n * body.len() as u64)
        .expect("open");
    assert!(reserved, "room in the quota");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let gathering = BenchGathering {
        bodies: vec![body.clone(); CONCURRENT],
        done: Some(tx),
    };
    let handed = outbox
        .try_gather(&targets, Box::new(gathering))
        .expect("open");
    assert!(handed.is_ok(), "room in the writer channel");
    rx.await.expect("answered").expect("stored").collect()
}

fn append(c: &mut Criterion) {
    let rt = runtime();
    let body = Bytes::from(vec![0x5a; BODY]);
    let mut g = c.benchmark_group("outbox_append_128B");
    g.throughput(Throughput::Elements(CONCURRENT as u64));
    for (name, durability) in [
        ("memory", Durability::Memory),
        ("disk", Durability::Disk),
        ("disk_try_submit", Durability::Disk),
        ("disk_gathered", Durability::Disk),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = rt.block_on(open(&dir));
        // One iteration: CONCURRENT appends in flight together. Settling them (so the
        // outbox does not grow) is not timed, but the settle records it buffers are
        // written by the next timed batch, as in a steady-state sender.
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        let seqs = match name {
                            "disk_try_submit" => try_submit_batch(&outbox, &body).await,
                            "disk_gathered" => gathered_batch(&outbox, &body).await,
                            _ => append_batch(&outbox, &body, durability).await,
                        };
                        timed += start.elapsed();
                        for seq in seqs {
                            outbox.settle(seq, GROUP);
                        }
                    }
                    timed
                })
            })
        });
        let stats = outbox.stats();
        if durability == Durability::Disk && stats.commits > 0 {
            eprintln!(
                "outbox_append_128B/{name}: {} appends in {} fdatasync commits ({:.1} per commit)",
                stats.appended,
                stats.commits,
                stats.appended as f64 / stats.commits as f64
            );
        }
        rt.block_on(outbox.close()).expect("close");
    }
    g.finish();
}

fn settle(c: &mut Criterion) {
    let rt = runtime();
    let body = Bytes::from(vec![0x5a; BODY]);
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = rt.block_on(open(&dir));
    let mut g = c.benchmark_group("outbox_settle");
    g.throughput(Throughput::Elements(CONCURRENT as u64));
    // One iteration: settle CONCURRENT disk messages for their only group (each leaves
    // the outbox). Appending them first is not timed.
    g.bench_function("disk_1_group", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let seqs = rt.block_on(append_batch(&outbox, &body, Durability::Disk));
                let start = Instant::now();
                for seq in seqs {
                    outbox.settle(black_box(seq), GROUP);
                }
                timed += start.elapsed();
            }
            timed
        })
    });
    g.finish();
    rt.block_on(outbox.close()).expect("close");
}

fn read(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = rt.block_on(open(&dir));
    let seq = rt
        .block_on(outbox.append(
            vec![GROUP.to_string()],
            Bytes::from(vec![0x5a; BODY]),
            Durability::Disk,
            WhenFull::Wait,
        ))
        .expect("append");
    let mut g = c.benchmark_group("outbox_read");
    g.throughput(Throughput::Elements(1));
    g.bench_function("cached_128B", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let body = outbox.read(black_box(seq)).await.expect("read");
                    black_box(body.expect("pending"));
                }
                start.elapsed()
            })
        })
    });
    g.finish();
    rt.block_on(outbox.close()).expect("close");
}

criterion_group!(benches, append, settle, read);
criterion_main!(benches);
