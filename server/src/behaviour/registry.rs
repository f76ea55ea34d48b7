//! The registry of entity types: type name → behaviour.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::builtin;
use super::Behaviour;

/// Why a behaviour could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("a behaviour for entity type {0:?} is already registered")]
    Duplicate(String),
}

/// Maps entity type names to the behaviours that serve them. Built once at start-up.
#[derive(Clone, Default)]
pub struct BehaviourRegistry {
    types: BTreeMap<String, Arc<dyn Behaviour>>,
}

impl BehaviourRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry holding the built-in types: `counter`, `register`, `kv`.
    pub fn with_builtins() -> Self {
        let mut registry = Self::new();
        for behaviour in builtin::all() {
            // The built-ins have distinct names; a clash would be a programming error caught
            // by the unit test below.
            let _ = registry.register(behaviour);
        }
        registry
    }

    /// Adds a behaviour under its type name.
    pub fn register(&mut self, behaviour: Arc<dyn Behaviour>) -> Result<(), RegistryError> {
        let name = behaviour.type_name().to_owned();
        if self.types.contains_key(&name) {
            return Err(RegistryError::Duplicate(name));
        }
        self.types.insert(name, behaviour);
        Ok(())
    }

    /// The behaviour serving `type_name`, if any.
    pub fn get(&self, type_name: &str) -> Option<&Arc<dyn Behaviour>> {
        self.types.get(type_name)
    }

    /// The registered type names, sorted.
    pub fn type_names(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_registered_once_each() {
        let registry = BehaviourRegistry::with_builtins();
        assert_eq!(
            registry.type_names().collect::<Vec<_>>(),
            ["counter", "kv", "register"]
        );
    }

    #[test]
    fn duplicate_names_are_refused() {
        let mut registry = BehaviourRegistry::with_builtins();
        let again = builtin::all().remove(0);
        let name = again.type_name().to_owned();
        assert_eq!(
            registry.register(again),
            Err(RegistryError::Duplicate(name))
        );
    }
}
