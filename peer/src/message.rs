//! Messages as the application builds them, and their stored form in the outbox.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use weft_proto::wire::{Envelope, MessageId};

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
pub(crate) fn encode_stored(topic: &str, msg: &Message, publish_time_ms: u64) -> Bytes {
    let head = StoredHead {
        topic: topic.into(),
        key: msg.key.as_deref().map(Into::into),
        tags: msg.tags.clone(),
        headers: msg.headers.clone(),
        publish_time_ms,
    };
    // One allocation: the head is serialized in place after a length placeholder.
    let estimate = 32 + topic.len() + msg.key.as_ref().map_or(0, String::len);
    let mut out = BytesMut::with_capacity(4 + estimate + msg.payload.len());
    out.put_u32(0);
    let mut writer = out.writer();
    // Serializing plain strings and integers into memory cannot fail.
    let _ = rmp_serde::encode::write(&mut writer, &head);
    let mut out = writer.into_inner();
    let head_len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&head_len.to_be_bytes());
    out.extend_from_slice(&msg.payload);
    out.freeze()
}

/// Decodes an outbox record body into the envelope to send; the payload is a slice of
/// `stored`, not a copy. `None` if the record is not a valid stored message.
pub(crate) fn decode_stored(id: MessageId, stored: &Bytes) -> Option<Envelope> {
    let len = u32::from_be_bytes(stored.get(..4)?.try_into().ok()?) as usize;
    let head_bytes = stored.get(4..4 + len)?;
    let head: StoredHead<'_> = rmp_serde::from_slice(head_bytes).ok()?;
    Some(Envelope {
        id,
        topic: head.topic.into_owned(),
        key: head.key.map(|k| k.into_owned()),
        tags: head.tags,
        headers: head.headers,
        publish_time_ms: head.publish_time_ms,
        payload: stored.slice(4 + len..),
    })
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

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn stored_roundtrip(topic in "[a-z.]{1,20}", key in proptest::option::of("[a-z0-9]{0,10}"), payload in proptest::collection::vec(any::<u8>(), 0..200), t in any::<u64>()) {
            let mut m = Message::new(payload.clone()).tag("x").header("h", "v");
            if let Some(k) = &key { m = m.key(k.clone()); }
            let stored = encode_stored(&topic, &m, t);
            let id = MessageId { producer: 1, seq: 2 };
            let env = decode_stored(id, &stored).expect("decodes");
            prop_assert_eq!(env.topic, topic);
            prop_assert_eq!(env.key, key);
            prop_assert_eq!(&env.payload[..], &payload[..]);
            prop_assert_eq!(env.publish_time_ms, t);
        }

        #[test]
        fn garbage_is_rejected_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_stored(MessageId { producer: 0, seq: 0 }, &Bytes::from(bytes));
        }
    }
}
