//! Rebuilding an entity's state from durable records: its snapshot, then every event after
//! it, folded with the behaviour's own `apply` (the same function live turns use).

use crate::address::EntityId;
use crate::behaviour::{Behaviour, ErasedState};
use crate::storage::LoadedEntity;

use super::{codec, EntityError};

/// An entity's state as recovered from storage.
pub struct Recovered {
    pub state: ErasedState,
    /// The last committed event's sequence number (0: the entity has no committed state).
    pub seq: u64,
    /// Events committed after the last snapshot.
    pub events_since_snapshot: u64,
}

/// Folds a loaded snapshot and its following events into the entity's state.
pub fn recover(
    behaviour: &dyn Behaviour,
    id: &EntityId,
    loaded: LoadedEntity,
) -> Result<Recovered, EntityError> {
    let failed = |detail: String| EntityError::RecoveryFailed {
        entity: id.clone(),
        detail,
    };
    let (mut state, mut seq) = match loaded.snapshot {
        Some(snapshot) => {
            let what = format!("snapshot at seq {}", snapshot.seq);
            let value = codec::decode(id, &what, &snapshot.payload)?;
            let state = behaviour
                .state_from_value(value)
                .map_err(|e| failed(format!("{what}: {e}")))?;
            (state, snapshot.seq)
        }
        None => (behaviour.initial_state(&id.key), 0),
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
        let value = codec::decode(id, &what, &event.payload)?;
        behaviour
            .apply(&mut state, &value)
            .map_err(|e| failed(format!("{what}: {e}")))?;
        seq = event.seq;
        events_since_snapshot += 1;
    }
    Ok(Recovered {
        state,
        seq,
        events_since_snapshot,
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
        };
        let counter = Typed(Counter);
        let recovered = recover(&counter, &id, loaded).unwrap();
        assert_eq!(recovered.seq, 6);
        assert_eq!(recovered.events_since_snapshot, 2);
        assert_eq!(
            counter.state_to_value(&recovered.state).unwrap(),
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
        };
        let err = recover(&Typed(Counter), &id, loaded).err().unwrap();
        assert!(matches!(err, EntityError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn an_event_of_another_type_fails_recovery() {
        let id = EntityId::new("counter", "k").unwrap();
        let loaded = LoadedEntity {
            snapshot: None,
            events: vec![record(1, json!({"event": "set", "value": 1}))],
        };
        let err = recover(&Typed(Counter), &id, loaded).err().unwrap();
        assert!(matches!(err, EntityError::RecoveryFailed { .. }), "{err}");
    }
}
