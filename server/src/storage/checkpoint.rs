//! Checkpoints: writing the shards' overlays to sled, making sled durable up to a journal
//! position, then trimming the journal.
//!
//! **Owns**: [`checkpoint`] and the checkpointer thread that runs it every
//! `checkpoint_interval`, when the writer reports `checkpoint_journal_bytes` written, and on
//! request.
//!
//! A checkpoint takes the writer's checkpointable position P (every frame before it is
//! applied to the overlays and synced in the journal), then freezes every shard's active
//! overlay layer (which therefore holds at least every frame before P; frames after P that it
//! also holds are replayed again after a crash, which is idempotent), writes the frozen layers
//! to sled, records P in `meta`, flushes sled, `fsync`s every file and directory under the
//! state dir (sled's flush alone is not power-loss durable, sled issue 1452), drops the frozen
//! layers, and only then deletes the journal segments wholly before P's segment. It never
//! holds a lock the writer waits on for long: freezing swaps a layer out under the overlay's
//! write lock, and the writer keeps applying to the new active layer meanwhile. A checkpoint
//! that fails leaves its frozen layers in place (reads stay right) for the next one to write.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::fsync::{remove_files, sled_error, sync_tree};
use super::journal::segment::list_segments;
use super::journal::JournalPosition;
use super::shared::{Counters, Shared};
use super::StoreError;

/// The shortest interval between periodic checkpoints, whatever the configuration says.
pub const CHECKPOINT_INTERVAL_MIN: Duration = Duration::from_millis(10);

/// What one checkpoint did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CheckpointOutcome {
    pub position: JournalPosition,
    pub segments_deleted: usize,
}

/// Runs one checkpoint. Blocking; checkpoints are serialised by `Shared::checkpoint_lock`.
pub(crate) fn checkpoint(shared: &Shared) -> Result<CheckpointOutcome, StoreError> {
    let mut last = shared.checkpoint_lock.lock();
    let position = *shared.checkpointable.lock();
    debug_assert!(last.is_none_or(|l| l <= position), "checkpoints go forward");

    let shards = &shared.state.shards;
    let overlay_bytes = shared.overlay_bytes();
    let frozen: Vec<_> = shards.iter().map(|shard| shard.overlay.freeze()).collect();
    for (n, (shard, layers)) in shards.iter().zip(&frozen).enumerate() {
        for layer in layers {
            layer
                .write_to(&shard.tree)
                .map_err(|e| sled_error(format!("writing shard {n}'s overlay to sled"), e))?;
        }
    }
    shared.state.write_checkpoint(position)?;
    shared
        .state
        .db
        .flush()
        .map_err(|e| sled_error("flushing sled for a checkpoint", e))?;
    sync_tree(&shared.state_dir)?;
    for (shard, layers) in shards.iter().zip(&frozen) {
        shard.overlay.release(layers.len());
    }
    {
        let _waiting = shared.overlay_lock.lock();
        shared.overlay_released.notify_all();
    }

    // Only now is sled durable up to `position`; the segments before it can go. The
    // writer's own segment is never deleted, and P never points past it.
    let writer_segment = shared.writer_segment.load(Ordering::SeqCst);
    let keep_from = position.segment.min(writer_segment);
    let behind = list_segments(&shared.journal_dir)?
        .into_iter()
        .take_while(|(id, _)| *id < keep_from)
        .map(|(_, path)| path);
    let deleted = remove_files(&shared.journal_dir, behind, "journal segment")?;
    *last = Some(position);
    Counters::add(&shared.counters.checkpoints, 1);
    Counters::add(&shared.counters.segments_deleted, deleted as u64);
    tracing::debug!(
        %position,
        segments_deleted = deleted,
        overlay_bytes_written = overlay_bytes,
        overlay_bytes_now = shared.overlay_bytes(),
        "checkpoint"
    );
    Ok(CheckpointOutcome {
        position,
        segments_deleted: deleted,
    })
}

/// Whether the writer moved past the last checkpoint, i.e. there is journal to trim.
fn worth_it(shared: &Shared) -> bool {
    let last = *shared.checkpoint_lock.lock();
    last != Some(*shared.checkpointable.lock())
}

/// Messages to the checkpointer thread.
pub(crate) enum CheckpointRequest {
    /// Run one now and answer.
    Now(oneshot::Sender<Result<(), StoreError>>),
    /// The writer wrote `checkpoint_journal_bytes` since its last request.
    JournalBytes,
    /// Exit.
    Stop,
}

/// The checkpointer thread's loop. Periodic and journal-bytes checkpoints that fail are
/// logged and retried at the next occasion; requested ones report their error.
pub(crate) fn run_checkpointer(
    shared: Arc<Shared>,
    requests: Receiver<CheckpointRequest>,
    interval: Duration,
) {
    let interval = interval.max(CHECKPOINT_INTERVAL_MIN);
    let mut due = Instant::now() + interval;
    loop {
        let wait = due.saturating_duration_since(Instant::now());
        match requests.recv_timeout(wait) {
            Ok(CheckpointRequest::Now(reply)) => {
                let outcome = checkpoint(&shared).map(|_| ());
                let _ = reply.send(outcome);
            }
            Ok(CheckpointRequest::JournalBytes) => {
                shared.checkpoint_requested.store(false, Ordering::SeqCst);
                if worth_it(&shared) {
                    run_logged(&shared, "journal bytes");
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if worth_it(&shared) {
                    run_logged(&shared, "interval");
                }
            }
            Ok(CheckpointRequest::Stop) | Err(RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() >= due {
            due = Instant::now() + interval;
        }
    }
}

fn run_logged(shared: &Shared, trigger: &str) {
    if let Err(e) = checkpoint(shared) {
        tracing::error!(trigger, error = %e, "checkpoint failed; the journal is kept and the next checkpoint retries");
    }
}
