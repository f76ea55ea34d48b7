//! The typed behaviour trait for Rust authors and its adapter to the erased [`Behaviour`].
//!
//! Commands, events, replies and states are serde types; the adapter converts them from and
//! to [`Value`]s at the boundary, so a command that does not deserialize is refused with
//! serde's explanation (unknown op, missing field, wrong type) before the handler runs.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Behaviour, BehaviourError, Effect, ErasedState, Turn, Value};

/// What a typed handler returns: the reply and the events to commit.
#[derive(Debug, Clone, PartialEq)]
pub struct TypedTurn<E, R> {
    pub reply: R,
    pub events: Vec<E>,
    pub effects: Vec<Effect>,
}

impl<E, R> TypedTurn<E, R> {
    /// A turn that changes nothing.
    pub fn reply(reply: R) -> Self {
        TypedTurn {
            reply,
            events: Vec::new(),
            effects: Vec::new(),
        }
    }

    /// A turn that commits these events, then replies.
    pub fn with_events(reply: R, events: Vec<E>) -> Self {
        TypedTurn {
            reply,
            events,
            effects: Vec::new(),
        }
    }

    /// Adds an effect the engine carries out once the events are durable.
    pub fn effect(mut self, effect: Effect) -> Self {
        self.effects.push(effect);
        self
    }
}

/// An entity type written in Rust, gen_server-style: `handle` decides, `apply` changes.
pub trait TypedBehaviour: Send + Sync + 'static {
    type State: Serialize + DeserializeOwned + Send + Sync + 'static;
    type Command: DeserializeOwned;
    type Event: Serialize + DeserializeOwned;
    type Reply: Serialize;

    /// The entity type name clients address, e.g. `counter`.
    const TYPE_NAME: &'static str;
    /// The version of this code, stored with every event and snapshot.
    const VERSION: u32 = 1;

    /// The state of an entity that has never committed an event.
    fn init(&self, key: &str) -> Self::State;

    /// Decides what a command does: the reply and the events to commit. Must not have side
    /// effects: the engine may run it and then discard the turn.
    fn handle(
        &self,
        state: &Self::State,
        command: Self::Command,
    ) -> Result<TypedTurn<Self::Event, Self::Reply>, BehaviourError>;

    /// Folds a committed event into the state. Used for live turns and for replay alike.
    fn apply(&self, state: &mut Self::State, event: Self::Event);

    /// Handles an info message, such as a monitor's `DOWN` (see [`super::down_message`]).
    /// The default ignores it.
    fn handle_info(
        &self,
        _state: &Self::State,
        _info: Value,
    ) -> Result<TypedTurn<Self::Event, Self::Reply>, BehaviourError> {
        Err(BehaviourError::InvalidMessage(format!(
            "{} does not handle info messages",
            Self::TYPE_NAME
        )))
    }
}

/// Adapts a [`TypedBehaviour`] to the erased [`Behaviour`] the engine runs.
pub struct Typed<B>(pub B);

impl<B: TypedBehaviour> Typed<B> {
    fn state<'a>(&self, state: &'a ErasedState) -> Result<&'a B::State, BehaviourError> {
        state
            .downcast_ref::<B::State>()
            .ok_or_else(|| self.foreign_state())
    }

    fn foreign_state(&self) -> BehaviourError {
        BehaviourError::Failed(format!(
            "state was not created by behaviour {}",
            B::TYPE_NAME
        ))
    }
}

impl<B: TypedBehaviour> Behaviour for Typed<B> {
    fn type_name(&self) -> &str {
        B::TYPE_NAME
    }

    fn version(&self) -> u32 {
        B::VERSION
    }

    fn initial_state(&self, key: &str) -> ErasedState {
        Box::new(self.0.init(key))
    }

    fn handle(
        &self,
        _key: &str,
        state: &ErasedState,
        message: Value,
    ) -> Result<Turn, BehaviourError> {
        // serde would read a JSON array as a struct's fields in order; a message is an object.
        if !message.is_object() {
            return Err(BehaviourError::InvalidMessage(format!(
                "expected a JSON object such as {{\"op\": \"get\"}}, got {}",
                json_kind(&message)
            )));
        }
        // The address in the error already names the type; serde's text names the problem.
        let command: B::Command = serde_json::from_value(message)
            .map_err(|e| BehaviourError::InvalidMessage(e.to_string()))?;
        let turn = self.0.handle(self.state(state)?, command)?;
        erase_turn(turn)
    }

    fn handle_info(
        &self,
        _key: &str,
        state: &ErasedState,
        info: Value,
    ) -> Result<Turn, BehaviourError> {
        let turn = self.0.handle_info(self.state(state)?, info)?;
        erase_turn(turn)
    }

    fn apply(&self, state: &mut ErasedState, event: &Value) -> Result<(), BehaviourError> {
        let event: B::Event = serde_json::from_value(event.clone()).map_err(|e| {
            BehaviourError::Decode(format!("event is not a {} event: {e}", B::TYPE_NAME))
        })?;
        let foreign = self.foreign_state();
        let state = state.downcast_mut::<B::State>().ok_or(foreign)?;
        self.0.apply(state, event);
        Ok(())
    }

    fn state_to_value(&self, state: &ErasedState) -> Result<Value, BehaviourError> {
        serde_json::to_value(self.state(state)?)
            .map_err(|e| BehaviourError::Failed(format!("state does not serialize: {e}")))
    }

    fn state_from_value(&self, value: Value) -> Result<ErasedState, BehaviourError> {
        let state: B::State = serde_json::from_value(value).map_err(|e| {
            BehaviourError::Decode(format!("snapshot is not a {} state: {e}", B::TYPE_NAME))
        })?;
        Ok(Box::new(state))
    }
}

/// The JSON kind of a value, for error messages.
pub(crate) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Serializes a typed turn's reply and events into values.
fn erase_turn<E: Serialize, R: Serialize>(turn: TypedTurn<E, R>) -> Result<Turn, BehaviourError> {
    let reply = serde_json::to_value(turn.reply)
        .map_err(|e| BehaviourError::Failed(format!("reply does not serialize: {e}")))?;
    let events = turn
        .events
        .into_iter()
        .map(|event| {
            serde_json::to_value(event)
                .map_err(|e| BehaviourError::Failed(format!("event does not serialize: {e}")))
        })
        .collect::<Result<_, _>>()?;
    Ok(Turn {
        reply,
        events,
        effects: turn.effects,
    })
}
