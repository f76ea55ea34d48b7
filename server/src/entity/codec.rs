//! The compact binary encoding of values on disk: MessagePack.
//!
//! Events and snapshots are [`Value`]s; the journal and sled store the bytes this module
//! makes. Decoding errors name the entity and the record, never panic.

use crate::address::EntityId;
use crate::behaviour::Value;

use super::EntityError;

/// Encodes a value for the journal.
pub fn encode(entity: &EntityId, value: &Value) -> Result<Vec<u8>, EntityError> {
    rmp_serde::to_vec(value).map_err(|e| EntityError::Crashed {
        entity: entity.clone(),
        reason: format!("value does not encode: {e}"),
    })
}

/// Decodes a stored value; `what` names the record for the error (e.g. "event 7").
pub fn decode(entity: &EntityId, what: &str, bytes: &[u8]) -> Result<Value, EntityError> {
    rmp_serde::from_slice(bytes).map_err(|e| EntityError::Corrupt {
        entity: entity.clone(),
        detail: format!("{what} does not decode: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn round_trips_values() {
        let id = EntityId::new("t", "k").unwrap();
        let value =
            json!({"event": "put", "field": "a", "value": [1, -2, 3.5, null, true, "s", {}]});
        let bytes = encode(&id, &value).unwrap();
        assert!(bytes.len() < serde_json::to_vec(&value).unwrap().len());
        assert_eq!(decode(&id, "event 1", &bytes).unwrap(), value);
    }

    #[test]
    fn garbage_is_an_error_naming_the_entity() {
        let id = EntityId::new("t", "k").unwrap();
        let err = decode(&id, "event 3", &[0xc1]).unwrap_err();
        assert!(
            err.to_string().contains("t/k") && err.to_string().contains("event 3"),
            "{err}"
        );
    }
}
