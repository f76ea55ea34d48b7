//! The turn loop of one active entity.
//!
//! An activation loads the entity's snapshot and events, then takes one message at a time from
//! its mailbox: run the handler against the committed state, commit the turn's events as one
//! journal batch, apply them, reply. Every `snapshot_every_events` events it commits a snapshot.
//! After `idle_timeout` without messages, on `Stop`, or after `Delete`, it leaves the shard's
//! directory and ends; messages that raced with that are routed to a new activation.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::address::EntityId;
use crate::behaviour::{
    Behaviour, BehaviourError, BehaviourRegistry, Effect, ErasedState, Turn, Value,
};
use crate::storage::{EntityBatch, Op, Store};

use super::recovery::{self, Recovered};
use super::{
    codec, CallReply, CrashVerdict, EntityConfig, EntityError, EntityHost, Envelope, Exit, Request,
};

/// Everything a new activation needs.
pub struct SpawnArgs {
    pub id: EntityId,
    pub shard: u32,
    /// Distinguishes this activation from earlier and later ones of the same entity.
    pub generation: u64,
    pub behaviour: Arc<dyn Behaviour>,
    /// Every version of every type: to replay records with the version that wrote them and
    /// to notice a new active version at a turn boundary.
    pub registry: Arc<BehaviourRegistry>,
    pub store: Arc<dyn Store>,
    pub host: Arc<dyn EntityHost>,
    pub config: Arc<EntityConfig>,
}

/// The committed state of an entity, as `Get` returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct StateView {
    pub state: Value,
    pub seq: u64,
}

/// The shard's handle on an active entity: its mailbox and a view of its committed state.
#[derive(Clone)]
pub struct EntityHandle {
    mailbox: mpsc::Sender<Envelope>,
    task: tokio::task::AbortHandle,
    generation: u64,
    shared: Arc<Shared>,
}

/// State shared between the entity task and readers. `committed` is `None` until activation
/// has loaded the entity; it only ever holds state whose events are durable.
struct Shared {
    id: EntityId,
    committed: RwLock<Option<Committed>>,
}

/// The state, its sequence number, and the behaviour version that owns its representation
/// (it changes on a hot upgrade).
struct Committed {
    state: ErasedState,
    seq: u64,
    behaviour: Arc<dyn Behaviour>,
}

impl EntityHandle {
    /// Puts a message in the mailbox without waiting; a full mailbox is an error.
    pub fn try_send(&self, envelope: Envelope) -> Result<(), mpsc::error::TrySendError<Envelope>> {
        self.mailbox.try_send(envelope)
    }

    /// Puts a message in the mailbox, waiting for room.
    pub async fn send(&self, envelope: Envelope) -> Result<(), mpsc::error::SendError<Envelope>> {
        self.mailbox.send(envelope).await
    }

    /// Ends the entity's task at its next await, dropping its mailbox (a supervisor's kill).
    pub fn abort(&self) {
        self.task.abort();
    }

    /// This activation's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Messages waiting in the mailbox.
    pub fn mailbox_len(&self) -> usize {
        self.mailbox.max_capacity() - self.mailbox.capacity()
    }

    /// The last committed state, without waiting behind the mailbox; `None` while the entity
    /// is still loading.
    pub fn committed_state(&self) -> Option<Result<StateView, EntityError>> {
        let guard = self.shared.committed.read();
        let committed = guard.as_ref()?;
        Some(
            committed
                .behaviour
                .state_to_value(&committed.state)
                .map(|state| StateView {
                    state,
                    seq: committed.seq,
                })
                .map_err(|e| EntityError::Crashed {
                    entity: self.shared.id.clone(),
                    reason: e.to_string(),
                }),
        )
    }
}

/// Starts an activation on `tracker` and returns its handle. The entity loads its durable
/// state before it takes its first message.
pub fn spawn(args: SpawnArgs, tracker: &TaskTracker) -> EntityHandle {
    let generation = args.generation;
    let (mailbox, inbox) = mpsc::channel(args.config.mailbox_capacity.max(1));
    let shared = Arc::new(Shared {
        id: args.id.clone(),
        committed: RwLock::new(None),
    });
    let process = Process {
        id: args.id,
        shard: args.shard,
        generation,
        behaviour: args.behaviour,
        seen_registry_generation: Some(args.registry.generation()),
        registry: args.registry,
        store: args.store,
        host: args.host,
        config: args.config,
        shared: shared.clone(),
        inbox,
        seq: 0,
        events_since_snapshot: 0,
        deleted: false,
    };
    let task = tracker.spawn(process.run()).abort_handle();
    EntityHandle {
        mailbox,
        task,
        generation,
        shared,
    }
}

/// What a turn handles: a message from a client, or an info message from the engine.
enum Inbound {
    Message(Value),
    Cast(Value),
    Info(Value),
}

/// What the loop does after a message.
enum Next {
    Continue,
    /// Leave the directory and end; racing messages go to a new activation.
    Passivate,
    /// End at once: the directory entry and the mailbox were already dealt with.
    Exit,
}

struct Process {
    id: EntityId,
    shard: u32,
    generation: u64,
    /// The version this activation runs; replaced by a hot upgrade.
    behaviour: Arc<dyn Behaviour>,
    registry: Arc<BehaviourRegistry>,
    /// The registry generation this activation last checked for a new version; `None` forces
    /// a check at the next turn (after a failed upgrade).
    seen_registry_generation: Option<u64>,
    store: Arc<dyn Store>,
    host: Arc<dyn EntityHost>,
    config: Arc<EntityConfig>,
    shared: Arc<Shared>,
    inbox: mpsc::Receiver<Envelope>,
    /// Sequence number of the last committed event.
    seq: u64,
    events_since_snapshot: u64,
    /// Set once `Delete` removed the entity's data: its exit is reported as a deletion.
    deleted: bool,
}

impl Process {
    async fn run(mut self) {
        if let Err(error) = self.activate().await {
            tracing::warn!(entity = %self.id, %error, "activation failed");
            self.fail_activation(error).await;
            return;
        }
        loop {
            let envelope =
                match tokio::time::timeout(self.config.idle_timeout, self.inbox.recv()).await {
                    Ok(Some(envelope)) => envelope,
                    // Every sender is gone: the shard dropped this activation.
                    Ok(None) => return,
                    Err(_idle) if self.inbox.is_empty() => break,
                    Err(_idle) => continue,
                };
            match self.handle(envelope).await {
                Next::Continue => {}
                Next::Passivate => break,
                Next::Exit => return,
            }
        }
        self.passivate();
    }

    /// Loads the snapshot and events and installs the recovered state.
    async fn activate(&mut self) -> Result<(), EntityError> {
        let loaded = self
            .store
            .load(self.shard, &self.id)
            .await
            .map_err(|e| EntityError::from_store(&self.id, e))?;
        // The active version now: a deploy may have happened since this entity was routed.
        self.seen_registry_generation = Some(self.registry.generation());
        let latest = self
            .registry
            .get(&self.id.entity_type)
            .unwrap_or_else(|| self.behaviour.clone());
        let registry = self.registry.clone();
        let entity_type = self.id.entity_type.clone();
        let versions = move |version: u32| registry.version(&entity_type, version);
        let Recovered {
            state,
            seq,
            events_since_snapshot,
            behaviour,
            migrated_from,
            upgrade_error,
        } = recovery::recover(&latest, &versions, &self.id, loaded)?;
        self.seq = seq;
        self.events_since_snapshot = events_since_snapshot;
        self.behaviour = behaviour.clone();
        *self.shared.committed.write() = Some(Committed {
            state,
            seq,
            behaviour,
        });
        if let Some(error) = upgrade_error {
            // Serve reads of the old state; every turn retries the upgrade (and crashes).
            tracing::warn!(entity = %self.id, %error, "upgrade at activation failed");
            self.seen_registry_generation = None;
        } else if let (Some(from), true) = (migrated_from, seq > 0) {
            tracing::info!(entity = %self.id, from, to = self.behaviour.version(), "migrated at activation");
            self.write_snapshot().await?;
        }
        Ok(())
    }

    /// At a turn boundary: if a new version of this type is active, snapshot, migrate the
    /// state with the new version's `migrate`, snapshot again under the new version, and run
    /// on it from now on. On failure nothing changes: the old state stays, and the error is
    /// this turn's crash.
    async fn upgrade_if_deployed(&mut self) -> Result<(), String> {
        let generation = self.registry.generation();
        if self.seen_registry_generation == Some(generation) {
            return Ok(());
        }
        let Some(latest) = self.registry.get(&self.id.entity_type) else {
            self.seen_registry_generation = Some(generation);
            return Ok(());
        };
        if latest.version() == self.behaviour.version() {
            self.seen_registry_generation = Some(generation);
            return Ok(());
        }
        let from = self.behaviour.version();
        let migrated = {
            let guard = self.shared.committed.read();
            let Some(committed) = guard.as_ref() else {
                return Err("the entity has no state loaded".into());
            };
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                recovery::migrate(&committed.behaviour, &latest, &committed.state)
            }));
            match outcome {
                Ok(Ok(state)) => state,
                Ok(Err(error)) => return Err(error.to_string()),
                Err(panic) => return Err(format!("migrate panicked: {}", panic_message(&*panic))),
            }
        };
        if self.seq > 0 {
            let value = latest
                .state_to_value(&migrated)
                .map_err(|e| e.to_string())?;
            let payload = codec::encode(&self.id, &value).map_err(|e| e.to_string())?;
            let op = Op::Snapshot {
                seq: self.seq,
                behaviour_version: latest.version(),
                payload,
            };
            self.commit(vec![op]).await.map_err(|e| e.to_string())?;
        }
        if let Some(committed) = self.shared.committed.write().as_mut() {
            committed.state = migrated;
            committed.behaviour = latest.clone();
        }
        tracing::info!(entity = %self.id, from, to = latest.version(), "hot upgrade");
        self.behaviour = latest;
        self.events_since_snapshot = 0;
        self.seen_registry_generation = Some(generation);
        Ok(())
    }

    async fn handle(&mut self, envelope: Envelope) -> Next {
        if envelope.expired() {
            envelope.fail(EntityError::DeadlineExceeded(self.id.clone()));
            return Next::Continue;
        }
        let turn = matches!(
            envelope.request,
            Request::Call { .. } | Request::Cast { .. } | Request::Info { .. }
        );
        if turn {
            if let Err(reason) = self.upgrade_if_deployed().await {
                let reason = format!("upgrade to the active version failed: {reason}");
                envelope.fail(self.crashed(reason.clone()));
                return self.on_crash(reason).await;
            }
        }
        let (result, next) = match envelope.request {
            Request::Call { message, reply } => {
                let (result, next) = self.turn(Inbound::Message(message)).await;
                let outcome = result.as_ref().map(drop).map_err(Clone::clone);
                let _ = reply.send(result);
                (outcome, next)
            }
            Request::Cast { message } => {
                let (result, next) = self.turn(Inbound::Cast(message)).await;
                if let Err(error) = &result {
                    tracing::debug!(entity = %self.id, %error, "cast failed");
                }
                (result.map(drop), next)
            }
            Request::Info { message } => {
                let (result, next) = self.turn(Inbound::Info(message)).await;
                if let Err(error) = &result {
                    tracing::debug!(entity = %self.id, %error, "info message failed");
                }
                (result.map(drop), next)
            }
            Request::Stop { reply } => {
                if let Some(reply) = reply {
                    let _ = reply.send(true);
                }
                return Next::Passivate;
            }
            Request::Delete { reply } => {
                let _ = reply.send(self.delete().await);
                return Next::Passivate;
            }
        };
        match result {
            Err(EntityError::Crashed { reason, .. }) => return self.on_crash(reason).await,
            Err(EntityError::StorageUnavailable { reason, .. }) => {
                self.host.storage_failed(&reason)
            }
            _ => {}
        }
        if let Next::Continue = next {
            self.maybe_snapshot().await;
        }
        next
    }

    /// A turn crashed. Nothing of it was written; the shard's supervisor decides whether this
    /// activation restarts from durable state, stops, or is quarantined.
    async fn on_crash(&mut self, reason: String) -> Next {
        tracing::warn!(entity = %self.id, %reason, "entity crashed");
        match self.host.crashed(&self.id, self.generation, &reason) {
            CrashVerdict::Restart => match self.activate().await {
                Ok(()) => Next::Continue,
                Err(error) => {
                    self.fail_activation(error).await;
                    Next::Exit
                }
            },
            CrashVerdict::Stop => Next::Passivate,
            CrashVerdict::Quarantine(error) => {
                self.refuse_remaining(error);
                Next::Exit
            }
        }
    }

    /// Runs one message: handler, commit, apply. Returns the reply and whether the entity
    /// can go on (it cannot after a failure that leaves its in-memory state in doubt).
    async fn turn(&mut self, inbound: Inbound) -> (Result<CallReply, EntityError>, Next) {
        let turn = match self.run_handler(inbound) {
            Ok(turn) => turn,
            Err(error) => return (Err(error), Next::Continue),
        };
        if !turn.events.is_empty() {
            if let Err(error) = self.commit_events(&turn.events).await {
                // The journal may or may not hold the batch; reload from storage to find out.
                return (Err(error), Next::Passivate);
            }
            if let Err(error) = self.apply_committed(&turn.events) {
                // A crash: the restart reloads the committed events from storage.
                return (Err(error), Next::Continue);
            }
        }
        // Effects run only once the turn is durable.
        for effect in turn.effects {
            match effect {
                Effect::Monitor(target) => self.host.monitor(&self.id, &target),
                Effect::Demonitor(target) => self.host.demonitor(&self.id, &target),
            }
        }
        (
            Ok(CallReply {
                reply: turn.reply,
                seq: self.seq,
            }),
            Next::Continue,
        )
    }

    /// Calls the behaviour's handler against the committed state, turning a panic into a crash.
    fn run_handler(&self, inbound: Inbound) -> Result<Turn, EntityError> {
        let guard = self.shared.committed.read();
        let Some(committed) = guard.as_ref() else {
            return Err(self.crashed("the entity has no state loaded".into()));
        };
        let key = &self.id.key;
        let outcome = catch_unwind(AssertUnwindSafe(|| match inbound {
            Inbound::Message(message) => self.behaviour.handle(key, &committed.state, message),
            Inbound::Cast(message) => self.behaviour.handle_cast(key, &committed.state, message),
            Inbound::Info(info) => self.behaviour.handle_info(key, &committed.state, info),
        }));
        match outcome {
            Ok(Ok(turn)) => Ok(turn),
            Ok(Err(BehaviourError::InvalidMessage(reason))) => Err(EntityError::InvalidMessage {
                entity: self.id.clone(),
                reason,
            }),
            Ok(Err(error)) => Err(self.crashed(error.to_string())),
            Err(panic) => {
                Err(self.crashed(format!("handler panicked: {}", panic_message(&*panic))))
            }
        }
    }

    /// Writes the turn's events as one journal batch and waits until it is durable.
    async fn commit_events(&mut self, events: &[Value]) -> Result<(), EntityError> {
        let version = self.behaviour.version();
        let ops = events
            .iter()
            .zip(self.seq + 1..)
            .map(|(event, seq)| {
                Ok(Op::Event {
                    seq,
                    behaviour_version: version,
                    payload: codec::encode(&self.id, event)?,
                })
            })
            .collect::<Result<Vec<_>, EntityError>>()?;
        self.commit(ops).await
    }

    /// Folds committed events into the state; the same `apply` replay uses.
    fn apply_committed(&mut self, events: &[Value]) -> Result<(), EntityError> {
        let mut guard = self.shared.committed.write();
        let Some(committed) = guard.as_mut() else {
            return Err(self.crashed("the entity has no state loaded".into()));
        };
        for event in events {
            let applied = catch_unwind(AssertUnwindSafe(|| {
                self.behaviour.apply(&mut committed.state, event)
            }));
            let failure = match applied {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(error.to_string()),
                Err(panic) => Some(format!("apply panicked: {}", panic_message(&*panic))),
            };
            if let Some(reason) = failure {
                // The events are durable but this activation's state is now in doubt: forget it,
                // so no reader sees it, and let the next activation replay from storage.
                *guard = None;
                return Err(
                    self.crashed(format!("{reason} (after the turn's events were committed)"))
                );
            }
            committed.seq += 1;
        }
        self.seq = committed.seq;
        self.events_since_snapshot += events.len() as u64;
        Ok(())
    }

    /// Commits a snapshot once enough events have accumulated since the last one. A failed
    /// snapshot costs nothing but replay time, so it is logged, not reported to a caller.
    async fn maybe_snapshot(&mut self) {
        let every = self.config.snapshot_every_events;
        if every == 0 || self.events_since_snapshot < every {
            return;
        }
        if let Err(error) = self.write_snapshot().await {
            tracing::warn!(entity = %self.id, %error, "snapshot failed");
        }
    }

    /// Commits a snapshot of the current state under the current version.
    async fn write_snapshot(&mut self) -> Result<(), EntityError> {
        let payload = {
            let guard = self.shared.committed.read();
            let Some(committed) = guard.as_ref() else {
                return Err(self.crashed("the entity has no state loaded".into()));
            };
            committed
                .behaviour
                .state_to_value(&committed.state)
                .map_err(|e| self.crashed(e.to_string()))
                .and_then(|value| codec::encode(&self.id, &value))?
        };
        let op = Op::Snapshot {
            seq: self.seq,
            behaviour_version: self.behaviour.version(),
            payload,
        };
        self.commit(vec![op]).await?;
        self.events_since_snapshot = 0;
        Ok(())
    }

    /// Removes the entity's durable data. Returns whether it had any.
    async fn delete(&mut self) -> Result<bool, EntityError> {
        let existed = self.seq > 0;
        if existed {
            self.commit(vec![Op::Delete]).await?;
        }
        *self.shared.committed.write() = None;
        self.deleted = true;
        Ok(existed)
    }

    async fn commit(&self, ops: Vec<Op>) -> Result<(), EntityError> {
        let batch = EntityBatch {
            shard: self.shard,
            entity: self.id.clone(),
            ops,
        };
        self.store
            .commit(batch)
            .await
            .map_err(|e| EntityError::from_store(&self.id, e))
    }

    /// Leaves the directory; messages that slipped in meanwhile go to a new activation.
    fn passivate(&mut self) {
        let exit = if self.deleted {
            Exit::Deleted
        } else {
            Exit::Stopped
        };
        self.host.exited(&self.id, self.generation, exit);
        self.inbox.close();
        while let Ok(envelope) = self.inbox.try_recv() {
            self.host
                .reroute(self.id.clone(), self.behaviour.clone(), envelope);
        }
    }

    /// The entity could not be loaded: answer everything waiting with the reason and leave.
    /// `Delete` still works, so an operator can remove a corrupt entity.
    async fn fail_activation(&mut self, error: EntityError) {
        self.host.deregister(&self.id, self.generation);
        self.inbox.close();
        while let Ok(envelope) = self.inbox.try_recv() {
            match envelope.request {
                Request::Delete { reply } => {
                    let result = self.commit(vec![Op::Delete]).await.map(|()| true);
                    let _ = reply.send(result);
                }
                _ => envelope.fail(error.clone()),
            }
        }
    }

    /// Leaves the directory and answers every waiting message with `error`.
    fn refuse_remaining(&mut self, error: EntityError) {
        self.host.deregister(&self.id, self.generation);
        self.inbox.close();
        while let Ok(envelope) = self.inbox.try_recv() {
            envelope.fail(error.clone());
        }
    }

    fn crashed(&self, reason: String) -> EntityError {
        EntityError::Crashed {
            entity: self.id.clone(),
            reason,
        }
    }
}

/// The text of a panic payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}
