//! The machine's CPU time over a run, from `/proc/stat`: the share the hypervisor gave
//! to other guests (steal) and the share left idle. A virtual machine with a noisy
//! neighbour can lose a quarter of its CPU to steal in the middle of a run, which moves
//! a figure by more than most changes do; the report says so instead of hiding it.

/// Cumulative CPU time of all cores, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CpuTimes {
    busy: u64,
    idle: u64,
    steal: u64,
}

/// How the machine's CPU time was spent between two [`CpuTimes`], in percent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct HostShare {
    pub(super) steal_pct: f64,
    pub(super) idle_pct: f64,
}

impl CpuTimes {
    /// Now (`None` where `/proc/stat` cannot be read or parsed: not Linux).
    pub(super) fn now() -> Option<CpuTimes> {
        parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// The shares from `self` to now (`None` if unreadable or no tick passed).
    pub(super) fn share_until_now(&self) -> Option<HostShare> {
        CpuTimes::now()?.share_since(self)
    }

    fn share_since(&self, earlier: &CpuTimes) -> Option<HostShare> {
        let busy = self.busy.checked_sub(earlier.busy)?;
        let idle = self.idle.checked_sub(earlier.idle)?;
        let steal = self.steal.checked_sub(earlier.steal)?;
        let total = (busy + idle + steal) as f64;
        (total > 0.0).then(|| HostShare {
            steal_pct: 100.0 * steal as f64 / total,
            idle_pct: 100.0 * idle as f64 / total,
        })
    }
}

/// The aggregate `cpu` line of `/proc/stat`: user nice system idle iowait irq softirq
/// steal (guest time is already inside user and nice).
fn parse(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    if fields.len() < 4 {
        return None;
    }
    Some(CpuTimes {
        busy: field(0) + field(1) + field(2) + field(5) + field(6),
        idle: field(3) + field(4),
        steal: field(7),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_come_from_the_aggregate_line_and_garbage_gives_none() {
        let before = parse("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n").expect("valid");
        let after = parse("cpu  160 0 70 850 50 0 0 20 0 0\nintr 5\n").expect("valid");
        // 80 busy, 50 idle, 20 stolen ticks of 150.
        let share = after.share_since(&before).expect("ticks passed");
        assert!((share.steal_pct - 100.0 * 20.0 / 150.0).abs() < 1e-9);
        assert!((share.idle_pct - 100.0 * 50.0 / 150.0).abs() < 1e-9);
        assert_eq!(before.share_since(&before), None, "no tick passed");
        assert_eq!(before.share_since(&after), None, "counters went backwards");
        assert_eq!(parse("cpu0 1 2 3 4\n"), None, "no aggregate line");
        assert_eq!(parse("cpu  1 x 3 4\n"), None, "not a number");
        assert_eq!(parse("cpu  1 2\n"), None, "too short");
    }
}
