//! Byte-for-byte reproducible TLS credentials for the simulation.
//!
//! The development CA (`weft_proto::certs`) makes random ECDSA P-256 keys and serials;
//! ECDSA signatures vary in length (70–72 bytes), so handshake packet sizes, and with
//! them congestion and pacing decisions, would vary between runs of one seed. Here every
//! key is Ed25519 derived from a fixed seed (signatures are deterministic and always 64
//! bytes), serials and validity dates are fixed, so the certificates are identical in
//! every process. The certificate profile is the same as the development CA's (DNS
//! subject alternative names, server and client authentication).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use weft_proto::tls::Credentials;

/// PKCS#8 v1 prefix of an Ed25519 private key (RFC 8410); the 32-byte seed follows.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

fn key(label: &str) -> KeyPair {
    let mut der = ED25519_PKCS8_PREFIX.to_vec();
    let mut seed = [0u8; 32];
    for (i, b) in label
        .bytes()
        .chain(std::iter::repeat(0x5a))
        .take(32)
        .enumerate()
    {
        seed[i] = b ^ (i as u8).wrapping_mul(31);
    }
    der.extend_from_slice(&seed);
    let key = KeyPair::try_from(der.as_slice()).expect("ed25519 key");
    assert_eq!(key.algorithm(), &rcgen::PKCS_ED25519);
    key
}

fn params(serial: u64) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    p.distinguished_name = rcgen::DistinguishedName::new();
    p
}

/// Credentials of every simulated node, by identity.
pub struct SimCreds {
    by_name: BTreeMap<String, Credentials>,
}

impl SimCreds {
    /// The credentials of `name`.
    pub fn get(&self, name: &str) -> Credentials {
        self.by_name
            .get(name)
            .unwrap_or_else(|| panic!("no simulated credentials for {name}"))
            .clone()
    }
}

/// Issues (once per process) the CA and the leaves of `nodes`: `(identity, extra DNS
/// names)`.
pub fn creds(nodes: &[(&str, &[&str])]) -> &'static SimCreds {
    static CREDS: OnceLock<SimCreds> = OnceLock::new();
    CREDS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir for simulated certificates");
        let by_name = issue_all(dir.path(), nodes);
        // The files are loaded; the directory can go.
        drop(dir);
        SimCreds { by_name }
    })
}

fn issue_all(dir: &Path, nodes: &[(&str, &[&str])]) -> BTreeMap<String, Credentials> {
    let ca_key = key("weft-sim-ca");
    let mut ca = params(1);
    ca.distinguished_name
        .push(DnType::CommonName, "Weft simulation CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("self-signed CA");
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).expect("write CA");
    let issuer = Issuer::new(ca, ca_key);
    let mut out = BTreeMap::new();
    for (i, (name, extra)) in nodes.iter().enumerate() {
        let mut sans = vec![name.to_string()];
        sans.extend(extra.iter().map(|s| s.to_string()));
        let mut p = params(100 + i as u64);
        p.subject_alt_names = sans
            .iter()
            .map(|s| rcgen::SanType::DnsName(s.clone().try_into().expect("dns name")))
            .collect();
        p.distinguished_name.push(DnType::CommonName, *name);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let leaf_key = key(&format!("weft-sim-leaf-{name}"));
        let cert = p.signed_by(&leaf_key, &issuer).expect("leaf");
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write leaf");
        std::fs::write(&key_path, leaf_key.serialize_pem()).expect("write key");
        let c = Credentials::load(&ca_path, &cert_path, &key_path).expect("load credentials");
        out.insert(name.to_string(), c);
    }
    out
}
