//! In-process fabric tests over real QUIC on loopback: a directory node and several peers.

use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use weft_directory::Directory;
use weft_peer::{Durability, Message, Peer, WhenFull};
use weft_tests::{eventually, group_listed, init_logs};

struct Fabric {
    dir: tempfile::TempDir,
    directory: Directory,
}

impl Fabric {
    async fn start() -> Fabric {
        init_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let directory = Directory::builder("dir-1")
            .listen("127.0.0.1:0".parse().expect("addr"))
            .dev(dir.path().join("dev-ca"))
            .grace_period(Duration::from_millis(500))
            .start()
            .await
            .expect("directory starts");
        Fabric { dir, directory }
    }

    async fn peer(&self, name: &str) -> Peer {
        self.peer_with(name, |b| b).await
    }

    /// A peer of this fabric (5 s ack timeout), its builder adjusted by `adjust`.
    async fn peer_with(
        &self,
        name: &str,
        adjust: impl FnOnce(weft_peer::PeerBuilder) -> weft_peer::PeerBuilder,
    ) -> Peer {
        let builder = Peer::builder(name)
            .directory([self.directory.local_addr()])
            .data_dir(self.dir.path().join(name))
            .dev_ca(self.dir.path().join("dev-ca"))
            .ack_timeout(Duration::from_secs(5));
        adjust(builder).start().await.expect("peer starts")
    }

    /// A sender that redelivers after 1 s without an ack, and a receiver subscribed to
    /// topic "t" in group "g", listed in the route.
    async fn impatient_pair(
        &self,
        sender: &str,
        receiver: &str,
    ) -> (Peer, Peer, weft_peer::Subscription) {
        let sender = self
            .peer_with(sender, |b| b.ack_timeout(Duration::from_secs(1)))
            .await;
        let (receiver, sub) = self.subscribed(receiver).await;
        (sender, receiver, sub)
    }

    /// A sender publishing with `durability` whose route of topic "t" is cached (one
    /// "warm-up" message was published), and a receiver subscribed to it in group "g".
    async fn pair_with_route(
        &self,
        durability: weft_peer::Durability,
    ) -> (Peer, Peer, weft_peer::Subscription) {
        let sender = self.peer_with("sender", |b| b.durability(durability)).await;
        let (receiver, sub) = self.subscribed("receiver").await;
        sender
            .publish("t", Message::new("warm-up"))
            .await
            .expect("route known");
        (sender, receiver, sub)
    }

    /// A peer subscribed to topic "t" in group "g", listed in the route.
    async fn subscribed(&self, name: &str) -> (Peer, weft_peer::Subscription) {
        let receiver = self.peer(name).await;
        let sub = receiver
            .subscribe("t")
            .group("g")
            .start()
            .await
            .expect("subscribe");
        assert!(group_listed(&self.directory, "t").await);
        (receiver, sub)
    }
}

type Seen = Arc<Mutex<HashMap<String, Vec<u64>>>>;

/// The subscription's next delivery, within 10 s.
async fn next_delivery(sub: &mut weft_peer::Subscription) -> weft_peer::Delivery {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("delivered")
        .expect("open")
}

/// `f`'s output, or a panic after 10 s.
async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("finished within 10 s")
}

/// Consumes a subscription, recording (member → numbers) and acking everything.
fn consume(
    member: &str,
    mut sub: weft_peer::Subscription,
    seen: Seen,
) -> tokio::task::JoinHandle<()> {
    let member = member.to_string();
    tokio::spawn(async move {
        while let Some(d) = sub.next().await {
            let n: u64 = std::str::from_utf8(d.payload())
                .expect("utf8")
                .parse()
                .expect("number");
            seen.lock()
                .expect("lock")
                .entry(member.clone())
                .or_default()
                .push(n);
            d.ack();
        }
    })
}

fn total(seen: &Seen, members: &[&str]) -> usize {
    let s = seen.lock().expect("lock");
    members.iter().map(|m| s.get(*m).map_or(0, Vec::len)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_each_get_every_message_once_and_members_share() {
    let fabric = Fabric::start().await;
    let sender = fabric.peer("sender").await;
    let b1 = fabric.peer("billing-1").await;
    let b2 = fabric.peer("billing-2").await;
    let a1 = fabric.peer("analytics-1").await;
    let seen: Seen = Arc::default();
    let mut tasks = Vec::new();
    for (peer, group) in [(&b1, "billing"), (&b2, "billing"), (&a1, "analytics")] {
        let sub = peer
            .subscribe("orders")
            .group(group)
            .start()
            .await
            .expect("subscribe");
        tasks.push(consume(peer.identity(), sub, seen.clone()));
    }
    // The sender must see both billing members before publishing, so that both share.
    assert!(
        eventually(Duration::from_secs(10), || {
            let r = fabric.directory.route("orders");
            r.groups.iter().map(|g| g.members.len()).sum::<usize>() == 3
        })
        .await
    );
    const N: u64 = 10_000;
    let published = futures::stream::iter(0..N)
        .map(|i| {
            let sender = sender.clone();
            async move { sender.publish("orders", Message::new(i.to_string())).await }
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await;
    for r in &published {
        let receipt = r.as_ref().expect("publish ok");
        assert_eq!(receipt.groups, 2);
    }
    assert!(
        eventually(Duration::from_secs(60), || total(
            &seen,
            &["billing-1", "billing-2"]
        ) >= N as usize
            && total(&seen, &["analytics-1"]) >= N as usize)
        .await,
        "not everything arrived: billing {} analytics {}",
        total(&seen, &["billing-1", "billing-2"]),
        total(&seen, &["analytics-1"])
    );
    assert!(
        sender.drain(Duration::from_secs(10)).await,
        "outbox drains once all acked"
    );
    let s = seen.lock().expect("lock");
    let billing: Vec<u64> = s["billing-1"]
        .iter()
        .chain(s["billing-2"].iter())
        .copied()
        .collect();
    let unique: HashSet<u64> = billing.iter().copied().collect();
    assert_eq!(unique.len(), N as usize);
    assert_eq!(billing.len(), N as usize, "no duplicates without failures");
    assert!(
        s["billing-1"].len() > 1000 && s["billing-2"].len() > 1000,
        "members share: {} / {}",
        s["billing-1"].len(),
        s["billing-2"].len()
    );
    let analytics: HashSet<u64> = s["analytics-1"].iter().copied().collect();
    assert_eq!(analytics.len(), N as usize);
    assert_eq!(s["analytics-1"].len(), N as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_of_a_dropped_member_reach_the_other_member() {
    let fabric = Fabric::start().await;
    let sender = fabric.peer("sender").await;
    let m1 = fabric.peer("member-1").await;
    let m2 = fabric.peer("member-2").await;
    let sub1 = m1
        .subscribe("jobs")
        .group("workers")
        .credit(64)
        .start()
        .await
        .expect("sub1");
    let sub2 = m2
        .subscribe("jobs")
        .group("workers")
        .credit(64)
        .start()
        .await
        .expect("sub2");
    assert!(
        eventually(Duration::from_secs(10), || fabric
            .directory
            .route("jobs")
            .groups
            .first()
            .is_some_and(|g| g.members.len() == 2))
        .await
    );
    // member-1 acks its first 50 deliveries, then holds everything else unacked.
    let acked_by_1: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let held = Arc::new(Mutex::new(Vec::new()));
    let t1 = {
        let acked = acked_by_1.clone();
        let held = held.clone();
        let mut sub1 = sub1;
        tokio::spawn(async move {
            while let Some(d) = sub1.next().await {
                let n: u64 = std::str::from_utf8(d.payload())
                    .expect("utf8")
                    .parse()
                    .expect("n");
                let mut a = acked.lock().expect("lock");
                if a.len() < 50 {
                    a.insert(n);
                    d.ack();
                } else {
                    held.lock().expect("lock").push(d);
                }
            }
        })
    };
    let seen: Seen = Arc::default();
    let t2 = consume("member-2", sub2, seen.clone());
    const N: u64 = 2_000;
    // Distinct keys spread the messages over both members by rendezvous hashing, so
    // member-1 gets its share whatever the timing (without keys the sender prefers the
    // member with the most free credit, and a loaded machine may give member-1 none).
    for i in 0..N {
        sender
            .publish("jobs", Message::new(i.to_string()).key(format!("k{i}")))
            .await
            .expect("publish");
    }
    assert!(
        eventually(Duration::from_secs(20), || held.lock().expect("lock").len()
            >= 10)
        .await,
        "member-1 should hold some unacked deliveries"
    );
    // member-1 dies with deliveries in hand.
    t1.abort();
    m1.close().await.expect("close m1");
    let acked_1 = acked_by_1.lock().expect("lock").clone();
    assert!(
        eventually(Duration::from_secs(30), || {
            let s = seen.lock().expect("lock");
            let got: HashSet<u64> = s
                .get("member-2")
                .into_iter()
                .flatten()
                .copied()
                .chain(acked_1.iter().copied())
                .collect();
            got.len() == N as usize
        })
        .await,
        "every message reaches the group: member-2 got {}, member-1 acked {}",
        total(&seen, &["member-2"]),
        acked_1.len()
    );
    assert!(sender.drain(Duration::from_secs(10)).await);
    t2.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_from_a_foreign_ca_is_refused_by_directory_and_peers() {
    let fabric = Fabric::start().await;
    let honest = fabric.peer("honest").await;
    let _sub = honest
        .subscribe("orders")
        .group("g")
        .start()
        .await
        .expect("subscribe");
    let foreign = tempfile::tempdir().expect("tempdir");
    let intruder = Peer::builder("intruder")
        .directory([fabric.directory.local_addr()])
        .data_dir(foreign.path().join("intruder"))
        .dev_ca(foreign.path().join("other-ca"))
        .directory_timeout(Duration::from_secs(2))
        .start()
        .await
        .expect("starts locally");
    let err = intruder
        .publish("orders", Message::new("x"))
        .await
        .expect_err("directory must refuse a foreign certificate");
    assert_eq!(
        err.kind(),
        weft_peer::ErrorKind::DirectoryUnavailable,
        "{err}"
    );
    // Direct connection to the honest peer with the foreign certificate.
    let paths = weft_proto::certs::ensure_dev(&foreign.path().join("other-ca"), "intruder", &[])
        .expect("certs");
    let creds = weft_proto::tls::Credentials::from_paths(&paths).expect("creds");
    let endpoint =
        weft_proto::tls::endpoint("127.0.0.1:0".parse().expect("addr"), &creds).expect("endpoint");
    let refused = weft_proto::tls::connect(&endpoint, honest.local_addr(), "honest").await;
    assert!(refused.is_err(), "peer must refuse a foreign certificate");
    assert!(refused.err().is_some_and(|e| e.is_auth_failure()));
    assert!(fabric
        .directory
        .route("orders")
        .groups
        .iter()
        .all(|g| g.members.iter().all(|m| m.identity != "intruder")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_dropped_without_ack_comes_back_after_the_ack_timeout() {
    let fabric = Fabric::start().await;
    let (sender, _receiver, mut sub) = fabric.impatient_pair("impatient-sender", "receiver").await;
    sender
        .publish("t", Message::new("again"))
        .await
        .expect("publish");
    let first = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("first delivery")
        .expect("open");
    let id = first.id();
    drop(first); // not acked
    let second = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("redelivered")
        .expect("open");
    assert_eq!(second.id(), id);
    second.ack();
    assert!(
        sender.drain(Duration::from_secs(10)).await,
        "settled once acked"
    );
}

/// Closing a peer ends its subscriptions: a consumer loop (`while let Some(d) =
/// sub.next().await`) finishes instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_peer_ends_its_subscription_streams() {
    let fabric = Fabric::start().await;
    let sender = fabric.peer("closing-sender").await;
    let (receiver, mut sub) = fabric.subscribed("closing-receiver").await;
    sender
        .publish("t", Message::new("before close"))
        .await
        .expect("publish");
    let d = next_delivery(&mut sub).await;
    assert_eq!(&d.payload()[..], b"before close");
    d.ack();
    let consumer = tokio::spawn(async move {
        let mut more = 0;
        while sub.next().await.is_some() {
            more += 1;
        }
        more
    });
    receiver.close().await.expect("close");
    let more = tokio::time::timeout(Duration::from_secs(10), consumer)
        .await
        .expect("the stream ends once the peer is closed")
        .expect("consumer task");
    assert_eq!(more, 0);
    let _ = sender.close().await;
}

/// Dropping the last handle of a peer stops it, and ends its subscription streams too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_peer_ends_its_subscription_streams() {
    let fabric = Fabric::start().await;
    let (receiver, mut sub) = fabric.subscribed("dropped-receiver").await;
    drop(receiver);
    let end = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("the stream ends once the peer is dropped");
    assert!(end.is_none());
}

/// `publish_batch` stores a batch as one outbox append; every message reaches every
/// group, keyed ones in publish order. A batch with an invalid message stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_batch_reaches_every_group_in_order_and_a_bad_one_stores_nothing() {
    let fabric = Fabric::start().await;
    let sender = fabric.peer("sender").await;
    let b1 = fabric.peer("billing-1").await;
    let a1 = fabric.peer("analytics-1").await;
    let seen: Seen = Arc::default();
    for (peer, group) in [(&b1, "billing"), (&a1, "analytics")] {
        let sub = peer
            .subscribe("orders")
            .group(group)
            .start()
            .await
            .expect("subscribe");
        consume(peer.identity(), sub, seen.clone());
    }
    assert!(
        eventually(Duration::from_secs(10), || fabric
            .directory
            .route("orders")
            .groups
            .len()
            == 2)
        .await
    );
    const N: u64 = 2_000;
    for chunk in (0..N).collect::<Vec<_>>().chunks(500) {
        let messages = chunk
            .iter()
            .map(|n| Message::new(n.to_string()).key("one-key"));
        let receipts = sender
            .publish_batch("orders", messages)
            .await
            .expect("batch");
        assert_eq!(receipts.len(), chunk.len());
        assert!(receipts.windows(2).all(|w| w[1].id.seq == w[0].id.seq + 1));
        assert!(receipts.iter().all(|r| r.groups == 2));
    }
    // One oversized message fails the whole batch, before anything is stored.
    let pending_before = sender.outbox_stats().pending_messages;
    let bad = vec![
        Message::new("fine"),
        Message::new(vec![0u8; weft_peer::DEFAULT_MAX_MESSAGE + 1]),
    ];
    let e = sender
        .publish_batch("orders", bad)
        .await
        .expect_err("oversized message in the batch");
    assert_eq!(e.kind(), weft_peer::ErrorKind::TooLarge);
    assert!(sender.outbox_stats().pending_messages <= pending_before);
    assert!(
        eventually(Duration::from_secs(30), || total(
            &seen,
            &["billing-1", "analytics-1"]
        ) == 2 * N as usize)
        .await
    );
    assert!(sender.drain(Duration::from_secs(10)).await);
    let s = seen.lock().expect("lock");
    for member in ["billing-1", "analytics-1"] {
        assert_eq!(
            s[member],
            (0..N).collect::<Vec<_>>(),
            "{member}: every message once, in publish order"
        );
    }
}

/// `recv_many` takes deliveries in batches and `Delivery::ack_all` settles them all; a
/// batch dropped without an ack comes back whole after the ack timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_taken_in_batches_are_acked_together_and_an_unacked_batch_comes_back() {
    let fabric = Fabric::start().await;
    let (sender, _receiver, mut sub) = fabric
        .impatient_pair("batch-sender", "batch-receiver")
        .await;
    const N: usize = 300;
    sender
        .publish_batch("t", (0..N).map(|n| Message::new(n.to_string())))
        .await
        .expect("publish");
    let first = take_batches(&mut sub, N).await;
    let ids: Vec<_> = first.iter().map(|d| d.id()).collect();
    drop(first); // none acked: all of them come back
    let again = take_batches(&mut sub, N).await;
    assert_eq!(again.iter().map(|d| d.id()).collect::<Vec<_>>(), ids);
    weft_peer::Delivery::ack_all(again);
    assert!(
        sender.drain(Duration::from_secs(10)).await,
        "settled once acked"
    );
    let mut none = Vec::new();
    assert_eq!(
        sub.recv_many(&mut none, 0).await,
        0,
        "a zero limit takes nothing"
    );
}

/// Takes `n` deliveries with `recv_many`, at most 64 at a time.
async fn take_batches(sub: &mut weft_peer::Subscription, n: usize) -> Vec<weft_peer::Delivery> {
    let mut got = Vec::new();
    while got.len() < n {
        let before = got.len();
        let taken = tokio::time::timeout(Duration::from_secs(10), sub.recv_many(&mut got, 64))
            .await
            .expect("deliveries in time");
        assert!(
            taken > 0 && taken <= 64 && got.len() == before + taken,
            "{taken} taken"
        );
    }
    got
}

/// Publishes `limit` messages of `durability` from a sender whose outbox `limit_outbox`
/// sets up, and holds them unacked at the receiver; then checks that the next publish
/// with `WhenFull::Fail` fails with `full_text` in its message, runs `while_full`, and
/// checks that one with `WhenFull::Wait` waits until the held ones are acked and is
/// then delivered.
async fn publish_waits_or_fails_past_a_limit<W, Fut>(
    durability: weft_peer::Durability,
    limit: usize,
    limit_outbox: impl FnOnce(weft_peer::PeerBuilder) -> weft_peer::PeerBuilder,
    full_text: &str,
    while_full: W,
) where
    W: FnOnce(Peer) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use weft_peer::{ErrorKind, WhenFull};
    let fabric = Fabric::start().await;
    let (_receiver, mut sub) = fabric.subscribed("receiver").await;
    let sender = fabric.peer_with("sender", limit_outbox).await;
    let publish = |n: usize, when_full| {
        sender.publish_with("t", Message::new(n.to_string()), durability, when_full)
    };
    for n in 0..limit {
        publish(n, WhenFull::Fail).await.expect("under the limit");
    }
    let held = take_batches(&mut sub, limit).await;
    let e = publish(limit, WhenFull::Fail)
        .await
        .expect_err("every message the limit allows is still unacked");
    assert_eq!(e.kind(), ErrorKind::OutboxFull, "{e}");
    assert!(e.to_string().contains(full_text), "{e}");
    while_full(sender.clone()).await;

    let waiting = publish(limit, WhenFull::Wait);
    tokio::pin!(waiting);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut waiting)
            .await
            .is_err(),
        "waits while the limit is full"
    );
    weft_peer::Delivery::ack_all(held);
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("goes in once acks free room")
        .expect("publish");
    // Delivered after whatever `while_full` published.
    let want = limit.to_string();
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|d: &weft_peer::Delivery| d.payload()[..] == *want.as_bytes())
    {
        assert!(seen.len() < 8, "the waiting publish was not delivered");
        seen.extend(take_batches(&mut sub, 1).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_messages_unacked_past_the_memory_limit_make_publish_wait_or_fail() {
    use weft_peer::{Durability, WhenFull};
    publish_waits_or_fails_past_a_limit(
        Durability::Memory,
        50,
        |b| {
            b.outbox(|mut c| {
                c.max_memory_messages = 50;
                c
            })
        },
        "max_memory_messages",
        |sender| async move {
            // A disk message is not held in memory: the quota still has room for it.
            sender
                .publish_with("t", Message::new("disk"), Durability::Disk, WhenFull::Fail)
                .await
                .expect("disk publish");
        },
    )
    .await;
}

/// A disk publish takes the outbox's quick path while the quota has room and falls back
/// to waiting or failing once it is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_messages_unacked_past_the_quota_make_publish_wait_or_fail() {
    publish_waits_or_fails_past_a_limit(
        weft_peer::Durability::Disk,
        40,
        |b| {
            b.outbox(|mut c| {
                c.max_messages = 40;
                c
            })
        },
        "40/40 messages",
        |_| async {},
    )
    .await;
}

/// Large `Memory` payloads are kept as the application's buffer behind their record's
/// head (not copied into it) and sent as they are: each arrives byte for byte with its
/// key, tags and headers, from single publishes and from a batch that mixes them with
/// small messages, and the outbox drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_memory_payloads_arrive_intact_with_their_metadata() {
    let fabric = Fabric::start().await;
    let sender = fabric
        .peer_with("memory-sender", |b| {
            b.durability(weft_peer::Durability::Memory)
        })
        .await;
    let (_receiver, mut sub) = fabric.subscribed("receiver").await;
    // Distinct bytes per message, so that a payload cut, shifted or swapped shows.
    let payload =
        |n: usize, len: usize| -> Vec<u8> { (0..len).map(|i| (i * 31 + n * 7) as u8).collect() };
    let sizes = [20_000, 8 * 1024, 8 * 1024 - 1, 100, 300_000];
    for (n, &len) in sizes.iter().enumerate() {
        let m = Message::new(payload(n, len))
            .key(format!("k{n}"))
            .tag("large")
            .header("n", n.to_string());
        sender.publish("t", m).await.expect("publish");
    }
    let batch = sizes.iter().enumerate().map(|(n, &len)| {
        let n = n + sizes.len();
        Message::new(payload(n, len)).header("n", n.to_string())
    });
    sender.publish_batch("t", batch).await.expect("batch");
    let mut got = HashSet::new();
    while got.len() < 2 * sizes.len() {
        let d = next_delivery(&mut sub).await;
        let n: usize = d.headers()[0].1.parse().expect("number");
        let len = sizes[n % sizes.len()];
        assert_eq!(&d.payload()[..], &payload(n, len)[..], "message {n}");
        if n < sizes.len() {
            assert_eq!(d.key(), Some(format!("k{n}").as_str()));
            assert_eq!(d.tags(), ["large".to_string()]);
        } else {
            assert_eq!(d.key(), None);
        }
        assert!(got.insert(n), "message {n} delivered twice");
        d.ack();
    }
    assert!(sender.drain(Duration::from_secs(10)).await, "all settled");
}

/// A disk publish whose caller stops waiting while the outbox writer commits it (here
/// after its first poll) is still delivered, once, with its key: the stored message is
/// handed to the dispatcher from a task of its own instead of waiting for a restart.
/// A publish dropped before it reached the writer stored nothing and is not delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_disk_publish_is_still_delivered_once() {
    let fabric = Fabric::start().await;
    let (sender, _receiver, mut sub) = fabric.pair_with_route(weft_peer::Durability::Disk).await;
    let mut abandoned = 0;
    for n in 0..20 {
        let publish = sender.publish("t", Message::new(format!("m{n}")).key(format!("k{n}")));
        // Polled once, then dropped: the commit (an fdatasync) is still under way.
        if futures::FutureExt::now_or_never(publish).is_none() {
            abandoned += 1;
        }
    }
    assert!(abandoned > 0, "no publish was left waiting on its commit");
    let never = sender.publish("t", Message::new("never polled"));
    drop(never);
    let mut got = HashSet::new();
    while got.len() < 21 {
        let d = next_delivery(&mut sub).await;
        let body = String::from_utf8(d.payload().to_vec()).expect("utf-8");
        if let Some(n) = body.strip_prefix('m') {
            assert_eq!(d.key(), Some(format!("k{n}").as_str()), "{body}");
        }
        assert!(got.insert(body.clone()), "{body} delivered twice");
        d.ack();
    }
    assert!(sender.drain(Duration::from_secs(10)).await, "all settled");
    let late = tokio::time::timeout(Duration::from_millis(200), sub.next()).await;
    assert!(
        late.is_err(),
        "a publish never polled was delivered: {late:?}"
    );
}

/// `submit` pipelines `Disk` publishes: receipts resolve in publish order, a receipt
/// dropped unawaited does not hold its message back, and every message arrives once, in
/// publish order. An oversized message fails at `submit` and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_submits_are_stored_in_order_and_delivered_awaited_or_not() {
    let fabric = Fabric::start().await;
    let (sender, _receiver, mut sub) = fabric.pair_with_route(weft_peer::Durability::Disk).await;
    let warm_up = next_delivery(&mut sub).await;
    assert_eq!(warm_up.payload(), "warm-up".as_bytes());
    warm_up.ack();
    let seen: Seen = Arc::default();
    consume("receiver", sub, seen.clone());
    const N: u64 = 3_000;
    let mut in_flight = std::collections::VecDeque::new();
    // Sequence number by message number, of every receipt awaited.
    let mut seqs = std::collections::BTreeMap::new();
    for n in 0..N {
        if in_flight.len() == 256 {
            let (m, oldest): (u64, weft_peer::PendingReceipt) =
                in_flight.pop_front().expect("256 queued");
            seqs.insert(m, within(oldest).await.expect("stored").id.seq);
        }
        let message = Message::new(n.to_string()).key("one-key");
        // Now and then a `Confirmed` submit, which goes to the writer on its own,
        // between the gathered `Disk` ones: the open gathering is sealed before it, so
        // that no later submit joins it and gets an earlier sequence number.
        let durability = match n % 500 {
            250 => Durability::Confirmed,
            _ => Durability::Disk,
        };
        let receipt = sender.submit_with("t", message, durability, WhenFull::Wait);
        let receipt = within(receipt).await.expect("submitted");
        // Every tenth receipt is dropped unawaited.
        if n % 10 != 9 {
            in_flight.push_back((n, receipt));
        }
    }
    for (m, receipt) in in_flight {
        seqs.insert(m, within(receipt).await.expect("stored").id.seq);
    }
    assert_eq!(seqs.len() as u64, N - N / 10);
    let in_publish_order: Vec<u64> = seqs.into_values().collect();
    assert!(
        in_publish_order.windows(2).all(|w| w[0] < w[1]),
        "sequence numbers in publish order"
    );
    assert!(
        eventually(Duration::from_secs(30), || total(&seen, &["receiver"])
            == N as usize)
        .await,
        "every message delivered"
    );
    assert_eq!(
        seen.lock().expect("lock")["receiver"],
        (0..N).collect::<Vec<_>>(),
        "every message once, in publish order"
    );
    assert!(sender.drain(Duration::from_secs(10)).await, "all settled");

    let pending = sender.outbox_stats().pending_messages;
    let oversized = Message::new(vec![0u8; weft_peer::DEFAULT_MAX_MESSAGE + 1]);
    let e = sender.submit("t", oversized).await.expect_err("too large");
    assert_eq!(e.kind(), weft_peer::ErrorKind::TooLarge);
    assert_eq!(sender.outbox_stats().pending_messages, pending);
}

/// Publishes that miss the route cache at once (the first burst to a new topic) share
/// one directory lookup instead of sending one `Watch` each, and all of them are
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_to_a_new_topic_share_one_directory_lookup() {
    let fabric = Fabric::start().await;
    let (_receiver, mut sub) = fabric.subscribed("receiver").await;
    let sender = fabric.peer("sender").await;
    let before = fabric.directory.requests_answered();
    let publishes = (0..100).map(|n| sender.publish("t", Message::new(format!("m{n}"))));
    for receipt in futures::future::join_all(publishes).await {
        assert_eq!(receipt.expect("published").groups, 1);
    }
    let lookups = fabric.directory.requests_answered() - before;
    // One lookup; a second only if the run outlasted the client's 3 s resync of its
    // watched topics.
    assert!(
        (1..=2).contains(&lookups),
        "{lookups} directory requests for 100 publishes"
    );
    let mut got = HashSet::new();
    while got.len() < 100 {
        let d = next_delivery(&mut sub).await;
        assert!(got.insert(d.payload().clone()), "delivered twice");
        d.ack();
    }
}

/// When the directory does not answer, every publish waiting on the shared lookup
/// fails with `DirectoryUnavailable`; the failure is not remembered: once a node
/// listens at the address, the next publish looks the route up again and goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_lookup_fails_every_waiting_publish_and_the_next_one_asks_again() {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = weft_tests::free_udp_addr();
    let ca = dir.path().join("dev-ca");
    let sender = Peer::builder("sender")
        .directory([addr])
        .data_dir(dir.path().join("sender"))
        .dev_ca(&ca)
        .directory_timeout(Duration::from_millis(300))
        .start()
        .await
        .expect("a peer starts without its directory");
    let publishes = (0..20).map(|n| sender.publish("t", Message::new(format!("m{n}"))));
    for result in futures::future::join_all(publishes).await {
        let e = result.expect_err("no directory");
        assert_eq!(e.kind(), weft_peer::ErrorKind::DirectoryUnavailable, "{e}");
    }
    let directory = Directory::builder("dir-1")
        .listen(addr)
        .dev(&ca)
        .start()
        .await
        .expect("directory starts");
    let receipt = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            // The client reconnects with a backoff: the first tries may still time out.
            match sender.publish("t", Message::new("late")).await {
                Ok(receipt) => return receipt,
                Err(e) => assert_eq!(e.kind(), weft_peer::ErrorKind::DirectoryUnavailable),
            }
        }
    })
    .await
    .expect("published once the directory is up");
    assert_eq!(receipt.groups, 0, "no group subscribed to t");
    assert!(directory.requests_answered() >= 1);
}

/// A peer's tasks run on the runtime it was started on, not on the caller's: disk
/// publishes abandoned on another runtime (here a thread's own, dropped as soon as
/// they were polled once) are still handed to the dispatcher once stored, and
/// delivered, after that runtime is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_abandoned_on_another_runtime_are_delivered_after_it_ends() {
    let fabric = Fabric::start().await;
    let (sender, _receiver, mut sub) = fabric.pair_with_route(weft_peer::Durability::Disk).await;
    let publisher = sender.clone();
    let abandoned = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _entered = runtime.enter();
        (0..20)
            .filter(|n| {
                let publish = publisher.publish("t", Message::new(format!("m{n}")));
                futures::FutureExt::now_or_never(publish).is_none()
            })
            .count()
    })
    .join()
    .expect("publishing thread");
    assert!(abandoned > 0, "no publish was left waiting on its commit");
    let mut got = HashSet::new();
    while got.len() < 21 {
        let d = next_delivery(&mut sub).await;
        let body = String::from_utf8(d.payload().to_vec()).expect("utf-8");
        assert!(got.insert(body.clone()), "{body} delivered twice");
        d.ack();
    }
    assert!(sender.drain(Duration::from_secs(10)).await, "all settled");
}

/// A loop of publishes that never wait for room still lets the other tasks of its
/// thread run (the peer's links, which send the messages, are such tasks): a task
/// that counts its turns gets one at least every 2,048 messages or so, published one
/// at a time or in batches.
#[tokio::test(flavor = "current_thread")]
async fn a_publish_loop_that_never_waits_lets_other_tasks_run() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let fabric = Fabric::start().await;
    let (sender, _receiver, _sub) = fabric.pair_with_route(weft_peer::Durability::Memory).await;
    let (turns, done) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let counter = {
        let (turns, done) = (turns.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                turns.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        })
    };
    // Messages published since the counter's last turn, and the most seen.
    let (mut last_turn, mut since_turn, mut longest) = (0, 0usize, 0usize);
    let mut published = |messages: usize| {
        let turn = turns.load(Ordering::Relaxed);
        if turn == last_turn {
            since_turn += messages;
        } else {
            (last_turn, since_turn) = (turn, messages);
        }
        longest = longest.max(since_turn);
    };
    for _ in 0..12_000 {
        sender
            .publish("t", Message::new("m"))
            .await
            .expect("published");
        published(1);
    }
    for _ in 0..200 {
        let batch = (0..64).map(|_| Message::new("b"));
        sender.publish_batch("t", batch).await.expect("published");
        published(64);
    }
    done.store(true, Ordering::Relaxed);
    counter.await.expect("counter");
    assert!(
        longest <= 2_048 + 64,
        "{longest} messages in a row without the other task running"
    );
}
