use thiserror::Error;

/// Why a frame could not be read or written. Any of these ends the stream it came from.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum WireError {
    /// The length prefix announced a frame above the configured limit.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes (raise max_frame_bytes on both sides if this is intended)")]
    FrameTooLarge {
        /// Announced size.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// The frame's bytes are not a valid Weft frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes of an unfinished frame)")]
    Truncated {
        /// Bytes of the incomplete frame that had arrived.
        buffered: usize,
    },
    /// The remote side speaks another protocol version.
    #[error("protocol version mismatch: we speak {ours}, the remote speaks {theirs}; upgrade the older side")]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// The remote's version.
        theirs: u16,
    },
    /// The remote sent a frame that is valid but not allowed at this point of the exchange.
    #[error("unexpected frame: expected {expected}, got {got}")]
    Unexpected {
        /// What the protocol expected.
        expected: &'static str,
        /// What arrived.
        got: String,
    },
    /// The remote refused the exchange.
    #[error("rejected by remote: {0}")]
    Rejected(String),
    /// Reading from the QUIC stream failed.
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing to the QUIC stream failed.
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
}
