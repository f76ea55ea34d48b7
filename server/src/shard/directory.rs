//! One shard: its directory of active entities, and activation of the ones not yet active.
//!
//! The directory is a map guarded by this shard's own mutex, held only to look up or insert a
//! handle (never across an await), so shards never contend with each other and there is no
//! global lock on the call path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::task::TaskTracker;

use crate::address::EntityId;
use crate::behaviour::Behaviour;
use crate::entity::{
    self, EntityConfig, EntityError, EntityHandle, EntityHost, Envelope, SpawnArgs,
};
use crate::storage::Store;

/// What every shard of a server shares.
pub(super) struct ShardContext {
    pub store: Arc<dyn Store>,
    pub config: Arc<EntityConfig>,
    /// Every entity task, so shutdown can wait for them all.
    pub tracker: TaskTracker,
    /// Set once shutdown begins: no new activations, no new messages.
    pub closing: AtomicBool,
    /// Source of activation generations.
    pub generations: AtomicU64,
}

/// A message that could not be put in a mailbox, and why. It has not been answered.
pub(super) struct Undelivered {
    pub error: EntityError,
    pub envelope: Envelope,
}

impl Undelivered {
    fn new(error: EntityError, envelope: Envelope) -> Box<Self> {
        Box::new(Undelivered { error, envelope })
    }
}

/// A shard: the entities whose addresses hash to it.
pub(super) struct Shard {
    index: u32,
    context: Arc<ShardContext>,
    directory: Mutex<HashMap<EntityId, EntityHandle>>,
    this: Weak<Shard>,
}

impl Shard {
    pub fn new(index: u32, context: Arc<ShardContext>) -> Arc<Self> {
        Arc::new_cyclic(|this| Shard {
            index,
            context,
            directory: Mutex::new(HashMap::new()),
            this: this.clone(),
        })
    }

    /// Delivers a message to the entity, activating it if needed. A full mailbox is refused
    /// at once (back-pressure). On error the envelope comes back, unanswered.
    pub fn route(
        self: &Arc<Self>,
        id: &EntityId,
        behaviour: &Arc<dyn Behaviour>,
        mut envelope: Envelope,
    ) -> Result<(), Box<Undelivered>> {
        loop {
            let handle = {
                let mut directory = self.directory.lock();
                // Checked under the lock, so shutdown sees every activation that will ever exist.
                if self.context.closing.load(Ordering::Acquire) {
                    return Err(Undelivered::new(EntityError::ShuttingDown, envelope));
                }
                match directory.get(id) {
                    Some(handle) => handle.clone(),
                    None => {
                        let handle = self.activate(id, behaviour);
                        directory.insert(id.clone(), handle.clone());
                        handle
                    }
                }
            };
            match handle.try_send(envelope) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(envelope)) => {
                    let capacity = self.context.config.mailbox_capacity;
                    let error = EntityError::MailboxFull {
                        entity: id.clone(),
                        capacity,
                    };
                    return Err(Undelivered::new(error, envelope));
                }
                // The activation passivated after we looked it up: retry with a fresh one.
                Err(TrySendError::Closed(returned)) => {
                    self.deregister(id, handle.generation());
                    envelope = returned;
                }
            }
        }
    }

    /// The handle of the entity if it is active.
    pub fn active(&self, id: &EntityId) -> Option<EntityHandle> {
        self.directory.lock().get(id).cloned()
    }

    /// Every active entity's handle.
    pub fn active_handles(&self) -> Vec<EntityHandle> {
        self.directory.lock().values().cloned().collect()
    }

    /// Number of active entities.
    pub fn active_count(&self) -> usize {
        self.directory.lock().len()
    }

    fn activate(self: &Arc<Self>, id: &EntityId, behaviour: &Arc<dyn Behaviour>) -> EntityHandle {
        let host: Arc<dyn EntityHost> = self.clone();
        let args = SpawnArgs {
            id: id.clone(),
            shard: self.index,
            generation: self.context.generations.fetch_add(1, Ordering::Relaxed),
            behaviour: behaviour.clone(),
            store: self.context.store.clone(),
            host,
            config: self.context.config.clone(),
        };
        entity::spawn(args, &self.context.tracker)
    }
}

impl EntityHost for Shard {
    fn deregister(&self, id: &EntityId, generation: u64) {
        let mut directory = self.directory.lock();
        if directory
            .get(id)
            .is_some_and(|handle| handle.generation() == generation)
        {
            directory.remove(id);
        }
    }

    fn reroute(&self, id: EntityId, behaviour: Arc<dyn Behaviour>, envelope: Envelope) {
        // `this` upgrades whenever `&self` is reachable, since shards live in Arcs only.
        let routed = match self.this.upgrade() {
            Some(this) => this.route(&id, &behaviour, envelope),
            None => Err(Undelivered::new(EntityError::ShuttingDown, envelope)),
        };
        if let Err(undelivered) = routed {
            undelivered.envelope.fail(undelivered.error);
        }
    }
}
