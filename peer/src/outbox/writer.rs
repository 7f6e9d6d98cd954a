//! The group-commit writer: one thread owns the active segment file.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::state::{Action, Location};
use super::{
    record, segment, Durability, OutboxError, Shared, TargetGroups, LEASE_BLOCK, LEASE_RENEW_AHEAD,
};

/// Settle entries per Settle record.
const SETTLES_PER_RECORD: usize = 16_384;

/// A request to the writer.
pub(super) enum Req {
    Append(Append),
    /// Messages gathered by the caller until the writer seals them: an [`Append`] of
    /// `Disk` messages to these targets.
    Gathered(TargetGroups, Box<dyn super::GatheredAppend>),
    /// Settles or deletions are waiting.
    Wake,
    /// Flush, fsync and stop.
    Close(oneshot::Sender<Result<(), OutboxError>>),
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Req>,
    file: File,
    active: u64,
    size: u64,
    /// Highest lease written (durable once the batch holding it is synced).
    lease_upto: u64,
    buf: Vec<u8>,
    failed: Option<String>,
    /// Segments from this id on were written by this writer, sealed (see
    /// [`record::Seal`]): only those are recycled.
    first_own: u64,
    /// A settled segment is kept as the spare, for the next roll to overwrite.
    has_spare: bool,
}

/// Messages for the same targets, stored under consecutive sequence numbers and
/// answered together (one message for `publish`, several for a batch).
pub(super) struct Append {
    pub(super) targets: TargetGroups,
    /// Inline for one message: a single publish allocates no list.
    pub(super) bodies: smallvec::SmallVec<[Bytes; 1]>,
    pub(super) durability: Durability,
    pub(super) reply: Reply,
}

impl Req {
    /// Body bytes this request adds to a group commit.
    fn body_bytes(&self) -> usize {
        match self {
            Req::Append(append) => append.bodies.iter().map(Bytes::len).sum(),
            // Unknown until sealed; bounded by the caller.
            Req::Gathered(..) | Req::Wake | Req::Close(_) => 0,
        }
    }
}

impl Append {
    /// The append of a [`Req::Gathered`], sealed now; the quota reserved for messages
    /// that did not join is given back.
    fn sealed(
        shared: &Shared,
        targets: TargetGroups,
        mut gathered: Box<dyn super::GatheredAppend>,
    ) -> Append {
        let sealed = gathered.seal();
        if !targets.names.is_empty() && sealed.unused != (0, 0) {
            let (messages, bytes) = sealed.unused;
            shared
                .core()
                .state
                .unreserve_as(Durability::Disk, messages, bytes);
            shared.space.notify_waiters();
        }
        Append {
            targets,
            bodies: sealed.bodies.into(),
            durability: Durability::Disk,
            reply: Reply::Then(gathered),
        }
    }

    /// Gives back the quota reserved for it (it will not be stored).
    fn unreserve(&self, state: &mut super::state::OutboxState) {
        if !self.targets.names.is_empty() {
            let bytes = self.bodies.iter().map(|b| b.len() as u64).sum();
            state.unreserve_as(self.durability, self.bodies.len() as u64, bytes);
        }
    }
}

/// How the writer answers an append: with the sequence numbers of the stored
/// messages, or the error that kept them from being stored.
pub(super) enum Reply {
    /// An [`AppendTicket`](super::AppendTicket) waits on the other end.
    Ticket(oneshot::Sender<Result<Range<u64>, OutboxError>>),
    /// The caller's continuation, run on the writer thread (see
    /// [`AppendDone`](super::AppendDone)).
    Then(Box<dyn super::AppendDone>),
}

impl Reply {
    fn send(self, result: Result<Range<u64>, OutboxError>) {
        match self {
            // The ticket may have been dropped: nobody is waiting.
            Reply::Ticket(tx) => drop(tx.send(result)),
            Reply::Then(done) => done.done(result),
        }
    }
}

impl Writer {
    pub(super) fn new(
        shared: Arc<Shared>,
        rx: mpsc::Receiver<Req>,
        file: File,
        active: u64,
        size: u64,
        lease_upto: u64,
    ) -> Self {
        Writer {
            shared,
            rx,
            file,
            active,
            size,
            lease_upto,
            buf: Vec::new(),
            failed: None,
            first_own: active,
            has_spare: false,
        }
    }

    pub(super) fn run(mut self) {
        let max_batch = self.shared.cfg.max_batch.max(1);
        let max_bytes = self.shared.cfg.max_batch_bytes;
        let mut batch = Vec::with_capacity(max_batch);
        while let Some(first) = self.rx.blocking_recv() {
            let mut bytes = first.body_bytes();
            batch.push(first);
            while batch.len() < max_batch && bytes < max_bytes {
                match self.rx.try_recv() {
                    Ok(r) => {
                        bytes += r.body_bytes();
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            let mut close = None;
            let mut appends = Vec::with_capacity(batch.len());
            for r in batch.drain(..) {
                match r {
                    Req::Append(append) => appends.push(append),
                    Req::Gathered(targets, gathered) => {
                        appends.push(Append::sealed(&self.shared, targets, gathered))
                    }
                    Req::Wake => {}
                    Req::Close(reply) => close = Some(reply),
                }
            }
            let res = self.commit(appends, close.is_some());
            if let Some(reply) = close {
                self.rx.close();
                // Answer requests that raced with close.
                while let Ok(r) = self.rx.try_recv() {
                    let append = match r {
                        Req::Append(append) => append,
                        Req::Gathered(targets, gathered) => {
                            Append::sealed(&self.shared, targets, gathered)
                        }
                        Req::Wake | Req::Close(_) => continue,
                    };
                    append.unreserve(&mut self.shared.core().state);
                    append.reply.send(Err(OutboxError::Closed));
                }
                let _ = reply.send(res);
                return;
            }
        }
    }

    fn io_err(&self, e: std::io::Error) -> OutboxError {
        OutboxError::Io {
            path: segment::path(&self.shared.cfg.dir, self.active),
            source: e,
        }
    }

    /// Starts a new segment: the spare, overwritten from its start, if there is one;
    /// else a new file. The caller writes the lease record first in it.
    fn roll(&mut self) -> Result<Vec<Action>, OutboxError> {
        let id = self.active + 1;
        let dir = &self.shared.cfg.dir;
        let spare = if std::mem::take(&mut self.has_spare) {
            segment::install_spare(dir, id)
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "cannot reuse the spare outbox segment; creating a new one");
                    let _ = segment::remove_spare(dir);
                })
                .ok()
        } else {
            None
        };
        let f = match spare {
            Some(f) => f,
            None => segment::create(dir, id).map_err(|e| OutboxError::Io {
                path: segment::path(dir, id),
                source: e,
            })?,
        };
        self.file = f;
        self.active = id;
        self.size = 0;
        let mut core = self.shared.core();
        core.seg_sizes.insert(id, 0);
        Ok(core.state.segment_opened(id, true))
    }

    /// Writes one batch. Returns the result of the batch's write/sync (for `close`).
    fn commit(&mut self, appends: Vec<Append>, sync: bool) -> Result<(), OutboxError> {
        if let Some(reason) = self.failed.clone() {
            self.reject(appends, &reason);
            return Err(OutboxError::WriterFailed { reason });
        }
        self.buf.clear();
        let mut need_sync = sync;
        let mut deletions: Vec<u64> = Vec::new();
        let mut write_lease = false;
        if self.size >= self.shared.cfg.segment_bytes {
            match self.roll() {
                Ok(actions) => {
                    deletions.extend(actions.into_iter().map(|Action::DeleteSegment(id)| id));
                    write_lease = true;
                    need_sync = true;
                }
                Err(e) => return self.fail(appends, e),
            }
        }
        let n: u64 = appends.iter().map(|a| a.bodies.len() as u64).sum();
        let now = crate::clock::unix_ms();
        // Replies to send after the sync, and (once the core's lock is released: a
        // continuation may call back into the outbox) those that need none.
        let mut deferred: Vec<(Reply, Range<u64>)> = Vec::new();
        let mut stored: Vec<(Reply, Range<u64>)> = Vec::new();
        let mut lease_in_batch = false;
        {
            // Sequence numbers are taken under the core lock, as `append_memory` takes
            // them, so that messages enter the state in sequence order.
            let mut core = self.shared.core();
            // Renewed ahead of need, so that `Memory` appends never find it used up.
            let renew = core.next_seq + n + LEASE_RENEW_AHEAD > self.lease_upto;
            if write_lease || renew {
                if renew {
                    self.lease_upto = core.next_seq + n + LEASE_BLOCK;
                }
                record::encode_lease(&mut self.buf, self.active, self.lease_upto);
                lease_in_batch = true;
                need_sync = true;
            }
            for append in appends {
                let first = core.next_seq;
                core.next_seq += append.bodies.len() as u64;
                let seqs = first..core.next_seq;
                let TargetGroups { names, ids: groups } = &append.targets;
                let to_disk = !names.is_empty() && append.durability == Durability::Disk;
                for (seq, body) in seqs.clone().zip(append.bodies) {
                    if names.is_empty() {
                        continue;
                    }
                    if !to_disk {
                        let body = std::iter::once(body.into());
                        core.state.memory_messages_added(seq, groups, body, now);
                        continue;
                    }
                    let offset = self.size + self.buf.len() as u64;
                    let len =
                        record::encode_message(&mut self.buf, self.active, seq, now, names, &body);
                    let loc = Location {
                        segment: self.active,
                        offset,
                        len,
                    };
                    let bytes = body.len() as u64;
                    core.state
                        .message_added_to(seq, groups, Some(loc), bytes, now, true);
                    core.cache.insert(seq, body);
                }
                need_sync |= to_disk;
                if to_disk || lease_in_batch {
                    deferred.push((append.reply, seqs));
                } else {
                    stored.push((append.reply, seqs));
                }
            }
            core.wake_queued = false;
            let settles = std::mem::take(&mut core.settles);
            for chunk in settles.chunks(SETTLES_PER_RECORD) {
                record::encode_settle(
                    &mut self.buf,
                    self.active,
                    chunk.iter().map(|(s, g, _)| (*s, &**g)),
                );
                // Settles come in runs of one segment: note each run once.
                let mut noted = None;
                for &(_, _, seg) in chunk {
                    if noted != Some(seg) {
                        core.state.settle_written(self.active, seg);
                        noted = Some(seg);
                    }
                }
            }
            deletions.append(&mut core.deletions);
        }
        self.shared.appended.fetch_add(n, Ordering::Relaxed);
        for (reply, seqs) in stored {
            reply.send(Ok(seqs));
        }

        let mut res = Ok(());
        if !self.buf.is_empty() {
            // The End marks where the data stops (the next commit overwrites it); what
            // follows may be left from the file's earlier use.
            let data = self.buf.len() as u64;
            record::encode_end(&mut self.buf, self.active);
            res = self
                .file
                .write_all_at(&self.buf, self.size)
                .map_err(|e| self.io_err(e));
            if res.is_ok() {
                self.size += data;
            }
        }
        if res.is_ok() && need_sync {
            res = self.file.sync_data().map_err(|e| self.io_err(e));
            if res.is_ok() {
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
            }
        }
        {
            let mut core = self.shared.core();
            core.seg_sizes.insert(self.active, self.size);
            if res.is_ok() && lease_in_batch {
                core.lease_durable = self.lease_upto;
                core.renewal_queued = false;
            }
            if let Err(e) = &res {
                self.failed = Some(e.to_string());
                tracing::error!(error = %e, "outbox write failed; further appends will fail");
                for seq in deferred.iter().flat_map(|(_, seqs)| seqs.clone()) {
                    core.cache.remove(seq);
                    let acts = core.state.forget(seq);
                    core.deletions
                        .extend(acts.into_iter().map(|Action::DeleteSegment(id)| id));
                }
            }
        }
        match &res {
            Ok(()) => {
                for (reply, seqs) in deferred {
                    reply.send(Ok(seqs));
                }
            }
            Err(e) => {
                let reason = e.to_string();
                for (reply, ..) in deferred {
                    reply.send(Err(OutboxError::WriterFailed {
                        reason: reason.clone(),
                    }));
                }
                self.shared.space.notify_waiters();
            }
        }
        self.delete_segments(&deletions);
        // A commit may pass `max_batch_bytes` by one append (or be one large append):
        // keep a buffer for the usual commits, not for the largest one seen.
        let keep = self.shared.cfg.max_batch_bytes.saturating_mul(2);
        if self.buf.capacity() > keep {
            self.buf = Vec::new();
        }
        res
    }

    fn fail(&mut self, appends: Vec<Append>, e: OutboxError) -> Result<(), OutboxError> {
        let reason = e.to_string();
        tracing::error!(error = %reason, "outbox writer failed; further appends will fail");
        self.reject(appends, &reason);
        self.failed = Some(reason);
        Err(e)
    }

    /// Answers appends that will not be written, giving their quota back.
    fn reject(&self, appends: Vec<Append>, reason: &str) {
        {
            let mut core = self.shared.core();
            for append in &appends {
                append.unreserve(&mut core.state);
            }
        }
        for append in appends {
            append.reply.send(Err(OutboxError::WriterFailed {
                reason: reason.to_string(),
            }));
        }
        self.shared.space.notify_waiters();
    }

    fn delete_segments(&mut self, ids: &[u64]) {
        if ids.is_empty() {
            return;
        }
        let dir = &self.shared.cfg.dir;
        for id in ids {
            self.shared.core().seg_sizes.remove(id);
            if !self.has_spare && *id >= self.first_own {
                match segment::recycle(dir, *id) {
                    Ok(()) => {
                        self.has_spare = true;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot keep a settled outbox segment as the spare; deleting it")
                    }
                }
            }
            let p = segment::path(dir, *id);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "cannot delete settled outbox segment")
                }
            }
        }
        if let Err(e) = segment::sync_dir(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot fsync outbox directory after deleting segments");
        }
    }
}
