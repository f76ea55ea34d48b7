//! Entity types for the end-to-end tests, written as any embedder would write their own:
//! [`TypedBehaviour`]s registered next to the built-ins (see `bin/statehouse-test-server.rs`).
//! They are not in the production server.
//!
//! - `crashy`: a counter that crashes on command. `{"op":"incr","by":N}`, `{"op":"get"}`,
//!   `{"op":"crash","reason":R}` (the handler returns an error), `{"op":"panic"}` (it panics).
//! - `watcher`: monitors other entities and keeps every `DOWN` it receives.
//!   `{"op":"monitor","type":T,"key":K}`, `{"op":"demonitor","type":T,"key":K}`,
//!   `{"op":"downs"}` → `{"downs":[…]}`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use statehouse_server::address::EntityId;
use statehouse_server::behaviour::{
    Behaviour, BehaviourError, BehaviourRegistry, Effect, Typed, TypedBehaviour, TypedTurn,
};

/// The built-ins plus the test behaviours.
pub fn registry() -> BehaviourRegistry {
    let mut registry = BehaviourRegistry::with_builtins();
    let test_types: [Arc<dyn Behaviour>; 2] = [Arc::new(Typed(Crashy)), Arc::new(Typed(Watcher))];
    for behaviour in test_types {
        if let Err(error) = registry.register(behaviour) {
            panic!("test behaviours clash with the built-ins: {error}");
        }
    }
    registry
}

/// A counter that crashes on command.
pub struct Crashy;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CrashyState {
    pub value: i64,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum CrashyCommand {
    Incr {
        #[serde(default = "one")]
        by: i64,
    },
    Get,
    Crash {
        #[serde(default)]
        reason: Option<String>,
    },
    Panic,
}

fn one() -> i64 {
    1
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Added {
    pub by: i64,
}

impl TypedBehaviour for Crashy {
    type State = CrashyState;
    type Command = CrashyCommand;
    type Event = Added;
    type Reply = Value;

    const TYPE_NAME: &'static str = "crashy";

    fn init(&self, _key: &str) -> CrashyState {
        CrashyState::default()
    }

    fn handle(
        &self,
        state: &CrashyState,
        command: CrashyCommand,
    ) -> Result<TypedTurn<Added, Value>, BehaviourError> {
        match command {
            CrashyCommand::Get => Ok(TypedTurn::reply(json!({"value": state.value}))),
            CrashyCommand::Incr { by } => {
                let value = state
                    .value
                    .checked_add(by)
                    .ok_or_else(|| BehaviourError::InvalidMessage("overflow".into()))?;
                Ok(TypedTurn::with_events(
                    json!({"value": value}),
                    vec![Added { by }],
                ))
            }
            CrashyCommand::Crash { reason } => Err(BehaviourError::Failed(
                reason.unwrap_or_else(|| "crash requested".into()),
            )),
            CrashyCommand::Panic => panic!("panic requested"),
        }
    }

    fn apply(&self, state: &mut CrashyState, event: Added) {
        state.value += event.by;
    }
}

/// Monitors entities and records their `DOWN`s.
pub struct Watcher;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WatcherState {
    pub downs: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum WatcherCommand {
    Monitor {
        #[serde(rename = "type")]
        entity_type: String,
        key: String,
    },
    Demonitor {
        #[serde(rename = "type")]
        entity_type: String,
        key: String,
    },
    Downs,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Down {
    pub info: Value,
}

impl TypedBehaviour for Watcher {
    type State = WatcherState;
    type Command = WatcherCommand;
    type Event = Down;
    type Reply = Value;

    const TYPE_NAME: &'static str = "watcher";

    fn init(&self, _key: &str) -> WatcherState {
        WatcherState::default()
    }

    fn handle(
        &self,
        state: &WatcherState,
        command: WatcherCommand,
    ) -> Result<TypedTurn<Down, Value>, BehaviourError> {
        let target = |entity_type: String, key: String| {
            EntityId::new(entity_type, key)
                .map_err(|e| BehaviourError::InvalidMessage(e.to_string()))
        };
        Ok(match command {
            WatcherCommand::Downs => TypedTurn::reply(json!({"downs": state.downs})),
            WatcherCommand::Monitor { entity_type, key } => TypedTurn::reply(json!("monitoring"))
                .effect(Effect::Monitor(target(entity_type, key)?)),
            WatcherCommand::Demonitor { entity_type, key } => {
                TypedTurn::reply(json!("demonitored"))
                    .effect(Effect::Demonitor(target(entity_type, key)?))
            }
        })
    }

    fn handle_info(
        &self,
        _state: &WatcherState,
        info: Value,
    ) -> Result<TypedTurn<Down, Value>, BehaviourError> {
        Ok(TypedTurn::with_events(Value::Null, vec![Down { info }]))
    }

    fn apply(&self, state: &mut WatcherState, event: Down) {
        state.downs.push(event.info);
    }
}
