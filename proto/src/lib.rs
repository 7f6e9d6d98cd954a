//! Weft's shared protocol layer: the wire format (frames, envelopes, control messages),
//! identity and TLS (certificates, mutually-authenticated QUIC configuration).
//!
//! Both the peer library and the directory node build on this crate; applications use
//! the `weft-peer` crate instead.
#![warn(missing_docs)]

pub mod certs;
pub mod tls;
pub mod wire;
