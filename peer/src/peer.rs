//! The peer runtime: builder, handle, and the glue that drives the state machines.

use crate::clock::WallClock;
use crate::directory_client::{ClientSettings, DirectoryClient, Freshness};
use crate::dispatch::{Action, Dispatcher, GroupBacklog, LinkEpoch, QueueId, Seq};
use crate::error::{Error, ErrorKind, Result};
use crate::gather::{self, GatherHandle, Gathering, Join};
use crate::link::{self, LinkControl};
use crate::members::Members;
use crate::message::{self, Message};
use crate::outbox::{self, MemoryRecord, MemoryRecords, Outbox, OutboxConfig, OutboxStats};
use crate::receipt::{self, PendingReceipt, Publish, ReceiptOf, Stored, Submitted};
use crate::seq_map::SeqMap;
use crate::subscription::{
    lock, SubShared, SubState, Subscription, DEFAULT_CREDIT, DEFAULT_MAX_QUEUED_BYTES,
};
use crate::{Durability, Receipt, WhenFull};
use bytes::Bytes;
use rustc_hash::FxHashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use weft_proto::certs;
use weft_proto::tls::{self, Credentials};
use weft_proto::wire::{Hello, MessageId, Role, Route, Subscription as SubKey, PROTOCOL_VERSION};

/// Default time a sent message may stay unacknowledged before it is redelivered.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Default largest message payload accepted by `publish`.
pub const DEFAULT_MAX_MESSAGE: usize = 1024 * 1024;
/// Most bytes a message's topic, key, tags and headers may take together, so that any
/// accepted message fits in a frame.
pub const MESSAGE_METADATA_LIMIT: usize = 64 * 1024;
/// Default time `publish` and `subscribe` wait for the directory when the route is not
/// cached yet.
pub const DEFAULT_DIRECTORY_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of a running peer.
#[derive(Debug, Clone)]
pub(crate) struct PeerConfig {
    pub(crate) max_frame: usize,
    pub(crate) max_message: usize,
    pub(crate) ack_timeout: Duration,
    pub(crate) directory_timeout: Duration,
    pub(crate) durability: Durability,
    pub(crate) when_full: WhenFull,
    pub(crate) zone: Option<String>,
    pub(crate) blocking_io: bool,
}

enum TlsSource {
    Dev(Option<PathBuf>),
    Files(PathBuf, PathBuf, PathBuf),
    Loaded(Credentials),
}

/// Configures and starts a [`Peer`].
pub struct PeerBuilder {
    identity: String,
    directories: Vec<SocketAddr>,
    data_dir: Option<PathBuf>,
    listen: SocketAddr,
    advertise: Vec<SocketAddr>,
    tls: Option<TlsSource>,
    config: PeerConfig,
    outbox: Option<Box<dyn FnOnce(OutboxConfig) -> OutboxConfig + Send>>,
    udp_socket: Option<Arc<dyn quinn::AsyncUdpSocket>>,
    rng_seed: Option<u64>,
    incarnation: Option<u64>,
}

impl PeerBuilder {
    pub(crate) fn new(identity: String) -> Self {
        Self {
            identity,
            directories: Vec::new(),
            data_dir: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: Vec::new(),
            tls: None,
            config: PeerConfig {
                max_frame: weft_proto::wire::DEFAULT_MAX_FRAME,
                max_message: DEFAULT_MAX_MESSAGE,
                ack_timeout: DEFAULT_ACK_TIMEOUT,
                directory_timeout: DEFAULT_DIRECTORY_TIMEOUT,
                durability: Durability::Disk,
                when_full: WhenFull::Wait,
                zone: None,
                blocking_io: false,
            },
            outbox: None,
            udp_socket: None,
            rng_seed: None,
            incarnation: None,
        }
    }

    /// Directory node addresses; the peer attaches to one and fails over to the others.
    pub fn directory<I, A>(mut self, addrs: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<DirectoryAddr>,
    {
        self.directories = addrs.into_iter().map(|a| a.into().0).collect();
        self
    }

    /// Where the outbox and state live (required).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Address to accept data connections on (default `127.0.0.1:0`).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Addresses senders should dial to reach this peer, when they differ from the bound
    /// address (NAT, proxies). Default: the bound address.
    pub fn advertise(mut self, addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.advertise = addrs.into_iter().collect();
        self
    }

    /// Development mode: a CA and certificate are created under `<data_dir>/../dev-ca`
    /// (or [`dev_ca`](Self::dev_ca)) if missing. Logs a warning; never use in production.
    pub fn dev(mut self) -> Self {
        if !matches!(self.tls, Some(TlsSource::Dev(Some(_)))) {
            self.tls = Some(TlsSource::Dev(None));
        }
        self
    }

    /// Development mode with the CA kept in `dir` (share it with the directory's `--dev-ca`).
    pub fn dev_ca(mut self, dir: impl Into<PathBuf>) -> Self {
        self.tls = Some(TlsSource::Dev(Some(dir.into())));
        self
    }

    /// Fabric CA, this peer's certificate and key (PEM).
    pub fn tls_files(
        mut self,
        ca: impl Into<PathBuf>,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.tls = Some(TlsSource::Files(ca.into(), cert.into(), key.into()));
        self
    }

    /// Already loaded credentials.
    pub fn credentials(mut self, creds: Credentials) -> Self {
        self.tls = Some(TlsSource::Loaded(creds));
        self
    }

    /// Default durability of `publish` (default [`Durability::Disk`]).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.config.durability = durability;
        self
    }

    /// What `publish` does when the outbox quota is full (default wait).
    pub fn when_full(mut self, when_full: WhenFull) -> Self {
        self.config.when_full = when_full;
        self
    }

    /// How long a sent message may stay unacknowledged before redelivery (default 30 s).
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.config.ack_timeout = timeout;
        self
    }

    /// Largest frame sent or accepted (default 4 MiB).
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.config.max_frame = bytes;
        self
    }

    /// Largest payload `publish` accepts (default 1 MiB; must fit in a frame).
    pub fn max_message(mut self, bytes: usize) -> Self {
        self.config.max_message = bytes;
        self
    }

    /// How long to wait for the directory when a route is not cached (default 10 s).
    pub fn directory_timeout(mut self, timeout: Duration) -> Self {
        self.config.directory_timeout = timeout;
        self
    }

    /// Locality label advertised to the directory.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.config.zone = Some(zone.into());
        self
    }

    /// Adjusts the outbox settings (quota, segment size...).
    pub fn outbox(mut self, f: impl FnOnce(OutboxConfig) -> OutboxConfig + Send + 'static) -> Self {
        self.outbox = Some(Box::new(f));
        self
    }

    /// Runs QUIC over `socket` instead of binding [`listen`](Self::listen): for example
    /// a simulated network's socket (`docs/simulation.md`). The socket's local address
    /// is the peer's bound address. Default: a real UDP socket bound to `listen`.
    pub fn udp_socket(mut self, socket: Arc<dyn quinn::AsyncUdpSocket>) -> Self {
        self.udp_socket = Some(socket);
        self
    }

    /// Seeds every random choice the peer makes (the QUIC endpoint's, its incarnation,
    /// reconnect jitter), so that a simulated run can be reproduced
    /// (`docs/simulation.md`). A restarted process must use another seed: the incarnation
    /// derived from it is how the directory tells a restart apart. Default: random from
    /// the operating system; do not set it in production.
    pub fn rng_seed(mut self, seed: u64) -> Self {
        self.rng_seed = Some(seed);
        self
    }

    /// Sets this process's incarnation, which must be higher than that of every earlier
    /// process under the same identity: the directory and senders take the highest as
    /// current. Default: the start time in milliseconds above 16 random bits (or, with
    /// [`rng_seed`](Self::rng_seed), a number derived from the seed). For simulations,
    /// whose start times are not reproducible; do not set it in production.
    pub fn incarnation(mut self, incarnation: u64) -> Self {
        self.incarnation = Some(incarnation);
        self
    }

    /// Does the peer's disk work (outbox appends, dedup state loads and saves) on the
    /// async runtime's own thread, blocking it, instead of waiting for the outbox writer
    /// thread or tokio's blocking pool (default `false`). For deterministic simulation
    /// only (`docs/simulation.md`): work finishing on another thread at a
    /// wall-clock-dependent moment would reorder the runtime's tasks. Never in
    /// production: it stalls every task of the runtime during each `fsync`.
    pub fn blocking_io(mut self, blocking: bool) -> Self {
        self.config.blocking_io = blocking;
        self
    }

    /// Opens the outbox, binds the endpoint, attaches to the directory and resumes
    /// sending whatever the outbox recovered.
    pub async fn start(self) -> Result<Peer> {
        let data_dir = self
            .data_dir
            .ok_or_else(|| Error::new(ErrorKind::Config, "data_dir is required"))?;
        if self.directories.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "at least one directory address is required",
            ));
        }
        if self.config.max_message + 64 * 1024 > self.config.max_frame {
            return Err(Error::new(
                ErrorKind::Config,
                "max_message must be at least 64 KiB below max_frame",
            ));
        }
        let creds = load_credentials(&self.identity, &data_dir, self.tls).await?;
        let mut outbox_config = OutboxConfig::new(data_dir.join("outbox"));
        if let Some(f) = self.outbox {
            outbox_config = f(outbox_config);
        }
        outbox_config.blocking_append |= self.config.blocking_io;
        let (outbox, recovery) = Outbox::open(outbox_config).await?;
        for damage in &recovery.damage {
            warn!(segment = %damage.segment.display(), offset = damage.offset, reason = %damage.reason, "outbox damage found during recovery");
        }
        let endpoint = match (self.udp_socket, self.rng_seed) {
            (None, None) => tls::endpoint(self.listen, &creds)?,
            (Some(socket), seed) => tls::endpoint_with_socket(socket, &creds, seed)?,
            (None, seed) => tls::endpoint_with_socket(tls::udp_socket(self.listen)?, &creds, seed)?,
        };
        let local_addr = endpoint
            .local_addr()
            .map_err(|e| Error::with_source(ErrorKind::Io, "reading the bound address", e))?;
        let loopback_client =
            tls::client_config_for(&creds, SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let incarnation = self
            .incarnation
            .unwrap_or_else(|| incarnation(self.rng_seed));
        let advertised = if self.advertise.is_empty() {
            vec![local_addr]
        } else {
            self.advertise
        };
        let inner = Arc::new(Inner {
            identity: creds.identity().to_string(),
            incarnation,
            local_addr,
            data_dir: data_dir.clone(),
            advertised,
            config: self.config,
            endpoint: endpoint.clone(),
            members: Members::new(endpoint.clone(), loopback_client),
            producer_id: outbox.producer_id(),
            outbox,
            core: Mutex::new(Dispatcher::new(DEFAULT_ACK_TIMEOUT)),
            links: Mutex::new(FxHashMap::default()),
            confirms: Mutex::new(SeqMap::default()),
            gathering: Mutex::new(None),
            routes: Mutex::new(FxHashMap::default()),
            targets: Mutex::new(FxHashMap::default()),
            lookups: Mutex::new(FxHashMap::default()),
            subscriptions: Mutex::new(FxHashMap::default()),
            directory: OnceLock::new(),
            jitter: Jitter::new(self.rng_seed.map(|s| s ^ 0x6c69_6e6b)),
            wall: WallClock::new(crate::clock::now()),
            runtime: tokio::runtime::Handle::current(),
        });
        *lock(&inner.core) = Dispatcher::new(inner.config.ack_timeout);
        let sink_inner = Arc::downgrade(&inner);
        let (client, client_task) = DirectoryClient::start(
            endpoint,
            ClientSettings {
                addrs: self.directories,
                hello: inner.hello(),
                max_frame: inner.config.max_frame,
                jitter: Jitter::new(self.rng_seed.map(|s| s ^ 0x6469_7263)),
            },
            Arc::new(move |route, freshness| {
                if let Some(inner) = sink_inner.upgrade() {
                    inner.on_route(route, freshness);
                }
            }),
        );
        let _ = inner.directory.set(client);
        let tasks = vec![
            client_task,
            tokio::spawn(crate::inbound::accept_loop(inner.clone())),
            tokio::spawn(tick_loop(Arc::downgrade(&inner))),
            tokio::spawn(persist_loop(Arc::downgrade(&inner))),
        ];
        inner.resume(recovery);
        info!(identity = %inner.identity, %local_addr, producer = format!("{:016x}", inner.producer_id), "peer started");
        Ok(Peer {
            inner: inner.clone(),
            guard: Arc::new(Guard { inner, tasks }),
        })
    }
}

async fn load_credentials(
    identity: &str,
    data_dir: &std::path::Path,
    tls: Option<TlsSource>,
) -> Result<Credentials> {
    match tls {
        Some(TlsSource::Loaded(c)) => Ok(c),
        Some(TlsSource::Files(ca, cert, key)) => Ok(Credentials::load(&ca, &cert, &key)?),
        Some(TlsSource::Dev(dir)) => {
            let dir = dir.unwrap_or_else(|| {
                data_dir
                    .parent()
                    .map(|p| p.join("dev-ca"))
                    .unwrap_or_else(|| PathBuf::from("dev-ca"))
            });
            let name = identity.to_string();
            let paths = tokio::task::spawn_blocking(move || certs::ensure_dev(&dir, &name, &[]))
                .await
                .map_err(|e| Error::with_source(ErrorKind::Tls, "development certificates", e))?
                .map_err(|e| Error::with_source(ErrorKind::Tls, "development certificates", e))?;
            Ok(Credentials::from_paths(&paths)?)
        }
        None => Err(Error::new(
            ErrorKind::Config,
            "no TLS credentials: call .tls_files(ca, cert, key) or .dev() for development",
        )),
    }
}

/// A directory address (anything convertible to a socket address).
#[derive(Debug, Clone, Copy)]
pub struct DirectoryAddr(SocketAddr);

impl From<SocketAddr> for DirectoryAddr {
    fn from(a: SocketAddr) -> Self {
        Self(a)
    }
}

impl From<&str> for DirectoryAddr {
    /// Parses `ip:port`. An unparsable address becomes `0.0.0.0:0`, which fails to
    /// connect with a clear log line; use `SocketAddr` to check early.
    fn from(s: &str) -> Self {
        Self(s.parse().unwrap_or_else(|_| {
            warn!(address = s, "unparsable directory address");
            SocketAddr::from(([0, 0, 0, 0], 0))
        }))
    }
}

/// A handle to a running peer. Cheap to clone; the peer stops when the last handle is
/// dropped or [`Peer::close`] is called.
#[derive(Clone)]
pub struct Peer {
    inner: Arc<Inner>,
    guard: Arc<Guard>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("identity", &self.inner.identity)
            .finish()
    }
}

struct Guard {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.inner.end_subscriptions();
        for t in &self.tasks {
            t.abort();
        }
        for control in lock(&self.inner.links).values() {
            control.close();
        }
        self.inner.endpoint.close(0u32.into(), b"peer closed");
    }
}

impl Peer {
    /// Starts configuring a peer whose identity (certificate name) is `identity`.
    pub fn builder(identity: impl Into<String>) -> PeerBuilder {
        PeerBuilder::new(identity.into())
    }

    /// This peer's identity.
    pub fn identity(&self) -> &str {
        &self.inner.identity
    }

    /// The address data connections reach this peer on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    // The publish methods are plain functions returning the inner future rather than
    // `async fn`s: each `async fn` layer would store its arguments (the message among
    // them) next to the future it awaits, and an application that keeps thousands of
    // publishes in flight (`FuturesUnordered`, `join_all`) allocates every one of them.

    /// Publishes `message` to `topic` with the peer's default durability. Returns once
    /// the message holds that durability (see [`Durability`]).
    ///
    /// Like tokio's channels, publishing takes part in the runtime's cooperative
    /// scheduling: a loop of publishes (or of [`publish_batch`](Self::publish_batch)
    /// calls) that never have to wait still yields now and then (about every 2,048
    /// messages), so that the peer's tasks on the same thread, which send the
    /// messages, keep running.
    pub fn publish<'a>(
        &'a self,
        topic: &'a str,
        message: Message,
    ) -> impl Future<Output = Result<Receipt>> + 'a {
        self.publish_with(
            topic,
            message,
            self.inner.config.durability,
            self.inner.config.when_full,
        )
    }

    /// Publishes and returns only after every target group acknowledged the message
    /// (durable in the outbox meanwhile).
    pub fn publish_confirmed<'a>(
        &'a self,
        topic: &'a str,
        message: Message,
    ) -> impl Future<Output = Result<Receipt>> + 'a {
        self.publish_with(
            topic,
            message,
            Durability::Confirmed,
            self.inner.config.when_full,
        )
    }

    /// Publishes with an explicit durability and quota behaviour.
    pub fn publish_with<'a>(
        &'a self,
        topic: &'a str,
        message: Message,
        durability: Durability,
        when_full: WhenFull,
    ) -> impl Future<Output = Result<Receipt>> + 'a {
        Publish::new(self.inner.submit(topic, message, durability, when_full))
    }

    /// Publishes `message` to `topic` with the peer's default durability without
    /// waiting for it: returns once the message is handed to the outbox (after waiting
    /// for room as [`WhenFull`] says), with a [`PendingReceipt`] that resolves to what
    /// [`publish`](Self::publish) would have returned, once the message holds that
    /// durability. The message is stored and delivered whether or not the receipt is
    /// awaited; an error here means nothing was stored.
    ///
    /// For pipelined publishing: keep a bounded number of receipts (a `VecDeque`,
    /// awaiting the oldest when it is full). One group commit then answers hundreds of
    /// `Disk` publishes at once, and the publishing task is woken once per commit, not
    /// once per message: several times the throughput of one `publish` at a time, and
    /// more than a `FuturesUnordered` of `publish` futures, with the same guarantees.
    /// The receipts of one task's `Disk` submits resolve in submit order, with
    /// increasing sequence numbers.
    ///
    /// ```no_run
    /// # async fn run(peer: weft_peer::Peer) -> weft_peer::Result<()> {
    /// use std::collections::VecDeque;
    /// use weft_peer::Message;
    ///
    /// let mut in_flight = VecDeque::new();
    /// for i in 0..100_000u32 {
    ///     if in_flight.len() == 512 {
    ///         if let Some(oldest) = in_flight.pop_front() {
    ///             oldest.await?;
    ///         }
    ///     }
    ///     in_flight.push_back(peer.submit("orders", Message::new(i.to_le_bytes().to_vec())).await?);
    /// }
    /// for receipt in in_flight {
    ///     receipt.await?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn submit<'a>(
        &'a self,
        topic: &'a str,
        message: Message,
    ) -> impl Future<Output = Result<PendingReceipt>> + 'a {
        self.submit_with(
            topic,
            message,
            self.inner.config.durability,
            self.inner.config.when_full,
        )
    }

    /// [`submit`](Self::submit) with an explicit durability and quota behaviour.
    pub fn submit_with<'a>(
        &'a self,
        topic: &'a str,
        message: Message,
        durability: Durability,
        when_full: WhenFull,
    ) -> impl Future<Output = Result<PendingReceipt>> + 'a {
        futures::TryFutureExt::map_ok(
            self.inner.submit(topic, message, durability, when_full),
            PendingReceipt::from,
        )
    }

    /// Publishes several messages to `topic` with the peer's default durability, as
    /// one outbox append: they get consecutive sequence numbers (their order is the
    /// publish order), share one group commit, and the call returns their receipts, in
    /// order, once all of them hold the durability. Each message carries exactly the
    /// guarantees of a single [`publish`](Self::publish); a batch only saves the
    /// per-message cost (one `fdatasync` wait, one hand-off), which is what makes
    /// `Disk` publishing fast.
    ///
    /// All or nothing: a message that fails its checks (size, metadata) fails the whole
    /// batch before anything is stored. The outbox quota (and, for `Memory` messages,
    /// the part of it they may take: `OutboxConfig::max_memory_messages` and
    /// `max_memory_bytes`) is reserved for the whole batch at once; a batch larger than
    /// either fails with [`ErrorKind::OutboxFull`].
    pub async fn publish_batch(
        &self,
        topic: &str,
        messages: impl IntoIterator<Item = Message>,
    ) -> Result<Vec<Receipt>> {
        self.publish_batch_with(
            topic,
            messages,
            self.inner.config.durability,
            self.inner.config.when_full,
        )
        .await
    }

    /// [`publish_batch`](Self::publish_batch) with an explicit durability and quota
    /// behaviour.
    pub async fn publish_batch_with(
        &self,
        topic: &str,
        messages: impl IntoIterator<Item = Message>,
        durability: Durability,
        when_full: WhenFull,
    ) -> Result<Vec<Receipt>> {
        self.inner
            .publish_batch(topic, messages.into_iter().collect(), durability, when_full)
            .await
    }

    /// Starts configuring a subscription to `topic`.
    pub fn subscribe(&self, topic: impl Into<String>) -> SubscribeBuilder {
        SubscribeBuilder {
            peer: self.clone(),
            topic: topic.into(),
            group: None,
            credit: DEFAULT_CREDIT,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
        }
    }

    /// The route of `topic` (groups and their live members) as this peer sees it: the
    /// cached one, kept fresh by the directory, or the directory's answer.
    pub async fn route(&self, topic: &str) -> Result<Route> {
        self.inner.route(topic).await
    }

    /// Messages waiting or in flight, per (topic, group) this peer publishes to.
    pub fn backlog(&self) -> Vec<GroupBacklog> {
        self.inner.core().backlog()
    }

    /// Outbox figures: pending messages and bytes, per-group oldest age, quota use.
    pub fn outbox_stats(&self) -> OutboxStats {
        self.inner.outbox.stats()
    }

    /// What the outbox found on disk when this peer started: messages resumed, and any
    /// damage (a torn tail truncated, corrupt records skipped; also logged as warnings).
    pub fn outbox_recovery(&self) -> &outbox::RecoveryReport {
        self.inner.outbox.recovery_report()
    }

    /// Waits until nothing is pending in the outbox (every message settled), or the
    /// timeout passes; returns whether it drained.
    pub async fn drain(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.inner.outbox.drained())
            .await
            .is_ok()
    }

    /// Stops the peer: ends its subscriptions (each hands over the deliveries already
    /// queued, then [`Subscription::recv`] returns `None`; acknowledgements of those no
    /// longer reach their senders, which deliver them again), saves dedup state,
    /// flushes the outbox bookkeeping, closes every connection and waits (up to 5 s)
    /// until background work ended and the UDP port is released. Unsettled messages
    /// stay in the outbox and are resent on the next start. Dropping the last handle
    /// of a peer stops it too, without waiting.
    pub async fn close(self) -> Result<()> {
        self.inner.end_subscriptions();
        self.inner.persist_dedup().await;
        self.inner.outbox.close().await?;
        let Peer { inner, guard } = self;
        for task in &guard.tasks {
            task.abort();
        }
        drop(guard);
        inner.endpoint.wait_idle().await;
        // Link and stream tasks hold the shared state until they notice the closed
        // endpoint; the socket is released when the last of them is gone.
        let deadline = crate::clock::now() + Duration::from_secs(5);
        while Arc::strong_count(&inner) > 1 && crate::clock::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}

/// Configures a subscription; see [`Peer::subscribe`].
pub struct SubscribeBuilder {
    peer: Peer,
    topic: String,
    group: Option<String>,
    credit: u32,
    max_queued_bytes: usize,
}

impl SubscribeBuilder {
    /// The group to join (default: a group named after this peer, i.e. every message).
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Unacknowledged messages each sender may have in flight to this subscription
    /// (default [`DEFAULT_CREDIT`]).
    pub fn credit(mut self, window: u32) -> Self {
        self.credit = window.max(1);
        self
    }

    /// Payload bytes of received messages the subscription queues for the
    /// application before its inbound streams stop reading, so that QUIC flow control
    /// holds the senders back (default [`DEFAULT_MAX_QUEUED_BYTES`]; at most 4 GiB). A
    /// batch larger than this waits for an empty queue. Messages the application has
    /// taken and not yet acknowledged are bounded by the credit instead.
    pub fn max_queued_bytes(mut self, bytes: usize) -> Self {
        self.max_queued_bytes = bytes.max(1);
        self
    }

    /// Registers with the directory and returns the stream of deliveries.
    pub async fn start(self) -> Result<Subscription> {
        let inner = &self.peer.inner;
        if self.topic.is_empty() {
            return Err(Error::new(ErrorKind::Config, "topic must not be empty"));
        }
        let group = self.group.unwrap_or_else(|| inner.identity.clone());
        let key = (self.topic.clone(), group.clone());
        let (queue, rx) = crate::subscription::delivery_queue(
            self.credit,
            self.max_queued_bytes,
            crate::subscription::envelope_bytes,
        );
        let dedup_path = crate::dedup::state_path(&inner.data_dir, &self.topic, &group);
        let path = dedup_path.clone();
        let dedup = if inner.config.blocking_io {
            crate::dedup::load(&path, crate::dedup::DEFAULT_MAX_RANGES)
        } else {
            tokio::task::spawn_blocking(move || {
                crate::dedup::load(&path, crate::dedup::DEFAULT_MAX_RANGES)
            })
            .await
            .map_err(|e| Error::with_source(ErrorKind::Io, "loading dedup state", e))?
        };
        let shared = Arc::new(SubShared {
            dedup_path,
            topic: self.topic.clone(),
            group: group.clone(),
            credit: self.credit,
            state: Mutex::new(SubState::new(dedup)),
            queue,
        });
        {
            let mut subs = lock(&inner.subscriptions);
            if subs.contains_key(&key) {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "already subscribed to {:?} in group {:?}",
                        self.topic, group
                    ),
                ));
            }
            subs.insert(key.clone(), shared.clone());
        }
        let sub_key = SubKey {
            topic: self.topic.clone(),
            group: group.clone(),
        };
        if let Err(e) = inner
            .directory()
            .register(sub_key.clone(), inner.config.directory_timeout)
            .await
        {
            lock(&inner.subscriptions).remove(&key);
            return Err(e);
        }
        let weak = Arc::downgrade(inner);
        Ok(Subscription {
            rx,
            shared,
            on_drop: Some(Box::new(move || {
                if let Some(inner) = weak.upgrade() {
                    if let Some(sub) = lock(&inner.subscriptions).remove(&key) {
                        sub.persist();
                    }
                    let directory = inner.directory().clone();
                    let timeout = inner.config.directory_timeout;
                    inner.runtime.spawn(async move {
                        let _ = directory.unregister(sub_key, timeout).await;
                    });
                }
            })),
        })
    }
}

/// Shared state of a running peer.
pub(crate) struct Inner {
    pub(crate) identity: String,
    pub(crate) incarnation: u64,
    pub(crate) local_addr: SocketAddr,
    data_dir: PathBuf,
    advertised: Vec<SocketAddr>,
    pub(crate) config: PeerConfig,
    pub(crate) endpoint: quinn::Endpoint,
    /// Where route members are, and the connections to them.
    pub(crate) members: Members,
    pub(crate) producer_id: u64,
    pub(crate) outbox: Outbox,
    core: Mutex<Dispatcher>,
    /// Link tasks by epoch (unique per link, so a closed link's successor under the
    /// same key has its own entry).
    links: Mutex<FxHashMap<LinkEpoch, Arc<LinkControl>>>,
    confirms: Mutex<SeqMap<oneshot::Sender<()>>>,
    /// Single `Disk` publishes being gathered for the outbox writer's next commit.
    gathering: Mutex<Option<Arc<Gathering>>>,
    routes: Mutex<FxHashMap<String, Route>>,
    /// Target groups per topic, derived from `routes` (read on every publish).
    targets: Mutex<FxHashMap<String, Arc<Targets>>>,
    /// Directory lookups of routes not cached yet, by topic: the publishes and
    /// `route` calls that miss the cache at once share one request.
    lookups: Mutex<FxHashMap<String, RouteLookup>>,
    subscriptions: Mutex<FxHashMap<(String, String), Arc<SubShared>>>,
    directory: OnceLock<DirectoryClient>,
    /// Reconnect jitter of the links.
    pub(crate) jitter: Jitter,
    /// Publish times, from the instant a publish reads for the dispatcher.
    wall: WallClock,
    /// The runtime the peer was started on: its tasks run there, whichever runtime or
    /// thread the call that starts one runs on (a publish abandoned during its commit,
    /// a subscription dropped), so that they live as long as the peer, not as the
    /// caller's runtime.
    pub(crate) runtime: tokio::runtime::Handle,
}

/// A directory lookup of one topic's route, awaited by every caller that missed the
/// route cache while it runs (see [`Inner::route`]).
type RouteLookup = futures::future::Shared<RouteWatch>;
type RouteWatch = std::pin::Pin<Box<dyn Future<Output = Result<Route, Arc<Error>>> + Send>>;

/// Random reconnect jitter: seeded by [`PeerBuilder::rng_seed`] (simulations), else
/// from the operating system.
pub(crate) struct Jitter(Mutex<rand::rngs::StdRng>);

impl Jitter {
    pub(crate) fn new(seed: Option<u64>) -> Self {
        use rand::SeedableRng;
        Self(Mutex::new(match seed {
            Some(seed) => rand::rngs::StdRng::seed_from_u64(seed),
            None => rand::rngs::StdRng::from_os_rng(),
        }))
    }

    /// A uniformly random number of milliseconds in `0..=max`.
    pub(crate) fn millis(&self, max: u64) -> u64 {
        use rand::Rng;
        lock(&self.0).random_range(0..=max)
    }
}

impl Inner {
    pub(crate) fn core(&self) -> std::sync::MutexGuard<'_, Dispatcher> {
        lock(&self.core)
    }

    fn directory(&self) -> &DirectoryClient {
        // Set in `start` before the handle is returned.
        self.directory
            .get()
            .expect("directory client is set at start")
    }

    pub(crate) fn hello(&self) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            identity: self.identity.clone(),
            incarnation: self.incarnation,
            role: Role::Peer,
            listen_addrs: self.advertised.clone(),
            zone: self.config.zone.clone(),
        }
    }

    /// Ends every subscription's delivery queue: each hands over what it holds, then
    /// its `recv` returns `None` (the peer is stopping).
    fn end_subscriptions(&self) {
        for sub in lock(&self.subscriptions).values() {
            sub.queue.close();
        }
    }

    pub(crate) fn subscription(&self, topic: &str, group: &str) -> Option<Arc<SubShared>> {
        lock(&self.subscriptions)
            .get(&(topic.to_string(), group.to_string()))
            .cloned()
    }

    /// Performs the dispatcher's actions.
    pub(crate) fn execute(self: &Arc<Self>, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::OpenLink(key, epoch) => {
                    let control = Arc::new(LinkControl::default());
                    lock(&self.links).insert(epoch, control.clone());
                    self.runtime
                        .spawn(link::run(self.clone(), key, epoch, control));
                }
                Action::CloseLink(epoch) => {
                    if let Some(control) = lock(&self.links).remove(&epoch) {
                        control.close();
                    }
                }
                Action::Wake(epoch) => {
                    if let Some(control) = lock(&self.links).get(&epoch) {
                        control.wake.notify_one();
                    }
                }
                Action::Settle { seqs, group } => self.outbox.settle_many(&seqs, &group),
                Action::Confirmed(seq) => {
                    if let Some(tx) = lock(&self.confirms).remove(&seq) {
                        let _ = tx.send(());
                    }
                }
            }
        }
    }

    fn on_route(self: &Arc<Self>, mut route: Route, freshness: Freshness) {
        if freshness == Freshness::Settling {
            if let Some(cached) = lock(&self.routes).get(&route.topic) {
                keep_cached_groups(&mut route, cached);
            }
        }
        self.members.learn(&route);
        let actions = self.core().on_route(crate::clock::now(), &route);
        // Computed before the cache's lock is taken: it takes the outbox's.
        let targets = self.targets_of(&route);
        lock(&self.targets).insert(route.topic.clone(), targets);
        let topic = route.topic.clone();
        lock(&self.routes).insert(topic.clone(), route);
        // The cache answers from now on: a lookup still listed (its callers gone before
        // it finished, say) is not joined by later misses.
        lock(&self.lookups).remove(&topic);
        self.execute(actions);
    }

    /// The cached route of `topic`, or the directory's answer to a watch. Callers that
    /// miss the cache while a lookup of the topic is under way wait for that one: a
    /// burst of publishes to a new topic (512 at once in `weft bench`) sent as many
    /// `Watch` requests before.
    async fn route(&self, topic: &str) -> Result<Route> {
        if let Some(route) = lock(&self.routes).get(topic) {
            return Ok(route.clone());
        }
        let lookup = {
            let mut lookups = lock(&self.lookups);
            let lookup = lookups.entry(topic.to_string()).or_insert_with(|| {
                let (client, topic) = (self.directory().clone(), topic.to_string());
                let timeout = self.config.directory_timeout;
                let watch = async move { client.watch(&topic, timeout).await.map_err(Arc::new) };
                futures::FutureExt::shared(Box::pin(watch) as RouteWatch)
            });
            lookup.clone()
        };
        let answer = lookup.clone().await;
        // An answer already ended the lookup (`on_route` removed it when it cached the
        // route); after an error the first caller back ends it, so the next miss asks
        // again instead of getting the old error.
        let mut lookups = lock(&self.lookups);
        if lookups.get(topic).is_some_and(|l| l.ptr_eq(&lookup)) {
            lookups.remove(topic);
        }
        answer.map_err(|e| Error::new(e.kind(), e.to_string()))
    }

    /// Checks `message` and appends it as stored in the outbox to `buf` (see
    /// [`message::append_stored`]); returns where it is and the hash of its key.
    /// `encoder` holds the topic (checked by the caller) and the publish time.
    fn prepare(
        &self,
        encoder: &message::StoredEncoder<'_>,
        message: &Message,
        buf: &mut Vec<u8>,
        with_payload: bool,
    ) -> Result<(std::ops::Range<usize>, Option<u64>)> {
        if message.payload.len() > self.config.max_message {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "payload of {} bytes exceeds max_message ({} bytes)",
                    message.payload.len(),
                    self.config.max_message
                ),
            ));
        }
        let record = encoder.append(buf, message, with_payload);
        let metadata = record.len() - message.payload.len() * usize::from(with_payload);
        if metadata > MESSAGE_METADATA_LIMIT {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("topic, key, tags and headers take {metadata} bytes; at most {MESSAGE_METADATA_LIMIT} allowed"),
            ));
        }
        Ok((record, message.key.as_deref().map(message::key_hash)))
    }

    /// Checks and encodes one message as stored in the outbox: its record, its payload
    /// when it stays a buffer of its own (see [`separate_payload`]), the hash of its
    /// key. Takes the message, so that no publish future holds it.
    fn encode_one(
        &self,
        topic: &str,
        message: Message,
        durability: Durability,
        unix_ms: u64,
    ) -> Result<(Bytes, Option<Bytes>, Option<u64>)> {
        check_topic(topic)?;
        let separate = separate_payload(durability, &message);
        let mut buf =
            crate::record_buffers::take(message::stored_len(topic, &message, unix_ms, !separate));
        let encoder = message::StoredEncoder::single(topic, unix_ms);
        let (_, key_hash) = self.prepare(&encoder, &message, &mut buf, !separate)?;
        let tail = separate.then_some(message.payload);
        Ok((Bytes::from(buf), tail, key_hash))
    }

    /// Hands `message` to the outbox (waiting for room as `when_full` says) and
    /// returns its receipt, which resolves once the message has `durability`; the
    /// message is handed to the dispatcher once stored, whether or not the receipt is
    /// awaited (see [`DispatchWhenStored`]).
    async fn submit(
        self: &Arc<Self>,
        topic: &str,
        message: Message,
        durability: Durability,
        when_full: WhenFull,
    ) -> Result<Submitted> {
        // A publish that never waits would otherwise never yield: see `yield_if_due`.
        yield_if_due(1).await;
        // One clock reading for the publish time and the dispatcher (read again only
        // after a wait).
        let mut now = crate::clock::now();
        let unix_ms = self.wall.unix_ms(now);
        let (mut record, tail, key_hash) = self.encode_one(topic, message, durability, unix_ms)?;
        // Each slow path below is boxed: every publish creates and moves its future
        // (an application's `FuturesUnordered` copies it three times), so it holds
        // only what the fast paths need.
        let targets = match self.cached_targets(topic) {
            Some(targets) => targets,
            None => Box::pin(self.targets_since(topic, &mut now)).await?,
        };
        // Disk records are whole (`separate_payload`), so the record is all there is.
        let whole_disk_record = durability == Durability::Disk && tail.is_none();
        if let (true, Some(checked), false) =
            (whole_disk_record, &targets.checked, self.config.blocking_io)
        {
            // Fast path: room in the quota, and the message joins (or starts) the
            // gathering of the writer's next commit.
            match self.gather(checked, &targets, record, key_hash)? {
                Ok(receipt) => return Ok(Submitted::Later(receipt)),
                Err(given_back) => record = given_back,
            }
        }
        let mut bodies: MemoryRecords = smallvec::smallvec![MemoryRecord { head: record, tail }];
        if durability == Durability::Memory {
            // Fast path: no writer round trip and no await between storing the message
            // and handing it to the dispatcher.
            let checked = self.checked(&targets)?;
            let attempt = self.outbox.try_append_memory_many(
                &checked,
                &mut bodies,
                outbox_when_full(when_full),
                unix_ms,
            )?;
            let appended = match attempt {
                outbox::MemoryAppend::Done(appended) => appended,
                outbox::MemoryAppend::Full(room) => {
                    Box::pin(self.append_memory_after(
                        room,
                        &checked,
                        &mut bodies,
                        outbox_when_full(when_full),
                        unix_ms,
                        &mut now,
                    ))
                    .await?
                }
            };
            if let Some(seqs) = appended {
                self.hand_off(now, seqs.start, &[key_hash], &targets, false);
                return Ok(Submitted::Now(self.receipt(seqs.start, &targets.groups)));
            }
        }
        // Boxed: the writer path's state would otherwise make every publish future,
        // fast path included, several times larger to create and move.
        Box::pin(self.submit_to_writer(&targets, bodies, &[key_hash], durability, when_full))
            .await
            .map(Submitted::Later)
    }

    /// Publishes `messages` as one outbox append: consecutive sequence numbers, one
    /// group commit, one hand-off to the dispatcher.
    async fn publish_batch(
        self: &Arc<Self>,
        topic: &str,
        messages: Vec<Message>,
        durability: Durability,
        when_full: WhenFull,
    ) -> Result<Vec<Receipt>> {
        yield_if_due(messages.len()).await;
        check_topic(topic)?;
        let mut records = Vec::with_capacity(messages.len());
        let mut key_hashes = Vec::with_capacity(messages.len());
        // One allocation and one clock reading for the whole batch.
        let mut now = crate::clock::now();
        let unix_ms = self.wall.unix_ms(now);
        let size = messages
            .iter()
            .map(|m| message::stored_len(topic, m, unix_ms, !separate_payload(durability, m)))
            .sum();
        let mut buf = Vec::with_capacity(size);
        let encoder = message::StoredEncoder::new(topic, unix_ms);
        for message in messages {
            let separate = separate_payload(durability, &message);
            let (record, key_hash) = self.prepare(&encoder, &message, &mut buf, !separate)?;
            records.push((record, separate.then_some(message.payload)));
            key_hashes.push(key_hash);
        }
        let buf = Bytes::from(buf);
        let mut bodies: MemoryRecords = records
            .into_iter()
            .map(|(record, tail)| MemoryRecord {
                head: buf.slice(record),
                tail,
            })
            .collect();
        if bodies.is_empty() {
            return Ok(Vec::new());
        }
        let targets = self.targets_since(topic, &mut now).await?;
        if durability == Durability::Memory {
            // As in `publish`: no writer round trip when the quota and lease allow.
            let appended = self
                .append_memory_since(&targets, &mut bodies, when_full, unix_ms, &mut now)
                .await?;
            if let Some(seqs) = appended {
                self.hand_off(now, seqs.start, &key_hashes, &targets, false);
                return Ok(seqs.map(|seq| self.receipt(seq, &targets.groups)).collect());
            }
        }
        let seqs =
            Box::pin(self.store(&targets, bodies, &key_hashes, durability, when_full)).await?;
        Ok(seqs.map(|seq| self.receipt(seq, &targets.groups)).collect())
    }

    /// Adds a `Disk` message to the open [`Gathering`] of `targets`, or starts one
    /// (handing it to the writer); gives the record back when the quota or the
    /// writer's channel is full (the caller takes the waiting path).
    fn gather(
        self: &Arc<Self>,
        checked: &outbox::TargetGroups,
        targets: &Arc<Targets>,
        mut record: Bytes,
        key_hash: Option<u64>,
    ) -> Result<std::result::Result<PendingReceipt, Bytes>> {
        let len = record.len() as u64;
        let receipt = |gathering: &Arc<Gathering>, index| {
            PendingReceipt::gathered(gathering.clone(), index, self.receipt_of(&targets.groups))
        };
        let mut open = lock(&self.gathering);
        if let Some(gathering) = open.as_ref().filter(|g| Arc::ptr_eq(g.targets(), targets)) {
            record = match gathering.join(record, key_hash) {
                Join::Joined(index) => return Ok(Ok(receipt(gathering, index))),
                Join::Closed(record) => record,
                Join::NoCredit(record) => {
                    let Some(credit) = self.reserve_credit(checked, len)? else {
                        return Ok(Err(record));
                    };
                    if !gathering.add_credit(credit) {
                        self.outbox.unreserve_disk(checked, credit.0, credit.1);
                    }
                    match gathering.join(record, key_hash) {
                        Join::Joined(index) => return Ok(Ok(receipt(gathering, index))),
                        // Sealed by the writer meanwhile (the credit went with it).
                        Join::Closed(record) | Join::NoCredit(record) => record,
                    }
                }
            };
        }
        // Sealed, full, or for other targets: a new gathering, after the open one.
        let mut expected = 0;
        if let Some(old) = open.take() {
            old.seal();
            expected = old.len();
        }
        let Some(credit) = self.reserve_credit(checked, len)? else {
            return Ok(Err(record));
        };
        // A clone (once per gathering) to give back if the writer cannot take it.
        let gathering = Gathering::new(
            Arc::downgrade(self),
            targets.clone(),
            (record.clone(), key_hash),
            (credit.0 - 1, credit.1 - len),
            expected,
        );
        let handed = self
            .outbox
            .try_gather(checked, Box::new(GatherHandle(gathering.clone())));
        if let Ok(Ok(())) = handed {
            *open = Some(gathering.clone());
            return Ok(Ok(receipt(&gathering, 0)));
        }
        drop(open);
        self.outbox.unreserve_disk(checked, credit.0, credit.1);
        // Closed, or the channel was full (the caller waits for room).
        handed.map_err(Error::from).map(|_| Err(record))
    }

    /// Reserves outbox quota for a gathered message of `len` bytes and, room
    /// permitting, for more of its size ([`gather::credit_messages`]), so that the next ones
    /// join without taking the outbox's lock (which the writer holds while it records
    /// a commit: reserving per message cost a fifth of `Disk` publish throughput). The
    /// gathering gives back what its messages did not take. `None` when not even this
    /// message fits.
    fn reserve_credit(
        &self,
        checked: &outbox::TargetGroups,
        len: u64,
    ) -> Result<Option<(u64, u64)>> {
        for messages in [gather::credit_messages(len), 1] {
            if self
                .outbox
                .try_reserve_disk(checked, messages, messages * len)?
            {
                return Ok(Some((messages, messages * len)));
            }
        }
        Ok(None)
    }

    /// Seals the open gathering, if any, before another request to the writer: a
    /// later publish must not join an append that precedes an earlier one's.
    fn seal_gathering(&self) {
        if let Some(gathering) = lock(&self.gathering).take() {
            gathering.seal();
        }
    }

    /// The writer path of one publish: [`store`](Self::store) without the waits, the
    /// receipt waiting instead.
    async fn submit_to_writer(
        self: &Arc<Self>,
        targets: &Arc<Targets>,
        bodies: MemoryRecords,
        key_hashes: &[Option<u64>],
        durability: Durability,
        when_full: WhenFull,
    ) -> Result<PendingReceipt> {
        if self.config.blocking_io {
            let seqs = self
                .store(targets, bodies, key_hashes, durability, when_full)
                .await?;
            return Ok(PendingReceipt::ready(
                self.receipt(seqs.start, &targets.groups),
            ));
        }
        let confirmed = durability == Durability::Confirmed;
        let stored = self
            .hand_to_writer(
                targets, bodies, key_hashes, durability, when_full, confirmed,
            )
            .await?;
        Ok(PendingReceipt::storing(
            stored,
            self.receipt_of(&targets.groups),
        ))
    }

    fn receipt(&self, seq: Seq, targets: &[String]) -> Receipt {
        self.receipt_of(targets).at(seq)
    }

    /// What the receipts of a publish to `targets` share.
    fn receipt_of(&self, targets: &[String]) -> ReceiptOf {
        ReceiptOf {
            producer: self.producer_id,
            groups: targets.len(),
        }
    }

    /// Stores messages through the outbox writer with `durability`, hands them to the
    /// dispatcher, and for `Confirmed` waits until every target group acknowledged them.
    async fn store(
        self: &Arc<Self>,
        targets: &Arc<Targets>,
        bodies: MemoryRecords,
        key_hashes: &[Option<u64>],
        durability: Durability,
        when_full: WhenFull,
    ) -> Result<std::ops::Range<Seq>> {
        let confirmed = durability == Durability::Confirmed;
        if self.config.blocking_io {
            return self
                .store_blocking(
                    targets, bodies, key_hashes, durability, when_full, confirmed,
                )
                .await;
        }
        let stored = self
            .hand_to_writer(
                targets, bodies, key_hashes, durability, when_full, confirmed,
            )
            .await?;
        let Stored { seqs, confirms } = receipt::stored_answer(stored.await)?;
        receipt::confirmed(confirms).await?;
        Ok(seqs)
    }

    /// Hands messages to the outbox writer with a [`DispatchWhenStored`]; the
    /// receiver hears when they are stored.
    async fn hand_to_writer(
        self: &Arc<Self>,
        targets: &Arc<Targets>,
        bodies: MemoryRecords,
        key_hashes: &[Option<u64>],
        durability: Durability,
        when_full: WhenFull,
        confirmed: bool,
    ) -> Result<receipt::StoredRx> {
        let checked = self.checked(targets)?;
        let (then, stored) = self.dispatch_when_stored(key_hashes, targets, confirmed);
        self.seal_gathering();
        self.outbox
            .submit_batch_then(
                &checked,
                writer_records(bodies),
                stored_durability(durability),
                outbox_when_full(when_full),
                then,
            )
            .await?;
        Ok(stored)
    }

    /// [`store`](Self::store) for simulations (`blocking_io`): the append is awaited
    /// on this thread (see `OutboxConfig::blocking_append`) and the messages handed to
    /// the dispatcher here, so that no other thread wakes the runtime.
    async fn store_blocking(
        self: &Arc<Self>,
        targets: &Arc<Targets>,
        bodies: MemoryRecords,
        key_hashes: &[Option<u64>],
        durability: Durability,
        when_full: WhenFull,
        confirmed: bool,
    ) -> Result<std::ops::Range<Seq>> {
        let checked = self.checked(targets)?;
        let mut ticket = self
            .outbox
            .submit_batch(
                &checked,
                writer_records(bodies),
                stored_durability(durability),
                outbox_when_full(when_full),
            )
            .await?;
        let seqs = ticket.wait().await?;
        let confirms = self.hand_off(
            crate::clock::now(),
            seqs.start,
            key_hashes,
            targets,
            confirmed,
        );
        receipt::confirmed(confirms).await?;
        Ok(seqs)
    }

    /// A continuation for the outbox writer that hands the append's messages (one per
    /// key hash) to the dispatcher once stored, and the channel it then answers on.
    fn dispatch_when_stored(
        self: &Arc<Self>,
        key_hashes: &[Option<u64>],
        targets: &Arc<Targets>,
        confirmed: bool,
    ) -> (Box<dyn outbox::AppendDone>, receipt::StoredRx) {
        let (tx, rx) = receipt::stored_channel();
        let then = Box::new(DispatchWhenStored {
            inner: Arc::downgrade(self),
            key_hashes: key_hashes.iter().copied().collect(),
            targets: targets.clone(),
            confirmed,
            tx,
        });
        (then, rx)
    }

    /// The target groups of `topic` if the route cache has them.
    fn cached_targets(&self, topic: &str) -> Option<Arc<Targets>> {
        lock(&self.targets).get(topic).cloned()
    }

    /// The target groups of `topic`, from the route cache or the directory; `now` is
    /// read again if they had to be looked up.
    async fn targets_since(
        &self,
        topic: &str,
        now: &mut std::time::Instant,
    ) -> Result<Arc<Targets>> {
        if let Some(targets) = self.cached_targets(topic) {
            return Ok(targets);
        }
        // Boxed, as the writer path in `publish`: a route miss is rare.
        let targets = self.targets_of(&Box::pin(self.route(topic)).await?);
        *now = crate::clock::now();
        Ok(targets)
    }

    /// [`Outbox::append_memory_many`]; `now` is read again if it waited for room, so
    /// that no message is handed to the dispatcher with a stale `now`. The first
    /// attempt is synchronous and only a wait for room is a (boxed) future: the append
    /// future in every publish's made it 1.5 × the size, and each publish creates and
    /// moves its future.
    async fn append_memory_since(
        &self,
        targets: &Targets,
        bodies: &mut MemoryRecords,
        when_full: WhenFull,
        unix_ms: u64,
        now: &mut std::time::Instant,
    ) -> Result<Option<std::ops::Range<Seq>>> {
        let checked = self.checked(targets)?;
        let when_full = outbox_when_full(when_full);
        match self
            .outbox
            .try_append_memory_many(&checked, bodies, when_full, unix_ms)?
        {
            outbox::MemoryAppend::Done(appended) => Ok(appended),
            outbox::MemoryAppend::Full(room) => {
                Box::pin(self.append_memory_after(room, &checked, bodies, when_full, unix_ms, now))
                    .await
            }
        }
    }

    /// The slow path of a `Memory` append whose first attempt found the outbox full:
    /// waits for `room`, then appends as [`Outbox::append_memory_many`] does, and
    /// reads `now` again (it waited).
    async fn append_memory_after(
        &self,
        room: outbox::RoomFreed<'_>,
        checked: &outbox::TargetGroups,
        bodies: &mut MemoryRecords,
        when_full: outbox::WhenFull,
        unix_ms: u64,
        now: &mut std::time::Instant,
    ) -> Result<Option<std::ops::Range<Seq>>> {
        room.await;
        let appended = self
            .outbox
            .append_memory_many(checked, bodies, when_full, unix_ms)
            .await?;
        *now = crate::clock::now();
        Ok(appended)
    }

    /// `targets` as the outbox registered them, or the error it refused them with.
    fn checked<'t>(
        &self,
        targets: &'t Targets,
    ) -> Result<std::borrow::Cow<'t, outbox::TargetGroups>> {
        Ok(match &targets.checked {
            Some(checked) => std::borrow::Cow::Borrowed(checked),
            // Refused when the route came: checked again, for the error.
            None => std::borrow::Cow::Owned(self.outbox.target_groups(targets.groups.clone())?),
        })
    }

    /// The target groups of `route`'s topic, checked and registered with the outbox.
    fn targets_of(&self, route: &Route) -> Arc<Targets> {
        let groups: Arc<[String]> = route.groups.iter().map(|g| g.group.clone()).collect();
        let checked = self.outbox.target_groups(groups.clone()).ok();
        let queues = self.core().queue_ids(&route.topic, &groups).collect();
        Arc::new(Targets {
            groups,
            checked,
            queues,
        })
    }

    /// Gives stored messages `first..` (one per key hash) to the dispatcher; with
    /// `confirmed`, returns the receivers told when every target group acknowledged
    /// each of them.
    pub(crate) fn hand_off(
        self: &Arc<Self>,
        now: std::time::Instant,
        first: Seq,
        key_hashes: &[Option<u64>],
        targets: &Targets,
        confirmed: bool,
    ) -> Vec<oneshot::Receiver<()>> {
        let mut waiters = Vec::new();
        if confirmed {
            let mut confirms = lock(&self.confirms);
            for seq in first..first + key_hashes.len() as u64 {
                let (tx, rx) = oneshot::channel();
                confirms.insert(seq, tx);
                waiters.push(rx);
            }
        }
        let actions =
            self.core()
                .on_publish_queued(now, first, key_hashes, &targets.queues, confirmed);
        self.execute(actions);
        waiters
    }

    /// Feeds the recovered outbox backlog to the dispatcher and watches its topics.
    fn resume(self: &Arc<Self>, recovery: outbox::Recovery) {
        if recovery.pending.is_empty() {
            return;
        }
        info!(
            pending = recovery.pending.len(),
            "resuming delivery of recovered outbox messages"
        );
        let mut topics = std::collections::BTreeSet::new();
        let now = crate::clock::now();
        let mut actions = Vec::new();
        {
            let mut core = self.core();
            for record in &recovery.pending {
                let id = MessageId {
                    producer: self.producer_id,
                    seq: record.seq,
                };
                let Some(envelope) = message::decode_stored(id, &record.body) else {
                    warn!(%id, "recovered outbox record is not a valid message; skipping");
                    continue;
                };
                let key_hash = envelope.key().map(message::key_hash);
                actions.extend(core.on_publish(
                    now,
                    record.seq,
                    &envelope.topic,
                    key_hash,
                    &record.unsettled,
                    false,
                ));
                topics.insert(envelope.topic.to_string());
            }
        }
        self.execute(actions);
        for topic in topics {
            let inner = self.clone();
            self.runtime.spawn(async move {
                if let Err(e) = inner.route(&topic).await {
                    warn!(%topic, error = %e, "cannot resolve the route of recovered messages yet");
                }
            });
        }
    }

    /// Saves the dedup state of every subscription that changed.
    async fn persist_dedup(&self) {
        let subs: Vec<Arc<SubShared>> = lock(&self.subscriptions).values().cloned().collect();
        if self.config.blocking_io {
            subs.iter().for_each(|s| s.persist());
            return;
        }
        let _ = tokio::task::spawn_blocking(move || subs.iter().for_each(|s| s.persist())).await;
    }
}

/// This process's incarnation: the start time in milliseconds above 16 random bits, so
/// that a restarted process has a higher one than its predecessor (the directory lets the
/// highest incarnation of a peer win while an old one is still known). A seeded
/// (simulated) peer derives it from the seed alone, keeping runs reproducible.
fn incarnation(seed: Option<u64>) -> u64 {
    use rand::{RngCore, SeedableRng};
    match seed {
        Some(seed) => rand::rngs::StdRng::seed_from_u64(seed).next_u64().max(1),
        None => {
            let millis = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            (millis << 16) | (rand::random::<u64>() & 0xffff)
        }
    }
}

/// Hands an append's messages to the dispatcher once the outbox writer stored them,
/// on the writer thread: stored messages reach their groups whether or not the publish
/// is still awaited (a stored message never dispatched would wait for the next
/// restart), and a commit's messages go to the dispatcher together, without a wake-up
/// of each publish first.
struct DispatchWhenStored {
    /// Weak: queued appends must not keep a dropped peer (and its outbox) alive.
    inner: std::sync::Weak<Inner>,
    key_hashes: smallvec::SmallVec<[Option<u64>; 1]>,
    targets: Arc<Targets>,
    confirmed: bool,
    tx: receipt::StoredTx,
}

impl outbox::AppendDone for DispatchWhenStored {
    fn done(
        self: Box<Self>,
        result: std::result::Result<std::ops::Range<u64>, outbox::OutboxError>,
    ) {
        let answer = result.map_err(Error::from).and_then(|seqs| {
            // A dropped peer dispatches nothing: the messages are stored (as a
            // gathering's are), and the next peer on this outbox resumes them; only a
            // `Confirmed` publish, which waits for the groups, fails.
            let Some(inner) = self.inner.upgrade() else {
                if self.confirmed {
                    return Err(Error::new(
                        ErrorKind::Closed,
                        "peer dropped before every group acknowledged",
                    ));
                }
                let confirms = Vec::new();
                return Ok(Stored { seqs, confirms });
            };
            let confirms = inner.hand_off(
                crate::clock::now(),
                seqs.start,
                &self.key_hashes,
                &self.targets,
                self.confirmed,
            );
            Ok(Stored { seqs, confirms })
        });
        // The receipt may have been dropped: nobody is waiting.
        let _ = self.tx.send(answer);
    }
}

/// Records as the outbox writer takes them: in one piece (a `Memory` one in two
/// pieces comes to the writer only when its sequence lease must be renewed first).
fn writer_records(bodies: MemoryRecords) -> Vec<Bytes> {
    bodies
        .into_iter()
        .map(MemoryRecord::into_contiguous)
        .collect()
}

/// The outbox durability a publish's `durability` stores with.
fn stored_durability(durability: Durability) -> outbox::Durability {
    match durability {
        Durability::Memory => outbox::Durability::Memory,
        Durability::Disk | Durability::Confirmed => outbox::Durability::Disk,
    }
}

/// Messages published on one thread per unit of tokio's cooperative budget (see
/// [`yield_if_due`]): a loop of publishes that never wait yields about every 2,048
/// messages (tokio's budget is 128 units), one at a time or in batches. Measured on 2
/// cores (`weft bench`, session 30 in `docs/benchmarks.md`): one unit per publish cost
/// a quarter of a `memory` publish loop's throughput (link batches of ~128); one per
/// 16 costs it 7–11 % against never yielding and the single `disk` figure nothing,
/// and gains 11 % (`memory`) and 39 % (`disk`) with `publish_batch`, while the
/// publish-to-delivery p50 of such loops falls from 30–40 ms to about 2 ms; one per
/// 64 did not cost less.
const PUBLISHES_PER_BUDGET_UNIT: u32 = 16;

/// Takes a unit of the task's cooperative budget (tokio's, as its channels and sockets
/// do) for every [`PUBLISHES_PER_BUDGET_UNIT`] messages published on this thread
/// (`messages` now), yielding once when the budget is spent. A loop of publishes that
/// never wait for room would otherwise keep its worker thread to itself: the tasks it
/// wakes there (the links that send its messages) wait in the worker's next-task
/// slot, which other workers do not steal from, until the loop yields; its messages
/// queued until the outbox's memory limit stopped it (35 ms publish-to-delivery at
/// 1 M msgs/s, against 2 ms with the yields).
async fn yield_if_due(messages: usize) {
    thread_local! {
        static PUBLISHES: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    let units = PUBLISHES.with(|count| {
        let before = count.get();
        count.set(before.wrapping_add(messages as u32));
        // Units for the multiples of `PUBLISHES_PER_BUDGET_UNIT` this call passes (it
        // divides 2^32, so the remainder stays right when the count wraps).
        (u64::from(before % PUBLISHES_PER_BUDGET_UNIT) + messages as u64)
            / u64::from(PUBLISHES_PER_BUDGET_UNIT)
    });
    for _ in 0..units {
        tokio::task::coop::consume_budget().await;
    }
}

/// Whether `message`'s payload stays its own buffer behind its record's head (see
/// [`message::SEPARATE_PAYLOAD_MIN`]): only `Memory` records, which never go to disk.
fn separate_payload(durability: Durability, message: &Message) -> bool {
    durability == Durability::Memory && message.payload.len() >= message::SEPARATE_PAYLOAD_MIN
}

fn check_topic(topic: &str) -> Result<()> {
    if topic.is_empty() {
        return Err(Error::new(ErrorKind::Config, "topic must not be empty"));
    }
    Ok(())
}

/// The outbox's own `WhenFull` for the public one.
fn outbox_when_full(when_full: WhenFull) -> outbox::WhenFull {
    match when_full {
        WhenFull::Wait => outbox::WhenFull::Wait,
        WhenFull::Fail => outbox::WhenFull::Fail,
    }
}

/// Adds to `route` the groups of `cached` it lacks (with their cached members), for a
/// route from a directory node that may still be learning registrations.
fn keep_cached_groups(route: &mut Route, cached: &Route) {
    let missing: Vec<_> = cached
        .groups
        .iter()
        .filter(|c| !route.groups.iter().any(|g| g.group == c.group))
        .cloned()
        .collect();
    if missing.is_empty() {
        return;
    }
    tracing::debug!(topic = %route.topic, groups = missing.len(), "directory still settling; keeping cached groups");
    route.groups.extend(missing);
    route.groups.sort_by(|a, b| a.group.cmp(&b.group));
}

/// The target groups of a route.
/// The target groups of a topic: one per group of its route.
#[derive(Debug, Clone)]
pub(crate) struct Targets {
    groups: Arc<[String]>,
    /// Checked and registered with the outbox once per route, not per publish (`None`
    /// if the outbox refused them).
    checked: Option<outbox::TargetGroups>,
    /// The dispatcher's queues of these groups.
    queues: smallvec::SmallVec<[QueueId; 2]>,
}

#[cfg(test)]
impl Targets {
    /// Targets of no group, for the unit tests of other modules.
    pub(crate) fn none() -> Arc<Targets> {
        Arc::new(Targets {
            groups: Arc::from([]),
            checked: None,
            queues: smallvec::SmallVec::new(),
        })
    }
}

async fn tick_loop(inner: std::sync::Weak<Inner>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = crate::clock::now();
        inner.wall.resync(now);
        let actions = inner.core().tick(now);
        inner.execute(actions);
    }
}

/// How often changed dedup state is saved. A receiver crash can lose at most this much
/// of it: messages acked in that window whose acks did not reach the sender may be
/// delivered once more after the restart.
pub const DEDUP_SAVE_INTERVAL: Duration = Duration::from_millis(500);

async fn persist_loop(inner: std::sync::Weak<Inner>) {
    let mut ticker = tokio::time::interval(DEDUP_SAVE_INTERVAL);
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        inner.persist_dedup().await;
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns (with the argument it holds), without
    /// calling it.
    fn future_size<A, F, Fut>(_: F) -> usize
    where
        F: FnOnce(A) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every publish creates and moves its future (an application's `join_all` or
    /// `FuturesUnordered` boxes it): the writer path and the route lookup, which a
    /// `Memory` publish rarely takes, are boxed so that they do not size it. Embedded,
    /// the future was 1,072 bytes; 656 when this test was written; 568 once a `Memory`
    /// append's first attempt was synchronous; 480 (`Inner::submit`) and 496
    /// (`Peer::publish`, its submit then its receipt) once `Disk` publishes were
    /// gathered.
    #[test]
    fn the_publish_future_stays_small() {
        let publish = future_size(|i: Arc<Inner>| async move {
            i.submit(
                "t",
                Message::new(vec![]),
                Durability::Memory,
                WhenFull::Wait,
            )
            .await
        });
        let batch = future_size(|i: Arc<Inner>| async move {
            i.publish_batch("t", vec![], Durability::Memory, WhenFull::Wait)
                .await
        });
        // What the application holds: `Peer::publish` adds only the receipt's state
        // (as `async fn`s, the public wrappers made it 936 bytes).
        let public =
            future_size(|p: Peer| async move { p.publish("t", Message::new(vec![])).await });
        assert!(publish <= 600, "publish future is {publish} bytes");
        assert!(
            public <= publish + 32,
            "Peer::publish future is {public} bytes, Inner::submit {publish}"
        );
        assert!(batch <= 768, "publish_batch future is {batch} bytes");
    }
}
