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
//!   ([`GossipSigner`]). When the peer's session expires the key gets a *signed removal*
//!   (a signed value with an empty body, [`REMOVED_BODY`]; a record is never empty),
//!   under the same counter and replay rules as a record. Only [`removal_gc_delay`]
//!   later is the key deleted from chitchat (a tombstone, then chitchat's garbage
//!   collection), so that every node has seen the signed removal by then.
//!
//! A watcher task follows chitchat's live-node set (`live_nodes_watcher`, which fires on
//! joins, leaves and version changes). For every live remote node generation whose
//! version moved it diffs the `p:` keys against what it already processed and verifies
//! new values (certificate chain to the fabric CA, directory name, signature, replay
//! counter). Every live generation that is *trusted* (valid certificate and signed `id`)
//! is a route-table source of its own (`name#generation`). When a generation leaves the
//! live set (the failure detector declared it dead), its records stay a source for a
//! *dead-node route grace* ([`GossipTuning::dead_node_route_grace`]), also when the node
//! has restarted meanwhile (a new generation): its peers notice the dead connection,
//! fail over to another node and register again meanwhile (a peer known through two
//! sources appears once in routes), so senders never get a route without them. The
//! records are dropped when the grace ends, unless the same generation came back into
//! the live set before (then it simply goes on as a source). The node's own name is
//! never applied as remote: its sessions are applied locally under its own name
//! already.
//!
//! chitchat deletions carry no signature, so they remove nothing: a record is dropped
//! only by a signed removal, or with its whole node (the generation leaves the live set
//! or is replaced). An unsigned deletion of a key whose record is live (a forged
//! tombstone, or a key vanishing in a chitchat reset) is ignored and counted as
//! rejected; a deletion after a signed removal is ordinary garbage collection.
//!
//! [`Cluster::live_nodes`] lists this node and the remote nodes that are trusted (valid
//! certificate and proven generation), not every node chitchat considers live.
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
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
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
/// The body of a signed removal of a `p:` key (a MessagePack record is never empty).
pub const REMOVED_BODY: &[u8] = b"";
/// Shortest time a signed removal stays in gossip before the key is deleted from chitchat
/// (see [`removal_gc_delay`]).
pub const REMOVAL_GC_DELAY: Duration = Duration::from_secs(30);
/// Values signed per batch before the publisher yields to other tasks.
const SIGN_BATCH: usize = 512;
/// Bind attempts when the gossip port is picked automatically (port 0).
const BIND_ATTEMPTS: usize = 8;
/// Default of [`GossipTuning::dead_node_route_grace`]: well above the time a peer takes
/// to notice that its directory node died and to register with another one (about 5 s:
/// the peer's directory idle timeout, 4 s, then a reconnect), also for peers still
/// detecting it with the 10 s QUIC idle timeout of data connections.
pub const DEFAULT_DEAD_NODE_ROUTE_GRACE: Duration = Duration::from_secs(15);

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
    /// How long the registrations of a directory node declared dead stay in routes
    /// (default [`DEFAULT_DEAD_NODE_ROUTE_GRACE`], 15 s), so that its peers can fail over
    /// to another node and register again without disappearing from senders' routes in
    /// between. Keep it well above a peer's failover time. If the node comes back (same
    /// generation) within it, nothing is dropped; if it restarts (a new generation), the
    /// new generation's registrations replace the old ones at once. Zero drops them as
    /// soon as the node is declared dead. Not to be confused with
    /// [`dead_node_grace_period`](Self::dead_node_grace_period), chitchat's retention of
    /// a dead node's gossip state.
    pub dead_node_route_grace: Duration,
}

impl Default for GossipTuning {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(100),
            phi_threshold: 20.0,
            dead_node_grace_period: Duration::from_secs(30),
            marked_for_deletion_grace_period: Duration::from_secs(60),
            dead_node_route_grace: DEFAULT_DEAD_NODE_ROUTE_GRACE,
        }
    }
}

/// How long a node keeps a signed removal under a `p:` key before deleting the key from
/// chitchat: [`REMOVAL_GC_DELAY`], or ten failure-detection timeouts
/// (`phi_threshold × interval`) if that is longer. A node connected to the writer hears
/// from it at least once per failure-detection timeout (otherwise it declares the writer
/// dead and drops all its records anyway), so by then every node has seen the removal.
/// A node that still sees only the deletion keeps the record (an unsigned deletion
/// removes nothing) until the writer leaves its live set.
pub fn removal_gc_delay(tuning: &GossipTuning) -> Duration {
    let detection = tuning
        .interval
        .mul_f64(tuning.phi_threshold.clamp(1.0, 1_000.0));
    REMOVAL_GC_DELAY.max(detection.saturating_mul(10))
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
    /// This node's name and those of the trusted live remote nodes (kept by the watcher).
    trusted: watch::Receiver<BTreeSet<String>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Cluster {
    /// Names of this node and of the live remote directory nodes whose certificate and
    /// generation verified, sorted. A node chitchat considers live but that is not
    /// trusted (no valid certificate, or generation not proven) is not listed.
    pub(crate) fn live_nodes(&self) -> Vec<String> {
        self.trusted.borrow().iter().cloned().collect()
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
    pending: Mutex<HashMap<String, Option<Arc<PeerRecord>>>>,
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

    fn take(&self) -> HashMap<String, Option<Arc<PeerRecord>>> {
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

    let publisher = tokio::spawn(publish_loop(
        chitchat.clone(),
        outbox,
        signer,
        removal_gc_delay(tuning),
    ));
    let (trusted_tx, trusted) = watch::channel(BTreeSet::from([name.clone()]));
    let watcher = Watcher::new(
        shared.clone(),
        trust,
        settings.cluster_id.clone(),
        name.clone(),
        stats.clone(),
        tuning.dead_node_route_grace,
        trusted_tx,
    );
    let watch_task = tokio::spawn(watcher.run(live));
    info!(node = %name, gossip = %listen, cluster = %settings.cluster_id, seeds = ?settings.seeds, "gossip started");
    Ok(Cluster {
        gossip_addr: listen,
        stats,
        handle,
        trusted,
        tasks: vec![publisher, watch_task],
    })
}

/// This node's own `p:` keys, as the publisher last wrote them: which hold a signed
/// record, and which hold a signed removal waiting to be deleted from chitchat. A key has
/// at most one pending deletion, so their number is at most the number of peers removed
/// within one GC delay.
struct Published {
    gc_delay: Duration,
    /// Keys holding a signed record.
    live: HashSet<String>,
    /// Keys holding a signed removal, with the time to delete them.
    removed: HashMap<String, Instant>,
    /// The same, ordered by deletion time.
    due: BTreeSet<(Instant, String)>,
}

impl Published {
    fn new(gc_delay: Duration) -> Self {
        Self {
            gc_delay,
            live: HashSet::new(),
            removed: HashMap::new(),
            due: BTreeSet::new(),
        }
    }

    /// The key holds a signed record (so removing its peer needs a signed removal).
    fn is_live(&self, key: &str) -> bool {
        self.live.contains(key)
    }

    /// A signed record was written under `key`: it must not be deleted.
    fn wrote_record(&mut self, key: &str) {
        self.cancel(key);
        self.live.insert(key.to_string());
    }

    /// A signed removal was written under `key` at `now`: delete the key after the delay.
    fn wrote_removal(&mut self, key: &str, now: Instant) {
        self.cancel(key);
        self.live.remove(key);
        let at = now + self.gc_delay;
        self.removed.insert(key.to_string(), at);
        self.due.insert((at, key.to_string()));
    }

    fn cancel(&mut self, key: &str) {
        if let Some(at) = self.removed.remove(key) {
            self.due.remove(&(at, key.to_string()));
        }
    }

    /// When the next deletion is due.
    fn next_due(&self) -> Option<Instant> {
        self.due.first().map(|(at, _)| *at)
    }

    /// The keys whose deletion is due at `now` (forgotten here).
    fn take_due(&mut self, now: Instant) -> Vec<String> {
        let mut keys = Vec::new();
        while self.due.first().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, key)) = self.due.pop_first() {
                self.removed.remove(&key);
                keys.push(key);
            }
        }
        keys
    }

    /// Removals waiting to be deleted from chitchat.
    fn pending_deletions(&self) -> usize {
        self.removed.len()
    }
}

/// Sleeps until `at`, or forever if there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Publishes this node's registration changes into its chitchat namespace: a signed
/// record per attached peer, a signed removal when a peer goes, and the deletion of the
/// key `gc_delay` after its removal.
async fn publish_loop(
    chitchat: Arc<tokio::sync::Mutex<Chitchat>>,
    outbox: Arc<Outbox>,
    mut signer: GossipSigner,
    gc_delay: Duration,
) {
    let mut published = Published::new(gc_delay);
    loop {
        tokio::select! {
            () = outbox.wake.notified() => {}
            () = sleep_until(published.next_due()) => {}
        }
        let pending: Vec<(String, Option<Arc<PeerRecord>>)> = outbox.take().into_iter().collect();
        for chunk in pending.chunks(SIGN_BATCH) {
            // (key, signed value, is a removal)
            let mut writes: Vec<(String, String, bool)> = Vec::with_capacity(chunk.len());
            for (identity, record) in chunk {
                let key = format!("{PEER_KEY_PREFIX}{identity}");
                let body = match record {
                    // Nothing published for it (or already removed): nothing to remove.
                    None if !published.is_live(&key) => continue,
                    None => REMOVED_BODY.to_vec(),
                    Some(r) => match rmp_serde::to_vec(&**r) {
                        Ok(b) => b,
                        Err(e) => {
                            warn!(peer = %identity, error = %e, "cannot encode a peer record for gossip");
                            continue;
                        }
                    },
                };
                match signer.sign(&key, &body) {
                    Ok(v) => writes.push((key, v, record.is_none())),
                    Err(e) => {
                        warn!(peer = %identity, error = %e, "cannot sign a gossip value");
                    }
                }
            }
            let mut cc = chitchat.lock().await;
            let state = cc.self_node_state();
            let now = Instant::now();
            for (key, value, removal) in writes {
                if removal {
                    published.wrote_removal(&key, now);
                } else {
                    published.wrote_record(&key);
                }
                state.set(key, value);
            }
            drop(cc);
            tokio::task::yield_now().await;
        }
        let due = published.take_due(Instant::now());
        if !due.is_empty() {
            let mut cc = chitchat.lock().await;
            let state = cc.self_node_state();
            for key in &due {
                if state.get(key).is_some() {
                    state.delete(key);
                }
            }
            drop(cc);
            debug!(
                deleted = due.len(),
                pending = published.pending_deletions(),
                "deleted removed peer keys from gossip"
            );
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
    /// Verified records, by identity (shared with the route table).
    accepted: HashMap<String, Arc<PeerRecord>>,
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

    /// Verifies one snapshot of this generation's changes (`work`, for node `work.id`)
    /// and updates the accepted records: a signed record is accepted, a signed removal
    /// drops the record, an unsigned deletion of a live record is refused. Refusals are
    /// counted in `stats` and logged through `log`.
    fn process(
        &mut self,
        trust: &FabricTrust,
        cluster_id: &str,
        work: NodeWork,
        stats: &ClusterStats,
        log: &mut RejectLog,
    ) -> Delta {
        let name = work.id.node_id.to_string();
        let generation = work.id.generation_id;
        self.max_version = Some(work.max_version);
        // Certificate.
        let cert_ok = match (&work.cert, &self.cert) {
            (Some(pem), Some((known, _))) if pem == known => Ok(()),
            (Some(pem), _) => match trust.verify_node(pem, &name) {
                Ok(key) => {
                    self.cert = Some((pem.clone(), key));
                    self.proven_id = None;
                    Ok(())
                }
                // A bad replacement does not unseat a verified certificate.
                Err(e) if self.cert.is_some() => {
                    log.reject(stats, &name, CERT_KEY, &e);
                    Ok(())
                }
                Err(e) => Err(e),
            },
            (None, Some(_)) => Ok(()),
            (None, None) => Err(SignedError::NoCertificate),
        };
        // The generation proof: `id` signed by the certificate's key for this generation.
        if let (Some((_, node_key)), Some(value)) = (&self.cert, &work.node_id_value) {
            if self.proven_id.as_ref() != Some(value) {
                match node_key.open(cluster_id, &name, generation, NODE_ID_KEY, value) {
                    Ok(o) if o.body == generation.to_be_bytes() => {
                        self.proven_id = Some(value.clone())
                    }
                    Ok(_) => log.reject(
                        stats,
                        &name,
                        NODE_ID_KEY,
                        &SignedError::Malformed("id does not match the generation"),
                    ),
                    Err(e) => log.reject(stats, &name, NODE_ID_KEY, &e),
                }
            }
        }
        let mut delta = Delta::default();
        for (key, value, version) in work.changed {
            let identity = &key[PEER_KEY_PREFIX.len()..];
            let Some(value) = value else {
                if version == 0 {
                    self.seen.remove(&key);
                } else {
                    self.seen.insert(key.clone(), version);
                }
                // Deleted (or vanished in a reset) without a signed removal: anyone can
                // gossip that, so it removes nothing. After a signed removal there is no
                // record left, and the deletion is garbage collection.
                if self.accepted.contains_key(identity) {
                    log.reject(stats, &name, &key, &SignedError::UnsignedDeletion);
                }
                continue;
            };
            self.seen.insert(key.clone(), version);
            let opened = match (&cert_ok, &self.cert) {
                (Ok(()), Some((_, node_key))) => node_key
                    .open(cluster_id, &name, generation, &key, &value)
                    .and_then(|o| self.counters.check(&key, o.counter).map(|()| o))
                    .and_then(|o| decode_peer_value(identity, &o.body)),
                (Err(e), _) => Err(e.clone()),
                (Ok(()), None) => Err(SignedError::NoCertificate),
            };
            match opened {
                Ok(PeerValue::Record(record)) => {
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                    let record = Arc::new(record);
                    self.accepted.insert(identity.to_string(), record.clone());
                    delta.upserts.push(record);
                }
                Ok(PeerValue::Removed) => {
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                    if self.accepted.remove(identity).is_some() {
                        delta.removes.push(identity.to_string());
                    }
                }
                Err(e) => log.reject(stats, &name, &key, &e),
            }
        }
        delta
    }
}

/// What the signed body of a `p:` key says.
#[derive(Debug, PartialEq)]
enum PeerValue {
    /// The peer's registrations.
    Record(PeerRecord),
    /// The peer is gone ([`REMOVED_BODY`]).
    Removed,
}

/// Decodes the (verified) body of the key of peer `identity`.
fn decode_peer_value(identity: &str, body: &[u8]) -> Result<PeerValue, SignedError> {
    if body == REMOVED_BODY {
        return Ok(PeerValue::Removed);
    }
    let record = rmp_serde::from_slice::<PeerRecord>(body)
        .map_err(|_| SignedError::Malformed("undecodable peer record"))?;
    if record.identity != identity {
        return Err(SignedError::Malformed(
            "record identity differs from its key",
        ));
    }
    Ok(PeerValue::Record(record))
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
    upserts: Vec<Arc<PeerRecord>>,
    removes: Vec<String>,
}

/// Rate limit of the warning about rejected values.
#[derive(Default)]
struct RejectLog {
    since_last: u64,
    last: Option<Instant>,
}

impl RejectLog {
    /// Counts a rejected value of `node`'s `key` and logs it if a log line is due.
    fn reject(&mut self, stats: &ClusterStats, node: &str, key: &str, e: &SignedError) {
        stats.rejected.fetch_add(1, Ordering::Relaxed);
        self.since_last += 1;
        let due = self.last.is_none_or(|t| t.elapsed() >= REJECT_LOG_EVERY);
        if due {
            warn!(
                node,
                key,
                reason = %e,
                rejected_since_last_log = self.since_last,
                "ignoring gossip value that failed authentication (is something unauthorized on the gossip network?)"
            );
            self.since_last = 0;
            self.last = Some(Instant::now());
        }
    }
}

/// Where the watcher applies what remote nodes say: the node's route table, with one
/// source per remote node name.
trait RouteSources: Send + Sync {
    /// Upserts and removes records of `source`.
    fn apply_remote(&self, source: &str, upserts: Vec<Arc<PeerRecord>>, removes: Vec<String>);
    /// Forgets every record of `source`.
    fn drop_source(&self, source: &str);
    /// How many peers `source` holds records of.
    fn peers_of(&self, source: &str) -> usize;
}

impl RouteSources for Shared {
    fn apply_remote(&self, source: &str, upserts: Vec<Arc<PeerRecord>>, removes: Vec<String>) {
        Shared::apply_remote(self, source, upserts, removes);
    }

    fn drop_source(&self, source: &str) {
        Shared::drop_source(self, source);
    }

    fn peers_of(&self, source: &str) -> usize {
        self.identities_of(source).len()
    }
}

/// A node generation that left the live set while it was a route source: its
/// records stay a source until `until` (the dead-node route grace).
struct Departed {
    remote: Remote,
    until: Instant,
}

/// The current instant of tokio's clock (so that a paused or simulated clock drives the
/// dead-node route grace as it drives the timer).
fn clock_now() -> Instant {
    tokio::time::Instant::now().into_std()
}

struct Watcher {
    sources: Arc<dyn RouteSources>,
    trust: FabricTrust,
    cluster_id: String,
    own_name: String,
    stats: Arc<ClusterStats>,
    /// [`GossipTuning::dead_node_route_grace`].
    route_grace: Duration,
    /// Every live remote node generation (trusted or not).
    remotes: HashMap<ChitchatId, Remote>,
    /// Generations that left the live set while they were a route source, in their route
    /// grace. An entry goes when its grace ends or when it comes back into the live set
    /// (back to `remotes`).
    departed: HashMap<ChitchatId, Departed>,
    /// The generations applied as route sources (trusted and live, or in `departed`),
    /// each under its own source id ([`source_id`]).
    applied: HashSet<ChitchatId>,
    /// This node's name and the names of the trusted live remote generations (what
    /// `live_nodes` lists).
    trusted: watch::Sender<BTreeSet<String>>,
    log: RejectLog,
}

impl Watcher {
    fn new(
        sources: Arc<dyn RouteSources>,
        trust: FabricTrust,
        cluster_id: String,
        own_name: String,
        stats: Arc<ClusterStats>,
        route_grace: Duration,
        trusted: watch::Sender<BTreeSet<String>>,
    ) -> Self {
        Self {
            sources,
            trust,
            cluster_id,
            own_name,
            stats,
            route_grace,
            remotes: HashMap::new(),
            departed: HashMap::new(),
            applied: HashSet::new(),
            trusted,
            log: RejectLog::default(),
        }
    }

    async fn run(mut self, mut live: watch::Receiver<BTreeMap<ChitchatId, NodeState>>) {
        loop {
            let now = clock_now();
            let work = self.diff(&mut live, now);
            self.update(work, now);
            tokio::select! {
                changed = live.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                // The end of the earliest dead-node route grace.
                () = sleep_until(self.next_expiry()) => {}
            }
        }
    }

    /// Compares the live set with what was processed; handles departed generations (see
    /// [`left`](Self::left)); returns the changed keys of the others. Runs under the
    /// watch's read lock: copies only changes.
    fn diff(
        &mut self,
        live: &mut watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
        now: Instant,
    ) -> Vec<NodeWork> {
        let snapshot = live.borrow_and_update();
        let gone: Vec<ChitchatId> = self
            .remotes
            .keys()
            .filter(|id| !snapshot.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.left(&id, now);
        }
        let mut work = Vec::new();
        for (id, state) in snapshot.iter() {
            if *id.node_id == *self.own_name {
                continue;
            }
            let remote = self.remote_mut(id);
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

    /// The state of the live generation `id`. A generation back in the live set within
    /// its dead-node route grace resumes where it was (and goes on as the source, nothing
    /// dropped); any other starts afresh.
    fn remote_mut(&mut self, id: &ChitchatId) -> &mut Remote {
        let departed = &mut self.departed;
        self.remotes
            .entry(id.clone())
            .or_insert_with(|| match departed.remove(id) {
                Some(d) => {
                    info!(node = %id.node_id, generation = id.generation_id, peers = d.remote.accepted.len(), "directory node is back in the live set within its dead-node route grace; keeping its registrations");
                    d.remote
                }
                None => {
                    info!(node = %id.node_id, generation = id.generation_id, gossip = %id.gossip_advertise_addr, "directory node joined the live set");
                    Remote::new()
                }
            })
    }

    /// The generation `id` left the live set at `now` (declared dead). If it is a route
    /// source, its records stay until the dead-node route grace ends; otherwise it is
    /// forgotten.
    fn left(&mut self, id: &ChitchatId, now: Instant) {
        let Some(remote) = self.remotes.remove(id) else {
            return;
        };
        let source = self.applied.contains(id);
        if source && !self.route_grace.is_zero() {
            info!(node = %id.node_id, generation = id.generation_id, peers = remote.accepted.len(), grace = ?self.route_grace, "directory node left the live set; keeping its registrations for the dead-node route grace while its peers move");
            let until = now + self.route_grace;
            self.departed.insert(id.clone(), Departed { remote, until });
        } else {
            info!(node = %id.node_id, generation = id.generation_id, "directory node left the live set");
        }
    }

    /// Ends the dead-node route grace of the departed generations due at `now` (the next
    /// [`apply`](Self::apply) drops their records).
    fn expire(&mut self, now: Instant) {
        self.departed.retain(|id, d| {
            let keep = d.until > now;
            if !keep {
                info!(node = %id.node_id, generation = id.generation_id, "dead-node route grace over");
            }
            keep
        });
    }

    /// When the earliest dead-node route grace ends.
    fn next_expiry(&self) -> Option<Instant> {
        self.departed.values().map(|d| d.until).min()
    }

    /// Verifies `work` (changes of live generations), ends the route graces due at `now`
    /// and applies the result to the route table.
    fn update(&mut self, work: Vec<NodeWork>, now: Instant) {
        let mut deltas = HashMap::new();
        for w in work {
            let id = w.id.clone();
            let delta = self.process(w);
            deltas.insert(id, delta);
        }
        self.expire(now);
        self.apply(deltas);
    }

    /// Verifies one node generation's changes and updates its accepted records.
    fn process(&mut self, work: NodeWork) -> Delta {
        match self.remotes.get_mut(&work.id) {
            Some(remote) => remote.process(
                &self.trust,
                &self.cluster_id,
                work,
                &self.stats,
                &mut self.log,
            ),
            None => Delta::default(),
        }
    }

    /// Applies to the route table. Every generation that is trusted and live, or
    /// departed and in its route grace, is a source of its own, so a node that restarts
    /// (a new generation) does not take its old generation's records out of routes
    /// before their grace ends: the old generation's peers are moving to other nodes
    /// meanwhile. A generation that is not trusted (no valid certificate, or generation
    /// not proven by its key) never is a source, so a forged node changes no route.
    fn apply(&mut self, mut deltas: HashMap<ChitchatId, Delta>) {
        let live_trusted = self
            .remotes
            .iter()
            .filter(|(_, remote)| remote.trusted())
            .map(|(id, _)| id);
        let current: HashSet<ChitchatId> = live_trusted
            .clone()
            .chain(self.departed.keys())
            .cloned()
            .collect();
        let listed: BTreeSet<String> = std::iter::once(self.own_name.clone())
            .chain(live_trusted.map(|id| id.node_id.to_string()))
            .collect();
        // New sources first, then the gone ones: a peer moving between them never
        // leaves routes.
        for id in &current {
            let source = source_id(id);
            if self.applied.contains(id) {
                if let Some(d) = deltas.remove(id) {
                    if !d.upserts.is_empty() || !d.removes.is_empty() {
                        debug!(%source, upserts = d.upserts.len(), removes = d.removes.len(), "applying gossip");
                        self.sources.apply_remote(&source, d.upserts, d.removes);
                    }
                }
                continue;
            }
            let records: Vec<Arc<PeerRecord>> = self
                .remotes
                .get(id)
                .or_else(|| self.departed.get(id).map(|d| &d.remote))
                .map(|r| r.accepted.values().cloned().collect())
                .unwrap_or_default();
            info!(node = %id.node_id, generation = id.generation_id, peers = records.len(), "directory node trusted; applying its registrations");
            self.sources.apply_remote(&source, records, Vec::new());
        }
        for id in self.applied.difference(&current) {
            let source = source_id(id);
            let peers = self.sources.peers_of(&source);
            info!(node = %id.node_id, generation = id.generation_id, peers, "dropping the registrations of a departed directory node");
            self.sources.drop_source(&source);
        }
        self.trusted.send_if_modified(|shown| {
            if *shown == listed {
                false
            } else {
                *shown = listed;
                true
            }
        });
        self.applied = current;
    }
}

/// The route-table source id of a remote node generation: its name and generation.
fn source_id(id: &ChitchatId) -> String {
    format!("{}#{}", id.node_id, id.generation_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signed::GossipSigner;
    use weft_proto::certs;
    use weft_proto::wire::Subscription;

    const CLUSTER: &str = "c1";
    const NODE: &str = "dir-1";
    const GENERATION: u64 = 7;

    /// A remote directory node writing values, and a reader's view of it.
    struct Fixture {
        _dir: tempfile::TempDir,
        signer: GossipSigner,
        cert: String,
        key: String,
        id_value: String,
        trust: FabricTrust,
        id: ChitchatId,
        remote: Remote,
        stats: ClusterStats,
        log: RejectLog,
        version: Version,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tmp");
            let paths = certs::ensure_dev(dir.path(), NODE, &[weft_proto::DIRECTORY_IDENTITY])
                .expect("dev certs");
            let cert = std::fs::read_to_string(&paths.cert).expect("cert");
            let key = std::fs::read_to_string(&paths.key).expect("key");
            let ca = std::fs::read_to_string(dir.path().join(certs::CA_CERT_FILE)).expect("ca");
            let mut signer =
                GossipSigner::from_pem(&cert, &key, CLUSTER, NODE, GENERATION).expect("signer");
            let id_value = signer
                .sign(NODE_ID_KEY, &GENERATION.to_be_bytes())
                .expect("sign id");
            Self {
                _dir: dir,
                signer,
                cert,
                key,
                id_value,
                trust: FabricTrust::from_ca_pem(&ca).expect("trust"),
                id: ChitchatId::new(NODE, GENERATION, "127.0.0.1:1".parse().expect("addr")),
                remote: Remote::new(),
                stats: ClusterStats::default(),
                log: RejectLog::default(),
                version: 2,
            }
        }

        fn record(identity: &str, topic: &str) -> PeerRecord {
            PeerRecord {
                identity: identity.into(),
                incarnation: 1,
                addrs: vec!["127.0.0.1:9999".parse().expect("addr")],
                zone: None,
                subscriptions: [Subscription {
                    topic: topic.into(),
                    group: "g".into(),
                }]
                .into_iter()
                .collect(),
            }
        }

        fn signed_record(&mut self, record: &PeerRecord) -> String {
            let key = format!("{PEER_KEY_PREFIX}{}", record.identity);
            let body = rmp_serde::to_vec(record).expect("encode");
            self.signer.sign(&key, &body).expect("sign")
        }

        fn signed_removal(&mut self, identity: &str) -> String {
            let key = format!("{PEER_KEY_PREFIX}{identity}");
            self.signer.sign(&key, REMOVED_BODY).expect("sign")
        }

        /// One change of `identity`'s key (`None`: a chitchat deletion), at the next
        /// chitchat version; no change at all when `identity` is `None`.
        fn work(&mut self, change: Option<(&str, Option<String>)>) -> NodeWork {
            self.version += 1;
            NodeWork {
                id: self.id.clone(),
                max_version: self.version,
                cert: Some(self.cert.clone()),
                node_id_value: Some(self.id_value.clone()),
                changed: change
                    .map(|(identity, value)| {
                        (format!("{PEER_KEY_PREFIX}{identity}"), value, self.version)
                    })
                    .into_iter()
                    .collect(),
            }
        }

        /// Feeds one change of `identity`'s key (`None`: a chitchat deletion) to the
        /// reader, at the next chitchat version.
        fn feed(&mut self, identity: &str, value: Option<String>) -> Delta {
            let work = self.work(Some((identity, value)));
            self.remote
                .process(&self.trust, CLUSTER, work, &self.stats, &mut self.log)
        }

        /// The node restarts: a new generation, signing afresh, chitchat versions anew.
        fn restart(&mut self, generation: u64) {
            self.signer = GossipSigner::from_pem(&self.cert, &self.key, CLUSTER, NODE, generation)
                .expect("signer");
            self.id_value = self
                .signer
                .sign(NODE_ID_KEY, &generation.to_be_bytes())
                .expect("sign id");
            self.id = ChitchatId::new(NODE, generation, "127.0.0.1:1".parse().expect("addr"));
            self.version = 2;
        }

        fn rejected(&self) -> u64 {
            self.stats.rejected.load(Ordering::Relaxed)
        }
    }

    #[test]
    fn signed_removal_drops_the_record() {
        let mut f = Fixture::new();
        let rec = Fixture::record("svc-a", "t");
        let v = f.signed_record(&rec);
        let d = f.feed("svc-a", Some(v));
        assert_eq!(plain(&d.upserts), vec![rec]);
        assert!(f.remote.trusted());
        assert!(f.remote.accepted.contains_key("svc-a"));

        let removal = f.signed_removal("svc-a");
        let d = f.feed("svc-a", Some(removal));
        assert!(d.upserts.is_empty());
        assert_eq!(d.removes, vec!["svc-a".to_string()]);
        assert!(f.remote.accepted.is_empty());
        // The later chitchat deletion of the key is garbage collection, not an attack.
        let d = f.feed("svc-a", None);
        assert!(d.upserts.is_empty() && d.removes.is_empty());
        assert_eq!(f.rejected(), 0);
        assert_eq!(f.stats.accepted.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn unsigned_deletion_of_a_live_record_is_ignored_and_counted() {
        let mut f = Fixture::new();
        let rec = Fixture::record("svc-a", "t");
        let v = f.signed_record(&rec);
        f.feed("svc-a", Some(v));
        // A tombstone (forged, or anyone's): ignored, counted.
        let d = f.feed("svc-a", None);
        assert!(d.upserts.is_empty() && d.removes.is_empty());
        assert_eq!(f.remote.accepted.get("svc-a").map(|r| &**r), Some(&rec));
        assert_eq!(f.rejected(), 1);
        // The key vanishing altogether (a chitchat reset): same.
        let work = NodeWork {
            id: f.id.clone(),
            max_version: f.version + 1,
            cert: Some(f.cert.clone()),
            node_id_value: Some(f.id_value.clone()),
            changed: vec![("p:svc-a".into(), None, 0)],
        };
        let d = f
            .remote
            .process(&f.trust, CLUSTER, work, &f.stats, &mut f.log);
        assert!(d.removes.is_empty());
        assert!(f.remote.accepted.contains_key("svc-a"));
        assert_eq!(f.rejected(), 2);
        // A removal that is not signed by the node (here: unsigned bytes) is refused too.
        let forged =
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD_NO_PAD, [1u8; 12]);
        let d = f.feed("svc-a", Some(forged));
        assert!(d.removes.is_empty());
        assert!(f.remote.accepted.contains_key("svc-a"));
        assert_eq!(f.rejected(), 3);
        // The signed removal still works afterwards.
        let removal = f.signed_removal("svc-a");
        assert_eq!(
            f.feed("svc-a", Some(removal)).removes,
            vec!["svc-a".to_string()]
        );
        assert_eq!(f.rejected(), 3);
    }

    #[test]
    fn re_registration_after_a_removal_works() {
        let mut f = Fixture::new();
        let first = Fixture::record("svc-a", "t1");
        let old = f.signed_record(&first);
        f.feed("svc-a", Some(old.clone()));
        let removal = f.signed_removal("svc-a");
        f.feed("svc-a", Some(removal.clone()));
        // Garbage collected, then registered again (a higher counter).
        f.feed("svc-a", None);
        let second = Fixture::record("svc-a", "t2");
        let v = f.signed_record(&second);
        let d = f.feed("svc-a", Some(v));
        assert_eq!(plain(&d.upserts), vec![second.clone()]);
        assert_eq!(f.remote.accepted.get("svc-a").map(|r| &**r), Some(&second));
        assert_eq!(f.rejected(), 0);
        // Replays of the old record or of the old removal change nothing.
        assert!(f.feed("svc-a", Some(old)).upserts.is_empty());
        assert!(f.feed("svc-a", Some(removal)).removes.is_empty());
        assert_eq!(f.remote.accepted.get("svc-a").map(|r| &**r), Some(&second));
        assert_eq!(f.rejected(), 2);
        // Removed and re-registered without garbage collection in between: also fine.
        let removal = f.signed_removal("svc-a");
        assert_eq!(f.feed("svc-a", Some(removal)).removes.len(), 1);
        let v = f.signed_record(&first);
        assert_eq!(
            plain(&f.feed("svc-a", Some(v)).upserts),
            vec![first.clone()]
        );
        assert_eq!(f.remote.accepted.get("svc-a").map(|r| &**r), Some(&first));
    }

    #[test]
    fn removal_body_is_never_a_record() {
        assert_eq!(
            decode_peer_value("svc-a", REMOVED_BODY),
            Ok(PeerValue::Removed)
        );
        let rec = Fixture::record("svc-a", "t");
        let body = rmp_serde::to_vec(&rec).expect("encode");
        assert!(!body.is_empty());
        assert_eq!(
            decode_peer_value("svc-a", &body),
            Ok(PeerValue::Record(rec))
        );
        assert!(decode_peer_value("svc-b", &body).is_err());
    }

    #[test]
    fn deletions_wait_for_the_gc_delay_and_stay_bounded() {
        let delay = Duration::from_secs(30);
        let mut p = Published::new(delay);
        let t0 = Instant::now();
        p.wrote_record("p:a");
        p.wrote_record("p:b");
        assert!(p.is_live("p:a"));
        assert_eq!(p.next_due(), None);
        p.wrote_removal("p:a", t0);
        assert!(!p.is_live("p:a"));
        assert_eq!(p.next_due(), Some(t0 + delay));
        assert!(p.take_due(t0 + delay / 2).is_empty());
        // Removed again (or many times) before the deletion: still one pending entry.
        for i in 1..=10 {
            p.wrote_removal("p:a", t0 + Duration::from_millis(i));
        }
        assert_eq!(p.pending_deletions(), 1);
        assert_eq!(p.next_due(), Some(t0 + Duration::from_millis(10) + delay));
        // Re-registered before the deletion: no deletion.
        p.wrote_removal("p:b", t0);
        p.wrote_record("p:b");
        assert_eq!(p.pending_deletions(), 1);
        assert_eq!(p.take_due(t0 + delay * 2), vec!["p:a".to_string()]);
        assert_eq!(p.pending_deletions(), 0);
        assert_eq!(p.next_due(), None);
        assert!(p.is_live("p:b"));
    }

    #[test]
    fn gc_delay_follows_the_failure_detector() {
        assert_eq!(removal_gc_delay(&GossipTuning::default()), REMOVAL_GC_DELAY);
        let slow = GossipTuning {
            interval: Duration::from_secs(1),
            ..GossipTuning::default()
        };
        assert_eq!(removal_gc_delay(&slow), Duration::from_secs(200));
    }

    fn plain(records: &[Arc<PeerRecord>]) -> Vec<PeerRecord> {
        records.iter().map(|r| (**r).clone()).collect()
    }

    /// A route table standing in for the node's (what the watcher applies to).
    #[derive(Default)]
    struct Table(Mutex<crate::routes::RouteTable>);

    impl RouteSources for Table {
        fn apply_remote(&self, source: &str, upserts: Vec<Arc<PeerRecord>>, removes: Vec<String>) {
            let mut t = self.0.lock().expect("table");
            for r in upserts {
                t.upsert(source, r);
            }
            for id in removes {
                t.remove(source, &id);
            }
        }

        fn drop_source(&self, source: &str) {
            self.0.lock().expect("table").remove_source(source);
        }

        fn peers_of(&self, source: &str) -> usize {
            self.0.lock().expect("table").identities_of(source).len()
        }
    }

    impl Table {
        /// Members of group `g` of topic `t`, with their incarnations.
        fn members(&self) -> Vec<(String, u64)> {
            let route = self.0.lock().expect("table").route("t");
            route
                .groups
                .iter()
                .filter(|g| g.group == "g")
                .flat_map(|g| g.members.iter())
                .map(|m| (m.identity.clone(), m.incarnation))
                .collect()
        }

        fn version(&self) -> u64 {
            self.0.lock().expect("table").route("t").version
        }
    }

    const ROUTE_GRACE: Duration = Duration::from_secs(15);
    const OWN: &str = "dir-0";

    /// A watcher on node `dir-0` applying to `table`, and what it lists as live.
    fn watcher(f: &Fixture, table: Arc<Table>) -> (Watcher, watch::Receiver<BTreeSet<String>>) {
        let (tx, rx) = watch::channel(BTreeSet::from([OWN.to_string()]));
        let w = Watcher::new(
            table,
            f.trust.clone(),
            CLUSTER.into(),
            OWN.into(),
            Arc::new(ClusterStats::default()),
            ROUTE_GRACE,
            tx,
        );
        (w, rx)
    }

    /// The fixture's node joins `w`'s live set at `now` with a record of `svc-a`.
    fn join_with_svc_a(f: &mut Fixture, w: &mut Watcher, now: Instant) -> PeerRecord {
        let rec = Fixture::record("svc-a", "t");
        let v = f.signed_record(&rec);
        let id = f.id.clone();
        w.remote_mut(&id);
        w.update(vec![f.work(Some(("svc-a", Some(v))))], now);
        rec
    }

    fn listed(rx: &watch::Receiver<BTreeSet<String>>) -> Vec<String> {
        rx.borrow().iter().cloned().collect()
    }

    #[test]
    fn a_dead_node_s_records_stay_for_the_route_grace_then_go() {
        let mut f = Fixture::new();
        let table = Arc::new(Table::default());
        let (mut w, rx) = watcher(&f, table.clone());
        let t0 = Instant::now();
        join_with_svc_a(&mut f, &mut w, t0);
        assert_eq!(table.members(), vec![("svc-a".to_string(), 1)]);
        assert_eq!(listed(&rx), vec![OWN.to_string(), NODE.to_string()]);
        let version = table.version();

        // Declared dead: no longer listed live, but its records stay in routes.
        let dead = t0 + Duration::from_secs(1);
        w.left(&f.id, dead);
        w.update(Vec::new(), dead);
        assert_eq!(listed(&rx), vec![OWN.to_string()]);
        assert_eq!(table.members(), vec![("svc-a".to_string(), 1)]);
        assert_eq!(table.version(), version, "no route change");
        assert_eq!(w.next_expiry(), Some(dead + ROUTE_GRACE));
        w.update(Vec::new(), dead + ROUTE_GRACE - Duration::from_millis(1));
        assert_eq!(table.members(), vec![("svc-a".to_string(), 1)]);

        // The grace is over: dropped, nothing left to wait for.
        w.update(Vec::new(), dead + ROUTE_GRACE);
        assert!(table.members().is_empty());
        assert!(table.version() > version);
        assert_eq!(w.next_expiry(), None);
        assert!(w.departed.is_empty() && w.applied.is_empty() && w.remotes.is_empty());
    }

    #[test]
    fn without_a_route_grace_a_dead_node_s_records_go_at_once() {
        let mut f = Fixture::new();
        let table = Arc::new(Table::default());
        let (mut w, _rx) = watcher(&f, table.clone());
        w.route_grace = Duration::ZERO;
        let t0 = Instant::now();
        join_with_svc_a(&mut f, &mut w, t0);
        w.left(&f.id, t0);
        w.update(Vec::new(), t0);
        assert!(table.members().is_empty());
        assert_eq!(w.next_expiry(), None);
    }

    #[test]
    fn a_node_back_within_the_route_grace_keeps_its_records() {
        let mut f = Fixture::new();
        let table = Arc::new(Table::default());
        let (mut w, rx) = watcher(&f, table.clone());
        let t0 = Instant::now();
        join_with_svc_a(&mut f, &mut w, t0);
        let id = f.id.clone();
        let mut now = t0;
        // Declared dead and back (a pause, a partition) again and again: one pending
        // removal at most, cancelled every time.
        for _ in 0..5 {
            now += Duration::from_secs(1);
            w.left(&id, now);
            w.update(Vec::new(), now);
            assert_eq!(w.departed.len(), 1);
            now += Duration::from_secs(10);
            w.remote_mut(&id);
            w.update(Vec::new(), now);
            assert!(w.departed.is_empty());
            assert_eq!(w.next_expiry(), None);
            assert_eq!(listed(&rx), vec![OWN.to_string(), NODE.to_string()]);
        }
        // Long past any grace: still there.
        w.update(Vec::new(), now + ROUTE_GRACE * 2);
        assert_eq!(table.members(), vec![("svc-a".to_string(), 1)]);
        // It resumed where it was: its next change applies as usual.
        let removal = f.signed_removal("svc-a");
        w.update(vec![f.work(Some(("svc-a", Some(removal))))], now);
        assert!(table.members().is_empty());
        assert_eq!(w.stats.rejected.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_peer_registered_again_elsewhere_appears_once() {
        let mut f = Fixture::new();
        let table = Arc::new(Table::default());
        let (mut w, _rx) = watcher(&f, table.clone());
        let t0 = Instant::now();
        let rec = join_with_svc_a(&mut f, &mut w, t0);
        let dead = t0 + Duration::from_secs(1);
        w.left(&f.id, dead);
        w.update(Vec::new(), dead);
        assert_eq!(table.peers_of(&source_id(&f.id)), 1);
        let version = table.version();
        // The peer fails over to node dir-2 and registers again (same process).
        table.apply_remote("dir-2", vec![Arc::new(rec)], Vec::new());
        assert_eq!(table.members(), vec![("svc-a".to_string(), 1)]);
        // The dead node's copy goes: senders see no change at all.
        w.update(Vec::new(), dead + ROUTE_GRACE);
        assert_eq!(table.members(), vec![("svc-a".to_string(), 1)]);
        assert_eq!(table.version(), version);
        assert_eq!(table.peers_of(&source_id(&f.id)), 0);
    }

    #[test]
    fn a_restarted_node_s_old_records_stay_for_the_route_grace() {
        let mut f = Fixture::new();
        let table = Arc::new(Table::default());
        let (mut w, rx) = watcher(&f, table.clone());
        let t0 = Instant::now();
        join_with_svc_a(&mut f, &mut w, t0);
        let old = f.id.clone();
        // The node restarts (a new generation) and proves it before the failure
        // detector has declared the old one dead: both are sources.
        f.restart(GENERATION + 1);
        let new = f.id.clone();
        w.remote_mut(&new);
        let rec = Fixture::record("svc-b", "t");
        let v = f.signed_record(&rec);
        w.update(vec![f.work(Some(("svc-b", Some(v))))], t0);
        assert_eq!(
            table.members(),
            vec![("svc-a".to_string(), 1), ("svc-b".to_string(), 1)]
        );
        assert_eq!(w.applied, HashSet::from([old.clone(), new.clone()]));
        assert_eq!(listed(&rx), vec![OWN.to_string(), NODE.to_string()]);
        // The old generation is declared dead: its records (svc-a, still moving to
        // another node) stay for the route grace, then go; the new one's stay.
        let dead = t0 + Duration::from_secs(1);
        w.left(&old, dead);
        w.update(Vec::new(), dead);
        assert_eq!(
            table.members(),
            vec![("svc-a".to_string(), 1), ("svc-b".to_string(), 1)]
        );
        w.update(Vec::new(), dead + ROUTE_GRACE);
        assert_eq!(table.members(), vec![("svc-b".to_string(), 1)]);
        assert!(w.departed.is_empty());
        assert_eq!(w.applied, HashSet::from([new]));
        assert_eq!(w.next_expiry(), None);
    }
}
