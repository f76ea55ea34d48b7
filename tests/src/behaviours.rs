//! Entity types for the end-to-end tests, written as any embedder would write their own:
//! [`TypedBehaviour`]s registered next to the built-ins (see `bin/statehouse-test-server.rs`).
//! They are not in the production server.
//!
//! - `crashy`: a counter that crashes on command. `{"op":"incr","by":N}`, `{"op":"get"}`,
//!   `{"op":"crash","reason":R}` (the handler returns an error), `{"op":"panic"}` (it panics).
//! - `watcher`: monitors other entities and keeps every `DOWN` it receives.
//!   `{"op":"monitor","type":T,"key":K}`, `{"op":"demonitor","type":T,"key":K}`,
//!   `{"op":"downs"}` → `{"downs":[…]}`.
//! - `alarm`: durable timers. `{"op":"set","name":N,"after_ms":A,"payload":P}`,
//!   `{"op":"cancel","name":N}`, `{"op":"fired"}` → `{"fired":[{name,payload,due_ms}…]}`.
//!   A timer whose payload has `"crash": true` crashes the info handler.
//! - `relay`: entity-to-entity messages. `{"op":"relay","token":T,"hops":H,"ring":K}` counts
//!   the token and, while hops are left, sends it on to `relay/((key + 1) mod K)` (keys are
//!   numbers); a token starting with `poison` crashes it. `{"op":"ask","to":KEY,
//!   "message":M,"tag":T}` requests `relay/KEY`; the reply info is kept.
//!   `{"op":"state"}` → `{"received":{token:count},"replies":[…]}`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use statehouse_server::address::EntityId;
use std::collections::BTreeMap;

use statehouse_server::behaviour::{
    Behaviour, BehaviourError, BehaviourRegistry, Effect, TimerDue, Typed, TypedBehaviour,
    TypedTurn,
};

/// The built-ins plus the test behaviours.
pub fn registry() -> BehaviourRegistry {
    let mut registry = BehaviourRegistry::with_builtins();
    let test_types: [Arc<dyn Behaviour>; 4] = [
        Arc::new(Typed(Crashy)),
        Arc::new(Typed(Watcher)),
        Arc::new(Typed(Alarm)),
        Arc::new(Typed(Relay)),
    ];
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

/// Sets, cancels and records durable timers.
pub struct Alarm;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct AlarmState {
    pub fired: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum AlarmCommand {
    Set {
        name: String,
        after_ms: u64,
        #[serde(default)]
        payload: Value,
    },
    Cancel {
        name: String,
    },
    Fired,
}

impl TypedBehaviour for Alarm {
    type State = AlarmState;
    type Command = AlarmCommand;
    type Event = Value;
    type Reply = Value;

    const TYPE_NAME: &'static str = "alarm";

    fn init(&self, _key: &str) -> AlarmState {
        AlarmState::default()
    }

    fn handle(
        &self,
        state: &AlarmState,
        command: AlarmCommand,
    ) -> Result<TypedTurn<Value, Value>, BehaviourError> {
        Ok(match command {
            AlarmCommand::Set {
                name,
                after_ms,
                payload,
            } => TypedTurn::reply(json!("set")).effect(Effect::SetTimer {
                name,
                due: TimerDue::AfterMs(after_ms),
                payload,
            }),
            AlarmCommand::Cancel { name } => {
                TypedTurn::reply(json!("cancelled")).effect(Effect::CancelTimer { name })
            }
            AlarmCommand::Fired => TypedTurn::reply(json!({"fired": state.fired})),
        })
    }

    fn handle_info(
        &self,
        _state: &AlarmState,
        info: Value,
    ) -> Result<TypedTurn<Value, Value>, BehaviourError> {
        if info["payload"]["crash"] == json!(true) {
            return Err(BehaviourError::Failed("poison timer".into()));
        }
        let fired =
            json!({"name": info["name"], "payload": info["payload"], "due_ms": info["due_ms"]});
        Ok(TypedTurn::with_events(Value::Null, vec![fired]))
    }

    fn apply(&self, state: &mut AlarmState, event: Value) {
        state.fired.push(event);
    }
}

/// Passes tokens around a ring of entities and asks others for replies.
pub struct Relay;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RelayState {
    pub received: BTreeMap<String, u64>,
    pub replies: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum RelayCommand {
    Relay {
        token: String,
        hops: u64,
        ring: u64,
        /// The key of this entity (the handler does not see its own key).
        at: u64,
    },
    Ask {
        to: String,
        message: Value,
        tag: Value,
    },
    State,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RelayEvent {
    Received { token: String },
    Replied { info: Value },
}

impl TypedBehaviour for Relay {
    type State = RelayState;
    type Command = RelayCommand;
    type Event = RelayEvent;
    type Reply = Value;

    const TYPE_NAME: &'static str = "relay";

    fn init(&self, _key: &str) -> RelayState {
        RelayState::default()
    }

    fn handle(
        &self,
        state: &RelayState,
        command: RelayCommand,
    ) -> Result<TypedTurn<RelayEvent, Value>, BehaviourError> {
        let relay = |key: String| {
            EntityId::new("relay", key).map_err(|e| BehaviourError::InvalidMessage(e.to_string()))
        };
        Ok(match command {
            RelayCommand::State => {
                TypedTurn::reply(json!({"received": state.received, "replies": state.replies}))
            }
            RelayCommand::Relay {
                token,
                hops,
                ring,
                at,
            } => {
                if token.starts_with("poison") {
                    return Err(BehaviourError::Failed(format!("poison token {token}")));
                }
                let count = state.received.get(&token).copied().unwrap_or(0) + 1;
                let mut turn = TypedTurn::with_events(
                    json!({"count": count}),
                    vec![RelayEvent::Received {
                        token: token.clone(),
                    }],
                );
                if hops > 0 && ring > 0 {
                    let next = (at + 1) % ring;
                    turn = turn.effect(Effect::Send {
                        to: relay(next.to_string())?,
                        message: json!({"op": "relay", "token": token, "hops": hops - 1, "ring": ring, "at": next}),
                    });
                }
                turn
            }
            RelayCommand::Ask { to, message, tag } => {
                TypedTurn::reply(json!("asked")).effect(Effect::Request {
                    to: relay(to)?,
                    message,
                    tag,
                })
            }
        })
    }

    fn handle_info(
        &self,
        _state: &RelayState,
        info: Value,
    ) -> Result<TypedTurn<RelayEvent, Value>, BehaviourError> {
        Ok(TypedTurn::with_events(
            Value::Null,
            vec![RelayEvent::Replied { info }],
        ))
    }

    fn apply(&self, state: &mut RelayState, event: RelayEvent) {
        match event {
            RelayEvent::Received { token } => *state.received.entry(token).or_insert(0) += 1,
            RelayEvent::Replied { info } => state.replies.push(info),
        }
    }
}
