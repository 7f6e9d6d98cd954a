//! A group with no live member: messages wait in the sender's outbox (on disk), their
//! count and age are visible through the API, and they drain when a member appears.
//!
//! The only member of group `workers` stops without unregistering (as a crashed process
//! would), so the directory keeps the group in the route for its grace period. The
//! sender publishes N `Disk` messages, prints `Peer::backlog` and `Peer::outbox_stats`
//! and this process's resident memory, then a new member joins and drains the backlog.
//!
//! ```text
//! cargo run --release --example backlog            # 100,000 messages
//! cargo run --release --example backlog -- 20000
//! ```

use anyhow::{ensure, Context, Result};
use clap::Parser;
use futures::StreamExt;
use std::time::{Duration, Instant};
use weft_directory::Directory;
use weft_peer::{Message, Peer};

const TOPIC: &str = "jobs";
const GROUP: &str = "workers";

/// Weft backlog example.
#[derive(Parser)]
struct Args {
    /// Messages to publish while the group has no live member.
    #[arg(default_value_t = 100_000)]
    count: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Outbox body cache of each peer in MiB (default: `OutboxConfig`'s 8 MiB). Bodies
    /// beyond it are read back from the segment files when they are sent.
    #[arg(long)]
    cache_mib: Option<usize>,
}

/// Resident set size of this process, from /proc (Linux); `None` elsewhere.
fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

fn show_rss(when: &str) {
    match rss_mib() {
        Some(mib) => println!("  process RSS {when}: {mib:.1} MiB"),
        None => println!("  process RSS {when}: unavailable on this platform"),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let args = Args::parse();
    let dir = tempfile::tempdir().context("temporary directory")?;
    let ca = dir.path().join("dev-ca");
    let directory = Directory::builder("directory")
        .listen("127.0.0.1:0".parse()?)
        .dev(ca.clone())
        .grace_period(Duration::from_secs(600))
        .start()
        .await?;
    let cache_mib = args.cache_mib;
    let peer = |name: &str| {
        Peer::builder(name)
            .directory([directory.local_addr()])
            .dev_ca(ca.clone())
            .data_dir(dir.path().join(name))
            .outbox(move |mut c| {
                if let Some(mib) = cache_mib {
                    c.cache_bytes = mib << 20;
                }
                c
            })
    };

    // A member registers, then its process goes away without unregistering.
    let gone = peer("worker-1").start().await?;
    let sub = gone.subscribe(TOPIC).group(GROUP).start().await?;
    gone.close().await?;
    drop(sub);

    let sender = peer("sender").start().await?;
    show_rss("before publishing");
    let payload = vec![0x5a_u8; args.size];
    let started = Instant::now();
    futures::stream::iter(0..args.count)
        .map(|_| sender.publish(TOPIC, Message::new(payload.clone())))
        .buffer_unordered(1024)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    println!(
        "published {} Disk messages in {:.2} s; group {GROUP:?} has no live member",
        args.count,
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for b in sender.backlog() {
        println!(
            "  backlog {}/{}: {} waiting, {} in flight, {} member(s) in the route",
            b.topic, b.group, b.waiting, b.in_flight, b.members
        );
    }
    let stats = sender.outbox_stats();
    for g in &stats.groups {
        println!(
            "  outbox: {} pending for {:?}, oldest {:.1} s old; {} segment(s), {:.1} MiB on disk",
            g.pending,
            g.group,
            g.oldest_pending_age.unwrap_or_default().as_secs_f64(),
            stats.segments,
            stats.disk_bytes as f64 / (1024.0 * 1024.0)
        );
    }
    ensure!(
        stats.pending_messages == args.count,
        "expected {} pending messages, the outbox has {}",
        args.count,
        stats.pending_messages
    );
    show_rss("with the backlog (directory, sender and the stopped member in one process)");

    // A new member appears: the backlog drains to it.
    let worker = peer("worker-2").start().await?;
    let mut sub = worker.subscribe(TOPIC).group(GROUP).start().await?;
    let drained = Instant::now();
    let consumer = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(d) = sub.next().await {
            d.ack();
            n += 1;
        }
        n
    });
    ensure!(
        sender.drain(Duration::from_secs(120)).await,
        "the backlog did not drain within 120 s"
    );
    println!(
        "a new member joined; the backlog drained in {:.2} s",
        drained.elapsed().as_secs_f64()
    );
    consumer.abort();
    sender.close().await?;
    worker.close().await?;
    Ok(())
}
