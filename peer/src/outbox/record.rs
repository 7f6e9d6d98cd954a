//! Record framing and encoding for outbox segment files.
//!
//! Every record on disk is a frame:
//!
//! ```text
//! u32 LE  payload length (1 ..= MAX_PAYLOAD)
//! u32 LE  CRC32C of the segment id (u64 LE) followed by the payload
//! payload
//! ```
//!
//! The segment id in the CRC seals each frame to its file: segment files are recycled
//! (a settled one is renamed and overwritten by a later segment), and a frame left by
//! the file's earlier use fails the check instead of being read as current. Segments
//! written before this seal existed have a CRC of the payload alone ([`Seal::Legacy`]);
//! they are still read, and never recycled.
//!
//! The payload starts with a one-byte kind:
//!
//! * `1` Message: `u64 seq, u64 unix_ms, u16 n, n × (u16 len, utf-8 group), body (rest)`
//! * `2` Settle:  `u32 n, n × (u64 seq, u16 len, utf-8 group)`
//! * `3` SeqLease: `u64 upto` (every sequence number `< upto` may have been handed out)
//! * `4` End: nothing. Written after every group commit's records and overwritten by
//!   the next commit: the data ends here, and what follows is stale (from a recycled
//!   file's earlier use).
//!
//! All integers are little-endian. Encoding is by hand so the body is copied exactly
//! once: from the caller's `Bytes` into the group-commit write buffer.

use bytes::Bytes;

/// Size of the frame header (length + CRC).
pub const FRAME_HEADER: usize = 8;
/// Largest body accepted by the outbox (64 MiB).
pub const MAX_BODY: usize = 64 * 1024 * 1024;
/// Largest payload a frame may claim; anything above is treated as garbage.
pub const MAX_PAYLOAD: usize = MAX_BODY + 4 * 1024 * 1024;
/// Largest number of target groups of one message.
pub const MAX_TARGETS: usize = 4096;
/// Largest group name, in bytes.
pub const MAX_GROUP_LEN: usize = 1024;

const KIND_MESSAGE: u8 = 1;
const KIND_SETTLE: u8 = 2;
const KIND_LEASE: u8 = 3;
const KIND_END: u8 = 4;

/// What a frame's CRC covers besides its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seal {
    /// The id of the segment the frame belongs to (every frame written now).
    Segment(u64),
    /// Nothing: frames of segments written before the seal existed.
    Legacy,
}

impl Seal {
    fn crc(self, payload: &[u8]) -> u32 {
        match self {
            Seal::Segment(id) => crc32c::crc32c_append(crc32c::crc32c(&id.to_le_bytes()), payload),
            Seal::Legacy => crc32c::crc32c(payload),
        }
    }
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A message appended with disk durability.
    Message {
        /// Sequence number.
        seq: u64,
        /// Wall-clock time of the append, milliseconds since the Unix epoch.
        unix_ms: u64,
        /// Target groups.
        targets: Vec<String>,
        /// Message body.
        body: Bytes,
    },
    /// A batch of settlements `(seq, group)`.
    Settle(Vec<(u64, String)>),
    /// Sequence numbers below `upto` may have been handed out.
    SeqLease {
        /// Exclusive upper bound of the lease.
        upto: u64,
    },
    /// The end of the data written so far.
    End,
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Appends one Message frame of segment `segment` to `buf`. Returns the payload length.
///
/// The caller has validated targets (count and name lengths) and body size.
pub fn encode_message(
    buf: &mut Vec<u8>,
    segment: u64,
    seq: u64,
    unix_ms: u64,
    targets: &[String],
    body: &[u8],
) -> u32 {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; FRAME_HEADER]);
    buf.push(KIND_MESSAGE);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&unix_ms.to_le_bytes());
    buf.extend_from_slice(&(targets.len() as u16).to_le_bytes());
    for t in targets {
        buf.extend_from_slice(&(t.len() as u16).to_le_bytes());
        buf.extend_from_slice(t.as_bytes());
    }
    buf.extend_from_slice(body);
    finish_frame(buf, start, segment)
}

/// Appends one Settle frame of segment `segment` holding `entries` to `buf`. Returns
/// the payload length.
pub fn encode_settle<'a, I>(buf: &mut Vec<u8>, segment: u64, entries: I) -> u32
where
    I: IntoIterator<Item = (u64, &'a str)>,
{
    let start = buf.len();
    buf.extend_from_slice(&[0u8; FRAME_HEADER]);
    buf.push(KIND_SETTLE);
    let count_at = buf.len();
    buf.extend_from_slice(&0u32.to_le_bytes());
    let mut n: u32 = 0;
    for (seq, group) in entries {
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(&(group.len() as u16).to_le_bytes());
        buf.extend_from_slice(group.as_bytes());
        n += 1;
    }
    buf[count_at..count_at + 4].copy_from_slice(&n.to_le_bytes());
    finish_frame(buf, start, segment)
}

/// Appends one SeqLease frame of segment `segment` to `buf`. Returns the payload length.
pub fn encode_lease(buf: &mut Vec<u8>, segment: u64, upto: u64) -> u32 {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; FRAME_HEADER]);
    buf.push(KIND_LEASE);
    buf.extend_from_slice(&upto.to_le_bytes());
    finish_frame(buf, start, segment)
}

/// Appends one End frame of segment `segment` to `buf`.
pub fn encode_end(buf: &mut Vec<u8>, segment: u64) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; FRAME_HEADER]);
    buf.push(KIND_END);
    finish_frame(buf, start, segment);
}

fn finish_frame(buf: &mut [u8], start: usize, segment: u64) -> u32 {
    let payload_len = (buf.len() - start - FRAME_HEADER) as u32;
    let crc = Seal::Segment(segment).crc(&buf[start + FRAME_HEADER..]);
    buf[start..start + 4].copy_from_slice(&payload_len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    payload_len
}

/// Parses a frame header: `(payload length, crc)`.
pub fn parse_header(h: &[u8; FRAME_HEADER]) -> (usize, u32) {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    (len, crc)
}

/// True if a frame may claim this payload length.
pub fn plausible_len(len: usize) -> bool {
    (1..=MAX_PAYLOAD).contains(&len)
}

/// True if `payload` has the given CRC under `seal`.
pub fn crc_ok(payload: &[u8], crc: u32, seal: Seal) -> bool {
    seal.crc(payload) == crc
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DecodeError("length overflow"))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(DecodeError("record truncated"))?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        let s = self.take(n)?;
        std::str::from_utf8(s)
            .map(str::to_owned)
            .map_err(|_| DecodeError("group name is not utf-8"))
    }
}

/// Decodes a payload whose CRC has been checked. `payload` is a `Bytes` so the body
/// of a Message is a zero-copy slice of it.
pub fn decode(payload: &Bytes) -> Result<Record, DecodeError> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    match r.u8()? {
        KIND_MESSAGE => {
            let seq = r.u64()?;
            let unix_ms = r.u64()?;
            let n = r.u16()? as usize;
            if n > MAX_TARGETS {
                return Err(DecodeError("too many targets"));
            }
            let mut targets = Vec::with_capacity(n);
            for _ in 0..n {
                targets.push(r.string()?);
            }
            let body = payload.slice(r.pos..);
            Ok(Record::Message {
                seq,
                unix_ms,
                targets,
                body,
            })
        }
        KIND_SETTLE => {
            let n = r.u32()? as usize;
            // Each entry is at least 10 bytes: reject counts the payload cannot hold.
            if n > payload.len() / 10 {
                return Err(DecodeError("settle count larger than record"));
            }
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let seq = r.u64()?;
                let g = r.string()?;
                v.push((seq, g));
            }
            if r.pos != payload.len() {
                return Err(DecodeError("trailing bytes after settle entries"));
            }
            Ok(Record::Settle(v))
        }
        KIND_LEASE => {
            let upto = r.u64()?;
            if r.pos != payload.len() {
                return Err(DecodeError("trailing bytes after lease"));
            }
            Ok(Record::SeqLease { upto })
        }
        KIND_END if payload.len() == 1 => Ok(Record::End),
        KIND_END => Err(DecodeError("trailing bytes after end")),
        _ => Err(DecodeError("unknown record kind")),
    }
}

/// `(seq, body)` of a Message record whose CRC has been checked, without decoding its
/// targets (the send path needs only the body).
pub fn decode_message(payload: &Bytes) -> Result<(u64, Bytes), DecodeError> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    if r.u8()? != KIND_MESSAGE {
        return Err(DecodeError("not a message record"));
    }
    let seq = r.u64()?;
    let _unix_ms = r.u64()?;
    let n = r.u16()? as usize;
    if n > MAX_TARGETS {
        return Err(DecodeError("too many targets"));
    }
    for _ in 0..n {
        let len = r.u16()? as usize;
        r.take(len)?;
    }
    Ok((seq, payload.slice(r.pos..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_payload(buf: &[u8]) -> (usize, u32, Bytes) {
        let mut h = [0u8; FRAME_HEADER];
        h.copy_from_slice(&buf[..FRAME_HEADER]);
        let (len, crc) = parse_header(&h);
        (
            len,
            crc,
            Bytes::copy_from_slice(&buf[FRAME_HEADER..FRAME_HEADER + len]),
        )
    }

    #[test]
    fn message_round_trip() {
        let mut buf = Vec::new();
        let targets = vec!["billing".to_string(), "audit".to_string()];
        let n = encode_message(&mut buf, 7, 42, 1_700_000_000_000, &targets, b"hello body");
        assert_eq!(n as usize + FRAME_HEADER, buf.len());
        let (len, crc, payload) = frame_payload(&buf);
        assert_eq!(len, n as usize);
        assert!(crc_ok(&payload, crc, Seal::Segment(7)));
        // Sealed to its segment: another segment's, or an unsealed, check fails.
        assert!(!crc_ok(&payload, crc, Seal::Segment(8)));
        assert!(!crc_ok(&payload, crc, Seal::Legacy));
        assert_eq!(
            decode(&payload),
            Ok(Record::Message {
                seq: 42,
                unix_ms: 1_700_000_000_000,
                targets,
                body: Bytes::from_static(b"hello body")
            })
        );
        assert_eq!(
            decode_message(&payload),
            Ok((42, Bytes::from_static(b"hello body")))
        );
    }

    #[test]
    fn settle_and_lease_round_trip() {
        let mut buf = Vec::new();
        encode_settle(&mut buf, 1, [(1u64, "a"), (7u64, "bb")]);
        let first = buf.len();
        encode_lease(&mut buf, 1, 65536);
        let end = buf.len();
        encode_end(&mut buf, 1);
        let (_, crc, payload) = frame_payload(&buf);
        assert!(crc_ok(&payload, crc, Seal::Segment(1)));
        assert_eq!(
            decode(&payload),
            Ok(Record::Settle(vec![(1, "a".into()), (7, "bb".into())]))
        );
        let (_, crc, payload) = frame_payload(&buf[first..]);
        assert!(crc_ok(&payload, crc, Seal::Segment(1)));
        assert_eq!(decode(&payload), Ok(Record::SeqLease { upto: 65536 }));
        let (_, crc, payload) = frame_payload(&buf[end..]);
        assert!(crc_ok(&payload, crc, Seal::Segment(1)));
        assert_eq!(decode(&payload), Ok(Record::End));
    }

    #[test]
    fn crc_rejects_flipped_byte() {
        let mut buf = Vec::new();
        encode_message(&mut buf, 1, 1, 0, &["g".into()], b"payload");
        for i in FRAME_HEADER..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x40;
            let (_, crc, payload) = frame_payload(&b);
            assert!(
                !crc_ok(&payload, crc, Seal::Segment(1)),
                "flip at {i} not detected"
            );
        }
    }

    #[test]
    fn decode_rejects_garbage_without_panic() {
        for payload in [
            &b""[..],
            b"\x09",
            b"\x01\x00",
            b"\x02\xff\xff\xff\xff",
            b"\x03\x01",
            b"\x04\x00",
            b"\x05",
        ] {
            assert!(decode(&Bytes::copy_from_slice(payload)).is_err());
            assert!(decode_message(&Bytes::copy_from_slice(payload)).is_err());
        }
        // A settle record is not a message; a message cut inside its targets fails.
        let mut buf = Vec::new();
        encode_settle(&mut buf, 1, [(1u64, "a")]);
        assert!(decode_message(&frame_payload(&buf).2).is_err());
        let mut buf = Vec::new();
        encode_message(&mut buf, 1, 1, 0, &["group".into()], b"");
        let payload = frame_payload(&buf).2;
        assert!(decode_message(&payload.slice(..payload.len() - 2)).is_err());
        assert!(!plausible_len(0));
        assert!(!plausible_len(MAX_PAYLOAD + 1));
    }
}
