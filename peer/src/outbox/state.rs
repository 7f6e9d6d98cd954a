//! Sans-IO settlement, segment and quota accounting of the outbox.
//!
//! [`OutboxState`] knows which messages are pending for which groups, where each one
//! lives on disk, how many live messages each segment holds, and how much of the quota
//! is used. It does no I/O and reads no clock: callers pass times in and carry out the
//! [`Action`]s it returns.
//!
//! # When may a segment be deleted?
//!
//! A segment file is deleted once (1) it is sealed (not the active segment), (2) every
//! message written in it is settled, and (3) every *older* segment for whose messages
//! it holds settle records is already deleted. Rule (3) keeps settle records alive
//! while the messages they settle are still on disk, so deleting files never makes a
//! settled message come back after a restart. Deletions are returned in ascending
//! segment order and must be carried out in that order.
//!
//! Limitation: a message that stays pending for a long time pins its segment, and
//! segments holding settles for that segment's other messages; they go once it settles
//! (ack, TTL or dead letter). There is no compaction that copies such messages forward.

use super::{Durability, MemoryRecord, MemoryRecordRef};
use crate::seq_map::SeqMap;
use crate::seq_window::SeqWindow;
use bytes::Bytes;
use rustc_hash::FxHashMap;
use smallvec::SmallVec;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// Where a message record lives on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Segment id (the file name's number).
    pub segment: u64,
    /// Byte offset of the frame in the segment.
    pub offset: u64,
    /// Payload length of the frame (without the 8-byte header).
    pub len: u32,
}

/// Something the I/O layer must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Delete this segment file (then fsync the directory).
    DeleteSegment(u64),
}

/// The quota would be exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaFull {
    /// Messages currently counted against the quota.
    pub used_messages: u64,
    /// Bytes currently counted against the quota.
    pub used_bytes: u64,
    /// Message quota.
    pub max_messages: u64,
    /// Byte quota.
    pub max_bytes: u64,
    /// The limit hit is the one on `Memory` messages, not the whole quota.
    pub memory: bool,
}

/// A limit on a number of messages and their body bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limit {
    messages: u64,
    bytes: u64,
}

/// What counts against a [`Limit`]: reservations and pending messages.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    messages: u64,
    bytes: u64,
}

impl Usage {
    fn fits(&self, limit: Limit, messages: u64, bytes: u64) -> bool {
        self.messages.saturating_add(messages) <= limit.messages
            && self.bytes.saturating_add(bytes) <= limit.bytes
    }

    fn add(&mut self, messages: u64, bytes: u64) {
        self.messages = self.messages.saturating_add(messages);
        self.bytes = self.bytes.saturating_add(bytes);
    }

    fn sub(&mut self, messages: u64, bytes: u64) {
        self.messages = self.messages.saturating_sub(messages);
        self.bytes = self.bytes.saturating_sub(bytes);
    }

    fn full(&self, limit: Limit, memory: bool) -> QuotaFull {
        QuotaFull {
            used_messages: self.messages,
            used_bytes: self.bytes,
            max_messages: limit.messages,
            max_bytes: limit.bytes,
            memory,
        }
    }
}

/// Result of [`OutboxState::settle`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettleOutcome {
    /// The group was pending for this message and is now settled.
    pub applied: bool,
    /// The message is now settled for every group and left the state.
    pub fully_settled: bool,
    /// Segment holding the message, if it was written to disk (a settle record is
    /// then worth writing).
    pub segment: Option<u64>,
    /// Actions to carry out.
    pub actions: Vec<Action>,
}

/// Interned ids of target groups (inline up to four: no allocation per message for the
/// usual fan-out).
pub type GroupSet = SmallVec<[u32; 4]>;

#[derive(Debug)]
struct Entry {
    /// Groups not yet settled.
    groups: GroupSet,
    loc: Option<Location>,
    bytes: u64,
    unix_ms: u64,
    /// The body of a `Memory` message (it has no other copy).
    body: Option<Bytes>,
}

#[derive(Debug)]
struct Group {
    name: Arc<str>,
    pending: u64,
    /// Seqs pending for this group in increasing order; settled ones are removed
    /// lazily from the front.
    order: SeqRuns,
}

#[derive(Debug, Default)]
struct Segment {
    live: u64,
    sealed: bool,
    /// Older segments this one holds settle records for.
    refs: BTreeSet<u64>,
}

impl Group {
    /// Drops settled seqs from the front of `order` (this group is `gid`).
    fn trim_order(&mut self, gid: u32, entries: &SeqWindow<Entry>) {
        while let Some(front) = self.order.front() {
            if entries.get(front).is_some_and(|e| e.groups.contains(&gid)) {
                break;
            }
            self.order.pop_front();
        }
    }
}

/// Sequence numbers in increasing order, kept as runs of consecutive numbers (a group's
/// pending messages are mostly one long run: one slot instead of one per message).
#[derive(Debug, Default)]
struct SeqRuns {
    /// Inclusive `(first, last)` runs.
    runs: VecDeque<(u64, u64)>,
}

impl SeqRuns {
    fn push(&mut self, seq: u64) {
        match self.runs.back_mut() {
            Some((_, last)) if last.checked_add(1) == Some(seq) => *last = seq,
            _ => self.runs.push_back((seq, seq)),
        }
    }

    fn front(&self) -> Option<u64> {
        self.runs.front().map(|&(first, _)| first)
    }

    fn pop_front(&mut self) {
        if let Some((first, last)) = self.runs.front_mut() {
            if first < last {
                *first += 1;
            } else {
                self.runs.pop_front();
            }
        }
    }

    fn clear(&mut self) {
        self.runs.clear();
    }
}

/// Per-group view returned by [`OutboxState::group_stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    /// Group name.
    pub group: String,
    /// Messages pending for the group.
    pub pending: u64,
    /// Append time (Unix ms) of the oldest message pending for the group.
    pub oldest_unix_ms: Option<u64>,
}

/// The sans-IO core of the outbox.
#[derive(Debug)]
pub struct OutboxState {
    quota: Limit,
    used: Usage,
    /// The part of the quota `Memory` messages may take: their bodies live only in
    /// memory, so they are bounded apart from the (disk-backed) whole.
    memory_limit: Limit,
    memory_used: Usage,
    entries: SeqWindow<Entry>,
    /// The tails of `Memory` records held in two pieces (their heads are the entries'
    /// bodies): kept apart so that the entry of every other message stays small, and
    /// looked up only while there are any.
    tails: SeqMap<Bytes>,
    /// Body bytes of `entries` (reservations excluded).
    pending_bytes: u64,
    groups: Vec<Group>,
    group_ids: FxHashMap<Arc<str>, u32>,
    segments: BTreeMap<u64, Segment>,
    active: Option<u64>,
}

impl OutboxState {
    /// A new, empty state with the given quota.
    pub fn new(max_bytes: u64, max_messages: u64) -> Self {
        OutboxState {
            quota: Limit {
                messages: max_messages,
                bytes: max_bytes,
            },
            used: Usage::default(),
            memory_limit: Limit {
                messages: u64::MAX,
                bytes: u64::MAX,
            },
            memory_used: Usage::default(),
            entries: SeqWindow::default(),
            tails: SeqMap::default(),
            pending_bytes: 0,
            groups: Vec::new(),
            group_ids: FxHashMap::default(),
            segments: BTreeMap::new(),
            active: None,
        }
    }

    /// Reserves quota for one message of `bytes`. On success the reservation counts
    /// until [`message_added`](Self::message_added) turns it into a pending message or
    /// [`unreserve`](Self::unreserve) gives it back.
    pub fn reserve(&mut self, bytes: u64) -> Result<(), QuotaFull> {
        self.reserve_many(1, bytes)
    }

    /// Limits `Memory` messages (reserved or pending) to `messages` and `bytes`, inside
    /// the quota (unlimited unless set).
    pub fn with_memory_limit(mut self, messages: u64, bytes: u64) -> Self {
        self.memory_limit = Limit { messages, bytes };
        self
    }

    /// Reserves quota for `messages` messages of `bytes` bytes in all, or none of it.
    pub fn reserve_many(&mut self, messages: u64, bytes: u64) -> Result<(), QuotaFull> {
        if !self.used.fits(self.quota, messages, bytes) {
            return Err(self.used.full(self.quota, false));
        }
        self.used.add(messages, bytes);
        Ok(())
    }

    /// [`reserve_many`](Self::reserve_many) for `Memory` messages: they must also fit
    /// the memory limit. Give it back with
    /// [`unreserve_memory_many`](Self::unreserve_memory_many).
    pub fn reserve_memory_many(&mut self, messages: u64, bytes: u64) -> Result<(), QuotaFull> {
        if !self.memory_used.fits(self.memory_limit, messages, bytes) {
            return Err(self.memory_used.full(self.memory_limit, true));
        }
        self.reserve_many(messages, bytes)?;
        self.memory_used.add(messages, bytes);
        Ok(())
    }

    /// Gives back a reservation that did not become a message.
    pub fn unreserve(&mut self, bytes: u64) {
        self.unreserve_many(1, bytes);
    }

    /// Gives back a reservation of `messages` messages and `bytes` bytes.
    pub fn unreserve_many(&mut self, messages: u64, bytes: u64) {
        self.used.sub(messages, bytes);
    }

    /// [`reserve_memory_many`](Self::reserve_memory_many) or
    /// [`reserve_many`](Self::reserve_many), as `durability` says.
    pub fn reserve_as(
        &mut self,
        durability: Durability,
        messages: u64,
        bytes: u64,
    ) -> Result<(), QuotaFull> {
        match durability {
            Durability::Memory => self.reserve_memory_many(messages, bytes),
            Durability::Disk => self.reserve_many(messages, bytes),
        }
    }

    /// Gives back a reservation made with [`reserve_as`](Self::reserve_as).
    pub fn unreserve_as(&mut self, durability: Durability, messages: u64, bytes: u64) {
        match durability {
            Durability::Memory => self.unreserve_memory_many(messages, bytes),
            Durability::Disk => self.unreserve_many(messages, bytes),
        }
    }

    /// Gives back a reservation made with [`reserve_memory_many`](Self::reserve_memory_many).
    pub fn unreserve_memory_many(&mut self, messages: u64, bytes: u64) {
        self.unreserve_many(messages, bytes);
        self.memory_used.sub(messages, bytes);
    }

    /// Whether `messages` messages of `bytes` bytes could ever fit the quota (and, for
    /// `memory`, the memory limit).
    pub fn could_fit(&self, messages: u64, bytes: u64, memory: bool) -> bool {
        self.never_fits(messages, bytes, memory).is_none()
    }

    /// The limit that could never hold `messages` of `bytes` (`memory`: `Memory`
    /// messages, held against the memory limit too), even with nothing else pending:
    /// `(memory limit?, its messages, its bytes)`. Waiting would not help such an append.
    pub fn never_fits(&self, messages: u64, bytes: u64, memory: bool) -> Option<(bool, u64, u64)> {
        let fits = |l: Limit| messages <= l.messages && bytes <= l.bytes;
        if !fits(self.quota) {
            return Some((false, self.quota.messages, self.quota.bytes));
        }
        (memory && !fits(self.memory_limit)).then_some((
            true,
            self.memory_limit.messages,
            self.memory_limit.bytes,
        ))
    }

    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.group_ids.get(name) {
            return id;
        }
        let id = self.groups.len() as u32;
        let name: Arc<str> = Arc::from(name);
        self.groups.push(Group {
            name: name.clone(),
            pending: 0,
            order: SeqRuns::default(),
        });
        self.group_ids.insert(name, id);
        id
    }

    /// A message became pending (its quota reserved before, unless `reserved` is false:
    /// then it is counted now, possibly above the quota, as in recovery). Seqs must be
    /// added in increasing order. Targets must be deduplicated and non-empty.
    pub fn message_added(
        &mut self,
        seq: u64,
        targets: &[String],
        loc: Option<Location>,
        bytes: u64,
        unix_ms: u64,
        reserved: bool,
    ) {
        let groups = self.group_set(targets);
        self.message_added_to(seq, &groups, loc, bytes, unix_ms, reserved);
    }

    /// [`message_added`](Self::message_added) for groups already interned with
    /// [`group_set`](Self::group_set) (once for a batch of messages).
    pub fn message_added_to(
        &mut self,
        seq: u64,
        groups: &GroupSet,
        loc: Option<Location>,
        bytes: u64,
        unix_ms: u64,
        reserved: bool,
    ) {
        if !reserved {
            self.used.add(1, bytes);
        }
        if let Some(old) = self.remove_entry(seq) {
            // A duplicate record of the same seq (not produced by this writer): the
            // later one replaces the earlier one.
            self.drop_entry(seq, old);
        }
        if let Some(l) = loc {
            self.segments.entry(l.segment).or_default().live += 1;
        }
        self.insert(
            seq,
            Entry {
                groups: GroupSet::from_slice(groups),
                loc,
                bytes,
                unix_ms,
                body: None,
            },
        );
    }

    /// `Memory` messages `first..` (reserved quota, sequence numbers never used
    /// before) were added for the same groups (interned by
    /// [`group_set`](Self::group_set)); the state keeps their bodies (moved
    /// in: each body's reference count is shared by the messages of its publish, and
    /// every count taken and dropped per message was measurable).
    pub fn memory_messages_added(
        &mut self,
        first: u64,
        groups: &GroupSet,
        bodies: impl ExactSizeIterator<Item = MemoryRecord>,
        unix_ms: u64,
    ) {
        self.entries.reserve(bodies.len());
        for (seq, MemoryRecord { head, tail }) in (first..).zip(bodies) {
            let bytes = (head.len() + tail.as_ref().map_or(0, Bytes::len)) as u64;
            if let Some(tail) = tail {
                self.tails.insert(seq, tail);
            }
            self.insert(
                seq,
                Entry {
                    // A copy of the ids (`clone` went element by element).
                    groups: GroupSet::from_slice(groups),
                    loc: None,
                    bytes,
                    unix_ms,
                    body: Some(head),
                },
            );
        }
    }

    /// Makes `entry` pending for its groups (already interned) under `seq`.
    fn insert(&mut self, seq: u64, entry: Entry) {
        for &id in &entry.groups {
            let g = &mut self.groups[id as usize];
            g.pending += 1;
            g.order.push(seq);
        }
        self.pending_bytes += entry.bytes;
        self.entries.insert(seq, entry);
    }

    /// The interned ids of `targets`, without duplicates.
    pub fn group_set(&mut self, targets: &[String]) -> GroupSet {
        let mut groups = SmallVec::new();
        for t in targets {
            let id = self.intern(t);
            if !groups.contains(&id) {
                groups.push(id);
            }
        }
        groups
    }

    /// The body of a pending `Memory` message.
    pub fn memory_body(&self, seq: u64) -> Option<MemoryRecordRef<'_>> {
        let head = self.entries.get(seq)?.body.as_ref()?;
        let tail = if self.tails.is_empty() {
            None
        } else {
            self.tails.get(&seq)
        };
        Some(MemoryRecordRef { head, tail })
    }

    fn remove_entry(&mut self, seq: u64) -> Option<Entry> {
        let entry = self.entries.remove(seq)?;
        if !self.tails.is_empty() {
            self.tails.remove(&seq);
        }
        Some(entry)
    }

    fn drop_entry(&mut self, _seq: u64, e: Entry) {
        for id in &e.groups {
            let g = &mut self.groups[*id as usize];
            g.pending = g.pending.saturating_sub(1);
        }
        if let Some(l) = e.loc {
            if let Some(s) = self.segments.get_mut(&l.segment) {
                s.live = s.live.saturating_sub(1);
            }
        }
        self.release(&e);
    }

    /// Gives back what a message that left took of the quota (and memory limit).
    fn release(&mut self, e: &Entry) {
        self.used.sub(1, e.bytes);
        if e.body.is_some() {
            self.memory_used.sub(1, e.bytes);
        }
        self.pending_bytes = self.pending_bytes.saturating_sub(e.bytes);
    }

    /// Removes a message entirely (e.g. its write failed), releasing its quota.
    pub fn forget(&mut self, seq: u64) -> Vec<Action> {
        if let Some(e) = self.remove_entry(seq) {
            self.drop_entry(seq, e);
            self.trim_orders();
        }
        self.collect_deletable()
    }

    fn trim_orders(&mut self) {
        let entries = &self.entries;
        for (id, g) in self.groups.iter_mut().enumerate() {
            g.trim_order(id as u32, entries);
            if g.pending == 0 {
                g.order.clear();
            }
        }
    }

    /// Marks `seq` settled for `group`. Idempotent: unknown seqs or groups are no-ops.
    pub fn settle(&mut self, seq: u64, group: &str) -> SettleOutcome {
        match self.group_id(group) {
            Some(gid) => self.settle_group(seq, gid),
            None => SettleOutcome::default(),
        }
    }

    /// The interned id of `group`, if any message was ever added for it (settling many
    /// messages of one group looks its name up once).
    pub fn group_id(&self, group: &str) -> Option<u32> {
        self.group_ids.get(group).copied()
    }

    /// [`settle`](Self::settle) for a group id from [`group_id`](Self::group_id).
    pub fn settle_group(&mut self, seq: u64, gid: u32) -> SettleOutcome {
        let out = self.settle_untrimmed(seq, gid);
        self.groups[gid as usize].trim_order(gid, &self.entries);
        out
    }

    /// [`settle_group`](Self::settle_group) for each of `seqs`, handing each outcome to
    /// `outcome`; the group's order of pending messages is trimmed once, at the end,
    /// instead of after each message.
    pub fn settle_group_many(
        &mut self,
        seqs: &[u64],
        gid: u32,
        mut outcome: impl FnMut(u64, SettleOutcome),
    ) {
        for &seq in seqs {
            outcome(seq, self.settle_untrimmed(seq, gid));
        }
        if let Some(g) = self.groups.get_mut(gid as usize) {
            g.trim_order(gid, &self.entries);
        }
    }

    /// Settles `seq` for group `gid`, leaving the group's order to be trimmed.
    fn settle_untrimmed(&mut self, seq: u64, gid: u32) -> SettleOutcome {
        let mut out = SettleOutcome::default();
        let Some(e) = self.entries.get_mut(seq) else {
            return out;
        };
        let Some(pos) = e.groups.iter().position(|g| *g == gid) else {
            return out;
        };
        e.groups.swap_remove(pos);
        out.applied = true;
        out.segment = e.loc.map(|l| l.segment);
        let now_empty = e.groups.is_empty();
        let g = &mut self.groups[gid as usize];
        g.pending = g.pending.saturating_sub(1);
        if now_empty {
            out.fully_settled = true;
            if let Some(e) = self.remove_entry(seq) {
                self.release(&e);
                if let Some(body) = e.body {
                    crate::record_buffers::give(body);
                }
                if let Some(l) = e.loc {
                    if let Some(s) = self.segments.get_mut(&l.segment) {
                        s.live = s.live.saturating_sub(1);
                        if s.live == 0 && s.sealed {
                            out.actions = self.collect_deletable();
                        }
                    }
                }
            }
        }
        out
    }

    /// A settle record for a message in `msg_segment` was written into `holder`.
    pub fn settle_written(&mut self, holder: u64, msg_segment: u64) {
        if holder != msg_segment && self.segments.contains_key(&msg_segment) {
            self.segments
                .entry(holder)
                .or_default()
                .refs
                .insert(msg_segment);
        }
    }

    /// A segment file exists (recovery, sealed) or was created (it becomes the active
    /// segment and the previous active one is sealed).
    pub fn segment_opened(&mut self, id: u64, active: bool) -> Vec<Action> {
        let s = self.segments.entry(id).or_default();
        s.sealed = !active;
        if active {
            if let Some(prev) = self.active.replace(id) {
                if let Some(p) = self.segments.get_mut(&prev) {
                    p.sealed = true;
                }
            }
        }
        self.collect_deletable()
    }

    /// Sealed segments that can be deleted now, in ascending order. They are removed
    /// from the state at once; the caller must delete the files in this order.
    pub fn collect_deletable(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        let ids: Vec<u64> = self.segments.keys().copied().collect();
        for id in ids {
            let Some(s) = self.segments.get(&id) else {
                continue;
            };
            if !s.sealed || s.live > 0 || Some(id) == self.active {
                continue;
            }
            if s.refs.iter().any(|r| self.segments.contains_key(r)) {
                continue;
            }
            self.segments.remove(&id);
            out.push(Action::DeleteSegment(id));
        }
        out
    }

    /// Location of a pending disk message.
    pub fn location(&self, seq: u64) -> Option<Location> {
        self.entries.get(seq).and_then(|e| e.loc)
    }

    /// True if the message is pending for at least one group.
    pub fn is_pending(&self, seq: u64) -> bool {
        self.entries.contains(seq)
    }

    /// Groups the message is still pending for.
    pub fn unsettled(&self, seq: u64) -> Vec<String> {
        self.entries
            .get(seq)
            .map(|e| {
                e.groups
                    .iter()
                    .map(|g| self.groups[*g as usize].name.to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Append time (Unix ms) of a pending message.
    pub fn appended_unix_ms(&self, seq: u64) -> Option<u64> {
        self.entries.get(seq).map(|e| e.unix_ms)
    }

    /// Pending seqs (unordered).
    pub fn pending_seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries.keys()
    }

    /// Number of pending messages (settled for at least one group remaining).
    pub fn pending_messages(&self) -> u64 {
        self.entries.len() as u64
    }

    /// `(messages, bytes)` counted against the quota, reservations included.
    pub fn quota_used(&self) -> (u64, u64) {
        (self.used.messages, self.used.bytes)
    }

    /// `(messages, bytes)` counted against the memory limit, reservations included.
    pub fn memory_used(&self) -> (u64, u64) {
        (self.memory_used.messages, self.memory_used.bytes)
    }

    /// Bytes of pending messages (reservations excluded).
    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// Segments known (existing files).
    pub fn segment_ids(&self) -> Vec<u64> {
        self.segments.keys().copied().collect()
    }

    /// Live message count of a segment.
    pub fn segment_live(&self, id: u64) -> Option<u64> {
        self.segments.get(&id).map(|s| s.live)
    }

    /// Per-group pending counts and oldest pending append time.
    pub fn group_stats(&self) -> Vec<GroupView> {
        self.groups
            .iter()
            .filter(|g| g.pending > 0)
            .map(|g| GroupView {
                group: g.name.to_string(),
                pending: g.pending,
                oldest_unix_ms: g
                    .order
                    .front()
                    .and_then(|s| self.entries.get(s))
                    .map(|e| e.unix_ms),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }
    fn loc(segment: u64, offset: u64) -> Option<Location> {
        Some(Location {
            segment,
            offset,
            len: 10,
        })
    }

    #[test]
    fn settle_per_group_then_fully() {
        let mut s = OutboxState::new(1000, 10);
        s.segment_opened(1, true);
        s.reserve(10).unwrap();
        s.message_added(1, &t(&["a", "b"]), loc(1, 0), 10, 100, true);
        assert_eq!(s.pending_messages(), 1);
        let o = s.settle(1, "a");
        assert!(o.applied && !o.fully_settled);
        assert_eq!(o.segment, Some(1));
        assert_eq!(s.unsettled(1), t(&["b"]));
        // Idempotent.
        assert!(!s.settle(1, "a").applied);
        assert!(!s.settle(99, "a").applied);
        assert!(!s.settle(1, "zzz").applied);
        let o = s.settle(1, "b");
        assert!(o.applied && o.fully_settled);
        assert!(o.actions.is_empty(), "active segment is never deleted");
        assert_eq!(s.quota_used(), (0, 0));
        assert_eq!(s.segment_live(1), Some(0));
    }

    #[test]
    fn sealed_segment_deleted_when_empty() {
        let mut s = OutboxState::new(1000, 10);
        s.segment_opened(1, true);
        s.message_added(1, &t(&["a"]), loc(1, 0), 1, 0, false);
        s.message_added(2, &t(&["a"]), loc(1, 20), 1, 0, false);
        assert!(s.segment_opened(2, true).is_empty());
        assert!(s.settle(1, "a").actions.is_empty());
        assert_eq!(s.settle(2, "a").actions, vec![Action::DeleteSegment(1)]);
        assert_eq!(s.segment_ids(), vec![2]);
    }

    #[test]
    fn rolling_seals_and_deletes_empty_previous() {
        let mut s = OutboxState::new(1000, 10);
        s.segment_opened(1, true);
        assert_eq!(s.segment_opened(2, true), vec![Action::DeleteSegment(1)]);
    }

    #[test]
    fn settle_refs_keep_holder_until_referenced_segment_goes() {
        let mut s = OutboxState::new(1000, 10);
        s.segment_opened(1, true);
        s.message_added(1, &t(&["a", "b"]), loc(1, 0), 1, 0, false);
        s.message_added(2, &t(&["a"]), loc(1, 10), 1, 0, false);
        s.segment_opened(2, true);
        // seq 1 settled for a; record lands in segment 2.
        s.settle(1, "a");
        s.settle_written(2, 1);
        s.segment_opened(3, true);
        // Segment 2 has no live messages but holds a settle for segment 1 which still
        // exists: it must stay.
        assert!(s.collect_deletable().is_empty());
        s.settle(2, "a");
        let o = s.settle(1, "b");
        assert_eq!(
            o.actions,
            vec![Action::DeleteSegment(1), Action::DeleteSegment(2)]
        );
    }

    #[test]
    fn quota_reserve_and_release() {
        let mut s = OutboxState::new(100, 2);
        s.reserve(60).unwrap();
        let e = s.reserve(60).unwrap_err();
        assert_eq!((e.used_bytes, e.max_bytes), (60, 100));
        s.reserve(40).unwrap();
        assert!(s.reserve(0).is_err(), "message quota");
        s.unreserve(40);
        s.message_added(1, &t(&["g"]), None, 60, 0, true);
        assert_eq!(s.quota_used(), (1, 60));
        s.settle(1, "g");
        assert_eq!(s.quota_used(), (0, 0));
    }

    #[test]
    fn memory_messages_fit_their_own_limit_inside_the_quota() {
        let mut s = OutboxState::new(1000, 10).with_memory_limit(2, 100);
        s.reserve_memory_many(2, 60).unwrap();
        let e = s.reserve_memory_many(1, 1).unwrap_err();
        assert!(e.memory);
        assert_eq!((e.used_messages, e.max_messages), (2, 2));
        assert!(!s.could_fit(3, 1, true));
        assert!(s.could_fit(3, 1, false));
        // Disk messages only count against the quota.
        s.reserve_many(5, 500).unwrap();
        let body = Bytes::from(vec![0; 30]);
        let body = MemoryRecord::from(body);
        let groups = s.group_set(&t(&["g"]));
        s.memory_messages_added(1, &groups, [body.clone(), body].into_iter(), 0);
        assert_eq!(s.memory_used(), (2, 60));
        s.settle(1, "g");
        assert_eq!(s.memory_used(), (1, 30));
        s.settle(2, "g");
        assert_eq!(s.memory_used(), (0, 0));
        assert_eq!(s.quota_used(), (5, 500));
        s.reserve_memory_many(2, 100).unwrap();
        s.unreserve_memory_many(2, 100);
        assert_eq!(s.memory_used(), (0, 0));
        assert_eq!(s.quota_used(), (5, 500));
    }

    #[test]
    fn group_stats_track_oldest() {
        let mut s = OutboxState::new(1000, 10);
        s.message_added(1, &t(&["a", "b"]), None, 1, 100, false);
        s.message_added(2, &t(&["a"]), None, 1, 200, false);
        s.message_added(3, &t(&["b"]), None, 1, 300, false);
        s.settle(1, "a");
        let mut g = s.group_stats();
        g.sort_by(|x, y| x.group.cmp(&y.group));
        assert_eq!(
            g[0],
            GroupView {
                group: "a".into(),
                pending: 1,
                oldest_unix_ms: Some(200)
            }
        );
        assert_eq!(
            g[1],
            GroupView {
                group: "b".into(),
                pending: 2,
                oldest_unix_ms: Some(100)
            }
        );
        s.settle(1, "b");
        let g: Vec<_> = s
            .group_stats()
            .into_iter()
            .filter(|g| g.group == "b")
            .collect();
        assert_eq!(g[0].oldest_unix_ms, Some(300));
    }

    #[test]
    fn forget_releases_everything() {
        let mut s = OutboxState::new(1000, 10);
        s.segment_opened(1, true);
        s.reserve(5).unwrap();
        s.message_added(7, &t(&["a"]), loc(1, 0), 5, 0, true);
        s.forget(7);
        assert_eq!(s.quota_used(), (0, 0));
        assert_eq!(s.segment_live(1), Some(0));
        assert!(s.group_stats().is_empty());
    }
}
