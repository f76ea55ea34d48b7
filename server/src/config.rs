//! Server settings: defaults, the optional TOML file, and their checks.
//!
//! Precedence: built-in defaults, then the config file (`--config FILE`), then command-line
//! flags. Every field of the file is optional; unknown fields are refused so a typo is not
//! silently ignored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use std::collections::BTreeMap;

use crate::entity::EntityConfig;
use crate::storage::{Durability, StoreConfig};
use crate::supervisor::{Backoff, Intensity, RestartPolicy};

/// The largest shard count a data dir may be created with.
pub const SHARDS_MAX: u32 = 4096;

/// The longest `commit_spin_us`.
pub const COMMIT_SPIN_US_MAX: u64 = 10_000;

/// The smallest `sled_cache_bytes`: below it sled would read back nearly every page it
/// writes.
pub const SLED_CACHE_BYTES_MIN: u64 = 1 << 20;

/// Everything `statehouse-server` can be told.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on; port 0 picks a free port (the log says which).
    pub listen: SocketAddr,
    /// Data directory: sled state under `state/`, journal segments under `journal/`.
    pub data_dir: PathBuf,
    /// Shard count of a new data dir; an existing one keeps its own.
    pub shards: u32,
    /// `sync`: reply after the journal's fdatasync. `async`: reply after the write, sync
    /// within `async_sync_window_ms`.
    pub durability: Durability,
    pub async_sync_window_ms: u64,
    /// Write a snapshot after this many events of one entity (0: never).
    pub snapshot_every_events: u64,
    /// Passivate an entity after this long without messages.
    pub idle_timeout_ms: u64,
    /// An entity without messages for this long hibernates: it gives up its task (~0.25 KiB)
    /// but stays active, and its next message resumes it without a load (0: never).
    pub hibernate_after_ms: u64,
    /// Messages an entity's mailbox holds before `RESOURCE_EXHAUSTED`.
    pub mailbox_capacity: usize,
    /// How long the reply of a request id is kept, so a retry gets it instead of running again.
    pub dedup_window_ms: u64,
    /// At most this many stored replies per entity; the oldest are forgotten first.
    pub dedup_per_entity_max: usize,
    /// A durable message (timer, message from an entity, durable cast) that crashed its
    /// entity this many times becomes a dead letter instead of running again. Keep it at or
    /// below the type's `max_restarts`, so it is dead-lettered before the entity is quarantined.
    pub dead_letter_after_crashes: u32,
    /// Checkpoint (flush sled, trim the journal) at least this often.
    pub checkpoint_interval_ms: u64,
    /// …and whenever this many journal bytes were written since the last checkpoint, or the
    /// writes not yet in sled (the overlays) hold this much memory. Commits wait while the
    /// overlays hold twice this (checkpoints are not keeping up).
    pub checkpoint_journal_bytes: u64,
    /// Start a new journal segment file past this size.
    pub journal_segment_bytes: u64,
    /// sled's page cache bound. sled holds about three times it (its in-memory pages are
    /// larger than it accounts for), and the OS page cache holds its files anyway: the 16 MiB
    /// default keeps a million active entities under 1 GiB, and a larger cache measured no
    /// faster on cold activations (see ARCHITECTURE.md).
    pub sled_cache_bytes: u64,
    /// At low load (after a round of one commit), the journal writer busy-waits this
    /// long for the next commit, and a commit alone in flight busy-polls this long for its
    /// answer, before they sleep (0: never). Saves two thread wake-ups per commit (tens of
    /// µs each) at low concurrency, for up to this much CPU per commit.
    pub commit_spin_us: u64,
    /// Commits handed to the journal writer and not yet durable, at most.
    pub commits_pending_max: usize,
    /// Largest gRPC request accepted.
    pub message_bytes_max: usize,
    /// How long in-flight RPCs get to finish at shutdown before their connections are closed.
    pub shutdown_timeout_ms: u64,
    /// Restart policies and intensities of entities, shards and the root.
    pub supervision: SupervisionConfig,
}

/// `[supervision]`: how crashes are contained and repaired (see README, "Supervision").
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisionConfig {
    /// Policy and intensity of every entity type without its own entry in `types`.
    pub entity: EntitySupervision,
    /// Per entity type overrides, e.g. `[supervision.types.counter]`.
    pub types: BTreeMap<String, EntitySupervision>,
    /// How long a quarantined entity is refused before the next message tries it again.
    pub quarantine_ms: u64,
    /// Quarantines a shard tolerates within `max_seconds` before it restarts.
    pub shard: ShardSupervision,
    /// Shard restarts (and other child restarts) the root tolerates before the process exits.
    pub root: Intensity,
}

/// Restart policy and intensity of one entity type.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EntitySupervision {
    pub policy: RestartPolicy,
    pub max_restarts: u32,
    pub max_seconds: u64,
}

/// A shard supervisor's intensity and the backoff of its restarts.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShardSupervision {
    pub max_restarts: u32,
    pub max_seconds: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        SupervisionConfig {
            entity: EntitySupervision::default(),
            types: BTreeMap::new(),
            quarantine_ms: 30_000,
            shard: ShardSupervision::default(),
            root: Intensity {
                max_restarts: 3,
                max_seconds: 60,
            },
        }
    }
}

impl Default for EntitySupervision {
    fn default() -> Self {
        EntitySupervision {
            policy: RestartPolicy::Permanent,
            max_restarts: 3,
            max_seconds: 5,
        }
    }
}

impl Default for ShardSupervision {
    fn default() -> Self {
        ShardSupervision {
            max_restarts: 5,
            max_seconds: 60,
            backoff_initial_ms: 100,
            backoff_max_ms: 10_000,
        }
    }
}

impl EntitySupervision {
    pub fn intensity(&self) -> Intensity {
        Intensity {
            max_restarts: self.max_restarts,
            max_seconds: self.max_seconds,
        }
    }
}

impl ShardSupervision {
    pub fn intensity(&self) -> Intensity {
        Intensity {
            max_restarts: self.max_restarts,
            max_seconds: self.max_seconds,
        }
    }

    pub fn backoff(&self) -> Backoff {
        Backoff {
            initial: Duration::from_millis(self.backoff_initial_ms),
            max: Duration::from_millis(self.backoff_max_ms),
            factor: 2.0,
        }
    }
}

impl SupervisionConfig {
    /// The policy and intensity for entities of `entity_type`.
    pub fn for_type(&self, entity_type: &str) -> EntitySupervision {
        self.types.get(entity_type).copied().unwrap_or(self.entity)
    }

    pub fn quarantine(&self) -> Duration {
        Duration::from_millis(self.quarantine_ms)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from("./data"),
            shards: 16,
            durability: Durability::Sync,
            async_sync_window_ms: 100,
            snapshot_every_events: 1000,
            idle_timeout_ms: 60_000,
            hibernate_after_ms: 10_000,
            mailbox_capacity: 1024,
            dedup_window_ms: 3_600_000,
            dedup_per_entity_max: 256,
            dead_letter_after_crashes: 3,
            checkpoint_interval_ms: 5_000,
            checkpoint_journal_bytes: 64 << 20,
            journal_segment_bytes: 64 << 20,
            sled_cache_bytes: 16 << 20,
            commits_pending_max: 65_536,
            commit_spin_us: 250,
            message_bytes_max: 4 << 20,
            shutdown_timeout_ms: 30_000,
            supervision: SupervisionConfig::default(),
        }
    }
}

/// Why the settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{field} = {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl Config {
    /// Reads a TOML config file over the defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    /// Settings that are valid but probably not what was meant, as sentences for the log.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let after = self.dead_letter_after_crashes;
        let mut supervised: Vec<(&str, u32)> =
            vec![("entities", self.supervision.entity.max_restarts)];
        supervised.extend(
            self.supervision
                .types
                .iter()
                .map(|(name, s)| (name.as_str(), s.max_restarts)),
        );
        for (who, max_restarts) in supervised {
            if after > max_restarts {
                warnings.push(format!(
                    "dead_letter_after_crashes = {after} is above max_restarts = {max_restarts} of {who}: \
                     a crash-looping durable message quarantines its entity before it becomes a dead letter"
                ));
            }
        }
        warnings
    }

    /// Checks every bound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, value: &dyn ToString, reason| {
            Err(ConfigError::Invalid {
                field,
                value: value.to_string(),
                reason,
            })
        };
        if self.shards == 0 || self.shards > SHARDS_MAX {
            return invalid("shards", &self.shards, "must be between 1 and 4096");
        }
        if self.mailbox_capacity == 0 {
            return invalid(
                "mailbox_capacity",
                &self.mailbox_capacity,
                "must be at least 1",
            );
        }
        if self.dedup_per_entity_max == 0 {
            return invalid(
                "dedup_per_entity_max",
                &self.dedup_per_entity_max,
                "must be at least 1",
            );
        }
        if self.dead_letter_after_crashes == 0 {
            return invalid(
                "dead_letter_after_crashes",
                &self.dead_letter_after_crashes,
                "must be at least 1",
            );
        }
        if self.idle_timeout_ms == 0 {
            return invalid(
                "idle_timeout_ms",
                &self.idle_timeout_ms,
                "must be at least 1",
            );
        }
        if self.checkpoint_interval_ms == 0 {
            return invalid(
                "checkpoint_interval_ms",
                &self.checkpoint_interval_ms,
                "must be at least 1",
            );
        }
        if self.async_sync_window_ms == 0 {
            return invalid(
                "async_sync_window_ms",
                &self.async_sync_window_ms,
                "must be at least 1",
            );
        }
        if self.checkpoint_journal_bytes < 1 << 20 {
            return invalid(
                "checkpoint_journal_bytes",
                &self.checkpoint_journal_bytes,
                "must be at least 1 MiB",
            );
        }
        if self.journal_segment_bytes < 1 << 20 {
            return invalid(
                "journal_segment_bytes",
                &self.journal_segment_bytes,
                "must be at least 1 MiB",
            );
        }
        if self.commits_pending_max == 0 {
            return invalid(
                "commits_pending_max",
                &self.commits_pending_max,
                "must be at least 1",
            );
        }
        if self.sled_cache_bytes < SLED_CACHE_BYTES_MIN {
            return invalid(
                "sled_cache_bytes",
                &self.sled_cache_bytes,
                "must be at least 1048576 (1 MiB)",
            );
        }
        if self.commit_spin_us > COMMIT_SPIN_US_MAX {
            return invalid(
                "commit_spin_us",
                &self.commit_spin_us,
                "must be at most 10000 (a spin longer than a few fsyncs only burns CPU)",
            );
        }
        if self.message_bytes_max < 1024 {
            return invalid(
                "message_bytes_max",
                &self.message_bytes_max,
                "must be at least 1 KiB",
            );
        }
        if self.supervision.shard.backoff_initial_ms == 0
            || self.supervision.shard.backoff_max_ms < self.supervision.shard.backoff_initial_ms
        {
            return invalid(
                "supervision.shard.backoff_max_ms",
                &self.supervision.shard.backoff_max_ms,
                "backoff_initial_ms must be at least 1 and backoff_max_ms at least backoff_initial_ms",
            );
        }
        Ok(())
    }

    /// The storage layer's settings.
    pub fn store_config(&self) -> StoreConfig {
        StoreConfig {
            data_dir: self.data_dir.clone(),
            shard_count: self.shards,
            durability: self.durability,
            async_sync_window: Duration::from_millis(self.async_sync_window_ms),
            checkpoint_interval: Duration::from_millis(self.checkpoint_interval_ms),
            checkpoint_journal_bytes: self.checkpoint_journal_bytes,
            journal_segment_bytes: self.journal_segment_bytes,
            sled_cache_bytes: self.sled_cache_bytes,
            commits_pending_max: self.commits_pending_max,
            commit_spin: Duration::from_micros(self.commit_spin_us),
        }
    }

    /// Every entity process's settings.
    pub fn entity_config(&self) -> EntityConfig {
        EntityConfig {
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            hibernate_after: Duration::from_millis(self.hibernate_after_ms),
            snapshot_every_events: self.snapshot_every_events,
            mailbox_capacity: self.mailbox_capacity,
            dedup_window: Duration::from_millis(self.dedup_window_ms),
            dedup_per_entity_max: self.dedup_per_entity_max,
            dead_letter_after_crashes: self.dead_letter_after_crashes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_above_the_restart_intensity_are_warned_about() {
        assert!(Config::default().warnings().is_empty());
        let config = Config {
            dead_letter_after_crashes: 5,
            ..Config::default()
        };
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("max_restarts = 3 of entities"),
            "{warnings:?}"
        );
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn file_overrides_defaults_and_refuses_unknown_fields() {
        let config: Config =
            toml::from_str("shards = 4\ndurability = \"async\"\nlisten = \"127.0.0.1:0\"").unwrap();
        assert_eq!(config.shards, 4);
        assert_eq!(config.durability, Durability::Async);
        assert_eq!(
            config.snapshot_every_events,
            Config::default().snapshot_every_events
        );
        assert!(toml::from_str::<Config>("shard = 4").is_err());
    }

    #[test]
    fn supervision_has_per_type_overrides() {
        let config: Config = toml::from_str(
            "[supervision.entity]\nmax_restarts = 7\n[supervision.types.kv]\npolicy = \"temporary\"\nmax_seconds = 9",
        )
        .unwrap();
        let default = config.supervision.for_type("counter");
        assert_eq!(
            (default.policy, default.max_restarts),
            (RestartPolicy::Permanent, 7)
        );
        let kv = config.supervision.for_type("kv");
        assert_eq!(
            (kv.policy, kv.max_restarts, kv.max_seconds),
            (RestartPolicy::Temporary, 3, 9)
        );
    }

    /// Asserts that `config` is refused with an error naming `field`.
    fn assert_refused(config: Config, field: &str) {
        let error = config.validate().expect_err(field).to_string();
        assert!(error.contains(field), "{field}: {error}");
    }

    #[test]
    fn refuses_out_of_range_values() {
        let default = Config::default;
        assert_refused(
            Config {
                shards: 0,
                ..default()
            },
            "shards",
        );
        assert_refused(
            Config {
                mailbox_capacity: 0,
                ..default()
            },
            "mailbox_capacity",
        );
        // Below 1 MiB every round would ask for a checkpoint and stall on a tiny overlay.
        assert_refused(
            Config {
                checkpoint_journal_bytes: 4096,
                ..default()
            },
            "checkpoint_journal_bytes",
        );
        // A spin longer than a few fsyncs only burns CPU.
        assert_refused(
            Config {
                commit_spin_us: COMMIT_SPIN_US_MAX + 1,
                ..default()
            },
            "commit_spin_us",
        );
        assert_refused(
            Config {
                sled_cache_bytes: SLED_CACHE_BYTES_MIN - 1,
                ..default()
            },
            "sled_cache_bytes",
        );
    }

    #[test]
    fn spinning_and_hibernation_reach_the_store_and_the_entities() {
        let config: Config = toml::from_str(
            "commit_spin_us = 0
hibernate_after_ms = 2500",
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.store_config().commit_spin, Duration::ZERO);
        assert_eq!(
            config.entity_config().hibernate_after,
            Duration::from_millis(2500)
        );
        let defaults = Config::default();
        assert_eq!(
            defaults.store_config().commit_spin,
            Duration::from_micros(250)
        );
        assert_eq!(
            defaults.entity_config().hibernate_after,
            Duration::from_secs(10)
        );
    }
}
