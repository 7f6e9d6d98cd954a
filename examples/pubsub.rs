//! Publish/subscribe between groups: every group gets every order, the members of a
//! group share them (orders of one customer key go to the same member).
//!
//! Runs with no set-up: an embedded directory, a development CA in a temporary
//! directory, an order service publishing N orders (keyed by customer), group `billing`
//! with two members and group `analytics` with one.
//!
//! ```text
//! cargo run --release --example pubsub            # 20,000 orders
//! cargo run --release --example pubsub -- 100000
//! ```

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use futures::StreamExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weft_directory::Directory;
use weft_peer::{Durability, Message, Peer, Subscription};

const TOPIC: &str = "orders";
const CUSTOMERS: u64 = 100;

/// Weft pub/sub example: one order service, groups `billing` (2 members) and
/// `analytics` (1 member).
#[derive(Parser)]
struct Args {
    /// Orders to publish.
    #[arg(default_value_t = 20_000)]
    count: u64,
    /// Orders to publish (same as the positional argument).
    #[arg(long = "count", value_name = "COUNT", conflicts_with = "count")]
    count_flag: Option<u64>,
    /// Orders in flight at once (submitted, receipts not yet awaited).
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// Seconds to wait for every order to arrive.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

/// What one group received: deliveries per order number, plus per-member figures.
struct GroupTally {
    name: &'static str,
    per_order: Vec<AtomicU32>,
    received: AtomicU64,
    members: Mutex<Vec<(String, Arc<MemberTally>)>>,
}

#[derive(Default)]
struct MemberTally {
    received: AtomicU64,
}

impl GroupTally {
    fn new(name: &'static str, n: u64) -> Arc<Self> {
        Arc::new(Self {
            name,
            per_order: (0..n).map(|_| AtomicU32::new(0)).collect(),
            received: AtomicU64::new(0),
            members: Mutex::new(Vec::new()),
        })
    }
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
    let n = args.count_flag.unwrap_or(args.count);
    ensure!(n > 0, "--count must be at least 1");

    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let ca = tmp.path().join("dev-ca");
    let directory = Directory::builder("directory-1")
        .listen("127.0.0.1:0".parse()?)
        .dev(&ca)
        .start()
        .await
        .context("starting the directory")?;

    let orders = start_peer(tmp.path(), &ca, &directory, "order-service").await?;
    let billing = GroupTally::new("billing", n);
    let analytics = GroupTally::new("analytics", n);
    let mut members = Vec::new();
    let mut consumers = Vec::new();
    for (name, group) in [
        ("billing-1", &billing),
        ("billing-2", &billing),
        ("analytics-1", &analytics),
    ] {
        let peer = start_peer(tmp.path(), &ca, &directory, name).await?;
        let sub = peer
            .subscribe(TOPIC)
            .group(group.name)
            .start()
            .await
            .with_context(|| format!("subscribing {name}"))?;
        consumers.push(tokio::spawn(consume(name, sub, group.clone())));
        members.push(peer);
    }

    // Publish only once the directory lists all three members, so both billing members
    // share the orders from the first one on.
    wait_for(Duration::from_secs(10), "all members registered", || {
        let route = directory.route(TOPIC);
        route.groups.iter().map(|g| g.members.len()).sum::<usize>() == 3
    })
    .await?;

    println!(
        "publishing {n} orders to {TOPIC:?} (disk durability, {} keys, {} in flight)",
        CUSTOMERS, args.concurrency
    );
    let started = Instant::now();
    // Pipelined: `submit` hands each order to the outbox and returns its receipt at
    // once; up to `concurrency` receipts wait, the oldest awaited first, so one group
    // commit (one fsync) answers hundreds of orders.
    let check = |receipt: weft_peer::Result<weft_peer::Receipt>| -> Result<()> {
        let receipt = receipt.context("publishing an order")?;
        ensure!(
            receipt.groups == 2,
            "order {} addressed to {} groups, expected 2",
            receipt.id,
            receipt.groups
        );
        Ok(())
    };
    let mut in_flight = std::collections::VecDeque::with_capacity(args.concurrency);
    for i in 0..n {
        if in_flight.len() >= args.concurrency.max(1) {
            if let Some(oldest) = in_flight.pop_front() {
                check(oldest.await)?;
            }
        }
        let msg = Message::new(i.to_string()).key(format!("user-{}", i % CUSTOMERS));
        let receipt = orders
            .submit_with(TOPIC, msg, Durability::Disk, weft_peer::WhenFull::Wait)
            .await
            .context("publishing an order")?;
        in_flight.push_back(receipt);
    }
    for receipt in in_flight {
        check(receipt.await)?;
    }
    let publish_time = started.elapsed();

    let all_arrived = wait_for(
        Duration::from_secs(args.timeout_s),
        "every order to arrive",
        || {
            billing.received.load(Ordering::Relaxed) >= n
                && analytics.received.load(Ordering::Relaxed) >= n
        },
    )
    .await;
    let end_to_end = started.elapsed();
    let drained = orders.drain(Duration::from_secs(10)).await;

    let rate = |d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    println!(
        "published in {:.2}s ({:.0} msg/s); all delivered in {:.2}s ({:.0} msg/s end to end, \
         {:.0} deliveries/s)",
        publish_time.as_secs_f64(),
        rate(publish_time),
        end_to_end.as_secs_f64(),
        rate(end_to_end),
        2.0 * rate(end_to_end)
    );
    let mut ok = all_arrived.is_ok() && drained;
    for group in [&billing, &analytics] {
        ok &= report(group);
    }
    if !drained {
        println!(
            "order service outbox did not drain: {} pending",
            orders.outbox_stats().pending_messages
        );
    }

    // Clean shutdown: stop consuming, close every peer, then the directory.
    for c in &consumers {
        c.abort();
    }
    for peer in members {
        peer.close().await.context("closing a member")?;
    }
    orders.close().await.context("closing the order service")?;
    directory.shutdown().await;
    if !ok {
        bail!("some orders were lost or duplicated (see above)");
    }
    println!("ok: every group got every order exactly once");
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

/// Records and acknowledges every delivery.
async fn consume(member: &'static str, mut sub: Subscription, group: Arc<GroupTally>) {
    let tally = Arc::new(MemberTally::default());
    group
        .members
        .lock()
        .expect("tally lock")
        .push((member.to_string(), tally.clone()));
    while let Some(d) = sub.next().await {
        let order: Option<usize> = std::str::from_utf8(d.payload())
            .ok()
            .and_then(|s| s.parse().ok());
        if let Some(count) = order.and_then(|i| group.per_order.get(i)) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        tally.received.fetch_add(1, Ordering::Relaxed);
        group.received.fetch_add(1, Ordering::Relaxed);
        d.ack();
    }
}

/// Prints a group's figures; true if it got every order exactly once.
fn report(group: &GroupTally) -> bool {
    let mut missing = 0u64;
    let mut duplicates = 0u64;
    for c in &group.per_order {
        match c.load(Ordering::Relaxed) {
            0 => missing += 1,
            1 => {}
            k => duplicates += u64::from(k - 1),
        }
    }
    let members = group.members.lock().expect("tally lock");
    let per_member: Vec<String> = members
        .iter()
        .map(|(name, t)| format!("{name} {}", t.received.load(Ordering::Relaxed)))
        .collect();
    let ok = missing == 0 && duplicates == 0;
    println!(
        "  {:<10} {:>7} received ({}); missing {missing}, duplicates {duplicates}  {}",
        group.name,
        group.received.load(Ordering::Relaxed),
        per_member.join(", "),
        if ok { "OK" } else { "FAILED" }
    );
    ok
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
