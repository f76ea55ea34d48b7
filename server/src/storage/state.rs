//! The sled side of the store: the database, its trees, the metadata it keeps, and reads.
//!
//! **Owns**: opening sled (no background flusher, bounded cache), running the format
//! migrations on it, the `meta` records this layer keeps (`shard_count`, `checkpoint`), one
//! tree per shard (`shard-N`), and the reads: `load`/`list`, records (`record`,
//! `entity_records`, `scan_records`) and the timer index (`due_timers`). Writes arrive
//! in each shard's [`Overlay`] (from the writer thread and recovery), and reach the tree
//! when a checkpoint writes the overlay's frozen layers to it.
//!
//! Every read goes through one [`super::overlay::View`] of the shard (one entity, or one page
//! of a scan), which holds the overlay's read lock, so a read never sees half of a batch (e.g.
//! a snapshot's trimmed events without the snapshot, or a timer's record without its index
//! entry).

use std::ops::Bound;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::address::EntityId;

use super::data_dir_lock::{in_use, LOCK_WAIT};
use super::event_runs::decode_events;
use super::fsync::sled_error;
use super::journal::JournalPosition;
use super::keys;
use super::listing::{list_shard, ListQuery, Listing};
use super::overlay::{Overlay, View};
use super::record::decode_value;
use super::{DueTimer, DueTimers, LoadedEntity, RecordKind, StoreError, StoredEntry};

/// The `meta` key of the shard count (`u32` big-endian), written once when a data dir is made.
pub const META_SHARD_COUNT_KEY: &[u8] = b"shard_count";
/// The `meta` key of the last checkpoint's journal position
/// (`segment u64 | offset u64 | crc32c u32`, big-endian).
pub const META_CHECKPOINT_KEY: &[u8] = b"checkpoint";
/// The most shards a data dir may have: each is a sled tree opened at start-up.
pub const SHARD_COUNT_MAX: u32 = 4096;

/// One shard: its sled tree and the committed writes not yet in it.
pub(crate) struct Shard {
    pub tree: sled::Tree,
    pub overlay: Overlay,
}

impl Shard {
    /// A consistent read view of the shard: the overlay over the tree.
    pub(crate) fn view(&self) -> View<'_> {
        self.overlay.view(&self.tree)
    }
}

/// The opened sled database.
pub(crate) struct State {
    pub db: sled::Db,
    pub meta: sled::Tree,
    /// Server-wide records kept by layers above (deployed behaviours): opaque keys and values.
    pub catalog: sled::Tree,
    pub shards: Vec<Shard>,
}

/// Opens sled with its background flusher off, waiting (bounded) for its lock.
fn open_sled(state_dir: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    let started = Instant::now();
    loop {
        let opened = sled::Config::new()
            .path(state_dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(None)
            .open();
        match opened {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                if started.elapsed() < LOCK_WAIT {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                return Err(in_use(state_dir, Some(&e)));
            }
            Err(e) => {
                return Err(sled_error(
                    format!("opening sled in {}", state_dir.display()),
                    e,
                ))
            }
        }
    }
}

/// The tree of catalog records.
pub const CATALOG_TREE: &str = "catalog";

/// The name of shard `n`'s tree.
pub fn shard_tree_name(shard: u32) -> String {
    format!("shard-{shard}")
}

impl State {
    /// Opens (or creates) the sled database in `state_dir`, migrates it, and opens the shard
    /// trees. `shard_count_if_new` is used only if the data dir has no shard count yet.
    pub(crate) fn open(
        state_dir: &Path,
        cache_bytes: u64,
        shard_count_if_new: u32,
    ) -> Result<State, StoreError> {
        let db = open_sled(state_dir, cache_bytes)?;
        let outcome = statehouse_migrations::prepare(&db)?;
        tracing::info!(?outcome, "data dir format checked");
        let meta = db
            .open_tree(statehouse_migrations::META_TREE)
            .map_err(|e| sled_error("opening the meta tree", e))?;

        let shard_count = match meta
            .get(META_SHARD_COUNT_KEY)
            .map_err(|e| sled_error("reading the shard count", e))?
        {
            Some(bytes) => {
                let array: [u8; 4] = bytes.as_ref().try_into().map_err(|_| {
                    StoreError::Metadata(format!(
                        "shard count is {} bytes, expected 4",
                        bytes.len()
                    ))
                })?;
                let count = u32::from_be_bytes(array);
                if count == 0 || count > SHARD_COUNT_MAX {
                    return Err(StoreError::Metadata(format!(
                        "shard count {count} is outside 1..={SHARD_COUNT_MAX}"
                    )));
                }
                count
            }
            None => {
                meta.insert(META_SHARD_COUNT_KEY, &shard_count_if_new.to_be_bytes())
                    .map_err(|e| sled_error("recording the shard count", e))?;
                tracing::info!(shard_count = shard_count_if_new, "new data dir");
                shard_count_if_new
            }
        };

        let shards = (0..shard_count)
            .map(|n| {
                let tree = db
                    .open_tree(shard_tree_name(n))
                    .map_err(|e| sled_error(format!("opening tree {}", shard_tree_name(n)), e))?;
                Ok(Shard {
                    tree,
                    overlay: Overlay::default(),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let catalog = db
            .open_tree(CATALOG_TREE)
            .map_err(|e| sled_error("opening the catalog tree", e))?;
        Ok(State {
            db,
            meta,
            catalog,
            shards,
        })
    }

    pub(crate) fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    /// The journal position the last checkpoint covers, `None` if there was none.
    pub(crate) fn read_checkpoint(&self) -> Result<Option<JournalPosition>, StoreError> {
        let Some(bytes) = self
            .meta
            .get(META_CHECKPOINT_KEY)
            .map_err(|e| sled_error("reading the checkpoint position", e))?
        else {
            return Ok(None);
        };
        let malformed = || {
            StoreError::Metadata(format!(
                "the checkpoint position ({} bytes) is malformed or failed its CRC32C check",
                bytes.len()
            ))
        };
        let array: [u8; 20] = bytes.as_ref().try_into().map_err(|_| malformed())?;
        let crc = u32::from_be_bytes([array[16], array[17], array[18], array[19]]);
        if crc32c::crc32c(&array[..16]) != crc {
            return Err(malformed());
        }
        let mut segment = [0u8; 8];
        let mut offset = [0u8; 8];
        segment.copy_from_slice(&array[..8]);
        offset.copy_from_slice(&array[8..16]);
        Ok(Some(JournalPosition {
            segment: u64::from_be_bytes(segment),
            offset: u64::from_be_bytes(offset),
        }))
    }

    /// Records the checkpoint position in `meta` (not yet flushed).
    pub(crate) fn write_checkpoint(&self, position: JournalPosition) -> Result<(), StoreError> {
        let mut value = Vec::with_capacity(20);
        value.extend_from_slice(&position.segment.to_be_bytes());
        value.extend_from_slice(&position.offset.to_be_bytes());
        value.extend_from_slice(&crc32c::crc32c(&value).to_be_bytes());
        self.meta
            .insert(META_CHECKPOINT_KEY, value)
            .map_err(|e| sled_error("recording the checkpoint position", e))?;
        Ok(())
    }

    pub(crate) fn shard(&self, shard: u32) -> Result<&Shard, StoreError> {
        self.shards.get(shard as usize).ok_or_else(|| {
            StoreError::InvalidInput(format!(
                "shard {shard} does not exist; this data dir has {} shards",
                self.shards.len()
            ))
        })
    }

    /// Reads an entity's snapshot, the events after it and its records of the
    /// [`RecordKind::LOADED`] kinds, verifying every record. Blocking.
    pub(crate) fn load(&self, shard: u32, entity: &EntityId) -> Result<LoadedEntity, StoreError> {
        let shard = self.shard(shard)?;
        let view = shard.view();
        let read_error = |e| sled_error(format!("reading {entity}"), e);
        let corrupt = |detail: String| StoreError::CorruptEntity {
            entity: entity.clone(),
            detail,
        };

        if let Some(detail) = view.get(&keys::corrupt_key(entity)).map_err(read_error)? {
            return Err(corrupt(String::from_utf8_lossy(&detail).into_owned()));
        }
        let snapshot_key = keys::snapshot_key(entity);
        let snapshot = match view.get(&snapshot_key).map_err(read_error)? {
            Some(value) => Some(
                decode_value(&snapshot_key, &value)
                    .map_err(|d| corrupt(format!("snapshot: {d}")))?,
            ),
            None => None,
        };
        let after = snapshot.as_ref().map_or(0, |s| s.seq);
        let prefix = keys::event_prefix(entity);
        let mut events = Vec::new();
        for item in view.scan_prefix(&prefix) {
            let (key, value) = item.map_err(read_error)?;
            let stored = decode_events(&key, prefix.len(), &value).map_err(corrupt)?;
            events.extend(stored.into_iter().filter(|event| event.seq > after));
        }
        // Runs may overlap after a replay (see `event_runs`): one copy of each seq.
        events.sort_by_key(|event| event.seq);
        events.dedup_by_key(|event| event.seq);
        let mut records = Vec::new();
        for kind in RecordKind::LOADED {
            records.extend(entity_records(&view, entity, kind)?);
        }
        Ok(LoadedEntity {
            snapshot,
            events,
            records,
        })
    }

    /// The entity's record `name` of `kind`, checksum verified. Blocking.
    pub(crate) fn record(
        &self,
        shard: u32,
        entity: &EntityId,
        kind: RecordKind,
        name: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let shard = self.shard(shard)?;
        let view = shard.view();
        check_not_corrupt(&view, entity)?;
        let key = keys::record_key(kind, entity, name);
        match view
            .get(&key)
            .map_err(|e| sled_error(format!("reading {entity}"), e))?
        {
            Some(value) => Ok(Some(decode_entry(entity, kind, name, &key, &value)?)),
            None => Ok(None),
        }
    }

    /// Every record of `kind` of the entity, in name order, checksums verified. Blocking.
    pub(crate) fn entity_records(
        &self,
        shard: u32,
        entity: &EntityId,
        kind: RecordKind,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        let shard = self.shard(shard)?;
        let view = shard.view();
        check_not_corrupt(&view, entity)?;
        entity_records(&view, entity, kind)
    }

    /// Records of `kind` of every entity of the shard, in key order, strictly after
    /// `(entity, name)` when given, at most `limit`; checksums verified. Blocking.
    pub(crate) fn scan_records(
        &self,
        shard_index: u32,
        kind: RecordKind,
        after: Option<(EntityId, Vec<u8>)>,
        limit: usize,
    ) -> Result<Vec<(EntityId, StoredEntry)>, StoreError> {
        let shard = self.shard(shard_index)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let prefix = keys::record_kind_prefix(kind);
        let lower = match &after {
            Some((entity, name)) => Bound::Excluded(keys::record_key(kind, entity, name)),
            None => Bound::Included(prefix.to_vec()),
        };
        let view = shard.view();
        let mut found = Vec::new();
        for item in view.range_from(lower) {
            let (key, value) = item.map_err(|e| {
                sled_error(
                    format!("scanning {kind:?} records of shard {shard_index}"),
                    e,
                )
            })?;
            if !key.starts_with(&prefix) {
                break;
            }
            let Some((_, entity, name)) = keys::decode_record_key(&key) else {
                return Err(StoreError::Metadata(format!(
                    "a {kind:?} record key of {} bytes in shard {shard_index} is malformed",
                    key.len()
                )));
            };
            let value = decode_entry(&entity, kind, &name, &key, &value)?;
            found.push((entity, StoredEntry { kind, name, value }));
            if found.len() >= limit {
                break;
            }
        }
        Ok(found)
    }

    /// A page of the shard's timer index: entries due at or before `up_to_ms`, strictly
    /// after `after` when given, at most `limit`. Blocking. See [`super::Store::due_timers`].
    ///
    /// Once the page holds `limit` entries one more is looked at: if it is not due yet, the
    /// page ended because nothing more is due and its time is `next_due_ms`; if it is due,
    /// the page was cut by the limit and `next_due_ms` is `None`.
    pub(crate) fn due_timers(
        &self,
        shard_index: u32,
        after: Option<&DueTimer>,
        up_to_ms: u64,
        limit: usize,
    ) -> Result<DueTimers, StoreError> {
        let shard = self.shard(shard_index)?;
        let lower = match after {
            Some(t) => Bound::Excluded(keys::timer_index_key(t.due_ms, &t.entity, &t.name)),
            None => Bound::Included(keys::TIMER_INDEX_PREFIX.to_vec()),
        };
        let view = shard.view();
        let mut page = DueTimers::default();
        for item in view.range_from(lower) {
            let (key, value) = item.map_err(|e| {
                sled_error(
                    format!("scanning the timer index of shard {shard_index}"),
                    e,
                )
            })?;
            if !key.starts_with(&keys::TIMER_INDEX_PREFIX) {
                break;
            }
            let Some(timer) = keys::decode_timer_index_key(&key) else {
                return Err(StoreError::Metadata(format!(
                    "a timer index key of {} bytes in shard {shard_index} is malformed",
                    key.len()
                )));
            };
            decode_value(&key, &value).map_err(|detail| StoreError::CorruptEntity {
                entity: timer.entity.clone(),
                detail: format!(
                    "timer index entry {} due at {}: {detail}",
                    name_for_humans(&timer.name),
                    timer.due_ms
                ),
            })?;
            if timer.due_ms > up_to_ms {
                page.next_due_ms = Some(timer.due_ms);
                break;
            }
            if page.due.len() >= limit {
                break;
            }
            page.due.push(timer);
        }
        Ok(page)
    }

    /// Keys of existing entities of a type, across all shards. Blocking. See
    /// [`super::Store::list`].
    pub(crate) fn list(
        &self,
        entity_type: &str,
        key_prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let query = ListQuery {
            entity_type,
            key_prefix,
            start_after,
        };
        let mut listing = Listing::new(limit);
        for (n, shard) in self.shards.iter().enumerate() {
            list_shard(&shard.view(), n, &query, &mut listing)?;
        }
        Ok(listing.into_keys())
    }
}

/// A record name in an error message: as text if it is printable UTF-8, else in hex.
fn name_for_humans(name: &[u8]) -> String {
    match std::str::from_utf8(name) {
        Ok(text) if !text.chars().any(char::is_control) => format!("{text:?}"),
        _ => {
            let hex: String = name.iter().map(|b| format!("{b:02x}")).collect();
            format!("0x{hex}")
        }
    }
}

/// Refuses an entity with a corruption marker, like `load` does.
fn check_not_corrupt(view: &View<'_>, entity: &EntityId) -> Result<(), StoreError> {
    match view
        .get(&keys::corrupt_key(entity))
        .map_err(|e| sled_error(format!("reading {entity}"), e))?
    {
        Some(detail) => Err(StoreError::CorruptEntity {
            entity: entity.clone(),
            detail: String::from_utf8_lossy(&detail).into_owned(),
        }),
        None => Ok(()),
    }
}

/// Verifies and unwraps a record value read from under `key`.
fn decode_entry(
    entity: &EntityId,
    kind: RecordKind,
    name: &[u8],
    key: &[u8],
    value: &[u8],
) -> Result<Vec<u8>, StoreError> {
    decode_value(key, value)
        .map(|record| record.payload)
        .map_err(|detail| StoreError::CorruptEntity {
            entity: entity.clone(),
            detail: format!("{kind:?} record {}: {detail}", name_for_humans(name)),
        })
}

/// Every record of `kind` of the entity in the shard's `view`, in name order.
fn entity_records(
    view: &View<'_>,
    entity: &EntityId,
    kind: RecordKind,
) -> Result<Vec<StoredEntry>, StoreError> {
    let prefix = keys::record_prefix(kind, entity);
    let mut records = Vec::new();
    for item in view.scan_prefix(&prefix) {
        let (key, value) = item.map_err(|e| sled_error(format!("reading {entity}"), e))?;
        let name = key.get(prefix.len()..).unwrap_or_default();
        let value = decode_entry(entity, kind, name, &key, &value)?;
        records.push(StoredEntry {
            kind,
            name: name.to_vec(),
            value,
        });
    }
    Ok(records)
}
