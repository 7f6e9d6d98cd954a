//! FIFO cache of message bodies, bounded in bytes.

use crate::seq_map::SeqMap;
use std::collections::VecDeque;

use bytes::Bytes;

/// Bodies of recently appended disk messages; the oldest are evicted first.
#[derive(Debug)]
pub struct BodyCache {
    cap: usize,
    bytes: usize,
    map: SeqMap<Bytes>,
    order: VecDeque<u64>,
}

impl BodyCache {
    /// A cache holding at most `cap` bytes of bodies.
    pub fn new(cap: usize) -> Self {
        BodyCache {
            cap,
            bytes: 0,
            map: SeqMap::default(),
            order: VecDeque::new(),
        }
    }

    /// Inserts a body (ignored if larger than the whole cache).
    pub fn insert(&mut self, seq: u64, body: Bytes) {
        if body.len() > self.cap {
            return;
        }
        self.bytes += body.len();
        if let Some(old) = self.map.insert(seq, body) {
            self.bytes -= old.len();
        }
        self.order.push_back(seq);
        while self.bytes > self.cap {
            let Some(s) = self.order.pop_front() else {
                break;
            };
            if let Some(b) = self.map.remove(&s) {
                self.bytes -= b.len();
            }
        }
        // Entries removed out of order leave `order` stale; compact it now and then.
        if self.order.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.order.retain(|s| map.contains_key(s));
        }
    }

    /// The cached body of `seq`.
    pub fn get(&self, seq: u64) -> Option<Bytes> {
        self.get_ref(seq).cloned()
    }

    /// The cached body of `seq`, borrowed (no reference count taken).
    pub fn get_ref(&self, seq: u64) -> Option<&Bytes> {
        self.map.get(&seq)
    }

    /// Drops `seq` from the cache.
    pub fn remove(&mut self, seq: u64) {
        if let Some(b) = self.map.remove(&seq) {
            self.bytes -= b.len();
            // Settled: its buffer may serve the next record encoded on this thread.
            crate::record_buffers::give(b);
        }
        // Messages mostly settle in the order they were cached: then `order` is kept
        // exact from its front, without the compaction's scan (which was an eighth
        // of the writer thread's time in `weft bench --durability disk`).
        if self.order.front() == Some(&seq) {
            self.order.pop_front();
        }
    }

    /// Bytes currently cached.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_oldest_first() {
        let mut c = BodyCache::new(10);
        c.insert(1, Bytes::from_static(b"aaaa"));
        c.insert(2, Bytes::from_static(b"bbbb"));
        c.insert(3, Bytes::from_static(b"cccc"));
        assert!(c.get(1).is_none());
        assert!(c.get(2).is_some() && c.get(3).is_some());
        assert_eq!(c.bytes(), 8);
        c.remove(2);
        assert_eq!(c.bytes(), 4);
        c.insert(4, Bytes::from(vec![0u8; 11]));
        assert!(c.get(4).is_none());
    }

    #[test]
    fn settling_in_order_keeps_the_order_exact_and_out_of_order_is_compacted() {
        let mut c = BodyCache::new(1 << 20);
        for seq in 0..10_000 {
            c.insert(seq, Bytes::from_static(b"body"));
            if seq >= 10 {
                c.remove(seq - 10);
            }
            assert!(c.order.len() <= 11, "in-order settles leave nothing stale");
        }
        // Settled from the newest end: stale entries until the compaction.
        for seq in (0..10_000).rev() {
            c.remove(seq);
        }
        for seq in 10_000..12_000 {
            c.insert(seq, Bytes::from_static(b"body"));
            assert!(c.order.len() <= 2 * c.map.len() + 1024 + 1);
        }
        assert_eq!(c.bytes(), 2_000 * 4);
        assert!(c.get(11_999).is_some());
    }
}
