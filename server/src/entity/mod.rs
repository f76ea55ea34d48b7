//! The entity process: one tokio task per active entity, a bounded mailbox, one message at a
//! time, activation from durable state, passivation when idle.
//!
//! **Owns**: the turn loop ([`process`]), the mailbox (`mailbox`) and the messages it carries
//! ([`envelope`]), recovery of state from a snapshot plus events ([`recovery`]), the on-disk
//! encoding of values ([`codec`]), and the errors every layer above reports ([`EntityError`]).
//! **May call**: `behaviour/` (to handle and apply) and `storage/` (to commit and load).
//! Routing and the directory of active entities belong to `shard/`, which this module reaches
//! only through the [`EntityHost`] trait, so dependencies point one way.
//!
//! Invariants:
//! - No reply leaves before the journal batch holding the turn's events is durable.
//! - State changes only by `Behaviour::apply` of committed events, on the live path and on
//!   replay alike.
//! - A handler that fails or panics writes nothing and leaves the state as it was.

pub mod codec;
mod durable_mark;
mod durables;
mod envelope;
mod error;
mod lazy_notify;
mod mailbox;
mod process;
pub mod records;
pub mod recovery;
mod stored_replies;

use std::sync::Arc;
use std::time::Duration;

pub use durables::{validate_request_id, REQUEST_ID_BYTES_MAX};
pub use envelope::{CallReply, DeliveryAck, Envelope, Request, Subscription, WatchedTurn};
pub use error::EntityError;
pub use process::{spawn, EntityContext, EntityHandle, SpawnArgs, StateView};

use crate::address::EntityId;
use crate::behaviour::Behaviour;

/// Settings every entity process runs with.
#[derive(Debug, Clone)]
pub struct EntityConfig {
    /// An entity with no message for this long is passivated.
    pub idle_timeout: Duration,
    /// An entity with no message for this long hibernates: it gives up its task but stays
    /// active (zero: never). See `process`.
    pub hibernate_after: Duration,
    /// A snapshot is written once this many events were committed since the last one
    /// (0: never).
    pub snapshot_every_events: u64,
    /// Messages a mailbox holds before senders get `RESOURCE_EXHAUSTED`.
    pub mailbox_capacity: usize,
    /// How long the reply of a request id is kept for retries.
    pub dedup_window: Duration,
    /// At most this many stored replies per entity (the oldest go first).
    pub dedup_per_entity_max: usize,
    /// A durable message (timer, send, durable cast) that crashed its entity this many times
    /// is moved to a dead letter instead of being run again.
    pub dead_letter_after_crashes: u32,
}

/// What an entity process needs from the shard that hosts it.
pub trait EntityHost: Send + Sync + 'static {
    /// Removes the entity from the directory of active entities, if `generation` is still the
    /// registered activation. After this, new messages start a new activation.
    fn deregister(&self, id: &EntityId, generation: u64);

    /// Routes a message again: it arrived while its entity was passivating.
    fn reroute(&self, id: EntityId, behaviour: Arc<dyn Behaviour>, envelope: Envelope);

    /// The activation crashed with `reason` (nothing of the failed turn was written). The host
    /// counts the crash against the entity type's restart intensity and decides what happens.
    fn crashed(&self, id: &EntityId, generation: u64, reason: &str) -> CrashVerdict;

    /// The journal failed: no entity can commit any more. The host escalates.
    fn storage_failed(&self, reason: &str);

    /// The activation ended normally: it leaves the directory (if `generation` is still the
    /// registered one) and its monitors fire.
    fn exited(&self, id: &EntityId, generation: u64, exit: Exit);

    /// `watcher` monitors `target` (an effect of a committed turn).
    fn monitor(&self, watcher: &EntityId, target: &EntityId);

    /// `watcher` no longer monitors `target`.
    fn demonitor(&self, watcher: &EntityId, target: &EntityId);

    /// `from` durably sent `message` (its outbox holds it): deliver it.
    fn post(&self, from: &EntityId, message: records::OutboxMessage);

    /// A timer due at `due_ms` was durably set in this shard: fire it on time.
    fn timer_set(&self, due_ms: u64);
}

/// How an activation ended without crashing, as its monitors are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Passivated: by `Stop`, when idle, or at shutdown.
    Stopped,
    /// Removed by `Delete`.
    Deleted,
}

/// What a supervisor decided after an entity crashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrashVerdict {
    /// Reload the state from storage and go on with the mailbox.
    Restart,
    /// End this activation (a `temporary` entity); the next message starts a new one.
    Stop,
    /// Past its intensity: answer everything waiting with this error and end. The host has
    /// already removed the entity from the directory and refuses it until the quarantine ends.
    Quarantine(EntityError),
}
