use super::*;
use weft_proto::wire::{GroupRoute, Member};

fn route(topic: &str, groups: &[(&str, &[&str])]) -> Route {
    Route {
        topic: topic.into(),
        version: 1,
        groups: groups
            .iter()
            .map(|(g, ms)| GroupRoute {
                group: (*g).into(),
                members: ms
                    .iter()
                    .map(|m| Member {
                        identity: (*m).into(),
                        incarnation: 1,
                        addrs: vec![],
                        zone: None,
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn key(member: &str, group: &str) -> LinkKey {
    LinkKey::new(member, "t", group)
}

fn groups(gs: &[&str]) -> Vec<String> {
    gs.iter().map(|g| g.to_string()).collect()
}

#[test]
fn every_group_gets_every_message_within_credit() {
    let now = Instant::now();
    let mut d = Dispatcher::new(Duration::from_secs(30));
    let acts = d.on_route(now, &route("t", &[("a", &["m1"]), ("b", &["m2"])]));
    assert!(acts.contains(&Action::OpenLink(
        key("m1", "a"),
        d.epoch_of(&key("m1", "a"))
    )));
    d.on_link_up(now, &key("m1", "a"), d.epoch_of(&key("m1", "a")), 2);
    d.on_link_up(now, &key("m2", "b"), d.epoch_of(&key("m2", "b")), 10);
    for seq in 1..=5 {
        d.on_publish(now, seq, "t", None, &groups(&["a", "b"]), false);
    }
    let a: Vec<Seq> = d
        .take_outgoing(&key("m1", "a"), d.epoch_of(&key("m1", "a")))
        .into_iter()
        .map(|x| x.1)
        .collect();
    let b: Vec<Seq> = d
        .take_outgoing(&key("m2", "b"), d.epoch_of(&key("m2", "b")))
        .into_iter()
        .map(|x| x.1)
        .collect();
    assert_eq!(a, vec![1, 2], "credit 2 caps group a");
    assert_eq!(b, vec![1, 2, 3, 4, 5]);
    let acts = d.on_ack(now, &key("m1", "a"), d.epoch_of(&key("m1", "a")), 2, &[]);
    assert!(acts.contains(&Action::Settle {
        seqs: vec![1, 2],
        group: "a".into()
    }));
    let a: Vec<Seq> = d
        .take_outgoing(&key("m1", "a"), d.epoch_of(&key("m1", "a")))
        .into_iter()
        .map(|x| x.1)
        .collect();
    assert_eq!(a, vec![3, 4]);
}

#[test]
fn link_down_moves_unacked_messages_to_the_other_member() {
    let now = Instant::now();
    let mut d = Dispatcher::new(Duration::from_secs(30));
    d.on_route(now, &route("t", &[("g", &["m1", "m2"])]));
    d.on_link_up(now, &key("m1", "g"), d.epoch_of(&key("m1", "g")), 100);
    for seq in 1..=4 {
        d.on_publish(now, seq, "t", None, &groups(&["g"]), false);
    }
    assert_eq!(
        d.take_outgoing(&key("m1", "g"), d.epoch_of(&key("m1", "g")))
            .len(),
        4
    );
    d.on_link_up(now, &key("m2", "g"), d.epoch_of(&key("m2", "g")), 100);
    d.on_link_down(now, &key("m1", "g"), d.epoch_of(&key("m1", "g")));
    let moved: Vec<Seq> = d
        .take_outgoing(&key("m2", "g"), d.epoch_of(&key("m2", "g")))
        .into_iter()
        .map(|x| x.1)
        .collect();
    assert_eq!(moved, vec![1, 2, 3, 4]);
}

#[test]
fn keyed_messages_stick_to_one_member_in_order() {
    let now = Instant::now();
    let mut d = Dispatcher::new(Duration::from_secs(30));
    d.on_route(now, &route("t", &[("g", &["m1", "m2", "m3"])]));
    for m in ["m1", "m2", "m3"] {
        d.on_link_up(now, &key(m, "g"), d.epoch_of(&key(m, "g")), 1000);
    }
    for seq in 1..=30 {
        d.on_publish(now, seq, "t", Some(42), &groups(&["g"]), false);
    }
    let per: Vec<Vec<Seq>> = ["m1", "m2", "m3"]
        .iter()
        .map(|m| {
            d.take_outgoing(&key(m, "g"), d.epoch_of(&key(m, "g")))
                .into_iter()
                .map(|x| x.1)
                .collect()
        })
        .collect();
    let nonempty: Vec<&Vec<Seq>> = per.iter().filter(|v| !v.is_empty()).collect();
    assert_eq!(nonempty.len(), 1);
    assert_eq!(*nonempty[0], (1..=30).collect::<Vec<_>>());
}

#[test]
fn ack_timeout_requeues_in_order() {
    let t0 = Instant::now();
    let mut d = Dispatcher::new(Duration::from_secs(1));
    d.on_route(t0, &route("t", &[("g", &["m1"])]));
    d.on_link_up(t0, &key("m1", "g"), d.epoch_of(&key("m1", "g")), 10);
    for seq in 1..=3 {
        d.on_publish(t0, seq, "t", None, &groups(&["g"]), false);
    }
    assert_eq!(
        d.take_outgoing(&key("m1", "g"), d.epoch_of(&key("m1", "g")))
            .len(),
        3
    );
    assert!(d.tick(t0 + Duration::from_millis(500)).is_empty());
    let acts = d.tick(t0 + Duration::from_secs(2));
    assert!(acts.contains(&Action::Wake(d.epoch_of(&key("m1", "g")))));
    let again: Vec<(u64, Seq)> = d.take_outgoing(&key("m1", "g"), d.epoch_of(&key("m1", "g")));
    assert_eq!(again.iter().map(|x| x.1).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(again[0].0 > 3, "new link sequence numbers");
}

#[test]
fn confirmed_after_every_group_acked() {
    let now = Instant::now();
    let mut d = Dispatcher::new(Duration::from_secs(30));
    d.on_route(now, &route("t", &[("a", &["m1"]), ("b", &["m2"])]));
    d.on_link_up(now, &key("m1", "a"), d.epoch_of(&key("m1", "a")), 10);
    d.on_link_up(now, &key("m2", "b"), d.epoch_of(&key("m2", "b")), 10);
    d.on_publish(now, 7, "t", None, &groups(&["a", "b"]), true);
    let acts = d.on_ack(now, &key("m1", "a"), d.epoch_of(&key("m1", "a")), 1, &[]);
    assert!(!acts.contains(&Action::Confirmed(7)));
    let acts = d.on_ack(now, &key("m2", "b"), d.epoch_of(&key("m2", "b")), 1, &[]);
    assert!(acts.contains(&Action::Confirmed(7)));
}

#[test]
fn group_without_members_keeps_messages_waiting() {
    let now = Instant::now();
    let mut d = Dispatcher::new(Duration::from_secs(30));
    d.on_route(now, &route("t", &[("g", &["m1"])]));
    d.on_publish(now, 1, "t", None, &groups(&["g"]), false);
    d.on_route(now, &route("t", &[]));
    assert_eq!(d.backlog()[0].waiting, 1);
    d.on_route(now, &route("t", &[("g", &["m9"])]));
    d.on_link_up(now, &key("m9", "g"), d.epoch_of(&key("m9", "g")), 5);
    assert_eq!(
        d.take_outgoing(&key("m9", "g"), d.epoch_of(&key("m9", "g")))
            .len(),
        1
    );
}

#[test]
fn a_stale_link_task_cannot_touch_its_successor() {
    let now = Instant::now();
    let mut d = Dispatcher::new(Duration::from_secs(30));
    d.on_route(now, &route("t", &[("g", &["m1"])]));
    let old = d.epoch_of(&key("m1", "g"));
    // The member leaves the route and comes back: a new link, a new epoch.
    d.on_route(now, &route("t", &[("g", &[])]));
    d.on_route(now, &route("t", &[("g", &["m1"])]));
    let new = d.epoch_of(&key("m1", "g"));
    assert_ne!(old, new);
    d.on_link_up(now, &key("m1", "g"), new, 10);
    d.on_publish(now, 1, "t", None, &groups(&["g"]), false);
    assert_eq!(d.take_outgoing(&key("m1", "g"), new).len(), 1);
    // The old task's stream finally fails, and its late ack of link seq 1 arrives:
    // neither requeues nor settles the new link's message.
    assert!(d.on_link_down(now, &key("m1", "g"), old).is_empty());
    assert!(d.on_ack(now, &key("m1", "g"), old, 1, &[]).is_empty());
    assert!(d.on_link_up(now, &key("m1", "g"), old, 10).is_empty());
    assert_eq!(d.backlog()[0].in_flight, 1);
    let acts = d.on_ack(now, &key("m1", "g"), new, 1, &[]);
    assert!(acts.contains(&Action::Settle {
        seqs: vec![1],
        group: "g".into()
    }));
}

/// Group `g` of `m1` and `m2` on topic `t`, only m1's link up: messages 1–3 carry a key
/// that rendezvous hashing gives to m2 once both members are up, so they went to m1.
fn keyed_to_m2_while_only_m1_is_up() -> (Instant, Dispatcher, LinkKey, LinkKey, u64) {
    let now = Instant::now();
    let mut d = Dispatcher::new(Duration::from_secs(30));
    d.on_route(now, &route("t", &[("g", &["m1", "m2"])]));
    let (k1, k2) = (key("m1", "g"), key("m2", "g"));
    let hash = (0..)
        .find(|h| rendezvous(*h, &[&k1, &k2]) == 1)
        .expect("some key maps to m2");
    d.on_link_up(now, &k1, d.epoch_of(&k1), 100);
    for seq in 1..=3 {
        d.on_publish(now, seq, "t", Some(hash), &groups(&["g"]), false);
    }
    (now, d, k1, k2, hash)
}

#[test]
fn a_key_moving_to_a_new_member_waits_for_its_in_flight_messages() {
    let (now, mut d, k1, k2, hash) = keyed_to_m2_while_only_m1_is_up();
    assert_eq!(d.take_outgoing(&k1, d.epoch_of(&k1)).len(), 3);
    // m2 comes up: the key now belongs to m2, but 1..=3 are still in flight on m1.
    d.on_link_up(now, &k2, d.epoch_of(&k2), 100);
    for seq in 4..=5 {
        d.on_publish(now, seq, "t", Some(hash), &groups(&["g"]), false);
    }
    assert!(d.take_outgoing(&k2, d.epoch_of(&k2)).is_empty());
    // Unkeyed messages are not held by the fence.
    d.on_publish(now, 6, "t", None, &groups(&["g"]), false);
    let sent: usize = [&k1, &k2]
        .iter()
        .map(|k| d.take_outgoing(k, d.epoch_of(k)).len())
        .sum();
    assert_eq!(sent, 1);
    d.on_ack(now, &k1, d.epoch_of(&k1), 3, &[]);
    let moved: Vec<Seq> = d
        .take_outgoing(&k2, d.epoch_of(&k2))
        .into_iter()
        .map(|x| x.1)
        .collect();
    assert_eq!(moved, vec![4, 5]);
}

#[test]
fn a_requeued_key_goes_first_to_its_new_member() {
    let (now, mut d, k1, k2, hash) = keyed_to_m2_while_only_m1_is_up();
    d.take_outgoing(&k1, d.epoch_of(&k1));
    d.on_link_up(now, &k2, d.epoch_of(&k2), 100);
    d.on_publish(now, 4, "t", Some(hash), &groups(&["g"]), false);
    // m1 fails: its in-flight messages come back and go to m2 before 4.
    d.on_link_down(now, &k1, d.epoch_of(&k1));
    let moved: Vec<Seq> = d
        .take_outgoing(&k2, d.epoch_of(&k2))
        .into_iter()
        .map(|x| x.1)
        .collect();
    assert_eq!(moved, vec![1, 2, 3, 4]);
}

#[test]
fn link_keys_are_equal_and_hash_alike_exactly_when_their_names_are() {
    use std::hash::BuildHasher;
    let hasher = rustc_hash::FxBuildHasher;
    let a = LinkKey::new("m", "t", "g");
    assert_eq!(a, LinkKey::new("m", "t", "g"));
    assert_eq!(
        hasher.hash_one(&a),
        hasher.hash_one(LinkKey::new("m", "t", "g"))
    );
    // The same letters split differently, or swapped between the names.
    assert_ne!(a, LinkKey::new("m", "tg", ""));
    assert_ne!(a, LinkKey::new("g", "t", "m"));
}

/// A dispatcher whose route of `t` has one group `g` of one member `m1`, its link up
/// with a window of 100.
fn one_member_up() -> (Instant, Dispatcher, LinkKey) {
    let now = Instant::now();
    let mut d = Dispatcher::new(Duration::from_secs(30));
    d.on_route(now, &route("t", &[("g", &["m1"])]));
    let k = key("m1", "g");
    d.on_link_up(now, &k, d.epoch_of(&k), 100);
    (now, d, k)
}

/// The sequence numbers the current link of `k` takes.
fn taken(d: &mut Dispatcher, k: &LinkKey) -> Vec<Seq> {
    let epoch = d.epoch_of(k);
    d.take_outgoing(k, epoch).into_iter().map(|x| x.1).collect()
}

#[test]
fn publishes_before_a_take_are_pumped_by_the_take_with_one_wake() {
    let (now, mut d, k) = one_member_up();
    let first = d.on_publish(now, 1, "t", None, &groups(&["g"]), false);
    assert_eq!(first, vec![Action::Wake(d.epoch_of(&k))]);
    for seq in 2..=50 {
        let acts = d.on_publish(now, seq, "t", None, &groups(&["g"]), false);
        assert!(acts.is_empty(), "the woken link pumps them: {acts:?}");
    }
    let backlog = d.backlog();
    assert_eq!(
        (backlog[0].waiting, backlog[0].in_flight),
        (49, 1),
        "one pump so far"
    );
    assert_eq!(taken(&mut d, &k), (1..=50).collect::<Vec<_>>());
    // Taken: the next publish pumps (and wakes) at once again.
    let acts = d.on_publish(now, 51, "t", None, &groups(&["g"]), false);
    assert_eq!(acts, vec![Action::Wake(d.epoch_of(&k))]);
    let backlog = d.backlog();
    assert_eq!((backlog[0].waiting, backlog[0].in_flight), (0, 51));
}

#[test]
fn messages_left_for_a_take_are_requeued_when_that_link_goes_down_first() {
    let (now, mut d, k) = one_member_up();
    let first_epoch = d.epoch_of(&k);
    // Message 1 goes to the link, which is woken; 2..=10 wait for its take.
    assert_eq!(
        d.on_publish(now, 1, "t", None, &groups(&["g"]), false),
        vec![Action::Wake(first_epoch)]
    );
    for seq in 2..=10 {
        assert!(d
            .on_publish(now, seq, "t", None, &groups(&["g"]), false)
            .is_empty());
    }
    // The take never comes: the link goes down, and a new one (a new epoch, as the
    // link task's successor) comes up and gets all ten, in order.
    d.on_link_down(now, &k, first_epoch);
    assert!(d.take_outgoing(&k, first_epoch).is_empty());
    let acts = d.on_route(now, &route("t", &[("g", &[])]));
    assert!(acts.contains(&Action::CloseLink(first_epoch)));
    d.on_route(now, &route("t", &[("g", &["m1"])]));
    let second_epoch = d.epoch_of(&k);
    assert_ne!(second_epoch, first_epoch);
    let acts = d.on_link_up(now, &k, second_epoch, 100);
    assert_eq!(acts, vec![Action::Wake(second_epoch)]);
    assert_eq!(taken(&mut d, &k), (1..=10).collect::<Vec<_>>());
}

#[test]
fn with_several_live_members_every_publish_is_placed_at_once() {
    let now = Instant::now();
    let mut d = Dispatcher::new(Duration::from_secs(30));
    d.on_route(now, &route("t", &[("g", &["m1", "m2"])]));
    let (k1, k2) = (key("m1", "g"), key("m2", "g"));
    d.on_link_up(now, &k1, d.epoch_of(&k1), 100);
    d.on_link_up(now, &k2, d.epoch_of(&k2), 100);
    // Unkeyed messages go to the member with the most free credit (a tie to the
    // first). m1 is busy writing message 1 (woken, not taken): message 2 goes to m2
    // at once instead of waiting for m1's take.
    let acts = d.on_publish(now, 1, "t", None, &groups(&["g"]), false);
    assert_eq!(acts, vec![Action::Wake(d.epoch_of(&k1))]);
    let acts = d.on_publish(now, 2, "t", None, &groups(&["g"]), false);
    assert_eq!(acts, vec![Action::Wake(d.epoch_of(&k2))]);
    for seq in 3..=20 {
        d.on_publish(now, seq, "t", None, &groups(&["g"]), false);
    }
    let backlog = d.backlog();
    assert_eq!((backlog[0].waiting, backlog[0].in_flight), (0, 20));
    let (a, b) = (
        d.take_outgoing(&k1, d.epoch_of(&k1)),
        d.take_outgoing(&k2, d.epoch_of(&k2)),
    );
    assert_eq!((a.len(), b.len()), (10, 10), "shared by free credit");
}

#[test]
fn queue_ids_name_one_queue_per_topic_and_group_for_good() {
    let now = Instant::now();
    let mut d = Dispatcher::new(Duration::from_secs(30));
    let ab: Vec<QueueId> = d.queue_ids("t", &groups(&["a", "b"])).collect();
    assert_ne!(ab[0], ab[1]);
    let other: Vec<QueueId> = d.queue_ids("u", &groups(&["a"])).collect();
    assert!(!ab.contains(&other[0]), "another topic's group a");
    // The route comes after the ids were taken: they still name its queues.
    d.on_route(now, &route("t", &[("a", &["m1"]), ("b", &["m2"])]));
    let again: Vec<QueueId> = d.queue_ids("t", &groups(&["b", "a"])).collect();
    assert_eq!(again, vec![ab[1], ab[0]]);
    for k in [key("m1", "a"), key("m2", "b")] {
        d.on_link_up(now, &k, d.epoch_of(&k), 10);
    }
    d.on_publish_queued(now, 1, &[None], &ab[..1], false);
    d.on_publish_queued(now, 2, &[None, None], &ab, false);
    let taken = |d: &mut Dispatcher, k: &LinkKey| -> Vec<Seq> {
        d.take_outgoing(k, d.epoch_of(k))
            .into_iter()
            .map(|x| x.1)
            .collect()
    };
    assert_eq!(taken(&mut d, &key("m1", "a")), vec![1, 2, 3]);
    assert_eq!(taken(&mut d, &key("m2", "b")), vec![2, 3]);
    assert_eq!(d.backlog().len(), 3, "t/a, t/b and u/a");
}
