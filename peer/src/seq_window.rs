//! A map from sequence number to value for keys that arrive in increasing order and
//! mostly leave from the oldest end: the outbox's pending messages.
//!
//! A hash map paid, per message, a hashed insert into a table that grew (rehashing
//! everything and faulting in fresh pages) while a fast publisher ran hundreds of
//! thousands of messages ahead of its receivers: 12 % of a 128-byte throughput profile.
//! [`SeqWindow`] keeps the live range as a ring of slots indexed by `seq - base`, so an
//! insert is a push at the back, a lookup an index, and a removal clears a slot and pops
//! the empty ones at the front.
//!
//! A message that stays pending while later ones settle (a slow group, a poison
//! message) would pin the front and let the ring grow with empty slots. To keep memory
//! proportional to the live entries, slots at the front move to a side hash map
//! (the *spill*) whenever more than half of the ring is empty. Each entry moves at most
//! once, so this costs O(1) per entry over time. Keys far ahead of the ring (a new
//! sequence lease after a restart) restart the ring after spilling the old one.

use crate::seq_map::SeqMap;
use std::collections::VecDeque;

/// Empty slots tolerated in the ring whatever the number of live entries (so that a
/// small window does not spill on every out-of-order removal).
const SLACK: usize = 1024;

/// Sequence number → `V`, dense for the recent range, hashed for stragglers.
#[derive(Debug)]
pub(crate) struct SeqWindow<V> {
    /// Sequence number of `slots[0]`.
    base: u64,
    slots: VecDeque<Option<V>>,
    /// Occupied slots.
    in_ring: usize,
    /// Entries outside the ring: older than `base`, or spilled from its front.
    spill: SeqMap<V>,
}

impl<V> Default for SeqWindow<V> {
    fn default() -> Self {
        Self {
            base: 0,
            slots: VecDeque::new(),
            in_ring: 0,
            spill: SeqMap::default(),
        }
    }
}

impl<V> SeqWindow<V> {
    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.in_ring + self.spill.len()
    }

    /// Makes room for `additional` entries at the back.
    pub(crate) fn reserve(&mut self, additional: usize) {
        self.slots.reserve(additional);
    }

    fn slot(&self, seq: u64) -> Option<usize> {
        let i = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        (i < self.slots.len()).then_some(i)
    }

    /// Inserts `value` under `seq`, returning the value it replaces.
    pub(crate) fn insert(&mut self, seq: u64, value: V) -> Option<V> {
        if self.in_ring > 0 && seq.checked_sub(self.base) == Some(self.slots.len() as u64) {
            // The usual case: the next key after the last. No slot empties, so the ring
            // needs no compaction.
            self.slots.push_back(Some(value));
            self.in_ring += 1;
            return None;
        }
        if seq < self.base {
            return self.spill.insert(seq, value);
        }
        if let Some(i) = self.slot(seq) {
            let old = self.slots[i].replace(value);
            if old.is_none() {
                self.in_ring += 1;
            }
            return old;
        }
        let gap = seq - (self.base + self.slots.len() as u64);
        if self.in_ring == 0 || gap > SLACK as u64 {
            // Empty, or far ahead: the ring (if any) goes to the spill and a new one
            // starts here. Every spilled key stays below `base`.
            self.spill_front(self.slots.len());
            self.base = seq;
        } else {
            self.slots.extend((0..gap).map(|_| None));
        }
        self.slots.push_back(Some(value));
        self.in_ring += 1;
        self.compact();
        None
    }

    /// The value under `seq`.
    pub(crate) fn get(&self, seq: u64) -> Option<&V> {
        match self.slot(seq) {
            Some(i) => self.slots[i].as_ref(),
            None => self.spill.get(&seq),
        }
    }

    /// The value under `seq`, mutably.
    pub(crate) fn get_mut(&mut self, seq: u64) -> Option<&mut V> {
        match self.slot(seq) {
            Some(i) => self.slots[i].as_mut(),
            None => self.spill.get_mut(&seq),
        }
    }

    /// Whether `seq` has a value.
    pub(crate) fn contains(&self, seq: u64) -> bool {
        self.get(seq).is_some()
    }

    /// Removes and returns the value under `seq`.
    pub(crate) fn remove(&mut self, seq: u64) -> Option<V> {
        let Some(i) = self.slot(seq) else {
            return self.spill.remove(&seq);
        };
        if i == 0 {
            // The usual case: the oldest leaves first. Popped at once, the value moves
            // out of the ring once (taking it and then popping its empty slot moved
            // the whole slot twice: 5 % of a batched run's samples).
            let old = self.slots.pop_front().flatten();
            self.base += 1;
            self.in_ring -= usize::from(old.is_some());
            self.pop_empty_front();
            self.compact();
            return old;
        }
        let old = self.slots[i].take()?;
        self.in_ring -= 1;
        self.pop_empty_front();
        self.compact();
        Some(old)
    }

    /// While more than half of the ring (beyond [`SLACK`]) is empty, moves its front
    /// slot to the spill. Each slot leaves the ring once, so this is O(1) per entry
    /// over time.
    fn compact(&mut self) {
        while self.slots.len() - self.in_ring > self.in_ring + SLACK {
            self.spill_front(1);
        }
    }

    /// Moves the first `slots` slots of the ring to the spill.
    fn spill_front(&mut self, slots: usize) {
        for _ in 0..slots.min(self.slots.len()) {
            if let Some(Some(v)) = self.slots.pop_front() {
                self.spill.insert(self.base, v);
                self.in_ring -= 1;
            }
            self.base += 1;
        }
        self.pop_empty_front();
    }

    fn pop_empty_front(&mut self) {
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base += 1;
        }
    }

    /// Every key, in no particular order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        let base = self.base;
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_some())
            .map(move |(i, _)| base + i as u64)
            .chain(self.spill.keys().copied())
    }

    /// Slots the ring holds, empty ones included (tests check the memory bound).
    #[cfg(test)]
    fn ring_slots(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_pinned_front_spills_instead_of_growing_the_ring() {
        let mut w = SeqWindow::default();
        w.insert(0, 0u64);
        for seq in 1..100_000u64 {
            w.insert(seq, seq);
            w.remove(seq);
        }
        assert_eq!(w.len(), 1);
        assert_eq!(w.get(0), Some(&0));
        assert!(
            w.ring_slots() <= SLACK + 2,
            "ring kept {} slots",
            w.ring_slots()
        );
    }

    #[test]
    fn a_jump_far_ahead_restarts_the_ring() {
        let mut w = SeqWindow::default();
        w.insert(5, 'a');
        w.insert(1 << 40, 'b');
        w.insert((1 << 40) + 1, 'c');
        assert_eq!(w.get(5), Some(&'a'));
        assert_eq!(w.get(1 << 40), Some(&'b'));
        assert!(w.ring_slots() <= 2);
        assert_eq!(w.remove(5), Some('a'));
        let mut keys: Vec<u64> = w.keys().collect();
        keys.sort_unstable();
        assert_eq!(keys, vec![1 << 40, (1 << 40) + 1]);
    }

    proptest! {
        /// Any mix of inserts (mostly increasing, some behind, some far ahead), removals
        /// and lookups behaves as an ordered map, and the ring stays within its bound.
        #[test]
        fn behaves_as_a_map_within_its_memory_bound(
            ops in proptest::collection::vec((0u8..6, 0u64..3000), 1..600)
        ) {
            let mut w = SeqWindow::default();
            let mut model = BTreeMap::new();
            let mut next = 0u64;
            for (op, arg) in ops {
                match op {
                    0 | 1 => {
                        prop_assert_eq!(w.insert(next, next), model.insert(next, next));
                        next += 1 + arg % 3;
                    }
                    2 => {
                        let seq = next.saturating_sub(arg);
                        prop_assert_eq!(w.insert(seq, arg), model.insert(seq, arg));
                    }
                    3 => {
                        next += arg * 10;
                        prop_assert_eq!(w.insert(next, 7), model.insert(next, 7));
                    }
                    4 => {
                        let seq = next.saturating_sub(arg);
                        prop_assert_eq!(w.remove(seq), model.remove(&seq));
                    }
                    _ => {
                        if let Some((&first, _)) = model.iter().next() {
                            prop_assert_eq!(w.remove(first), model.remove(&first));
                        }
                    }
                }
                prop_assert_eq!(w.len(), model.len());
                prop_assert!(w.ring_slots() <= 2 * w.len() + SLACK);
            }
            let mut keys: Vec<u64> = w.keys().collect();
            keys.sort_unstable();
            prop_assert_eq!(keys, model.keys().copied().collect::<Vec<_>>());
            for (k, v) in &model {
                prop_assert_eq!(w.get(*k), Some(v));
                prop_assert!(w.contains(*k));
            }
        }
    }
}
