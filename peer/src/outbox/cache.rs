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
        // Settled entries leave `order` stale; compact it now and then.
        if self.order.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.order.retain(|s| map.contains_key(s));
        }
    }

    /// The cached body of `seq`.
    pub fn get(&self, seq: u64) -> Option<Bytes> {
        self.map.get(&seq).cloned()
    }

    /// Drops `seq` from the cache.
    pub fn remove(&mut self, seq: u64) {
        if let Some(b) = self.map.remove(&seq) {
            self.bytes -= b.len();
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
}
