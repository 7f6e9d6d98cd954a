//! The directory as a cluster of real `weft-directory` processes, killed with SIGKILL,
//! while peers keep delivering.

use futures::StreamExt;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weft_peer::{Message, Peer};
use weft_tests::{binary, eventually, init_logs};

fn free_port() -> u16 {
    // Bound and released: another process could take it in between, which only makes
    // this test fail loudly, never pass wrongly.
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Node {
    child: Child,
    args: Vec<String>,
}

impl Node {
    fn start(
        name: &str,
        ca: &std::path::Path,
        gossip: SocketAddr,
        seeds: &[SocketAddr],
        listen: SocketAddr,
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
        let child = Command::new(binary("weft-directory"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn weft-directory");
        Node { child, args }
    }

    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    fn restart(&mut self) {
        self.child = Command::new(binary("weft-directory"))
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("respawn weft-directory");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

async fn members(observer: &Peer, topic: &str) -> usize {
    observer
        .route(topic)
        .await
        .map(|r| r.groups.iter().map(|g| g.members.len()).sum())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_nodes_die_and_delivery_goes_on() {
    init_logs();
    let root = tempfile::tempdir().expect("tempdir");
    let ca = root.path().join("dev-ca");
    // Create the dev CA once, before three processes race for it.
    weft_proto::certs::ensure_dev(&ca, "bootstrap", &[]).expect("dev CA");
    let gossip: Vec<SocketAddr> = (0..3)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
        .collect();
    let listen: Vec<SocketAddr> = (0..3)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
        .collect();
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| {
            Node::start(
                &format!("dir-{i}"),
                &ca,
                gossip[i],
                &[gossip[(i + 1) % 3]],
                listen[i],
            )
        })
        .collect();
    // The subscriber prefers node 0, the sender node 1: they meet only through gossip.
    let subscriber = peer(root.path(), "subscriber", &[listen[0], listen[2]]).await;
    let sender = peer(root.path(), "sender", &[listen[1], listen[2]]).await;
    let got: Got = Arc::default();
    let sub = subscriber
        .subscribe("events")
        .group("g")
        .start()
        .await
        .expect("subscribe");
    consume(sub, got.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while members(&sender, "events").await != 1 {
        assert!(
            Instant::now() < deadline,
            "the sender's node learns of the subscriber through gossip"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut published = 0u64;
    let mut send = |count: u64| {
        let sender = sender.clone();
        let from = published;
        published += count;
        async move {
            for n in from..from + count {
                sender
                    .publish("events", Message::new(n.to_string()))
                    .await
                    .expect("publish");
            }
        }
    };
    send(200).await;
    // Kill the subscriber's node: it moves to node 2; the sender keeps its route.
    nodes[0].kill();
    send(200).await;
    let count = |got: &Got| {
        got.lock()
            .expect("lock")
            .iter()
            .copied()
            .collect::<HashSet<u64>>()
            .len()
    };
    assert!(
        eventually(Duration::from_secs(60), || count(&got) == 400).await,
        "after killing the subscriber's node: {}",
        count(&got)
    );
    // Kill every directory node: cached routes keep delivering.
    nodes[1].kill();
    nodes[2].kill();
    send(200).await;
    assert!(
        eventually(Duration::from_secs(60), || count(&got) == 600).await,
        "with no directory at all: {}",
        count(&got)
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
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let route = sender.route("events").await.expect("route");
        if route
            .groups
            .iter()
            .any(|g| g.group == "late" && !g.members.is_empty())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new subscriber becomes visible: {route:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    send(100).await;
    assert!(
        eventually(Duration::from_secs(60), || count(&late_got) == 100
            && count(&got) == 700)
        .await,
        "after the restart: g {} late {}",
        count(&got),
        count(&late_got)
    );
    assert!(sender.drain(Duration::from_secs(30)).await);
}
