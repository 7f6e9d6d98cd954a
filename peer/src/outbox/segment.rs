//! Segment files: naming, listing, scanning and random reads. Blocking I/O.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::record::{self, Record, FRAME_HEADER};

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
pub fn create(dir: &Path, id: u64) -> io::Result<File> {
    let f = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(path(dir, id))?;
    sync_dir(dir)?;
    Ok(f)
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
    /// Scanning stopped here: the rest of the file is unreadable.
    Tail {
        /// Offset where readable data ends.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
}

/// Scans a whole segment image.
///
/// Rules (the length prefix is the only way to find the next frame):
/// * header incomplete, or frame extends past the end → torn tail (stop);
/// * length 0 or above [`record::MAX_PAYLOAD`] → cannot resync, treated as a torn tail
///   from there (stop);
/// * CRC mismatch on the last frame of the file → torn tail (stop);
/// * CRC mismatch with data after the frame: if the next frame (at the claimed length)
///   has a plausible header the frame is skipped as corrupt; otherwise the length
///   itself is suspect and the rest is treated as a torn tail (stop);
/// * CRC fine but undecodable → skipped.
pub fn scan(data: &Bytes) -> Vec<Scanned> {
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
        if !record::crc_ok(&payload, crc) {
            if next == end {
                out.push(Scanned::Tail {
                    offset: off,
                    reason: "torn tail (crc mismatch in last frame)".into(),
                });
                break;
            }
            if next_header_plausible(data, next) {
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

fn next_header_plausible(data: &Bytes, pos: usize) -> bool {
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
        Some(p) => record::crc_ok(p, crc),
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

/// Reads the Message record at `offset` (payload length `len`) of a segment and
/// returns `(seq, body)`. `Ok(None)` if the file is gone.
pub fn read_message(path: &Path, offset: u64, len: u32) -> io::Result<Option<MessageRead>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    read_message_at(&f, offset, len)
}

/// [`read_message`] from an open segment file.
pub fn read_message_at(f: &File, offset: u64, len: u32) -> io::Result<Option<MessageRead>> {
    let mut buf = vec![0u8; FRAME_HEADER + len as usize];
    f.read_exact_at(&mut buf, offset)?;
    let payload = checked_payload(Bytes::from(buf), offset, len)?;
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
pub fn read_bodies_at(f: &File, locs: &[(u64, u32)]) -> Vec<io::Result<(u64, Bytes)>> {
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
                    let (seq, body) = message_body(frame, offset, len)?;
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
                message_body(Bytes::from(buf), offset, len)
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
fn message_body(frame: Bytes, offset: u64, len: u32) -> io::Result<(u64, Bytes)> {
    let payload = checked_payload(frame, offset, len)?;
    record::decode_message(&payload).map_err(|e| invalid(e, offset))
}

/// The payload of `frame` once its length and CRC are checked.
fn checked_payload(frame: Bytes, offset: u64, len: u32) -> io::Result<Bytes> {
    let mut h = [0u8; FRAME_HEADER];
    h.copy_from_slice(&frame[..FRAME_HEADER]);
    let (flen, crc) = record::parse_header(&h);
    let payload = frame.slice(FRAME_HEADER..);
    if flen != len as usize || !record::crc_ok(&payload, crc) {
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

    fn three() -> (Vec<u8>, Vec<usize>) {
        let mut buf = Vec::new();
        let mut offs = Vec::new();
        for i in 0..3u64 {
            offs.push(buf.len());
            record::encode_message(&mut buf, i, 0, &["g".into()], b"body-bytes");
        }
        (buf, offs)
    }

    #[test]
    fn scan_clean_and_torn() {
        let (buf, offs) = three();
        let all = scan(&Bytes::from(buf.clone()));
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|s| matches!(s, Scanned::Record { .. })));
        for cut in offs[2] + 1..buf.len() {
            let s = scan(&Bytes::copy_from_slice(&buf[..cut]));
            assert_eq!(s.len(), 3);
            assert!(matches!(s[2], Scanned::Tail { offset, .. } if offset as usize == offs[2]));
        }
    }

    #[test]
    fn scan_skips_corrupt_middle() {
        let (mut buf, offs) = three();
        buf[offs[1] + FRAME_HEADER + 3] ^= 1;
        let s = scan(&Bytes::from(buf));
        assert!(matches!(s[0], Scanned::Record { .. }));
        assert!(matches!(s[1], Scanned::Skipped { .. }));
        assert!(matches!(s[2], Scanned::Record { .. }));
    }

    #[test]
    fn scan_garbage_length_stops() {
        let (mut buf, offs) = three();
        buf[offs[1]..offs[1] + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let s = scan(&Bytes::from(buf));
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
                i,
                0,
                &["g".into()],
                format!("body-{i}").as_bytes(),
            );
            // Other records between messages: read over, not returned.
            record::encode_lease(&mut buf, i);
        }
        let (file, locs) = on_disk(&buf, &offs);
        // Every other message, so that the reads span gaps.
        let wanted: Vec<(u64, u32)> = locs.iter().copied().step_by(2).collect();
        let read = read_bodies_at(file.as_file(), &wanted);
        assert_eq!(read.len(), wanted.len());
        for (r, &(offset, len)) in read.into_iter().zip(&wanted) {
            let (seq, body) = r.expect("read");
            let alone = read_message_at(file.as_file(), offset, len)
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
        let read = read_bodies_at(file.as_file(), &locs);
        assert!(matches!(&read[0], Ok((0, _))));
        assert!(read[1].is_err(), "{:?}", read[1]);
        assert!(matches!(&read[2], Ok((2, _))));

        let (buf, offs) = three();
        let (file, locs) = on_disk_cut(&buf, &offs, offs[2] + 4);
        let read = read_bodies_at(file.as_file(), &locs);
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
            record::encode_message(&mut buf, i, 0, &["g".into()], &body);
        }
        let (file, locs) = on_disk(&buf, &offs);
        let read = read_bodies_at(file.as_file(), &locs);
        let seqs: Vec<u64> = read.into_iter().map(|r| r.expect("read").0).collect();
        assert_eq!(seqs, (0..8).collect::<Vec<_>>());
    }
}
