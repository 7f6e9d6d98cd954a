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

/// The JSON line of a run of 3,000 messages at 20,000 a second (its last due 150 ms
/// after its first), with `extra` flags.
fn paced_report(extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--json", "--count", "3000", "--rate", "20000"];
    args.extend_from_slice(extra);
    report(&args)
}

fn num(v: &serde_json::Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {field} in {v}"))
}

#[test]
fn a_fixed_rate_run_takes_as_long_as_its_rate_says_and_delivers_everything() {
    // 3,000 messages at 20,000 a second: the last is due 150 ms after the first.
    let r = paced_report(&["--compressible", "0"]);
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
fn a_short_run_records_the_latency_of_every_delivery() {
    // Fewer messages than a subscriber adds to the shared histogram at once (1,024).
    for batch in ["1", "16"] {
        let r = report(&["--json", "--count", "500", "--batch", batch]);
        assert_eq!(num(&r, "count"), 500.0);
        assert!(
            num(&r, "rtt_p50_us") > 0.0 && num(&r, "lat_max_us") > 0.0,
            "{r}"
        );
    }
}

#[test]
fn publishers_share_the_count_to_the_last_message() {
    let r = report(&["--json", "--count", "1001", "--publishers", "3"]);
    assert_eq!(num(&r, "count"), 1001.0, "{r}");
    assert_eq!(num(&r, "expected_deliveries"), 1001.0, "{r}");
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

#[test]
fn the_memory_limit_flag_reaches_the_outbox_and_the_machine_share_is_reported() {
    // 64 messages held at most: publishers wait for acks, and everything arrives.
    let r = paced_report(&["--memory-messages", "64"]);
    assert_eq!(num(&r, "expected_deliveries"), 3000.0, "{r}");
    if std::path::Path::new("/proc/stat").exists() {
        // 150 ms: clock ticks passed, so the shares are known.
        let (steal, idle) = (num(&r, "host_steal_pct"), num(&r, "host_idle_pct"));
        assert!(steal >= 0.0 && idle >= 0.0 && steal + idle <= 100.0, "{r}");
    }
    // No room at all: the outbox refuses every publish, and the run says why.
    let out = bench(&["--json", "--count", "100", "--memory-messages", "0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ran with no memory room");
    assert!(
        stderr.contains("can never fit the limit on Memory messages"),
        "{stderr}"
    );
}

#[test]
fn with_processes_every_peer_runs_apart_and_reports_its_own_usage() {
    let r = report(&[
        "--json",
        "--processes",
        "--count",
        "4000",
        "--groups",
        "2",
        "--batch",
        "16",
    ]);
    assert_eq!(num(&r, "count"), 4000.0);
    assert_eq!(num(&r, "expected_deliveries"), 8000.0);
    assert!(
        num(&r, "delivered") >= 8000.0,
        "every group got everything: {r}"
    );
    let processes = r["processes"].as_array().expect("processes");
    let mut pids: Vec<u64> = processes.iter().map(|p| num(p, "pid") as u64).collect();
    let roles: Vec<&str> = processes
        .iter()
        .filter_map(|p| p["role"].as_str())
        .collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "publisher").count(),
        1,
        "{r}"
    );
    assert_eq!(
        roles.iter().filter(|r| **r == "subscriber").count(),
        2,
        "{r}"
    );
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 3, "three processes: {r}");
    for p in processes {
        assert!(num(p, "cpu_s") > 0.0 && num(p, "peak_rss_mib") > 1.0, "{p}");
    }
    assert!(
        num(&r, "rtt_p50_us") > 0.0,
        "latency measured across processes"
    );
}

/// The processes of `parent` and their command lines, from /proc.
fn children_of(parent: u32) -> Vec<(i32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .map(|s| s.lines().any(|l| l == format!("PPid:\t{parent}")))
                .unwrap_or(false)
        })
        .filter_map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")))
        })
        .collect()
}

#[test]
fn a_killed_subscriber_process_fails_the_run_with_its_name() {
    // 20,000 messages at 2,000 a second: ten seconds, time enough to kill one.
    let run = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args([
            "bench",
            "--json",
            "--processes",
            "--count",
            "20000",
            "--rate",
            "2000",
        ])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starts weft bench");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (victim, publisher) = loop {
        let children = children_of(run.id());
        let find = |role: &str| children.iter().find(|(_, cmd)| cmd.contains(role));
        if let (Some((sub, _)), Some((publisher, _))) =
            (find("--role subscriber"), find("--role publisher"))
        {
            break (*sub, *publisher);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no subscriber process seen"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // SAFETY: a plain kill(2) of a process this test saw as the run's child.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0);
    let out = run.wait_with_output().expect("bench ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the run cannot succeed without its subscriber"
    );
    assert!(
        stderr.contains("subscriber sub-0-0 exited") && stderr.contains("SIGKILL"),
        "{stderr}"
    );
    // The publisher is killed with its parent's run (gone, or a zombie until reaped).
    let gone = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map(|s| s.contains("State:\tZ"))
            .unwrap_or(true)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !gone(publisher) {
        assert!(
            std::time::Instant::now() < deadline,
            "publisher {publisher} left running"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn round_trips_run_on_one_thread_by_default_and_on_the_layout_asked_for() {
    for (flags, layout) in [
        (&[][..], "single"),
        (&["--threads", "shared"][..], "shared"),
        (&["--threads", "per-peer"][..], "per-peer"),
    ] {
        let mut args = vec![
            "--json", "--mode", "lat", "--count", "300", "--warmup", "50",
        ];
        args.extend_from_slice(flags);
        let r = report(&args);
        assert_eq!(r["threads"], layout, "{r}");
        assert_eq!(num(&r, "count"), 300.0);
        assert!(num(&r, "rtt_p50_us") > 0.0, "{r}");
    }
    let out = bench(&["--mode", "lat", "--threads", "two"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid value 'two'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn round_trips_between_two_processes() {
    let r = report(&[
        "--json",
        "--processes",
        "--mode",
        "lat",
        "--count",
        "300",
        "--warmup",
        "50",
    ]);
    assert_eq!(r["mode"], "lat");
    assert_eq!(num(&r, "count"), 300.0);
    assert!(num(&r, "rtt_p50_us") > 0.0, "{r}");
    let processes = r["processes"].as_array().expect("processes");
    let roles: Vec<&str> = processes
        .iter()
        .filter_map(|p| p["role"].as_str())
        .collect();
    assert_eq!(roles, ["ping", "pong"], "{r}");
    assert_eq!(
        num(&processes[1], "messages"),
        350.0,
        "pong echoed warm-up and measured"
    );
}
