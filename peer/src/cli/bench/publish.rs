//! The publishing and receiving loops of throughput runs, in this process or in the
//! children of `--processes`.

use super::pacer::{Pacer, PacerHandle};
use super::payload::{now_ns, sent_ns, PayloadShape, ReusedPayload};
use super::{default_window, histogram, BenchArgs};
use anyhow::Result;
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use weft_peer::{Delivery, Message, Peer, Subscription};

/// What one publisher of a throughput run publishes.
pub(super) struct PublishPlan {
    /// Messages (`u64::MAX` when `stop_at` bounds the run).
    count: u64,
    /// Messages per `publish_batch` (1: one `publish` each).
    batch: u64,
    /// Publishes (single or batches) in flight at once.
    pub(super) in_flight: usize,
    /// Distinct keys (0: unkeyed).
    keys: u64,
    /// No publish due at or after this time (`--duration`).
    stop_at: Option<u64>,
    shape: PayloadShape,
    topic: Arc<str>,
}

impl PublishPlan {
    /// The plan of one publisher publishing `count` messages (`u64::MAX`: until
    /// `stop_at`), and its pacer when `--rate` is given.
    pub(super) fn new(
        args: &BenchArgs,
        topic: &str,
        count: u64,
        stop_at: Option<u64>,
    ) -> Result<(PublishPlan, Option<PacerHandle>)> {
        let batch = args.batch.max(1);
        let window = args
            .window
            .unwrap_or(default_window(batch, args.size, args.durability));
        let plan = PublishPlan {
            count,
            batch: batch as u64,
            in_flight: window.div_ceil(batch).max(1),
            keys: args.keys,
            stop_at,
            shape: PayloadShape::new(args.size, args.compressible),
            topic: topic.into(),
        };
        let pacer = args.rate.map(|r| Pacer::start(r, count)).transpose()?;
        Ok((plan, pacer))
    }
}

/// Publishes `plan` as fast as `publisher` takes it, or as `pacer` releases it
/// (`--rate`); returns the messages published and, when paced, how late each
/// publish started after it was due.
pub(super) async fn publish_all(
    publisher: Peer,
    plan: PublishPlan,
    pacer: Option<PacerHandle>,
) -> weft_peer::Result<(u64, Option<Histogram<u64>>)> {
    let PublishPlan {
        count,
        batch,
        keys,
        stop_at,
        ..
    } = plan;
    let paced = pacer.is_some();
    let message = move |i: u64, payload: Bytes| {
        let m = Message::new(payload);
        if keys > 0 {
            m.key(format!("k{}", i % keys))
        } else {
            m
        }
    };
    let due: futures::stream::BoxStream<'static, (u64, u64)> = match pacer {
        Some((pacer, released)) => futures::stream::unfold(released, |mut rx| async {
            rx.recv().await.map(|range| (range, rx))
        })
        .flat_map(move |range| {
            let firsts = range.filter(move |i| i % batch == 0);
            futures::stream::iter(firsts.map(move |i| (i, pacer.due(i))))
        })
        .boxed(),
        // Unpaced: stamped when published (below), by a `SendClock`.
        None => futures::stream::iter((0..count).step_by(batch as usize))
            .map(|i| (i, 0))
            .boxed(),
    };
    let mut due = due
        .take_while(move |&(_, at)| futures::future::ready(stop_at.is_none_or(|stop| at < stop)));
    let mut single = ReusedPayload::new(plan.shape.clone());
    let mut lag = histogram();
    let mut published = 0u64;
    {
        // Publishes `first..` (one message, or a batch) due at `due`; resolves to how
        // many messages went in.
        // Borrowed by every publish (no reference count touched per message).
        let (publisher, shape, topic) = (&publisher, &plan.shape, &*plan.topic);
        let mut publish = |first: u64, due: u64| {
            if paced {
                let _ = lag.record(now_ns().saturating_sub(due).max(1));
            }
            let one = (batch == 1).then(|| single.at(due));
            async move {
                if let Some(body) = one {
                    return publisher
                        .publish(topic, message(first, body))
                        .await
                        .map(|_| 1);
                }
                let end = (first + batch).min(count);
                let bodies = shape.batch((end - first) as usize, due);
                let messages = (first..end).zip(bodies).map(|(i, p)| message(i, p));
                // Boxed, once per batch: held inline, the batch's future would make
                // every single publish's larger too, past the allocator's per-thread
                // cache (1 KiB) when `buffer_unordered` allocates it.
                Box::pin(publisher.publish_batch(topic, messages))
                    .await
                    .map(|_| end - first)
            }
        };
        if plan.in_flight == 1 {
            // Each publish awaited in turn, as an application's publish loop is
            // written (and without a `FuturesUnordered` task per publish).
            let mut clock = SendClock::default();
            while let Some((first, at)) = due.next().await {
                let at = match (paced, batch) {
                    (true, _) => at,
                    // A batch takes long enough to read the clock for each.
                    (false, 1) => clock.now(),
                    (false, _) => now_ns(),
                };
                let mut one = std::pin::pin!(publish(first, at));
                let n = match futures::poll!(one.as_mut()) {
                    std::task::Poll::Ready(n) => n,
                    std::task::Poll::Pending => {
                        clock.waited();
                        one.await
                    }
                };
                published += n?;
            }
        } else if batch == 1 {
            // Pipelined as the docs of `Peer::submit` advise: receipts kept in publish
            // order and the oldest awaited when the window is full, so that one group
            // commit wakes this task once, not once per message.
            let mut receipts = std::collections::VecDeque::with_capacity(plan.in_flight);
            while let Some((first, at)) = due.next().await {
                if receipts.len() == plan.in_flight {
                    if let Some(oldest) = receipts.pop_front() {
                        oldest.await?;
                        published += 1;
                    }
                }
                let at = if paced {
                    let _ = lag.record(now_ns().saturating_sub(at).max(1));
                    at
                } else {
                    now_ns()
                };
                let body = single.at(at);
                receipts.push_back(publisher.submit(topic, message(first, body)).await?);
            }
            for receipt in receipts {
                receipt.await?;
                published += 1;
            }
        } else {
            let mut in_flight = due
                .map(|(first, at)| publish(first, if paced { at } else { now_ns() }))
                .buffer_unordered(plan.in_flight);
            while let Some(n) = in_flight.next().await {
                published += n?;
            }
        }
    }
    Ok((published, paced.then_some(lag)))
}

/// Send times of unpaced publishes awaited one at a time. Reading the clock cost ~43 ns
/// on the 2-core VM, 3.5 % of a single-publish run's samples, on the publishing
/// task; as the payloads of [`PAYLOAD_REUSE`](super::payload::PAYLOAD_REUSE) share
/// one send time, so do up to [`SendClock::READ_EVERY`] publishes that did not wait
/// (about a microsecond each). After a publish that waited (for room in the outbox,
/// say) the clock is read again, so a time is never older than that run of quick
/// publishes: latencies stay too long by at most that, never too short.
#[derive(Default)]
struct SendClock {
    last: u64,
    unread: u32,
}

impl SendClock {
    const READ_EVERY: u32 = 16;

    fn now(&mut self) -> u64 {
        if self.unread == 0 {
            self.last = now_ns();
            self.unread = Self::READ_EVERY;
        }
        self.unread -= 1;
        self.last
    }

    /// The last publish waited: the next reads the clock.
    fn waited(&mut self) {
        self.unread = 0;
    }
}

/// The latencies the subscriber loops recorded so far.
pub(super) fn recorded(latency: &Mutex<Histogram<u64>>) -> Histogram<u64> {
    latency
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| histogram())
}

/// The subscriber loop of single-publish runs: each delivery acknowledged on its own,
/// as an application does; the count goes to the shared one every 1,024 deliveries
/// (for the progress line), the latencies to the shared histogram when the
/// subscription ends (which is when the run reads them: adding a histogram walks all
/// its buckets, 1.7 % of a run's samples when done every 1,024 deliveries).
pub(super) async fn receive_each(
    mut sub: Subscription,
    delivered: Arc<AtomicU64>,
    latency: Arc<Mutex<Histogram<u64>>>,
) {
    let mut local = histogram();
    let mut n = 0u64;
    let mut arrivals = ArrivalClock::default();
    loop {
        let mut next = sub.next();
        let d = match futures::poll!(&mut next) {
            std::task::Poll::Ready(d) => d,
            std::task::Poll::Pending => {
                arrivals.record(&mut local);
                next.await
            }
        };
        let Some(d) = d else { break };
        arrivals.taken(sent_ns(d.payload()), &mut local);
        n += 1;
        d.ack();
        if n == 1024 {
            delivered.fetch_add(std::mem::take(&mut n), Ordering::Relaxed);
        }
    }
    arrivals.record(&mut local);
    delivered.fetch_add(n, Ordering::Relaxed);
    if let Ok(mut h) = latency.lock() {
        let _ = h.add(&local);
    }
}

/// Latencies of deliveries taken one at a time, with one clock reading per run of up
/// to [`ArrivalClock::RUN`] of them (a reading per delivery was 2.8 % of a
/// single-publish run's samples, on the subscriber's task). Each run's latencies end
/// at a reading taken after the whole run was handled (when it is full, or before the
/// subscriber waits for the next), so they are too long by at most that handling,
/// never too short.
#[derive(Default)]
struct ArrivalClock {
    sent: Vec<u64>,
}

impl ArrivalClock {
    const RUN: usize = 16;

    /// A delivery sent at `sent` was taken.
    fn taken(&mut self, sent: u64, into: &mut Histogram<u64>) {
        self.sent.push(sent);
        if self.sent.len() >= Self::RUN {
            self.record(into);
        }
    }

    /// Records the run so far as received now.
    fn record(&mut self, into: &mut Histogram<u64>) {
        if self.sent.is_empty() {
            return;
        }
        let now = now_ns();
        for sent in self.sent.drain(..) {
            let _ = into.record(now.saturating_sub(sent).max(1));
        }
    }
}

/// The subscriber loop of `--batch` runs: deliveries taken and acknowledged in batches
/// ([`Subscription::recv_many`], [`Delivery::ack_all`]), latencies recorded into the
/// shared histogram under one lock per batch.
pub(super) async fn receive_batches(
    mut sub: Subscription,
    delivered: Arc<AtomicU64>,
    latency: Arc<Mutex<Histogram<u64>>>,
) {
    let mut batch = Vec::with_capacity(RECEIVE_BATCH);
    while sub.recv_many(&mut batch, RECEIVE_BATCH).await > 0 {
        let now = now_ns();
        if let Ok(mut h) = latency.lock() {
            // The messages of one publish batch carry one send time: one record per run.
            let mut sent = batch.iter().map(|d| sent_ns(d.payload())).peekable();
            while let Some(t) = sent.next() {
                let mut n = 1;
                while sent.next_if_eq(&t).is_some() {
                    n += 1;
                }
                let _ = h.record_n(now.saturating_sub(t).max(1), n);
            }
        }
        delivered.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Delivery::ack_all(batch.drain(..));
    }
}

/// Most deliveries a `--batch` subscriber takes at once.
const RECEIVE_BATCH: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_send_clock_is_read_every_few_publishes_and_after_a_wait() {
        let mut clock = SendClock::default();
        let first = clock.now();
        for _ in 1..SendClock::READ_EVERY {
            assert_eq!(clock.now(), first, "shared by a run of quick publishes");
        }
        std::thread::sleep(Duration::from_millis(1));
        let second = clock.now();
        assert!(second > first, "read again after READ_EVERY");
        std::thread::sleep(Duration::from_millis(1));
        clock.waited();
        assert!(clock.now() > second, "read again after a wait");
    }

    #[test]
    fn arrivals_are_recorded_per_run_and_never_too_short() {
        let mut h = histogram();
        let mut arrivals = ArrivalClock::default();
        let sent = now_ns();
        for _ in 1..ArrivalClock::RUN {
            arrivals.taken(sent, &mut h);
        }
        assert_eq!(h.len(), 0, "a run is recorded when full");
        std::thread::sleep(Duration::from_millis(2));
        arrivals.taken(sent, &mut h);
        assert_eq!(h.len(), ArrivalClock::RUN as u64);
        assert!(h.min() >= 2_000_000, "ends after the run: {} ns", h.min());
        arrivals.taken(sent, &mut h);
        arrivals.record(&mut h);
        arrivals.record(&mut h);
        assert_eq!(h.len(), ArrivalClock::RUN as u64 + 1, "a partial run, once");
    }
}
