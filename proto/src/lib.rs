//! Weft's shared protocol layer: the wire format (frames, envelopes, control messages),
//! identity and TLS (certificates, mutually-authenticated QUIC configuration).
//!
//! Both the peer library and the directory node build on this crate; applications use
//! the `weft-peer` crate instead.
#![warn(missing_docs)]

pub mod certs;
pub mod tls;
pub mod wire;

/// The name every directory node's certificate carries besides its own: peers dial a
/// directory by address and verify this name, so only certificates issued for directory
/// duty (`weft certs issue NODE --directory`) can act as one.
pub const DIRECTORY_IDENTITY: &str = "weft-directory";
