//! [`SledStore`]: the [`Store`] on a write-ahead journal plus sled.
//!
//! **Owns**: opening a data dir (directories, migrations, recovery, the start-up checkpoint),
//! the two threads (journal writer, checkpointer) and their shutdown, and the async methods
//! the engine calls. Encoding a batch (frame and sled writes) happens here, in the committing
//! task, so the writer thread only copies bytes, syncs and applies.
//!
//! Layout of a data dir: `state/` is the sled database, `journal/` the segment files (and at
//! most a few `.prep` files: segments being prepared, see `journal::segment`), and
//! `statehouse.lock`, locked while a store is open on it (`data_dir_lock`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;

use super::Durable;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{oneshot, Semaphore};

use crate::address::{EntityId, TYPE_BYTES_MAX};

use super::apply::plan;
use super::checkpoint::{run_checkpointer, CheckpointRequest};
use super::commit_wait::CommitWait;
use super::data_dir_lock::{DataDirLock, LOCK_WAIT};
use super::fsync::{io_error, sled_error, sync_dir};
use super::journal::frame::{body_len, encode_frame, FRAME_BODY_BYTES_MAX};
use super::journal::prepare::SegmentPreparer;
use super::journal::segment::{journal_dir, list_segments, remove_prepared};
use super::journal::JournalPosition;
use super::recovery::{recover, RecoveryReport};
use super::shared::{Shared, StoreStats};
use super::state::{State, SHARD_COUNT_MAX};
use super::writer::{Submission, Writer, WriterConfig, ROUND_BYTES_MAX};
use super::{
    DiskUsage, DueTimer, DueTimers, EntityBatch, LoadedEntity, Op, RecordKind, Store, StoreConfig,
    StoreError, StoredEntry, RECORD_NAME_BYTES_MAX,
};

/// The sled state directory of a data dir.
pub fn state_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("state")
}

/// The store: a journal writer thread, a checkpointer thread, and sled.
pub struct SledStore {
    shared: Arc<Shared>,
    data_dir: PathBuf,
    closed: AtomicBool,
    /// Bounds commits handed to the writer and not yet answered.
    permits: Arc<Semaphore>,
    /// All the permits there are (`StoreConfig::commits_pending_max`).
    commits_pending_max: usize,
    /// How long a lone commit's waiter busy-polls (`StoreConfig::commit_spin`).
    commit_spin: Duration,
    /// The writer's queue; taken (and so closed) by `close`.
    submissions: RwLock<Option<mpsc::Sender<Submission>>>,
    writer: Mutex<Option<JoinHandle<Option<String>>>>,
    checkpoint_requests: mpsc::Sender<CheckpointRequest>,
    checkpointer: Mutex<Option<JoinHandle<()>>>,
    recovery: RecoveryReport,
    /// Held until the store is dropped (after the threads and sled above it).
    _lock: DataDirLock,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("data_dir", &self.data_dir)
            .field("shard_count", &self.shared.state.shard_count())
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SledStore {
    /// Opens (or creates) the data dir: locks it (a second store on it is refused), runs the
    /// format migrations, replays the journal after the last checkpoint (while the new
    /// journal segment is prepared beside it), starts that segment, checkpoints so the replayed
    /// segments can go, and starts the writer and checkpointer threads. Blocking; called once
    /// at start-up.
    pub fn open(config: StoreConfig) -> Result<Arc<SledStore>, StoreError> {
        validate_config(&config)?;
        let data_dir = config.data_dir.clone();
        let state_dir = state_dir(&data_dir);
        let journal_dir = journal_dir(&data_dir);
        for dir in [&data_dir, &state_dir, &journal_dir] {
            std::fs::create_dir_all(dir)
                .map_err(|e| io_error(format!("creating {}", dir.display()), e))?;
        }
        let lock = DataDirLock::acquire(&data_dir, LOCK_WAIT)?;
        sync_dir(&data_dir)?;

        // A `.prep` file is a segment prepared but never installed: not journal data.
        let stale = remove_prepared(&journal_dir)?;
        if stale > 0 {
            tracing::debug!(files = stale, "deleted stale prepared journal segments");
        }
        // The first segment (tens of MB of zeros, synced) is prepared while sled opens and the
        // journal replays. Its id follows the last segment on disk, which recovery confirms
        // unless the checkpoint points past every segment; then it is prepared again below.
        // The writer's own preparer makes the next ones ahead.
        let first_segment = list_segments(&journal_dir)?.last().map_or(0, |(id, _)| *id) + 1;
        let mut preparer = SegmentPreparer::new(journal_dir.clone(), config.journal_segment_bytes);
        preparer.start(first_segment);

        let state = State::open(&state_dir, config.sled_cache_bytes, config.shard_count)?;
        let recovery = recover(&state, &journal_dir)?;
        tracing::info!(
            checkpoint = ?recovery.checkpoint,
            frames_replayed = recovery.frames_replayed,
            torn_tails = recovery.torn_tails.len(),
            corrupt_entities = recovery.corrupt_entities.len(),
            "journal replayed"
        );
        let segment = preparer
            .take_waiting(recovery.next_segment)?
            .install(&journal_dir)?;
        preparer.stop();
        let start = JournalPosition {
            segment: segment.id,
            offset: 0,
        };
        let shared = Arc::new(Shared::new(state, state_dir, journal_dir.clone(), start));
        // Everything replayed is in the overlays now. The checkpoint that writes it to sled and drops
        // the replayed segments runs in the background (below): a large replay can leave a lot
        // of sled to flush, and the journal keeps every replayed frame until it is done.
        let replayed_any = recovery.frames_replayed > 0
            || !recovery.torn_tails.is_empty()
            || !recovery.corrupt_entities.is_empty();

        let (checkpoint_requests, checkpoint_queue) = mpsc::channel();
        let checkpointer = {
            let shared = Arc::clone(&shared);
            let interval = config.checkpoint_interval;
            std::thread::Builder::new()
                .name("statehouse-checkpoint".into())
                .spawn(move || run_checkpointer(shared, checkpoint_queue, interval))
                .map_err(|e| io_error("starting the checkpoint thread", e))?
        };

        if replayed_any {
            // A checkpointer that is gone would have failed to start above.
            let _ = checkpoint_requests.send(CheckpointRequest::JournalBytes);
        }

        let (submissions, queue) = mpsc::channel();
        let request = checkpoint_requests.clone();
        let requester = Arc::clone(&shared);
        let writer = Writer::new(
            WriterConfig {
                durability: config.durability,
                async_sync_window: config.async_sync_window,
                segment_bytes_max: config.journal_segment_bytes,
                round_bytes_max: ROUND_BYTES_MAX,
                checkpoint_journal_bytes: config.checkpoint_journal_bytes,
                idle_spin: config.commit_spin,
            },
            journal_dir,
            segment,
            Arc::clone(&shared),
            Box::new(move || {
                if !requester.checkpoint_requested.swap(true, Ordering::SeqCst) {
                    // A checkpointer that is gone is shutting down; nothing to do.
                    let _ = request.send(CheckpointRequest::JournalBytes);
                }
            }),
        );
        let writer = match std::thread::Builder::new()
            .name("statehouse-journal".into())
            .spawn(move || writer.run(queue))
        {
            Ok(handle) => handle,
            Err(e) => {
                let _ = checkpoint_requests.send(CheckpointRequest::Stop);
                let _ = checkpointer.join();
                return Err(io_error("starting the journal writer thread", e));
            }
        };

        Ok(Arc::new(SledStore {
            shared,
            data_dir,
            closed: AtomicBool::new(false),
            permits: Arc::new(Semaphore::new(config.commits_pending_max)),
            commits_pending_max: config.commits_pending_max,
            commit_spin: config.commit_spin,
            submissions: RwLock::new(Some(submissions)),
            writer: Mutex::new(Some(writer)),
            checkpoint_requests,
            checkpointer: Mutex::new(Some(checkpointer)),
            recovery,
            _lock: lock,
        }))
    }

    /// The data dir this store was opened on.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// What recovery found and did when the store was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// Counters since the store was opened.
    pub fn stats(&self) -> StoreStats {
        let mut stats = self.shared.counters.snapshot();
        stats.overlay_bytes = self.shared.overlay_bytes();
        stats
    }

    /// The threads' shared state, for tests that look inside.
    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Commit permits not taken, for tests.
    #[cfg(test)]
    pub(crate) fn permits_available(&self) -> usize {
        self.permits.available_permits()
    }

    fn check_open(&self) -> Result<(), StoreError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    /// Stops both threads without a final checkpoint (what a crash would leave, minus the
    /// lost page cache). Used by `Drop` when `close` was not called.
    fn stop_threads(&self) {
        self.submissions.write().take();
        if let Some(writer) = self.writer.lock().take() {
            let _ = writer.join();
        }
        let _ = self.checkpoint_requests.send(CheckpointRequest::Stop);
        if let Some(checkpointer) = self.checkpointer.lock().take() {
            let _ = checkpointer.join();
        }
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

fn validate_config(config: &StoreConfig) -> Result<(), StoreError> {
    let invalid = |what: String| Err(StoreError::InvalidInput(format!("store config: {what}")));
    if config.shard_count == 0 || config.shard_count > SHARD_COUNT_MAX {
        return invalid(format!(
            "shard_count {} is outside 1..={SHARD_COUNT_MAX}",
            config.shard_count
        ));
    }
    if config.commits_pending_max == 0 || config.commits_pending_max > Semaphore::MAX_PERMITS {
        return invalid(format!(
            "commits_pending_max {} is outside 1..={}",
            config.commits_pending_max,
            Semaphore::MAX_PERMITS
        ));
    }
    if config.journal_segment_bytes == 0 {
        return invalid("journal_segment_bytes must be at least 1".into());
    }
    if config.checkpoint_journal_bytes == 0 {
        return invalid("checkpoint_journal_bytes must be at least 1".into());
    }
    Ok(())
}

/// Runs blocking sled work off the runtime's threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: the runtime is shutting down.
        Err(_) => Err(StoreError::Closed),
    }
}

fn check_entity(entity: &EntityId) -> Result<(), StoreError> {
    entity
        .validate()
        .map_err(|e| StoreError::InvalidInput(format!("entity address: {e}")))
}

fn check_name(name: &[u8]) -> Result<(), StoreError> {
    if name.len() > RECORD_NAME_BYTES_MAX {
        return Err(StoreError::InvalidInput(format!(
            "record name of {} bytes; the limit is {RECORD_NAME_BYTES_MAX}",
            name.len()
        )));
    }
    Ok(())
}

/// Checks the record names of a batch's operations.
fn check_op_names(ops: &[Op]) -> Result<(), StoreError> {
    for op in ops {
        match op {
            Op::PutRecord { name, .. }
            | Op::RemoveRecord { name, .. }
            | Op::PutTimerDue { name, .. }
            | Op::RemoveTimerDue { name, .. } => check_name(name)?,
            Op::Event { .. } | Op::Snapshot { .. } | Op::Delete => {}
        }
    }
    Ok(())
}

#[async_trait]
impl Store for SledStore {
    fn shard_count(&self) -> u32 {
        self.shared.state.shard_count()
    }

    async fn submit(&self, batch: EntityBatch) -> Result<Durable, StoreError> {
        self.check_open()?;
        self.shared.state.shard(batch.shard)?;
        check_entity(&batch.entity)?;
        check_op_names(&batch.ops)?;
        let body_bytes = body_len(&batch.ops);
        if body_bytes > FRAME_BODY_BYTES_MAX {
            return Err(StoreError::InvalidInput(format!(
                "the batch of {} encodes to {body_bytes} bytes; the limit is {FRAME_BODY_BYTES_MAX}",
                batch.entity
            )));
        }
        let frame = encode_frame(&batch);
        let writes = plan(&batch.entity, &batch.ops);

        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let (done, answer) = oneshot::channel();
        {
            let submissions = self.submissions.read();
            let Some(submissions) = submissions.as_ref() else {
                return Err(StoreError::Closed);
            };
            submissions
                .send(Submission {
                    frame,
                    shard: batch.shard,
                    writes,
                    done,
                    _permit: Some(permit),
                })
                .map_err(|_| {
                    StoreError::JournalFailed("the journal writer thread has stopped".into())
                })?;
        }
        Ok(Durable::new(CommitWait::new(
            answer,
            Arc::clone(&self.shared.light_load),
            Arc::clone(&self.permits),
            self.commits_pending_max,
            self.commit_spin,
        )))
    }

    async fn load(&self, shard: u32, entity: &EntityId) -> Result<LoadedEntity, StoreError> {
        self.check_open()?;
        self.shared.state.shard(shard)?;
        check_entity(entity)?;
        let shared = Arc::clone(&self.shared);
        let entity = entity.clone();
        blocking(move || shared.state.load(shard, &entity)).await
    }

    async fn record(
        &self,
        shard: u32,
        entity: &EntityId,
        kind: RecordKind,
        name: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.check_open()?;
        self.shared.state.shard(shard)?;
        check_entity(entity)?;
        check_name(name)?;
        let shared = Arc::clone(&self.shared);
        let entity = entity.clone();
        let name = name.to_vec();
        blocking(move || shared.state.record(shard, &entity, kind, &name)).await
    }

    async fn entity_records(
        &self,
        shard: u32,
        entity: &EntityId,
        kind: RecordKind,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        self.check_open()?;
        self.shared.state.shard(shard)?;
        check_entity(entity)?;
        let shared = Arc::clone(&self.shared);
        let entity = entity.clone();
        blocking(move || shared.state.entity_records(shard, &entity, kind)).await
    }

    async fn scan_records(
        &self,
        shard: u32,
        kind: RecordKind,
        after: Option<(EntityId, Vec<u8>)>,
        limit: usize,
    ) -> Result<Vec<(EntityId, StoredEntry)>, StoreError> {
        self.check_open()?;
        self.shared.state.shard(shard)?;
        if let Some((entity, name)) = &after {
            check_entity(entity)?;
            check_name(name)?;
        }
        let shared = Arc::clone(&self.shared);
        blocking(move || shared.state.scan_records(shard, kind, after, limit)).await
    }

    async fn due_timers(
        &self,
        shard: u32,
        after: Option<DueTimer>,
        up_to_ms: u64,
        limit: usize,
    ) -> Result<DueTimers, StoreError> {
        self.check_open()?;
        self.shared.state.shard(shard)?;
        if let Some(timer) = &after {
            check_entity(&timer.entity)?;
            check_name(&timer.name)?;
        }
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            shared
                .state
                .due_timers(shard, after.as_ref(), up_to_ms, limit)
        })
        .await
    }

    async fn list(
        &self,
        entity_type: &str,
        key_prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.check_open()?;
        if entity_type.is_empty() || entity_type.len() > TYPE_BYTES_MAX {
            return Err(StoreError::InvalidInput(format!(
                "entity type of {} bytes; it must have 1 to {TYPE_BYTES_MAX}",
                entity_type.len()
            )));
        }
        let shared = Arc::clone(&self.shared);
        let entity_type = entity_type.to_owned();
        let key_prefix = key_prefix.to_owned();
        let start_after = start_after.map(str::to_owned);
        blocking(move || {
            shared
                .state
                .list(&entity_type, &key_prefix, start_after.as_deref(), limit)
        })
        .await
    }

    async fn put_catalog(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.check_open()?;
        let shared = Arc::clone(&self.shared);
        let key = key.to_owned();
        blocking(move || {
            shared
                .state
                .catalog
                .insert(key.as_bytes(), value)
                .map(drop)
                .map_err(|e| sled_error(format!("writing catalog record {key}"), e))
        })
        .await?;
        // A checkpoint flushes sled and fsyncs its files: the record is durable when it returns.
        self.checkpoint().await
    }

    async fn catalog(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.check_open()?;
        let shared = Arc::clone(&self.shared);
        let prefix = prefix.to_owned();
        blocking(move || {
            let mut records = Vec::new();
            for entry in shared.state.catalog.scan_prefix(prefix.as_bytes()) {
                let (key, value) = entry.map_err(|e| sled_error("reading the catalog", e))?;
                let key = String::from_utf8(key.to_vec())
                    .map_err(|_| StoreError::Metadata("a catalog key is not UTF-8".into()))?;
                records.push((key, value.to_vec()));
            }
            Ok(records)
        })
        .await
    }

    async fn usage(&self) -> Result<(StoreStats, DiskUsage), StoreError> {
        let shared = Arc::clone(&self.shared);
        let disk =
            blocking(move || super::disk_usage::measure(&shared.state_dir, &shared.journal_dir))
                .await?;
        Ok((self.stats(), disk))
    }

    async fn checkpoint(&self) -> Result<(), StoreError> {
        self.check_open()?;
        let (reply, answer) = oneshot::channel();
        self.checkpoint_requests
            .send(CheckpointRequest::Now(reply))
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn close(&self) -> Result<(), StoreError> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        // Commits waiting for a permit fail; those already queued are completed.
        self.permits.close();
        self.submissions.write().take();
        let writer = self.writer.lock().take();
        let poisoned = match writer {
            Some(writer) => {
                blocking(move || {
                    writer.join().map_err(|_| {
                        StoreError::JournalFailed("the journal writer thread panicked".into())
                    })
                })
                .await?
            }
            None => None,
        };

        let (reply, answer) = oneshot::channel();
        let final_checkpoint = match self.checkpoint_requests.send(CheckpointRequest::Now(reply)) {
            Ok(()) => answer.await.unwrap_or(Err(StoreError::Closed)),
            Err(_) => Err(StoreError::Closed),
        };
        let _ = self.checkpoint_requests.send(CheckpointRequest::Stop);
        let checkpointer = self.checkpointer.lock().take();
        if let Some(checkpointer) = checkpointer {
            blocking(move || {
                checkpointer
                    .join()
                    .map_err(|_| StoreError::Metadata("the checkpoint thread panicked".into()))
            })
            .await?;
        }
        final_checkpoint?;
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            shared
                .state
                .db
                .flush()
                .map(|_| ())
                .map_err(|e| sled_error("flushing sled at close", e))
        })
        .await?;
        match poisoned {
            Some(reason) => Err(StoreError::JournalFailed(reason)),
            None => Ok(()),
        }
    }
}
