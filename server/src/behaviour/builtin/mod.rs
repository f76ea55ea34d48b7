//! The entity types every server ships, documented in the README with their messages.
//!
//! **Owns**: the built-in types, [`Clocked`] (how the ones that read the clock keep their
//! decisions testable), the parsing of timer info messages they share, and the test harnesses.

pub mod counter;
pub mod kv;
pub mod lease;
pub mod queue;
pub mod rate_limiter;
pub mod register;

use std::sync::Arc;

use serde::Deserialize;

use super::{Behaviour, BehaviourError, Typed, TypedBehaviour, TypedTurn, Value};

/// Every built-in behaviour.
pub fn all() -> Vec<Arc<dyn Behaviour>> {
    vec![
        Arc::new(Typed(counter::Counter)),
        Arc::new(Typed(register::Register)),
        Arc::new(Typed(kv::Kv)),
        Arc::new(Typed(queue::Queue)),
        Arc::new(Typed(lease::Lease)),
        Arc::new(Typed(rate_limiter::RateLimiter)),
    ]
}

/// A typed behaviour whose decisions depend on the time. Its [`TypedBehaviour::handle`] and
/// [`TypedBehaviour::handle_info`] read the clock once ([`super::now_unix_ms`]) and call these,
/// which are pure: tests drive them with a simulated clock. The time a decision used goes in
/// its events, so `apply` never reads a clock.
pub trait Clocked: TypedBehaviour {
    /// Handles a command as of `now_ms` (Unix milliseconds).
    fn handle_at(
        &self,
        state: &Self::State,
        command: Self::Command,
        now_ms: u64,
    ) -> Result<TypedTurn<Self::Event, Self::Reply>, BehaviourError>;

    /// Handles an info message (a due timer) as of `now_ms`. The default refuses it.
    fn handle_info_at(
        &self,
        _state: &Self::State,
        _info: Value,
        _now_ms: u64,
    ) -> Result<TypedTurn<Self::Event, Self::Reply>, BehaviourError> {
        Err(BehaviourError::InvalidMessage(format!(
            "{} does not handle info messages",
            Self::TYPE_NAME
        )))
    }
}

/// A due timer's info message, as [`super::timer_message`] builds it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TimerInfo {
    pub name: String,
    #[serde(default)]
    pub payload: Value,
    pub due_ms: u64,
}

/// Reads an info message that must be a due timer; anything else is refused, naming `type_name`.
pub fn timer_info(type_name: &str, info: Value) -> Result<TimerInfo, BehaviourError> {
    if info.get("info").and_then(Value::as_str) != Some("timer") {
        return Err(BehaviourError::InvalidMessage(format!(
            "{type_name}: expected a timer info message {{\"info\": \"timer\", ...}}, got {info}"
        )));
    }
    serde_json::from_value(info).map_err(|e| {
        BehaviourError::InvalidMessage(format!("{type_name}: malformed timer info message: {e}"))
    })
}

/// Runs messages through the erased interface the engine uses: handle, then apply; and
/// [`Sim`], which runs a [`Clocked`] behaviour on a simulated clock with a timer table.
#[cfg(test)]
pub(crate) mod harness {
    use std::collections::BTreeMap;

    use super::Clocked;
    use crate::behaviour::typed::json_kind;
    use crate::behaviour::{
        timer_message, Behaviour, BehaviourError, Effect, ErasedState, Turn, TypedTurn, Value,
    };

    pub struct Entity<'a> {
        pub behaviour: &'a dyn Behaviour,
        pub state: ErasedState,
        pub events: usize,
    }

    impl<'a> Entity<'a> {
        pub fn new(behaviour: &'a dyn Behaviour) -> Self {
            Entity {
                state: behaviour.initial_state("k"),
                behaviour,
                events: 0,
            }
        }

        /// Handles a message and applies its events; the reply.
        pub fn send(&mut self, message: Value) -> Result<Value, BehaviourError> {
            self.turn(message).map(|turn| turn.reply)
        }

        /// Handles a message and applies its events; the whole turn (reply, events, effects).
        pub fn turn(&mut self, message: Value) -> Result<Turn, BehaviourError> {
            let turn = self.behaviour.handle("k", &self.state, message)?;
            self.commit(turn)
        }

        /// Delivers an info message (a due timer, a `DOWN`) and applies its events.
        pub fn info(&mut self, info: Value) -> Result<Turn, BehaviourError> {
            let turn = self.behaviour.handle_info("k", &self.state, info)?;
            self.commit(turn)
        }

        fn commit(&mut self, turn: Turn) -> Result<Turn, BehaviourError> {
            for event in &turn.events {
                self.behaviour.apply(&mut self.state, event)?;
                self.events += 1;
            }
            Ok(turn)
        }

        pub fn state(&self) -> Value {
            self.behaviour.state_to_value(&self.state).unwrap()
        }
    }

    /// A pending timer in [`Sim`]: due time and payload.
    #[derive(Debug, Clone, PartialEq)]
    pub struct PendingTimer {
        pub due_ms: u64,
        pub payload: Value,
    }

    /// One entity of a [`Clocked`] behaviour on a simulated clock, with the engine's timer
    /// semantics: setting a pending name replaces it, cancelling removes it, a fired timer is
    /// gone. Events go through JSON as in the engine, and a journal keeps them for replay.
    pub struct Sim<'a, B: Clocked> {
        pub behaviour: &'a B,
        pub state: B::State,
        pub now: u64,
        pub journal: Vec<Value>,
        pub timers: BTreeMap<String, PendingTimer>,
    }

    impl<'a, B: Clocked> Sim<'a, B> {
        pub fn new(behaviour: &'a B, now: u64) -> Self {
            Sim {
                state: behaviour.init("k"),
                behaviour,
                now,
                journal: Vec::new(),
                timers: BTreeMap::new(),
            }
        }

        /// Handles a command at the simulated time, commits it, and returns the turn.
        pub fn turn(&mut self, message: Value) -> Result<Turn, BehaviourError> {
            if !message.is_object() {
                return Err(BehaviourError::InvalidMessage(format!(
                    "expected a JSON object, got {}",
                    json_kind(&message)
                )));
            }
            let command: B::Command = serde_json::from_value(message)
                .map_err(|e| BehaviourError::InvalidMessage(e.to_string()))?;
            let turn = self.behaviour.handle_at(&self.state, command, self.now)?;
            Ok(self.commit(turn))
        }

        /// The reply to a command.
        pub fn send(&mut self, message: Value) -> Result<Value, BehaviourError> {
            self.turn(message).map(|turn| turn.reply)
        }

        /// Delivers an info message at the simulated time.
        pub fn info(&mut self, info: Value) -> Result<Turn, BehaviourError> {
            let turn = self.behaviour.handle_info_at(&self.state, info, self.now)?;
            Ok(self.commit(turn))
        }

        /// Moves the clock forward and fires every timer now due, earliest first.
        pub fn advance(&mut self, ms: u64) -> Vec<Turn> {
            self.now += ms;
            let mut fired = Vec::new();
            loop {
                let due = self
                    .timers
                    .iter()
                    .filter(|(_, t)| t.due_ms <= self.now)
                    .min_by_key(|(_, t)| t.due_ms)
                    .map(|(name, _)| name.clone());
                let Some(name) = due else { break };
                let timer = self.timers.remove(&name).unwrap();
                let info = timer_message(&name, timer.payload, timer.due_ms);
                fired.push(self.info(info).unwrap());
            }
            fired
        }

        fn commit(&mut self, turn: TypedTurn<B::Event, B::Reply>) -> Turn {
            let reply = serde_json::to_value(turn.reply).unwrap();
            let mut events = Vec::new();
            for event in turn.events {
                let value = serde_json::to_value(event).unwrap();
                let event: B::Event = serde_json::from_value(value.clone()).unwrap();
                self.behaviour.apply(&mut self.state, event);
                self.journal.push(value.clone());
                events.push(value);
            }
            for effect in &turn.effects {
                match effect {
                    Effect::SetTimer { name, due, payload } => {
                        let timer = PendingTimer {
                            due_ms: due.at(self.now),
                            payload: payload.clone(),
                        };
                        self.timers.insert(name.clone(), timer);
                    }
                    Effect::CancelTimer { name } => {
                        self.timers.remove(name);
                    }
                    _ => {}
                }
            }
            Turn {
                reply,
                events,
                effects: turn.effects,
            }
        }

        pub fn state(&self) -> Value {
            serde_json::to_value(&self.state).unwrap()
        }

        /// The state recovery would rebuild: the journal folded from the initial state, after
        /// a round trip of the live state through a snapshot.
        pub fn replayed(&self) -> Value {
            let mut state = self.behaviour.init("k");
            for event in &self.journal {
                let event: B::Event = serde_json::from_value(event.clone()).unwrap();
                self.behaviour.apply(&mut state, event);
            }
            let snapshot: B::State = serde_json::from_value(self.state()).unwrap();
            assert_eq!(
                serde_json::to_value(&snapshot).unwrap(),
                self.state(),
                "snapshot round trip"
            );
            serde_json::to_value(&state).unwrap()
        }
    }
}
