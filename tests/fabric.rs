//! In-process fabric tests over real QUIC on loopback: a directory node and several peers.

use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use weft_directory::Directory;
use weft_peer::{Message, Peer};
use weft_tests::{eventually, init_logs};

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
        Peer::builder(name)
            .directory([self.directory.local_addr()])
            .data_dir(self.dir.path().join(name))
            .dev_ca(self.dir.path().join("dev-ca"))
            .ack_timeout(Duration::from_secs(5))
            .start()
            .await
            .expect("peer starts")
    }
}

type Seen = Arc<Mutex<HashMap<String, Vec<u64>>>>;

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
