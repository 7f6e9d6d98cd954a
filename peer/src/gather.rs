//! Single `Disk` publishes gathered into one outbox append while the writer is busy
//! with a commit: the next commit takes them together, as it would a
//! [`publish_batch`](crate::Peer::publish_batch), with one hand-off to the dispatcher
//! and one wake-up of their receipts instead of one per message. No timer: a
//! gathering is sealed when the writer takes it, so no message waits longer than the
//! commit before it would have.

use crate::dispatch::Seq;
use crate::error::{Error, ErrorKind, Result};
use crate::outbox::{AppendDone, GatheredAppend, OutboxError, Sealed};
use crate::peer::{Inner, Targets};
use crate::subscription::lock;
use bytes::Bytes;
use std::ops::Range;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

/// Most messages in one gathering: past this a new one starts (each is one writer
/// request and one append, so this only bounds a single commit's list).
pub(crate) const GATHER_MAX_MESSAGES: usize = 4096;
/// Most body bytes in one gathering (as [`GATHER_MAX_MESSAGES`]).
pub(crate) const GATHER_MAX_BYTES: usize = 4 * 1024 * 1024;
/// Messages a gathering reserves outbox quota for at once (see `Inner::gather`), at
/// most [`GATHER_CREDIT_BYTES`] of them: quota held ahead for at most one commit.
pub(crate) const GATHER_CREDIT: u64 = 1024;
/// Body bytes a gathering reserves outbox quota for at once (see [`GATHER_CREDIT`]).
pub(crate) const GATHER_CREDIT_BYTES: u64 = 1024 * 1024;

/// The messages of `len` body bytes a gathering reserves quota for at once.
pub(crate) fn credit_messages(len: u64) -> u64 {
    (GATHER_CREDIT_BYTES / len.max(1)).clamp(1, GATHER_CREDIT)
}

/// Messages to one set of target groups, gathered until the outbox writer seals them.
/// Shared by the peer (while open), the writer's request and the messages' receipts.
pub(crate) struct Gathering {
    /// Weak: a queued request must not keep a dropped peer (and its outbox) alive.
    inner: Weak<Inner>,
    targets: Arc<Targets>,
    state: Mutex<GatherState>,
}

struct GatherState {
    /// No message may join: the writer took the bodies, or the peer started another
    /// gathering.
    sealed: bool,
    bodies: Vec<Bytes>,
    bytes: usize,
    /// One per message, kept for the hand-off to the dispatcher.
    key_hashes: Vec<Option<u64>>,
    /// Outbox quota (messages, body bytes) reserved for messages still to join:
    /// joining takes no outbox lock while it lasts.
    credit: (u64, u64),
    /// The first message's sequence number once stored, or why they were not.
    outcome: Option<std::result::Result<Seq, (ErrorKind, String)>>,
    /// Receipts waiting for the outcome.
    wakers: Vec<Waker>,
}

/// What [`Gathering::join`] did with a message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Join {
    /// Joined, at this index.
    Joined(u32),
    /// Not joined: the credit has no room for it (reserve more, then join again).
    NoCredit(Bytes),
    /// Not joined: the gathering is sealed or full (start another).
    Closed(Bytes),
}

impl Gathering {
    /// A gathering of `targets` holding one message, with `credit` reserved for more
    /// and room for `expected` messages (the size of the one before, say: growing the
    /// lists message by message was one reallocation per 60 messages).
    pub(crate) fn new(
        inner: Weak<Inner>,
        targets: Arc<Targets>,
        (body, key_hash): (Bytes, Option<u64>),
        credit: (u64, u64),
        expected: usize,
    ) -> Arc<Self> {
        let capacity = expected.clamp(1, GATHER_MAX_MESSAGES);
        let mut bodies = Vec::with_capacity(capacity);
        let mut key_hashes = Vec::with_capacity(capacity);
        let bytes = body.len();
        bodies.push(body);
        key_hashes.push(key_hash);
        Arc::new(Gathering {
            inner,
            targets,
            state: Mutex::new(GatherState {
                sealed: false,
                bytes,
                bodies,
                key_hashes,
                credit,
                outcome: None,
                wakers: Vec::new(),
            }),
        })
    }

    /// The target groups its messages are appended to.
    pub(crate) fn targets(&self) -> &Arc<Targets> {
        &self.targets
    }

    /// Adds a message, taking its quota from the credit.
    pub(crate) fn join(&self, body: Bytes, key_hash: Option<u64>) -> Join {
        let mut state = lock(&self.state);
        let full = state.bodies.len() >= GATHER_MAX_MESSAGES
            || state.bytes + body.len() > GATHER_MAX_BYTES;
        if state.sealed || full {
            return Join::Closed(body);
        }
        let (messages, bytes) = state.credit;
        let len = body.len() as u64;
        if messages == 0 || bytes < len {
            return Join::NoCredit(body);
        }
        state.credit = (messages - 1, bytes - len);
        state.bytes += body.len();
        state.bodies.push(body);
        state.key_hashes.push(key_hash);
        Join::Joined((state.bodies.len() - 1) as u32)
    }

    /// Adds reserved quota to the credit; `false` (the caller keeps the reservation)
    /// when the gathering is sealed.
    pub(crate) fn add_credit(&self, (messages, bytes): (u64, u64)) -> bool {
        let mut state = lock(&self.state);
        if !state.sealed {
            state.credit.0 += messages;
            state.credit.1 += bytes;
        }
        !state.sealed
    }

    /// No message may join any more (the writer still takes those that did, and gives
    /// back the credit).
    pub(crate) fn seal(&self) {
        lock(&self.state).sealed = true;
    }

    /// Messages that joined (all of them once sealed by the writer, which takes the
    /// bodies but not the key hashes).
    pub(crate) fn len(&self) -> usize {
        lock(&self.state).key_hashes.len()
    }

    /// The first message's sequence number once the gathering is stored. `slot` is
    /// the polling receipt's place in the list of wakers (`None` until it first
    /// waits): a receipt holds at most one, so the list is never longer than the
    /// gathering's messages, however often each is polled.
    pub(crate) fn poll_stored(
        &self,
        cx: &mut Context<'_>,
        slot: &mut Option<u32>,
    ) -> Poll<Result<Seq>> {
        let mut state = lock(&self.state);
        match &state.outcome {
            Some(Ok(first)) => Poll::Ready(Ok(*first)),
            Some(Err((kind, message))) => Poll::Ready(Err(Error::new(*kind, message.clone()))),
            None => {
                match slot.and_then(|i| state.wakers.get_mut(i as usize)) {
                    Some(waker) => {
                        if !waker.will_wake(cx.waker()) {
                            waker.clone_from(cx.waker());
                        }
                    }
                    None => {
                        *slot = Some(state.wakers.len() as u32);
                        state.wakers.push(cx.waker().clone());
                    }
                }
                Poll::Pending
            }
        }
    }

    /// Records the outcome and wakes the receipts waiting for it (once). Stored
    /// messages (`Ok(seqs)`) go to the dispatcher first, unless the peer is gone (the
    /// messages are stored, and the next peer on this outbox resumes them).
    fn settle(&self, outcome: std::result::Result<Range<u64>, (ErrorKind, String)>) {
        let mut state = lock(&self.state);
        if state.outcome.is_some() {
            return;
        }
        if let (Ok(seqs), Some(inner)) = (&outcome, self.inner.upgrade()) {
            // Under the lock, rather than taking the list: it was allocated on the
            // publishing thread, and is freed there.
            inner.hand_off(
                crate::clock::now(),
                seqs.start,
                &state.key_hashes,
                &self.targets,
                false,
            );
        }
        state.outcome = Some(outcome.map(|seqs| seqs.start));
        // Woken in place, for the same reason.
        for waker in state.wakers.drain(..) {
            waker.wake();
        }
    }
}

/// The writer's handle on a [`Gathering`].
pub(crate) struct GatherHandle(pub(crate) Arc<Gathering>);

impl GatheredAppend for GatherHandle {
    fn seal(&mut self) -> Sealed {
        let mut state = lock(&self.0.state);
        state.sealed = true;
        state.bytes = 0;
        Sealed {
            // Collected into a list of the writer's (which frees it), the gathering's
            // own staying with it: memory allocated on one thread and freed on
            // another contends for glibc's arena lock.
            bodies: state.bodies.drain(..).collect(),
            unused: std::mem::take(&mut state.credit),
        }
    }
}

impl AppendDone for GatherHandle {
    /// Runs on the writer thread: hands the stored messages to the dispatcher at once
    /// (whether or not their receipts are awaited), then wakes the receipts.
    fn done(self: Box<Self>, result: std::result::Result<Range<u64>, OutboxError>) {
        self.0.settle(result.map_err(|e| {
            let e = Error::from(e);
            (e.kind(), e.to_string())
        }));
    }
}

impl Drop for GatherHandle {
    /// A request dropped unanswered (the outbox dropped with it queued): its receipts
    /// fail rather than wait for ever.
    fn drop(&mut self) {
        self.0.settle(Err((
            ErrorKind::Closed,
            "the outbox closed before the message was stored".to_string(),
        )));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    const CREDIT: (u64, u64) = (GATHER_MAX_MESSAGES as u64, 2 * GATHER_MAX_BYTES as u64);

    /// A gathering holding `first`, with credit for more than it may take.
    fn gathering(first: &'static str) -> Arc<Gathering> {
        let first = (Bytes::from(first), Some(7));
        Gathering::new(Weak::new(), Targets::none(), first, CREDIT, 1)
    }

    #[test]
    fn messages_join_until_sealed_or_full_and_the_writer_takes_them_in_order() {
        let g = gathering("a");
        assert_eq!(g.join(Bytes::from("b"), None), Join::Joined(1));
        let big = Bytes::from(vec![0u8; GATHER_MAX_BYTES]);
        assert_eq!(
            g.join(big.clone(), None),
            Join::Closed(big),
            "past the byte limit"
        );
        let sealed = GatherHandle(g.clone()).seal();
        assert_eq!(sealed.bodies, vec![Bytes::from("a"), Bytes::from("b")]);
        assert_eq!(
            sealed.unused,
            (CREDIT.0 - 1, CREDIT.1 - 1),
            "the rest goes back"
        );
        let late = g.join(Bytes::from("c"), None);
        assert_eq!(late, Join::Closed(Bytes::from("c")), "sealed");
        assert!(!g.add_credit((1, 1)), "no credit for a sealed gathering");
        assert_eq!(lock(&g.state).key_hashes, vec![Some(7), None]);

        let full = gathering("0");
        for i in 1..GATHER_MAX_MESSAGES {
            assert_eq!(full.join(Bytes::new(), None), Join::Joined(i as u32));
        }
        let past = full.join(Bytes::new(), None);
        assert_eq!(past, Join::Closed(Bytes::new()), "past the message limit");
    }

    #[test]
    fn a_message_past_the_credit_joins_once_more_is_reserved() {
        let first = (Bytes::from("a"), None);
        let g = Gathering::new(Weak::new(), Targets::none(), first, (1, 2), 0);
        let big = Bytes::from("bcd");
        assert_eq!(g.join(big.clone(), None), Join::NoCredit(big));
        assert_eq!(g.join(Bytes::from("bc"), None), Join::Joined(1));
        let d = Bytes::from("d");
        assert_eq!(
            g.join(d.clone(), None),
            Join::NoCredit(d.clone()),
            "no message left"
        );
        assert!(g.add_credit((2, 10)));
        assert_eq!(g.join(d, None), Join::Joined(2));
        assert_eq!(GatherHandle(g.clone()).seal().unused, (1, 9));
    }

    #[test]
    fn receipts_wake_once_stored_and_read_their_own_sequence_number() {
        let g = gathering("a");
        let counter = Arc::new(Counter::default());
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut slot = None;
        assert!(g.poll_stored(&mut cx, &mut slot).is_pending());
        assert!(g.poll_stored(&mut cx, &mut slot).is_pending());
        let other = Waker::from(Arc::new(Counter::default()));
        let mut other_cx = Context::from_waker(&other);
        assert!(g.poll_stored(&mut other_cx, &mut slot).is_pending());
        assert!(g.poll_stored(&mut cx, &mut slot).is_pending());
        assert_eq!(lock(&g.state).wakers.len(), 1, "one place per receipt");
        // The peer is gone (a dead `Weak`): stored, not dispatched.
        Box::new(GatherHandle(g.clone())).done(Ok(40..41));
        assert_eq!(counter.0.load(Ordering::Relaxed), 1);
        let stored = g.poll_stored(&mut cx, &mut slot).map(|r| r.ok());
        assert_eq!(stored, Poll::Ready(Some(40)));
    }

    #[test]
    fn a_failed_or_dropped_append_fails_its_receipts() {
        let g = gathering("a");
        Box::new(GatherHandle(g.clone())).done(Err(OutboxError::Closed));
        let mut cx = Context::from_waker(Waker::noop());
        let Poll::Ready(Err(e)) = g.poll_stored(&mut cx, &mut None) else {
            panic!("a failed append's receipt fails")
        };
        assert_eq!(e.kind(), ErrorKind::Closed);

        let g = gathering("b");
        drop(GatherHandle(g.clone()));
        let Poll::Ready(Err(e)) = g.poll_stored(&mut cx, &mut None) else {
            panic!("a request dropped unanswered fails its receipts")
        };
        assert_eq!(e.kind(), ErrorKind::Closed);
    }
}
