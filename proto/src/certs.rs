//! The fabric certificate authority and node certificates, as PEM files in one directory.
//!
//! A Weft fabric trusts exactly one CA. Every peer and directory node holds a leaf
//! certificate issued by it; the leaf's first DNS subject alternative name is the node's
//! *identity* (see [`crate::tls::Credentials::identity`]). Leaves are usable both as TLS
//! client and server certificates, because every node both dials and accepts.
//!
//! Layout of a certificate directory:
//!
//! | file           | content                                  | mode |
//! |----------------|------------------------------------------|------|
//! | `ca.pem`       | the fabric CA certificate                |      |
//! | `ca.key`       | the fabric CA private key                | 0600 |
//! | `<name>.pem`   | the leaf certificate of identity `name`  |      |
//! | `<name>.key`   | its private key                          | 0600 |
//!
//! [`init_ca`] and [`issue`] are the production tools (run once by an operator);
//! [`ensure_dev`] creates whatever is missing for local development and is safe to call
//! from several processes and threads at once.

#[cfg(unix)]
use std::fs::File;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

/// File name of the fabric CA certificate inside a certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the fabric CA private key inside a certificate directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Validity of a CA created by [`init_ca`] / [`ensure_dev`], in days (10 years).
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Validity of a leaf certificate issued by [`issue`] / [`ensure_dev`], in days (1 year).
pub const LEAF_VALIDITY_DAYS: i64 = 365;
/// Maximum length of an identity (the limit of a DNS name).
pub const MAX_NAME_LEN: usize = 253;
/// How long [`ensure_dev`] waits for another process that is creating the same files.
pub const DEV_WAIT: Duration = Duration::from_secs(10);

/// Certificates are back-dated by this much to tolerate small clock differences.
const CLOCK_SKEW: time::Duration = time::Duration::hours(1);
/// Poll interval while waiting for a concurrent creator in [`ensure_dev`].
const DEV_POLL: Duration = Duration::from_millis(5);

/// Errors creating, issuing or reading certificate files.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file system operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was attempted ("create directory", "read", "write", ...).
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// [`init_ca`] found an existing CA.
    #[error(
        "a fabric CA already exists in {} ({CA_CERT_FILE}/{CA_KEY_FILE}); refusing to \
         overwrite it (every certificate it issued would stop working). Use `issue` to add \
         node certificates, or move the directory away to start a new fabric",
        dir.display()
    )]
    CaExists {
        /// The certificate directory.
        dir: PathBuf,
    },
    /// The CA needed by [`issue`] is missing.
    #[error(
        "no fabric CA in {}: {} is missing; create one with `init_ca` first",
        dir.display(), missing.display()
    )]
    CaMissing {
        /// The certificate directory.
        dir: PathBuf,
        /// The missing file.
        missing: PathBuf,
    },
    /// A certificate or key file exists but cannot be used.
    #[error("unusable certificate file {}: {reason}", path.display())]
    InvalidFile {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The requested identity is not a valid DNS-like name.
    #[error(
        "invalid identity {name:?}: {reason} (an identity is a DNS-like name: letters, \
         digits, '-' and '.', 1 to {MAX_NAME_LEN} characters, e.g. \"orders-7.eu1\")"
    )]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Certificate generation failed.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// What was being generated.
        what: String,
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// [`ensure_dev`] found files another process started but did not finish.
    #[error(
        "{} exists but {} did not appear within {:?}: another process may have been \
         interrupted while creating it; delete {} and retry",
        present.display(), missing.display(), DEV_WAIT, present.display()
    )]
    Incomplete {
        /// The file that exists.
        present: PathBuf,
        /// The file that never appeared.
        missing: PathBuf,
    },
}

/// Paths of a fabric CA created by [`init_ca`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPaths {
    /// The CA certificate (`ca.pem`): distribute it to every node as its trust root.
    pub cert: PathBuf,
    /// The CA private key (`ca.key`, mode 0600): keep it off nodes in production.
    pub key: PathBuf,
}

/// Paths of a node's credentials, as issued by [`issue`] or [`ensure_dev`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    /// The node's leaf certificate (`<name>.pem`).
    pub cert: PathBuf,
    /// The node's private key (`<name>.key`, mode 0600).
    pub key: PathBuf,
    /// The fabric CA certificate (`ca.pem`) the leaf chains to.
    pub ca: PathBuf,
}

impl CertPaths {
    fn new(dir: &Path, name: &str) -> Self {
        CertPaths {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join(CA_CERT_FILE),
        }
    }
}

impl CaPaths {
    fn new(dir: &Path) -> Self {
        CaPaths {
            cert: dir.join(CA_CERT_FILE),
            key: dir.join(CA_KEY_FILE),
        }
    }
}

/// Creates a new fabric CA in `dir` (created if needed): writes `ca.pem` and `ca.key`
/// (mode 0600).
///
/// Refuses with [`CertError::CaExists`] if either file already exists; the check is
/// atomic, so two concurrent callers cannot both succeed.
pub fn init_ca(dir: &Path) -> Result<CaPaths, CertError> {
    create_dir(dir)?;
    let paths = CaPaths::new(dir);
    if paths.cert.exists() || paths.key.exists() {
        return Err(CertError::CaExists {
            dir: dir.to_path_buf(),
        });
    }
    match create_ca_files(&paths)? {
        Created::Yes => Ok(paths),
        Created::AlreadyExists => Err(CertError::CaExists {
            dir: dir.to_path_buf(),
        }),
    }
}

/// Issues a leaf certificate for identity `name` signed by the CA in `dir`.
///
/// The certificate's subject CN is `name`, its DNS subject alternative names are `name`
/// followed by `extra_names`, its extended key usages are server and client
/// authentication, and it is valid for [`LEAF_VALIDITY_DAYS`]. Writes `<name>.pem` and
/// `<name>.key` (mode 0600) into `dir`, replacing an existing pair (renewal; each file is
/// replaced atomically, but do not issue the same name concurrently: use [`ensure_dev`]
/// for that).
pub fn issue(dir: &Path, name: &str, extra_names: &[&str]) -> Result<CertPaths, CertError> {
    let (cert_pem, key_pem) = generate_leaf(dir, name, extra_names)?;
    let paths = CertPaths::new(dir, name);
    let key_tmp = write_temp(&paths.key, key_pem.as_bytes(), true)?;
    replace(&key_tmp, &paths.key)?;
    let cert_tmp = write_temp(&paths.cert, cert_pem.as_bytes(), false)?;
    replace(&cert_tmp, &paths.cert)?;
    sync_dir(dir);
    Ok(paths)
}

/// Development mode: makes sure `dir` holds a CA and a leaf for `name`, creating whatever
/// is missing, and returns the leaf's paths.
///
/// Logs a warning that the CA is a development CA. Safe when several processes or
/// threads call it at once on the same directory: files are written to temporary files
/// and published with no-clobber hard links (key first, certificate last), so exactly one
/// caller creates each CA and each leaf and the others wait (up to [`DEV_WAIT`]) for the
/// certificate to appear. An existing leaf is reused as is, even if it lacks some of
/// `extra_names`. Blocking: call it from `spawn_blocking` inside an async runtime.
pub fn ensure_dev(dir: &Path, name: &str, extra_names: &[&str]) -> Result<CertPaths, CertError> {
    validate_names(name, extra_names)?;
    create_dir(dir)?;
    tracing::warn!(
        dir = %dir.display(),
        identity = name,
        "using a DEVELOPMENT certificate authority created automatically in {}; \
         anyone who can read {} can join this fabric: do not use this in production \
         (create a CA with init_ca and issue certificates explicitly)",
        dir.display(),
        dir.join(CA_KEY_FILE).display()
    );

    let ca = CaPaths::new(dir);
    if !ca.cert.exists() {
        match create_ca_files(&ca)? {
            Created::Yes => {
                tracing::warn!(path = %ca.cert.display(), "created development fabric CA")
            }
            Created::AlreadyExists => {}
        }
        wait_for(&ca.key, &ca.cert, |_| read_ca(dir).map(|_| ()))?;
    }

    let leaf = CertPaths::new(dir, name);
    if !leaf.cert.exists() {
        let (cert_pem, key_pem) = generate_leaf(dir, name, extra_names)?;
        match publish_pair(&leaf.key, &key_pem, &leaf.cert, &cert_pem)? {
            Created::Yes => {
                tracing::info!(path = %leaf.cert.display(), identity = name, "issued development certificate")
            }
            Created::AlreadyExists => {}
        }
        wait_for(&leaf.key, &leaf.cert, |p| read_cert_der(p).map(|_| ()))?;
    }
    Ok(leaf)
}

/// Checks that `name` is usable as a Weft identity (and as a file name stem).
pub fn validate_name(name: &str) -> Result<(), CertError> {
    let bad = |reason| {
        Err(CertError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("it is longer than 253 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return bad("it contains a character other than a letter, digit, '-' or '.'");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return bad("it starts or ends with '.', or contains \"..\"");
        }
        if label.len() > 63 {
            return bad("a dot-separated part is longer than 63 characters");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a dot-separated part starts or ends with '-'");
        }
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return bad("it is an IP address");
    }
    if name.eq_ignore_ascii_case("ca") {
        return bad("\"ca\" is reserved for the fabric CA files");
    }
    if rustls::pki_types::DnsName::try_from(name).is_err() {
        return bad("it is not a valid DNS name");
    }
    Ok(())
}

fn validate_names(name: &str, extra_names: &[&str]) -> Result<(), CertError> {
    validate_name(name)?;
    extra_names.iter().try_for_each(|n| validate_name(n))
}

// ---------------------------------------------------------------------------------------
// Generation

fn now_minus_skew() -> OffsetDateTime {
    OffsetDateTime::now_utc() - CLOCK_SKEW
}

fn generate_ca() -> Result<(String, String), CertError> {
    let gen_err = |source| CertError::Generate {
        what: "the fabric CA".into(),
        source,
    };
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    let key = KeyPair::generate().map_err(gen_err)?;
    // A per-CA suffix keeps subjects distinct, so a certificate from another fabric's CA
    // is reported as "unknown issuer" rather than "bad signature".
    let id: String = key
        .public_key_raw()
        .iter()
        .skip(1)
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Weft fabric CA {id}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Weft");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now_minus_skew();
    params.not_after = OffsetDateTime::now_utc() + time::Duration::days(CA_VALIDITY_DAYS);
    let cert = params.self_signed(&key).map_err(gen_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Loads and checks the CA of `dir`.
fn read_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>, CertError> {
    let paths = CaPaths::new(dir);
    for p in [&paths.cert, &paths.key] {
        if !p.exists() {
            return Err(CertError::CaMissing {
                dir: dir.to_path_buf(),
                missing: p.clone(),
            });
        }
    }
    let der = read_cert_der(&paths.cert)?;
    let key_pem = read_file(&paths.key)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::InvalidFile {
        path: paths.key.clone(),
        reason: format!("not a PEM private key: {e}"),
    })?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| CertError::InvalidFile {
            path: paths.cert.clone(),
            reason: format!("cannot parse the certificate: {e}"),
        })?;
    if !parsed.is_ca() {
        return Err(CertError::InvalidFile {
            path: paths.cert.clone(),
            reason: "the certificate is not a CA certificate".into(),
        });
    }
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CertError::InvalidFile {
            path: paths.key.clone(),
            reason: format!("this key does not belong to {}", paths.cert.display()),
        });
    }
    Issuer::from_ca_cert_der(&der, key).map_err(|e| CertError::InvalidFile {
        path: paths.cert.clone(),
        reason: format!("unusable as an issuer: {e}"),
    })
}

/// Generates a leaf for `name` signed by the CA in `dir`: (certificate PEM, key PEM).
fn generate_leaf(
    dir: &Path,
    name: &str,
    extra_names: &[&str],
) -> Result<(String, String), CertError> {
    validate_names(name, extra_names)?;
    let issuer = read_ca(dir)?;
    let gen_err = |source| CertError::Generate {
        what: format!("a certificate for {name:?}"),
        source,
    };
    let mut sans = vec![name.to_string()];
    sans.extend(
        extra_names
            .iter()
            .filter(|n| **n != name)
            .map(|n| n.to_string()),
    );
    let mut params = CertificateParams::new(sans).map_err(gen_err)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now_minus_skew();
    params.not_after = OffsetDateTime::now_utc() + time::Duration::days(LEAF_VALIDITY_DAYS);
    let key = KeyPair::generate().map_err(gen_err)?;
    let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

// ---------------------------------------------------------------------------------------
// Files

enum Created {
    Yes,
    AlreadyExists,
}

fn create_ca_files(paths: &CaPaths) -> Result<Created, CertError> {
    let (cert_pem, key_pem) = generate_ca()?;
    publish_pair(&paths.key, &key_pem, &paths.cert, &cert_pem)
}

/// Publishes `key` then `cert`, each without clobbering. The caller that wins the key
/// also publishes the certificate; others get `AlreadyExists` and should wait for the
/// certificate (which is what readers look for).
fn publish_pair(
    key_path: &Path,
    key_pem: &str,
    cert_path: &Path,
    cert_pem: &str,
) -> Result<Created, CertError> {
    let key_tmp = write_temp(key_path, key_pem.as_bytes(), true)?;
    let won = publish_no_clobber(&key_tmp, key_path)?;
    if !won {
        return Ok(Created::AlreadyExists);
    }
    let cert_tmp = write_temp(cert_path, cert_pem.as_bytes(), false)?;
    if !publish_no_clobber(&cert_tmp, cert_path)? {
        return Err(CertError::Io {
            action: "create",
            path: cert_path.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "it already exists without a matching {}; remove it",
                    key_path.display()
                ),
            ),
        });
    }
    if let Some(dir) = cert_path.parent() {
        sync_dir(dir);
    }
    Ok(Created::Yes)
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Io {
        action: "create directory",
        path: dir.to_path_buf(),
        source,
    })
}

fn read_cert_der(path: &Path) -> Result<CertificateDer<'static>, CertError> {
    let pem = read_file(path)?;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| CertError::InvalidFile {
        path: path.to_path_buf(),
        reason: format!("not a PEM certificate: {e}"),
    })
}

fn read_file(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

/// A temporary file next to `dest`, removed on drop unless it was renamed away.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Writes `data` to a fresh temporary file next to `dest` and syncs it.
fn write_temp(dest: &Path, data: &[u8], secret: bool) -> Result<TempFile, CertError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = dest.parent().unwrap_or_else(|| Path::new("."));
    let file_name = dest
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{file_name}.tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let io_err = |action, source| CertError::Io {
        action,
        path: tmp.clone(),
        source,
    };
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(&tmp).map_err(|e| io_err("create", e))?;
    let guard = TempFile(tmp.clone());
    f.write_all(data).map_err(|e| io_err("write", e))?;
    f.sync_all().map_err(|e| io_err("sync", e))?;
    Ok(guard)
}

/// Atomically publishes `tmp` as `dest` unless `dest` exists. Returns whether we won.
fn publish_no_clobber(tmp: &TempFile, dest: &Path) -> Result<bool, CertError> {
    match fs::hard_link(&tmp.0, dest) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(_) => {
            // File systems without hard links: exclusive create, then copy. Readers retry
            // until the content parses.
            let data = fs::read(&tmp.0).map_err(|source| CertError::Io {
                action: "read",
                path: tmp.0.clone(),
                source,
            })?;
            let mut opts = OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
                let mode = fs::metadata(&tmp.0)
                    .map(|m| m.permissions().mode())
                    .unwrap_or(0o600);
                opts.mode(mode & 0o777);
            }
            let io_err = |action, source| CertError::Io {
                action,
                path: dest.to_path_buf(),
                source,
            };
            let mut f = match opts.open(dest) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
                Err(e) => return Err(io_err("create", e)),
            };
            f.write_all(&data).map_err(|e| io_err("write", e))?;
            f.sync_all().map_err(|e| io_err("sync", e))?;
            Ok(true)
        }
    }
}

/// Atomically replaces `dest` with `tmp`.
fn replace(tmp: &TempFile, dest: &Path) -> Result<(), CertError> {
    fs::rename(&tmp.0, dest).map_err(|source| CertError::Io {
        action: "replace",
        path: dest.to_path_buf(),
        source,
    })
}

fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Waits until `check(cert)` succeeds, which a concurrent creator makes true shortly after
/// publishing `key`.
fn wait_for(
    key: &Path,
    cert: &Path,
    check: impl Fn(&Path) -> Result<(), CertError>,
) -> Result<(), CertError> {
    let deadline = Instant::now() + DEV_WAIT;
    loop {
        if cert.exists() {
            match check(cert) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => {}
            }
        } else if Instant::now() >= deadline {
            return Err(CertError::Incomplete {
                present: key.to_path_buf(),
                missing: cert.to_path_buf(),
            });
        }
        std::thread::sleep(DEV_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::Credentials;
    use std::sync::{Arc, Barrier};

    #[test]
    fn init_and_issue_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init_ca(dir.path()).unwrap();
        assert!(ca.cert.exists() && ca.key.exists());
        let leaf = issue(dir.path(), "node-1.eu", &["node-1", "localhost"]).unwrap();
        assert_eq!(leaf.cert, dir.path().join("node-1.eu.pem"));
        let creds = Credentials::from_paths(&leaf).unwrap();
        assert_eq!(creds.identity(), "node-1.eu");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for k in [&ca.key, &leaf.key] {
                let mode = fs::metadata(k).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", k.display());
            }
        }
        // Re-issuing (renewal) replaces the pair and still loads.
        let again = issue(dir.path(), "node-1.eu", &[]).unwrap();
        Credentials::from_paths(&again).unwrap();
    }

    #[test]
    fn refuses_to_overwrite_ca() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let before = fs::read(dir.path().join(CA_KEY_FILE)).unwrap();
        let err = init_ca(dir.path()).unwrap_err();
        eprintln!("{err}");
        assert!(matches!(err, CertError::CaExists { .. }));
        assert_eq!(before, fs::read(dir.path().join(CA_KEY_FILE)).unwrap());
    }

    #[test]
    fn issue_without_ca_is_clear() {
        let dir = tempfile::tempdir().unwrap();
        let err = issue(dir.path(), "a", &[]).unwrap_err();
        eprintln!("{err}");
        assert!(matches!(err, CertError::CaMissing { .. }));
    }

    #[test]
    fn bad_names_rejected() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let long = "a".repeat(254);
        for bad in [
            "", "a b", "../x", "a/b", ".a", "a.", "a..b", "-a", "a-", "ca", "CA", "1.2.3.4", "é",
            &long,
        ] {
            let err = issue(dir.path(), bad, &[]).unwrap_err();
            assert!(
                matches!(err, CertError::InvalidName { .. }),
                "{bad:?}: {err}"
            );
        }
        let err = issue(dir.path(), "ok", &["bad name"]).unwrap_err();
        eprintln!("{err}");
        assert!(matches!(err, CertError::InvalidName { .. }));
        validate_name("orders-7.eu1").unwrap();
    }

    #[test]
    fn ensure_dev_concurrent() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().join("certs"); // also exercises directory creation races
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let dir = dir.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    // Two threads per name: leaves race too.
                    let name = format!("node-{}", i / 2);
                    ensure_dev(&dir, &name, &["localhost"])
                })
            })
            .collect();
        let results: Vec<CertPaths> = handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        let ca = fs::read(dir.join(CA_CERT_FILE)).unwrap();
        for paths in &results {
            assert_eq!(fs::read(&paths.ca).unwrap(), ca);
            let creds = Credentials::from_paths(paths).unwrap(); // checks the chain
            assert!(creds.identity().starts_with("node-"));
        }
        let leaves = fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                let n = n.to_string_lossy();
                n.ends_with(".pem") && n != CA_CERT_FILE
            })
            .count();
        assert_eq!(leaves, 4);
        let leftovers = fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".tmp.")
            })
            .count();
        assert_eq!(leftovers, 0, "temporary files left behind");
        // Idempotent afterwards.
        assert_eq!(ensure_dev(&dir, "node-0", &[]).unwrap(), results[0]);
    }
}
