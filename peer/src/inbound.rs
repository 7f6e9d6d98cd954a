//! Accepting data streams from senders and feeding them to local subscriptions.

use crate::peer::Inner;
use crate::subscription::{lock, Delivery, InboundLink, SubShared};
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
    let link = Arc::new(InboundLink::default());
    loop {
        tokio::select! {
            frame = reader.next() => match frame? {
                Some(Frame::Deliver(d)) => {
                    if d.group != sub.group {
                        writer.reject(ErrorCode::Protocol, "Deliver for another group than the stream's Open").await;
                        return Ok(());
                    }
                    if !receive(&sub, &link, d).await {
                        writer.reject(ErrorCode::ShuttingDown, "subscription closed").await;
                        return Ok(());
                    }
                }
                Some(other) => {
                    warn!(peer = %identity, kind = other.kind(), "unexpected frame on a data stream; closing it");
                    writer.reject(ErrorCode::Protocol, format!("unexpected {}", other.kind())).await;
                    return Ok(());
                }
                None => return Ok(()),
            },
            () = link.wake.notified() => {
                let ack = lock(&link.acks).take_ack();
                if let Some(ack) = ack {
                    writer.send(&Frame::Ack(ack)).await?;
                }
            }
        }
    }
}

/// Hands new messages of a batch to the application, skipping the ones already acked
/// or already being processed. False if the subscription is gone.
async fn receive(sub: &Arc<SubShared>, link: &Arc<InboundLink>, batch: wire::Deliver) -> bool {
    let count = batch.messages.len() as u64;
    if !lock(&link.acks).received(batch.first_link_seq, count) {
        warn!(
            first = batch.first_link_seq,
            "implausible link sequence from sender; closing stream"
        );
        return false;
    }
    let mut fresh = Vec::with_capacity(batch.messages.len());
    {
        let mut state = lock(&sub.state);
        for (i, envelope) in batch.messages.into_iter().enumerate() {
            let link_seq = batch.first_link_seq + i as u64;
            if state.dedup.is_acked(envelope.id) {
                link.done(link_seq);
            } else if let Some(places) = state.in_progress.get_mut(&envelope.id) {
                places.push((link.clone(), link_seq));
            } else {
                state
                    .in_progress
                    .insert(envelope.id, vec![(link.clone(), link_seq)]);
                fresh.push(envelope);
            }
        }
    }
    for envelope in fresh {
        let delivery = Delivery {
            envelope,
            sub: sub.clone(),
        };
        if sub.tx.send(delivery).await.is_err() {
            return false;
        }
    }
    true
}
