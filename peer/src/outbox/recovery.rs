//! Opening an outbox directory: lock, producer id, segment scan, pending set rebuild.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::record::{self, Record};
use super::segment::{self, Scanned};
use super::state::{Action, Location, OutboxState};
use super::{Damage, OutboxConfig, OutboxError, PendingRecord, LEASE_BLOCK};

pub(super) struct Recovered {
    pub lock: File,
    pub producer_id: u64,
    pub state: OutboxState,
    pub pending: Vec<PendingRecord>,
    pub damage: Vec<Damage>,
    pub file: File,
    pub active: u64,
    pub active_size: u64,
    pub next_seq: u64,
    pub lease_upto: u64,
    pub seg_sizes: BTreeMap<u64, u64>,
}

fn io_err(path: &Path, e: io::Error) -> OutboxError {
    OutboxError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

// `File::try_lock` is stable since Rust 1.89; the workspace declares rust-version 1.80
// but builds with 1.95. Raise rust-version to 1.89 (or replace this lock) to be exact.
#[allow(clippy::incompatible_msrv)]
fn lock_dir(dir: &Path) -> Result<File, OutboxError> {
    let path = dir.join("LOCK");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    // An outbox dropped a moment ago may still be releasing it; wait a little.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(fs::TryLockError::WouldBlock) => return Err(OutboxError::Locked { path }),
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&path, e)),
        }
    }
}

fn producer_id(dir: &Path) -> Result<u64, OutboxError> {
    let path = dir.join("producer");
    match fs::read_to_string(&path) {
        Ok(s) => u64::from_str_radix(s.trim(), 16).map_err(|_| OutboxError::Corrupt {
            path: path.clone(),
            reason: format!(
                "expected 16 hex digits, found {:?}",
                s.chars().take(40).collect::<String>()
            ),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id: u64 = rand::random::<u64>().max(1);
            let tmp = dir.join("producer.tmp");
            let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
            f.write_all(format!("{id:016x}\n").as_bytes())
                .map_err(|e| io_err(&tmp, e))?;
            f.sync_all().map_err(|e| io_err(&tmp, e))?;
            fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
            segment::sync_dir(dir).map_err(|e| io_err(dir, e))?;
            Ok(id)
        }
        Err(e) => Err(io_err(&path, e)),
    }
}

/// Scans `cfg.dir` and prepares a new active segment. Blocking.
pub(super) fn recover(cfg: &OutboxConfig) -> Result<Recovered, OutboxError> {
    let dir = cfg.dir.as_path();
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let lock = lock_dir(dir)?;
    let producer_id = producer_id(dir)?;
    let ids = segment::list(dir).map_err(|e| io_err(dir, e))?;
    // A spare holds nothing pending (it was a settled segment); start without one.
    segment::remove_spare(dir).map_err(|e| io_err(&dir.join(segment::SPARE_NAME), e))?;

    let mut state = OutboxState::new(cfg.max_bytes, cfg.max_messages)
        .with_memory_limit(cfg.max_memory_messages, cfg.max_memory_bytes);
    let mut damage = Vec::new();
    let mut actions: Vec<Action> = Vec::new();
    let mut seg_sizes = BTreeMap::new();
    let mut max_lease = 0u64;
    let mut max_seq: Option<u64> = None;
    let mut lost_lease_risk = false;

    for (i, &id) in ids.iter().enumerate() {
        let last = i + 1 == ids.len();
        let path = segment::path(dir, id);
        let data = Bytes::from(fs::read(&path).map_err(|e| io_err(&path, e))?);
        let mut size = data.len() as u64;
        // While scanned, the segment is "active" so it cannot be deleted half-read.
        actions.extend(state.segment_opened(id, true));
        for s in segment::scan(&data, id) {
            match s {
                Scanned::Record {
                    offset,
                    len,
                    record,
                } => match record {
                    Record::Message {
                        seq,
                        unix_ms,
                        mut targets,
                        body,
                    } => {
                        max_seq = Some(max_seq.map_or(seq, |m| m.max(seq)));
                        targets.sort_unstable();
                        targets.dedup();
                        if !targets.is_empty() {
                            let loc = Location {
                                segment: id,
                                offset,
                                len,
                            };
                            state.message_added(
                                seq,
                                &targets,
                                Some(loc),
                                body.len() as u64,
                                unix_ms,
                                false,
                            );
                        }
                    }
                    Record::Settle(entries) => {
                        for (seq, g) in entries {
                            let out = state.settle(seq, &g);
                            if let Some(z) = out.segment.filter(|_| out.applied) {
                                state.settle_written(id, z);
                            }
                            actions.extend(out.actions);
                        }
                    }
                    Record::SeqLease { upto } => max_lease = max_lease.max(upto),
                    // `scan` reports it as `Scanned::End`.
                    Record::End => {}
                },
                // What follows is left from a recycled file's earlier use; no segment
                // found here is written again, so it stays until the file goes.
                Scanned::End { offset } => size = offset,
                Scanned::Skipped { offset, reason } => {
                    tracing::warn!(path = %path.display(), offset, %reason, "outbox: skipping damaged record");
                    lost_lease_risk = true;
                    damage.push(Damage {
                        segment: path.clone(),
                        offset,
                        reason,
                    });
                }
                Scanned::Tail { offset, reason } => {
                    if last {
                        tracing::warn!(path = %path.display(), offset, %reason, "outbox: truncating torn tail");
                        truncate(&path, offset)?;
                        size = offset;
                    } else {
                        // Not where a crash leaves a torn write: keep the file as it
                        // is for inspection.
                        tracing::warn!(path = %path.display(), offset, %reason, "outbox: unreadable data in sealed segment");
                        lost_lease_risk = true;
                    }
                    damage.push(Damage {
                        segment: path.clone(),
                        offset,
                        reason,
                    });
                }
            }
        }
        seg_sizes.insert(id, size);
    }

    // A damaged record could have been a lease whose numbers were handed out: skip a
    // whole block to stay clear of it. (A torn tail was never fsynced, so no number
    // of it was handed out.)
    let mut next_seq = max_lease.max(max_seq.map_or(1, |s| s + 1)).max(1);
    if lost_lease_risk {
        next_seq += LEASE_BLOCK;
    }

    // Bodies of pending messages.
    let mut seqs: Vec<u64> = state.pending_seqs().collect();
    seqs.sort_unstable();
    let mut pending = Vec::with_capacity(seqs.len());
    for seq in seqs {
        let Some(loc) = state.location(seq) else {
            continue;
        };
        let path = segment::path(dir, loc.segment);
        match segment::read_message(dir, loc.segment, loc.offset, loc.len) {
            Ok(Some(m)) => pending.push(PendingRecord {
                seq,
                unsettled: state.unsettled(seq),
                body: m.body,
                appended_unix_ms: m.unix_ms,
            }),
            Ok(None) => {
                return Err(io_err(
                    &path,
                    io::Error::new(io::ErrorKind::NotFound, "segment vanished during recovery"),
                ))
            }
            Err(e) => return Err(io_err(&path, e)),
        }
    }

    // New active segment, starting with a durable lease; only then delete old ones
    // (they may hold the previous lease).
    let active = ids.last().map_or(1, |l| l + 1);
    let lease_upto = next_seq + LEASE_BLOCK;
    let path = segment::path(dir, active);
    let mut file = segment::create(dir, active).map_err(|e| io_err(&path, e))?;
    let mut buf = Vec::new();
    record::encode_lease(&mut buf, active, lease_upto);
    file.write_all(&buf).map_err(|e| io_err(&path, e))?;
    file.sync_data().map_err(|e| io_err(&path, e))?;
    seg_sizes.insert(active, buf.len() as u64);
    actions.extend(state.segment_opened(active, true));

    let mut deleted = false;
    for Action::DeleteSegment(id) in actions {
        let p = segment::path(dir, id);
        match fs::remove_file(&p) {
            Ok(()) => deleted = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&p, e)),
        }
        seg_sizes.remove(&id);
    }
    if deleted {
        segment::sync_dir(dir).map_err(|e| io_err(dir, e))?;
    }

    Ok(Recovered {
        lock,
        producer_id,
        state,
        pending,
        damage,
        file,
        active,
        active_size: buf.len() as u64,
        next_seq,
        lease_upto,
        seg_sizes,
    })
}

/// Cuts the segment at `path` to `len` bytes, durably.
fn truncate(path: &Path, len: u64) -> Result<(), OutboxError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    f.set_len(len).map_err(|e| io_err(path, e))?;
    f.sync_all().map_err(|e| io_err(path, e))
}
