//! One shard: its directory of active entities, activation of the ones not yet active, and
//! its supervisor — a dynamic one_for_one over those entities.
//!
//! Everything is guarded by this shard's own mutex, held only to look up or change the maps
//! (never across an await), so shards never contend with each other and there is no global
//! lock on the call path.
//!
//! Supervision (DESIGN §6): an entity crash is counted against its type's intensity; within
//! it, the entity restarts from durable state; past it, the entity is quarantined for
//! `supervision.quarantine_ms` and the quarantine counts as an escalation against the shard's
//! own intensity. Past that, the shard restarts: every entity task is killed, the directory
//! and crash records are cleared, and after a backoff the entities come back lazily from
//! disk. The root decides whether a shard may restart at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;
use std::time::Instant;
use tokio::sync::mpsc::error::TrySendError;

use crate::address::EntityId;
use crate::behaviour::{down_message, Behaviour, Value};
use crate::config::SupervisionConfig;
use crate::entity::{
    self, CrashVerdict, EntityContext, EntityError, EntityHandle, EntityHost, Envelope, Exit,
    Request, SpawnArgs,
};
use crate::supervisor::{ExitReason, NodeKind, RestartWindow, RootSupervisor, Strategy, TreeNode};
use tokio_util::sync::CancellationToken;

use super::postman::Postman;
use super::timers::TimerAlarm;

/// What every shard of a server shares.
pub(super) struct ShardContext {
    pub supervision: SupervisionConfig,
    pub root: Arc<RootSupervisor>,
    /// Set once shutdown begins: no new activations, no new messages.
    pub closing: AtomicBool,
    /// Source of activation generations.
    pub generations: AtomicU64,
    /// Every shard of the server, set once they exist: monitors cross shards.
    pub shards: OnceLock<Vec<Weak<Shard>>>,
    /// Delivers messages between entities; set once the shards exist.
    pub postman: OnceLock<Postman>,
    /// Ends the postman and the timer services at shutdown.
    pub cancel: CancellationToken,
    /// Stored replies the entities forgot when the stored-reply sweep asked them.
    pub replies_forgotten: AtomicU64,
    /// What every entity process shares, and the shards use too: the store, the entity
    /// settings, the types (also to route `DOWN`s to watchers) and the tracker of every
    /// entity task (so shutdown can wait for them all).
    pub entities: Arc<EntityContext>,
}

/// Watchers one entity may have, at most.
pub const WATCHERS_PER_ENTITY_MAX: usize = 1024;

impl ShardContext {
    /// The shard index of an address.
    pub fn shard_index(&self, id: &EntityId) -> u32 {
        super::hash::shard_of(id, self.entities.store.shard_count())
    }

    /// Routes a message to an entity of any shard, activating it if needed.
    pub fn route(&self, id: &EntityId, envelope: Envelope) -> Result<(), EntityError> {
        let shard = self.shard_of(id).ok_or(EntityError::ShuttingDown)?;
        shard
            .route(
                id,
                || super::resolve_behaviour(&self.entities.registry, &id.entity_type),
                envelope,
            )
            .map_err(|undelivered| undelivered.error)
    }

    /// Whether the entity is active (in its shard's directory) right now.
    pub fn is_active(&self, id: &EntityId) -> bool {
        self.shard_of(id)
            .is_some_and(|shard| shard.active(id).is_some())
    }

    fn shard_of(&self, id: &EntityId) -> Option<Arc<Shard>> {
        let shards = self.shards.get()?;
        shards
            .get(super::hash::shard_of(id, shards.len() as u32) as usize)?
            .upgrade()
    }

    /// Delivers an info message to `target`, waiting (bounded) for room in its mailbox. Runs
    /// on its own task, so no shard lock is ever held while another shard routes.
    fn deliver_info(self: &Arc<Self>, target: EntityId, message: Value) {
        let context = self.clone();
        tokio::spawn(async move {
            let Some(behaviour) = context.entities.registry.get(&target.entity_type) else {
                tracing::debug!(entity = %target, "info message for an unknown type dropped");
                return;
            };
            for _attempt in 0..INFO_DELIVERY_ATTEMPTS_MAX {
                let Some(shard) = context.shard_of(&target) else {
                    return;
                };
                let envelope = Envelope {
                    request: Request::Info {
                        message: message.clone(),
                    },
                    deadline: None,
                };
                match shard.route(&target, || Ok(behaviour.clone()), envelope) {
                    Ok(()) => return,
                    Err(undelivered)
                        if matches!(undelivered.error, EntityError::MailboxFull { .. }) =>
                    {
                        tokio::time::sleep(INFO_DELIVERY_RETRY).await;
                    }
                    Err(undelivered) => {
                        tracing::debug!(entity = %target, error = %undelivered.error, "info message dropped");
                        return;
                    }
                }
            }
            tracing::warn!(entity = %target, "info message dropped: the mailbox stayed full");
        });
    }
}

/// How often, and how far apart, a `DOWN` is offered to a full mailbox.
const INFO_DELIVERY_ATTEMPTS_MAX: usize = 1000;
const INFO_DELIVERY_RETRY: std::time::Duration = std::time::Duration::from_millis(10);

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

/// The crash history of an entity that crashed recently.
struct CrashRecord {
    window: RestartWindow,
    restarts: u64,
    last_crash: String,
}

/// An entity refused until `until`.
struct Quarantine {
    until: Instant,
    crashes: usize,
    window_seconds: u64,
    last_crash: String,
}

/// Everything the shard's mutex guards.
struct ShardState {
    /// Keyed by the address the entity's process shares (one copy of it per entity).
    directory: HashMap<Arc<EntityId>, EntityHandle>,
    crashes: HashMap<EntityId, CrashRecord>,
    quarantined: HashMap<EntityId, Quarantine>,
    /// Escalations (quarantines) within the shard's intensity window.
    escalations: RestartWindow,
    /// Restarts of this shard, for the backoff and the tree.
    restarts: u64,
    /// Restarts of this shard within the root's window: the backoff exponent.
    recent_restarts: RestartWindow,
    backoff_until: Option<Instant>,
    last_crash: Option<String>,
    /// Monitored entity → the entities watching it.
    monitors: HashMap<EntityId, Vec<EntityId>>,
}

impl ShardState {
    /// Whether `generation` is the registered activation of `id`.
    fn is_current(&self, id: &EntityId, generation: u64) -> bool {
        self.directory
            .get(id)
            .is_some_and(|handle| handle.generation() == generation)
    }
}

/// A shard: the entities whose addresses hash to it.
pub(super) struct Shard {
    index: u32,
    context: Arc<ShardContext>,
    /// Wakes this shard's timer service when an entity sets an earlier timer.
    pub alarm: Arc<TimerAlarm>,
    state: Mutex<ShardState>,
    this: Weak<Shard>,
}

impl Shard {
    pub fn new(index: u32, context: Arc<ShardContext>) -> Arc<Self> {
        let state = ShardState {
            directory: HashMap::new(),
            crashes: HashMap::new(),
            quarantined: HashMap::new(),
            escalations: RestartWindow::new(context.supervision.shard.intensity()),
            restarts: 0,
            recent_restarts: RestartWindow::new(context.supervision.root),
            backoff_until: None,
            last_crash: None,
            monitors: HashMap::new(),
        };
        Arc::new_cyclic(|this| Shard {
            index,
            context,
            alarm: TimerAlarm::new(),
            state: Mutex::new(state),
            this: this.clone(),
        })
    }

    /// Delivers a message to the entity, activating it if needed with the behaviour
    /// `behaviour` gives (asked only then, under the shard's lock; its error, e.g. an unknown
    /// type, refuses the message). A full mailbox is refused at once (back-pressure). On
    /// error the envelope comes back, unanswered.
    pub fn route(
        self: &Arc<Self>,
        id: &EntityId,
        behaviour: impl Fn() -> Result<Arc<dyn Behaviour>, EntityError>,
        mut envelope: Envelope,
    ) -> Result<(), Box<Undelivered>> {
        let mut state = self.state.lock();
        loop {
            // Checked under the lock, so shutdown sees every activation that will ever exist.
            if self.context.closing.load(Ordering::Acquire) {
                return Err(Undelivered::new(EntityError::ShuttingDown, envelope));
            }
            if let Err(error) = self.admit(&mut state, id) {
                return Err(Undelivered::new(error, envelope));
            }
            // Sent under the lock: a message to an active entity clones no handle (and so
            // touches no reference count the entity's task shares). Sending only pushes to
            // the mailbox and wakes the task (or, for a hibernating entity, spawns one), which
            // never takes a shard's lock.
            let sent = match state.directory.get(id) {
                Some(handle) => handle.try_send(envelope),
                None => {
                    // Only an activation needs the behaviour: a message to an active
                    // entity touches no registry (and no shared reference count).
                    let behaviour = match behaviour() {
                        Ok(behaviour) => behaviour,
                        Err(error) => return Err(Undelivered::new(error, envelope)),
                    };
                    let handle = self.activate(id, &behaviour);
                    let sent = handle.try_send(envelope);
                    state.directory.insert(handle.id().clone(), handle);
                    sent
                }
            };
            match sent {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(envelope)) => {
                    let capacity = self.context.entities.config.mailbox_capacity;
                    let error = EntityError::MailboxFull {
                        entity: id.clone(),
                        capacity,
                    };
                    return Err(Undelivered::new(error, envelope));
                }
                // The activation ended (passivated) but has not deregistered yet: drop it
                // and send to a fresh one.
                Err(TrySendError::Closed(returned)) => {
                    state.directory.remove(id);
                    envelope = returned;
                }
            }
        }
    }

    /// Refuses messages while the shard is in restart backoff or the entity is quarantined.
    fn admit(&self, state: &mut ShardState, id: &EntityId) -> Result<(), EntityError> {
        if state.backoff_until.is_none() && state.quarantined.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        if let Some(until) = state.backoff_until {
            if until > now {
                let retry_after_ms = (until - now).as_millis() as u64 + 1;
                return Err(EntityError::ShardRestarting {
                    shard: self.index,
                    retry_after_ms,
                });
            }
            state.backoff_until = None;
        }
        if let Some(quarantine) = state.quarantined.get(id) {
            if quarantine.until > now {
                return Err(EntityError::Quarantined {
                    entity: id.clone(),
                    crashes: quarantine.crashes,
                    window_seconds: quarantine.window_seconds,
                    last_crash: quarantine.last_crash.clone(),
                    retry_after_ms: (quarantine.until - now).as_millis() as u64 + 1,
                });
            }
            // The quarantine is over: the next activation gets a fresh intensity window.
            state.quarantined.remove(id);
        }
        Ok(())
    }

    /// This shard's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The handle of the entity if it is active.
    pub fn active(&self, id: &EntityId) -> Option<EntityHandle> {
        self.state.lock().directory.get(id).cloned()
    }

    /// Active entities with an empty mailbox, each with what the idle sweep asks of it:
    /// `Idle` (passivate) after no message for `passivate_after`, else `Hibernate` after none
    /// for `hibernate_after` (if not zero) unless it hibernates already.
    pub fn idle_entities(
        &self,
        passivate_after: std::time::Duration,
        hibernate_after: std::time::Duration,
    ) -> Vec<(EntityHandle, Request)> {
        self.state
            .lock()
            .directory
            .values()
            .filter(|handle| handle.mailbox_len() == 0)
            .filter_map(|handle| {
                let idle_for = handle.idle_for();
                if idle_for >= passivate_after {
                    Some((handle.clone(), Request::Idle))
                } else if !hibernate_after.is_zero()
                    && idle_for >= hibernate_after
                    && !handle.is_hibernating()
                {
                    Some((handle.clone(), Request::Hibernate))
                } else {
                    None
                }
            })
            .collect()
    }

    /// Every active entity's handle.
    pub fn active_handles(&self) -> Vec<EntityHandle> {
        self.state.lock().directory.values().cloned().collect()
    }

    /// Number of active entities.
    pub fn active_count(&self) -> usize {
        self.state.lock().directory.len()
    }

    /// Clears the entity's quarantine and crash history. Returns whether it was quarantined.
    pub fn reset(&self, id: &EntityId) -> bool {
        let mut state = self.state.lock();
        state.crashes.remove(id);
        state.quarantined.remove(id).is_some()
    }

    /// This shard as a node of the supervision tree, with at most `entities_max` entities.
    pub fn tree(&self, entities_max: usize) -> (TreeNode, usize) {
        let state = self.state.lock();
        let now = Instant::now();
        let mut entities: Vec<TreeNode> = Vec::new();
        for (id, handle) in &state.directory {
            let record = state.crashes.get(id);
            entities.push(TreeNode {
                name: id.to_string(),
                kind: NodeKind::Entity,
                strategy: None,
                state: if handle.is_hibernating() {
                    "hibernating"
                } else {
                    "running"
                }
                .into(),
                restarts: record.map_or(0, |r| r.restarts),
                restarts_in_window: record.map_or(0, |r| r.window.count(now) as u32),
                mailbox_len: Some(handle.mailbox_len() as u64),
                last_crash: record.map(|r| r.last_crash.clone()),
                children: Vec::new(),
            });
        }
        for (id, quarantine) in &state.quarantined {
            let active = quarantine.until > now;
            entities.push(TreeNode {
                name: id.to_string(),
                kind: NodeKind::Entity,
                strategy: None,
                state: if active {
                    "quarantined"
                } else {
                    "quarantine_expired"
                }
                .into(),
                restarts: quarantine.crashes as u64,
                restarts_in_window: quarantine.crashes as u32,
                mailbox_len: None,
                last_crash: Some(quarantine.last_crash.clone()),
                children: Vec::new(),
            });
        }
        let total = entities.len();
        entities.sort_by(|a, b| a.name.cmp(&b.name));
        entities.truncate(entities_max);
        let backoff = state.backoff_until.is_some_and(|until| until > now);
        let node = TreeNode {
            name: format!("shard-{}", self.index),
            kind: NodeKind::Supervisor,
            strategy: Some(Strategy::OneForOne),
            state: if backoff { "backoff" } else { "running" }.into(),
            restarts: state.restarts,
            restarts_in_window: state.escalations.count(now) as u32,
            mailbox_len: None,
            last_crash: state.last_crash.clone(),
            children: entities,
        };
        (node, total)
    }

    /// Sends `DOWN` to every watcher of `id` (monitors fire once, as in OTP).
    fn fire_monitors(&self, state: &mut ShardState, id: &EntityId, reason: &str, detail: &str) {
        if let Some(watchers) = state.monitors.remove(id) {
            for watcher in watchers {
                self.context
                    .deliver_info(watcher, down_message(id, reason, detail));
            }
        }
    }

    fn activate(self: &Arc<Self>, id: &EntityId, behaviour: &Arc<dyn Behaviour>) -> EntityHandle {
        let host: Arc<dyn EntityHost> = self.clone();
        let args = SpawnArgs {
            id: id.clone(),
            shard: self.index,
            generation: self.context.generations.fetch_add(1, Ordering::Relaxed),
            behaviour: behaviour.clone(),
            host,
            context: self.context.entities.clone(),
        };
        entity::spawn(args)
    }

    /// Kills every entity of the shard and refuses messages for a backoff; entities come back
    /// lazily from disk afterwards. Called with the state lock held.
    fn restart(&self, state: &mut ShardState, reason: &str) {
        let now = Instant::now();
        let killed: Vec<(Arc<EntityId>, EntityHandle)> = state.directory.drain().collect();
        for (id, handle) in killed {
            handle.abort();
            self.fire_monitors(state, &id, "crashed", reason);
        }
        state.crashes.clear();
        state.quarantined.clear();
        state.escalations.clear();
        state.restarts += 1;
        state.recent_restarts.record(now);
        let attempt = state.recent_restarts.count(now).saturating_sub(1) as u32;
        let delay = self.context.supervision.shard.backoff().delay(attempt);
        state.backoff_until = Some(now + delay);
        state.last_crash = Some(reason.to_owned());
        tracing::error!(shard = self.index, ?delay, %reason, "shard restarting: its entities crashed past its intensity");
    }
}

impl EntityHost for Shard {
    fn deregister(&self, id: &EntityId, generation: u64) {
        let mut state = self.state.lock();
        if state.is_current(id, generation) {
            state.directory.remove(id);
        }
    }

    fn reroute(&self, id: EntityId, behaviour: Arc<dyn Behaviour>, envelope: Envelope) {
        // `this` upgrades whenever `&self` is reachable, since shards live in Arcs only.
        let routed = match self.this.upgrade() {
            Some(this) => this.route(&id, || Ok(behaviour.clone()), envelope),
            None => Err(Undelivered::new(EntityError::ShuttingDown, envelope)),
        };
        if let Err(undelivered) = routed {
            undelivered.envelope.fail(undelivered.error);
        }
    }

    fn crashed(&self, id: &EntityId, generation: u64, reason: &str) -> CrashVerdict {
        let now = Instant::now();
        let supervision = self.context.supervision.for_type(&id.entity_type);
        let mut state = self.state.lock();
        if !state.is_current(id, generation) {
            // A stale activation (its shard restarted meanwhile): it just ends.
            return CrashVerdict::Stop;
        }
        let record = state
            .crashes
            .entry(id.clone())
            .or_insert_with(|| CrashRecord {
                window: RestartWindow::new(supervision.intensity()),
                restarts: 0,
                last_crash: String::new(),
            });
        record.last_crash = reason.to_owned();
        // OTP: a temporary child is never restarted, and its exit counts nothing.
        if !supervision
            .policy
            .restarts_after(&ExitReason::Crashed(reason.to_owned()))
        {
            state.crashes.remove(id);
            self.fire_monitors(&mut state, id, "crashed", reason);
            return CrashVerdict::Stop;
        }
        if record.window.record(now) {
            record.restarts += 1;
            self.fire_monitors(&mut state, id, "crashed", reason);
            return CrashVerdict::Restart;
        }
        // Past the entity's intensity: quarantine it and escalate to the shard.
        let crashes = record.window.count(now);
        state.crashes.remove(id);
        state.directory.remove(id);
        let quarantine = Quarantine {
            until: now + self.context.supervision.quarantine(),
            crashes,
            window_seconds: supervision.max_seconds,
            last_crash: reason.to_owned(),
        };
        let error = EntityError::Quarantined {
            entity: id.clone(),
            crashes,
            window_seconds: supervision.max_seconds,
            last_crash: reason.to_owned(),
            retry_after_ms: self.context.supervision.quarantine_ms,
        };
        state.quarantined.insert(id.clone(), quarantine);
        self.fire_monitors(&mut state, id, "quarantined", reason);
        tracing::warn!(entity = %id, crashes, %reason, "entity quarantined: it crashed past its intensity");
        if !state.escalations.record(now) {
            let shard_reason = format!(
                "entity {id} was quarantined ({reason}) past shard-{}'s intensity",
                self.index
            );
            // The root decides whether the shard may restart; past its own intensity it stops
            // the whole server, which then exits non-zero.
            if self
                .context
                .root
                .child_restarted(&format!("shard-{}", self.index), &shard_reason)
            {
                self.restart(&mut state, &shard_reason);
            }
        }
        CrashVerdict::Quarantine(error)
    }

    fn storage_failed(&self, reason: &str) {
        self.context.root.storage_failed(reason);
    }

    fn exited(&self, id: &EntityId, generation: u64, exit: Exit) {
        let mut state = self.state.lock();
        if !state.is_current(id, generation) {
            return;
        }
        state.directory.remove(id);
        let reason = match exit {
            Exit::Stopped => "stopped",
            Exit::Deleted => "deleted",
        };
        self.fire_monitors(&mut state, id, reason, "");
    }

    fn monitor(&self, watcher: &EntityId, target: &EntityId) {
        let target_shard = self.context.shard_of(target);
        let registered = target_shard.is_some_and(|shard| {
            let mut state = shard.state.lock();
            if !state.directory.contains_key(target) {
                return false;
            }
            let watchers = state.monitors.entry(target.clone()).or_default();
            if watchers.len() >= WATCHERS_PER_ENTITY_MAX {
                tracing::warn!(entity = %target, watcher = %watcher, "monitor refused: too many watchers");
                return false;
            }
            watchers.push(watcher.clone());
            true
        });
        if !registered {
            let detail = "the entity was not active when the monitor was set";
            self.context
                .deliver_info(watcher.clone(), down_message(target, "not_active", detail));
        }
    }

    fn post(&self, from: &EntityId, message: crate::entity::records::OutboxMessage) {
        match self.context.postman.get() {
            Some(postman) => postman.post(from, message),
            // Only before the shards exist; the outbox record is read at the next start.
            None => tracing::warn!(sender = %from, "a message was sent before the postman started"),
        }
    }

    fn timer_set(&self, due_ms: u64) {
        self.alarm.set(due_ms);
    }

    fn demonitor(&self, watcher: &EntityId, target: &EntityId) {
        if let Some(shard) = self.context.shard_of(target) {
            let mut state = shard.state.lock();
            if let Some(watchers) = state.monitors.get_mut(target) {
                watchers.retain(|w| w != watcher);
                if watchers.is_empty() {
                    state.monitors.remove(target);
                }
            }
        }
    }
}
