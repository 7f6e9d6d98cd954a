//! Single `Disk` publishes gathered into one outbox append while the writer is busy
//! with a commit: the next commit takes them together, as it would a
//! [`publish_batch`](crate::Peer::publish_batch), with one hand-off to the dispatcher
//! and one wake-up of their receipts instead of one per message. No timer: a
//! gathering is sealed when the writer takes it, so no message waits longer than the
//! commit before it would have.

use crate::dispatch::Seq;
use crate::error::{Error, ErrorKind, Result};
use crate::outbox::{AppendDone, GatheredAppend, OutboxError};
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
    /// The first message's sequence number once stored, or why they were not.
    outcome: Option<std::result::Result<Seq, (ErrorKind, String)>>,
    /// Receipts waiting for the outcome.
    wakers: Vec<Waker>,
}

impl Gathering {
    /// A gathering of `targets` holding one message.
    pub(crate) fn new(
        inner: Weak<Inner>,
        targets: Arc<Targets>,
        body: Bytes,
        key_hash: Option<u64>,
    ) -> Arc<Self> {
        Arc::new(Gathering {
            inner,
            targets,
            state: Mutex::new(GatherState {
                sealed: false,
                bytes: body.len(),
                bodies: vec![body],
                key_hashes: vec![key_hash],
                outcome: None,
                wakers: Vec::new(),
            }),
        })
    }

    /// The target groups its messages are appended to.
    pub(crate) fn targets(&self) -> &Arc<Targets> {
        &self.targets
    }

    /// Adds a message; its index in the gathering, or the body back when the
    /// gathering is sealed or full.
    pub(crate) fn join(
        &self,
        body: Bytes,
        key_hash: Option<u64>,
    ) -> std::result::Result<u32, Bytes> {
        let mut state = lock(&self.state);
        let full = state.bodies.len() >= GATHER_MAX_MESSAGES
            || state.bytes + body.len() > GATHER_MAX_BYTES;
        if state.sealed || full {
            return Err(body);
        }
        state.bytes += body.len();
        state.bodies.push(body);
        state.key_hashes.push(key_hash);
        Ok((state.bodies.len() - 1) as u32)
    }

    /// No message may join any more (the writer still takes those that did).
    pub(crate) fn seal(&self) {
        lock(&self.state).sealed = true;
    }

    /// The first message's sequence number once the gathering is stored.
    pub(crate) fn poll_stored(&self, cx: &mut Context<'_>) -> Poll<Result<Seq>> {
        let mut state = lock(&self.state);
        match &state.outcome {
            Some(Ok(first)) => Poll::Ready(Ok(*first)),
            Some(Err((kind, message))) => Poll::Ready(Err(Error::new(*kind, message.clone()))),
            None => {
                // A task polling again (a wake-up of another of its futures) is not
                // listed twice; each receipt polled by its own task adds one.
                if !state.wakers.last().is_some_and(|w| w.will_wake(cx.waker())) {
                    state.wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    /// Records the outcome and wakes the receipts waiting for it (once).
    fn settle(&self, outcome: std::result::Result<Seq, (ErrorKind, String)>) {
        let wakers = {
            let mut state = lock(&self.state);
            if state.outcome.is_some() {
                return;
            }
            state.outcome = Some(outcome);
            std::mem::take(&mut state.wakers)
        };
        for waker in wakers {
            waker.wake();
        }
    }
}

/// The writer's handle on a [`Gathering`].
pub(crate) struct GatherHandle(pub(crate) Arc<Gathering>);

impl GatheredAppend for GatherHandle {
    fn seal(&mut self) -> Vec<Bytes> {
        let mut state = lock(&self.0.state);
        state.sealed = true;
        state.bytes = 0;
        std::mem::take(&mut state.bodies)
    }
}

impl AppendDone for GatherHandle {
    /// Runs on the writer thread: hands the stored messages to the dispatcher at once
    /// (whether or not their receipts are awaited), then wakes the receipts.
    fn done(self: Box<Self>, result: std::result::Result<Range<u64>, OutboxError>) {
        let gathering = &self.0;
        let outcome = match result {
            Ok(seqs) => {
                let key_hashes = std::mem::take(&mut lock(&gathering.state).key_hashes);
                // A dropped peer dispatches nothing: the messages are stored, and the
                // next peer on this outbox resumes them.
                if let Some(inner) = gathering.inner.upgrade() {
                    inner.hand_off(
                        crate::clock::now(),
                        seqs.start,
                        &key_hashes,
                        &gathering.targets,
                        false,
                    );
                }
                Ok(seqs.start)
            }
            Err(e) => {
                let e = Error::from(e);
                Err((e.kind(), e.to_string()))
            }
        };
        gathering.settle(outcome);
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

    fn gathering(first: &'static str) -> Arc<Gathering> {
        Gathering::new(Weak::new(), Targets::none(), Bytes::from(first), Some(7))
    }

    #[test]
    fn messages_join_until_sealed_or_full_and_the_writer_takes_them_in_order() {
        let g = gathering("a");
        assert_eq!(g.join(Bytes::from("b"), None), Ok(1));
        let big = Bytes::from(vec![0u8; GATHER_MAX_BYTES]);
        assert_eq!(g.join(big.clone(), None), Err(big), "past the byte limit");
        let mut handle = GatherHandle(g.clone());
        assert_eq!(handle.seal(), vec![Bytes::from("a"), Bytes::from("b")]);
        assert_eq!(
            g.join(Bytes::from("c"), None),
            Err(Bytes::from("c")),
            "sealed"
        );
        assert_eq!(lock(&g.state).key_hashes, vec![Some(7), None]);

        let full = gathering("0");
        for i in 1..GATHER_MAX_MESSAGES {
            assert_eq!(full.join(Bytes::new(), None), Ok(i as u32));
        }
        assert!(
            full.join(Bytes::new(), None).is_err(),
            "past the message limit"
        );
        full.seal();
        assert!(gathering("x").join(Bytes::new(), None).is_ok());
    }

    #[test]
    fn receipts_wake_once_stored_and_read_their_own_sequence_number() {
        let g = gathering("a");
        let counter = Arc::new(Counter::default());
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(g.poll_stored(&mut cx).is_pending());
        assert!(g.poll_stored(&mut cx).is_pending());
        assert_eq!(lock(&g.state).wakers.len(), 1, "one task listed once");
        // The peer is gone (a dead `Weak`): stored, not dispatched.
        Box::new(GatherHandle(g.clone())).done(Ok(40..41));
        assert_eq!(counter.0.load(Ordering::Relaxed), 1);
        assert_eq!(
            g.poll_stored(&mut cx).map(|r| r.ok()),
            Poll::Ready(Some(40))
        );
    }

    #[test]
    fn a_failed_or_dropped_append_fails_its_receipts() {
        let g = gathering("a");
        Box::new(GatherHandle(g.clone())).done(Err(OutboxError::Closed));
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let Poll::Ready(Err(e)) = g.poll_stored(&mut cx) else {
            panic!("a failed append's receipt fails")
        };
        assert_eq!(e.kind(), ErrorKind::Closed);

        let g = gathering("b");
        drop(GatherHandle(g.clone()));
        let Poll::Ready(Err(e)) = g.poll_stored(&mut cx) else {
            panic!("a request dropped unanswered fails its receipts")
        };
        assert_eq!(e.kind(), ErrorKind::Closed);
    }
}
