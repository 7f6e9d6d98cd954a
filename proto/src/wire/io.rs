//! Reading and writing frames on QUIC streams, and the opening handshake.

use super::codec::{encode, encode_deliver_head, PreEncoded};
use super::decoder::FrameDecoder;
use super::error::WireError;
use super::frames::*;
use super::{LENGTH_PREFIX, PROTOCOL_VERSION};
use bytes::{Bytes, BytesMut};

/// Largest chunk taken from the QUIC stream per read.
const READ_CHUNK: usize = 64 * 1024;
/// Payloads from this size on are sent as their own chunks (shared, not copied into the
/// write buffer); smaller ones are cheaper to copy than to track.
const ZERO_COPY_MIN: usize = 8 * 1024;
/// Spare write buffer a [`FrameWriter::compact`] keeps after a flush.
pub const COMPACT_KEEP: usize = 16 * 1024;

/// Reads frames from a QUIC receive stream.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl FrameReader {
    /// Wraps `recv`, refusing frames above `max_frame` bytes.
    pub fn new(recv: quinn::RecvStream, max_frame: usize) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::new(max_frame),
        }
    }

    /// The next frame; `Ok(None)` at a clean end of stream. Cancel-safe: a frame is
    /// never half consumed.
    pub async fn next(&mut self) -> Result<Option<Frame>, WireError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            match self.recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.decoder.extend_bytes(chunk.bytes),
                None => {
                    self.decoder.finish()?;
                    return Ok(None);
                }
            }
        }
    }

    /// Like [`next`](Self::next), but end of stream is an error naming what was expected.
    pub async fn expect(&mut self, expected: &'static str) -> Result<Frame, WireError> {
        match self.next().await? {
            Some(Frame::Reject(r)) => {
                Err(WireError::Rejected(format!("{:?}: {}", r.code, r.reason)))
            }
            Some(frame) => Ok(frame),
            None => Err(WireError::Unexpected {
                expected,
                got: "end of stream".into(),
            }),
        }
    }

    /// Tells the remote to stop sending on this stream with an application error code.
    pub fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(quinn::VarInt::from_u32(code));
    }
}

/// Writes frames to a QUIC send stream, batching queued frames into one write.
#[derive(Debug)]
pub struct FrameWriter {
    send: quinn::SendStream,
    buf: BytesMut,
    /// Compact writers keep no more than this much spare buffer after a flush.
    keep: Option<usize>,
    /// Queued bytes ahead of `buf`, when a large payload was queued without a copy.
    chunks: Vec<Bytes>,
    max_frame: usize,
}

impl FrameWriter {
    /// Wraps `send`, refusing to send frames above `max_frame` bytes.
    pub fn new(send: quinn::SendStream, max_frame: usize) -> Self {
        Self {
            send,
            buf: BytesMut::with_capacity(64 * 1024),
            keep: None,
            chunks: Vec::new(),
            max_frame,
        }
    }

    /// Like [`new`](Self::new), for a long-lived stream of small control frames (a
    /// directory node holds one per connected peer, thousands of them): the buffer
    /// grows to what is queued and a spare buffer above [`COMPACT_KEEP`] bytes is
    /// released after each flush, instead of 64 KiB staying resident per stream.
    pub fn compact(send: quinn::SendStream, max_frame: usize) -> Self {
        Self {
            send,
            buf: BytesMut::new(),
            keep: Some(COMPACT_KEEP),
            chunks: Vec::new(),
            max_frame,
        }
    }

    /// Encodes `frame` into the write buffer without sending it yet.
    pub fn queue(&mut self, frame: &Frame) -> Result<(), WireError> {
        encode(frame, &mut self.buf, self.max_frame)
    }

    /// Encodes a `Deliver` frame of pre-encoded messages (see [`super::encode_deliver`]) into
    /// the write buffer without sending it yet.
    pub fn queue_deliver(
        &mut self,
        group: &str,
        first_link_seq: u64,
        messages: &[PreEncoded<'_>],
    ) -> Result<(), WireError> {
        // One allocation for the frame instead of one per doubling as it is written: the
        // header (per message at most 20 bytes of id and array markers, the stored
        // fields, 9 of payload length) and the payloads copied after it.
        let copied: usize = messages
            .iter()
            .map(|m| {
                29 + m.fields.len() + m.payload.len() * usize::from(m.payload.len() < ZERO_COPY_MIN)
            })
            .sum();
        let needed = LENGTH_PREFIX + 32 + group.len() + copied;
        if !self.buf.is_empty() && self.buf.capacity() - self.buf.len() < needed {
            // Growing a buffer that holds queued frames copies them (a tenth of a
            // batched run's copying): queue them as a chunk and start a new one.
            self.chunks.push(self.buf.split().freeze());
        }
        self.buf.reserve(needed);
        encode_deliver_head(
            group,
            first_link_seq,
            messages,
            &mut self.buf,
            self.max_frame,
        )?;
        for m in messages {
            if m.payload.len() < ZERO_COPY_MIN {
                self.buf.extend_from_slice(m.payload);
            } else {
                if !self.buf.is_empty() {
                    self.chunks.push(self.buf.split().freeze());
                }
                self.chunks.push(m.shared_payload());
            }
        }
        Ok(())
    }

    /// Bytes queued and not yet flushed.
    pub fn queued(&self) -> usize {
        self.buf.len() + self.chunks.iter().map(Bytes::len).sum::<usize>()
    }

    /// Sends everything queued.
    pub async fn flush(&mut self) -> Result<(), WireError> {
        if !self.buf.is_empty() {
            self.chunks.push(self.buf.split().freeze());
        }
        if self.keep.is_some_and(|keep| self.buf.capacity() > keep) {
            self.buf = BytesMut::new();
        }
        match self.chunks.len() {
            0 => {}
            1 => {
                let chunk = self.chunks.pop().unwrap_or_default();
                self.send.write_chunk(chunk).await?;
            }
            _ => {
                let result = self.send.write_all_chunks(&mut self.chunks).await;
                self.chunks.clear();
                result?;
            }
        }
        Ok(())
    }

    /// Queues and flushes one frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), WireError> {
        self.queue(frame)?;
        self.flush().await
    }

    /// Flushes and ends the stream gracefully.
    pub async fn finish(&mut self) -> Result<(), WireError> {
        self.flush().await?;
        let _ = self.send.finish();
        Ok(())
    }

    /// Sends a [`Reject`] and ends the stream.
    pub async fn reject(&mut self, code: ErrorCode, reason: impl Into<String>) {
        let frame = Frame::Reject(Reject {
            code,
            reason: reason.into(),
        });
        if self.send(&frame).await.is_ok() {
            let _ = self.finish().await;
        }
    }
}

/// Opening side of a stream: sends `hello`, waits for the [`Welcome`].
pub async fn open_handshake(
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
    hello: &Hello,
) -> Result<Welcome, WireError> {
    writer.send(&Frame::Hello(hello.clone())).await?;
    match reader.expect("Welcome").await? {
        Frame::Welcome(w) if w.version == PROTOCOL_VERSION => Ok(w),
        Frame::Welcome(w) => Err(WireError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: w.version,
        }),
        other => Err(WireError::Unexpected {
            expected: "Welcome",
            got: other.kind().into(),
        }),
    }
}

/// Accepting side of a stream: reads the [`Hello`], checks its version and that its
/// identity is `authenticated` (the TLS identity), then answers with `welcome`. On any
/// mismatch it sends a [`Reject`] and returns the error.
pub async fn accept_handshake(
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
    authenticated: &str,
    welcome: &Welcome,
) -> Result<Hello, WireError> {
    let hello = match reader.expect("Hello").await? {
        Frame::Hello(h) => h,
        other => {
            let err = WireError::Unexpected {
                expected: "Hello",
                got: other.kind().into(),
            };
            writer.reject(ErrorCode::Protocol, err.to_string()).await;
            return Err(err);
        }
    };
    if hello.version != PROTOCOL_VERSION {
        let err = WireError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: hello.version,
        };
        writer
            .reject(ErrorCode::VersionMismatch, err.to_string())
            .await;
        return Err(err);
    }
    if hello.identity != authenticated {
        let reason = format!(
            "Hello claims identity {:?} but the certificate says {:?}",
            hello.identity, authenticated
        );
        writer
            .reject(ErrorCode::IdentityMismatch, reason.clone())
            .await;
        return Err(WireError::Rejected(reason));
    }
    writer.send(&Frame::Welcome(welcome.clone())).await?;
    Ok(hello)
}
