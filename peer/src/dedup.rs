//! Receiver-side duplicate suppression (sans-IO).
//!
//! For each producer, the sequence numbers this subscription has acknowledged are kept
//! as a set of ranges. A producer publishing to one topic yields one growing range;
//! interleaved topics fragment it. The number of ranges per producer is bounded: when
//! exceeded, the oldest ranges are forgotten, so a very late retransmission of an old
//! message is delivered again (a duplicate) — never dropped unacked (a loss).

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use weft_proto::wire::MessageId;

/// Default bound of remembered ranges per producer.
pub const DEFAULT_MAX_RANGES: usize = 4096;

/// Acknowledged message ids of one subscription.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Dedup {
    max_ranges: usize,
    /// producer → (range start → range end, inclusive).
    producers: FxHashMap<u64, BTreeMap<u64, u64>>,
}

impl Dedup {
    pub(crate) fn new(max_ranges: usize) -> Self {
        Self {
            max_ranges: max_ranges.max(1),
            producers: FxHashMap::default(),
        }
    }

    /// Whether `id` was acknowledged before.
    pub(crate) fn is_acked(&self, id: MessageId) -> bool {
        let Some(ranges) = self.producers.get(&id.producer) else {
            return false;
        };
        match ranges.last_key_value() {
            // Above every acknowledged number: a first delivery, the usual case.
            Some((_, end)) if *end < id.seq => false,
            None => false,
            Some(_) => ranges
                .range(..=id.seq)
                .next_back()
                .is_some_and(|(_, end)| *end >= id.seq),
        }
    }

    /// Records `id` as acknowledged.
    pub(crate) fn record(&mut self, id: MessageId) {
        let ranges = self.producers.entry(id.producer).or_default();
        let seq = id.seq;
        if let Some(mut last) = ranges.last_entry() {
            if last.get().checked_add(1) == Some(seq) {
                // In-order acks (the common case) extend the newest range: no search,
                // and no range above can join it.
                *last.get_mut() = seq;
                return;
            }
        }
        let below = ranges.range(..=seq).next_back().map(|(s, e)| (*s, *e));
        if below.is_some_and(|(_, e)| e >= seq) {
            return;
        }
        let joins_below = below.filter(|(_, e)| e.checked_add(1) == Some(seq));
        let above = seq
            .checked_add(1)
            .and_then(|next| ranges.get(&next).copied().map(|e| (next, e)));
        match (joins_below, above) {
            (Some((s, _)), Some((a, e))) => {
                ranges.remove(&a);
                ranges.insert(s, e);
            }
            (Some((s, _)), None) => {
                ranges.insert(s, seq);
            }
            (None, Some((a, e))) => {
                ranges.remove(&a);
                ranges.insert(seq, e);
            }
            (None, None) => {
                ranges.insert(seq, seq);
            }
        }
        while ranges.len() > self.max_ranges {
            ranges.pop_first();
        }
    }

    /// Number of ranges held (for tests and metrics).
    #[cfg(test)]
    pub(crate) fn ranges(&self) -> usize {
        self.producers.values().map(BTreeMap::len).sum()
    }
}

/// Largest jump in link sequence numbers a sender may make (skipped numbers are
/// requeued messages; their count is bounded by the credit window).
const MAX_LINK_GAP: u64 = 1 << 20;

/// Acknowledgement state of one link (data stream) on the receiving side: which link
/// sequence numbers are done, summarised as a cumulative watermark plus the done ones
/// above it.
#[derive(Debug, Default)]
pub(crate) struct LinkAcks {
    upto: u64,
    highest_received: u64,
    done_above: std::collections::BTreeSet<u64>,
    dirty: bool,
}

impl LinkAcks {
    /// Marks `link_seq` done (acknowledged by the application, or a duplicate).
    /// True if this made an ack due where none was (the stream needs a wake-up); false
    /// if nothing changed or an ack was already due (its wake-up is still pending).
    pub(crate) fn done(&mut self, link_seq: u64) -> bool {
        if link_seq <= self.upto {
            return false;
        }
        if link_seq == self.upto + 1 {
            // In-order completion (the common case): no set insertion.
            self.upto = link_seq;
            while self.done_above.first() == Some(&(self.upto + 1)) {
                self.done_above.pop_first();
                self.upto += 1;
            }
        } else {
            self.done_above.insert(link_seq);
        }
        !std::mem::replace(&mut self.dirty, true)
    }

    /// A batch with link sequences `first..first + count` arrived. Sequences skipped
    /// before it will never arrive on this ordered stream (the sender requeued them
    /// before sending), so they count as done.
    /// `None` (and nothing changed) if the gap is implausibly large: a broken sender.
    /// Otherwise whether the stream needs a wake-up, as for [`LinkAcks::done`].
    pub(crate) fn received(&mut self, first: u64, count: u64) -> Option<bool> {
        if first.saturating_sub(self.highest_received) > MAX_LINK_GAP || first == 0 {
            return None;
        }
        let mut wake = false;
        for skipped in self.highest_received.saturating_add(1)..first {
            wake |= self.done(skipped);
        }
        self.highest_received = self
            .highest_received
            .max(first.saturating_add(count).saturating_sub(1));
        Some(wake)
    }

    /// The ack to send, if anything changed since the last one.
    pub(crate) fn take_ack(&mut self) -> Option<weft_proto::wire::Ack> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        Some(weft_proto::wire::Ack {
            upto: self.upto,
            extra: self.done_above.iter().copied().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn id(p: u64, s: u64) -> MessageId {
        MessageId {
            producer: p,
            seq: s,
        }
    }

    proptest! {
        #[test]
        fn matches_a_set_model(seqs in proptest::collection::vec(0u64..200, 0..300)) {
            let mut d = Dedup::new(10_000);
            let mut model = BTreeSet::new();
            for s in &seqs {
                d.record(id(1, *s));
                model.insert(*s);
            }
            for s in 0..210 {
                prop_assert_eq!(d.is_acked(id(1, s)), model.contains(&s), "seq {}", s);
                prop_assert!(!d.is_acked(id(2, s)));
            }
        }

        #[test]
        fn bounded_forgetting_never_claims_unacked(seqs in proptest::collection::vec(0u64..500, 0..300)) {
            let mut d = Dedup::new(4);
            let mut model = BTreeSet::new();
            for s in &seqs {
                d.record(id(1, *s));
                model.insert(*s);
                prop_assert!(d.ranges() <= 4);
            }
            for s in 0..510 {
                if d.is_acked(id(1, s)) {
                    prop_assert!(model.contains(&s), "claims unacked seq {}", s);
                }
            }
        }

        #[test]
        fn link_acks_cover_exactly_done(done in proptest::collection::btree_set(1u64..100, 0..80)) {
            let mut acks = LinkAcks::default();
            for s in &done { acks.done(*s); }
            let ack = acks.take_ack();
            if done.is_empty() { prop_assert!(ack.is_none()); return Ok(()); }
            let ack = ack.expect("dirty");
            let mut covered: BTreeSet<u64> = (1..=ack.upto).collect();
            covered.extend(ack.extra.iter().copied());
            prop_assert_eq!(covered, done);
        }
    }

    proptest! {
        /// Any completion order gives the same cumulative ack as the set model, and a
        /// wake-up is asked for exactly when an ack becomes due after the last take.
        #[test]
        fn link_acks_any_order_and_wake_once(
            order in Just((1u64..200).collect::<Vec<_>>()).prop_shuffle(),
            take_every in 1usize..50,
        ) {
            let mut acks = LinkAcks::default();
            let mut model = BTreeSet::new();
            let mut due = false;
            for (i, s) in order.iter().enumerate() {
                let newly = !model.contains(s);
                model.insert(*s);
                let wake = acks.done(*s);
                prop_assert_eq!(wake, newly && !due);
                due |= wake;
                prop_assert!(!acks.done(*s), "repeated completion needs no wake-up");
                if i % take_every == 0 {
                    let ack = acks.take_ack();
                    prop_assert_eq!(ack.is_some(), due);
                    due = false;
                    if let Some(ack) = ack {
                        let mut covered: BTreeSet<u64> = (1..=ack.upto).collect();
                        covered.extend(ack.extra.iter().copied());
                        prop_assert_eq!(&covered, &model);
                    }
                }
            }
            if let Some(ack) = acks.take_ack() {
                prop_assert!(due);
                prop_assert_eq!(ack.upto, 199);
                prop_assert!(ack.extra.is_empty());
            }
        }
    }

    #[test]
    fn received_marks_skipped_done_and_refuses_huge_gaps() {
        let mut acks = LinkAcks::default();
        assert_eq!(acks.received(1, 3), Some(false));
        // 4 and 5 were requeued by the sender: done, and an ack is due.
        assert_eq!(acks.received(6, 1), Some(true));
        assert_eq!(acks.received(7, 1), Some(false));
        let ack = acks.take_ack().expect("due");
        assert_eq!((ack.upto, ack.extra), (0, vec![4, 5]));
        assert_eq!(acks.received(0, 1), None);
        assert_eq!(acks.received(7 + MAX_LINK_GAP + 1, 1), None);
        assert!(acks.take_ack().is_none());
    }

    #[test]
    fn contiguous_stream_is_one_range() {
        let mut d = Dedup::new(16);
        for s in 1..=1000 {
            d.record(id(9, s));
        }
        assert_eq!(d.ranges(), 1);
    }
}

/// Where a subscription's dedup state is kept: `<data_dir>/dedup/<topic>.<group>` with
/// both names hex-encoded (any topic or group name is a safe file name).
pub(crate) fn state_path(
    data_dir: &std::path::Path,
    topic: &str,
    group: &str,
) -> std::path::PathBuf {
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    data_dir
        .join("dedup")
        .join(format!("{}.{}", hex(topic), hex(group)))
}

/// Loads a saved dedup state; a missing file is an empty state, an unreadable one is
/// reported and replaced by an empty state (duplicates possible, never loss).
pub(crate) fn load(path: &std::path::Path, max_ranges: usize) -> Dedup {
    match std::fs::read(path) {
        Ok(bytes) => match rmp_serde::from_slice::<Dedup>(&bytes) {
            Ok(mut d) => {
                d.max_ranges = max_ranges.max(1);
                d
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "dedup state unreadable; starting empty (retransmissions may be delivered again)");
                Dedup::new(max_ranges)
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Dedup::new(max_ranges),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read dedup state; starting empty");
            Dedup::new(max_ranges)
        }
    }
}

/// Writes the state durably: temporary file, fsync, rename, fsync of the directory.
pub(crate) fn save(path: &std::path::Path, state: &Dedup) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let bytes = rmp_serde::to_vec(state).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_data()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod persistence_tests {
    use super::*;

    #[test]
    fn saved_state_loads_back_and_garbage_loads_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = state_path(dir.path(), "orders.created", "billing/eu");
        let mut d = Dedup::new(16);
        for s in [1, 2, 3, 10] {
            d.record(MessageId {
                producer: 5,
                seq: s,
            });
        }
        save(&path, &d).expect("save");
        let back = load(&path, 16);
        assert!(back.is_acked(MessageId {
            producer: 5,
            seq: 10
        }));
        assert!(!back.is_acked(MessageId {
            producer: 5,
            seq: 4
        }));
        std::fs::write(&path, b"\xff\x00garbage").expect("write");
        assert!(!load(&path, 16).is_acked(MessageId {
            producer: 5,
            seq: 1
        }));
    }
}
