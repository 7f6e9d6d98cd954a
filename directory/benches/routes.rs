//! Micro-benchmarks of the directory's route table (`weft_directory::RouteTable`, the
//! sans-IO state machine behind `resolve` and `watch`): resolving a topic, and applying a
//! registration update. Run with `cargo bench -p weft-directory --bench routes`.
//!
//! Two layouts of the same size, 1,000 topics × 3 groups × 5 members:
//! * `dedicated`: every member is its own peer subscribed to one topic (15,000 peers);
//! * `shared`: 15 peers (3 groups × 5 members), each subscribed to all 1,000 topics in
//!   its group, as a small service fleet handling many topics would register.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::collections::BTreeSet;
use std::hint::black_box;
use weft_directory::{PeerRecord, RouteTable};
use weft_proto::wire::Subscription;

const TOPICS: usize = 1_000;
const GROUPS: usize = 3;
const MEMBERS: usize = 5;
const SOURCE: &str = "local";

fn topic(t: usize) -> String {
    format!("topic.{t:04}")
}

fn record(identity: String, incarnation: u64, subscriptions: BTreeSet<Subscription>) -> PeerRecord {
    let port = 10_000 + (incarnation % 50_000) as u16;
    PeerRecord {
        identity,
        incarnation,
        addrs: vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))],
        zone: None,
        subscriptions,
    }
}

fn subs(topics: impl IntoIterator<Item = usize>, group: usize) -> BTreeSet<Subscription> {
    topics
        .into_iter()
        .map(|t| Subscription {
            topic: topic(t),
            group: format!("group-{group}"),
        })
        .collect()
}

/// Every (topic, group, member) is a peer of its own.
fn dedicated() -> (RouteTable, PeerRecord) {
    let mut table = RouteTable::new();
    let mut last = None;
    for t in 0..TOPICS {
        for g in 0..GROUPS {
            for m in 0..MEMBERS {
                let r = record(format!("peer-{t}-{g}-{m}"), 1, subs([t], g));
                last = Some(r.clone());
                table.upsert(SOURCE, r);
            }
        }
    }
    (table, last.expect("at least one record"))
}

/// 15 peers, each subscribed to every topic in its group.
fn shared() -> (RouteTable, PeerRecord) {
    let mut table = RouteTable::new();
    let mut last = None;
    for g in 0..GROUPS {
        for m in 0..MEMBERS {
            let r = record(format!("peer-{g}-{m}"), 1, subs(0..TOPICS, g));
            last = Some(r.clone());
            table.upsert(SOURCE, r);
        }
    }
    (table, last.expect("at least one record"))
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_lookup_1000x3x5");
    g.throughput(Throughput::Elements(1));
    for (name, (table, _)) in [("dedicated", dedicated()), ("shared", shared())] {
        let sample = table.route(&topic(TOPICS / 2));
        assert_eq!(sample.groups.len(), GROUPS);
        assert!(sample.groups.iter().all(|g| g.members.len() == MEMBERS));
        let topics: Vec<String> = (0..TOPICS).map(topic).collect();
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 7) % TOPICS;
                black_box(table.route(black_box(&topics[i])))
            })
        });
    }
    g.finish();
}

fn update(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_update_1000x3x5");
    g.throughput(Throughput::Elements(1));
    // A member re-registers with a new incarnation (it restarted): its topics' routes
    // change, their versions move and every watcher of them hears it (one watcher per
    // topic here).
    for (name, (mut table, template)) in [("dedicated", dedicated()), ("shared", shared())] {
        for t in 0..TOPICS {
            table.watch(t as u64, &topic(t));
        }
        // One update changes the route of every topic of the record, for its watcher.
        let mut incarnation = template.incarnation + 1;
        let changes = table.upsert(
            SOURCE,
            PeerRecord {
                incarnation,
                ..template.clone()
            },
        );
        assert_eq!(changes.len(), template.subscriptions.len());
        if name == "shared" {
            // Hundreds of milliseconds per update on a 2-core VM: keep the run short.
            g.sample_size(10);
        }
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    incarnation += 1;
                    PeerRecord {
                        incarnation,
                        ..template.clone()
                    }
                },
                |r| black_box(table.upsert(SOURCE, r)),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, lookup, update);
criterion_main!(benches);
