//! The group-commit writer: the one thread that appends to the journal.
//!
//! **Owns**: the open journal segment, `fdatasync`, segment rolling (with the
//! [`SegmentPreparer`] that prepares the next segment ahead), and applying committed batches
//! to the shards' overlays in commit order.
//!
//! Segments are preallocated with synced zeros (see `journal::segment`), so a round's write
//! overwrites blocks that exist and its `fdatasync` flushes data only, without a filesystem
//! journal commit for a changed file size. A roll syncs the full segment, cuts it to its data
//! and syncs that, and only then installs the next one (prepared in the background while this
//! one filled, or prepared on the spot if it is not ready). A clean stop cuts the open segment
//! to its data too, so only a segment the process died while writing ends in zeros.
//!
//! Between rounds the writer waits for the next submission: under light load it first
//! busy-waits up to `idle_spin` (see [`Writer::next_submission`]), then sleeps.
//!
//! A round: take the first [`Submission`], drain whatever else is already queued (up to
//! [`ROUND_BYTES_MAX`]), append every frame with one `write`, `fdatasync` once, apply each
//! batch to its shard's in-memory overlay (sled receives it at the next checkpoint: the
//! journal is what makes it durable until then), then wake every waiter. With
//! `Durability::Async` the waiters are woken before the sync, which follows within the
//! configured window (`recv_timeout` wakes the thread for it).
//!
//! Napkin math: one `fdatasync` on this kind of machine takes ~150 µs, so one-sync-per-commit
//! tops out near 6 000 commits/s; a round carries every commit that arrived during the
//! previous sync, so throughput grows with concurrency until the round cap (4 MiB at
//! ~1 GB/s is ~4 ms of writing) or the CPU binds.
//!
//! A failed write or sync **poisons** the writer: after a failed `fdatasync` nothing can be
//! assumed about the file's contents, so that round and every later commit answer
//! [`StoreError::JournalFailed`] and recovery at the next start sorts out what is durable.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::apply::SledOp;
use super::journal::prepare::SegmentPreparer;
use super::journal::segment::OpenSegment;
use super::journal::JournalPosition;
use super::shared::{Counters, Shared};
use super::{Durability, StoreError};

/// A round stops draining the queue once its frames reach this many bytes (it may exceed it
/// by one frame, since the frame that crosses the line is already taken).
pub const ROUND_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Light load: the recent rounds averaged at most this many commits (about one request in
/// flight). Only then does the writer spin (up to `WriterConfig::idle_spin`) for the next
/// commit before it sleeps, and a lone commit's waiter for its answer (`commit_wait`).
pub const LIGHT_LOAD_ROUND_COMMITS: f32 = 1.5;

/// The weight of the newest round in the running average of commits per round.
const ROUND_AVERAGE_WEIGHT: f32 = 1.0 / 8.0;

/// The writer stalls while the overlays hold this many times `checkpoint_journal_bytes`.
pub const OVERLAY_STALL_FACTOR: u64 = 2;

/// One batch handed to the writer: encoded by the committing task, so the writer only copies.
pub(crate) struct Submission {
    /// The encoded journal frame.
    pub frame: Vec<u8>,
    pub shard: u32,
    /// The sled writes of the batch.
    pub writes: Vec<SledOp>,
    /// Answered once the batch is durable (per the durability mode) and applied.
    pub done: oneshot::Sender<Result<(), StoreError>>,
    /// Bounds the commits in flight; released when the submission is answered and dropped.
    pub _permit: Option<OwnedSemaphorePermit>,
}

/// The writer's settings.
#[derive(Debug, Clone)]
pub(crate) struct WriterConfig {
    pub durability: Durability,
    pub async_sync_window: Duration,
    pub segment_bytes_max: u64,
    pub round_bytes_max: usize,
    pub checkpoint_journal_bytes: u64,
    /// Under light load, how long to busy-wait for a commit before sleeping.
    pub idle_spin: Duration,
}

/// The writer thread's state.
pub(crate) struct Writer {
    config: WriterConfig,
    journal_dir: PathBuf,
    segment: OpenSegment,
    /// Prepares the segment after `segment` in the background.
    preparer: SegmentPreparer,
    shared: Arc<Shared>,
    /// Why the writer refuses everything, once a write, sync or segment roll failed.
    poisoned: Option<String>,
    /// With `Durability::Async`: when the oldest unsynced write happened.
    unsynced_since: Option<Instant>,
    synced: JournalPosition,
    applied: JournalPosition,
    /// Asks the checkpointer for a checkpoint (enough journal was written).
    request_checkpoint: Box<dyn Fn() + Send>,
    bytes_since_checkpoint_request: u64,
    /// Reused for each round's single write.
    buffer: Vec<u8>,
    /// Commits per round, a running average over the recent rounds.
    round_commits_average: f32,
}

impl Writer {
    /// A writer appending to `segment`, which is new and empty. Starts preparing the next
    /// segment in the background.
    pub(crate) fn new(
        config: WriterConfig,
        journal_dir: PathBuf,
        segment: OpenSegment,
        shared: Arc<Shared>,
        request_checkpoint: Box<dyn Fn() + Send>,
    ) -> Writer {
        let start = JournalPosition {
            segment: segment.id,
            offset: segment.len,
        };
        // `Shared::new` published this start, before the checkpointer could read it.
        debug_assert_eq!(*shared.checkpointable.lock(), start);
        debug_assert_eq!(shared.writer_segment.load(Ordering::SeqCst), segment.id);
        let mut preparer = SegmentPreparer::new(journal_dir.clone(), config.segment_bytes_max);
        preparer.start(segment.id + 1);
        Writer {
            config,
            journal_dir,
            segment,
            preparer,
            shared,
            poisoned: None,
            unsynced_since: None,
            synced: start,
            applied: start,
            request_checkpoint,
            bytes_since_checkpoint_request: 0,
            buffer: Vec::new(),
            // Not light until rounds of one commit have been seen for a while.
            round_commits_average: 8.0,
        }
    }

    /// Runs until every sender of `submissions` is gone, then syncs what is unsynced, stops the
    /// preparer (deleting what it prepared) and cuts the open segment to its data. Returns why
    /// the writer was poisoned, if it was.
    pub(crate) fn run(mut self, submissions: Receiver<Submission>) -> Option<String> {
        loop {
            let first = match self.sync_deadline() {
                None => match self.next_submission(&submissions) {
                    Some(first) => first,
                    None => break,
                },
                Some(deadline) => {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    match submissions.recv_timeout(wait) {
                        Ok(first) => first,
                        Err(RecvTimeoutError::Timeout) => {
                            self.sync_now();
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            let mut bytes = first.frame.len();
            let mut round = vec![first];
            while bytes < self.config.round_bytes_max {
                match submissions.try_recv() {
                    Ok(next) => {
                        bytes += next.frame.len();
                        round.push(next);
                    }
                    Err(_) => break,
                }
            }
            self.note_round(round.len());
            self.run_round(round);
        }
        if self.unsynced_since.is_some() {
            self.sync_now();
        }
        self.preparer.stop();
        // A poisoned writer leaves the segment as it is: after a failed write or sync nothing
        // about the file can be assumed, and recovery sorts out where its data ends.
        if self.poisoned.is_none() {
            if let Err(e) = self.segment.finish() {
                self.poison(&format!(
                    "cutting journal segment {} to its {} bytes of data at close failed: {e}",
                    self.segment.path.display(),
                    self.segment.len
                ));
            }
        }
        self.poisoned
    }

    /// Folds a round of `commits` into the running average and publishes whether the load is
    /// light.
    fn note_round(&mut self, commits: usize) {
        self.round_commits_average +=
            ROUND_AVERAGE_WEIGHT * (commits as f32 - self.round_commits_average);
        let light = self.round_commits_average <= LIGHT_LOAD_ROUND_COMMITS;
        self.shared.light_load.store(light, Ordering::Relaxed);
    }

    /// Waits for the next submission; `None` once every sender is gone.
    ///
    /// Spin, then sleep: under light load (rounds of about one commit: one request in
    /// flight), the next commit usually arrives within a client round trip, and waking a
    /// sleeping thread costs tens of microseconds on a VM, a large share of a 200 µs commit.
    /// So the writer busy-waits up to `idle_spin` first. Under load it does not spin (even
    /// after a round that happened to carry one commit) and leaves the CPU to the request path.
    fn next_submission(&self, submissions: &Receiver<Submission>) -> Option<Submission> {
        if !self.config.idle_spin.is_zero() && self.shared.light_load.load(Ordering::Relaxed) {
            let until = Instant::now() + self.config.idle_spin;
            loop {
                match submissions.try_recv() {
                    Ok(next) => return Some(next),
                    Err(TryRecvError::Disconnected) => return None,
                    Err(TryRecvError::Empty) if Instant::now() >= until => break,
                    Err(TryRecvError::Empty) => std::hint::spin_loop(),
                }
            }
        }
        submissions.recv().ok()
    }

    /// When the async-mode sync is due, if writes are waiting for one.
    fn sync_deadline(&self) -> Option<Instant> {
        self.unsynced_since
            .map(|since| since + self.config.async_sync_window)
    }

    fn run_round(&mut self, mut round: Vec<Submission>) {
        Counters::add(&self.shared.counters.commits, round.len() as u64);
        if let Some(reason) = &self.poisoned {
            let reason = reason.clone();
            fail_all(round, &reason);
            return;
        }

        self.buffer.clear();
        for submission in &round {
            self.buffer.extend_from_slice(&submission.frame);
        }
        let offset = self.segment.len;
        if let Err(e) = self.segment.append(&self.buffer) {
            let reason = format!(
                "writing {} bytes to journal segment {} at offset {offset} failed: {e}",
                self.buffer.len(),
                self.segment.path.display()
            );
            self.poison(&reason);
            fail_all(round, &reason);
            return;
        }
        Counters::add(&self.shared.counters.journal_rounds, 1);
        Counters::add(
            &self.shared.counters.journal_bytes,
            self.buffer.len() as u64,
        );

        match self.config.durability {
            Durability::Sync => {
                if let Err(reason) = self.sync_segment() {
                    fail_all(round, &reason);
                    return;
                }
            }
            Durability::Async => {
                self.unsynced_since.get_or_insert_with(Instant::now);
            }
        }

        self.apply(&mut round);
        self.applied = self.position();
        self.publish();
        for submission in round {
            // A waiter that gave up (its future was dropped) is no error of ours.
            let _ = submission.done.send(Ok(()));
        }

        if self
            .sync_deadline()
            .is_some_and(|deadline| deadline <= Instant::now())
        {
            self.sync_now();
        }
        self.roll_if_full();
        self.request_checkpoint_if_due();
    }

    /// Applies the round's batches to their shards' overlays, in commit order, each shard's
    /// share as one step for readers. Nothing here touches sled, and nothing can fail: a
    /// checkpoint writes the overlays to sled later, and the journal covers them until it does.
    /// (`submit` only accepts batches of shards that exist.)
    fn apply(&mut self, round: &mut [Submission]) {
        let mut by_shard: BTreeMap<u32, Vec<Vec<SledOp>>> = BTreeMap::new();
        for submission in round.iter_mut() {
            by_shard
                .entry(submission.shard)
                .or_default()
                .push(std::mem::take(&mut submission.writes));
        }
        for (n, batches) in by_shard {
            let shard = self.shared.state.shards.get(n as usize);
            debug_assert!(shard.is_some(), "submit accepted a batch of shard {n}");
            if let Some(shard) = shard {
                shard.overlay.apply(batches);
            }
        }
    }

    fn position(&self) -> JournalPosition {
        JournalPosition {
            segment: self.segment.id,
            offset: self.segment.len,
        }
    }

    /// Publishes the position a checkpoint may record: applied to the overlays and synced.
    fn publish(&self) {
        *self.shared.checkpointable.lock() = self.applied.min(self.synced);
    }

    /// `fdatasync`s the segment; a failure poisons the writer.
    fn sync_segment(&mut self) -> Result<(), String> {
        if let Err(e) = self.segment.sync() {
            let reason = format!(
                "fdatasync of journal segment {} failed: {e}",
                self.segment.path.display()
            );
            self.poison(&reason);
            return Err(reason);
        }
        Counters::add(&self.shared.counters.journal_fsyncs, 1);
        self.synced = self.position();
        self.unsynced_since = None;
        Ok(())
    }

    /// The async-mode sync.
    fn sync_now(&mut self) {
        if self.poisoned.is_some() {
            self.unsynced_since = None;
            return;
        }
        if self.sync_segment().is_ok() {
            self.publish();
        }
    }

    /// Starts a new segment once the current one is past its size. The old one is synced and
    /// cut to its data (and that synced) first, so only the last segment can ever have a torn
    /// or zero tail.
    fn roll_if_full(&mut self) {
        if self.poisoned.is_some() || self.segment.len < self.config.segment_bytes_max {
            return;
        }
        let old_end = self.position();
        if self.synced < old_end && self.sync_segment().is_err() {
            return;
        }
        if let Err(e) = self.segment.finish() {
            self.poison(&format!(
                "cutting full journal segment {} to its {} bytes of data failed: {e}",
                self.segment.path.display(),
                self.segment.len
            ));
            return;
        }
        let next_id = self.segment.id + 1;
        let next = self
            .preparer
            .take(next_id)
            .and_then(|prepared| prepared.install(&self.journal_dir));
        match next {
            Ok(next) => {
                tracing::debug!(segment = %next.path.display(), "journal segment started");
                self.segment = next;
                self.preparer.start(next_id + 1);
                self.shared
                    .writer_segment
                    .store(self.segment.id, Ordering::SeqCst);
                // When everything in the old segment is applied (and it is now synced), the
                // start of the new one is a checkpointable position: the old one can go.
                if self.applied == old_end {
                    self.applied = self.position();
                }
                self.synced = self.position();
                self.publish();
            }
            Err(e) => self.poison(&format!("starting a new journal segment failed: {e}")),
        }
    }

    /// Asks for a checkpoint once the journal bytes written since the last request, or the
    /// overlays' size, reach `checkpoint_journal_bytes`. While the overlays hold more than
    /// [`OVERLAY_STALL_FACTOR`] times that (checkpoints are not keeping up), the writer waits
    /// for one to bring them down: commits slow down instead of memory growing without bound.
    fn request_checkpoint_if_due(&mut self) {
        let limit = self.config.checkpoint_journal_bytes;
        self.bytes_since_checkpoint_request += self.buffer.len() as u64;
        let overlay_bytes = self.shared.overlay_bytes();
        if self.bytes_since_checkpoint_request >= limit || overlay_bytes >= limit {
            self.bytes_since_checkpoint_request = 0;
            (self.request_checkpoint)();
        }
        let stall_at = limit.saturating_mul(OVERLAY_STALL_FACTOR);
        if overlay_bytes >= stall_at {
            self.wait_for_checkpoint(stall_at);
        }
    }

    fn wait_for_checkpoint(&mut self, stall_at: u64) {
        Counters::add(&self.shared.counters.overlay_stalls, 1);
        let started = Instant::now();
        let mut warned = false;
        let mut waiting = self.shared.overlay_lock.lock();
        while self.shared.overlay_bytes() >= stall_at {
            (self.request_checkpoint)();
            if !warned && started.elapsed() >= Duration::from_secs(1) {
                warned = true;
                tracing::warn!(
                    overlay_bytes = self.shared.overlay_bytes(),
                    stall_at,
                    "commits wait for a checkpoint: the overlays of writes not yet in sled are full"
                );
            }
            self.shared
                .overlay_released
                .wait_for(&mut waiting, Duration::from_secs(1));
        }
    }

    fn poison(&mut self, reason: &str) {
        if self.poisoned.is_none() {
            tracing::error!(
                reason,
                "journal writer poisoned; commits fail until restart"
            );
            self.poisoned = Some(reason.to_owned());
        }
    }
}

fn fail_all(round: Vec<Submission>, reason: &str) {
    for submission in round {
        let _ = submission
            .done
            .send(Err(StoreError::JournalFailed(reason.to_owned())));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::address::EntityId;
    use crate::storage::apply::plan;
    use crate::storage::journal::frame::encode_frame;
    use crate::storage::state::State;
    use crate::storage::{EntityBatch, Op};

    fn submission(key: &str) -> (Submission, oneshot::Receiver<Result<(), StoreError>>) {
        let batch = EntityBatch {
            shard: 0,
            entity: EntityId::new("t", key).unwrap(),
            ops: vec![Op::Event {
                seq: 1,
                behaviour_version: 1,
                payload: b"p".to_vec(),
            }],
        };
        let (done, answer) = oneshot::channel();
        let submission = Submission {
            frame: encode_frame(&batch),
            shard: 0,
            writes: plan(&batch.entity, &batch.ops),
            done,
            _permit: None,
        };
        (submission, answer)
    }

    #[test]
    fn a_failed_write_poisons_the_writer_and_applies_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("state"), 1 << 20, 1).unwrap();
        let shared = Arc::new(Shared::new(
            state,
            dir.path().join("state"),
            dir.path().join("journal"),
            JournalPosition {
                segment: 1,
                offset: 0,
            },
        ));
        // Every write to /dev/full fails with ENOSPC.
        let path = PathBuf::from("/dev/full");
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let writer = Writer::new(
            WriterConfig {
                durability: Durability::Sync,
                async_sync_window: Duration::from_millis(10),
                // Small: the writer prepares the next segment (in `dir`) at this size.
                segment_bytes_max: 4096,
                round_bytes_max: ROUND_BYTES_MAX,
                checkpoint_journal_bytes: u64::MAX,
                idle_spin: Duration::ZERO,
            },
            dir.path().to_path_buf(),
            OpenSegment::from_file(1, path, file),
            Arc::clone(&shared),
            Box::new(|| {}),
        );
        let (submissions, queue) = mpsc::channel();
        let thread = std::thread::spawn(move || writer.run(queue));

        let (first, first_answer) = submission("a");
        submissions.send(first).unwrap();
        let err = first_answer.blocking_recv().unwrap().unwrap_err();
        assert!(
            matches!(&err, StoreError::JournalFailed(reason) if reason.contains("/dev/full")),
            "{err}"
        );
        let (second, second_answer) = submission("b");
        submissions.send(second).unwrap();
        assert!(matches!(
            second_answer.blocking_recv().unwrap(),
            Err(StoreError::JournalFailed(_))
        ));

        drop(submissions);
        let poisoned = thread.join().unwrap();
        assert!(poisoned.is_some());
        assert_eq!(shared.state.shards[0].tree.len(), 0, "nothing applied");
        assert_eq!(shared.counters.snapshot().journal_fsyncs, 0);
        assert_eq!(
            *shared.checkpointable.lock(),
            JournalPosition {
                segment: 1,
                offset: 0
            },
            "the checkpointable position never moved"
        );
    }

    #[tokio::test]
    async fn a_roll_cuts_the_full_segment_to_its_data_and_the_next_is_prepared() {
        use crate::storage::journal::{locate_frames, segment_paths};
        use crate::storage::{SledStore, Store, StoreConfig};

        let dir = tempfile::tempdir().unwrap();
        let segment_bytes = 64 * 1024;
        let store = SledStore::open(StoreConfig {
            shard_count: 1,
            journal_segment_bytes: segment_bytes,
            commits_pending_max: 64,
            ..StoreConfig::for_tests(dir.path().join("data"))
        })
        .unwrap();
        let data_dir = dir.path().join("data");
        let mut seq = 0;
        while segment_paths(&data_dir).unwrap().len() < 3 {
            seq += 1;
            store
                .commit(EntityBatch {
                    shard: 0,
                    entity: EntityId::new("t", "k").unwrap(),
                    ops: vec![Op::Event {
                        seq,
                        behaviour_version: 1,
                        payload: vec![7; 1000],
                    }],
                })
                .await
                .unwrap();
            assert!(seq < 1000, "no roll after {seq} commits");
        }
        let segments = segment_paths(&data_dir).unwrap();
        let data_len = |path: &std::path::Path| {
            locate_frames(path)
                .unwrap()
                .last()
                .map_or(0, |f| f.offset + f.len)
        };
        for full in &segments[..segments.len() - 1] {
            let len = std::fs::metadata(full).unwrap().len();
            assert!(len >= segment_bytes, "{}: {len}", full.display());
            assert_eq!(len, data_len(full), "{} is cut to its data", full.display());
        }
        let open = segments.last().unwrap();
        assert_eq!(
            std::fs::metadata(open).unwrap().len(),
            segment_bytes,
            "the open segment is preallocated"
        );
        store.close().await.unwrap();
        assert_eq!(std::fs::metadata(open).unwrap().len(), data_len(open));
        let names: Vec<String> = std::fs::read_dir(data_dir.join("journal"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| n.ends_with(".wal")),
            "no prepared file left after close: {names:?}"
        );
    }
}
