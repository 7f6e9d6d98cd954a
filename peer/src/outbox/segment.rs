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
    let mut h = [0u8; FRAME_HEADER];
    h.copy_from_slice(&buf[..FRAME_HEADER]);
    let (flen, crc) = record::parse_header(&h);
    let payload = Bytes::from(buf).slice(FRAME_HEADER..);
    if flen != len as usize || !record::crc_ok(&payload, crc) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("crc mismatch at offset {offset}"),
        ));
    }
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
        Err(e) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{e} at offset {offset}"),
        )),
    }
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
}
