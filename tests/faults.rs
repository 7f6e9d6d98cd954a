//! Fault tests with real processes killed by SIGKILL and real files.

use futures::StreamExt;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weft_directory::Directory;
use weft_peer::Peer;
use weft_tests::{binary, eventually, group_listed, init_logs};

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
    let receiver_addr = weft_tests::free_udp_addr();
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
    assert!(group_listed(&directory, "events").await);
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
    let receiver_addr = weft_tests::free_udp_addr();
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
    assert!(group_listed(&directory, "t").await);
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

/// How the torn-tail test damages the last outbox segment of the stopped sender.
#[derive(Debug, Clone, Copy)]
enum TailDamage {
    /// Cut the file in the middle of a message record (a torn write): that record and
    /// every one after it are lost.
    TruncateMidRecord,
    /// Overwrite bytes in the middle of the last record, so that its CRC fails, and
    /// drop the End record after it: a torn write of the last commit.
    CorruptLastRecord,
    /// Garbage where the End record after the last record was: a frame header claiming
    /// more bytes than follow it, as a write that never completed leaves.
    AppendGarbage,
}

/// One frame of a clean segment: where it starts and ends, and the message sequence
/// number if it is a message record.
struct SegmentFrame {
    offset: u64,
    end: u64,
    seq: Option<u64>,
}

/// The frames of segment `id` and the offset of its End record (where the data ends).
fn segment_frames(data: &[u8], id: u64) -> (Vec<SegmentFrame>, u64) {
    use weft_peer::outbox::record::{Record, FRAME_HEADER};
    use weft_peer::outbox::segment::{scan, Scanned};
    let mut frames = Vec::new();
    for s in scan(&bytes::Bytes::copy_from_slice(data), id) {
        match s {
            Scanned::Record {
                offset,
                len,
                record,
            } => frames.push(SegmentFrame {
                offset,
                end: offset + FRAME_HEADER as u64 + u64::from(len),
                seq: match record {
                    Record::Message { seq, .. } => Some(seq),
                    _ => None,
                },
            }),
            Scanned::End { offset } => return (frames, offset),
            other => panic!("the segment of a cleanly closed sender is intact: {other:?}"),
        }
    }
    panic!("the segment of a cleanly closed sender ends with an End record")
}

/// Issue 4: a torn or corrupt tail of a stopped sender's outbox. The sender recovers,
/// reports the damage through `Peer::outbox_recovery`, and delivers exactly the messages
/// whose records lie entirely before the damage (nothing lost before it, nothing made
/// up after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_outbox_tail_recovers_reports_and_loses_nothing_before_the_damage() {
    init_logs();
    for damage in [
        TailDamage::TruncateMidRecord,
        TailDamage::CorruptLastRecord,
        TailDamage::AppendGarbage,
    ] {
        torn_tail_case(damage).await;
    }
}

async fn torn_tail_case(damage: TailDamage) {
    const TOPIC: &str = "torn";
    const N: u64 = 40;
    let root = tempfile::tempdir().expect("tempdir");
    // A long grace period keeps the stopped member registered: the group stays in the
    // route, so the sender's messages target it and wait in the outbox.
    let directory = Directory::builder("dir-1")
        .listen("127.0.0.1:0".parse().expect("addr"))
        .dev(root.path().join("dev-ca"))
        .grace_period(Duration::from_secs(120))
        .start()
        .await
        .expect("directory");
    // The member comes back on the same address, as a restarted service would.
    let member_addr = weft_tests::free_udp_addr();
    let start_member = || {
        Peer::builder("member")
            .directory([directory.local_addr()])
            .dev_ca(root.path().join("dev-ca"))
            .data_dir(root.path().join("member"))
            .listen(member_addr)
            .start()
    };
    let start_sender = || {
        Peer::builder("sender")
            .directory([directory.local_addr()])
            .dev_ca(root.path().join("dev-ca"))
            .data_dir(root.path().join("sender"))
            .durability(weft_peer::Durability::Disk)
            .ack_timeout(Duration::from_secs(2))
            .start()
    };
    let group_members = |directory: &Directory| {
        directory
            .route(TOPIC)
            .groups
            .iter()
            .find(|g| g.group == "g")
            .map(|g| g.members.len())
    };

    // The group "g" is registered, then its only member stops.
    let member = start_member().await.expect("member");
    let sub = member
        .subscribe(TOPIC)
        .group("g")
        .start()
        .await
        .expect("subscribe");
    assert!(
        eventually(Duration::from_secs(10), || group_members(&directory)
            == Some(1))
        .await,
        "{damage:?}: member registered"
    );
    // Close before dropping the subscription, so that it is not unregistered.
    member.close().await.expect("close member");
    drop(sub);
    assert_eq!(
        group_members(&directory),
        Some(1),
        "{damage:?}: the stopped member stays registered for the grace period"
    );

    // The sender publishes N numbered messages; with no live member they stay pending.
    let sender = start_sender().await.expect("sender");
    let mut number_of_seq = HashMap::new();
    for n in 0..N {
        let receipt = sender
            .publish(TOPIC, weft_peer::Message::new(n.to_string()))
            .await
            .expect("publish");
        assert_eq!(receipt.groups, 1, "{damage:?}: addressed to group g");
        number_of_seq.insert(receipt.id.seq, n);
    }
    assert_eq!(sender.outbox_stats().pending_messages, N);
    assert!(sender.outbox_recovery().damage.is_empty());
    sender.close().await.expect("close sender");

    // Damage the last segment of the stopped sender's outbox.
    let outbox_dir = root.path().join("sender").join("outbox");
    let last = *weft_peer::outbox::segment::list(&outbox_dir)
        .expect("list segments")
        .last()
        .expect("a segment");
    let path = weft_peer::outbox::segment::path(&outbox_dir, last);
    let mut data = std::fs::read(&path).expect("read segment");
    let (frames, data_end) = segment_frames(&data, last);
    let messages: Vec<&SegmentFrame> = frames.iter().filter(|f| f.seq.is_some()).collect();
    assert_eq!(
        messages.len() as u64,
        N,
        "{damage:?}: every message is in the last segment"
    );
    let damage_at = match damage {
        TailDamage::TruncateMidRecord => {
            let victim = messages[messages.len() / 2];
            let cut = victim.offset + (victim.end - victim.offset) / 2;
            data.truncate(cut as usize);
            victim.offset
        }
        TailDamage::CorruptLastRecord => {
            let victim = frames.last().expect("frames");
            assert!(
                victim.seq.is_some(),
                "{damage:?}: the last frame is a message"
            );
            let middle = ((victim.offset + victim.end) / 2) as usize;
            for b in &mut data[middle - 2..middle + 2] {
                *b ^= 0xff;
            }
            data.truncate(data_end as usize);
            victim.offset
        }
        TailDamage::AppendGarbage => {
            data.truncate(data_end as usize);
            data.extend_from_slice(&1000u32.to_le_bytes());
            data.extend_from_slice(&0xdead_beef_u32.to_le_bytes());
            data.extend_from_slice(&[0xab; 29]);
            data_end
        }
    };
    std::fs::write(&path, &data).expect("write damaged segment");
    // Exactly the messages whose records lie entirely before the damage survive.
    let expected: HashSet<u64> = messages
        .iter()
        .filter(|f| f.end <= damage_at)
        .map(|f| number_of_seq[&f.seq.expect("message")])
        .collect();
    let lost = N - expected.len() as u64;
    match damage {
        TailDamage::TruncateMidRecord => assert_eq!(lost, N - N / 2),
        TailDamage::CorruptLastRecord => assert_eq!(lost, 1),
        TailDamage::AppendGarbage => assert_eq!(lost, 0),
    }

    // Restart: recovery truncates the tail and reports it.
    let sender = start_sender()
        .await
        .expect("sender restarts on the damaged outbox");
    let report = sender.outbox_recovery().clone();
    assert_eq!(
        report.pending_messages,
        expected.len() as u64,
        "{damage:?}: pending after recovery: {report:?}"
    );
    assert_eq!(report.damage.len(), 1, "{damage:?}: {report:?}");
    assert_eq!(report.damage[0].segment, path, "{damage:?}: {report:?}");
    assert_eq!(report.damage[0].offset, damage_at, "{damage:?}: {report:?}");
    assert!(
        report.damage[0].reason.contains("torn tail"),
        "{damage:?}: {report:?}"
    );
    assert_eq!(
        std::fs::metadata(&path).expect("segment kept").len(),
        damage_at,
        "{damage:?}: the segment is truncated where the damage starts"
    );
    assert_eq!(
        sender.outbox_stats().pending_messages,
        expected.len() as u64
    );

    // A member of the group comes back and gets exactly the surviving messages.
    let member = start_member().await.expect("member restarts");
    let mut sub = member
        .subscribe(TOPIC)
        .group("g")
        .start()
        .await
        .expect("subscribe again");
    let mut received = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.len() < expected.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let d = tokio::time::timeout(left, sub.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{damage:?}: {} of {} surviving messages delivered in time",
                    received.len(),
                    expected.len()
                )
            })
            .expect("subscription open");
        let n: u64 = std::str::from_utf8(d.payload())
            .expect("utf8")
            .parse()
            .expect("a number");
        assert_eq!(
            number_of_seq.get(&d.id().seq),
            Some(&n),
            "{damage:?}: delivered message {} is one the sender published",
            d.id()
        );
        assert!(
            expected.contains(&n),
            "{damage:?}: message {n} lay (partly) after the damage and must not come back"
        );
        received.insert(n);
        d.ack();
    }
    assert_eq!(received, expected, "{damage:?}");
    assert!(
        sender.drain(Duration::from_secs(20)).await,
        "{damage:?}: every surviving message is acked and leaves the outbox"
    );
    let extra = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
    assert!(
        extra.is_err(),
        "{damage:?}: nothing else is delivered: {:?}",
        extra.ok().flatten().map(|d| d.id())
    );
    drop(sub);
    sender.close().await.expect("close sender");
    member.close().await.expect("close member");
}
