//! The pacing of `--rate` runs.

use super::payload::now_ns;
use anyhow::{Context, Result};
use std::time::Duration;

/// Paces the publishes of `--rate`: message `i` is due `i / rate` seconds after the
/// start. A thread sleeps with the operating system's fine-grained timer (tokio's
/// wakes at most once per millisecond) and releases the messages due since its last
/// wake, at most every [`PACER_TICK`]. While the publisher is held back (its window
/// full) the thread waits too, and then releases all that fell due meanwhile: late,
/// which their latencies and the send lag show.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pacer {
    start_ns: u64,
    interval_ns: f64,
}

/// Shortest sleep of the pacing thread: a paced message starts at most about this
/// late when the fabric keeps up.
const PACER_TICK: Duration = Duration::from_micros(100);

impl Pacer {
    /// Starts releasing messages `0..limit` at `rate` per second.
    pub(super) fn start(
        rate: f64,
        limit: u64,
    ) -> Result<(Pacer, tokio::sync::mpsc::Receiver<std::ops::Range<u64>>)> {
        let pacer = Pacer {
            start_ns: now_ns(),
            interval_ns: 1e9 / rate,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        std::thread::Builder::new()
            .name("bench-pacer".into())
            .spawn(move || pacer.release(limit, tx))
            .context("starting the pacing thread")?;
        Ok((pacer, rx))
    }

    /// When message `i` is due (ns of [`now_ns`]).
    pub(super) fn due(&self, i: u64) -> u64 {
        self.start_ns + (i as f64 * self.interval_ns) as u64
    }

    fn release(self, limit: u64, tx: tokio::sync::mpsc::Sender<std::ops::Range<u64>>) {
        let mut next = 0;
        while next < limit {
            let now = now_ns();
            let due_upto = ((now.saturating_sub(self.start_ns) as f64 / self.interval_ns) as u64)
                .saturating_add(1)
                .min(limit);
            if due_upto > next {
                if tx.blocking_send(next..due_upto).is_err() {
                    return;
                }
                next = due_upto;
            }
            if next == limit {
                // All released: the channel closes now, not an interval later.
                return;
            }
            let now = now_ns();
            let wake = self.due(next).max(now + PACER_TICK.as_nanos() as u64);
            std::thread::sleep(Duration::from_nanos(wake - now));
        }
    }
}

/// A pacer and the message ranges it releases.
pub(super) type PacerHandle = (Pacer, tokio::sync::mpsc::Receiver<std::ops::Range<u64>>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_releases_every_message_once_in_order_and_none_before_it_is_due() {
        // 20,000 a second: message i is due at i × 50 µs; 400 take ~20 ms.
        let (pacer, mut released) = Pacer::start(20_000.0, 400).expect("pacing thread");
        let mut next = 0;
        while let Some(range) = released.blocking_recv() {
            assert_eq!(range.start, next, "contiguous, no message twice");
            assert!(range.end > range.start);
            let now = now_ns();
            assert!(
                pacer.due(range.end - 1) <= now,
                "released before it was due"
            );
            next = range.end;
        }
        assert_eq!(next, 400, "every message, then the channel closes");
        assert!(now_ns() >= pacer.due(399));
    }
}
