//! The turn loop of one active entity.
//!
//! An activation loads the entity's snapshot and events, then takes one message at a time from
//! its mailbox: run the handler against the committed state, commit the turn's events as one
//! journal batch, apply them, reply. Every `snapshot_every_events` events it commits a snapshot.
//! After `idle_timeout` without messages, on `Stop`, or after `Delete`, it leaves the shard's
//! directory and ends; messages that raced with that are routed to a new activation.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;

use crate::address::EntityId;
use crate::behaviour::{
    Behaviour, BehaviourError, BehaviourRegistry, Effect, ErasedState, Turn, Value,
};
use crate::storage::{Durable, EntityBatch, Op, Store, StoreError};

use super::recovery::{self, Recovered};
use super::{
    codec, CallReply, CrashVerdict, EntityConfig, EntityError, EntityHost, Envelope, Exit, Request,
    Subscription, WatchedTurn,
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
    mailbox: mpsc::Sender<Box<Envelope>>,
    task: tokio::task::AbortHandle,
    generation: u64,
    shared: Arc<Shared>,
}

/// State shared between the entity task and readers. `committed` is `None` until activation
/// has loaded the entity; it only ever holds state whose events are durable.
struct Shared {
    id: EntityId,
    committed: RwLock<Option<Committed>>,
    /// Up to which sequence number the state is durable; closed when the activation ends.
    durable: watch::Receiver<u64>,
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
        self.mailbox
            .try_send(Box::new(envelope))
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(envelope) => {
                    mpsc::error::TrySendError::Full(*envelope)
                }
                mpsc::error::TrySendError::Closed(envelope) => {
                    mpsc::error::TrySendError::Closed(*envelope)
                }
            })
    }

    /// Puts a message in the mailbox, waiting for room.
    pub async fn send(&self, envelope: Envelope) -> Result<(), mpsc::error::SendError<Envelope>> {
        self.mailbox
            .send(Box::new(envelope))
            .await
            .map_err(|mpsc::error::SendError(envelope)| mpsc::error::SendError(*envelope))
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

    /// The last committed state, without waiting behind the mailbox (only, with output gates,
    /// for the batch it includes to become durable). `None` while the entity is still loading
    /// or once it ended: then read storage instead.
    pub async fn committed_state(&self) -> Option<Result<StateView, EntityError>> {
        let view = {
            let guard = self.shared.committed.read();
            let committed = guard.as_ref()?;
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
                })
        };
        if let Ok(view) = &view {
            let mut durable = self.shared.durable.clone();
            // An error means the activation ended before its batch was durable.
            durable.wait_for(|seq| *seq >= view.seq).await.ok()?;
        }
        Some(view)
    }
}

/// Starts an activation on `tracker` and returns its handle. The entity loads its durable
/// state before it takes its first message.
pub fn spawn(args: SpawnArgs, tracker: &TaskTracker) -> EntityHandle {
    let generation = args.generation;
    let (mailbox, inbox) = mpsc::channel(args.config.mailbox_capacity.max(1));
    let (durable_seq, durable) = watch::channel(0);
    let shared = Arc::new(Shared {
        id: args.id.clone(),
        committed: RwLock::new(None),
        durable,
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
        pending: VecDeque::new(),
        durable_seq,
        watchers: None,
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
    inbox: mpsc::Receiver<Box<Envelope>>,
    /// Sequence number of the last committed event.
    seq: u64,
    events_since_snapshot: u64,
    /// Set once `Delete` removed the entity's data: its exit is reported as a deletion.
    deleted: bool,
    /// The output gate: turns whose answers wait for their batch to be durable, oldest first.
    pending: VecDeque<Pending>,
    /// The sequence number up to which this activation's events are durable (for `Get`).
    durable_seq: watch::Sender<u64>,
    /// Watchers' feed, made on the first `Watch` (a broadcast channel allocates its ring).
    watchers: Option<broadcast::Sender<Arc<WatchedTurn>>>,
}

/// Turns a watcher may fall behind before it is ended with "resubscribe from N".
pub const WATCH_LAG_MAX: usize = 1024;

/// The most turns an entity runs ahead of durability before it waits.
pub const PENDING_TURNS_MAX: usize = 1024;

/// A turn whose answer waits in the output gate.
struct Pending {
    /// Resolves when the turn's batch is durable; `None` when it wrote nothing (it still waits
    /// behind the turns before it, whose state it may have read).
    durable: Option<Durable>,
    /// The entity's sequence number after the turn.
    seq: u64,
    reply: Option<oneshot::Sender<Result<CallReply, EntityError>>>,
    outcome: Result<CallReply, EntityError>,
    /// Effects run once the turn is durable.
    effects: Vec<Effect>,
    /// What watchers are told once the turn is durable (only while there are watchers).
    watched: Option<Arc<WatchedTurn>>,
}

/// Waits until the oldest queued turn is durable.
async fn front_durable(pending: &mut VecDeque<Pending>) -> Result<(), StoreError> {
    match pending.front_mut().and_then(|p| p.durable.as_mut()) {
        Some(durable) => durable.await,
        None => Ok(()),
    }
}

/// The reason of a crash, for the supervisor; `None` for errors that are not crashes.
fn crash_reason(error: &EntityError) -> Option<String> {
    match error {
        EntityError::Crashed { reason, .. } => Some(reason.clone()),
        _ => None,
    }
}

impl Process {
    async fn run(mut self) {
        if let Err(error) = Box::pin(self.activate()).await {
            tracing::warn!(entity = %self.id, %error, "activation failed");
            Box::pin(self.fail_activation(error)).await;
            return;
        }
        loop {
            tokio::select! {
                // Answer turns as their batches become durable, before taking new messages.
                biased;
                durable = front_durable(&mut self.pending), if !self.pending.is_empty() => {
                    if let Err(error) = durable {
                        self.fail_pending(error);
                        break;
                    }
                    self.finish_front();
                }
                envelope = self.inbox.recv(), if self.pending.len() < PENDING_TURNS_MAX => {
                    // Every sender is gone: the shard dropped this activation.
                    let Some(envelope) = envelope else { return };
                    // Boxed: the idle task stays small (a turn's state machine is ~1 KiB).
                    match Box::pin(self.handle(*envelope)).await {
                        Next::Continue => {}
                        Next::Passivate => break,
                        Next::Exit => return,
                    }
                }
                () = tokio::time::sleep(self.config.idle_timeout), if self.pending.is_empty() => {
                    if self.inbox.is_empty() && !self.watched() {
                        break;
                    }
                }
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
            Box::pin(self.write_snapshot()).await?;
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
        // The old version's turns finish, durable, before the state changes shape.
        if !self.drain().await {
            return Err("the journal failed".into());
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
            if let Err(reason) = Box::pin(self.upgrade_if_deployed()).await {
                let reason = format!("upgrade to the active version failed: {reason}");
                envelope.fail(self.crashed(reason.clone()));
                return Box::pin(self.on_crash(reason)).await;
            }
        }
        match envelope.request {
            Request::Call { message, reply } => {
                let (mut pending, crash) = self.turn(Inbound::Message(message)).await;
                pending.reply = Some(reply);
                self.settle(pending, crash).await
            }
            Request::Cast { message } => {
                let (pending, crash) = self.turn(Inbound::Cast(message)).await;
                self.settle(pending, crash).await
            }
            Request::Info { message } => {
                let (pending, crash) = self.turn(Inbound::Info(message)).await;
                self.settle(pending, crash).await
            }
            Request::Watch { reply } => {
                let subscribed = self.subscribe().await;
                let _ = reply.send(subscribed);
                Next::Continue
            }
            Request::Stop { reply } => {
                self.drain().await;
                if let Some(reply) = reply {
                    let _ = reply.send(true);
                }
                Next::Passivate
            }
            Request::Delete { reply } => {
                let result = if self.drain().await {
                    Box::pin(self.delete()).await
                } else {
                    Err(EntityError::StorageUnavailable {
                        entity: self.id.clone(),
                        reason: "the journal failed".into(),
                    })
                };
                let _ = reply.send(result);
                Next::Passivate
            }
        }
    }

    /// Queues a turn's answer behind the turns still waiting for durability (the output
    /// gate), answers what is ready, and handles a crash or a storage failure.
    async fn settle(&mut self, pending: Pending, crash: Option<String>) -> Next {
        let storage_failed = match &pending.outcome {
            Err(EntityError::StorageUnavailable { reason, .. }) => Some(reason.clone()),
            _ => None,
        };
        self.pending.push_back(pending);
        if let Some(reason) = storage_failed {
            self.drain().await;
            self.host.storage_failed(&reason);
            return Next::Passivate;
        }
        if let Some(reason) = crash {
            // Everything before the crash is answered first; the restart reloads from storage,
            // which then holds every batch this activation submitted.
            if !self.drain().await {
                return Next::Passivate;
            }
            return Box::pin(self.on_crash(reason)).await;
        }
        self.finish_ready();
        self.maybe_snapshot().await;
        Next::Continue
    }

    /// Answers the front turns that wait for nothing.
    fn finish_ready(&mut self) {
        while self.pending.front().is_some_and(|p| p.durable.is_none()) {
            self.finish_front();
        }
    }

    /// The front turn is durable: publish its sequence number, run its effects, answer it.
    fn finish_front(&mut self) {
        let Some(done) = self.pending.pop_front() else {
            return;
        };
        self.durable_seq.send_if_modified(|durable| {
            let advanced = done.seq > *durable;
            *durable = (*durable).max(done.seq);
            advanced
        });
        for effect in done.effects {
            match effect {
                Effect::Monitor(target) => self.host.monitor(&self.id, &target),
                Effect::Demonitor(target) => self.host.demonitor(&self.id, &target),
                // Durable effects travel in the turn's batch, not here.
                Effect::SetTimer { .. }
                | Effect::CancelTimer { .. }
                | Effect::Send { .. }
                | Effect::Request { .. } => {}
            }
        }
        if let (Some(item), Some(watchers)) = (done.watched, &self.watchers) {
            // No receiver left is no error: the feed is simply unused.
            let _ = watchers.send(item);
        }
        if let Some(reply) = done.reply {
            let _ = reply.send(done.outcome);
        }
    }

    /// Waits until every queued turn is durable, answering each in order. Returns false (after
    /// failing them all) if the journal failed.
    async fn drain(&mut self) -> bool {
        while !self.pending.is_empty() {
            if let Err(error) = front_durable(&mut self.pending).await {
                self.fail_pending(error);
                return false;
            }
            self.finish_front();
        }
        true
    }

    /// The journal failed: every queued turn is answered with the failure, which is escalated.
    fn fail_pending(&mut self, error: StoreError) {
        let error = EntityError::from_store(&self.id, error);
        for pending in self.pending.drain(..) {
            if let Some(reply) = pending.reply {
                let _ = reply.send(Err(error.clone()));
            }
        }
        // This activation's state is ahead of what is durable: it must not serve again.
        *self.shared.committed.write() = None;
        self.host.storage_failed(&error.to_string());
    }

    /// A turn crashed. Nothing of it was written; the shard's supervisor decides whether this
    /// activation restarts from durable state, stops, or is quarantined.
    async fn on_crash(&mut self, reason: String) -> Next {
        tracing::warn!(entity = %self.id, %reason, "entity crashed");
        match self.host.crashed(&self.id, self.generation, &reason) {
            CrashVerdict::Restart => match Box::pin(self.activate()).await {
                Ok(()) => Next::Continue,
                Err(error) => {
                    Box::pin(self.fail_activation(error)).await;
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

    /// Runs one message: the handler, then (if it produced events) hands them to the journal
    /// and applies them at once, so the next message sees them; the answer waits in the output
    /// gate until the batch is durable. Returns the queued answer and, on a crash, its reason.
    async fn turn(&mut self, inbound: Inbound) -> (Pending, Option<String>) {
        let turn = match self.run_handler(inbound) {
            Ok(turn) => turn,
            Err(error) => {
                let crash = crash_reason(&error);
                return (self.answered(Err(error)), crash);
            }
        };
        let mut durable = None;
        if !turn.events.is_empty() {
            match self.submit_events(&turn.events).await {
                Ok(submitted) => durable = Some(submitted),
                Err(error) => {
                    let crash = crash_reason(&error);
                    return (self.answered(Err(error)), crash);
                }
            }
            if let Err(error) = self.apply_committed(&turn.events) {
                // A crash: the restart reloads the events from storage once they are durable.
                let crash = crash_reason(&error);
                let mut pending = self.answered(Err(error));
                pending.durable = durable;
                return (pending, crash);
            }
        }
        let outcome = Ok(CallReply {
            reply: turn.reply,
            seq: self.seq,
        });
        let watched = match &self.watchers {
            Some(watchers) if watchers.receiver_count() > 0 && !turn.events.is_empty() => {
                self.watch_item(turn.events)
            }
            _ => None,
        };
        let pending = Pending {
            durable,
            seq: self.seq,
            reply: None,
            outcome,
            effects: turn.effects,
            watched,
        };
        (pending, None)
    }

    /// A queued answer that waits for nothing of its own.
    fn answered(&self, outcome: Result<CallReply, EntityError>) -> Pending {
        Pending {
            durable: None,
            seq: self.seq,
            reply: None,
            outcome,
            effects: Vec::new(),
            watched: None,
        }
    }

    /// The turn as watchers will see it: its events and the state after it.
    fn watch_item(&self, events: Vec<Value>) -> Option<Arc<WatchedTurn>> {
        let guard = self.shared.committed.read();
        let committed = guard.as_ref()?;
        let state = committed.behaviour.state_to_value(&committed.state).ok()?;
        Some(Arc::new(WatchedTurn {
            seq: committed.seq,
            events,
            state,
        }))
    }

    /// Subscribes a watcher once everything before is durable.
    async fn subscribe(&mut self) -> Result<Subscription, EntityError> {
        if !self.drain().await {
            return Err(EntityError::StorageUnavailable {
                entity: self.id.clone(),
                reason: "the journal failed".into(),
            });
        }
        let state = {
            let guard = self.shared.committed.read();
            let committed = guard.as_ref().ok_or_else(|| self.no_state())?;
            committed
                .behaviour
                .state_to_value(&committed.state)
                .map_err(|e| self.crashed(e.to_string()))?
        };
        let feed = self
            .watchers
            .get_or_insert_with(|| broadcast::channel(WATCH_LAG_MAX).0)
            .subscribe();
        Ok(Subscription {
            seq: self.seq,
            state,
            feed,
        })
    }

    /// Whether anyone watches this entity (it then stays active when idle).
    fn watched(&self) -> bool {
        self.watchers
            .as_ref()
            .is_some_and(|w| w.receiver_count() > 0)
    }

    /// Calls the behaviour's handler against the committed state, turning a panic into a crash.
    fn run_handler(&self, inbound: Inbound) -> Result<Turn, EntityError> {
        let guard = self.shared.committed.read();
        let Some(committed) = guard.as_ref() else {
            return Err(self.no_state());
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
    async fn submit_events(&mut self, events: &[Value]) -> Result<Durable, EntityError> {
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
        self.submit(ops).await
    }

    /// Folds committed events into the state; the same `apply` replay uses.
    fn apply_committed(&mut self, events: &[Value]) -> Result<(), EntityError> {
        let mut guard = self.shared.committed.write();
        let Some(committed) = guard.as_mut() else {
            return Err(self.no_state());
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
        let op = match self.snapshot_op() {
            Ok(op) => op,
            Err(error) => {
                tracing::warn!(entity = %self.id, %error, "snapshot skipped");
                return;
            }
        };
        // Queued like a turn: the journal keeps it after the events it covers.
        match self.submit(vec![op]).await {
            Ok(durable) => {
                self.events_since_snapshot = 0;
                let mut pending = self.answered(Ok(CallReply {
                    reply: Value::Null,
                    seq: self.seq,
                }));
                pending.durable = Some(durable);
                self.pending.push_back(pending);
            }
            Err(error) => tracing::warn!(entity = %self.id, %error, "snapshot failed"),
        }
    }

    /// A snapshot of the current state under the current version.
    fn snapshot_op(&self) -> Result<Op, EntityError> {
        let guard = self.shared.committed.read();
        let Some(committed) = guard.as_ref() else {
            return Err(self.no_state());
        };
        let payload = committed
            .behaviour
            .state_to_value(&committed.state)
            .map_err(|e| self.crashed(e.to_string()))
            .and_then(|value| codec::encode(&self.id, &value))?;
        Ok(Op::Snapshot {
            seq: self.seq,
            behaviour_version: self.behaviour.version(),
            payload,
        })
    }

    /// Commits a snapshot of the current state under the current version.
    async fn write_snapshot(&mut self) -> Result<(), EntityError> {
        let op = self.snapshot_op()?;
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

    async fn submit(&self, ops: Vec<Op>) -> Result<Durable, EntityError> {
        let batch = EntityBatch {
            shard: self.shard,
            entity: self.id.clone(),
            ops,
        };
        self.store
            .submit(batch)
            .await
            .map_err(|e| EntityError::from_store(&self.id, e))
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
        while let Ok(envelope) = self.inbox.try_recv().map(|envelope| *envelope) {
            self.host
                .reroute(self.id.clone(), self.behaviour.clone(), envelope);
        }
    }

    /// The entity could not be loaded: answer everything waiting with the reason and leave.
    /// `Delete` still works, so an operator can remove a corrupt entity.
    async fn fail_activation(&mut self, error: EntityError) {
        self.host.deregister(&self.id, self.generation);
        self.inbox.close();
        while let Ok(envelope) = self.inbox.try_recv().map(|envelope| *envelope) {
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
        while let Ok(envelope) = self.inbox.try_recv().map(|envelope| *envelope) {
            envelope.fail(error.clone());
        }
    }

    /// The crash of a turn that found no loaded state (after a failed `apply` forgot it).
    fn no_state(&self) -> EntityError {
        self.crashed("the entity has no state loaded".into())
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
