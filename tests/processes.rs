//! Multi-process tests: `weft-directory`, `weft sub` and `weft pub` as real child
//! processes; a subscriber killed with SIGKILL mid-stream.

use futures::StreamExt;
use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weft_tests::{binary, eventually, init_logs, ChildProcess};

fn weft(root: &std::path::Path, directory: &str, name: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("weft"));
    cmd.args(args)
        .args(["--dev", "--dev-ca"])
        .arg(root.join("dev-ca"))
        .args(["--directory", directory, "--name", name, "--data-dir"])
        .arg(root.join(name));
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_subscribers_and_publisher_as_processes_with_a_subscriber_killed() {
    init_logs();
    let root = tempfile::tempdir().expect("tempdir");
    let (_directory, addr) = spawn_directory(root.path(), "1000").await;
    const N: usize = 300;
    // Group g1: one member that never acks (and is killed), one that acks. Group g2: one.
    let sub = |name: &str, group: &str, ack: bool| {
        let mut args = vec!["sub", "orders", "--group", group, "--raw"];
        if !ack {
            args.push("--no-ack");
        }
        ChildProcess::spawn(&mut weft(root.path(), &addr, name, &args), Stdio::inherit())
    };
    let holder = sub("g1-holder", "g1", false);
    let g1 = sub("g1-worker", "g1", true);
    let g2 = sub("g2-worker", "g2", true);
    // Observe registrations through the directory, as any peer would.
    let observer = weft_peer::Peer::builder("observer")
        .directory([addr.parse::<std::net::SocketAddr>().expect("addr")])
        .dev_ca(root.path().join("dev-ca"))
        .data_dir(root.path().join("observer"))
        .start()
        .await
        .expect("observer");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let route = observer.route("orders").await.expect("route");
        if route.groups.iter().map(|g| g.members.len()).sum::<usize>() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "subscribers did not register: {route:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Orders go in through the publisher's standard input, one at a time until the
    // holder has some: with all of them at once, a publisher whose link to the holder
    // came up a few milliseconds after the worker's could hand every order to the
    // worker first (a run under CI load did), and the kill below would test nothing.
    let mut publisher = ChildProcess::spawn(
        weft(
            root.path(),
            &addr,
            "publisher",
            &[
                "pub",
                "orders",
                "--concurrency",
                "32",
                "--drain-timeout-s",
                "90",
            ],
        )
        .stdin(Stdio::piped()),
        Stdio::inherit(),
    );
    let mut orders = publisher.child.stdin.take().expect("piped stdin");
    let mut fed = 0;
    while fed < N {
        writeln!(orders, "order-{fed}").expect("feed the publisher");
        orders.flush().expect("feed the publisher");
        fed += 1;
        if eventually(Duration::from_millis(50), || !holder.lines().is_empty()).await {
            break;
        }
    }
    for n in fed..N {
        writeln!(orders, "order-{n}").expect("feed the publisher");
    }
    // End of input: the publisher drains and exits.
    drop(orders);
    assert!(
        eventually(Duration::from_secs(30), || !holder.lines().is_empty()).await,
        "the holder receives some orders (fed {fed} one at a time)"
    );
    // Kill the member holding unacknowledged deliveries.
    let mut holder = holder;
    holder.child.kill().expect("SIGKILL");
    holder.child.wait().expect("reap");
    let held: HashSet<String> = holder.lines().into_iter().collect();
    let expected: HashSet<String> = (0..N).map(|n| format!("order-{n}")).collect();
    let complete = |p: &ChildProcess| {
        p.lines()
            .into_iter()
            .collect::<HashSet<String>>()
            .is_superset(&expected)
    };
    assert!(
        eventually(Duration::from_secs(90), || complete(&g1) && complete(&g2)).await,
        "every order reaches both groups: g1 {} (holder held {}), g2 {}",
        g1.lines().len(),
        held.len(),
        g2.lines().len()
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = publisher.child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "publisher did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.success(),
        "weft pub drained and exited cleanly: {status}"
    );
    eprintln!(
        "holder held {} unacked orders before SIGKILL; g1 worker got {} lines, g2 {}",
        held.len(),
        g1.lines().len(),
        g2.lines().len()
    );
}

/// Starts `weft-directory` as a child process; returns it with its data address.
async fn spawn_directory(root: &std::path::Path, grace_ms: &str) -> (ChildProcess, String) {
    let directory = ChildProcess::spawn(
        Command::new(binary("weft-directory"))
            .args([
                "--dev",
                "--listen",
                "127.0.0.1:0",
                "--print-addr",
                "--grace-period-ms",
                grace_ms,
                "--dev-ca",
            ])
            .arg(root.join("dev-ca")),
        Stdio::inherit(),
    );
    assert!(
        eventually(Duration::from_secs(20), || !directory.lines().is_empty()).await,
        "directory printed its address"
    );
    let addr = directory.lines()[0]
        .strip_prefix("listening ")
        .expect("listening line")
        .to_string();
    (directory, addr)
}

/// The only member of a group is killed with SIGKILL and restarted under the same name
/// while a publisher keeps publishing; the new process attaches to the directory at once
/// but subscribes only half a second later (a service still initialising). Messages
/// published while it was down and before it subscribed again must reach it: the
/// directory keeps the group in the route, pointing at the new process, until the new
/// incarnation registers again (or its grace period ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_only_member_restarts_misses_nothing() {
    init_logs();
    let root = tempfile::tempdir().expect("tempdir");
    let (_directory, addr) = spawn_directory(root.path(), "5000").await;
    let directory: std::net::SocketAddr = addr.parse().expect("addr");
    let mut first = ChildProcess::spawn(
        &mut weft(
            root.path(),
            &addr,
            "solo",
            &["sub", "orders", "--group", "solo", "--raw"],
        ),
        Stdio::inherit(),
    );
    let publisher = weft_peer::Peer::builder("publisher")
        .directory([directory])
        .dev_ca(root.path().join("dev-ca"))
        .data_dir(root.path().join("publisher"))
        .start()
        .await
        .expect("publisher");
    let deadline = Instant::now() + Duration::from_secs(30);
    while publisher
        .route("orders")
        .await
        .expect("route")
        .groups
        .is_empty()
    {
        assert!(Instant::now() < deadline, "solo did not register");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut published = Vec::new();
    publish_for(&publisher, &mut published, Duration::from_millis(300)).await;
    first.child.kill().expect("SIGKILL");
    first.child.wait().expect("reap");
    publish_for(&publisher, &mut published, Duration::from_millis(300)).await;
    // The new incarnation, on the same data directory.
    let second = weft_peer::Peer::builder("solo")
        .directory([directory])
        .dev_ca(root.path().join("dev-ca"))
        .data_dir(root.path().join("solo"))
        .start()
        .await
        .expect("solo restarts");
    publish_for(&publisher, &mut published, Duration::from_millis(500)).await;
    let mut sub = second
        .subscribe("orders")
        .group("solo")
        .start()
        .await
        .expect("subscribe again");
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Some(d) = sub.next().await {
            sink.lock()
                .expect("lock")
                .insert(String::from_utf8_lossy(d.payload()).into_owned());
            d.ack();
        }
    });
    publish_for(&publisher, &mut published, Duration::from_millis(300)).await;
    let expected: HashSet<String> = published.iter().cloned().collect();
    let received = || {
        first
            .lines()
            .into_iter()
            .chain(seen.lock().expect("lock").iter().cloned())
            .collect::<HashSet<String>>()
    };
    assert!(
        eventually(Duration::from_secs(60), || received()
            .is_superset(&expected))
        .await,
        "{} of {} published orders reached the group; missing e.g. {:?}",
        received().intersection(&expected).count(),
        expected.len(),
        expected.difference(&received()).take(5).collect::<Vec<_>>()
    );
    eprintln!(
        "published {}; the killed process printed {}, the new one received {}",
        expected.len(),
        first.lines().len(),
        seen.lock().expect("lock").len()
    );
}

/// Publishes `order-N` about every millisecond for `span`, recording each one whose
/// `publish` returned Ok.
async fn publish_for(publisher: &weft_peer::Peer, published: &mut Vec<String>, span: Duration) {
    let until = Instant::now() + span;
    while Instant::now() < until {
        let payload = format!("order-{}", published.len());
        publisher
            .publish("orders", weft_peer::Message::new(payload.clone()))
            .await
            .expect("publish");
        published.push(payload);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// `weft bench` attached to a `weft-directory` process (`--directory`, `--dev-ca`),
/// its peers in processes of their own, twice in a row on the same directory: each
/// run has a topic of its own, so the second counts only its own subscribers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_bench_attaches_to_a_running_directory() {
    init_logs();
    let root = tempfile::tempdir().expect("tempdir");
    let (_directory, addr) = spawn_directory(root.path(), "1000").await;
    for run in 0..2 {
        let out = Command::new(binary("weft"))
            .args([
                "bench",
                "--json",
                "--processes",
                "--count",
                "3000",
                "--directory",
            ])
            .arg(&addr)
            .arg("--dev-ca")
            .arg(root.path().join("dev-ca"))
            .env_remove("RUST_LOG")
            .output()
            .expect("runs weft bench");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "run {run}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout.lines().last().expect("a report line");
        assert!(
            line.contains("\"count\":3000") && line.contains("\"expected_deliveries\":3000"),
            "run {run}: {line}"
        );
        assert!(
            line.contains("\"role\":\"subscriber\""),
            "run {run}: {line}"
        );
    }
}
