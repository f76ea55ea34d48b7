//! Durable storage: the `Store` trait the engine writes through, and its implementation on a
//! write-ahead journal plus sled.
//!
//! **Owns**: the journal (segment files of CRC32C-framed records, group commit, `fdatasync`),
//! the per-shard overlays of committed writes not yet in sled, the sled database (one tree per
//! shard, a `meta` tree), checkpoints and recovery.
//! **Knows nothing about** behaviours, entity types' meaning, or protobuf: payloads are opaque
//! bytes, addresses opaque strings. It may call `statehouse-migrations`.
//!
//! Invariants:
//! - `commit` returns only after the batch is durable in the journal (with `Durability::Sync`)
//!   and applied to its shard's overlay, so a `load` that starts after `commit` returned sees
//!   the batch (reads merge the overlay over sled).
//! - Replaying the journal after the last checkpoint is idempotent: every write a batch makes
//!   is a blind put or remove (events written again form runs beside the stored ones, read
//!   once), so re-applying a suffix yields the same state.
//! - A record that fails its checksum is an error naming the entity or the journal position;
//!   it is never skipped silently.
//! - Only the last journal segment can have a torn tail or a zero tail (segments are
//!   preallocated with zeros): the writer syncs a segment and cuts it to its data before it
//!   starts the next, and a checkpoint deletes only segments wholly behind the position it
//!   made durable in sled.
//! - A `.prep` file in the journal directory (a segment being prepared) is never journal data:
//!   segment listings ignore it and open deletes it.
//!
//! Layout:
//! - [`sled_store`]: [`SledStore`], the `Store` implementation: open, the async methods, close.
//! - [`journal`]: segment files (preallocated, prepared ahead by a background thread) and the
//!   frame format; helpers to find records on disk.
//! - `writer`: the group-commit thread that writes, syncs, rolls segments and applies to the
//!   overlays.
//! - `apply`: what each [`Op`] writes (shared by live commits and replay).
//! - `overlay`: per shard, the layers of committed writes not yet in sled, and reads that
//!   merge them over the sled tree; `event_runs`: an entity's events as one sled value.
//! - [`keys`], `record`: the sled key layout and the checksummed value encoding.
//! - `state`: the sled database, its trees and metadata, and the reads (`load`, `list`,
//!   records, the timer index).
//! - `checkpoint`, [`recovery`]: writing the overlays to sled, making it durable and trimming
//!   the journal; replay into the overlays at open.
//! - `shared`, `fsync`, `codec`: what the threads share, `fsync` helpers, byte readers.

mod apply;
mod checkpoint;
mod codec;
mod commit_wait;
mod data_dir_lock;
mod disk_usage;
mod event_runs;
mod fsync;
pub mod journal;
pub mod keys;
mod listing;
mod overlay;
mod record;
pub mod recovery;
mod shared;
pub mod sled_store;
mod state;
mod writer;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;

use crate::address::EntityId;

pub use disk_usage::DiskUsage;
pub use recovery::RecoveryReport;
pub use shared::StoreStats;
pub use sled_store::SledStore;
pub use state::{shard_tree_name, SHARD_COUNT_MAX};
pub use writer::ROUND_BYTES_MAX;

/// When `commit` may return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After the journal's `fdatasync` covering the batch: nothing acknowledged is ever lost.
    Sync,
    /// After the batch is written to the journal file; an `fdatasync` follows within
    /// `StoreConfig::async_sync_window`, so a power cut loses at most that window.
    Async,
}

/// Everything the store needs to open a data dir.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The data directory; created if missing.
    pub data_dir: PathBuf,
    /// Number of shards for a new data dir. An existing data dir keeps the count it was
    /// created with (see [`Store::shard_count`]).
    pub shard_count: u32,
    pub durability: Durability,
    /// With `Durability::Async`, the longest time written journal bytes wait for `fdatasync`.
    pub async_sync_window: Duration,
    /// A checkpoint runs at least this often while there is journal to trim.
    pub checkpoint_interval: Duration,
    /// A checkpoint also runs once this many journal bytes were written since the last one.
    pub checkpoint_journal_bytes: u64,
    /// A journal segment file is closed and a new one started past this size.
    pub journal_segment_bytes: u64,
    /// sled's page cache bound.
    pub sled_cache_bytes: u64,
    /// Upper bound on commits handed to the journal writer and not yet completed.
    pub commits_pending_max: usize,
    /// At low load, how long the journal writer busy-waits for the next commit after a round
    /// of one, and a lone commit's waiter for its answer, before they sleep; zero
    /// never spins. See `writer` and `commit_wait`.
    pub commit_spin: Duration,
}

#[cfg(test)]
impl StoreConfig {
    /// The storage tests' config: sync durability, checkpoints only when asked for, a small
    /// sled cache. Tests change what they exercise with struct update syntax.
    pub(crate) fn for_tests(data_dir: PathBuf) -> StoreConfig {
        StoreConfig {
            data_dir,
            shard_count: 4,
            durability: Durability::Sync,
            async_sync_window: Duration::from_millis(20),
            checkpoint_interval: Duration::from_secs(3600),
            checkpoint_journal_bytes: u64::MAX,
            journal_segment_bytes: 64 * 1024 * 1024,
            sled_cache_bytes: 16 * 1024 * 1024,
            commits_pending_max: 1024,
            commit_spin: Duration::ZERO,
        }
    }
}

/// One durable operation on one entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// An event the entity committed, with its sequence number (1, 2, 3, … per entity).
    Event {
        seq: u64,
        behaviour_version: u32,
        payload: Vec<u8>,
    },
    /// The entity's state after event `seq`. Replaces any earlier snapshot and trims the
    /// stored events with sequence numbers `<= seq`.
    Snapshot {
        seq: u64,
        behaviour_version: u32,
        payload: Vec<u8>,
    },
    /// Removes every record of the entity (snapshot, events, markers, and every
    /// [`RecordKind`] record). Sequence numbers of a later incarnation start again at 1.
    /// Timer index entries are not under the entity's keys: the entity removes them with
    /// [`Op::RemoveTimerDue`] in the same batch.
    Delete,
    /// Puts (or replaces) the entity's record `name` of `kind`.
    PutRecord {
        kind: RecordKind,
        name: Vec<u8>,
        value: Vec<u8>,
    },
    /// Removes the entity's record `name` of `kind`, if there is one.
    RemoveRecord { kind: RecordKind, name: Vec<u8> },
    /// Puts the entry `(due_ms, entity, name)` in the shard's time-ordered timer index.
    PutTimerDue { due_ms: u64, name: Vec<u8> },
    /// Removes the entry `(due_ms, entity, name)` from the shard's timer index.
    RemoveTimerDue { due_ms: u64, name: Vec<u8> },
}

/// Kinds of per-entity records besides snapshots and events (DESIGN §4). Each kind is one
/// contiguous key range per entity, records named by opaque bytes (at most
/// [`RECORD_NAME_BYTES_MAX`]); values are opaque to the store and checksummed like events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordKind {
    /// `d`: the stored reply of a client request id (idempotency).
    Dedup,
    /// `u`: a pending timer (due time and payload), by timer name.
    Timer,
    /// `i`: a message accepted into the entity's durable inbox, by inbox sequence number.
    Inbox,
    /// `r`: per sender entity, the last message sequence number accepted from it.
    Receipt,
    /// `p`: per target entity, the last message sequence number sent to it.
    SendSeq,
    /// `o`: a message sent to another entity that it has not yet accepted.
    Outbox,
    /// `l`: a dead letter, by id.
    DeadLetter,
}

impl RecordKind {
    /// Every kind, in key order of their kind bytes.
    pub const ALL: [RecordKind; 7] = [
        RecordKind::Dedup,
        RecordKind::Inbox,
        RecordKind::DeadLetter,
        RecordKind::Outbox,
        RecordKind::SendSeq,
        RecordKind::Receipt,
        RecordKind::Timer,
    ];

    /// The kinds an activation loads with the entity's state ([`LoadedEntity::records`]).
    /// The others are read one by one ([`Store::record`]) or scanned ([`Store::scan_records`]).
    pub const LOADED: [RecordKind; 3] = [RecordKind::Dedup, RecordKind::Timer, RecordKind::Inbox];
}

/// The longest record name, in bytes.
pub const RECORD_NAME_BYTES_MAX: usize = 2048;

/// One record of a [`RecordKind`], as stored (checksum verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    pub kind: RecordKind,
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// One entry of a shard's timer index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DueTimer {
    pub due_ms: u64,
    pub entity: EntityId,
    pub name: Vec<u8>,
}

/// A page of due timers and what comes after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DueTimers {
    /// Entries with `due_ms <= up_to_ms`, in index order (due time, then entity, then name).
    pub due: Vec<DueTimer>,
    /// The due time of the first entry after the page that is not yet due, if the page was
    /// not cut by the limit and there is one.
    pub next_due_ms: Option<u64>,
}

/// The atomic unit of durability: the operations one turn of one entity produced.
/// After a crash either all of a batch is recovered or none of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityBatch {
    /// The shard the entity lives in, `0..shard_count`.
    pub shard: u32,
    pub entity: EntityId,
    pub ops: Vec<Op>,
}

/// A snapshot or event as stored: its checksum already verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub seq: u64,
    pub behaviour_version: u32,
    pub payload: Vec<u8>,
}

/// What an activation needs: the last snapshot and the events after it, in sequence order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadedEntity {
    pub snapshot: Option<StoredRecord>,
    pub events: Vec<StoredRecord>,
    /// The entity's records of the kinds in [`RecordKind::LOADED`], by kind then name.
    pub records: Vec<StoredEntry>,
}

impl LoadedEntity {
    /// Whether the entity has any committed state.
    pub fn exists(&self) -> bool {
        self.snapshot.is_some() || !self.events.is_empty()
    }

    /// The sequence number of the last committed event (0 for a new entity).
    pub fn last_seq(&self) -> u64 {
        let from_events = self.events.last().map(|e| e.seq);
        let from_snapshot = self.snapshot.as_ref().map(|s| s.seq);
        from_events.or(from_snapshot).unwrap_or(0)
    }
}

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// sled reported an error.
    #[error("{context}: {source}")]
    Sled {
        context: String,
        #[source]
        source: sled::Error,
    },
    /// A stored record of this entity failed its checksum or could not be decoded.
    /// The entity is not served until an operator deals with it.
    #[error("entity {entity} is corrupt: {detail}")]
    CorruptEntity { entity: EntityId, detail: String },
    /// The journal is damaged at a position that is not a torn tail.
    #[error("journal segment {segment} is corrupt at byte offset {offset}: {detail}")]
    CorruptJournal {
        segment: PathBuf,
        offset: u64,
        detail: String,
    },
    /// Metadata in the data dir is missing or malformed.
    #[error("data dir metadata: {0}")]
    Metadata(String),
    /// The on-disk format could not be brought to the version this server runs.
    #[error(transparent)]
    Migration(#[from] statehouse_migrations::MigrationError),
    /// An earlier journal write or sync failed; the store accepts no more commits, because
    /// after a failed `fdatasync` nothing about the file's contents can be assumed.
    #[error("the journal failed earlier and accepts no more writes ({0}); restart the server")]
    JournalFailed(String),
    /// The store is closing or closed.
    #[error("the store is closed")]
    Closed,
    /// The caller passed something the store cannot take (a shard out of range, an invalid
    /// address, a batch over the size limit, a bad config); nothing was written.
    #[error("invalid storage request: {0}")]
    InvalidInput(String),
}

/// A submitted batch: resolves once it is durable. Dropping it does not cancel the commit.
pub struct Durable(Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + Sync>>);

impl Durable {
    /// Wraps the future that completes when the batch is durable.
    pub fn new(done: impl Future<Output = Result<(), StoreError>> + Send + Sync + 'static) -> Self {
        Durable(Box::pin(done))
    }

    /// A batch that is already durable (or failed already).
    pub fn ready(result: Result<(), StoreError>) -> Self {
        Durable::new(std::future::ready(result))
    }
}

impl Future for Durable {
    type Output = Result<(), StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Durable")
    }
}

/// The engine's view of durable storage. Tests inject faults through it.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The number of shards of this data dir, fixed when it was created.
    fn shard_count(&self) -> u32;

    /// Hands the batch to the journal and returns at once with a [`Durable`] that resolves
    /// when the batch is durable (per the configured [`Durability`]) and applied to the state
    /// store. Batches become durable in the order `submit` was called, so when one resolves
    /// every batch submitted before it has too. Waits only for room among pending commits.
    async fn submit(&self, batch: EntityBatch) -> Result<Durable, StoreError>;

    /// Submits the batch and waits until it is durable.
    async fn commit(&self, batch: EntityBatch) -> Result<(), StoreError> {
        self.submit(batch).await?.await
    }

    /// Reads an entity's last snapshot, the events after it and its records of the
    /// [`RecordKind::LOADED`] kinds, verifying every checksum, all as of one point between
    /// batches.
    async fn load(&self, shard: u32, entity: &EntityId) -> Result<LoadedEntity, StoreError>;

    /// Keys of existing entities of `entity_type` that start with `key_prefix`, in byte order,
    /// strictly after `start_after` when given, at most `limit` of them.
    async fn list(
        &self,
        entity_type: &str,
        key_prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;

    /// The entity's record `name` of `kind`, if there is one (checksum verified). Like
    /// [`Store::load`], refuses an entity marked corrupt.
    async fn record(
        &self,
        shard: u32,
        entity: &EntityId,
        kind: RecordKind,
        name: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError>;

    /// Every record of `kind` of the entity, in name order.
    async fn entity_records(
        &self,
        shard: u32,
        entity: &EntityId,
        kind: RecordKind,
    ) -> Result<Vec<StoredEntry>, StoreError>;

    /// Records of `kind` of every entity of the shard, in key order (entity type, key, then
    /// name), strictly after `(entity, name)` when `after` is given, at most `limit`.
    /// Type and key compare as stored: length first, then bytes (see [`keys`]); names compare
    /// by bytes. Checksums are verified; an entity's corruption marker is not consulted.
    async fn scan_records(
        &self,
        shard: u32,
        kind: RecordKind,
        after: Option<(EntityId, Vec<u8>)>,
        limit: usize,
    ) -> Result<Vec<(EntityId, StoredEntry)>, StoreError>;

    /// Entries of the shard's timer index due at or before `up_to_ms`, in index order,
    /// strictly after `after` when given, at most `limit`. Past a full page one more entry is
    /// looked at: if it is not due, its time is `next_due_ms` (so `limit` 0 asks only for the
    /// next due time); if it is due, the page was cut and `next_due_ms` is `None`.
    async fn due_timers(
        &self,
        shard: u32,
        after: Option<DueTimer>,
        up_to_ms: u64,
        limit: usize,
    ) -> Result<DueTimers, StoreError>;

    /// Durably stores a server-wide record (e.g. a deployed behaviour) under `key`, replacing
    /// any earlier one. Returns once the record survives a power cut. Rare and small: not for
    /// the hot path.
    async fn put_catalog(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError>;

    /// Every catalog record whose key starts with `prefix`, in key order.
    async fn catalog(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Runs a checkpoint now: flush sled, `fdatasync` its files, record the journal position
    /// covered, delete journal segments behind it.
    async fn checkpoint(&self) -> Result<(), StoreError>;

    /// Stops accepting commits, completes those already handed over, syncs the journal, runs a
    /// final checkpoint. Later calls of any method answer `StoreError::Closed`.
    async fn close(&self) -> Result<(), StoreError>;

    /// The store's counters since it opened, and the disk its data dir takes now.
    async fn usage(&self) -> Result<(StoreStats, DiskUsage), StoreError>;
}
