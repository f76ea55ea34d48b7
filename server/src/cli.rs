//! The command line of `statehouse-server`: flags, logging, the runtime.
//!
//! Embedders reuse it whole: build a [`BehaviourRegistry`] with their own Rust behaviours and
//! call [`main`] from their binary's `main` to get the same flags, config file, logging and
//! signal handling as `statehouse-server` (see README, "Embedding").

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::behaviour::BehaviourRegistry;
use crate::config::{Config, ConfigError};
use crate::server::{run_until_signalled, Server};
use crate::stats::AllocatorProbe;
use crate::storage::Durability;
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// statehouse: a persistent state-service database server.
///
/// Settings come from built-in defaults, then `--config FILE` (TOML, same names with
/// underscores), then these flags. Logs go to stderr; RUST_LOG filters them (default: info).
#[derive(Debug, Parser)]
#[command(name = "statehouse-server", version)]
pub struct Flags {
    /// TOML config file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port; the log says which) [default: 127.0.0.1:50051].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Data directory [default: ./data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Shard count for a new data dir; an existing one keeps its own [default: 16].
    #[arg(long, value_name = "N")]
    shards: Option<u32>,
    /// sync: reply after fdatasync; async: reply after write, sync within the window [default: sync].
    #[arg(long, value_enum)]
    durability: Option<DurabilityFlag>,
    /// With --durability async, the longest wait for fdatasync [default: 100].
    #[arg(long, value_name = "MS")]
    async_sync_window_ms: Option<u64>,
    /// Snapshot an entity every N events; 0 never [default: 1000].
    #[arg(long, value_name = "N")]
    snapshot_every_events: Option<u64>,
    /// Passivate an entity after this long without messages [default: 60000].
    #[arg(long, value_name = "MS")]
    idle_timeout_ms: Option<u64>,
    /// An entity without messages this long gives up its task but stays active; 0 never
    /// [default: 10000].
    #[arg(long, value_name = "MS")]
    hibernate_after_ms: Option<u64>,
    /// Messages an entity's mailbox holds before RESOURCE_EXHAUSTED [default: 1024].
    #[arg(long, value_name = "N")]
    mailbox_capacity: Option<usize>,
    /// How long a request id's reply is kept for retries [default: 3600000].
    #[arg(long, value_name = "MS")]
    dedup_window_ms: Option<u64>,
    /// Crashes after which a durable message becomes a dead letter [default: 3].
    #[arg(long, value_name = "N")]
    dead_letter_after_crashes: Option<u32>,
    /// Checkpoint at least this often [default: 5000].
    #[arg(long, value_name = "MS")]
    checkpoint_interval_ms: Option<u64>,
    /// Checkpoint after this many journal bytes [default: 67108864].
    #[arg(long, value_name = "BYTES")]
    checkpoint_journal_bytes: Option<u64>,
    /// sled's page cache bound; sled holds about three times it [default: 16777216].
    #[arg(long, value_name = "BYTES")]
    sled_cache_bytes: Option<u64>,
    /// At low load, the journal writer and a lone commit busy-wait this long before they
    /// sleep; 0 never [default: 250].
    #[arg(long, value_name = "US")]
    commit_spin_us: Option<u64>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DurabilityFlag {
    Sync,
    Async,
}

impl Flags {
    /// The configuration these flags describe: defaults, then the file, then the flags.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        fn set<T>(slot: &mut T, flag: Option<T>) {
            if let Some(value) = flag {
                *slot = value;
            }
        }
        set(&mut config.listen, self.listen);
        set(&mut config.data_dir, self.data_dir);
        set(&mut config.shards, self.shards);
        set(
            &mut config.durability,
            self.durability.map(|d| match d {
                DurabilityFlag::Sync => Durability::Sync,
                DurabilityFlag::Async => Durability::Async,
            }),
        );
        set(&mut config.async_sync_window_ms, self.async_sync_window_ms);
        set(
            &mut config.snapshot_every_events,
            self.snapshot_every_events,
        );
        set(&mut config.idle_timeout_ms, self.idle_timeout_ms);
        set(&mut config.hibernate_after_ms, self.hibernate_after_ms);
        set(&mut config.mailbox_capacity, self.mailbox_capacity);
        set(&mut config.dedup_window_ms, self.dedup_window_ms);
        set(
            &mut config.dead_letter_after_crashes,
            self.dead_letter_after_crashes,
        );
        set(
            &mut config.checkpoint_interval_ms,
            self.checkpoint_interval_ms,
        );
        set(&mut config.commit_spin_us, self.commit_spin_us);
        set(&mut config.sled_cache_bytes, self.sled_cache_bytes);
        set(
            &mut config.checkpoint_journal_bytes,
            self.checkpoint_journal_bytes,
        );
        config.validate()?;
        Ok(config)
    }
}

/// Parses the command line and runs a server with `registry` until SIGTERM or Ctrl-C.
/// Exit status: 0 after a graceful shutdown, 2 for invalid settings, 1 otherwise (including
/// when the root supervisor gave up).
pub fn main(registry: BehaviourRegistry) -> ExitCode {
    run_main(Server::with_registry, registry)
}

/// [`main`], with the global allocator's figures in the server's stats (`statehouse stats`)
/// read through `probe`.
pub fn main_with_allocator_probe(registry: BehaviourRegistry, probe: AllocatorProbe) -> ExitCode {
    run_main(
        |config, registry| Server::with_registry(config, registry).with_allocator_probe(probe),
        registry,
    )
}

fn run_main(
    build: impl FnOnce(Config, BehaviourRegistry) -> Server,
    registry: BehaviourRegistry,
) -> ExitCode {
    let flags = Flags::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = match flags.into_config() {
        Ok(config) => config,
        Err(error) => {
            tracing::error!("invalid configuration: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_until_signalled(build(config, registry))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_of(args: &[&str]) -> Config {
        let flags =
            Flags::try_parse_from(std::iter::once("statehouse-server").chain(args.iter().copied()))
                .unwrap();
        flags.into_config().unwrap()
    }

    #[test]
    fn flags_override_defaults_and_the_file() {
        assert_eq!(config_of(&[]).sled_cache_bytes, 16 << 20);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("statehouse.toml");
        std::fs::write(&file, "sled_cache_bytes = 1048576\ncommit_spin_us = 7\n").unwrap();
        let file = file.to_str().unwrap();
        let from_file = config_of(&["--config", file]);
        assert_eq!(
            (from_file.sled_cache_bytes, from_file.commit_spin_us),
            (1 << 20, 7)
        );
        let flagged = config_of(&["--config", file, "--sled-cache-bytes", "2097152"]);
        assert_eq!(
            (flagged.sled_cache_bytes, flagged.commit_spin_us),
            (2 << 20, 7)
        );
    }
}
