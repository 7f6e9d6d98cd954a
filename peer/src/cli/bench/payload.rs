//! Benchmark payloads. Each carries its send time in its first 8 bytes: nanoseconds of
//! the system's monotonic clock, which every process on the machine reads alike, so a
//! subscriber in another process measures publish-to-delivery latency as well as one
//! in the publisher's. With `--rate` the time is when the message was *due*, not when
//! it went out, so that a stalled fabric shows in the latencies instead of slowing the
//! sender down unseen (coordinated omission).

use bytes::{Bytes, BytesMut};
use std::time::Duration;

/// How long single publishes share one payload buffer (and so one send time).
pub(super) const PAYLOAD_REUSE: Duration = Duration::from_micros(100);

/// Now, in nanoseconds of `CLOCK_MONOTONIC` (the clock of [`std::time::Instant`] on
/// Linux, shared by every process of the machine).
pub(super) fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always available
    // on Linux, and on failure `ts` stays zero.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The bytes of every payload of a run: `size` bytes (at least 8), of which the
/// first `compressible` percent after the 8-byte send time repeat one byte and the
/// rest are pseudo-random (a fixed seed, so runs are alike).
#[derive(Debug, Clone)]
pub(super) struct PayloadShape {
    template: Bytes,
}

impl PayloadShape {
    pub(super) fn new(size: usize, compressible: u8) -> Self {
        let size = size.max(8);
        let body = size - 8;
        let repeated = body * usize::from(compressible.min(100)) / 100;
        let mut template = vec![0u8; size];
        template[8..8 + repeated].fill(0x5a);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for b in &mut template[8 + repeated..] {
            // xorshift64: cheap bytes that no compressor shrinks.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
        PayloadShape {
            template: Bytes::from(template),
        }
    }

    /// A payload sent (or due) at `sent`.
    pub(super) fn stamped(&self, sent: u64) -> Bytes {
        let mut one = BytesMut::from(&self.template[..]);
        one[..8].copy_from_slice(&sent.to_be_bytes());
        one.freeze()
    }

    /// `count` payloads sent at `sent`, sharing one buffer (a batch), as the
    /// bench-peers programs send one buffer over and over. (Weft still copies each
    /// message into its outbox record; what this leaves out is the benchmark writing
    /// `count` fresh payloads, which at 16 KiB was 14 % of the run's CPU.)
    pub(super) fn batch(&self, count: usize, sent: u64) -> Vec<Bytes> {
        vec![self.stamped(sent); count]
    }
}

/// The payloads of one-message-at-a-time throughput publishes: a buffer is shared by
/// the messages sent within [`PAYLOAD_REUSE`] of its send time, as the batches of
/// `--batch` share one, so that the benchmark does not write a fresh payload per
/// message. A message's recorded latency is at most `PAYLOAD_REUSE` too long, never
/// too short.
pub(super) struct ReusedPayload {
    shape: PayloadShape,
    last: Option<(u64, Bytes)>,
}

impl ReusedPayload {
    pub(super) fn new(shape: PayloadShape) -> Self {
        ReusedPayload { shape, last: None }
    }

    /// The payload for a message sent (or due) at `sent`.
    pub(super) fn at(&mut self, sent: u64) -> Bytes {
        match &self.last {
            Some((at, body)) if sent.saturating_sub(*at) < PAYLOAD_REUSE.as_nanos() as u64 => {
                body.clone()
            }
            _ => {
                let body = self.shape.stamped(sent);
                self.last = Some((sent, body.clone()));
                body
            }
        }
    }
}

/// The send time a payload carries (0 if it is too short to carry one).
pub(super) fn sent_ns(payload: &[u8]) -> u64 {
    payload
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_publishes_share_a_payload_only_within_the_reuse_window() {
        let window = PAYLOAD_REUSE.as_nanos() as u64;
        let mut payloads = ReusedPayload::new(PayloadShape::new(128, 100));
        let a = payloads.at(1_000);
        let b = payloads.at(1_000 + window - 1);
        assert_eq!(a.as_ptr(), b.as_ptr(), "within the window: one buffer");
        assert_eq!((a.len(), sent_ns(&a)), (128, 1_000));
        let c = payloads.at(1_000 + window);
        assert_ne!(a.as_ptr(), c.as_ptr(), "past the window: a fresh buffer");
        assert_eq!(sent_ns(&c), 1_000 + window);
    }

    #[test]
    fn compressibility_sets_the_share_of_repeated_bytes() {
        let repeated = |p: &Bytes| p[8..].iter().filter(|b| **b == 0x5a).count();
        let all = PayloadShape::new(108, 100).stamped(7);
        assert_eq!((all.len(), sent_ns(&all), repeated(&all)), (108, 7, 100));
        let quarter = PayloadShape::new(108, 25).stamped(7);
        // 25 repeated, and about 1 in 256 of the 75 random ones happens to match.
        assert!(
            (25..=28).contains(&repeated(&quarter)),
            "{}",
            repeated(&quarter)
        );
        assert_eq!(&quarter[8..33], &[0x5a; 25][..]);
        let random = PayloadShape::new(4096, 0).stamped(7);
        let distinct: std::collections::BTreeSet<u8> = random[8..].iter().copied().collect();
        assert!(
            distinct.len() > 200,
            "random bytes: {} distinct",
            distinct.len()
        );
        assert_eq!(
            PayloadShape::new(3, 0).stamped(9).len(),
            8,
            "room for the time"
        );
    }

    #[test]
    fn send_stamps_follow_real_time() {
        let before = now_ns();
        std::thread::sleep(Duration::from_millis(2));
        let after = now_ns();
        assert!(after - before >= 2_000_000, "{before} → {after}");
    }
}
