//! Accepting data streams from senders and feeding them to local subscriptions.

use crate::peer::Inner;
use crate::subscription::{lock, OpenLink, Places, Progress, SubShared};
use smallvec::SmallVec;
use std::sync::Arc;
use tracing::{debug, warn};
use weft_proto::tls;
use weft_proto::wire::{self, Credit, ErrorCode, Frame, FrameReader, FrameWriter, Welcome};

/// Accepts peer connections until the endpoint closes.
pub(crate) async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        let inner = inner.clone();
        tokio::spawn(async move {
            // `tls::accept` logs refused handshakes (foreign CA, missing certificate).
            let Ok((conn, identity)) = tls::accept(incoming).await else {
                return;
            };
            loop {
                let (send, recv) = match conn.accept_bi().await {
                    Ok(s) => s,
                    Err(e) => {
                        debug!(peer = %identity, error = %e, "data connection closed");
                        return;
                    }
                };
                let inner = inner.clone();
                let identity = identity.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_stream(&inner, &identity, send, recv).await {
                        debug!(peer = %identity, error = %e, "data stream ended");
                    }
                });
            }
        });
    }
}

async fn serve_stream(
    inner: &Arc<Inner>,
    identity: &str,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<(), wire::WireError> {
    let max_frame = inner.config.max_frame;
    let mut writer = FrameWriter::new(send, max_frame);
    let mut reader = FrameReader::new(recv, max_frame);
    let welcome = Welcome {
        version: wire::PROTOCOL_VERSION,
        identity: inner.identity.clone(),
        incarnation: inner.incarnation,
    };
    wire::accept_handshake(&mut writer, &mut reader, identity, &welcome).await?;
    let open = match reader.expect("Open").await? {
        Frame::Open(o) => o,
        other => {
            writer
                .reject(
                    ErrorCode::Protocol,
                    format!("expected Open, got {}", other.kind()),
                )
                .await;
            return Ok(());
        }
    };
    let Some(sub) = inner.subscription(&open.topic, &open.group) else {
        writer
            .reject(
                ErrorCode::NotFound,
                format!(
                    "no subscription to {:?} in group {:?} here",
                    open.topic, open.group
                ),
            )
            .await;
        return Ok(());
    };
    writer
        .send(&Frame::Credit(Credit { window: sub.credit }))
        .await?;
    let link = sub.open_link();
    loop {
        tokio::select! {
            frame = reader.next() => match frame {
                Err(e) => {
                    let code = match e {
                        wire::WireError::FrameTooLarge { .. } => ErrorCode::LimitExceeded,
                        wire::WireError::Malformed(_) | wire::WireError::Truncated { .. } => ErrorCode::Protocol,
                        // The connection or stream went away: nothing to answer.
                        _ => return Err(e),
                    };
                    warn!(peer = %identity, error = %e, "bad frame on a data stream; closing it");
                    writer.reject(code, e.to_string()).await;
                    return Err(e);
                }
                Ok(Some(Frame::Deliver(d))) => {
                    if let Err((code, reason)) = check_batch(&open, &d) {
                        warn!(peer = %identity, %reason, "refusing a batch; closing the stream");
                        writer.reject(code, reason).await;
                        return Ok(());
                    }
                    if let Err((code, reason)) = receive(&sub, &link, d).await {
                        writer.reject(code, reason).await;
                        return Ok(());
                    }
                }
                Ok(Some(other)) => {
                    warn!(peer = %identity, kind = other.kind(), "unexpected frame on a data stream; closing it");
                    writer.reject(ErrorCode::Protocol, format!("unexpected {}", other.kind())).await;
                    return Ok(());
                }
                Ok(None) => return Ok(()),
            },
            () = link.link.wake.notified() => {
                let ack = lock(&link.link.acks).take_ack();
                if let Some(ack) = ack {
                    writer.send(&Frame::Ack(ack)).await?;
                }
            }
        }
    }
}

/// A batch must belong to the stream's subscription.
fn check_batch(open: &wire::Open, batch: &wire::Deliver) -> Result<(), (ErrorCode, String)> {
    if batch.group != open.group {
        return Err((
            ErrorCode::Protocol,
            format!(
                "Deliver for group {:?} on a stream opened for {:?}",
                batch.group, open.group
            ),
        ));
    }
    if let Some(m) = batch.messages.iter().find(|m| *m.topic != *open.topic) {
        return Err((
            ErrorCode::Protocol,
            format!(
                "message for topic {:?} on a stream opened for {:?}",
                m.topic, open.topic
            ),
        ));
    }
    Ok(())
}

/// Hands new messages of a batch to the application, skipping the ones already acked
/// or being processed. A retransmission supersedes the earlier places of its message
/// (the sender requeued them), so those are released at once.
///
/// Per batch: one lock of the link's acks for the batch's link sequences, one lock of
/// the subscription state for dedup and `in_progress`, one more of the link's acks for
/// the duplicates, then the fresh messages go to the subscription's delivery queue in
/// the frame's own vector (waiting while the queue is full).
async fn receive(
    sub: &Arc<SubShared>,
    open: &OpenLink,
    batch: wire::Deliver,
) -> Result<(), (ErrorCode, String)> {
    let (link, link_id) = (&open.link, open.id);
    let count = batch.messages.len() as u64;
    let Some(wake) = lock(&link.acks).received(batch.first_link_seq, count) else {
        return Err((
            ErrorCode::Protocol,
            format!("implausible link sequence {}", batch.first_link_seq),
        ));
    };
    if wake {
        link.wake.notify_one();
    }
    let mut messages = batch.messages;
    let mut fresh = Vec::with_capacity(messages.len());
    let mut duplicates = SmallVec::<[u64; 16]>::new();
    {
        let mut state = lock(&sub.state);
        let state = &mut *state;
        for (envelope, link_seq) in messages.iter().zip(batch.first_link_seq..) {
            if state.dedup.is_acked(envelope.id) {
                duplicates.push(link_seq);
                fresh.push(false);
                continue;
            }
            let links = &state.links;
            let progress = state
                .in_progress
                .entry(envelope.id)
                .or_insert_with(|| Progress {
                    places: Places::new(),
                    abandoned: true,
                });
            // Usually empty (a first delivery); skipping the drain then was measurable.
            if !progress.places.is_empty() {
                for (old_link, old_seq) in progress.places.drain(..) {
                    if old_link == link_id {
                        duplicates.push(old_seq);
                    } else if let Some(old) = links.get(&old_link) {
                        // Superseded on another stream (which may have closed since).
                        old.done(old_seq);
                    }
                }
            }
            progress.places.push((link_id, link_seq));
            fresh.push(std::mem::replace(&mut progress.abandoned, false));
        }
    }
    if !duplicates.is_empty() {
        link.done_all(duplicates);
    }
    // Keeps the frame's vector: without duplicates nothing moves.
    let mut is_fresh = fresh.into_iter();
    messages.retain(|_| is_fresh.next().unwrap_or(false));
    sub.queue
        .send_all(messages)
        .await
        .map_err(|_| (ErrorCode::ShuttingDown, "subscription closed".into()))
}
