//! `kv`: a map of named fields, each with its own version, for per-field compare-and-set.
//!
//! State: `{"fields": {F: {"value": V, "version": N}}, "revision": R}`. Every change bumps the
//! entity's revision and a written field's version becomes that revision, so versions only
//! grow, even across a delete and a re-put of the same field.
//!
//! Messages:
//! - `{"op":"get","field":F}` → `{"field":F,"found":true,"value":V,"version":N}`
//!   (`found:false`, `value:null`, `version:0` for an absent field);
//! - `{"op":"put","field":F,"value":V}` → `{"field":F,"version":N}`;
//! - `{"op":"delete","field":F}` → `{"field":F,"deleted":bool}`;
//! - `{"op":"cas","field":F,"expected_version":N,"value":V}` (0 means "must be absent") →
//!   `{"ok":bool,"field":F,"version":N}` (the new version, or the current one when refused);
//! - `{"op":"fields"}` → `{"fields":[F, …]}` in sorted order.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::behaviour::{BehaviourError, TypedBehaviour, TypedTurn, Value};

/// The `kv` behaviour.
pub struct Kv;

/// The longest field name accepted, in bytes.
pub const FIELD_BYTES_MAX: usize = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    pub value: Value,
    pub version: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvState {
    pub fields: BTreeMap<String, Field>,
    pub revision: u64,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum KvCommand {
    Get {
        field: String,
    },
    Put {
        field: String,
        value: Value,
    },
    Delete {
        field: String,
    },
    Cas {
        field: String,
        expected_version: u64,
        value: Value,
    },
    Fields,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum KvEvent {
    Put { field: String, value: Value },
    Deleted { field: String },
}

impl TypedBehaviour for Kv {
    type State = KvState;
    type Command = KvCommand;
    type Event = KvEvent;
    type Reply = Value;

    const TYPE_NAME: &'static str = "kv";

    fn init(&self, _key: &str) -> KvState {
        KvState::default()
    }

    fn handle(
        &self,
        state: &KvState,
        command: KvCommand,
    ) -> Result<TypedTurn<KvEvent, Value>, BehaviourError> {
        let next = state.revision + 1;
        let version_of = |field: &str| state.fields.get(field).map_or(0, |f| f.version);
        Ok(match command {
            KvCommand::Fields => TypedTurn::reply(
                serde_json::json!({"fields": state.fields.keys().collect::<Vec<_>>()}),
            ),
            KvCommand::Get { field } => TypedTurn::reply(match state.fields.get(&field) {
                Some(f) => {
                    serde_json::json!({"field": field, "found": true, "value": f.value, "version": f.version})
                }
                None => {
                    serde_json::json!({"field": field, "found": false, "value": null, "version": 0})
                }
            }),
            KvCommand::Put { field, value } => {
                check_field(&field)?;
                let reply = serde_json::json!({"field": field, "version": next});
                TypedTurn::with_events(reply, vec![KvEvent::Put { field, value }])
            }
            KvCommand::Delete { field } => {
                if !state.fields.contains_key(&field) {
                    TypedTurn::reply(serde_json::json!({"field": field, "deleted": false}))
                } else {
                    let reply = serde_json::json!({"field": field, "deleted": true});
                    TypedTurn::with_events(reply, vec![KvEvent::Deleted { field }])
                }
            }
            KvCommand::Cas {
                field,
                expected_version,
                value,
            } => {
                check_field(&field)?;
                let current = version_of(&field);
                if current != expected_version {
                    TypedTurn::reply(
                        serde_json::json!({"ok": false, "field": field, "version": current}),
                    )
                } else {
                    let reply = serde_json::json!({"ok": true, "field": field, "version": next});
                    TypedTurn::with_events(reply, vec![KvEvent::Put { field, value }])
                }
            }
        })
    }

    fn apply(&self, state: &mut KvState, event: KvEvent) {
        state.revision += 1;
        match event {
            KvEvent::Put { field, value } => {
                state.fields.insert(
                    field,
                    Field {
                        value,
                        version: state.revision,
                    },
                );
            }
            KvEvent::Deleted { field } => {
                state.fields.remove(&field);
            }
        }
    }
}

fn check_field(field: &str) -> Result<(), BehaviourError> {
    if field.is_empty() {
        return Err(BehaviourError::InvalidMessage(
            "kv: field name is empty".into(),
        ));
    }
    if field.len() > FIELD_BYTES_MAX {
        return Err(BehaviourError::InvalidMessage(format!(
            "kv: field name is {} bytes long; the limit is {FIELD_BYTES_MAX}",
            field.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::behaviour::builtin::harness::Entity;
    use crate::behaviour::Typed;

    #[test]
    fn put_get_delete_and_fields() {
        let kv = Typed(Kv);
        let mut e = Entity::new(&kv);
        assert_eq!(
            e.send(json!({"op": "get", "field": "a"})).unwrap(),
            json!({"field": "a", "found": false, "value": null, "version": 0})
        );
        assert_eq!(
            e.send(json!({"op": "put", "field": "b", "value": 2}))
                .unwrap(),
            json!({"field": "b", "version": 1})
        );
        assert_eq!(
            e.send(json!({"op": "put", "field": "a", "value": [1]}))
                .unwrap(),
            json!({"field": "a", "version": 2})
        );
        assert_eq!(
            e.send(json!({"op": "get", "field": "a"})).unwrap(),
            json!({"field": "a", "found": true, "value": [1], "version": 2})
        );
        assert_eq!(
            e.send(json!({"op": "fields"})).unwrap(),
            json!({"fields": ["a", "b"]})
        );
        assert_eq!(
            e.send(json!({"op": "delete", "field": "b"})).unwrap(),
            json!({"field": "b", "deleted": true})
        );
        assert_eq!(
            e.send(json!({"op": "delete", "field": "b"})).unwrap(),
            json!({"field": "b", "deleted": false})
        );
        assert_eq!(
            e.state(),
            json!({"fields": {"a": {"value": [1], "version": 2}}, "revision": 3})
        );
    }

    #[test]
    fn compare_and_set_per_field() {
        let kv = Typed(Kv);
        let mut e = Entity::new(&kv);
        assert_eq!(
            e.send(json!({"op": "cas", "field": "f", "expected_version": 0, "value": "x"}))
                .unwrap(),
            json!({"ok": true, "field": "f", "version": 1})
        );
        assert_eq!(
            e.send(json!({"op": "cas", "field": "f", "expected_version": 0, "value": "y"}))
                .unwrap(),
            json!({"ok": false, "field": "f", "version": 1})
        );
        // A delete and re-put never reuses a version.
        e.send(json!({"op": "delete", "field": "f"})).unwrap();
        assert_eq!(
            e.send(json!({"op": "put", "field": "f", "value": "z"}))
                .unwrap(),
            json!({"field": "f", "version": 3})
        );
    }

    #[test]
    fn refuses_bad_messages() {
        let kv = Typed(Kv);
        let mut e = Entity::new(&kv);
        for bad in [
            json!({"op": "put", "value": 1}),
            json!({"op": "put", "field": "", "value": 1}),
            json!({"op": "put", "field": 3, "value": 1}),
            json!({"op": "get"}),
            json!({"op": "scan"}),
        ] {
            assert!(matches!(
                e.send(bad),
                Err(BehaviourError::InvalidMessage(_))
            ));
        }
        assert_eq!(e.events, 0);
    }
}
