//! Helpers shared by Weft's fabric tests: temporary fabrics, deadlines, child processes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Polls `check` until it returns true or `timeout` passes; returns whether it did.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits up to 10 s until `directory`'s route of `topic` lists a group; returns whether
/// it did.
pub async fn group_listed(directory: &weft_directory::Directory, topic: &str) -> bool {
    eventually(Duration::from_secs(10), || {
        !directory.route(topic).groups.is_empty()
    })
    .await
}

/// Installs a test log subscriber once (RUST_LOG controls it).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Path of a workspace binary built next to the test executable (`target/<profile>/NAME`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run the tests with `cargo test --workspace` (it builds every binary)",
        path.display()
    );
    path
}

/// A UDP relay in front of `upstream` whose traffic can be cut and healed, to partition
/// two peers without touching the host's network.
pub struct UdpProxy {
    /// Address to advertise instead of `upstream`.
    pub addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl UdpProxy {
    /// Starts relaying datagrams between clients and `upstream`.
    pub async fn start(upstream: std::net::SocketAddr) -> UdpProxy {
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        let front = Arc::new(
            tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind proxy"),
        );
        let addr = front.local_addr().expect("proxy addr");
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = cut.clone();
        let task = tokio::spawn(async move {
            // One upstream socket per client, so replies find their way back.
            let mut clients: std::collections::HashMap<
                std::net::SocketAddr,
                Arc<tokio::net::UdpSocket>,
            > = std::collections::HashMap::new();
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, client)) = front.recv_from(&mut buf).await else {
                    return;
                };
                if flag.load(Ordering::Relaxed) {
                    continue;
                }
                let back = match clients.get(&client) {
                    Some(s) => s.clone(),
                    None => {
                        let s = Arc::new(
                            tokio::net::UdpSocket::bind("127.0.0.1:0")
                                .await
                                .expect("bind upstream"),
                        );
                        let (s2, front2, flag2) = (s.clone(), front.clone(), flag.clone());
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 65_536];
                            while let Ok(n) = s2.recv(&mut buf).await {
                                if !flag2.load(Ordering::Relaxed) {
                                    let _ = front2.send_to(&buf[..n], client).await;
                                }
                            }
                        });
                        s.connect(upstream).await.expect("connect upstream");
                        clients.insert(client, s.clone());
                        s
                    }
                };
                let _ = back.send(&buf[..n]).await;
            }
        });
        UdpProxy { addr, cut, task }
    }

    /// Drops every datagram in both directions until [`heal`](Self::heal).
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Relays again.
    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A child process, killed when dropped, whose stdout lines are collected as they come.
pub struct ChildProcess {
    /// The process (tests kill it with SIGKILL through it).
    pub child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ChildProcess {
    /// Spawns `cmd` with stdout piped into the collected lines and stderr sent to `stderr`.
    pub fn spawn(cmd: &mut std::process::Command, stderr: std::process::Stdio) -> ChildProcess {
        use std::io::BufRead;
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                sink.lock().expect("lock").push(line);
            }
        });
        ChildProcess { child, lines }
    }

    /// The lines printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lock").clone()
    }

    /// How many lines were printed so far.
    pub fn line_count(&self) -> usize {
        self.lines.lock().expect("lock").len()
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An address on 127.0.0.1 whose UDP port is free now, for a socket that binds it
/// later (a node process, or a peer behind a proxy that must know its address first).
pub fn free_udp_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_udp_port()))
}

fn free_udp_port() -> u16 {
    // Released in between, so taken below the kernel's ephemeral range (32,768 and up
    // on Linux by default), where no socket bound to port 0 (every peer and endpoint
    // of the tests running beside this one) can be given it meanwhile; each call moves
    // on from a per-process start, so the tests of one process never pick the same one
    // either. (Picked with port 0, a directory node's port was once taken that way
    // under CI load: the node could not start and the test failed after 20 s.)
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (FIRST + (start + n) % SPAN) as u16;
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free UDP port in {FIRST}..{}", FIRST + SPAN);
}
