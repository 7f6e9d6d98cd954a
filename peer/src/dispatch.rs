//! The sender's delivery state machine (sans-IO).
//!
//! It knows, for every (topic, group) the peer publishes to, which messages wait for a
//! member and which are in flight on which *link* (one QUIC stream to one member for one
//! subscription), how much credit each link has, and which links should exist given the
//! routes. Events come in with `now`; [`Action`]s come out for the runtime to perform.
//! Message bodies are not held here, only sequence numbers and key hashes.

use crate::seq_map::SeqMap;
use rustc_hash::{FxBuildHasher, FxHashMap};
use smallvec::SmallVec;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};
use weft_proto::wire::Route;

mod queues;
use queues::{InFlightWindow, Offer, WaitQueue};

/// Outbox sequence number of a message.
pub(crate) type Seq = u64;

/// One data stream: messages of `topic` for `member`'s membership in `group`.
///
/// The dispatcher looks a link up by its key on every publish (twice per member in a
/// pump) and every ack; the key carries the hash of its three names, computed once,
/// so that a lookup hashes one number instead of three strings.
#[derive(Debug, Clone)]
pub(crate) struct LinkKey {
    member: String,
    topic: String,
    group: String,
    /// Of the three names, which never change after [`LinkKey::new`].
    hash: u64,
}

impl LinkKey {
    pub(crate) fn new(member: &str, topic: &str, group: &str) -> Self {
        let mut hasher = rustc_hash::FxHasher::default();
        (member, topic, group).hash(&mut hasher);
        LinkKey {
            member: member.to_string(),
            topic: topic.to_string(),
            group: group.to_string(),
            hash: hasher.finish(),
        }
    }

    /// The member the link sends to.
    pub(crate) fn member(&self) -> &str {
        &self.member
    }

    /// The topic of the link's messages.
    pub(crate) fn topic(&self) -> &str {
        &self.topic
    }

    /// The member's group.
    pub(crate) fn group(&self) -> &str {
        &self.group
    }
}

impl Hash for LinkKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for LinkKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
            && self.member == other.member
            && self.topic == other.topic
            && self.group == other.group
    }
}

impl Eq for LinkKey {}

/// Tells one link task from a later one with the same key: a task that outlives its
/// link (closed while connecting, say) must not touch its successor's state, whose
/// stream numbers messages from scratch.
pub(crate) type LinkEpoch = u64;

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Run a link task for this key (connect, open the stream, report `link_up`); it
    /// reports its events with this epoch.
    OpenLink(LinkKey, LinkEpoch),
    /// Stop the link task of this epoch (its in-flight messages were already
    /// requeued).
    CloseLink(LinkEpoch),
    /// Messages are ready for the link of this epoch: its task calls
    /// [`Dispatcher::swap_outgoing`]. (An epoch, not a [`LinkKey`]: a wake is sent per
    /// publish, and cloning and hashing a key's three strings was measurable.)
    Wake(LinkEpoch),
    /// The messages need nothing more from this group.
    Settle { seqs: Vec<Seq>, group: String },
    /// Every target group of a confirmed publish has acknowledged it.
    Confirmed(Seq),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    key_hash: Option<u64>,
    deliveries: u32,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    seq: Seq,
    entry: Entry,
    sent_at: Instant,
}

#[derive(Debug, Default)]
struct GroupQueue {
    /// Messages not on any link, in publish order.
    waiting: WaitQueue,
    /// Members in the current route, sorted.
    members: Vec<String>,
    /// The link key of each member, in `members` order.
    links: Vec<LinkKey>,
    /// The last pump found no link with free credit: a new message cannot be placed
    /// until an event (ack, credit, link change, timeout) pumps again.
    blocked: bool,
    /// The group's only live link, when the last pump left it messages it was woken to
    /// take: until it takes them, a publish only queues its messages and leaves the
    /// pump to that take ([`Dispatcher::swap_outgoing`]), so that a run of publishes
    /// costs one pump and one wake instead of one each. Never set while the group has
    /// several live links: a link busy writing would then hold back messages another
    /// member could take.
    taker: Option<LinkEpoch>,
    /// Messages were queued while `taker` was set and wait for its take to pump.
    pump_due: bool,
    /// Key hash → the link holding that key's in-flight messages. A key's next message
    /// goes to no other link until these are acknowledged or requeued, so that a key
    /// moving between members (a link came up or went down) keeps its order.
    fences: FxHashMap<u64, Fence>,
}

#[derive(Debug, Clone, Copy)]
struct Fence {
    epoch: LinkEpoch,
    in_flight: u32,
}

impl GroupQueue {
    /// `released` messages of the key left their link (acknowledged or requeued).
    fn unfence(&mut self, released: impl IntoIterator<Item = InFlight>) {
        for f in released {
            let Some(hash) = f.entry.key_hash else {
                continue;
            };
            if let Some(fence) = self.fences.get_mut(&hash) {
                fence.in_flight -= 1;
                if fence.in_flight == 0 {
                    self.fences.remove(&hash);
                }
            }
        }
    }
}

#[derive(Debug)]
struct Link {
    epoch: LinkEpoch,
    up: bool,
    window: u32,
    next_link_seq: u64,
    inflight: InFlightWindow,
    outgoing: Vec<(u64, Seq)>,
}

impl Link {
    fn new(epoch: LinkEpoch) -> Self {
        Self {
            epoch,
            up: false,
            window: 0,
            next_link_seq: 1,
            inflight: InFlightWindow::default(),
            outgoing: Vec::new(),
        }
    }

    fn free(&self) -> u32 {
        if self.up {
            self.window
                .saturating_sub(self.inflight.len().try_into().unwrap_or(u32::MAX))
        } else {
            0
        }
    }
}

/// Per-group backlog, as reported by [`Peer::backlog`](crate::Peer::backlog).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupBacklog {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// Messages waiting for a member or for credit.
    pub waiting: usize,
    /// Messages sent and not yet acknowledged.
    pub in_flight: usize,
    /// Members in the route.
    pub members: usize,
}

/// Upper bound of waiting messages examined per pump, so that a large backlog blocked on
/// credit costs bounded work per event.
const SCAN_LIMIT: usize = 65_536;

/// The sender's delivery state.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    ack_timeout: Duration,
    /// Queues by topic and group, and by [`QueueId`].
    queues: Queues,
    links: FxHashMap<LinkKey, Link>,
    next_epoch: LinkEpoch,
    confirm: SeqMap<usize>,
}

impl Dispatcher {
    pub(crate) fn new(ack_timeout: Duration) -> Self {
        Self {
            ack_timeout,
            queues: Queues::default(),
            links: FxHashMap::default(),
            next_epoch: 1,
            confirm: SeqMap::default(),
        }
    }

    /// A message entered the outbox (or was recovered from it) for `targets`.
    pub(crate) fn on_publish(
        &mut self,
        now: Instant,
        seq: Seq,
        topic: &str,
        key_hash: Option<u64>,
        targets: &[String],
        confirm: bool,
    ) -> Vec<Action> {
        self.on_publish_many(now, seq, topic, &[key_hash], targets, confirm)
    }

    /// Messages `first..first + key_hashes.len()` entered the outbox for `targets`
    /// (a batch: one pump per group).
    pub(crate) fn on_publish_many(
        &mut self,
        now: Instant,
        first: Seq,
        topic: &str,
        key_hashes: &[Option<u64>],
        targets: &[String],
        confirm: bool,
    ) -> Vec<Action> {
        let queues: SmallVec<[QueueId; 4]> = self.queue_ids(topic, targets).collect();
        self.on_publish_queued(now, first, key_hashes, &queues, confirm)
    }

    /// The ids of the queues of `topic`'s `groups` (created if missing), for
    /// [`on_publish_queued`](Self::on_publish_queued).
    pub(crate) fn queue_ids<'a>(
        &'a mut self,
        topic: &'a str,
        groups: &'a [String],
    ) -> impl Iterator<Item = QueueId> + 'a {
        groups.iter().map(move |group| self.queues.id(topic, group))
    }

    /// [`on_publish_many`](Self::on_publish_many) with the target groups' queues named
    /// by the ids [`queue_ids`](Self::queue_ids) gave: a publish hashes no topic or
    /// group name.
    pub(crate) fn on_publish_queued(
        &mut self,
        now: Instant,
        first: Seq,
        key_hashes: &[Option<u64>],
        queues: &[QueueId],
        confirm: bool,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let seqs = first..first + key_hashes.len() as u64;
        if confirm {
            for seq in seqs {
                if queues.is_empty() {
                    actions.push(Action::Confirmed(seq));
                } else {
                    self.confirm.insert(seq, queues.len());
                }
            }
        }
        for &id in queues {
            let Some(queue) = self.queues.by_id(id) else {
                // Ids come from this dispatcher, whose queues are never removed.
                continue;
            };
            let run = key_hashes.iter().enumerate().map(|(i, &key_hash)| {
                let entry = Entry {
                    key_hash,
                    deliveries: 0,
                };
                (first + i as u64, entry)
            });
            queue.waiting.push_run(run);
            if queue.blocked {
                // An ack, credit or link change pumps.
            } else if queue.taker.is_some() {
                queue.pump_due = true;
            } else {
                // The queue as found above: a publish looks its group up once.
                pump_queue(now, queue, &mut self.links, &mut actions);
            }
        }
        actions
    }

    /// The directory says `route` is current for its topic.
    pub(crate) fn on_route(&mut self, now: Instant, route: &Route) -> Vec<Action> {
        let mut actions = Vec::new();
        let topic = route.topic.as_str();
        let mut listed: Vec<&str> = Vec::new();
        for g in &route.groups {
            listed.push(&g.group);
            let members: Vec<String> = g.members.iter().map(|m| m.identity.clone()).collect();
            self.set_members(now, topic, &g.group, members, &mut actions);
        }
        // Groups that left the route keep their waiting messages, with no members.
        let gone: Vec<String> = self
            .queues
            .groups_of(topic)
            .filter(|g| !listed.contains(&g.as_str()))
            .cloned()
            .collect();
        for group in gone {
            self.set_members(now, topic, &group, Vec::new(), &mut actions);
        }
        actions
    }

    fn set_members(
        &mut self,
        now: Instant,
        topic: &str,
        group: &str,
        mut members: Vec<String>,
        actions: &mut Vec<Action>,
    ) {
        members.sort();
        members.dedup();
        let id = self.queues.id(topic, group);
        let Some(queue) = self.queues.by_id(id) else {
            return;
        };
        queue.links = members
            .iter()
            .map(|member| LinkKey::new(member, topic, group))
            .collect();
        let old = std::mem::replace(&mut queue.members, members.clone());
        for member in old.iter().filter(|m| !members.contains(m)) {
            let key = LinkKey::new(member, topic, group);
            self.requeue_link(&key);
            if let Some(link) = self.links.remove(&key) {
                actions.push(Action::CloseLink(link.epoch));
            }
        }
        for member in members.iter().filter(|m| !old.contains(m)) {
            let key = LinkKey::new(member, topic, group);
            let epoch = self.next_epoch;
            self.next_epoch += 1;
            self.links.insert(key.clone(), Link::new(epoch));
            actions.push(Action::OpenLink(key, epoch));
        }
        self.pump(now, topic, group, actions);
    }

    /// The link's stream is open and the receiver granted `window`.
    pub(crate) fn on_link_up(
        &mut self,
        now: Instant,
        key: &LinkKey,
        epoch: LinkEpoch,
        window: u32,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(link) = self.link_mut(key, epoch) {
            if !link.up {
                // A new stream: the receiver numbers from scratch. Nothing is in flight
                // (everything was requeued when the previous stream went down).
                link.next_link_seq = 1;
            }
            link.up = true;
            link.window = window;
            self.pump(now, key.topic(), key.group(), &mut actions);
        }
        actions
    }

    /// The receiver changed the link's window.
    pub(crate) fn on_credit(
        &mut self,
        now: Instant,
        key: &LinkKey,
        epoch: LinkEpoch,
        window: u32,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(link) = self.link_mut(key, epoch).filter(|l| l.up) {
            link.window = window;
            self.pump(now, key.topic(), key.group(), &mut actions);
        }
        actions
    }

    /// The link's stream or connection failed: its in-flight messages go back to the
    /// group's queue (to other members, or to this one when it is back).
    pub(crate) fn on_link_down(
        &mut self,
        now: Instant,
        key: &LinkKey,
        epoch: LinkEpoch,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.link_mut(key, epoch).is_none() {
            return actions;
        }
        self.requeue_link(key);
        if let Some(link) = self.links.get_mut(key) {
            link.up = false;
        }
        self.pump(now, key.topic(), key.group(), &mut actions);
        actions
    }

    /// The receiver acknowledged link sequences `<= upto` and `extra`.
    pub(crate) fn on_ack(
        &mut self,
        now: Instant,
        key: &LinkKey,
        epoch: LinkEpoch,
        upto: u64,
        extra: &[u64],
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(link) = self.link_mut(key, epoch) else {
            return actions;
        };
        let acked = link.inflight.ack(upto, extra);
        let seqs = acked.iter().map(|f| f.seq).collect();
        if let Some(queue) = self.queue_mut(key.topic(), key.group()) {
            queue.unfence(acked);
        }
        self.settle(seqs, key.group(), &mut actions);
        self.pump(now, key.topic(), key.group(), &mut actions);
        actions
    }

    /// Requeues the in-flight messages of links whose oldest message waited longer than
    /// the ack timeout (the member is alive but not acknowledging).
    pub(crate) fn tick(&mut self, now: Instant) -> Vec<Action> {
        let stuck: Vec<LinkKey> = self
            .links
            .iter()
            .filter(|(_, l)| {
                l.inflight
                    .oldest()
                    .is_some_and(|f| now.duration_since(f.sent_at) >= self.ack_timeout)
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut actions = Vec::new();
        for key in stuck {
            tracing::warn!(member = %key.member(), topic = %key.topic(), group = %key.group(), "ack timeout: redelivering unacknowledged messages");
            self.requeue_link(&key);
            self.pump(now, key.topic(), key.group(), &mut actions);
        }
        actions
    }

    /// Messages assigned to the link and not yet handed to it: `(link_seq, seq)`.
    #[cfg(test)]
    pub(crate) fn take_outgoing(&mut self, key: &LinkKey, epoch: LinkEpoch) -> Vec<(u64, Seq)> {
        let mut outgoing = Vec::new();
        let now = Instant::now();
        let actions = self.swap_outgoing(now, key, epoch, &mut outgoing);
        assert!(
            !actions.contains(&Action::Wake(epoch)),
            "a take never wakes its own link"
        );
        outgoing
    }

    /// Moves the messages assigned to the link and not yet handed to it into `into`
    /// (emptied first), and leaves `into`'s buffer with the link: the two buffers
    /// change places at every take, so neither side allocates or regrows one per take
    /// (each is at most the link's credit window long). First pumps the link's group
    /// if publishes left that to this take (see `GroupQueue::taker`): the actions wake
    /// the group's other links that were given messages.
    pub(crate) fn swap_outgoing(
        &mut self,
        now: Instant,
        key: &LinkKey,
        epoch: LinkEpoch,
        into: &mut Vec<(u64, Seq)>,
    ) -> Vec<Action> {
        into.clear();
        let mut actions = Vec::new();
        if self.link_mut(key, epoch).is_none() {
            return actions;
        }
        let Some(queue) = self.queues.get_mut(key.topic(), key.group()) else {
            // No queue: nothing was ever assigned to the link.
            return actions;
        };
        if queue.pump_due {
            pump_queue(now, queue, &mut self.links, &mut actions);
            // This link is taking what it was given: it needs no wake for it.
            actions.retain(|a| *a != Action::Wake(epoch));
        }
        if queue.taker == Some(epoch) {
            queue.taker = None;
        }
        if let Some(link) = self.links.get_mut(key) {
            std::mem::swap(&mut link.outgoing, into);
        }
        actions
    }

    /// The link of `key` if it is still the one `epoch` was issued for.
    fn link_mut(&mut self, key: &LinkKey, epoch: LinkEpoch) -> Option<&mut Link> {
        self.links.get_mut(key).filter(|l| l.epoch == epoch)
    }

    /// The epoch of the current link of `key` (tests drive links by hand).
    #[cfg(test)]
    pub(crate) fn epoch_of(&self, key: &LinkKey) -> LinkEpoch {
        self.links.get(key).map_or(0, |l| l.epoch)
    }

    /// Waiting and in-flight counts per group.
    pub(crate) fn backlog(&self) -> Vec<GroupBacklog> {
        let mut out: Vec<GroupBacklog> = self
            .queues
            .iter()
            .map(|(topic, group, q)| GroupBacklog {
                topic: topic.clone(),
                group: group.clone(),
                waiting: q.waiting.len(),
                in_flight: self
                    .links
                    .iter()
                    .filter(|(k, _)| &k.topic == topic && &k.group == group)
                    .map(|(_, l)| l.inflight.len())
                    .sum(),
                members: q.members.len(),
            })
            .collect();
        out.sort_by(|a, b| (&a.topic, &a.group).cmp(&(&b.topic, &b.group)));
        out
    }

    fn settle(&mut self, seqs: Vec<Seq>, group: &str, actions: &mut Vec<Action>) {
        if seqs.is_empty() {
            return;
        }
        let mut confirmed = Vec::new();
        if !self.confirm.is_empty() {
            for seq in &seqs {
                if let Some(remaining) = self.confirm.get_mut(seq) {
                    *remaining -= 1;
                    if *remaining == 0 {
                        self.confirm.remove(seq);
                        confirmed.push(Action::Confirmed(*seq));
                    }
                }
            }
        }
        actions.push(Action::Settle {
            seqs,
            group: group.to_string(),
        });
        actions.extend(confirmed);
    }

    fn requeue_link(&mut self, key: &LinkKey) {
        let Some(link) = self.links.get_mut(key) else {
            return;
        };
        link.outgoing.clear();
        let inflight = link.inflight.take_all();
        if let Some(queue) = self.queue_mut(key.topic(), key.group()) {
            queue
                .waiting
                .requeue(inflight.iter().map(|f| (f.seq, f.entry)).collect());
            queue.unfence(inflight);
        }
    }

    fn queue_mut(&mut self, topic: &str, group: &str) -> Option<&mut GroupQueue> {
        self.queues.get_mut(topic, group)
    }

    /// Assigns waiting messages of one group to its links, within their credit.
    fn pump(&mut self, now: Instant, topic: &str, group: &str, actions: &mut Vec<Action>) {
        if let Some(queue) = self.queues.get_mut(topic, group) {
            pump_queue(now, queue, &mut self.links, actions);
        }
    }
}

/// Names one group's queue of one topic for the dispatcher's life (queues are never
/// removed), so that a publish carrying the ids of its topic's queues finds them without
/// hashing names: the two string lookups were ~190 instructions of a single publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueId(u32);

/// The group queues: by id, and by topic then group. `hashbrown`'s maps for
/// `entry_ref`: a name lookup finds (or creates) its queue with one probe per level.
#[derive(Debug, Default)]
struct Queues {
    by_name: hashbrown::HashMap<
        String,
        hashbrown::HashMap<String, QueueId, FxBuildHasher>,
        FxBuildHasher,
    >,
    all: Vec<GroupQueue>,
}

impl Queues {
    /// The id of the queue of (`topic`, `group`), created if missing.
    fn id(&mut self, topic: &str, group: &str) -> QueueId {
        let next = QueueId(self.all.len() as u32);
        let id = *self
            .by_name
            .entry_ref(topic)
            .or_default()
            .entry_ref(group)
            .or_insert(next);
        if id == next {
            self.all.push(GroupQueue::default());
        }
        id
    }

    fn by_id(&mut self, id: QueueId) -> Option<&mut GroupQueue> {
        self.all.get_mut(id.0 as usize)
    }

    /// The queue of (`topic`, `group`), if any.
    fn get_mut(&mut self, topic: &str, group: &str) -> Option<&mut GroupQueue> {
        let id = *self.by_name.get(topic)?.get(group)?;
        self.by_id(id)
    }

    /// The groups with a queue for `topic`.
    fn groups_of<'a>(&'a self, topic: &str) -> impl Iterator<Item = &'a String> + 'a {
        self.by_name
            .get(topic)
            .into_iter()
            .flat_map(|groups| groups.keys())
    }

    /// Every queue with its topic and group.
    fn iter(&self) -> impl Iterator<Item = (&String, &String, &GroupQueue)> + '_ {
        self.by_name.iter().flat_map(move |(topic, groups)| {
            groups
                .iter()
                .filter_map(move |(group, id)| Some((topic, group, self.all.get(id.0 as usize)?)))
        })
    }
}

/// [`Dispatcher::pump`] on a queue already looked up.
fn pump_queue(
    now: Instant,
    queue: &mut GroupQueue,
    links: &mut FxHashMap<LinkKey, Link>,
    actions: &mut Vec<Action>,
) {
    // Recomputed below; every event that takes messages from a link (link down, member
    // gone, timeout) pumps afterwards, so a taker never outlives its messages.
    queue.taker = None;
    queue.pump_due = false;
    // Per member: a pump runs per publish, and members are few (no allocation).
    let mut live: PerMember<&LinkKey> = SmallVec::new();
    let mut epochs: PerMember<LinkEpoch> = SmallVec::new();
    let mut free: PerMember<u32> = SmallVec::new();
    for key in &queue.links {
        if let Some(link) = links.get(key).filter(|l| l.up) {
            live.push(key);
            epochs.push(link.epoch);
            free.push(link.free());
        }
    }
    queue.blocked = free.iter().all(|f| *f == 0);
    if queue.blocked || queue.waiting.is_empty() {
        return;
    }
    let room = free.iter().map(|f| *f as usize).sum::<usize>();
    // Inline for a single publish's one message: this runs per publish.
    let mut assigned: SmallVec<[(usize, Seq, Entry); 4]> =
        SmallVec::with_capacity(room.min(queue.waiting.len()));
    let fences = &mut queue.fences;
    queue.waiting.scan(SCAN_LIMIT, |seq, entry| {
        if free.iter().all(|f| *f == 0) {
            return Offer::Stop;
        }
        let target = match entry.key_hash {
            Some(h) => rendezvous(h, &live),
            None => most_free(&free),
        };
        if free[target] == 0 {
            return Offer::Skip;
        }
        if let Some(hash) = entry.key_hash {
            let fence = fences.entry(hash).or_insert(Fence {
                epoch: epochs[target],
                in_flight: 0,
            });
            if fence.epoch != epochs[target] {
                // The key still has messages in flight on another link.
                return Offer::Skip;
            }
            fence.in_flight += 1;
        }
        free[target] -= 1;
        assigned.push((target, seq, entry));
        Offer::Take
    });
    queue.blocked = free.iter().all(|f| *f == 0);
    let sole_link = live.len() == 1;
    // One link lookup per member (hashing a `LinkKey` hashes three strings), not
    // one per message; members are few.
    for (target, key) in live.into_iter().enumerate() {
        let Some(link) = links.get_mut(key) else {
            continue;
        };
        let mine = || assigned.iter().filter(|a| a.0 == target);
        let count = mine().count();
        link.outgoing.reserve(count);
        link.inflight.reserve(count);
        // A link with outgoing messages was woken already and takes them all.
        let mut woken = false;
        for &(_, seq, mut entry) in mine() {
            entry.deliveries += 1;
            let link_seq = link.next_link_seq;
            link.next_link_seq += 1;
            link.inflight.push(
                link_seq,
                InFlight {
                    seq,
                    entry,
                    sent_at: now,
                },
            );
            woken |= link.outgoing.is_empty();
            link.outgoing.push((link_seq, seq));
        }
        if woken {
            actions.push(Action::Wake(link.epoch));
        }
        if sole_link && !link.outgoing.is_empty() {
            queue.taker = Some(link.epoch);
        }
    }
}

/// One value per up member of a group, inline for the usual few.
type PerMember<T> = SmallVec<[T; 4]>;

/// Rendezvous (highest random weight) hashing: the member a key maps to changes only
/// when that member leaves.
fn rendezvous(key_hash: u64, keys: &[&LinkKey]) -> usize {
    let mut best = 0;
    let mut best_score = 0u64;
    for (i, k) in keys.iter().enumerate() {
        let score = mix(key_hash ^ crate::message::key_hash(k.member()));
        if i == 0 || score > best_score {
            best = i;
            best_score = score;
        }
    }
    best
}

fn most_free(free: &[u32]) -> usize {
    let mut best = 0;
    for (i, f) in free.iter().enumerate() {
        if *f > free[best] {
            best = i;
        }
    }
    best
}

/// A 64-bit finalizer (splitmix64) spreading similar inputs.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests;
