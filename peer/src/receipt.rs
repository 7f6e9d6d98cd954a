//! Receipts of publishes handed to the outbox writer: what the writer's continuation
//! sends back once a message is stored, and [`PendingReceipt`], the receipt of
//! [`Peer::submit`](crate::Peer::submit).

use crate::dispatch::Seq;
use crate::error::{Error, ErrorKind, Result};
use crate::gather::Gathering;
use crate::Receipt;
use pin_project_lite::pin_project;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::sync::oneshot;
use tokio::task::coop::Unconstrained;
use weft_proto::wire::MessageId;

/// What a stored append's continuation tells its publish.
pub(crate) struct Stored {
    /// The messages' sequence numbers.
    pub(crate) seqs: Range<Seq>,
    /// `Confirmed` publishes: told when every target group acknowledged each message.
    pub(crate) confirms: Vec<oneshot::Receiver<()>>,
}

/// Sends a stored append's [`Stored`] (or the error that kept it from being stored).
pub(crate) type StoredTx = oneshot::Sender<Result<Stored>>;

/// Waits for an append's [`Stored`] (see [`unconstrained`]).
pub(crate) type StoredRx = Unconstrained<oneshot::Receiver<Result<Stored>>>;

/// A channel for one append's [`Stored`]. Its receiver is outside tokio's cooperative
/// budget, for the reason `outbox::AppendTicket::wait` gives: one group commit answers
/// thousands of appends at once.
pub(crate) fn stored_channel() -> (StoredTx, StoredRx) {
    let (tx, rx) = oneshot::channel();
    (tx, tokio::task::coop::unconstrained(rx))
}

/// The answer of `rx`; the writer (or the peer) gone without one is
/// [`ErrorKind::Closed`].
pub(crate) fn stored_answer(
    answer: std::result::Result<Result<Stored>, oneshot::error::RecvError>,
) -> Result<Stored> {
    answer.unwrap_or_else(|_| {
        Err(Error::new(
            ErrorKind::Closed,
            "the outbox closed before the message was stored",
        ))
    })
}

/// Waits until every group acknowledged (`confirms` from a [`Stored`]). Outside the
/// cooperative budget, as [`stored_channel`]: one ack batch answers many confirmed
/// publishes at once.
pub(crate) async fn confirmed(confirms: Vec<oneshot::Receiver<()>>) -> Result<()> {
    for rx in confirms {
        tokio::task::coop::unconstrained(rx)
            .await
            .map_err(|_| not_confirmed())?;
    }
    Ok(())
}

fn not_confirmed() -> Error {
    Error::new(
        ErrorKind::Closed,
        "peer closed before every group acknowledged",
    )
}

/// What every receipt of one publish shares: the producer and the number of target
/// groups; [`at`](Self::at) makes the receipt of one sequence number.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReceiptOf {
    pub(crate) producer: u64,
    pub(crate) groups: usize,
}

impl ReceiptOf {
    pub(crate) fn at(self, seq: Seq) -> Receipt {
        Receipt {
            id: MessageId {
                producer: self.producer,
                seq,
            },
            groups: self.groups,
        }
    }
}

/// The receipt of a message given to [`Peer::submit`](crate::Peer::submit): resolves
/// when the message holds the durability it was published with, to what
/// [`Peer::publish`](crate::Peer::publish) would have returned. The message is stored
/// and delivered whether or not this is awaited or kept; dropping it only gives up
/// learning the outcome.
#[must_use = "a receipt tells whether the message was stored; await it, or drop it knowingly"]
pub struct PendingReceipt {
    state: State,
}

impl std::fmt::Debug for PendingReceipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Ready(_) => "ready",
            State::Storing { .. } | State::Gathered { .. } => "storing",
            State::Confirming { .. } => "confirming",
        };
        f.debug_struct("PendingReceipt")
            .field("state", &state)
            .finish()
    }
}

enum State {
    /// Known (taken when returned).
    Ready(Option<Result<Receipt>>),
    /// With the outbox writer.
    Storing { stored: StoredRx, of: ReceiptOf },
    /// Gathered for the writer's next commit, at `index` among its messages.
    Gathered {
        gathering: Arc<Gathering>,
        index: u32,
        of: ReceiptOf,
        /// Its place among the gathering's wakers, once it waited.
        slot: Option<u32>,
    },
    /// Stored; waiting for every group's acknowledgement (`Confirmed`).
    Confirming {
        confirms: Vec<Unconstrained<oneshot::Receiver<()>>>,
        receipt: Receipt,
    },
}

impl PendingReceipt {
    pub(crate) fn ready(receipt: Receipt) -> Self {
        PendingReceipt {
            state: State::Ready(Some(Ok(receipt))),
        }
    }

    /// The receipt of message `index` of `gathering`.
    pub(crate) fn gathered(gathering: Arc<Gathering>, index: u32, of: ReceiptOf) -> Self {
        PendingReceipt {
            state: State::Gathered {
                gathering,
                index,
                of,
                slot: None,
            },
        }
    }

    /// The receipt of a publish whose record is with the writer, answered on `stored`.
    pub(crate) fn storing(stored: StoredRx, of: ReceiptOf) -> Self {
        PendingReceipt {
            state: State::Storing { stored, of },
        }
    }
}

impl Future for PendingReceipt {
    type Output = Result<Receipt>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Receipt>> {
        loop {
            match &mut self.state {
                State::Ready(receipt) => {
                    return Poll::Ready(receipt.take().unwrap_or_else(|| {
                        Err(Error::new(
                            ErrorKind::Closed,
                            "receipt polled again after it resolved",
                        ))
                    }))
                }
                State::Storing { stored, of } => {
                    let answer = stored_answer(ready!(Pin::new(stored).poll(cx)));
                    let Stored { seqs, confirms } = match answer {
                        Ok(stored) => stored,
                        Err(e) => {
                            self.state = State::Ready(None);
                            return Poll::Ready(Err(e));
                        }
                    };
                    let receipt = of.at(seqs.start);
                    self.state = if confirms.is_empty() {
                        State::Ready(Some(Ok(receipt)))
                    } else {
                        State::Confirming {
                            confirms: confirms
                                .into_iter()
                                .map(tokio::task::coop::unconstrained)
                                .collect(),
                            receipt,
                        }
                    };
                }
                State::Gathered {
                    gathering,
                    index,
                    of,
                    slot,
                } => {
                    let answer = ready!(gathering.poll_stored(cx, slot))
                        .map(|first| of.at(first + u64::from(*index)));
                    self.state = State::Ready(None);
                    return Poll::Ready(answer);
                }
                State::Confirming { confirms, receipt } => {
                    let receipt = *receipt;
                    while let Some(last) = confirms.last_mut() {
                        if ready!(Pin::new(last).poll(cx)).is_err() {
                            self.state = State::Ready(None);
                            return Poll::Ready(Err(not_confirmed()));
                        }
                        confirms.pop();
                    }
                    self.state = State::Ready(Some(Ok(receipt)));
                }
            }
        }
    }
}

/// What a publish's submit gives: its receipt now (a `Memory` publish), or one that
/// resolves once the message is stored.
pub(crate) enum Submitted {
    Now(Receipt),
    Later(PendingReceipt),
}

impl From<Submitted> for PendingReceipt {
    fn from(submitted: Submitted) -> Self {
        match submitted {
            Submitted::Now(receipt) => PendingReceipt::ready(receipt),
            Submitted::Later(pending) => pending,
        }
    }
}

pin_project! {
    /// The future of [`Peer::publish`](crate::Peer::publish): its submit, then (unless
    /// the receipt came at once) the receipt. Written out rather than an `async` block,
    /// which would hold the submit future twice, or a combinator chain, which cost a
    /// `Memory` publish about 200 instructions more.
    #[project = PublishState]
    pub(crate) enum Publish<F> {
        Submitting { #[pin] submit: F },
        Waiting { receipt: PendingReceipt },
        Done,
    }
}

impl<F> Publish<F> {
    pub(crate) fn new(submit: F) -> Self {
        Publish::Submitting { submit }
    }
}

impl<F: Future<Output = Result<Submitted>>> Future for Publish<F> {
    type Output = Result<Receipt>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Receipt>> {
        loop {
            match self.as_mut().project() {
                PublishState::Submitting { submit } => {
                    let answer = match ready!(submit.poll(cx)) {
                        Ok(Submitted::Now(receipt)) => Ok(receipt),
                        Ok(Submitted::Later(receipt)) => {
                            self.set(Publish::Waiting { receipt });
                            continue;
                        }
                        Err(e) => Err(e),
                    };
                    self.set(Publish::Done);
                    return Poll::Ready(answer);
                }
                PublishState::Waiting { receipt } => {
                    let answer = ready!(Pin::new(receipt).poll(cx));
                    self.set(Publish::Done);
                    return Poll::Ready(answer);
                }
                PublishState::Done => {
                    return Poll::Ready(Err(Error::new(
                        ErrorKind::Closed,
                        "publish polled again after it resolved",
                    )))
                }
            }
        }
    }
}
