//! The peers connected to this directory node: their registrations and the grace period
//! after they disconnect. A pure state machine: events and `now` in, record updates out.

use crate::routes::PeerRecord;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_proto::wire::Subscription;

/// Identifies one peer connection to the caller.
pub type ConnId = u64;

/// What changed in this node's own registrations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionUpdate {
    /// The peer's record is now this (shared with the route table and gossip).
    Upsert(Arc<PeerRecord>),
    /// The peer is gone (grace period over, or replaced).
    Remove(String),
}

#[derive(Debug)]
struct Session {
    /// What routes see: the subscriptions registered by the current incarnation plus
    /// `inherited`. Copied on write: the route table shares it.
    record: Arc<PeerRecord>,
    /// Registered by the previous incarnation and not (yet) again by this one (a subset
    /// of `record.subscriptions`). Kept until `inherited_until` so that a group whose
    /// only member restarts stays in routes while the new process subscribes again:
    /// senders keep targeting the group and its messages wait in their outboxes instead
    /// of never being addressed to it.
    inherited: BTreeSet<Subscription>,
    inherited_until: Option<Instant>,
    connections: BTreeSet<ConnId>,
    expires: Option<Instant>,
}

impl Session {
    /// Subscriptions the current incarnation registered.
    fn owned(&self) -> usize {
        self.record.subscriptions.len() - self.inherited.len()
    }

    fn owns(&self, sub: &Subscription) -> bool {
        self.record.subscriptions.contains(sub) && !self.inherited.contains(sub)
    }
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

    /// A peer completed its handshake on connection `conn` at `now`.
    ///
    /// A new incarnation (the process restarted) inherits the previous one's
    /// subscriptions for one grace period: they stay in routes, pointing at the new
    /// process, until it registers them again or the period ends.
    pub fn connect(
        &mut self,
        conn: ConnId,
        identity: &str,
        incarnation: u64,
        addrs: Vec<SocketAddr>,
        zone: Option<String>,
        now: Instant,
    ) -> Vec<SessionUpdate> {
        self.conn_owner.insert(conn, identity.to_string());
        let session = self
            .peers
            .entry(identity.to_string())
            .or_insert_with(|| Session {
                record: Arc::new(PeerRecord {
                    identity: identity.to_string(),
                    incarnation,
                    addrs: addrs.clone(),
                    zone: zone.clone(),
                    subscriptions: BTreeSet::new(),
                }),
                inherited: BTreeSet::new(),
                inherited_until: None,
                connections: BTreeSet::new(),
                expires: None,
            });
        if session.record.incarnation != incarnation {
            session.inherited = session.record.subscriptions.clone();
            session.inherited_until = Some(now + self.grace);
        }
        let record = Arc::make_mut(&mut session.record);
        record.incarnation = incarnation;
        record.addrs = addrs;
        record.zone = zone;
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
        let changed = if add {
            if !session.owns(&sub) && session.owned() >= self.max_subscriptions {
                return Err(SessionError::TooManySubscriptions {
                    identity: identity.clone(),
                    limit: self.max_subscriptions,
                });
            }
            // An inherited one registered again is owned now, and already routed.
            session.inherited.remove(&sub);
            !session.record.subscriptions.contains(&sub)
                && Arc::make_mut(&mut session.record).subscriptions.insert(sub)
        } else {
            session.inherited.remove(&sub);
            session.record.subscriptions.contains(&sub)
                && Arc::make_mut(&mut session.record)
                    .subscriptions
                    .remove(&sub)
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

    /// Removes peers whose grace period ended by `now`, and subscriptions inherited
    /// from a previous incarnation that the new one did not register again in time.
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
        let mut updates: Vec<SessionUpdate> =
            expired.into_iter().map(SessionUpdate::Remove).collect();
        for session in self.peers.values_mut() {
            if session.inherited_until.is_some_and(|t| t <= now) {
                session.inherited_until = None;
                let inherited = std::mem::take(&mut session.inherited);
                if !inherited.is_empty() {
                    Arc::make_mut(&mut session.record)
                        .subscriptions
                        .retain(|s| !inherited.contains(s));
                    updates.push(SessionUpdate::Upsert(session.record.clone()));
                }
            }
        }
        updates
    }

    /// Current records of every peer with a session.
    pub fn records(&self) -> impl Iterator<Item = &Arc<PeerRecord>> {
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
        s.connect(1, "a", 9, vec![], None, t0);
        s.set_subscription(1, sub("t", "g"), true).expect("ok");
        s.disconnect(1, t0);
        assert!(s.tick(t0 + Duration::from_secs(1)).is_empty());
        let up = s.connect(2, "a", 9, vec![], None, t0);
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
        s.connect(1, "a", 9, vec![], None, t0);
        s.disconnect(1, t0);
        assert_eq!(
            s.tick(t0 + Duration::from_secs(2)),
            vec![SessionUpdate::Remove("a".into())]
        );
        assert!(s.is_empty());
    }

    fn routed(update: &SessionUpdate) -> Vec<Subscription> {
        match update {
            SessionUpdate::Upsert(r) => r.subscriptions.iter().cloned().collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn new_incarnation_inherits_old_subscriptions_until_grace_ends() {
        let mut s = Sessions::new(Duration::from_secs(2), 10);
        let t0 = Instant::now();
        s.connect(1, "a", 1, vec![], None, t0);
        s.set_subscription(1, sub("t", "g"), true).expect("ok");
        s.set_subscription(1, sub("u", "g"), true).expect("ok");
        let up = s.connect(2, "a", 2, vec![], None, t0);
        assert_eq!(routed(&up[0]), vec![sub("t", "g"), sub("u", "g")]);
        // Registering an inherited subscription again changes nothing in routes.
        assert!(s
            .set_subscription(2, sub("t", "g"), true)
            .expect("ok")
            .is_empty());
        assert!(s.tick(t0 + Duration::from_secs(1)).is_empty());
        // The one the new process never registered goes when the grace period ends.
        let up = s.tick(t0 + Duration::from_secs(2));
        assert_eq!(routed(&up[0]), vec![sub("t", "g")]);
        assert!(s.tick(t0 + Duration::from_secs(9)).is_empty());
    }

    #[test]
    fn an_inherited_subscription_can_be_dropped_at_once() {
        let mut s = Sessions::new(Duration::from_secs(2), 10);
        let t0 = Instant::now();
        s.connect(1, "a", 1, vec![], None, t0);
        s.set_subscription(1, sub("t", "g"), true).expect("ok");
        s.connect(2, "a", 2, vec![], None, t0);
        let up = s.set_subscription(2, sub("t", "g"), false).expect("ok");
        assert!(routed(&up[0]).is_empty());
    }

    #[test]
    fn an_old_connection_closing_late_does_not_expire_the_new_one() {
        let mut s = Sessions::new(Duration::from_secs(1), 10);
        let t0 = Instant::now();
        s.connect(1, "a", 1, vec![], None, t0);
        s.connect(2, "a", 1, vec![], None, t0);
        s.disconnect(1, t0);
        assert!(s.tick(t0 + Duration::from_secs(10)).is_empty());
    }

    #[test]
    fn subscription_limit_is_enforced() {
        let mut s = Sessions::new(Duration::from_secs(1), 1);
        let t0 = Instant::now();
        s.connect(1, "a", 1, vec![], None, t0);
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
