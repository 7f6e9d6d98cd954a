//! The peer's notion of "now".
//!
//! The state machines take `now` as a `std::time::Instant`; the runtime reads it from
//! tokio's clock so that a simulation (turmoil) or a paused test clock drives timeouts
//! exactly as it drives timers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Wall-clock milliseconds since the Unix epoch (0 before it): publish times and the
/// outbox's message ages. Read once per publish and passed along, not re-read.
pub(crate) fn unix_ms() -> u64 {
    (unix_ns() / 1_000_000) as u64
}

fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The current instant of tokio's clock.
pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Wall-clock time derived from an [`Instant`] the caller read anyway: a publish needs
/// both its publish time and the dispatcher's `now`, and each clock reading cost ~43 ns
/// on the 2-core VM (`clock_gettime` in a loop), 4 % of a single-publish run's samples
/// for the second one. The offset between the two clocks is re-read by
/// [`resync`](Self::resync) (every dispatcher tick), so a step of the system clock shows
/// in publish times within one tick.
#[derive(Debug)]
pub(crate) struct WallClock {
    base: Instant,
    /// Unix nanoseconds at `base`, as of the last resync.
    unix_ns_at_base: AtomicU64,
}

impl WallClock {
    pub(crate) fn new(now: Instant) -> Self {
        let clock = WallClock {
            base: now,
            unix_ns_at_base: AtomicU64::new(0),
        };
        clock.resync(now);
        clock
    }

    /// Re-reads the system clock against `now`.
    pub(crate) fn resync(&self, now: Instant) {
        let at_base = unix_ns().saturating_sub(self.since_base(now));
        self.unix_ns_at_base.store(
            u64::try_from(at_base).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Unix milliseconds at `now`. In `u64` nanoseconds (good until 2554), as a `u128`
    /// division is a call of ~70 instructions on every publish.
    pub(crate) fn unix_ms(&self, now: Instant) -> u64 {
        let since = u64::try_from(self.since_base(now)).unwrap_or(u64::MAX);
        let ns = self
            .unix_ns_at_base
            .load(Ordering::Relaxed)
            .saturating_add(since);
        ns / 1_000_000
    }

    fn since_base(&self, now: Instant) -> u128 {
        now.saturating_duration_since(self.base).as_nanos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// How far [`WallClock::unix_ms`] may stray from the system clock without a resync
    /// (the two clocks' drift over a few milliseconds, and rounding).
    const WALL_CLOCK_TOLERANCE: Duration = Duration::from_millis(1);

    #[test]
    fn wall_clock_follows_the_system_clock() {
        let start = Instant::now();
        let clock = WallClock::new(start);
        for _ in 0..3 {
            let before = unix_ms();
            let derived = clock.unix_ms(Instant::now());
            let after = unix_ms();
            let tolerance = WALL_CLOCK_TOLERANCE.as_millis() as u64;
            assert!(
                before.saturating_sub(tolerance) <= derived && derived <= after + tolerance,
                "{before} <= {derived} <= {after}"
            );
            std::thread::sleep(Duration::from_millis(3));
        }
    }

    #[test]
    fn resync_moves_the_offset_and_an_earlier_instant_reads_as_the_base() {
        let start = Instant::now();
        let clock = WallClock::new(start + Duration::from_secs(10));
        // An instant before the base saturates to the base rather than underflowing.
        assert_eq!(
            clock.unix_ms(start),
            clock.unix_ms(start + Duration::from_secs(10))
        );
        // Pretend the base was read 10 s after the real time: resync pulls it back.
        clock.resync(start + Duration::from_secs(20));
        let later = clock.unix_ms(start + Duration::from_secs(20));
        assert!(later.abs_diff(unix_ms()) <= 1, "{later} vs {}", unix_ms());
    }
}
