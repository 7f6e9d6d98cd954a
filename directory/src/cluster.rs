//! The directory as a gossip cluster (chitchat).
//!
//! Each node runs chitchat on its own UDP gossip address. In its own namespace it
//! publishes:
//!
//! - `cert`: its certificate chain (PEM), see [`crate::signed`];
//! - `id`: its chitchat generation, signed: proves that this generation (process start)
//!   is run by the holder of the certificate's key;
//! - `p:<identity>`: one key per peer attached to it (connected or in its grace period),
//!   holding the peer's whole [`PeerRecord`] (MessagePack), signed and base64-encoded
//!   ([`GossipSigner`]). The key is deleted when the peer's session expires.
//!
//! A watcher task follows chitchat's live-node set (`live_nodes_watcher`, which fires on
//! joins, leaves and version changes). For every live remote node generation whose
//! version moved it diffs the `p:` keys against what it already processed and verifies
//! new values (certificate chain to the fabric CA, directory name, signature, replay
//! counter). Per node name, the newest live generation that is *trusted* (valid
//! certificate and signed `id`) is the route-table source, under the node's name; when
//! it leaves the live set (failure detector) or is replaced by a newer generation, the
//! source is dropped. The node's own name is never applied as remote: its sessions are
//! applied locally under its own name already.
//!
//! Rejected values are counted ([`ClusterStats::rejected`]) and logged at warn level at
//! most once per [`REJECT_LOG_EVERY`].

use crate::node::{LocalUpdateHook, Shared};
use crate::routes::PeerRecord;
use crate::sessions::SessionUpdate;
use crate::signed::{Counters, FabricTrust, GossipSigner, NodeKey, SignedError, CERT_KEY};
use crate::DirectoryError;
use chitchat::transport::UdpTransport;
use chitchat::{
    spawn_chitchat, Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig,
    NodeState, ProtocolVersion, Version,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Key of the signed generation proof (body: the generation, big-endian u64).
pub const NODE_ID_KEY: &str = "id";
/// Prefix of the per-peer keys.
pub const PEER_KEY_PREFIX: &str = "p:";
/// Default chitchat cluster id.
pub const DEFAULT_CLUSTER_ID: &str = "weft";
/// Rejected gossip values are logged at most once per this period (with a count).
pub const REJECT_LOG_EVERY: Duration = Duration::from_secs(10);
/// Values signed per batch before the publisher yields to other tasks.
const SIGN_BATCH: usize = 512;
/// Bind attempts when the gossip port is picked automatically (port 0).
const BIND_ATTEMPTS: usize = 8;

/// Gossip timing. The defaults detect a dead node in about 2 s on a LAN.
#[derive(Debug, Clone, PartialEq)]
pub struct GossipTuning {
    /// Time between gossip rounds (default 100 ms). Each round a node exchanges state
    /// with up to 3 random live nodes and increments its heartbeat.
    pub interval: Duration,
    /// Phi-accrual threshold (default 20). chitchat's phi is `time since the last
    /// heartbeat / mean heartbeat interval`, so a node is declared dead after about
    /// `phi_threshold × interval` without news (20 × 100 ms = 2 s), plus up to one round.
    pub phi_threshold: f64,
    /// How long a dead node's state is kept before it is forgotten (default 30 s); if it
    /// comes back within that time its state is resumed rather than re-sent.
    pub dead_node_grace_period: Duration,
    /// How long deleted keys (tombstones) are kept so that every node sees the deletion
    /// (default 60 s). A node that lags behind by more than this gets a full reset of
    /// the lagging namespace, which is correct but costly.
    pub marked_for_deletion_grace_period: Duration,
}

impl Default for GossipTuning {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(100),
            phi_threshold: 20.0,
            dead_node_grace_period: Duration::from_secs(30),
            marked_for_deletion_grace_period: Duration::from_secs(60),
        }
    }
}

/// Everything needed to join the cluster.
#[derive(Debug, Clone)]
pub(crate) struct GossipSettings {
    pub(crate) listen: SocketAddr,
    pub(crate) advertise: Option<SocketAddr>,
    pub(crate) seeds: Vec<SocketAddr>,
    pub(crate) cluster_id: String,
    pub(crate) tuning: GossipTuning,
}

/// PEM material of the node, read from its TLS files.
pub(crate) struct GossipKeys {
    pub(crate) ca_pem: String,
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
}

/// Counters of the gossip layer.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Gossip values refused (unsigned, badly signed, replayed, untrusted node).
    pub rejected: AtomicU64,
    /// Gossip values accepted and applied.
    pub accepted: AtomicU64,
}

/// A running gossip membership.
pub(crate) struct Cluster {
    pub(crate) gossip_addr: SocketAddr,
    pub(crate) stats: Arc<ClusterStats>,
    handle: ChitchatHandle,
    live: watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Cluster {
    /// Names of the live directory nodes (including this one), as chitchat sees them.
    pub(crate) fn live_nodes(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .live
            .borrow()
            .keys()
            .map(|id| id.node_id.to_string())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Stops gossiping (other nodes will declare this node dead).
    pub(crate) async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Err(e) = self.handle.shutdown().await {
            debug!(error = %e, "chitchat shutdown");
        }
    }

    /// Stops everything without waiting.
    pub(crate) fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
        self.handle.abort();
    }
}

/// Local registration changes waiting to be published, coalesced per peer (so bounded by
/// the number of peers).
#[derive(Default)]
struct Outbox {
    pending: Mutex<HashMap<String, Option<PeerRecord>>>,
    wake: Notify,
}

impl Outbox {
    fn put(&self, updates: &[SessionUpdate]) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for u in updates {
            match u {
                SessionUpdate::Upsert(r) => pending.insert(r.identity.clone(), Some(r.clone())),
                SessionUpdate::Remove(id) => pending.insert(id.clone(), None),
            };
        }
        drop(pending);
        self.wake.notify_one();
    }

    fn take(&self) -> HashMap<String, Option<PeerRecord>> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn free_udp_port(ip: std::net::IpAddr) -> Result<SocketAddr, DirectoryError> {
    let sock =
        std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).map_err(|source| DirectoryError::Io {
            what: format!("finding a free UDP port on {ip} for gossip"),
            source,
        })?;
    sock.local_addr().map_err(|source| DirectoryError::Io {
        what: "reading a free UDP port".into(),
        source,
    })
}

/// Joins (or forms) the cluster and starts publishing and watching.
pub(crate) async fn start(
    shared: Arc<Shared>,
    settings: GossipSettings,
    keys: GossipKeys,
) -> Result<Cluster, DirectoryError> {
    let name = shared.name.clone();
    // A new generation per start: tells a restarted node from the previous process.
    let generation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut signer = GossipSigner::from_pem(
        &keys.cert_pem,
        &keys.key_pem,
        &settings.cluster_id,
        &name,
        generation,
    )
    .map_err(|e| DirectoryError::Config(format!("gossip: {e}")))?;
    let trust = FabricTrust::from_ca_pem(&keys.ca_pem)
        .map_err(|e| DirectoryError::Config(format!("gossip: {e}")))?;
    let tuning = &settings.tuning;
    if settings.advertise.is_none() && settings.listen.ip().is_unspecified() {
        return Err(DirectoryError::Config(format!(
            "gossip_listen {} is a wildcard address: set gossip_advertise to the address \
             other directory nodes reach this one at",
            settings.listen
        )));
    }

    let mut attempt = 0;
    let (handle, listen) = loop {
        attempt += 1;
        let listen = if settings.listen.port() == 0 {
            free_udp_port(settings.listen.ip())?
        } else {
            settings.listen
        };
        let advertise = match settings.advertise {
            Some(a) if a.port() == 0 => SocketAddr::new(a.ip(), listen.port()),
            Some(a) => a,
            None => listen,
        };
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(name.as_str(), generation, advertise),
            cluster_id: settings.cluster_id.clone(),
            gossip_interval: tuning.interval,
            listen_addr: listen,
            seed_nodes: settings
                .seeds
                .iter()
                .filter(|s| **s != advertise)
                .map(|s| s.to_string())
                .collect(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: tuning.phi_threshold,
                sampling_window_size: 1_000,
                max_interval: (tuning.interval * 20).max(Duration::from_secs(2)),
                initial_interval: tuning.interval,
                dead_node_grace_period: tuning.dead_node_grace_period,
            },
            marked_for_deletion_grace_period: tuning.marked_for_deletion_grace_period,
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V0,
        };
        let id_proof = signer
            .sign(NODE_ID_KEY, &generation.to_be_bytes())
            .map_err(|e| DirectoryError::Config(format!("gossip: {e}")))?;
        let initial = vec![
            (CERT_KEY.to_string(), signer.cert_pem().to_string()),
            (NODE_ID_KEY.to_string(), id_proof),
        ];
        match spawn_chitchat(config, initial, &UdpTransport).await {
            Ok(h) => break (h, listen),
            Err(e) if settings.listen.port() == 0 && attempt < BIND_ATTEMPTS => {
                debug!(error = %e, "gossip port taken meanwhile; retrying");
            }
            Err(e) => {
                return Err(DirectoryError::Config(format!(
                    "cannot start gossip on {listen}: {e:#}"
                )))
            }
        }
    };

    let chitchat = handle.chitchat();
    let live = chitchat.lock().await.live_nodes_watcher();
    let stats = Arc::new(ClusterStats::default());
    let outbox = Arc::new(Outbox::default());
    {
        let outbox = outbox.clone();
        let hook: LocalUpdateHook = Arc::new(move |updates: &[SessionUpdate]| outbox.put(updates));
        *shared.hook.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }
    // Whatever registered before the hook was in place.
    let existing: Vec<SessionUpdate> = shared
        .local_records()
        .into_iter()
        .map(SessionUpdate::Upsert)
        .collect();
    outbox.put(&existing);

    let publisher = tokio::spawn(publish_loop(chitchat.clone(), outbox, signer));
    let watcher = Watcher {
        shared: shared.clone(),
        trust,
        cluster_id: settings.cluster_id.clone(),
        own_name: name.clone(),
        stats: stats.clone(),
        remotes: HashMap::new(),
        applied: HashMap::new(),
        log: RejectLog::default(),
    };
    let watch_task = tokio::spawn(watcher.run(live.clone()));
    info!(node = %name, gossip = %listen, cluster = %settings.cluster_id, seeds = ?settings.seeds, "gossip started");
    Ok(Cluster {
        gossip_addr: listen,
        stats,
        handle,
        live,
        tasks: vec![publisher, watch_task],
    })
}

/// Publishes this node's registration changes into its chitchat namespace.
async fn publish_loop(
    chitchat: Arc<tokio::sync::Mutex<Chitchat>>,
    outbox: Arc<Outbox>,
    mut signer: GossipSigner,
) {
    loop {
        outbox.wake.notified().await;
        let pending: Vec<(String, Option<PeerRecord>)> = outbox.take().into_iter().collect();
        for chunk in pending.chunks(SIGN_BATCH) {
            let mut writes: Vec<(String, Option<String>)> = Vec::with_capacity(chunk.len());
            for (identity, record) in chunk {
                let key = format!("{PEER_KEY_PREFIX}{identity}");
                let value = match record {
                    None => None,
                    Some(r) => {
                        let body = match rmp_serde::to_vec(r) {
                            Ok(b) => b,
                            Err(e) => {
                                warn!(peer = %identity, error = %e, "cannot encode a peer record for gossip");
                                continue;
                            }
                        };
                        match signer.sign(&key, &body) {
                            Ok(v) => Some(v),
                            Err(e) => {
                                warn!(peer = %identity, error = %e, "cannot sign a gossip value");
                                continue;
                            }
                        }
                    }
                };
                writes.push((key, value));
            }
            let mut cc = chitchat.lock().await;
            let state = cc.self_node_state();
            for (key, value) in writes {
                match value {
                    Some(v) => state.set(key, v),
                    None => {
                        if state.get(&key).is_some() {
                            state.delete(&key);
                        }
                    }
                }
            }
            drop(cc);
            tokio::task::yield_now().await;
        }
    }
}

/// What we know of one remote node generation.
struct Remote {
    max_version: Option<Version>,
    /// The certificate we verified, and its key.
    cert: Option<(String, NodeKey)>,
    /// The `id` value that proved the generation is signed by the certificate's key.
    proven_id: Option<String>,
    /// Chitchat version of each `p:` key last processed.
    seen: HashMap<String, Version>,
    /// Verified records, by identity.
    accepted: HashMap<String, PeerRecord>,
    counters: Counters,
}

impl Remote {
    fn new() -> Self {
        Self {
            max_version: None,
            cert: None,
            proven_id: None,
            seen: HashMap::new(),
            accepted: HashMap::new(),
            counters: Counters::default(),
        }
    }

    /// The certificate is trusted and the generation proven by its key.
    fn trusted(&self) -> bool {
        self.cert.is_some() && self.proven_id.is_some()
    }
}

/// Work extracted from a live-set snapshot for one node.
struct NodeWork {
    id: ChitchatId,
    max_version: Version,
    cert: Option<String>,
    node_id_value: Option<String>,
    /// (key, value or None if deleted/absent, version)
    changed: Vec<(String, Option<String>, Version)>,
}

/// What processing one node's changes did to its accepted records.
#[derive(Default)]
struct Delta {
    upserts: Vec<PeerRecord>,
    removes: Vec<String>,
}

#[derive(Default)]
struct RejectLog {
    since_last: u64,
    last: Option<Instant>,
}

struct Watcher {
    shared: Arc<Shared>,
    trust: FabricTrust,
    cluster_id: String,
    own_name: String,
    stats: Arc<ClusterStats>,
    /// Every live remote node generation (trusted or not).
    remotes: HashMap<ChitchatId, Remote>,
    /// The generation applied as the source of each node name.
    applied: HashMap<String, ChitchatId>,
    log: RejectLog,
}

impl Watcher {
    async fn run(mut self, mut live: watch::Receiver<BTreeMap<ChitchatId, NodeState>>) {
        loop {
            let work = self.diff(&mut live);
            let mut deltas = HashMap::new();
            for w in work {
                let id = w.id.clone();
                let delta = self.process(w);
                deltas.insert(id, delta);
            }
            self.apply(deltas);
            if live.changed().await.is_err() {
                return;
            }
        }
    }

    /// Compares the live set with what was processed; forgets departed generations;
    /// returns the changed keys of the others. Runs under the watch's read lock: copies
    /// only changes.
    fn diff(
        &mut self,
        live: &mut watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
    ) -> Vec<NodeWork> {
        let snapshot = live.borrow_and_update();
        let gone: Vec<ChitchatId> = self
            .remotes
            .keys()
            .filter(|id| !snapshot.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.remotes.remove(&id);
            info!(node = %id.node_id, generation = id.generation_id, "directory node left the live set");
        }
        let mut work = Vec::new();
        for (id, state) in snapshot.iter() {
            if *id.node_id == *self.own_name {
                continue;
            }
            let remote = self.remotes.entry(id.clone()).or_insert_with(|| {
                info!(node = %id.node_id, generation = id.generation_id, gossip = %id.gossip_advertise_addr, "directory node joined the live set");
                Remote::new()
            });
            if remote.max_version == Some(state.max_version()) {
                continue;
            }
            let cert = state.get(CERT_KEY).map(str::to_string);
            if remote.cert.as_ref().map(|(c, _)| c) != cert.as_ref() {
                // A (new) certificate: re-evaluate every value.
                remote.seen.clear();
            }
            let mut changed = Vec::new();
            for (key, vv) in state.key_values_including_deleted() {
                if !key.starts_with(PEER_KEY_PREFIX) {
                    continue;
                }
                if remote.seen.get(key) == Some(&vv.version) {
                    continue;
                }
                let value = (!vv.is_deleted()).then(|| vv.value.clone());
                changed.push((key.to_string(), value, vv.version));
            }
            for key in remote.seen.keys() {
                if state.get_versioned(key).is_none() {
                    changed.push((key.clone(), None, 0));
                }
            }
            work.push(NodeWork {
                id: id.clone(),
                max_version: state.max_version(),
                cert,
                node_id_value: state.get(NODE_ID_KEY).map(str::to_string),
                changed,
            });
        }
        work
    }

    /// Verifies one node generation's changes and updates its accepted records.
    fn process(&mut self, work: NodeWork) -> Delta {
        let name = work.id.node_id.to_string();
        let generation = work.id.generation_id;
        let Some(remote) = self.remotes.get_mut(&work.id) else {
            return Delta::default();
        };
        remote.max_version = Some(work.max_version);
        // Certificate.
        let cert_ok = match (&work.cert, &remote.cert) {
            (Some(pem), Some((known, _))) if pem == known => Ok(()),
            (Some(pem), _) => match self.trust.verify_node(pem, &name) {
                Ok(key) => {
                    remote.cert = Some((pem.clone(), key));
                    remote.proven_id = None;
                    Ok(())
                }
                // A bad replacement does not unseat a verified certificate.
                Err(e) if remote.cert.is_some() => {
                    Self::reject(&self.stats, &mut self.log, &name, CERT_KEY, &e);
                    Ok(())
                }
                Err(e) => Err(e),
            },
            (None, Some(_)) => Ok(()),
            (None, None) => Err(SignedError::NoCertificate),
        };
        // The generation proof: `id` signed by the certificate's key for this generation.
        if let (Some((_, node_key)), Some(value)) = (&remote.cert, &work.node_id_value) {
            if remote.proven_id.as_ref() != Some(value) {
                match node_key.open(&self.cluster_id, &name, generation, NODE_ID_KEY, value) {
                    Ok(o) if o.body == generation.to_be_bytes() => {
                        remote.proven_id = Some(value.clone())
                    }
                    Ok(_) => Self::reject(
                        &self.stats,
                        &mut self.log,
                        &name,
                        NODE_ID_KEY,
                        &SignedError::Malformed("id does not match the generation"),
                    ),
                    Err(e) => Self::reject(&self.stats, &mut self.log, &name, NODE_ID_KEY, &e),
                }
            }
        }
        let mut delta = Delta::default();
        for (key, value, version) in work.changed {
            let identity = &key[PEER_KEY_PREFIX.len()..];
            let Some(value) = value else {
                if version == 0 {
                    remote.seen.remove(&key);
                } else {
                    remote.seen.insert(key.clone(), version);
                }
                if remote.accepted.remove(identity).is_some() {
                    delta.removes.push(identity.to_string());
                }
                continue;
            };
            remote.seen.insert(key.clone(), version);
            let opened = match (&cert_ok, &remote.cert) {
                (Ok(()), Some((_, node_key))) => node_key
                    .open(&self.cluster_id, &name, generation, &key, &value)
                    .and_then(|o| remote.counters.check(&key, o.counter).map(|()| o))
                    .and_then(|o| {
                        rmp_serde::from_slice::<PeerRecord>(&o.body)
                            .map_err(|_| SignedError::Malformed("undecodable peer record"))
                    })
                    .and_then(|r| {
                        if r.identity == identity {
                            Ok(r)
                        } else {
                            Err(SignedError::Malformed(
                                "record identity differs from its key",
                            ))
                        }
                    }),
                (Err(e), _) => Err(e.clone()),
                (Ok(()), None) => Err(SignedError::NoCertificate),
            };
            match opened {
                Ok(record) => {
                    self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    remote.accepted.insert(identity.to_string(), record.clone());
                    delta.upserts.push(record);
                }
                Err(e) => Self::reject(&self.stats, &mut self.log, &name, &key, &e),
            }
        }
        delta
    }

    /// Applies to the route table: per node name, the newest trusted live generation is
    /// the source. A generation that is not trusted (no valid certificate, or generation
    /// not proven by its key) never is, so a forged node cannot unseat a real one.
    fn apply(&mut self, mut deltas: HashMap<ChitchatId, Delta>) {
        let mut current: HashMap<String, ChitchatId> = HashMap::new();
        for (id, remote) in &self.remotes {
            if !remote.trusted() {
                continue;
            }
            let name = id.node_id.to_string();
            match current.get(&name) {
                Some(c) if c.generation_id >= id.generation_id => {}
                _ => {
                    current.insert(name, id.clone());
                }
            }
        }
        let names: HashSet<String> = current.keys().chain(self.applied.keys()).cloned().collect();
        for name in names {
            let before = self.applied.get(&name);
            let now = current.get(&name);
            match (before, now) {
                (Some(b), Some(n)) if b == n => {
                    if let Some(d) = deltas.remove(n) {
                        if !d.upserts.is_empty() || !d.removes.is_empty() {
                            debug!(node = %name, upserts = d.upserts.len(), removes = d.removes.len(), "applying gossip");
                            self.shared.apply_remote(&name, d.upserts, d.removes);
                        }
                    }
                }
                (before, now) => {
                    if before.is_some() {
                        let peers = self.shared.identities_of(&name).len();
                        info!(node = %name, peers, "dropping the registrations of a departed directory node");
                        self.shared.drop_source(&name);
                    }
                    if let Some(n) = now {
                        let records: Vec<PeerRecord> = self
                            .remotes
                            .get(n)
                            .map(|r| r.accepted.values().cloned().collect())
                            .unwrap_or_default();
                        info!(node = %name, generation = n.generation_id, peers = records.len(), "directory node trusted; applying its registrations");
                        self.shared.apply_remote(&name, records, Vec::new());
                    }
                }
            }
        }
        self.applied = current;
    }

    fn reject(stats: &ClusterStats, log: &mut RejectLog, node: &str, key: &str, e: &SignedError) {
        stats.rejected.fetch_add(1, Ordering::Relaxed);
        log.since_last += 1;
        let due = log.last.is_none_or(|t| t.elapsed() >= REJECT_LOG_EVERY);
        if due {
            warn!(
                node,
                key,
                reason = %e,
                rejected_since_last_log = log.since_last,
                "ignoring gossip value that failed authentication (is something unauthorized on the gossip network?)"
            );
            log.since_last = 0;
            log.last = Some(Instant::now());
        }
    }
}
