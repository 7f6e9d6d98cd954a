//! The members that routes name: where each one listens, and the QUIC connection to it.
//!
//! Addresses and incarnations are learned from routes. A connection is dialled on first
//! use and shared by every link to that member; it remembers the incarnation it reached
//! (from the stream handshake's `Welcome`). When a route shows the member under a
//! *newer* incarnation than the connection reached (its process restarted), the
//! connection is closed at once: it leads to a dead process, and quinn would only notice
//! after the idle timeout, while the links on it wait for acks that cannot come. Closing
//! it fails those links, which requeue their messages and dial the new process. A route
//! that arrives late, showing an incarnation the connection already reached or an older
//! one, changes nothing: closing a healthy connection would resend its in-flight
//! messages to another member as duplicates.

use crate::error::{Error, ErrorKind, Result};
use crate::subscription::lock;
use rustc_hash::FxHashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use weft_proto::tls;
use weft_proto::wire::Route;

/// What routes say about a member's process (the newest incarnation seen).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Whereabouts {
    incarnation: u64,
    addrs: Vec<SocketAddr>,
}

/// An open connection and the incarnation of the process it reached (as far as known:
/// the route's at dial time, raised by what stream handshakes report).
struct Dialled {
    conn: quinn::Connection,
    incarnation: u64,
}

#[derive(Default)]
struct Slot {
    /// Serialises dials, so that concurrent links share one connection.
    dial: tokio::sync::Mutex<()>,
    current: Mutex<Option<Dialled>>,
}

/// Member addresses and connections.
pub(crate) struct Members {
    endpoint: quinn::Endpoint,
    /// Client configuration for members on a loopback address (large packets).
    loopback_client: quinn::ClientConfig,
    known: Mutex<FxHashMap<String, Whereabouts>>,
    slots: Mutex<FxHashMap<String, Arc<Slot>>>,
}

impl Members {
    pub(crate) fn new(endpoint: quinn::Endpoint, loopback_client: quinn::ClientConfig) -> Self {
        Self {
            endpoint,
            loopback_client,
            known: Mutex::new(FxHashMap::default()),
            slots: Mutex::new(FxHashMap::default()),
        }
    }

    /// Learns the members of `route`; drops connections to processes it shows replaced.
    pub(crate) fn learn(&self, route: &Route) {
        let mut newer = Vec::new();
        {
            let mut known = lock(&self.known);
            for member in route.groups.iter().flat_map(|g| &g.members) {
                let entry = known.get(&member.identity);
                if entry.is_some_and(|w| w.incarnation > member.incarnation) {
                    continue; // a stale route
                }
                known.insert(
                    member.identity.clone(),
                    Whereabouts {
                        incarnation: member.incarnation,
                        addrs: member.addrs.clone(),
                    },
                );
                newer.push((member.identity.as_str(), member.incarnation));
            }
        }
        let slots = lock(&self.slots);
        for (identity, incarnation) in newer {
            let Some(slot) = slots.get(identity) else {
                continue;
            };
            let mut current = lock(&slot.current);
            if current
                .as_ref()
                .is_some_and(|d| d.incarnation < incarnation)
            {
                tracing::debug!(member = %identity, incarnation, "member restarted; dropping the connection to its old process");
                if let Some(old) = current.take() {
                    old.conn.close(0u32.into(), b"member restarted");
                }
            }
        }
    }

    /// A stream handshake on `conn` was answered by `member`'s process `incarnation`.
    pub(crate) fn observed(&self, member: &str, conn: &quinn::Connection, incarnation: u64) {
        let Some(slot) = lock(&self.slots).get(member).cloned() else {
            return;
        };
        let mut current = lock(&slot.current);
        if let Some(d) = current
            .as_mut()
            .filter(|d| d.conn.stable_id() == conn.stable_id())
        {
            d.incarnation = d.incarnation.max(incarnation);
        }
    }

    /// A connection to `member`: the open one, or a new dial of its known addresses.
    pub(crate) async fn connection(&self, member: &str) -> Result<quinn::Connection> {
        let slot = lock(&self.slots)
            .entry(member.to_string())
            .or_default()
            .clone();
        let _dialling = slot.dial.lock().await;
        if let Some(d) = lock(&slot.current).as_ref() {
            if d.conn.close_reason().is_none() {
                return Ok(d.conn.clone());
            }
        }
        let (incarnation, addrs) = lock(&self.known)
            .get(member)
            .map(|w| (w.incarnation, w.addrs.clone()))
            .unwrap_or_default();
        let mut last = Error::new(
            ErrorKind::Protocol,
            format!("no address known for {member}"),
        );
        for addr in addrs {
            let config = addr
                .ip()
                .is_loopback()
                .then(|| self.loopback_client.clone());
            match tls::connect_with(&self.endpoint, config, addr, member).await {
                Ok(conn) => {
                    *lock(&slot.current) = Some(Dialled {
                        conn: conn.clone(),
                        incarnation,
                    });
                    return Ok(conn);
                }
                Err(e) => last = e.into(),
            }
        }
        Err(last)
    }
}
