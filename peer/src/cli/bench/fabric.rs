//! Where a benchmark's peers run (threads and runtimes) and meet (the directory).

use super::{BenchArgs, Threads};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_directory::Directory;
use weft_peer::{Durability, Peer, WhenFull};

/// Where one peer runs: a thread of its own with a current-thread runtime
/// ([`Threads::PerPeer`]), one such thread shared with the run's other peers
/// ([`Threads::Single`], see [`Placement`]), or the caller's runtime
/// ([`Threads::Shared`]). Everything touching the peer (start, its loops, close) is
/// spawned here, so its tasks stay put.
#[derive(Clone)]
pub(super) struct PeerThread {
    pub(super) handle: tokio::runtime::Handle,
    /// Stops and joins the thread when the last peer placed on it is done.
    _thread: Option<Arc<RuntimeThread>>,
}

/// A thread running a current-thread runtime until dropped.
struct RuntimeThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeerThread {
    /// A place for one peer; [`Threads::Single`] alone (outside a [`Placement`]) is a
    /// thread of its own, as [`Threads::PerPeer`].
    pub(super) fn new(layout: Threads, name: &str) -> Result<PeerThread> {
        if layout == Threads::Shared {
            return Ok(PeerThread {
                handle: tokio::runtime::Handle::current(),
                _thread: None,
            });
        }
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        let _ = handle_tx.send(Ok(rt.handle().clone()));
                        rt.block_on(async {
                            let _ = stopped.await;
                        });
                    }
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                    }
                }
            })
            .context("starting a peer thread")?;
        let handle = handle_rx
            .recv()
            .context("peer thread ended at start")?
            .context("starting a peer runtime")?;
        Ok(PeerThread {
            handle,
            _thread: Some(Arc::new(RuntimeThread {
                stop: Some(stop),
                thread: Some(thread),
            })),
        })
    }

    /// Runs `work` on this peer's runtime and waits for its result.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        self.handle
            .spawn(work)
            .await
            .context("a peer thread's task failed")
    }
}

impl Drop for RuntimeThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Places the peers of one run by `--threads`: with [`Threads::Single`] every peer
/// gets the same thread (made for the first).
pub(super) struct Placement {
    layout: Threads,
    single: Option<PeerThread>,
}

impl Placement {
    pub(super) fn new(layout: Threads) -> Self {
        Placement {
            layout,
            single: None,
        }
    }

    /// Where the peer `name` runs.
    pub(super) fn thread(&mut self, name: &str) -> Result<PeerThread> {
        if self.layout != Threads::Single {
            return PeerThread::new(self.layout, name);
        }
        if let Some(thread) = &self.single {
            return Ok(thread.clone());
        }
        let thread = PeerThread::new(Threads::Single, "peers")?;
        self.single = Some(thread.clone());
        Ok(thread)
    }
}

/// Where the benchmark's peers meet: an embedded directory, or a running one
/// (`--directory` with `--dev-ca`).
pub(super) struct Fabric {
    /// The temporary directory of the peers' data (and an embedded directory's CA);
    /// `None` in a child process, which uses its parent's.
    _temp: Option<tempfile::TempDir>,
    directory: Option<Directory>,
    pub(super) addr: std::net::SocketAddr,
    pub(super) dev_ca: PathBuf,
    /// Where peer `name` keeps its data: `root/name`.
    pub(super) root: PathBuf,
    /// `--segment-bytes` of every peer.
    segment_bytes: Option<u64>,
    /// Watches routes when the directory is not embedded.
    observer: tokio::sync::OnceCell<Peer>,
}

impl Fabric {
    /// The fabric of a run: a directory embedded in this process, or the one given by
    /// `--directory`.
    pub(super) async fn start(args: &BenchArgs) -> Result<Fabric> {
        let temp = tempfile::tempdir().context("temporary directory")?;
        let root = temp.path().to_path_buf();
        let (directory, addr, dev_ca) = match args.directory {
            Some(addr) => {
                let dev_ca = args.dev_ca.clone().context(
                    "--directory needs --dev-ca DIR: the development CA the directory was started with (weft-directory --dev --dev-ca DIR)",
                )?;
                (None, addr, dev_ca)
            }
            None => {
                let dev_ca = root.join("dev-ca");
                let directory = Directory::builder("bench-directory")
                    .listen("127.0.0.1:0".parse()?)
                    .dev(&dev_ca)
                    .start()
                    .await?;
                let addr = directory.local_addr();
                (Some(directory), addr, dev_ca)
            }
        };
        Ok(Fabric {
            _temp: Some(temp),
            directory,
            addr,
            dev_ca,
            root,
            segment_bytes: args.segment_bytes,
            observer: tokio::sync::OnceCell::new(),
        })
    }

    /// The fabric of a child process (`--role`): its parent's directory and data root.
    pub(super) fn child(args: &BenchArgs) -> Result<Fabric> {
        let missing = |flag: &str| format!("--role needs {flag} (set by the parent process)");
        Ok(Fabric {
            _temp: None,
            directory: None,
            addr: args.directory.with_context(|| missing("--directory"))?,
            dev_ca: args.dev_ca.clone().with_context(|| missing("--dev-ca"))?,
            root: args
                .data_dir
                .clone()
                .with_context(|| missing("--data-dir"))?,
            segment_bytes: args.segment_bytes,
            observer: tokio::sync::OnceCell::new(),
        })
    }

    /// The topic of a run: its own on a shared directory, so that the members a
    /// previous run left registered there are not counted as this one's.
    pub(super) fn topic(&self, base: &str) -> String {
        match self.directory {
            Some(_) => base.to_string(),
            None => format!("{base}.{}", std::process::id()),
        }
    }

    /// Starts a peer on `thread`, with `limits` on its outbox.
    pub(super) async fn peer(
        &self,
        thread: &PeerThread,
        name: &str,
        durability: Durability,
        limits: OutboxLimits,
    ) -> Result<Peer> {
        let segment_bytes = self.segment_bytes;
        let builder = Peer::builder(name)
            .directory([self.addr])
            .dev_ca(&self.dev_ca)
            .data_dir(self.root.join(name))
            .durability(durability)
            .when_full(WhenFull::Wait)
            .outbox(move |mut cfg| {
                if let Some(n) = limits.messages {
                    cfg.max_messages = n;
                }
                if let Some(n) = limits.memory_messages {
                    cfg.max_memory_messages = n;
                }
                if let Some(n) = segment_bytes {
                    cfg.segment_bytes = n;
                }
                cfg
            });
        Ok(thread.run(builder.start()).await??)
    }

    /// Members registered for `topic`, all groups together.
    pub(super) async fn members(&self, topic: &str) -> Result<usize> {
        let route = match &self.directory {
            Some(directory) => directory.route(topic),
            None => {
                let observer = self
                    .observer
                    .get_or_try_init(|| async {
                        let name = format!("bench-observer-{}", std::process::id());
                        let thread = PeerThread::new(Threads::Shared, &name)?;
                        self.peer(&thread, &name, Durability::Memory, OutboxLimits::default())
                            .await
                    })
                    .await?;
                return route_members(observer, topic).await;
            }
        };
        Ok(route.groups.iter().map(|g| g.members.len()).sum())
    }

    /// Waits until the directory lists `members` members of `topic`.
    pub(super) async fn wait_members(&self, topic: &str, members: usize) -> Result<()> {
        until_members(topic, members, || self.members(topic)).await
    }
}

/// Outbox limits of a bench peer (`None`: the peer's default).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct OutboxLimits {
    /// `--outbox-messages`: the quota of messages.
    pub(super) messages: Option<u64>,
    /// `--memory-messages`: `Memory` messages held before publishers wait.
    pub(super) memory_messages: Option<u64>,
}

impl OutboxLimits {
    /// A publisher's limits, from the command line.
    pub(super) fn of(args: &BenchArgs) -> Self {
        OutboxLimits {
            messages: args.outbox_messages,
            memory_messages: args.memory_messages,
        }
    }
}

/// Waits until `peer` sees at least `members` members in the route of `topic`. A
/// publisher does this before its clock starts, so that its route is cached and its
/// links are opening: otherwise every publish of the first window misses the route
/// cache and waits for the directory, and the run measures that start-up.
pub(super) async fn await_route(peer: &Peer, topic: &str, members: usize) -> Result<()> {
    until_members(topic, members, || route_members(peer, topic)).await
}

/// Polls `count` until it reaches `members`, for at most 30 s.
async fn until_members<F, Fut>(topic: &str, members: usize, mut count: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<usize>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while count().await? < members {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{topic} has fewer than {members} members after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Members registered for `topic`, all groups together, as `peer` sees the route.
pub(super) async fn route_members(peer: &Peer, topic: &str) -> Result<usize> {
    let route = peer.route(topic).await?;
    Ok(route.groups.iter().map(|g| g.members.len()).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thread a task spawned on `place` runs on.
    fn thread_of(place: &PeerThread) -> std::thread::ThreadId {
        futures::executor::block_on(place.handle.spawn(async { std::thread::current().id() }))
            .expect("the task runs")
    }

    #[test]
    fn single_places_every_peer_on_one_thread_and_per_peer_each_on_its_own() {
        let mut single = Placement::new(Threads::Single);
        let (a, b) = (single.thread("a").unwrap(), single.thread("b").unwrap());
        assert_eq!(thread_of(&a), thread_of(&b));
        assert_ne!(thread_of(&a), std::thread::current().id());
        let mut per_peer = Placement::new(Threads::PerPeer);
        let (c, d) = (per_peer.thread("c").unwrap(), per_peer.thread("d").unwrap());
        assert_ne!(thread_of(&c), thread_of(&d));
        // The shared thread stops once its last peer's place is dropped.
        drop((a, single));
        assert_ne!(thread_of(&b), thread_of(&c), "still running for b");
    }
}
