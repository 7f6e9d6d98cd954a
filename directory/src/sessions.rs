//! The peers connected to this directory node: their registrations and the grace period
//! after they disconnect. A pure state machine: events and `now` in, record updates out.

use crate::routes::PeerRecord;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use weft_proto::wire::Subscription;

/// Identifies one peer connection to the caller.
pub type ConnId = u64;

/// What changed in this node's own registrations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionUpdate {
    /// The peer's record is now this.
    Upsert(PeerRecord),
    /// The peer is gone (grace period over, or replaced).
    Remove(String),
}

#[derive(Debug)]
struct Session {
    record: PeerRecord,
    connections: BTreeSet<ConnId>,
    expires: Option<Instant>,
}

/// Registrations of the peers attached to this node.
#[derive(Debug)]
pub struct Sessions {
    grace: Duration,
    max_subscriptions: usize,
    peers: HashMap<String, Session>,
    conn_owner: HashMap<ConnId, String>,
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The connection never completed its handshake or is already gone.
    #[error("unknown connection")]
    UnknownConnection,
    /// A per-peer limit.
    #[error("peer {identity} already has {limit} subscriptions (max_subscriptions_per_peer)")]
    TooManySubscriptions {
        /// Peer.
        identity: String,
        /// The limit.
        limit: usize,
    },
}

impl Sessions {
    /// Keeps a disconnected peer's registrations for `grace`; at most
    /// `max_subscriptions` per peer.
    pub fn new(grace: Duration, max_subscriptions: usize) -> Self {
        Self {
            grace,
            max_subscriptions,
            peers: HashMap::new(),
            conn_owner: HashMap::new(),
        }
    }

    /// Number of peers with a session (connected or in their grace period).
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True when no peer has a session.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// A peer completed its handshake on connection `conn`.
    pub fn connect(
        &mut self,
        conn: ConnId,
        identity: &str,
        incarnation: u64,
        addrs: Vec<SocketAddr>,
        zone: Option<String>,
    ) -> Vec<SessionUpdate> {
        self.conn_owner.insert(conn, identity.to_string());
        let session = self
            .peers
            .entry(identity.to_string())
            .or_insert_with(|| Session {
                record: PeerRecord {
                    identity: identity.to_string(),
                    incarnation,
                    addrs: addrs.clone(),
                    zone: zone.clone(),
                    subscriptions: BTreeSet::new(),
                },
                connections: BTreeSet::new(),
                expires: None,
            });
        if session.record.incarnation != incarnation {
            // A new process under the same name: its old registrations died with the old one.
            session.record.subscriptions.clear();
        }
        session.record.incarnation = incarnation;
        session.record.addrs = addrs;
        session.record.zone = zone;
        session.connections.insert(conn);
        session.expires = None;
        vec![SessionUpdate::Upsert(session.record.clone())]
    }

    /// Adds (`add = true`) or removes a subscription for the peer on `conn`.
    pub fn set_subscription(
        &mut self,
        conn: ConnId,
        sub: Subscription,
        add: bool,
    ) -> Result<Vec<SessionUpdate>, SessionError> {
        let identity = self
            .conn_owner
            .get(&conn)
            .ok_or(SessionError::UnknownConnection)?;
        let session = self
            .peers
            .get_mut(identity)
            .ok_or(SessionError::UnknownConnection)?;
        let subs = &mut session.record.subscriptions;
        let changed = if add {
            if !subs.contains(&sub) && subs.len() >= self.max_subscriptions {
                return Err(SessionError::TooManySubscriptions {
                    identity: identity.clone(),
                    limit: self.max_subscriptions,
                });
            }
            subs.insert(sub)
        } else {
            subs.remove(&sub)
        };
        Ok(if changed {
            vec![SessionUpdate::Upsert(session.record.clone())]
        } else {
            Vec::new()
        })
    }

    /// Connection `conn` closed; its peer's registrations expire after the grace period
    /// unless it reconnects.
    pub fn disconnect(&mut self, conn: ConnId, now: Instant) {
        let Some(identity) = self.conn_owner.remove(&conn) else {
            return;
        };
        if let Some(session) = self.peers.get_mut(&identity) {
            session.connections.remove(&conn);
            if session.connections.is_empty() {
                session.expires = Some(now + self.grace);
            }
        }
    }

    /// Removes peers whose grace period ended by `now`.
    pub fn tick(&mut self, now: Instant) -> Vec<SessionUpdate> {
        let expired: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, s)| s.expires.is_some_and(|e| e <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            self.peers.remove(id);
        }
        expired.into_iter().map(SessionUpdate::Remove).collect()
    }

    /// Current records of every peer with a session.
    pub fn records(&self) -> impl Iterator<Item = &PeerRecord> {
        self.peers.values().map(|s| &s.record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(t: &str, g: &str) -> Subscription {
        Subscription {
            topic: t.into(),
            group: g.into(),
        }
    }

    #[test]
    fn registrations_survive_a_reconnect_within_grace() {
        let mut s = Sessions::new(Duration::from_secs(2), 10);
        let t0 = Instant::now();
        s.connect(1, "a", 9, vec![], None);
        s.set_subscription(1, sub("t", "g"), true).expect("ok");
        s.disconnect(1, t0);
        assert!(s.tick(t0 + Duration::from_secs(1)).is_empty());
        let up = s.connect(2, "a", 9, vec![], None);
        match &up[0] {
            SessionUpdate::Upsert(r) => assert_eq!(r.subscriptions.len(), 1),
            other => panic!("{other:?}"),
        }
        assert!(s.tick(t0 + Duration::from_secs(5)).is_empty());
    }

    #[test]
    fn registrations_expire_after_grace() {
        let mut s = Sessions::new(Duration::from_secs(2), 10);
        let t0 = Instant::now();
        s.connect(1, "a", 9, vec![], None);
        s.disconnect(1, t0);
        assert_eq!(
            s.tick(t0 + Duration::from_secs(2)),
            vec![SessionUpdate::Remove("a".into())]
        );
        assert!(s.is_empty());
    }

    #[test]
    fn new_incarnation_drops_old_subscriptions() {
        let mut s = Sessions::new(Duration::from_secs(2), 10);
        s.connect(1, "a", 1, vec![], None);
        s.set_subscription(1, sub("t", "g"), true).expect("ok");
        let up = s.connect(2, "a", 2, vec![], None);
        match &up[0] {
            SessionUpdate::Upsert(r) => assert!(r.subscriptions.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_old_connection_closing_late_does_not_expire_the_new_one() {
        let mut s = Sessions::new(Duration::from_secs(1), 10);
        let t0 = Instant::now();
        s.connect(1, "a", 1, vec![], None);
        s.connect(2, "a", 1, vec![], None);
        s.disconnect(1, t0);
        assert!(s.tick(t0 + Duration::from_secs(10)).is_empty());
    }

    #[test]
    fn subscription_limit_is_enforced() {
        let mut s = Sessions::new(Duration::from_secs(1), 1);
        s.connect(1, "a", 1, vec![], None);
        s.set_subscription(1, sub("t", "g"), true).expect("first");
        assert!(matches!(
            s.set_subscription(1, sub("u", "g"), true),
            Err(SessionError::TooManySubscriptions { .. })
        ));
        assert_eq!(
            s.set_subscription(9, sub("u", "g"), true),
            Err(SessionError::UnknownConnection)
        );
    }
}
