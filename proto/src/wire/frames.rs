//! The frames exchanged on Weft streams and the values they carry.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// The unique, stable id of a message: assigned by its producer, kept across retries
/// and restarts; the unit of deduplication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId {
    /// The producing peer's outbox id (random, persisted with its outbox).
    pub producer: u64,
    /// Sequence number within the producer; strictly increasing, never reused.
    pub seq: u64,
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}:{}", self.producer, self.seq)
    }
}

/// A message as it travels: routing metadata plus an opaque payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Message id.
    pub id: MessageId,
    /// Topic the message was published to (shared by the messages of one frame that
    /// have the same topic: decoding allocates it once per frame, not per message).
    pub topic: std::sync::Arc<str>,
    /// Publish time, milliseconds since the Unix epoch.
    pub publish_time_ms: u64,
    /// Opaque application bytes (a slice of the received frame; not copied).
    pub payload: Bytes,
    /// Key, tags and headers; `None` when the message has none (build it with
    /// [`Extras::boxed`]). Boxed because most messages have none: an envelope is moved
    /// several times on its way to the application, and this keeps it at 80 bytes
    /// instead of 144.
    pub extras: Option<Box<Extras>>,
}

/// The rarely used parts of an [`Envelope`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extras {
    /// Optional ordering key.
    pub key: Option<String>,
    /// Labels a subscription can filter on.
    pub tags: Vec<String>,
    /// Application headers.
    pub headers: Vec<(String, String)>,
}

impl Extras {
    /// The extras of a message, or `None` if it has no key, tags or headers (so that
    /// equal messages compare equal).
    pub fn boxed(
        key: Option<String>,
        tags: Vec<String>,
        headers: Vec<(String, String)>,
    ) -> Option<Box<Extras>> {
        if key.is_none() && tags.is_empty() && headers.is_empty() {
            None
        } else {
            Some(Box::new(Extras { key, tags, headers }))
        }
    }
}

impl Envelope {
    /// Optional ordering key.
    pub fn key(&self) -> Option<&str> {
        self.extras.as_ref()?.key.as_deref()
    }

    /// Labels a subscription can filter on.
    pub fn tags(&self) -> &[String] {
        self.extras.as_ref().map_or(&[], |e| &e.tags)
    }

    /// Application headers.
    pub fn headers(&self) -> &[(String, String)] {
        self.extras.as_ref().map_or(&[], |e| &e.headers)
    }
}

/// The part of an [`Envelope`] encoded in the frame header (payload bytes follow the header).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeHeader {
    /// Message id.
    pub id: MessageId,
    /// Topic.
    pub topic: String,
    /// Optional ordering key.
    pub key: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Publish time in Unix milliseconds.
    pub publish_time_ms: u64,
    /// Length of the payload in the frame's payload area.
    pub payload_len: u32,
}

/// One message's entry in a `Deliver` frame's header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DeliverEntry {
    /// Every field of the message.
    Full(EnvelopeHeader),
    /// Only the payload length (a bare integer on the wire): the message's id follows
    /// the previous message's (same producer, next sequence number) and it has the
    /// previous message's topic, key, tags, headers and publish time. The messages of
    /// one publish batch usually differ only in their payloads, so this saves 20–40
    /// bytes per message; it never starts a frame.
    Next(u32),
}

/// What kind of endpoint is speaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// An application peer (sender, receiver or relay).
    Peer,
    /// A directory node.
    Directory,
}

/// First frame on every stream, from the side that opened it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Wire protocol version ([`super::PROTOCOL_VERSION`]).
    pub version: u16,
    /// The sender's identity; must equal the name in its TLS certificate.
    pub identity: String,
    /// Changes on every start of the process; tells a restart from a reconnect.
    pub incarnation: u64,
    /// What the sender is.
    pub role: Role,
    /// Addresses where the sender accepts data connections (empty if it does not).
    pub listen_addrs: Vec<SocketAddr>,
    /// Optional locality label.
    pub zone: Option<String>,
}

/// Answer to [`Hello`] when the exchange is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Responder's protocol version.
    pub version: u16,
    /// Responder's identity.
    pub identity: String,
    /// Responder's incarnation.
    pub incarnation: u64,
}

/// Machine-readable reason for a refusal or error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Protocol versions differ.
    VersionMismatch,
    /// The identity in `Hello` does not match the certificate.
    IdentityMismatch,
    /// A frame was not valid here.
    Protocol,
    /// A configured limit was exceeded.
    LimitExceeded,
    /// The request named something that does not exist.
    NotFound,
    /// Not permitted.
    Unauthorized,
    /// The responder is shutting down.
    ShuttingDown,
}

/// A refusal with a human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// Why, for programs.
    pub code: ErrorCode,
    /// Why, for people.
    pub reason: String,
}

/// A batch of messages for one group, sender → receiver, on the link's data stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deliver {
    /// The receiving group the messages are for.
    pub group: String,
    /// Link sequence number of the first message; the i-th has `first_link_seq + i`.
    pub first_link_seq: u64,
    /// The messages.
    pub messages: Vec<Envelope>,
}

/// Sender → receiver, after the handshake of a data stream: this stream carries the
/// messages of `topic` for the receiver's membership in `group`. The receiver answers
/// with a [`Credit`], or a [`Reject`] if it has no such subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
}

/// Receiver → sender: every link sequence `<= upto` is acknowledged, plus `extra`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Cumulative watermark: all link sequences up to and including this one.
    pub upto: u64,
    /// Individually acknowledged link sequences above `upto` (bounded by the credit).
    pub extra: Vec<u64>,
}

/// Receiver → sender: permission to have `window` unacked messages in flight on this
/// link. Replaces the previous window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    /// Largest number of unacknowledged messages the sender may have in flight.
    pub window: u32,
}

/// A registration of a peer for a topic, as a member of a group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Subscription {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
}

/// Peer → directory requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirRequest {
    /// Add a subscription for the connected peer.
    Register(Subscription),
    /// Remove a subscription of the connected peer.
    Unregister(Subscription),
    /// Current route of a topic.
    Resolve {
        /// Topic.
        topic: String,
    },
    /// Current route of a topic, and push every later change as [`Frame::RouteChanged`].
    Watch {
        /// Topic.
        topic: String,
    },
    /// Stop pushing changes of a topic.
    Unwatch {
        /// Topic.
        topic: String,
    },
}

/// Directory → peer answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirResponse {
    /// Done.
    Ok,
    /// The route asked for.
    Route(Route),
    /// Refused.
    Error(Reject),
}

/// A live member of a group, as the directory knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Member {
    /// Identity (certificate name).
    pub identity: String,
    /// Incarnation of the process.
    pub incarnation: u64,
    /// Addresses where it accepts data connections.
    pub addrs: Vec<SocketAddr>,
    /// Locality label.
    pub zone: Option<String>,
}

/// The members of one group subscribed to a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRoute {
    /// Group name.
    pub group: String,
    /// Live members, sorted by identity.
    pub members: Vec<Member>,
}

/// Where a topic's messages go: every group, and each group's live members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Topic.
    pub topic: String,
    /// Increases whenever the route changes (per directory node).
    pub version: u64,
    /// Subscribed groups, sorted by name.
    pub groups: Vec<GroupRoute>,
}

/// Every frame of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Opens a stream.
    Hello(Hello),
    /// Accepts a stream.
    Welcome(Welcome),
    /// Refuses a stream or reports a fatal error; the stream ends after it.
    Reject(Reject),
    /// Binds a data stream to a subscription.
    Open(Open),
    /// Messages for a group.
    Deliver(Deliver),
    /// Acknowledgements.
    Ack(Ack),
    /// Flow-control window.
    Credit(Credit),
    /// A directory request with its correlation id.
    Request {
        /// Echoed in the response.
        id: u64,
        /// What is asked.
        body: DirRequest,
    },
    /// A directory response.
    Response {
        /// Id of the request answered.
        id: u64,
        /// Answer.
        body: DirResponse,
    },
    /// Pushed by the directory to a watcher when a route changes.
    RouteChanged(Route),
}

impl Frame {
    /// Short name of the frame kind, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Welcome(_) => "Welcome",
            Frame::Reject(_) => "Reject",
            Frame::Open(_) => "Open",
            Frame::Deliver(_) => "Deliver",
            Frame::Ack(_) => "Ack",
            Frame::Credit(_) => "Credit",
            Frame::Request { .. } => "Request",
            Frame::Response { .. } => "Response",
            Frame::RouteChanged(_) => "RouteChanged",
        }
    }
}

/// The MessagePack-encoded head of every frame. For `Deliver`, payloads follow it.
#[derive(Debug, Serialize, Deserialize)]
pub enum FrameHeader {
    /// See [`Frame::Hello`].
    Hello(Hello),
    /// See [`Frame::Welcome`].
    Welcome(Welcome),
    /// See [`Frame::Reject`].
    Reject(Reject),
    /// See [`Frame::Open`].
    Open(Open),
    /// See [`Frame::Deliver`]; the payloads follow in order.
    Deliver {
        /// Group.
        group: String,
        /// Link sequence of the first message.
        first_link_seq: u64,
        /// One entry per message, each with the length of its payload (at most
        /// [`super::MAX_DELIVER_MESSAGES`]).
        #[serde(deserialize_with = "bounded_entries")]
        messages: Vec<DeliverEntry>,
    },
    /// See [`Frame::Ack`].
    Ack(Ack),
    /// See [`Frame::Credit`].
    Credit(Credit),
    /// See [`Frame::Request`].
    Request {
        /// Correlation id.
        id: u64,
        /// Request.
        body: DirRequest,
    },
    /// See [`Frame::Response`].
    Response {
        /// Correlation id.
        id: u64,
        /// Response.
        body: DirResponse,
    },
    /// See [`Frame::RouteChanged`].
    RouteChanged(Route),
}

/// Deserializes a `Deliver` frame's entries, refusing more than
/// [`super::MAX_DELIVER_MESSAGES`] before buffering them.
fn bounded_entries<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<DeliverEntry>, D::Error> {
    struct Entries;
    impl<'de> serde::de::Visitor<'de> for Entries {
        type Value = Vec<DeliverEntry>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "at most {} message entries", super::MAX_DELIVER_MESSAGES)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let limit = super::MAX_DELIVER_MESSAGES;
            let mut entries = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(limit));
            while let Some(entry) = seq.next_element()? {
                if entries.len() == limit {
                    return Err(serde::de::Error::custom(format!(
                        "Deliver carries more than {limit} messages"
                    )));
                }
                entries.push(entry);
            }
            Ok(entries)
        }
    }
    d.deserialize_seq(Entries)
}
