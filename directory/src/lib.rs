//! A Weft directory node: the fabric's phone book.
//!
//! Peers attach to a directory node over mutually-authenticated QUIC, register their
//! subscriptions (topic, group), resolve topics to routes and watch them for changes.
//! The directory holds only soft state, rebuilt from peers re-registering, and is never
//! on the data path.
//!
//! ```no_run
//! # async fn run() -> Result<(), weft_directory::DirectoryError> {
//! let dir = weft_directory::Directory::builder("dir-1")
//!     .listen("127.0.0.1:7400".parse().unwrap())
//!     .dev("./.weft/dev-ca")
//!     .start()
//!     .await?;
//! println!("directory on {}", dir.local_addr());
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod cluster;
mod node;
mod routes;
mod sessions;
pub mod signed;

pub use cluster::{
    GossipTuning, DEFAULT_CLUSTER_ID, DEFAULT_DEAD_NODE_ROUTE_GRACE, PEER_KEY_PREFIX,
};
pub use routes::{PeerRecord, RouteChange, RouteTable};
pub use sessions::{SessionUpdate, Sessions};
pub use weft_proto::wire::Route;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;
use weft_proto::certs;
use weft_proto::tls::{Credentials, TlsError};

/// Default grace period before a disconnected peer's registrations are removed.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(3);
/// Default limit of subscriptions a single peer may register.
pub const DEFAULT_MAX_SUBSCRIPTIONS_PER_PEER: usize = 1024;
/// Default limit of concurrent peer connections per directory node.
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;

/// Errors of the directory node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirectoryError {
    /// Certificates or TLS configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Certificates could not be created (development mode).
    #[error("development certificates: {0}")]
    DevCerts(String),
    /// A peer broke the protocol.
    #[error(transparent)]
    Wire(#[from] weft_proto::wire::WireError),
    /// A peer broke the protocol (described).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The QUIC connection failed.
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Local I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
}

enum TlsSource {
    Dev(PathBuf),
    Files {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
    Loaded(Credentials),
}

/// Configures and starts a [`Directory`] node.
pub struct DirectoryBuilder {
    name: String,
    settings: node::NodeSettings,
    tls: Option<TlsSource>,
    gossip: Option<(SocketAddr, Vec<SocketAddr>)>,
    gossip_advertise: Option<SocketAddr>,
    cluster_id: String,
    tuning: GossipTuning,
}

impl DirectoryBuilder {
    /// Where to accept peers (default `127.0.0.1:7400`; port 0 picks a free port).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.settings.listen = addr;
        self
    }

    /// Development mode: creates a CA and this node's certificate under `ca_dir` if
    /// missing. Never use in production.
    pub fn dev(mut self, ca_dir: impl Into<PathBuf>) -> Self {
        self.tls = Some(TlsSource::Dev(ca_dir.into()));
        self
    }

    /// Fabric CA certificate, this node's certificate and key (PEM files).
    pub fn tls_files(
        mut self,
        ca: impl Into<PathBuf>,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.tls = Some(TlsSource::Files {
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
        });
        self
    }

    /// Already loaded credentials.
    pub fn credentials(mut self, creds: Credentials) -> Self {
        self.tls = Some(TlsSource::Loaded(creds));
        self
    }

    /// How long a disconnected peer's registrations are kept (default 3 s).
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.settings.grace_period = grace;
        self
    }

    /// Largest frame accepted (default 4 MiB).
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.settings.max_frame = bytes;
        self
    }

    /// Subscriptions a single peer may register (default 1024).
    pub fn max_subscriptions_per_peer(mut self, n: usize) -> Self {
        self.settings.max_subscriptions_per_peer = n;
        self
    }

    /// Concurrent peer connections (default 20,000).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.settings.max_connections = n;
        self
    }

    /// Serves peers over `socket` instead of binding [`listen`](Self::listen): for
    /// example a simulated network's socket (`docs/simulation.md`). The socket's local
    /// address is the node's address. Default: a real UDP socket bound to `listen`.
    pub fn udp_socket(mut self, socket: std::sync::Arc<dyn quinn::AsyncUdpSocket>) -> Self {
        self.settings.udp_socket = Some(socket);
        self
    }

    /// Seeds the random choices of the node's QUIC endpoint, so that a simulated run can
    /// be reproduced (`docs/simulation.md`). Default: random from the operating system;
    /// do not set it in production. Gossip (`chitchat`) is not seeded by it.
    pub fn rng_seed(mut self, seed: u64) -> Self {
        self.settings.rng_seed = Some(seed);
        self
    }

    /// Joins a directory cluster: gossips on UDP `listen` (port 0 picks a free port) and
    /// contacts `seeds` (gossip addresses of other nodes; may include this node's own).
    /// Without this the node runs alone. Needs TLS from files or `.dev`: gossip values
    /// are signed with the node's key (see [`signed`]). Put `listen` on a private
    /// interface.
    pub fn gossip(mut self, listen: SocketAddr, seeds: Vec<SocketAddr>) -> Self {
        self.gossip = Some((listen, seeds));
        self
    }

    /// The gossip address other nodes should use for this one (default: the listen
    /// address; required when listening on a wildcard address).
    pub fn gossip_advertise(mut self, addr: SocketAddr) -> Self {
        self.gossip_advertise = Some(addr);
        self
    }

    /// Cluster id (default [`DEFAULT_CLUSTER_ID`]): nodes gossip only with nodes of the
    /// same id. Not a secret.
    pub fn cluster_id(mut self, id: impl Into<String>) -> Self {
        self.cluster_id = id.into();
        self
    }

    /// Gossip timing (see [`GossipTuning`] for the defaults).
    pub fn gossip_tuning(mut self, tuning: GossipTuning) -> Self {
        self.tuning = tuning;
        self
    }

    /// Binds and starts serving.
    pub async fn start(self) -> Result<Directory, DirectoryError> {
        let (creds, pem_paths) = match self.tls {
            Some(TlsSource::Loaded(c)) => (c, None),
            Some(TlsSource::Files { ca, cert, key }) => {
                let creds = Credentials::load(&ca, &cert, &key)?;
                (creds, Some((ca, cert, key)))
            }
            Some(TlsSource::Dev(dir)) => {
                let name = self.name.clone();
                let paths = tokio::task::spawn_blocking(move || {
                    certs::ensure_dev(&dir, &name, &[weft_proto::DIRECTORY_IDENTITY])
                })
                .await
                .map_err(|e| DirectoryError::DevCerts(e.to_string()))?
                .map_err(|e| DirectoryError::DevCerts(e.to_string()))?;
                let creds = Credentials::from_paths(&paths)?;
                (creds, Some((paths.ca, paths.cert, paths.key)))
            }
            None => {
                return Err(DirectoryError::Config(
                    "no TLS credentials: call .tls_files(ca, cert, key) or .dev(dir)".into(),
                ))
            }
        };
        let gossip = match self.gossip {
            None => None,
            Some((listen, seeds)) => {
                if creds.identity() != self.name {
                    return Err(DirectoryError::Config(format!(
                        "node name {:?} differs from its certificate identity {:?}: in a \
                         cluster the gossip node id must be the certificate's name",
                        self.name,
                        creds.identity()
                    )));
                }
                let Some((ca, cert, key)) = pem_paths else {
                    return Err(DirectoryError::Config(
                        "gossip needs the node's key to sign its values: use .tls_files(..) or .dev(..) rather than .credentials(..)".into(),
                    ));
                };
                let read = |p: &PathBuf| {
                    std::fs::read_to_string(p).map_err(|source| DirectoryError::Io {
                        what: format!("reading {}", p.display()),
                        source,
                    })
                };
                let keys = cluster::GossipKeys {
                    ca_pem: read(&ca)?,
                    cert_pem: read(&cert)?,
                    key_pem: read(&key)?,
                };
                let settings = cluster::GossipSettings {
                    listen,
                    advertise: self.gossip_advertise,
                    seeds,
                    cluster_id: self.cluster_id,
                    tuning: self.tuning,
                };
                Some((settings, keys))
            }
        };
        let node = node::start(self.name, &creds, self.settings)?;
        let cluster = match gossip {
            None => None,
            Some((settings, keys)) => {
                match cluster::start(node.shared.clone(), settings, keys).await {
                    Ok(c) => Some(c),
                    Err(e) => {
                        node.stop();
                        return Err(e);
                    }
                }
            }
        };
        Ok(Directory { node, cluster })
    }
}

/// A running directory node. Dropping it stops the node.
pub struct Directory {
    node: node::Node,
    cluster: Option<cluster::Cluster>,
}

impl Directory {
    /// Starts configuring a node named `name` (its certificate identity).
    pub fn builder(name: impl Into<String>) -> DirectoryBuilder {
        DirectoryBuilder {
            name: name.into(),
            settings: node::NodeSettings {
                listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
                grace_period: DEFAULT_GRACE_PERIOD,
                max_frame: weft_proto::wire::DEFAULT_MAX_FRAME,
                max_subscriptions_per_peer: DEFAULT_MAX_SUBSCRIPTIONS_PER_PEER,
                max_connections: DEFAULT_MAX_CONNECTIONS,
                udp_socket: None,
                rng_seed: None,
            },
            tls: None,
            gossip: None,
            gossip_advertise: None,
            cluster_id: DEFAULT_CLUSTER_ID.to_string(),
            tuning: GossipTuning::default(),
        }
    }

    /// The address peers connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.node.local_addr
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.node.shared.name
    }

    /// The route this node currently serves for `topic`.
    pub fn route(&self, topic: &str) -> Route {
        self.node.shared.route(topic)
    }

    /// Requests from peers this node answered so far (registrations, resolves,
    /// watches), a measure of the load peers put on it.
    pub fn requests_answered(&self) -> u64 {
        self.node.shared.requests.load(Ordering::Relaxed)
    }

    /// The UDP address this node gossips on (`None` when not in a cluster).
    pub fn gossip_addr(&self) -> Option<SocketAddr> {
        self.cluster.as_ref().map(|c| c.gossip_addr)
    }

    /// Gossip values refused so far: unsigned, badly signed, replayed, or from a node
    /// without a valid directory certificate from the fabric CA; also unsigned
    /// (chitchat) deletions of a record that was never removed by a signed removal.
    pub fn rejected_gossip_values(&self) -> u64 {
        self.cluster
            .as_ref()
            .map_or(0, |c| c.stats.rejected.load(Ordering::Relaxed))
    }

    /// Gossip values verified and applied so far.
    pub fn accepted_gossip_values(&self) -> u64 {
        self.cluster
            .as_ref()
            .map_or(0, |c| c.stats.accepted.load(Ordering::Relaxed))
    }

    /// Names of this node and of the live directory nodes it trusts, sorted (empty when
    /// not in a cluster): a remote node is listed only while the failure detector
    /// considers it live *and* its certificate chains to the fabric CA and its generation
    /// is proven by its key. A host gossiping without the fabric's credentials (or copying
    /// a real node's certificate) is never listed, even though chitchat counts it live.
    pub fn live_nodes(&self) -> Vec<String> {
        self.cluster
            .as_ref()
            .map_or_else(Vec::new, |c| c.live_nodes())
    }

    /// Stops gossiping and accepting, closes every connection and stops background
    /// tasks. Other nodes drop this node's registrations once their failure detector
    /// declares it dead.
    pub async fn shutdown(mut self) {
        if let Some(cluster) = self.cluster.take() {
            cluster.shutdown().await;
        }
        self.node.stop();
        self.node.endpoint.wait_idle().await;
    }
}

impl Drop for Directory {
    fn drop(&mut self) {
        if let Some(cluster) = &self.cluster {
            cluster.abort();
        }
        self.node.stop();
    }
}
