//! Rebuilding an entity's state from durable records: its snapshot, then every event after
//! it, folded with the behaviour's own `apply` (the same function live turns use).

use crate::address::EntityId;
use std::sync::Arc;

use crate::behaviour::{Behaviour, BehaviourError, ErasedState};
use crate::storage::LoadedEntity;

use super::{codec, EntityError};

/// An entity's state as recovered from storage.
pub struct Recovered {
    pub state: ErasedState,
    /// The last committed event's sequence number (0: the entity has no committed state).
    pub seq: u64,
    /// Events committed after the last snapshot.
    pub events_since_snapshot: u64,
    /// The behaviour whose representation `state` is in: `latest`, unless the last migration
    /// failed (then the newest version the records could be brought to).
    pub behaviour: Arc<dyn Behaviour>,
    /// The records were written by an older version and the state was migrated to `latest`:
    /// it should be snapshotted under the new version.
    pub migrated_from: Option<u32>,
    /// Migrating to `latest` failed: the state stays in `behaviour`'s representation, readable,
    /// and every turn is a crash until an upgrade succeeds.
    pub upgrade_error: Option<String>,
}

/// Looks up the behaviour of one version of the entity's type.
pub type VersionLookup<'a> = &'a dyn Fn(u32) -> Option<Arc<dyn Behaviour>>;

/// Folds a loaded snapshot and its following events into the entity's state. Each record is
/// read by the behaviour version that wrote it; where the version changes (and at the end, to
/// reach `latest`), the state goes through the newer version's `migrate`.
pub fn recover(
    latest: &Arc<dyn Behaviour>,
    versions: VersionLookup<'_>,
    id: &EntityId,
    loaded: LoadedEntity,
) -> Result<Recovered, EntityError> {
    let failed = |detail: String| EntityError::RecoveryFailed {
        entity: id.clone(),
        detail,
    };
    let behaviour_of = |version: u32, what: &str| {
        if version == latest.version() {
            return Ok(latest.clone());
        }
        versions(version).ok_or_else(|| {
            failed(format!(
                "{what} was written by version {version} of {}, which is not stored",
                id.entity_type
            ))
        })
    };
    let (mut current, mut state, mut seq) = match loaded.snapshot {
        Some(snapshot) => {
            let what = format!("snapshot at seq {}", snapshot.seq);
            let behaviour = behaviour_of(snapshot.behaviour_version, &what)?;
            let value = codec::decode(id, &what, &snapshot.payload)?;
            let state = behaviour
                .state_from_value(value)
                .map_err(|e| failed(format!("{what}: {e}")))?;
            (behaviour, state, snapshot.seq)
        }
        None => (latest.clone(), latest.initial_state(&id.key), 0),
    };
    let mut events_since_snapshot = 0;
    for event in loaded.events {
        if event.seq != seq + 1 {
            return Err(EntityError::Corrupt {
                entity: id.clone(),
                detail: format!(
                    "event {} follows event {seq}: the journal has a gap",
                    event.seq
                ),
            });
        }
        let what = format!("event {}", event.seq);
        if event.behaviour_version != current.version() {
            let next = behaviour_of(event.behaviour_version, &what)?;
            state = migrate(&current, &next, &state)
                .map_err(|e| failed(format!("before {what}: {e}")))?;
            current = next;
        }
        let value = codec::decode(id, &what, &event.payload)?;
        current
            .apply(&mut state, &value)
            .map_err(|e| failed(format!("{what}: {e}")))?;
        seq = event.seq;
        events_since_snapshot += 1;
    }
    let (mut migrated_from, mut upgrade_error) = (None, None);
    if current.version() != latest.version() {
        match migrate(&current, latest, &state) {
            Ok(migrated) => {
                state = migrated;
                migrated_from = Some(current.version());
                current = latest.clone();
            }
            Err(error) => upgrade_error = Some(error.to_string()),
        }
    }
    Ok(Recovered {
        state,
        seq,
        events_since_snapshot,
        behaviour: current,
        migrated_from,
        upgrade_error,
    })
}

/// Moves a state from `from`'s representation to `to`'s through `to.migrate`.
pub fn migrate(
    from: &Arc<dyn Behaviour>,
    to: &Arc<dyn Behaviour>,
    state: &ErasedState,
) -> Result<ErasedState, BehaviourError> {
    let value = from.state_to_value(state)?;
    to.migrate(from.version(), value).map_err(|e| match e {
        BehaviourError::InvalidMessage(m)
        | BehaviourError::Failed(m)
        | BehaviourError::Decode(m) => BehaviourError::Failed(format!(
            "migrate from version {} to {} failed: {m}",
            from.version(),
            to.version()
        )),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::behaviour::builtin::counter::Counter;
    use crate::behaviour::Typed;
    use crate::storage::StoredRecord;

    fn record(seq: u64, value: serde_json::Value) -> StoredRecord {
        let id = EntityId::new("counter", "k").unwrap();
        StoredRecord {
            seq,
            behaviour_version: 1,
            payload: codec::encode(&id, &value).unwrap(),
        }
    }

    #[test]
    fn folds_snapshot_then_events() {
        let id = EntityId::new("counter", "k").unwrap();
        let loaded = LoadedEntity {
            snapshot: Some(record(4, json!({"value": 10}))),
            events: vec![
                record(5, json!({"event": "added", "by": 2})),
                record(6, json!({"event": "added", "by": 3})),
            ],
            records: Vec::new(),
        };
        let counter = Typed(Counter);
        let latest: Arc<dyn Behaviour> = Arc::new(counter);
        let recovered = recover(&latest, &|_| None, &id, loaded).unwrap();
        assert_eq!(recovered.seq, 6);
        assert_eq!(recovered.events_since_snapshot, 2);
        assert_eq!(
            latest.state_to_value(&recovered.state).unwrap(),
            json!({"value": 15})
        );
    }

    #[test]
    fn a_gap_in_sequence_numbers_is_corruption() {
        let id = EntityId::new("counter", "k").unwrap();
        let loaded = LoadedEntity {
            snapshot: None,
            events: vec![
                record(1, json!({"event": "reset"})),
                record(3, json!({"event": "reset"})),
            ],
            records: Vec::new(),
        };
        let latest: Arc<dyn Behaviour> = Arc::new(Typed(Counter));
        let err = recover(&latest, &|_| None, &id, loaded).err().unwrap();
        assert!(matches!(err, EntityError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn an_event_of_another_type_fails_recovery() {
        let id = EntityId::new("counter", "k").unwrap();
        let loaded = LoadedEntity {
            snapshot: None,
            events: vec![record(1, json!({"event": "set", "value": 1}))],
            records: Vec::new(),
        };
        let latest: Arc<dyn Behaviour> = Arc::new(Typed(Counter));
        let err = recover(&latest, &|_| None, &id, loaded).err().unwrap();
        assert!(matches!(err, EntityError::RecoveryFailed { .. }), "{err}");
    }
}
