//! The peer's link to the directory: attach to one node, fail over to another when it
//! is lost (backoff with jitter), keep the desired registrations and watches, and push
//! every route received to the peer. Routes stay cached in the peer while no directory
//! node is reachable, so existing flows keep delivering.
//!
//! A node is lost when its connection closes, or when nothing at all arrived on it for
//! [`DIRECTORY_IDLE_TIMEOUT`] although both sides send keep-alives every
//! [`KEEP_ALIVE_INTERVAL`]: a node killed without closing its connections is noticed
//! then, well within the directory cluster's dead-node route grace (15 s by default,
//! during which the other nodes keep the dead node's registrations), rather than after
//! the 10 s QUIC idle timeout of data connections.

use crate::error::{Error, ErrorKind, Result};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use weft_proto::tls::{DIRECTORY_IDLE_TIMEOUT, KEEP_ALIVE_INTERVAL};
use weft_proto::wire::{
    self, DirRequest, DirResponse, Frame, FrameReader, FrameWriter, Hello, Route, Subscription,
};

/// Bound of queued directory commands from the application.
const COMMAND_QUEUE: usize = 1024;
/// First and largest delay between attempts to reach a directory node.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often an attached node's connection is checked for silence.
const SILENCE_CHECK: Duration = Duration::from_millis(250);
/// QUIC application close code sent to a node given up for silence.
const SILENT_CLOSE_CODE: u32 = 1;

// A healthy connection must carry several keep-alives within the silence limit.
const _: () = assert!(KEEP_ALIVE_INTERVAL.as_millis() * 3 <= DIRECTORY_IDLE_TIMEOUT.as_millis());

type Reply = oneshot::Sender<Result<Option<Route>>>;

enum Command {
    Register(Subscription, Reply),
    Unregister(Subscription, Reply),
    Watch(String, Reply),
}

/// Called with every route the directory sends.
pub(crate) type RouteSink = Arc<dyn Fn(Route, Freshness) + Send + Sync>;

fn freshness(attached: std::time::Instant) -> Freshness {
    if crate::clock::now().saturating_duration_since(attached) < RESYNC_SETTLE {
        Freshness::Settling
    } else {
        Freshness::Settled
    }
}

fn wire_err(e: wire::WireError) -> Error {
    Error::with_source(ErrorKind::DirectoryUnavailable, "directory stream", e)
}

/// Requests sent on the current directory stream and not answered yet, by id.
#[derive(Default)]
struct Pending {
    next_id: u64,
    by_id: HashMap<u64, (DirRequest, Option<Reply>)>,
}

impl Pending {
    /// Queues `req` on `writer` (the caller flushes) and remembers whom to answer.
    fn queue(
        &mut self,
        writer: &mut FrameWriter,
        req: DirRequest,
        reply: Option<Reply>,
    ) -> Result<()> {
        self.next_id += 1;
        writer
            .queue(&Frame::Request {
                id: self.next_id,
                body: req.clone(),
            })
            .map_err(wire_err)?;
        self.by_id.insert(self.next_id, (req, reply));
        Ok(())
    }
}

/// How far a route from the directory can be trusted to list every subscribed group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Freshness {
    /// Sent within [`RESYNC_SETTLE`] of attaching to a directory node. The node may
    /// not know every registration yet (it restarted and its peers are re-registering,
    /// or it is still catching up through gossip): a group missing from it may only
    /// be late, so the peer keeps its cached groups.
    Settling,
    /// Sent later: authoritative.
    Settled,
}

/// After attaching to a directory node, routes are [`Freshness::Settling`] for this long
/// (the directory's default grace period: the time peers have to re-register); then
/// every watched topic is fetched again.
pub(crate) const RESYNC_SETTLE: Duration = Duration::from_secs(3);

/// What the client needs to attach.
pub(crate) struct ClientSettings {
    pub addrs: Vec<SocketAddr>,
    pub hello: Hello,
    pub max_frame: usize,
    /// Reconnect jitter (seeded in simulations).
    pub jitter: crate::peer::Jitter,
}

/// Handle to the directory client task.
#[derive(Clone)]
pub(crate) struct DirectoryClient {
    commands: mpsc::Sender<Command>,
}

impl DirectoryClient {
    pub(crate) fn start(
        endpoint: quinn::Endpoint,
        settings: ClientSettings,
        sink: RouteSink,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let task = tokio::spawn(run(endpoint, settings, sink, rx));
        (Self { commands: tx }, task)
    }

    async fn call(
        &self,
        make: impl FnOnce(Reply) -> Command,
        timeout: Duration,
    ) -> Result<Option<Route>> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| Error::new(ErrorKind::Closed, "peer is shut down"))?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::new(ErrorKind::Closed, "peer is shut down")),
            Err(_) => Err(Error::new(
                ErrorKind::DirectoryUnavailable,
                format!("no directory node answered within {timeout:?}; check the directory addresses and that a node is running"),
            )),
        }
    }

    /// Registers a subscription; it is re-registered on every reconnect. Returns once a
    /// directory node accepted it (or the timeout passed: the registration stays desired).
    pub(crate) async fn register(&self, sub: Subscription, timeout: Duration) -> Result<()> {
        self.call(|r| Command::Register(sub, r), timeout)
            .await
            .map(|_| ())
    }

    /// Removes a subscription.
    pub(crate) async fn unregister(&self, sub: Subscription, timeout: Duration) -> Result<()> {
        self.call(|r| Command::Unregister(sub, r), timeout)
            .await
            .map(|_| ())
    }

    /// Watches a topic; returns its current route.
    pub(crate) async fn watch(&self, topic: &str, timeout: Duration) -> Result<Route> {
        match self
            .call(|r| Command::Watch(topic.to_string(), r), timeout)
            .await?
        {
            Some(route) => Ok(route),
            None => Err(Error::new(
                ErrorKind::Protocol,
                "directory answered Watch without a route",
            )),
        }
    }
}

/// Desired state, kept across reconnects.
#[derive(Default)]
struct Desired {
    subscriptions: BTreeSet<Subscription>,
    watches: BTreeSet<String>,
    /// Replies owed once the next directory node answers.
    waiting: Vec<(DirRequest, Reply)>,
}

async fn run(
    endpoint: quinn::Endpoint,
    settings: ClientSettings,
    sink: RouteSink,
    mut commands: mpsc::Receiver<Command>,
) {
    let mut desired = Desired::default();
    let mut backoff = BACKOFF_MIN;
    // Addresses are tried in the configured order: the first is the preferred node.
    let mut next = 0usize;
    loop {
        let Some(addr) = settings
            .addrs
            .get(next % settings.addrs.len().max(1))
            .copied()
        else {
            warn!("no directory addresses configured");
            return;
        };
        next += 1;
        let attached = attach(
            &endpoint,
            addr,
            &settings,
            &mut desired,
            &sink,
            &mut commands,
        )
        .await;
        match attached {
            Ok(Exit::Shutdown) => return,
            Ok(Exit::Lost) => {
                backoff = BACKOFF_MIN;
                info!(%addr, "directory node lost; failing over");
            }
            Err(e) => debug!(%addr, error = %e, "directory node unreachable"),
        }
        let jitter = settings.jitter.millis(backoff.as_millis() as u64 / 2);
        let delay = backoff + Duration::from_millis(jitter);
        // Keep accepting commands while waiting, so callers queue rather than block.
        let deadline = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                cmd = commands.recv() => match cmd {
                    Some(cmd) => remember(&mut desired, cmd),
                    None => return,
                },
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

enum Exit {
    Shutdown,
    Lost,
}

fn remember(desired: &mut Desired, cmd: Command) {
    let (req, reply) = match cmd {
        Command::Register(s, r) => {
            desired.subscriptions.insert(s.clone());
            (DirRequest::Register(s), r)
        }
        Command::Unregister(s, r) => {
            desired.subscriptions.remove(&s);
            (DirRequest::Unregister(s), r)
        }
        Command::Watch(t, r) => {
            desired.watches.insert(t.clone());
            (DirRequest::Watch { topic: t }, r)
        }
    };
    desired.waiting.push((req, reply));
}

/// Resolves once `conn` has received no datagram for [`DIRECTORY_IDLE_TIMEOUT`]: the
/// node is dead or cut off (a live one answers keep-alives within a round trip). The
/// connection's own idle timeout would notice only after [`weft_proto::tls::MAX_IDLE_TIMEOUT`].
async fn silent(conn: &quinn::Connection) {
    let mut received = conn.stats().udp_rx.datagrams;
    let mut heard = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(SILENCE_CHECK).await;
        let now = conn.stats().udp_rx.datagrams;
        if now != received {
            received = now;
            heard = tokio::time::Instant::now();
        } else if heard.elapsed() >= DIRECTORY_IDLE_TIMEOUT {
            return;
        }
    }
}

async fn attach(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    settings: &ClientSettings,
    desired: &mut Desired,
    sink: &RouteSink,
    commands: &mut mpsc::Receiver<Command>,
) -> Result<Exit> {
    let conn = weft_proto::tls::connect(endpoint, addr, weft_proto::DIRECTORY_IDENTITY).await?;
    let silence = silent(&conn);
    tokio::pin!(silence);
    let opened = async {
        let (send, recv) = conn.open_bi().await.map_err(|e| {
            Error::with_source(
                ErrorKind::DirectoryUnavailable,
                "opening directory stream",
                e,
            )
        })?;
        let mut writer = FrameWriter::new(send, settings.max_frame);
        let mut reader = FrameReader::new(recv, settings.max_frame);
        let welcome = wire::open_handshake(&mut writer, &mut reader, &settings.hello)
            .await
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::DirectoryUnavailable,
                    format!("handshake with directory {addr}"),
                    e,
                )
            })?;
        Ok::<_, Error>((writer, reader, welcome))
    };
    let (mut writer, mut reader, welcome) = tokio::select! {
        opened = opened => opened?,
        () = &mut silence => {
            conn.close(SILENT_CLOSE_CODE.into(), b"directory node silent");
            return Err(Error::new(
                ErrorKind::DirectoryUnavailable,
                format!("directory {addr} went silent during the handshake"),
            ));
        }
    };
    info!(%addr, node = %welcome.identity, "attached to directory node");
    let attached = crate::clock::now();
    let settled = tokio::time::sleep_until((attached + RESYNC_SETTLE).into());
    tokio::pin!(settled);
    let mut resynced = false;
    let mut pending = Pending::default();
    // Re-establish everything desired, then answer whoever waited.
    let mut requests: Vec<(DirRequest, Option<Reply>)> = desired
        .subscriptions
        .iter()
        .map(|s| (DirRequest::Register(s.clone()), None))
        .chain(
            desired
                .watches
                .iter()
                .map(|t| (DirRequest::Watch { topic: t.clone() }, None)),
        )
        .collect();
    requests.extend(
        desired
            .waiting
            .drain(..)
            .map(|(req, reply)| (req, Some(reply))),
    );
    for (req, reply) in requests {
        pending.queue(&mut writer, req, reply)?;
    }
    writer.flush().await.map_err(wire_err)?;
    loop {
        tokio::select! {
            () = &mut silence => {
                warn!(%addr, silent_for = ?DIRECTORY_IDLE_TIMEOUT, "directory node silent; giving it up");
                conn.close(SILENT_CLOSE_CODE.into(), b"directory node silent");
                requeue(&mut pending, desired);
                return Ok(Exit::Lost);
            }
            () = &mut settled, if !resynced => {
                // Fetch every watched route again, now authoritative.
                resynced = true;
                for topic in &desired.watches {
                    pending.queue(&mut writer, DirRequest::Watch { topic: topic.clone() }, None)?;
                }
                writer.flush().await.map_err(wire_err)?;
            }
            cmd = commands.recv() => {
                let Some(cmd) = cmd else {
                    conn.close(0u32.into(), b"peer shutting down");
                    return Ok(Exit::Shutdown);
                };
                remember(desired, cmd);
                for (req, reply) in desired.waiting.drain(..) {
                    pending.queue(&mut writer, req, Some(reply))?;
                }
                writer.flush().await.map_err(wire_err)?;
            }
            frame = reader.next() => {
                match frame {
                    Ok(Some(Frame::Response { id, body })) => {
                        let reply = pending.by_id.remove(&id).and_then(|(_, reply)| reply);
                        let result = match body {
                            DirResponse::Ok => Ok(None),
                            DirResponse::Route(route) => {
                                sink(route.clone(), freshness(attached));
                                Ok(Some(route))
                            }
                            DirResponse::Error(r) => {
                                warn!(code = ?r.code, reason = %r.reason, "directory refused a request");
                                Err(Error::new(ErrorKind::DirectoryRejected, r.reason))
                            }
                        };
                        if let Some(reply) = reply {
                            let _ = reply.send(result);
                        }
                    }
                    Ok(Some(Frame::RouteChanged(route))) => sink(route, freshness(attached)),
                    Ok(Some(other)) => {
                        warn!(kind = other.kind(), "unexpected frame from directory");
                    }
                    Ok(None) | Err(_) => {
                        requeue(&mut pending, desired);
                        return Ok(Exit::Lost);
                    }
                }
            }
        }
    }
}

/// Requests in flight on a lost node are re-sent (desired state) on the next node; their
/// callers keep waiting until it answers or they time out.
fn requeue(pending: &mut Pending, desired: &mut Desired) {
    for (_, (req, reply)) in pending.by_id.drain() {
        if let Some(reply) = reply {
            desired.waiting.push((req, reply));
        }
    }
}
