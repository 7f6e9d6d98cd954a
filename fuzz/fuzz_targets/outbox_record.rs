//! Bytes from an outbox segment on disk (a record payload whose CRC matched: the
//! decoder must still refuse anything malformed without panicking). A decoded
//! message record, encoded again, must decode to the same record.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use weft_peer::outbox::record::{self, Record, FRAME_HEADER};

fuzz_target!(|data: &[u8]| {
    let payload = Bytes::copy_from_slice(data);
    let decoded = record::decode(&payload);
    let _ = record::decode_message(&payload);
    if let Ok(Record::Message {
        seq,
        unix_ms,
        targets,
        body,
    }) = decoded
    {
        let mut buf = Vec::new();
        record::encode_message(&mut buf, 1, seq, unix_ms, &targets, &body);
        let again = Bytes::from(buf).slice(FRAME_HEADER..);
        match record::decode(&again) {
            Ok(Record::Message {
                seq: s,
                unix_ms: u,
                targets: t,
                body: b,
            }) => assert!(s == seq && u == unix_ms && t == targets && b == body),
            other => panic!("re-encoded message decoded as {other:?}"),
        }
    }
});
