//! The turn loop of one active entity.
//!
//! An activation loads the entity's snapshot and events, then takes one message at a time from
//! its mailbox: run the handler against the committed state, commit the turn's events as one
//! journal batch, apply them, reply. Every `snapshot_every_events` events it commits a snapshot.
//! After `idle_timeout` without messages (the shard's idle sweep asks), on `Stop`, or after
//! `Delete`, it leaves the shard's directory and ends; messages that raced with that are routed
//! to a new activation.
//!
//! **Hibernation** (OTP's `proc_lib:hibernate`): after `hibernate_after` without messages (the
//! sweep asks again), an idle entity gives up its task but stays active: the boxed process is
//! parked in its [`Activation`], with its shared state as the waker in its mailbox, and the
//! next message spawns a task that carries on from there, without touching storage. A task
//! is ~0.25 KiB, which a million idle entities would otherwise pay. Reads of the committed
//! state (`Get`) never wake it.

use std::collections::{BTreeMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::task::Waker;

use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::task::TaskTracker;

use crate::address::EntityId;
use crate::behaviour::{
    now_unix_ms, reply_message, timer_message, Behaviour, BehaviourError, BehaviourRegistry,
    Effect, ErasedState, Turn, Value,
};
use crate::storage::{Durable, EntityBatch, Op, RecordKind, Store, StoreError};

use super::durable_mark::DurableMark;
use super::durables::Durables;
use super::mailbox::{self, MailboxReceiver, MailboxSender};
use super::records::{
    self, DeadLetterRecord, DedupRecord, InboxItem, MessageKind, OutboxMessage, TimerRecord,
};
use super::recovery::{self, Recovered};
use super::{
    codec, CallReply, CrashVerdict, DeliveryAck, EntityConfig, EntityError, EntityHost, Envelope,
    Exit, Request, Subscription, WatchedTurn,
};

/// What every activation shares: one pointer in each process instead of five (a million
/// idle entities pay for every word of a process).
pub struct EntityContext {
    /// Every version of every type: to replay records with the version that wrote them and
    /// to notice a new active version at a turn boundary.
    pub registry: Arc<BehaviourRegistry>,
    pub store: Arc<dyn Store>,
    pub config: Arc<EntityConfig>,
    /// Tracks every entity task (and every task a hibernating entity resumes on), so
    /// shutdown can wait for them all.
    pub tracker: TaskTracker,
    /// Activations hibernating right now (parked, without a task).
    pub hibernating: AtomicU64,
    /// Where a hibernating entity's next message resumes it, whichever thread sent it.
    pub runtime: tokio::runtime::Handle,
}

impl EntityContext {
    pub fn new(
        registry: Arc<BehaviourRegistry>,
        store: Arc<dyn Store>,
        config: EntityConfig,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        EntityContext {
            registry,
            store,
            config: Arc::new(config),
            tracker: TaskTracker::new(),
            hibernating: AtomicU64::new(0),
            runtime,
        }
    }
}

/// Everything a new activation needs.
pub struct SpawnArgs {
    pub id: EntityId,
    pub shard: u32,
    /// Distinguishes this activation from earlier and later ones of the same entity.
    pub generation: u64,
    pub behaviour: Arc<dyn Behaviour>,
    pub host: Arc<dyn EntityHost>,
    pub context: Arc<EntityContext>,
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
    mailbox: MailboxSender<Box<Envelope>>,
    generation: u64,
    shared: Arc<Shared>,
}

/// State shared between the entity task and readers. `committed` is `None` until activation
/// has loaded the entity; it only ever holds state whose events are durable.
struct Shared {
    /// Shared with the shard's directory, which keys the entity by it.
    id: Arc<EntityId>,
    committed: RwLock<Option<Committed>>,
    /// Up to which sequence number the state is durable; closed when the activation ends.
    durable: DurableMark,
    /// When the entity last took a message ([`clock_ms`]), for the shard's idle sweep.
    last_active: AtomicU64,
    /// Where the process is: running on a task, or hibernating.
    activation: Mutex<Activation>,
}

/// Where an activation's process is. Both fields change together, under the one lock, so an
/// abort never misses a process that is between the two.
#[derive(Default)]
struct Activation {
    /// The task running the process; finished (or `None`) while it hibernates.
    task: Option<tokio::task::AbortHandle>,
    /// The process while it hibernates: the next message resumes it on a new task.
    parked: Option<Box<Process>>,
}

impl Activation {
    /// Parks `process`, counting it as hibernating.
    fn park(&mut self, process: Box<Process>) {
        process.context.hibernating.fetch_add(1, Ordering::Relaxed);
        self.task = None;
        self.parked = Some(process);
    }

    /// Takes the parked process, if any, which no longer counts as hibernating.
    fn unpark(&mut self) -> Option<Box<Process>> {
        let process = self.parked.take()?;
        process.context.hibernating.fetch_sub(1, Ordering::Relaxed);
        Some(process)
    }
}

/// The waker a hibernating entity leaves in its mailbox is its shared state: a message (or
/// the mailbox closing, or its last sender going) wakes it, and waking it spawns a task that
/// resumes the parked process. That makes a cycle while it hibernates (shared state → parked
/// process → mailbox → this waker), and every way out of hibernation breaks it: a wake takes
/// the process out and runs it, and an abort drops it.
impl std::task::Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut activation = self.activation.lock();
        if let Some(process) = activation.unpark() {
            // Spawned from whichever thread sent; the runtime handle makes that possible. A
            // runtime that is shutting down drops the process instead, as it drops tasks.
            let context = Arc::clone(&process.context);
            let task = context
                .runtime
                .spawn(context.tracker.track_future(process.serve()));
            activation.task = Some(task.abort_handle());
        }
    }
}

/// Milliseconds on tokio's clock since the first call: cheap to store in an atomic.
fn clock_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(tokio::time::Instant::now)
        .elapsed()
        .as_millis() as u64
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

    /// Ends the entity's task at its next await, dropping its mailbox (a supervisor's kill);
    /// a hibernating process is dropped at once.
    pub fn abort(&self) {
        let parked = {
            let mut activation = self.shared.activation.lock();
            if let Some(task) = &activation.task {
                task.abort();
            }
            activation.unpark()
        };
        drop(parked);
    }

    /// Whether the entity hibernates (has no task until its next message).
    pub fn is_hibernating(&self) -> bool {
        self.shared.activation.lock().parked.is_some()
    }

    /// This activation's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The entity's address, shared (the directory keys the entity by it).
    pub fn id(&self) -> &Arc<EntityId> {
        &self.shared.id
    }

    /// How long the entity has taken no message.
    pub fn idle_for(&self) -> std::time::Duration {
        let last = self.shared.last_active.load(Ordering::Relaxed);
        std::time::Duration::from_millis(clock_ms().saturating_sub(last))
    }

    /// Messages waiting in the mailbox.
    pub fn mailbox_len(&self) -> usize {
        self.mailbox.len()
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
                    entity: EntityId::clone(&self.shared.id),
                    reason: e.to_string(),
                })
        };
        if let Ok(view) = &view {
            // False: the activation ended before its batch was durable.
            if !self.shared.durable.wait_for(view.seq).await {
                return None;
            }
        }
        Some(view)
    }
}

/// Starts an activation on the context's tracker and returns its handle. The entity loads its
/// durable state before it takes its first message.
pub fn spawn(args: SpawnArgs) -> EntityHandle {
    let generation = args.generation;
    let (mailbox, inbox) = mailbox::mailbox(args.context.config.mailbox_capacity.max(1));
    let shared = Arc::new(Shared {
        id: Arc::new(args.id),
        committed: RwLock::new(None),
        durable: DurableMark::new(),
        last_active: AtomicU64::new(clock_ms()),
        activation: Mutex::new(Activation::default()),
    });
    let process = Process {
        shard: args.shard,
        generation,
        behaviour: args.behaviour,
        seen_registry_generation: Some(args.context.registry.generation()),
        host: args.host,
        shared: shared.clone(),
        inbox,
        seq: 0,
        events_since_snapshot: 0,
        deleted: false,
        pending: VecDeque::new(),
        watchers: None,
        durables: Durables::default(),
        attempts: BTreeMap::new(),
        context: args.context,
    };
    // Boxed: an async fn keeps its argument and its moved-in local apart, so an inline
    // `Process` would be stored twice in every idle task.
    let tracker = process.context.tracker.clone();
    let task = tracker.spawn(Box::new(process).run()).abort_handle();
    shared.activation.lock().task = Some(task);
    EntityHandle {
        mailbox,
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

/// What woke the turn loop.
enum Wake {
    /// The oldest turn in the output gate is durable.
    Durable,
    /// The journal failed; the queued turns were answered with the failure.
    JournalFailed,
    /// A message, or `None` once every sender is gone.
    Message(Option<Box<Envelope>>),
}

/// What the loop does after a message.
enum Next {
    Continue,
    /// Give up the task until the next message (the process is idle).
    Hibernate,
    /// Leave the directory and end; racing messages go to a new activation.
    Passivate,
    /// End at once: the directory entry and the mailbox were already dealt with.
    Exit,
}

struct Process {
    shard: u32,
    generation: u64,
    /// The version this activation runs; replaced by a hot upgrade.
    behaviour: Arc<dyn Behaviour>,
    /// The registry generation this activation last checked for a new version; `None` forces
    /// a check at the next turn (after a failed upgrade).
    seen_registry_generation: Option<u64>,
    host: Arc<dyn EntityHost>,
    context: Arc<EntityContext>,
    shared: Arc<Shared>,
    inbox: MailboxReceiver<Box<Envelope>>,
    /// Sequence number of the last committed event.
    seq: u64,
    events_since_snapshot: u64,
    /// Set once `Delete` removed the entity's data: its exit is reported as a deletion.
    deleted: bool,
    /// The output gate: turns whose answers wait for their batch to be durable, oldest first.
    pending: VecDeque<Pending>,
    /// Watchers' feed, made on the first `Watch` (a broadcast channel allocates its ring).
    watchers: Option<broadcast::Sender<Arc<WatchedTurn>>>,
    /// Timers, stored replies, the durable inbox: reloaded with the state at each activation.
    durables: Durables,
    /// Crashes per durable message, kept across restarts of this activation: past
    /// `dead_letter_after_crashes` the message becomes a dead letter.
    /// An ordered map: empty, it allocates nothing and is half a hash map's size.
    attempts: BTreeMap<DurableRef, (u32, String)>,
}

/// A durable message that may crash its entity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum DurableRef {
    Timer { name: String, due_ms: u64 },
    Inbox(u64),
    Message { from: EntityId, pair_seq: u64 },
}

/// How running a durable message went.
enum Ran {
    /// The handler ran (or refused it); its batch consumes the message.
    Handled,
    /// It crashed too often and its batch moves it to a dead letter.
    DeadLettered,
    /// The handler crashed: nothing was written.
    Crashed(String),
    /// The dead letter could not be built: nothing was written.
    NotWritten,
}

impl Ran {
    /// Whether the batch consumes the message.
    fn consumed(&self) -> bool {
        matches!(self, Ran::Handled | Ran::DeadLettered)
    }

    fn crash(self) -> Option<String> {
        match self {
            Ran::Crashed(reason) => Some(reason),
            _ => None,
        }
    }
}

/// Who waits for a queued turn's answer.
enum Answer {
    None,
    Call(oneshot::Sender<Result<CallReply, EntityError>>),
    /// A durable acceptance (durable cast, redrive) and what it answers on success.
    Accepted(oneshot::Sender<Result<bool, EntityError>>, bool),
    /// A delivery from another entity and what it answers on success.
    Delivered(
        oneshot::Sender<Result<DeliveryAck, EntityError>>,
        DeliveryAck,
    ),
}

impl Answer {
    fn send(self, outcome: Result<CallReply, EntityError>) {
        // A caller that gave up needs no answer.
        match self {
            Answer::None => {}
            Answer::Call(reply) => {
                let _ = reply.send(outcome);
            }
            Answer::Accepted(reply, value) => {
                let _ = reply.send(outcome.map(|_| value));
            }
            Answer::Delivered(reply, ack) => {
                let _ = reply.send(outcome.map(|_| ack));
            }
        }
    }
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
    answer: Answer,
    outcome: Result<CallReply, EntityError>,
    /// Effects run once the turn is durable.
    effects: Vec<Effect>,
    /// Messages the turn sent, handed to the postman once it is durable.
    posts: Vec<OutboxMessage>,
    /// The earliest timer the turn set, announced to the shard once it is durable.
    timer_due: Option<u64>,
    /// What watchers are told once the turn is durable (only while there are watchers).
    watched: Option<Arc<WatchedTurn>>,
}

/// A turn's journal batch, and what happens once it is durable.
struct TurnBatch {
    ops: Vec<Op>,
    /// Messages to hand to the postman.
    posts: Vec<OutboxMessage>,
    /// The earliest timer set, to announce to the shard.
    timer_due: Option<u64>,
    /// Effects run after durability (monitors).
    effects: Vec<Effect>,
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

impl Drop for Process {
    /// However the activation ends, readers waiting for durability through it stop waiting.
    fn drop(&mut self) {
        self.shared.durable.close();
    }
}

impl Process {
    async fn run(mut self: Box<Self>) {
        // Boxed, like every await that is not the idle wait: what the task holds while it
        // waits is what a million idle entities pay.
        if !Box::pin(self.start()).await {
            return;
        }
        self.serve().await;
    }

    /// The turn loop of an activated process, from its start or from hibernation.
    async fn serve(mut self: Box<Self>) {
        loop {
            // Accepted durable messages go before new ones.
            if self.durables.has_inbox() && self.pending.len() < PENDING_TURNS_MAX {
                match Box::pin(self.handle_inbox_front()).await {
                    // Only an idle entity hibernates, and this one has inbox work.
                    Next::Continue | Next::Hibernate => continue,
                    Next::Passivate => break,
                    Next::Exit => return,
                }
            }
            if self.pending.is_empty() && self.pending.capacity() > 0 && self.inbox.is_empty() {
                // About to wait: an idle entity keeps no queue allocation (~1 KiB).
                self.pending = VecDeque::new();
            }
            // Idle, the task waits on a small future; busy, on a boxed one (a task's size is
            // what a million idle entities pay).
            let wake = if self.pending.is_empty() {
                self.wait_idle().await
            } else {
                Box::pin(self.wait_busy()).await
            };
            match wake {
                Wake::JournalFailed => break,
                Wake::Durable => self.finish_front(),
                // Every sender is gone: the shard dropped this activation.
                Wake::Message(None) => return,
                Wake::Message(Some(envelope)) => {
                    // Boxed: the idle task stays small (a turn's state machine is ~1 KiB).
                    match Box::pin(self.handle(*envelope)).await {
                        Next::Continue => {}
                        Next::Hibernate => match self.hibernate() {
                            Ok(()) => return,
                            // A message came in meanwhile: carry on.
                            Err(process) => self = process,
                        },
                        Next::Passivate => break,
                        Next::Exit => return,
                    }
                }
            }
        }
        self.passivate();
    }

    /// Parks the process in its activation and leaves its shared state as the mailbox's
    /// waker, so the task can end; hands the process back if a message is waiting (or the
    /// mailbox closed) by now. The activation lock is held throughout, so a message that arrives
    /// meanwhile wakes the waker only once the process is parked.
    fn hibernate(mut self: Box<Self>) -> Result<(), Box<Self>> {
        let shared = Arc::clone(&self.shared);
        let mut activation = shared.activation.lock();
        if !self.inbox.park(Waker::from(Arc::clone(&shared))) {
            return Err(self);
        }
        activation.park(self);
        Ok(())
    }

    /// With nothing in the output gate: the next message. (Passivating an idle entity is the
    /// shard's idle sweep, so an idle task holds no timer.)
    async fn wait_idle(&mut self) -> Wake {
        Wake::Message(self.inbox.recv().await)
    }

    /// With turns in the output gate: the oldest becoming durable (first), or a new message
    /// while fewer than `PENDING_TURNS_MAX` wait.
    async fn wait_busy(&mut self) -> Wake {
        tokio::select! {
            biased;
            durable = front_durable(&mut self.pending) => match durable {
                Ok(()) => Wake::Durable,
                Err(error) => {
                    self.fail_pending(error);
                    Wake::JournalFailed
                }
            },
            envelope = self.inbox.recv(), if self.pending.len() < PENDING_TURNS_MAX => {
                Wake::Message(envelope)
            }
        }
    }

    /// Activates the entity; on failure answers everything waiting and says so (false).
    async fn start(&mut self) -> bool {
        match self.activate().await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(entity = %self.shared.id, %error, "activation failed");
                self.fail_activation(error).await;
                false
            }
        }
    }

    /// Loads the snapshot and events and installs the recovered state.
    async fn activate(&mut self) -> Result<(), EntityError> {
        let mut loaded = self
            .context
            .store
            .load(self.shard, &self.shared.id)
            .await
            .map_err(|e| EntityError::from_store(&self.shared.id, e))?;
        let records = std::mem::take(&mut loaded.records);
        // The active version now: a deploy may have happened since this entity was routed.
        self.seen_registry_generation = Some(self.context.registry.generation());
        let latest = self
            .context
            .registry
            .get(&self.shared.id.entity_type)
            .unwrap_or_else(|| self.behaviour.clone());
        let registry = self.context.registry.clone();
        let entity_type = self.shared.id.entity_type.clone();
        let versions = move |version: u32| registry.version(&entity_type, version);
        let Recovered {
            state,
            seq,
            events_since_snapshot,
            behaviour,
            migrated_from,
            upgrade_error,
        } = recovery::recover(&latest, &versions, &self.shared.id, loaded)?;
        self.durables = Durables::load(
            &self.shared.id,
            &records,
            now_unix_ms(),
            &self.context.config,
        )?;
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
            tracing::warn!(entity = %self.shared.id, %error, "upgrade at activation failed");
            self.seen_registry_generation = None;
        } else if let (Some(from), true) = (migrated_from, seq > 0) {
            tracing::info!(entity = %self.shared.id, from, to = self.behaviour.version(), "migrated at activation");
            Box::pin(self.write_snapshot()).await?;
        }
        Ok(())
    }

    /// At a turn boundary: if a new version of this type is active, snapshot, migrate the
    /// state with the new version's `migrate`, snapshot again under the new version, and run
    /// on it from now on. On failure nothing changes: the old state stays, and the error is
    /// this turn's crash.
    async fn upgrade_if_deployed(&mut self) -> Result<(), String> {
        let generation = self.context.registry.generation();
        if self.seen_registry_generation == Some(generation) {
            return Ok(());
        }
        let Some(latest) = self.context.registry.get(&self.shared.id.entity_type) else {
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
            let payload = codec::encode(&self.shared.id, &value).map_err(|e| e.to_string())?;
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
        tracing::info!(entity = %self.shared.id, from, to = latest.version(), "hot upgrade");
        self.behaviour = latest;
        self.events_since_snapshot = 0;
        self.seen_registry_generation = Some(generation);
        Ok(())
    }

    async fn handle(&mut self, envelope: Envelope) -> Next {
        // The sweeps' questions are not activity.
        if !matches!(
            envelope.request,
            Request::Idle | Request::Hibernate | Request::ForgetExpiredReplies { .. }
        ) {
            self.shared.last_active.store(clock_ms(), Ordering::Relaxed);
        }
        if envelope.expired() {
            envelope.fail(EntityError::DeadlineExceeded(EntityId::clone(
                &self.shared.id,
            )));
            return Next::Continue;
        }
        let turn = matches!(
            envelope.request,
            Request::Call { .. }
                | Request::Cast { .. }
                | Request::Info { .. }
                | Request::Timer { .. }
                | Request::Deliver { .. }
        );
        if turn {
            if let Err(reason) = Box::pin(self.upgrade_if_deployed()).await {
                let reason = format!("upgrade to the active version failed: {reason}");
                envelope.fail(self.crashed(reason.clone()));
                return Box::pin(self.on_crash(reason)).await;
            }
        }
        match envelope.request {
            Request::Call {
                message,
                request_id,
                reply,
            } => {
                if let Some(stored) = request_id.as_deref().and_then(|r| self.stored_reply(r)) {
                    return self.answer_now(Answer::Call(reply), stored);
                }
                let (mut pending, crash) = self
                    .turn(Inbound::Message(message), request_id.as_deref())
                    .await;
                pending.answer = Answer::Call(reply);
                self.settle(pending, crash).await
            }
            Request::Cast {
                message,
                request_id,
            } => {
                // A repeat of a cast that ran: nothing to answer, nothing to decode.
                if request_id
                    .as_deref()
                    .is_some_and(|r| self.durables.has_stored_reply(r))
                {
                    return Next::Continue;
                }
                let (pending, crash) = self
                    .turn(Inbound::Cast(message), request_id.as_deref())
                    .await;
                self.settle(pending, crash).await
            }
            Request::Info { message } => {
                let (pending, crash) = self.turn(Inbound::Info(message), None).await;
                self.settle(pending, crash).await
            }
            Request::DurableCast {
                message,
                request_id,
                reply,
            } => Box::pin(self.accept_durable_cast(message, request_id, reply)).await,
            Request::Timer {
                name,
                due_ms,
                permit,
            } => {
                let next = Box::pin(self.fire_timer(name, due_ms)).await;
                drop(permit);
                next
            }
            Request::Deliver {
                from,
                message,
                reply,
            } => Box::pin(self.accept_delivery(from, *message, reply)).await,
            Request::Redrive { id, reply } => Box::pin(self.redrive(id, reply)).await,
            Request::Wake => Next::Continue,
            Request::Idle => self.idle_check(),
            Request::Hibernate => self.hibernate_check(),
            Request::ForgetExpiredReplies { reply } => {
                Box::pin(self.forget_expired_replies(reply)).await
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
                        entity: EntityId::clone(&self.shared.id),
                        reason: "the journal failed".into(),
                    })
                };
                let _ = reply.send(result);
                Next::Passivate
            }
        }
    }

    /// The shard's idle sweep asks: passivate if nothing happened for `idle_timeout`, nothing
    /// waits (mailbox, durable inbox, output gate) and nobody watches.
    fn idle_check(&self) -> Next {
        let idle_ms = clock_ms().saturating_sub(self.shared.last_active.load(Ordering::Relaxed));
        let idle = idle_ms >= self.context.config.idle_timeout.as_millis() as u64
            && self.nothing_waits()
            && !self.watched();
        if idle {
            Next::Passivate
        } else {
            Next::Continue
        }
    }

    /// The stored-reply sweep asks: write the removals of the stored replies past their
    /// window (found so at activation, or since), then passivate if nothing waits. The sweep
    /// asks only entities that were not active, so this activation is most likely its own;
    /// one that took messages meanwhile passivates too if idle now, and its next message
    /// activates it again.
    async fn forget_expired_replies(
        &mut self,
        reply: oneshot::Sender<Result<usize, EntityError>>,
    ) -> Next {
        let ops = self
            .durables
            .forget_expired_replies(now_unix_ms(), &self.context.config);
        let forgotten = ops.len();
        let committed = if ops.is_empty() {
            Ok(())
        } else {
            self.commit(ops).await
        };
        let _ = reply.send(committed.map(|()| forgotten));
        if self.nothing_waits() && !self.watched() {
            Next::Passivate
        } else {
            Next::Continue
        }
    }

    /// Hibernate if nothing waits: no turn in the output gate, no message, nothing in the
    /// durable inbox. Watchers may stay: they hold their own end of the feed.
    fn hibernate_check(&self) -> Next {
        if self.nothing_waits() {
            Next::Hibernate
        } else {
            Next::Continue
        }
    }

    /// No turn in the output gate, no message, nothing in the durable inbox.
    fn nothing_waits(&self) -> bool {
        self.pending.is_empty() && self.inbox.is_empty() && !self.durables.has_inbox()
    }

    /// The stored reply of a request id seen before, as a call's answer; an error if it
    /// does not decode (the request ran: it must not run again).
    fn stored_reply(&self, request_id: &str) -> Option<Result<CallReply, EntityError>> {
        let stored = self.durables.stored_reply(&self.shared.id, request_id)?;
        Some(stored.map(|stored| CallReply {
            reply: stored.reply,
            seq: stored.seq,
            deduplicated: true,
        }))
    }

    /// Queues an answer that needs no batch of its own (it still waits behind the turns
    /// before it, whose effects it may report).
    fn answer_now(&mut self, answer: Answer, outcome: Result<CallReply, EntityError>) -> Next {
        let pending = self.answering(answer, outcome);
        self.pending.push_back(pending);
        self.finish_ready();
        Next::Continue
    }

    /// Writes a durable cast into the inbox (with its request id's record), answering once
    /// that is durable. The run loop then handles it like any inbox item.
    async fn accept_durable_cast(
        &mut self,
        message: Value,
        request_id: Option<String>,
        reply: oneshot::Sender<Result<bool, EntityError>>,
    ) -> Next {
        if request_id
            .as_deref()
            .is_some_and(|r| self.durables.has_stored_reply(r))
        {
            return self.answer_now(Answer::Accepted(reply, true), Ok(self.no_reply()));
        }
        let mut ops = Vec::new();
        let item = InboxItem {
            kind: MessageKind::Cast,
            message,
            origin: "client".into(),
        };
        let accepted = self
            .durables
            .records_mut()
            .accept_into_inbox(&self.shared.id, item, &mut ops)
            .and_then(|_| match &request_id {
                Some(request_id) => {
                    let record = DedupRecord {
                        at_ms: now_unix_ms(),
                        seq: self.seq,
                        reply: Value::Null,
                    };
                    self.durables.store_reply(
                        &self.shared.id,
                        request_id,
                        record,
                        &self.context.config,
                        &mut ops,
                    )
                }
                None => Ok(()),
            });
        let pending = self
            .write_prepared(accepted, ops, Answer::Accepted(reply, false))
            .await;
        self.settle(pending, None).await
    }

    /// A queued answer for a batch the engine writes itself (no handler ran), once
    /// `prepared` (building the batch) succeeded; otherwise `answer` hears why not.
    async fn write_prepared(
        &mut self,
        prepared: Result<(), EntityError>,
        ops: Vec<Op>,
        answer: Answer,
    ) -> Pending {
        if let Err(error) = prepared {
            return self.answering(answer, Err(error));
        }
        match self.submit(ops).await {
            Ok(durable) => {
                let mut pending = self.answering(answer, Ok(self.no_reply()));
                pending.durable = Some(durable);
                pending
            }
            Err(error) => self.answering(answer, Err(error)),
        }
    }

    fn no_reply(&self) -> CallReply {
        CallReply {
            reply: Value::Null,
            seq: self.seq,
            deduplicated: false,
        }
    }

    /// Whether a durable message crashed this entity often enough to become a dead letter.
    fn exhausted(&self, what: &DurableRef) -> bool {
        self.attempts
            .get(what)
            .is_some_and(|(n, _)| *n >= self.context.config.dead_letter_after_crashes)
    }

    /// Counts a crash of a durable message.
    fn count_crash(&mut self, what: DurableRef, reason: &str) {
        let entry = self.attempts.entry(what).or_insert((0, String::new()));
        entry.0 += 1;
        entry.1 = reason.to_owned();
    }

    /// Adds the ops that move `item` to a dead letter, forgetting its crash count.
    fn dead_letter_ops(
        &mut self,
        what: &DurableRef,
        kind: &str,
        item: InboxItem,
        ops: &mut Vec<Op>,
    ) -> Result<(), EntityError> {
        let (attempts, reason) = self.attempts.remove(what).unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let id = format!("{kind}-{now}");
        tracing::warn!(entity = %self.shared.id, dead_letter = %id, attempts, %reason, "durable message moved to a dead letter");
        let record = DeadLetterRecord {
            kind: kind.to_owned(),
            item,
            reason,
            attempts,
            dead_at_ms: now_unix_ms(),
        };
        ops.push(Op::PutRecord {
            kind: RecordKind::DeadLetter,
            name: id.as_bytes().to_vec(),
            value: records::encode(&self.shared.id, &record)?,
        });
        Ok(())
    }

    /// Runs a durable message (a due timer, a message from an entity, an inbox item) whose
    /// handling `consume` records: past its crash budget it becomes a dead letter instead
    /// (of kind `kind`); otherwise the handler its kind names runs, and its crashes are
    /// counted.
    async fn run_durable(
        &mut self,
        what: DurableRef,
        kind: &str,
        item: InboxItem,
        mut consume: Vec<Op>,
    ) -> (Pending, Ran) {
        if self.exhausted(&what) {
            let prepared = self.dead_letter_ops(&what, kind, item, &mut consume);
            let ran = if prepared.is_ok() {
                Ran::DeadLettered
            } else {
                Ran::NotWritten
            };
            let pending = self.write_prepared(prepared, consume, Answer::None).await;
            return (pending, ran);
        }
        let (pending, crash) = self.handle_item(item, consume).await;
        match crash {
            Some(reason) => {
                self.count_crash(what, &reason);
                (pending, Ran::Crashed(reason))
            }
            None => {
                self.attempts.remove(&what);
                (pending, Ran::Handled)
            }
        }
    }

    /// Runs a due timer through the info handler; the timer is consumed in the turn's batch.
    async fn fire_timer(&mut self, name: String, due_ms: u64) -> Next {
        let Some(timer) = self
            .durables
            .timer(&name)
            .filter(|t| t.due_ms == due_ms)
            .cloned()
        else {
            // Fired, cancelled or replaced already: a late or repeated delivery.
            return Next::Continue;
        };
        let what = DurableRef::Timer {
            name: name.clone(),
            due_ms,
        };
        let item = InboxItem {
            kind: MessageKind::Info,
            message: timer_message(&name, timer.payload, due_ms),
            origin: format!("timer:{name}"),
        };
        // Consumed in the batch whatever happens but a crash, which reloads the timers.
        let mut consume = Vec::new();
        self.durables.cancel_timer(&name, &mut consume);
        let (pending, ran) = self.run_durable(what, "timer", item, consume).await;
        self.settle(pending, ran.crash()).await
    }

    /// The last message sequence number accepted from `from` (0: none yet).
    async fn receipt(&mut self, from: &EntityId) -> Result<u64, EntityError> {
        self.pair_seq(RecordKind::Receipt, from).await
    }

    /// The last message sequence number sent to `to` (0: none yet).
    async fn send_seq(&mut self, to: &EntityId) -> Result<u64, EntityError> {
        self.pair_seq(RecordKind::SendSeq, to).await
    }

    /// A per-peer sequence number (`Receipt` or `SendSeq`): cached for the activation, read
    /// from storage on first use.
    async fn pair_seq(&mut self, kind: RecordKind, peer: &EntityId) -> Result<u64, EntityError> {
        if let Some(seq) = self.durables.cached_seq(kind, peer) {
            return Ok(seq);
        }
        let stored = self
            .context
            .store
            .record(
                self.shard,
                &self.shared.id,
                kind,
                &records::address_name(peer),
            )
            .await
            .map_err(|e| EntityError::from_store(&self.shared.id, e))?;
        let seq = match stored {
            Some(bytes) => {
                records::decode_seq(&self.shared.id, &format!("{kind:?} of {peer}"), &bytes)?
            }
            None => 0,
        };
        self.durables.cache_seq(kind, peer.clone(), seq);
        Ok(seq)
    }

    /// A message from another entity: handled exactly once. Its receipt (the sender's
    /// sequence number) is written in the same batch as the turn, so a redelivery after a
    /// crash on either side is recognised and only acknowledged.
    async fn accept_delivery(
        &mut self,
        from: EntityId,
        message: OutboxMessage,
        reply: oneshot::Sender<Result<DeliveryAck, EntityError>>,
    ) -> Next {
        let last = match self.receipt(&from).await {
            Ok(last) => last,
            Err(error) => {
                let _ = reply.send(Err(error));
                return Next::Continue;
            }
        };
        let pair_seq = message.pair_seq;
        // No receipt yet (a new target, or one deleted since): the first message sets it.
        if last != 0 && pair_seq <= last {
            return self.answer_now(
                Answer::Delivered(reply, DeliveryAck::Duplicate),
                Ok(self.no_reply()),
            );
        }
        if last != 0 && pair_seq > last + 1 {
            let _ = reply.send(Ok(DeliveryAck::Gap { expected: last + 1 }));
            return Next::Continue;
        }
        let what = DurableRef::Message {
            from: from.clone(),
            pair_seq,
        };
        let receipt = vec![Op::PutRecord {
            kind: RecordKind::Receipt,
            name: records::address_name(&from),
            value: records::encode_seq(pair_seq),
        }];
        let kind = match message.kind {
            MessageKind::Cast => "send",
            MessageKind::Call { .. } => "request",
            MessageKind::Info => "reply",
        };
        let item = InboxItem {
            kind: message.kind,
            message: message.message,
            origin: from.to_string(),
        };
        let (mut pending, ran) = self.run_durable(what, kind, item, receipt).await;
        let ack = match ran {
            Ran::DeadLettered => DeliveryAck::DeadLettered,
            _ => DeliveryAck::Accepted,
        };
        if ran.consumed() {
            self.durables.cache_seq(RecordKind::Receipt, from, pair_seq);
        }
        pending.answer = Answer::Delivered(reply, ack);
        self.settle(pending, ran.crash()).await
    }

    /// Runs an accepted durable message through the handler its kind names, committing
    /// `consume` (what marks it handled) with the turn. A refusal consumes it too (a request's
    /// sender gets the error as its reply); a crash writes nothing.
    async fn handle_item(
        &mut self,
        item: InboxItem,
        consume: Vec<Op>,
    ) -> (Pending, Option<String>) {
        let (inbound, reply_to) = match item.kind {
            MessageKind::Cast => (Inbound::Cast(item.message), None),
            MessageKind::Info => (Inbound::Info(item.message), None),
            MessageKind::Call { reply_to, tag } => {
                (Inbound::Message(item.message), Some((reply_to, tag)))
            }
        };
        let (turn, refused) = match self.run_handler(inbound) {
            Ok(turn) => (turn, None),
            Err(EntityError::InvalidMessage { reason, .. }) => {
                tracing::warn!(entity = %self.shared.id, origin = %item.origin, %reason, "durable message refused by the behaviour; it is consumed");
                (Turn::reply(Value::Null), Some(reason))
            }
            Err(error) => {
                let crash = crash_reason(&error);
                return (self.answered(Err(error)), crash);
            }
        };
        let replies = reply_to
            .map(|(to, tag)| {
                let outcome = match &refused {
                    None => Ok(turn.reply.clone()),
                    Some(reason) => Err(("invalid_argument", reason.as_str())),
                };
                (to, reply_message(&self.shared.id, tag, outcome))
            })
            .into_iter()
            .collect();
        self.commit_turn(turn, consume, None, replies).await
    }

    /// Handles the oldest accepted inbox item; a crash leaves it in the inbox (and storage).
    async fn handle_inbox_front(&mut self) -> Next {
        let Some((seq, item)) = self.durables.inbox_front().cloned() else {
            return Next::Continue;
        };
        if let Err(reason) = Box::pin(self.upgrade_if_deployed()).await {
            let reason = format!("upgrade to the active version failed: {reason}");
            return Box::pin(self.on_crash(reason)).await;
        }
        let consume = vec![Op::RemoveRecord {
            kind: RecordKind::Inbox,
            name: records::inbox_name(seq),
        }];
        let (pending, ran) = self
            .run_durable(DurableRef::Inbox(seq), "durable_cast", item, consume)
            .await;
        if ran.consumed() {
            self.durables.pop_inbox();
        }
        self.settle(pending, ran.crash()).await
    }

    /// Moves dead letter `id` back into the inbox.
    async fn redrive(
        &mut self,
        id: String,
        reply: oneshot::Sender<Result<bool, EntityError>>,
    ) -> Next {
        let stored = self
            .context
            .store
            .record(
                self.shard,
                &self.shared.id,
                RecordKind::DeadLetter,
                id.as_bytes(),
            )
            .await
            .map_err(|e| EntityError::from_store(&self.shared.id, e));
        let record: DeadLetterRecord = match stored {
            Ok(Some(bytes)) => {
                match records::decode(&self.shared.id, &format!("dead letter {id}"), &bytes) {
                    Ok(record) => record,
                    Err(error) => {
                        let _ = reply.send(Err(error));
                        return Next::Continue;
                    }
                }
            }
            Ok(None) => {
                let _ = reply.send(Ok(false));
                return Next::Continue;
            }
            Err(error) => {
                let _ = reply.send(Err(error));
                return Next::Continue;
            }
        };
        let mut ops = vec![Op::RemoveRecord {
            kind: RecordKind::DeadLetter,
            name: id.into_bytes(),
        }];
        let accepted = self
            .durables
            .records_mut()
            .accept_into_inbox(&self.shared.id, record.item, &mut ops)
            .map(|_| ());
        let pending = self
            .write_prepared(accepted, ops, Answer::Accepted(reply, true))
            .await;
        self.settle(pending, None).await
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
        self.shared.durable.advance(done.seq);
        for effect in done.effects {
            match effect {
                Effect::Monitor(target) => self.host.monitor(&self.shared.id, &target),
                Effect::Demonitor(target) => self.host.demonitor(&self.shared.id, &target),
                // Durable effects travelled in the turn's batch; see `posts` and `timer_due`.
                Effect::SetTimer { .. }
                | Effect::CancelTimer { .. }
                | Effect::Send { .. }
                | Effect::Request { .. } => {}
            }
        }
        for message in done.posts {
            self.host.post(&self.shared.id, message);
        }
        if let Some(due_ms) = done.timer_due {
            self.host.timer_set(due_ms);
        }
        if let (Some(item), Some(watchers)) = (done.watched, &self.watchers) {
            // No receiver left is no error: the feed is simply unused.
            let _ = watchers.send(item);
        }
        done.answer.send(done.outcome);
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
        let error = EntityError::from_store(&self.shared.id, error);
        for pending in self.pending.drain(..) {
            pending.answer.send(Err(error.clone()));
        }
        // This activation's state is ahead of what is durable: it must not serve again.
        *self.shared.committed.write() = None;
        self.host.storage_failed(&error.to_string());
    }

    /// A turn crashed. Nothing of it was written; the shard's supervisor decides whether this
    /// activation restarts from durable state, stops, or is quarantined.
    async fn on_crash(&mut self, reason: String) -> Next {
        tracing::warn!(entity = %self.shared.id, %reason, "entity crashed");
        match self.host.crashed(&self.shared.id, self.generation, &reason) {
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

    /// Runs one message: the handler, then the turn's commit (see [`Process::commit_turn`]).
    /// Returns the queued answer and, on a crash, its reason.
    async fn turn(
        &mut self,
        inbound: Inbound,
        request_id: Option<&str>,
    ) -> (Pending, Option<String>) {
        match self.run_handler(inbound) {
            Ok(turn) => {
                self.commit_turn(turn, Vec::new(), request_id, Vec::new())
                    .await
            }
            Err(error) => {
                let crash = crash_reason(&error);
                (self.answered(Err(error)), crash)
            }
        }
    }

    /// Commits a handled turn as one journal batch: its events, the engine's `consume` ops
    /// (what marks a durable message handled), its durable effects (timers, outbox messages
    /// and `replies` to requests), and the stored reply of `request_id`. The events are
    /// applied at once, so the next message sees them; the answer waits in the output gate
    /// until the batch is durable. A turn that writes nothing waits for nothing of its own.
    async fn commit_turn(
        &mut self,
        turn: Turn,
        consume: Vec<Op>,
        request_id: Option<&str>,
        replies: Vec<(EntityId, Value)>,
    ) -> (Pending, Option<String>) {
        match self.turn_ops(&turn, consume, request_id, replies).await {
            Ok(batch) => self.submit_turn(turn, batch).await,
            Err(error) => {
                let crash = crash_reason(&error);
                (self.answered(Err(error)), crash)
            }
        }
    }

    /// The ops of a turn's batch, in order, and what happens once it is durable.
    async fn turn_ops(
        &mut self,
        turn: &Turn,
        consume: Vec<Op>,
        request_id: Option<&str>,
        replies: Vec<(EntityId, Value)>,
    ) -> Result<TurnBatch, EntityError> {
        let now = now_unix_ms();
        let version = self.behaviour.version();
        let mut ops = Vec::with_capacity(turn.events.len() + consume.len());
        for (event, seq) in turn.events.iter().zip(self.seq + 1..) {
            ops.push(Op::Event {
                seq,
                behaviour_version: version,
                payload: codec::encode(&self.shared.id, event)?,
            });
        }
        // Before the effects: a timer handler may set its own timer's name again.
        ops.extend(consume);
        let mut posts = Vec::new();
        let mut timer_due: Option<u64> = None;
        let mut after = Vec::new();
        let mut sends: Vec<(EntityId, MessageKind, Value)> = Vec::new();
        for effect in &turn.effects {
            match effect {
                Effect::Monitor(_) | Effect::Demonitor(_) => after.push(effect.clone()),
                Effect::SetTimer { name, due, payload } => {
                    let due_ms = due.at(now);
                    let record = TimerRecord {
                        due_ms,
                        payload: payload.clone(),
                    };
                    self.durables.records_mut().set_timer(
                        &self.shared.id,
                        name.clone(),
                        record,
                        &mut ops,
                    )?;
                    timer_due = Some(timer_due.map_or(due_ms, |d| d.min(due_ms)));
                }
                Effect::CancelTimer { name } => {
                    self.durables.cancel_timer(name, &mut ops);
                }
                Effect::Send { to, message } => {
                    sends.push((to.clone(), MessageKind::Cast, message.clone()));
                }
                Effect::Request { to, message, tag } => {
                    let kind = MessageKind::Call {
                        reply_to: EntityId::clone(&self.shared.id),
                        tag: tag.clone(),
                    };
                    sends.push((to.clone(), kind, message.clone()));
                }
            }
        }
        sends.extend(
            replies
                .into_iter()
                .map(|(to, message)| (to, MessageKind::Info, message)),
        );
        for (to, kind, message) in sends {
            to.validate().map_err(|e| {
                self.crashed(format!("a message was sent to an invalid address: {e}"))
            })?;
            let pair_seq = self.send_seq(&to).await? + 1;
            let outgoing = OutboxMessage {
                to: to.clone(),
                pair_seq,
                kind,
                message,
            };
            ops.push(Op::PutRecord {
                kind: RecordKind::SendSeq,
                name: records::address_name(&to),
                value: records::encode_seq(pair_seq),
            });
            ops.push(Op::PutRecord {
                kind: RecordKind::Outbox,
                name: records::outbox_name(&to, pair_seq),
                value: records::encode(&self.shared.id, &outgoing)?,
            });
            self.durables.cache_seq(RecordKind::SendSeq, to, pair_seq);
            posts.push(outgoing);
        }
        ops.extend(self.durables.take_owed());
        if let Some(request_id) = request_id {
            // Only a turn that changed something is worth remembering: a retry of one that
            // did not simply runs again.
            if !ops.is_empty() {
                let record = DedupRecord {
                    at_ms: now,
                    seq: self.seq + turn.events.len() as u64,
                    reply: turn.reply.clone(),
                };
                self.durables.store_reply(
                    &self.shared.id,
                    request_id,
                    record,
                    &self.context.config,
                    &mut ops,
                )?;
            }
        }
        Ok(TurnBatch {
            ops,
            posts,
            timer_due,
            effects: after,
        })
    }

    /// Hands a turn's batch to the journal, applies its events, and queues its answer.
    async fn submit_turn(&mut self, turn: Turn, batch: TurnBatch) -> (Pending, Option<String>) {
        let TurnBatch {
            ops,
            posts,
            timer_due,
            effects,
        } = batch;
        let mut durable = None;
        if !ops.is_empty() {
            match self.submit(ops).await {
                Ok(submitted) => durable = Some(submitted),
                Err(error) => {
                    let crash = crash_reason(&error);
                    return (self.answered(Err(error)), crash);
                }
            }
        }
        if !turn.events.is_empty() {
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
            deduplicated: false,
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
            answer: Answer::None,
            outcome,
            effects,
            posts,
            timer_due,
            watched,
        };
        (pending, None)
    }

    /// A queued answer that waits for nothing of its own.
    fn answered(&self, outcome: Result<CallReply, EntityError>) -> Pending {
        self.answering(Answer::None, outcome)
    }

    /// A queued answer for `answer` that waits for nothing of its own.
    fn answering(&self, answer: Answer, outcome: Result<CallReply, EntityError>) -> Pending {
        Pending {
            durable: None,
            seq: self.seq,
            answer,
            outcome,
            effects: Vec::new(),
            posts: Vec::new(),
            timer_due: None,
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
                entity: EntityId::clone(&self.shared.id),
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
        let key = &self.shared.id.key;
        let outcome = catch_unwind(AssertUnwindSafe(|| match inbound {
            Inbound::Message(message) => self.behaviour.handle(key, &committed.state, message),
            Inbound::Cast(message) => self.behaviour.handle_cast(key, &committed.state, message),
            Inbound::Info(info) => self.behaviour.handle_info(key, &committed.state, info),
        }));
        match outcome {
            Ok(Ok(turn)) => Ok(turn),
            Ok(Err(BehaviourError::InvalidMessage(reason))) => Err(EntityError::InvalidMessage {
                entity: EntityId::clone(&self.shared.id),
                reason,
            }),
            Ok(Err(error)) => Err(self.crashed(error.to_string())),
            Err(panic) => {
                Err(self.crashed(format!("handler panicked: {}", panic_message(&*panic))))
            }
        }
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
        let every = self.context.config.snapshot_every_events;
        if every == 0 || self.events_since_snapshot < every {
            return;
        }
        let op = match self.snapshot_op() {
            Ok(op) => op,
            Err(error) => {
                tracing::warn!(entity = %self.shared.id, %error, "snapshot skipped");
                return;
            }
        };
        // Queued like a turn: the journal keeps it after the events it covers.
        match self.submit(vec![op]).await {
            Ok(durable) => {
                self.events_since_snapshot = 0;
                let mut pending = self.answered(Ok(self.no_reply()));
                pending.durable = Some(durable);
                self.pending.push_back(pending);
            }
            Err(error) => tracing::warn!(entity = %self.shared.id, %error, "snapshot failed"),
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
            .and_then(|value| codec::encode(&self.shared.id, &value))?;
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
        let mut ops = self.durables.timer_index_removals();
        let has_records = !ops.is_empty() || self.durables.has_inbox();
        if existed || has_records {
            ops.push(Op::Delete);
            self.commit(ops).await?;
        }
        self.durables = Durables::default();
        *self.shared.committed.write() = None;
        self.deleted = true;
        Ok(existed)
    }

    async fn submit(&self, ops: Vec<Op>) -> Result<Durable, EntityError> {
        let batch = EntityBatch {
            shard: self.shard,
            entity: EntityId::clone(&self.shared.id),
            ops,
        };
        self.context
            .store
            .submit(batch)
            .await
            .map_err(|e| EntityError::from_store(&self.shared.id, e))
    }

    async fn commit(&self, ops: Vec<Op>) -> Result<(), EntityError> {
        let batch = EntityBatch {
            shard: self.shard,
            entity: EntityId::clone(&self.shared.id),
            ops,
        };
        self.context
            .store
            .commit(batch)
            .await
            .map_err(|e| EntityError::from_store(&self.shared.id, e))
    }

    /// Leaves the directory; messages that slipped in meanwhile go to a new activation.
    fn passivate(&mut self) {
        let exit = if self.deleted {
            Exit::Deleted
        } else {
            Exit::Stopped
        };
        self.host.exited(&self.shared.id, self.generation, exit);
        self.inbox.close();
        while let Ok(envelope) = self.inbox.try_recv().map(|envelope| *envelope) {
            self.host.reroute(
                EntityId::clone(&self.shared.id),
                self.behaviour.clone(),
                envelope,
            );
        }
    }

    /// The entity could not be loaded: answer everything waiting with the reason and leave.
    /// `Delete` still works, so an operator can remove a corrupt entity.
    async fn fail_activation(&mut self, error: EntityError) {
        self.host.deregister(&self.shared.id, self.generation);
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
        self.host.deregister(&self.shared.id, self.generation);
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
            entity: EntityId::clone(&self.shared.id),
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
#[cfg(test)]
mod footprint {
    /// Every active entity holds a `Process` (in its task, or parked while it hibernates;
    /// 192 bytes is a jemalloc size class) and the state it shares with readers (in an
    /// `Arc`: with its two counts, 128 bytes is a class), and its mailbox holds boxed
    /// envelopes: growing any of them grows the memory of a million active entities.
    #[test]
    fn an_idle_entity_stays_small() {
        let process = std::mem::size_of::<super::Process>();
        let shared = std::mem::size_of::<super::Shared>();
        let envelope = std::mem::size_of::<super::Envelope>();
        assert!(process <= 192, "Process is {process} bytes");
        assert!(shared + 16 <= 128, "Shared is {shared} bytes");
        assert!(envelope <= 96, "Envelope is {envelope} bytes");
    }
}
