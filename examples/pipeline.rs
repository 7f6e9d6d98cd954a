//! A processing pipeline: source → topic `jobs` → group `workers` (3 peers, each job to
//! one of them) → topic `results` → sink.
//!
//! Each worker does a little CPU work per job (hashes the payload `--work` times),
//! publishes the result keyed by the job id, then acknowledges the job: a job is only
//! settled once its result is safely in the worker's outbox (at-least-once end to end).
//! The sink counts results per job id; the run fails if one is missing or duplicated.
//!
//! ```text
//! cargo run --release --example pipeline
//! cargo run --release --example pipeline -- --count 50000 --work 5000
//! ```

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use futures::StreamExt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_directory::Directory;
use weft_peer::{Durability, Message, Peer, Subscription, WhenFull};

const JOBS: &str = "jobs";
const RESULTS: &str = "results";
const WORKERS: usize = 3;

/// Weft pipeline example: source → 3 workers → sink.
#[derive(Parser)]
struct Args {
    /// Jobs to run.
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// Hash rounds per job (the "work").
    #[arg(long, default_value_t = 1_000)]
    work: u32,
    /// Jobs (and, per worker, results) in flight at once.
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// Seconds to wait for every result.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // The development-CA warning is expected here: the CA lives in a
                // temporary directory removed on exit.
                .unwrap_or_else(|_| "warn,weft_proto::certs=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let n = args.count;
    ensure!(n > 0, "--count must be at least 1");

    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let ca = tmp.path().join("dev-ca");
    let directory = Directory::builder("directory-1")
        .listen("127.0.0.1:0".parse()?)
        .dev(&ca)
        .start()
        .await
        .context("starting the directory")?;

    // Sink first, then the workers, so every stage has a receiver before work flows.
    let sink = start_peer(tmp.path(), &ca, &directory, "sink").await?;
    let results_sub = sink
        .subscribe(RESULTS)
        .group("sink")
        .start()
        .await
        .context("subscribing the sink")?;
    let per_job: Arc<Vec<AtomicU32>> = Arc::new((0..n).map(|_| AtomicU32::new(0)).collect());
    let distinct = Arc::new(AtomicU64::new(0));
    let sink_task = tokio::spawn(run_sink(results_sub, per_job.clone(), distinct.clone()));

    let mut workers = Vec::new();
    let mut worker_tasks = Vec::new();
    let mut worker_counts = Vec::new();
    for i in 1..=WORKERS {
        let name = format!("worker-{i}");
        let peer = start_peer(tmp.path(), &ca, &directory, &name).await?;
        let sub = peer
            .subscribe(JOBS)
            .group("workers")
            .start()
            .await
            .with_context(|| format!("subscribing {name}"))?;
        let done = Arc::new(AtomicU64::new(0));
        worker_tasks.push(tokio::spawn(run_worker(
            peer.clone(),
            sub,
            args.work,
            args.concurrency,
            done.clone(),
        )));
        worker_counts.push((name, done));
        workers.push(peer);
    }
    let source = start_peer(tmp.path(), &ca, &directory, "source").await?;

    wait_for(Duration::from_secs(10), "the routes of every stage", || {
        let members = |topic: &str| -> usize {
            directory
                .route(topic)
                .groups
                .iter()
                .map(|g| g.members.len())
                .sum()
        };
        members(JOBS) == WORKERS && members(RESULTS) == 1
    })
    .await?;

    println!(
        "{n} jobs → {WORKERS} workers ({} hash rounds each) → sink",
        args.work
    );
    let started = Instant::now();
    let mut publishes = futures::stream::iter(0..n)
        .map(|job| {
            let source = source.clone();
            async move {
                let msg = Message::new(format!("job {job:08} payload to be hashed by a worker"))
                    .header("job-id", job.to_string());
                source
                    .publish_with(JOBS, msg, Durability::Disk, WhenFull::Wait)
                    .await
            }
        })
        .buffer_unordered(args.concurrency);
    while let Some(receipt) = publishes.next().await {
        receipt.context("publishing a job")?;
    }
    drop(publishes);
    let publish_time = started.elapsed();

    let arrived = wait_for(
        Duration::from_secs(args.timeout_s),
        "every job's result",
        || distinct.load(Ordering::Relaxed) >= n,
    )
    .await;
    let end_to_end = started.elapsed();
    // Every stage should now settle its outbox (the last acks are on their way).
    let mut drained = source.drain(Duration::from_secs(10)).await;
    for w in &workers {
        drained &= w.drain(Duration::from_secs(10)).await;
    }

    let rate = |d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    println!(
        "jobs published in {:.2}s ({:.0} msg/s); all results at the sink in {:.2}s \
         ({:.0} jobs/s end to end)",
        publish_time.as_secs_f64(),
        rate(publish_time),
        end_to_end.as_secs_f64(),
        rate(end_to_end)
    );
    let per_worker: Vec<String> = worker_counts
        .iter()
        .map(|(name, done)| format!("{name} {}", done.load(Ordering::Relaxed)))
        .collect();
    println!("  jobs done per worker: {}", per_worker.join(", "));
    let (mut missing, mut duplicates) = (0u64, 0u64);
    for c in per_job.iter() {
        match c.load(Ordering::Relaxed) {
            0 => missing += 1,
            k => duplicates += u64::from(k - 1),
        }
    }
    println!(
        "  results: {} distinct jobs, missing {missing}, duplicates {duplicates}{}",
        distinct.load(Ordering::Relaxed),
        if drained {
            ""
        } else {
            "; some outbox did not drain"
        }
    );

    sink_task.abort();
    for t in &worker_tasks {
        t.abort();
    }
    source.close().await.context("closing the source")?;
    for w in workers {
        w.close().await.context("closing a worker")?;
    }
    sink.close().await.context("closing the sink")?;
    directory.shutdown().await;

    if missing > 0 || arrived.is_err() {
        bail!("{missing} job(s) have no result");
    }
    // Nothing fails in this run, so a redelivery (and with it a second result) would
    // mean a job waited past the ack timeout: a bug or a machine far too slow.
    ensure!(
        duplicates == 0,
        "{duplicates} duplicate result(s): some jobs were redelivered although no peer failed"
    );
    println!("ok: every job's result arrived exactly once");
    Ok(())
}

async fn start_peer(dir: &Path, ca: &Path, directory: &Directory, name: &str) -> Result<Peer> {
    Peer::builder(name)
        .directory([directory.local_addr()])
        .data_dir(dir.join(name))
        .dev_ca(ca)
        .start()
        .await
        .with_context(|| format!("starting peer {name}"))
}

/// The "work": hashes `payload` `rounds` times.
fn work(payload: &[u8], rounds: u32) -> u64 {
    let mut h = 0u64;
    for _ in 0..rounds {
        let mut hasher = DefaultHasher::new();
        h.hash(&mut hasher);
        payload.hash(&mut hasher);
        h = hasher.finish();
    }
    h
}

/// Processes jobs `concurrency` at a time: computes, publishes the result, then acks.
async fn run_worker(
    peer: Peer,
    sub: Subscription,
    rounds: u32,
    concurrency: usize,
    done: Arc<AtomicU64>,
) {
    sub.for_each_concurrent(concurrency, |job| {
        let peer = peer.clone();
        let done = done.clone();
        async move {
            let job_id = job
                .headers()
                .iter()
                .find(|(k, _)| k == "job-id")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let hash = work(job.payload(), rounds);
            let result = Message::new(format!("{job_id} {hash:016x} {}", peer.identity()))
                .key(job_id.clone());
            match peer
                .publish_with(RESULTS, result, Durability::Disk, WhenFull::Wait)
                .await
            {
                Ok(_) => {
                    done.fetch_add(1, Ordering::Relaxed);
                    job.ack();
                }
                // Not acked: the source redelivers the job after its ack timeout.
                Err(e) => eprintln!(
                    "{}: publishing the result of job {job_id}: {e}",
                    peer.identity()
                ),
            }
        }
    })
    .await;
}

/// Counts results per job id (deduplicating nothing) and acks them.
async fn run_sink(mut sub: Subscription, per_job: Arc<Vec<AtomicU32>>, distinct: Arc<AtomicU64>) {
    while let Some(result) = sub.next().await {
        let job: Option<usize> = result.key().and_then(|k| k.parse().ok());
        match job.and_then(|j| per_job.get(j)) {
            Some(count) => {
                if count.fetch_add(1, Ordering::Relaxed) == 0 {
                    distinct.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => eprintln!("sink: result with an unknown job id {:?}", result.key()),
        }
        result.ack();
    }
}

/// Polls `check` every 10 ms until it holds or `timeout` passes.
async fn wait_for(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() >= deadline {
            println!("timed out after {}s waiting for {what}", timeout.as_secs());
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
