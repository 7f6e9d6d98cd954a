//! The route view: a pure state machine from peer registrations to topic routes.
//!
//! Registrations arrive from *sources* (this node's own connected peers, or another
//! directory node's gossip namespace). A peer may briefly be known under two sources
//! while it moves between nodes; it appears once in routes, the record with the highest
//! incarnation winning. Every change to a topic's route bumps its version and yields a
//! [`RouteChange`] for each watcher of the topic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use weft_proto::wire::{GroupRoute, Member, Route, Subscription};

/// Where a registration came from: this node (`local`) or another directory node.
pub type SourceId = String;

/// Identifies a watcher (one connection's watch set) to the caller.
pub type WatcherId = u64;

/// Everything the directory knows about one peer from one source.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerRecord {
    /// Certificate identity.
    pub identity: String,
    /// Process incarnation.
    pub incarnation: u64,
    /// Data addresses.
    pub addrs: Vec<std::net::SocketAddr>,
    /// Locality.
    pub zone: Option<String>,
    /// Registered subscriptions.
    pub subscriptions: BTreeSet<Subscription>,
}

impl PeerRecord {
    fn member(&self) -> Member {
        Member {
            identity: self.identity.clone(),
            incarnation: self.incarnation,
            addrs: self.addrs.clone(),
            zone: self.zone.clone(),
        }
    }

    fn topics(&self) -> impl Iterator<Item = &str> {
        self.subscriptions.iter().map(|s| s.topic.as_str())
    }
}

/// A route that changed, for one watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteChange {
    /// Who should hear it.
    pub watcher: WatcherId,
    /// The new route.
    pub route: Route,
}

/// Union of registrations from all sources, with per-topic versions and watchers.
#[derive(Debug, Default)]
pub struct RouteTable {
    records: HashMap<(SourceId, String), PeerRecord>,
    /// Topic → identities with a subscription to it (in any source).
    by_topic: HashMap<String, BTreeSet<String>>,
    /// Identity → sources holding a record of it.
    sources_of: HashMap<String, BTreeSet<SourceId>>,
    versions: HashMap<String, u64>,
    watchers: HashMap<String, BTreeSet<WatcherId>>,
    watched: HashMap<WatcherId, BTreeSet<String>>,
}

impl RouteTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of distinct peers known.
    pub fn peer_count(&self) -> usize {
        self.sources_of.len()
    }

    /// Sets (or replaces) what `source` says about `record.identity`.
    pub fn upsert(&mut self, source: &str, record: PeerRecord) -> Vec<RouteChange> {
        let key = (source.to_string(), record.identity.clone());
        let mut touched: BTreeSet<String> = record.topics().map(str::to_string).collect();
        if let Some(old) = self.records.get(&key) {
            if *old == record {
                return Vec::new();
            }
            touched.extend(old.topics().map(str::to_string));
        }
        let before = self.routes_of(&touched);
        self.unindex(&key);
        self.index(&key, &record);
        self.records.insert(key, record);
        self.changes(before)
    }

    /// Forgets what `source` says about `identity`.
    pub fn remove(&mut self, source: &str, identity: &str) -> Vec<RouteChange> {
        let key = (source.to_string(), identity.to_string());
        let Some(old) = self.records.get(&key) else {
            return Vec::new();
        };
        let touched: BTreeSet<String> = old.topics().map(str::to_string).collect();
        let before = self.routes_of(&touched);
        self.unindex(&key);
        self.records.remove(&key);
        self.changes(before)
    }

    /// Forgets everything `source` said (e.g. a directory node died).
    pub fn remove_source(&mut self, source: &str) -> Vec<RouteChange> {
        let identities: Vec<String> = self
            .records
            .keys()
            .filter(|(s, _)| s == source)
            .map(|(_, id)| id.clone())
            .collect();
        identities
            .iter()
            .flat_map(|id| self.remove(source, id))
            .collect::<Vec<_>>()
            .into_iter()
            .fold(Vec::new(), coalesce)
    }

    /// Identities `source` currently holds records for.
    pub fn identities_of(&self, source: &str) -> Vec<String> {
        self.records
            .keys()
            .filter(|(s, _)| s == source)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// The current route of `topic` (empty if nobody subscribed).
    pub fn route(&self, topic: &str) -> Route {
        let mut groups: BTreeMap<&str, Vec<Member>> = BTreeMap::new();
        for identity in self.by_topic.get(topic).into_iter().flatten() {
            let Some(winner) = self.winning_record(identity) else {
                continue;
            };
            // Groups from every record of the peer: an older incarnation still held by
            // another node (during its grace period) keeps the peer's groups in the
            // route while the new process registers again, as on a single node.
            let member_groups: BTreeSet<&str> = self
                .records_of(identity)
                .flat_map(|r| r.subscriptions.iter())
                .filter(|s| s.topic == topic)
                .map(|s| s.group.as_str())
                .collect();
            for group in member_groups {
                groups.entry(group).or_default().push(winner.member());
            }
        }
        Route {
            topic: topic.to_string(),
            version: self.versions.get(topic).copied().unwrap_or(0),
            groups: groups
                .into_iter()
                .map(|(group, mut members)| {
                    members.sort();
                    GroupRoute {
                        group: group.to_string(),
                        members,
                    }
                })
                .collect(),
        }
    }

    /// Starts pushing changes of `topic` to `watcher`; returns the current route.
    pub fn watch(&mut self, watcher: WatcherId, topic: &str) -> Route {
        self.watchers
            .entry(topic.to_string())
            .or_default()
            .insert(watcher);
        self.watched
            .entry(watcher)
            .or_default()
            .insert(topic.to_string());
        self.route(topic)
    }

    /// Stops pushing `topic` to `watcher`.
    pub fn unwatch(&mut self, watcher: WatcherId, topic: &str) {
        if let Some(set) = self.watchers.get_mut(topic) {
            set.remove(&watcher);
            if set.is_empty() {
                self.watchers.remove(topic);
            }
        }
        if let Some(set) = self.watched.get_mut(&watcher) {
            set.remove(topic);
        }
    }

    /// Drops every watch of `watcher` (its connection closed).
    pub fn drop_watcher(&mut self, watcher: WatcherId) {
        for topic in self.watched.remove(&watcher).unwrap_or_default() {
            self.unwatch(watcher, &topic);
        }
    }

    /// The record that represents `identity` in routes: highest incarnation wins; ties
    /// go to the smallest source id so that every node picks the same one.
    fn winning_record<'a>(&'a self, identity: &'a str) -> Option<&'a PeerRecord> {
        self.records_of(identity)
            .fold(None, |best: Option<&PeerRecord>, r| match best {
                Some(b) if b.incarnation >= r.incarnation => Some(b),
                _ => Some(r),
            })
    }

    /// Every source's record of `identity`.
    fn records_of<'a>(&'a self, identity: &'a str) -> impl Iterator<Item = &'a PeerRecord> {
        self.sources_of
            .get(identity)
            .into_iter()
            .flatten()
            .filter_map(move |s| self.records.get(&(s.clone(), identity.to_string())))
    }

    fn index(&mut self, key: &(SourceId, String), record: &PeerRecord) {
        for topic in record.topics() {
            self.by_topic
                .entry(topic.to_string())
                .or_default()
                .insert(key.1.clone());
        }
        self.sources_of
            .entry(key.1.clone())
            .or_default()
            .insert(key.0.clone());
    }

    fn unindex(&mut self, key: &(SourceId, String)) {
        let Some(old) = self.records.get(key) else {
            return;
        };
        let topics: Vec<String> = old.topics().map(str::to_string).collect();
        if let Some(sources) = self.sources_of.get_mut(&key.1) {
            sources.remove(&key.0);
            if sources.is_empty() {
                self.sources_of.remove(&key.1);
            }
        }
        for topic in topics {
            let still = self.sources_of.get(&key.1).is_some_and(|sources| {
                sources.iter().any(|s| {
                    s != &key.0
                        && self
                            .records
                            .get(&(s.clone(), key.1.clone()))
                            .is_some_and(|r| r.topics().any(|t| t == topic))
                })
            });
            if !still {
                if let Some(ids) = self.by_topic.get_mut(&topic) {
                    ids.remove(&key.1);
                    if ids.is_empty() {
                        self.by_topic.remove(&topic);
                    }
                }
            }
        }
    }

    fn routes_of(&self, topics: &BTreeSet<String>) -> Vec<Route> {
        topics.iter().map(|t| self.route(t)).collect()
    }

    /// Bumps the version of every topic whose route moved and notifies its watchers.
    fn changes(&mut self, before: Vec<Route>) -> Vec<RouteChange> {
        let mut out = Vec::new();
        for old in before {
            let new = self.route(&old.topic);
            if new.groups == old.groups {
                continue;
            }
            let version = self.versions.entry(old.topic.clone()).or_insert(0);
            *version += 1;
            let route = Route {
                version: *version,
                ..new
            };
            for watcher in self.watchers.get(&route.topic).into_iter().flatten() {
                out.push(RouteChange {
                    watcher: *watcher,
                    route: route.clone(),
                });
            }
        }
        out
    }
}

/// Keeps only the newest change per (watcher, topic).
fn coalesce(mut acc: Vec<RouteChange>, change: RouteChange) -> Vec<RouteChange> {
    acc.retain(|c| !(c.watcher == change.watcher && c.route.topic == change.route.topic));
    acc.push(change);
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, inc: u64, subs: &[(&str, &str)]) -> PeerRecord {
        PeerRecord {
            identity: id.into(),
            incarnation: inc,
            addrs: vec![format!("127.0.0.1:{}", 1000 + inc).parse().expect("addr")],
            zone: None,
            subscriptions: subs
                .iter()
                .map(|(t, g)| Subscription {
                    topic: (*t).into(),
                    group: (*g).into(),
                })
                .collect(),
        }
    }

    fn members(route: &Route, group: &str) -> Vec<String> {
        route
            .groups
            .iter()
            .find(|g| g.group == group)
            .map(|g| g.members.iter().map(|m| m.identity.clone()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn union_over_sources() {
        let mut t = RouteTable::new();
        t.upsert("n1", record("a", 1, &[("orders", "billing")]));
        t.upsert(
            "n2",
            record("b", 1, &[("orders", "billing"), ("orders", "audit")]),
        );
        let r = t.route("orders");
        assert_eq!(members(&r, "billing"), vec!["a", "b"]);
        assert_eq!(members(&r, "audit"), vec!["b"]);
        assert_eq!(r.version, 2);
    }

    #[test]
    fn peer_known_under_two_sources_appears_once_newest_incarnation() {
        let mut t = RouteTable::new();
        t.upsert("n1", record("a", 1, &[("orders", "g")]));
        t.upsert("n2", record("a", 2, &[("orders", "g")]));
        let r = t.route("orders");
        assert_eq!(members(&r, "g"), vec!["a"]);
        assert_eq!(r.groups[0].members[0].incarnation, 2);
        // The old node's keys go: still there, from n2.
        t.remove("n1", "a");
        assert_eq!(members(&t.route("orders"), "g"), vec!["a"]);
        t.remove("n2", "a");
        assert!(t.route("orders").groups.is_empty());
    }

    #[test]
    fn a_restarted_peer_keeps_the_groups_its_old_record_still_holds() {
        let mut t = RouteTable::new();
        // The old process registered through n1; the new one reached n2 and has not
        // subscribed yet. The group stays routed (to the new process) until n1 drops
        // the old record at the end of its grace period.
        t.upsert("n1", record("a", 1, &[("orders", "g")]));
        t.upsert("n2", record("a", 2, &[]));
        let r = t.route("orders");
        assert_eq!(members(&r, "g"), vec!["a"]);
        assert_eq!(r.groups[0].members[0].incarnation, 2);
        t.remove("n1", "a");
        assert!(t.route("orders").groups.is_empty());
    }

    #[test]
    fn moving_peer_with_same_route_does_not_notify() {
        let mut t = RouteTable::new();
        t.watch(7, "orders");
        t.upsert("n1", record("a", 1, &[("orders", "g")]));
        // Same incarnation re-registered through another node: route identical.
        let changes = t.upsert("n2", record("a", 1, &[("orders", "g")]));
        assert!(changes.is_empty());
        let changes = t.remove("n1", "a");
        assert!(changes.is_empty(), "still known via n2: {changes:?}");
    }

    #[test]
    fn watchers_hear_changes_with_increasing_versions() {
        let mut t = RouteTable::new();
        assert!(t.watch(1, "orders").groups.is_empty());
        let c1 = t.upsert("n1", record("a", 1, &[("orders", "g")]));
        assert_eq!(c1.len(), 1);
        assert_eq!(c1[0].watcher, 1);
        let c2 = t.upsert("n1", record("a", 1, &[]));
        assert_eq!(c2.len(), 1);
        assert!(c2[0].route.version > c1[0].route.version);
        assert!(c2[0].route.groups.is_empty());
        t.drop_watcher(1);
        assert!(t
            .upsert("n1", record("a", 1, &[("orders", "g")]))
            .is_empty());
    }

    #[test]
    fn removing_a_source_removes_its_peers_only() {
        let mut t = RouteTable::new();
        t.watch(1, "orders");
        t.upsert("n1", record("a", 1, &[("orders", "g")]));
        t.upsert("n1", record("b", 1, &[("orders", "g")]));
        t.upsert("n2", record("c", 1, &[("orders", "g")]));
        let changes = t.remove_source("n1");
        assert_eq!(changes.len(), 1, "coalesced per watcher and topic");
        assert_eq!(members(&changes[0].route, "g"), vec!["c"]);
        assert_eq!(t.peer_count(), 1);
    }

    #[test]
    fn unrelated_topics_do_not_notify() {
        let mut t = RouteTable::new();
        t.watch(1, "orders");
        assert!(t
            .upsert("n1", record("a", 1, &[("invoices", "g")]))
            .is_empty());
    }
}
