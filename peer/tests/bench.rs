//! `weft bench` end to end: an in-process fabric over real QUIC, as a user runs it.

use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft"))
        .arg("bench")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("runs the weft binary")
}

/// The JSON line of a successful run.
fn report(args: &[&str]) -> serde_json::Value {
    let out = bench(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "weft bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().expect("one JSON line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

fn num(v: &serde_json::Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {field} in {v}"))
}

#[test]
fn a_fixed_rate_run_takes_as_long_as_its_rate_says_and_delivers_everything() {
    // 3,000 messages at 20,000 a second: the last is due 150 ms after the first.
    let r = report(&[
        "--json",
        "--count",
        "3000",
        "--rate",
        "20000",
        "--compressible",
        "0",
    ]);
    assert_eq!(r["system"], "weft_memory");
    assert_eq!(num(&r, "count"), 3000.0);
    assert_eq!(num(&r, "expected_deliveries"), 3000.0);
    assert_eq!(num(&r, "rate_per_publisher"), 20000.0);
    assert!(num(&r, "publish_s") >= 0.149, "paced: {r}");
    assert!(
        num(&r, "msgs_per_s") <= 20_100.0,
        "never above the rate: {r}"
    );
    // Latencies count from when each message was due, so never below the send lag.
    assert!(num(&r, "rtt_p50_us") > 0.0 && num(&r, "send_lag_p50_us") > 0.0);
    assert!(num(&r, "peak_rss_mib") > 0.0 && num(&r, "cpu_s") > 0.0);
}

#[test]
fn a_timed_run_publishes_until_its_duration_is_up() {
    let r = report(&["--json", "--duration", "0.3", "--rate", "10000"]);
    let count = num(&r, "count");
    // 0.3 s at 10,000 a second: ~3,000 (the pacer releases what is due, in order).
    assert!((2_900.0..=3_001.0).contains(&count), "{r}");
    assert_eq!(num(&r, "expected_deliveries"), count);
    assert!(num(&r, "publish_s") >= 0.29, "{r}");
}

#[test]
fn flags_that_cannot_run_are_refused_with_the_reason() {
    for (args, says) in [
        (&["--rate", "0"][..], "--rate must be a positive"),
        (
            &["--duration", "500"][..],
            "--duration must be positive and below --timeout-s",
        ),
        (&["--groups", "0"][..], "must be at least 1"),
        (&["--compressible", "101"][..], "101 is not in 0..=100"),
    ] {
        let out = bench(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} ran");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
