//! The directory as a cluster of real `weft-directory` processes, killed with SIGKILL,
//! while peers keep delivering.
//!
//! - `a_subscriber_whose_directory_node_dies_moves_and_nothing_is_lost`: the node a
//!   subscriber is attached to dies; the subscriber moves to another node (proved by the
//!   surviving nodes' routes) while the sender's cached route never loses it and nothing
//!   is lost.
//! - `a_directory_node_restarted_at_once_keeps_its_peers_in_routes`: the same, but the
//!   node comes back at once as a new generation; its old generation's registrations
//!   stay in the other nodes' routes until the subscriber has moved.
//! - `directory_nodes_die_and_delivery_goes_on`: every node dies during a running flow,
//!   which goes on on cached routes; then the directory comes back and a new subscriber
//!   becomes visible.
//! - `with_no_directory_a_dead_member_s_messages_go_to_the_other_one`: with every
//!   directory node dead, one of two `weft sub` processes of a group is killed; the
//!   sender reroutes everything to the other one from the connection failure alone.

use futures::StreamExt;
use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weft_peer::{Message, Peer};
use weft_proto::tls::MAX_IDLE_TIMEOUT;
use weft_proto::wire::{Member, Route};
use weft_tests::{binary, eventually, free_udp_addr, init_logs, ChildProcess};

struct Node {
    child: Child,
    args: Vec<String>,
    /// The node's log (stderr), kept across restarts.
    log: std::path::PathBuf,
}

impl Node {
    fn start(
        name: &str,
        ca: &std::path::Path,
        gossip: SocketAddr,
        seeds: &[SocketAddr],
        listen: SocketAddr,
        extra: &[&str],
    ) -> Node {
        let mut args = vec![
            "--dev".to_string(),
            "--dev-ca".into(),
            ca.display().to_string(),
            "--name".into(),
            name.into(),
            "--listen".into(),
            listen.to_string(),
            "--grace-period-ms".into(),
            "1000".into(),
            "--gossip-listen".into(),
            gossip.to_string(),
        ];
        for s in seeds {
            args.push("--seed".into());
            args.push(s.to_string());
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let log = ca.with_file_name(format!("{name}.log"));
        let child = Node::spawn(&args, &log);
        Node { child, args, log }
    }

    fn spawn(args: &[String], log: &std::path::Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("directory log file");
        Command::new(binary("weft-directory"))
            .args(args)
            // Plain `peer attached peer=NAME` lines, whatever RUST_LOG the test runs with.
            .env("RUST_LOG", "warn,weft_directory=info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn weft-directory")
    }

    /// How many times the node logged that the peer `identity` attached to it.
    fn attachments(&self, identity: &str) -> usize {
        let field = format!("peer={identity} ");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("peer attached") && l.contains(&field))
            .count()
    }

    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    fn restart(&mut self) {
        self.child = Node::spawn(&self.args, &self.log);
    }

    /// Restarts the node (a new chitchat generation under the same name and gossip
    /// address) listening for peers on `listen` instead.
    fn restart_listening_on(&mut self, listen: SocketAddr) {
        if let Some(i) = self.args.iter().position(|a| a == "--listen") {
            self.args[i + 1] = listen.to_string();
        }
        self.restart();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three `weft-directory` processes gossiping in a ring of seeds, sharing one dev CA.
fn three_nodes(root: &std::path::Path) -> (Vec<Node>, Vec<SocketAddr>) {
    three_nodes_with(root, &[])
}

/// [`three_nodes`] with `extra` arguments for every node.
fn three_nodes_with(root: &std::path::Path, extra: &[&str]) -> (Vec<Node>, Vec<SocketAddr>) {
    let ca = root.join("dev-ca");
    // Create the dev CA once, before three processes race for it.
    weft_proto::certs::ensure_dev(&ca, "bootstrap", &[]).expect("dev CA");
    let gossip: Vec<SocketAddr> = (0..3).map(|_| free_udp_addr()).collect();
    let listen: Vec<SocketAddr> = (0..3).map(|_| free_udp_addr()).collect();
    let nodes = (0..3)
        .map(|i| {
            Node::start(
                &format!("dir-{i}"),
                &ca,
                gossip[i],
                &[gossip[(i + 1) % 3]],
                listen[i],
                extra,
            )
        })
        .collect();
    (nodes, listen)
}

async fn peer(root: &std::path::Path, name: &str, directories: &[SocketAddr]) -> Peer {
    Peer::builder(name)
        .directory(directories.iter().copied())
        .dev_ca(root.join("dev-ca"))
        .data_dir(root.join(name))
        .ack_timeout(Duration::from_secs(3))
        .directory_timeout(Duration::from_secs(20))
        .start()
        .await
        .expect("peer starts")
}

/// Polls the async `check` every 20 ms until it holds or `timeout` passes.
async fn until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `identity` as a member of `group` in `route`, if listed there.
fn member<'a>(route: &'a Route, group: &str, identity: &str) -> Option<&'a Member> {
    route
        .groups
        .iter()
        .find(|g| g.group == group)
        .and_then(|g| g.members.iter().find(|m| m.identity == identity))
}

/// `identity` as a member of `group` in `peer`'s route of `topic` (cached, or resolved).
async fn member_of(peer: &Peer, topic: &str, group: &str, identity: &str) -> Option<Member> {
    let route = peer.route(topic).await.ok()?;
    member(&route, group, identity).cloned()
}

type Got = Arc<Mutex<Vec<u64>>>;

fn consume(mut sub: weft_peer::Subscription, got: Got) {
    tokio::spawn(async move {
        while let Some(d) = sub.next().await {
            let n = std::str::from_utf8(d.payload())
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(u64::MAX);
            got.lock().expect("lock").push(n);
            d.ack();
        }
    });
}

/// Numbers of `expected` that `got` lacks.
fn missing(got: &Got, expected: &BTreeSet<u64>) -> Vec<u64> {
    let got: HashSet<u64> = got.lock().expect("lock").iter().copied().collect();
    expected
        .iter()
        .filter(|n| !got.contains(n))
        .copied()
        .collect()
}

/// Bounds of the background loops.
const FLOW_MAX_MESSAGES: u64 = 50_000;
const FLOW_MAX_SPAN: Duration = Duration::from_secs(90);
const WATCH_MAX_SPAN: Duration = Duration::from_secs(120);

/// A publisher publishing numbers (`first`, `first + 1`...) about every 2 ms in the
/// background, with every other message keyed (16 keys) when `keyed`.
struct Flow {
    stop: Arc<AtomicBool>,
    /// The next number to publish: every number at or above it starts after this read.
    next: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<BTreeSet<u64>>,
}

impl Flow {
    fn start(sender: &Peer, topic: &'static str, first: u64, keyed: bool) -> Flow {
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicU64::new(first));
        let (sender, stopped, counter) = (sender.clone(), stop.clone(), next.clone());
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut published = BTreeSet::new();
            while !stopped.load(Ordering::Relaxed)
                && published.len() < FLOW_MAX_MESSAGES as usize
                && started.elapsed() < FLOW_MAX_SPAN
            {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let mut message = Message::new(n.to_string());
                if keyed && n.is_multiple_of(2) {
                    message = message.key(format!("k{}", n % 16));
                }
                sender.publish(topic, message).await.expect("publish");
                published.insert(n);
                // Pacing, so that the flow spans the whole phase at a modest rate.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            published
        });
        Flow { stop, next, task }
    }

    /// Every number from this one on is published after the call.
    fn next(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }

    /// Stops publishing; returns the numbers published.
    async fn stop(self) -> BTreeSet<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("publisher task")
    }
}

/// Polls `peer`'s cached route of `topic` every 5 ms in the background and records each
/// observation in which `group` is missing or lacks `identity`.
struct RouteWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, Vec<String>)>,
}

impl RouteWatch {
    fn start(peer: &Peer, topic: &'static str, group: &'static str, identity: &str) -> RouteWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let (peer, stopped, identity) = (peer.clone(), stop.clone(), identity.to_string());
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut observations = 0u64;
            let mut gaps = Vec::new();
            while !stopped.load(Ordering::Relaxed) && started.elapsed() < WATCH_MAX_SPAN {
                let seen = match peer.route(topic).await {
                    Ok(route) => match member(&route, group, &identity) {
                        Some(_) => None,
                        None => Some(format!(
                            "{:?}: {group} lacks {identity}: {route:?}",
                            started.elapsed()
                        )),
                    },
                    Err(e) => Some(format!("{:?}: no route: {e}", started.elapsed())),
                };
                observations += 1;
                gaps.extend(seen);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (observations, gaps)
        });
        RouteWatch { stop, task }
    }

    /// Stops watching; returns how many observations were made and the gaps seen.
    async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("route watch task")
    }
}

/// Stops the flow and the route watch; returns the numbers published, the route
/// observations and gaps, and whether every number arrived (waiting up to 20 s).
async fn stop_and_check(
    flow: Flow,
    watch: RouteWatch,
    got: &Got,
) -> (BTreeSet<u64>, u64, Vec<String>, bool) {
    let expected = flow.stop().await;
    let (observations, gaps) = watch.stop().await;
    let delivered = eventually(Duration::from_secs(20), || {
        missing(got, &expected).is_empty()
    })
    .await;
    (expected, observations, gaps, delivered)
}

/// Starts the subscriber (prefers node 0, then node 2), subscribed to `events` in group
/// `g`, and the sender (prefers node 1, then node 2); returns once the sender, attached
/// to another node, sees the subscription (they meet only through gossip).
async fn subscriber_and_sender(root: &std::path::Path, listen: &[SocketAddr]) -> (Peer, Peer, Got) {
    let subscriber = peer(root, "subscriber", &[listen[0], listen[2]]).await;
    let sender = peer(root, "sender", &[listen[1], listen[2]]).await;
    let got: Got = Arc::default();
    let sub = subscriber
        .subscribe("events")
        .group("g")
        .start()
        .await
        .expect("subscribe");
    consume(sub, got.clone());
    assert!(
        until(Duration::from_secs(30), || async {
            member_of(&sender, "events", "g", "subscriber")
                .await
                .is_some()
        })
        .await,
        "the sender's node learns of the subscriber through gossip: {:?}",
        sender.route("events").await
    );
    (subscriber, sender, got)
}

/// Waits until `got` grows (the flow reaches the subscriber).
async fn flowing(got: &Got, what: &str) {
    let previous = got.lock().expect("lock").len();
    assert!(
        eventually(Duration::from_secs(20), || got.lock().expect("lock").len()
            > previous)
        .await,
        "{what}"
    );
}

/// The node a subscriber is attached to is killed during a running flow: the subscriber
/// moves to another node (the surviving nodes list it again after dropping everything
/// the dead node held), the sender's cached route never loses it, and no message is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_whose_directory_node_dies_moves_and_nothing_is_lost() {
    init_logs();
    let root = tempfile::tempdir().expect("tempdir");
    let (mut nodes, listen) = three_nodes(root.path());
    // A canary that knows only node 0, so it cannot move: once it is gone from a node's
    // routes, that node has dropped everything node 0 held. Subscribed first, it also
    // makes sure node 0 is up before the subscriber, which prefers it, starts.
    let canary = peer(root.path(), "canary", &[listen[0]]).await;
    let _canary_sub = canary
        .subscribe("canary")
        .group("pinned")
        .start()
        .await
        .expect("canary subscribes");
    let (subscriber, sender, got) = subscriber_and_sender(root.path(), &listen).await;
    // The observer knows only node 2.
    let observer = peer(root.path(), "observer", &[listen[2]]).await;
    // No accessor tells which node a peer is attached to: the nodes' logs do.
    assert_eq!(
        (
            nodes[0].attachments("subscriber"),
            nodes[2].attachments("subscriber")
        ),
        (1, 0),
        "the subscriber is attached to node 0 (log lines of nodes 0 and 2)"
    );
    for (name, p) in [
        ("sender (node 1)", &sender),
        ("observer (node 2)", &observer),
    ] {
        assert!(
            until(Duration::from_secs(30), || async {
                member_of(p, "events", "g", "subscriber").await.is_some()
                    && member_of(p, "canary", "pinned", "canary").await.is_some()
            })
            .await,
            "the {name} learns of node 0's subscriptions through gossip: {:?} {:?}",
            p.route("events").await,
            p.route("canary").await
        );
    }
    let before = member_of(&sender, "events", "g", "subscriber")
        .await
        .expect("subscriber listed");
    assert_eq!(before.addrs, vec![subscriber.local_addr()]);

    let watch = RouteWatch::start(&sender, "events", "g", "subscriber");
    let flow = Flow::start(&sender, "events", 0, false);
    flowing(&got, "the flow reaches the subscriber before the kill").await;
    let killed = Instant::now();
    nodes[0].kill();
    // Both surviving nodes drop node 0's registrations (their failure detector fired)...
    for (name, p) in [
        ("sender (node 1)", &sender),
        ("observer (node 2)", &observer),
    ] {
        assert!(
            until(Duration::from_secs(30), || async {
                member_of(p, "canary", "pinned", "canary").await.is_none()
            })
            .await,
            "the {name}'s node drops the registrations of dead node 0: {:?}",
            p.route("canary").await
        );
    }
    let dropped = killed.elapsed();
    assert!(
        eventually(Duration::from_secs(30), || nodes[2]
            .attachments("subscriber")
            > 0)
        .await,
        "the subscriber attaches to node 2 after node 0 died"
    );
    // ...and each lists the subscriber again (same process, same address) to a fresh
    // peer resolving through that node alone: it registered again on a surviving node.
    for (i, name) in [(1, "witness-1"), (2, "witness-2")] {
        let witness = peer(root.path(), name, &[listen[i]]).await;
        assert!(
            until(Duration::from_secs(30), || async {
                member_of(&witness, "events", "g", "subscriber")
                    .await
                    .as_ref()
                    == Some(&before)
            })
            .await,
            "node {i} lists the subscriber again after node 0 died: {:?}",
            witness.route("events").await
        );
        witness.close().await.expect("close witness");
    }
    let moved = killed.elapsed();
    // Keep the flow going a little past the move, then check nothing was lost.
    let target = got.lock().expect("lock").len() + 50;
    assert!(
        eventually(Duration::from_secs(20), || got.lock().expect("lock").len()
            >= target)
        .await,
        "delivery goes on after the move"
    );
    let (expected, observations, gaps, delivered) = stop_and_check(flow, watch, &got).await;
    assert!(
        gaps.is_empty() && delivered,
        "the subscriber's node died {:?} ago; the others dropped its registrations after \
         {dropped:?} and listed the subscriber again after {moved:?}. The sender's cached \
         route lacked the subscriber in {} of {observations} observations (times from just \
         before the kill; first: {:?}, last: {:?}); {} of {} messages never arrived, e.g. \
         {:?}",
        killed.elapsed(),
        gaps.len(),
        gaps.first(),
        gaps.last(),
        missing(&got, &expected).len(),
        expected.len(),
        missing(&got, &expected).iter().take(10).collect::<Vec<_>>()
    );
    eprintln!(
        "{} messages; node 0's registrations dropped after {dropped:?}, subscriber listed by \
         nodes 1 and 2 after {moved:?}; {observations} route observations, no gap",
        expected.len()
    );
    assert!(sender.drain(Duration::from_secs(30)).await);
}

/// The subscriber's directory node is killed and restarted at once under the same name
/// and gossip address (a new generation, gossiping before the failure detector declared
/// the old one dead), listening on another port so that the subscriber has to notice the
/// dead connection (4 s) and move. The other nodes keep the old generation's
/// registrations through its route grace: the sender's route never lacks the
/// subscriber, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_node_restarted_at_once_keeps_its_peers_in_routes() {
    init_logs();
    let root = tempfile::tempdir().expect("tempdir");
    let (mut nodes, listen) =
        three_nodes_with(root.path(), &["--dead-node-route-grace-ms", "6000"]);
    // Node 0 is up (a peer that knows only node 0 attached) before the subscriber, which
    // prefers it, starts.
    let early = peer(root.path(), "early", &[listen[0]]).await;
    let (subscriber, sender, got) = subscriber_and_sender(root.path(), &listen).await;
    assert_eq!(
        nodes[0].attachments("subscriber"),
        1,
        "the subscriber is attached to node 0"
    );
    let watch = RouteWatch::start(&sender, "events", "g", "subscriber");
    let flow = Flow::start(&sender, "events", 0, false);
    flowing(&got, "the flow reaches the subscriber before the restart").await;
    let killed = Instant::now();
    nodes[0].kill();
    nodes[0].restart_listening_on(free_udp_addr());
    assert!(
        eventually(Duration::from_secs(30), || nodes[2]
            .attachments("subscriber")
            > 0)
        .await,
        "the subscriber moves to node 2"
    );
    let moved = killed.elapsed();
    // Past the old generation's failure detection (a few seconds) and its route grace
    // (6 s): by then its records are gone, and the subscriber is listed from node 2.
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(killed.elapsed())).await;
    let (expected, observations, gaps, delivered) = stop_and_check(flow, watch, &got).await;
    assert!(
        gaps.is_empty() && delivered,
        "node 0 restarted {:?} ago; the subscriber moved after {moved:?}. The sender's \
         route lacked it in {} of {observations} observations (first: {:?}); {} of {} \
         messages never arrived",
        killed.elapsed(),
        gaps.len(),
        gaps.first(),
        missing(&got, &expected).len(),
        expected.len(),
    );
    assert!(sender.drain(Duration::from_secs(30)).await);
    drop((early, subscriber));
}

/// Every directory node is killed during a running flow: the flow goes on on cached
/// routes, past the point where the peers' directory connections time out, and the
/// sender's route keeps the subscriber all along. Then the directory comes back and a
/// new subscriber becomes visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_nodes_die_and_delivery_goes_on() {
    init_logs();
    let root = tempfile::tempdir().expect("tempdir");
    let (mut nodes, listen) = three_nodes(root.path());
    let (_subscriber, sender, got) = subscriber_and_sender(root.path(), &listen).await;
    let watch = RouteWatch::start(&sender, "events", "g", "subscriber");
    let flow = Flow::start(&sender, "events", 0, false);
    flowing(
        &got,
        "the flow reaches the subscriber before the directory dies",
    )
    .await;
    for n in nodes.iter_mut() {
        n.kill();
    }
    let all_dead = Instant::now();
    let after_kill = flow.next();
    // Publishing goes on past the idle timeout of the peers' directory connections (no
    // public accessor tells when a peer noticed); deliveries are counted per 500 ms.
    let span = MAX_IDLE_TIMEOUT + Duration::from_secs(1);
    let mut progress = Vec::new();
    while all_dead.elapsed() < span {
        let before = got.lock().expect("lock").len();
        tokio::time::sleep(Duration::from_millis(500)).await;
        progress.push(got.lock().expect("lock").len() - before);
    }
    let mut expected = flow.stop().await;
    let after: BTreeSet<u64> = expected.range(after_kill..).copied().collect();
    assert!(
        after.len() > 100,
        "the flow went on with the directory down: {} messages",
        after.len()
    );
    // Still with no directory: everything arrives...
    assert!(
        eventually(Duration::from_secs(30), || missing(&got, &expected)
            .is_empty())
        .await,
        "with no directory at all, {} of {} messages never arrived, e.g. {:?}",
        missing(&got, &expected).len(),
        expected.len(),
        missing(&got, &expected).iter().take(10).collect::<Vec<_>>()
    );
    // ...as it was published: also in the last second, once the connections timed out.
    assert!(
        progress.iter().rev().take(2).sum::<usize>() > 0,
        "deliveries per 500 ms with the directory down: {progress:?}"
    );
    let (observations, gaps) = watch.stop().await;
    assert!(
        gaps.is_empty(),
        "the sender's cached route lost the subscriber in {} of {observations} observations \
         with no directory; first: {:?}",
        gaps.len(),
        gaps.first()
    );
    eprintln!(
        "{} messages published after every node died, all delivered; deliveries per 500 ms: \
         {progress:?}",
        after.len()
    );

    // Bring the directory back: a new subscriber becomes visible to the sender.
    for n in nodes.iter_mut() {
        n.restart();
    }
    let late = peer(root.path(), "late-subscriber", &[listen[2], listen[0]]).await;
    let late_got: Got = Arc::default();
    let sub = late
        .subscribe("events")
        .group("late")
        .start()
        .await
        .expect("late subscribe");
    consume(sub, late_got.clone());
    assert!(
        until(Duration::from_secs(60), || async {
            member_of(&sender, "events", "late", "late-subscriber")
                .await
                .is_some()
        })
        .await,
        "the new subscriber becomes visible: {:?}",
        sender.route("events").await
    );
    let first = expected.last().map_or(0, |n| n + 1);
    let late_expected: BTreeSet<u64> = (first..first + 100).collect();
    for n in &late_expected {
        sender
            .publish("events", Message::new(n.to_string()))
            .await
            .expect("publish");
    }
    expected.extend(late_expected.iter().copied());
    assert!(
        eventually(Duration::from_secs(60), || missing(&got, &expected)
            .is_empty()
            && missing(&late_got, &late_expected).is_empty())
        .await,
        "after the restart: g misses {}, late misses {}",
        missing(&got, &expected).len(),
        missing(&late_got, &late_expected).len()
    );
    assert!(sender.drain(Duration::from_secs(30)).await);
}

/// The numbers a `weft sub --raw` process printed so far (one payload per line).
fn numbers(p: &ChildProcess) -> HashSet<u64> {
    p.lines().iter().filter_map(|l| l.parse().ok()).collect()
}

/// `weft sub TOPIC --group GROUP --raw` as a process named `name`.
fn weft_sub(
    root: &std::path::Path,
    directories: &[SocketAddr],
    name: &str,
    topic: &str,
    group: &str,
) -> ChildProcess {
    let directories: Vec<String> = directories.iter().map(|a| a.to_string()).collect();
    ChildProcess::spawn(
        Command::new(binary("weft"))
            .args(["sub", topic, "--group", group, "--raw", "--dev", "--dev-ca"])
            .arg(root.join("dev-ca"))
            .args(["--directory", &directories.join(","), "--name", name])
            .arg("--data-dir")
            .arg(root.join(name)),
        Stdio::null(),
    )
}

/// With every directory node dead, one of the two member processes of a group is
/// killed while the publisher keeps publishing (keyed and unkeyed): the sender learns
/// nothing from the directory, so only the failed connection can move that member's
/// messages, and its keys, to the surviving member. Nothing published after the kill
/// may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_directory_a_dead_member_s_messages_go_to_the_other_one() {
    init_logs();
    let root = tempfile::tempdir().expect("tempdir");
    let (mut nodes, listen) = three_nodes(root.path());
    let survivor = weft_sub(
        root.path(),
        &[listen[0], listen[1]],
        "survivor",
        "work",
        "workers",
    );
    let mut doomed = weft_sub(
        root.path(),
        &[listen[1], listen[2]],
        "doomed",
        "work",
        "workers",
    );
    let sender = peer(root.path(), "work-sender", &[listen[2], listen[0]]).await;
    let both = |route: &Route| {
        member(route, "workers", "survivor").is_some()
            && member(route, "workers", "doomed").is_some()
    };
    assert!(
        until(Duration::from_secs(30), || async {
            sender.route("work").await.is_ok_and(|r| both(&r))
        })
        .await,
        "both members register: {:?}",
        sender.route("work").await
    );
    let flow = Flow::start(&sender, "work", 0, true);
    assert!(
        eventually(Duration::from_secs(20), || survivor.line_count() > 0
            && doomed.line_count() > 0)
        .await,
        "the group shares the flow: survivor {}, doomed {}",
        survivor.line_count(),
        doomed.line_count()
    );
    for n in nodes.iter_mut() {
        n.kill();
    }
    // Both members keep receiving on the cached route with the directory gone.
    let (s, d) = (survivor.line_count(), doomed.line_count());
    assert!(
        eventually(Duration::from_secs(20), || survivor.line_count() >= s + 20
            && doomed.line_count() >= d + 20)
        .await,
        "both members keep receiving with no directory: survivor {} then {}, doomed {} then {}",
        s,
        survivor.line_count(),
        d,
        doomed.line_count()
    );
    doomed.child.kill().expect("SIGKILL");
    doomed.child.wait().expect("reap");
    let killed = Instant::now();
    let cut = flow.next();
    let doomed_got = numbers(&doomed);
    // The keys the dead member served last: it printed a later message of them than the
    // survivor (a key may have moved once, when the second member's link came up).
    let key = |n: u64| n.is_multiple_of(2).then_some(n % 16);
    let latest = |numbers: &HashSet<u64>, k: u64| {
        numbers
            .iter()
            .filter(|n| **n < cut && key(**n) == Some(k))
            .max()
            .copied()
    };
    let survivor_got = numbers(&survivor);
    let doomed_keys: BTreeSet<u64> = doomed_got
        .iter()
        .filter_map(|n| key(*n))
        .filter(|k| latest(&doomed_got, *k) > latest(&survivor_got, *k))
        .collect();
    // Keep publishing until the sender has moved the dead member's keys to the survivor
    // (it notices the dead connection after its idle timeout), and a while after that.
    let rerouted = || {
        numbers(&survivor)
            .iter()
            .any(|n| *n >= cut && key(*n).is_some_and(|k| doomed_keys.contains(&k)))
    };
    assert!(
        eventually(MAX_IDLE_TIMEOUT + Duration::from_secs(20), rerouted).await,
        "the dead member's keys {doomed_keys:?} never reached the survivor"
    );
    let rerouted_after = killed.elapsed();
    let mark = flow.next();
    assert!(
        eventually(Duration::from_secs(20), || flow.next() > mark + 200).await,
        "the flow goes on after the reroute"
    );
    let published = flow.stop().await;
    let after: BTreeSet<u64> = published.range(cut..).copied().collect();
    assert!(
        after.len() > 100,
        "the flow went on after the kill: {} messages",
        after.len()
    );
    let lacking = |got: &HashSet<u64>, want: &BTreeSet<u64>| -> Vec<u64> {
        want.iter().filter(|n| !got.contains(n)).copied().collect()
    };
    assert!(
        eventually(Duration::from_secs(30), || lacking(
            &numbers(&survivor),
            &after
        )
        .is_empty())
        .await,
        "{} of the {} messages published after the member died never reached the survivor, \
         e.g. {:?}",
        lacking(&numbers(&survivor), &after).len(),
        after.len(),
        lacking(&numbers(&survivor), &after)
            .iter()
            .take(10)
            .collect::<Vec<_>>()
    );
    // Nothing at all was lost: what the dead member printed before dying, or the survivor.
    let union: HashSet<u64> = numbers(&survivor).union(&doomed_got).copied().collect();
    assert!(
        lacking(&union, &published).is_empty(),
        "messages lost by the group: {:?}",
        lacking(&union, &published)
            .iter()
            .take(10)
            .collect::<Vec<_>>()
    );
    // Every key the dead member served moved to the survivor.
    let moved_keys: BTreeSet<u64> = after
        .iter()
        .filter_map(|n| key(*n))
        .filter(|k| doomed_keys.contains(k))
        .collect();
    assert!(
        !doomed_keys.is_empty() && moved_keys == doomed_keys,
        "the dead member's keys {doomed_keys:?} reach the survivor after the kill: {moved_keys:?}"
    );
    // The directory never told the sender: its cached route still lists the dead member.
    let route = sender.route("work").await.expect("cached route");
    assert!(
        both(&route),
        "the sender's cached route is unchanged: {route:?}"
    );
    eprintln!(
        "{} messages published, {} after the member died; the dead member had printed {}, \
         the survivor {}; keys moved: {moved_keys:?}, first seen rerouted {rerouted_after:?} \
         after the kill",
        published.len(),
        after.len(),
        doomed_got.len(),
        survivor.line_count()
    );
}
