//! Tests of the `weft` command-line binary that need no running fabric.

use std::path::Path;
use std::process::{Command, Output};

fn weft(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weft"));
    cmd.args(args);
    for var in [
        "RUST_LOG",
        "WEFT_DIRECTORY",
        "WEFT_NAME",
        "WEFT_DATA_DIR",
        "WEFT_DEV",
        "WEFT_DEV_CA",
        "WEFT_CA",
        "WEFT_CERT",
        "WEFT_CERT_KEY",
    ] {
        cmd.env_remove(var);
    }
    cmd.output().expect("runs the weft binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn dir_arg(dir: &Path) -> &str {
    dir.to_str().expect("utf-8 temporary path")
}

#[test]
fn help_lists_the_commands() {
    let out = weft(&["--help"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let help = text(&out.stdout);
    for cmd in ["pub", "sub", "certs"] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{cmd} "))),
            "`weft --help` does not list {cmd}:\n{help}"
        );
    }
    assert!(help.contains("Examples"), "no examples in --help:\n{help}");
    // The body template survives clap's help rendering (clap turns `{n}` into a newline).
    let out = weft(&["pub", "--help"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("{{n}}"), "{}", text(&out.stdout));
}

#[test]
fn certs_init_and_issue_write_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("certs");
    let out = weft(&["certs", "init", "--dir", dir_arg(&dir)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(dir.join("ca.pem").is_file() && dir.join("ca.key").is_file());
    assert!(
        text(&out.stdout).contains(dir.join("ca.pem").to_str().unwrap()),
        "prints the paths written: {}",
        text(&out.stdout)
    );

    let out = weft(&["certs", "issue", "a", "--dir", dir_arg(&dir)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(dir.join("a.pem").is_file() && dir.join("a.key").is_file());
    assert!(text(&out.stdout).contains(dir.join("a.pem").to_str().unwrap()));

    let out = weft(&[
        "certs",
        "issue",
        "dir-1",
        "--dir",
        dir_arg(&dir),
        "--directory",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pem = std::fs::read_to_string(dir.join("dir-1.pem")).expect("directory cert");
    assert!(pem.contains("BEGIN CERTIFICATE"));
}

#[test]
fn certs_init_twice_fails_clearly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("certs");
    assert!(weft(&["certs", "init", "--dir", dir_arg(&dir)])
        .status
        .success());
    let key_before = std::fs::read(dir.join("ca.key")).expect("ca.key");
    let out = weft(&["certs", "init", "--dir", dir_arg(&dir)]);
    assert!(!out.status.success(), "a second init must fail");
    let err = text(&out.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("already exists"),
        "unclear error: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(key_before, std::fs::read(dir.join("ca.key")).unwrap());
}

#[test]
fn certs_issue_errors_are_readable() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = weft(&["certs", "issue", "a", "--dir", dir_arg(tmp.path())]);
    assert!(!out.status.success(), "issuing without a CA must fail");
    let err = text(&out.stderr);
    assert!(err.starts_with("error: "), "{err}");

    assert!(weft(&["certs", "init", "--dir", dir_arg(tmp.path())])
        .status
        .success());
    let out = weft(&["certs", "issue", "bad name", "--dir", dir_arg(tmp.path())]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("invalid identity"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn flag_names_are_unique() {
    // clap only checks for clashing flags (e.g. a message `--key` and a TLS `--key`)
    // in debug builds, when the command is parsed.
    for sub in ["pub", "sub"] {
        let out = weft(&[sub, "--help"]);
        assert!(out.status.success(), "{sub}: {}", text(&out.stderr));
    }
}

#[test]
fn pub_without_credentials_explains_what_to_pass() {
    let out = weft(&["pub", "orders", "hello"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("--dev") && err.contains("--cert-key"), "{err}");
}
