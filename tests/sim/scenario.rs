//! One seeded simulation run: a directory node, two senders and three receivers (group
//! `g1` with two members, group `g2` with one) on turmoil's simulated network, under
//! seeded loss, latency, a partition, a receiver crash (optionally a directory crash);
//! then the invariants.
//!
//! Everything random in a run derives from its seed: turmoil's RNG (loss and latency
//! draws), the fault plan (what, when, how long), every QUIC endpoint's RNG, every
//! peer's incarnation, reconnect jitter and producer id. See `docs/simulation.md`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::mem::ManuallyDrop;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use weft_directory::Directory;
use weft_peer::{Message, MessageId, Peer};

use crate::creds::{creds, SimCreds};
use crate::udp::SimUdpSocket;

/// The topic every sender publishes to.
pub const TOPIC: &str = "numbers";
/// Credit window of every subscription: the most messages a sender has in flight to one
/// member, hence the most a member can have processed without the sender knowing.
pub const CREDIT: u32 = 32;
/// Sender ack timeout (shorter than the default, so that partitions exercise it).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
const DIR: &str = "dir";
const SENDERS: [&str; 2] = ["s1", "s2"];
/// (member, group).
const RECEIVERS: [(&str, &str); 3] = [("g1-a", "g1"), ("g1-b", "g1"), ("g2-a", "g2")];
const GROUPS: [&str; 2] = ["g1", "g2"];
const PEER_PORT: u16 = 7000;
const DIR_PORT: u16 = 7400;
/// Longest simulated processing time of one delivery before the application acks it.
const PROCESSING_MS: u64 = 3;
/// Distinct keys per sender.
const KEYS: u64 = 8;
/// Simulated time after the last expected delivery during which the run goes on, to
/// catch late duplicates.
const SETTLE: Duration = Duration::from_secs(2);
/// Longest simulated time allowed after publishing ended for everything to arrive.
const MAX_DRAIN: Duration = Duration::from_secs(60);

/// Knobs a run takes from the environment (see `docs/simulation.md`).
#[derive(Debug, Clone)]
pub struct Options {
    /// Messages each sender publishes.
    pub messages: u64,
    /// Whether the plan may crash and restart the directory node.
    pub directory_crash: bool,
    /// Whether the plan has partitions and crashes at all (loss and latency always).
    pub faults: bool,
    /// Overrides the seeded loss rate.
    pub loss: Option<f64>,
}

/// What a seed makes of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The seed.
    pub seed: u64,
    /// turmoil `fail_rate`: per datagram, the probability that its link breaks, dropping
    /// it and everything then in flight on that link; the next datagram repairs it.
    pub loss: f64,
    /// Latency is uniform-ish (turmoil's exponential curve) in 1..=this many ms.
    pub max_latency_ms: u64,
    /// Messages per sender.
    pub messages: u64,
    /// Simulated time between two publishes of one sender.
    pub interval: Duration,
    /// When the senders start publishing (if the route is complete by then).
    pub publish_at: Duration,
    /// (receiver, senders cut off from it, from, for).
    pub partition: Option<(&'static str, Vec<&'static str>, Duration, Duration)>,
    /// (receiver, crash at, restart after).
    pub crash: Option<(&'static str, Duration, Duration)>,
    /// (crash at, restart after) of the directory node.
    pub directory_crash: Option<(Duration, Duration)>,
}

fn ms(range: std::ops::Range<u64>, rng: &mut impl Rng) -> Duration {
    Duration::from_millis(rng.random_range(range))
}

impl Plan {
    /// The plan of `seed`.
    pub fn new(seed: u64, opts: &Options) -> Plan {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x7765_6674_2d73_696d);
        let loss = rng.random_range(0.0..0.05);
        let loss = opts.loss.unwrap_or(loss);
        let max_latency_ms = rng.random_range(1..=5);
        let interval = ms(2..9, &mut rng);
        let publish_at = Duration::from_millis(1500);
        let window = interval * opts.messages as u32;
        let within = |rng: &mut rand::rngs::StdRng, lo: f64, hi: f64| {
            publish_at + window.mul_f64(rng.random_range(lo..hi))
        };
        let partition = (opts.faults && rng.random_bool(0.8)).then(|| {
            let target = RECEIVERS[rng.random_range(0..RECEIVERS.len())].0;
            let senders = if rng.random_bool(0.5) {
                SENDERS.to_vec()
            } else {
                vec![SENDERS[rng.random_range(0..SENDERS.len())]]
            };
            let at = within(&mut rng, 0.05, 0.8);
            (target, senders, at, ms(500..4000, &mut rng))
        });
        let crash = (opts.faults && rng.random_bool(0.8)).then(|| {
            let target = RECEIVERS[rng.random_range(0..RECEIVERS.len())].0;
            let at = within(&mut rng, 0.1, 0.9);
            (target, at, ms(200..3000, &mut rng))
        });
        let directory_crash = (opts.directory_crash && rng.random_bool(0.3)).then(|| {
            let at = within(&mut rng, 0.1, 0.9);
            (at, ms(200..3000, &mut rng))
        });
        Plan {
            seed,
            loss,
            max_latency_ms,
            messages: opts.messages,
            interval,
            publish_at,
            partition,
            crash,
            directory_crash,
        }
    }

    /// One line describing the plan.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "loss {:.2}%, latency 1-{} ms, {} msgs/sender every {:?} from {:?}",
            self.loss * 100.0,
            self.max_latency_ms,
            self.messages,
            self.interval,
            self.publish_at
        );
        if let Some((target, senders, at, dur)) = &self.partition {
            let _ = write!(s, "; partition {senders:?}|{target} at {at:?} for {dur:?}");
        }
        if let Some((target, at, down)) = &self.crash {
            let _ = write!(s, "; crash {target} at {at:?} for {down:?}");
        }
        if let Some((at, down)) = &self.directory_crash {
            let _ = write!(s, "; crash {DIR} at {at:?} for {down:?}");
        }
        s
    }
}

/// A publish that returned `Ok`.
#[derive(Debug, Clone)]
pub struct Published {
    /// Sender.
    pub sender: String,
    /// Its number in the sender's stream.
    pub n: u64,
    /// Message id from the receipt.
    pub id: MessageId,
    /// Groups of the route the publish used.
    pub groups: Vec<String>,
    /// Simulated time of the return, ms.
    pub at_ms: u64,
}

/// One message handed to a subscriber's application.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// Receiving member.
    pub member: String,
    /// How many times the member's process had started (1 = first run).
    pub incarnation: u32,
    /// Group.
    pub group: String,
    /// Sender named in the payload.
    pub sender: String,
    /// Number named in the payload.
    pub n: u64,
    /// Ordering key.
    pub key: String,
    /// Message id.
    pub id: MessageId,
    /// Simulated time, ms.
    pub at_ms: u64,
}

#[derive(Default)]
struct Shared {
    published: RefCell<Vec<Published>>,
    failed_publishes: RefCell<Vec<String>>,
    deliveries: RefCell<Vec<Delivered>>,
    /// id → groups it reached.
    reached: RefCell<BTreeMap<MessageId, BTreeSet<String>>>,
    starts: RefCell<BTreeMap<String, u32>>,
    senders_done: Cell<usize>,
}

/// What a run produced and what the invariants found.
pub struct Outcome {
    /// The plan.
    pub plan: Plan,
    /// Successful publishes.
    pub published: Vec<Published>,
    /// Deliveries in order.
    pub deliveries: Vec<Delivered>,
    /// Publishes that returned an error.
    pub failed_publishes: Vec<String>,
    /// Simulated time the run took.
    pub sim_time: Duration,
    /// Wall-clock time the run took.
    pub wall_time: Duration,
    /// Hash of the ordered delivery and publish logs with their simulated times.
    pub trace_hash: u64,
    /// Duplicate deliveries per group.
    pub duplicates: BTreeMap<String, usize>,
    /// Broken invariants (empty: the run passed).
    pub violations: Vec<String>,
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Seed of a host's process: differs per host and per restart, like a fresh process.
fn host_seed(seed: u64, name: &str, start: u32) -> u64 {
    mix(seed ^ mix(name_hash(name) ^ u64::from(start)))
}

fn sim_ms() -> u64 {
    turmoil::sim_elapsed().unwrap_or_default().as_millis() as u64
}

fn all_creds() -> &'static SimCreds {
    let mut nodes: Vec<(&str, &[&str])> = vec![(DIR, &[weft_proto::DIRECTORY_IDENTITY])];
    nodes.extend(SENDERS.iter().map(|s| (*s, &[][..])));
    nodes.extend(RECEIVERS.iter().map(|(r, _)| (*r, &[][..])));
    creds(&nodes)
}

fn directory_addr() -> SocketAddr {
    SocketAddr::new(turmoil::lookup(DIR), DIR_PORT)
}

/// Counts a start of `name`'s process and returns its number (1 = first).
fn count_start(shared: &Shared, name: &str) -> u32 {
    let mut starts = shared.starts.borrow_mut();
    let n = starts.entry(name.to_string()).or_default();
    *n += 1;
    *n
}

async fn start_peer(
    seed: u64,
    name: &str,
    start: u32,
    data_dir: &Path,
) -> Result<Peer, Box<dyn std::error::Error>> {
    // A producer id from the seed instead of the OS (the outbox keeps an existing one).
    let outbox = data_dir.join("outbox");
    std::fs::create_dir_all(&outbox)?;
    let producer = outbox.join("producer");
    if !producer.exists() {
        let id = mix(seed ^ name_hash(name) ^ 0x7072_6f64).max(1);
        std::fs::write(&producer, format!("{id:016x}\n"))?;
    }
    let socket = SimUdpSocket::bind(name, PEER_PORT).await?;
    let peer = Peer::builder(name)
        .directory([directory_addr()])
        .data_dir(data_dir)
        .credentials(all_creds().get(name))
        .udp_socket(socket)
        .rng_seed(host_seed(seed, name, start))
        // Later runs of a host must have higher incarnations (the default derives them
        // from the wall clock, which a replay does not reproduce).
        .incarnation(((u64::from(start) + 1) << 32) | (host_seed(seed, name, start) >> 32))
        .ack_timeout(ACK_TIMEOUT)
        .directory_timeout(Duration::from_secs(30))
        // Disk work must not finish on other threads at wall-clock-dependent moments.
        .blocking_io(true)
        .start()
        .await?;
    Ok(peer)
}

async fn directory_host(seed: u64, shared: Rc<Shared>) -> turmoil::Result {
    let start = count_start(&shared, DIR);
    let socket = SimUdpSocket::bind(DIR, DIR_PORT).await?;
    let _directory = Directory::builder(DIR)
        .credentials(all_creds().get(DIR))
        .udp_socket(socket)
        .rng_seed(host_seed(seed, DIR, start))
        .start()
        .await?;
    std::future::pending::<()>().await;
    Ok(())
}

async fn receiver_host(
    seed: u64,
    shared: Rc<Shared>,
    name: &'static str,
    group: &'static str,
    data_dir: PathBuf,
) -> turmoil::Result {
    let start = count_start(&shared, name);
    let peer = start_peer(seed, name, start, &data_dir).await?;
    let mut app_rng = rand::rngs::StdRng::seed_from_u64(host_seed(seed, name, start) ^ 0x617070);
    let sub = loop {
        match peer
            .subscribe(TOPIC)
            .group(group)
            .credit(CREDIT)
            .start()
            .await
        {
            Ok(sub) => break sub,
            Err(e) => {
                eprintln!("{name}: subscribe failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // A crash must not run the subscription's drop (it saves dedup state): keep it
    // from being dropped, as a killed process would.
    let mut sub = ManuallyDrop::new(sub);
    while let Some(d) = sub.recv().await {
        let text = std::str::from_utf8(d.payload())?.to_string();
        let (sender, n) = text.split_once(' ').ok_or("malformed payload")?;
        let delivered = Delivered {
            member: name.to_string(),
            incarnation: start,
            group: group.to_string(),
            sender: sender.to_string(),
            n: n.parse()?,
            key: d.key().unwrap_or_default().to_string(),
            id: d.id(),
            at_ms: sim_ms(),
        };
        shared
            .reached
            .borrow_mut()
            .entry(delivered.id)
            .or_default()
            .insert(group.to_string());
        shared.deliveries.borrow_mut().push(delivered);
        // Processing takes 0..=PROCESSING_MS (seeded); a crash meanwhile leaves
        // processed-but-unacknowledged messages, the source of duplicates.
        tokio::time::sleep(Duration::from_millis(
            app_rng.random_range(0..=PROCESSING_MS),
        ))
        .await;
        d.ack();
    }
    Ok(())
}

async fn sender_host(
    seed: u64,
    shared: Rc<Shared>,
    name: &'static str,
    plan: Plan,
    data_dir: PathBuf,
) -> turmoil::Result {
    let start = count_start(&shared, name);
    let peer = start_peer(seed, name, start, &data_dir).await?;
    // Start from a complete route: every receiver registered.
    loop {
        if let Ok(route) = peer.route(TOPIC).await {
            let members: usize = route.groups.iter().map(|g| g.members.len()).sum();
            if members == RECEIVERS.len() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let now = turmoil::sim_elapsed().unwrap_or_default();
    if now < plan.publish_at {
        tokio::time::sleep(plan.publish_at - now).await;
    }
    for n in 0..plan.messages {
        let key = format!("{name}-k{}", n % KEYS);
        // The cached route, read in the same poll as `publish` reads it: its groups are
        // the message's targets.
        let groups: Vec<String> = match peer.route(TOPIC).await {
            Ok(route) => route.groups.iter().map(|g| g.group.clone()).collect(),
            Err(_) => Vec::new(),
        };
        let message = Message::new(format!("{name} {n}")).key(key);
        match peer.publish(TOPIC, message).await {
            Ok(receipt) => shared.published.borrow_mut().push(Published {
                sender: name.to_string(),
                n,
                id: receipt.id,
                groups,
                at_ms: sim_ms(),
            }),
            Err(e) => shared
                .failed_publishes
                .borrow_mut()
                .push(format!("{name} {n}: {e}")),
        }
        tokio::time::sleep(plan.interval).await;
    }
    shared.senders_done.set(shared.senders_done.get() + 1);
    std::future::pending::<()>().await;
    Ok(())
}

enum Event {
    Partition(&'static str, Vec<&'static str>),
    Repair(&'static str, Vec<&'static str>),
    Crash(&'static str),
    Restart(&'static str),
}

/// Runs the simulation of `seed` and checks the invariants.
pub fn run(seed: u64, opts: &Options) -> Outcome {
    let plan = Plan::new(seed, opts);
    if std::env::var("WEFT_SIM_DUMP").is_ok() {
        crate::udp::PACKETS.with(|p| *p.borrow_mut() = Some(Vec::new()));
    }
    let wall = Instant::now();
    let root = tempfile::tempdir().expect("tempdir");
    let shared = Rc::new(Shared::default());
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(plan.max_latency_ms))
        .fail_rate(plan.loss)
        .repair_rate(1.0)
        .udp_capacity(4096)
        .simulation_duration(Duration::from_secs(3600))
        .build();

    {
        let shared = shared.clone();
        sim.host(DIR, move || directory_host(seed, shared.clone()));
    }
    for (name, group) in RECEIVERS {
        let shared = shared.clone();
        let dir = root.path().join(name);
        sim.host(name, move || {
            receiver_host(seed, shared.clone(), name, group, dir.clone())
        });
    }
    for name in SENDERS {
        let shared = shared.clone();
        let dir = root.path().join(name);
        let plan = plan.clone();
        sim.host(name, move || {
            sender_host(seed, shared.clone(), name, plan.clone(), dir.clone())
        });
    }

    let mut events: Vec<(Duration, Event)> = Vec::new();
    if let Some((target, senders, at, dur)) = &plan.partition {
        events.push((*at, Event::Partition(target, senders.clone())));
        events.push((*at + *dur, Event::Repair(target, senders.clone())));
    }
    if let Some((target, at, down)) = &plan.crash {
        events.push((*at, Event::Crash(target)));
        events.push((*at + *down, Event::Restart(target)));
    }
    if let Some((at, down)) = &plan.directory_crash {
        events.push((*at, Event::Crash(DIR)));
        events.push((*at + *down, Event::Restart(DIR)));
    }
    events.sort_by_key(|(t, _)| *t);
    let mut events = events.into_iter().peekable();

    let mut violations = Vec::new();
    let publish_end = plan.publish_at + plan.interval * plan.messages as u32;
    let deadline = publish_end + MAX_DRAIN;
    let mut settled_at: Option<Duration> = None;
    let mut steps = 0u64;
    loop {
        let now = sim.elapsed();
        while let Some((_, event)) = events.next_if(|(t, _)| *t <= now) {
            match event {
                Event::Partition(target, senders) => {
                    for s in senders {
                        sim.partition(s, target);
                    }
                }
                Event::Repair(target, senders) => {
                    for s in senders {
                        sim.repair(s, target);
                    }
                }
                Event::Crash(host) => sim.crash(host),
                Event::Restart(host) => sim.bounce(host),
            }
        }
        if let Err(e) = sim.step() {
            violations.push(format!("host software failed: {e}"));
            break;
        }
        steps += 1;
        if steps.is_multiple_of(50) {
            if settled_at.is_none()
                && events.peek().is_none()
                && shared.senders_done.get() == SENDERS.len()
                && everything_reached(&shared)
            {
                settled_at = Some(now);
            }
            if settled_at.is_some_and(|t| now >= t + SETTLE) {
                break;
            }
            if now > deadline {
                break;
            }
        }
    }
    let sim_time = sim.elapsed();
    drop(sim);

    let published = shared.published.borrow().clone();
    let deliveries = shared.deliveries.borrow().clone();
    let failed_publishes = shared.failed_publishes.borrow().clone();
    let crashes: BTreeMap<&str, usize> =
        plan.crash.iter().map(|(target, ..)| (*target, 1)).collect();
    let Checked {
        violations: mut found,
        duplicates,
    } = check(&published, &deliveries, &crashes);
    violations.append(&mut found);
    if shared.senders_done.get() != SENDERS.len() {
        violations.push(format!(
            "senders did not finish publishing within {sim_time:?} of simulated time"
        ));
    }
    let trace_hash = trace_hash(&published, &deliveries);
    if let (Ok(dir), Some(packets)) = (
        std::env::var("WEFT_SIM_DUMP"),
        crate::udp::PACKETS.with(|p| p.borrow_mut().take()),
    ) {
        let path = Path::new(&dir).join(format!("packets-{trace_hash:016x}.txt"));
        let _ = std::fs::write(path, packets.join("\n"));
    }
    Outcome {
        plan,
        published,
        deliveries,
        failed_publishes,
        sim_time,
        wall_time: wall.elapsed(),
        trace_hash,
        duplicates,
        violations,
    }
}

/// Whether every successful publish reached every group of its route.
fn everything_reached(shared: &Shared) -> bool {
    let reached = shared.reached.borrow();
    shared.published.borrow().iter().all(|p| {
        reached
            .get(&p.id)
            .is_some_and(|groups| p.groups.iter().all(|g| groups.contains(g)))
    })
}

/// The invariants. Returns the violations and the duplicate count per group.
///
/// 1. No loss: every publish that returned `Ok` reached every group of the route it was
///    published with (its targets) at least once; and that route listed every group
///    (both groups are durable subscribers that never unsubscribe).
/// 2. Per-key order: within one incarnation of a member (between its crashes), the
///    numbers of each (sender, key) are strictly increasing, through partitions, crashes
///    of other members and membership changes (the sender's key fence). No incarnation
///    of a member is handed the same message twice (dedup). Across a crash of a member
///    its numbers may restart lower (redeliveries).
/// 3. Bounded duplicates: per group, deliveries beyond the first of each message are at
///    most `CREDIT × senders × crashes of the group's members` (what can be in flight,
///    unacknowledged at the sender, on the links into a member when it dies). Without a
///    crash: none.
/// 4. Nothing unknown: every delivery is a message some publish returned.
fn check(
    published: &[Published],
    deliveries: &[Delivered],
    crashes: &BTreeMap<&str, usize>,
) -> Checked {
    let mut violations = Vec::new();
    let mut reached: BTreeMap<MessageId, BTreeMap<&str, usize>> = BTreeMap::new();
    for d in deliveries {
        *reached
            .entry(d.id)
            .or_default()
            .entry(d.group.as_str())
            .or_default() += 1;
    }
    // 1. No loss.
    let mut lost: Vec<String> = Vec::new();
    let mut narrowed: Vec<String> = Vec::new();
    for p in published {
        for g in &p.groups {
            if !reached
                .get(&p.id)
                .is_some_and(|r| r.contains_key(g.as_str()))
            {
                lost.push(format!("{} {} → {g}", p.sender, p.n));
            }
        }
        let missing: Vec<&str> = GROUPS
            .iter()
            .copied()
            .filter(|g| !p.groups.iter().any(|x| x == g))
            .collect();
        if !missing.is_empty() {
            narrowed.push(format!("{} {} (no {missing:?})", p.sender, p.n));
        }
    }
    if !lost.is_empty() {
        violations.push(format!(
            "{} published messages never reached a target group, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        ));
    }
    if !narrowed.is_empty() {
        violations.push(format!(
            "{} messages were published with a route missing a subscribed group, e.g. {:?}",
            narrowed.len(),
            &narrowed[..narrowed.len().min(5)]
        ));
    }
    // 2. Per-key order within an incarnation.
    let mut last: BTreeMap<(&str, u32, &str, &str), u64> = BTreeMap::new();
    let mut seen: BTreeSet<(&str, u32, MessageId)> = BTreeSet::new();
    let mut disorder = Vec::new();
    let mut twice = Vec::new();
    for d in deliveries {
        if !seen.insert((d.member.as_str(), d.incarnation, d.id)) {
            twice.push(format!(
                "{} (run {}) got {} {} twice",
                d.member, d.incarnation, d.sender, d.n
            ));
        }
        let k = (
            d.member.as_str(),
            d.incarnation,
            d.sender.as_str(),
            d.key.as_str(),
        );
        if let Some(prev) = last.get(&k) {
            if d.n <= *prev {
                disorder.push(format!(
                    "{} (run {}) got {} {} after {} (key {})",
                    d.member, d.incarnation, d.sender, d.n, prev, d.key
                ));
            }
        }
        last.insert(k, d.n);
    }
    if !twice.is_empty() {
        violations.push(format!(
            "{} messages handed twice to one run of a member, e.g. {:?}",
            twice.len(),
            &twice[..twice.len().min(5)]
        ));
    }
    if !disorder.is_empty() {
        violations.push(format!(
            "{} per-key order violations, e.g. {:?}",
            disorder.len(),
            &disorder[..disorder.len().min(5)]
        ));
    }
    // 3. Bounded duplicates.
    let mut duplicates = BTreeMap::new();
    for g in GROUPS {
        let dups: usize = reached
            .values()
            .filter_map(|r| r.get(g))
            .map(|n| n - 1)
            .sum();
        let crashed: usize = RECEIVERS
            .iter()
            .filter(|(_, group)| *group == g)
            .map(|(m, _)| crashes.get(m).copied().unwrap_or(0))
            .sum();
        let bound = CREDIT as usize * SENDERS.len() * crashed;
        if dups > bound {
            violations.push(format!(
                "group {g}: {dups} duplicate deliveries, more than the bound {bound} \
                 ({CREDIT} credit × {} senders × {crashed} member crashes)",
                SENDERS.len()
            ));
        }
        duplicates.insert(g.to_string(), dups);
    }
    // 4. Nothing unknown.
    let known: BTreeSet<MessageId> = published.iter().map(|p| p.id).collect();
    let unknown = deliveries.iter().filter(|d| !known.contains(&d.id)).count();
    if unknown > 0 {
        violations.push(format!(
            "{unknown} deliveries of messages no publish returned"
        ));
    }
    Checked {
        violations,
        duplicates,
    }
}

/// What [`check`] found.
struct Checked {
    violations: Vec<String>,
    duplicates: BTreeMap<String, usize>,
}

/// FNV-1a over the ordered logs, simulated times included: equal hashes mean the runs
/// delivered the same messages to the same members at the same simulated times.
fn trace_hash(published: &[Published], deliveries: &[Delivered]) -> u64 {
    let mut text = String::new();
    for p in published {
        let _ = writeln!(text, "P {} {} {:?} {}", p.sender, p.n, p.groups, p.at_ms);
    }
    for d in deliveries {
        let _ = writeln!(
            text,
            "D {} {} {} {} {} {}",
            d.member, d.incarnation, d.sender, d.n, d.key, d.at_ms
        );
    }
    if let Ok(dir) = std::env::var("WEFT_SIM_DUMP") {
        let path = Path::new(&dir).join(format!("trace-{:016x}.txt", name_hash(&text)));
        if let Err(e) = std::fs::write(&path, &text) {
            eprintln!("cannot write {}: {e}", path.display());
        }
    }
    name_hash(&text)
}
