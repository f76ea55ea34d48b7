//! Behaviours: the code of an entity type, like an OTP behaviour module.
//!
//! **Owns**: the erased [`Behaviour`] trait the engine runs, the typed [`TypedBehaviour`] trait
//! Rust authors implement (adapted by [`Typed`]), the [`BehaviourRegistry`] of types, and the
//! built-in types (`counter`, `register`, `kv`, `queue`, `lease`, `rate_limiter`).
//! **Knows nothing about** storage, mailboxes or protobuf: a behaviour maps
//! `(state, message)` to a [`Turn`] and folds events into state, nothing else.
//!
//! Invariants:
//! - `handle` never mutates state; only `apply` does, and the engine calls the same `apply`
//!   for live turns and for replay, so a recovered entity cannot differ from the live one.
//! - An `Err(BehaviourError::InvalidMessage)` from `handle` is a refusal, not a crash.

pub mod builtin;
pub mod lua;
mod registry;
#[cfg(test)]
pub(crate) mod stub;
mod typed;

use std::any::Any;
use std::sync::Arc;

use crate::address::EntityId;

pub use registry::{BehaviourRegistry, DeployedType, DeployedVersion, RegistryError};
pub use typed::{Typed, TypedBehaviour, TypedTurn};

/// The JSON-like value messages, replies, events and states are made of.
pub type Value = serde_json::Value;

/// An entity's state in its behaviour's own representation. Only the behaviour that created
/// it can read it.
pub type ErasedState = Box<dyn Any + Send + Sync>;

/// What handling one message produced: the reply for the caller and the events to commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub reply: Value,
    pub events: Vec<Value>,
    /// What the engine does after the events are committed.
    pub effects: Vec<Effect>,
}

impl Turn {
    /// A turn that replies and changes nothing.
    pub fn reply(reply: Value) -> Self {
        Turn {
            reply,
            events: Vec::new(),
            effects: Vec::new(),
        }
    }
}

/// Something a turn asks the engine to do besides replying and committing events.
///
/// Durable effects (timers, sends, requests) are written in the same atomic journal batch as
/// the turn's events: after a crash either the turn and its effects are recovered, or neither.
/// They take effect once that batch is durable. Monitors are not durable (see [`Effect::Monitor`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Watch another entity: when it crashes, stops, is deleted or is quarantined, this entity
    /// receives one `DOWN` info message (see [`down_message`]). Monitors live in memory, like
    /// OTP's: a server restart forgets them.
    Monitor(EntityId),
    /// Stop watching.
    Demonitor(EntityId),
    /// Sets the entity's timer `name` (replacing a pending timer of that name). When it is due
    /// the entity receives the info message [`timer_message`]; a timer due while the server
    /// was down fires at recovery. Names are 1 to [`TIMER_NAME_BYTES_MAX`] bytes.
    SetTimer {
        name: String,
        due: TimerDue,
        payload: Value,
    },
    /// Cancels the entity's pending timer `name`; nothing happens if there is none.
    CancelTimer { name: String },
    /// Sends `message` to another entity, which handles it as a cast (its reply is dropped).
    /// Delivered after the turn is durable, retried until the target takes it, and applied by
    /// the target exactly once, across crashes of either side.
    Send { to: EntityId, message: Value },
    /// Asks another entity: it handles `message` as a call, and its reply comes back to this
    /// entity later as the info message [`reply_message`] carrying `tag`. Never blocks the turn,
    /// so two entities asking each other cannot deadlock. Exactly once, like [`Effect::Send`].
    Request {
        to: EntityId,
        message: Value,
        tag: Value,
    },
}

/// When a timer is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerDue {
    /// This many milliseconds after the turn that sets it.
    AfterMs(u64),
    /// At this wall-clock time, in milliseconds since the Unix epoch.
    AtUnixMs(u64),
}

impl TimerDue {
    /// The due time in Unix milliseconds, for a turn running at `now_ms`.
    pub fn at(self, now_ms: u64) -> u64 {
        match self {
            TimerDue::AfterMs(ms) => now_ms.saturating_add(ms),
            TimerDue::AtUnixMs(at) => at,
        }
    }
}

/// The longest timer name, in bytes.
pub const TIMER_NAME_BYTES_MAX: usize = 256;

/// The current wall-clock time in milliseconds since the Unix epoch: what timers are due
/// against, and what behaviours that measure time (leases, rate limiters) read in their
/// handlers. Handlers are never replayed (only their events are), so reading the clock there
/// keeps recovery deterministic as long as the time a decision used is recorded in its event.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The info message a due timer delivers:
/// `{"info": "timer", "name": N, "payload": P, "due_ms": D}` (`due_ms` in Unix milliseconds).
pub fn timer_message(name: &str, payload: Value, due_ms: u64) -> Value {
    serde_json::json!({
        "info": "timer",
        "name": name,
        "payload": payload,
        "due_ms": due_ms,
    })
}

/// The info message that answers an [`Effect::Request`]:
/// `{"info": "reply", "tag": T, "from": {"type": .., "key": ..}, "reply": R}` when the target
/// replied, or with `"error": {"code": C, "message": M}` instead of `"reply"` when it refused
/// or could not take the request (`code` is the gRPC code name in snake case, e.g.
/// `invalid_argument`, `not_found`, `aborted`).
pub fn reply_message(from: &EntityId, tag: Value, outcome: Result<Value, (&str, &str)>) -> Value {
    let from = serde_json::json!({"type": from.entity_type, "key": from.key});
    match outcome {
        Ok(reply) => serde_json::json!({"info": "reply", "tag": tag, "from": from, "reply": reply}),
        Err((code, message)) => serde_json::json!({
            "info": "reply",
            "tag": tag,
            "from": from,
            "error": {"code": code, "message": message},
        }),
    }
}

/// The info message a monitor delivers:
/// `{"info": "down", "type": T, "key": K, "reason": R, "detail": D}`, where `reason` is one of
/// `crashed`, `stopped`, `deleted`, `quarantined`, or `not_active` when the monitored entity
/// was not active as the monitor was set (OTP's `noproc`).
pub fn down_message(target: &EntityId, reason: &str, detail: &str) -> Value {
    serde_json::json!({
        "info": "down",
        "type": target.entity_type,
        "key": target.key,
        "reason": reason,
        "detail": detail,
    })
}

/// Why a behaviour refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BehaviourError {
    /// The message is malformed or names an unknown operation. Nothing is written and the
    /// entity carries on; the caller gets `INVALID_ARGUMENT`.
    #[error("{0}")]
    InvalidMessage(String),
    /// The handler failed: a crash of this turn.
    #[error("{0}")]
    Failed(String),
    /// A stored state or event does not decode as this behaviour's type.
    #[error("{0}")]
    Decode(String),
}

/// The erased interface the engine runs. Implement [`TypedBehaviour`] instead and wrap it in
/// [`Typed`], unless the behaviour's types are only known at run time (Lua).
pub trait Behaviour: Send + Sync + 'static {
    /// The entity type this behaviour serves, e.g. `counter`.
    fn type_name(&self) -> &str;

    /// The version of this behaviour's code; stored with every event and snapshot.
    fn version(&self) -> u32;

    /// The state of an entity that has never committed an event.
    fn initial_state(&self, key: &str) -> ErasedState;

    /// Handles one message against the committed state. Never mutates the state.
    fn handle(
        &self,
        key: &str,
        state: &ErasedState,
        message: Value,
    ) -> Result<Turn, BehaviourError>;

    /// Folds one committed event into the state.
    fn apply(&self, state: &mut ErasedState, event: &Value) -> Result<(), BehaviourError>;

    /// The state as a value, for `Get` and snapshots.
    fn state_to_value(&self, state: &ErasedState) -> Result<Value, BehaviourError>;

    /// The state from a snapshot's value.
    fn state_from_value(&self, value: Value) -> Result<ErasedState, BehaviourError>;

    /// Handles a cast: a message nobody waits a reply for. The default is `handle`, with the
    /// reply discarded by the engine.
    fn handle_cast(
        &self,
        key: &str,
        state: &ErasedState,
        message: Value,
    ) -> Result<Turn, BehaviourError> {
        self.handle(key, state, message)
    }

    /// Converts a state written by version `from_version` of this type (given as its value)
    /// into this version's state: OTP's `code_change`. The default reads it unchanged.
    fn migrate(&self, _from_version: u32, state: Value) -> Result<ErasedState, BehaviourError> {
        self.state_from_value(state)
    }

    /// Handles an info message (OTP's `handle_info`): a monitor's `DOWN`, a due timer, the
    /// reply to a request.
    /// The default ignores it.
    fn handle_info(
        &self,
        _key: &str,
        _state: &ErasedState,
        _info: Value,
    ) -> Result<Turn, BehaviourError> {
        Ok(Turn::reply(Value::Null))
    }
}

/// Turns a script into a behaviour: the script engine (Lua) implements it.
pub trait BehaviourCompiler: Send + Sync + 'static {
    /// The language of the scripts, e.g. `lua`.
    fn language(&self) -> &'static str;

    /// Compiles and checks `source` as version `version` of type `name`. The error says what
    /// is wrong (and where) for the person who deployed it.
    fn compile(&self, name: &str, version: u32, source: &str)
        -> Result<Arc<dyn Behaviour>, String>;
}
