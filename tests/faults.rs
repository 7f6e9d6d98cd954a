//! Fault tests with real processes killed by SIGKILL and real files.

use futures::StreamExt;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weft_directory::Directory;
use weft_peer::Peer;
use weft_tests::{binary, eventually, init_logs};

/// (member, key) → numbers in delivery order.
type Log = Arc<Mutex<HashMap<(String, String), Vec<u64>>>>;

fn consume(
    member: String,
    mut sub: weft_peer::Subscription,
    log: Log,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(d) = sub.next().await {
            let n: u64 = std::str::from_utf8(d.payload())
                .expect("utf8")
                .parse()
                .expect("n");
            let key = d.key().unwrap_or_default().to_string();
            log.lock()
                .expect("lock")
                .entry((member.clone(), key))
                .or_default()
                .push(n);
            d.ack();
        }
    })
}

fn recorded(path: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn spawn_publisher(directory: &Directory, root: &std::path::Path, from: u64, to: u64) -> Child {
    Command::new(binary("crash-publisher"))
        .arg(directory.local_addr().to_string())
        .arg(root.join("dev-ca"))
        .arg(root.join("publisher"))
        .arg("numbers")
        .arg(root.join("recorded.txt"))
        .arg(from.to_string())
        .arg(to.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn crash-publisher")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_killed_at_random_points_loses_nothing_it_confirmed() {
    init_logs();
    let seed: u64 = std::env::var("WEFT_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("sender crash test seed: {seed} (rerun with WEFT_FAULT_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root = tempfile::tempdir().expect("tempdir");
    let directory = Directory::builder("dir-1")
        .listen("127.0.0.1:0".parse().expect("addr"))
        .dev(root.path().join("dev-ca"))
        .start()
        .await
        .expect("directory");
    let log: Log = Arc::default();
    let mut members = Vec::new();
    for (name, group) in [("g1-a", "g1"), ("g1-b", "g1"), ("g2-a", "g2")] {
        let peer = Peer::builder(name)
            .directory([directory.local_addr()])
            .dev_ca(root.path().join("dev-ca"))
            .data_dir(root.path().join(name))
            .start()
            .await
            .expect("member");
        let sub = peer
            .subscribe("numbers")
            .group(group)
            .start()
            .await
            .expect("subscribe");
        consume(name.to_string(), sub, log.clone());
        members.push(peer);
    }
    assert!(
        eventually(Duration::from_secs(10), || directory
            .route("numbers")
            .groups
            .iter()
            .map(|g| g.members.len())
            .sum::<usize>()
            == 3)
        .await
    );
    const KILLS: usize = 20;
    const PER_RUN: u64 = 400;
    let record = root.path().join("recorded.txt");
    for _ in 0..KILLS {
        let from = recorded(&record).last().map_or(0, |n| n + 1);
        let mut child = spawn_publisher(&directory, root.path(), from, from + PER_RUN);
        // The random kill point: this sleep *is* the fault injection, not a wait.
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..700))).await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }
    let from = recorded(&record).last().map_or(0, |n| n + 1);
    let mut child = spawn_publisher(&directory, root.path(), from, from + PER_RUN);
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "final publisher run did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "final publisher run failed: {status}");
    let confirmed: HashSet<u64> = recorded(&record).into_iter().collect();
    assert!(
        confirmed.len() as u64 >= PER_RUN,
        "at least the final run is recorded"
    );
    let groups = |log: &HashMap<(String, String), Vec<u64>>, prefix: &str| -> Vec<u64> {
        log.iter()
            .filter(|((m, _), _)| m.starts_with(prefix))
            .flat_map(|(_, v)| v.iter().copied())
            .collect()
    };
    let complete = eventually(Duration::from_secs(60), || {
        let log = log.lock().expect("lock");
        ["g1-", "g2-"].iter().all(|p| {
            let got: HashSet<u64> = groups(&log, p).into_iter().collect();
            confirmed.is_subset(&got)
        })
    })
    .await;
    let log = log.lock().expect("lock");
    for prefix in ["g1-", "g2-"] {
        let all = groups(&log, prefix);
        let unique: HashSet<u64> = all.iter().copied().collect();
        let missing: Vec<u64> = confirmed.difference(&unique).copied().take(10).collect();
        eprintln!(
            "group {prefix}: {} confirmed, {} delivered, {} unique, {} duplicates, missing (first 10): {missing:?}",
            confirmed.len(),
            all.len(),
            unique.len(),
            all.len() - unique.len()
        );
    }
    // Per-key order: first deliveries of each key at each member in increasing order.
    let mut inversions = 0;
    for numbers in log.values() {
        let mut first_seen: BTreeMap<u64, usize> = BTreeMap::new();
        for (i, n) in numbers.iter().enumerate() {
            first_seen.entry(*n).or_insert(i);
        }
        let order: Vec<u64> = {
            let mut v: Vec<(usize, u64)> = first_seen.iter().map(|(n, i)| (*i, *n)).collect();
            v.sort();
            v.into_iter().map(|(_, n)| n).collect()
        };
        inversions += order.windows(2).filter(|w| w[0] > w[1]).count();
    }
    eprintln!("per-key order inversions across members: {inversions}");
    assert!(
        complete,
        "some confirmed numbers never arrived (seed {seed})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_between_sender_and_receiver_heals_without_loss_or_reorder() {
    init_logs();
    let root = tempfile::tempdir().expect("tempdir");
    let directory = Directory::builder("dir-1")
        .listen("127.0.0.1:0".parse().expect("addr"))
        .dev(root.path().join("dev-ca"))
        .start()
        .await
        .expect("directory");
    // The receiver binds a fixed port first so that the proxy can sit in front of it.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let receiver_addr = socket.local_addr().expect("addr");
    drop(socket);
    let proxy = weft_tests::UdpProxy::start(receiver_addr).await;
    let receiver = Peer::builder("receiver")
        .directory([directory.local_addr()])
        .dev_ca(root.path().join("dev-ca"))
        .data_dir(root.path().join("receiver"))
        .listen(receiver_addr)
        .advertise([proxy.addr])
        .start()
        .await
        .expect("receiver");
    let sender = Peer::builder("sender")
        .directory([directory.local_addr()])
        .dev_ca(root.path().join("dev-ca"))
        .data_dir(root.path().join("sender"))
        .ack_timeout(Duration::from_secs(3))
        .start()
        .await
        .expect("sender");
    let log: Log = Arc::default();
    let sub = receiver
        .subscribe("events")
        .group("g")
        .start()
        .await
        .expect("subscribe");
    consume("receiver".into(), sub, log.clone());
    assert!(
        eventually(Duration::from_secs(10), || !directory
            .route("events")
            .groups
            .is_empty())
        .await
    );
    let count = |log: &Log| {
        log.lock()
            .expect("lock")
            .values()
            .map(Vec::len)
            .sum::<usize>()
    };
    let publish = |range: std::ops::Range<u64>| {
        let sender = sender.clone();
        async move {
            for n in range {
                sender
                    .publish(
                        "events",
                        weft_peer::Message::new(n.to_string()).key(format!("k{}", n % 5)),
                    )
                    .await
                    .expect("publish returns: the outbox holds the message");
            }
        }
    };
    publish(0..500).await;
    assert!(
        eventually(Duration::from_secs(20), || count(&log) >= 500).await,
        "before the cut"
    );
    proxy.cut();
    publish(500..1500).await;
    // While cut, the backlog waits in the sender's outbox.
    tokio::time::sleep(Duration::from_secs(4)).await; // the partition's length: fault injection
    let during = count(&log);
    assert!(during < 1500, "nothing crosses a cut link ({during})");
    assert!(sender.outbox_stats().pending_messages > 0);
    proxy.heal();
    assert!(
        eventually(Duration::from_secs(60), || count(&log) >= 1500).await,
        "backlog drains after healing: {} of 1500",
        count(&log)
    );
    assert!(sender.drain(Duration::from_secs(20)).await);
    let log = log.lock().expect("lock");
    let all: HashSet<u64> = log.values().flatten().copied().collect();
    assert_eq!(all.len(), 1500, "nothing lost");
    for ((_, key), numbers) in log.iter() {
        assert!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "key {key} delivered out of order: {numbers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_restart_keeps_dropping_messages_it_already_acked() {
    init_logs();
    let root = tempfile::tempdir().expect("tempdir");
    let directory = Directory::builder("dir-1")
        .listen("127.0.0.1:0".parse().expect("addr"))
        .dev(root.path().join("dev-ca"))
        .grace_period(Duration::from_secs(30))
        .start()
        .await
        .expect("directory");
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let receiver_addr = socket.local_addr().expect("addr");
    drop(socket);
    let proxy = Arc::new(weft_tests::UdpProxy::start(receiver_addr).await);
    let start_receiver = || {
        Peer::builder("receiver")
            .directory([directory.local_addr()])
            .dev_ca(root.path().join("dev-ca"))
            .data_dir(root.path().join("receiver"))
            .listen(receiver_addr)
            .advertise([proxy.addr])
            .start()
    };
    let receiver = start_receiver().await.expect("receiver");
    let sender = Peer::builder("sender")
        .directory([directory.local_addr()])
        .dev_ca(root.path().join("dev-ca"))
        .data_dir(root.path().join("sender"))
        .ack_timeout(Duration::from_secs(2))
        .start()
        .await
        .expect("sender");
    let mut sub = receiver
        .subscribe("t")
        .group("g")
        .start()
        .await
        .expect("subscribe");
    assert!(
        eventually(Duration::from_secs(10), || !directory
            .route("t")
            .groups
            .is_empty())
        .await
    );
    const N: usize = 20;
    for i in 0..N {
        sender
            .publish("t", weft_peer::Message::new(i.to_string()))
            .await
            .expect("publish");
    }
    // Receive and ack everything, but cut the link first so that no ack reaches the sender.
    let mut first = Vec::new();
    while first.len() < N {
        let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .expect("delivery in time")
            .expect("open");
        first.push(d);
    }
    proxy.cut();
    for d in first {
        d.ack();
    }
    assert!(
        sender.outbox_stats().pending_messages > 0,
        "acks were cut: the sender still holds them"
    );
    drop(sub);
    receiver.close().await.expect("close");
    let receiver = start_receiver()
        .await
        .expect("receiver restarts on the same data dir");
    let mut sub = receiver
        .subscribe("t")
        .group("g")
        .start()
        .await
        .expect("subscribe again");
    proxy.heal();
    assert!(
        sender.drain(Duration::from_secs(30)).await,
        "retransmissions are acked as duplicates"
    );
    let again = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
    assert!(
        again.is_err(),
        "the application must not see an acked message again: {:?}",
        again.ok().flatten().map(|d| d.id())
    );
}
