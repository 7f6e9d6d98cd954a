//! The outbox: the sender's durable log of messages not yet settled by every target
//! group.
//!
//! # Layout
//!
//! `cfg.dir` holds segment files `NNNNNNNNNNNNNNNNNNNN.log` (see [`record`] for the
//! framing), a `producer` file with this outbox's producer id, and a `LOCK` file that
//! keeps a second process (or a second [`Outbox`] in the same process) away.
//!
//! # Writing
//!
//! One writer thread does group commit: [`Outbox::append`] sends a request over a
//! bounded channel; the writer drains up to `max_batch` requests, assigns sequence
//! numbers in log order, writes the batch with one `write`, calls `fdatasync` once
//! and then answers every caller of the batch. Settle records are buffered and written
//! by the next batch (or a settle-only write without `fdatasync`). Each batch ends
//! with an `End` record, which the next one overwrites.
//!
//! A fully settled segment is recycled rather than deleted when no spare is kept yet:
//! the next roll renames it into place and overwrites it from its start, which costs
//! the `fdatasync` of each batch less than growing a new file. Frames are sealed to
//! their segment's id ([`record::Seal`]), so the old frames left in a recycled file
//! are never read as the new segment's.
//!
//! Sequence numbers are leased in blocks of [`LEASE_BLOCK`] with a `SeqLease` record
//! made durable before any number of the block is handed out, so numbers never repeat
//! across restarts, including numbers of `Memory` appends that never reach the disk.
//! Every new segment starts with a lease record, so deleting old segments never loses
//! the lease.
//!
//! # Recovery
//!
//! [`Outbox::open`] scans every segment in order (see [`segment::scan`] for how damage
//! is handled; it stops at a segment's last `End` record), truncates a torn tail of the
//! last segment, rebuilds the pending set, deletes segments with nothing pending and
//! the spare, and appends into a new segment.
//!
//! # Accounting
//!
//! Settlement, per-segment live counts, segment deletion and quota live in the
//! sans-IO [`state::OutboxState`].

pub mod cache;
pub mod record;
mod recovery;
pub mod segment;
pub mod state;
mod writer;

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Notify};

use self::cache::BodyCache;
use self::state::OutboxState;
use self::writer::{Reply, Req};

/// Sequence numbers reserved by one `SeqLease` record.
pub const LEASE_BLOCK: u64 = 65_536;
/// Unused leased numbers below which the lease is renewed ahead of need: the writer
/// renews it with its next commit (a `Memory` append that crosses this mark asks for
/// one), so the `Memory` fast path keeps running while the renewal is synced instead
/// of sending every publish through the writer until it is.
pub const LEASE_RENEW_AHEAD: u64 = LEASE_BLOCK / 2;

/// Outbox configuration. Every field has a documented default, see [`OutboxConfig::new`].
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Directory of the outbox (created if missing).
    pub dir: PathBuf,
    /// A segment is closed and a new one started once it reaches this size (default
    /// 64 MiB). A segment may exceed it by one group-commit batch.
    pub segment_bytes: u64,
    /// Quota: total body bytes of pending messages, `Memory` ones included (default 1 GiB).
    pub max_bytes: u64,
    /// Quota: number of pending messages, `Memory` ones included (default 1,000,000).
    pub max_messages: u64,
    /// Part of the quota `Memory` messages may take, in messages (default 65,536).
    /// Their bodies live only in memory, so they are bounded apart from the disk-backed
    /// quota: a publisher this far ahead of its receivers waits (or fails, as its
    /// `WhenFull` says), and its memory stays bounded.
    pub max_memory_messages: u64,
    /// Part of the quota `Memory` messages may take, in body bytes (default 64 MiB).
    pub max_memory_bytes: u64,
    /// Most append requests in one group commit (default 4096).
    pub max_batch: usize,
    /// Body bytes after which a group commit takes no more appends (default 8 MiB; it
    /// may pass them by its last append, and an append larger than that is still
    /// committed). Bounds the writer's buffer, which keeps up to twice this between
    /// commits, and the time one commit keeps its appends waiting: with batches of
    /// large messages, 4096 appends could otherwise make a commit of gigabytes.
    pub max_batch_bytes: usize,
    /// Bytes of bodies of disk messages kept in memory for [`Outbox::read`] (default
    /// 32 MiB); older ones are read back from their segment (in batches, one open per
    /// segment), so a large backlog costs disk, not memory.
    pub cache_bytes: usize,
    /// [`Outbox::append`] waits for the writer thread, and [`Outbox::open`] recovers, by
    /// blocking the calling thread instead of yielding to the async runtime (default
    /// `false`). Only for deterministic simulation (`docs/simulation.md`): the work then
    /// takes no simulated time, no other task of the runtime runs meanwhile, and no
    /// other thread wakes the runtime. Never in production: it stalls every task of the
    /// runtime during each group commit.
    pub blocking_append: bool,
}

impl OutboxConfig {
    /// Configuration with the defaults: 64 MiB segments, 1 GiB and 1,000,000 messages
    /// of quota (of which `Memory` messages may take 64 MiB and 65,536 messages),
    /// batches of 4096 appends or 8 MiB, 32 MiB body cache.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        OutboxConfig {
            dir: dir.into(),
            segment_bytes: 64 * 1024 * 1024,
            max_bytes: 1024 * 1024 * 1024,
            max_messages: 1_000_000,
            max_memory_messages: 65_536,
            max_memory_bytes: 64 * 1024 * 1024,
            max_batch: 4096,
            max_batch_bytes: 8 * 1024 * 1024,
            cache_bytes: 32 * 1024 * 1024,
            blocking_append: false,
        }
    }
}

/// How durable an append must be before [`Outbox::append`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Kept in memory only; lost on restart (its sequence number is still never reused).
    Memory,
    /// Written and `fdatasync`ed to the outbox's segment file.
    Disk,
}

/// Target groups checked and registered with one outbox ([`Outbox::target_groups`]):
/// its appends skip checking and looking up each group name.
#[derive(Debug, Clone)]
pub struct TargetGroups {
    /// Sorted, without duplicates.
    names: Arc<[String]>,
    /// Their ids in the outbox's state (stable for its life).
    ids: state::GroupSet,
}

/// Quota reserved for an append not yet handed to the writer.
struct QuotaGuard<'a> {
    shared: &'a Shared,
    messages: u64,
    bytes: u64,
    durability: Durability,
}

impl Drop for QuotaGuard<'_> {
    fn drop(&mut self) {
        self.shared
            .core()
            .state
            .unreserve_as(self.durability, self.messages, self.bytes);
        self.shared.space.notify_waiters();
    }
}

/// An append handed to the writer by [`Outbox::submit`] or
/// [`Outbox::submit_batch`]; [`wait`](Self::wait) gives its sequence numbers once it
/// has the requested durability.
#[derive(Debug)]
pub struct AppendTicket {
    rx: oneshot::Receiver<Result<std::ops::Range<u64>, OutboxError>>,
    blocking: bool,
}

impl AppendTicket {
    /// Waits until the append is durable as requested and returns its sequence numbers
    /// (consecutive; one for [`Outbox::submit`]). Cancel-safe: may be called again
    /// after the future was dropped.
    pub async fn wait(&mut self) -> Result<std::ops::Range<u64>, OutboxError> {
        if self.blocking {
            // Simulation only (see `OutboxConfig::blocking_append`). The writer never
            // needs this thread to answer; `unconstrained` keeps tokio's cooperative
            // budget from turning this wait into a spin.
            return futures::executor::block_on(tokio::task::unconstrained(&mut self.rx))
                .unwrap_or(Err(OutboxError::Closed));
        }
        // Outside tokio's cooperative budget: one commit answers thousands of tickets
        // at once, and a task awaiting many of them (`FuturesUnordered`, `join_all`)
        // would otherwise see all but the first 128 or so return `Pending` with a
        // deferred wake-up, and poll every one again, round after round (a third to
        // half of the CPU of one-publish-per-message disk runs). A ticket is answered
        // once, after a real wait for the writer, so this cannot spin.
        tokio::task::unconstrained(&mut self.rx)
            .await
            .unwrap_or(Err(OutboxError::Closed))
    }
}

/// What the writer does with an append handed over by
/// [`submit_batch_then`](Outbox::submit_batch_then) or
/// [`try_gather`](Outbox::try_gather) once its fate is known, instead of
/// answering an [`AppendTicket`]: it runs on the writer thread right after the group
/// commit, so that what must follow the store (handing the messages on) happens
/// whether or not anyone waits for the append. Keep it short and never block in it:
/// the next commit waits. It may call back into the outbox.
pub trait AppendDone: Send + 'static {
    /// `Ok(seqs)` (consecutive) once the append has its durability, or the error that
    /// kept it from being stored. Not called when the outbox is dropped with the
    /// append still queued: the continuation is then dropped.
    fn done(self: Box<Self>, result: Result<std::ops::Range<u64>, OutboxError>);
}

/// A `Disk` append whose messages the caller gathers one by one until the writer takes
/// it (see [`Outbox::try_gather`]): single publishes made while the writer is busy
/// with a commit become one append of the next, as a batch would, without waiting for
/// one another or for a timer.
pub trait GatheredAppend: AppendDone {
    /// Called once, by the writer as it builds a commit (outside the outbox's locks):
    /// the bodies gathered so far, in order, and what remains of the quota reserved for
    /// them with [`Outbox::try_reserve_disk`]. None may join after this. The writer
    /// gives the rest of the reservation back, then calls [`AppendDone::done`] as for
    /// any append.
    fn seal(&mut self) -> Sealed;
}

/// A [`GatheredAppend`] as the writer takes it.
#[derive(Debug, Default)]
pub struct Sealed {
    /// The gathered bodies, in order.
    pub bodies: Vec<Bytes>,
    /// Reserved quota (messages, body bytes) that no body took.
    pub unused: (u64, u64),
}

/// What [`Outbox::append`] does when the quota is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Wait until settlements free enough space.
    Wait,
    /// Fail at once with [`OutboxError::Full`].
    Fail,
}

/// A message found pending when the outbox was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRecord {
    /// Sequence number.
    pub seq: u64,
    /// Target groups that have not settled it yet.
    pub unsettled: Vec<String>,
    /// Message body.
    pub body: Bytes,
    /// When it was appended, milliseconds since the Unix epoch (for TTLs).
    pub appended_unix_ms: u64,
}

/// Damage found while recovering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Segment file.
    pub segment: PathBuf,
    /// Byte offset of the damaged frame.
    pub offset: u64,
    /// What was wrong ("torn tail ...", "crc mismatch", ...).
    pub reason: String,
}

/// What [`Outbox::open`] found on disk.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// This outbox's producer id (stable across restarts).
    pub producer_id: u64,
    /// Messages still pending, by increasing sequence number.
    pub pending: Vec<PendingRecord>,
    /// Damaged or torn records found (and skipped or truncated).
    pub damage: Vec<Damage>,
}

/// What [`Outbox::open`] found on disk, without the message bodies: kept for the life
/// of the outbox so that it can be reported after start-up (see
/// [`Outbox::recovery_report`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Messages found pending (and resumed) when the outbox was opened.
    pub pending_messages: u64,
    /// Damaged or torn records found, as in [`Recovery::damage`]: a torn tail of the
    /// last segment was truncated at its `offset`, other damaged records were skipped.
    /// Empty after a clean shutdown or crash-free recovery.
    pub damage: Vec<Damage>,
}

/// Pending state of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStats {
    /// Group name.
    pub group: String,
    /// Messages pending for the group.
    pub pending: u64,
    /// Age of the oldest message pending for the group.
    pub oldest_pending_age: Option<Duration>,
}

/// A snapshot of the outbox's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxStats {
    /// Messages pending for at least one group (`Memory` ones included).
    pub pending_messages: u64,
    /// Body bytes of pending messages.
    pub pending_bytes: u64,
    /// Per-group pending counts, sorted by group name.
    pub groups: Vec<GroupStats>,
    /// Segment files on disk.
    pub segments: usize,
    /// Bytes of segment files on disk.
    pub disk_bytes: u64,
    /// Messages counted against the quota (pending plus in-flight appends).
    pub quota_used_messages: u64,
    /// Bytes counted against the quota.
    pub quota_used_bytes: u64,
    /// Message quota.
    pub quota_max_messages: u64,
    /// Byte quota.
    pub quota_max_bytes: u64,
    /// `Memory` messages counted against their limit (part of `quota_used_messages`).
    pub memory_used_messages: u64,
    /// Their body bytes (part of `quota_used_bytes`).
    pub memory_used_bytes: u64,
    /// Group commits that ended in an `fdatasync` since open.
    pub commits: u64,
    /// Messages appended since open.
    pub appended: u64,
    /// Bytes of bodies in the read cache.
    pub cache_bytes: usize,
}

/// Errors of the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The quota is full and the caller asked not to wait.
    #[error(
        "outbox full: {used_messages}/{max_messages} messages, {used_bytes}/{max_bytes} bytes \
         pending (need {needed_bytes} more bytes); wait for receivers to ack, raise the quota, \
         or append with WhenFull::Wait"
    )]
    Full {
        /// Messages counted against the quota.
        used_messages: u64,
        /// Bytes counted against the quota.
        used_bytes: u64,
        /// Message quota.
        max_messages: u64,
        /// Byte quota.
        max_bytes: u64,
        /// Size of the rejected body.
        needed_bytes: u64,
    },
    /// The part of the quota `Memory` messages may take is full and the caller asked
    /// not to wait.
    #[error(
        "outbox full of Memory messages: {used_messages}/{max_messages} messages, \
         {used_bytes}/{max_bytes} bytes held in memory (need {needed_bytes} more bytes); wait \
         for receivers to ack, raise max_memory_messages/max_memory_bytes, publish with \
         Disk durability, or append with WhenFull::Wait"
    )]
    MemoryFull {
        /// `Memory` messages held.
        used_messages: u64,
        /// Body bytes of `Memory` messages held.
        used_bytes: u64,
        /// Limit on `Memory` messages.
        max_messages: u64,
        /// Limit on their body bytes.
        max_bytes: u64,
        /// Size of the rejected bodies.
        needed_bytes: u64,
    },
    /// An append larger than a limit could ever hold, even with nothing else pending:
    /// waiting would not help.
    #[error(
        "{messages} message(s) of {bytes} bytes can never fit {}: it holds at most \
         {max_messages} messages and {max_bytes} bytes; raise it or append fewer at once{}",
        if *.memory { "the limit on Memory messages (max_memory_messages/max_memory_bytes)" }
        else { "the outbox quota (max_messages/max_bytes)" },
        if *.memory { ", or publish with Disk durability" } else { "" }
    )]
    NeverFits {
        /// Messages of the append.
        messages: u64,
        /// Body bytes of the append.
        bytes: u64,
        /// The limit's messages.
        max_messages: u64,
        /// The limit's bytes.
        max_bytes: u64,
        /// The limit is the one on `Memory` messages (else the outbox quota).
        memory: bool,
    },
    /// A disk operation failed.
    #[error("outbox I/O error on {}: {source}", path.display())]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The outbox was closed (or its writer stopped).
    #[error("outbox is closed")]
    Closed,
    /// A body can never fit.
    #[error("message body of {size} bytes exceeds the limit of {limit} bytes (64 MiB or the outbox byte quota)")]
    TooLarge {
        /// Body size.
        size: u64,
        /// The limit it exceeds.
        limit: u64,
    },
    /// A target group name is unusable.
    #[error("invalid target group: {reason}")]
    InvalidTarget {
        /// Why.
        reason: String,
    },
    /// Another outbox holds the directory.
    #[error("outbox directory {} is in use by another outbox (lock file held)", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A file of the outbox is unreadable in a way that cannot be skipped.
    #[error("outbox file {} is corrupt: {reason}; fix or remove it by hand", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An earlier write or fdatasync failed; the outbox refuses further appends.
    #[error("outbox writer failed earlier ({reason}); close and reopen the outbox")]
    WriterFailed {
        /// The earlier error.
        reason: String,
    },
}

impl OutboxError {
    fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        OutboxError::Io {
            path: path.into(),
            source,
        }
    }
}

/// What [`Outbox::try_append_memory_many`] did.
#[derive(Debug)]
pub enum MemoryAppend<'a> {
    /// Appended (their sequence numbers), or `None`: use the writer, as
    /// [`Outbox::append_memory_many`] says.
    Done(Option<std::ops::Range<u64>>),
    /// The quota or the memory limit is full: nothing was appended. Resolves when
    /// settlements free room; then try again.
    Full(RoomFreed<'a>),
}

/// Resolves when settlements have freed room in the outbox (see [`MemoryAppend::Full`]).
#[derive(Debug)]
pub struct RoomFreed<'a>(Pin<Box<tokio::sync::futures::Notified<'a>>>);

impl Future for RoomFreed<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

/// One round of [`Outbox::when_room`].
enum Room<'a, T> {
    Done(T),
    Full(RoomFreed<'a>),
}

/// State shared by callers and the writer thread.
struct Shared {
    cfg: OutboxConfig,
    core: Mutex<Core>,
    /// Woken whenever quota is released (or the outbox closes).
    space: Notify,
    /// Woken when the last pending message is settled.
    drained: Notify,
    closed: AtomicBool,
    commits: AtomicU64,
    appended: AtomicU64,
    /// Held for the life of the outbox: an advisory lock on `dir/LOCK`.
    _lock: File,
}

struct Core {
    state: OutboxState,
    cache: BodyCache,
    /// Settles to write: `(seq, group, segment of the message)`.
    /// Settles to write: (seq, group, segment of the message).
    settles: Vec<(u64, Arc<str>, u64)>,
    /// Segment files to delete, in order.
    deletions: Vec<u64>,
    /// A wake-up is queued for the writer.
    wake_queued: bool,
    /// A `Memory` append asked the writer to renew the lease ahead of need; cleared
    /// when a renewal is durable (or the request could not be queued).
    renewal_queued: bool,
    /// Size of each segment file.
    seg_sizes: std::collections::BTreeMap<u64, u64>,
    /// Next sequence number to hand out.
    next_seq: u64,
    /// Sequence numbers below this are covered by a durable lease record, so
    /// `append_memory` may hand them out without waiting for the writer.
    lease_durable: u64,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock cannot leave the state worse than the panic
        // itself; keep serving.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Inner {
    shared: Arc<Shared>,
    tx: Option<mpsc::Sender<Req>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel stops the writer (without flushing buffered settles, as a
        // crash would); wait for it so the directory is free when this returns.
        self.tx.take();
        if let Some(h) = self.writer.take() {
            // An `AppendDone` may hold the last handle to what owns this outbox: the
            // writer, dropping it, ends once the channel is drained, unjoined.
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

/// Records of one `Memory` append: inline for one, so that a single publish allocates
/// no list.
pub type MemoryRecords = smallvec::SmallVec<[MemoryRecord; 1]>;

/// A `Memory` message's record as the outbox is given it: `head`, then a `tail` when
/// a large payload is kept as the application's own buffer behind a head written
/// without it, which saves copying every such payload. The outbox treats the two
/// pieces as one opaque record.
#[derive(Debug, Clone)]
pub struct MemoryRecord {
    /// The record, or its first part.
    pub head: Bytes,
    /// The rest of a record in two pieces.
    pub tail: Option<Bytes>,
}

impl MemoryRecord {
    /// The record, borrowed.
    pub fn as_ref(&self) -> MemoryRecordRef<'_> {
        MemoryRecordRef {
            head: &self.head,
            tail: self.tail.as_ref(),
        }
    }

    /// The record in one piece: the head itself, or both pieces copied together.
    pub fn into_contiguous(self) -> Bytes {
        match self.tail {
            None => self.head,
            Some(_) => self.as_ref().to_contiguous(),
        }
    }
}

/// A held `Memory` record, borrowed: its head and, for one in two pieces, its tail.
#[derive(Debug, Clone, Copy)]
pub struct MemoryRecordRef<'a> {
    /// The record, or its first part.
    pub head: &'a Bytes,
    /// The rest of a record in two pieces.
    pub tail: Option<&'a Bytes>,
}

impl MemoryRecordRef<'_> {
    /// Record bytes, both pieces.
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.map_or(0, Bytes::len)
    }

    /// Whether the record has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The record in one piece (both pieces copied together if it is in two).
    pub fn to_contiguous(&self) -> Bytes {
        let Some(tail) = self.tail else {
            return self.head.clone();
        };
        let mut whole = Vec::with_capacity(self.len());
        whole.extend_from_slice(self.head);
        whole.extend_from_slice(tail);
        Bytes::from(whole)
    }
}

impl From<Bytes> for MemoryRecord {
    fn from(record: Bytes) -> Self {
        Self {
            head: record,
            tail: None,
        }
    }
}

/// The bodies [`Outbox::with_resident_bodies`] hands out, in the order of its `seqs`.
#[derive(Debug)]
pub struct ResidentBodies<'a> {
    state: &'a OutboxState,
    cache: &'a BodyCache,
    seqs: std::slice::Iter<'a, u64>,
}

impl<'a> ResidentBodies<'a> {
    fn get(&self, seq: u64) -> Option<MemoryRecordRef<'a>> {
        self.state.memory_body(seq).or_else(|| {
            let head = self.cache.get_ref(seq)?;
            Some(MemoryRecordRef { head, tail: None })
        })
    }
}

impl<'a> Iterator for ResidentBodies<'a> {
    type Item = Option<MemoryRecordRef<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let &seq = self.seqs.next()?;
        Some(self.get(seq))
    }
}

/// The outbox. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
    producer_id: u64,
    recovered: Arc<RecoveryReport>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("dir", &self.inner.shared.cfg.dir)
            .field("producer_id", &self.producer_id)
            .finish()
    }
}

/// The error for a reservation that did not fit (`needed_bytes` asked for).
fn full_error(full: state::QuotaFull, needed_bytes: u64) -> OutboxError {
    let state::QuotaFull {
        used_messages,
        used_bytes,
        max_messages,
        max_bytes,
        memory,
    } = full;
    if memory {
        OutboxError::MemoryFull {
            used_messages,
            used_bytes,
            max_messages,
            max_bytes,
            needed_bytes,
        }
    } else {
        OutboxError::Full {
            used_messages,
            used_bytes,
            max_messages,
            max_bytes,
            needed_bytes,
        }
    }
}

/// Checks a body against the record limit and the byte quota.
fn check_body(cfg: &OutboxConfig, len: usize) -> Result<u64, OutboxError> {
    let size = len as u64;
    let limit = (record::MAX_BODY as u64).min(cfg.max_bytes);
    if size > limit {
        return Err(OutboxError::TooLarge { size, limit });
    }
    Ok(size)
}

/// [`validate_targets`] for targets the writer will own: kept (not copied) when already
/// sorted and distinct, as a route's are.
fn owned_targets(targets: Arc<[String]>) -> Result<Arc<[String]>, OutboxError> {
    Ok(match validate_targets(&targets)? {
        std::borrow::Cow::Borrowed(_) => targets,
        std::borrow::Cow::Owned(sorted) => sorted.into(),
    })
}

/// Sorted, deduplicated and checked targets; borrows them when they already are.
fn validate_targets(targets: &[String]) -> Result<std::borrow::Cow<'_, [String]>, OutboxError> {
    let targets = if targets.windows(2).all(|w| w[0] < w[1]) {
        std::borrow::Cow::Borrowed(targets)
    } else {
        let mut owned = targets.to_vec();
        owned.sort_unstable();
        owned.dedup();
        std::borrow::Cow::Owned(owned)
    };
    if targets.len() > record::MAX_TARGETS {
        return Err(OutboxError::InvalidTarget {
            reason: format!(
                "{} target groups, at most {} allowed",
                targets.len(),
                record::MAX_TARGETS
            ),
        });
    }
    for t in targets.iter() {
        if t.is_empty() || t.len() > record::MAX_GROUP_LEN {
            return Err(OutboxError::InvalidTarget {
                reason: format!(
                    "group name of {} bytes, must be 1..={}",
                    t.len(),
                    record::MAX_GROUP_LEN
                ),
            });
        }
    }
    Ok(targets)
}

impl Outbox {
    /// Opens (or creates) the outbox in `cfg.dir`, recovers what is on disk and starts
    /// the writer.
    pub async fn open(cfg: OutboxConfig) -> Result<(Outbox, Recovery), OutboxError> {
        let cfg2 = cfg.clone();
        let rec = if cfg.blocking_append {
            // Simulation only (see `OutboxConfig::blocking_append`).
            recovery::recover(&cfg2)?
        } else {
            tokio::task::spawn_blocking(move || recovery::recover(&cfg2))
                .await
                .map_err(|e| OutboxError::Corrupt {
                    path: cfg.dir.clone(),
                    reason: format!("recovery task failed: {e}"),
                })??
        };
        let (tx, rx) = mpsc::channel(cfg.max_batch.max(1) * 2);
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                state: rec.state,
                cache: BodyCache::new(cfg.cache_bytes),
                settles: Vec::new(),
                deletions: Vec::new(),
                wake_queued: false,
                renewal_queued: false,
                seg_sizes: rec.seg_sizes,
                next_seq: rec.next_seq,
                lease_durable: rec.lease_upto,
            }),
            cfg,
            space: Notify::new(),
            drained: Notify::new(),
            closed: AtomicBool::new(false),
            commits: AtomicU64::new(0),
            appended: AtomicU64::new(0),
            _lock: rec.lock,
        });
        let w = writer::Writer::new(
            shared.clone(),
            rx,
            rec.file,
            rec.active,
            rec.active_size,
            rec.lease_upto,
        );
        let handle = std::thread::Builder::new()
            .name("weft-outbox-writer".into())
            .spawn(move || w.run())
            .map_err(|e| OutboxError::io(shared.cfg.dir.clone(), e))?;
        let producer_id = rec.producer_id;
        let inner = Arc::new(Inner {
            shared,
            tx: Some(tx),
            writer: Some(handle),
        });
        Ok((
            Outbox {
                inner,
                producer_id,
                recovered: Arc::new(RecoveryReport {
                    pending_messages: rec.pending.len() as u64,
                    damage: rec.damage.clone(),
                }),
            },
            Recovery {
                producer_id,
                pending: rec.pending,
                damage: rec.damage,
            },
        ))
    }

    /// This outbox's producer id (random at first open, then persisted).
    pub fn producer_id(&self) -> u64 {
        self.producer_id
    }

    /// What recovery found when this outbox was opened: pending messages and damage
    /// (torn tail truncated, corrupt records skipped). Does not change afterwards.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovered
    }

    /// Assigns the next sequence number (never repeats, also across restarts and across
    /// `Memory` appends), stores the record and returns once it has the requested
    /// durability (`Disk`: after the `fdatasync` of the group commit that holds it;
    /// `Memory`: at once, kept in memory only). `targets` may be empty: the message is
    /// then settled at once and nothing is written. Duplicate targets are merged.
    pub async fn append(
        &self,
        targets: impl Into<Arc<[String]>>,
        body: Bytes,
        durability: Durability,
        when_full: WhenFull,
    ) -> Result<u64, OutboxError> {
        let seqs = self
            .submit(targets, body, durability, when_full)
            .await?
            .wait()
            .await?;
        Ok(seqs.start)
    }

    /// The first half of [`append`](Self::append): checks, reserves quota (waiting or
    /// failing as `when_full` says) and hands the record to the writer. Once this
    /// returns the append happens whether or not the [`AppendTicket`] is awaited;
    /// cancelling this future before it returns stores nothing.
    pub async fn submit(
        &self,
        targets: impl Into<Arc<[String]>>,
        body: Bytes,
        durability: Durability,
        when_full: WhenFull,
    ) -> Result<AppendTicket, OutboxError> {
        self.submit_batch(
            &self.target_groups(targets)?,
            vec![body],
            durability,
            when_full,
        )
        .await
    }

    /// [`submit`](Self::submit) for several messages to the same targets: they get
    /// consecutive sequence numbers, are stored in one group commit and answered
    /// together. The quota is reserved for all of them at once (waiting or failing as
    /// `when_full` says); a batch larger than the whole quota fails with
    /// [`OutboxError::Full`] at once. `targets` come from
    /// [`target_groups`](Self::target_groups).
    pub async fn submit_batch(
        &self,
        targets: &TargetGroups,
        bodies: Vec<Bytes>,
        durability: Durability,
        when_full: WhenFull,
    ) -> Result<AppendTicket, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.hand_over(targets, bodies, durability, when_full, Reply::Ticket(reply))
            .await?;
        Ok(AppendTicket {
            rx,
            blocking: self.inner.shared.cfg.blocking_append,
        })
    }

    /// [`submit_batch`](Self::submit_batch) with a continuation instead of a ticket:
    /// the writer gives `then` the append's sequence numbers (or its error) once the
    /// append holds its durability. `then` is dropped, not called, when this returns an
    /// error (nothing was stored) or its future is dropped before it returns.
    pub async fn submit_batch_then(
        &self,
        targets: &TargetGroups,
        bodies: Vec<Bytes>,
        durability: Durability,
        when_full: WhenFull,
        then: Box<dyn AppendDone>,
    ) -> Result<(), OutboxError> {
        self.hand_over(targets, bodies, durability, when_full, Reply::Then(then))
            .await
    }

    async fn hand_over(
        &self,
        targets: &TargetGroups,
        bodies: Vec<Bytes>,
        durability: Durability,
        when_full: WhenFull,
        reply: Reply,
    ) -> Result<(), OutboxError> {
        let shared = &self.inner.shared;
        let mut size = 0u64;
        for body in &bodies {
            size += check_body(&shared.cfg, body.len())?;
        }
        let tx = self.inner.tx.as_ref().ok_or(OutboxError::Closed)?;
        let mut quota = None;
        let messages = bodies.len() as u64;
        if !targets.names.is_empty() && messages > 0 {
            self.reserve(messages, size, durability, when_full).await?;
            // Gives the quota back if this future is dropped before the hand-off.
            quota = Some(QuotaGuard {
                shared,
                messages,
                bytes: size,
                durability,
            });
        }
        // A free slot is taken without an await: `reserve` would spend a unit of the
        // task's cooperative budget on every append, and a task driving many appends
        // at once (`FuturesUnordered`, `join_all`) would be made to yield every few
        // dozen of them, halving the disk publish rate.
        let permit = match tx.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Closed(())) => return Err(OutboxError::Closed),
            Err(mpsc::error::TrySendError::Full(())) => {
                tx.reserve().await.map_err(|_| OutboxError::Closed)?
            }
        };
        permit.send(Req::Append(writer::Append {
            targets: targets.clone(),
            bodies: bodies.into(),
            durability,
            reply,
        }));
        // The writer owns the reservation now.
        std::mem::forget(quota);
        Ok(())
    }

    /// `targets` checked (as every append checks them), deduplicated and registered,
    /// for [`append_memory_many`](Self::append_memory_many) and
    /// [`try_submit`](Self::try_submit): a caller that appends to the same groups many
    /// times (a topic's route) does this once, not per append.
    pub fn target_groups(
        &self,
        targets: impl Into<Arc<[String]>>,
    ) -> Result<TargetGroups, OutboxError> {
        let names = owned_targets(targets.into())?;
        let ids = self.inner.shared.core().state.group_set(&names);
        Ok(TargetGroups { names, ids })
    }

    /// [`submit`](Self::submit) when it need not wait: `Ok(Err(body))` (nothing
    /// stored, the body given back) when the quota or the writer's channel is full, and
    /// the caller must use `submit`, which waits or fails as its `WhenFull` says.
    /// Synchronous, so a caller's future holds no state of `submit`, and allocates
    /// nothing but the ticket. (A peer's single `Disk` publishes are gathered instead:
    /// see [`try_gather`](Self::try_gather).)
    pub fn try_submit(
        &self,
        targets: &TargetGroups,
        body: Bytes,
        durability: Durability,
    ) -> Result<Result<AppendTicket, Bytes>, OutboxError> {
        let shared = &self.inner.shared;
        let size = check_body(&shared.cfg, body.len())?;
        let tx = self.inner.tx.as_ref().ok_or(OutboxError::Closed)?;
        if shared.closed.load(Ordering::Acquire) {
            return Err(OutboxError::Closed);
        }
        let permit = match tx.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Closed(())) => return Err(OutboxError::Closed),
            Err(mpsc::error::TrySendError::Full(())) => return Ok(Err(body)),
        };
        if !targets.names.is_empty() && shared.core().state.reserve_as(durability, 1, size).is_err()
        {
            return Ok(Err(body));
        }
        let (reply, rx) = oneshot::channel();
        permit.send(Req::Append(writer::Append {
            targets: targets.clone(),
            bodies: smallvec::smallvec![body],
            durability,
            reply: Reply::Ticket(reply),
        }));
        Ok(Ok(AppendTicket {
            rx,
            blocking: shared.cfg.blocking_append,
        }))
    }

    /// Reserves quota for `messages` `Disk` messages of `bytes` body bytes in all to
    /// `targets`, for a [`GatheredAppend`] (which may reserve ahead for messages still
    /// to come, and give back what they did not take when sealed): `Ok(false)` when the
    /// quota has no room for them (a single message must then wait, or fail, as
    /// [`submit`](Self::submit) says). Give a reservation no append took back with
    /// [`unreserve_disk`](Self::unreserve_disk). Bodies are not checked here:
    /// [`submit`](Self::submit) does that for those that do not fit.
    pub fn try_reserve_disk(
        &self,
        targets: &TargetGroups,
        messages: u64,
        bytes: u64,
    ) -> Result<bool, OutboxError> {
        let shared = &self.inner.shared;
        if self.inner.tx.is_none() || shared.closed.load(Ordering::Acquire) {
            return Err(OutboxError::Closed);
        }
        Ok(targets.names.is_empty()
            || shared
                .core()
                .state
                .reserve_as(Durability::Disk, messages, bytes)
                .is_ok())
    }

    /// Gives back a reservation of [`try_reserve_disk`](Self::try_reserve_disk).
    pub fn unreserve_disk(&self, targets: &TargetGroups, messages: u64, bytes: u64) {
        if !targets.names.is_empty() && (messages, bytes) != (0, 0) {
            let shared = &self.inner.shared;
            shared
                .core()
                .state
                .unreserve_as(Durability::Disk, messages, bytes);
            shared.space.notify_waiters();
        }
    }

    /// Hands `append` to the writer without waiting: `Ok(Err(append))` when its
    /// channel is full. The writer [seals](GatheredAppend::seal) it when it builds its
    /// next commit; until then the caller may add messages to it.
    #[allow(clippy::type_complexity)]
    pub fn try_gather(
        &self,
        targets: &TargetGroups,
        append: Box<dyn GatheredAppend>,
    ) -> Result<Result<(), Box<dyn GatheredAppend>>, OutboxError> {
        let tx = self.inner.tx.as_ref().ok_or(OutboxError::Closed)?;
        match tx.try_reserve() {
            Ok(permit) => {
                permit.send(Req::Gathered(targets.clone(), append));
                Ok(Ok(()))
            }
            Err(mpsc::error::TrySendError::Closed(())) => Err(OutboxError::Closed),
            Err(mpsc::error::TrySendError::Full(())) => Ok(Err(append)),
        }
    }

    /// Appends a `Memory` message without the writer: returns its sequence number, or
    /// `Ok(None)` when the caller must use [`append`](Self::append) instead (the
    /// sequence lease must be renewed on disk first). Waits while the quota or the
    /// memory limit is full, or fails, as `when_full` says.
    pub async fn append_memory(
        &self,
        targets: &[String],
        body: Bytes,
        when_full: WhenFull,
    ) -> Result<Option<u64>, OutboxError> {
        Ok(self
            .append_memory_many(
                &self.target_groups(targets.to_vec())?,
                &mut smallvec::smallvec![body.into()],
                when_full,
                crate::clock::unix_ms(),
            )
            .await?
            .map(|seqs| seqs.start))
    }

    /// Appends `Memory` messages without the writer, all or none: returns their
    /// consecutive sequence numbers, or `Ok(None)` when the caller must use
    /// [`submit_batch`](Self::submit_batch) instead (lease to renew). Waits while the
    /// quota or the memory limit is full, or fails, as `when_full` says; dropping the
    /// future while it waits stores nothing. Appended bodies are moved out of
    /// `bodies` (left empty); otherwise it is left as it was.
    pub async fn append_memory_many(
        &self,
        targets: &TargetGroups,
        bodies: &mut MemoryRecords,
        when_full: WhenFull,
        unix_ms: u64,
    ) -> Result<Option<std::ops::Range<u64>>, OutboxError> {
        loop {
            match self.try_append_memory_many(targets, bodies, when_full, unix_ms)? {
                MemoryAppend::Done(appended) => return Ok(appended),
                MemoryAppend::Full(room) => room.await,
            }
        }
    }

    /// One attempt of [`append_memory_many`](Self::append_memory_many), without
    /// waiting: done as there, or [`MemoryAppend::Full`] where it would wait for room.
    /// A publish whose append does not wait (the usual case) then carries no append
    /// future in its own, which every publish creates and moves.
    pub fn try_append_memory_many(
        &self,
        targets: &TargetGroups,
        bodies: &mut MemoryRecords,
        when_full: WhenFull,
        unix_ms: u64,
    ) -> Result<MemoryAppend<'_>, OutboxError> {
        let shared = &self.inner.shared;
        let mut size = 0u64;
        for body in bodies.iter() {
            size += check_body(&shared.cfg, body.as_ref().len())?;
        }
        let count = bodies.len() as u64;
        if self.inner.tx.is_none() {
            return Err(OutboxError::Closed);
        }
        let mut renew = false;
        let attempt = self.attempt_room(count, size, when_full, |core| {
            let first = core.next_seq;
            if first.saturating_add(count) > core.lease_durable {
                return Ok(None);
            }
            renew = !core.renewal_queued && first + count + LEASE_RENEW_AHEAD > core.lease_durable;
            core.renewal_queued |= renew;
            if !targets.names.is_empty() {
                core.state.reserve_memory_many(count, size)?;
                core.state
                    .memory_messages_added(first, &targets.ids, bodies.drain(..), unix_ms);
            } else {
                bodies.clear();
            }
            core.next_seq += count;
            Ok(Some(first..first + count))
        })?;
        Ok(match attempt {
            Room::Done(appended) => {
                if appended.is_some() {
                    shared.appended.fetch_add(count, Ordering::Relaxed);
                }
                if renew {
                    self.request_renewal();
                }
                MemoryAppend::Done(appended)
            }
            Room::Full(room) => MemoryAppend::Full(room),
        })
    }

    /// Wakes the writer, whose next commit renews the lease (it is within
    /// [`LEASE_RENEW_AHEAD`] of running out). A full channel means appends are queued,
    /// and their commit renews it; the next `Memory` append past the mark asks again.
    fn request_renewal(&self) {
        let queued = self
            .inner
            .tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(Req::Wake).is_ok());
        if !queued {
            self.inner.shared.core().renewal_queued = false;
        }
    }

    async fn reserve(
        &self,
        messages: u64,
        size: u64,
        durability: Durability,
        when_full: WhenFull,
    ) -> Result<(), OutboxError> {
        self.when_room(messages, size, when_full, |core| {
            core.state.reserve_as(durability, messages, size)
        })
        .await
    }

    /// Runs `attempt` under the core lock until it does not find the quota (or the
    /// memory limit) full; while it does, waits for settlements to free room, or fails
    /// as `when_full` says (and at once if `messages` of `size` bytes could never fit).
    async fn when_room<T>(
        &self,
        messages: u64,
        size: u64,
        when_full: WhenFull,
        mut attempt: impl FnMut(&mut Core) -> Result<T, state::QuotaFull>,
    ) -> Result<T, OutboxError> {
        loop {
            match self.attempt_room(messages, size, when_full, &mut attempt)? {
                Room::Done(done) => return Ok(done),
                Room::Full(room) => room.await,
            }
        }
    }

    /// One round of [`when_room`](Self::when_room): `attempt`'s result, or the wait for
    /// room (registered before the lock is released, so that no release is missed).
    fn attempt_room<T>(
        &self,
        messages: u64,
        size: u64,
        when_full: WhenFull,
        attempt: impl FnOnce(&mut Core) -> Result<T, state::QuotaFull>,
    ) -> Result<Room<'_, T>, OutboxError> {
        let shared = &self.inner.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(OutboxError::Closed);
        }
        let mut core = shared.core();
        match attempt(&mut core) {
            Ok(done) => Ok(Room::Done(done)),
            Err(full) => {
                if let Some((memory, max_messages, max_bytes)) =
                    core.state.never_fits(messages, size, full.memory)
                {
                    return Err(OutboxError::NeverFits {
                        messages,
                        bytes: size,
                        max_messages,
                        max_bytes,
                        memory,
                    });
                }
                if when_full == WhenFull::Fail {
                    return Err(full_error(full, size));
                }
                // Boxed: only a full outbox waits, and the future of every append
                // stays small without it.
                let mut notified = Box::pin(shared.space.notified());
                notified.as_mut().enable();
                Ok(Room::Full(RoomFreed(notified)))
            }
        }
    }

    /// Marks the message settled for one group (acked, expired or dead-lettered).
    /// Idempotent and cheap: the settle record is written by the writer's next batch,
    /// without `fdatasync`; after a crash a few settled messages may come back as
    /// pending.
    pub fn settle(&self, seq: u64, group: &str) {
        self.settle_many(&[seq], group);
    }

    /// [`settle`](Self::settle) for many messages of one group, under one lock.
    pub fn settle_many(&self, seqs: &[u64], group: &str) {
        let shared = &self.inner.shared;
        let wake = {
            let mut core = shared.core();
            let mut freed = false;
            let Some(gid) = core.state.group_id(group) else {
                return;
            };
            let group_name: Arc<str> = group.into();
            let Core {
                state,
                settles,
                cache,
                deletions,
                ..
            } = &mut *core;
            state.settle_group_many(seqs, gid, |seq, out| {
                if !out.applied {
                    return;
                }
                freed |= out.fully_settled;
                // Only messages written to disk have a segment, a cached body and a
                // settle record to write.
                if let Some(seg) = out.segment {
                    settles.push((seq, group_name.clone(), seg));
                    if out.fully_settled {
                        cache.remove(seq);
                    }
                }
                for a in out.actions {
                    let state::Action::DeleteSegment(id) = a;
                    deletions.push(id);
                }
            });
            let work = !core.settles.is_empty() || !core.deletions.is_empty();
            let wake = work && !core.wake_queued;
            if wake {
                core.wake_queued = true;
            }
            if freed {
                shared.space.notify_waiters();
                if core.state.pending_messages() == 0 {
                    shared.drained.notify_waiters();
                }
            }
            wake
        };
        if wake {
            if let Some(tx) = &self.inner.tx {
                // If the channel is full the writer is busy and takes the settles with
                // its next batch anyway.
                if tx.try_send(Req::Wake).is_err() {
                    shared.core().wake_queued = false;
                }
            }
        }
    }

    /// Runs `f` under the outbox lock on the bodies of `seqs`, in order, if every one
    /// is in memory: a pending `Memory` message, or a disk message whose body is still
    /// cached; `None` (without running `f`) otherwise, and then
    /// [`read_many`](Self::read_many) gets them. Unlike `read_many` it takes no
    /// reference count per body: the bodies of one publish share one, and taking and
    /// dropping it per message on the sending thread was measurable (and the first
    /// one taken of a single publish's body allocates). `f` runs under the lock: it
    /// must be short and must not call into the outbox.
    pub fn with_resident_bodies<R>(
        &self,
        seqs: &[u64],
        f: impl FnOnce(ResidentBodies<'_>) -> R,
    ) -> Option<R> {
        let core = self.inner.shared.core();
        let bodies = ResidentBodies {
            state: &core.state,
            cache: &core.cache,
            seqs: seqs.iter(),
        };
        if !seqs.iter().all(|&seq| bodies.get(seq).is_some()) {
            return None;
        }
        Some(f(bodies))
    }

    /// The bodies of `seqs`, in order (`None` for settled ones): those in memory under
    /// one lock, the others read from their segments in one blocking task that opens
    /// each segment once.
    pub async fn read_many(&self, seqs: &[u64]) -> Result<Vec<Option<Bytes>>, OutboxError> {
        let shared = &self.inner.shared;
        let mut out = vec![None; seqs.len()];
        let mut on_disk = Vec::new();
        {
            let core = shared.core();
            for (i, &seq) in seqs.iter().enumerate() {
                if let Some(b) = core.state.memory_body(seq) {
                    out[i] = Some(b.to_contiguous());
                } else if let Some(b) = core.cache.get(seq) {
                    out[i] = Some(b);
                } else if let Some(loc) = core.state.location(seq) {
                    on_disk.push((i, seq, loc));
                }
            }
        }
        if on_disk.is_empty() {
            return Ok(out);
        }
        let dir = shared.cfg.dir.clone();
        let reads = tokio::task::spawn_blocking(move || read_segments(&dir, on_disk))
            .await
            .map_err(|e| {
                OutboxError::io(shared.cfg.dir.clone(), std::io::Error::other(e.to_string()))
            })?;
        for (i, seq, loc, read) in reads {
            out[i] = match read {
                Ok(Some((read_seq, body))) if read_seq == seq => Some(body),
                Ok(Some((read_seq, _))) => {
                    return Err(OutboxError::Corrupt {
                        path: segment::path(&shared.cfg.dir, loc.segment),
                        reason: format!(
                            "offset {} holds seq {read_seq}, expected {seq}",
                            loc.offset
                        ),
                    })
                }
                Ok(None) => None,
                Err(_) if !shared.core().state.is_pending(seq) => None,
                Err(e) => {
                    return Err(OutboxError::io(
                        segment::path(&shared.cfg.dir, loc.segment),
                        e,
                    ))
                }
            };
        }
        Ok(out)
    }

    /// The body of a pending message: from memory if cached, else read from its
    /// segment. `None` if settled or unknown.
    pub async fn read(&self, seq: u64) -> Result<Option<Bytes>, OutboxError> {
        Ok(self.read_many(&[seq]).await?.pop().flatten())
    }

    /// Messages pending for at least one group (cheap, unlike [`stats`](Self::stats)).
    pub fn pending_messages(&self) -> u64 {
        self.inner.shared.core().state.pending_messages()
    }

    /// Returns once no message is pending (every one settled by every target group).
    pub async fn drained(&self) {
        let shared = &self.inner.shared;
        loop {
            let notified = shared.drained.notified();
            tokio::pin!(notified);
            // Register before checking so that a settle in between is not missed.
            notified.as_mut().enable();
            if shared.core().state.pending_messages() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> OutboxStats {
        let shared = &self.inner.shared;
        let now = crate::clock::unix_ms();
        let core = shared.core();
        let (qm, qb) = core.state.quota_used();
        let (memory_messages, memory_bytes) = core.state.memory_used();
        let mut groups: Vec<GroupStats> = core
            .state
            .group_stats()
            .into_iter()
            .map(|g| GroupStats {
                group: g.group,
                pending: g.pending,
                oldest_pending_age: g
                    .oldest_unix_ms
                    .map(|t| Duration::from_millis(now.saturating_sub(t))),
            })
            .collect();
        groups.sort_by(|a, b| a.group.cmp(&b.group));
        OutboxStats {
            pending_messages: core.state.pending_messages(),
            pending_bytes: core.state.pending_bytes(),
            groups,
            segments: core.seg_sizes.len(),
            disk_bytes: core.seg_sizes.values().sum(),
            quota_used_messages: qm,
            quota_used_bytes: qb,
            quota_max_messages: shared.cfg.max_messages,
            quota_max_bytes: shared.cfg.max_bytes,
            memory_used_messages: memory_messages,
            memory_used_bytes: memory_bytes,
            commits: shared.commits.load(Ordering::Relaxed),
            appended: shared.appended.load(Ordering::Relaxed),
            cache_bytes: core.cache.bytes(),
        }
    }

    /// Test hook: forget settles not yet written, as a crash would, then drop.
    #[cfg(test)]
    fn crash(self) {
        self.inner.shared.core().settles.clear();
        drop(self);
    }

    /// Writes buffered settle records, `fdatasync`s, and stops the writer. Appends
    /// after (or racing with) `close` fail with [`OutboxError::Closed`].
    pub async fn close(&self) -> Result<(), OutboxError> {
        let shared = &self.inner.shared;
        let Some(tx) = &self.inner.tx else {
            return Ok(());
        };
        let (reply, rx) = oneshot::channel();
        let res = if tx.send(Req::Close(reply)).await.is_err() {
            // Already closed.
            Ok(())
        } else {
            rx.await.unwrap_or(Ok(()))
        };
        shared.closed.store(true, Ordering::Release);
        shared.space.notify_waiters();
        res
    }
}

/// A body read back from a segment: `(seq, body)`, `None` if the segment is gone
/// (settled everywhere meanwhile).
type BodyRead = std::io::Result<Option<(u64, Bytes)>>;

/// Reads the bodies at `on_disk` (`(index, seq, location)`, in send order): each segment
/// is opened once, and runs of one segment are read in large sequential reads
/// ([`segment::read_bodies_at`]).
fn read_segments(
    dir: &std::path::Path,
    on_disk: Vec<(usize, u64, state::Location)>,
) -> Vec<(usize, u64, state::Location, BodyRead)> {
    let mut files: HashMap<u64, Option<File>> = HashMap::new();
    let mut out = Vec::with_capacity(on_disk.len());
    for run in on_disk.chunk_by(|a, b| a.2.segment == b.2.segment) {
        let segment = run[0].2.segment;
        let file = files
            .entry(segment)
            .or_insert_with(|| File::open(segment::path(dir, segment)).ok());
        let reads: Vec<BodyRead> = match file {
            Some(f) => {
                let locs: Vec<(u64, u32)> = run.iter().map(|(_, _, l)| (l.offset, l.len)).collect();
                segment::read_bodies_at(f, segment, &locs)
                    .into_iter()
                    .map(|r| r.map(Some))
                    .collect()
            }
            None => run.iter().map(|_| Ok(None)).collect(),
        };
        out.extend(
            run.iter()
                .zip(reads)
                .map(|(&(i, seq, loc), read)| (i, seq, loc, read)),
        );
    }
    out
}

#[cfg(test)]
mod tests;
