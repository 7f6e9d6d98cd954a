//! The members that routes name: where each one listens, and the QUIC connection to it.
//!
//! Addresses and incarnations are learned from routes. A connection is dialled on first
//! use and shared by every link to that member. When a route shows the member under a
//! new incarnation or new addresses (its process restarted), the cached connection is
//! closed at once: it leads to a dead process, and quinn would only notice after the idle
//! timeout, while the links on it wait for acks that cannot come. Closing it fails those
//! links, which requeue their messages and dial the new process.

use crate::error::{Error, ErrorKind, Result};
use crate::subscription::lock;
use rustc_hash::FxHashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use weft_proto::tls;
use weft_proto::wire::Route;

/// What routes say about a member's process.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Whereabouts {
    incarnation: u64,
    addrs: Vec<SocketAddr>,
}

#[derive(Default)]
struct Slot {
    /// Serialises dials, so that concurrent links share one connection.
    dial: tokio::sync::Mutex<()>,
    conn: Mutex<Option<quinn::Connection>>,
}

impl Slot {
    fn drop_connection(&self, reason: &'static [u8]) {
        if let Some(conn) = lock(&self.conn).take() {
            conn.close(0u32.into(), reason);
        }
    }
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
        let mut replaced = Vec::new();
        {
            let mut known = lock(&self.known);
            for member in route.groups.iter().flat_map(|g| &g.members) {
                let now = Whereabouts {
                    incarnation: member.incarnation,
                    addrs: member.addrs.clone(),
                };
                match known.insert(member.identity.clone(), now.clone()) {
                    Some(before) if before != now => replaced.push(member.identity.clone()),
                    _ => {}
                }
            }
        }
        let slots = lock(&self.slots);
        for identity in replaced {
            if let Some(slot) = slots.get(&identity) {
                tracing::debug!(member = %identity, "member restarted or moved; dropping its connection");
                slot.drop_connection(b"member restarted");
            }
        }
    }

    /// A connection to `member`: the open one, or a new dial of its known addresses.
    pub(crate) async fn connection(&self, member: &str) -> Result<quinn::Connection> {
        let slot = lock(&self.slots)
            .entry(member.to_string())
            .or_default()
            .clone();
        let _dialling = slot.dial.lock().await;
        if let Some(conn) = lock(&slot.conn).as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let addrs = lock(&self.known)
            .get(member)
            .map(|w| w.addrs.clone())
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
                    *lock(&slot.conn) = Some(conn.clone());
                    return Ok(conn);
                }
                Err(e) => last = e.into(),
            }
        }
        Err(last)
    }
}
