//! Hash maps keyed by sequence numbers, laid out in sequence order.
//!
//! The outbox and the dispatcher look messages up by sequence number, and the live
//! ones form a sliding window of mostly consecutive numbers. A general-purpose hash
//! scatters consecutive keys over the whole table, so with hundreds of thousands of
//! messages in flight nearly every lookup is a cache miss (the outbox's settle was 15 %
//! of a throughput profile, almost all of it waiting on memory). [`SeqHasher`] keeps
//! the number itself as the bucket index, so consecutive numbers share cache lines, and
//! copies its low bits into the top bits that hashbrown compares first, so that
//! neighbours are still told apart without touching the keys.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A map from sequence number to `V` with sequence-ordered buckets.
pub(crate) type SeqMap<V> = HashMap<u64, V, BuildHasherDefault<SeqHasher>>;

/// Hashes one `u64` to itself with its low 7 bits copied into the top 7.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SeqHasher(u64);

impl Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 << 57)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are expected; anything else still hashes (FNV-style), slower.
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn consecutive_keys_get_consecutive_buckets_and_distinct_tags() {
        let build = BuildHasherDefault::<SeqHasher>::default();
        let a = build.hash_one(1000u64);
        let b = build.hash_one(1001u64);
        assert_eq!(b & 0xffff, (a & 0xffff) + 1, "bucket index follows the key");
        assert_ne!(a >> 57, b >> 57, "top bits differ between neighbours");
    }

    #[test]
    fn behaves_as_a_map() {
        let mut m: SeqMap<u64> = SeqMap::default();
        for k in (0..10_000u64).chain([u64::MAX, 1 << 40]) {
            m.insert(k, k.wrapping_mul(2));
        }
        for k in (0..10_000u64).step_by(2) {
            assert_eq!(m.remove(&k), Some(k * 2));
        }
        assert_eq!(m.len(), 5_002);
        assert_eq!(m.get(&9_999), Some(&19_998));
        assert_eq!(m.get(&u64::MAX), Some(&u64::MAX.wrapping_mul(2)));
        assert!(!m.contains_key(&10_000));
    }
}
