//! What the writer thread, the checkpointer and the store's async methods share.
//!
//! **Owns**: the [`Shared`] struct (the opened sled [`State`], the data dir's paths, the
//! journal position a checkpoint may record, counters) and the [`StoreStats`] it reports.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::journal::JournalPosition;
use super::state::State;

/// Shared by every thread of one open store.
pub(crate) struct Shared {
    pub state: State,
    pub state_dir: PathBuf,
    pub journal_dir: PathBuf,
    /// The journal position up to which every frame is both applied to sled and synced in the
    /// journal: what a checkpoint records. Published by the writer after each round.
    pub checkpointable: Mutex<JournalPosition>,
    /// The segment the writer appends to; a checkpoint never deletes it.
    pub writer_segment: AtomicU64,
    /// Serialises checkpoints; holds the position the last one recorded.
    pub checkpoint_lock: Mutex<Option<JournalPosition>>,
    /// Set when the writer asked for a checkpoint and the checkpointer has not started it
    /// yet, so requests coalesce instead of queueing one checkpoint per round.
    pub checkpoint_requested: AtomicBool,
    /// Signalled (under `overlay_lock`) when a checkpoint dropped the overlay layers it wrote
    /// to sled: a writer stalled on a full overlay waits for it.
    pub overlay_released: Condvar,
    pub overlay_lock: Mutex<()>,
    /// Set by the writer while its recent rounds carried about one commit each (about one
    /// request in flight). Only then do the writer and a lone commit's waiter spin before they
    /// sleep (`writer`, `commit_wait`): under load, spinning would take CPU from the work.
    pub light_load: Arc<AtomicBool>,
    pub counters: Counters,
}

impl Shared {
    /// Shared state for `state`, with the writer starting at `start` (the beginning of its
    /// first segment): everything before it is already in `state` or its overlays.
    pub(crate) fn new(
        state: State,
        state_dir: PathBuf,
        journal_dir: PathBuf,
        start: JournalPosition,
    ) -> Shared {
        Shared {
            state,
            state_dir,
            journal_dir,
            checkpointable: Mutex::new(start),
            writer_segment: AtomicU64::new(start.segment),
            checkpoint_lock: Mutex::new(None),
            checkpoint_requested: AtomicBool::new(false),
            overlay_released: Condvar::new(),
            overlay_lock: Mutex::new(()),
            light_load: Arc::new(AtomicBool::new(false)),
            counters: Counters::default(),
        }
    }

    /// The memory every shard's overlay holds (an estimate). Never waits.
    pub(crate) fn overlay_bytes(&self) -> u64 {
        self.state
            .shards
            .iter()
            .map(|shard| shard.overlay.bytes() as u64)
            .sum()
    }
}

/// Monotonic counters, for tests and metrics.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub commits: AtomicU64,
    pub journal_rounds: AtomicU64,
    pub journal_fsyncs: AtomicU64,
    pub journal_bytes: AtomicU64,
    pub checkpoints: AtomicU64,
    pub segments_deleted: AtomicU64,
    pub overlay_stalls: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> StoreStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StoreStats {
            commits: get(&self.commits),
            journal_rounds: get(&self.journal_rounds),
            journal_fsyncs: get(&self.journal_fsyncs),
            journal_bytes: get(&self.journal_bytes),
            checkpoints: get(&self.checkpoints),
            segments_deleted: get(&self.segments_deleted),
            overlay_stalls: get(&self.overlay_stalls),
            overlay_bytes: 0,
        }
    }
}

/// Counters of an open store since it was opened, and the overlays' size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Batches the writer completed (successfully or not).
    pub commits: u64,
    /// Group-commit rounds: one `write` each.
    pub journal_rounds: u64,
    /// `fdatasync`s of journal segments.
    pub journal_fsyncs: u64,
    /// Bytes appended to the journal.
    pub journal_bytes: u64,
    /// Checkpoints completed, including the one at open.
    pub checkpoints: u64,
    /// Journal segments deleted by checkpoints.
    pub segments_deleted: u64,
    /// Times the writer waited for a checkpoint because the overlays were full.
    pub overlay_stalls: u64,
    /// Memory held by committed writes not yet in sled (the shards' overlays), an estimate.
    /// A gauge, not a counter: checkpoints bring it back down.
    pub overlay_bytes: u64,
}
