//! Tests of the outbox with real files.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;

use super::segment::{self, Scanned};
use super::*;

fn g(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// `e` is a `NeverFits` for `(messages, max_messages, memory)` whose message says
/// `says`.
fn assert_never_fits(e: &OutboxError, (n, max, in_memory): (u64, u64, bool), says: &str) {
    assert!(
        matches!(
            e,
            OutboxError::NeverFits { messages, max_messages, memory, .. }
                if *messages == n && *max_messages == max && *memory == in_memory
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains(says), "{e}");
}

fn cfg(dir: &Path) -> OutboxConfig {
    OutboxConfig::new(dir)
}

async fn append_disk(o: &Outbox, targets: &[&str], body: &'static [u8]) -> u64 {
    o.append(
        g(targets),
        Bytes::from_static(body),
        Durability::Disk,
        WhenFull::Fail,
    )
    .await
    .unwrap()
}

/// An outbox in a fresh directory whose body cache holds `cache_bytes`.
async fn open_with_cache(cache_bytes: usize) -> (tempfile::TempDir, Outbox) {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.cache_bytes = cache_bytes;
    let (o, _) = Outbox::open(c).await.unwrap();
    (tmp, o)
}

/// Appends `count` disk messages for group "a", the `i`-th of ten bytes `i`.
async fn append_numbered(o: &Outbox, count: u8) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in 0..count {
        let body = Bytes::from(vec![i; 10]);
        let seq = o.append(g(&["a"]), body, Durability::Disk, WhenFull::Fail);
        seqs.push(seq.await.unwrap());
    }
    seqs
}

fn segments(dir: &Path) -> Vec<u64> {
    segment::list(dir).unwrap()
}

#[tokio::test]
async fn unsorted_targets_are_stored_sorted_and_merged_and_a_shared_list_is_taken_as_is() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, _) = Outbox::open(cfg(tmp.path())).await.unwrap();
    let messy = append_disk(&o, &["b", "a", "b"], b"messy").await;
    let route: Arc<[String]> = g(&["a", "c"]).into();
    let shared = o
        .append(
            route.clone(),
            Bytes::from_static(b"shared"),
            Durability::Disk,
            WhenFull::Fail,
        )
        .await
        .unwrap();
    o.settle(shared, "a");
    o.close().await.unwrap();
    drop(o);
    let (_, rec) = Outbox::open(cfg(tmp.path())).await.unwrap();
    let unsettled: Vec<_> = rec
        .pending
        .iter()
        .map(|p| (p.seq, p.unsettled.clone()))
        .collect();
    assert_eq!(
        unsettled,
        vec![(messy, g(&["a", "b"])), (shared, g(&["c"]))]
    );
    assert_eq!(&*route, &g(&["a", "c"])[..]);
}

#[tokio::test]
async fn append_read_settle_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, rec) = Outbox::open(cfg(tmp.path())).await.unwrap();
    assert!(rec.pending.is_empty() && rec.damage.is_empty());
    let pid = o.producer_id();
    let s1 = append_disk(&o, &["a", "b"], b"one").await;
    let s2 = append_disk(&o, &["a"], b"two").await;
    let s3 = o
        .append(
            g(&["a"]),
            Bytes::from_static(b"mem"),
            Durability::Memory,
            WhenFull::Fail,
        )
        .await
        .unwrap();
    let s4 = o
        .append(
            vec![],
            Bytes::from_static(b"nobody"),
            Durability::Disk,
            WhenFull::Fail,
        )
        .await
        .unwrap();
    assert!(s1 < s2 && s2 < s3 && s3 < s4);
    assert_eq!(o.read(s1).await.unwrap().as_deref(), Some(&b"one"[..]));
    assert_eq!(o.read(s3).await.unwrap().as_deref(), Some(&b"mem"[..]));
    assert_eq!(o.read(s4).await.unwrap(), None);
    let st = o.stats();
    assert_eq!(st.pending_messages, 3);
    assert_eq!(
        st.groups
            .iter()
            .map(|g| (g.group.as_str(), g.pending))
            .collect::<Vec<_>>(),
        vec![("a", 3), ("b", 1)]
    );
    o.settle(s1, "a");
    o.settle(s1, "a");
    o.settle(s2, "a");
    assert_eq!(o.read(s2).await.unwrap(), None);
    o.close().await.unwrap();
    assert!(matches!(
        o.append(g(&["a"]), Bytes::new(), Durability::Disk, WhenFull::Fail)
            .await,
        Err(OutboxError::Closed)
    ));
    drop(o);

    let (o, rec) = Outbox::open(cfg(tmp.path())).await.unwrap();
    assert_eq!(o.producer_id(), pid);
    assert!(rec.damage.is_empty());
    assert_eq!(rec.pending.len(), 1);
    assert_eq!(rec.pending[0].seq, s1);
    assert_eq!(rec.pending[0].unsettled, g(&["b"]));
    assert_eq!(rec.pending[0].body, Bytes::from_static(b"one"));
    let s5 = append_disk(&o, &["a"], b"five").await;
    assert!(s5 > s4);
    assert_eq!(
        o.read(s1).await.unwrap().as_deref(),
        Some(&b"one"[..]),
        "read from disk after reopen"
    );
    o.close().await.unwrap();
}

#[tokio::test]
async fn read_falls_back_to_disk() {
    let (_dir, o) = open_with_cache(16).await;
    let seqs = append_numbered(&o, 20).await;
    assert!(o.stats().cache_bytes <= 16);
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(
            o.read(*s).await.unwrap(),
            Some(Bytes::from(vec![i as u8; 10]))
        );
    }
    // All at once (as the link sends a backlog): read back together, settled ones
    // missing.
    o.settle_many(&[seqs[3], seqs[4]], "a");
    let bodies = o.read_many(&seqs).await.unwrap();
    for (i, body) in bodies.into_iter().enumerate() {
        let expected = (i != 3 && i != 4).then(|| Bytes::from(vec![i as u8; 10]));
        assert_eq!(body, expected, "message {i}");
    }
}

/// Disk messages whose bodies are still cached are handed out under the lock like
/// `Memory` ones (no read, no reference count); once one of them was evicted, or was
/// settled, the whole request falls back to `read_many`.
#[tokio::test]
async fn cached_disk_bodies_are_resident_until_evicted_or_settled() {
    let (_dir, o) = open_with_cache(30).await;
    let seqs = append_numbered(&o, 5).await;
    let copied = |seqs: &[u64]| {
        o.with_resident_bodies(seqs, |bodies| {
            bodies
                .map(|b| b.map(|r| r.head.to_vec()))
                .collect::<Vec<_>>()
        })
    };
    // The cache holds the last three bodies.
    let resident = copied(&seqs[2..]).expect("the last three are cached");
    for (i, body) in resident.into_iter().enumerate() {
        assert_eq!(body, Some(vec![i as u8 + 2; 10]));
    }
    assert!(copied(&seqs[1..]).is_none(), "the second one was evicted");
    assert_eq!(
        o.read_many(&seqs[1..2]).await.unwrap(),
        vec![Some(Bytes::from(vec![1u8; 10]))],
        "and is read from its segment"
    );
    o.settle(seqs[4], "a");
    assert!(copied(&seqs[4..]).is_none(), "settled: not handed out");
    assert_eq!(o.read_many(&seqs[4..]).await.unwrap(), vec![None]);
    o.close().await.unwrap();
}

#[tokio::test]
async fn torn_tail_is_truncated_and_appends_continue() {
    let tmp = tempfile::tempdir().unwrap();
    let mut seqs = Vec::new();
    {
        let (o, _) = Outbox::open(cfg(tmp.path())).await.unwrap();
        for _ in 0..10 {
            seqs.push(append_disk(&o, &["a"], b"0123456789abcdef").await);
        }
        o.close().await.unwrap();
    }
    let last = *segments(tmp.path()).last().unwrap();
    let path = segment::path(tmp.path(), last);
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    // Into the last message, before the End record (header and kind byte) after it.
    f.set_len(len - (record::FRAME_HEADER as u64 + 1) - 5)
        .unwrap();
    drop(f);

    let (o, rec) = Outbox::open(cfg(tmp.path())).await.unwrap();
    assert_eq!(
        rec.pending.iter().map(|p| p.seq).collect::<Vec<_>>(),
        seqs[..9].to_vec()
    );
    assert_eq!(rec.damage.len(), 1);
    assert_eq!(rec.damage[0].segment, path);
    assert!(
        rec.damage[0].reason.contains("torn tail"),
        "{:?}",
        rec.damage
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        rec.damage[0].offset,
        "truncated"
    );
    let s = append_disk(&o, &["a"], b"after").await;
    assert!(s > seqs[9]);
    o.close().await.unwrap();
    drop(o);
    let (_o, rec) = Outbox::open(cfg(tmp.path())).await.unwrap();
    assert!(rec.damage.is_empty());
    assert_eq!(rec.pending.len(), 10);
}

#[tokio::test]
async fn mid_segment_corruption_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let mut seqs = Vec::new();
    {
        let (o, _) = Outbox::open(cfg(tmp.path())).await.unwrap();
        for _ in 0..10 {
            seqs.push(append_disk(&o, &["a"], b"0123456789abcdef").await);
        }
        o.close().await.unwrap();
    }
    let last = *segments(tmp.path()).last().unwrap();
    let path = segment::path(tmp.path(), last);
    let mut data = std::fs::read(&path).unwrap();
    let msgs: Vec<u64> = segment::scan(&Bytes::from(data.clone()), last)
        .into_iter()
        .filter_map(|s| match s {
            Scanned::Record {
                offset,
                record: record::Record::Message { .. },
                ..
            } => Some(offset),
            _ => None,
        })
        .collect();
    assert_eq!(msgs.len(), 10);
    let k = 4;
    let at = msgs[k] as usize + record::FRAME_HEADER + 20;
    data[at] ^= 0xff;
    std::fs::write(&path, &data).unwrap();

    let (o, rec) = Outbox::open(cfg(tmp.path())).await.unwrap();
    let mut want = seqs.clone();
    want.remove(k);
    assert_eq!(rec.pending.iter().map(|p| p.seq).collect::<Vec<_>>(), want);
    assert_eq!(rec.damage.len(), 1);
    assert_eq!(rec.damage[0].offset, msgs[k]);
    assert_eq!(rec.damage[0].reason, "crc mismatch");
    assert!(append_disk(&o, &["a"], b"x").await > seqs[9]);
}

#[tokio::test]
async fn settled_segments_are_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.segment_bytes = 1024;
    let (o, _) = Outbox::open(c).await.unwrap();
    let mut seqs = Vec::new();
    for _ in 0..100 {
        seqs.push(append_disk(&o, &["a", "b"], &[7u8; 100]).await);
    }
    let before = o.stats().segments;
    assert!(before >= 8, "{before} segments");
    assert_eq!(segments(tmp.path()).len(), before);
    for s in &seqs {
        o.settle(*s, "a");
    }
    // Pending for b: nothing can go yet, except lease-only segments.
    let c1 = append_disk(&o, &["c"], b"pinned").await;
    let pinned = o.inner.shared.core().state.location(c1).unwrap().segment;
    for s in &seqs {
        o.settle(*s, "b");
    }
    // Push a few batches through so the rolls and deletions happen.
    for _ in 0..3 {
        let s = append_disk(&o, &["c"], &[1u8; 600]).await;
        o.settle(s, "c");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    o.close().await.unwrap();
    let left = segments(tmp.path());
    // Everything older than the segment pinned by the pending 'c' message is gone;
    // what remains is that segment, segments kept only because they hold settles for
    // its other messages (no live message of their own), and the active one.
    assert_eq!(left[0], pinned, "segments left: {left:?}");
    {
        let core = o.inner.shared.core();
        for id in &left[1..left.len() - 1] {
            assert_eq!(
                core.state.segment_live(*id),
                Some(0),
                "segments left: {left:?}"
            );
        }
    }
    assert_eq!(o.stats().segments, left.len());
    drop(o);
    let (o, rec) = Outbox::open(cfg(tmp.path())).await.unwrap();
    assert_eq!(rec.pending.len(), 1, "only the first 'c' message");
    o.settle(rec.pending[0].seq, "c");
    o.close().await.unwrap();
    drop(o);
    let (o, rec) = Outbox::open(cfg(tmp.path())).await.unwrap();
    assert!(rec.pending.is_empty());
    assert_eq!(o.stats().segments, 1);
    assert_eq!(segments(tmp.path()).len(), 1);
}

#[tokio::test]
async fn quota_fail_and_wait() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.max_messages = 3;
    c.max_bytes = 100;
    let (o, _) = Outbox::open(c).await.unwrap();
    let mut seqs = Vec::new();
    for _ in 0..3 {
        seqs.push(
            o.append(
                g(&["a"]),
                Bytes::from_static(b"x"),
                Durability::Memory,
                WhenFull::Fail,
            )
            .await
            .unwrap(),
        );
    }
    let e = o
        .append(
            g(&["a"]),
            Bytes::from_static(b"x"),
            Durability::Disk,
            WhenFull::Fail,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            OutboxError::Full {
                used_messages: 3,
                max_messages: 3,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("3/3 messages"));
    // Empty targets need no quota.
    o.append(
        vec![],
        Bytes::from_static(b"x"),
        Durability::Disk,
        WhenFull::Fail,
    )
    .await
    .unwrap();

    let o2 = o.clone();
    let waiter = tokio::spawn(async move {
        o2.append(
            g(&["a"]),
            Bytes::from_static(b"y"),
            Durability::Disk,
            WhenFull::Wait,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished());
    o.settle(seqs[0], "a");
    let s = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(s > seqs[2]);

    // Byte quota.
    o.settle(seqs[1], "a");
    o.settle(seqs[2], "a");
    o.settle(s, "a");
    o.append(
        g(&["a"]),
        Bytes::from(vec![0u8; 90]),
        Durability::Disk,
        WhenFull::Fail,
    )
    .await
    .unwrap();
    let e = o
        .append(
            g(&["a"]),
            Bytes::from(vec![0u8; 20]),
            Durability::Disk,
            WhenFull::Fail,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            OutboxError::Full {
                used_bytes: 90,
                max_bytes: 100,
                needed_bytes: 20,
                ..
            }
        ),
        "{e}"
    );
    let e = o
        .append(
            g(&["a"]),
            Bytes::from(vec![0u8; 101]),
            Durability::Disk,
            WhenFull::Wait,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            OutboxError::TooLarge {
                size: 101,
                limit: 100
            }
        ),
        "{e}"
    );

    // A waiter is released by close.
    let o2 = o.clone();
    let waiter = tokio::spawn(async move {
        o2.append(
            g(&["a"]),
            Bytes::from(vec![0u8; 50]),
            Durability::Disk,
            WhenFull::Wait,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    o.close().await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(r, Err(OutboxError::Closed)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_group_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, _) = Outbox::open(cfg(tmp.path())).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let o = o.clone();
        tasks.push(tokio::spawn(async move {
            let mut v = Vec::new();
            for i in 0..100 {
                let body = Bytes::from(format!("{t}-{i}"));
                v.push(
                    o.append(vec!["g".into()], body, Durability::Disk, WhenFull::Wait)
                        .await
                        .unwrap(),
                );
            }
            v
        }));
    }
    let mut all = HashSet::new();
    for t in tasks {
        for s in t.await.unwrap() {
            assert!(all.insert(s), "duplicate seq {s}");
        }
    }
    assert_eq!(all.len(), 1600);
    let st = o.stats();
    assert_eq!(st.appended, 1600);
    assert!(
        st.commits < 1600,
        "commits {} must cover several appends each",
        st.commits
    );
    println!("1600 appends in {} commits", st.commits);
}

/// One task driving many appends at once, through a writer channel of two slots: the
/// appends that find it full wait for a slot instead of failing, and every one lands.
#[tokio::test]
async fn appends_wait_for_a_full_writer_channel() {
    use futures::StreamExt;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.max_batch = 1;
    let (o, _) = Outbox::open(c).await.unwrap();
    let seqs: Vec<u64> = futures::stream::iter(0..300)
        .map(|i| {
            let o = o.clone();
            async move {
                let body = Bytes::from(format!("m{i}"));
                o.append(vec!["g".into()], body, Durability::Disk, WhenFull::Wait)
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(300)
        .collect()
        .await;
    let unique: HashSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), 300);
    assert_eq!(o.stats().appended, 300);
    assert_eq!(o.pending_messages(), 300);
}

#[tokio::test]
async fn second_open_is_locked_out() {
    let tmp = tempfile::tempdir().unwrap();
    let (_o, _) = Outbox::open(cfg(tmp.path())).await.unwrap();
    // Do not wait the full 5 s retry in the common case: this must fail eventually.
    let r = Outbox::open(cfg(tmp.path())).await;
    assert!(matches!(r, Err(OutboxError::Locked { .. })), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "throughput figure; run with --release -- --ignored --nocapture"]
async fn throughput() {
    let tmp =
        tempfile::tempdir_in(std::env::var("OUTBOX_BENCH_DIR").unwrap_or_else(|_| ".".into()))
            .unwrap();
    let (o, _) = Outbox::open(cfg(tmp.path())).await.unwrap();
    let total = 100_032usize; // a multiple of 64
    let tasks_n = 64usize;
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..tasks_n {
        let o = o.clone();
        tasks.push(tokio::spawn(async move {
            let body = Bytes::from(vec![0x5au8; 150]);
            for _ in 0..total / tasks_n {
                o.append(
                    vec!["g".into()],
                    body.clone(),
                    Durability::Disk,
                    WhenFull::Wait,
                )
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let el = start.elapsed();
    let st = o.stats();
    println!(
        "THROUGHPUT: {} disk appends of 150 B from {tasks_n} tasks in {:.3}s = {:.0} msgs/s, {} fdatasync commits ({:.1} msgs/commit)",
        st.appended,
        el.as_secs_f64(),
        st.appended as f64 / el.as_secs_f64(),
        st.commits,
        st.appended as f64 / st.commits as f64
    );
    o.close().await.unwrap();
}

// ---------------------------------------------------------------------------------
// Model-based property test.

#[derive(Debug, Clone)]
enum Op {
    Append {
        targets: Vec<u8>,
        disk: bool,
        body_len: usize,
    },
    Settle {
        pick: usize,
        group: u8,
    },
    Read {
        pick: usize,
    },
    Crash,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (proptest::collection::vec(0u8..3, 0..3), any::<bool>(), 0usize..200)
            .prop_map(|(targets, disk, body_len)| Op::Append { targets, disk, body_len }),
        4 => (any::<usize>(), 0u8..3).prop_map(|(pick, group)| Op::Settle { pick, group }),
        1 => any::<usize>().prop_map(|pick| Op::Read { pick }),
        1 => Just(Op::Crash),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug)]
struct ModelMsg {
    targets: BTreeSet<String>,
    settled: BTreeSet<String>,
    body: Bytes,
    disk: bool,
}

fn name(g: u8) -> String {
    format!("g{g}")
}

async fn run_model(ops: Vec<Op>) -> Result<u64, TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.segment_bytes = 2048;
    c.cache_bytes = 512;
    let (mut o, _) = Outbox::open(c.clone()).await.unwrap();
    let mut model: BTreeMap<u64, ModelMsg> = BTreeMap::new();
    let mut max_seq = 0u64;
    let mut reappeared = 0u64;
    let mut counter = 0u32;
    for op in ops {
        match op {
            Op::Append {
                targets,
                disk,
                body_len,
            } => {
                counter += 1;
                let mut body = format!("body-{counter}-").into_bytes();
                body.resize(body_len.max(body.len()), b'.');
                let body = Bytes::from(body);
                let targets: BTreeSet<String> = targets.into_iter().map(name).collect();
                let dur = if disk {
                    Durability::Disk
                } else {
                    Durability::Memory
                };
                let seq = o
                    .append(
                        targets.iter().cloned().collect::<Vec<_>>(),
                        body.clone(),
                        dur,
                        WhenFull::Fail,
                    )
                    .await
                    .unwrap();
                prop_assert!(seq > max_seq, "seq {} not above {}", seq, max_seq);
                max_seq = seq;
                if !targets.is_empty() {
                    model.insert(
                        seq,
                        ModelMsg {
                            targets,
                            settled: BTreeSet::new(),
                            body,
                            disk,
                        },
                    );
                }
            }
            Op::Settle { pick, group } => {
                if model.is_empty() {
                    continue;
                }
                let seq = *model.keys().nth(pick % model.len()).unwrap();
                let m = model.get_mut(&seq).unwrap();
                m.settled.insert(name(group));
                o.settle(seq, &name(group));
            }
            Op::Read { pick } => {
                if model.is_empty() {
                    continue;
                }
                let seq = *model.keys().nth(pick % model.len()).unwrap();
                let m = &model[&seq];
                let got = o.read(seq).await.unwrap();
                if m.targets.is_subset(&m.settled) {
                    prop_assert_eq!(got, None);
                } else {
                    prop_assert_eq!(got, Some(m.body.clone()));
                }
            }
            Op::Crash | Op::Reopen => {
                let clean = matches!(op, Op::Reopen);
                if clean {
                    o.close().await.unwrap();
                    drop(o);
                } else {
                    o.crash();
                }
                let (o2, rec) = Outbox::open(c.clone()).await.unwrap();
                o = o2;
                prop_assert!(rec.damage.is_empty(), "damage {:?}", rec.damage);
                let got: BTreeMap<u64, &PendingRecord> =
                    rec.pending.iter().map(|p| (p.seq, p)).collect();
                for (seq, m) in &model {
                    let expect: BTreeSet<String> =
                        m.targets.difference(&m.settled).cloned().collect();
                    match got.get(seq) {
                        None => {
                            prop_assert!(
                                !m.disk || expect.is_empty(),
                                "seq {} lost, expected {:?}",
                                seq,
                                expect
                            );
                        }
                        Some(p) => {
                            prop_assert!(m.disk, "memory message {} came back", seq);
                            prop_assert_eq!(&p.body, &m.body);
                            let un: BTreeSet<String> = p.unsettled.iter().cloned().collect();
                            prop_assert!(
                                un.is_subset(&m.targets),
                                "seq {}: {:?} not in {:?}",
                                seq,
                                un,
                                m.targets
                            );
                            prop_assert!(
                                expect.is_subset(&un),
                                "seq {}: {:?} lost from {:?}",
                                seq,
                                expect,
                                un
                            );
                            if un != expect {
                                prop_assert!(
                                    !clean,
                                    "clean close must flush settles (seq {})",
                                    seq
                                );
                                reappeared += 1;
                            }
                        }
                    }
                }
                for seq in got.keys() {
                    prop_assert!(model.contains_key(seq), "unknown seq {} recovered", seq);
                }
                model = rec
                    .pending
                    .iter()
                    .map(|p| {
                        (
                            p.seq,
                            ModelMsg {
                                targets: p.unsettled.iter().cloned().collect(),
                                settled: BTreeSet::new(),
                                body: p.body.clone(),
                                disk: true,
                            },
                        )
                    })
                    .collect();
                let st = o.stats();
                prop_assert_eq!(st.pending_messages, model.len() as u64);
            }
        }
    }
    o.close().await.unwrap();
    Ok(reappeared)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn model_append_settle_crash_reopen(ops in proptest::collection::vec(op(), 1..120)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let reappeared = rt.block_on(run_model(ops))?;
        // Settles are written lazily, so a few may be lost in a crash; that is allowed.
        if std::env::var_os("OUTBOX_MODEL_VERBOSE").is_some() { eprintln!("reappeared settled: {reappeared}"); }
    }
}

#[tokio::test]
async fn a_batch_gets_consecutive_seqs_one_commit_and_survives_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, _) = Outbox::open(cfg(tmp.path())).await.unwrap();
    let before = append_disk(&o, &["a"], b"before").await;
    let commits = o.stats().commits;
    let bodies: Vec<Bytes> = (0..100).map(|i| Bytes::from(format!("m{i}"))).collect();
    let seqs = o
        .submit_batch(
            &o.target_groups(g(&["a", "b"])).unwrap(),
            bodies,
            Durability::Disk,
            WhenFull::Fail,
        )
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(seqs, before + 1..before + 101);
    assert_eq!(o.stats().commits, commits + 1, "one group commit");
    assert_eq!(o.pending_messages(), 101);
    assert_eq!(o.read(before + 42).await.unwrap(), Some(Bytes::from("m41")));
    o.close().await.unwrap();
    drop(o);
    let (o, rec) = Outbox::open(cfg(tmp.path())).await.unwrap();
    let recovered: Vec<u64> = rec.pending.iter().map(|p| p.seq).collect();
    assert_eq!(recovered, (before..before + 101).collect::<Vec<_>>());
    assert_eq!(rec.pending[100].body, Bytes::from("m99"));
    assert_eq!(rec.pending[100].unsettled, g(&["a", "b"]));
    drop(o);
}

#[tokio::test]
async fn a_batch_reserves_quota_for_all_or_none() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.max_messages = 10;
    let (o, _) = Outbox::open(c).await.unwrap();
    let batch = |n: usize| (0..n).map(|_| Bytes::from_static(b"x")).collect::<Vec<_>>();
    o.submit_batch(
        &o.target_groups(g(&["a"])).unwrap(),
        batch(8),
        Durability::Memory,
        WhenFull::Fail,
    )
    .await
    .unwrap()
    .wait()
    .await
    .unwrap();
    // 3 more do not fit: nothing of the batch is stored.
    let e = o
        .submit_batch(
            &o.target_groups(g(&["a"])).unwrap(),
            batch(3),
            Durability::Memory,
            WhenFull::Fail,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, OutboxError::Full { .. }), "{e:?}");
    assert_eq!(o.pending_messages(), 8);
    // A batch larger than the whole quota fails even when the caller would wait, and
    // says that waiting cannot help.
    let e = o
        .submit_batch(
            &o.target_groups(g(&["a"])).unwrap(),
            batch(11),
            Durability::Memory,
            WhenFull::Wait,
        )
        .await
        .unwrap_err();
    assert_never_fits(&e, (11, 10, false), "can never fit the outbox quota");
    // An oversized body fails the whole batch before anything is reserved.
    let mut bodies = batch(1);
    bodies.push(Bytes::from(vec![0u8; record::MAX_BODY + 1]));
    let e = o
        .submit_batch(
            &o.target_groups(g(&["a"])).unwrap(),
            bodies,
            Durability::Disk,
            WhenFull::Fail,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, OutboxError::TooLarge { .. }), "{e:?}");
    assert_eq!(o.pending_messages(), 8);
}

#[tokio::test]
async fn memory_messages_are_bounded_apart_from_the_quota() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.max_memory_messages = 2;
    let (o, _) = Outbox::open(c).await.unwrap();
    let x = || Bytes::from_static(b"x");
    // Through the writer, then without it once the sequence lease is on disk.
    let first = o
        .append(g(&["a"]), x(), Durability::Memory, WhenFull::Fail)
        .await
        .unwrap();
    let second = o
        .append_memory(&g(&["a"]), x(), WhenFull::Fail)
        .await
        .unwrap()
        .expect("the lease covers it");
    assert_eq!(second, first + 1);
    assert_eq!(o.stats().memory_used_messages, 2);

    // Both paths refuse a third Memory message...
    let e = o
        .append_memory(&g(&["a"]), x(), WhenFull::Fail)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            OutboxError::MemoryFull {
                used_messages: 2,
                max_messages: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("max_memory_messages"), "{e}");
    let e = o
        .append(g(&["a"]), x(), Durability::Memory, WhenFull::Fail)
        .await
        .unwrap_err();
    assert!(matches!(e, OutboxError::MemoryFull { .. }), "{e}");
    // ...a Disk message still fits the quota...
    append_disk(&o, &["a"], b"d").await;

    // ...more Memory messages at once than the limit holds never fit, waiting or not...
    let targets = o.target_groups(g(&["a"])).unwrap();
    let mut three: MemoryRecords = smallvec::smallvec![x().into(), x().into(), x().into()];
    let e = o
        .append_memory_many(&targets, &mut three, WhenFull::Wait, 0)
        .await
        .unwrap_err();
    assert_never_fits(&e, (3, 2, true), "publish with Disk durability");
    assert_eq!(three.len(), 3, "nothing of a refused append is taken");

    // ...and a waiting one goes in once a Memory message is settled.
    let mut bodies: MemoryRecords = smallvec::smallvec![x().into()];
    let mut waiter = Box::pin(o.append_memory_many(&targets, &mut bodies, WhenFull::Wait, 0));
    assert!(futures::poll!(&mut waiter).is_pending(), "full: it waits");
    o.settle(first, "a");
    let seqs = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap()
        .expect("appended without the writer");
    assert_eq!(seqs.end - seqs.start, 1);
    assert_eq!(o.stats().memory_used_messages, 2);
    assert_eq!(o.stats().quota_used_messages, 3);
}

/// The synchronous attempt appends at once when there is room; when the memory limit
/// is full it appends nothing and, with `Wait`, returns the wait for room, which a
/// settle ends; with `Fail`, the error.
#[tokio::test]
async fn a_memory_append_attempt_appends_or_returns_the_wait_for_room() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.max_memory_messages = 1;
    let (o, _) = Outbox::open(c).await.unwrap();
    // The first append goes through the writer, which makes the sequence lease durable.
    let first = o
        .append(
            g(&["a"]),
            Bytes::from_static(b"x"),
            Durability::Memory,
            WhenFull::Fail,
        )
        .await
        .unwrap();
    let targets = o.target_groups(g(&["a"])).unwrap();
    let mut bodies: MemoryRecords = smallvec::smallvec![Bytes::from_static(b"y").into()];
    let e = o
        .try_append_memory_many(&targets, &mut bodies, WhenFull::Fail, 0)
        .unwrap_err();
    assert!(matches!(e, OutboxError::MemoryFull { .. }), "{e}");
    let room = match o
        .try_append_memory_many(&targets, &mut bodies, WhenFull::Wait, 0)
        .unwrap()
    {
        MemoryAppend::Full(room) => room,
        MemoryAppend::Done(done) => panic!("appended past the memory limit: {done:?}"),
    };
    assert_eq!(bodies.len(), 1, "nothing of a full attempt is taken");
    let mut room = Box::pin(room);
    assert!(futures::poll!(&mut room).is_pending(), "no room yet");
    o.settle(first, "a");
    tokio::time::timeout(Duration::from_secs(5), room)
        .await
        .expect("a settle frees room");
    match o
        .try_append_memory_many(&targets, &mut bodies, WhenFull::Wait, 0)
        .unwrap()
    {
        MemoryAppend::Done(Some(seqs)) => assert_eq!(seqs, first + 1..first + 2),
        other => panic!("not appended after the settle: {other:?}"),
    }
    assert!(bodies.is_empty(), "the appended body was taken");
}

/// A `Memory` record in two pieces is held as given: the link gets both pieces (the
/// tail is the very buffer appended), both count against the memory limit, and a read
/// that needs one piece gets them joined.
#[tokio::test]
async fn a_memory_record_in_two_pieces_is_kept_apart_and_read_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, _) = Outbox::open(cfg(tmp.path())).await.unwrap();
    let tail = Bytes::from(vec![7u8; 10_000]);
    let record = MemoryRecord {
        head: Bytes::from_static(b"head"),
        tail: Some(tail.clone()),
    };
    let seqs = o
        .append_memory_many(
            &o.target_groups(g(&["a"])).unwrap(),
            &mut smallvec::smallvec![record],
            WhenFull::Fail,
            0,
        )
        .await
        .unwrap()
        .expect("appended without the writer");
    let seq = seqs.start;
    assert_eq!(o.stats().memory_used_bytes, 10_004);
    let pieces = o
        .with_resident_bodies(&[seq], |mut bodies| {
            bodies
                .next()
                .flatten()
                .map(|r| (r.head.clone(), r.tail.cloned()))
        })
        .flatten()
        .expect("a memory body");
    assert_eq!(&pieces.0[..], b"head");
    let held = pieces.1.expect("a tail");
    assert_eq!(
        held.as_ptr(),
        tail.as_ptr(),
        "the appended buffer, not a copy"
    );
    let whole = o.read_many(&[seq]).await.unwrap().pop().flatten().unwrap();
    assert_eq!(whole.len(), 10_004);
    assert_eq!(&whole[..4], b"head");
    assert!(whole[4..].iter().all(|&b| b == 7));
    o.settle(seq, "a");
    assert_eq!(o.stats().memory_used_bytes, 0);
}

/// Appends `n` Memory messages for `a` in batches of 1,024, settling each batch, with
/// `pause` between batches; returns how many batches found the lease used up (and
/// were refused the fast path) and the last seq taken.
async fn memory_batches(o: &Outbox, n: u64, pause: Duration) -> (u64, u64) {
    let targets = o.target_groups(g(&["a"])).unwrap();
    let (mut refused, mut last) = (0, 0);
    for _ in 0..n / 1024 {
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let mut bodies: MemoryRecords =
            (0..1024).map(|_| Bytes::from_static(b"m").into()).collect();
        match o
            .append_memory_many(&targets, &mut bodies, WhenFull::Fail, 0)
            .await
            .unwrap()
        {
            Some(seqs) => {
                last = seqs.end - 1;
                // Delivered at once: the memory limit never fills.
                o.settle_many(&seqs.collect::<Vec<u64>>(), "a");
            }
            None => refused += 1,
        }
    }
    (refused, last)
}

#[tokio::test]
async fn the_sequence_lease_is_renewed_before_memory_appends_run_out() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, _) = Outbox::open(cfg(tmp.path())).await.unwrap();
    let lease = |o: &Outbox| o.inner.shared.core().lease_durable;
    let first_lease = lease(&o);
    // Past the renewal mark, still inside the first lease: the fast path asks the
    // writer to renew, and the renewed lease is made durable. (Waited for as such: a
    // commit count that moved could be another commit, or the renewal's commit before
    // the lease it made durable is published.)
    let (refused, _) =
        memory_batches(&o, LEASE_BLOCK - LEASE_RENEW_AHEAD + 4096, Duration::ZERO).await;
    assert_eq!(refused, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lease(&o) == first_lease {
        assert!(
            std::time::Instant::now() < deadline,
            "no renewal was committed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Far past the first lease's end, without ever falling back to the writer.
    // Paced at about a million messages a second, which leaves the renewal requested
    // at the next mark (`LEASE_RENEW_AHEAD` numbers, 32 batches, before the lease's
    // end) tens of milliseconds for its commit. Unpaced, this loop outran a commit
    // delayed by the other tests' `fdatasync`s about one run in ten; the appends then
    // take the writer path, which is correct but not what this test checks.
    let (refused, last) = memory_batches(&o, LEASE_BLOCK, Duration::from_millis(1)).await;
    assert_eq!(refused, 0, "the lease ran out under the fast path");
    assert!(last > LEASE_BLOCK);
    o.close().await.unwrap();
    drop(o);
    // The renewed lease is durable: numbers handed out are never handed out again.
    let (o, _) = Outbox::open(cfg(tmp.path())).await.unwrap();
    let next = append_disk(&o, &["a"], b"after").await;
    assert!(next > last, "seq {next} reused (last before reopen {last})");
}

/// An outbox in `dir` with 4 KiB segments, after disk messages were appended and
/// settled until a settled segment was kept as the spare; with its configuration and
/// the spare's path.
async fn outbox_with_a_spare(dir: &Path) -> (Outbox, OutboxConfig, std::path::PathBuf) {
    let mut c = cfg(dir);
    c.segment_bytes = 4096;
    let spare = dir.join(segment::SPARE_NAME);
    let (o, _) = Outbox::open(c.clone()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !spare.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no segment was recycled"
        );
        for _ in 0..20 {
            let s = append_disk(&o, &["a"], &[9u8; 200]).await;
            o.settle(s, "a");
        }
    }
    (o, c, spare)
}

/// A spare that cannot be installed (here: removed behind the writer's back) costs
/// nothing but a warning: the roll creates a new segment and appends go on.
#[tokio::test]
async fn a_roll_without_its_spare_creates_a_new_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, c, spare) = outbox_with_a_spare(tmp.path()).await;
    std::fs::remove_file(&spare).unwrap();
    let rolled_from = *segments(tmp.path()).last().unwrap();
    let mut kept = Vec::new();
    while *segments(tmp.path()).last().unwrap() < rolled_from + 2 {
        assert!(kept.len() < 100, "no roll after {} appends", kept.len());
        kept.push(append_disk(&o, &["b"], &[3u8; 500]).await);
    }
    o.close().await.unwrap();
    drop(o);
    let (_o, rec) = Outbox::open(c).await.unwrap();
    assert!(rec.damage.is_empty(), "{:?}", rec.damage);
    assert_eq!(rec.pending.iter().map(|p| p.seq).collect::<Vec<_>>(), kept);
}

/// A settled segment becomes the spare, the next roll overwrites it, and a crash at any
/// point after leaves only this run's records pending: the frames of its earlier use
/// are never read back.
#[tokio::test]
async fn recycled_segments_are_overwritten_and_their_old_frames_never_come_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, c, spare) = outbox_with_a_spare(tmp.path()).await;
    // The next rolls take the spare: a segment file larger than what was written in it.
    let mut kept = Vec::new();
    let mut reused = false;
    for i in 0..100u8 {
        let s = o
            .append(
                g(&["b"]),
                Bytes::from(vec![i; 100]),
                Durability::Disk,
                WhenFull::Fail,
            )
            .await
            .unwrap();
        kept.push(s);
        reused |= segments(tmp.path()).iter().any(|&id| {
            let on_disk = std::fs::metadata(segment::path(tmp.path(), id)).map_or(0, |m| m.len());
            let written = o
                .inner
                .shared
                .core()
                .seg_sizes
                .get(&id)
                .copied()
                .unwrap_or(0);
            on_disk > written + (record::FRAME_HEADER as u64 + 1)
        });
    }
    assert!(reused, "no roll overwrote the spare");
    // A crash: no close, no final settle records.
    o.crash();

    let (o, rec) = Outbox::open(c).await.unwrap();
    assert!(rec.damage.is_empty(), "{:?}", rec.damage);
    assert!(!spare.exists(), "the spare is removed on open");
    let pending: Vec<u64> = rec.pending.iter().map(|p| p.seq).collect();
    assert_eq!(
        pending, kept,
        "exactly the unsettled messages of 'b' come back"
    );
    for (p, i) in rec.pending.iter().zip(0u8..) {
        assert_eq!(p.body, Bytes::from(vec![i; 100]));
        assert_eq!(p.unsettled, ["b"]);
    }
    for s in &kept {
        assert_eq!(o.read(*s).await.unwrap().map(|b| b.len()), Some(100));
    }
}

/// One task awaiting thousands of appends at once (as `FuturesUnordered` or `join_all`
/// do): a commit answers them together, and each is polled a few times in all, not
/// once per round of tokio's cooperative budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_appends_awaited_by_one_task_are_each_polled_a_few_times() {
    use futures::stream::{FuturesUnordered, StreamExt};
    use std::future::Future;
    use std::sync::atomic::AtomicU64;
    const N: u64 = 4096;
    let tmp = tempfile::tempdir().unwrap();
    let (o, _) = Outbox::open(cfg(tmp.path())).await.unwrap();
    let polls = Arc::new(AtomicU64::new(0));
    let appends: FuturesUnordered<_> = (0..N)
        .map(|i| {
            let (o, polls) = (o.clone(), polls.clone());
            let mut append = Box::pin(async move {
                o.append(
                    g(&["a"]),
                    Bytes::from(i.to_le_bytes().to_vec()),
                    Durability::Disk,
                    WhenFull::Fail,
                )
                .await
            });
            std::future::poll_fn(move |cx| {
                polls.fetch_add(1, Ordering::Relaxed);
                append.as_mut().poll(cx)
            })
        })
        .collect();
    let stored: Vec<u64> =
        tokio::spawn(async move { appends.map(|r| r.unwrap()).collect::<Vec<u64>>().await })
            .await
            .unwrap();
    assert_eq!(stored.len() as u64, N);
    let per_append = polls.load(Ordering::Relaxed) as f64 / N as f64;
    assert!(
        per_append < 4.0,
        "{per_append:.1} polls per append: the tickets' wake-ups go round the budget"
    );
}

/// `try_submit` stores like `submit` while there is room, gives the body back untouched
/// (storing nothing, reserving nothing) once the quota is full, validates as `submit`
/// does, and takes messages again once settlements free room.
#[tokio::test]
async fn try_submit_gives_the_body_back_when_the_quota_is_full() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.max_messages = 2;
    c.max_bytes = 1000;
    let (o, _) = Outbox::open(c.clone()).await.unwrap();
    let targets = o.target_groups(g(&["b", "a"])).unwrap();
    let mut seqs = Vec::new();
    for body in ["one", "two"] {
        let mut ticket = o
            .try_submit(&targets, Bytes::from(body), Durability::Disk)
            .unwrap()
            .expect("room in the quota");
        seqs.push(ticket.wait().await.unwrap().start);
    }
    let given_back = o
        .try_submit(&targets, Bytes::from("three"), Durability::Disk)
        .unwrap()
        .expect_err("the quota is full");
    assert_eq!(given_back, Bytes::from("three"));
    let st = o.stats();
    assert_eq!((st.appended, st.pending_messages), (2, 2));
    let e = o.target_groups(g(&["a", ""])).unwrap_err();
    assert!(matches!(e, OutboxError::InvalidTarget { .. }), "{e:?}");
    let e = o
        .try_submit(&targets, Bytes::from(vec![0; 1001]), Durability::Disk)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, OutboxError::TooLarge { .. }), "{e:?}");

    o.settle(seqs[0], "a");
    o.settle(seqs[0], "b");
    let third = o
        .try_submit(&targets, given_back, Durability::Disk)
        .unwrap()
        .expect("a settled message freed room")
        .wait()
        .await
        .unwrap()
        .start;
    o.close().await.unwrap();
    drop(o);
    let (_o, rec) = Outbox::open(c).await.unwrap();
    let recovered: Vec<(u64, Bytes, Vec<String>)> = rec
        .pending
        .into_iter()
        .map(|p| (p.seq, p.body, p.unsettled))
        .collect();
    assert_eq!(
        recovered,
        vec![
            (seqs[1], Bytes::from("two"), g(&["a", "b"])),
            (third, Bytes::from("three"), g(&["a", "b"])),
        ]
    );
}

/// A group commit stops taking appends once it holds `max_batch_bytes` of bodies, so
/// appends queued together are committed in several syncs; an append larger than the
/// limit is still committed, and every one is recovered.
#[tokio::test]
async fn a_group_commit_takes_at_most_max_batch_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.max_batch_bytes = 1000;
    let (o, _) = Outbox::open(c.clone()).await.unwrap();
    let targets = o.target_groups(g(&["a"])).unwrap();
    let commits = o.stats().commits;
    // Queued without waiting between them: without the byte limit, the writer would
    // take all that wait in one commit.
    let mut tickets: Vec<AppendTicket> = (0..20u8)
        .map(|i| {
            o.try_submit(&targets, Bytes::from(vec![i; 600]), Durability::Disk)
                .unwrap()
                .expect("room in the quota")
        })
        .collect();
    tickets.push(
        o.try_submit(&targets, Bytes::from(vec![99; 5000]), Durability::Disk)
            .unwrap()
            .expect("room in the quota"),
    );
    let mut seqs = Vec::new();
    for t in &mut tickets {
        seqs.push(t.wait().await.unwrap().start);
    }
    let made = o.stats().commits - commits;
    // Under a 1000-byte limit a commit holds two of these appends at most.
    assert!(made >= 11, "21 appends in {made} commits");
    o.close().await.unwrap();
    drop(o);
    let (_o, rec) = Outbox::open(c).await.unwrap();
    let recovered: Vec<(u64, usize)> = rec.pending.iter().map(|p| (p.seq, p.body.len())).collect();
    let expected: Vec<(u64, usize)> = seqs
        .iter()
        .enumerate()
        .map(|(i, &s)| (s, if i < 20 { 600 } else { 5000 }))
        .collect();
    assert_eq!(recovered, expected);
}

/// A [`GatheredAppend`] whose bodies the test adds, telling the test its outcome.
struct TestGathering {
    bodies: Arc<Mutex<Vec<Bytes>>>,
    /// Reserved quota no body took.
    unused: (u64, u64),
    done: Option<oneshot::Sender<Result<std::ops::Range<u64>, OutboxError>>>,
}

impl GatheredAppend for TestGathering {
    fn seal(&mut self) -> Sealed {
        Sealed {
            bodies: std::mem::take(&mut *self.bodies.lock().unwrap()),
            unused: std::mem::take(&mut self.unused),
        }
    }
}

impl AppendDone for TestGathering {
    fn done(mut self: Box<Self>, result: Result<std::ops::Range<u64>, OutboxError>) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(result);
        }
    }
}

/// A gathered append stores the bodies added before the writer sealed it, after the
/// appends handed over before it and under consecutive sequence numbers, and tells its
/// continuation; quota reserved ahead for it is refused when full, and what its bodies
/// did not take is given back when it is sealed; a closed outbox refuses both.
#[tokio::test]
async fn a_gathered_append_is_sealed_by_the_writer_and_stored_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.max_messages = 4;
    let (o, _) = Outbox::open(c.clone()).await.unwrap();
    let targets = o.target_groups(g(&["a"])).unwrap();
    let before = append_disk(&o, &["a"], b"before").await;
    assert!(
        o.try_reserve_disk(&targets, 3, 3).unwrap(),
        "three reserved ahead"
    );
    assert!(
        !o.try_reserve_disk(&targets, 1, 1).unwrap(),
        "the quota is full"
    );
    let bodies = Arc::new(Mutex::new(vec![Bytes::from("x"), Bytes::from("y")]));
    let (tx, rx) = oneshot::channel();
    let gathering = TestGathering {
        bodies: bodies.clone(),
        unused: (1, 1),
        done: Some(tx),
    };
    assert!(o.try_gather(&targets, Box::new(gathering)).unwrap().is_ok());
    let seqs = rx.await.unwrap().unwrap();
    assert_eq!(seqs, before + 1..before + 3);
    assert!(
        o.try_reserve_disk(&targets, 1, 1).unwrap(),
        "the unused one came back"
    );
    assert!(!o.try_reserve_disk(&targets, 1, 1).unwrap(), "full again");
    o.settle(before, "a");
    assert!(
        o.try_reserve_disk(&targets, 1, 5).unwrap(),
        "a settle freed room"
    );
    o.unreserve_disk(&targets, 1, 5);
    o.unreserve_disk(&targets, 1, 1);
    assert_eq!(o.stats().pending_messages, 2);

    o.close().await.unwrap();
    let e = o.try_reserve_disk(&targets, 1, 1).unwrap_err();
    assert!(matches!(e, OutboxError::Closed), "{e:?}");
    let refused = TestGathering {
        bodies: Arc::new(Mutex::new(vec![Bytes::from("late")])),
        unused: (0, 0),
        done: None,
    };
    let e = o
        .try_gather(&targets, Box::new(refused))
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, OutboxError::Closed), "{e:?}");
    drop(o);
    let (_o, rec) = Outbox::open(c).await.unwrap();
    let recovered: Vec<Bytes> = rec.pending.into_iter().map(|p| p.body).collect();
    assert_eq!(recovered, ["x", "y"].map(Bytes::from).to_vec());
}
