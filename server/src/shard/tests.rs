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
use crate::storage::{EntityBatch, LoadedEntity, Op, StoreError, StoredRecord};

/// A `Store` held in memory, for tests of the layers above storage only.
#[derive(Default)]
struct MemoryStore {
    entities: Mutex<BTreeMap<EntityId, LoadedEntity>>,
    commits: AtomicUsize,
    snapshots: AtomicUsize,
    /// When set, every commit waits for a permit first.
    gate: Option<Arc<Semaphore>>,
    /// Commits waiting at the gate.
    gated: AtomicUsize,
    fail_commits: AtomicBool,
}

#[async_trait]
impl Store for MemoryStore {
    fn shard_count(&self) -> u32 {
        4
    }

    async fn commit(&self, batch: EntityBatch) -> Result<(), StoreError> {
        if let Some(gate) = &self.gate {
            self.gated.fetch_add(1, Ordering::SeqCst);
            gate.acquire()
                .await
                .map_err(|_| StoreError::Closed)?
                .forget();
        }
        if self.fail_commits.load(Ordering::SeqCst) {
            return Err(StoreError::JournalFailed("injected fault".into()));
        }
        self.commits.fetch_add(1, Ordering::SeqCst);
        let mut entities = self.entities.lock();
        for op in batch.ops {
            let entity = entities.entry(batch.entity.clone()).or_default();
            match op {
                Op::Event {
                    seq,
                    behaviour_version,
                    payload,
                } => entity.events.push(StoredRecord {
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
                    entity.events.retain(|e| e.seq > seq);
                    entity.snapshot = Some(StoredRecord {
                        seq,
                        behaviour_version,
                        payload,
                    });
                }
                Op::Delete => {
                    entities.remove(&batch.entity);
                }
            }
        }
        Ok(())
    }

    async fn load(&self, _shard: u32, entity: &EntityId) -> Result<LoadedEntity, StoreError> {
        Ok(self
            .entities
            .lock()
            .get(entity)
            .cloned()
            .unwrap_or_default())
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
            .map(|id| id.key.clone())
            .take(limit)
            .collect())
    }

    async fn checkpoint(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn close(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

fn config() -> EntityConfig {
    EntityConfig {
        idle_timeout: Duration::from_secs(60),
        snapshot_every_events: 0,
        mailbox_capacity: 16,
    }
}

fn shards_on(store: Arc<MemoryStore>, config: EntityConfig) -> Shards {
    Shards::new(Arc::new(BehaviourRegistry::with_builtins()), store, config)
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
            .call(counter("a"), json!({"op": "incr"}), None)
            .await
            .unwrap();
        assert_eq!(
            reply,
            CallReply {
                reply: json!({"value": expected}),
                seq: expected as u64
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
        .call(counter("a"), json!({"op": "incr"}), None)
        .await
        .unwrap();
    let err = shards
        .call(counter("a"), json!({"op": "nope"}), None)
        .await
        .unwrap_err();
    assert!(matches!(err, EntityError::InvalidMessage { .. }), "{err}");
    let err = shards
        .call(EntityId::new("nosuch", "a").unwrap(), json!({}), None)
        .await
        .unwrap_err();
    assert!(matches!(err, EntityError::UnknownType { .. }), "{err}");
    let err = shards
        .call(
            EntityId {
                entity_type: "counter".into(),
                key: String::new(),
            },
            json!({}),
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
        .call(counter("a"), json!({"op": "incr", "by": 7}), None)
        .await
        .unwrap();
    eventually("passivation", || shards.active_count() == 0).await;
    let (view, active) = shards.get(counter("a")).await.unwrap();
    assert_eq!((view.state, active), (json!({"value": 7}), false));
    let reply = shards
        .call(counter("a"), json!({"op": "incr"}), None)
        .await
        .unwrap();
    assert_eq!(
        reply,
        CallReply {
            reply: json!({"value": 8}),
            seq: 2
        }
    );
}

#[tokio::test]
async fn stop_passivates_and_delete_removes() {
    let store = Arc::new(MemoryStore::default());
    let shards = shards_on(store.clone(), config());
    shards
        .call(counter("a"), json!({"op": "incr"}), None)
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
        .call(counter("a"), json!({"op": "incr"}), None)
        .await
        .unwrap();
    assert_eq!(
        reply,
        CallReply {
            reply: json!({"value": 1}),
            seq: 1
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
    // The first message is taken and blocks in commit; two more fill the mailbox.
    let first = tokio::spawn({
        let shards = shards.clone();
        async move { shards.call(counter("a"), json!({"op": "incr"}), None).await }
    });
    eventually("first message in commit", || {
        store.gated.load(Ordering::SeqCst) == 1
    })
    .await;
    let mut accepted = 0;
    let refused = loop {
        match shards.cast(counter("a"), json!({"op": "incr"})) {
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
        .call(counter("a"), json!({"op": "incr"}), None)
        .await
        .unwrap();
    store.fail_commits.store(true, Ordering::SeqCst);
    let err = shards
        .call(counter("a"), json!({"op": "incr"}), None)
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
        .call(counter("a"), json!({"op": "incr"}), None)
        .await
        .unwrap();
    assert_eq!(
        reply,
        CallReply {
            reply: json!({"value": 2}),
            seq: 2
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
            .call(counter("a"), json!({"op": "incr"}), None)
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
        .call(counter("a"), json!({"op": "get"}), None)
        .await
        .unwrap();
    assert_eq!(
        reply,
        CallReply {
            reply: json!({"value": 7}),
            seq: 7
        }
    );
}

#[tokio::test]
async fn an_expired_deadline_is_not_run() {
    let store = Arc::new(MemoryStore::default());
    let shards = shards_on(store.clone(), config());
    let past = Instant::now() - Duration::from_millis(1);
    let err = shards
        .call(counter("a"), json!({"op": "incr"}), Some(past))
        .await
        .unwrap_err();
    assert!(matches!(err, EntityError::DeadlineExceeded(_)), "{err}");
    // Whatever the race, the entity skipped the message.
    assert_eq!(
        shards
            .call(counter("a"), json!({"op": "get"}), None)
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
            .call(counter(key), json!({"op": "incr"}), None)
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
        shards.cast(counter("a"), json!({"op": "incr"})).unwrap();
    }
    shards.shutdown().await;
    assert_eq!(shards.active_count(), 0);
    assert_eq!(
        store.commits.load(Ordering::SeqCst),
        10,
        "casts in the mailbox were handled before stopping"
    );
    let err = shards
        .call(counter("a"), json!({"op": "get"}), None)
        .await
        .unwrap_err();
    assert_eq!(err, EntityError::ShuttingDown);
}

#[tokio::test]
async fn a_panicking_handler_is_a_crash_that_writes_nothing() {
    use crate::behaviour::{Behaviour, BehaviourError, ErasedState, Turn, Value};

    struct Bomb;
    impl Behaviour for Bomb {
        fn type_name(&self) -> &str {
            "bomb"
        }
        fn version(&self) -> u32 {
            1
        }
        fn initial_state(&self, _key: &str) -> ErasedState {
            Box::new(0u64)
        }
        fn handle(
            &self,
            _key: &str,
            _state: &ErasedState,
            message: Value,
        ) -> Result<Turn, BehaviourError> {
            match message.as_str() {
                Some("boom") => panic!("boom requested"),
                Some("fail") => Err(BehaviourError::Failed("failure requested".into())),
                _ => Ok(Turn {
                    reply: json!("ok"),
                    events: vec![json!(1)],
                }),
            }
        }
        fn apply(&self, state: &mut ErasedState, _event: &Value) -> Result<(), BehaviourError> {
            *state.downcast_mut::<u64>().unwrap() += 1;
            Ok(())
        }
        fn state_to_value(&self, state: &ErasedState) -> Result<Value, BehaviourError> {
            Ok(json!(state.downcast_ref::<u64>().unwrap()))
        }
        fn state_from_value(&self, value: Value) -> Result<ErasedState, BehaviourError> {
            Ok(Box::new(value.as_u64().unwrap_or(0)))
        }
    }

    let store = Arc::new(MemoryStore::default());
    let mut registry = BehaviourRegistry::new();
    registry.register(Arc::new(Bomb)).unwrap();
    let shards = Shards::new(Arc::new(registry), store.clone(), config());
    let id = EntityId::new("bomb", "x").unwrap();
    shards.call(id.clone(), json!("tick"), None).await.unwrap();
    for poison in ["boom", "fail"] {
        let err = shards
            .call(id.clone(), json!(poison), None)
            .await
            .unwrap_err();
        assert!(matches!(err, EntityError::Crashed { .. }), "{err}");
        assert!(err.to_string().contains("requested"), "{err}");
    }
    assert_eq!(store.commits.load(Ordering::SeqCst), 1);
    assert_eq!(shards.call(id, json!("tick"), None).await.unwrap().seq, 2);
}
