//! Segment files: naming, listing, scanning and random reads. Blocking I/O.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::record::{self, Record, Seal, FRAME_HEADER};

/// File name of segment `id`: 20 zero-padded digits and `.log`.
pub fn file_name(id: u64) -> String {
    format!("{id:020}.log")
}

/// Path of segment `id` in `dir`.
pub fn path(dir: &Path, id: u64) -> PathBuf {
    dir.join(file_name(id))
}

/// Segment ids present in `dir`, ascending. Other files are ignored.
pub fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".log") else {
            continue;
        };
        if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(id) = stem.parse::<u64>() {
                ids.push(id);
            }
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// fsync a directory so that creations, renames and deletions in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates a new, empty segment file (fails if it exists) and fsyncs the directory.
/// Segment files are written at explicit offsets (`write_all_at`), never appended to,
/// so that a recycled one ([`install_spare`]) is overwritten from its start.
pub fn create(dir: &Path, id: u64) -> io::Result<File> {
    let f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(path(dir, id))?;
    sync_dir(dir)?;
    Ok(f)
}

/// File name of the spare: a settled segment kept for reuse by the next roll. Not a
/// segment name, so [`list`] ignores it.
pub const SPARE_NAME: &str = "spare-segment.tmp";

/// Keeps settled segment `id` as the spare instead of deleting it. Overwriting a file's
/// existing blocks changes no metadata, so each group commit's `fdatasync` only
/// flushes data (on this project's test VM: ~180 µs instead of ~300 µs after a 400 KB
/// write, and the write itself ~2 × faster than one that grows the file). The caller
/// fsyncs the directory.
pub fn recycle(dir: &Path, id: u64) -> io::Result<()> {
    fs::rename(path(dir, id), dir.join(SPARE_NAME))
}

/// Makes the spare segment `id` (which must not exist) and opens it for writing: an
/// End record sealed to `id` is written and synced at its start first, so that until
/// the first commit lands the segment reads as empty, then the file is renamed and the
/// directory fsynced. Its old frames stay until overwritten: they are sealed to the
/// segment they were written for, so a scan of segment `id` never takes them for its
/// own.
pub fn install_spare(dir: &Path, id: u64) -> io::Result<File> {
    let to = path(dir, id);
    if to.exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists", to.display()),
        ));
    }
    let spare = dir.join(SPARE_NAME);
    let f = OpenOptions::new().write(true).open(&spare)?;
    let mut end = Vec::new();
    record::encode_end(&mut end, id);
    f.write_all_at(&end, 0)?;
    f.sync_data()?;
    fs::rename(spare, &to)?;
    sync_dir(dir)?;
    Ok(f)
}

/// Removes the spare, if any.
pub fn remove_spare(dir: &Path) -> io::Result<()> {
    match fs::remove_file(dir.join(SPARE_NAME)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// One entry found while scanning a segment.
#[derive(Debug)]
pub enum Scanned {
    /// A record that passed its CRC and decoded.
    Record {
        /// Frame offset.
        offset: u64,
        /// Payload length.
        len: u32,
        /// The record.
        record: Record,
    },
    /// A damaged frame that was skipped; scanning continues after it.
    Skipped {
        /// Frame offset.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// Scanning stopped at an End record: the data ends here (what follows is left
    /// from a recycled file's earlier use). Not damage.
    End {
        /// Offset of the End record.
        offset: u64,
    },
    /// Scanning stopped here: the rest of the file is unreadable.
    Tail {
        /// Offset where readable data ends.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
}

/// Scans the whole image of segment `id`.
///
/// Frames must be sealed to `id` (see [`record::Seal`]); a segment whose first frame is
/// unsealed was written before seals existed and is read as such throughout.
///
/// Rules (the length prefix is the only way to find the next frame):
/// * an End record → the end of the data (stop, no damage);
/// * header incomplete, or frame extends past the end → torn tail (stop);
/// * length 0 or above [`record::MAX_PAYLOAD`] → cannot resync, treated as a torn tail
///   from there (stop);
/// * CRC mismatch on the last frame of the file → torn tail (stop);
/// * CRC mismatch with data after the frame: if the next frame (at the claimed length)
///   has a plausible header the frame is skipped as corrupt; otherwise the length
///   itself is suspect and the rest is treated as a torn tail (stop);
/// * CRC fine but undecodable → skipped.
pub fn scan(data: &Bytes, id: u64) -> Vec<Scanned> {
    let mut seal = None;
    let mut out = Vec::new();
    let mut pos = 0usize;
    let end = data.len();
    while pos < end {
        let off = pos as u64;
        if end - pos < FRAME_HEADER {
            out.push(Scanned::Tail {
                offset: off,
                reason: "torn tail (incomplete frame header)".into(),
            });
            break;
        }
        let mut h = [0u8; FRAME_HEADER];
        h.copy_from_slice(&data[pos..pos + FRAME_HEADER]);
        let (len, crc) = record::parse_header(&h);
        if !record::plausible_len(len) {
            out.push(Scanned::Tail {
                offset: off,
                reason: format!("torn tail (implausible frame length {len})"),
            });
            break;
        }
        let body_start = pos + FRAME_HEADER;
        let next = body_start + len;
        if next > end {
            out.push(Scanned::Tail {
                offset: off,
                reason: format!(
                    "torn tail (frame of {len} bytes, {} present)",
                    end - body_start
                ),
            });
            break;
        }
        let payload = data.slice(body_start..next);
        if !seal_ok(&payload, crc, &mut seal, id) {
            if next == end {
                out.push(Scanned::Tail {
                    offset: off,
                    reason: "torn tail (crc mismatch in last frame)".into(),
                });
                break;
            }
            if next_header_plausible(data, next, seal, id) {
                out.push(Scanned::Skipped {
                    offset: off,
                    reason: "crc mismatch".into(),
                });
                pos = next;
                continue;
            }
            out.push(Scanned::Tail {
                offset: off,
                reason: "crc mismatch and no readable frame after it (length suspect)".into(),
            });
            break;
        }
        match record::decode(&payload) {
            Ok(Record::End) => {
                out.push(Scanned::End { offset: off });
                break;
            }
            Ok(record) => out.push(Scanned::Record {
                offset: off,
                len: len as u32,
                record,
            }),
            Err(e) => out.push(Scanned::Skipped {
                offset: off,
                reason: format!("undecodable record: {e}"),
            }),
        }
        pos = next;
    }
    out
}

/// Checks a frame's CRC under the segment's seal; the first frame that passes decides
/// the seal (sealed to `id`, or legacy) for the rest.
fn seal_ok(payload: &[u8], crc: u32, seal: &mut Option<Seal>, id: u64) -> bool {
    if let Some(s) = *seal {
        return record::crc_ok(payload, crc, s);
    }
    let found = [Seal::Segment(id), Seal::Legacy]
        .into_iter()
        .find(|&s| record::crc_ok(payload, crc, s));
    *seal = found;
    found.is_some()
}

fn next_header_plausible(data: &Bytes, pos: usize, mut seal: Option<Seal>, id: u64) -> bool {
    if data.len() - pos < FRAME_HEADER {
        return false;
    }
    let mut h = [0u8; FRAME_HEADER];
    h.copy_from_slice(&data[pos..pos + FRAME_HEADER]);
    let (len, crc) = record::parse_header(&h);
    if !record::plausible_len(len) {
        return false;
    }
    let start = pos + FRAME_HEADER;
    match data.get(start..start + len) {
        Some(p) => seal_ok(p, crc, &mut seal, id),
        // The following frame is itself torn: accept, the tail rule handles it.
        None => true,
    }
}

/// A Message record read back from a segment.
#[derive(Debug, Clone)]
pub struct MessageRead {
    /// Sequence number.
    pub seq: u64,
    /// Target groups as written.
    pub targets: Vec<String>,
    /// Append time, Unix ms.
    pub unix_ms: u64,
    /// Body.
    pub body: Bytes,
}

/// Reads the Message record at `offset` (payload length `len`) of segment `id` in
/// `dir`. `Ok(None)` if the file is gone.
pub fn read_message(dir: &Path, id: u64, offset: u64, len: u32) -> io::Result<Option<MessageRead>> {
    let f = match File::open(path(dir, id)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    read_message_at(&f, id, offset, len)
}

/// [`read_message`] from the open file of segment `id`.
pub fn read_message_at(
    f: &File,
    id: u64,
    offset: u64,
    len: u32,
) -> io::Result<Option<MessageRead>> {
    let mut buf = vec![0u8; FRAME_HEADER + len as usize];
    f.read_exact_at(&mut buf, offset)?;
    let payload = checked_payload(Bytes::from(buf), id, offset, len)?;
    match record::decode(&payload) {
        Ok(Record::Message {
            seq,
            unix_ms,
            targets,
            body,
        }) => Ok(Some(MessageRead {
            seq,
            targets,
            unix_ms,
            body,
        })),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no message record at offset {offset}"),
        )),
        Err(e) => Err(invalid(e, offset)),
    }
}

/// Longest stretch of a segment [`read_bodies_at`] reads in one call. Bounds the buffer
/// that the bodies read back share (and keep alive until the last one is dropped).
pub const READ_SPAN_LIMIT: u64 = 1024 * 1024;

/// Largest gap (other records) [`read_bodies_at`] reads over to keep one read going.
pub const READ_GAP_LIMIT: u64 = 64 * 1024;

/// Reads the Message records at `locs` (frame offset, payload length) of one segment and
/// returns each one's `(seq, body)`, in order. Records at ascending offsets are read
/// together, one `pread` per stretch of up to [`READ_SPAN_LIMIT`] bytes, instead of one
/// per message: a backlog sent from disk is read back in large sequential reads. When
/// the wanted records fill less than half of a stretch, their bodies are copied out so
/// that the gaps are not kept in memory: what is read back costs at most twice its size.
pub fn read_bodies_at(f: &File, id: u64, locs: &[(u64, u32)]) -> Vec<io::Result<(u64, Bytes)>> {
    let mut out = Vec::with_capacity(locs.len());
    let mut start = 0;
    while start < locs.len() {
        let first = locs[start].0;
        let mut span_end = record_end(locs[start]);
        let mut end = start + 1;
        while end < locs.len()
            && locs[end].0 >= span_end
            && locs[end].0 - span_end <= READ_GAP_LIMIT
            && record_end(locs[end]) - first <= READ_SPAN_LIMIT
        {
            span_end = record_end(locs[end]);
            end += 1;
        }
        let group = &locs[start..end];
        let mut buf = vec![0u8; (span_end - first) as usize];
        match f.read_exact_at(&mut buf, first) {
            Ok(()) => {
                let span = Bytes::from(buf);
                let wanted: u64 = group.iter().map(|&l| record_end(l) - l.0).sum();
                let sparse = wanted * 2 < span.len() as u64;
                out.extend(group.iter().map(|&(offset, len)| {
                    let at = (offset - first) as usize;
                    let frame = span.slice(at..at + FRAME_HEADER + len as usize);
                    let (seq, body) = message_body(frame, id, offset, len)?;
                    Ok((
                        seq,
                        if sparse {
                            Bytes::copy_from_slice(&body)
                        } else {
                            body
                        },
                    ))
                }));
            }
            // One by one, so that each message gets its own error.
            Err(_) => out.extend(group.iter().map(|&(offset, len)| {
                let mut buf = vec![0u8; FRAME_HEADER + len as usize];
                f.read_exact_at(&mut buf, offset)?;
                message_body(Bytes::from(buf), id, offset, len)
            })),
        }
        start = end;
    }
    out
}

/// Where the record at `(offset, len)` ends.
fn record_end((offset, len): (u64, u32)) -> u64 {
    offset + (FRAME_HEADER + len as usize) as u64
}

/// `(seq, body)` of the Message record framed in `frame` (header and payload).
fn message_body(frame: Bytes, id: u64, offset: u64, len: u32) -> io::Result<(u64, Bytes)> {
    let payload = checked_payload(frame, id, offset, len)?;
    record::decode_message(&payload).map_err(|e| invalid(e, offset))
}

/// The payload of `frame` of segment `id` once its length and CRC are checked (sealed
/// or legacy: the location came from a scan that told them apart).
fn checked_payload(frame: Bytes, id: u64, offset: u64, len: u32) -> io::Result<Bytes> {
    let mut h = [0u8; FRAME_HEADER];
    h.copy_from_slice(&frame[..FRAME_HEADER]);
    let (flen, crc) = record::parse_header(&h);
    let payload = frame.slice(FRAME_HEADER..);
    let crc_ok = [Seal::Segment(id), Seal::Legacy]
        .into_iter()
        .any(|s| record::crc_ok(&payload, crc, s));
    if flen != len as usize || !crc_ok {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("crc mismatch at offset {offset}"),
        ));
    }
    Ok(payload)
}

fn invalid(e: impl std::fmt::Display, offset: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{e} at offset {offset}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The segment id of the test images.
    const SEG: u64 = 5;

    fn three() -> (Vec<u8>, Vec<usize>) {
        let mut buf = Vec::new();
        let mut offs = Vec::new();
        for i in 0..3u64 {
            offs.push(buf.len());
            record::encode_message(&mut buf, SEG, i, 0, &["g".into()], b"body-bytes");
        }
        (buf, offs)
    }

    fn seqs(scanned: &[Scanned]) -> Vec<u64> {
        scanned
            .iter()
            .filter_map(|s| match s {
                Scanned::Record {
                    record: Record::Message { seq, .. },
                    ..
                } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_recycled_file_reads_up_to_its_end_record_and_never_its_stale_frames() {
        // The file's earlier use: segment 2's records, longer than the new data.
        let mut stale = Vec::new();
        for i in 100..110u64 {
            record::encode_message(&mut stale, 2, i, 0, &["g".into()], b"stale-body");
        }
        // Overwritten from the start by segment SEG: two records and the End.
        let mut new = Vec::new();
        record::encode_message(&mut new, SEG, 1, 0, &["g".into()], b"new");
        record::encode_message(&mut new, SEG, 2, 0, &["g".into()], b"new");
        let end = new.len();
        record::encode_end(&mut new, SEG);
        let mut file = stale.clone();
        file[..new.len()].copy_from_slice(&new);
        let s = scan(&Bytes::from(file), SEG);
        assert_eq!(seqs(&s), [1, 2]);
        assert!(matches!(s.last(), Some(Scanned::End { offset }) if *offset as usize == end));

        // A crash before the End reached the disk, with a stale frame starting right
        // where the new data ends: sealed to segment 2, it ends the scan as a torn
        // tail instead of being read as a record of SEG.
        let torn = [&new[..end], &stale[..]].concat();
        let s = scan(&Bytes::from(torn), SEG);
        assert_eq!(seqs(&s), [1, 2]);
        assert!(matches!(s.last(), Some(Scanned::Tail { offset, .. }) if *offset as usize == end));

        // Nothing of SEG written yet: nothing read.
        assert!(seqs(&scan(&Bytes::from(stale), SEG)).is_empty());
    }

    #[test]
    fn a_segment_written_before_seals_is_still_read() {
        // Legacy frames: CRC of the payload alone.
        let (mut buf, offs) = three();
        for &o in &offs {
            let mut h = [0u8; FRAME_HEADER];
            h.copy_from_slice(&buf[o..o + FRAME_HEADER]);
            let len = record::parse_header(&h).0;
            let crc = crc32c::crc32c(&buf[o + FRAME_HEADER..o + FRAME_HEADER + len]);
            buf[o + 4..o + 8].copy_from_slice(&crc.to_le_bytes());
        }
        let s = scan(&Bytes::from(buf.clone()), SEG);
        assert_eq!(seqs(&s), [0, 1, 2]);
        let (file, locs) = on_disk(&buf, &offs);
        assert_eq!(read_bodies_at(file.as_file(), SEG, &locs).len(), 3);
        assert!(read_bodies_at(file.as_file(), SEG, &locs)
            .iter()
            .all(|r| r.is_ok()));
    }

    #[test]
    fn scan_clean_and_torn() {
        let (buf, offs) = three();
        let all = scan(&Bytes::from(buf.clone()), SEG);
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|s| matches!(s, Scanned::Record { .. })));
        for cut in offs[2] + 1..buf.len() {
            let s = scan(&Bytes::copy_from_slice(&buf[..cut]), SEG);
            assert_eq!(s.len(), 3);
            assert!(matches!(s[2], Scanned::Tail { offset, .. } if offset as usize == offs[2]));
        }
    }

    #[test]
    fn scan_skips_corrupt_middle() {
        let (mut buf, offs) = three();
        buf[offs[1] + FRAME_HEADER + 3] ^= 1;
        let s = scan(&Bytes::from(buf), SEG);
        assert!(matches!(s[0], Scanned::Record { .. }));
        assert!(matches!(s[1], Scanned::Skipped { .. }));
        assert!(matches!(s[2], Scanned::Record { .. }));
    }

    #[test]
    fn scan_garbage_length_stops() {
        let (mut buf, offs) = three();
        buf[offs[1]..offs[1] + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let s = scan(&Bytes::from(buf), SEG);
        assert_eq!(s.len(), 2);
        assert!(matches!(s[1], Scanned::Tail { .. }));
    }

    /// Writes the first `keep` bytes of `buf` to a temporary file and returns it with the
    /// record locations of `offs` (frame offset, payload length).
    fn on_disk_cut(
        buf: &[u8],
        offs: &[usize],
        keep: usize,
    ) -> (tempfile::NamedTempFile, Vec<(u64, u32)>) {
        use std::io::Write;
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(&buf[..keep]).expect("write");
        let locs = offs
            .iter()
            .map(|&o| {
                let mut h = [0u8; FRAME_HEADER];
                h.copy_from_slice(&buf[o..o + FRAME_HEADER]);
                (o as u64, record::parse_header(&h).0 as u32)
            })
            .collect();
        (file, locs)
    }

    fn on_disk(buf: &[u8], offs: &[usize]) -> (tempfile::NamedTempFile, Vec<(u64, u32)>) {
        on_disk_cut(buf, offs, buf.len())
    }

    #[test]
    fn bodies_read_together_match_one_by_one_reads() {
        let mut buf = Vec::new();
        let mut offs = Vec::new();
        for i in 0..20u64 {
            offs.push(buf.len());
            record::encode_message(
                &mut buf,
                SEG,
                i,
                0,
                &["g".into()],
                format!("body-{i}").as_bytes(),
            );
            // Other records between messages: read over, not returned.
            record::encode_lease(&mut buf, SEG, i);
        }
        let (file, locs) = on_disk(&buf, &offs);
        // Every other message, so that the reads span gaps.
        let wanted: Vec<(u64, u32)> = locs.iter().copied().step_by(2).collect();
        let read = read_bodies_at(file.as_file(), SEG, &wanted);
        assert_eq!(read.len(), wanted.len());
        for (r, &(offset, len)) in read.into_iter().zip(&wanted) {
            let (seq, body) = r.expect("read");
            let alone = read_message_at(file.as_file(), SEG, offset, len)
                .expect("read")
                .expect("message");
            assert_eq!((seq, body), (alone.seq, alone.body));
        }
    }

    #[test]
    fn a_corrupt_record_fails_alone_and_a_truncated_file_fails_per_message() {
        let (mut buf, offs) = three();
        buf[offs[1] + FRAME_HEADER + 3] ^= 1;
        let (file, locs) = on_disk(&buf, &offs);
        let read = read_bodies_at(file.as_file(), SEG, &locs);
        assert!(matches!(&read[0], Ok((0, _))));
        assert!(read[1].is_err(), "{:?}", read[1]);
        assert!(matches!(&read[2], Ok((2, _))));

        let (buf, offs) = three();
        let (file, locs) = on_disk_cut(&buf, &offs, offs[2] + 4);
        let read = read_bodies_at(file.as_file(), SEG, &locs);
        assert!(matches!(&read[0], Ok((0, _))));
        assert!(matches!(&read[1], Ok((1, _))));
        assert!(read[2].is_err());
    }

    #[test]
    fn reads_stop_at_the_span_limit() {
        let mut buf = Vec::new();
        let mut offs = Vec::new();
        let body = vec![7u8; 300 * 1024];
        for i in 0..8u64 {
            offs.push(buf.len());
            record::encode_message(&mut buf, SEG, i, 0, &["g".into()], &body);
        }
        let (file, locs) = on_disk(&buf, &offs);
        let read = read_bodies_at(file.as_file(), SEG, &locs);
        let seqs: Vec<u64> = read.into_iter().map(|r| r.expect("read").0).collect();
        assert_eq!(seqs, (0..8).collect::<Vec<_>>());
    }
}
