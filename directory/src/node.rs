//! The directory node's network layer: accepts peer connections over QUIC and drives
//! the [`RouteTable`] and [`Sessions`] state machines.

use crate::routes::{RouteChange, RouteTable, WatcherId};
use crate::sessions::{ConnId, SessionUpdate, Sessions};
use crate::DirectoryError;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use weft_proto::tls::{self, Credentials};
use weft_proto::wire::{
    self, DirRequest, DirResponse, ErrorCode, Frame, FrameReader, FrameWriter, Reject, Route,
    Welcome, PROTOCOL_VERSION,
};

/// Settings of a directory node (see `docs/operations.md` for every default).
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// Where to accept peer connections.
    pub listen: SocketAddr,
    /// How long a disconnected peer's registrations are kept.
    pub grace_period: Duration,
    /// Largest frame accepted.
    pub max_frame: usize,
    /// Registrations allowed per peer.
    pub max_subscriptions_per_peer: usize,
    /// Concurrent peer connections accepted; more are refused.
    pub max_connections: usize,
    /// A caller-supplied socket to run QUIC over instead of binding `listen`.
    pub udp_socket: Option<Arc<dyn quinn::AsyncUdpSocket>>,
    /// Seed of the QUIC endpoint's random choices (simulations only).
    pub rng_seed: Option<u64>,
}

/// Route changes waiting to be pushed to one watching connection. Coalesced per topic,
/// so a slow watcher holds at most one pending route per watched topic.
#[derive(Default)]
struct WatchQueue {
    pending: Mutex<BTreeMap<String, Route>>,
    wake: Notify,
}

/// Hook called with this node's own registration updates (the gossip layer uses it).
pub type LocalUpdateHook = Arc<dyn Fn(&[SessionUpdate]) + Send + Sync>;

pub(crate) struct Shared {
    pub(crate) name: String,
    state: Mutex<State>,
    pub(crate) hook: Mutex<Option<LocalUpdateHook>>,
    /// Requests from peers answered so far (register, unregister, resolve, watch...).
    pub(crate) requests: std::sync::atomic::AtomicU64,
}

struct State {
    routes: RouteTable,
    sessions: Sessions,
    queues: HashMap<WatcherId, Arc<WatchQueue>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere already; keep serving with the state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, state: &State, changes: Vec<RouteChange>) {
        for change in changes {
            if let Some(queue) = state.queues.get(&change.watcher) {
                let mut pending = queue.pending.lock().unwrap_or_else(|p| p.into_inner());
                pending.insert(change.route.topic.clone(), change.route);
                queue.wake.notify_one();
            }
        }
    }

    fn apply_local(&self, state: &mut State, updates: Vec<SessionUpdate>) {
        if updates.is_empty() {
            return;
        }
        let hook = self.hook.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(hook) = hook {
            hook(&updates);
        }
        for update in updates {
            let changes = match update {
                SessionUpdate::Upsert(record) => state.routes.upsert(&self.name, record),
                SessionUpdate::Remove(identity) => state.routes.remove(&self.name, &identity),
            };
            self.push(state, changes);
        }
    }

    /// Applies what another source (a remote directory node) says about a peer.
    pub(crate) fn apply_remote(
        &self,
        source: &str,
        upserts: Vec<Arc<crate::routes::PeerRecord>>,
        removes: Vec<String>,
    ) {
        let mut state = self.lock();
        for record in upserts {
            let changes = state.routes.upsert(source, record);
            self.push(&state, changes);
        }
        for identity in removes {
            let changes = state.routes.remove(source, &identity);
            self.push(&state, changes);
        }
    }

    /// Forgets a remote source entirely (its node died).
    pub(crate) fn drop_source(&self, source: &str) {
        let mut state = self.lock();
        let changes = state.routes.remove_source(source);
        self.push(&state, changes);
    }

    /// Identities a source currently contributes.
    pub(crate) fn identities_of(&self, source: &str) -> Vec<String> {
        self.lock().routes.identities_of(source)
    }

    /// This node's own records (for publishing into gossip).
    pub(crate) fn local_records(&self) -> Vec<Arc<crate::routes::PeerRecord>> {
        self.lock().sessions.records().cloned().collect()
    }

    pub(crate) fn route(&self, topic: &str) -> Route {
        self.lock().routes.route(topic)
    }
}

/// A running directory node's network part.
pub(crate) struct Node {
    pub(crate) shared: Arc<Shared>,
    pub(crate) local_addr: SocketAddr,
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) tasks: Vec<JoinHandle<()>>,
}

impl Node {
    /// Closes the endpoint and stops the background tasks (idempotent).
    pub(crate) fn stop(&self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"directory shutting down");
        for task in &self.tasks {
            task.abort();
        }
    }
}

pub(crate) fn start(
    name: String,
    creds: &Credentials,
    settings: NodeSettings,
) -> Result<Node, DirectoryError> {
    // Directory connections carry small control frames and a node holds thousands of
    // them: their transport is sized for that, not for the peers' data path.
    let transport = tls::directory_transport_config;
    let endpoint = match (&settings.udp_socket, settings.rng_seed) {
        (None, None) => tls::endpoint_with_transport(settings.listen, creds, transport())?,
        (Some(socket), seed) => {
            tls::endpoint_with_socket_and_transport(socket.clone(), creds, seed, transport())?
        }
        (None, seed) => tls::endpoint_with_socket_and_transport(
            tls::udp_socket(settings.listen)?,
            creds,
            seed,
            transport(),
        )?,
    };
    let local_addr = endpoint.local_addr().map_err(|source| DirectoryError::Io {
        what: format!("reading the bound address of {}", settings.listen),
        source,
    })?;
    let shared = Arc::new(Shared {
        name,
        state: Mutex::new(State {
            routes: RouteTable::new(),
            sessions: Sessions::new(settings.grace_period, settings.max_subscriptions_per_peer),
            queues: HashMap::new(),
        }),
        hook: Mutex::new(None),
        requests: std::sync::atomic::AtomicU64::new(0),
    });
    let accept = tokio::spawn(accept_loop(
        endpoint.clone(),
        shared.clone(),
        settings.clone(),
    ));
    let expiry = tokio::spawn(expiry_loop(shared.clone(), settings.grace_period));
    info!(node = %shared.name, %local_addr, "directory node listening");
    Ok(Node {
        shared,
        local_addr,
        endpoint,
        tasks: vec![accept, expiry],
    })
}

async fn expiry_loop(shared: Arc<Shared>, grace: Duration) {
    let period = (grace / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(period);
    loop {
        ticker.tick().await;
        let mut state = shared.lock();
        let expired = state.sessions.tick(tokio::time::Instant::now().into_std());
        for update in &expired {
            if let SessionUpdate::Remove(id) = update {
                info!(peer = %id, "registrations expired after the grace period");
            }
        }
        shared.apply_local(&mut state, expired);
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>, settings: NodeSettings) {
    let limit = Arc::new(Semaphore::new(settings.max_connections));
    let next_conn = Arc::new(AtomicU64::new(1));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(remote = %incoming.remote_address(), limit = settings.max_connections, "refusing connection: max_connections reached");
            incoming.refuse();
            continue;
        };
        let shared = shared.clone();
        let settings = settings.clone();
        let conn_id = next_conn.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            // `tls::accept` logs refused handshakes (foreign CA, no certificate).
            let Ok((conn, identity)) = tls::accept(incoming).await else {
                return;
            };
            if let Err(e) = serve_connection(conn, identity, conn_id, &shared, &settings).await {
                debug!(%remote, error = %e, "peer connection ended");
            }
            shared
                .lock()
                .sessions
                .disconnect(conn_id, tokio::time::Instant::now().into_std());
            drop(permit);
        });
    }
}

async fn serve_connection(
    conn: quinn::Connection,
    identity: String,
    conn_id: ConnId,
    shared: &Arc<Shared>,
    settings: &NodeSettings,
) -> Result<(), DirectoryError> {
    let (send, recv) = conn.accept_bi().await.map_err(DirectoryError::Connection)?;
    let mut writer = FrameWriter::compact(send, settings.max_frame);
    let mut reader = FrameReader::new(recv, settings.max_frame);
    let welcome = Welcome {
        version: PROTOCOL_VERSION,
        identity: shared.name.clone(),
        incarnation: 0,
    };
    let hello = wire::accept_handshake(&mut writer, &mut reader, &identity, &welcome).await?;
    info!(peer = %identity, incarnation = hello.incarnation, addrs = ?hello.listen_addrs, "peer attached");
    let queue = Arc::new(WatchQueue::default());
    {
        let mut state = shared.lock();
        state.queues.insert(conn_id, queue.clone());
        let updates = state.sessions.connect(
            conn_id,
            &identity,
            hello.incarnation,
            hello.listen_addrs,
            hello.zone,
            tokio::time::Instant::now().into_std(),
        );
        shared.apply_local(&mut state, updates);
    }
    let result = request_loop(&mut reader, &mut writer, conn_id, shared, &queue).await;
    {
        let mut state = shared.lock();
        state.queues.remove(&conn_id);
        state.routes.drop_watcher(conn_id);
    }
    info!(peer = %identity, "peer detached");
    result
}

async fn request_loop(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    conn_id: ConnId,
    shared: &Arc<Shared>,
    queue: &WatchQueue,
) -> Result<(), DirectoryError> {
    loop {
        tokio::select! {
            frame = reader.next() => {
                let frame = match frame {
                    Ok(Some(f)) => f,
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        writer.reject(ErrorCode::Protocol, e.to_string()).await;
                        return Err(e.into());
                    }
                };
                let Frame::Request { id, body } = frame else {
                    let reason = format!("expected Request, got {}", frame.kind());
                    writer.reject(ErrorCode::Protocol, reason.clone()).await;
                    return Err(DirectoryError::Protocol(reason));
                };
                let body = handle_request(shared, conn_id, body);
                writer.send(&Frame::Response { id, body }).await?;
            }
            () = queue.wake.notified() => {
                let pending = std::mem::take(&mut *queue.pending.lock().unwrap_or_else(|p| p.into_inner()));
                for route in pending.into_values() {
                    writer.queue(&Frame::RouteChanged(route))?;
                }
                writer.flush().await?;
            }
        }
    }
}

fn handle_request(shared: &Shared, conn_id: ConnId, request: DirRequest) -> DirResponse {
    shared
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut state = shared.lock();
    match request {
        DirRequest::Register(sub) | DirRequest::Unregister(sub)
            if sub.topic.is_empty() || sub.group.is_empty() =>
        {
            DirResponse::Error(Reject {
                code: ErrorCode::Protocol,
                reason: "topic and group must not be empty".into(),
            })
        }
        DirRequest::Register(sub) => registration(shared, &mut state, conn_id, sub, true),
        DirRequest::Unregister(sub) => registration(shared, &mut state, conn_id, sub, false),
        DirRequest::Resolve { topic } => DirResponse::Route(state.routes.route(&topic)),
        DirRequest::Watch { topic } => DirResponse::Route(state.routes.watch(conn_id, &topic)),
        DirRequest::Unwatch { topic } => {
            state.routes.unwatch(conn_id, &topic);
            DirResponse::Ok
        }
    }
}

fn registration(
    shared: &Shared,
    state: &mut State,
    conn_id: ConnId,
    sub: weft_proto::wire::Subscription,
    add: bool,
) -> DirResponse {
    match state.sessions.set_subscription(conn_id, sub, add) {
        Ok(updates) => {
            shared.apply_local(state, updates);
            DirResponse::Ok
        }
        Err(e) => DirResponse::Error(Reject {
            code: ErrorCode::LimitExceeded,
            reason: e.to_string(),
        }),
    }
}
