//! `register`: one value with a version number, for compare-and-set.
//!
//! State: `{"value": V, "version": N}`; a new register holds `null` at version 0.
//! Messages: `{"op":"get"}` → `{"value","version"}`; `{"op":"set","value":V}` →
//! `{"value":V,"version":N+1}`; `{"op":"cas","expected_version":N,"value":V}` →
//! `{"ok":true,"value":V,"version":N+1}` when the version matches, else
//! `{"ok":false,"value":current,"version":current}` and nothing changes.

use serde::{Deserialize, Serialize};

use crate::behaviour::{BehaviourError, TypedBehaviour, TypedTurn, Value};

/// The `register` behaviour.
pub struct Register;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterState {
    pub value: Value,
    pub version: u64,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum RegisterCommand {
    Get,
    Set { value: Value },
    Cas { expected_version: u64, value: Value },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RegisterEvent {
    Set { value: Value },
}

/// Replies: the plain state for `get` and `set`, the state plus `ok` for `cas`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegisterReply {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
    pub value: Value,
    pub version: u64,
}

impl TypedBehaviour for Register {
    type State = RegisterState;
    type Command = RegisterCommand;
    type Event = RegisterEvent;
    type Reply = RegisterReply;

    const TYPE_NAME: &'static str = "register";

    fn init(&self, _key: &str) -> RegisterState {
        RegisterState::default()
    }

    fn handle(
        &self,
        state: &RegisterState,
        command: RegisterCommand,
    ) -> Result<TypedTurn<RegisterEvent, RegisterReply>, BehaviourError> {
        let current = |ok| RegisterReply {
            ok,
            value: state.value.clone(),
            version: state.version,
        };
        let (ok, value) = match command {
            RegisterCommand::Get => return Ok(TypedTurn::reply(current(None))),
            RegisterCommand::Cas {
                expected_version, ..
            } if expected_version != state.version => {
                return Ok(TypedTurn::reply(current(Some(false))))
            }
            RegisterCommand::Cas { value, .. } => (Some(true), value),
            RegisterCommand::Set { value } => (None, value),
        };
        let reply = RegisterReply {
            ok,
            value: value.clone(),
            version: state.version + 1,
        };
        Ok(TypedTurn::with_events(
            reply,
            vec![RegisterEvent::Set { value }],
        ))
    }

    fn apply(&self, state: &mut RegisterState, event: RegisterEvent) {
        match event {
            RegisterEvent::Set { value } => {
                state.value = value;
                state.version += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::behaviour::builtin::harness::Entity;
    use crate::behaviour::Typed;

    #[test]
    fn set_get_and_compare_and_set() {
        let register = Typed(Register);
        let mut e = Entity::new(&register);
        assert_eq!(
            e.send(json!({"op": "get"})).unwrap(),
            json!({"value": null, "version": 0})
        );
        assert_eq!(
            e.send(json!({"op": "set", "value": "a"})).unwrap(),
            json!({"value": "a", "version": 1})
        );
        assert_eq!(
            e.send(json!({"op": "cas", "expected_version": 0, "value": "b"}))
                .unwrap(),
            json!({"ok": false, "value": "a", "version": 1})
        );
        assert_eq!(
            e.send(json!({"op": "cas", "expected_version": 1, "value": {"x": [1]}}))
                .unwrap(),
            json!({"ok": true, "value": {"x": [1]}, "version": 2})
        );
        assert_eq!(e.state(), json!({"value": {"x": [1]}, "version": 2}));
        assert_eq!(e.events, 2);
    }

    #[test]
    fn refuses_bad_messages() {
        let register = Typed(Register);
        let mut e = Entity::new(&register);
        for bad in [
            json!({"op": "set"}),
            json!({"op": "cas", "value": 1}),
            json!({"op": "cas", "expected_version": -1, "value": 1}),
        ] {
            assert!(matches!(
                e.send(bad),
                Err(BehaviourError::InvalidMessage(_))
            ));
        }
        assert_eq!(e.events, 0);
    }
}
