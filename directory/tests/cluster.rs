//! The directory as a gossip cluster: three in-process nodes over real UDP (gossip) and
//! QUIC (peers) on 127.0.0.1.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use weft_directory::signed::{GossipSigner, CERT_KEY};
use weft_directory::{Directory, GossipTuning, PeerRecord, Route};
use weft_proto::certs;
use weft_proto::tls::{self, Credentials};
use weft_proto::wire::{
    self, DirRequest, DirResponse, Frame, FrameReader, FrameWriter, Hello, Role, Subscription,
    DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};

const CLUSTER: &str = "test-cluster";
const GRACE: Duration = Duration::from_millis(300);
/// Generous: failure detection is ~2 s; CI machines are slow.
const DEADLINE: Duration = Duration::from_secs(20);

fn localhost0() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// How long a dead node's registrations stay in routes in these tests (the default, 15 s,
/// covers a real peer's failover; the tests only need it to be observable).
const DEAD_NODE_ROUTE_GRACE: Duration = Duration::from_secs(3);

async fn start_node(ca: &Path, name: &str, seeds: Vec<SocketAddr>) -> Directory {
    Directory::builder(name)
        .listen(localhost0())
        .dev(ca)
        .grace_period(GRACE)
        .cluster_id(CLUSTER)
        .gossip(localhost0(), seeds)
        .gossip_tuning(GossipTuning {
            dead_node_route_grace: DEAD_NODE_ROUTE_GRACE,
            ..GossipTuning::default()
        })
        .start()
        .await
        .expect("start directory node")
}

async fn three_nodes(ca: &Path) -> Vec<Directory> {
    let n1 = start_node(ca, "dir-1", vec![]).await;
    let seed = n1.gossip_addr().expect("gossip addr");
    let n2 = start_node(ca, "dir-2", vec![seed]).await;
    let n3 = start_node(ca, "dir-3", vec![seed]).await;
    let nodes = vec![n1, n2, n3];
    wait_until("all three nodes see each other", || {
        nodes.iter().all(|n| n.live_nodes().len() == 3)
    })
    .await;
    nodes
}

/// Polls `cond` until it holds or [`DEADLINE`] passes (then panics with `what`).
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Prints each node's counts of rejected and accepted gossip values.
fn print_gossip_counts(nodes: &[Directory]) {
    for n in nodes {
        eprintln!(
            "{}: rejected {} accepted {}",
            n.name(),
            n.rejected_gossip_values(),
            n.accepted_gossip_values()
        );
    }
}

/// Checks that every node lists exactly the three real nodes as live: a forged node never
/// appears, however live chitchat considers it.
fn assert_only_real_nodes_listed(nodes: &[Directory]) {
    let real = vec![
        "dir-1".to_string(),
        "dir-2".to_string(),
        "dir-3".to_string(),
    ];
    for n in nodes {
        assert_eq!(n.live_nodes(), real, "live nodes of {}", n.name());
    }
}

fn members(route: &Route) -> Vec<String> {
    let mut m: Vec<String> = route
        .groups
        .iter()
        .flat_map(|g| g.members.iter().map(|m| m.identity.clone()))
        .collect();
    m.sort();
    m
}

/// A minimal peer speaking the wire protocol.
struct TestPeer {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    writer: FrameWriter,
    reader: FrameReader,
    next_id: u64,
}

impl TestPeer {
    async fn attach(ca: &Path, name: &str, directory: SocketAddr) -> TestPeer {
        let paths = certs::ensure_dev(ca, name, &[]).expect("peer certificate");
        let creds = Credentials::from_paths(&paths).expect("credentials");
        let endpoint = tls::endpoint(localhost0(), &creds).expect("endpoint");
        let conn = tls::connect(&endpoint, directory, weft_proto::DIRECTORY_IDENTITY)
            .await
            .expect("connect");
        let (send, recv) = conn.open_bi().await.expect("stream");
        let mut writer = FrameWriter::new(send, DEFAULT_MAX_FRAME);
        let mut reader = FrameReader::new(recv, DEFAULT_MAX_FRAME);
        let hello = Hello {
            version: PROTOCOL_VERSION,
            identity: name.to_string(),
            incarnation: 1,
            role: Role::Peer,
            listen_addrs: vec!["127.0.0.1:9999".parse().expect("addr")],
            zone: None,
        };
        wire::open_handshake(&mut writer, &mut reader, &hello)
            .await
            .expect("handshake");
        TestPeer {
            _endpoint: endpoint,
            conn,
            writer,
            reader,
            next_id: 1,
        }
    }

    async fn request(&mut self, body: DirRequest) -> DirResponse {
        let id = self.next_id;
        self.next_id += 1;
        self.writer
            .send(&Frame::Request { id, body })
            .await
            .expect("send");
        loop {
            match self.reader.next().await.expect("read").expect("open") {
                Frame::Response { id: got, body } if got == id => return body,
                Frame::RouteChanged(_) => {}
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    async fn register(&mut self, topic: &str, group: &str) {
        let body = self
            .request(DirRequest::Register(Subscription {
                topic: topic.into(),
                group: group.into(),
            }))
            .await;
        assert_eq!(body, DirResponse::Ok);
    }

    fn close(self) {
        self.conn.close(0u32.into(), b"bye");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_replicates_and_expires_everywhere() {
    let ca = tempfile::tempdir().expect("tmp");
    let nodes = three_nodes(ca.path()).await;
    let mut peer = TestPeer::attach(ca.path(), "svc-a", nodes[0].local_addr()).await;
    peer.register("orders", "billing").await;

    let took = wait_until("svc-a is visible on every node", || {
        nodes
            .iter()
            .all(|n| members(&n.route("orders")) == vec!["svc-a".to_string()])
    })
    .await;
    eprintln!("replicated to all nodes in {took:?}");

    // Through the wire protocol too: a second peer resolving on node 3.
    let mut other = TestPeer::attach(ca.path(), "svc-b", nodes[2].local_addr()).await;
    match other
        .request(DirRequest::Resolve {
            topic: "orders".into(),
        })
        .await
    {
        DirResponse::Route(r) => assert_eq!(members(&r), vec!["svc-a".to_string()]),
        other => panic!("unexpected {other:?}"),
    }

    peer.close();
    let took = wait_until("svc-a is gone from every node", || {
        nodes.iter().all(|n| n.route("orders").groups.is_empty())
    })
    .await;
    eprintln!("removed everywhere {took:?} after disconnect (grace {GRACE:?})");
    assert!(took >= GRACE, "removed before the grace period ended");
    for n in &nodes {
        assert_eq!(
            n.rejected_gossip_values(),
            0,
            "{} rejected values",
            n.name()
        );
    }
    other.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_takes_its_registrations_with_it() {
    let ca = tempfile::tempdir().expect("tmp");
    let mut nodes = three_nodes(ca.path()).await;
    let mut on_1 = TestPeer::attach(ca.path(), "svc-1", nodes[0].local_addr()).await;
    on_1.register("t", "g").await;
    let mut on_3 = TestPeer::attach(ca.path(), "svc-3", nodes[2].local_addr()).await;
    on_3.register("t", "g").await;
    wait_until("both peers visible everywhere", || {
        nodes.iter().all(|n| members(&n.route("t")).len() == 2)
    })
    .await;

    // Node 3 dies; its peer stays connected to it (a dead node's peers re-register
    // elsewhere in real life), so only failure detection removes it.
    let dead = nodes.pop().expect("node 3");
    let t0 = Instant::now();
    dead.shutdown().await;
    wait_until("nodes 1 and 2 declare node 3 dead", || {
        nodes
            .iter()
            .all(|n| !n.live_nodes().contains(&"dir-3".to_string()))
    })
    .await;
    // Within the dead-node route grace its peers stay routable (they would be failing
    // over to another node now)...
    let declared = t0.elapsed();
    if declared + Duration::from_millis(500) < DEAD_NODE_ROUTE_GRACE {
        for n in &nodes {
            assert_eq!(
                members(&n.route("t")).len(),
                2,
                "svc-3 dropped during the grace"
            );
        }
    }
    // ...and then they go.
    wait_until("svc-3 is gone from nodes 1 and 2", || {
        nodes
            .iter()
            .all(|n| members(&n.route("t")) == vec!["svc-1".to_string()])
    })
    .await;
    let removed = t0.elapsed();
    eprintln!("node 3 declared dead after {declared:?}, its peers removed after {removed:?}");
    assert!(
        removed >= DEAD_NODE_ROUTE_GRACE,
        "removed before the dead-node route grace"
    );
    drop(on_3);
    on_1.close();
}

fn fake_record(identity: &str) -> PeerRecord {
    PeerRecord {
        identity: identity.into(),
        incarnation: 99,
        addrs: vec!["10.6.6.6:666".parse().expect("addr")],
        zone: None,
        subscriptions: [Subscription {
            topic: "orders".into(),
            group: "billing".into(),
        }]
        .into_iter()
        .collect(),
    }
}

async fn forged_node(
    name: &str,
    seed: SocketAddr,
    keys: Vec<(String, String)>,
) -> chitchat::ChitchatHandle {
    let listen = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port");
    let config = chitchat::ChitchatConfig {
        chitchat_id: chitchat::ChitchatId::new(name, 1, listen),
        cluster_id: CLUSTER.into(),
        gossip_interval: Duration::from_millis(100),
        listen_addr: listen,
        seed_nodes: vec![seed.to_string()],
        failure_detector_config: chitchat::FailureDetectorConfig {
            initial_interval: Duration::from_millis(100),
            ..Default::default()
        },
        marked_for_deletion_grace_period: Duration::from_secs(60),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: chitchat::ProtocolVersion::V0,
    };
    chitchat::spawn_chitchat(config, keys, &chitchat::transport::UdpTransport)
        .await
        .expect("forged chitchat")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_gossip_changes_no_route_and_is_counted() {
    let ca = tempfile::tempdir().expect("tmp");
    let foreign_ca = tempfile::tempdir().expect("tmp");
    let nodes = three_nodes(ca.path()).await;
    let seed = nodes[0].gossip_addr().expect("gossip");
    let mut real = TestPeer::attach(ca.path(), "svc-real", nodes[1].local_addr()).await;
    real.register("orders", "billing").await;
    wait_until("the real peer is visible everywhere", || {
        nodes
            .iter()
            .all(|n| members(&n.route("orders")) == vec!["svc-real".to_string()])
    })
    .await;

    // 1. No credentials at all: an unsigned record.
    let unsigned = base64::engine::general_purpose::STANDARD_NO_PAD
        .encode(rmp_serde::to_vec(&fake_record("evil")).expect("encode"));
    let plain = forged_node("evil-node", seed, vec![("p:evil".into(), unsigned)]).await;

    // 2. A directory certificate from a foreign CA, values properly signed with its key.
    let paths = certs::ensure_dev(
        foreign_ca.path(),
        "dir-evil",
        &[weft_proto::DIRECTORY_IDENTITY],
    )
    .expect("foreign certs");
    let cert = std::fs::read_to_string(&paths.cert).expect("cert");
    let key = std::fs::read_to_string(&paths.key).expect("key");
    let mut signer = GossipSigner::from_pem(&cert, &key, CLUSTER, "dir-evil", 1).expect("signer");
    let body = rmp_serde::to_vec(&fake_record("evil2")).expect("encode");
    let signed = signer.sign("p:evil2", &body).expect("sign");
    let id = signer.sign("id", &1u64.to_be_bytes()).expect("sign");
    let foreign = forged_node(
        "dir-evil",
        seed,
        vec![
            (CERT_KEY.into(), cert),
            ("id".into(), id),
            ("p:evil2".into(), signed),
        ],
    )
    .await;

    // 3. Impersonation: a node claiming to be dir-2 (newer generation) with dir-2's real,
    // public certificate but without its key.
    let dir2_cert =
        std::fs::read_to_string(ca.path().join("dir-2.pem")).expect("dir-2 certificate");
    let unsigned3 = base64::engine::general_purpose::STANDARD_NO_PAD
        .encode(rmp_serde::to_vec(&fake_record("evil3")).expect("encode"));
    let impostor = {
        let listen = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("free port");
        let mut config = chitchat::ChitchatConfig {
            chitchat_id: chitchat::ChitchatId::new("dir-2", u64::MAX / 2, listen),
            cluster_id: CLUSTER.into(),
            gossip_interval: Duration::from_millis(100),
            listen_addr: listen,
            seed_nodes: vec![seed.to_string()],
            failure_detector_config: Default::default(),
            marked_for_deletion_grace_period: Duration::from_secs(60),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        config.failure_detector_config.initial_interval = Duration::from_millis(100);
        chitchat::spawn_chitchat(
            config,
            vec![(CERT_KEY.into(), dir2_cert), ("p:evil3".into(), unsigned3)],
            &chitchat::transport::UdpTransport,
        )
        .await
        .expect("impostor")
    };

    // Every real node counts the forged values as rejected: evil, evil2, evil3 (dir-2
    // itself ignores the namespace that claims its own name, so it counts two). Meanwhile
    // no forged node is ever listed as a live directory node.
    wait_until("every node rejected the forged values", || {
        assert_only_real_nodes_listed(&nodes);
        nodes[0].rejected_gossip_values() >= 3
            && nodes[1].rejected_gossip_values() >= 2
            && nodes[2].rejected_gossip_values() >= 3
    })
    .await;
    // ...and after a few more gossip rounds still serves only the real peer and lists only
    // the real nodes. (A bounded "nothing changed" window: there is no event to wait for
    // when the point is that nothing happens.)
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(1) {
        assert_only_real_nodes_listed(&nodes);
        for n in &nodes {
            assert_eq!(
                members(&n.route("orders")),
                vec!["svc-real".to_string()],
                "route changed on {}",
                n.name()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    print_gossip_counts(&nodes);
    plain.abort();
    foreign.abort();
    impostor.abort();
    real.close();
}

/// A forger without credentials learns dir-2's chitchat state by gossip, then gossips it
/// back as dir-2's (same node id and generation, dir-2's own `cert` and `id` values) with
/// a tombstone for dir-2's `p:svc-real` key at a higher version. chitchat accepts that
/// (deletions are not signed); the directory must not drop the route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_deletion_removes_no_route_and_is_counted() {
    let ca = tempfile::tempdir().expect("tmp");
    let nodes = three_nodes(ca.path()).await;
    let seed = nodes[0].gossip_addr().expect("gossip");
    let mut real = TestPeer::attach(ca.path(), "svc-real", nodes[1].local_addr()).await;
    real.register("orders", "billing").await;
    let everywhere = || {
        nodes
            .iter()
            .all(|n| members(&n.route("orders")) == vec!["svc-real".to_string()])
    };
    wait_until("the real peer is visible everywhere", everywhere).await;
    for n in &nodes {
        assert_eq!(
            n.rejected_gossip_values(),
            0,
            "{} rejected values",
            n.name()
        );
    }

    // The forger joins as a plain chitchat node and waits for dir-2's state.
    let forger = forged_node("evil-deleter", seed, vec![]).await;
    let chitchat = forger.chitchat();
    let start = Instant::now();
    let dir2 = loop {
        let found = {
            let cc = chitchat.lock().await;
            cc.node_states()
                .iter()
                .find(|(id, state)| &*id.node_id == "dir-2" && state.get("p:svc-real").is_some())
                .map(|(id, _)| id.clone())
        };
        if let Some(id) = found {
            break id;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the forger never learnt dir-2's state"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Rewrite dir-2's namespace in the forger's view: everything as dir-2 published it
    // (its certificate, generation proof and signed values), except a tombstone for
    // p:svc-real at a version far above dir-2's. Gossip carries it to every node.
    {
        let mut cc = chitchat.lock().await;
        let state = cc.node_state(&dir2).expect("dir-2 state");
        assert!(
            state.get(CERT_KEY).is_some(),
            "dir-2's certificate is copied"
        );
        let forged_version = state.max_version() + 1_000;
        let last_gc = state.last_gc_version();
        let key_values: Vec<(String, chitchat::VersionedValue)> = state
            .key_values_including_deleted()
            .map(|(key, value)| {
                let value = if key == "p:svc-real" {
                    chitchat::VersionedValue {
                        value: String::new(),
                        version: forged_version,
                        status: chitchat::DeletionStatus::Deleted(tokio::time::Instant::now()),
                    }
                } else {
                    value.clone()
                };
                (key.to_string(), value)
            })
            .collect();
        cc.reset_node_state_if_update(&dir2, key_values.into_iter(), forged_version, last_gc);
        let state = cc.node_state(&dir2).expect("dir-2 state");
        assert!(
            state.get("p:svc-real").is_none(),
            "the forged tombstone is in place"
        );
        assert_eq!(state.max_version(), forged_version);
    }

    // dir-1 and dir-3 receive the tombstone and refuse it (dir-2 ignores its own
    // namespace as gossiped by others).
    wait_until("dir-1 and dir-3 refused the forged deletion", || {
        assert_only_real_nodes_listed(&nodes);
        assert!(everywhere(), "a forged deletion removed a route");
        nodes[0].rejected_gossip_values() >= 1 && nodes[2].rejected_gossip_values() >= 1
    })
    .await;
    // A few more gossip rounds: still there everywhere. (A bounded "nothing changed"
    // window: there is no event to wait for when the point is that nothing happens.)
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(1) {
        assert_only_real_nodes_listed(&nodes);
        assert!(everywhere(), "a forged deletion removed a route");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    print_gossip_counts(&nodes);

    // The real removal (signed) still goes through.
    let rejected: Vec<u64> = nodes.iter().map(|n| n.rejected_gossip_values()).collect();
    real.close();
    wait_until("svc-real is gone from every node", || {
        nodes.iter().all(|n| n.route("orders").groups.is_empty())
    })
    .await;
    let after: Vec<u64> = nodes.iter().map(|n| n.rejected_gossip_values()).collect();
    assert_eq!(after, rejected, "the signed removal was refused somewhere");
    forger.abort();
}

#[tokio::test]
async fn single_node_mode_still_works() {
    let ca = tempfile::tempdir().expect("tmp");
    let node = Directory::builder("solo")
        .listen(localhost0())
        .dev(ca.path())
        .start()
        .await
        .expect("start");
    assert_eq!(node.gossip_addr(), None);
    let mut peer = TestPeer::attach(ca.path(), "svc", node.local_addr()).await;
    peer.register("t", "g").await;
    assert_eq!(members(&node.route("t")), vec!["svc".to_string()]);
    peer.close();
    node.shutdown().await;
}

#[tokio::test]
async fn gossip_requires_the_certificate_name() {
    let ca = tempfile::tempdir().expect("tmp");
    let paths =
        certs::ensure_dev(ca.path(), "dir-x", &[weft_proto::DIRECTORY_IDENTITY]).expect("certs");
    let err = Directory::builder("dir-y")
        .listen(localhost0())
        .tls_files(&paths.ca, &paths.cert, &paths.key)
        .gossip(localhost0(), vec![])
        .start()
        .await
        .err()
        .expect("must refuse");
    assert!(err.to_string().contains("certificate identity"), "{err}");
}
