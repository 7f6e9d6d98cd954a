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

mod node;
mod routes;
mod sessions;

pub use routes::{PeerRecord, RouteChange, RouteTable};
pub use sessions::{SessionUpdate, Sessions};
pub use weft_proto::wire::Route;

use std::net::SocketAddr;
use std::path::PathBuf;
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

    /// Binds and starts serving.
    pub async fn start(self) -> Result<Directory, DirectoryError> {
        let creds = match self.tls {
            Some(TlsSource::Loaded(c)) => c,
            Some(TlsSource::Files { ca, cert, key }) => Credentials::load(&ca, &cert, &key)?,
            Some(TlsSource::Dev(dir)) => {
                let paths = certs::ensure_dev(&dir, &self.name, &[weft_proto::DIRECTORY_IDENTITY])
                    .map_err(|e| DirectoryError::DevCerts(e.to_string()))?;
                Credentials::from_paths(&paths)?
            }
            None => {
                return Err(DirectoryError::Config(
                    "no TLS credentials: call .tls_files(ca, cert, key) or .dev(dir)".into(),
                ))
            }
        };
        let node = node::start(self.name, &creds, self.settings)?;
        Ok(Directory { node })
    }
}

/// A running directory node. Dropping it stops the node.
pub struct Directory {
    node: node::Node,
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
            },
            tls: None,
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

    /// Stops accepting, closes every connection and stops background tasks.
    pub async fn shutdown(self) {
        self.node
            .endpoint
            .close(quinn::VarInt::from_u32(0), b"directory shutting down");
        for task in &self.node.tasks {
            task.abort();
        }
        self.node.endpoint.wait_idle().await;
    }
}

impl Drop for Directory {
    fn drop(&mut self) {
        for task in &self.node.tasks {
            task.abort();
        }
        self.node
            .endpoint
            .close(quinn::VarInt::from_u32(0), b"directory dropped");
    }
}
