//! Behaviour of the entity runtime through [`Shards`], on an in-memory test store that can
//! hold commits back and fail them on demand.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::*;
use crate::behaviour::{Behaviour, BehaviourError, Effect, ErasedState, Turn, Value};
use crate::shutdown::Shutdown;
use crate::storage::keys::{record_key, record_prefix, timer_index_key};
use crate::storage::{
    DiskUsage, DueTimer, DueTimers, Durable, EntityBatch, LoadedEntity, Op, RecordKind, StoreError,
    StoreStats, StoredEntry, StoredRecord,
};
use crate::supervisor::RestartPolicy;

/// Records and the timer index of [`MemoryStore`], keyed by shard and the sled key the real
/// store would use, so scans come out in the same order.
#[derive(Default)]
struct MemoryRecords {
    records: BTreeMap<(u32, Vec<u8>), (EntityId, StoredEntry)>,
    timers: BTreeMap<(u32, Vec<u8>), DueTimer>,
}

/// A `Store` held in memory, for tests of the layers above storage only.
#[derive(Default)]
struct MemoryStore {
    entities: Mutex<BTreeMap<EntityId, LoadedEntity>>,
    /// Locked after `entities` when both are.
    records: Mutex<MemoryRecords>,
    catalog: Mutex<BTreeMap<String, Vec<u8>>>,
    commits: AtomicUsize,
    snapshots: AtomicUsize,
    /// Entities loaded (activations).
    loads: AtomicUsize,
    /// When set, every commit waits for a permit first.
    gate: Option<Arc<Semaphore>>,
    /// Commits waiting at the gate.
    gated: AtomicUsize,
    fail_commits: AtomicBool,
    /// Entities whose records fail a scan that reaches them, as a record failing its
    /// checksum fails the real store's scan.
    corrupt_in_scans: Mutex<Vec<EntityId>>,
}

#[async_trait]
impl Store for MemoryStore {
    fn shard_count(&self) -> u32 {
        4
    }

    async fn submit(&self, batch: EntityBatch) -> Result<Durable, StoreError> {
        // Applied at once; durability resolves only once the gate (if any) lets it through.
        let gate = self.gate.clone();
        if gate.is_some() {
            self.gated.fetch_add(1, Ordering::SeqCst);
        }
        let result = self.apply_batch(batch);
        Ok(Durable::new(async move {
            if let Some(gate) = gate {
                gate.acquire()
                    .await
                    .map_err(|_| StoreError::Closed)?
                    .forget();
            }
            result
        }))
    }

    async fn load(&self, shard: u32, entity: &EntityId) -> Result<LoadedEntity, StoreError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        let entities = self.entities.lock();
        let records = self.records.lock();
        let mut loaded = entities.get(entity).cloned().unwrap_or_default();
        loaded.records = RecordKind::LOADED
            .iter()
            .flat_map(|kind| records.of_entity(shard, entity, *kind))
            .collect();
        Ok(loaded)
    }

    async fn record(
        &self,
        shard: u32,
        entity: &EntityId,
        kind: RecordKind,
        name: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let records = self.records.lock();
        Ok(records
            .records
            .get(&(shard, record_key(kind, entity, name)))
            .map(|(_, entry)| entry.value.clone()))
    }

    async fn entity_records(
        &self,
        shard: u32,
        entity: &EntityId,
        kind: RecordKind,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        Ok(self.records.lock().of_entity(shard, entity, kind))
    }

    async fn scan_records(
        &self,
        shard: u32,
        kind: RecordKind,
        after: Option<(EntityId, Vec<u8>)>,
        limit: usize,
    ) -> Result<Vec<(EntityId, StoredEntry)>, StoreError> {
        use std::ops::Bound;
        let lower = match &after {
            Some((entity, name)) => Bound::Excluded((shard, record_key(kind, entity, name))),
            None => Bound::Included((shard, Vec::new())),
        };
        let records = self.records.lock();
        let corrupt = self.corrupt_in_scans.lock();
        let mut found = Vec::new();
        for ((_, _), (entity, entry)) in records
            .records
            .range((lower, Bound::Unbounded))
            .take_while(|((s, _), _)| *s == shard)
            .filter(|(_, (_, entry))| entry.kind == kind)
            .take(limit)
        {
            if corrupt.contains(entity) {
                return Err(StoreError::CorruptEntity {
                    entity: entity.clone(),
                    detail: "a record failed its checksum (injected)".into(),
                });
            }
            found.push((entity.clone(), entry.clone()));
        }
        Ok(found)
    }

    async fn due_timers(
        &self,
        shard: u32,
        after: Option<DueTimer>,
        up_to_ms: u64,
        limit: usize,
    ) -> Result<DueTimers, StoreError> {
        use std::ops::Bound;
        let lower = match &after {
            Some(t) => Bound::Excluded((shard, timer_index_key(t.due_ms, &t.entity, &t.name))),
            None => Bound::Included((shard, Vec::new())),
        };
        let records = self.records.lock();
        let mut page = DueTimers::default();
        for ((s, _), timer) in records.timers.range((lower, Bound::Unbounded)) {
            if *s != shard {
                break;
            }
            // Same rule as the real store: past a full page, one more entry tells whether
            // the page was cut by the limit (it is due) or by the time (it is not).
            if timer.due_ms > up_to_ms {
                page.next_due_ms = Some(timer.due_ms);
                break;
            }
            if page.due.len() >= limit {
                break;
            }
            page.due.push(timer.clone());
        }
        Ok(page)
    }

    async fn list(
        &self,
        entity_type: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let entities = self.entities.lock();
        Ok(entities
            .keys()
            .filter(|id| id.entity_type == entity_type && id.key.starts_with(prefix))
            .filter(|id| after.is_none_or(|after| id.key.as_str() > after))
            .map(|id| id.key.to_string())
            .take(limit)
            .collect())
    }

    async fn put_catalog(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.catalog.lock().insert(key.to_owned(), value);
        Ok(())
    }

    async fn catalog(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let catalog = self.catalog.lock();
        Ok(catalog
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn checkpoint(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn close(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn usage(&self) -> Result<(StoreStats, DiskUsage), StoreError> {
        // Nothing on disk, and no journal to count.
        Ok((StoreStats::default(), DiskUsage::default()))
    }
}

impl MemoryStore {
    fn apply_batch(&self, batch: EntityBatch) -> Result<(), StoreError> {
        if self.fail_commits.load(Ordering::SeqCst) {
            return Err(StoreError::JournalFailed("injected fault".into()));
        }
        self.commits.fetch_add(1, Ordering::SeqCst);
        let mut entities = self.entities.lock();
        let mut records = self.records.lock();
        let (shard, id) = (batch.shard, &batch.entity);
        for op in batch.ops {
            match op {
                Op::Event {
                    seq,
                    behaviour_version,
                    payload,
                } => entities
                    .entry(id.clone())
                    .or_default()
                    .events
                    .push(StoredRecord {
                        seq,
                        behaviour_version,
                        payload,
                    }),
                Op::Snapshot {
                    seq,
                    behaviour_version,
                    payload,
                } => {
                    self.snapshots.fetch_add(1, Ordering::SeqCst);
                    let entity = entities.entry(id.clone()).or_default();
                    entity.events.retain(|e| e.seq > seq);
                    entity.snapshot = Some(StoredRecord {
                        seq,
                        behaviour_version,
                        payload,
                    });
                }
                Op::Delete => {
                    entities.remove(id);
                    // Every record of the entity; its timer index entries stay.
                    for kind in RecordKind::ALL {
                        let prefix = record_prefix(kind, id);
                        records
                            .records
                            .retain(|(s, key), _| *s != shard || !key.starts_with(&prefix));
                    }
                }
                Op::PutRecord { kind, name, value } => {
                    let key = record_key(kind, id, &name);
                    let entry = StoredEntry { kind, name, value };
                    records.records.insert((shard, key), (id.clone(), entry));
                }
                Op::RemoveRecord { kind, name } => {
                    records
                        .records
                        .remove(&(shard, record_key(kind, id, &name)));
                }
                Op::PutTimerDue { due_ms, name } => {
                    let key = timer_index_key(due_ms, id, &name);
                    let timer = DueTimer {
                        due_ms,
                        entity: id.clone(),
                        name,
                    };
                    records.timers.insert((shard, key), timer);
                }
                Op::RemoveTimerDue { due_ms, name } => {
                    records
                        .timers
                        .remove(&(shard, timer_index_key(due_ms, id, &name)));
                }
            }
        }
        Ok(())
    }
}

impl MemoryRecords {
    /// The entity's records of `kind`, in name order.
    fn of_entity(&self, shard: u32, entity: &EntityId, kind: RecordKind) -> Vec<StoredEntry> {
        let prefix = record_prefix(kind, entity);
        self.records
            .range((shard, prefix.clone())..)
            .take_while(|((s, key), _)| *s == shard && key.starts_with(&prefix))
            .map(|(_, (_, entry))| entry.clone())
            .collect()
    }
}

fn config() -> EntityConfig {
    EntityConfig {
        idle_timeout: Duration::from_secs(60),
        hibernate_after: Duration::ZERO,
        snapshot_every_events: 0,
        mailbox_capacity: 16,
        dedup_window: Duration::from_secs(3600),
        dedup_per_entity_max: 256,
        dead_letter_after_crashes: 3,
    }
}

fn shards_on(store: Arc<MemoryStore>, config: EntityConfig) -> Shards {
    shards_with(
        BehaviourRegistry::with_builtins(),
        store,
        config,
        SupervisionConfig::default(),
    )
}

fn shards_with(
    registry: BehaviourRegistry,
    store: Arc<MemoryStore>,
    config: EntityConfig,
    supervision: SupervisionConfig,
) -> Shards {
    let root = Arc::new(RootSupervisor::new(
        store.shard_count(),
        supervision.root,
        Shutdown::new(),
    ));
    Shards::new(Arc::new(registry), store, config, supervision, root)
}

fn counter(key: &str) -> EntityId {
    EntityId::new("counter", key).unwrap()
}

/// Waits (bounded) until `condition` holds.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn calls_are_handled_in_order_and_committed() {
    let store = Arc::new(MemoryStore::default());
    let shards = shards_on(store.clone(), config());
    for expected in 1..=3 {
        let reply = shards
            .call(counter("a"), json!({"op": "incr"}), None, None)
            .await
            .unwrap();
        assert_eq!(
            reply,
            CallReply {
                reply: json!({"value": expected}),
                seq: expected as u64,
                deduplicated: false,
            }
        );
    }
    let (view, active) = shards.get(counter("a")).await.unwrap();
    assert_eq!(
        (view.state, view.seq, active),
        (json!({"value": 3}), 3, true)
    );
    assert_eq!(store.commits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn refusals_write_nothing() {
    let store = Arc::new(MemoryStore::default());
    let shards = shards_on(store.clone(), config());
    shards
        .call(counter("a"), json!({"op": "incr"}), None, None)
        .await
        .unwrap();
    let err = shards
        .call(counter("a"), json!({"op": "nope"}), None, None)
        .await
        .unwrap_err();
    assert!(matches!(err, EntityError::InvalidMessage { .. }), "{err}");
    let err = shards
        .call(EntityId::new("nosuch", "a").unwrap(), json!({}), None, None)
        .await
        .unwrap_err();
    assert!(matches!(err, EntityError::UnknownType { .. }), "{err}");
    let err = shards
        .call(
            EntityId {
                entity_type: "counter".into(),
                key: "".into(),
            },
            json!({}),
            None,
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, EntityError::InvalidAddress(_)), "{err}");
    assert_eq!(store.commits.load(Ordering::SeqCst), 1);
    assert_eq!(
        shards.get(counter("a")).await.unwrap().0.state,
        json!({"value": 1})
    );
}

#[tokio::test]
async fn idle_entities_passivate_and_come_back_from_storage() {
    let store = Arc::new(MemoryStore::default());
    let shards = shards_on(
        store,
        EntityConfig {
            idle_timeout: Duration::from_millis(20),
            ..config()
        },
    );
    shards
        .call(counter("a"), json!({"op": "incr", "by": 7}), None, None)
        .await
        .unwrap();
    eventually("passivation", || shards.active_count() == 0).await;
    let (view, active) = shards.get(counter("a")).await.unwrap();
    assert_eq!((view.state, active), (json!({"value": 7}), false));
    let reply = shards
        .call(counter("a"), json!({"op": "incr"}), None, None)
        .await
        .unwrap();
    assert_eq!(
        reply,
        CallReply {
            reply: json!({"value": 8}),
            seq: 2,
            deduplicated: false,
        }
    );
}

/// The supervision-tree state of the entity `id` (`None` if it is not in the tree).
fn tree_state(shards: &Shards, id: &EntityId) -> Option<String> {
    fn find(node: &crate::supervisor::TreeNode, name: &str) -> Option<String> {
        if node.name == name {
            return Some(node.state.clone());
        }
        node.children.iter().find_map(|child| find(child, name))
    }
    find(&shards.tree(usize::MAX), &id.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_entities_hibernate_and_resume_without_loading() {
    let store = Arc::new(MemoryStore::default());
    let shards = shards_on(
        store.clone(),
        EntityConfig {
            hibernate_after: Duration::from_millis(20),
            ..config()
        },
    );
    let (a, b) = (counter("a"), counter("b"));
    for id in [&a, &b] {
        shards
            .call(id.clone(), json!({"op": "incr", "by": 7}), None, None)
            .await
            .unwrap();
    }
    let hibernating = |id: &EntityId| tree_state(&shards, id).as_deref() == Some("hibernating");
    eventually("hibernation", || hibernating(&a) && hibernating(&b)).await;
    assert_eq!(shards.active_count(), 2, "hibernating entities stay active");
    assert_eq!(shards.entity_counts(), (2, 2));
    // Reading the committed state does not wake it.
    let (view, active) = shards.get(a.clone()).await.unwrap();
    assert_eq!((view.state, active), (json!({"value": 7}), true));
    assert!(hibernating(&a));

    // A message resumes it where it was: no load from storage.
    for round in 1..=3 {
        let reply = shards
            .call(a.clone(), json!({"op": "incr"}), None, None)
            .await
            .unwrap();
        assert_eq!(reply.reply, json!({"value": 7 + round}));
        assert_eq!(reply.seq, 1 + round as u64);
        assert_eq!(tree_state(&shards, &a).as_deref(), Some("running"));
        let (active, hibernating_now) = shards.entity_counts();
        assert_eq!(active, 2);
        assert!(
            hibernating_now <= 1,
            "a woke: {hibernating_now} hibernating"
        );
        // And it hibernates again.
        eventually("hibernating again", || hibernating(&a)).await;
    }
    assert_eq!(
        store.loads.load(Ordering::SeqCst),
        2,
        "one load per activation"
    );

    // Stop and shutdown reach a hibernating entity (its mailbox wakes it).
    assert!(shards.stop(b.clone()).await.unwrap());
    // It answers, then leaves the directory.
    eventually("b to passivate", || shards.active_count() == 1).await;
    shards.shutdown().await;
    assert_eq!(shards.entity_counts(), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_entity_hibernates_and_its_watcher_sees_the_turns_after() {
    let shards = shards_on(
        Arc::new(MemoryStore::default()),
        EntityConfig {
            hibernate_after: Duration::from_millis(20),
            ..config()
        },
    );
    let id = counter("watched");
    shards
        .call(id.clone(), json!({"op": "incr"}), None, None)
        .await
        .unwrap();
    let mut feed = shards.watch(id.clone(), None).await.unwrap();
    let first = feed.recv().await.unwrap().unwrap();
    assert_eq!((first.seq, first.state), (1, Some(json!({"value": 1}))));
    eventually("hibernation", || {
        tree_state(&shards, &id).as_deref() == Some("hibernating")
    })
    .await;
    for value in 2..=3 {
        shards
            .call(id.clone(), json!({"op": "incr"}), None, None)
            .await
            .unwrap();
        let turn = feed.recv().await.unwrap().unwrap();
        assert_eq!(
            (turn.seq, turn.state),
            (value, Some(json!({"value": value})))
        );
        eventually("hibernating again", || {
            tree_state(&shards, &id).as_deref() == Some("hibernating")
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_restart_drops_hibernating_entities_and_they_come_back_from_storage() {
    let store = Arc::new(MemoryStore::default());
    let mut supervision = supervision(0);
    supervision.shard.max_restarts = 1;
    supervision.shard.backoff_initial_ms = 50;
    supervision.shard.backoff_max_ms = 50;
    let mut registry = BehaviourRegistry::with_builtins();
    registry.register(Arc::new(Probe)).unwrap();
    let shards = shards_with(
        registry,
        store.clone(),
        EntityConfig {
            hibernate_after: Duration::from_millis(20),
            ..config()
        },
        supervision,
    );
    let shard = |id: &EntityId| hash::shard_of(id, 4);
    let sleeper = probe("sleeper");
    let crashers: Vec<EntityId> = (0..)
        .map(|n| probe(&format!("k{n}")))
        .filter(|id| shard(id) == shard(&sleeper))
        .take(2)
        .collect();
    for _ in 0..2 {
        shards
            .call(sleeper.clone(), json!("tick"), None, None)
            .await
            .unwrap();
    }
    eventually("hibernation", || {
        tree_state(&shards, &sleeper).as_deref() == Some("hibernating")
    })
    .await;
    // Two quarantines in the shard: past its intensity, it kills every entity, the
    // hibernating one included.
    for id in &crashers {
        let _ = shards
            .call(id.clone(), json!("fail"), None, None)
            .await
            .unwrap_err();
    }
    eventually("the shard to kill it", || {
        tree_state(&shards, &sleeper).is_none()
    })
    .await;
    let loads = store.loads.load(Ordering::SeqCst);
    let shard_node = format!("shard-{}", shard(&sleeper));
    let shard_state = || {
        shards
            .tree(0)
            .walk()
            .into_iter()
            .find(|node| node.name == shard_node)
            .map(|node| (node.state.clone(), node.restarts))
    };
    eventually("the backoff to end", || {
        shard_state() == Some(("running".to_owned(), 1))
    })
    .await;
    shards
        .call(sleeper.clone(), json!("tick"), None, None)
        .await
        .unwrap();
    assert_eq!(
        store.loads.load(Ordering::SeqCst),
        loads + 1,
        "loaded again"
    );
    let (view, _) = shards.get(sleeper.clone()).await.unwrap();
    assert_eq!(view.state, json!(["tick", "tick", "tick"]));
}

#[tokio::test]
async fn stop_passivates_and_delete_removes() {
    let store = Arc::new(MemoryStore::default());
    let shards = shards_on(store.clone(), config());
    shards
        .call(counter("a"), json!({"op": "incr"}), None, None)
        .await
        .unwrap();
    assert!(shards.stop(counter("a")).await.unwrap());
    assert!(!shards.stop(counter("a")).await.unwrap());
    assert_eq!(
        shards.get(counter("a")).await.unwrap().0.state,
        json!({"value": 1})
    );

    assert!(shards.delete(counter("a"), None).await.unwrap());
    assert!(matches!(
        shards.get(counter("a")).await,
        Err(EntityError::NotFound(_))
    ));
    assert!(!shards.delete(counter("a"), None).await.unwrap());
    let reply = shards
        .call(counter("a"), json!({"op": "incr"}), None, None)
        .await
        .unwrap();
    assert_eq!(
        reply,
        CallReply {
            reply: json!({"value": 1}),
            seq: 1,
            deduplicated: false,
        }
    );
}

#[tokio::test]
async fn a_full_mailbox_is_refused_at_once() {
    let gate = Arc::new(Semaphore::new(0));
    let store = Arc::new(MemoryStore {
        gate: Some(gate.clone()),
        ..MemoryStore::default()
    });
    let shards = Arc::new(shards_on(
        store.clone(),
        EntityConfig {
            mailbox_capacity: 2,
            ..config()
        },
    ));
    // The first message is taken and waits for durability; casts sent without yielding to
    // the entity's task then fill the mailbox.
    let first = tokio::spawn({
        let shards = shards.clone();
        async move {
            shards
                .call(counter("a"), json!({"op": "incr"}), None, None)
                .await
        }
    });
    eventually("first message in commit", || {
        store.gated.load(Ordering::SeqCst) == 1
    })
    .await;
    let mut accepted = 0;
    let refused = loop {
        match shards.cast(counter("a"), json!({"op": "incr"}), None) {
            Ok(()) => accepted += 1,
            Err(error) => break error,
        }
        assert!(accepted <= 2, "mailbox never filled");
    };
    assert!(
        matches!(refused, EntityError::MailboxFull { capacity: 2, .. }),
        "{refused}"
    );
    assert_eq!(accepted, 2);
    gate.add_permits(100);
    assert_eq!(first.await.unwrap().unwrap().reply, json!({"value": 1}));
}

#[tokio::test]
async fn a_failed_commit_is_reported_and_changes_nothing() {
    let store = Arc::new(MemoryStore::default());
    let shards = shards_on(store.clone(), config());
    shards
        .call(counter("a"), json!({"op": "incr"}), None, None)
        .await
        .unwrap();
    store.fail_commits.store(true, Ordering::SeqCst);
    let err = shards
        .call(counter("a"), json!({"op": "incr"}), None, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, EntityError::StorageUnavailable { .. }),
        "{err}"
    );
    store.fail_commits.store(false, Ordering::SeqCst);
    assert_eq!(
        shards.get(counter("a")).await.unwrap().0.state,
        json!({"value": 1})
    );
    let reply = shards
        .call(counter("a"), json!({"op": "incr"}), None, None)
        .await
        .unwrap();
    assert_eq!(
        reply,
        CallReply {
            reply: json!({"value": 2}),
            seq: 2,
            deduplicated: false,
        }
    );
}

#[tokio::test]
async fn snapshots_are_written_every_n_events() {
    let store = Arc::new(MemoryStore::default());
    let shards = shards_on(
        store.clone(),
        EntityConfig {
            snapshot_every_events: 3,
            ..config()
        },
    );
    for _ in 0..7 {
        shards
            .call(counter("a"), json!({"op": "incr"}), None, None)
            .await
            .unwrap();
    }
    assert_eq!(store.snapshots.load(Ordering::SeqCst), 2);
    let loaded = store.load(0, &counter("a")).await.unwrap();
    assert_eq!(
        (loaded.snapshot.map(|s| s.seq), loaded.events.len()),
        (Some(6), 1)
    );
    shards.stop(counter("a")).await.unwrap();
    let reply = shards
        .call(counter("a"), json!({"op": "get"}), None, None)
        .await
        .unwrap();
    assert_eq!(
        reply,
        CallReply {
            reply: json!({"value": 7}),
            seq: 7,
            deduplicated: false,
        }
    );
}

#[tokio::test]
async fn an_expired_deadline_is_not_run() {
    let store = Arc::new(MemoryStore::default());
    let shards = shards_on(store.clone(), config());
    let past = Instant::now() - Duration::from_millis(1);
    let err = shards
        .call(counter("a"), json!({"op": "incr"}), Some(past), None)
        .await
        .unwrap_err();
    assert!(matches!(err, EntityError::DeadlineExceeded(_)), "{err}");
    // Whatever the race, the entity skipped the message.
    assert_eq!(
        shards
            .call(counter("a"), json!({"op": "get"}), None, None)
            .await
            .unwrap()
            .seq,
        0
    );
    assert_eq!(store.commits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn listing_pages_through_keys_in_order() {
    let store = Arc::new(MemoryStore::default());
    let shards = shards_on(store, config());
    for key in ["b1", "a2", "a1", "a3"] {
        shards
            .call(counter(key), json!({"op": "incr"}), None, None)
            .await
            .unwrap();
    }
    let first = shards.list("counter", "a", 2, None).await.unwrap();
    assert_eq!(
        first,
        ListPage {
            keys: vec!["a1".into(), "a2".into()],
            next_page_token: Some("a2".into())
        }
    );
    let second = shards
        .list("counter", "a", 2, first.next_page_token.as_deref())
        .await
        .unwrap();
    assert_eq!(
        second,
        ListPage {
            keys: vec!["a3".into()],
            next_page_token: None
        }
    );
    assert!(matches!(
        shards.list("nosuch", "", 0, None).await,
        Err(EntityError::UnknownType { .. })
    ));
}

#[tokio::test]
async fn shutdown_drains_mailboxes_then_refuses() {
    let store = Arc::new(MemoryStore::default());
    let shards = shards_on(store.clone(), config());
    for _ in 0..10 {
        shards
            .cast(counter("a"), json!({"op": "incr"}), None)
            .unwrap();
    }
    shards.shutdown().await;
    assert_eq!(shards.active_count(), 0);
    assert_eq!(
        store.commits.load(Ordering::SeqCst),
        10,
        "casts in the mailbox were handled before stopping"
    );
    let err = shards
        .call(counter("a"), json!({"op": "get"}), None, None)
        .await
        .unwrap_err();
    assert_eq!(err, EntityError::ShuttingDown);
}

/// A test behaviour whose state is the list of its events. Messages: `"tick"` commits an
/// event, `"boom"` panics, `"fail"` fails, `{"monitor": [type, key]}` monitors that entity.
/// Info messages are committed as events, so `DOWN`s can be read back with `get`.
struct Probe;

impl Behaviour for Probe {
    fn type_name(&self) -> &str {
        "probe"
    }
    fn version(&self) -> u32 {
        1
    }
    fn initial_state(&self, _key: &str) -> ErasedState {
        Box::new(Vec::<Value>::new())
    }
    fn handle(
        &self,
        _key: &str,
        _state: &ErasedState,
        message: Value,
    ) -> Result<Turn, BehaviourError> {
        if let Some([t, k]) = message
            .get("monitor")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
        {
            let target = EntityId::new(t.as_str().unwrap(), k.as_str().unwrap()).unwrap();
            return Ok(Turn {
                reply: json!("monitoring"),
                events: vec![],
                effects: vec![Effect::Monitor(target)],
            });
        }
        match message.as_str() {
            Some("boom") => panic!("boom requested"),
            Some("fail") => Err(BehaviourError::Failed("failure requested".into())),
            _ => Ok(Turn {
                reply: json!("ok"),
                events: vec![json!("tick")],
                effects: vec![],
            }),
        }
    }
    fn handle_info(
        &self,
        _key: &str,
        _state: &ErasedState,
        info: Value,
    ) -> Result<Turn, BehaviourError> {
        Ok(Turn {
            reply: Value::Null,
            events: vec![info],
            effects: vec![],
        })
    }
    fn apply(&self, state: &mut ErasedState, event: &Value) -> Result<(), BehaviourError> {
        state
            .downcast_mut::<Vec<Value>>()
            .unwrap()
            .push(event.clone());
        Ok(())
    }
    fn state_to_value(&self, state: &ErasedState) -> Result<Value, BehaviourError> {
        Ok(json!(state.downcast_ref::<Vec<Value>>().unwrap()))
    }
    fn state_from_value(&self, value: Value) -> Result<ErasedState, BehaviourError> {
        Ok(Box::new(
            serde_json::from_value::<Vec<Value>>(value).unwrap(),
        ))
    }
}

fn probes(store: Arc<MemoryStore>, supervision: SupervisionConfig) -> Shards {
    let mut registry = BehaviourRegistry::with_builtins();
    registry.register(Arc::new(Probe)).unwrap();
    shards_with(registry, store, config(), supervision)
}

fn probe(key: &str) -> EntityId {
    EntityId::new("probe", key).unwrap()
}

fn supervision(max_restarts: u32) -> SupervisionConfig {
    let mut supervision = SupervisionConfig::default();
    supervision.entity.max_restarts = max_restarts;
    supervision.entity.max_seconds = 60;
    supervision
}

#[tokio::test]
async fn a_crash_writes_nothing_and_restarts_from_durable_state() {
    let store = Arc::new(MemoryStore::default());
    let shards = probes(store.clone(), supervision(3));
    shards
        .call(probe("x"), json!("tick"), None, None)
        .await
        .unwrap();
    for poison in ["boom", "fail"] {
        let err = shards
            .call(probe("x"), json!(poison), None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, EntityError::Crashed { .. }), "{err}");
        assert!(err.to_string().contains("requested"), "{err}");
    }
    assert_eq!(store.commits.load(Ordering::SeqCst), 1);
    assert_eq!(
        shards
            .call(probe("x"), json!("tick"), None, None)
            .await
            .unwrap()
            .seq,
        2
    );
    let tree = shards.tree(10);
    let node = tree
        .walk()
        .into_iter()
        .find(|n| n.name == "probe/x")
        .cloned()
        .unwrap();
    assert_eq!(
        (node.restarts, node.last_crash.as_deref()),
        (2, Some("failure requested"))
    );
}

#[tokio::test]
async fn past_its_intensity_an_entity_is_quarantined_until_reset() {
    let store = Arc::new(MemoryStore::default());
    let shards = probes(store.clone(), supervision(2));
    shards
        .call(probe("x"), json!("tick"), None, None)
        .await
        .unwrap();
    for _ in 0..3 {
        let err = shards
            .call(probe("x"), json!("fail"), None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, EntityError::Crashed { .. }), "{err}");
    }
    // The third crash was past max_restarts = 2: quarantined, refused with a clear reason.
    let err = shards
        .call(probe("x"), json!("tick"), None, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, EntityError::Quarantined { crashes: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("tried again"), "{err}");
    // Its neighbours never noticed.
    shards
        .call(probe("y"), json!("tick"), None, None)
        .await
        .unwrap();
    assert!(shards.reset(probe("x")).await.unwrap());
    let reply = shards
        .call(probe("x"), json!("tick"), None, None)
        .await
        .unwrap();
    assert_eq!(reply.seq, 2, "the state is exactly the last committed one");
}

#[tokio::test]
async fn temporary_entities_are_not_restarted_and_never_quarantined() {
    let store = Arc::new(MemoryStore::default());
    let mut supervision = supervision(0);
    supervision.entity.policy = RestartPolicy::Temporary;
    let shards = probes(store, supervision);
    for _ in 0..5 {
        let err = shards
            .call(probe("x"), json!("fail"), None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, EntityError::Crashed { .. }), "{err}");
    }
    assert_eq!(
        shards
            .call(probe("x"), json!("tick"), None, None)
            .await
            .unwrap()
            .seq,
        1
    );
}

#[tokio::test]
async fn quarantines_past_the_shard_intensity_restart_the_shard() {
    let store = Arc::new(MemoryStore::default());
    let mut supervision = supervision(0);
    supervision.shard.max_restarts = 1;
    supervision.shard.backoff_initial_ms = 60_000;
    supervision.shard.backoff_max_ms = 60_000;
    let shards = probes(store, supervision);
    // Find two keys of one shard: with max_restarts = 0 each first crash quarantines.
    let shard = |id: &EntityId| hash::shard_of(id, 4);
    let first = probe("k0");
    let second = (1..)
        .map(|n| probe(&format!("k{n}")))
        .find(|id| shard(id) == shard(&first))
        .unwrap();
    let bystander = (1..)
        .map(|n| probe(&format!("b{n}")))
        .find(|id| shard(id) != shard(&first))
        .unwrap();
    for id in [&first, &second] {
        let _ = shards
            .call(id.clone(), json!("fail"), None, None)
            .await
            .unwrap_err();
    }
    let err = shards
        .call(first.clone(), json!("tick"), None, None)
        .await
        .unwrap_err();
    assert!(matches!(err, EntityError::ShardRestarting { .. }), "{err}");
    shards
        .call(bystander, json!("tick"), None, None)
        .await
        .unwrap();
    let tree = shards.tree(10);
    let node = tree
        .walk()
        .into_iter()
        .find(|n| n.name == format!("shard-{}", shard(&first)))
        .cloned()
        .unwrap();
    assert_eq!((node.state.as_str(), node.restarts), ("backoff", 1));
}

#[tokio::test]
async fn monitors_deliver_down_for_crash_stop_and_delete() {
    let store = Arc::new(MemoryStore::default());
    let shards = probes(store, supervision(5));
    let reasons = ["crashed", "stopped", "deleted"];
    for (n, reason) in reasons.iter().enumerate() {
        let target = probe(&format!("target-{n}"));
        shards
            .call(target.clone(), json!("tick"), None, None)
            .await
            .unwrap();
        let watch = json!({"monitor": ["probe", target.key]});
        shards
            .call(probe("watcher"), watch, None, None)
            .await
            .unwrap();
        match *reason {
            "crashed" => drop(
                shards
                    .call(target.clone(), json!("fail"), None, None)
                    .await
                    .unwrap_err(),
            ),
            "stopped" => assert!(shards.stop(target.clone()).await.unwrap()),
            _ => assert!(shards.delete(target.clone(), None).await.unwrap()),
        }
    }
    let downs = || async {
        let (view, _) = shards.get(probe("watcher")).await.unwrap();
        view.state
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["key"].as_str().unwrap().to_owned(),
                    d["reason"].as_str().unwrap().to_owned(),
                )
            })
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while downs().await.len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "DOWNs never arrived: {:?}",
            downs().await
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut got = downs().await;
    got.sort();
    let expected: Vec<_> = reasons
        .iter()
        .enumerate()
        .map(|(n, r)| (format!("target-{n}"), r.to_string()))
        .collect();
    assert_eq!(got, expected);
    // Monitoring an entity that is not active answers at once, like OTP's noproc.
    shards
        .call(
            probe("w2"),
            json!({"monitor": ["probe", "never"]}),
            None,
            None,
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (view, _) = shards.get(probe("w2")).await.unwrap();
        if view
            .state
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["reason"] == "not_active" && d["key"] == "never")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no not_active DOWN: {}",
            view.state
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A deployable test type whose state representation changes between versions:
/// version 1 keeps `{"n": N}`, later versions `{"count": N}`; `migrate` converts, or fails
/// when asked to.
struct Shapeshifter {
    version: u32,
    migrate_fails: bool,
}

impl Shapeshifter {
    fn field(&self) -> &'static str {
        if self.version == 1 {
            "n"
        } else {
            "count"
        }
    }
}

impl Behaviour for Shapeshifter {
    fn type_name(&self) -> &str {
        "shape"
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn initial_state(&self, _key: &str) -> ErasedState {
        Box::new(json!({ self.field(): 0 }))
    }
    fn handle(
        &self,
        _key: &str,
        state: &ErasedState,
        _message: Value,
    ) -> Result<Turn, BehaviourError> {
        let state = state.downcast_ref::<Value>().unwrap();
        let next = state[self.field()].as_i64().unwrap() + 1;
        Ok(Turn {
            reply: json!({"version": self.version, "value": next}),
            events: vec![json!(1)],
            effects: vec![],
        })
    }
    fn apply(&self, state: &mut ErasedState, _event: &Value) -> Result<(), BehaviourError> {
        let field = self.field();
        let state = state.downcast_mut::<Value>().unwrap();
        state[field] = json!(state[field].as_i64().unwrap() + 1);
        Ok(())
    }
    fn state_to_value(&self, state: &ErasedState) -> Result<Value, BehaviourError> {
        Ok(state.downcast_ref::<Value>().unwrap().clone())
    }
    fn state_from_value(&self, value: Value) -> Result<ErasedState, BehaviourError> {
        Ok(Box::new(value))
    }
    fn migrate(&self, from_version: u32, state: Value) -> Result<ErasedState, BehaviourError> {
        if self.migrate_fails {
            return Err(BehaviourError::Failed("migrate refuses".into()));
        }
        let old = if from_version == 1 { "n" } else { "count" };
        Ok(Box::new(json!({ self.field(): state[old] })))
    }
}

fn shape(version: u32, migrate_fails: bool) -> Arc<dyn Behaviour> {
    Arc::new(Shapeshifter {
        version,
        migrate_fails,
    })
}

#[tokio::test]
async fn live_entities_upgrade_at_a_turn_boundary_and_passive_ones_on_activation() {
    let store = Arc::new(MemoryStore::default());
    let registry = BehaviourRegistry::with_builtins();
    registry.install(shape(1, false), 1, true).unwrap();
    let registry = Arc::new(registry);
    let root = Arc::new(RootSupervisor::new(
        4,
        SupervisionConfig::default().root,
        Shutdown::new(),
    ));
    let shards = Shards::new(
        registry.clone(),
        store.clone(),
        config(),
        SupervisionConfig::default(),
        root,
    );
    let live = EntityId::new("shape", "live").unwrap();
    let passive = EntityId::new("shape", "passive").unwrap();
    for id in [&live, &passive] {
        for _ in 0..2 {
            let reply = shards
                .call(id.clone(), json!({}), None, None)
                .await
                .unwrap()
                .reply;
            assert_eq!(reply["version"], 1);
        }
    }
    shards.stop(passive.clone()).await.unwrap();

    registry.install(shape(2, false), 2, true).unwrap();
    let reply = shards
        .call(live.clone(), json!({}), None, None)
        .await
        .unwrap()
        .reply;
    assert_eq!(reply, json!({"version": 2, "value": 3}));
    assert_eq!(
        shards.get(live.clone()).await.unwrap().0.state,
        json!({"count": 3})
    );
    // The passive entity replays its version-1 journal with version 1, then migrates.
    assert_eq!(
        shards.get(passive.clone()).await.unwrap().0.state,
        json!({"count": 2})
    );
    let reply = shards
        .call(passive.clone(), json!({}), None, None)
        .await
        .unwrap()
        .reply;
    assert_eq!(reply, json!({"version": 2, "value": 3}));
    // The migration was snapshotted under version 2: a new activation needs no version 1.
    shards.stop(passive.clone()).await.unwrap();
    let loaded = store.load(0, &passive).await.unwrap();
    assert_eq!(loaded.snapshot.map(|s| s.behaviour_version), Some(2));

    // A migrate that fails is a crash of that turn; the old state stays, readable.
    registry.install(shape(3, true), 3, true).unwrap();
    let err = shards
        .call(live.clone(), json!({}), None, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, EntityError::Crashed { .. }) && err.to_string().contains("migrate refuses"),
        "{err}"
    );
    assert_eq!(
        shards.get(live.clone()).await.unwrap().0.state,
        json!({"count": 3})
    );
    // Rolling back to version 2 lets it serve again, from the same state.
    registry.activate("shape", 2).unwrap();
    let reply = shards
        .call(live, json!({}), None, None)
        .await
        .unwrap()
        .reply;
    assert_eq!(reply, json!({"version": 2, "value": 4}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_gates_run_turns_ahead_but_hold_every_reply_until_durable() {
    let gate = Arc::new(Semaphore::new(0));
    let store = Arc::new(MemoryStore {
        gate: Some(gate.clone()),
        ..MemoryStore::default()
    });
    let shards = Arc::new(shards_on(store.clone(), config()));
    let mut calls = Vec::new();
    for _ in 0..5 {
        let shards = shards.clone();
        calls.push(tokio::spawn(async move {
            shards
                .call(counter("hot"), json!({"op": "incr"}), None, None)
                .await
        }));
        // One at a time into the mailbox, so the replies' order is the send order.
        let submitted = calls.len();
        eventually("the turn is handed to the journal", || {
            store.gated.load(Ordering::SeqCst) == submitted
        })
        .await;
    }
    // Five turns ran while none was durable; nobody has an answer yet, and `Get` waits too.
    assert!(calls.iter().all(|call| !call.is_finished()));
    let read = tokio::spawn({
        let shards = shards.clone();
        async move { shards.get(counter("hot")).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        !read.is_finished(),
        "Get must not show state that is not durable"
    );
    gate.add_permits(5);
    let mut values = Vec::new();
    for call in calls {
        values.push(
            call.await.unwrap().unwrap().reply["value"]
                .as_i64()
                .unwrap(),
        );
    }
    assert_eq!(values, [1, 2, 3, 4, 5]);
    let (view, _) = read.await.unwrap().unwrap();
    assert_eq!(view.state, json!({"value": 5}));
}

#[tokio::test]
async fn a_request_id_gets_the_stored_reply_and_the_handler_runs_once() {
    let store = Arc::new(MemoryStore::default());
    let shards = shards_on(store.clone(), config());
    let incr = || json!({"op": "incr", "by": 2});
    let first = shards
        .call(counter("a"), incr(), None, Some("r-1".into()))
        .await
        .unwrap();
    let again = shards
        .call(counter("a"), incr(), None, Some("r-1".into()))
        .await
        .unwrap();
    assert!(!first.deduplicated);
    assert!(again.deduplicated);
    assert_eq!((again.reply, again.seq), (first.reply.clone(), first.seq));
    // A new activation reads the stored reply back from storage.
    assert!(shards.stop(counter("a")).await.unwrap());
    let after_restart = shards
        .call(counter("a"), incr(), None, Some("r-1".into()))
        .await
        .unwrap();
    assert!(after_restart.deduplicated);
    assert_eq!(after_restart.reply, first.reply);
    let (view, _) = shards.get(counter("a")).await.unwrap();
    assert_eq!((view.state, view.seq), (json!({"value": 2}), 1));
    // Another id is another change; a malformed one is refused before anything runs.
    let other = shards
        .call(counter("a"), incr(), None, Some("r-2".into()))
        .await
        .unwrap();
    assert_eq!(other.reply, json!({"value": 4}));
    let refused = shards
        .call(counter("a"), incr(), None, Some("not valid".into()))
        .await;
    assert!(
        matches!(refused, Err(EntityError::InvalidMessage { .. })),
        "{refused:?}"
    );
}

#[tokio::test]
async fn messages_from_an_entity_are_applied_once_and_in_its_order() {
    use crate::entity::records::{MessageKind, OutboxMessage};
    use crate::entity::DeliveryAck;

    let store = Arc::new(MemoryStore::default());
    let shards = shards_on(store.clone(), config());
    let sender = counter("sender");
    let target = counter("target");
    let deliver = |pair_seq: u64| {
        let (reply, answer) = oneshot::channel();
        let message = OutboxMessage {
            to: target.clone(),
            pair_seq,
            kind: MessageKind::Cast,
            message: json!({"op": "incr"}),
        };
        let envelope = Envelope {
            request: Request::Deliver {
                from: sender.clone(),
                message: Box::new(message),
                reply,
            },
            deadline: None,
        };
        shards.route(&target, envelope).unwrap();
        async move { answer.await.unwrap().unwrap() }
    };
    assert_eq!(deliver(1).await, DeliveryAck::Accepted);
    assert_eq!(deliver(1).await, DeliveryAck::Duplicate);
    assert_eq!(deliver(3).await, DeliveryAck::Gap { expected: 2 });
    assert_eq!(deliver(2).await, DeliveryAck::Accepted);
    assert_eq!(deliver(3).await, DeliveryAck::Accepted);
    // The receipt is durable with the turns: a new activation knows what it applied.
    assert!(shards.stop(target.clone()).await.unwrap());
    assert_eq!(deliver(2).await, DeliveryAck::Duplicate);
    assert_eq!(deliver(4).await, DeliveryAck::Accepted);
    let (view, _) = shards.get(target.clone()).await.unwrap();
    assert_eq!(view.state, json!({"value": 4}));
}

#[tokio::test]
async fn a_durable_cast_is_in_the_inbox_before_it_is_acknowledged_and_handled_after() {
    let store = Arc::new(MemoryStore::default());
    let shards = shards_on(store.clone(), config());
    let seen = shards
        .durable_cast(
            counter("d"),
            json!({"op": "incr"}),
            None,
            Some("c-1".into()),
        )
        .await
        .unwrap();
    assert!(!seen);
    let seen = shards
        .durable_cast(
            counter("d"),
            json!({"op": "incr"}),
            None,
            Some("c-1".into()),
        )
        .await
        .unwrap();
    assert!(seen, "the same request id is accepted once");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = shards
            .get(counter("d"))
            .await
            .map(|(view, _)| view.state)
            .ok();
        if value == Some(json!({"value": 1})) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the durable cast was not handled: {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Handled means removed from the inbox: a new activation does not run it again.
    assert!(shards.stop(counter("d")).await.unwrap());
    let reply = shards
        .call(counter("d"), json!({"op": "get"}), None, None)
        .await
        .unwrap();
    assert_eq!(reply.reply, json!({"value": 1}));
}

#[tokio::test]
async fn the_memory_store_keeps_records_like_the_real_one() {
    let store = MemoryStore::default();
    let a = counter("a");
    let put = |kind, name: &[u8]| Op::PutRecord {
        kind,
        name: name.to_vec(),
        value: name.to_vec(),
    };
    let ops = vec![
        put(RecordKind::Outbox, b"o"),
        put(RecordKind::Inbox, b"i"),
        put(RecordKind::Timer, b"t"),
        put(RecordKind::Dedup, b"d"),
        Op::PutTimerDue {
            due_ms: 9,
            name: b"t".to_vec(),
        },
    ];
    store
        .commit(EntityBatch {
            shard: 1,
            entity: a.clone(),
            ops,
        })
        .await
        .unwrap();
    // Records alone do not make an entity exist.
    assert!(store
        .list("counter", "", None, 10)
        .await
        .unwrap()
        .is_empty());
    let names: Vec<Vec<u8>> = store
        .load(1, &a)
        .await
        .unwrap()
        .records
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, vec![b"d".to_vec(), b"t".to_vec(), b"i".to_vec()]);
    assert_eq!(
        store.due_timers(1, None, 8, 10).await.unwrap(),
        DueTimers {
            due: vec![],
            next_due_ms: Some(9)
        }
    );
    store
        .commit(EntityBatch {
            shard: 1,
            entity: a.clone(),
            ops: vec![Op::Delete],
        })
        .await
        .unwrap();
    assert!(store.load(1, &a).await.unwrap().records.is_empty());
    for kind in RecordKind::ALL {
        assert!(store
            .scan_records(1, kind, None, 10)
            .await
            .unwrap()
            .is_empty());
    }
    assert_eq!(store.due_timers(1, None, 9, 10).await.unwrap().due.len(), 1);
}

/// Shards whose stored replies are kept for `window`.
fn shards_with_dedup_window(store: Arc<MemoryStore>, window: Duration) -> Shards {
    shards_on(
        store,
        EntityConfig {
            dedup_window: window,
            ..config()
        },
    )
}

#[tokio::test]
async fn the_sweep_forgets_expired_replies_of_passive_entities_only() {
    let store = Arc::new(MemoryStore::default());
    let window = Duration::from_secs(2);
    let shards = shards_with_dedup_window(store.clone(), window);
    let incr = || json!({"op": "incr"});
    let stored_replies = |key: &str| {
        let id = counter(key);
        let shard = hash::shard_of(&id, store.shard_count());
        let store = store.clone();
        async move {
            store
                .entity_records(shard, &id, RecordKind::Dedup)
                .await
                .unwrap()
                .len()
        }
    };
    // "old" stores a reply and passivates; "busy" stores one and stays active.
    for key in ["old", "busy"] {
        shards
            .call(counter(key), incr(), None, Some("r-1".into()))
            .await
            .unwrap();
    }
    assert!(shards.stop(counter("old")).await.unwrap());
    // Both replies are past their window once it has passed: only wall-clock time does that.
    tokio::time::sleep(window + Duration::from_millis(100)).await;
    // "fresh" stores one now, within its window, and passivates.
    let fresh_stored = Instant::now();
    shards
        .call(counter("fresh"), incr(), None, Some("r-1".into()))
        .await
        .unwrap();
    assert!(shards.stop(counter("fresh")).await.unwrap());

    // (The sweep's own task may have asked "old" already: count what was forgotten in all.)
    shards.sweep_expired_replies().await;
    let fresh_within_window = fresh_stored.elapsed() < window;
    assert_eq!(stored_replies("old").await, 0);
    // An active entity forgets its own as it goes; a reply within its window stays.
    assert_eq!(stored_replies("busy").await, 1);
    if fresh_within_window {
        assert_eq!(shards.replies_forgotten(), 1);
        assert_eq!(stored_replies("fresh").await, 1);
    }
    // The swept entity passivated again, its state intact.
    eventually("old passivates after forgetting", || {
        shards.active_count() == 1
    })
    .await;
    let (view, active) = shards.get(counter("old")).await.unwrap();
    assert_eq!(
        (view.state, view.seq, active),
        (json!({"value": 1}), 1, false)
    );
    // A second pass finds nothing more to forget while "fresh" is within its window.
    if fresh_stored.elapsed() < window {
        assert_eq!(shards.sweep_expired_replies().await, 0);
    }
}

#[tokio::test]
async fn a_corrupt_stored_reply_does_not_stop_the_sweep_of_its_shard() {
    let store = Arc::new(MemoryStore::default());
    let window = Duration::from_millis(100);
    let shards = shards_with_dedup_window(store.clone(), window);
    // "a" sorts first in its shard (a shorter key); "behind" is in the same shard, after it.
    let shard = hash::shard_of(&counter("a"), store.shard_count());
    let behind = (0..)
        .map(|n| format!("behind-{n}"))
        .find(|key| hash::shard_of(&counter(key), store.shard_count()) == shard)
        .unwrap();
    for key in ["a", behind.as_str()] {
        shards
            .call(
                counter(key),
                json!({"op": "incr"}),
                None,
                Some("r-1".into()),
            )
            .await
            .unwrap();
        assert!(shards.stop(counter(key)).await.unwrap());
    }
    store.corrupt_in_scans.lock().push(counter("a"));
    tokio::time::sleep(window + Duration::from_millis(50)).await;

    shards.sweep_expired_replies().await;
    // The corrupt entity is skipped (its retries answer DATA_LOSS); the one behind it is swept.
    let left = |key: &str| {
        store
            .records
            .lock()
            .of_entity(shard, &counter(key), RecordKind::Dedup)
            .len()
    };
    assert_eq!(left(&behind), 0);
    assert_eq!(left("a"), 1);
}
