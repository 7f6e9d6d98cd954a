//! quinn over turmoil: a `quinn::AsyncUdpSocket` backed by `turmoil::net::UdpSocket`.
//!
//! Rules this adapter follows (see `shared/notes/transport-and-gossip-facts.md`):
//! - turmoil has no poll-style receive and its `readable()` holds the socket's receive
//!   lock while it waits, so exactly ONE pending `readable()` future is kept and
//!   `try_recv_from` is called only after it completed;
//! - one datagram per transmit and per receive (no GSO/GRO), no ECN;
//! - `may_fragment()` is false, or quinn silently turns MTU discovery off;
//! - turmoil never applies backpressure to UDP sends, so the socket is always writable.

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

type Readable = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// A simulated UDP socket quinn can run on.
pub struct SimUdpSocket {
    socket: Arc<turmoil::net::UdpSocket>,
    /// The address peers reach this socket on: the host's simulated IP and the port.
    addr: SocketAddr,
    /// The single outstanding `readable()` wait, kept across `poll_recv` calls.
    readable: Mutex<Option<Readable>>,
}

impl fmt::Debug for SimUdpSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimUdpSocket")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SimUdpSocket {
    /// Binds `port` on the simulated host `host` (call it from that host's software).
    pub async fn bind(host: &str, port: u16) -> io::Result<Arc<SimUdpSocket>> {
        let socket = turmoil::net::UdpSocket::bind((IpAddr::from([0, 0, 0, 0]), port)).await?;
        let bound = socket.local_addr()?;
        // turmoil binds only the unspecified address; advertise the host's own IP.
        Ok(Arc::new(SimUdpSocket {
            socket: Arc::new(socket),
            addr: SocketAddr::new(turmoil::lookup(host), bound.port()),
            readable: Mutex::new(None),
        }))
    }
}

thread_local! {
    /// When set, every datagram sent (for debugging divergent replays).
    pub static PACKETS: std::cell::RefCell<Option<Vec<String>>> = const { std::cell::RefCell::new(None) };
}

/// Always-writable poller: turmoil has no UDP backpressure.
#[derive(Debug)]
struct Writable;

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for SimUdpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        PACKETS.with(|p| {
            if let Some(log) = p.borrow_mut().as_mut() {
                log.push(format!(
                    "{} {} -> {} {}",
                    turmoil::sim_elapsed().unwrap_or_default().as_millis(),
                    self.addr,
                    transmit.destination,
                    transmit.contents.len()
                ));
            }
        });
        // One segment per transmit (max_transmit_segments is 1), so `contents` is one
        // datagram.
        self.socket
            .try_send_to(transmit.contents, transmit.destination)
            .map(|_| ())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let (Some(buf), Some(meta)) = (bufs.first_mut(), meta.first_mut()) else {
            return Poll::Ready(Ok(0));
        };
        let mut pending = self.readable.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let wait = pending.get_or_insert_with(|| {
                let socket = self.socket.clone();
                Box::pin(async move { socket.readable().await })
            });
            match wait.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    *pending = None;
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(())) => *pending = None,
            }
            match self.socket.try_recv_from(buf) {
                Ok((len, from)) => {
                    *meta = RecvMeta {
                        addr: from,
                        len,
                        stride: len,
                        ecn: None,
                        dst_ip: Some(self.addr.ip()),
                    };
                    return Poll::Ready(Ok(1));
                }
                // A false positive of `readable()`: wait again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }

    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        1
    }

    fn may_fragment(&self) -> bool {
        false
    }
}
