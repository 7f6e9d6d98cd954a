//! What `weft bench` prints: a table, or one JSON line in the fields of
//! `../shared/bench-peers`.

use super::host::HostShare;

/// One run's figures.
pub(super) struct Report {
    pub(super) system: &'static str,
    pub(super) mode: &'static str,
    pub(super) size: usize,
    pub(super) count: u64,
    pub(super) elapsed_s: f64,
    pub(super) msgs_per_s: f64,
    pub(super) mb_per_s: f64,
    pub(super) p50_us: f64,
    pub(super) p90_us: f64,
    pub(super) p99_us: f64,
    pub(super) p999_us: f64,
    pub(super) max_us: f64,
    pub(super) latency_kind: &'static str,
    pub(super) extra: String,
    /// The peers' processes (`--processes`); empty when every peer runs in this one.
    pub(super) processes: Vec<ProcessRow>,
    /// How the machine's CPU time went during the run (steal, idle), where known.
    pub(super) host: Option<HostShare>,
    /// The thread layout of the peers (`--threads`) when they share this process.
    pub(super) threads: Option<String>,
}

/// What one process of a `--processes` run used.
#[derive(Debug, serde::Serialize)]
pub(super) struct ProcessRow {
    pub(super) role: &'static str,
    pub(super) name: String,
    pub(super) pid: u32,
    /// Published or delivered.
    pub(super) messages: u64,
    pub(super) cpu_s: f64,
    pub(super) peak_rss_mib: f64,
}

impl Report {
    /// The figures of `count` messages of `size` bytes in `elapsed_s`, with latencies
    /// `h` (ns) of `latency_kind`; no extras, no processes.
    pub(super) fn new(
        system: &'static str,
        mode: &'static str,
        (size, count, elapsed_s): (usize, u64, f64),
        h: &hdrhistogram::Histogram<u64>,
        latency_kind: &'static str,
    ) -> Self {
        let msgs_per_s = count as f64 / elapsed_s;
        let us = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
        Report {
            system,
            mode,
            size,
            count,
            elapsed_s,
            msgs_per_s,
            mb_per_s: msgs_per_s * size as f64 / 1e6,
            p50_us: us(0.50),
            p90_us: us(0.90),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: h.max() as f64 / 1e3,
            latency_kind,
            extra: String::new(),
            processes: Vec::new(),
            host: None,
            threads: None,
        }
    }

    pub(super) fn print(&self, json: bool) {
        let (mut cpu, mut rss) = process_usage();
        if !self.processes.is_empty() {
            // Every process's CPU (this one's included), the largest peak RSS.
            cpu += self.processes.iter().map(|p| p.cpu_s).sum::<f64>();
            rss = self
                .processes
                .iter()
                .map(|p| p.peak_rss_mib)
                .fold(0.0, f64::max);
        }
        if json {
            let mut extra = if self.extra.is_empty() {
                String::new()
            } else {
                format!(",{}", self.extra)
            };
            if let Some(host) = self.host {
                extra.push_str(&format!(
                    ",\"host_steal_pct\":{:.1},\"host_idle_pct\":{:.1}",
                    host.steal_pct, host.idle_pct
                ));
            }
            if let Some(threads) = &self.threads {
                extra.push_str(&format!(",\"threads\":\"{threads}\""));
            }
            if !self.processes.is_empty() {
                let rows = serde_json::to_string(&self.processes).unwrap_or_default();
                extra.push_str(&format!(",\"processes\":{rows}"));
            }
            println!(
                "{{\"system\":\"{}\",\"mode\":\"{}\",\"size\":{},\"count\":{},\"elapsed_s\":{:.4},\"msgs_per_s\":{:.1},\"mb_per_s\":{:.2},\"rtt_p50_us\":{:.1},\"rtt_p99_us\":{:.1},\"rtt_p999_us\":{:.1},\"lat_p90_us\":{:.1},\"lat_max_us\":{:.1},\"latency_kind\":\"{}\",\"cpu_s\":{:.2},\"peak_rss_mib\":{:.1}{}}}",
                self.system, self.mode, self.size, self.count, self.elapsed_s, self.msgs_per_s, self.mb_per_s,
                self.p50_us, self.p99_us, self.p999_us, self.p90_us, self.max_us, self.latency_kind, cpu, rss, extra
            );
        } else {
            println!(
                "{} {} size={} count={}",
                self.system, self.mode, self.size, self.count
            );
            println!(
                "  {:>14} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                "msgs/s", "MB/s", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs"
            );
            println!(
                "  {:>14.0} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                self.msgs_per_s,
                self.mb_per_s,
                self.p50_us,
                self.p90_us,
                self.p99_us,
                self.p999_us,
                self.max_us
            );
            if self.processes.is_empty() {
                println!("  latency: {}; elapsed {:.3} s; process CPU {:.2} s, peak RSS {:.1} MiB (all peers share this process, threads: {})", self.latency_kind, self.elapsed_s, cpu, rss, self.threads.as_deref().unwrap_or("?"));
            } else {
                println!(
                    "  latency: {}; elapsed {:.3} s; CPU {:.2} s in all",
                    self.latency_kind, self.elapsed_s, cpu
                );
                println!(
                    "  {:<11} {:<10} {:>8} {:>12} {:>8} {:>10}",
                    "process", "name", "pid", "messages", "CPU s", "RSS MiB"
                );
                for p in &self.processes {
                    println!(
                        "  {:<11} {:<10} {:>8} {:>12} {:>8.2} {:>10.1}",
                        p.role, p.name, p.pid, p.messages, p.cpu_s, p.peak_rss_mib
                    );
                }
            }
            if let Some(host) = self.host {
                println!(
                    "  machine during the run: {:.1} % idle, {:.1} % stolen by the hypervisor{}",
                    host.idle_pct,
                    host.steal_pct,
                    if host.steal_pct >= 5.0 {
                        " (other guests took CPU time: compare with care)"
                    } else {
                        ""
                    }
                );
            }
            if !self.extra.is_empty() {
                println!("  {}", self.extra.replace('"', ""));
            }
        }
    }
}

/// (CPU seconds this process used, its peak RSS in MiB), from `getrusage` (CPU to the
/// microsecond: /proc counts 10 ms ticks, which rounds a short-lived child to 0).
pub(super) fn process_usage() -> (f64, f64) {
    // SAFETY: an all-zero `rusage` is a valid value, and `getrusage` only writes it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer; on failure `usage` stays zero.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let cpu = seconds(usage.ru_utime) + seconds(usage.ru_stime);
    // Linux reports the peak resident set in KiB.
    (cpu, usage.ru_maxrss as f64 / 1024.0)
}
