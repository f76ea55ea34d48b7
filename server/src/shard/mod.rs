//! Shards: key → shard routing and the operations the API offers on entities.
//!
//! **Owns**: the stable address → shard hash ([`hash`]), each shard's directory of active
//! entities ([`directory`]), the background services over every shard (the idle sweep, the
//! timer services, the postman, the stored-reply sweep `reply_sweep`, and `record_pages`, the
//! cursor the sweeps page through records with), and [`Shards`], the one entry point `grpc/`
//! calls.
//! **May call**: `entity/` (spawn, mailboxes, recovery), `behaviour/` (the registry) and
//! `storage/` (reads of passive entities, listing). Knows nothing about protobuf.
//!
//! Invariants:
//! - The shard count is the data dir's own, fixed at creation; an address always maps to the
//!   same shard.
//! - There is no global lock on the call path: each shard has its own directory lock.
//! - After [`Shards::shutdown`] begins, no entity is activated and no message is accepted.

mod directory;
pub mod hash;
mod postman;
mod record_pages;
mod reply_sweep;
mod timers;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::address::EntityId;
use crate::behaviour::{Behaviour, BehaviourRegistry, Value};
use crate::config::SupervisionConfig;
use crate::entity::records::{self, DeadLetterRecord};
use crate::entity::{
    codec, recovery, validate_request_id, CallReply, EntityConfig, EntityContext, EntityError,
    Envelope, Request, StateView,
};
use crate::storage::{DiskUsage, EntityBatch, Op, RecordKind, Store, StoreError, StoreStats};
use crate::supervisor::{NodeKind, RootSupervisor, TreeNode};

use directory::{Shard, ShardContext};
use postman::Postman;

/// The default and largest page sizes of `list`.
pub const LIST_PAGE_SIZE_DEFAULT: usize = 100;
pub const LIST_PAGE_SIZE_MAX: usize = 1000;

/// Messages buffered per watcher before its feed waits (the entity never does: a watcher
/// that stays behind is ended with "resubscribe from N").
pub const WATCH_BUFFER: usize = 64;

/// One message of a watch feed.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchMessage {
    pub seq: u64,
    pub events: Vec<Value>,
    /// The state after `seq`; `None` for events replayed from storage.
    pub state: Option<Value>,
    pub note: Option<String>,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    pub keys: Vec<String>,
    /// Where the next page starts; `None` when this was the last.
    pub next_page_token: Option<String>,
}

/// Every shard of the server, and the operations on entities.
pub struct Shards {
    shards: Vec<Arc<Shard>>,
    context: Arc<ShardContext>,
}

impl Shards {
    /// Builds one shard per shard of the store. No entity is active yet.
    pub fn new(
        registry: Arc<BehaviourRegistry>,
        store: Arc<dyn Store>,
        config: EntityConfig,
        supervision: SupervisionConfig,
        root: Arc<RootSupervisor>,
    ) -> Self {
        let shard_count = store.shard_count();
        let entities = Arc::new(EntityContext::new(
            registry,
            store,
            config,
            tokio::runtime::Handle::current(),
        ));
        let context = Arc::new(ShardContext {
            supervision,
            root,
            shards: OnceLock::new(),
            entities,
            closing: AtomicBool::new(false),
            generations: AtomicU64::new(0),
            replies_forgotten: AtomicU64::new(0),
            postman: OnceLock::new(),
            cancel: CancellationToken::new(),
        });
        let shards: Vec<Arc<Shard>> = (0..shard_count)
            .map(|index| Shard::new(index, context.clone()))
            .collect();
        // Set once, right after the shards exist; nothing routes before `new` returns.
        let _ = context
            .shards
            .set(shards.iter().map(Arc::downgrade).collect());
        let _ = context
            .postman
            .set(Postman::start(&context, context.cancel.clone()));
        tokio::spawn(idle_sweep(
            shards.iter().map(Arc::downgrade).collect(),
            context.entities.config.idle_timeout,
            context.entities.config.hibernate_after,
            context.cancel.clone(),
        ));
        tokio::spawn(reply_sweep::run(context.clone(), context.cancel.clone()));
        for shard in &shards {
            tokio::spawn(timers::run(
                context.clone(),
                shard.index(),
                shard.alarm.clone(),
                context.cancel.clone(),
            ));
        }
        Shards { shards, context }
    }

    /// Sends a message and waits for the reply, which comes once the turn is durable.
    /// With a deadline, gives up at that instant (the entity skips the message if it has not
    /// started it by then). With a request id, a retry gets the stored reply of the turn that
    /// committed first instead of running the handler again.
    pub async fn call(
        &self,
        id: EntityId,
        message: Value,
        deadline: Option<Instant>,
        request_id: Option<String>,
    ) -> Result<CallReply, EntityError> {
        check_request_id(&id, request_id.as_deref())?;
        self.ask(id, deadline, |reply| Request::Call {
            message,
            request_id,
            reply,
        })
        .await
    }

    /// Routes the request `make` builds around a reply channel and waits for the answer, at
    /// most until the deadline.
    async fn ask<T>(
        &self,
        id: EntityId,
        deadline: Option<Instant>,
        make: impl FnOnce(oneshot::Sender<Result<T, EntityError>>) -> Request,
    ) -> Result<T, EntityError> {
        let (reply, answer) = oneshot::channel();
        self.route(
            &id,
            Envelope {
                request: make(reply),
                deadline,
            },
        )?;
        let answer = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, answer)
                .await
                .map_err(|_| EntityError::DeadlineExceeded(id.clone()))?,
            None => answer.await,
        };
        answer.unwrap_or_else(|_| Err(stopped_before_reply(&id)))
    }

    /// Enqueues a message without waiting for it to be handled. With a request id, a
    /// message whose id the entity has a stored reply for is dropped.
    pub fn cast(
        &self,
        id: EntityId,
        message: Value,
        request_id: Option<String>,
    ) -> Result<(), EntityError> {
        check_request_id(&id, request_id.as_deref())?;
        self.route(
            &id,
            Envelope {
                request: Request::Cast {
                    message,
                    request_id,
                },
                deadline: None,
            },
        )
    }

    /// Writes the message into the entity's durable inbox and returns once that is durable;
    /// the entity handles it as a cast afterwards, also if the server crashes first. Returns
    /// whether the request id was seen before (the message was accepted then, not now).
    pub async fn durable_cast(
        &self,
        id: EntityId,
        message: Value,
        deadline: Option<Instant>,
        request_id: Option<String>,
    ) -> Result<bool, EntityError> {
        check_request_id(&id, request_id.as_deref())?;
        self.ask(id, deadline, |reply| Request::DurableCast {
            message,
            request_id,
            reply,
        })
        .await
    }

    /// Dead letters, of one entity (`entity` given), of one type (`entity_type`), or all,
    /// in (type, key, id) order after `after`, at most `limit`.
    pub async fn dead_letters(
        &self,
        filter: DeadLetterFilter,
        after: Option<(EntityId, String)>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, EntityError> {
        let listing = EntityId {
            entity_type: "dead-letters".into(),
            key: "*".into(),
        };
        let store = &self.context.entities.store;
        let mut found = Vec::new();
        if let DeadLetterFilter::Entity(id) = &filter {
            self.locate(id)?;
            let entries = store
                .entity_records(self.shard_index(id), id, RecordKind::DeadLetter)
                .await
                .map_err(|e| EntityError::from_store(id, e))?;
            for entry in entries {
                let name = String::from_utf8_lossy(&entry.name).into_owned();
                if after
                    .as_ref()
                    .is_some_and(|(after_id, after_name)| (id, &name) <= (after_id, after_name))
                {
                    continue;
                }
                found.push(DeadLetter::decode(id.clone(), name, &entry.value)?);
            }
        } else {
            for shard in 0..self.shards.len() as u32 {
                let mut cursor = after
                    .as_ref()
                    .map(|(id, name)| (id.clone(), name.as_bytes().to_vec()));
                loop {
                    let page = store
                        .scan_records(shard, RecordKind::DeadLetter, cursor.clone(), limit)
                        .await
                        .map_err(|e| EntityError::from_store(&listing, e))?;
                    let full = page.len() == limit;
                    cursor = page
                        .last()
                        .map(|(id, entry)| (id.clone(), entry.name.clone()));
                    for (id, entry) in page {
                        if let DeadLetterFilter::Type(entity_type) = &filter {
                            if id.entity_type != *entity_type {
                                continue;
                            }
                        }
                        let name = String::from_utf8_lossy(&entry.name).into_owned();
                        found.push(DeadLetter::decode(id, name, &entry.value)?);
                    }
                    if !full || found.len() >= limit {
                        break;
                    }
                }
            }
        }
        // Storage's key order (lengths before bytes), which the page cursor continues in.
        found.sort_by(|a, b| storage_order(a).cmp(&storage_order(b)));
        found.truncate(limit);
        Ok(found)
    }

    /// Moves a dead letter back into its entity's durable inbox; false if there is none.
    pub async fn redrive(&self, id: EntityId, dead_letter: String) -> Result<bool, EntityError> {
        self.ask(id, None, |reply| Request::Redrive {
            id: dead_letter,
            reply,
        })
        .await
    }

    /// Removes a dead letter for good; false if there was none.
    pub async fn discard(&self, id: EntityId, dead_letter: String) -> Result<bool, EntityError> {
        self.locate(&id)?;
        let shard = self.shard_index(&id);
        let store = &self.context.entities.store;
        let name = dead_letter.into_bytes();
        let existed = store
            .record(shard, &id, RecordKind::DeadLetter, &name)
            .await
            .map_err(|e| EntityError::from_store(&id, e))?
            .is_some();
        if existed {
            let batch = EntityBatch {
                shard,
                entity: id.clone(),
                ops: vec![Op::RemoveRecord {
                    kind: RecordKind::DeadLetter,
                    name,
                }],
            };
            store
                .commit(batch)
                .await
                .map_err(|e| EntityError::from_store(&id, e))?;
        }
        Ok(existed)
    }

    /// The entity's last committed state, without waiting behind its mailbox. A passive
    /// entity is read from storage without being activated.
    pub async fn get(&self, id: EntityId) -> Result<(StateView, bool), EntityError> {
        let (shard, behaviour) = self.locate(&id)?;
        let active = shard.active(&id);
        let view = match active {
            Some(handle) => handle.committed_state().await,
            None => None,
        };
        if let Some(view) = view {
            let view = view?;
            if view.seq == 0 {
                return Err(EntityError::NotFound(id));
            }
            return Ok((view, true));
        }
        let loaded = self
            .context
            .entities
            .store
            .load(self.shard_index(&id), &id)
            .await
            .map_err(|e| EntityError::from_store(&id, e))?;
        if !loaded.exists() {
            return Err(EntityError::NotFound(id));
        }
        let versions = |version: u32| {
            self.context
                .entities
                .registry
                .version(&id.entity_type, version)
        };
        let recovered = recovery::recover(&behaviour, &versions, &id, loaded)?;
        let state = recovered
            .behaviour
            .state_to_value(&recovered.state)
            .map_err(|e| EntityError::RecoveryFailed {
                entity: id.clone(),
                detail: e.to_string(),
            })?;
        Ok((
            StateView {
                state,
                seq: recovered.seq,
            },
            false,
        ))
    }

    /// Watches the entity's committed turns (activating it): first its state — or, from
    /// `from_seq`, the events after it that storage still holds — then each turn as it
    /// becomes durable. The feed ends with an error saying where to resubscribe from.
    pub async fn watch(
        &self,
        id: EntityId,
        from_seq: Option<u64>,
    ) -> Result<mpsc::Receiver<Result<WatchMessage, EntityError>>, EntityError> {
        let subscription = self
            .ask(id.clone(), None, |reply| Request::Watch { reply })
            .await?;
        let mut first = Vec::new();
        match from_seq {
            None => first.push(WatchMessage {
                seq: subscription.seq,
                events: Vec::new(),
                state: Some(subscription.state),
                note: None,
            }),
            Some(from) if from > subscription.seq => {
                return Err(EntityError::WatchAhead {
                    entity: id,
                    from_seq: from,
                    seq: subscription.seq,
                });
            }
            Some(from) => first.extend(self.catch_up(&id, from, subscription.seq).await?),
        }
        let (sender, feed) = mpsc::channel(WATCH_BUFFER);
        let start = subscription.seq;
        let mut live = subscription.feed;
        tokio::spawn(async move {
            let mut last = from_seq
                .unwrap_or(start)
                .max(first.last().map_or(0, |m| m.seq));
            for message in first {
                if sender.send(Ok(message)).await.is_err() {
                    return;
                }
            }
            last = last.max(start);
            loop {
                let ended = match live.recv().await {
                    Ok(turn) if turn.seq <= last => continue,
                    Ok(turn) => {
                        last = turn.seq;
                        let message = WatchMessage {
                            seq: turn.seq,
                            events: turn.events.clone(),
                            state: Some(turn.state.clone()),
                            note: None,
                        };
                        if sender.send(Ok(message)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => EntityError::WatchLagged {
                        entity: id.clone(),
                        missed,
                        resume_from: last,
                    },
                    Err(broadcast::error::RecvError::Closed) => EntityError::WatchEnded {
                        entity: id.clone(),
                        reason: "the entity stopped".into(),
                        resume_from: last,
                    },
                };
                let _ = sender.send(Err(ended)).await;
                return;
            }
        });
        Ok(feed)
    }

    /// The events after `from` up to `until` that storage holds, preceded by the snapshot's
    /// state when older events were compacted into it.
    async fn catch_up(
        &self,
        id: &EntityId,
        from: u64,
        until: u64,
    ) -> Result<Vec<WatchMessage>, EntityError> {
        let loaded = self
            .context
            .entities
            .store
            .load(self.shard_index(id), id)
            .await
            .map_err(|e| EntityError::from_store(id, e))?;
        let mut messages = Vec::new();
        if let Some(snapshot) = loaded.snapshot.filter(|snapshot| snapshot.seq > from) {
            let what = format!("snapshot at seq {}", snapshot.seq);
            messages.push(WatchMessage {
                seq: snapshot.seq,
                events: Vec::new(),
                state: Some(codec::decode(id, &what, &snapshot.payload)?),
                note: Some(format!(
                    "events up to {} were compacted into a snapshot; starting from its state",
                    snapshot.seq
                )),
            });
        }
        for event in loaded
            .events
            .into_iter()
            .filter(|e| e.seq > from && e.seq <= until)
        {
            let what = format!("event {}", event.seq);
            messages.push(WatchMessage {
                seq: event.seq,
                events: vec![codec::decode(id, &what, &event.payload)?],
                state: None,
                note: None,
            });
        }
        Ok(messages)
    }

    /// Passivates the entity if it is active; returns whether it was.
    pub async fn stop(&self, id: EntityId) -> Result<bool, EntityError> {
        let (shard, _) = self.locate(&id)?;
        let Some(handle) = shard.active(&id) else {
            return Ok(false);
        };
        let (reply, answer) = oneshot::channel();
        let envelope = Envelope {
            request: Request::Stop { reply: Some(reply) },
            deadline: None,
        };
        if handle.send(envelope).await.is_err() {
            // It passivated on its own meanwhile.
            return Ok(false);
        }
        Ok(answer.await.unwrap_or(false))
    }

    /// Removes the entity and all its durable data; returns whether it had any.
    pub async fn delete(
        &self,
        id: EntityId,
        deadline: Option<Instant>,
    ) -> Result<bool, EntityError> {
        self.ask(id, deadline, |reply| Request::Delete { reply })
            .await
    }

    /// Keys of existing entities of a type, in byte order, from after `page_token`.
    pub async fn list(
        &self,
        entity_type: &str,
        key_prefix: &str,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<ListPage, EntityError> {
        self.behaviour(entity_type)?;
        if let Some(token) = page_token {
            if !token.starts_with(key_prefix) {
                return Err(EntityError::InvalidPageToken(token.to_owned()));
            }
        }
        let page_size = match page_size {
            0 => LIST_PAGE_SIZE_DEFAULT,
            n => n.min(LIST_PAGE_SIZE_MAX),
        };
        let listing_id = EntityId {
            entity_type: entity_type.into(),
            key: key_prefix.into(),
        };
        let mut keys = self
            .context
            .entities
            .store
            .list(entity_type, key_prefix, page_token, page_size + 1)
            .await
            .map_err(|e| EntityError::from_store(&listing_id, e))?;
        let next_page_token = if keys.len() > page_size {
            keys.truncate(page_size);
            keys.last().cloned()
        } else {
            None
        };
        Ok(ListPage {
            keys,
            next_page_token,
        })
    }

    /// Clears an entity's quarantine and crash history and stops its activation, so the next
    /// message starts it afresh from durable state. Returns whether it was quarantined.
    pub async fn reset(&self, id: EntityId) -> Result<bool, EntityError> {
        let (shard, _) = self.locate(&id)?;
        let was_quarantined = shard.reset(&id);
        self.stop(id).await?;
        Ok(was_quarantined)
    }

    /// The supervision tree: the root over storage, every shard (with at most
    /// `entities_per_shard_max` of its entities) and the gRPC server.
    pub fn tree(&self, entities_per_shard_max: usize) -> TreeNode {
        let worker = |name: &str, state: &str| TreeNode {
            name: name.into(),
            kind: NodeKind::Worker,
            strategy: None,
            state: state.into(),
            restarts: 0,
            restarts_in_window: 0,
            mailbox_len: None,
            last_crash: None,
            children: Vec::new(),
        };
        let root = &self.context.root;
        let mut children = vec![worker(
            "storage",
            if root.gave_up().is_some() {
                "stopping"
            } else {
                "running"
            },
        )];
        children.extend(
            self.shards
                .iter()
                .map(|shard| shard.tree(entities_per_shard_max).0),
        );
        children.push(worker("grpc", "running"));
        root.tree(children)
    }

    /// Number of active entities over all shards.
    pub fn active_count(&self) -> usize {
        self.shards.iter().map(|shard| shard.active_count()).sum()
    }

    /// Active entities, and how many of them hibernate.
    pub fn entity_counts(&self) -> (u64, u64) {
        let hibernating = self.context.entities.hibernating.load(Ordering::Relaxed);
        (self.active_count() as u64, hibernating)
    }

    /// Stored replies past their window that passive entities forgot when the stored-reply
    /// sweep asked them, since the server started.
    pub fn replies_forgotten(&self) -> u64 {
        self.context.replies_forgotten.load(Ordering::Relaxed)
    }

    /// One pass of the stored-reply sweep over every shard, now; returns how many replies
    /// were forgotten. (The sweep also runs by itself, every quarter retention window.)
    pub async fn sweep_expired_replies(&self) -> u64 {
        reply_sweep::sweep(&self.context, &self.context.cancel).await
    }

    /// How many shards there are.
    pub fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    /// The store's counters and the disk its data dir takes.
    pub async fn store_usage(&self) -> Result<(StoreStats, DiskUsage), StoreError> {
        self.context.entities.store.usage().await
    }

    /// Stops taking messages, lets every active entity finish what is in its mailbox, and
    /// waits until all of them have ended.
    pub async fn shutdown(&self) {
        self.context.closing.store(true, Ordering::Release);
        self.context.cancel.cancel();
        for shard in &self.shards {
            for handle in shard.active_handles() {
                let envelope = Envelope {
                    request: Request::Stop { reply: None },
                    deadline: None,
                };
                // An error means the entity already ended.
                let _ = handle.send(envelope).await;
            }
        }
        self.context.entities.tracker.close();
        self.context.entities.tracker.wait().await;
    }

    fn route(&self, id: &EntityId, envelope: Envelope) -> Result<(), EntityError> {
        id.validate()?;
        let shard = &self.shards[self.shard_index(id) as usize];
        shard
            .route(id, || self.behaviour(&id.entity_type), envelope)
            .map_err(|undelivered| undelivered.error)
    }

    /// Validates the address and finds the entity's shard and behaviour.
    fn locate(&self, id: &EntityId) -> Result<(&Arc<Shard>, Arc<dyn Behaviour>), EntityError> {
        id.validate()?;
        let behaviour = self.behaviour(&id.entity_type)?;
        Ok((&self.shards[self.shard_index(id) as usize], behaviour))
    }

    fn shard_index(&self, id: &EntityId) -> u32 {
        hash::shard_of(id, self.shards.len() as u32)
    }

    fn behaviour(&self, entity_type: &str) -> Result<Arc<dyn Behaviour>, EntityError> {
        resolve_behaviour(&self.context.entities.registry, entity_type)
    }
}

/// The active version of `entity_type`'s behaviour, or the error that names the known types.
fn resolve_behaviour(
    registry: &BehaviourRegistry,
    entity_type: &str,
) -> Result<Arc<dyn Behaviour>, EntityError> {
    registry
        .get(entity_type)
        .ok_or_else(|| EntityError::UnknownType {
            name: entity_type.to_owned(),
            known: registry.type_names().join(", "),
        })
}

/// Asks every entity that took no message for `idle_timeout` to passivate, and every other
/// one that took none for `hibernate_after` (unless zero) to hibernate (each decides, at a
/// turn boundary, whether it still is idle). One task for the server instead of a timer in
/// every entity; each comes between its time and 1.25 × the shorter of the two (at least
/// 5 ms, at most 5 s) later.
async fn idle_sweep(
    shards: Vec<std::sync::Weak<Shard>>,
    idle_timeout: std::time::Duration,
    hibernate_after: std::time::Duration,
    cancel: CancellationToken,
) {
    let shortest = if hibernate_after.is_zero() {
        idle_timeout
    } else {
        idle_timeout.min(hibernate_after)
    };
    let every = (shortest / 4).clamp(
        std::time::Duration::from_millis(5),
        std::time::Duration::from_secs(5),
    );
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        for shard in &shards {
            let Some(shard) = shard.upgrade() else { return };
            for (handle, request) in shard.idle_entities(idle_timeout, hibernate_after) {
                let envelope = Envelope {
                    request,
                    deadline: None,
                };
                // A full or closed mailbox means it is not idle (or gone): nothing to do.
                let _ = handle.try_send(envelope);
            }
        }
    }
}

/// Which dead letters to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterFilter {
    All,
    Type(String),
    Entity(EntityId),
}

/// A durable message that crashed its entity too often, as the admin API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub entity: EntityId,
    pub id: String,
    /// `timer`, `send`, `request`, `reply` or `durable_cast`.
    pub kind: String,
    pub message: Value,
    pub reason: String,
    pub attempts: u32,
    pub dead_at_ms: u64,
    pub origin: String,
}

impl DeadLetter {
    fn decode(entity: EntityId, id: String, bytes: &[u8]) -> Result<Self, EntityError> {
        let record: DeadLetterRecord =
            records::decode(&entity, &format!("dead letter {id}"), bytes)?;
        Ok(DeadLetter {
            entity,
            id,
            kind: record.kind,
            message: record.item.message,
            reason: record.reason,
            attempts: record.attempts,
            dead_at_ms: record.dead_at_ms,
            origin: record.item.origin,
        })
    }
}

/// A dead letter's place in storage's key order: type and key compare by length first.
fn storage_order(letter: &DeadLetter) -> (usize, &str, usize, &str, &str) {
    let entity = &letter.entity;
    (
        entity.entity_type.len(),
        &entity.entity_type,
        entity.key.len(),
        &entity.key,
        &letter.id,
    )
}

/// Refuses a malformed request id before anything is routed.
fn check_request_id(id: &EntityId, request_id: Option<&str>) -> Result<(), EntityError> {
    match request_id {
        Some(request_id) => {
            validate_request_id(request_id).map_err(|reason| EntityError::InvalidMessage {
                entity: id.clone(),
                reason,
            })
        }
        None => Ok(()),
    }
}

fn stopped_before_reply(id: &EntityId) -> EntityError {
    EntityError::Crashed {
        entity: id.clone(),
        reason: "the entity stopped before replying".into(),
    }
}

#[cfg(test)]
mod tests;
