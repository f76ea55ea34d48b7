//! The errors an entity request can end with. `grpc/` maps each to a status code in one place.

use crate::address::{AddressError, EntityId};
use crate::storage::StoreError;

/// Why a request to an entity did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntityError {
    #[error("invalid entity address: {0}")]
    InvalidAddress(#[from] AddressError),
    #[error("unknown entity type {name:?}; known types: {known}")]
    UnknownType { name: String, known: String },
    #[error("invalid message for {entity}: {reason}; nothing was written")]
    InvalidMessage { entity: EntityId, reason: String },
    #[error("entity {0} has no committed state")]
    NotFound(EntityId),
    #[error("invalid page token {0:?}: pass the next_page_token of the previous page")]
    InvalidPageToken(String),
    #[error("the mailbox of {entity} is full ({capacity} messages waiting); retry later")]
    MailboxFull { entity: EntityId, capacity: usize },
    #[error("{entity} crashed handling the message: {reason}")]
    Crashed { entity: EntityId, reason: String },
    #[error(
        "entity {entity} is crash-looping and quarantined: it crashed {crashes} times within {window_seconds} s \
         (last: {last_crash}); it will be tried again in {retry_after_ms} ms, or clear it with \
         the admin API (statehouse reset)"
    )]
    Quarantined {
        entity: EntityId,
        crashes: usize,
        window_seconds: u64,
        last_crash: String,
        retry_after_ms: u64,
    },
    #[error(
        "shard {shard} is restarting after repeated entity crashes; retry in {retry_after_ms} ms"
    )]
    ShardRestarting { shard: u32, retry_after_ms: u64 },
    #[error("entity {entity} is corrupt and is not served: {detail}")]
    Corrupt { entity: EntityId, detail: String },
    #[error("entity {entity} could not be recovered: {detail}")]
    RecoveryFailed { entity: EntityId, detail: String },
    #[error("storage unavailable for {entity}: {reason}")]
    StorageUnavailable { entity: EntityId, reason: String },
    #[error("storage failed for {entity}: {reason}")]
    Storage { entity: EntityId, reason: String },
    #[error("the watcher of {entity} fell behind by {missed} turns; resubscribe with from_seq = {resume_from}")]
    WatchLagged {
        entity: EntityId,
        missed: u64,
        resume_from: u64,
    },
    #[error("the watch of {entity} ended: {reason}; resubscribe with from_seq = {resume_from}")]
    WatchEnded {
        entity: EntityId,
        reason: String,
        resume_from: u64,
    },
    #[error(
        "from_seq {from_seq} is ahead of {entity}, whose last committed sequence number is {seq}"
    )]
    WatchAhead {
        entity: EntityId,
        from_seq: u64,
        seq: u64,
    },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the deadline passed before {0} replied")]
    DeadlineExceeded(EntityId),
}

impl EntityError {
    /// Classifies a storage error met while serving `entity`.
    pub fn from_store(entity: &EntityId, error: StoreError) -> Self {
        let entity = entity.clone();
        match error {
            StoreError::CorruptEntity { detail, .. } => EntityError::Corrupt { entity, detail },
            StoreError::CorruptJournal { .. } => EntityError::Corrupt {
                entity,
                detail: error.to_string(),
            },
            StoreError::JournalFailed(_) | StoreError::Closed => EntityError::StorageUnavailable {
                entity,
                reason: error.to_string(),
            },
            other => EntityError::Storage {
                entity,
                reason: other.to_string(),
            },
        }
    }
}
