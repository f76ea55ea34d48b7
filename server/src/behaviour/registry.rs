//! The registry of entity types: type name → behaviour, with every deployed version.
//!
//! Two kinds of types live here. **Static** ones (the built-ins, and Rust behaviours an
//! embedder registers) are fixed before the server starts and have one version. **Deployed**
//! ones (Lua scripts, through the admin API) arrive while the server runs; every version stays
//! available, because a passive entity's journal is replayed with the version that wrote each
//! record, and one version is *active*: new activations and live entities (at their next turn
//! boundary) use it. A generation counter bumps on every change so entities notice an upgrade
//! with one atomic load per turn.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use super::builtin;
use super::Behaviour;

/// Why a behaviour could not be registered or activated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("a behaviour for entity type {0:?} is already registered")]
    Duplicate(String),
    #[error("entity type {0:?} is built into this server and cannot be deployed or rolled back")]
    Static(String),
    #[error("entity type {name:?} has no version {version}")]
    NoSuchVersion { name: String, version: u32 },
    #[error("entity type {0:?} has not been deployed")]
    NotDeployed(String),
}

/// One stored version of a deployed type.
#[derive(Clone)]
pub struct DeployedVersion {
    pub behaviour: Arc<dyn Behaviour>,
    pub deployed_at_ms: u64,
}

/// What the admin API lists about a deployed type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployedType {
    pub name: String,
    /// `(version, deployed_at_ms)`, oldest first.
    pub versions: Vec<(u32, u64)>,
    pub active: u32,
}

struct Deployed {
    versions: BTreeMap<u32, DeployedVersion>,
    active: u32,
}

/// Maps entity type names to the behaviours that serve them.
#[derive(Default)]
pub struct BehaviourRegistry {
    fixed: BTreeMap<String, Arc<dyn Behaviour>>,
    deployed: RwLock<BTreeMap<String, Deployed>>,
    generation: AtomicU64,
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

    /// Adds a static behaviour (built into the server binary) under its type name.
    pub fn register(&mut self, behaviour: Arc<dyn Behaviour>) -> Result<(), RegistryError> {
        let name = behaviour.type_name().to_owned();
        if self.fixed.contains_key(&name) {
            return Err(RegistryError::Duplicate(name));
        }
        self.fixed.insert(name, behaviour);
        Ok(())
    }

    /// The behaviour new turns of `type_name` run: the static one, or the active version.
    pub fn get(&self, type_name: &str) -> Option<Arc<dyn Behaviour>> {
        if let Some(fixed) = self.fixed.get(type_name) {
            return Some(fixed.clone());
        }
        let deployed = self.deployed.read();
        let entry = deployed.get(type_name)?;
        entry
            .versions
            .get(&entry.active)
            .map(|v| v.behaviour.clone())
    }

    /// A specific version of `type_name`, for replaying records that version wrote.
    pub fn version(&self, type_name: &str, version: u32) -> Option<Arc<dyn Behaviour>> {
        if let Some(fixed) = self.fixed.get(type_name) {
            return (fixed.version() == version).then(|| fixed.clone());
        }
        let deployed = self.deployed.read();
        deployed
            .get(type_name)?
            .versions
            .get(&version)
            .map(|v| v.behaviour.clone())
    }

    /// Whether `type_name` is static (built in), so never deployed, upgraded or rolled back.
    pub fn is_static(&self, type_name: &str) -> bool {
        self.fixed.contains_key(type_name)
    }

    /// Bumps on every deploy or rollback.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Every type name, sorted.
    pub fn type_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.fixed.keys().cloned().collect();
        names.extend(self.deployed.read().keys().cloned());
        names.sort();
        names
    }

    /// The highest stored version of a deployed type (0 if none).
    pub fn latest_version(&self, type_name: &str) -> u32 {
        let deployed = self.deployed.read();
        deployed
            .get(type_name)
            .and_then(|entry| entry.versions.keys().next_back().copied())
            .unwrap_or(0)
    }

    /// Stores a version of a deployed type; makes it active when `activate`.
    pub fn install(
        &self,
        behaviour: Arc<dyn Behaviour>,
        deployed_at_ms: u64,
        activate: bool,
    ) -> Result<(), RegistryError> {
        let name = behaviour.type_name().to_owned();
        if self.is_static(&name) {
            return Err(RegistryError::Static(name));
        }
        let version = behaviour.version();
        let mut deployed = self.deployed.write();
        let entry = deployed.entry(name).or_insert_with(|| Deployed {
            versions: BTreeMap::new(),
            active: version,
        });
        entry.versions.insert(
            version,
            DeployedVersion {
                behaviour,
                deployed_at_ms,
            },
        );
        if activate {
            entry.active = version;
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Makes a stored version of a deployed type the active one.
    pub fn activate(&self, type_name: &str, version: u32) -> Result<(), RegistryError> {
        if self.is_static(type_name) {
            return Err(RegistryError::Static(type_name.to_owned()));
        }
        let mut deployed = self.deployed.write();
        let entry = deployed
            .get_mut(type_name)
            .ok_or_else(|| RegistryError::NotDeployed(type_name.to_owned()))?;
        if !entry.versions.contains_key(&version) {
            return Err(RegistryError::NoSuchVersion {
                name: type_name.to_owned(),
                version,
            });
        }
        entry.active = version;
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// The active version of a deployed type.
    pub fn active_version(&self, type_name: &str) -> Option<u32> {
        self.deployed
            .read()
            .get(type_name)
            .map(|entry| entry.active)
    }

    /// Every deployed type with its versions, sorted by name.
    pub fn deployed(&self) -> Vec<DeployedType> {
        self.deployed
            .read()
            .iter()
            .map(|(name, entry)| DeployedType {
                name: name.clone(),
                versions: entry
                    .versions
                    .iter()
                    .map(|(v, d)| (*v, d.deployed_at_ms))
                    .collect(),
                active: entry.active,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::behaviour::stub::Stub;

    #[test]
    fn builtins_are_registered_once_each() {
        let registry = BehaviourRegistry::with_builtins();
        assert_eq!(
            registry.type_names(),
            [
                "counter",
                "kv",
                "lease",
                "queue",
                "rate_limiter",
                "register"
            ]
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

    fn versioned(version: u32) -> Arc<dyn Behaviour> {
        Arc::new(Stub::new("script", version))
    }

    #[test]
    fn deployed_versions_stay_available_and_one_is_active() {
        let registry = BehaviourRegistry::with_builtins();
        let before = registry.generation();
        registry.install(versioned(1), 10, true).unwrap();
        registry.install(versioned(2), 20, true).unwrap();
        assert_eq!(registry.get("script").map(|b| b.version()), Some(2));
        assert_eq!(registry.version("script", 1).map(|b| b.version()), Some(1));
        assert_eq!(registry.latest_version("script"), 2);
        registry.activate("script", 1).unwrap();
        assert_eq!(registry.get("script").map(|b| b.version()), Some(1));
        assert!(registry.generation() >= before + 3);
        assert_eq!(
            registry.deployed(),
            vec![DeployedType {
                name: "script".into(),
                versions: vec![(1, 10), (2, 20)],
                active: 1
            }]
        );
        assert!(matches!(
            registry.activate("script", 9),
            Err(RegistryError::NoSuchVersion { .. })
        ));
        assert!(matches!(
            registry.activate("counter", 1),
            Err(RegistryError::Static(_))
        ));
        assert_eq!(registry.version("counter", 1).map(|b| b.version()), Some(1));
        assert!(registry.version("counter", 2).is_none());
    }
}
