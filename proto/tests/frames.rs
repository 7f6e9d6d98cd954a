//! Frames over a real QUIC stream on 127.0.0.1: what `FrameWriter` queues (copied or,
//! for large payloads, as shared chunks) is what `FrameReader` decodes.

use bytes::Bytes;
use std::time::Duration;
use weft_proto::certs;
use weft_proto::tls::{self, Credentials};
use weft_proto::wire::{Envelope, Extras, Frame, FrameReader, FrameWriter, MessageId, PreEncoded};

const LIMIT: Duration = Duration::from_secs(10);
const MAX_FRAME: usize = 4 << 20;

/// The pre-encoded fields of an envelope (what the outbox stores ahead of a payload).
fn fields(e: &Envelope) -> Vec<u8> {
    let tuple = (&*e.topic, e.key(), e.tags(), e.headers(), e.publish_time_ms);
    let mut bytes = rmp_serde::to_vec(&tuple).expect("encodes");
    assert_eq!(bytes.remove(0), 0x95, "a five-element array");
    bytes
}

fn envelope(seq: u64, payload_len: usize) -> Envelope {
    Envelope {
        id: MessageId { producer: 7, seq },
        topic: "t".into(),
        extras: Extras::boxed(
            seq.is_multiple_of(2).then(|| format!("k{seq}")),
            Vec::new(),
            vec![("h".into(), "v".into())],
        ),
        publish_time_ms: 1_000 + seq,
        payload: Bytes::from(
            (0..payload_len)
                .map(|i| (i as u64 + seq) as u8)
                .collect::<Vec<u8>>(),
        ),
    }
}

#[tokio::test]
async fn mixed_payload_sizes_arrive_intact_through_shared_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs::init_ca(dir.path()).expect("ca");
    let creds = |name: &str| {
        Credentials::from_paths(&certs::issue(dir.path(), name, &[]).expect("issue")).expect("load")
    };
    let server = tls::endpoint("127.0.0.1:0".parse().expect("addr"), &creds("srv")).expect("ep");
    let client = tls::endpoint("127.0.0.1:0".parse().expect("addr"), &creds("cli")).expect("ep");
    let addr = server.local_addr().expect("addr");

    // Small payloads are copied, the 9 KiB and larger ones go as their own chunks; a
    // second frame follows so that chunk order across frames is checked too.
    let batches: Vec<Vec<Envelope>> = vec![
        vec![
            envelope(1, 100),
            envelope(2, 20_000),
            envelope(3, 9 * 1024),
            envelope(4, 10),
        ],
        vec![envelope(5, 64 * 1024), envelope(6, 0)],
    ];
    let expected = batches.clone();

    let receiver = tokio::spawn(async move {
        let incoming = server.accept().await.expect("incoming");
        let (conn, _) = tls::accept(incoming).await.expect("accept");
        let (_send, recv) = conn.accept_bi().await.expect("stream");
        let mut reader = FrameReader::new(recv, MAX_FRAME);
        let mut got = Vec::new();
        while let Some(frame) = reader.next().await.expect("frame") {
            match frame {
                Frame::Deliver(d) => got.push(d.messages),
                other => panic!("unexpected {}", other.kind()),
            }
        }
        got
    });

    let conn = tls::connect(&client, addr, "srv").await.expect("connect");
    let (send, _recv) = conn.open_bi().await.expect("stream");
    let mut writer = FrameWriter::new(send, MAX_FRAME);
    let mut first = 1;
    for batch in &batches {
        let encoded: Vec<Vec<u8>> = batch.iter().map(fields).collect();
        let pre: Vec<PreEncoded<'_>> = batch
            .iter()
            .zip(&encoded)
            .map(|(e, f)| PreEncoded {
                id: e.id,
                fields: f,
                payload: &e.payload,
                owner: &e.payload,
            })
            .collect();
        writer.queue_deliver("g", first, &pre).expect("queue");
        first += batch.len() as u64;
    }
    let total: usize = batches.iter().flatten().map(|e| e.payload.len()).sum();
    assert!(
        writer.queued() > total,
        "everything queued, headers included"
    );
    writer.finish().await.expect("send");

    let got = tokio::time::timeout(LIMIT, receiver)
        .await
        .expect("receiver hung")
        .expect("receiver task");
    assert_eq!(got, expected);
}

#[tokio::test]
async fn an_oversized_frame_with_large_payloads_is_refused_before_anything_is_queued() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs::init_ca(dir.path()).expect("ca");
    let creds =
        Credentials::from_paths(&certs::issue(dir.path(), "a", &[]).expect("issue")).expect("load");
    let server = tls::endpoint("127.0.0.1:0".parse().expect("addr"), &creds).expect("ep");
    let client = tls::endpoint("127.0.0.1:0".parse().expect("addr"), &creds).expect("ep");
    let addr = server.local_addr().expect("addr");
    let accept = tokio::spawn(async move {
        let incoming = server.accept().await.expect("incoming");
        let (conn, _) = tls::accept(incoming).await.expect("accept");
        let _ = conn.accept_bi().await;
    });
    let conn = tls::connect(&client, addr, "a").await.expect("connect");
    let (send, _recv) = conn.open_bi().await.expect("stream");
    let mut writer = FrameWriter::new(send, 32 * 1024);
    let e = envelope(1, 40 * 1024);
    let f = fields(&e);
    let pre = [PreEncoded {
        id: e.id,
        fields: &f,
        payload: &e.payload,
        owner: &e.payload,
    }];
    assert!(writer.queue_deliver("g", 1, &pre).is_err());
    assert_eq!(
        writer.queued(),
        0,
        "nothing of the refused frame stays queued"
    );
    conn.close(0u32.into(), b"done");
    accept.abort();
}
