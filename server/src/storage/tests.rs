//! Store-level tests: a real `SledStore` on a temporary data dir, crashed by copying the
//! data dir while the store is open (what a killed process leaves behind), damaged with the
//! public journal helpers, and reopened.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use super::journal::{locate_frames, segment_paths, FrameLocation};
use super::*;

fn config(root: &Path) -> StoreConfig {
    StoreConfig::for_tests(root.join("data"))
}

fn id(key: &str) -> EntityId {
    EntityId::new("counter", key).unwrap()
}

fn event(seq: u64) -> Op {
    Op::Event {
        seq,
        behaviour_version: 1,
        payload: format!("event {seq}").into_bytes(),
    }
}

fn snapshot(seq: u64) -> Op {
    Op::Snapshot {
        seq,
        behaviour_version: 1,
        payload: format!("state after {seq}").into_bytes(),
    }
}

fn batch(shard: u32, key: &str, ops: Vec<Op>) -> EntityBatch {
    EntityBatch {
        shard,
        entity: id(key),
        ops,
    }
}

fn seqs(loaded: &LoadedEntity) -> (Option<u64>, Vec<u64>) {
    (
        loaded.snapshot.as_ref().map(|s| s.seq),
        loaded.events.iter().map(|e| e.seq).collect(),
    )
}

/// Copies a data dir, as a crash would leave it: the store must be quiescent (no commit in
/// flight), and nothing of sled's that is only in memory is copied.
fn crash_copy(data_dir: &Path) -> (tempfile::TempDir, PathBuf) {
    let target = tempfile::tempdir().unwrap();
    let copy = target.path().join("data");
    copy_dir(data_dir, &copy);
    (target, copy)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&path, &dest);
        } else {
            // A file deleted between listing and copying (a journal segment the start-up
            // checkpoint removes in the background) is left out, as a crash right after the
            // deletion would leave it.
            match std::fs::copy(&path, &dest) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !path.exists() => {}
                Err(e) => panic!("copying {}: {e}", path.display()),
            }
        }
    }
}

fn reopen(root: &Path, data_dir: &Path) -> Result<Arc<SledStore>, StoreError> {
    SledStore::open(StoreConfig {
        data_dir: data_dir.to_path_buf(),
        ..config(root)
    })
}

fn last_segment(data_dir: &Path) -> PathBuf {
    segment_paths(data_dir).unwrap().pop().unwrap()
}

fn flip_byte(path: &Path, offset: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Commits one event to each of `keys` (seq 1), each on shard `i % 4`.
async fn commit_one_each(store: &SledStore, keys: &[&str]) {
    for (i, key) in keys.iter().enumerate() {
        store
            .commit(batch(i as u32 % 4, key, vec![event(1)]))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn committed_batches_load_back_in_order() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    assert_eq!(store.shard_count(), 4);
    assert!(!store.load(1, &id("a")).await.unwrap().exists());
    store
        .commit(batch(1, "a", vec![event(1), event(2)]))
        .await
        .unwrap();
    store.commit(batch(1, "a", vec![event(3)])).await.unwrap();
    let loaded = store.load(1, &id("a")).await.unwrap();
    assert_eq!(seqs(&loaded), (None, vec![1, 2, 3]));
    assert_eq!(loaded.events[1].payload, b"event 2");
    assert_eq!(loaded.last_seq(), 3);
    // Same key, other shard: a different tree, nothing there.
    assert!(!store.load(2, &id("a")).await.unwrap().exists());
    store.close().await.unwrap();
    // sled's lock on the data dir goes with the last handle.
    drop(store);

    let store = reopen(root.path(), &root.path().join("data")).unwrap();
    assert_eq!(
        seqs(&store.load(1, &id("a")).await.unwrap()),
        (None, vec![1, 2, 3])
    );
    assert_eq!(
        store.recovery_report().frames_replayed,
        0,
        "close checkpointed"
    );
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_share_fsyncs() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    let commits = 200;
    let tasks: Vec<_> = (0..commits)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .commit(batch(i % 4, &format!("k{i}"), vec![event(1)]))
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let stats = store.stats();
    println!("{commits} commits, {stats:?}");
    assert_eq!(stats.commits, u64::from(commits));
    assert_eq!(stats.journal_fsyncs, stats.journal_rounds);
    assert!(
        stats.journal_fsyncs <= u64::from(commits) / 2,
        "{} fsyncs for {commits} concurrent commits",
        stats.journal_fsyncs
    );
    for i in 0..commits {
        let loaded = store.load(i % 4, &id(&format!("k{i}"))).await.unwrap();
        assert_eq!(seqs(&loaded), (None, vec![1]));
    }
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Holding the shard's lock across awaits is the point: it parks the writer mid-round.
#[allow(clippy::await_holding_lock)]
async fn one_round_carries_every_queued_commit_with_one_fsync() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    let max = store.permits_available();
    // Hold shard 0 for reading: the writer's first round stops after its fsync, before it
    // may apply, while everything else queues up behind it.
    let shared = Arc::clone(store.shared());
    let hold = shared.state.shards[0].view();
    let first = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.commit(batch(0, "first", vec![event(1)])).await })
    };
    wait_for("the first round's fsync", || {
        store.stats().journal_fsyncs == 1
    })
    .await;
    let queued = 199;
    let rest: Vec<_> = (0..queued)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .commit(batch(1 + i % 3, &format!("k{i}"), vec![event(1)]))
                    .await
            })
        })
        .collect();
    wait_for("every commit to be queued", || {
        store.permits_available() == max - 1 - queued as usize
    })
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(hold);
    first.await.unwrap().unwrap();
    for task in rest {
        task.await.unwrap().unwrap();
    }
    let stats = store.stats();
    assert_eq!(stats.journal_fsyncs, 2, "{stats:?}");
    assert_eq!(stats.journal_rounds, 2, "{stats:?}");
    assert_eq!(stats.commits, 200);
    store.close().await.unwrap();
}

#[tokio::test]
async fn replay_after_a_crash_recovers_everything_committed() {
    let root = tempfile::tempdir().unwrap();
    // Small segments so the replay crosses several of them.
    let store = SledStore::open(StoreConfig {
        journal_segment_bytes: 600,
        ..config(root.path())
    })
    .unwrap();
    let mut batches = 0;
    for i in 0..20u32 {
        let key = format!("e{i}");
        for seq in 1..=4 {
            store
                .commit(batch(i % 4, &key, vec![event(seq)]))
                .await
                .unwrap();
            batches += 1;
        }
        if i % 3 == 0 {
            store
                .commit(batch(i % 4, &key, vec![snapshot(3)]))
                .await
                .unwrap();
            batches += 1;
        }
        if i % 5 == 0 {
            store
                .commit(batch(i % 4, &key, vec![Op::Delete]))
                .await
                .unwrap();
            batches += 1;
        }
    }
    assert!(segment_paths(store.data_dir()).unwrap().len() > 3);
    let (_copy_root, copy) = crash_copy(store.data_dir());

    let recovered = reopen(root.path(), &copy).unwrap();
    let report = recovered.recovery_report().clone();
    assert_eq!(report.frames_replayed, batches);
    assert!(report.torn_tails.is_empty() && report.corrupt_entities.is_empty());
    for i in 0..20u32 {
        let key = id(&format!("e{i}"));
        let original = store.load(i % 4, &key).await.unwrap();
        assert_eq!(
            recovered.load(i % 4, &key).await.unwrap(),
            original,
            "{key}"
        );
    }
    assert_eq!(
        recovered.list("counter", "", None, 100).await.unwrap(),
        store.list("counter", "", None, 100).await.unwrap()
    );
    // The start-up checkpoint runs in the background; once done only the new segment is left.
    wait_for("the start-up checkpoint", || {
        segment_paths(&copy).unwrap().len() == 1
    })
    .await;
    recovered.close().await.unwrap();
    store.close().await.unwrap();
}

#[tokio::test]
async fn checkpoint_deletes_segments_behind_it_and_state_survives() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(StoreConfig {
        journal_segment_bytes: 1024,
        ..config(root.path())
    })
    .unwrap();
    for i in 0..100u32 {
        store
            .commit(batch(
                i % 10 % 4,
                &format!("k{}", i % 10),
                vec![event(1 + u64::from(i / 10))],
            ))
            .await
            .unwrap();
    }
    let before = segment_paths(store.data_dir()).unwrap();
    assert!(before.len() > 3, "{} segments", before.len());
    store.checkpoint().await.unwrap();
    let after = segment_paths(store.data_dir()).unwrap();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(
        after[0],
        *before.last().unwrap(),
        "the writer's segment stays"
    );
    assert!(store.stats().segments_deleted >= before.len() as u64 - 1);

    // Crash right after the checkpoint: nothing to replay, all there.
    let (_copy_root, copy) = crash_copy(store.data_dir());
    let recovered = reopen(root.path(), &copy).unwrap();
    assert_eq!(recovered.recovery_report().frames_replayed, 0);
    for i in 0..10u32 {
        let loaded = recovered.load(i % 4, &id(&format!("k{i}"))).await.unwrap();
        assert_eq!(seqs(&loaded).1, (1..=10).collect::<Vec<u64>>(), "k{i}");
    }
    recovered.close().await.unwrap();
    store.close().await.unwrap();
}

#[tokio::test]
async fn checkpoints_run_on_their_own() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(StoreConfig {
        journal_segment_bytes: 512,
        checkpoint_journal_bytes: 2048,
        ..config(root.path())
    })
    .unwrap();
    let at_open = store.stats().checkpoints;
    for i in 0..60u32 {
        store
            .commit(batch(0, &format!("k{i}"), vec![event(1)]))
            .await
            .unwrap();
    }
    wait_for("a journal-bytes checkpoint", || {
        store.stats().checkpoints > at_open && store.stats().segments_deleted > 0
    })
    .await;
    store.close().await.unwrap();
    drop(store);

    let store = SledStore::open(StoreConfig {
        checkpoint_interval: Duration::from_millis(20),
        ..config(root.path())
    })
    .unwrap();
    let at_open = store.stats().checkpoints;
    store
        .commit(batch(0, "late", vec![event(1)]))
        .await
        .unwrap();
    wait_for("an interval checkpoint", || {
        store.stats().checkpoints > at_open
    })
    .await;
    store.close().await.unwrap();
}

/// Commits one event to each of five entities and returns them with the data dir copied as
/// a crash would leave it.
async fn five_frames(root: &Path) -> (tempfile::TempDir, PathBuf, Vec<&'static str>) {
    let keys = vec!["a", "b", "c", "d", "e"];
    let store = SledStore::open(config(root)).unwrap();
    commit_one_each(&store, &keys).await;
    let (copy_root, copy) = crash_copy(store.data_dir());
    store.close().await.unwrap();
    (copy_root, copy, keys)
}

async fn assert_present(store: &SledStore, keys: &[&str]) {
    for (i, key) in keys.iter().enumerate() {
        let loaded = store.load(i as u32 % 4, &id(key)).await.unwrap();
        assert_eq!(seqs(&loaded), (None, vec![1]), "{key}");
    }
}

#[tokio::test]
async fn a_frame_cut_short_is_a_torn_tail() {
    let root = tempfile::tempdir().unwrap();
    let (_copy_root, copy, keys) = five_frames(root.path()).await;
    let segment = last_segment(&copy);
    let frames = locate_frames(&segment).unwrap();
    assert_eq!(frames.len(), 5);
    let last = frames[4].clone();
    assert_eq!(last.entity, id("e"));
    for cut in [last.offset + 3, last.body_offset + 2] {
        let (_c, attempt) = crash_copy(&copy);
        let segment = last_segment(&attempt);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let store = reopen(root.path(), &attempt).unwrap();
        assert_eq!(
            store.recovery_report().torn_tails,
            vec![(segment.clone(), last.offset)]
        );
        assert_eq!(store.recovery_report().frames_replayed, 4);
        assert_present(&store, &keys[..4]).await;
        assert!(!store.load(0, &id("e")).await.unwrap().exists());
        // Later appends work and survive a restart.
        store.commit(batch(0, "e", vec![event(1)])).await.unwrap();
        store.close().await.unwrap();
        drop(store);
        let store = reopen(root.path(), &attempt).unwrap();
        assert_present(&store, &keys).await;
        store.close().await.unwrap();
    }
}

#[tokio::test]
async fn zeros_or_garbage_after_the_last_frame_are_cut() {
    let root = tempfile::tempdir().unwrap();
    let (_copy_root, copy, keys) = five_frames(root.path()).await;
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let garbage: Vec<u8> = (0..3000).map(|_| rng.gen()).collect();
    for (tail, is_zero) in [(vec![0u8; 4096], true), (garbage, false)] {
        let (_c, attempt) = crash_copy(&copy);
        let segment = last_segment(&attempt);
        // The segment of a killed writer is preallocated: its data, then zeros. Cut it to its
        // data, then put the tail right after the data.
        let clean_len = locate_frames(&segment)
            .unwrap()
            .last()
            .map_or(0, |f| f.offset + f.len);
        let mut bytes = std::fs::read(&segment).unwrap();
        assert!(bytes[clean_len as usize..].iter().all(|b| *b == 0));
        bytes.truncate(clean_len as usize);
        bytes.extend_from_slice(&tail);
        std::fs::write(&segment, bytes).unwrap();

        let store = reopen(root.path(), &attempt).unwrap();
        let report = store.recovery_report();
        if is_zero {
            assert!(report.torn_tails.is_empty(), "{report:?}");
            assert_eq!(report.zero_tail, Some((segment.clone(), clean_len)));
        } else {
            assert_eq!(report.torn_tails, vec![(segment.clone(), clean_len)]);
            assert_eq!(report.zero_tail, None);
        }
        assert_eq!(std::fs::metadata(&segment).unwrap().len(), clean_len);
        assert_present(&store, &keys).await;
        store.commit(batch(0, "f", vec![event(1)])).await.unwrap();
        store.close().await.unwrap();
        drop(store);
        let store = reopen(root.path(), &attempt).unwrap();
        assert_present(&store, &keys).await;
        assert!(store.load(0, &id("f")).await.unwrap().exists());
        store.close().await.unwrap();
    }
}

#[tokio::test]
async fn a_damaged_body_mid_log_marks_only_that_entity_corrupt() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    store.commit(batch(0, "a", vec![event(1)])).await.unwrap();
    store.commit(batch(1, "b", vec![event(1)])).await.unwrap();
    store.commit(batch(0, "a", vec![event(2)])).await.unwrap();
    store.commit(batch(2, "c", vec![event(1)])).await.unwrap();
    let (_copy_root, copy) = crash_copy(store.data_dir());
    store.close().await.unwrap();

    let segment = last_segment(&copy);
    let frames = locate_frames(&segment).unwrap();
    let first_of_a: &FrameLocation = &frames[0];
    assert_eq!(first_of_a.entity, id("a"));
    flip_byte(&segment, first_of_a.body_offset + first_of_a.body_len - 1);
    assert_eq!(
        locate_frames(&segment).unwrap().len(),
        4,
        "the head still verifies"
    );

    let store = reopen(root.path(), &copy).unwrap();
    let report = store.recovery_report().clone();
    assert_eq!(report.corrupt_entities.len(), 1);
    assert_eq!(report.corrupt_entities[0].1, id("a"));
    assert_eq!(
        report.frames_replayed, 2,
        "b and c; a's later frame is skipped"
    );
    let expected_detail = format!(
        "journal record in segment {} at offset {} failed its CRC32C check",
        segment.file_name().unwrap().to_string_lossy(),
        first_of_a.offset
    );
    let check_a = |result: Result<LoadedEntity, StoreError>| match result {
        Err(StoreError::CorruptEntity { entity, detail }) => {
            assert_eq!(entity, id("a"));
            assert_eq!(detail, expected_detail);
        }
        other => panic!("expected CorruptEntity, got {other:?}"),
    };
    check_a(store.load(0, &id("a")).await);
    assert_eq!(
        seqs(&store.load(1, &id("b")).await.unwrap()),
        (None, vec![1])
    );
    assert_eq!(
        seqs(&store.load(2, &id("c")).await.unwrap()),
        (None, vec![1])
    );
    store.close().await.unwrap();
    drop(store);

    // The marker is durable: the damaged journal is gone, the verdict stays.
    let store = reopen(root.path(), &copy).unwrap();
    assert!(store.recovery_report().corrupt_entities.is_empty());
    check_a(store.load(0, &id("a")).await);
    // Deleting the entity clears it; a new incarnation starts fresh.
    store.commit(batch(0, "a", vec![Op::Delete])).await.unwrap();
    assert!(!store.load(0, &id("a")).await.unwrap().exists());
    store.commit(batch(0, "a", vec![event(1)])).await.unwrap();
    assert_eq!(
        seqs(&store.load(0, &id("a")).await.unwrap()),
        (None, vec![1])
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_damaged_body_in_the_last_frame_is_a_torn_tail() {
    let root = tempfile::tempdir().unwrap();
    let (_copy_root, copy, keys) = five_frames(root.path()).await;
    let segment = last_segment(&copy);
    let last = locate_frames(&segment).unwrap().pop().unwrap();
    flip_byte(&segment, last.body_offset + 1);
    let store = reopen(root.path(), &copy).unwrap();
    assert_eq!(
        store.recovery_report().torn_tails,
        vec![(segment, last.offset)]
    );
    assert!(store.recovery_report().corrupt_entities.is_empty());
    assert_present(&store, &keys[..4]).await;
    assert!(!store.load(0, &id("e")).await.unwrap().exists());
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_damaged_head_mid_log_fails_open() {
    let root = tempfile::tempdir().unwrap();
    let (_copy_root, copy, _) = five_frames(root.path()).await;
    let segment = last_segment(&copy);
    let frames = locate_frames(&segment).unwrap();
    for (target, byte) in [(1usize, 0u64), (2, 12), (3, 20)] {
        let (_c, attempt) = crash_copy(&copy);
        let segment = last_segment(&attempt);
        let frame = &frames[target];
        assert!(frame.offset + byte < frame.body_offset);
        flip_byte(&segment, frame.offset + byte);
        match reopen(root.path(), &attempt) {
            Err(StoreError::CorruptJournal {
                segment: bad,
                offset,
                detail,
            }) => {
                assert_eq!(bad, segment);
                assert_eq!(offset, frame.offset);
                assert!(detail.contains("not a torn tail"), "{detail}");
            }
            other => panic!("expected CorruptJournal, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_damaged_head_in_a_segment_before_the_last_fails_open() {
    let root = tempfile::tempdir().unwrap();
    // Every frame fills a segment: segments hold a, b, c, and the last one nothing.
    let store = SledStore::open(StoreConfig {
        journal_segment_bytes: 50,
        ..config(root.path())
    })
    .unwrap();
    commit_one_each(&store, &["a", "b", "c"]).await;
    // The writer rolls after it answers the commit; wait for the last roll.
    wait_for("the fourth segment", || {
        segment_paths(store.data_dir()).unwrap().len() == 4
    })
    .await;
    let (_copy_root, copy) = crash_copy(store.data_dir());
    store.close().await.unwrap();
    let segments = segment_paths(&copy).unwrap();
    assert_eq!(segments.len(), 4, "{segments:?}");
    // The first segment holds one frame; damage its head. Nothing follows it in that
    // segment, but it is not the last one, so it cannot be a torn tail.
    let frames = locate_frames(&segments[0]).unwrap();
    assert_eq!(frames.len(), 1);
    flip_byte(&segments[0], 2);
    assert!(matches!(
        reopen(root.path(), &copy),
        Err(StoreError::CorruptJournal { offset: 0, .. })
    ));
}

#[tokio::test]
async fn a_snapshot_trims_the_events_behind_it() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    for seq in 1..=5 {
        store.commit(batch(3, "s", vec![event(seq)])).await.unwrap();
    }
    store
        .commit(batch(3, "s", vec![snapshot(3)]))
        .await
        .unwrap();
    let loaded = store.load(3, &id("s")).await.unwrap();
    assert_eq!(seqs(&loaded), (Some(3), vec![4, 5]));
    assert_eq!(loaded.snapshot.as_ref().unwrap().payload, b"state after 3");
    // A checkpoint puts the overlay in sled, where the trimmed events must be gone.
    store.checkpoint().await.unwrap();
    let tree = &store.shared().state.shards[3].tree;
    let prefix = keys::event_prefix(&id("s"));
    let stored: Vec<(u64, bool, Vec<u64>)> = tree
        .scan_prefix(&prefix)
        .map(|item| {
            let (key, value) = item.unwrap();
            let seqs = crate::storage::event_runs::decode_events(&key, prefix.len(), &value)
                .unwrap()
                .iter()
                .map(|event| event.seq)
                .collect();
            let run = key.len() > prefix.len() + 8;
            let seq = keys::event_seq(&key[..prefix.len() + 8], prefix.len()).unwrap();
            (seq, run, seqs)
        })
        .collect();
    assert_eq!(
        stored,
        vec![(5, true, vec![4, 5])],
        "one run of what is left, after seq 5"
    );

    // Events and a snapshot covering all of them in one batch.
    store
        .commit(batch(3, "s", vec![event(6), snapshot(6)]))
        .await
        .unwrap();
    assert_eq!(
        seqs(&store.load(3, &id("s")).await.unwrap()),
        (Some(6), vec![])
    );
    let (_copy_root, copy) = crash_copy(store.data_dir());
    let recovered = reopen(root.path(), &copy).unwrap();
    assert_eq!(
        seqs(&recovered.load(3, &id("s")).await.unwrap()),
        (Some(6), vec![])
    );
    recovered.close().await.unwrap();
    store.close().await.unwrap();
}

#[tokio::test]
async fn delete_removes_everything_and_a_new_incarnation_starts_fresh() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    store
        .commit(batch(
            2,
            "d",
            vec![event(1), event(2), snapshot(2), event(3)],
        ))
        .await
        .unwrap();
    assert_eq!(
        store.list("counter", "", None, 10).await.unwrap(),
        vec!["d"]
    );
    store.commit(batch(2, "d", vec![Op::Delete])).await.unwrap();
    assert!(!store.load(2, &id("d")).await.unwrap().exists());
    assert!(store
        .list("counter", "", None, 10)
        .await
        .unwrap()
        .is_empty());
    store.checkpoint().await.unwrap();
    assert_eq!(store.shared().state.shards[2].tree.len(), 0);

    store.commit(batch(2, "d", vec![event(1)])).await.unwrap();
    assert_eq!(
        seqs(&store.load(2, &id("d")).await.unwrap()),
        (None, vec![1])
    );
    assert_eq!(
        store.list("counter", "", None, 10).await.unwrap(),
        vec!["d"]
    );

    let (_copy_root, copy) = crash_copy(store.data_dir());
    let recovered = reopen(root.path(), &copy).unwrap();
    assert_eq!(
        seqs(&recovered.load(2, &id("d")).await.unwrap()),
        (None, vec![1])
    );
    recovered.close().await.unwrap();
    store.close().await.unwrap();
}

/// Every `counter` key starting with `prefix`, listed `page_size` at a time, each page after
/// the last key of the one before.
async fn list_every_page(store: &SledStore, prefix: &str, page_size: usize) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    loop {
        let page = store
            .list(
                "counter",
                prefix,
                keys.last().map(String::as_str),
                page_size,
            )
            .await
            .unwrap();
        assert!(page.len() <= page_size);
        if page.is_empty() {
            return keys;
        }
        keys.extend(page);
    }
}

#[tokio::test]
async fn list_pages_by_prefix_across_shards() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    let mut users: Vec<String> = (0..30).map(|i| format!("user-{i:02}")).collect();
    for (i, key) in users.iter().enumerate() {
        store
            .commit(batch(i as u32 % 4, key, vec![event(1)]))
            .await
            .unwrap();
    }
    store
        .commit(batch(1, "admin", vec![event(1)]))
        .await
        .unwrap();
    store
        .commit(EntityBatch {
            shard: 2,
            entity: EntityId::new("counters", "user-99").unwrap(),
            ops: vec![event(1)],
        })
        .await
        .unwrap();
    // An entity whose first batch is a snapshot is listed too.
    store
        .commit(batch(3, "user-snap", vec![snapshot(5)]))
        .await
        .unwrap();
    users.push("user-snap".into());
    users.sort();

    assert_eq!(list_every_page(&store, "user-", 7).await, users);
    assert_eq!(
        store.list("counter", "", None, 100).await.unwrap().len(),
        users.len() + 1
    );
    assert_eq!(
        store.list("counter", "user-1", None, 100).await.unwrap(),
        (10..20).map(|i| format!("user-{i}")).collect::<Vec<_>>()
    );
    // start_after before the prefix starts at the prefix; after it, nothing.
    assert_eq!(
        store.list("counter", "user-2", Some("a"), 2).await.unwrap(),
        vec!["user-20", "user-21"]
    );
    assert!(store
        .list("counter", "user-", Some("zzz"), 10)
        .await
        .unwrap()
        .is_empty());
    assert!(store.list("counter", "", None, 0).await.unwrap().is_empty());
    assert_eq!(
        store.list("counters", "", None, 10).await.unwrap(),
        vec!["user-99"]
    );
    assert!(store.list("nope", "", None, 10).await.unwrap().is_empty());
    store.close().await.unwrap();
}

/// Listing without an index, against a model: entities of several key lengths (and with
/// multi-byte characters), with snapshots, events, both, deleted, or only records, some in
/// sled and some still in the overlay; every query and every paging must match the model.
#[tokio::test]
async fn list_matches_a_model_across_lengths_kinds_and_shards() {
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    let alphabet = ["a", "b", "é", "z", "-"];
    let mut existing = std::collections::BTreeSet::new();
    let mut all_keys = Vec::new();
    for round in 0..2 {
        for _ in 0..60 {
            let len = rng.gen_range(1..5);
            let key: String = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            let shard = rng.gen_range(0..4u32);
            if existing.contains(&key) || all_keys.contains(&key) {
                continue;
            }
            all_keys.push(key.clone());
            let (ops, exists) = match rng.gen_range(0..5) {
                0 => ((1..=rng.gen_range(1..6)).map(event).collect(), true),
                1 => (vec![snapshot(3)], true),
                2 => (vec![event(1), event(2), snapshot(2), event(3)], true),
                3 => (vec![event(1), Op::Delete], false),
                _ => (
                    vec![Op::PutRecord {
                        kind: RecordKind::Dedup,
                        name: b"request".to_vec(),
                        value: b"reply".to_vec(),
                    }],
                    false,
                ),
            };
            store.commit(batch(shard, &key, ops)).await.unwrap();
            if exists {
                existing.insert(key);
            }
        }
        // Another type, and one whose name extends this one's, never show up.
        for other in ["c", "counterx"] {
            store
                .commit(EntityBatch {
                    shard: round,
                    entity: EntityId::new(other, "a").unwrap(),
                    ops: vec![event(1)],
                })
                .await
                .unwrap();
        }
        if round == 0 {
            store.checkpoint().await.unwrap();
        }
    }
    let model = |prefix: &str, after: Option<&str>, limit: usize| -> Vec<String> {
        existing
            .iter()
            .filter(|k| k.starts_with(prefix) && after.is_none_or(|a| k.as_str() > a))
            .take(limit)
            .cloned()
            .collect()
    };
    let mut probes: Vec<String> = vec![String::new(), "zzzzz".into(), "é".into()];
    for key in &all_keys {
        for end in key.char_indices().map(|(i, _)| i).chain([key.len()]) {
            probes.push(key[..end].to_owned());
        }
    }
    for _ in 0..300 {
        let prefix = &probes[rng.gen_range(0..probes.len())];
        let after = rng
            .gen_bool(0.6)
            .then(|| probes[rng.gen_range(0..probes.len())].as_str());
        let limit = rng.gen_range(1..12);
        assert_eq!(
            store.list("counter", prefix, after, limit).await.unwrap(),
            model(prefix, after, limit),
            "prefix {prefix:?} after {after:?} limit {limit}"
        );
    }
    assert_eq!(
        list_every_page(&store, "", 3).await,
        model("", None, usize::MAX)
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn async_durability_acknowledges_then_syncs_within_the_window() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(StoreConfig {
        durability: Durability::Async,
        async_sync_window: Duration::from_millis(200),
        ..config(root.path())
    })
    .unwrap();
    let commits = 20u64;
    let started = Instant::now();
    for seq in 1..=commits {
        store.commit(batch(0, "x", vec![event(seq)])).await.unwrap();
    }
    let stats = store.stats();
    if started.elapsed() < Duration::from_millis(150) {
        assert_eq!(stats.journal_fsyncs, 0, "{stats:?}");
    }
    assert!(stats.journal_fsyncs < commits, "{stats:?}");
    assert_eq!(stats.journal_rounds, commits);
    assert_eq!(store.load(0, &id("x")).await.unwrap().last_seq(), commits);
    wait_for("the window's fsync", || store.stats().journal_fsyncs >= 1).await;

    let (_copy_root, copy) = crash_copy(store.data_dir());
    let recovered = reopen(root.path(), &copy).unwrap();
    assert_eq!(
        recovered.load(0, &id("x")).await.unwrap().last_seq(),
        commits
    );
    recovered.close().await.unwrap();
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_closed_store_refuses_everything() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    store.commit(batch(0, "a", vec![event(1)])).await.unwrap();
    store.close().await.unwrap();
    assert!(matches!(
        store.commit(batch(0, "a", vec![event(2)])).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        store.load(0, &id("a")).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        store.list("counter", "", None, 1).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(store.checkpoint().await, Err(StoreError::Closed)));
    assert!(matches!(store.close().await, Err(StoreError::Closed)));
    drop(store);

    let store = reopen(root.path(), &root.path().join("data")).unwrap();
    assert_eq!(store.load(0, &id("a")).await.unwrap().last_seq(), 1);
    store.close().await.unwrap();
}

#[tokio::test]
async fn the_shard_count_is_fixed_when_the_data_dir_is_made() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    store.close().await.unwrap();
    drop(store);
    let store = SledStore::open(StoreConfig {
        shard_count: 16,
        ..config(root.path())
    })
    .unwrap();
    assert_eq!(store.shard_count(), 4);
    assert!(matches!(
        store.commit(batch(7, "a", vec![event(1)])).await,
        Err(StoreError::InvalidInput(_))
    ));
    store.close().await.unwrap();
}

#[tokio::test]
async fn bad_requests_are_refused_and_write_nothing() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    let bad_address = EntityBatch {
        shard: 0,
        entity: EntityId {
            entity_type: "counter".into(),
            key: "".into(),
        },
        ops: vec![event(1)],
    };
    assert!(matches!(
        store.commit(bad_address).await,
        Err(StoreError::InvalidInput(_))
    ));
    let huge = batch(
        0,
        "big",
        vec![Op::Event {
            seq: 1,
            behaviour_version: 1,
            payload: vec![0; journal::frame::FRAME_BODY_BYTES_MAX],
        }],
    );
    assert!(matches!(
        store.commit(huge).await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        store.load(4, &id("a")).await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        store.list("", "", None, 1).await,
        Err(StoreError::InvalidInput(_))
    ));
    assert_eq!(store.stats().commits, 0);
    store.close().await.unwrap();
    assert!(matches!(
        SledStore::open(StoreConfig {
            shard_count: 0,
            ..config(root.path())
        }),
        Err(StoreError::InvalidInput(_))
    ));
}

#[tokio::test]
async fn a_data_dir_of_a_newer_format_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    store.close().await.unwrap();
    drop(store);
    {
        let db = sled::open(root.path().join("data/state")).unwrap();
        db.open_tree(statehouse_migrations::META_TREE)
            .unwrap()
            .insert(
                statehouse_migrations::FORMAT_VERSION_KEY,
                &(statehouse_migrations::CURRENT_FORMAT_VERSION + 1).to_be_bytes(),
            )
            .unwrap();
        db.flush().unwrap();
    }
    match SledStore::open(config(root.path())) {
        Err(StoreError::Migration(statehouse_migrations::MigrationError::TooNew {
            found, ..
        })) => assert_eq!(found, statehouse_migrations::CURRENT_FORMAT_VERSION + 1),
        other => panic!("expected TooNew, got {other:?}"),
    }
}

#[tokio::test]
async fn a_damaged_value_in_sled_is_reported_by_load() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    // Two checkpoints, so each event is a value of its own in sled (not one run).
    for seq in 1..=2 {
        store.commit(batch(1, "v", vec![event(seq)])).await.unwrap();
        store.checkpoint().await.unwrap();
    }
    let tree = &store.shared().state.shards[1].tree;
    let key = keys::event_key(&id("v"), 2);
    let mut value = tree.get(&key).unwrap().unwrap().to_vec();
    let last = value.len() - 1;
    value[last] ^= 1;
    tree.insert(&key, value).unwrap();
    match store.load(1, &id("v")).await {
        Err(StoreError::CorruptEntity { entity, detail }) => {
            assert_eq!(entity, id("v"));
            assert!(detail.contains("event seq 2"), "{detail}");
        }
        other => panic!("expected CorruptEntity, got {other:?}"),
    }
    // A value moved under another key is caught as well.
    let one = tree.get(keys::event_key(&id("v"), 1)).unwrap().unwrap();
    tree.insert(&key, one).unwrap();
    assert!(matches!(
        store.load(1, &id("v")).await,
        Err(StoreError::CorruptEntity { .. })
    ));
    store.close().await.unwrap();
}

/// What an entity should load as, kept by the randomised test alongside the store.
#[derive(Debug, Clone, Default)]
struct Model {
    snapshot: Option<StoredRecord>,
    events: Vec<StoredRecord>,
    last_seq: u64,
}

impl Model {
    fn expected(&self) -> LoadedEntity {
        LoadedEntity {
            snapshot: self.snapshot.clone(),
            events: self.events.clone(),
            records: Vec::new(),
        }
    }
}

/// One worker's random batches against the entities it owns; returns its model.
async fn random_worker(
    store: Arc<SledStore>,
    seed: u64,
    worker: u32,
    batches: usize,
) -> Vec<(u32, EntityId, Model)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ u64::from(worker));
    let mut entities: Vec<(u32, EntityId, Model)> = (0..16)
        .map(|i| {
            (
                rng.gen_range(0..4),
                id(&format!("w{worker}-{i}")),
                Model::default(),
            )
        })
        .collect();
    for _ in 0..batches {
        let (shard, entity, model) = &mut entities[rng.gen_range(0..16)];
        let mut ops = Vec::new();
        let roll = rng.gen_range(0..100);
        if roll < 8 && model.last_seq > 0 {
            ops.push(Op::Delete);
            *model = Model::default();
        } else {
            for _ in 0..rng.gen_range(1..=3) {
                model.last_seq += 1;
                let len = rng.gen_range(0..2048);
                let record = StoredRecord {
                    seq: model.last_seq,
                    behaviour_version: rng.gen_range(1..3),
                    payload: (0..len).map(|_| rng.gen()).collect(),
                };
                ops.push(Op::Event {
                    seq: record.seq,
                    behaviour_version: record.behaviour_version,
                    payload: record.payload.clone(),
                });
                model.events.push(record);
            }
            if roll > 80 {
                let record = StoredRecord {
                    seq: model.last_seq,
                    behaviour_version: 1,
                    payload: format!("snap {}", model.last_seq).into_bytes(),
                };
                ops.push(Op::Snapshot {
                    seq: record.seq,
                    behaviour_version: 1,
                    payload: record.payload.clone(),
                });
                model.snapshot = Some(record);
                model.events.clear();
            }
        }
        store
            .commit(EntityBatch {
                shard: *shard,
                entity: entity.clone(),
                ops,
            })
            .await
            .unwrap();
    }
    entities
}

/// Runs `workers` concurrently, each committing `batches` random batches.
async fn run_workers(
    store: &Arc<SledStore>,
    seed: u64,
    workers: std::ops::Range<u32>,
    batches: usize,
) -> Vec<(u32, EntityId, Model)> {
    let tasks: Vec<_> = workers
        .map(|w| tokio::spawn(random_worker(Arc::clone(store), seed, w, batches)))
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_workload_survives_a_crash() {
    let seed: u64 = std::env::var("STATEHOUSE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (re-run with STATEHOUSE_TEST_SEED={seed})");
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(StoreConfig {
        journal_segment_bytes: 64 * 1024,
        sled_cache_bytes: 1024 * 1024,
        ..config(root.path())
    })
    .unwrap();

    // A first part, checkpointed; then a second part on other entities that only the
    // journal holds when the copy is taken (sled writes some of it out on its own: its
    // buffers are 512 KiB, the workload several MiB).
    let first = run_workers(&store, seed, 0..4, 150).await;
    store.checkpoint().await.unwrap();
    let second = run_workers(&store, seed, 4..8, 150).await;
    let (_copy_root, copy) = crash_copy(store.data_dir());
    let recovered = reopen(root.path(), &copy).unwrap();
    println!("{:?}", recovered.recovery_report());
    assert!(recovered.recovery_report().frames_replayed > 0);
    for (shard, entity, model) in first.iter().chain(second.iter()) {
        let expected = model.expected();
        assert_eq!(
            store.load(*shard, entity).await.unwrap(),
            expected,
            "{entity}"
        );
        assert_eq!(
            recovered.load(*shard, entity).await.unwrap(),
            expected,
            "{entity} after the crash"
        );
    }
    recovered.close().await.unwrap();
    store.close().await.unwrap();
}

#[tokio::test]
async fn catalog_records_are_durable_when_put_returns() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    store
        .put_catalog("behaviour/cart/1", b"v1".to_vec())
        .await
        .unwrap();
    store
        .put_catalog("behaviour/cart/2", b"v2".to_vec())
        .await
        .unwrap();
    store.put_catalog("other/x", b"x".to_vec()).await.unwrap();
    store
        .put_catalog("behaviour/cart/1", b"v1 again".to_vec())
        .await
        .unwrap();
    // A copy taken now is what a crash leaves: the records are in it.
    let (_copy_root, copy) = crash_copy(store.data_dir());
    let reopened = reopen(root.path(), &copy).unwrap();
    let records = reopened.catalog("behaviour/").await.unwrap();
    assert_eq!(
        records,
        vec![
            ("behaviour/cart/1".to_owned(), b"v1 again".to_vec()),
            ("behaviour/cart/2".to_owned(), b"v2".to_vec())
        ]
    );
}

fn put_record(kind: RecordKind, name: &[u8], value: &[u8]) -> Op {
    Op::PutRecord {
        kind,
        name: name.to_vec(),
        value: value.to_vec(),
    }
}

fn due(due_ms: u64, name: &[u8]) -> Op {
    Op::PutTimerDue {
        due_ms,
        name: name.to_vec(),
    }
}

fn entry(kind: RecordKind, name: &[u8], value: &[u8]) -> StoredEntry {
    StoredEntry {
        kind,
        name: name.to_vec(),
        value: value.to_vec(),
    }
}

fn timer(due_ms: u64, key: &str, name: &[u8]) -> DueTimer {
    DueTimer {
        due_ms,
        entity: id(key),
        name: name.to_vec(),
    }
}

#[tokio::test]
async fn records_and_the_timer_index_survive_a_crash_and_delete_clears_the_records() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    store
        .commit(batch(
            1,
            "a",
            vec![
                event(1),
                put_record(RecordKind::Outbox, b"o", b"to b"),
                put_record(RecordKind::Inbox, &1u64.to_be_bytes(), b"second"),
                put_record(RecordKind::Inbox, &0u64.to_be_bytes(), b"first"),
                put_record(RecordKind::Timer, b"t1", b"later"),
                put_record(RecordKind::Timer, b"t0", b"sooner"),
                put_record(RecordKind::Dedup, b"req-1", b"reply"),
                due(100, b"t1"),
                due(50, b"t0"),
            ],
        ))
        .await
        .unwrap();
    // b has records but no events: not listed.
    store
        .commit(batch(
            1,
            "b",
            vec![
                put_record(RecordKind::Timer, b"x", b"bx"),
                put_record(RecordKind::DeadLetter, b"", b"empty name"),
                due(75, b"x"),
            ],
        ))
        .await
        .unwrap();
    store
        .commit(batch(2, "c", vec![due(10, b"c")]))
        .await
        .unwrap();
    // Replaced, then removed: only the last word counts.
    store
        .commit(batch(
            1,
            "a",
            vec![
                put_record(RecordKind::Dedup, b"req-1", b"reply 2"),
                put_record(RecordKind::Dedup, b"req-0", b"gone"),
                Op::RemoveRecord {
                    kind: RecordKind::Dedup,
                    name: b"req-0".to_vec(),
                },
            ],
        ))
        .await
        .unwrap();
    let (_copy_root, copy) = crash_copy(store.data_dir());
    store.close().await.unwrap();

    let store = reopen(root.path(), &copy).unwrap();
    assert_eq!(store.recovery_report().frames_replayed, 4);
    let loaded = store.load(1, &id("a")).await.unwrap();
    assert_eq!(seqs(&loaded), (None, vec![1]));
    assert_eq!(
        loaded.records,
        vec![
            entry(RecordKind::Dedup, b"req-1", b"reply 2"),
            entry(RecordKind::Timer, b"t0", b"sooner"),
            entry(RecordKind::Timer, b"t1", b"later"),
            entry(RecordKind::Inbox, &0u64.to_be_bytes(), b"first"),
            entry(RecordKind::Inbox, &1u64.to_be_bytes(), b"second"),
        ],
        "LOADED kinds only, by kind then name"
    );
    assert_eq!(
        store
            .record(1, &id("a"), RecordKind::Outbox, b"o")
            .await
            .unwrap(),
        Some(b"to b".to_vec())
    );
    assert_eq!(
        store
            .record(1, &id("a"), RecordKind::Dedup, b"req-0")
            .await
            .unwrap(),
        None
    );
    // Same entity, wrong shard: nothing.
    assert_eq!(
        store
            .record(0, &id("a"), RecordKind::Outbox, b"o")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .entity_records(1, &id("b"), RecordKind::DeadLetter)
            .await
            .unwrap(),
        vec![entry(RecordKind::DeadLetter, b"", b"empty name")]
    );
    let timers = store
        .scan_records(1, RecordKind::Timer, None, 10)
        .await
        .unwrap();
    assert_eq!(
        timers,
        vec![
            (id("a"), entry(RecordKind::Timer, b"t0", b"sooner")),
            (id("a"), entry(RecordKind::Timer, b"t1", b"later")),
            (id("b"), entry(RecordKind::Timer, b"x", b"bx")),
        ]
    );
    // Paging: strictly after the last one seen.
    let page = store
        .scan_records(1, RecordKind::Timer, None, 2)
        .await
        .unwrap();
    assert_eq!(page, timers[..2]);
    let (entity, last) = page[1].clone();
    let rest = store
        .scan_records(1, RecordKind::Timer, Some((entity, last.name)), 2)
        .await
        .unwrap();
    assert_eq!(rest, timers[2..]);

    // The timer index: time order across entities, stopping at the first not yet due.
    let all = store.due_timers(1, None, 80, 10).await.unwrap();
    assert_eq!(
        all,
        DueTimers {
            due: vec![timer(50, "a", b"t0"), timer(75, "b", b"x")],
            next_due_ms: Some(100),
        }
    );
    // Cut by the limit while the next is due: no next time.
    let first = store.due_timers(1, None, 80, 1).await.unwrap();
    assert_eq!(
        first,
        DueTimers {
            due: vec![timer(50, "a", b"t0")],
            next_due_ms: None,
        }
    );
    // A full page whose next entry is not due says when that one is.
    let second = store
        .due_timers(1, Some(timer(50, "a", b"t0")), 80, 1)
        .await
        .unwrap();
    assert_eq!(
        second,
        DueTimers {
            due: vec![timer(75, "b", b"x")],
            next_due_ms: Some(100),
        }
    );
    assert_eq!(
        store.due_timers(1, None, 10, 10).await.unwrap(),
        DueTimers {
            due: vec![],
            next_due_ms: Some(50),
        }
    );
    assert_eq!(
        store.due_timers(2, None, u64::MAX, 10).await.unwrap(),
        DueTimers {
            due: vec![timer(10, "c", b"c")],
            next_due_ms: None,
        }
    );
    assert_eq!(
        store.due_timers(0, None, u64::MAX, 10).await.unwrap(),
        DueTimers::default()
    );
    assert_eq!(
        store.list("counter", "", None, 10).await.unwrap(),
        vec!["a".to_string()]
    );

    // Delete removes every record of a, not its timer index entries, and nothing of b.
    store.commit(batch(1, "a", vec![Op::Delete])).await.unwrap();
    let (_copy_root2, copy2) = crash_copy(&copy);
    store.close().await.unwrap();
    drop(store);
    let store = reopen(root.path(), &copy2).unwrap();
    assert_eq!(store.recovery_report().frames_replayed, 1);
    assert_eq!(
        store.load(1, &id("a")).await.unwrap(),
        LoadedEntity::default()
    );
    for kind in RecordKind::ALL {
        assert!(store
            .entity_records(1, &id("a"), kind)
            .await
            .unwrap()
            .is_empty());
    }
    assert_eq!(
        store
            .record(1, &id("a"), RecordKind::Outbox, b"o")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .scan_records(1, RecordKind::Timer, None, 10)
            .await
            .unwrap(),
        timers[2..]
    );
    assert_eq!(
        store.due_timers(1, None, u64::MAX, 10).await.unwrap().due,
        vec![
            timer(50, "a", b"t0"),
            timer(75, "b", b"x"),
            timer(100, "a", b"t1")
        ]
    );
    assert!(store
        .list("counter", "", None, 10)
        .await
        .unwrap()
        .is_empty());
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_damaged_record_is_reported_naming_its_kind_and_name() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    store
        .commit(batch(
            1,
            "v",
            vec![
                event(1),
                put_record(RecordKind::Inbox, b"m1", b"message"),
                due(5, b"t"),
            ],
        ))
        .await
        .unwrap();
    store.checkpoint().await.unwrap();
    let tree = &store.shared().state.shards[1].tree;
    let key = keys::record_key(RecordKind::Inbox, &id("v"), b"m1");
    let mut value = tree.get(&key).unwrap().unwrap().to_vec();
    let last = value.len() - 1;
    value[last] ^= 1;
    tree.insert(&key, value).unwrap();
    let expect_corrupt = |result: Result<(), StoreError>| match result {
        Err(StoreError::CorruptEntity { entity, detail }) => {
            assert_eq!(entity, id("v"));
            assert!(detail.contains("Inbox record \"m1\""), "{detail}");
        }
        other => panic!("expected CorruptEntity, got {other:?}"),
    };
    expect_corrupt(store.load(1, &id("v")).await.map(drop));
    expect_corrupt(
        store
            .record(1, &id("v"), RecordKind::Inbox, b"m1")
            .await
            .map(drop),
    );
    expect_corrupt(
        store
            .entity_records(1, &id("v"), RecordKind::Inbox)
            .await
            .map(drop),
    );
    expect_corrupt(
        store
            .scan_records(1, RecordKind::Inbox, None, 10)
            .await
            .map(drop),
    );
    // A timer index value moved under another entry's key is caught too.
    let timer_key = keys::timer_index_key(5, &id("v"), b"t");
    let moved = tree.get(&timer_key).unwrap().unwrap();
    tree.insert(keys::timer_index_key(6, &id("v"), b"t"), moved)
        .unwrap();
    match store.due_timers(1, None, 10, 10).await {
        Err(StoreError::CorruptEntity { entity, detail }) => {
            assert_eq!(entity, id("v"));
            assert!(
                detail.contains("timer index entry \"t\" due at 6"),
                "{detail}"
            );
        }
        other => panic!("expected CorruptEntity, got {other:?}"),
    }
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_damaged_journal_body_with_records_marks_the_entity_corrupt() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    store
        .commit(batch(
            0,
            "a",
            vec![put_record(RecordKind::Dedup, b"r", b"v"), due(1, b"t")],
        ))
        .await
        .unwrap();
    store
        .commit(batch(
            1,
            "b",
            vec![put_record(RecordKind::Dedup, b"r", b"v")],
        ))
        .await
        .unwrap();
    let (_copy_root, copy) = crash_copy(store.data_dir());
    store.close().await.unwrap();
    let segment = last_segment(&copy);
    let frames = locate_frames(&segment).unwrap();
    assert_eq!(frames[0].entity, id("a"));
    flip_byte(&segment, frames[0].body_offset + frames[0].body_len - 1);

    let store = reopen(root.path(), &copy).unwrap();
    let report = store.recovery_report().clone();
    assert_eq!(report.corrupt_entities.len(), 1);
    assert_eq!(report.corrupt_entities[0].1, id("a"));
    assert!(matches!(
        store.record(0, &id("a"), RecordKind::Dedup, b"r").await,
        Err(StoreError::CorruptEntity { .. })
    ));
    assert!(matches!(
        store.load(0, &id("a")).await,
        Err(StoreError::CorruptEntity { .. })
    ));
    assert_eq!(
        store
            .record(1, &id("b"), RecordKind::Dedup, b"r")
            .await
            .unwrap(),
        Some(b"v".to_vec())
    );
    // sled may or may not hold the damaged batch's writes (the live store applied them before
    // the copy); either way the entity is refused by name, which is what the engine sees when
    // a timer of it fires.
    store.close().await.unwrap();
}

#[tokio::test]
async fn record_names_over_the_limit_are_refused_and_write_nothing() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    let long = vec![b'n'; RECORD_NAME_BYTES_MAX + 1];
    let longest = vec![b'n'; RECORD_NAME_BYTES_MAX];
    for op in [
        put_record(RecordKind::Inbox, &long, b"v"),
        Op::RemoveRecord {
            kind: RecordKind::Inbox,
            name: long.clone(),
        },
        due(1, &long),
        Op::RemoveTimerDue {
            due_ms: 1,
            name: long.clone(),
        },
    ] {
        let result = store.commit(batch(0, "a", vec![event(1), op])).await;
        assert!(
            matches!(result, Err(StoreError::InvalidInput(_))),
            "{result:?}"
        );
    }
    assert_eq!(store.stats().commits, 0);
    assert!(!store.load(0, &id("a")).await.unwrap().exists());
    assert!(matches!(
        store.record(0, &id("a"), RecordKind::Inbox, &long).await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        store
            .scan_records(0, RecordKind::Inbox, Some((id("a"), long.clone())), 1)
            .await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        store.due_timers(0, Some(timer(1, "a", &long)), 1, 1).await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        store.record(4, &id("a"), RecordKind::Inbox, b"n").await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        store.entity_records(4, &id("a"), RecordKind::Inbox).await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        store.scan_records(4, RecordKind::Inbox, None, 1).await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        store.due_timers(4, None, 1, 1).await,
        Err(StoreError::InvalidInput(_))
    ));
    // The longest name is fine.
    store
        .commit(batch(
            0,
            "a",
            vec![put_record(RecordKind::Inbox, &longest, b"v")],
        ))
        .await
        .unwrap();
    assert_eq!(
        store
            .record(0, &id("a"), RecordKind::Inbox, &longest)
            .await
            .unwrap(),
        Some(b"v".to_vec())
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_data_dir_in_use_is_refused_with_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    let err = SledStore::open(config(root.path())).unwrap_err();
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    store.close().await.unwrap();
    drop(store);
    // Once the first one is gone, the data dir opens (waiting out sled's lock if need be).
    let again = SledStore::open(config(root.path())).unwrap();
    again.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Holding the checkpoint lock across awaits is the point: no checkpoint can run meanwhile.
#[allow(clippy::await_holding_lock)]
async fn commits_wait_for_a_checkpoint_when_the_overlays_are_full() {
    let root = tempfile::tempdir().unwrap();
    let limit = 16 * 1024;
    let store = SledStore::open(StoreConfig {
        checkpoint_journal_bytes: limit,
        ..config(root.path())
    })
    .unwrap();
    let stall_at = limit * crate::storage::writer::OVERLAY_STALL_FACTOR;
    let shared = Arc::clone(store.shared());
    let hold = shared.checkpoint_lock.lock();
    let payload = vec![7u8; 200];
    let commits: Vec<_> = (0..1000u32)
        .map(|i| {
            let store = Arc::clone(&store);
            let payload = payload.clone();
            tokio::spawn(async move {
                let op = Op::Event {
                    seq: 1,
                    behaviour_version: 1,
                    payload,
                };
                store.commit(batch(i % 4, &format!("k{i}"), vec![op])).await
            })
        })
        .collect();
    wait_for("the writer to stall", || store.stats().overlay_stalls == 1).await;
    let stats = store.stats();
    assert!(stats.overlay_bytes >= stall_at, "{stats:?}");
    // A commit handed over now waits behind the stalled writer.
    let late = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.commit(batch(0, "late", vec![event(1)])).await })
    };
    let mut late = late;
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut late)
            .await
            .is_err(),
        "a commit completed while the writer was stalled"
    );
    drop(hold);
    for commit in commits {
        commit.await.unwrap().unwrap();
    }
    late.await.unwrap().unwrap();
    assert_eq!(store.stats().commits, 1001);
    wait_for("the checkpoint that released the writer", || {
        store.stats().checkpoints >= 1
    })
    .await;
    for i in [0u32, 500, 999] {
        let loaded = store.load(i % 4, &id(&format!("k{i}"))).await.unwrap();
        assert_eq!(loaded.events.len(), 1);
    }
    store.close().await.unwrap();
}

/// A checkpoint may write frames past the position it records; after a crash, replay puts
/// those events again, and they become a run overlapping the one in sled. Loads see each
/// event once, before and after the next checkpoint.
#[tokio::test]
async fn events_written_again_by_replay_are_loaded_once() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    for seq in 1..=5 {
        store.commit(batch(2, "r", vec![event(seq)])).await.unwrap();
    }
    store.checkpoint().await.unwrap();
    // What replaying events 3..=5 again, then committing 6 and 7, leaves in the overlay.
    let shard = &store.shared().state.shards[2];
    shard
        .overlay
        .apply((3..=5).map(|seq| apply::plan(&id("r"), &[event(seq)])));
    for seq in 6..=7 {
        store.commit(batch(2, "r", vec![event(seq)])).await.unwrap();
    }
    let all: Vec<u64> = (1..=7).collect();
    let loaded = store.load(2, &id("r")).await.unwrap();
    assert_eq!(seqs(&loaded), (None, all.clone()));
    store.checkpoint().await.unwrap();
    let loaded = store.load(2, &id("r")).await.unwrap();
    assert_eq!(seqs(&loaded), (None, all));
    assert_eq!(
        shard.tree.scan_prefix(keys::event_prefix(&id("r"))).count(),
        2,
        "runs under seq 5 (1..=5) and seq 7 (3..=7)"
    );
    // A snapshot at 6 trims the first run and leaves 7 from the second.
    store
        .commit(batch(2, "r", vec![snapshot(6)]))
        .await
        .unwrap();
    store.checkpoint().await.unwrap();
    let loaded = store.load(2, &id("r")).await.unwrap();
    assert_eq!(seqs(&loaded), (Some(6), vec![7]));
    store.close().await.unwrap();
}

/// Loads racing commits, snapshots and checkpoints (which freeze, write and drop overlay
/// layers) always see one consistent state: the snapshot and the events after it, without
/// a gap or a duplicate, never older than a load before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_racing_checkpoints_see_whole_consistent_states() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(root.path())).unwrap();
    let last: u64 = 1500;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            for seq in 1..=last {
                let mut ops = vec![event(seq)];
                if seq % 97 == 0 {
                    ops.push(snapshot(seq));
                }
                store.commit(batch(1, "race", ops)).await.unwrap();
            }
        })
    };
    let checkpointer = {
        let store = Arc::clone(&store);
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut checkpoints = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                store.checkpoint().await.unwrap();
                checkpoints += 1;
            }
            checkpoints
        })
    };
    let mut seen = 0;
    let mut loads = 0;
    while seen < last {
        let loaded = store.load(1, &id("race")).await.unwrap();
        let (snapshot, events) = seqs(&loaded);
        let base = snapshot.unwrap_or(0);
        let expected: Vec<u64> = (base + 1..=base + events.len() as u64).collect();
        assert_eq!(
            events, expected,
            "a gap or a duplicate after snapshot {base}"
        );
        let now = loaded.last_seq();
        assert!(now >= seen, "went back from {seen} to {now}");
        if let Some(snapshot) = &loaded.snapshot {
            assert_eq!(snapshot.payload, format!("state after {base}").into_bytes());
        }
        seen = now;
        loads += 1;
    }
    writer.await.unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let checkpoints = checkpointer.await.unwrap();
    assert!(
        checkpoints > 1 && loads > 1,
        "{checkpoints} checkpoints, {loads} loads"
    );
    let loaded = store.load(1, &id("race")).await.unwrap();
    assert_eq!(loaded.last_seq(), last);
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_spinning_writer_commits_one_at_a_time_and_in_parallel_and_closes() {
    let root = tempfile::tempdir().unwrap();
    let store = SledStore::open(StoreConfig {
        // Long enough that every sequential commit arrives while the writer spins.
        commit_spin: Duration::from_millis(50),
        ..config(root.path())
    })
    .unwrap();
    // One in flight: each round has one commit, so the load turns light and the writer
    // spins between them.
    let light = || {
        store
            .shared()
            .light_load
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert!(!light(), "light before any round");
    for seq in 1..=50 {
        store
            .commit(batch(0, "one", vec![event(seq)]))
            .await
            .unwrap();
    }
    assert!(light(), "not light after 50 rounds of one commit");
    // Many in flight: larger rounds, no spinning, same outcome.
    let mut commits = tokio::task::JoinSet::new();
    for n in 0..64u32 {
        let store = Arc::clone(&store);
        commits.spawn(async move {
            let key = format!("many-{n}");
            for seq in 1..=5 {
                store
                    .commit(batch(n % 4, &key, vec![event(seq)]))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(joined) = commits.join_next().await {
        joined.unwrap();
    }
    // The writer notices its last sender going even while it spins.
    let closing = Instant::now();
    store.close().await.unwrap();
    assert!(closing.elapsed() < Duration::from_secs(5), "close hung");
    drop(store);

    let store = reopen(root.path(), &root.path().join("data")).unwrap();
    let one = store.load(0, &id("one")).await.unwrap();
    assert_eq!(seqs(&one), (None, (1..=50).collect()));
    for n in 0..64u32 {
        let many = store.load(n % 4, &id(&format!("many-{n}"))).await.unwrap();
        assert_eq!(seqs(&many), (None, vec![1, 2, 3, 4, 5]), "many-{n}");
    }
    store.close().await.unwrap();
}
