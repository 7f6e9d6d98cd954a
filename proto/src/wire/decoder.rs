//! Cutting a received byte stream back into frames.

use super::codec::{decode_body, decode_pieces};
use super::error::WireError;
use super::frames::Frame;
use super::LENGTH_PREFIX;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;

/// Received pieces shorter than this are copied together instead of kept shared when
/// something is buffered already, so that a sender cutting its stream into tiny pieces
/// costs the decoder at most one piece per this many buffered bytes (and the buffered
/// bytes are bounded by the frame limit). A short piece reaching an empty decoder is
/// kept: it usually holds whole frames (one message at a time), cut without a copy.
const SHARE_MIN: usize = 4 * 1024;

/// Cuts a byte stream into frames. Feed it bytes as they arrive with [`extend`] or
/// [`extend_bytes`] and take complete frames with [`next_frame`].
///
/// Received chunks stay shared: a frame that lies whole in one chunk is a slice of it,
/// and a `Deliver` frame spread over several chunks gets its payloads as slices of the
/// chunks that hold them (only a payload straddling two chunks is copied). A large
/// payload is then never copied on the receiving side.
///
/// [`extend`]: FrameDecoder::extend
/// [`extend_bytes`]: FrameDecoder::extend_bytes
/// [`next_frame`]: FrameDecoder::next_frame
#[derive(Debug)]
pub struct FrameDecoder {
    /// Received bytes not yet returned as frames, in order, then `small`.
    pieces: VecDeque<Bytes>,
    /// Short pieces, copied together (see [`SHARE_MIN`]); they follow `pieces`.
    small: BytesMut,
    /// Bytes in `pieces` and `small`.
    buffered: usize,
    max_frame: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames above `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self {
            pieces: VecDeque::new(),
            small: BytesMut::new(),
            buffered: 0,
            max_frame,
        }
    }

    /// Appends received bytes (copied).
    pub fn extend(&mut self, bytes: &[u8]) {
        self.small.extend_from_slice(bytes);
        self.buffered += bytes.len();
    }

    /// Appends a received chunk, keeping it shared unless it is short and joins bytes
    /// already buffered (see [`SHARE_MIN`]).
    pub fn extend_bytes(&mut self, bytes: Bytes) {
        if bytes.len() < SHARE_MIN && self.buffered > 0 {
            return self.extend(&bytes);
        }
        self.seal_small();
        self.buffered += bytes.len();
        self.pieces.push_back(bytes);
    }

    /// Moves the copied short pieces to the end of `pieces`, so that everything
    /// buffered is in `pieces`.
    fn seal_small(&mut self) {
        if !self.small.is_empty() {
            self.pieces.push_back(self.small.split().freeze());
        }
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// The length of the next frame's body, if its length prefix is here; an error if
    /// it exceeds the limit.
    fn next_size(&self) -> Result<Option<usize>, WireError> {
        if self.buffered < LENGTH_PREFIX {
            return Ok(None);
        }
        let mut prefix = [0u8; LENGTH_PREFIX];
        let mut filled = 0;
        let pieces = self.pieces.iter().map(|p| &p[..]);
        for piece in pieces.chain(std::iter::once(&self.small[..])) {
            let n = (LENGTH_PREFIX - filled).min(piece.len());
            prefix[filled..filled + n].copy_from_slice(&piece[..n]);
            filled += n;
            if filled == LENGTH_PREFIX {
                break;
            }
        }
        let size = u32::from_be_bytes(prefix) as usize;
        if size > self.max_frame {
            return Err(WireError::FrameTooLarge {
                size,
                limit: self.max_frame,
            });
        }
        Ok(Some(size))
    }

    /// Removes the next `n` buffered bytes (all in `pieces`), handing them to `out` as
    /// the pieces they lay in.
    fn take(&mut self, mut n: usize, mut out: impl FnMut(Bytes)) {
        self.buffered -= n;
        while n > 0 {
            let Some(front) = self.pieces.front_mut() else {
                break;
            };
            if front.len() > n {
                out(front.split_to(n));
                break;
            }
            n -= front.len();
            self.pieces.pop_front().map(&mut out);
        }
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. An error means the
    /// stream is unusable and must be closed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        let Some(size) = self.next_size()? else {
            return Ok(None);
        };
        let missing = (LENGTH_PREFIX + size).saturating_sub(self.buffered);
        if missing > 0 {
            if self.pieces.is_empty() {
                // Arriving in short pieces: it is copied together anyway, so make room
                // for all of it once (at most the frame limit).
                self.small.reserve(missing);
            }
            return Ok(None);
        }
        self.seal_small();
        self.take(LENGTH_PREFIX, drop);
        let whole = self.pieces.front().is_none_or(|front| front.len() >= size);
        if whole {
            // The usual case: the frame lies in one piece, which it is a slice of.
            let mut body = Bytes::new();
            self.take(size, |piece| body = piece);
            return decode_body(body).map(Some);
        }
        let mut pieces = Vec::new();
        self.take(size, |piece| pieces.push(piece));
        decode_pieces(&pieces).map(Some)
    }

    /// Call at end of stream: an error if a frame was left unfinished.
    pub fn finish(&self) -> Result<(), WireError> {
        match self.buffered() {
            0 => Ok(()),
            buffered => Err(WireError::Truncated { buffered }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{encode, Deliver, Envelope, MessageId};
    use proptest::prelude::*;

    fn message(seq: u64, len: usize) -> Envelope {
        Envelope {
            id: MessageId { producer: 1, seq },
            topic: "t".into(),
            publish_time_ms: 0,
            payload: Bytes::from(vec![seq as u8; len]),
            extras: None,
        }
    }

    fn deliver_frames(lens: &[Vec<usize>]) -> (Vec<Frame>, Bytes) {
        let frames: Vec<Frame> = lens
            .iter()
            .enumerate()
            .map(|(i, lens)| {
                Frame::Deliver(Deliver {
                    group: "g".into(),
                    first_link_seq: i as u64,
                    messages: lens
                        .iter()
                        .enumerate()
                        .map(|(j, &len)| message(j as u64, len))
                        .collect(),
                })
            })
            .collect();
        let mut out = BytesMut::new();
        for f in &frames {
            encode(f, &mut out, 1 << 24).expect("encodes");
        }
        (frames, out.freeze())
    }

    proptest! {
        /// Frames of large payloads cut into shared chunks of any sizes (with short
        /// copied ones among them) come out whole and equal.
        #[test]
        fn large_payloads_across_chunks_yield_same_frames(
            lens in proptest::collection::vec(proptest::collection::vec(0usize..40_000, 1..6), 1..5),
            cuts in proptest::collection::vec(1usize..70_000, 1..20),
        ) {
            let (frames, mut rest) = deliver_frames(&lens);
            let mut dec = FrameDecoder::new(1 << 24);
            let mut got = Vec::new();
            let mut cuts = cuts.into_iter().cycle();
            while !rest.is_empty() {
                let cut = cuts.next().expect("cycles").min(rest.len());
                dec.extend_bytes(rest.split_to(cut));
                while let Some(f) = dec.next_frame().expect("decodes") { got.push(f); }
            }
            dec.finish().expect("no leftovers");
            prop_assert_eq!(got, frames);
        }

        /// A frame whose payloads add up to more or less than it carries is refused,
        /// however it was cut.
        #[test]
        fn a_lying_frame_in_pieces_is_malformed(len in 5_000usize..20_000, cut in 100usize..4_000) {
            let (_, bytes) = deliver_frames(&[vec![len, len]]);
            let mut bad = BytesMut::from(&bytes[..]);
            // The frame is one byte short of what its header announces.
            let size = u32::from_be_bytes(bad[..4].try_into().expect("4 bytes")) - 1;
            bad[..4].copy_from_slice(&size.to_be_bytes());
            bad.truncate(bad.len() - 1);
            let mut bad = bad.freeze();
            let mut dec = FrameDecoder::new(1 << 24);
            let head = bad.split_to(cut.max(SHARE_MIN));
            dec.extend_bytes(head);
            dec.extend_bytes(bad);
            prop_assert!(matches!(dec.next_frame(), Err(WireError::Malformed(_))));
        }
    }

    #[test]
    fn payloads_inside_one_chunk_are_slices_of_it() {
        let (frames, bytes) = deliver_frames(&[vec![20_000, 20_000, 20_000]]);
        // Chunk 1: prefix, header, payload 0 and the start of payload 1; chunk 2: the
        // rest of payload 1 and all of payload 2.
        let cut = bytes.len() - 30_000;
        let (first, second) = (bytes.slice(..cut), bytes.slice(cut..));
        let mut dec = FrameDecoder::new(1 << 24);
        dec.extend_bytes(first.clone());
        assert!(dec.next_frame().expect("incomplete").is_none());
        dec.extend_bytes(second.clone());
        let Some(Frame::Deliver(got)) = dec.next_frame().expect("decodes") else {
            panic!("a Deliver frame")
        };
        assert_eq!(Frame::Deliver(got.clone()), frames[0]);
        let inside =
            |chunk: &Bytes, payload: &Bytes| chunk.as_ptr_range().contains(&payload.as_ptr());
        assert!(
            inside(&first, &got.messages[0].payload),
            "a slice of chunk 1"
        );
        assert!(
            !inside(&first, &got.messages[1].payload),
            "straddles: a copy"
        );
        assert!(
            !inside(&second, &got.messages[1].payload),
            "straddles: a copy"
        );
        assert!(
            inside(&second, &got.messages[2].payload),
            "a slice of chunk 2"
        );
        dec.finish().expect("nothing left");
    }

    #[test]
    fn tiny_pieces_are_copied_together() {
        let (frames, bytes) = deliver_frames(&[vec![10_000]]);
        let mut dec = FrameDecoder::new(1 << 24);
        for piece in bytes.chunks(7) {
            dec.extend_bytes(Bytes::copy_from_slice(piece));
            assert!(
                dec.pieces.len() <= 1,
                "short pieces are not kept one by one"
            );
        }
        assert_eq!(dec.next_frame().expect("decodes"), Some(frames[0].clone()));
        dec.finish().expect("nothing left");
    }

    #[test]
    fn oversized_frame_rejected_before_allocation() {
        let mut dec = FrameDecoder::new(1024);
        dec.extend(&(u32::MAX).to_be_bytes());
        match dec.next_frame() {
            Err(WireError::FrameTooLarge { size, limit }) => {
                assert_eq!(size, u32::MAX as usize);
                assert_eq!(limit, 1024);
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        assert!(
            dec.small.capacity() < 4096,
            "must not allocate the announced size"
        );
    }

    #[test]
    fn a_short_chunk_of_whole_frames_is_not_copied() {
        let (frames, bytes) = deliver_frames(&[vec![100], vec![200]]);
        let mut dec = FrameDecoder::new(1 << 24);
        dec.extend_bytes(bytes.clone());
        for frame in &frames {
            let Some(Frame::Deliver(got)) = dec.next_frame().expect("decodes") else {
                panic!("a Deliver frame")
            };
            assert_eq!(&Frame::Deliver(got.clone()), frame);
            assert!(bytes
                .as_ptr_range()
                .contains(&got.messages[0].payload.as_ptr()));
        }
        dec.finish().expect("nothing left");
    }

    #[test]
    fn oversized_prefix_split_across_pieces_is_refused() {
        let mut dec = FrameDecoder::new(1024);
        dec.extend(&[0x00, 0x10]);
        assert!(dec.next_frame().expect("incomplete prefix").is_none());
        dec.extend_bytes(Bytes::from(vec![0x00; SHARE_MIN]));
        assert!(matches!(
            dec.next_frame(),
            Err(WireError::FrameTooLarge {
                size: 0x0010_0000,
                ..
            })
        ));
    }
}
