//! Weft peer: link this crate into a service to publish and subscribe on a Weft fabric.
//!
//! A peer asks a directory node where the receivers of a topic are and delivers to them
//! **directly** over mutually-authenticated QUIC. Every message is kept in a local
//! outbox until each subscribed group acknowledged it; unacknowledged messages are
//! redelivered, moved to another member when theirs disappears, and wait (on disk) while
//! a group has no member. Receivers drop retransmissions of messages they acknowledged.
//!
//! ```no_run
//! use futures::StreamExt;
//! use weft_peer::{Message, Peer};
//!
//! # async fn run() -> Result<(), weft_peer::Error> {
//! let peer = Peer::builder("billing-1")
//!     .directory(["127.0.0.1:7400"])
//!     .data_dir("./.weft/billing-1")
//!     .dev()
//!     .start()
//!     .await?;
//! peer.publish("orders", Message::new("order #1").key("user-42")).await?;
//! let mut sub = peer.subscribe("orders").group("billing").start().await?;
//! while let Some(delivery) = sub.next().await {
//!     println!("{:?}", delivery.payload());
//!     delivery.ack();
//! }
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod clock;
mod dedup;
mod directory_client;
mod dispatch;
mod error;
mod gather;
mod inbound;
mod link;
mod members;
mod message;
pub mod outbox;
mod peer;
mod receipt;
mod record_buffers;
mod seq_map;
mod seq_window;
mod subscription;

pub use dispatch::GroupBacklog;
pub use error::{Error, ErrorKind, Result};
pub use message::Message;
pub use outbox::OutboxStats;
pub use peer::{
    DirectoryAddr, Peer, PeerBuilder, SubscribeBuilder, DEDUP_SAVE_INTERVAL, DEFAULT_ACK_TIMEOUT,
    DEFAULT_DIRECTORY_TIMEOUT, DEFAULT_MAX_MESSAGE, MESSAGE_METADATA_LIMIT,
};
pub use receipt::PendingReceipt;
pub use subscription::{Delivery, Subscription, DEFAULT_CREDIT, DEFAULT_MAX_QUEUED_BYTES};
pub use weft_proto::wire::{GroupRoute, Member, MessageId, Route};

/// How far a message must have got before `publish` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Kept in memory only: lost if this process dies before every group acked it.
    Memory,
    /// Written to the outbox and `fdatasync`ed (group commit) before `publish` returns:
    /// survives a crash of this process or machine (the default).
    Disk,
    /// As `Disk`, and `publish` returns only after every target group acknowledged it.
    Confirmed,
}

/// What `publish` does when the outbox quota (bytes or messages) is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Wait until acknowledgements free space (backpressure).
    Wait,
    /// Fail at once with [`ErrorKind::OutboxFull`].
    Fail,
}

/// What `publish` returns: the message id and how many groups it is addressed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// The message id (producer, sequence).
    pub id: MessageId,
    /// Number of groups subscribed when the message was published.
    pub groups: usize,
}
