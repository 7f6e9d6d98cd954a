//! Subscriptions: the application's side of receiving. A [`Subscription`] is a `Stream`
//! of owned [`Delivery`] values; acknowledging consumes the delivery.

use crate::dedup::{Dedup, LinkAcks};
use crate::seq_map::SeqKeyedMap;
use bytes::Bytes;
use futures::Stream;
use rustc_hash::FxHashMap;
use smallvec::SmallVec;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::{mpsc, Notify, Semaphore};
use weft_proto::wire::{Envelope, MessageId};

/// Default number of unacknowledged messages a subscription lets each sender have in
/// flight (its credit window). Deep enough to cover the ack round trip of a sender
/// publishing millions of small messages a second (4,096 left a busy sender idle
/// waiting for acks: 10 % fewer 128-byte messages per second); large messages are
/// bounded by bytes instead ([`DEFAULT_MAX_QUEUED_BYTES`], QUIC flow control).
pub const DEFAULT_CREDIT: u32 = 16_384;

/// Default payload bytes a subscription's delivery queue holds before its inbound
/// streams wait (and QUIC flow control holds back the senders): the queue's bound for
/// large messages, where the credit window alone would let gigabytes queue.
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 64 << 20;

/// Receiving side of one data stream: acknowledgements owed to the sender.
#[derive(Debug, Default)]
pub(crate) struct InboundLink {
    pub(crate) acks: Mutex<LinkAcks>,
    pub(crate) wake: Notify,
}

impl InboundLink {
    /// Marks `link_seq` done. The stream is woken only when an ack becomes due: while
    /// one is pending its wake-up is on the way, and the stream takes everything done
    /// by then in one cumulative `Ack`.
    pub(crate) fn done(&self, link_seq: u64) {
        if lock(&self.acks).done(link_seq) {
            self.wake.notify_one();
        }
    }

    /// Marks several link sequences done under one lock.
    pub(crate) fn done_all(&self, link_seqs: impl IntoIterator<Item = u64>) {
        let mut wake = false;
        {
            let mut acks = lock(&self.acks);
            for link_seq in link_seqs {
                wake |= acks.done(link_seq);
            }
        }
        if wake {
            self.wake.notify_one();
        }
    }
}

/// Names an inbound stream within its subscription (see [`SubState::links`]).
pub(crate) type LinkId = u64;

/// Where a message's acknowledgement is owed: (stream, link sequence). Almost always
/// one place (a retransmission supersedes the earlier ones), so it is kept inline.
/// Streams are named by id, not by `Arc`: a reference count per message, taken on the
/// stream's thread and dropped on the application's, was a contended atomic per message.
pub(crate) type Places = SmallVec<[(LinkId, u64); 1]>;

/// Dedup and in-progress deliveries of one subscription.
#[derive(Debug)]
pub(crate) struct SubState {
    pub(crate) dedup: Dedup,
    /// The dedup state changed since it was last saved.
    pub(crate) dirty: bool,
    /// Delivered to the application, not yet acknowledged.
    /// (Hashed for locality: the ids in progress are mostly runs of consecutive
    /// sequence numbers, see `seq_map`.)
    pub(crate) in_progress: SeqKeyedMap<MessageId, Progress>,
    /// The subscription's open inbound streams, by the id their places use.
    pub(crate) links: FxHashMap<LinkId, Arc<InboundLink>>,
    /// The id of the next stream to open.
    pub(crate) next_link: LinkId,
}

impl SubState {
    /// Fresh state around loaded `dedup`.
    pub(crate) fn new(dedup: Dedup) -> Self {
        Self {
            dedup,
            dirty: false,
            in_progress: SeqKeyedMap::default(),
            links: FxHashMap::default(),
            next_link: 1,
        }
    }
}

/// A message handed to the application and not acknowledged yet.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Where its acknowledgement is owed: (stream, link sequence).
    pub(crate) places: Places,
    /// The application dropped the delivery without acking: the next retransmission
    /// is handed to the application again.
    pub(crate) abandoned: bool,
}

/// What inbound streams share with the subscription they feed.
#[derive(Debug)]
pub(crate) struct SubShared {
    pub(crate) dedup_path: std::path::PathBuf,
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) credit: u32,
    pub(crate) state: Mutex<SubState>,
    /// Fresh messages for the application (made into [`Delivery`] values as it takes
    /// them, so that a message is moved once on its way).
    pub(crate) queue: QueueSender<Envelope>,
}

impl SubShared {
    fn abandon(&self, id: MessageId) {
        if let Some(progress) = lock(&self.state).in_progress.get_mut(&id) {
            progress.abandoned = true;
        }
    }

    /// Saves the dedup state if it changed.
    pub(crate) fn persist(&self) {
        let snapshot = {
            let mut state = lock(&self.state);
            if !state.dirty {
                return;
            }
            state.dirty = false;
            state.dedup.clone()
        };
        if let Err(e) = crate::dedup::save(&self.dedup_path, &snapshot) {
            lock(&self.state).dirty = true;
            tracing::warn!(path = %self.dedup_path.display(), error = %e, "cannot save dedup state");
        }
    }

    /// Opens a stream feeding this subscription; it stays known (for the places of its
    /// messages) until the returned guard drops.
    pub(crate) fn open_link(self: &Arc<Self>) -> OpenLink {
        let link = Arc::new(InboundLink::default());
        let mut state = lock(&self.state);
        let id = state.next_link;
        state.next_link += 1;
        state.links.insert(id, link.clone());
        OpenLink {
            id,
            link,
            sub: self.clone(),
        }
    }

    fn ack(&self, id: MessageId) {
        self.ack_many(std::slice::from_ref(&id));
    }

    /// Acknowledges `ids` under one lock of the subscription state, marking their
    /// places done under one lock per run of places on the same stream. The streams are
    /// used under the state lock (the order state → a stream's acks is the receiving
    /// stream's too) rather than cloned out of it: a reference count taken and dropped
    /// per single ack.
    fn ack_many(&self, ids: &[MessageId]) {
        let mut state = lock(&self.state);
        if let [id] = ids {
            // A single ack (`Delivery::ack`, the common case): its places directly, not
            // gathered into runs first.
            state.dedup.record(*id);
            state.dirty = true;
            if let Some(progress) = state.in_progress.remove(id) {
                for (link, link_seq) in progress.places {
                    if let Some(link) = state.links.get(&link) {
                        link.done_all([link_seq]);
                    }
                }
            }
            return;
        }
        let mut places: SmallVec<[(LinkId, u64); 4]> = SmallVec::with_capacity(ids.len());
        for &id in ids {
            state.dedup.record(id);
            if let Some(progress) = state.in_progress.remove(&id) {
                places.extend(progress.places);
            }
        }
        state.dirty = true;
        let mut rest = places.as_slice();
        while let Some(&(id, _)) = rest.first() {
            let run = rest
                .iter()
                .position(|(other, _)| *other != id)
                .unwrap_or(rest.len());
            if let Some(link) = state.links.get(&id) {
                link.done_all(rest[..run].iter().map(|(_, link_seq)| *link_seq));
            }
            rest = &rest[run..];
        }
    }
}

/// An inbound stream registered with its subscription (see
/// [`SubShared::open_link`]); dropping it forgets the stream.
#[derive(Debug)]
pub(crate) struct OpenLink {
    pub(crate) id: LinkId,
    pub(crate) link: Arc<InboundLink>,
    sub: Arc<SubShared>,
}

impl Drop for OpenLink {
    fn drop(&mut self) {
        lock(&self.sub.state).links.remove(&self.id);
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned mutex means another thread panicked; the data is still consistent
    // enough to continue (every critical section here is a few map operations).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One message handed to the application. Acknowledge it with [`Delivery::ack`]; a
/// delivery dropped without an ack is redelivered after the sender's ack timeout.
#[derive(Debug)]
pub struct Delivery {
    pub(crate) envelope: Envelope,
    pub(crate) sub: Arc<SubShared>,
    pub(crate) acked: bool,
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if !self.acked {
            self.sub.abandon(self.envelope.id);
        }
    }
}

impl Delivery {
    fn new(envelope: Envelope, sub: &Arc<SubShared>) -> Self {
        Delivery {
            envelope,
            sub: sub.clone(),
            acked: false,
        }
    }

    /// The payload (a slice of the received frame; cloning it is cheap).
    pub fn payload(&self) -> &Bytes {
        &self.envelope.payload
    }

    /// The message id (stable across redeliveries).
    pub fn id(&self) -> MessageId {
        self.envelope.id
    }

    /// Topic.
    pub fn topic(&self) -> &str {
        &self.envelope.topic
    }

    /// The group this delivery is for.
    pub fn group(&self) -> &str {
        &self.sub.group
    }

    /// Ordering key, if any.
    pub fn key(&self) -> Option<&str> {
        self.envelope.key()
    }

    /// Tags.
    pub fn tags(&self) -> &[String] {
        self.envelope.tags()
    }

    /// Headers.
    pub fn headers(&self) -> &[(String, String)] {
        self.envelope.headers()
    }

    /// Publish time in milliseconds since the Unix epoch, by the publisher's system
    /// clock (a step of that clock shows in publish times within 100 ms).
    pub fn publish_time_ms(&self) -> u64 {
        self.envelope.publish_time_ms
    }

    /// Acknowledges the message: the sender settles it for this group and this
    /// subscription will drop any retransmission of it.
    pub fn ack(mut self) {
        self.acked = true;
        self.sub.ack(self.envelope.id);
    }

    /// Acknowledges every delivery of `deliveries`, as [`ack`](Self::ack) does each one,
    /// with one lock per run of deliveries of the same subscription instead of two
    /// per message. Use it with [`Subscription::recv_many`].
    pub fn ack_all(deliveries: impl IntoIterator<Item = Delivery>) {
        let mut sub: Option<Arc<SubShared>> = None;
        let mut ids = Vec::new();
        for mut d in deliveries {
            d.acked = true;
            if !sub.as_ref().is_some_and(|s| Arc::ptr_eq(s, &d.sub)) {
                // A new run: acknowledge the previous subscription's.
                if let Some(previous) = sub.replace(d.sub.clone()) {
                    previous.ack_many(&ids);
                    ids.clear();
                }
            }
            ids.push(d.envelope.id);
        }
        if let Some(sub) = sub {
            sub.ack_many(&ids);
        }
    }
}

/// Makes the bounded hand-over of deliveries from a subscription's inbound streams to
/// the application: at most `limit` deliveries and about `max_bytes` bytes (as
/// `weight` counts them) queued. Streams hand over whole batches (one channel
/// operation per batch, not per message); a batch takes one permit per delivery from a
/// semaphore of `limit` permits and one per byte (at most `max_bytes`, so that a batch
/// larger than that still fits into an empty queue) from a second one, given back once
/// the application has taken the whole batch. A stream waits for permits while the
/// queue is full.
pub(crate) fn delivery_queue<T>(
    limit: u32,
    max_bytes: usize,
    weight: fn(&T) -> usize,
) -> (QueueSender<T>, QueueReceiver<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let max_bytes = u32::try_from(max_bytes).unwrap_or(u32::MAX).max(1);
    let room = Arc::new(Semaphore::new(limit.max(1) as usize));
    let byte_room = Arc::new(Semaphore::new(max_bytes as usize));
    let sender = QueueSender {
        tx,
        room: room.clone(),
        byte_room: byte_room.clone(),
        limit: limit.max(1),
        max_bytes,
        weight,
        closed: Mutex::new(false),
    };
    let receiver = QueueReceiver {
        rx,
        room,
        byte_room,
        current: Vec::new().into_iter(),
        held: 0,
        held_bytes: 0,
        ended: false,
    };
    (sender, receiver)
}

/// What a queued message weighs against [`DEFAULT_MAX_QUEUED_BYTES`]: its payload.
pub(crate) fn envelope_bytes(envelope: &Envelope) -> usize {
    envelope.payload.len()
}

/// The streams' end of a delivery queue.
#[derive(Debug)]
pub(crate) struct QueueSender<T> {
    tx: mpsc::UnboundedSender<(Vec<T>, u32)>,
    room: Arc<Semaphore>,
    byte_room: Arc<Semaphore>,
    limit: u32,
    max_bytes: u32,
    weight: fn(&T) -> usize,
    /// Set by [`close`](Self::close), which then sends the end marker. Held while a
    /// batch is sent, so that no batch goes after the marker.
    closed: Mutex<bool>,
}

/// The queue was closed: the subscription is gone.
#[derive(Debug)]
pub(crate) struct QueueClosed;

impl<T> QueueSender<T> {
    /// Queues `items` in order, in chunks of at most the queue's limit, waiting while
    /// it is full. Fails only if the subscription is gone.
    pub(crate) async fn send_all(&self, mut items: Vec<T>) -> Result<(), QueueClosed> {
        while !items.is_empty() {
            let rest = if items.len() > self.limit as usize {
                items.split_off(self.limit as usize)
            } else {
                Vec::new()
            };
            let bytes = items.iter().map(self.weight).sum::<usize>();
            let bytes = u32::try_from(bytes).map_or(self.max_bytes, |b| b.min(self.max_bytes));
            let permits = self
                .room
                .acquire_many(items.len() as u32)
                .await
                .map_err(|_| QueueClosed)?;
            let byte_permits = self
                .byte_room
                .acquire_many(bytes)
                .await
                .map_err(|_| QueueClosed)?;
            permits.forget();
            byte_permits.forget();
            {
                let closed = lock(&self.closed);
                if *closed {
                    return Err(QueueClosed);
                }
                self.tx.send((items, bytes)).map_err(|_| QueueClosed)?;
            }
            items = rest;
        }
        Ok(())
    }

    /// Ends the queue (the peer is closing): the receiver hands over what was queued
    /// before, then reports the end; later sends fail. (The sender lives as long as the
    /// subscription, so the channel alone would never end.) Deliveries that do not get
    /// in are not acknowledged, so their senders deliver them again.
    pub(crate) fn close(&self) {
        let mut closed = lock(&self.closed);
        if std::mem::replace(&mut *closed, true) {
            return;
        }
        self.room.close();
        self.byte_room.close();
        // The end marker (`send_all` never sends an empty batch); it wakes the receiver.
        let _ = self.tx.send((Vec::new(), 0));
    }
}

/// The application's end of a delivery queue.
#[derive(Debug)]
pub(crate) struct QueueReceiver<T> {
    rx: mpsc::UnboundedReceiver<(Vec<T>, u32)>,
    room: Arc<Semaphore>,
    byte_room: Arc<Semaphore>,
    /// The batch being taken from, and the permits it holds.
    current: std::vec::IntoIter<T>,
    held: u32,
    held_bytes: u32,
    /// The end marker was taken: nothing more comes.
    ended: bool,
}

impl<T> QueueReceiver<T> {
    /// Hands up to `limit` queued items to `take`, waiting for at least one; 0 once
    /// the queue is closed and empty (or if `limit` is 0).
    fn poll_many(
        &mut self,
        cx: &mut Context<'_>,
        limit: usize,
        mut take: impl FnMut(T),
    ) -> Poll<usize> {
        let mut taken = 0;
        while taken < limit {
            for item in self.current.by_ref().take(limit - taken) {
                take(item);
                taken += 1;
            }
            if taken == limit {
                break;
            }
            if self.held > 0 {
                self.room.add_permits(self.held as usize);
                self.byte_room.add_permits(self.held_bytes as usize);
                self.held = 0;
                self.held_bytes = 0;
            }
            if self.ended {
                break;
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some((batch, _))) if batch.is_empty() => {
                    // Only `close` sends an empty batch: the end marker.
                    self.ended = true;
                }
                Poll::Ready(Some((batch, bytes))) => {
                    self.held = batch.len() as u32;
                    self.held_bytes = bytes;
                    self.current = batch.into_iter();
                }
                Poll::Ready(None) => break,
                Poll::Pending if taken == 0 => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        Poll::Ready(taken)
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut next = None;
        self.poll_many(cx, 1, |item| next = Some(item))
            .map(|_| next)
    }
}

impl<T> Drop for QueueReceiver<T> {
    fn drop(&mut self) {
        // Streams waiting for room fail at once instead of waiting forever.
        self.room.close();
        self.byte_room.close();
    }
}

/// A stream of deliveries for one (topic, group). Dropping it unregisters the
/// subscription.
pub struct Subscription {
    pub(crate) rx: QueueReceiver<Envelope>,
    pub(crate) shared: Arc<SubShared>,
    pub(crate) on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.shared.topic)
            .field("group", &self.shared.group)
            .finish()
    }
}

impl Subscription {
    /// The next delivery; `None` once the peer is closed. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Delivery> {
        std::future::poll_fn(|cx| self.poll_delivery(cx)).await
    }

    fn poll_delivery(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let shared = &self.shared;
        self.rx
            .poll_next(cx)
            .map(|envelope| envelope.map(|envelope| Delivery::new(envelope, shared)))
    }

    /// Waits for at least one delivery, then moves up to `limit` of those queued into
    /// `buffer` (appended) and returns how many; 0 once the peer is closed (or if
    /// `limit` is 0). Cancel-safe. Acknowledge them with [`Delivery::ack_all`] or
    /// one by one.
    pub async fn recv_many(&mut self, buffer: &mut Vec<Delivery>, limit: usize) -> usize {
        if limit == 0 {
            return 0;
        }
        let shared = &self.shared;
        let rx = &mut self.rx;
        std::future::poll_fn(|cx| {
            rx.poll_many(cx, limit, |envelope| {
                buffer.push(Delivery::new(envelope, shared));
            })
        })
        .await
    }

    /// Topic.
    pub fn topic(&self) -> &str {
        &self.shared.topic
    }

    /// Group.
    pub fn group(&self) -> &str {
        &self.shared.group
    }
}

impl Stream for Subscription {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.poll_delivery(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(f) = self.on_drop.take() {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    /// A queue bounded by count only.
    fn counted(limit: u32) -> (QueueSender<u32>, QueueReceiver<u32>) {
        delivery_queue(limit, usize::MAX, |_| 0)
    }

    async fn next<T>(rx: &mut QueueReceiver<T>) -> Option<T> {
        std::future::poll_fn(|cx| rx.poll_next(cx)).await
    }

    #[tokio::test]
    async fn a_closed_queue_hands_over_what_it_holds_then_ends_and_refuses_more() {
        let (tx, mut rx) = counted(4);
        tx.send_all(vec![1, 2, 3]).await.expect("room");
        tx.close();
        assert!(tx.send_all(vec![4]).await.is_err(), "closed: refused");
        assert_eq!(next(&mut rx).await, Some(1));
        assert_eq!(next(&mut rx).await, Some(2));
        assert_eq!(next(&mut rx).await, Some(3));
        assert_eq!(next(&mut rx).await, None, "then the end");
        assert_eq!(next(&mut rx).await, None, "and it stays ended");
    }

    #[tokio::test]
    async fn closing_wakes_a_receiver_waiting_on_an_empty_queue() {
        let (tx, mut rx) = counted(4);
        let waiting = tokio::spawn(async move { next(&mut rx).await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "nothing queued: it waits");
        tx.close();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken by close")
            .expect("task");
        assert_eq!(got, None);
    }

    fn shared() -> Arc<SubShared> {
        let (queue, _rx) = delivery_queue(8, 1 << 20, envelope_bytes);
        Arc::new(SubShared {
            dedup_path: std::path::PathBuf::from("unused"),
            topic: "t".into(),
            group: "g".into(),
            credit: 8,
            state: Mutex::new(SubState::new(Dedup::new(16))),
            queue,
        })
    }

    fn in_progress(sub: &SubShared, seq: u64, places: &[(LinkId, u64)]) -> MessageId {
        let id = MessageId { producer: 7, seq };
        let progress = Progress {
            places: places.iter().copied().collect(),
            abandoned: false,
        };
        lock(&sub.state).in_progress.insert(id, progress);
        id
    }

    fn acked(link: &OpenLink) -> Option<(u64, Vec<u64>)> {
        lock(&link.link.acks)
            .take_ack()
            .map(|ack| (ack.upto, ack.extra))
    }

    #[test]
    fn acks_reach_the_stream_each_place_names_and_skip_closed_ones() {
        let sub = shared();
        let (a, b) = (sub.open_link(), sub.open_link());
        assert_ne!(a.id, b.id);
        for l in [&a, &b] {
            lock(&l.link.acks).received(1, 3);
        }
        let m1 = in_progress(&sub, 1, &[(a.id, 1)]);
        let m2 = in_progress(&sub, 2, &[(b.id, 2), (a.id, 2)]);
        let m3 = in_progress(&sub, 3, &[(b.id, 3)]);
        sub.ack_many(&[m1, m2]);
        assert_eq!(acked(&a), Some((2, vec![])));
        assert_eq!(acked(&b), Some((0, vec![2])));
        let closed = b.id;
        drop(b);
        assert!(!lock(&sub.state).links.contains_key(&closed), "forgotten");
        sub.ack_many(&[m3]); // its only place is gone: nothing to do, no panic
        assert!(lock(&sub.state).in_progress.is_empty());
        assert_eq!(acked(&a), None);
    }

    #[tokio::test]
    async fn the_queue_keeps_order_and_splits_batches_above_its_limit() {
        let (tx, mut rx) = counted(3);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(v) = next(&mut rx).await {
                got.push(v);
            }
            got
        });
        tx.send_all((0..10).collect()).await.expect("open");
        tx.send_all(Vec::new()).await.expect("nothing to send");
        drop(tx);
        assert_eq!(reader.await.expect("reader"), (0..10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_full_queue_makes_the_sender_wait_until_a_batch_is_taken() {
        let (tx, mut rx) = counted(4);
        tx.send_all(vec![1, 2, 3]).await.expect("fits");
        let blocked = tx.send_all(vec![4, 5]).now_or_never();
        assert!(blocked.is_none(), "5 queued > limit 4: the sender waits");
        assert_eq!(next(&mut rx).await, Some(1));
        // Permits come back when the whole batch has been taken.
        assert_eq!(next(&mut rx).await, Some(2));
        assert_eq!(next(&mut rx).await, Some(3));
        let send = tokio::spawn(async move {
            tx.send_all(vec![4, 5]).await.expect("room again");
            tx
        });
        assert_eq!(next(&mut rx).await, Some(4));
        assert_eq!(next(&mut rx).await, Some(5));
        drop(send.await.expect("sender"));
        assert_eq!(next(&mut rx).await, None);
    }

    #[tokio::test]
    async fn the_sender_fails_once_the_subscription_is_gone_even_while_waiting() {
        let (tx, rx) = counted(2);
        tx.send_all(vec![1, 2]).await.expect("fits");
        let mut waiting = Box::pin(tx.send_all(vec![3]));
        assert!((&mut waiting).now_or_never().is_none(), "full: it waits");
        drop(rx);
        // Without the close on drop this would wait forever: bound it so a regression
        // fails instead of hanging the suite.
        let result = tokio::time::timeout(std::time::Duration::from_secs(10), waiting).await;
        assert!(result.expect("woken by the close").is_err());
    }

    async fn many<T>(rx: &mut QueueReceiver<T>, buf: &mut Vec<T>, limit: usize) -> usize {
        std::future::poll_fn(|cx| rx.poll_many(cx, limit, |item| buf.push(item))).await
    }

    #[tokio::test]
    async fn taking_many_crosses_batches_within_the_limit_and_frees_room() {
        let (tx, mut rx) = counted(4);
        tx.send_all(vec![1, 2]).await.expect("fits");
        tx.send_all(vec![3, 4]).await.expect("fits");
        let mut got = Vec::new();
        assert_eq!(many(&mut rx, &mut got, 3).await, 3, "across two batches");
        assert_eq!(got, vec![1, 2, 3]);
        // The first batch was taken whole: its two permits are back, so two fit.
        tx.send_all(vec![5, 6])
            .now_or_never()
            .expect("room")
            .expect("open");
        assert_eq!(
            many(&mut rx, &mut got, 10).await,
            3,
            "what is queued, no waiting"
        );
        assert_eq!(got, vec![1, 2, 3, 4, 5, 6]);
        assert!(
            many(&mut rx, &mut got, 10).now_or_never().is_none(),
            "empty: it waits"
        );
        drop(tx);
        assert_eq!(many(&mut rx, &mut got, 10).await, 0, "closed and empty");
    }

    #[tokio::test]
    async fn a_queue_full_of_bytes_makes_the_sender_wait_and_a_large_batch_still_fits() {
        // Each item weighs its value in bytes; 10 bytes at most.
        let (tx, mut rx) = delivery_queue::<u32>(100, 10, |v| *v as usize);
        tx.send_all(vec![4, 4]).await.expect("8 bytes fit");
        let blocked = tx.send_all(vec![3]).now_or_never();
        assert!(blocked.is_none(), "8 + 3 bytes > 10: the sender waits");
        assert_eq!(next(&mut rx).await, Some(4));
        assert_eq!(next(&mut rx).await, Some(4));
        // Taken whole: the bytes are back once the receiver looks for more.
        let send = tokio::spawn(async move {
            tx.send_all(vec![3]).await.expect("room again");
            // Larger than the whole bound: it waits for an empty queue, then goes in.
            tx.send_all(vec![25])
                .await
                .expect("an oversized batch fits alone");
            tx
        });
        assert_eq!(next(&mut rx).await, Some(3));
        assert_eq!(next(&mut rx).await, Some(25));
        drop(send.await.expect("sender"));
        assert_eq!(next(&mut rx).await, None);
    }
}
