//! Paging through one kind of record across a shard, for the background sweeps (the
//! postman's outbox and inbox sweeps, the stored-reply sweep).
//!
//! **Owns**: the cursor, and what a sweep does when reading fails. A record that fails its
//! checksum makes the store refuse the whole page (it never skips one silently); a sweep
//! steps past that entity's records instead, logged, and goes on with the rest of the shard.
//! The records stay, for the entity to report when it is next used. Any other failure ends
//! the shard's sweep, logged: the rest waits for the next pass.

use std::sync::Arc;

use crate::address::EntityId;
use crate::storage::{RecordKind, Store, StoreError, StoredEntry, RECORD_NAME_BYTES_MAX};

/// A cursor over one shard's records of one kind, a page at a time, in key order.
pub(super) struct RecordPages {
    shard: u32,
    kind: RecordKind,
    /// The last record read: the next page starts after it.
    after: Option<(EntityId, Vec<u8>)>,
    done: bool,
}

impl RecordPages {
    pub fn new(shard: u32, kind: RecordKind) -> Self {
        RecordPages {
            shard,
            kind,
            after: None,
            done: false,
        }
    }

    /// The next page of at most `limit` records; `None` once the shard has no more, or
    /// reading failed (logged).
    pub async fn next(
        &mut self,
        store: &Arc<dyn Store>,
        limit: usize,
    ) -> Option<Vec<(EntityId, StoredEntry)>> {
        while !self.done {
            match store
                .scan_records(self.shard, self.kind, self.after.clone(), limit)
                .await
            {
                Ok(page) => {
                    self.done = page.len() < limit;
                    self.after = page
                        .last()
                        .map(|(id, entry)| (id.clone(), entry.name.clone()));
                    if !page.is_empty() {
                        return Some(page);
                    }
                }
                Err(StoreError::CorruptEntity { entity, detail }) => {
                    tracing::warn!(%entity, kind = ?self.kind, %detail, "a record failed its checksum; the sweep skips the entity's records");
                    self.skip_entity(&entity);
                }
                Err(error) => {
                    tracing::warn!(shard = self.shard, kind = ?self.kind, %error, "reading records failed; the rest of the shard's wait for the next pass");
                    self.done = true;
                }
            }
        }
        None
    }

    /// Continues after every record of `entity` (of this kind).
    pub fn skip_entity(&mut self, entity: &EntityId) {
        // Past the longest name a record may have.
        self.after = Some((entity.clone(), vec![u8::MAX; RECORD_NAME_BYTES_MAX + 1]));
    }
}
