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

/// A map keyed by something whose hash ends with a sequence number (a message id:
/// producer, then sequence), with the buckets of one producer in sequence order.
pub(crate) type SeqKeyedMap<K, V> = HashMap<K, V, BuildHasherDefault<SeqHasher>>;

/// Hashes one `u64` to itself with its low 7 bits copied into the top 7. Earlier words
/// (a producer id before a sequence number) are spread by a multiply and XORed in: an
/// XOR with a constant moves a run of consecutive numbers as a block, so locality
/// survives.
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
        self.0 = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ n;
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
    fn a_sequence_after_a_producer_keeps_its_locality() {
        #[derive(Hash)]
        struct Id(u64, u64);
        let build = BuildHasherDefault::<SeqHasher>::default();
        let base = build.hash_one(Id(0xdead_beef, 1024));
        let mut tags = std::collections::BTreeSet::new();
        for i in 0..16u64 {
            let h = build.hash_one(Id(0xdead_beef, 1024 + i));
            assert!(((h ^ base) & 0xffff) < 16, "neighbouring buckets");
            tags.insert(h >> 57);
        }
        assert_eq!(tags.len(), 16, "distinct tags among neighbours");
        assert_ne!(build.hash_one(Id(1, 5)), build.hash_one(Id(2, 5)));
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
