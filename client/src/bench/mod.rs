//! `statehouse bench`: a load generator for a statehouse server, in the manner of
//! `redis-benchmark`. It keeps a fixed number of requests in flight, warms up, measures, and
//! reports throughput and latency percentiles, with failures counted by gRPC code apart
//! from latency.
//!
//! # Layout
//!
//! - [`args`]: the command line ([`BenchArgs`]) and the checked [`BenchConfig`].
//! - [`keys`]: [`keys::KeyChooser`], uniform and zipfian key choice.
//! - [`driver`]: the channels, the request slots and one phase of load.
//! - [`report`]: the [`report::Recorder`] and the [`BenchReport`] (text and JSON).
//!
//! This module runs them in order ([`run`]) and is what the CLI calls ([`run_command`]).
//! It may call the rest of the crate ([`Client`], the error type); nothing in the crate
//! calls it but the CLI.
//!
//! # A run
//!
//! 1. The options are checked before connecting, so a typo is reported as such even when
//!    no server runs.
//! 2. [`Client::connect`] checks the URL and reaches the server; then the load's own
//!    `--connections` channels are opened.
//! 3. `get` only: every key is incremented once, so there is committed state to read
//!    (not measured).
//! 4. The workload runs for `--warmup` (not measured): entities activate, the server's
//!    caches and HTTP/2 windows settle.
//! 5. The workload runs again, measured, until `--duration` has passed or `--requests`
//!    were answered; requests in flight at the end are awaited and counted.
//! 6. The report is printed; the run fails (exit 1) only if every measured request failed.
//!
//! # What bounds the numbers
//!
//! Client and server usually share the machine, so every microsecond of client CPU is one
//! the server does not get: the client runs on the CLI's single thread and skips JSON on the
//! hot path. A unary call costs a few µs of HTTP/2 framing on each side; a durable `incr` also
//! waits for a group commit (one `fdatasync`, ~150 µs, shared by every call in its batch), so
//! with N in flight the commit batches hold up to N calls and throughput ≈ N / latency.

pub mod args;
pub mod driver;
pub mod keys;
pub mod report;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tokio::task::JoinSet;

use crate::counter::COUNTER_TYPE;
use crate::{Client, ClientError};

pub use args::{BenchArgs, BenchConfig, KeyDistribution, StopAfter, Workload, LUA_TYPE};
pub use report::BenchReport;

use args::{format_duration, key_name};
use driver::{open_channels, run_phase, run_phase_pipelined, Limit, Plan};

/// Added to the seed for the warm-up's slots, so the measurement's slots use the seed the
/// report names and a rerun with `--seed` repeats their key choices.
const WARMUP_SEED_OFFSET: u64 = 1 << 40;

/// Why a benchmark could not run or report.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The options are wrong; nothing was sent.
    #[error("{0}")]
    Usage(String),
    /// The server could not be reached, the preparation failed, or every measured
    /// request failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The report could not be written.
    #[error("cannot write the report: {0}")]
    Output(std::io::Error),
}

/// Runs `statehouse bench`: checks the options, runs the benchmark against `server_url`
/// (`timeout_ms` is the CLI's per-request deadline) and prints the report on stdout, as
/// text or, with `--json`, as one JSON object on one line.
pub async fn run_command(
    args: BenchArgs,
    server_url: &str,
    timeout_ms: u64,
) -> Result<(), BenchError> {
    let config = args.into_config(server_url, timeout_ms)?;
    if !config.json {
        let stop = match config.stop_after {
            StopAfter::Duration(duration) => format!("measuring for {}", format_duration(duration)),
            StopAfter::Requests(requests) => format!("measuring {requests} requests"),
        };
        // Progress goes to stderr so stdout holds the report alone; a closed stderr is no
        // reason to stop.
        let _ = writeln!(
            std::io::stderr(),
            "bench {} against {}: warming up for {}, then {stop}…",
            config.workload.name(),
            config.server,
            format_duration(config.warmup)
        );
    }
    let report = run(&config).await?;
    let text = if config.json {
        format!("{}\n", report.to_json())
    } else {
        report.to_text()
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(BenchError::Output)?;
    match report.most_common_error() {
        Some(tally) if report.count == 0 => Err(BenchError::Client(ClientError::Status {
            code: tally.code,
            message: format!(
                "all {} measured requests failed; the first with this code said: {}",
                report.errors_total(),
                tally.first_message
            ),
        })),
        _ => Ok(()),
    }
}

/// Runs the benchmark `config` describes and returns its report.
pub async fn run(config: &BenchConfig) -> Result<BenchReport, BenchError> {
    let client = Client::connect(config.server.clone())
        .await?
        .with_timeout(config.request_timeout);
    let channels = open_channels(&config.server, config.connections).await?;
    if config.workload == Workload::Get {
        prepopulate_counters(&client, config).await?;
    }
    if config.workload == Workload::Lua {
        deploy_lua_counter(&client).await?;
    }
    let plan = Arc::new(Plan::new(config));
    let phase = |limit: Limit, seed: u64| {
        let (channels, plan) = (&channels, &plan);
        async move {
            if config.pipeline {
                run_phase_pipelined(channels, plan, config.concurrency, limit, seed).await
            } else {
                run_phase(channels, plan, config.concurrency, limit, seed).await
            }
        }
    };
    if !config.warmup.is_zero() {
        let until = Limit::Until(Instant::now() + config.warmup);
        phase(until, config.seed.wrapping_add(WARMUP_SEED_OFFSET)).await;
    }
    let limit = match config.stop_after {
        StopAfter::Duration(duration) => Limit::Until(Instant::now() + duration),
        StopAfter::Requests(requests) => Limit::count(requests),
    };
    let (recorder, elapsed) = phase(limit, config.seed).await;
    Ok(BenchReport::new(config.clone(), &recorder, elapsed))
}

/// The script of the `lua` workload.
pub const LUA_COUNTER_SCRIPT: &str = include_str!("lua_counter.lua");

/// Deploys the `lua` workload's counter unless the server already has the type.
async fn deploy_lua_counter(client: &Client) -> Result<(), BenchError> {
    let deployed = client.list_behaviours().await?;
    if !deployed.iter().any(|behaviour| behaviour.name == LUA_TYPE) {
        client
            .deploy_behaviour(LUA_TYPE, LUA_COUNTER_SCRIPT)
            .await?;
    }
    Ok(())
}

/// Increments every counter of the run once, `concurrency` at a time, so `get` reads
/// committed state. Stops at the first failure, naming the key.
async fn prepopulate_counters(client: &Client, config: &BenchConfig) -> Result<(), BenchError> {
    let next_index = Arc::new(AtomicU64::new(0));
    let keys = config.keys;
    let workers =
        usize::try_from(keys).map_or(config.concurrency, |keys| keys.min(config.concurrency));
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let client = client.clone();
        let next_index = Arc::clone(&next_index);
        let (workload, key_prefix) = (config.workload, config.key_prefix.clone());
        tasks.spawn(async move {
            loop {
                let index = next_index.fetch_add(1, Ordering::Relaxed);
                if index >= keys {
                    return Ok(());
                }
                let key = key_name(workload, &key_prefix, index);
                let incr = json!({"op": "incr"});
                if let Err(err) = client.call(COUNTER_TYPE, &key, incr).await {
                    return Err(ClientError::Status {
                        code: err.code(),
                        message: format!("pre-populating {COUNTER_TYPE} {key}: {err}"),
                    });
                }
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(outcome) => outcome?,
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            // Tasks are only cancelled when this set is dropped, which has not happened.
            Err(_) => {}
        }
    }
    Ok(())
}
