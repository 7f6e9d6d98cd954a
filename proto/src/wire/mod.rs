//! The Weft wire protocol: length-prefixed MessagePack frames on QUIC streams.
//!
//! See `docs/PROTOCOL.md` for the byte layout. In short: every frame is a big-endian
//! `u32` length followed by that many bytes; the bytes hold one MessagePack-encoded
//! [`FrameHeader`] and, for [`Frame::Deliver`], the message payloads concatenated after
//! it, so that a receiver hands out payloads as slices of the frame without copying.

mod codec;
mod decoder;
mod error;
mod frames;
mod io;

pub use codec::{encode, encode_deliver, encode_deliver_head, str_bytes, PreEncoded};
pub use decoder::FrameDecoder;
pub use error::WireError;
pub use frames::*;
pub use io::{accept_handshake, open_handshake, FrameReader, FrameWriter};

/// Version of the wire protocol carried in [`Hello`]; peers refuse other versions.
pub const PROTOCOL_VERSION: u16 = 2;

/// Default largest frame accepted or sent (4 MiB). Checked before any allocation.
pub const DEFAULT_MAX_FRAME: usize = 4 * 1024 * 1024;

/// Most messages in one `Deliver` frame; a frame announcing more is malformed. Bounds
/// what a frame of tiny continuation entries can make a receiver allocate.
pub const MAX_DELIVER_MESSAGES: usize = 1024;

/// Bytes in the length prefix of every frame.
pub const LENGTH_PREFIX: usize = 4;
