//! Messages as the application builds them, and their stored form in the outbox.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use weft_proto::wire::{Envelope, Extras, MessageId};

/// A message to publish: an opaque payload plus optional key, tags and headers.
///
/// ```
/// let m = weft_peer::Message::new("hello").key("user-42").tag("eu").header("trace", "abc");
/// assert_eq!(m.payload(), "hello".as_bytes());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub(crate) payload: Bytes,
    pub(crate) key: Option<String>,
    pub(crate) tags: Vec<String>,
    pub(crate) headers: Vec<(String, String)>,
}

impl Message {
    /// A message carrying `payload` (not copied if it is already `Bytes`).
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self {
            payload: payload.into(),
            ..Self::default()
        }
    }

    /// Ordering key: messages with the same key reach the same member of each group, in
    /// publish order.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }
}

/// Metadata stored in front of the payload in an outbox record.
#[derive(Serialize, Deserialize)]
struct StoredHead<'a> {
    #[serde(borrow)]
    topic: std::borrow::Cow<'a, str>,
    key: Option<std::borrow::Cow<'a, str>>,
    tags: Vec<String>,
    headers: Vec<(String, String)>,
    publish_time_ms: u64,
}

/// Encodes a message for the outbox: `u32` head length, MessagePack head, payload.
#[cfg(test)]
pub(crate) fn encode_stored(topic: &str, msg: &Message, publish_time_ms: u64) -> Bytes {
    let mut out = Vec::with_capacity(stored_len(topic, msg, publish_time_ms, true));
    append_stored(&mut out, topic, msg, publish_time_ms);
    Bytes::from(out)
}

/// The exact length of `msg`'s record as [`append_stored`] writes it (without the
/// payload unless `with_payload`). Exact, not an estimate: a `Vec` filled to its
/// capacity becomes a `Bytes` without a second allocation for its reference count.
pub(crate) fn stored_len(
    topic: &str,
    msg: &Message,
    publish_time_ms: u64,
    with_payload: bool,
) -> usize {
    let str_len = |s: &str| str_marker_len(s.len()) + s.len();
    let tags: usize = msg.tags.iter().map(|t| str_len(t)).sum();
    let headers: usize = msg
        .headers
        .iter()
        .map(|(name, value)| 1 + str_len(name) + str_len(value))
        .sum();
    4 + 1
        + str_len(topic)
        + msg.key.as_deref().map_or(1, str_len)
        + array_marker_len(msg.tags.len())
        + tags
        + array_marker_len(msg.headers.len())
        + headers
        + encoded_uint_len(publish_time_ms)
        + msg.payload.len() * usize::from(with_payload)
}

/// MessagePack marker bytes of a string of `len` bytes (as `rmp` writes them).
fn str_marker_len(len: usize) -> usize {
    match len {
        0..32 => 1,
        32..256 => 2,
        256..65_536 => 3,
        _ => 5,
    }
}

/// MessagePack marker bytes of an array of `len` elements.
fn array_marker_len(len: usize) -> usize {
    match len {
        0..16 => 1,
        16..65_536 => 3,
        _ => 5,
    }
}

/// MessagePack bytes of the unsigned integer `n` (the shortest form, as `rmp` writes).
fn encoded_uint_len(n: u64) -> usize {
    match n {
        0..128 => 1,
        128..256 => 2,
        256..65_536 => 3,
        65_536..4_294_967_296 => 5,
        _ => 9,
    }
}

/// Appends `msg` as [`encode_stored`] encodes it to `buf` and returns where it is, so
/// that the records of a batch share one buffer (one allocation, and `Bytes` slices of
/// it for the bodies).
pub(crate) fn append_stored(
    buf: &mut Vec<u8>,
    topic: &str,
    msg: &Message,
    publish_time_ms: u64,
) -> std::ops::Range<usize> {
    let start = buf.len();
    append_stored_head(buf, topic, msg, publish_time_ms);
    buf.extend_from_slice(&msg.payload);
    start..buf.len()
}

/// Appends the length prefix and head of `msg`'s record: the record without its
/// payload.
fn append_stored_head(buf: &mut Vec<u8>, topic: &str, msg: &Message, publish_time_ms: u64) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    write_stored_head(buf, topic, msg, publish_time_ms);
    let head_len = (buf.len() - start - 4) as u32;
    buf[start..start + 4].copy_from_slice(&head_len.to_be_bytes());
}

/// Payloads from this size on stay the application's buffer when published with
/// `Memory` durability: the record's head is written without them and they follow it
/// as its tail ([`crate::outbox::MemoryRecord`]) instead of being copied behind it.
/// (At 16 KiB the copy and the page faults of its fresh buffer were a fifth of the
/// sending thread.) Frames send payloads of this size without a copy too.
pub(crate) const SEPARATE_PAYLOAD_MIN: usize = 8 * 1024;

/// Encodes the messages of one publish for the outbox. A message without key, tags or
/// headers (the usual case) has the same stored head as every other such message of
/// the publish, so that head is written once and copied in front of each payload
/// (writing it field by field per message was 6 % of a 128-byte throughput profile).
pub(crate) struct StoredEncoder<'a> {
    topic: &'a str,
    publish_time_ms: u64,
    /// Length prefix and head of a message without key, tags or headers (`None` for a
    /// publish of one message, whose head is written in place).
    plain: Option<Vec<u8>>,
}

impl<'a> StoredEncoder<'a> {
    /// An encoder for the messages of one batch.
    pub(crate) fn new(topic: &'a str, publish_time_ms: u64) -> Self {
        let plain_len = stored_len(topic, &Message::default(), publish_time_ms, false);
        let mut plain = Vec::with_capacity(plain_len);
        append_stored(&mut plain, topic, &Message::default(), publish_time_ms);
        Self {
            topic,
            publish_time_ms,
            plain: Some(plain),
        }
    }

    /// An encoder for a single message: nothing is prepared to be copied.
    pub(crate) fn single(topic: &'a str, publish_time_ms: u64) -> Self {
        Self {
            topic,
            publish_time_ms,
            plain: None,
        }
    }

    /// Appends `msg` to `buf` exactly as [`append_stored`] does (without the payload
    /// unless `with_payload`: the head of a record whose payload is kept apart);
    /// returns where it is.
    pub(crate) fn append(
        &self,
        buf: &mut Vec<u8>,
        msg: &Message,
        with_payload: bool,
    ) -> std::ops::Range<usize> {
        let start = buf.len();
        let plain = msg.key.is_none() && msg.tags.is_empty() && msg.headers.is_empty();
        match &self.plain {
            Some(head) if plain => buf.extend_from_slice(head),
            _ => append_stored_head(buf, self.topic, msg, self.publish_time_ms),
        }
        if with_payload {
            buf.extend_from_slice(&msg.payload);
        }
        start..buf.len()
    }
}

/// Writes what `rmp_serde` writes for a [`StoredHead`] (a five-element array), by hand:
/// this runs once per published message. (Through `rmp`'s writers, each marker a
/// fallible `io::Write` call, this was ~310 instructions of a plain message's head.)
fn write_stored_head(w: &mut Vec<u8>, topic: &str, msg: &Message, publish_time_ms: u64) {
    put_array_len(w, 5);
    put_str(w, topic);
    match &msg.key {
        Some(key) => put_str(w, key),
        None => w.push(NIL),
    }
    put_array_len(w, msg.tags.len());
    for tag in &msg.tags {
        put_str(w, tag);
    }
    put_array_len(w, msg.headers.len());
    for (name, value) in &msg.headers {
        put_array_len(w, 2);
        put_str(w, name);
        put_str(w, value);
    }
    put_uint(w, publish_time_ms);
}

/// MessagePack's nil.
const NIL: u8 = 0xc0;

/// A MessagePack array header of `len` elements, as `rmp` writes it (the shortest form;
/// [`array_marker_len`] bytes).
fn put_array_len(w: &mut Vec<u8>, len: usize) {
    match len {
        0..16 => w.push(0x90 | len as u8),
        16..65_536 => {
            w.push(0xdc);
            w.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            w.push(0xdd);
            w.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }
}

/// A MessagePack string, as `rmp` writes it (the shortest marker; [`str_marker_len`]
/// bytes, then `s`).
fn put_str(w: &mut Vec<u8>, s: &str) {
    let len = s.len();
    match len {
        0..32 => w.push(0xa0 | len as u8),
        32..256 => w.extend_from_slice(&[0xd9, len as u8]),
        256..65_536 => {
            w.push(0xda);
            w.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            w.push(0xdb);
            w.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }
    w.extend_from_slice(s.as_bytes());
}

/// A MessagePack unsigned integer in its shortest form, as `rmp` writes it
/// ([`encoded_uint_len`] bytes).
fn put_uint(w: &mut Vec<u8>, n: u64) {
    match n {
        0..128 => w.push(n as u8),
        128..256 => w.extend_from_slice(&[0xcc, n as u8]),
        256..65_536 => {
            w.push(0xcd);
            w.extend_from_slice(&(n as u16).to_be_bytes());
        }
        65_536..4_294_967_296 => {
            w.push(0xce);
            w.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            w.push(0xcf);
            w.extend_from_slice(&n.to_be_bytes());
        }
    }
}

/// Decodes an outbox record body into the envelope to send; the payload is a slice of
/// `stored`, not a copy. `None` if the record is not a valid stored message.
pub(crate) fn decode_stored(id: MessageId, stored: &Bytes) -> Option<Envelope> {
    let len = u32::from_be_bytes(stored.get(..4)?.try_into().ok()?) as usize;
    let head_bytes = stored.get(4..4 + len)?;
    let head: StoredHead<'_> = rmp_serde::from_slice(head_bytes).ok()?;
    Some(Envelope {
        id,
        topic: head.topic.as_ref().into(),
        publish_time_ms: head.publish_time_ms,
        payload: stored.slice(4 + len..),
        extras: Extras::boxed(head.key.map(|k| k.into_owned()), head.tags, head.headers),
    })
}

/// Splits an outbox record into what a `Deliver` frame carries: the envelope fields
/// after the id, already MessagePack-encoded (the stored head without its array
/// marker), and the payload. The head is checked to hold exactly the fields of a
/// [`StoredHead`], with `topic` as its topic, so a bad record is never spliced into a
/// frame (the receiver would refuse the whole frame, again on every retry). `None` if
/// it is not valid.
pub(crate) fn stored_parts<'a>(stored: &'a [u8], topic: &str) -> Option<(&'a [u8], &'a [u8])> {
    let (head, end) = record_head(stored)?;
    let mut rest = head;
    if rmp::decode::read_array_len(&mut rest).ok()? != 5 {
        return None;
    }
    let fields = rest;
    check_stored_fields(strip_topic(rest, topic)?)?;
    Some((fields, &stored[end..]))
}

/// A stored record's head (after its `u32` length) and where the payload starts.
fn record_head(stored: &[u8]) -> Option<(&[u8], usize)> {
    let len = u32::from_be_bytes(stored.get(..4)?.try_into().ok()?) as usize;
    let end = 4usize.checked_add(len)?;
    Some((stored.get(4..end)?, end))
}

/// [`stored_parts`] for the records of one topic, faster for the usual record (no key,
/// tags or headers): its head is compared with the one expected instead of parsed.
pub(crate) struct RecordSplitter {
    topic: String,
    /// The head's array marker and topic, as [`write_stored_head`] writes them.
    prefix: Vec<u8>,
}

impl RecordSplitter {
    pub(crate) fn new(topic: &str) -> Self {
        let mut prefix = Vec::with_capacity(topic.len() + 6);
        let _ = rmp::encode::write_array_len(&mut prefix, 5);
        let _ = rmp::encode::write_str(&mut prefix, topic);
        Self {
            topic: topic.to_owned(),
            prefix,
        }
    }

    /// What [`stored_parts`] returns for `stored` and this topic.
    pub(crate) fn split<'a>(&self, stored: &'a [u8]) -> Option<(&'a [u8], &'a [u8])> {
        if let Some((head, end)) = record_head(stored) {
            if let Some([0xc0, 0x90, 0x90, time @ ..]) = head.strip_prefix(self.prefix.as_slice()) {
                if uint_len(time) == Some(time.len()) {
                    return Some((&head[1..], &stored[end..]));
                }
            }
        }
        stored_parts(stored, &self.topic)
    }
}

/// The length of the MessagePack unsigned integer at the start of `buf`, from its
/// marker alone (`None` if it is not one).
fn uint_len(buf: &[u8]) -> Option<usize> {
    match buf.first()? {
        0..=0x7f => Some(1),
        0xcc => Some(2),
        0xcd => Some(3),
        0xce => Some(5),
        0xcf => Some(9),
        _ => None,
    }
}

/// `rest` after its first field, if that is the string `topic`. Comparing the bytes
/// with a known topic also proves them UTF-8, without validating them per message.
fn strip_topic<'a>(mut rest: &'a [u8], topic: &str) -> Option<&'a [u8]> {
    (weft_proto::wire::str_bytes(&mut rest)? == topic.as_bytes()).then_some(rest)
}

/// Checks, without allocating, that `rest` is exactly key, tags, headers and publish
/// time as [`StoredHead`] encodes them after the topic.
fn check_stored_fields(rest: &[u8]) -> Option<()> {
    use rmp::decode as mp;
    fn str_at(mut buf: &[u8]) -> Option<&[u8]> {
        std::str::from_utf8(weft_proto::wire::str_bytes(&mut buf)?).ok()?;
        Some(buf)
    }
    let mut rest = match rest {
        // No key, tags or headers: the usual case, without the general walk.
        [0xc0, 0x90, 0x90, time @ ..] => time,
        _ => {
            let mut rest = match rest.first() {
                Some(0xc0) => &rest[1..], // no key
                _ => str_at(rest)?,
            };
            for _ in 0..mp::read_array_len(&mut rest).ok()? {
                rest = str_at(rest)?; // a tag
            }
            for _ in 0..mp::read_array_len(&mut rest).ok()? {
                if mp::read_array_len(&mut rest).ok()? != 2 {
                    return None;
                }
                rest = str_at(str_at(rest)?)?; // a header's name and value
            }
            rest
        }
    };
    let _: u64 = mp::read_int(&mut rest).ok()?;
    rest.is_empty().then_some(())
}

/// Stable 64-bit hash of an ordering key (FNV-1a: the same on every peer and version).
pub(crate) fn key_hash(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The hand-written MessagePack writers agree with `rmp` at every width's edges.
    #[test]
    fn msgpack_writers_match_rmp_at_every_width() {
        let edges = [0usize, 1, 15, 16, 31, 32, 255, 256, 65_535, 65_536, 70_000];
        for len in edges {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            put_array_len(&mut ours, len);
            rmp::encode::write_array_len(&mut theirs, len as u32).expect("vec");
            assert_eq!(ours, theirs, "array of {len}");
            let s = "x".repeat(len);
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            put_str(&mut ours, &s);
            rmp::encode::write_str(&mut theirs, &s).expect("vec");
            assert_eq!(ours, theirs, "string of {len}");
        }
        let uints = [
            0u64,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u32::MAX.into(),
            1 << 32,
            u64::MAX,
        ];
        for n in uints {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            put_uint(&mut ours, n);
            rmp::encode::write_uint(&mut theirs, n).expect("vec");
            assert_eq!(ours, theirs, "uint {n}");
        }
    }

    #[test]
    fn stored_parts_refuses_a_head_with_trailing_bytes() {
        let stored = encode_stored("t", &Message::new("p"), 5);
        let len = u32::from_be_bytes(stored[..4].try_into().expect("4 bytes")) as usize;
        let mut bad = Vec::from(&(len as u32 + 1).to_be_bytes()[..]);
        bad.extend_from_slice(&stored[4..4 + len]);
        bad.push(0xc0); // a stray nil inside the announced head
        bad.extend_from_slice(b"p");
        assert!(stored_parts(&bad, "t").is_none());
        assert!(stored_parts(&stored, "t").is_some());
        assert!(stored_parts(&stored, "u").is_none(), "another topic");
    }

    proptest! {
        #[test]
        fn stored_roundtrip(topic in "[a-z.]{1,20}", key in proptest::option::of("[a-z0-9]{0,10}"), payload in proptest::collection::vec(any::<u8>(), 0..200), t in any::<u64>()) {
            let mut m = Message::new(payload.clone()).tag("x").header("h", "v");
            if let Some(k) = &key { m = m.key(k.clone()); }
            let stored = encode_stored(&topic, &m, t);
            let id = MessageId { producer: 1, seq: 2 };
            let env = decode_stored(id, &stored).expect("decodes");
            prop_assert_eq!(&*env.topic, topic.as_str());
            prop_assert_eq!(env.key(), key.as_deref());
            prop_assert_eq!(&env.payload[..], &payload[..]);
            prop_assert_eq!(env.publish_time_ms, t);
        }

        /// `stored_len` is the length `append_stored` writes, for every field width.
        #[test]
        fn stored_len_is_exact(topic in "[a-z.]{1,300}", key in proptest::option::of("[a-z0-9]{0,300}"), tags in proptest::collection::vec("[a-z]{0,40}", 0..20), headers in proptest::collection::vec(("[a-z]{0,5}", "[a-z]{0,300}"), 0..20), payload_len in 0usize..300, t in prop_oneof![0u64..300, 60_000u64..70_000, any::<u64>()]) {
            let mut m = Message::new(vec![7u8; payload_len]);
            m.key = key;
            m.tags = tags;
            m.headers = headers;
            let mut buf = Vec::new();
            let record = append_stored(&mut buf, &topic, &m, t);
            prop_assert_eq!(stored_len(&topic, &m, t, true), record.len());
            prop_assert_eq!(stored_len(&topic, &m, t, false), record.len() - payload_len);
        }

        /// The hand-written head is what serde writes for a `StoredHead`.
        #[test]
        fn stored_head_matches_serde(topic in "[a-z.]{1,300}", key in proptest::option::of("[a-z0-9]{0,300}"), tags in proptest::collection::vec("[a-z]{0,5}", 0..20), headers in proptest::collection::vec(("[a-z]{0,5}", "[a-z]{0,40}"), 0..20), t in prop_oneof![0u64..300, 60_000u64..70_000, any::<u64>()]) {
            let mut m = Message::new("p");
            m.key = key;
            m.tags = tags;
            m.headers = headers;
            let mut buf = Vec::new();
            write_stored_head(&mut buf, &topic, &m, t);
            let head = StoredHead {
                topic: topic.as_str().into(),
                key: m.key.as_deref().map(Into::into),
                tags: m.tags.clone(),
                headers: m.headers.clone(),
                publish_time_ms: t,
            };
            prop_assert_eq!(&buf[..], &rmp_serde::to_vec(&head).expect("encodes")[..]);
        }

        /// The spliced parts decode, on the receiving side, to the same envelope.
        #[test]
        fn stored_parts_splice_into_an_equivalent_frame(topic in "[a-z.]{1,20}", key in proptest::option::of("[a-z0-9]{0,10}"), payload in proptest::collection::vec(any::<u8>(), 0..200), t in any::<u64>()) {
            let mut m = Message::new(payload.clone()).tag("x").header("h", "v");
            if let Some(k) = &key { m = m.key(k.clone()); }
            let stored = encode_stored(&topic, &m, t);
            let id = MessageId { producer: 3, seq: 9 };
            let (fields, body) = stored_parts(&stored, &topic).expect("valid");
            let mut frame = bytes::BytesMut::new();
            let pre = [weft_proto::wire::PreEncoded { id, fields, payload: body, owner: &stored }];
            weft_proto::wire::encode_deliver("g", 1, &pre, &mut frame, 1 << 20).expect("encodes");
            let mut decoder = weft_proto::wire::FrameDecoder::new(1 << 20);
            decoder.extend(&frame);
            let Some(weft_proto::wire::Frame::Deliver(d)) = decoder.next_frame().expect("decodes") else {
                return Err(TestCaseError::fail("not a Deliver"));
            };
            prop_assert_eq!(&d.messages[0], &decode_stored(id, &stored).expect("decodes"));
        }

        /// Topics of every string width are recognised, and only the link's own topic.
        #[test]
        fn stored_parts_takes_a_record_of_its_topic_only(topic in "[a-z.]{1,300}", key in proptest::option::of("[a-z]{1,5}")) {
            let mut m = Message::new("p");
            m.key = key;
            let stored = encode_stored(&topic, &m, 7);
            prop_assert!(stored_parts(&stored, &topic).is_some());
            let longer = format!("{topic}x");
            prop_assert!(stored_parts(&stored, &longer).is_none());
            prop_assert!(stored_parts(&stored, &topic[1..]).is_none());
        }

        /// The splitter's fast path agrees with `stored_parts` on every record.
        #[test]
        fn splitter_matches_stored_parts(topic in "[a-z.]{1,40}", other in "[a-z.]{1,40}", key in proptest::option::of("[a-z]{1,5}"), payload in proptest::collection::vec(any::<u8>(), 0..50), t in any::<u64>(), cut in 0usize..80, flip in 0usize..80, byte in any::<u8>()) {
            let mut m = Message::new(payload);
            m.key = key;
            let stored = encode_stored(&topic, &m, t).to_vec();
            let splitter = RecordSplitter::new(&topic);
            prop_assert_eq!(splitter.split(&stored), stored_parts(&stored, &topic));
            prop_assert!(splitter.split(&stored).is_some());
            prop_assert_eq!(RecordSplitter::new(&other).split(&stored), stored_parts(&stored, &other));
            let mut damaged = stored.clone();
            if flip < damaged.len() {
                damaged[flip] = byte;
            }
            damaged.truncate(cut.max(1));
            prop_assert_eq!(splitter.split(&damaged), stored_parts(&damaged, &topic));
        }

        #[test]
        fn encoder_writes_what_append_stored_writes(topic in "[a-z.]{1,40}", key in proptest::option::of("[a-z]{1,5}"), tag in any::<bool>(), payload in proptest::collection::vec(any::<u8>(), 0..50), t in any::<u64>()) {
            let mut m = Message::new(payload);
            m.key = key;
            if tag {
                m = m.tag("x");
            }
            let whole = encode_stored(&topic, &m, t);
            let splitter = RecordSplitter::new(&topic);
            for encoder in [StoredEncoder::new(&topic, t), StoredEncoder::single(&topic, t)] {
                let mut buf = vec![7u8];
                let at = encoder.append(&mut buf, &m, true);
                prop_assert_eq!(&buf[at], &whole[..]);
                // Without the payload: the head of the same record, which splits into
                // the same fields and nothing after them.
                let mut buf = vec![7u8];
                let at = encoder.append(&mut buf, &m, false);
                let head = &buf[at];
                prop_assert_eq!([head, &m.payload[..]].concat(), whole.to_vec());
                let (fields, rest) = splitter.split(head).expect("a valid head");
                prop_assert_eq!(Some(fields), splitter.split(&whole).map(|(f, _)| f));
                prop_assert!(rest.is_empty());
            }
        }

        #[test]
        fn stored_parts_refuses_garbage_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = stored_parts(&bytes, "t");
        }

        #[test]
        fn garbage_is_rejected_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_stored(MessageId { producer: 0, seq: 0 }, &Bytes::from(bytes));
        }
    }
}
