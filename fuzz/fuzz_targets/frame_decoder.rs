//! Bytes from the network, cut into chunks as QUIC might deliver them, through the
//! frame decoder: it must never panic or allocate beyond its limit, and every frame it
//! accepts must encode and decode back to itself.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use weft_proto::wire::{encode, FrameDecoder};

/// A small limit, so that the fuzzer reaches the too-large paths.
const MAX_FRAME: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    // The first byte chooses the chunk size (1..=256 bytes) and whether chunks are
    // shared (`extend_bytes`, the receive path) or copied (`extend`).
    let chunk = usize::from(cut) + 1;
    let mut decoder = FrameDecoder::new(MAX_FRAME);
    let mut frames = Vec::new();
    'feed: for piece in stream.chunks(chunk) {
        if cut % 2 == 0 {
            decoder.extend_bytes(Bytes::copy_from_slice(piece));
        } else {
            decoder.extend(piece);
        }
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
    }
    for frame in frames {
        let mut out = BytesMut::new();
        encode(&frame, &mut out, usize::MAX >> 1).expect("an accepted frame encodes");
        let mut again = FrameDecoder::new(usize::MAX >> 1);
        again.extend(&out);
        let decoded = again.next_frame().expect("re-encoded frame decodes");
        assert_eq!(decoded.as_ref(), Some(&frame), "round trip changed the frame");
    }
});
