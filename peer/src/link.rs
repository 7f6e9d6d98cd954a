//! Outgoing links: one task per (member, topic, group) that keeps a data stream open to
//! the member and sends it the messages the dispatcher assigns.

use crate::dispatch::{LinkEpoch, LinkKey};
use crate::error::{Error, ErrorKind, Result};
use crate::message::RecordSplitter;
use crate::outbox::MemoryRecordRef;
use crate::peer::Inner;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{debug, info};
use weft_proto::wire::{self, Frame, FrameReader, FrameWriter, MessageId, Open, PreEncoded};

/// Most messages per `Deliver` frame (the receiver refuses more).
pub const MAX_BATCH_MESSAGES: usize = wire::MAX_DELIVER_MESSAGES;
/// Payload bytes after which a `Deliver` frame is cut (well below the frame limit).
const BATCH_BYTES: usize = 512 * 1024;
/// Reconnect backoff bounds for a member that cannot be reached.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// How the runtime controls a link task.
#[derive(Debug, Default)]
pub(crate) struct LinkControl {
    pub(crate) wake: Notify,
    pub(crate) closed: AtomicBool,
}

impl LinkControl {
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Runs until the dispatcher closes the link.
pub(crate) async fn run(
    inner: Arc<Inner>,
    key: LinkKey,
    epoch: LinkEpoch,
    control: Arc<LinkControl>,
) {
    let mut backoff = BACKOFF_MIN;
    while !control.is_closed() {
        let started = crate::clock::now();
        match serve(&inner, &key, epoch, &control).await {
            Ok(()) => return,
            Err(e) => {
                debug!(member = %key.member(), topic = %key.topic(), group = %key.group(), error = %e, "link down")
            }
        }
        let actions = inner.core().on_link_down(crate::clock::now(), &key, epoch);
        inner.execute(actions);
        if crate::clock::now().saturating_duration_since(started) > Duration::from_secs(5) {
            backoff = BACKOFF_MIN;
        }
        let jitter = inner.jitter.millis(backoff.as_millis() as u64 / 2);
        tokio::select! {
            _ = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
            () = control.wake.notified() => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn serve(
    inner: &Arc<Inner>,
    key: &LinkKey,
    epoch: LinkEpoch,
    control: &LinkControl,
) -> Result<()> {
    let conn = inner.members.connection(key.member()).await?;
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| Error::with_source(ErrorKind::Protocol, "opening data stream", e))?;
    let max_frame = inner.config.max_frame;
    let mut writer = FrameWriter::new(send, max_frame);
    let mut reader = FrameReader::new(recv, max_frame);
    let wire_err = |e: wire::WireError| Error::with_source(ErrorKind::Protocol, "data stream", e);
    let welcome = wire::open_handshake(&mut writer, &mut reader, &inner.hello())
        .await
        .map_err(wire_err)?;
    inner
        .members
        .observed(key.member(), &conn, welcome.incarnation);
    writer
        .send(&Frame::Open(Open {
            topic: key.topic().to_string(),
            group: key.group().to_string(),
        }))
        .await
        .map_err(wire_err)?;
    let window = match reader.expect("Credit").await.map_err(wire_err)? {
        Frame::Credit(c) => c.window,
        other => {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!("expected Credit, got {}", other.kind()),
            ))
        }
    };
    info!(member = %key.member(), topic = %key.topic(), group = %key.group(), window, "link up");
    let actions = inner
        .core()
        .on_link_up(crate::clock::now(), key, epoch, window);
    inner.execute(actions);
    let records = RecordSplitter::new(key.topic());
    let mut outgoing = Vec::new();
    loop {
        if control.is_closed() {
            let _ = writer.finish().await;
            return Ok(());
        }
        tokio::select! {
            () = control.wake.notified() => {
                let actions = inner.core().swap_outgoing(crate::clock::now(), key, epoch, &mut outgoing);
                inner.execute(actions);
                send_batch(inner, key, epoch, &mut writer, &records, &outgoing).await?;
            }
            frame = reader.next() => match frame.map_err(wire_err)? {
                Some(Frame::Ack(ack)) => {
                    let actions = inner.core().on_ack(crate::clock::now(), key, epoch, ack.upto, &ack.extra);
                    inner.execute(actions);
                }
                Some(Frame::Credit(c)) => {
                    let actions = inner.core().on_credit(crate::clock::now(), key, epoch, c.window);
                    inner.execute(actions);
                }
                Some(Frame::Reject(r)) => {
                    return Err(Error::new(ErrorKind::Protocol, format!("member refused: {:?}: {}", r.code, r.reason)));
                }
                Some(other) => {
                    return Err(Error::new(ErrorKind::Protocol, format!("unexpected {} on data stream", other.kind())));
                }
                None => return Err(Error::new(ErrorKind::Protocol, "member closed the data stream")),
            }
        }
    }
}

/// Reads the bodies of `outgoing` from the outbox and writes them as `Deliver` frames,
/// one frame per run of consecutive link sequence numbers (cut by count and size).
/// Each message's envelope fields are copied as stored, not decoded and encoded again.
/// `Memory` messages are encoded under the outbox lock, without a reference to each
/// body; others are read first.
async fn send_batch(
    inner: &Arc<Inner>,
    key: &LinkKey,
    epoch: LinkEpoch,
    writer: &mut FrameWriter,
    records: &RecordSplitter,
    outgoing: &[(u64, u64)],
) -> Result<()> {
    let seqs: Vec<u64> = outgoing.iter().map(|(_, seq)| *seq).collect();
    let producer = inner.producer_id;
    let encoded = inner.outbox.with_resident_bodies(&seqs, |bodies| {
        encode_batch(producer, key, writer, records, outgoing, bodies)
    });
    let unsendable = match encoded {
        Some(unsendable) => unsendable?,
        None => {
            let bodies = inner.outbox.read_many(&seqs).await?;
            let bodies = bodies
                .iter()
                .map(|b| b.as_ref().map(|head| MemoryRecordRef { head, tail: None }));
            encode_batch(producer, key, writer, records, outgoing, bodies)?
        }
    };
    if !unsendable.is_empty() {
        let actions = inner
            .core()
            .on_ack(crate::clock::now(), key, epoch, 0, &unsendable);
        inner.execute(actions);
    }
    writer
        .flush()
        .await
        .map_err(|e| Error::with_source(ErrorKind::Protocol, "data stream", e))
}

/// Queues `outgoing` (`(link_seq, seq)`, with their stored records in `bodies`) on
/// `writer` as `Deliver` frames; returns the link sequences with nothing to send
/// (settled everywhere already, or not a valid record), to be settled for this link.
fn encode_batch<'a>(
    producer: u64,
    key: &LinkKey,
    writer: &mut FrameWriter,
    records: &RecordSplitter,
    outgoing: &[(u64, u64)],
    bodies: impl Iterator<Item = Option<MemoryRecordRef<'a>>>,
) -> Result<Vec<u64>> {
    let mut run: Vec<PreEncoded<'_>> = Vec::with_capacity(outgoing.len().min(MAX_BATCH_MESSAGES));
    let mut first = 0u64;
    let mut bytes = 0usize;
    let mut unsendable = Vec::new();
    for (&(link_seq, seq), stored) in outgoing.iter().zip(bodies) {
        let id = MessageId { producer, seq };
        let Some(stored) = stored else {
            // Already settled everywhere: nothing to send.
            unsendable.push(link_seq);
            continue;
        };
        let Some((fields, payload, owner)) = split_record(records, stored) else {
            tracing::error!(%id, "outbox record is not a valid message; settling it for this group to avoid a redelivery loop");
            unsendable.push(link_seq);
            continue;
        };
        let size = stored.len() + 32;
        let contiguous = run.is_empty() || first + run.len() as u64 == link_seq;
        let full = run.len() >= MAX_BATCH_MESSAGES || bytes + size > BATCH_BYTES;
        if !run.is_empty() && (!contiguous || full) {
            queue(writer, key, first, &run)?;
            run.clear();
            bytes = 0;
        }
        if run.is_empty() {
            first = link_seq;
        }
        bytes += size;
        run.push(PreEncoded {
            id,
            fields,
            payload,
            owner,
        });
    }
    if !run.is_empty() {
        queue(writer, key, first, &run)?;
    }
    Ok(unsendable)
}

/// The envelope fields and the payload of a stored record, and the buffer the payload
/// lies in (`None` if the record is not a valid message of this link's topic).
fn split_record<'a>(
    records: &RecordSplitter,
    record: MemoryRecordRef<'a>,
) -> Option<(&'a [u8], &'a [u8], &'a Bytes)> {
    let (fields, payload) = records.split(record.head)?;
    match record.tail {
        None => Some((fields, payload, record.head)),
        // In two pieces: the head was written without a payload, and the tail is it.
        Some(tail) => payload.is_empty().then_some((fields, &tail[..], tail)),
    }
}

fn queue(
    writer: &mut FrameWriter,
    key: &LinkKey,
    first: u64,
    messages: &[PreEncoded<'_>],
) -> Result<()> {
    writer
        .queue_deliver(key.group(), first, messages)
        .map_err(|e| Error::with_source(ErrorKind::TooLarge, "encoding a batch", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{encode_stored, Message};

    #[test]
    fn a_record_in_two_pieces_sends_its_tail_as_the_payload_and_a_mixed_one_is_refused() {
        let records = RecordSplitter::new("t");
        let whole = encode_stored("t", &Message::new(vec![9u8; 9000]).key("k"), 5);
        let (fields, payload) = records.split(&whole).expect("valid");
        assert_eq!(payload.len(), 9000);
        let one = MemoryRecordRef {
            head: &whole,
            tail: None,
        };
        let (f1, p1, owner1) = split_record(&records, one).expect("one piece");
        assert_eq!((f1, p1), (fields, payload));
        assert_eq!(owner1.as_ptr(), whole.as_ptr());

        let head_len = whole.len() - 9000;
        let (head, tail) = (whole.slice(..head_len), Bytes::from(vec![9u8; 9000]));
        let two = MemoryRecordRef {
            head: &head,
            tail: Some(&tail),
        };
        let (f2, p2, owner2) = split_record(&records, two).expect("two pieces");
        assert_eq!((f2, p2), (fields, payload));
        assert_eq!(owner2.as_ptr(), tail.as_ptr(), "the tail, not a copy");
        assert_eq!(two.to_contiguous(), whole);

        // A head that holds a payload of its own cannot take a tail as well: not a
        // valid record, so the link settles it instead of sending a wrong payload.
        let more = Bytes::from_static(b"more");
        let mixed = MemoryRecordRef {
            head: &whole,
            tail: Some(&more),
        };
        assert!(split_record(&records, mixed).is_none());
        let garbage = Bytes::from_static(b"\x00\x00");
        let garbage = MemoryRecordRef {
            head: &garbage,
            tail: Some(&more),
        };
        assert!(split_record(&records, garbage).is_none());
    }
}
