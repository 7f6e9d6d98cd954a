//! Mutually-authenticated QUIC for Weft: rustls and quinn configuration.
//!
//! Every connection is TLS 1.3 with ALPN [`ALPN`]; both sides present a leaf certificate
//! issued by the fabric CA (see [`crate::certs`]) and trust only that CA. A node's
//! *identity* is the first DNS subject alternative name of its leaf.
//!
//! Dialing: callers dial a socket address and pass the identity they expect to find there
//! (as advertised by the directory) as the TLS server name; standard webpki name
//! verification then proves that the listener holds a certificate for exactly that
//! identity from this fabric's CA ([`connect`]). Accepting: after the handshake the
//! server learns who connected with [`peer_identity`] (or uses [`accept`], which does
//! both and logs rejected clients).
//!
//! The crypto provider is always rustls' `ring` provider, passed explicitly: nothing here
//! depends on a process-wide default provider.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, IdleTimeout, TransportConfig, VarInt};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::RootCertStore;

use crate::certs::CertPaths;

/// The ALPN protocol identifier of the Weft protocol, version 1.
pub const ALPN: &[u8] = b"weft/1";

/// Interval of QUIC keep-alive packets: keeps NAT bindings open and detects dead peers
/// well within [`MAX_IDLE_TIMEOUT`].
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// A connection (or handshake) without any packet from the peer for this long is closed.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A peer gives up its directory node after this long without any packet from it
/// (checked by the peer, not by QUIC): shorter than [`MAX_IDLE_TIMEOUT`] so that a peer
/// notices a dead directory node, fails over to another and registers again well within
/// the directory's dead-node route grace (15 s by default). Both sides send keep-alives
/// every [`KEEP_ALIVE_INTERVAL`], so only a dead node (or a cut path) lets it lapse.
/// Data connections between peers keep [`MAX_IDLE_TIMEOUT`].
pub const DIRECTORY_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// A dial (QUIC handshake and its confirmation) that has not finished by then is given
/// up, so that the caller retries with a fresh handshake: after loss or a partition a
/// handshake's retransmission timer may have backed off to many seconds.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Flow-control window of one receiving stream, in bytes (8 MiB).
pub const STREAM_RECEIVE_WINDOW: u32 = 8 << 20;
/// Flow-control window of a whole connection (all streams), in bytes (16 MiB).
pub const CONNECTION_RECEIVE_WINDOW: u32 = 16 << 20;
/// Maximum bytes buffered for sending on a connection (all streams), in bytes (16 MiB).
pub const SEND_WINDOW: u64 = 16 << 20;
/// Bidirectional streams the peer may have open at once towards us.
pub const MAX_CONCURRENT_BIDI_STREAMS: u32 = 64;
/// Unidirectional streams the peer may have open at once towards us.
pub const MAX_CONCURRENT_UNI_STREAMS: u32 = 64;

/// Flow-control window of one receiving stream on a directory node's connections, in
/// bytes (64 KiB). Directory traffic is small control frames read as they arrive, so the
/// window only bounds how much a peer can make the node buffer; a larger frame still
/// passes, paced by window updates.
pub const DIRECTORY_STREAM_RECEIVE_WINDOW: u32 = 64 << 10;
/// Flow-control window of a whole directory connection, in bytes (128 KiB).
pub const DIRECTORY_CONNECTION_RECEIVE_WINDOW: u32 = 128 << 10;
/// Maximum bytes a directory node buffers for sending on one connection (256 KiB): route
/// pushes to a slow peer then wait in the node's coalescing queue instead of piling up
/// in QUIC.
pub const DIRECTORY_SEND_WINDOW: u64 = 256 << 10;
/// Bidirectional streams a peer may have open at once towards a directory node. The
/// directory protocol uses one per connection; quinn sets up per-stream state for every
/// allowed stream when a connection is created (a hash-map entry each), so the 64 of
/// [`MAX_CONCURRENT_BIDI_STREAMS`] cost ~8 KiB per connection for nothing.
pub const DIRECTORY_MAX_CONCURRENT_BIDI_STREAMS: u32 = 4;

/// Largest UDP payload an endpoint accepts (advertised to peers). Senders still send
/// no more than their path carries: see [`loopback_transport_config`].
pub const MAX_UDP_PAYLOAD: u16 = 65_527;
/// Packet size used from the first packet on loopback, where no MTU limit applies.
pub const LOOPBACK_MTU: u16 = 65_000;
/// Congestion window of a new loopback connection (a window smaller than one
/// `LOOPBACK_MTU` packet would stall it).
pub const LOOPBACK_INITIAL_WINDOW: u64 = 6_500_000;
/// Kernel send and receive buffer size requested for every endpoint's UDP socket.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// How often [`connect`] checks whether the server confirmed the handshake.
const CONFIRM_POLL: Duration = Duration::from_millis(1);

/// Errors loading credentials, building TLS/QUIC configuration, connecting or accepting.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credentials file could not be read.
    #[error("cannot read {what} file {}: {source}", path.display())]
    Read {
        /// Which file ("CA certificate", "certificate", "private key").
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A credentials file does not contain what it should.
    #[error("invalid {what} file {}: {reason}", path.display())]
    Invalid {
        /// Which file ("CA certificate", "certificate", "private key").
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The leaf certificate does not chain to the fabric CA.
    #[error(
        "certificate {} is not valid under the fabric CA {}: {reason} (was it issued by \
         another CA, or has it expired?)",
        cert.display(), ca.display()
    )]
    NotIssuedByCa {
        /// The leaf certificate file.
        cert: PathBuf,
        /// The CA certificate file.
        ca: PathBuf,
        /// Why verification failed.
        reason: String,
    },
    /// The private key does not belong to the certificate.
    #[error("private key {} does not match certificate {}: {reason}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Details.
        reason: String,
    },
    /// rustls or quinn rejected the configuration (a bug or unsupported key type).
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
    /// The QUIC endpoint could not be created.
    #[error("cannot bind QUIC endpoint on {addr}: {source} (address in use? no tokio runtime?)")]
    Bind {
        /// The requested bind address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The connection attempt could not even be started.
    #[error("cannot dial {addr} as {identity:?}: {source}")]
    Dial {
        /// The address dialed.
        addr: SocketAddr,
        /// The expected identity.
        identity: String,
        /// quinn's reason.
        #[source]
        source: quinn::ConnectError,
    },
    /// We refused the server: its certificate does not prove the expected identity under
    /// this fabric's CA.
    #[error(
        "refused {addr}: it did not prove identity {identity:?} with a certificate from this \
         fabric's CA ({reason})"
    )]
    ServerNotTrusted {
        /// The address dialed.
        addr: SocketAddr,
        /// The expected identity.
        identity: String,
        /// The TLS error.
        reason: String,
    },
    /// The server refused our handshake (usually: our certificate is not from the CA it
    /// trusts, or it does not speak `weft/1`).
    #[error(
        "{addr} (expected identity {identity:?}) refused our TLS handshake: {reason} (is \
         our certificate issued by the same fabric CA as theirs?)"
    )]
    RejectedByServer {
        /// The address dialed.
        addr: SocketAddr,
        /// The expected identity.
        identity: String,
        /// The close reason sent by the server.
        reason: String,
    },
    /// A client refused our (server) certificate: it is not from the CA the client trusts,
    /// or not for the identity the client expected.
    #[error(
        "{addr} refused our certificate during the TLS handshake: {reason} (is our \
         certificate from the fabric CA that client trusts, and for the identity it dialed?)"
    )]
    RejectedByClient {
        /// The client's address.
        addr: SocketAddr,
        /// The close reason sent by the client.
        reason: String,
    },
    /// We refused a client: it presented no certificate, or one not from this fabric's CA.
    #[error(
        "refused connection from {addr}: the client did not authenticate with a certificate \
         from this fabric's CA ({reason})"
    )]
    ClientNotTrusted {
        /// The client's address.
        addr: SocketAddr,
        /// The TLS error.
        reason: String,
    },
    /// No answer in time.
    #[error(
        "timed out connecting to {addr}: no QUIC handshake within {DIAL_TIMEOUT:?} (is a \
         Weft node listening there? is UDP blocked?)"
    )]
    Timeout {
        /// The remote address.
        addr: SocketAddr,
    },
    /// Any other connection failure.
    #[error("connection with {addr} failed: {source}")]
    Connection {
        /// The remote address.
        addr: SocketAddr,
        /// quinn's reason.
        #[source]
        source: ConnectionError,
    },
    /// The connection carries no usable peer identity.
    #[error("connection with {addr} has no usable peer identity: {reason}")]
    NoPeerIdentity {
        /// The remote address.
        addr: SocketAddr,
        /// What is missing.
        reason: String,
    },
}

impl TlsError {
    /// Whether this error means authentication failed (as opposed to the network).
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            TlsError::ServerNotTrusted { .. }
                | TlsError::RejectedByServer { .. }
                | TlsError::ClientNotTrusted { .. }
                | TlsError::RejectedByClient { .. }
        )
    }
}

/// A node's TLS credentials: its leaf certificate (chain) and key, and the fabric CA.
///
/// Cheap to clone (shared inside).
#[derive(Clone)]
pub struct Credentials {
    inner: Arc<Inner>,
}

struct Inner {
    identity: String,
    roots: Arc<RootCertStore>,
    key: Arc<CertifiedKey>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.inner.identity)
            .finish_non_exhaustive()
    }
}

/// rustls' `ring` provider with AES-128-GCM first. Both ends of every Weft connection
/// are Weft, so this order decides the suite: AES-128-GCM (the first choice of Go's TLS
/// and of browsers, and what QUIC itself uses for Initial packets) runs 10 AES rounds
/// where AES-256-GCM runs 14, and bulk encryption is the largest CPU cost of large
/// messages (docs/benchmarks.md). AES-256-GCM and ChaCha20-Poly1305 stay available.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            what,
            path: path.to_path_buf(),
            reason: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            what,
            path: path.to_path_buf(),
            reason: "no \"BEGIN CERTIFICATE\" section found".into(),
        });
    }
    Ok(certs)
}

/// The first DNS subject alternative name of a DER certificate.
fn first_dns_san(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subject alternative name extension: {e}"))?
        .ok_or("the certificate has no subject alternative name")?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .ok_or_else(|| "the certificate has no DNS subject alternative name".to_string())
}

impl Credentials {
    /// Loads the fabric CA certificate(s), the leaf certificate (optionally followed by
    /// intermediates) and its private key from PEM files.
    ///
    /// Checks that the key matches the certificate and that the certificate chains to
    /// the CA and is currently valid.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let provider = provider();
        let ca_certs = read_certs("CA certificate", ca)?;
        let mut roots = RootCertStore::empty();
        for c in ca_certs {
            roots.add(c).map_err(|e| TlsError::Invalid {
                what: "CA certificate",
                path: ca.to_path_buf(),
                reason: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);

        let chain = read_certs("certificate", cert)?;
        let key_pem = read("private key", key)?;
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Invalid {
            what: "private key",
            path: key.to_path_buf(),
            reason: format!("no usable PEM private key: {e}"),
        })?;
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(TlsError::Invalid {
                what: "certificate",
                path: cert.to_path_buf(),
                reason: "no certificate found".into(),
            });
        };
        let identity = first_dns_san(leaf).map_err(|reason| TlsError::Invalid {
            what: "certificate",
            path: cert.to_path_buf(),
            reason,
        })?;

        // Chain check: the same verifier servers use for clients.
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|e| TlsError::NotIssuedByCa {
                cert: cert.to_path_buf(),
                ca: ca.to_path_buf(),
                reason: e.to_string(),
            })?;

        let certified = CertifiedKey::from_der(chain, key_der, &provider).map_err(|e| {
            TlsError::KeyMismatch {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        Ok(Credentials {
            inner: Arc::new(Inner {
                identity,
                roots,
                key: Arc::new(certified),
                provider,
            }),
        })
    }

    /// [`Credentials::load`] from the paths returned by [`crate::certs::issue`] or
    /// [`crate::certs::ensure_dev`].
    pub fn from_paths(paths: &CertPaths) -> Result<Self, TlsError> {
        Self::load(&paths.ca, &paths.cert, &paths.key)
    }

    /// This node's identity: the first DNS subject alternative name of its certificate.
    pub fn identity(&self) -> &str {
        &self.inner.identity
    }
}

/// Weft's QUIC transport parameters (see the constants in this module).
pub fn transport_config() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(
            MAX_IDLE_TIMEOUT.as_millis() as u32,
        ))))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_BIDI_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_CONCURRENT_UNI_STREAMS));
    t
}

/// [`transport_config`] for a loopback path: 65,000-byte packets from the start with
/// MTU discovery off, no segmentation offload (a GSO batch of such packets would exceed
/// the 64 KiB datagram limit) and a congestion window that fits many of them. Only for
/// loopback: on a real network a large MTU is lost to fragmentation, so other paths
/// keep quinn's MTU discovery from 1,200 bytes.
pub fn loopback_transport_config() -> TransportConfig {
    let mut t = transport_config();
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window(LOOPBACK_INITIAL_WINDOW);
    t.initial_mtu(LOOPBACK_MTU)
        .mtu_discovery_config(None)
        .enable_segmentation_offload(false)
        .congestion_controller_factory(Arc::new(cubic));
    t
}

/// Transport parameters of a directory node's connections: [`transport_config`]'s
/// keep-alive and idle timeout (peers rely on both), but sized for small control
/// traffic rather than throughput, since a node holds thousands of such connections:
///
/// - receive and send windows of [`DIRECTORY_STREAM_RECEIVE_WINDOW`],
///   [`DIRECTORY_CONNECTION_RECEIVE_WINDOW`] and [`DIRECTORY_SEND_WINDOW`] instead of
///   8/16/16 MiB, bounding what one connection can make the node buffer;
/// - [`DIRECTORY_MAX_CONCURRENT_BIDI_STREAMS`] bidirectional and no unidirectional
///   streams (quinn allocates state for every stream the peer may open);
/// - no MTU discovery: packets stay at quinn's 1,200-byte initial MTU, which every path
///   carries; directory frames are small, and this saves the probes and keeps
///   per-connection transmit buffers at one small packet's size;
/// - no unreliable datagrams (the directory protocol does not use them).
///
/// Data connections between peers keep [`transport_config`].
pub fn directory_transport_config() -> TransportConfig {
    let mut t = transport_config();
    t.stream_receive_window(VarInt::from_u32(DIRECTORY_STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(DIRECTORY_CONNECTION_RECEIVE_WINDOW))
        .send_window(DIRECTORY_SEND_WINDOW)
        .max_concurrent_bidi_streams(VarInt::from_u32(DIRECTORY_MAX_CONCURRENT_BIDI_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .mtu_discovery_config(None)
        .datagram_receive_buffer_size(None);
    t
}

/// The client configuration to dial `addr` with: [`loopback_transport_config`] for a
/// loopback address, else [`transport_config`].
pub fn client_config_for(
    creds: &Credentials,
    addr: SocketAddr,
) -> Result<quinn::ClientConfig, TlsError> {
    let transport = if addr.ip().is_loopback() {
        loopback_transport_config()
    } else {
        transport_config()
    };
    client_config(creds, Arc::new(transport))
}

/// Endpoint-wide settings: accept datagrams up to [`MAX_UDP_PAYLOAD`].
fn endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    // A constant in quinn's valid range (1200..=65527).
    let _ = config.max_udp_payload_size(MAX_UDP_PAYLOAD);
    config
}

/// Server configuration: TLS 1.3 only, ALPN `weft/1`, our leaf as server certificate,
/// and a client certificate from the fabric CA is mandatory.
pub fn server_config(
    creds: &Credentials,
    transport: Arc<TransportConfig>,
) -> Result<quinn::ServerConfig, TlsError> {
    let c = &creds.inner;
    let verifier = WebPkiClientVerifier::builder_with_provider(c.roots.clone(), c.provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(c.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(c.key.as_ref().clone())));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport);
    Ok(cfg)
}

/// Client configuration: TLS 1.3 only, ALPN `weft/1`, the fabric CA as the only root,
/// our leaf as client certificate.
///
/// The server name given to `Endpoint::connect_with(cfg, addr, server_name)` must be the
/// identity expected at `addr` (e.g. as advertised by the directory): webpki's name check
/// then verifies that the server's certificate was issued by the fabric CA *for that
/// identity*. Never pass a host name or address there.
pub fn client_config(
    creds: &Credentials,
    transport: Arc<TransportConfig>,
) -> Result<quinn::ClientConfig, TlsError> {
    let c = &creds.inner;
    let mut tls = rustls::ClientConfig::builder_with_provider(c.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(c.roots.clone())
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(c.key.as_ref().clone())));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport);
    Ok(cfg)
}

/// A QUIC endpoint bound to `bind` (port 0 picks a free port) that accepts connections
/// ([`server_config`]) and dials them ([`client_config`] as default), both with
/// [`transport_config`]. Must be called inside a tokio runtime.
pub fn endpoint(bind: SocketAddr, creds: &Credentials) -> Result<quinn::Endpoint, TlsError> {
    endpoint_with_transport(bind, creds, transport_config())
}

/// [`endpoint`] with other transport parameters for both accepted and dialed
/// connections (e.g. [`directory_transport_config`] for a directory node). Must be
/// called inside a tokio runtime.
pub fn endpoint_with_transport(
    bind: SocketAddr,
    creds: &Credentials,
    transport: TransportConfig,
) -> Result<quinn::Endpoint, TlsError> {
    endpoint_with_socket_and_transport(udp_socket(bind)?, creds, None, transport)
}

/// A UDP socket bound to `bind` with [`SOCKET_BUFFER_BYTES`] kernel buffers (best
/// effort: the kernel caps them at `net.core.{r,w}mem_max`).
fn bind_udp(bind: SocketAddr) -> Result<std::net::UdpSocket, TlsError> {
    let socket =
        std::net::UdpSocket::bind(bind).map_err(|source| TlsError::Bind { addr: bind, source })?;
    let sock = socket2::SockRef::from(&socket);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    Ok(socket)
}

/// A real UDP socket bound to `bind`, wrapped for quinn's tokio runtime: what
/// [`endpoint`] binds, for callers of [`endpoint_with_socket`] that want a real socket
/// but a seeded endpoint. Must be called inside a tokio runtime.
pub fn udp_socket(bind: SocketAddr) -> Result<Arc<dyn quinn::AsyncUdpSocket>, TlsError> {
    use quinn::Runtime as _;
    let socket = bind_udp(bind)?;
    quinn::TokioRuntime
        .wrap_udp_socket(socket)
        .map_err(|source| TlsError::Bind { addr: bind, source })
}

/// A QUIC endpoint like [`endpoint`] (same server, client and transport configuration),
/// over a socket the caller supplies instead of one bound here: for example a simulated
/// network's socket (see `docs/simulation.md`). quinn's tokio runtime drives it, so its
/// timers follow tokio's clock (a paused or simulated clock included).
///
/// `rng_seed`, when set, seeds the endpoint's random choices (packet number skips,
/// connection ids of the protocol state machine...) so that a simulated run can be
/// reproduced; leave it `None` outside simulations. Must be called inside a tokio
/// runtime.
pub fn endpoint_with_socket(
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    creds: &Credentials,
    rng_seed: Option<u64>,
) -> Result<quinn::Endpoint, TlsError> {
    endpoint_with_socket_and_transport(socket, creds, rng_seed, transport_config())
}

/// [`endpoint_with_socket`] with other transport parameters for both accepted and
/// dialed connections (e.g. [`directory_transport_config`]). Must be called inside a
/// tokio runtime.
pub fn endpoint_with_socket_and_transport(
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    creds: &Credentials,
    rng_seed: Option<u64>,
    transport: TransportConfig,
) -> Result<quinn::Endpoint, TlsError> {
    let transport = Arc::new(transport);
    let server = server_config(creds, transport.clone())?;
    let client = client_config(creds, transport)?;
    let mut config = endpoint_config();
    config.rng_seed(rng_seed.map(seed_bytes));
    let addr = socket
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut ep = quinn::Endpoint::new_with_abstract_socket(
        config,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TlsError::Bind { addr, source })?;
    ep.set_default_client_config(client);
    Ok(ep)
}

/// Expands a 64-bit seed into the 32 bytes quinn's RNG takes (splitmix64 sequence).
fn seed_bytes(seed: u64) -> [u8; 32] {
    let mut state = seed;
    let mut out = [0u8; 32];
    for chunk in out.chunks_exact_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out
}

/// Whether a QUIC error code is a TLS alert (CRYPTO_ERROR range 0x100..=0x1ff).
fn is_crypto(code: quinn::TransportErrorCode) -> bool {
    (0x100..=0x1ff).contains(&u64::from(code))
}

fn dial_error(err: ConnectionError, addr: SocketAddr, identity: &str) -> TlsError {
    match err {
        ConnectionError::TransportError(e) if is_crypto(e.code) => TlsError::ServerNotTrusted {
            addr,
            identity: identity.to_string(),
            reason: e.to_string(),
        },
        ConnectionError::ConnectionClosed(c) if is_crypto(c.error_code) => {
            TlsError::RejectedByServer {
                addr,
                identity: identity.to_string(),
                reason: c.to_string(),
            }
        }
        ConnectionError::TimedOut => TlsError::Timeout { addr },
        source => TlsError::Connection { addr, source },
    }
}

/// Dials `addr` and authenticates it as `expected_identity` (mutual TLS).
///
/// Returns only once the server has confirmed the handshake, i.e. has also accepted our
/// certificate (in TLS 1.3 a client otherwise learns of its rejection only afterwards).
/// Authentication failures are [`TlsError::ServerNotTrusted`] (we refused them: foreign
/// CA or identity mismatch) or [`TlsError::RejectedByServer`] (they refused us), logged
/// at warn level; network failures are [`TlsError::Timeout`] / [`TlsError::Connection`].
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    expected_identity: &str,
) -> Result<quinn::Connection, TlsError> {
    connect_with(endpoint, None, addr, expected_identity).await
}

/// [`connect`] with a client configuration other than the endpoint's default (e.g.
/// [`client_config_for`] the address).
pub async fn connect_with(
    endpoint: &quinn::Endpoint,
    config: Option<quinn::ClientConfig>,
    addr: SocketAddr,
    expected_identity: &str,
) -> Result<quinn::Connection, TlsError> {
    let dial = async {
        let connecting = match config {
            Some(config) => endpoint.connect_with(config, addr, expected_identity),
            None => endpoint.connect(addr, expected_identity),
        }
        .map_err(|source| TlsError::Dial {
            addr,
            identity: expected_identity.to_string(),
            source,
        })?;
        let conn = connecting
            .await
            .map_err(|e| dial_error(e, addr, expected_identity))?;
        confirmed(&conn)
            .await
            .map_err(|e| dial_error(e, addr, expected_identity))?;
        Ok(conn)
    };
    let result = tokio::time::timeout(DIAL_TIMEOUT, dial)
        .await
        .unwrap_or(Err(TlsError::Timeout { addr }));
    if let Err(e) = &result {
        if e.is_auth_failure() {
            tracing::warn!(%addr, identity = expected_identity, "authentication failed: {e}");
        }
    }
    result
}

/// Waits until the server's HANDSHAKE_DONE arrived (it has verified our certificate) or
/// the connection closed.
async fn confirmed(conn: &quinn::Connection) -> Result<(), ConnectionError> {
    let wait = async {
        loop {
            if conn.stats().frame_rx.handshake_done > 0 {
                return Ok(());
            }
            tokio::select! {
                e = conn.closed() => return Err(e),
                _ = tokio::time::sleep(CONFIRM_POLL) => {}
            }
        }
    };
    match tokio::time::timeout(MAX_IDLE_TIMEOUT, wait).await {
        Ok(r) => r,
        Err(_) => Err(ConnectionError::TimedOut),
    }
}

/// Completes an incoming connection and returns it with the client's authenticated
/// identity. A client without a certificate from this fabric's CA is refused with
/// [`TlsError::ClientNotTrusted`]; a client that refuses our certificate gives
/// [`TlsError::RejectedByClient`]; both are logged at warn level.
pub async fn accept(incoming: quinn::Incoming) -> Result<(quinn::Connection, String), TlsError> {
    let addr = incoming.remote_address();
    let result: Result<_, TlsError> = async {
        let conn = incoming.await.map_err(|source| match source {
            ConnectionError::TransportError(e) if is_crypto(e.code) => TlsError::ClientNotTrusted {
                addr,
                reason: e.to_string(),
            },
            ConnectionError::ConnectionClosed(c) if is_crypto(c.error_code) => {
                TlsError::RejectedByClient {
                    addr,
                    reason: c.to_string(),
                }
            }
            ConnectionError::TimedOut => TlsError::Timeout { addr },
            source => TlsError::Connection { addr, source },
        })?;
        let identity = peer_identity(&conn)?;
        Ok((conn, identity))
    }
    .await;
    if let Err(e) = &result {
        if e.is_auth_failure() {
            tracing::warn!(%addr, "authentication failed: {e}");
        }
    }
    result
}

/// The authenticated identity of the remote side of `conn`: the first DNS subject
/// alternative name of its leaf certificate (verified against the fabric CA during the
/// handshake). Servers call this after accepting to learn who connected.
pub fn peer_identity(conn: &quinn::Connection) -> Result<String, TlsError> {
    let addr = conn.remote_address();
    let missing = |reason: &str| TlsError::NoPeerIdentity {
        addr,
        reason: reason.to_string(),
    };
    let any = conn
        .peer_identity()
        .ok_or_else(|| missing("the peer presented no certificate"))?;
    let chain = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| missing("unexpected peer identity type (not rustls)"))?;
    let leaf = chain
        .first()
        .ok_or_else(|| missing("the peer's certificate chain is empty"))?;
    first_dns_san(leaf).map_err(|reason| TlsError::NoPeerIdentity { addr, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CipherSuite;

    #[test]
    fn aes_128_gcm_is_preferred_and_every_ring_suite_stays_available() {
        let suites: Vec<CipherSuite> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(suites.first(), Some(&CipherSuite::TLS13_AES_128_GCM_SHA256));
        let mut all: Vec<CipherSuite> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        let mut ours = suites.clone();
        all.sort_by_key(|s| u16::from(*s));
        ours.sort_by_key(|s| u16::from(*s));
        assert_eq!(ours, all);
    }
}
