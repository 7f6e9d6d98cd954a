//! Authenticated gossip values.
//!
//! chitchat has no authentication of its own: anyone who can send UDP to a gossip port
//! can inject key/values into any node's namespace. Weft therefore protects every value
//! a directory node publishes at the value level:
//!
//! - Each node publishes its certificate chain (PEM) under the key [`CERT_KEY`]. A reader
//!   accepts a node's values only if that certificate chains to the fabric CA (webpki,
//!   the same check as for QUIC clients), carries the name
//!   [`weft_proto::DIRECTORY_IDENTITY`] and has the chitchat node id as its first DNS
//!   name ([`FabricTrust::verify_node`]).
//! - Every other value is `base64(1 | counter u64 | sig_len u8 | signature | body)`, the
//!   signature being ECDSA P-256/SHA-256 (ring) by the node's TLS key over
//!   `"weft-gossip-v1\0" | cluster id | node id | generation | key | counter | body`
//!   (strings length-prefixed, integers big-endian), see [`GossipSigner::sign`] and
//!   [`NodeKey::open`]. A value cannot be moved to another key, node, generation or
//!   cluster, nor altered.
//! - The counter increases with every value a node signs (per generation). Readers keep
//!   the highest counter they accepted per key ([`Counters`]), also across deletions, and
//!   refuse lower ones: an old signed value replayed under a newer chitchat version is
//!   rejected.
//!
//! - chitchat deletions (tombstones) cannot be signed, so they remove nothing: a writer
//!   removes a value by publishing a signed removal under the key (see the directory's
//!   gossip layer), and readers refuse ([`SignedError::UnsignedDeletion`]) a deletion of
//!   a value they still hold.
//!
//! What this does not do: hide anything (values are readable by whoever sees the
//! traffic), or stop an attacker on the gossip network from *suppressing* values
//! (version bumps that make chitchat ignore real updates, floods). Keep the gossip port
//! on a private interface.

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::collections::HashMap;
use std::sync::Arc;

/// The key under which a node publishes its certificate chain (PEM).
pub const CERT_KEY: &str = "cert";

/// Domain separation tag of the signed message (format version 1).
const DOMAIN: &[u8] = b"weft-gossip-v1\0";
/// Format version byte of a signed value.
const FORMAT: u8 = 1;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD_NO_PAD;

/// Why a gossip value or certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignedError {
    /// The value is not base64 or not in the signed format.
    #[error("malformed signed value: {0}")]
    Malformed(&'static str),
    /// The signature does not verify under the node's certificate key.
    #[error("bad signature")]
    BadSignature,
    /// The counter is lower than one already accepted for the key (replay).
    #[error("replayed value: counter {got} is below {last}, already accepted for this key")]
    Replayed {
        /// Counter of the value.
        got: u64,
        /// Highest counter accepted so far.
        last: u64,
    },
    /// The node published no certificate.
    #[error("the node published no certificate")]
    NoCertificate,
    /// The certificate is unusable or not trusted.
    #[error("certificate refused: {0}")]
    Certificate(String),
    /// The node's own key could not be used for signing.
    #[error("gossip signing key: {0}")]
    SigningKey(String),
    /// A key holding an accepted value was deleted without a signed removal (a chitchat
    /// tombstone, or the key vanished): deletions are unsigned, so it is ignored.
    #[error("unsigned deletion of a live value (only a signed removal removes it)")]
    UnsignedDeletion,
}

/// Signs the values this node publishes. Owned by the publishing task.
pub struct GossipSigner {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    cert_pem: String,
    cluster_id: String,
    node: String,
    generation: u64,
    counter: u64,
}

impl std::fmt::Debug for GossipSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipSigner")
            .field("node", &self.node)
            .field("generation", &self.generation)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl GossipSigner {
    /// A signer for node `node` (generation `generation`) of cluster `cluster_id`, from
    /// the node's certificate chain and PKCS#8 private key (PEM; ECDSA P-256, as issued by
    /// `weft_proto::certs`). Checks that the key belongs to the certificate.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        cluster_id: &str,
        node: &str,
        generation: u64,
    ) -> Result<Self, SignedError> {
        let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| SignedError::SigningKey(format!("no PEM private key: {e}")))?;
        let PrivateKeyDer::Pkcs8(pkcs8) = key_der else {
            return Err(SignedError::SigningKey(
                "the private key must be PKCS#8 (\"BEGIN PRIVATE KEY\")".into(),
            ));
        };
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|e| SignedError::SigningKey(format!("not an ECDSA P-256 PKCS#8 key ({e})")))?;
        let leaf = leaf_der(cert_pem)?;
        let public = spki_key(&leaf)?;
        if public != key.public_key().as_ref() {
            return Err(SignedError::SigningKey(
                "the private key does not belong to the certificate".into(),
            ));
        }
        Ok(Self {
            key,
            rng,
            cert_pem: cert_pem.to_string(),
            cluster_id: cluster_id.to_string(),
            node: node.to_string(),
            generation,
            counter: 0,
        })
    }

    /// The certificate chain to publish under [`CERT_KEY`].
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs `body` for `key` with the next counter; returns the value to publish.
    pub fn sign(&mut self, key: &str, body: &[u8]) -> Result<String, SignedError> {
        self.counter += 1;
        let msg = message(
            &self.cluster_id,
            &self.node,
            self.generation,
            key,
            self.counter,
            body,
        );
        let sig = self
            .key
            .sign(&self.rng, &msg)
            .map_err(|_| SignedError::SigningKey("signing failed".into()))?;
        let sig = sig.as_ref();
        let sig_len = u8::try_from(sig.len())
            .map_err(|_| SignedError::SigningKey("signature too long".into()))?;
        let mut raw = Vec::with_capacity(1 + 8 + 1 + sig.len() + body.len());
        raw.push(FORMAT);
        raw.extend_from_slice(&self.counter.to_be_bytes());
        raw.push(sig_len);
        raw.extend_from_slice(sig);
        raw.extend_from_slice(body);
        Ok(B64.encode(raw))
    }
}

/// The byte string that is signed.
fn message(
    cluster_id: &str,
    node: &str,
    generation: u64,
    key: &str,
    counter: u64,
    body: &[u8],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(
        DOMAIN.len() + 48 + cluster_id.len() + node.len() + key.len() + body.len(),
    );
    m.extend_from_slice(DOMAIN);
    for part in [cluster_id.as_bytes(), node.as_bytes()] {
        m.extend_from_slice(&(part.len() as u64).to_be_bytes());
        m.extend_from_slice(part);
    }
    m.extend_from_slice(&generation.to_be_bytes());
    m.extend_from_slice(&(key.len() as u64).to_be_bytes());
    m.extend_from_slice(key.as_bytes());
    m.extend_from_slice(&counter.to_be_bytes());
    m.extend_from_slice(&(body.len() as u64).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn certs_der(pem: &str) -> Result<Vec<CertificateDer<'static>>, SignedError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SignedError::Certificate(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(SignedError::Certificate("no certificate in PEM".into()));
    }
    Ok(certs)
}

fn leaf_der(pem: &str) -> Result<CertificateDer<'static>, SignedError> {
    certs_der(pem)?
        .into_iter()
        .next()
        .ok_or_else(|| SignedError::Certificate("no certificate in PEM".into()))
}

/// The raw subject public key (for EC: the uncompressed point) of a DER certificate.
fn spki_key(der: &[u8]) -> Result<Vec<u8>, SignedError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| SignedError::Certificate(format!("cannot parse: {e}")))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// DNS subject alternative names, in order.
fn dns_names(der: &[u8]) -> Result<Vec<String>, SignedError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| SignedError::Certificate(format!("cannot parse: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SignedError::Certificate(format!("bad subject alternative names: {e}")))?
        .ok_or_else(|| SignedError::Certificate("no subject alternative name".into()))?;
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect())
}

/// The fabric CA, used to decide which nodes' gossip to believe.
#[derive(Clone)]
pub struct FabricTrust {
    verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for FabricTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FabricTrust").finish_non_exhaustive()
    }
}

impl FabricTrust {
    /// Trusts the CA certificate(s) in `ca_pem`.
    pub fn from_ca_pem(ca_pem: &str) -> Result<Self, SignedError> {
        let mut roots = RootCertStore::empty();
        for ca in certs_der(ca_pem)? {
            roots
                .add(ca)
                .map_err(|e| SignedError::Certificate(format!("bad CA certificate: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| SignedError::Certificate(format!("CA unusable: {e}")))?;
        Ok(Self { verifier })
    }

    /// Checks that `cert_pem` (leaf, then intermediates) chains to the fabric CA, is
    /// valid now, is a directory certificate (carries
    /// [`weft_proto::DIRECTORY_IDENTITY`]) and names `node` first. Returns the key its
    /// values must be signed with.
    pub fn verify_node(&self, cert_pem: &str, node: &str) -> Result<NodeKey, SignedError> {
        let chain = certs_der(cert_pem)?;
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| SignedError::Certificate("empty chain".into()))?;
        self.verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|e| SignedError::Certificate(format!("not valid under the fabric CA: {e}")))?;
        let names = dns_names(leaf)?;
        if names.first().map(String::as_str) != Some(node) {
            return Err(SignedError::Certificate(format!(
                "certificate is for {:?}, but the gossip node id is {node:?}",
                names.first()
            )));
        }
        if !names.iter().any(|n| n == weft_proto::DIRECTORY_IDENTITY) {
            return Err(SignedError::Certificate(format!(
                "certificate of {node:?} lacks the name {:?}: not a directory node",
                weft_proto::DIRECTORY_IDENTITY
            )));
        }
        Ok(NodeKey {
            public: spki_key(leaf)?,
        })
    }
}

/// A verified directory node's public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeKey {
    public: Vec<u8>,
}

/// A value whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The writer's counter.
    pub counter: u64,
    /// The payload.
    pub body: Vec<u8>,
}

impl NodeKey {
    /// Decodes `value`, published by `node` (generation `generation`) of `cluster_id`
    /// under `key`, and checks its signature.
    pub fn open(
        &self,
        cluster_id: &str,
        node: &str,
        generation: u64,
        key: &str,
        value: &str,
    ) -> Result<Opened, SignedError> {
        let raw = B64
            .decode(value)
            .map_err(|_| SignedError::Malformed("not base64"))?;
        let (&format, rest) = raw.split_first().ok_or(SignedError::Malformed("empty"))?;
        if format != FORMAT {
            return Err(SignedError::Malformed("unknown format version"));
        }
        let (counter, rest) = rest
            .split_first_chunk::<8>()
            .ok_or(SignedError::Malformed("truncated counter"))?;
        let counter = u64::from_be_bytes(*counter);
        let (&sig_len, rest) = rest
            .split_first()
            .ok_or(SignedError::Malformed("truncated signature length"))?;
        let sig_len = usize::from(sig_len);
        if rest.len() < sig_len {
            return Err(SignedError::Malformed("truncated signature"));
        }
        let (sig, body) = rest.split_at(sig_len);
        let msg = message(cluster_id, node, generation, key, counter, body);
        UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &self.public)
            .verify(&msg, sig)
            .map_err(|_| SignedError::BadSignature)?;
        Ok(Opened {
            counter,
            body: body.to_vec(),
        })
    }
}

/// Highest counter accepted per key of one node (replay protection). Kept across
/// deletions of a key, dropped with the node.
#[derive(Debug, Default)]
pub struct Counters {
    last: HashMap<String, u64>,
}

impl Counters {
    /// Accepts `counter` for `key` unless a higher one was accepted before; an equal
    /// counter is the same value seen again (a writer never reuses a counter).
    pub fn check(&mut self, key: &str, counter: u64) -> Result<(), SignedError> {
        match self.last.get_mut(key) {
            Some(last) if counter < *last => Err(SignedError::Replayed {
                got: counter,
                last: *last,
            }),
            Some(last) => {
                *last = counter;
                Ok(())
            }
            None => {
                self.last.insert(key.to_string(), counter);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::certs;

    struct Node {
        signer: GossipSigner,
        cert: String,
    }

    fn node(dir: &std::path::Path, name: &str, extra: &[&str]) -> Node {
        let paths = certs::ensure_dev(dir, name, extra).expect("dev certs");
        let cert = std::fs::read_to_string(&paths.cert).expect("cert");
        let key = std::fs::read_to_string(&paths.key).expect("key");
        Node {
            signer: GossipSigner::from_pem(&cert, &key, "c1", name, 7).expect("signer"),
            cert,
        }
    }

    fn trust(dir: &std::path::Path) -> FabricTrust {
        let ca = std::fs::read_to_string(dir.join(certs::CA_CERT_FILE)).expect("ca");
        FabricTrust::from_ca_pem(&ca).expect("trust")
    }

    const DIR: &[&str] = &[weft_proto::DIRECTORY_IDENTITY];

    #[test]
    fn roundtrip() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut n = node(tmp.path(), "dir-1", DIR);
        let key = trust(tmp.path())
            .verify_node(&n.cert, "dir-1")
            .expect("trusted");
        let v1 = n.signer.sign("p:a", b"hello").expect("sign");
        let v2 = n.signer.sign("p:a", b"again").expect("sign");
        let o1 = key.open("c1", "dir-1", 7, "p:a", &v1).expect("valid");
        let o2 = key.open("c1", "dir-1", 7, "p:a", &v2).expect("valid");
        assert_eq!(o1.body, b"hello");
        assert!(o2.counter > o1.counter);
    }

    #[test]
    fn tampered_or_moved_values_are_rejected() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut n = node(tmp.path(), "dir-1", DIR);
        let key = trust(tmp.path())
            .verify_node(&n.cert, "dir-1")
            .expect("trusted");
        let v = n.signer.sign("p:a", b"hello").expect("sign");
        // Flip one bit of the body.
        let mut raw = B64.decode(&v).expect("b64");
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let tampered = B64.encode(&raw);
        assert_eq!(
            key.open("c1", "dir-1", 7, "p:a", &tampered),
            Err(SignedError::BadSignature)
        );
        // Same bytes under another key, node, generation or cluster.
        assert!(key.open("c1", "dir-1", 7, "p:b", &v).is_err());
        assert!(key.open("c1", "dir-2", 7, "p:a", &v).is_err());
        assert!(key.open("c1", "dir-1", 8, "p:a", &v).is_err());
        assert!(key.open("c2", "dir-1", 7, "p:a", &v).is_err());
        // Garbage.
        assert!(matches!(
            key.open("c1", "dir-1", 7, "p:a", "!!"),
            Err(SignedError::Malformed(_))
        ));
        assert!(key.open("c1", "dir-1", 7, "p:a", "").is_err());
    }

    #[test]
    fn wrong_key_is_rejected() {
        let tmp = tempfile::tempdir().expect("tmp");
        let n1 = node(tmp.path(), "dir-1", DIR);
        let n2 = node(tmp.path(), "dir-2", DIR);
        let k1 = trust(tmp.path())
            .verify_node(&n1.cert, "dir-1")
            .expect("trusted");
        // dir-2's key signs a value claiming to come from dir-1.
        let key2 = std::fs::read_to_string(tmp.path().join("dir-2.key")).expect("key");
        let mut forger = GossipSigner::from_pem(&n2.cert, &key2, "c1", "dir-1", 7).expect("signer");
        let v = forger.sign("p:a", b"x").expect("sign");
        assert_eq!(
            k1.open("c1", "dir-1", 7, "p:a", &v),
            Err(SignedError::BadSignature)
        );
    }

    #[test]
    fn untrusted_certificates_are_rejected() {
        let tmp = tempfile::tempdir().expect("tmp");
        let foreign = tempfile::tempdir().expect("tmp");
        let ours = node(tmp.path(), "dir-1", DIR);
        let theirs = node(foreign.path(), "dir-9", DIR);
        let plain = node(tmp.path(), "svc-1", &[]);
        let t = trust(tmp.path());
        assert!(t.verify_node(&ours.cert, "dir-1").is_ok());
        // Foreign CA.
        assert!(matches!(
            t.verify_node(&theirs.cert, "dir-9"),
            Err(SignedError::Certificate(_))
        ));
        // Right CA, wrong node name.
        assert!(t.verify_node(&ours.cert, "dir-2").is_err());
        // Right CA, not a directory certificate.
        assert!(t.verify_node(&plain.cert, "svc-1").is_err());
        assert!(t.verify_node("garbage", "dir-1").is_err());
    }

    #[test]
    fn key_must_match_certificate() {
        let tmp = tempfile::tempdir().expect("tmp");
        let n1 = node(tmp.path(), "dir-1", DIR);
        let _n2 = node(tmp.path(), "dir-2", DIR);
        let key2 = std::fs::read_to_string(tmp.path().join("dir-2.key")).expect("key");
        assert!(matches!(
            GossipSigner::from_pem(&n1.cert, &key2, "c1", "dir-1", 1),
            Err(SignedError::SigningKey(_))
        ));
    }

    #[test]
    fn replayed_counters_are_rejected() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut n = node(tmp.path(), "dir-1", DIR);
        let key = trust(tmp.path())
            .verify_node(&n.cert, "dir-1")
            .expect("trusted");
        let old = n.signer.sign("p:a", b"old").expect("sign");
        let new = n.signer.sign("p:a", b"new").expect("sign");
        let mut counters = Counters::default();
        let o_new = key.open("c1", "dir-1", 7, "p:a", &new).expect("valid");
        counters.check("p:a", o_new.counter).expect("fresh");
        // Seeing the same value again is fine.
        counters.check("p:a", o_new.counter).expect("same value");
        // The old value, validly signed, replayed later (e.g. under a newer chitchat
        // version, or after the key was deleted): refused.
        let o_old = key
            .open("c1", "dir-1", 7, "p:a", &old)
            .expect("signature is valid");
        assert!(matches!(
            counters.check("p:a", o_old.counter),
            Err(SignedError::Replayed { .. })
        ));
        // Other keys are independent.
        counters.check("p:b", o_old.counter).expect("other key");
    }
}
