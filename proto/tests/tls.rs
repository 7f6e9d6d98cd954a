//! Mutual TLS over real QUIC on 127.0.0.1.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use weft_proto::certs;
use weft_proto::tls::{self, Credentials, TlsError};

const LOCAL: &str = "127.0.0.1:0";
const LIMIT: Duration = Duration::from_secs(5);

fn local() -> SocketAddr {
    LOCAL.parse().unwrap()
}

fn creds(dir: &Path, name: &str) -> Credentials {
    if !dir.join(certs::CA_CERT_FILE).exists() {
        certs::init_ca(dir).unwrap();
    }
    Credentials::from_paths(&certs::issue(dir, name, &[]).unwrap()).unwrap()
}

/// Accepts one connection on `ep` and returns the outcome of [`tls::accept`].
async fn accept_one(ep: &quinn::Endpoint) -> Result<(quinn::Connection, String), TlsError> {
    let incoming = tokio::time::timeout(LIMIT, ep.accept())
        .await
        .expect("no incoming connection")
        .expect("endpoint closed");
    tokio::time::timeout(LIMIT, tls::accept(incoming))
        .await
        .expect("accept hung")
}

async fn dial(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    identity: &str,
) -> Result<quinn::Connection, TlsError> {
    tokio::time::timeout(LIMIT, tls::connect(ep, addr, identity))
        .await
        .expect("connect hung")
}

#[tokio::test]
async fn same_ca_connects_and_echoes() {
    let dir = tempfile::tempdir().unwrap();
    let a = creds(dir.path(), "alpha");
    let b = creds(dir.path(), "beta.eu1");
    let server = tls::endpoint(local(), &a).unwrap();
    let client = tls::endpoint(local(), &b).unwrap();
    let addr = server.local_addr().unwrap();

    let srv = tokio::spawn(async move {
        let (conn, who) = accept_one(&server).await.unwrap();
        assert_eq!(who, "beta.eu1");
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let data = recv.read_to_end(1 << 20).await.unwrap();
        send.write_all(&data).await.unwrap();
        send.finish().unwrap();
        conn.closed().await;
        server
    });

    let conn = dial(&client, addr, "alpha").await.unwrap();
    assert_eq!(tls::peer_identity(&conn).unwrap(), "alpha");
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let msg: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    send.write_all(&msg).await.unwrap();
    send.finish().unwrap();
    let echoed = tokio::time::timeout(LIMIT, recv.read_to_end(1 << 20))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed, msg);
    conn.close(0u32.into(), b"done");
    tokio::time::timeout(LIMIT, srv).await.unwrap().unwrap();
}

/// A client endpoint with a hand-built rustls config: trusts `ca_dir`'s CA and presents
/// `client` (cert, key) if given.
fn manual_client(ca_dir: &Path, client: Option<&certs::CertPaths>) -> quinn::Endpoint {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(ca_dir.join(certs::CA_CERT_FILE)).unwrap();
    roots
        .add(CertificateDer::from_pem_slice(&ca).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut tls_cfg = match client {
        None => builder.with_no_client_auth(),
        Some(p) => {
            let cert = CertificateDer::from_pem_file(&p.cert).unwrap();
            let key = PrivateKeyDer::from_pem_file(&p.key).unwrap();
            builder.with_client_auth_cert(vec![cert], key).unwrap()
        }
    };
    tls_cfg.alpn_protocols = vec![tls::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls_cfg).unwrap();
    let mut ep = quinn::Endpoint::client(local()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    ep
}

#[tokio::test]
async fn client_from_foreign_ca_refused() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let server = tls::endpoint(local(), &creds(ours.path(), "alpha")).unwrap();
    let addr = server.local_addr().unwrap();
    certs::init_ca(theirs.path()).unwrap();
    let mallory = certs::issue(theirs.path(), "mallory", &[]).unwrap();

    // Case 1: the intruder trusts our CA (so the server is the one that must refuse).
    let intruder = manual_client(ours.path(), Some(&mallory));
    let srv = tokio::spawn(async move {
        let r = accept_one(&server).await.map(|_| ());
        (r, server)
    });
    let client_err = dial(&intruder, addr, "alpha").await.unwrap_err();
    eprintln!("client side: {client_err}");
    assert!(
        matches!(client_err, TlsError::RejectedByServer { .. }),
        "{client_err:?}"
    );
    let (server_res, server) = tokio::time::timeout(LIMIT, srv).await.unwrap().unwrap();
    let server_err = server_res.unwrap_err();
    eprintln!("server side: {server_err}");
    assert!(matches!(server_err, TlsError::ClientNotTrusted { .. }));

    // Case 2: a complete foreign node (its own CA): refused as well.
    let foreign = tls::endpoint(local(), &Credentials::from_paths(&mallory).unwrap()).unwrap();
    let srv = tokio::spawn(async move { accept_one(&server).await.map(|_| ()) });
    let err = dial(&foreign, addr, "alpha").await.unwrap_err();
    eprintln!("foreign node, client side: {err}");
    assert!(err.is_auth_failure());
    let err = tokio::time::timeout(LIMIT, srv)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    eprintln!("foreign node, server side: {err}");
}

#[tokio::test]
async fn server_from_foreign_ca_refused() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let impostor = tls::endpoint(local(), &creds(theirs.path(), "alpha")).unwrap();
    let client = tls::endpoint(local(), &creds(ours.path(), "beta")).unwrap();
    let addr = impostor.local_addr().unwrap();

    let srv = tokio::spawn(async move { accept_one(&impostor).await.map(|_| ()) });
    let err = dial(&client, addr, "alpha").await.unwrap_err();
    eprintln!("client side: {err}");
    assert!(matches!(err, TlsError::ServerNotTrusted { .. }), "{err:?}");
    let server_err = tokio::time::timeout(LIMIT, srv)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    eprintln!("impostor side: {server_err}");
    assert!(
        matches!(server_err, TlsError::RejectedByClient { .. }),
        "{server_err:?}"
    );
}

#[tokio::test]
async fn wrong_expected_identity_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = tls::endpoint(local(), &creds(dir.path(), "alpha")).unwrap();
    let client = tls::endpoint(local(), &creds(dir.path(), "beta")).unwrap();
    let addr = server.local_addr().unwrap();

    let srv = tokio::spawn(async move { accept_one(&server).await.map(|_| ()) });
    let err = dial(&client, addr, "gamma").await.unwrap_err();
    eprintln!("client side: {err}");
    assert!(matches!(err, TlsError::ServerNotTrusted { .. }), "{err:?}");
    assert!(tokio::time::timeout(LIMIT, srv)
        .await
        .unwrap()
        .unwrap()
        .is_err());
}

#[tokio::test]
async fn client_without_certificate_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = tls::endpoint(local(), &creds(dir.path(), "alpha")).unwrap();
    let addr = server.local_addr().unwrap();

    // A well-behaved client in every respect except that it presents no certificate.
    let anon = manual_client(dir.path(), None);

    let srv = tokio::spawn(async move { accept_one(&server).await.map(|_| ()) });
    let err = dial(&anon, addr, "alpha").await.unwrap_err();
    eprintln!("client side: {err}");
    assert!(matches!(err, TlsError::RejectedByServer { .. }), "{err:?}");
    let server_err = tokio::time::timeout(LIMIT, srv)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    eprintln!("server side: {server_err}");
    assert!(matches!(server_err, TlsError::ClientNotTrusted { .. }));
}

#[test]
fn load_errors_are_clear() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    certs::init_ca(ours.path()).unwrap();
    certs::init_ca(theirs.path()).unwrap();
    let leaf = certs::issue(theirs.path(), "mallory", &[]).unwrap();
    let err = Credentials::load(&ours.path().join("ca.pem"), &leaf.cert, &leaf.key).unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, TlsError::NotIssuedByCa { .. }));
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    let err = Credentials::load(&ours.path().join("nope.pem"), &leaf.cert, &leaf.key).unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, TlsError::Read { .. }));
    let other = certs::issue(theirs.path(), "other", &[]).unwrap();
    let err = Credentials::load(&leaf.ca, &leaf.cert, &other.key).unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, TlsError::KeyMismatch { .. }));
    let err = Credentials::load(&leaf.ca, &leaf.key, &leaf.key).unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, TlsError::Invalid { .. }));
}
