//! Encoding frames into bytes and cutting a byte stream back into frames.

use super::error::WireError;
use super::frames::*;
use super::{LENGTH_PREFIX, MAX_DELIVER_MESSAGES};
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Borrowed mirror of [`FrameHeader`]: same variant names and field order, so it encodes
/// to the same bytes without cloning the frame.
#[derive(Serialize)]
enum FrameHeaderRef<'a> {
    Hello(&'a Hello),
    Welcome(&'a Welcome),
    Reject(&'a Reject),
    Open(&'a Open),
    Ack(&'a Ack),
    Credit(&'a Credit),
    Request { id: u64, body: &'a DirRequest },
    Response { id: u64, body: &'a DirResponse },
    RouteChanged(&'a Route),
}

/// The header of every frame but `Deliver` (see [`encode_envelopes`]).
fn header_of(frame: &Frame) -> Option<FrameHeaderRef<'_>> {
    Some(match frame {
        Frame::Hello(h) => FrameHeaderRef::Hello(h),
        Frame::Welcome(w) => FrameHeaderRef::Welcome(w),
        Frame::Reject(r) => FrameHeaderRef::Reject(r),
        Frame::Open(o) => FrameHeaderRef::Open(o),
        Frame::Deliver(_) => return None,
        Frame::Ack(a) => FrameHeaderRef::Ack(a),
        Frame::Credit(c) => FrameHeaderRef::Credit(c),
        Frame::Request { id, body } => FrameHeaderRef::Request { id: *id, body },
        Frame::Response { id, body } => FrameHeaderRef::Response { id: *id, body },
        Frame::RouteChanged(r) => FrameHeaderRef::RouteChanged(r),
    })
}

/// Appends `frame`, length prefix included, to `out`. Fails (leaving `out` as it was)
/// if the frame would exceed `max_frame` bytes.
pub fn encode(frame: &Frame, out: &mut BytesMut, max_frame: usize) -> Result<(), WireError> {
    let Some(header) = header_of(frame) else {
        return match frame {
            Frame::Deliver(d) => encode_envelopes(d, out, max_frame),
            _ => Err(WireError::Malformed(format!(
                "no header for {}",
                frame.kind()
            ))),
        };
    };
    let start = out.len();
    out.put_u32(0);
    let written = rmp_serde::encode::write(&mut (&mut *out).writer(), &header);
    if let Err(e) = written {
        out.truncate(start);
        return Err(WireError::Malformed(format!(
            "cannot encode {}: {e}",
            frame.kind()
        )));
    }
    finish_frame(out, start, max_frame)
}

/// Encodes a `Deliver` frame of envelopes through the same writer as pre-encoded
/// messages, so that both paths emit the same bytes (continuation entries included).
fn encode_envelopes(d: &Deliver, out: &mut BytesMut, max_frame: usize) -> Result<(), WireError> {
    let fields: Vec<Vec<u8>> = d.messages.iter().map(envelope_fields).collect();
    let messages: Vec<PreEncoded<'_>> = d
        .messages
        .iter()
        .zip(&fields)
        .map(|(m, fields)| PreEncoded {
            id: m.id,
            fields,
            payload: &m.payload,
            owner: &m.payload,
        })
        .collect();
    encode_deliver(&d.group, d.first_link_seq, &messages, out, max_frame)
}

/// An envelope's fields after the id as [`PreEncoded::fields`] holds them.
fn envelope_fields(m: &Envelope) -> Vec<u8> {
    use rmp::encode as mp;
    let mut w = Vec::with_capacity(32 + m.topic.len());
    // Writing into a `Vec` cannot fail: the results carry nothing worth handling.
    let _ = mp::write_str(&mut w, &m.topic);
    match m.key() {
        Some(key) => {
            let _ = mp::write_str(&mut w, key);
        }
        None => {
            let _ = mp::write_nil(&mut w);
        }
    }
    let _ = mp::write_array_len(&mut w, m.tags().len() as u32);
    for tag in m.tags() {
        let _ = mp::write_str(&mut w, tag);
    }
    let _ = mp::write_array_len(&mut w, m.headers().len() as u32);
    for (name, value) in m.headers() {
        let _ = mp::write_array_len(&mut w, 2);
        let _ = mp::write_str(&mut w, name);
        let _ = mp::write_str(&mut w, value);
    }
    let _ = mp::write_uint(&mut w, m.publish_time_ms);
    w
}

/// One message of a `Deliver` frame whose envelope fields were encoded once, when the
/// message was stored, so that sending it copies bytes instead of decoding and encoding
/// them again.
#[derive(Debug, Clone)]
pub struct PreEncoded<'a> {
    /// Message id.
    pub id: MessageId,
    /// The MessagePack encoding of the envelope fields after the id, one after the
    /// other and without an enclosing array: topic, key, tags, headers, publish time
    /// (what `rmp_serde` writes for those fields of [`Envelope`]). The caller vouches
    /// for it; the receiver decodes and checks it like any frame.
    pub fields: &'a [u8],
    /// Payload, borrowed: a small one is copied into the frame, so it needs no
    /// reference count of its own.
    pub payload: &'a [u8],
    /// The buffer `payload` lies in: a large payload is sent as a slice of it, without
    /// a copy (a payload elsewhere is copied).
    pub owner: &'a Bytes,
}

impl PreEncoded<'_> {
    /// The payload as shared bytes: a slice of `owner`, or a copy if it is not in it.
    pub fn shared_payload(&self) -> Bytes {
        let start = (self.payload.as_ptr() as usize).wrapping_sub(self.owner.as_ptr() as usize);
        match start.checked_add(self.payload.len()) {
            Some(end) if start <= self.owner.len() && end <= self.owner.len() => {
                self.owner.slice(start..end)
            }
            _ => Bytes::copy_from_slice(self.payload),
        }
    }
}

/// Appends a `Deliver` frame of pre-encoded messages to `out`: the same bytes
/// [`encode`] writes for the equivalent [`Frame::Deliver`]. Fails (leaving `out` as it
/// was) if the frame would exceed `max_frame` bytes.
pub fn encode_deliver(
    group: &str,
    first_link_seq: u64,
    messages: &[PreEncoded<'_>],
    out: &mut BytesMut,
    max_frame: usize,
) -> Result<(), WireError> {
    encode_deliver_head(group, first_link_seq, messages, out, max_frame)?;
    for m in messages {
        out.extend_from_slice(m.payload);
    }
    Ok(())
}

/// Appends the length prefix and header of a `Deliver` frame of pre-encoded messages
/// to `out`; the caller sends the payloads right after it, in order. Fails (leaving
/// `out` as it was) if the whole frame would exceed `max_frame` bytes.
pub fn encode_deliver_head(
    group: &str,
    first_link_seq: u64,
    messages: &[PreEncoded<'_>],
    out: &mut BytesMut,
    max_frame: usize,
) -> Result<(), WireError> {
    let start = out.len();
    out.put_u32(0);
    if let Err(e) = write_deliver_header(group, first_link_seq, messages, out) {
        out.truncate(start);
        return Err(e);
    }
    let payloads: usize = messages.iter().map(|m| m.payload.len()).sum();
    let size = out.len() - start - LENGTH_PREFIX + payloads;
    let fits = u32::try_from(size).ok().filter(|_| size <= max_frame);
    let Some(prefix) = fits else {
        out.truncate(start);
        return Err(WireError::FrameTooLarge {
            size,
            limit: max_frame,
        });
    };
    out[start..start + LENGTH_PREFIX].copy_from_slice(&prefix.to_be_bytes());
    Ok(())
}

/// The MessagePack header of a `Deliver` frame, as `rmp_serde` lays out
/// `FrameHeader::Deliver` (a one-entry map from variant name to a field array).
fn write_deliver_header(
    group: &str,
    first_link_seq: u64,
    messages: &[PreEncoded<'_>],
    out: &mut BytesMut,
) -> Result<(), WireError> {
    use rmp::encode as mp;
    let too_large = |size: usize| WireError::FrameTooLarge {
        size,
        limit: u32::MAX as usize,
    };
    let count = u32::try_from(messages.len()).map_err(|_| too_large(messages.len()))?;
    let mut w = out.writer();
    mp::write_map_len(&mut w, 1).map_err(malformed)?;
    mp::write_str(&mut w, "Deliver").map_err(malformed)?;
    mp::write_array_len(&mut w, 3).map_err(malformed)?;
    mp::write_str(&mut w, group).map_err(malformed)?;
    mp::write_uint(&mut w, first_link_seq).map_err(malformed)?;
    mp::write_array_len(&mut w, count).map_err(malformed)?;
    let out = w.into_inner();
    let mut previous: Option<&PreEncoded<'_>> = None;
    for m in messages {
        let payload_len = u32::try_from(m.payload.len()).map_err(|_| too_large(m.payload.len()))?;
        let mut tail = [0u8; 9];
        if previous.is_some_and(|p| continues(p, m)) {
            // A continuation entry: the payload length alone.
            let n = put_uint(&mut tail, u64::from(payload_len));
            out.extend_from_slice(&tail[..n]);
            previous = Some(m);
            continue;
        }
        previous = Some(m);
        // Per message, by hand (this is the hottest encoding path): a 7-field array,
        // the id as a 2-array, the stored fields, the payload length.
        let mut head = [0u8; 2 + 9 + 9];
        head[..2].copy_from_slice(&[0x97, 0x92]);
        let mut n = 2;
        n += put_uint(&mut head[n..], m.id.producer);
        n += put_uint(&mut head[n..], m.id.seq);
        out.extend_from_slice(&head[..n]);
        out.extend_from_slice(m.fields);
        let n = put_uint(&mut tail, u64::from(payload_len));
        out.extend_from_slice(&tail[..n]);
    }
    Ok(())
}

/// Whether `m` can be sent as a continuation of `previous` ([`DeliverEntry::Next`]):
/// the next id of the same producer, and the same fields.
fn continues(previous: &PreEncoded<'_>, m: &PreEncoded<'_>) -> bool {
    m.id.producer == previous.id.producer
        && previous.id.seq.checked_add(1) == Some(m.id.seq)
        && m.fields == previous.fields
}

/// The message a continuation entry stands for: the id after `previous`'s, and its
/// fields. `None` at the end of the sequence numbers.
fn next_envelope(previous: &Envelope) -> Option<Envelope> {
    Some(Envelope {
        id: MessageId {
            producer: previous.id.producer,
            seq: previous.id.seq.checked_add(1)?,
        },
        topic: previous.topic.clone(),
        publish_time_ms: previous.publish_time_ms,
        payload: Bytes::new(),
        extras: previous.extras.clone(),
    })
}

/// Writes `v` as MessagePack's smallest unsigned integer encoding (as
/// `rmp::encode::write_uint` does) at the start of `buf` (at least 9 bytes); returns
/// the bytes written.
fn put_uint(buf: &mut [u8], v: u64) -> usize {
    // One fixed-width store per arm: a copy of a computed width became a `memcpy`
    // call, measurable on this path.
    match v {
        0..=0x7f => {
            buf[0] = v as u8;
            1
        }
        0x80..=0xff => {
            buf[..2].copy_from_slice(&[0xcc, v as u8]);
            2
        }
        0x100..=0xffff => {
            buf[0] = 0xcd;
            buf[1..3].copy_from_slice(&(v as u16).to_be_bytes());
            3
        }
        0x1_0000..=0xffff_ffff => {
            buf[0] = 0xce;
            buf[1..5].copy_from_slice(&(v as u32).to_be_bytes());
            5
        }
        _ => {
            buf[0] = 0xcf;
            buf[1..9].copy_from_slice(&v.to_be_bytes());
            9
        }
    }
}

/// Writing into memory cannot fail; this keeps the error path honest all the same.
fn malformed(e: impl std::fmt::Display) -> WireError {
    WireError::Malformed(format!("cannot encode Deliver: {e}"))
}

/// Checks the size of the frame written at `start` and fills in its length prefix.
fn finish_frame(out: &mut BytesMut, start: usize, max_frame: usize) -> Result<(), WireError> {
    let size = out.len() - start - LENGTH_PREFIX;
    if size > max_frame {
        out.truncate(start);
        return Err(WireError::FrameTooLarge {
            size,
            limit: max_frame,
        });
    }
    // `size <= max_frame`, and `max_frame` fits a u32 in any sane configuration.
    let prefix = u32::try_from(size).map_err(|_| WireError::FrameTooLarge {
        size,
        limit: u32::MAX as usize,
    })?;
    out[start..start + LENGTH_PREFIX].copy_from_slice(&prefix.to_be_bytes());
    Ok(())
}

/// Decodes one frame body (without its length prefix).
pub(super) fn decode_body(body: Bytes) -> Result<Frame, WireError> {
    if let Some(deliver) = decode_deliver_fast(&body) {
        return deliver.map(Frame::Deliver);
    }
    decode_general(body)
}

/// Decodes one frame body that arrived in several `pieces` (in order, together the
/// whole body). A `Deliver` frame whose header lies in the first piece gets each
/// payload as a slice of the piece holding it, copied only when it straddles two: a
/// frame of large payloads is not copied together on the receiving side. Anything else
/// is copied into one buffer and decoded as usual.
pub(super) fn decode_pieces(pieces: &[Bytes]) -> Result<Frame, WireError> {
    if let Some(first) = pieces.first() {
        if let Some((mut deliver, lens, header_len)) = deliver_header_fast(first) {
            attach_payloads(pieces, header_len, &mut deliver.messages, &lens)?;
            return Ok(Frame::Deliver(deliver));
        }
    }
    let mut body = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
    for piece in pieces {
        body.extend_from_slice(piece);
    }
    decode_body(body.freeze())
}

/// Decodes any frame body with serde (every frame but the usual `Deliver` layout, and
/// the error messages for malformed input).
fn decode_general(body: Bytes) -> Result<Frame, WireError> {
    let mut cursor = std::io::Cursor::new(&body[..]);
    let mut de = rmp_serde::Deserializer::new(&mut cursor);
    let header =
        FrameHeader::deserialize(&mut de).map_err(|e| WireError::Malformed(e.to_string()))?;
    let header_len = cursor.position() as usize;
    let trailing = body.len() - header_len;
    Ok(match header {
        FrameHeader::Deliver {
            group,
            first_link_seq,
            messages,
        } => {
            let mut topics = TopicCache::default();
            let mut lens = Vec::with_capacity(messages.len());
            let mut envelopes: Vec<Envelope> = Vec::with_capacity(messages.len());
            for entry in messages {
                let envelope = match entry {
                    DeliverEntry::Full(h) => {
                        lens.push(h.payload_len);
                        Envelope {
                            id: h.id,
                            topic: topics.shared(&h.topic),
                            publish_time_ms: h.publish_time_ms,
                            payload: Bytes::new(),
                            extras: Extras::boxed(h.key, h.tags, h.headers),
                        }
                    }
                    DeliverEntry::Next(len) => {
                        lens.push(len);
                        envelopes.last().and_then(next_envelope).ok_or_else(|| {
                            WireError::Malformed(
                                "Deliver continuation entry without a message before it, or past the last sequence number".into(),
                            )
                        })?
                    }
                };
                envelopes.push(envelope);
            }
            let mut messages = envelopes;
            attach_payloads(
                std::slice::from_ref(&body),
                header_len,
                &mut messages,
                &lens,
            )?;
            Frame::Deliver(Deliver {
                group,
                first_link_seq,
                messages,
            })
        }
        other => {
            if trailing != 0 {
                return Err(WireError::Malformed(format!(
                    "{trailing} unexpected bytes after the frame header"
                )));
            }
            match other {
                FrameHeader::Hello(h) => Frame::Hello(h),
                FrameHeader::Welcome(w) => Frame::Welcome(w),
                FrameHeader::Reject(r) => Frame::Reject(r),
                FrameHeader::Open(o) => Frame::Open(o),
                FrameHeader::Ack(a) => Frame::Ack(a),
                FrameHeader::Credit(c) => Frame::Credit(c),
                FrameHeader::Request { id, body } => Frame::Request { id, body },
                FrameHeader::Response { id, body } => Frame::Response { id, body },
                FrameHeader::RouteChanged(r) => Frame::RouteChanged(r),
                FrameHeader::Deliver { .. } => {
                    return Err(WireError::Malformed("unreachable Deliver".into()))
                }
            }
        }
    })
}

/// Gives consecutive messages of one topic the same shared topic string.
#[derive(Default)]
struct TopicCache(Option<std::sync::Arc<str>>);

impl TopicCache {
    fn shared(&mut self, topic: &str) -> std::sync::Arc<str> {
        match &self.0 {
            Some(last) if &**last == topic => last.clone(),
            _ => self.0.insert(topic.into()).clone(),
        }
    }

    /// [`shared`](Self::shared) for raw bytes: equal to the last topic, they need no
    /// UTF-8 check; otherwise `None` unless they are UTF-8.
    fn shared_raw(&mut self, raw: &[u8]) -> Option<std::sync::Arc<str>> {
        match &self.0 {
            Some(last) if last.as_bytes() == raw => Some(last.clone()),
            _ => Some(self.0.insert(std::str::from_utf8(raw).ok()?.into()).clone()),
        }
    }
}

/// Reads an unsigned integer as [`put_uint`] (and `rmp`'s `write_uint`) writes it.
fn get_uint(rd: &mut &[u8]) -> Option<u64> {
    let (&marker, rest) = rd.split_first()?;
    // Fixed-width reads per arm (see `put_uint`).
    let (v, rest) = match marker {
        0..=0x7f => (u64::from(marker), rest),
        0xcc => {
            let (b, rest) = rest.split_first_chunk::<1>()?;
            (u64::from(b[0]), rest)
        }
        0xcd => {
            let (b, rest) = rest.split_first_chunk::<2>()?;
            (u64::from(u16::from_be_bytes(*b)), rest)
        }
        0xce => {
            let (b, rest) = rest.split_first_chunk::<4>()?;
            (u64::from(u32::from_be_bytes(*b)), rest)
        }
        0xcf => {
            let (b, rest) = rest.split_first_chunk::<8>()?;
            (u64::from_be_bytes(*b), rest)
        }
        _ => return None,
    };
    *rd = rest;
    Some(v)
}

/// Reads a MessagePack string's bytes from the front of `rd` and advances past it; the
/// bytes are not checked to be UTF-8 (compare them with a known string instead).
/// `None` if `rd` does not start with a whole string.
pub fn str_bytes<'a>(rd: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (&marker, rest) = rd.split_first()?;
    let (len, rest) = match marker {
        0xa0..=0xbf => (usize::from(marker & 0x1f), rest),
        0xd9 => (usize::from(*rest.first()?), rest.get(1..)?),
        0xda => (
            usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)),
            rest.get(2..)?,
        ),
        0xdb => (
            u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize,
            rest.get(4..)?,
        ),
        _ => return None,
    };
    let (bytes, rest) = rest.split_at_checked(len)?;
    *rd = rest;
    Some(bytes)
}

/// Sets each message's payload to its part of the payload area after the header
/// (`lens[i]` bytes for message `i`, in order) of a body held as `pieces`; the lengths
/// must add up to that area. A payload lying inside one piece is a slice of it, one
/// straddling pieces is copied together.
fn attach_payloads(
    pieces: &[Bytes],
    header_len: usize,
    messages: &mut [Envelope],
    lens: &[u32],
) -> Result<(), WireError> {
    let total: u64 = lens.iter().map(|&l| u64::from(l)).sum();
    let size: usize = pieces.iter().map(Bytes::len).sum();
    let trailing = size - header_len.min(size);
    if total != trailing as u64 {
        return Err(WireError::Malformed(format!(
            "Deliver announces {total} payload bytes but carries {trailing}"
        )));
    }
    let mut cursor = PieceCursor {
        pieces,
        index: 0,
        offset: 0,
    };
    cursor.skip(header_len);
    for (m, &len) in messages.iter_mut().zip(lens) {
        m.payload = cursor.take(len as usize);
    }
    Ok(())
}

/// A read position in a body held as pieces; callers never read past the end (the
/// lengths were checked against the body's size).
struct PieceCursor<'a> {
    pieces: &'a [Bytes],
    index: usize,
    offset: usize,
}

impl PieceCursor<'_> {
    /// Moves past the exhausted pieces to where the next byte is.
    fn settle(&mut self) {
        while self
            .pieces
            .get(self.index)
            .is_some_and(|p| self.offset >= p.len())
        {
            self.offset -= self.pieces[self.index].len();
            self.index += 1;
        }
    }

    fn skip(&mut self, n: usize) {
        self.offset += n;
        self.settle();
    }

    /// The next `n` bytes: a slice of one piece, or a copy when they straddle pieces.
    fn take(&mut self, n: usize) -> Bytes {
        if n == 0 {
            return Bytes::new();
        }
        let Some(piece) = self.pieces.get(self.index) else {
            return Bytes::new();
        };
        if self.offset + n <= piece.len() {
            let slice = piece.slice(self.offset..self.offset + n);
            self.skip(n);
            return slice;
        }
        let mut copy = Vec::with_capacity(n);
        while copy.len() < n {
            let Some(piece) = self.pieces.get(self.index) else {
                break;
            };
            let here = (n - copy.len()).min(piece.len() - self.offset);
            copy.extend_from_slice(&piece[self.offset..self.offset + here]);
            self.skip(here);
        }
        Bytes::from(copy)
    }
}

/// Decodes a `Deliver` frame laid out as [`encode`] writes it (the hot path: no serde
/// machinery, envelopes built in place, one topic string per run of equal topics).
/// `None` for anything else, which then goes through the general decoder (and its
/// error messages).
fn decode_deliver_fast(body: &Bytes) -> Option<Result<Deliver, WireError>> {
    let (mut deliver, lens, header_len) = deliver_header_fast(body)?;
    let body = std::slice::from_ref(body);
    Some(attach_payloads(body, header_len, &mut deliver.messages, &lens).map(|()| deliver))
}

/// The header of a `Deliver` frame laid out as [`encode`] writes it, from the front of
/// `body` (which may end anywhere after the header): the frame with empty payloads,
/// each message's payload length, and the header's length. `None` if `body` does not
/// start with such a header.
fn deliver_header_fast(body: &[u8]) -> Option<(Deliver, Vec<u32>, usize)> {
    use rmp::decode as mp;
    fn str_of<'a>(rd: &mut &'a [u8]) -> Option<&'a str> {
        std::str::from_utf8(str_bytes(rd)?).ok()
    }
    fn string(rd: &mut &[u8]) -> Option<String> {
        str_of(rd).map(str::to_owned)
    }
    let mut rd = body;
    if mp::read_map_len(&mut rd).ok()? != 1 || str_of(&mut rd)? != "Deliver" {
        return None;
    }
    if mp::read_array_len(&mut rd).ok()? != 3 {
        return None;
    }
    let group = string(&mut rd)?;
    let first_link_seq: u64 = mp::read_int(&mut rd).ok()?;
    let count = mp::read_array_len(&mut rd).ok()? as usize;
    // Beyond the limit the general decoder gives the error.
    if count > MAX_DELIVER_MESSAGES {
        return None;
    }
    let mut messages: Vec<Envelope> = Vec::with_capacity(count);
    let mut lens = Vec::with_capacity(count);
    let mut topics = TopicCache::default();
    for _ in 0..count {
        // [id, topic, key, tags, headers, publish time, payload length], id = [producer, seq]
        let [0x97, 0x92, after @ ..] = rd else {
            // A continuation entry: the payload length alone.
            let len = u32::try_from(get_uint(&mut rd)?).ok()?;
            let next = next_envelope(messages.last()?)?;
            messages.push(next);
            lens.push(len);
            continue;
        };
        rd = after;
        let id = MessageId {
            producer: get_uint(&mut rd)?,
            seq: get_uint(&mut rd)?,
        };
        let topic = topics.shared_raw(str_bytes(&mut rd)?)?;
        let extras = match rd {
            // No key, tags or headers: the usual case.
            [0xc0, 0x90, 0x90, after @ ..] => {
                rd = after;
                None
            }
            _ => {
                let key = match rd.first() {
                    Some(0xc0) => {
                        rd = &rd[1..];
                        None
                    }
                    _ => Some(string(&mut rd)?),
                };
                let tags = (0..mp::read_array_len(&mut rd).ok()?)
                    .map(|_| string(&mut rd))
                    .collect::<Option<Vec<_>>>()?;
                let mut headers = Vec::new();
                for _ in 0..mp::read_array_len(&mut rd).ok()? {
                    if mp::read_array_len(&mut rd).ok()? != 2 {
                        return None;
                    }
                    headers.push((string(&mut rd)?, string(&mut rd)?));
                }
                Extras::boxed(key, tags, headers)
            }
        };
        messages.push(Envelope {
            id,
            topic,
            publish_time_ms: get_uint(&mut rd)?,
            payload: Bytes::new(),
            extras,
        });
        lens.push(u32::try_from(get_uint(&mut rd)?).ok()?);
    }
    let header_len = body.len() - rd.len();
    let deliver = Deliver {
        group,
        first_link_seq,
        messages,
    };
    Some((deliver, lens, header_len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::FrameDecoder;
    use proptest::prelude::*;

    #[test]
    fn an_envelope_stays_small() {
        // Envelopes are moved from the decoded frame to the delivery queue to the
        // application's batch; the rare fields are boxed to keep those moves short.
        assert!(std::mem::size_of::<Envelope>() <= 80);
    }

    fn roundtrip(frame: &Frame) -> Frame {
        let mut out = BytesMut::new();
        encode(frame, &mut out, 1 << 20).expect("encode");
        let mut dec = FrameDecoder::new(1 << 20);
        dec.extend(&out);
        let got = dec.next_frame().expect("decode").expect("complete");
        assert_eq!(dec.buffered(), 0);
        got
    }

    fn envelope() -> impl Strategy<Value = Envelope> {
        (
            any::<u64>(),
            any::<u64>(),
            "[a-z.]{1,20}",
            proptest::option::of("[a-z0-9-]{0,12}"),
            proptest::collection::vec("[a-z]{1,5}", 0..3),
            proptest::collection::vec(("[a-z]{1,5}", ".{0,8}"), 0..3),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(
                |(producer, seq, topic, key, tags, headers, t, payload)| Envelope {
                    id: MessageId { producer, seq },
                    topic: topic.into(),
                    publish_time_ms: t,
                    payload: Bytes::from(payload),
                    extras: Extras::boxed(key, tags, headers),
                },
            )
    }

    /// Messages as one publish batch makes them: consecutive ids and the same fields
    /// as `base`, except where `breaks` gives a message its own time or skips an id.
    fn batch_of(base: &Envelope, payloads: &[Vec<u8>], breaks: &[(bool, bool)]) -> Vec<Envelope> {
        let mut seq = base.id.seq;
        let mut messages = Vec::new();
        for (i, payload) in payloads.iter().enumerate() {
            let (new_time, skip) = breaks.get(i).copied().unwrap_or_default();
            seq = seq.wrapping_add(1 + u64::from(skip));
            messages.push(Envelope {
                id: MessageId {
                    producer: base.id.producer,
                    seq,
                },
                publish_time_ms: base.publish_time_ms.wrapping_add(u64::from(new_time)),
                payload: Bytes::from(payload.clone()),
                ..base.clone()
            });
        }
        messages
    }

    /// The entries of an encoded `Deliver` frame as the general decoder reads them.
    fn entries_of(out: &[u8]) -> Vec<DeliverEntry> {
        let mut rd = &out[LENGTH_PREFIX..];
        match rmp_serde::decode::from_read::<_, FrameHeader>(&mut rd) {
            Ok(FrameHeader::Deliver { messages, .. }) => messages,
            other => panic!("not a Deliver header: {other:?}"),
        }
    }

    fn deliver_of(messages: Vec<Envelope>) -> Frame {
        Frame::Deliver(Deliver {
            group: "g".into(),
            first_link_seq: 1,
            messages,
        })
    }

    proptest! {
        /// A publish batch's messages after the first travel as continuation entries,
        /// and both decoders give back the same messages.
        #[test]
        fn batch_runs_travel_as_continuations(base in envelope(), payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..30), breaks in proptest::collection::vec(any::<(bool, bool)>(), 0..30)) {
            let messages = batch_of(&base, &payloads, &breaks);
            let frame = deliver_of(messages.clone());
            prop_assert_eq!(roundtrip(&frame), frame.clone());
            let mut out = BytesMut::new();
            encode(&frame, &mut out, 1 << 24).expect("encodes");
            let body = out.clone().freeze().slice(LENGTH_PREFIX..);
            let fast = decode_deliver_fast(&body).expect("fast path taken").expect("decodes");
            prop_assert_eq!(Frame::Deliver(fast), decode_general(body).expect("decodes"));
            for (i, entry) in entries_of(&out).iter().enumerate() {
                let continues = i > 0
                    && messages[i].id.seq == messages[i - 1].id.seq.wrapping_add(1)
                    && messages[i].id.seq != 0
                    && messages[i].publish_time_ms == messages[i - 1].publish_time_ms;
                prop_assert_eq!(matches!(entry, DeliverEntry::Next(_)), continues, "entry {}", i);
            }
        }

        #[test]
        fn deliver_roundtrips(group in "[a-z]{1,10}", first in any::<u64>(), messages in proptest::collection::vec(envelope(), 0..20)) {
            let frame = Frame::Deliver(Deliver { group, first_link_seq: first, messages });
            prop_assert_eq!(roundtrip(&frame), frame);
        }

        /// The hand-written Deliver decoder reads what serde reads.
        #[test]
        fn fast_deliver_decoder_matches_serde(group in "[a-z]{1,10}", first in any::<u64>(), messages in proptest::collection::vec(envelope(), 0..20)) {
            let frame = Frame::Deliver(Deliver { group, first_link_seq: first, messages });
            let mut out = BytesMut::new();
            encode(&frame, &mut out, 1 << 24).expect("encodes");
            let body = out.freeze().slice(LENGTH_PREFIX..);
            let fast = decode_deliver_fast(&body).expect("fast path taken").expect("decodes");
            let slow = decode_general(body).expect("decodes");
            prop_assert_eq!(Frame::Deliver(fast), slow);
        }

        /// Truncated or corrupted Deliver headers never panic the fast decoder.
        #[test]
        fn fast_deliver_decoder_survives_damage(messages in proptest::collection::vec(envelope(), 1..5), cut in 0usize..400, flip in 0usize..400, byte in any::<u8>()) {
            let frame = Frame::Deliver(Deliver { group: "g".into(), first_link_seq: 1, messages });
            let mut out = BytesMut::new();
            encode(&frame, &mut out, 1 << 24).expect("encodes");
            let mut body = out[LENGTH_PREFIX..].to_vec();
            if flip < body.len() { body[flip] = byte; }
            body.truncate(cut.min(body.len()));
            let body = Bytes::from(body);
            let _ = decode_deliver_fast(&body);
            let _ = decode_body(body);
        }

        /// The pre-encoded path writes exactly what the serde path writes.
        #[test]
        fn pre_encoded_deliver_is_byte_identical(group in "[a-z]{1,10}", first in any::<u64>(), messages in proptest::collection::vec(envelope(), 0..20)) {
            let fields: Vec<Vec<u8>> = messages
                .iter()
                .map(|m| {
                    let tuple = (&*m.topic, m.key(), m.tags(), m.headers(), m.publish_time_ms);
                    let mut bytes = rmp_serde::to_vec(&tuple).expect("encodes");
                    prop_assert_eq!(bytes[0], 0x95, "a fixarray of five");
                    bytes.remove(0);
                    Ok(bytes)
                })
                .collect::<Result<_, TestCaseError>>()?;
            let pre: Vec<PreEncoded<'_>> = messages
                .iter()
                .zip(&fields)
                .map(|(m, f)| PreEncoded { id: m.id, fields: f, payload: &m.payload, owner: &m.payload })
                .collect();
            let mut spliced = BytesMut::new();
            encode_deliver(&group, first, &pre, &mut spliced, 1 << 24).expect("encodes");
            let mut reference = BytesMut::new();
            let frame = Frame::Deliver(Deliver { group, first_link_seq: first, messages });
            encode(&frame, &mut reference, 1 << 24).expect("encodes");
            prop_assert_eq!(&spliced[..], &reference[..]);
        }

        #[test]
        fn ack_roundtrips(upto in any::<u64>(), extra in proptest::collection::vec(any::<u64>(), 0..50)) {
            let frame = Frame::Ack(Ack { upto, extra });
            prop_assert_eq!(roundtrip(&frame), frame);
        }

        #[test]
        fn split_stream_yields_same_frames(messages in proptest::collection::vec(envelope(), 1..10), cut in 1usize..64) {
            let frames: Vec<Frame> = messages.into_iter().enumerate().map(|(i, m)| Frame::Deliver(Deliver { group: "g".into(), first_link_seq: i as u64, messages: vec![m] })).collect();
            let mut out = BytesMut::new();
            for f in &frames { encode(f, &mut out, 1 << 20).expect("encode"); }
            let mut dec = FrameDecoder::new(1 << 20);
            let mut got = Vec::new();
            for chunk in out.chunks(cut) {
                dec.extend(chunk);
                while let Some(f) = dec.next_frame().expect("decode") { got.push(f); }
            }
            dec.finish().expect("no leftovers");
            prop_assert_eq!(got, frames);
        }

        /// Shared chunks of any sizes, mixed with copied ones, yield the same frames.
        #[test]
        fn shared_chunks_yield_same_frames(messages in proptest::collection::vec(envelope(), 1..10), cuts in proptest::collection::vec((1usize..700, any::<bool>()), 1..40)) {
            let frames: Vec<Frame> = messages.into_iter().enumerate().map(|(i, m)| Frame::Deliver(Deliver { group: "g".into(), first_link_seq: i as u64, messages: vec![m] })).collect();
            let mut out = BytesMut::new();
            for f in &frames { encode(f, &mut out, 1 << 20).expect("encode"); }
            let mut rest = out.freeze();
            let mut dec = FrameDecoder::new(1 << 20);
            let mut got = Vec::new();
            let mut cuts = cuts.into_iter().cycle();
            while !rest.is_empty() {
                let (cut, shared) = cuts.next().expect("cycles");
                let chunk = rest.split_to(cut.min(rest.len()));
                if shared { dec.extend_bytes(chunk) } else { dec.extend(&chunk) }
                while let Some(f) = dec.next_frame().expect("decode") { got.push(f); }
            }
            dec.finish().expect("no leftovers");
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut dec = FrameDecoder::new(1024);
            dec.extend(&bytes);
            while let Ok(Some(_)) = dec.next_frame() {}
        }

        #[test]
        fn truncated_frames_are_incomplete_not_errors(messages in proptest::collection::vec(envelope(), 1..4), keep in 0usize..100) {
            let frame = Frame::Deliver(Deliver { group: "g".into(), first_link_seq: 0, messages });
            let mut out = BytesMut::new();
            encode(&frame, &mut out, 1 << 20).expect("encode");
            let keep = keep.min(out.len() - 1);
            let mut dec = FrameDecoder::new(1 << 20);
            dec.extend(&out[..keep]);
            prop_assert!(dec.next_frame().expect("no error").is_none());
            let truncated = matches!(dec.finish(), Err(WireError::Truncated { .. }));
            prop_assert!(truncated || keep == 0);
        }
    }

    #[test]
    fn a_frame_whole_in_a_shared_chunk_is_not_copied_and_a_cut_one_is_finished() {
        let msg = |seq| Envelope {
            id: MessageId { producer: 1, seq },
            topic: "t".into(),
            publish_time_ms: 0,
            // Chunks this large are kept shared (short ones are copied together).
            payload: Bytes::from(vec![seq as u8; 5000]),
            extras: None,
        };
        let mut out = BytesMut::new();
        for seq in 0..2 {
            let frame = Frame::Deliver(Deliver {
                group: "g".into(),
                first_link_seq: seq,
                messages: vec![msg(seq)],
            });
            encode(&frame, &mut out, 1 << 20).expect("encodes");
        }
        let mut chunk = out.freeze();
        let tail = chunk.split_off(chunk.len() - 10);
        let mut dec = FrameDecoder::new(1 << 20);
        dec.extend_bytes(chunk.clone());
        let Some(Frame::Deliver(first)) = dec.next_frame().expect("decodes") else {
            panic!("first frame whole in the chunk")
        };
        let range = chunk.as_ptr_range();
        assert!(
            range.contains(&first.messages[0].payload.as_ptr()),
            "a slice of the chunk"
        );
        assert!(dec.next_frame().expect("incomplete").is_none());
        assert!(dec.finish().is_err(), "a frame is unfinished");
        dec.extend_bytes(tail);
        let Some(Frame::Deliver(second)) = dec.next_frame().expect("decodes") else {
            panic!("second frame completed")
        };
        assert_eq!(second.messages[0].payload, Bytes::from(vec![1u8; 5000]));
        dec.finish().expect("nothing left");
    }

    #[test]
    fn hand_written_integers_match_rmp_at_every_width_boundary() {
        for v in [
            0u64,
            1,
            0x7f,
            0x80,
            0xff,
            0x100,
            0xffff,
            0x1_0000,
            0xffff_ffff,
            1 << 32,
            u64::MAX,
        ] {
            let mut ours = [0u8; 9];
            let n = put_uint(&mut ours, v);
            let mut theirs = Vec::new();
            rmp::encode::write_uint(&mut theirs, v).expect("vec");
            assert_eq!(&ours[..n], &theirs[..], "{v:#x}");
            let mut rd = &theirs[..];
            assert_eq!(get_uint(&mut rd), Some(v), "{v:#x}");
            assert!(rd.is_empty());
            assert_eq!(get_uint(&mut &theirs[..n - 1]), None, "truncated {v:#x}");
        }
    }

    #[test]
    fn messages_of_one_topic_share_its_string() {
        let msg = |seq, topic: &str| Envelope {
            id: MessageId { producer: 1, seq },
            topic: topic.into(),
            publish_time_ms: 0,
            payload: Bytes::from_static(b"x"),
            extras: None,
        };
        let frame = Frame::Deliver(Deliver {
            group: "g".into(),
            first_link_seq: 0,
            messages: vec![msg(1, "a"), msg(2, "a"), msg(3, "b")],
        });
        let Frame::Deliver(d) = roundtrip(&frame) else {
            panic!("not a Deliver")
        };
        assert!(std::sync::Arc::ptr_eq(
            &d.messages[0].topic,
            &d.messages[1].topic
        ));
        assert_eq!(&*d.messages[2].topic, "b");
        assert_eq!(Frame::Deliver(d), frame);
    }

    #[test]
    fn control_frames_roundtrip() {
        let frames = vec![
            Frame::Hello(Hello {
                version: 1,
                identity: "a".into(),
                incarnation: 7,
                role: Role::Peer,
                listen_addrs: vec!["127.0.0.1:1".parse().expect("addr")],
                zone: Some("z".into()),
            }),
            Frame::Request {
                id: 3,
                body: DirRequest::Register(Subscription {
                    topic: "t".into(),
                    group: "g".into(),
                }),
            },
            Frame::Response {
                id: 3,
                body: DirResponse::Route(Route {
                    topic: "t".into(),
                    version: 2,
                    groups: vec![GroupRoute {
                        group: "g".into(),
                        members: vec![],
                    }],
                }),
            },
            Frame::Credit(Credit { window: 10 }),
        ];
        for f in frames {
            assert_eq!(roundtrip(&f), f);
        }
    }

    #[test]
    fn a_payload_inside_its_owner_is_shared_and_one_outside_is_copied() {
        let owner = Bytes::from(vec![7u8; 64]);
        let id = MessageId {
            producer: 1,
            seq: 1,
        };
        let inside = PreEncoded {
            id,
            fields: &[],
            payload: &owner[8..40],
            owner: &owner,
        };
        let shared = inside.shared_payload();
        assert_eq!(shared.as_ptr(), owner[8..].as_ptr(), "a slice, not a copy");
        assert_eq!(shared.len(), 32);
        let elsewhere = vec![7u8; 32];
        let outside = PreEncoded {
            id,
            fields: &[],
            payload: &elsewhere,
            owner: &owner,
        };
        let copied = outside.shared_payload();
        assert_eq!(&copied[..], &elsewhere[..]);
        assert_ne!(copied.as_ptr(), elsewhere.as_ptr());
        let straddling = PreEncoded {
            id,
            fields: &[],
            payload: &owner[..],
            owner: &owner.slice(1..),
        };
        assert_eq!(straddling.shared_payload().len(), 64);
    }

    #[test]
    fn oversized_pre_encoded_deliver_is_refused_and_leaves_the_buffer() {
        let payload = Bytes::from(vec![0u8; 100]);
        let fields = rmp_serde::to_vec(&(
            "t",
            None::<String>,
            Vec::<String>::new(),
            Vec::<(String, String)>::new(),
            1u64,
        ))
        .expect("encodes");
        let pre = [PreEncoded {
            id: MessageId {
                producer: 1,
                seq: 1,
            },
            fields: &fields[1..],
            payload: &payload,
            owner: &payload,
        }];
        let mut out = BytesMut::from(&b"kept"[..]);
        let err = encode_deliver("g", 1, &pre, &mut out, 64).expect_err("too large");
        assert!(
            matches!(err, WireError::FrameTooLarge { limit: 64, .. }),
            "{err}"
        );
        assert_eq!(&out[..], b"kept");
    }

    #[test]
    fn oversized_frame_refused_on_encode() {
        let frame = Frame::Deliver(Deliver {
            group: "g".into(),
            first_link_seq: 0,
            messages: vec![Envelope {
                id: MessageId {
                    producer: 1,
                    seq: 1,
                },
                topic: "t".into(),
                publish_time_ms: 0,
                payload: Bytes::from(vec![0u8; 2048]),
                extras: None,
            }],
        });
        let mut out = BytesMut::from(&b"keep"[..]);
        assert!(matches!(
            encode(&frame, &mut out, 1024),
            Err(WireError::FrameTooLarge { .. })
        ));
        assert_eq!(&out[..], b"keep");
    }

    /// A frame whose entries are all continuations of each other, as bytes.
    fn continuation_frame(first: &[u8], entries: usize) -> BytesMut {
        let mut header = Vec::new();
        rmp::encode::write_map_len(&mut header, 1).expect("writes");
        rmp::encode::write_str(&mut header, "Deliver").expect("writes");
        rmp::encode::write_array_len(&mut header, 3).expect("writes");
        rmp::encode::write_str(&mut header, "g").expect("writes");
        rmp::encode::write_uint(&mut header, 1).expect("writes");
        rmp::encode::write_array_len(&mut header, entries as u32).expect("writes");
        header.extend_from_slice(first);
        header.resize(header.len() + entries - usize::from(!first.is_empty()), 0); // zero-length payloads
        let mut out = BytesMut::new();
        out.put_u32(header.len() as u32);
        out.extend_from_slice(&header);
        out
    }

    fn decode_one(frame: &[u8]) -> Result<Option<Frame>, WireError> {
        let mut dec = FrameDecoder::new(1 << 20);
        dec.extend(frame);
        dec.next_frame()
    }

    #[test]
    fn continuations_need_a_message_before_them_and_a_next_id() {
        assert!(matches!(
            decode_one(&continuation_frame(&[], 3)),
            Err(WireError::Malformed(_))
        ));
        let mut last = Envelope {
            id: MessageId {
                producer: 1,
                seq: u64::MAX,
            },
            topic: "t".into(),
            publish_time_ms: 0,
            payload: Bytes::new(),
            extras: None,
        };
        let fields = envelope_fields(&last);
        let mut full = vec![0x97, 0x92, 0x01, 0xcf];
        full.extend_from_slice(&u64::MAX.to_be_bytes());
        full.extend_from_slice(&fields);
        full.push(0x00);
        let err = decode_one(&continuation_frame(&full, 2)).expect_err("past the last seq");
        assert!(err.to_string().contains("continuation"), "{err}");
        last.id.seq -= 1;
        full[4..12].copy_from_slice(&last.id.seq.to_be_bytes());
        let Some(Frame::Deliver(d)) = decode_one(&continuation_frame(&full, 2)).expect("decodes")
        else {
            panic!("a Deliver frame");
        };
        assert_eq!(d.messages[1].id.seq, u64::MAX);
        assert_eq!(d.messages[1].topic, last.topic);
    }

    #[test]
    fn a_frame_of_more_messages_than_the_limit_is_refused() {
        let full = [
            0x97, 0x92, 0x01, 0x01, 0xa1, b't', 0xc0, 0x90, 0x90, 0x00, 0x00,
        ];
        let at_limit =
            decode_one(&continuation_frame(&full, MAX_DELIVER_MESSAGES)).expect("at the limit");
        assert!(
            matches!(at_limit, Some(Frame::Deliver(d)) if d.messages.len() == MAX_DELIVER_MESSAGES)
        );
        let err =
            decode_one(&continuation_frame(&full, MAX_DELIVER_MESSAGES + 1)).expect_err("over");
        assert!(err.to_string().contains("more than"), "{err}");
    }

    #[test]
    fn deliver_with_wrong_payload_length_is_malformed() {
        let frame = Frame::Deliver(Deliver {
            group: "g".into(),
            first_link_seq: 0,
            messages: vec![Envelope {
                id: MessageId {
                    producer: 1,
                    seq: 1,
                },
                topic: "t".into(),
                publish_time_ms: 0,
                payload: Bytes::from_static(b"abc"),
                extras: None,
            }],
        });
        let mut out = BytesMut::new();
        encode(&frame, &mut out, 1024).expect("encode");
        // Drop the last payload byte but fix up the length prefix.
        out.truncate(out.len() - 1);
        let len = (out.len() - LENGTH_PREFIX) as u32;
        out[..4].copy_from_slice(&len.to_be_bytes());
        let mut dec = FrameDecoder::new(1024);
        dec.extend(&out);
        assert!(matches!(dec.next_frame(), Err(WireError::Malformed(_))));
    }
}
