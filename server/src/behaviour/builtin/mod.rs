//! The entity types every server ships, documented in the README with their messages.

pub mod counter;
pub mod kv;
pub mod register;

use std::sync::Arc;

use super::{Behaviour, Typed};

/// Every built-in behaviour.
pub fn all() -> Vec<Arc<dyn Behaviour>> {
    vec![
        Arc::new(Typed(counter::Counter)),
        Arc::new(Typed(register::Register)),
        Arc::new(Typed(kv::Kv)),
    ]
}

/// Runs messages through the erased interface the engine uses: handle, then apply.
#[cfg(test)]
pub(crate) mod harness {
    use crate::behaviour::{Behaviour, BehaviourError, ErasedState, Value};

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

        pub fn send(&mut self, message: Value) -> Result<Value, BehaviourError> {
            let turn = self.behaviour.handle("k", &self.state, message)?;
            for event in &turn.events {
                self.behaviour.apply(&mut self.state, event)?;
                self.events += 1;
            }
            Ok(turn.reply)
        }

        pub fn state(&self) -> Value {
            self.behaviour.state_to_value(&self.state).unwrap()
        }
    }
}
