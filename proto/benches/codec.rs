//! Micro-benchmarks of the wire codec: encoding and decoding `Deliver` batches and small
//! control frames. Run with `cargo bench -p weft-proto --bench codec`.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use weft_proto::wire::{
    encode, Ack, Credit, Deliver, Envelope, Extras, Frame, FrameDecoder, MessageId,
    DEFAULT_MAX_FRAME,
};

/// A `Deliver` frame of `count` messages of `size` payload bytes each, with the
/// metadata of a typical keyed publish.
fn deliver(count: usize, size: usize) -> Frame {
    let payload = Bytes::from(vec![0x5a; size]);
    let messages = (0..count as u64)
        .map(|seq| Envelope {
            id: MessageId {
                producer: 0x0123_4567_89ab_cdef,
                seq,
            },
            topic: "orders.created".into(),
            extras: Extras::boxed(Some(format!("user-{}", seq % 64)), vec![], vec![]),
            publish_time_ms: 1_763_790_000_000 + seq,
            // A slice of one buffer, as a sender holding the outbox bodies would have.
            payload: payload.clone(),
        })
        .collect();
    Frame::Deliver(Deliver {
        group: "billing".into(),
        first_link_seq: 1_000,
        messages,
    })
}

fn encoded(frame: &Frame) -> BytesMut {
    let mut out = BytesMut::new();
    encode(frame, &mut out, DEFAULT_MAX_FRAME).expect("benchmark frame fits");
    out
}

/// Encodes `frame` into a reused buffer and decodes it back, one benchmark each.
fn encode_and_decode(c: &mut Criterion, group: &str, cases: &[(String, Frame, u64)]) {
    let mut g = c.benchmark_group(group);
    for (name, frame, elements) in cases {
        g.throughput(Throughput::Elements(*elements));
        let bytes = encoded(frame);
        let mut out = BytesMut::with_capacity(bytes.len());
        g.bench_with_input(BenchmarkId::new("encode", name), frame, |b, frame| {
            b.iter(|| {
                out.clear();
                encode(black_box(frame), &mut out, DEFAULT_MAX_FRAME).expect("encode");
                black_box(out.len())
            })
        });
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
        g.bench_with_input(BenchmarkId::new("decode", name), &bytes, |b, bytes| {
            b.iter(|| {
                decoder.extend(black_box(bytes));
                let frame = decoder.next_frame().expect("decode").expect("complete");
                black_box(frame)
            })
        });
    }
    g.finish();
}

fn deliver_batches(c: &mut Criterion) {
    let cases: Vec<(String, Frame, u64)> = [(1024, 128, "1024x128B"), (32, 16 * 1024, "32x16KiB")]
        .into_iter()
        .map(|(count, size, name)| (name.to_string(), deliver(count, size), count as u64))
        .collect();
    for (name, frame, _) in &cases {
        eprintln!("deliver {name}: {} bytes on the wire", encoded(frame).len());
    }
    // Throughput in messages per second.
    encode_and_decode(c, "deliver", &cases);
    decode_in_chunks(c, &cases);
}

/// Largest chunk a QUIC stream hands over on loopback (one 65,000-byte packet's data).
const LOOPBACK_CHUNK: usize = 64_000;

/// Decodes each frame handed over as shared chunks, as a QUIC stream delivers it: a
/// frame cut across chunks keeps its payloads as slices of them (`decode` above
/// copies the frame in, the path of `FrameDecoder::extend`).
fn decode_in_chunks(c: &mut Criterion, cases: &[(String, Frame, u64)]) {
    let mut g = c.benchmark_group("deliver");
    for (name, frame, elements) in cases {
        g.throughput(Throughput::Elements(*elements));
        let bytes = encoded(frame).freeze();
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
        g.bench_with_input(
            BenchmarkId::new("decode_chunks", name),
            &bytes,
            |b, bytes| {
                b.iter(|| {
                    for start in (0..bytes.len()).step_by(LOOPBACK_CHUNK) {
                        let end = (start + LOOPBACK_CHUNK).min(bytes.len());
                        decoder.extend_bytes(bytes.slice(start..end));
                    }
                    let frame = decoder.next_frame().expect("decode").expect("complete");
                    black_box(frame)
                })
            },
        );
    }
    g.finish();
}

fn control_frames(c: &mut Criterion) {
    let cases = vec![
        (
            "ack".to_string(),
            Frame::Ack(Ack {
                upto: 1_234_567,
                extra: vec![],
            }),
            1,
        ),
        (
            "ack+8extra".to_string(),
            Frame::Ack(Ack {
                upto: 1_234_567,
                extra: (1_234_570..1_234_578).collect(),
            }),
            1,
        ),
        (
            "credit".to_string(),
            Frame::Credit(Credit { window: 1024 }),
            1,
        ),
    ];
    // Throughput in frames per second.
    encode_and_decode(c, "control", &cases);
}

criterion_group!(benches, deliver_batches, control_frames);
criterion_main!(benches);
