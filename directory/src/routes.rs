//! The route view: a pure state machine from peer registrations to topic routes.
//!
//! Registrations arrive from *sources* (this node's own connected peers, or another
//! directory node's gossip namespace). A peer may briefly be known under two sources
//! while it moves between nodes; it appears once in routes, the record with the highest
//! incarnation winning. Every change to a topic's route bumps its version and yields a
//! [`RouteChange`] for each watcher of the topic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use weft_proto::wire::{GroupRoute, Member, Route, Subscription};

/// Up to this many subscriptions, a record's groups for a topic are found by a scan
/// rather than a range lookup (whose lower bound is an allocated key).
const SCAN_SUBSCRIPTIONS: usize = 8;

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

    /// The groups this record subscribes to `topic` with. Subscriptions are ordered by
    /// topic, then group, so a topic's are one range of the set: found in O(log n), not
    /// by scanning every subscription of the peer (a peer with 1,000 subscriptions
    /// made each route of its topics cost 1,000 comparisons per member, and one
    /// re-registration of it 0.6 s of the directory's lock).
    fn groups_of<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        // A few subscriptions (most peers) are scanned: cheaper than the range's key.
        let from = if self.subscriptions.len() <= SCAN_SUBSCRIPTIONS {
            self.subscriptions.range(..)
        } else {
            self.subscriptions.range(
                Subscription {
                    topic: topic.to_string(),
                    group: String::new(),
                }..,
            )
        };
        from.skip_while(move |s| s.topic.as_str() < topic)
            .take_while(move |s| s.topic == topic)
            .map(|s| s.group.as_str())
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
///
/// Records are shared (`Arc`) with whoever produced them (the session table, the gossip
/// watcher), so a directory node holds one copy of each peer's registrations: at
/// 10,000 peers × 10 subscriptions the copies were most of a node's route memory.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Identity → what each source says about it: one source, or two while the peer
    /// moves between directory nodes.
    peers: HashMap<Arc<str>, Vec<(SourceId, Arc<PeerRecord>)>>,
    /// Topic → identities with a subscription to it (in any source's record).
    by_topic: HashMap<String, BTreeSet<Arc<str>>>,
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
        self.peers.len()
    }

    /// Sets (or replaces) what `source` says about `record.identity`.
    pub fn upsert(&mut self, source: &str, record: impl Into<Arc<PeerRecord>>) -> Vec<RouteChange> {
        let record = record.into();
        let old = self.record(source, &record.identity);
        if old.is_some_and(|old| Arc::ptr_eq(old, &record) || **old == *record) {
            return Vec::new();
        }
        let mut touched: BTreeSet<String> = record.topics().map(str::to_string).collect();
        touched.extend(old.into_iter().flat_map(|o| o.topics().map(str::to_string)));
        let before = self.routes_of(&touched);
        let identity = self.interned(&record.identity);
        let entries = self.peers.entry(identity.clone()).or_default();
        match entries.iter_mut().find(|(s, _)| s == source) {
            Some(entry) => entry.1 = record,
            None => entries.push((source.to_string(), record)),
        }
        self.reindex(&identity, &touched);
        self.changes(before)
    }

    /// Forgets what `source` says about `identity`.
    pub fn remove(&mut self, source: &str, identity: &str) -> Vec<RouteChange> {
        let Some(old) = self.record(source, identity) else {
            return Vec::new();
        };
        let touched: BTreeSet<String> = old.topics().map(str::to_string).collect();
        let before = self.routes_of(&touched);
        let identity = self.interned(identity);
        if let Some(entries) = self.peers.get_mut(&identity) {
            entries.retain(|(s, _)| s != source);
            if entries.is_empty() {
                self.peers.remove(&identity);
            }
        }
        self.reindex(&identity, &touched);
        self.changes(before)
    }

    /// Forgets everything `source` said (e.g. a directory node died).
    pub fn remove_source(&mut self, source: &str) -> Vec<RouteChange> {
        self.identities_of(source)
            .iter()
            .flat_map(|id| self.remove(source, id))
            .collect::<Vec<_>>()
            .into_iter()
            .fold(Vec::new(), coalesce)
    }

    /// Identities `source` currently holds records for.
    pub fn identities_of(&self, source: &str) -> Vec<String> {
        self.peers
            .iter()
            .filter(|(_, entries)| entries.iter().any(|(s, _)| s == source))
            .map(|(id, _)| id.to_string())
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
                .flat_map(|r| r.groups_of(topic))
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

    /// What `source` says about `identity`.
    fn record(&self, source: &str, identity: &str) -> Option<&Arc<PeerRecord>> {
        self.peers
            .get(identity)?
            .iter()
            .find(|(s, _)| s == source)
            .map(|(_, r)| r)
    }

    /// The table's shared copy of `identity` (a new one if it has none).
    fn interned(&self, identity: &str) -> Arc<str> {
        match self.peers.get_key_value(identity) {
            Some((id, _)) => id.clone(),
            None => Arc::from(identity),
        }
    }

    /// The record that represents `identity` in routes: highest incarnation wins; ties
    /// go to the smallest source id so that every node picks the same one.
    fn winning_record(&self, identity: &str) -> Option<&PeerRecord> {
        self.peers
            .get(identity)?
            .iter()
            .max_by(|(sa, a), (sb, b)| a.incarnation.cmp(&b.incarnation).then(sb.cmp(sa)))
            .map(|(_, r)| &**r)
    }

    /// Every source's record of `identity`.
    fn records_of<'a>(&'a self, identity: &str) -> impl Iterator<Item = &'a PeerRecord> {
        self.peers
            .get(identity)
            .into_iter()
            .flatten()
            .map(|(_, r)| &**r)
    }

    /// Brings `by_topic` up to date for `identity` on `topics` (those its records
    /// changed on).
    fn reindex(&mut self, identity: &Arc<str>, topics: &BTreeSet<String>) {
        for topic in topics {
            let subscribed = self
                .records_of(identity)
                .any(|r| r.groups_of(topic).next().is_some());
            if subscribed {
                self.by_topic
                    .entry(topic.clone())
                    .or_default()
                    .insert(identity.clone());
            } else if let Some(ids) = self.by_topic.get_mut(topic.as_str()) {
                ids.remove(identity);
                if ids.is_empty() {
                    self.by_topic.remove(topic.as_str());
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

    #[test]
    fn ties_go_to_the_smallest_source_whatever_the_arrival_order() {
        let mut t = RouteTable::new();
        let mut from_n2 = record("a", 1, &[("orders", "g")]);
        from_n2.addrs = vec!["127.0.0.1:2".parse().expect("addr")];
        t.upsert("n2", from_n2);
        t.upsert("n1", record("a", 1, &[("orders", "g")]));
        let r = t.route("orders");
        assert_eq!(r.groups[0].members[0].addrs, record("a", 1, &[]).addrs);
        t.remove("n1", "a");
        let r = t.route("orders");
        assert_eq!(
            r.groups[0].members[0].addrs,
            vec!["127.0.0.1:2".parse().expect("addr")]
        );
    }

    #[test]
    fn the_table_shares_records_instead_of_copying_them() {
        let mut t = RouteTable::new();
        let shared = Arc::new(record("a", 1, &[("orders", "g")]));
        t.upsert("n1", shared.clone());
        assert_eq!(Arc::strong_count(&shared), 2);
        t.remove("n1", "a");
        assert_eq!(Arc::strong_count(&shared), 1);
        assert_eq!(t.peer_count(), 0);
        assert!(t.route("orders").groups.is_empty());
    }

    proptest::proptest! {
        /// A record's groups for a topic are exactly those a scan of all its
        /// subscriptions finds, for topics that prefix or extend one another too.
        #[test]
        fn groups_of_a_topic_are_those_a_full_scan_finds(
            subs in proptest::collection::btree_set(
                (proptest::sample::select(vec!["a", "a.b", "ab", "b", ""]),
                 proptest::sample::select(vec!["", "g", "h", "g2"])),
                0..12,
            ),
            topic in proptest::sample::select(vec!["a", "a.b", "ab", "b", "", "c"]),
        ) {
            let subs: Vec<(&str, &str)> = subs.into_iter().collect();
            let r = record("p", 1, &subs);
            let found: Vec<&str> = r.groups_of(topic).collect();
            let scanned: Vec<&str> = r
                .subscriptions
                .iter()
                .filter(|s| s.topic == topic)
                .map(|s| s.group.as_str())
                .collect();
            proptest::prop_assert_eq!(found, scanned);
        }
    }
}
