//! Deploying behaviours while the server runs: compile a script, store it durably as a new
//! version, make it active; list what is deployed; roll back to the previous version; and at
//! start-up, load every stored version again.
//!
//! **Owns**: the catalog records of deployed behaviours (`behaviour/<name>/v/<version>` with the
//! source, `behaviour/<name>/active` with the active version) and their order of writing: the
//! version record, then the active record, each durable before the next step, then the
//! registry. A crash between steps leaves either the old active version or the new one, never a
//! half-deployed type. **May call**: `behaviour/` (registry, the compiler trait) and `storage/`
//! (the catalog). Live entities switch to a new version by themselves at their next turn
//! boundary (see `entity/`).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::address::TYPE_BYTES_MAX;
use crate::behaviour::{BehaviourCompiler, BehaviourRegistry, DeployedType, RegistryError};
use crate::storage::{Store, StoreError};

/// Why a deployment request failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("this server has no script engine; deployed behaviours are not available")]
    NoEngine,
    #[error("invalid behaviour name {0:?}: use 1 to 128 characters from [A-Za-z0-9_.-], starting with a letter")]
    InvalidName(String),
    #[error("the script was refused: {0}")]
    Compile(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("behaviour {0:?} has no version before the active one to roll back to")]
    NoPreviousVersion(String),
    #[error("stored behaviour {key}: {detail}")]
    Catalog { key: String, detail: String },
    #[error("storing the behaviour failed: {0}")]
    Storage(#[from] StoreError),
}

/// The durable record of one version.
#[derive(Debug, Serialize, Deserialize)]
struct VersionRecord {
    name: String,
    version: u32,
    language: String,
    source: String,
    deployed_at_ms: u64,
}

/// The durable record of the active version.
#[derive(Debug, Serialize, Deserialize)]
struct ActiveRecord {
    version: u32,
}

const CATALOG_PREFIX: &str = "behaviour/";

fn version_key(name: &str, version: u32) -> String {
    format!("{CATALOG_PREFIX}{name}/v/{version:010}")
}

fn active_key(name: &str) -> String {
    format!("{CATALOG_PREFIX}{name}/active")
}

/// Deploys, lists and rolls back behaviours.
pub struct Deployments {
    registry: Arc<BehaviourRegistry>,
    store: Arc<dyn Store>,
    compiler: Option<Arc<dyn BehaviourCompiler>>,
    /// One deployment at a time: versions are numbered in order.
    serial: tokio::sync::Mutex<()>,
}

impl Deployments {
    /// Loads every stored version into the registry and activates the recorded active ones.
    /// A version that no longer compiles is logged and skipped (its entities then fail to
    /// recover with an error naming it), so one bad script never stops the server.
    pub async fn load(
        registry: Arc<BehaviourRegistry>,
        store: Arc<dyn Store>,
        compiler: Option<Arc<dyn BehaviourCompiler>>,
    ) -> Result<Deployments, DeployError> {
        let deployments = Deployments {
            registry,
            store,
            compiler,
            serial: tokio::sync::Mutex::new(()),
        };
        let records = deployments.store.catalog(CATALOG_PREFIX).await?;
        let mut actives = Vec::new();
        for (key, bytes) in records {
            if key.ends_with("/active") {
                let record: ActiveRecord = decode(&key, &bytes)?;
                let name = key[CATALOG_PREFIX.len()..key.len() - "/active".len()].to_owned();
                actives.push((name, record.version));
                continue;
            }
            let record: VersionRecord = decode(&key, &bytes)?;
            let Some(compiler) = &deployments.compiler else {
                tracing::error!(name = %record.name, version = record.version, "a deployed behaviour is stored but this server has no script engine");
                continue;
            };
            match compiler.compile(&record.name, record.version, &record.source) {
                Ok(behaviour) => {
                    deployments
                        .registry
                        .install(behaviour, record.deployed_at_ms, false)?
                }
                Err(error) => {
                    tracing::error!(name = %record.name, version = record.version, %error, "a stored behaviour no longer compiles")
                }
            }
        }
        for (name, version) in actives {
            if let Err(error) = deployments.registry.activate(&name, version) {
                tracing::error!(%name, version, %error, "cannot activate the recorded version");
            }
        }
        let loaded = deployments.registry.deployed();
        if !loaded.is_empty() {
            tracing::info!(behaviours = loaded.len(), "deployed behaviours loaded");
        }
        Ok(deployments)
    }

    /// Compiles `source` as the next version of `name`, stores it durably, and makes it
    /// active. Returns the new version.
    pub async fn deploy(&self, name: &str, source: &str) -> Result<u32, DeployError> {
        check_name(name)?;
        if self.registry.is_static(name) {
            return Err(RegistryError::Static(name.to_owned()).into());
        }
        let compiler = self.compiler.as_ref().ok_or(DeployError::NoEngine)?;
        let _serial = self.serial.lock().await;
        let version = self.registry.latest_version(name) + 1;
        let behaviour = compiler
            .compile(name, version, source)
            .map_err(DeployError::Compile)?;
        let deployed_at_ms = now_ms();
        let record = VersionRecord {
            name: name.to_owned(),
            version,
            language: compiler.language().to_owned(),
            source: source.to_owned(),
            deployed_at_ms,
        };
        self.put(&version_key(name, version), &record).await?;
        self.put(&active_key(name), &ActiveRecord { version })
            .await?;
        self.registry.install(behaviour, deployed_at_ms, true)?;
        tracing::info!(%name, version, "behaviour deployed");
        Ok(version)
    }

    /// Makes the version before the active one active again. Returns `(from, to)`.
    pub async fn rollback(&self, name: &str) -> Result<(u32, u32), DeployError> {
        if self.registry.is_static(name) {
            return Err(RegistryError::Static(name.to_owned()).into());
        }
        let _serial = self.serial.lock().await;
        let deployed = self
            .list()
            .into_iter()
            .find(|d| d.name == name)
            .ok_or_else(|| RegistryError::NotDeployed(name.to_owned()))?;
        let previous = deployed
            .versions
            .iter()
            .map(|(version, _)| *version)
            .filter(|version| *version < deployed.active)
            .max()
            .ok_or_else(|| DeployError::NoPreviousVersion(name.to_owned()))?;
        self.put(&active_key(name), &ActiveRecord { version: previous })
            .await?;
        self.registry.activate(name, previous)?;
        tracing::info!(%name, from = deployed.active, to = previous, "behaviour rolled back");
        Ok((deployed.active, previous))
    }

    /// Every deployed type with its versions.
    pub fn list(&self) -> Vec<DeployedType> {
        self.registry.deployed()
    }

    /// The static (built-in) type names.
    pub fn static_types(&self) -> Vec<String> {
        self.registry
            .type_names()
            .into_iter()
            .filter(|name| self.registry.is_static(name))
            .collect()
    }

    async fn put<T: Serialize>(&self, key: &str, record: &T) -> Result<(), DeployError> {
        let bytes = serde_json::to_vec(record).map_err(|e| DeployError::Catalog {
            key: key.to_owned(),
            detail: e.to_string(),
        })?;
        self.store.put_catalog(key, bytes).await?;
        Ok(())
    }
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, DeployError> {
    serde_json::from_slice(bytes).map_err(|e| DeployError::Catalog {
        key: key.to_owned(),
        detail: e.to_string(),
    })
}

fn check_name(name: &str) -> Result<(), DeployError> {
    let mut chars = name.chars();
    let starts_with_letter = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !starts_with_letter || !rest_ok || name.len() > TYPE_BYTES_MAX {
        return Err(DeployError::InvalidName(name.to_owned()));
    }
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["cart", "Cart_2", "a.b-c"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "2cart", "car t", "cart/x", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    use crate::behaviour::stub::Stub;
    use crate::behaviour::Behaviour;
    use crate::storage::{Durability, SledStore, StoreConfig};

    /// Compiles any source except one saying "bad".
    struct TestCompiler;
    impl BehaviourCompiler for TestCompiler {
        fn language(&self) -> &'static str {
            "test"
        }
        fn compile(
            &self,
            name: &str,
            version: u32,
            source: &str,
        ) -> Result<Arc<dyn Behaviour>, String> {
            if source.contains("bad") {
                return Err("line 1: bad script".into());
            }
            Ok(Arc::new(Stub::new(name, version)))
        }
    }

    fn store_at(dir: &std::path::Path) -> Arc<dyn Store> {
        SledStore::open(StoreConfig {
            data_dir: dir.to_path_buf(),
            shard_count: 1,
            durability: Durability::Sync,
            async_sync_window: std::time::Duration::from_millis(10),
            checkpoint_interval: std::time::Duration::from_secs(3600),
            checkpoint_journal_bytes: 1 << 30,
            journal_segment_bytes: 1 << 20,
            sled_cache_bytes: 1 << 20,
            commits_pending_max: 16,
            commit_spin: std::time::Duration::ZERO,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn deploy_rollback_and_reload_from_the_catalog() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_at(dir.path());
        let compiler: Option<Arc<dyn BehaviourCompiler>> = Some(Arc::new(TestCompiler));
        let registry = Arc::new(BehaviourRegistry::with_builtins());
        let deployments = Deployments::load(registry.clone(), store.clone(), compiler.clone())
            .await
            .unwrap();
        assert_eq!(deployments.deploy("cart", "v1").await.unwrap(), 1);
        assert_eq!(deployments.deploy("cart", "v2").await.unwrap(), 2);
        assert!(
            matches!(deployments.deploy("cart", "bad").await, Err(DeployError::Compile(m)) if m.contains("line 1"))
        );
        assert!(matches!(
            deployments.deploy("counter", "v1").await,
            Err(DeployError::Registry(RegistryError::Static(_)))
        ));
        assert_eq!(registry.get("cart").map(|b| b.version()), Some(2));
        assert_eq!(deployments.rollback("cart").await.unwrap(), (2, 1));
        assert!(matches!(
            deployments.rollback("cart").await,
            Err(DeployError::NoPreviousVersion(_))
        ));
        store.close().await.unwrap();
        drop((deployments, store));

        // A restart finds every version and the active one again.
        let store = store_at(dir.path());
        let registry = Arc::new(BehaviourRegistry::with_builtins());
        let deployments = Deployments::load(registry.clone(), store, compiler)
            .await
            .unwrap();
        let listed = deployments.list();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].versions.len(), listed[0].active), (2, 1));
        assert_eq!(registry.get("cart").map(|b| b.version()), Some(1));
        assert_eq!(deployments.deploy("cart", "v3").await.unwrap(), 3);
    }

    #[tokio::test]
    async fn without_an_engine_deploys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let deployments = Deployments::load(
            Arc::new(BehaviourRegistry::new()),
            store_at(dir.path()),
            None,
        )
        .await
        .unwrap();
        assert!(matches!(
            deployments.deploy("cart", "v1").await,
            Err(DeployError::NoEngine)
        ));
    }
}
