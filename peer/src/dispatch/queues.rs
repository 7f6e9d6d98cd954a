//! The dispatcher's two per-message containers, laid out as dense ring buffers.
//!
//! Both see messages in (nearly) increasing order: new messages join the waiting queue
//! at its end and leave it mostly from the front; a link numbers what it sends
//! consecutively and acknowledgements are mostly cumulative. Ordered maps paid a tree
//! walk and an allocation-prone node update per message on that path; these pay a ring
//! buffer push or pop, and fall back to linear work only for requeues (a link went down
//! or timed out) and out-of-order acks, which are rare.

use super::{Entry, InFlight, Seq};
use std::collections::VecDeque;

/// Messages waiting for a link, in increasing sequence order.
#[derive(Debug, Default)]
pub(super) struct WaitQueue {
    items: VecDeque<(Seq, Entry)>,
}

impl WaitQueue {
    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Adds messages (a run in increasing sequence order); a message already waiting is
    /// replaced. A run that belongs
    /// before some waiting messages (publishes racing each other to the dispatcher) is
    /// moved in as a block, not inserted one message at a time.
    pub(super) fn push_run<I>(&mut self, run: I)
    where
        I: IntoIterator<Item = (Seq, Entry)>,
        I::IntoIter: DoubleEndedIterator + Clone,
    {
        let run = run.into_iter();
        let (Some((first, _)), Some((last, _))) = (run.clone().next(), run.clone().next_back())
        else {
            return;
        };
        // The usual case: after every waiting message, without collecting the run.
        if self.items.back().is_none_or(|&(s, _)| s < first) {
            self.items.extend(run);
            return;
        }
        let at = self.items.partition_point(|&(s, _)| s < first);
        if self.items[at].0 <= last {
            // Interleaved with waiting messages: merge.
            self.requeue(run.collect());
        } else {
            let tail = self.items.split_off(at);
            self.items.extend(run);
            self.items.extend(tail);
        }
    }

    /// Puts messages back (they were in flight): one merge, whatever their number.
    pub(super) fn requeue(&mut self, mut back: Vec<(Seq, Entry)>) {
        if back.is_empty() {
            return;
        }
        back.sort_unstable_by_key(|(s, _)| *s);
        let before_all = self
            .items
            .front()
            .is_none_or(|&(first, _)| back.last().is_some_and(|&(s, _)| s < first));
        if before_all {
            for item in back.into_iter().rev() {
                self.items.push_front(item);
            }
            return;
        }
        let old = std::mem::take(&mut self.items);
        let mut merged = VecDeque::with_capacity(old.len() + back.len());
        let mut old = old.into_iter().peekable();
        let mut back = back.into_iter().peekable();
        loop {
            let take_back = match (old.peek(), back.peek()) {
                (Some(o), Some(b)) => b.0 <= o.0,
                (None, Some(_)) => true,
                (Some(_), None) => false,
                (None, None) => break,
            };
            let item = if take_back { back.next() } else { old.next() };
            if let Some(item) = item {
                if merged.back().is_some_and(|&(s, _)| s == item.0) {
                    // The same message twice: keep one (the requeued copy came first).
                    continue;
                }
                merged.push_back(item);
            }
        }
        self.items = merged;
    }

    /// Offers waiting messages in order to `choose`, at most `limit` of them, until it
    /// returns [`Offer::Stop`]; removes the taken ones and keeps the skipped ones in
    /// place. Costs the number of messages offered.
    pub(super) fn scan(&mut self, limit: usize, mut choose: impl FnMut(Seq, Entry) -> Offer) {
        let mut skipped = Vec::new();
        let mut offered = 0;
        while offered < limit {
            let Some((seq, entry)) = self.items.pop_front() else {
                break;
            };
            match choose(seq, entry) {
                Offer::Take => {}
                Offer::Skip => skipped.push((seq, entry)),
                Offer::Stop => {
                    self.items.push_front((seq, entry));
                    break;
                }
            }
            offered += 1;
        }
        for item in skipped.into_iter().rev() {
            self.items.push_front(item);
        }
    }
}

/// What [`WaitQueue::scan`]'s chooser decided about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Offer {
    /// Remove it from the queue (it was assigned).
    Take,
    /// Leave it waiting and look further.
    Skip,
    /// Leave it and every later one waiting.
    Stop,
}

/// A link's unacknowledged messages in link sequence order. Only unacknowledged ones are
/// kept, so it never holds more than the link's credit window (an out-of-order ack is a
/// removal from the middle, which is rare and costs at most a window's worth of moves).
#[derive(Debug, Default)]
pub(super) struct InFlightWindow {
    slots: VecDeque<(u64, InFlight)>,
}

impl InFlightWindow {
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Makes room for `additional` more messages.
    pub(super) fn reserve(&mut self, additional: usize) {
        self.slots.reserve(additional);
    }

    /// Records a message sent as `link_seq`, which must follow the last one recorded.
    pub(super) fn push(&mut self, link_seq: u64, f: InFlight) {
        debug_assert!(self.slots.back().is_none_or(|(last, _)| *last < link_seq));
        self.slots.push_back((link_seq, f));
    }

    /// Removes and returns the messages acknowledged by `upto` (cumulative) and `extra`.
    pub(super) fn ack(&mut self, upto: u64, extra: &[u64]) -> Vec<InFlight> {
        let cumulative = self.slots.partition_point(|(s, _)| *s <= upto);
        let mut acked = Vec::with_capacity(cumulative + extra.len());
        acked.extend(self.slots.drain(..cumulative).map(|(_, f)| f));
        for link_seq in extra {
            if let Ok(i) = self.slots.binary_search_by_key(link_seq, |(s, _)| *s) {
                if let Some((_, f)) = self.slots.remove(i) {
                    acked.push(f);
                }
            }
        }
        acked
    }

    /// The oldest unacknowledged message.
    pub(super) fn oldest(&self) -> Option<&InFlight> {
        self.slots.front().map(|(_, f)| f)
    }

    /// Removes and returns every unacknowledged message.
    pub(super) fn take_all(&mut self) -> Vec<InFlight> {
        std::mem::take(&mut self.slots)
            .into_iter()
            .map(|(_, f)| f)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::time::Instant;

    fn entry(deliveries: u32) -> Entry {
        Entry {
            key_hash: None,
            deliveries,
        }
    }

    fn seqs(q: &WaitQueue) -> Vec<Seq> {
        q.items.iter().map(|(s, _)| *s).collect()
    }

    #[test]
    fn scan_takes_skips_and_stops_keeping_order() {
        let mut q = WaitQueue::default();
        q.push_run((1..=6).map(|s| (s, entry(0))).collect::<Vec<_>>());
        q.scan(10, |seq, _| match seq {
            2 | 4 => Offer::Skip,
            5 => Offer::Stop,
            _ => Offer::Take,
        });
        assert_eq!(seqs(&q), vec![2, 4, 5, 6]);
        q.scan(1, |_, _| Offer::Take);
        assert_eq!(seqs(&q), vec![4, 5, 6], "the limit bounds what is offered");
    }

    #[test]
    fn requeued_messages_merge_in_order_without_duplicates() {
        let mut q = WaitQueue::default();
        q.push_run([3, 7, 9].map(|s| (s, entry(0))).to_vec());
        q.requeue(vec![(8, entry(1)), (1, entry(1)), (7, entry(1))]);
        assert_eq!(seqs(&q), vec![1, 3, 7, 8, 9]);
        q.requeue(vec![(0, entry(2))]);
        assert_eq!(
            seqs(&q),
            vec![0, 1, 3, 7, 8, 9],
            "all before the front: prepended"
        );
        q.push_run(vec![(5, entry(0)), (6, entry(0))]);
        assert_eq!(
            seqs(&q),
            vec![0, 1, 3, 5, 6, 7, 8, 9],
            "a late run lands in order"
        );
        q.push_run(vec![(2, entry(0)), (4, entry(0))]);
        assert_eq!(
            seqs(&q),
            vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
            "interleaved: merged"
        );
    }

    proptest! {
        /// The queue behaves as an ordered map under any mix of operations.
        #[test]
        fn wait_queue_matches_an_ordered_map(ops in proptest::collection::vec((0u8..4, 0u64..40, 0usize..8), 1..200)) {
            let mut q = WaitQueue::default();
            let mut model: BTreeMap<Seq, u32> = BTreeMap::new();
            for (op, seq, n) in ops {
                match op {
                    0 | 1 => {
                        // A run: one message (op 0) or n of them every other seq (op 1).
                        let len = if op == 0 { 1 } else { n as u64 };
                        let run: Vec<(Seq, Entry)> = (0..len).map(|i| (seq + 2 * i, entry(n as u32))).collect();
                        for (s, _) in &run {
                            model.insert(*s, n as u32);
                        }
                        q.push_run(run);
                    }
                    2 => {
                        let back: Vec<(Seq, Entry)> = (seq..seq + n as u64).map(|s| (s, entry(7))).collect();
                        for (s, _) in &back {
                            model.insert(*s, 7);
                        }
                        q.requeue(back);
                    }
                    _ => {
                        // Take every message whose seq is even, skip odd ones, up to n.
                        let taken: Vec<Seq> = model.keys().take(n).copied().filter(|s| s % 2 == 0).collect();
                        for s in taken { model.remove(&s); }
                        q.scan(n, |s, _| if s % 2 == 0 { Offer::Take } else { Offer::Skip });
                    }
                }
                let got: Vec<(Seq, u32)> = q.items.iter().map(|(s, e)| (*s, e.deliveries)).collect();
                let want: Vec<(Seq, u32)> = model.iter().map(|(s, d)| (*s, *d)).collect();
                prop_assert_eq!(got, want);
            }
        }

        /// The window behaves as a map from link seq to message under pushes and acks.
        #[test]
        fn in_flight_window_matches_a_map(ops in proptest::collection::vec((any::<bool>(), 0u64..30, proptest::collection::vec(0u64..60, 0..4)), 1..100)) {
            let now = Instant::now();
            let mut w = InFlightWindow::default();
            let mut model: BTreeMap<u64, Seq> = BTreeMap::new();
            let mut next = 1u64;
            for (push, upto, extra) in ops {
                if push {
                    w.push(next, InFlight { seq: next * 10, entry: entry(1), sent_at: now });
                    model.insert(next, next * 10);
                    next += 1;
                } else {
                    let mut acked: Vec<Seq> = w.ack(upto, &extra).into_iter().map(|f| f.seq).collect();
                    let mut want: Vec<Seq> = model.range(..=upto).map(|(_, s)| *s).collect();
                    model.retain(|k, _| *k > upto);
                    for x in &extra {
                        if let Some(s) = model.remove(x) { want.push(s); }
                    }
                    acked.sort_unstable();
                    want.sort_unstable();
                    prop_assert_eq!(acked, want);
                }
                prop_assert_eq!(w.len(), model.len());
                prop_assert_eq!(w.oldest().map(|f| f.seq), model.values().next().copied());
            }
            let rest: Vec<Seq> = w.take_all().into_iter().map(|f| f.seq).collect();
            prop_assert_eq!(rest, model.values().copied().collect::<Vec<_>>());
            prop_assert_eq!(w.len(), 0);
        }
    }
}
