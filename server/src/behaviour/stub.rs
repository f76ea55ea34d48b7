//! A behaviour that is only a name and a version, for tests of what stores, lists and
//! activates behaviours without running them.

use super::{Behaviour, BehaviourError, ErasedState, Turn, Value};

/// Answers `null` to everything; its state is `()`.
pub(crate) struct Stub {
    pub name: String,
    pub version: u32,
}

impl Stub {
    pub(crate) fn new(name: &str, version: u32) -> Self {
        Stub {
            name: name.to_owned(),
            version,
        }
    }
}

impl Behaviour for Stub {
    fn type_name(&self) -> &str {
        &self.name
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn initial_state(&self, _: &str) -> ErasedState {
        Box::new(())
    }
    fn handle(&self, _: &str, _: &ErasedState, _: Value) -> Result<Turn, BehaviourError> {
        Ok(Turn::reply(Value::Null))
    }
    fn apply(&self, _: &mut ErasedState, _: &Value) -> Result<(), BehaviourError> {
        Ok(())
    }
    fn state_to_value(&self, _: &ErasedState) -> Result<Value, BehaviourError> {
        Ok(Value::Null)
    }
    fn state_from_value(&self, _: Value) -> Result<ErasedState, BehaviourError> {
        Ok(Box::new(()))
    }
}
