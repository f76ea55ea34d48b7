//! The `statehouse bench` command line: [`BenchArgs`] as clap parses it, and [`BenchConfig`],
//! the checked configuration a run uses and its report repeats.
//!
//! Owns every option's default, bound and cross-check (an option that does not apply to the
//! chosen workload is refused, not silently ignored). Calls nothing outside this file.

use std::time::Duration;

use clap::ValueEnum;
use serde_json::{json, Value};

use crate::counter::COUNTER_TYPE;
use crate::kv::KV_TYPE;

use super::BenchError;

/// Keys a workload spreads over when `--keys` is not given.
pub const KEYS_DEFAULT: u64 = 10_000;
/// The most keys a run may address (`get` pre-populates every one of them).
pub const KEYS_MAX: u64 = 1_000_000_000;
/// Requests in flight when `--concurrency` is not given.
pub const CONCURRENCY_DEFAULT: usize = 64;
/// The most requests in flight: each is one task on the client.
pub const CONCURRENCY_MAX: usize = 16_384;
/// The most gRPC channels (TCP connections) a run opens.
pub const CONNECTIONS_MAX: usize = 256;
/// How long the measurement runs when neither `--duration` nor `--requests` is given.
pub const DURATION_DEFAULT: Duration = Duration::from_secs(10);
/// The longest measurement.
pub const DURATION_MAX: Duration = Duration::from_secs(24 * 60 * 60);
/// The longest warm-up.
pub const WARMUP_MAX: Duration = Duration::from_secs(60 * 60);
/// The most requests `--requests` may ask for.
pub const REQUESTS_MAX: u64 = 1_000_000_000_000;
/// The zipfian exponent when `--zipf-exponent` is not given (YCSB's default).
pub const ZIPF_EXPONENT_DEFAULT: f64 = 0.99;
/// The largest zipfian exponent; far beyond it every request goes to one key anyway.
pub const ZIPF_EXPONENT_MAX: f64 = 10.0;
/// The share of `get`s in the `kv` workload when `--read-ratio` is not given.
pub const READ_RATIO_DEFAULT: f64 = 0.9;
/// The longest key prefix: keys are `PREFIX-N`, and the server takes keys up to 1024 bytes.
pub const KEY_PREFIX_BYTES_MAX: usize = 512;
/// The request deadline used when the global `--timeout-ms` is 0 ("none"): a benchmark
/// must end by itself even if the server stops answering.
pub const REQUEST_TIMEOUT_WHEN_NONE: Duration = Duration::from_secs(30);

/// What `--help` adds after the options: the workloads, the report, and examples.
const AFTER_HELP: &str = "\
Workloads:
  incr  counter increments ({\"op\":\"incr\"}) over --keys counters PREFIX-0 … PREFIX-(K-1)
  hot   counter increments of the one counter PREFIX-hot
  kv    one kv map per key; each request reads ({\"op\":\"get\"}) with probability
        --read-ratio, else writes ({\"op\":\"put\"}) one of 8 fields
  get   Get of the committed state of --keys counters, which are incremented once first,
        before the warm-up (not measured)
  lua   increments of --keys counters written in Lua (deployed by the bench if missing)
  lease acquire of --keys leases with a one-hour TTL (fills the durable timer index)
  ping  the server's gRPC health Check: no entity, no journal, no disk; the transport's
        ceiling on this machine, to compare the other workloads with

Each run warms up (not measured), then measures for --duration or until --requests
requests were answered. It reports the exact configuration (as a command line that repeats
it), throughput in successful ops/s, latency in microseconds (p50, p90, p99, p99.9, max)
of successful requests only, and failed requests counted by gRPC code, never as latency.
Each request's deadline is --timeout-ms (0 is taken as 30000: a benchmark always ends).
Exit status 0 unless every request failed (1) or the options were wrong (2).

Examples:
  statehouse bench --workload incr --keys 10000 --concurrency 256
  statehouse bench --workload kv --distribution zipfian --read-ratio 0.5 --json
  statehouse bench --workload hot --concurrency 1 --requests 10000 --warmup 0s";

/// Load-test the server with one workload and print throughput and latency.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct BenchArgs {
    /// What to send (see "Workloads" below).
    #[arg(long, value_enum)]
    pub workload: Workload,

    /// How many keys the requests spread over [default: 10000; not for `hot` or `ping`].
    #[arg(long, value_name = "K")]
    pub keys: Option<u64>,

    /// How keys are picked [default: uniform; not for `hot` or `ping`].
    #[arg(long, value_enum)]
    pub distribution: Option<KeyDistribution>,

    /// The zipfian exponent s: key rank r is picked with weight 1/r^s [default: 0.99;
    /// only with `--distribution zipfian`].
    #[arg(long, value_name = "S")]
    pub zipf_exponent: Option<f64>,

    /// The share of reads in the `kv` workload, 0 to 1 [default: 0.9; only for `kv`].
    #[arg(long, value_name = "RATIO")]
    pub read_ratio: Option<f64>,

    /// Requests in flight at once.
    #[arg(long, value_name = "N", default_value_t = CONCURRENCY_DEFAULT)]
    pub concurrency: usize,

    /// gRPC channels (TCP connections) the requests in flight are spread over.
    #[arg(long, value_name = "C", default_value_t = 1)]
    pub connections: usize,

    /// How long to measure, e.g. `10s`, `300ms`, `2m` [default: 10s].
    #[arg(long, value_parser = parse_duration, conflicts_with = "requests")]
    pub duration: Option<Duration>,

    /// Measure until this many requests were sent and answered, instead of a duration.
    #[arg(long, value_name = "N")]
    pub requests: Option<u64>,

    /// How long to run the workload before measuring (`0s`: no warm-up).
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub warmup: Duration,

    /// Keys are `PREFIX-N` (and `PREFIX-hot` for `hot`).
    #[arg(long, value_name = "PREFIX", default_value = "bench")]
    pub key_prefix: String,

    /// Seed of the key and operation choices [default: random; the report says which].
    #[arg(long)]
    pub seed: Option<u64>,

    /// Send calls on `Pipeline` streams (one per connection, the in-flight calls spread over
    /// them) instead of one unary RPC per call. Not for `get` or `ping`.
    #[arg(long)]
    pub pipeline: bool,

    /// Give every call a fresh request id (idempotency key), as the client library does by
    /// default: measures the cost of storing replies for retries.
    #[arg(long)]
    pub request_ids: bool,

    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
}

/// The request mix a run sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Counter increments over `keys` counters.
    Incr,
    /// Counter increments of one counter.
    Hot,
    /// `get`/`put` calls on `kv` maps, mixed by the read ratio.
    Kv,
    /// `Get` RPCs of the committed state of pre-populated counters.
    Get,
    /// Increments over `keys` counters written in Lua (type `bench_lua`, deployed by the
    /// bench if the server does not have it).
    Lua,
    /// `acquire` of `keys` leases with a one-hour TTL: each lease held keeps one pending
    /// durable timer (its expiry), so this fills the timer index (renewals replace timers).
    Lease,
    /// The server's gRPC health `Check`, which touches no entity and no disk: what the
    /// transport alone costs, the ceiling to compare the other workloads with.
    Ping,
}

/// The entity type of the `lease` workload (the built-in).
pub const LEASE_TYPE: &str = "lease";

/// The entity type of the `lua` workload.
pub const LUA_TYPE: &str = "bench_lua";

impl Workload {
    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Incr => "incr",
            Workload::Hot => "hot",
            Workload::Kv => "kv",
            Workload::Get => "get",
            Workload::Lua => "lua",
            Workload::Lease => "lease",
            Workload::Ping => "ping",
        }
    }

    /// The entity type the workload addresses; `None` for `ping`, which addresses none.
    pub fn entity_type(self) -> Option<&'static str> {
        match self {
            Workload::Incr | Workload::Hot | Workload::Get => Some(COUNTER_TYPE),
            Workload::Kv => Some(KV_TYPE),
            Workload::Lua => Some(LUA_TYPE),
            Workload::Lease => Some(LEASE_TYPE),
            Workload::Ping => None,
        }
    }

    /// Whether the workload addresses keys (all but `hot`, which has one, and `ping`).
    pub fn has_keys(self) -> bool {
        !matches!(self, Workload::Hot | Workload::Ping)
    }
}

/// How a request picks its key among `keys`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyDistribution {
    /// Every key equally likely.
    Uniform,
    /// Key of rank r (key index r-1) with weight 1/r^s: a few hot keys, a long cold tail.
    Zipfian,
}

impl KeyDistribution {
    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            KeyDistribution::Uniform => "uniform",
            KeyDistribution::Zipfian => "zipfian",
        }
    }
}

/// When the measurement ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopAfter {
    /// No new request is sent after this long; those in flight are awaited.
    Duration(Duration),
    /// Exactly this many requests are sent (and answered or failed).
    Requests(u64),
}

/// A checked benchmark configuration: every field within its bound and meaningful for
/// the workload.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchConfig {
    /// The server's URL.
    pub server: String,
    /// The request mix.
    pub workload: Workload,
    /// How many keys the requests spread over (1 for `hot` and `ping`).
    pub keys: u64,
    /// How keys are picked (`uniform` for `hot`, where it does not matter).
    pub distribution: KeyDistribution,
    /// The zipfian exponent, with `zipfian` only.
    pub zipf_exponent: Option<f64>,
    /// The share of reads, with `kv` only.
    pub read_ratio: Option<f64>,
    /// Requests in flight.
    pub concurrency: usize,
    /// gRPC channels the requests are spread over (at most `concurrency`).
    pub connections: usize,
    /// When the measurement ends.
    pub stop_after: StopAfter,
    /// How long the unmeasured warm-up runs.
    pub warmup: Duration,
    /// Keys are `PREFIX-N`.
    pub key_prefix: String,
    /// The seed of every random choice.
    pub seed: u64,
    /// Each request's deadline.
    pub request_timeout: Duration,
    /// Whether to print JSON.
    pub json: bool,
    /// Calls travel on `Pipeline` streams.
    pub pipeline: bool,
    /// Every call carries a fresh request id.
    pub request_ids: bool,
}

impl BenchArgs {
    /// Checks the options and settles the defaults. `server_url` and `timeout_ms` are the
    /// CLI's global `--server` and `--timeout-ms`.
    pub fn into_config(self, server_url: &str, timeout_ms: u64) -> Result<BenchConfig, BenchError> {
        let workload = self.workload;
        let not_for = |option: &str, what: &str| {
            Err(BenchError::Usage(format!(
                "{option} does not apply to --workload {}: {what}",
                workload.name()
            )))
        };
        if !workload.has_keys() {
            let why = if workload == Workload::Hot {
                "it addresses one key"
            } else {
                "it addresses no entity"
            };
            if self.keys.is_some() {
                return not_for("--keys", why);
            }
            if self.distribution.is_some() {
                return not_for("--distribution", why);
            }
        }
        if workload == Workload::Get && self.pipeline {
            return not_for(
                "--pipeline",
                "`Get` is a unary read; `Pipeline` carries calls",
            );
        }
        if workload == Workload::Ping {
            if self.pipeline {
                return not_for("--pipeline", "the health check is a unary RPC");
            }
            if self.request_ids {
                return not_for("--request-ids", "the health check is not a call");
            }
        }
        if workload != Workload::Kv && self.read_ratio.is_some() {
            return not_for("--read-ratio", "only `kv` mixes reads and writes");
        }
        let distribution = self.distribution.unwrap_or(KeyDistribution::Uniform);
        if distribution != KeyDistribution::Zipfian && self.zipf_exponent.is_some() {
            return Err(BenchError::Usage(
                "--zipf-exponent needs --distribution zipfian".to_owned(),
            ));
        }

        let keys = match workload.has_keys() {
            false => 1,
            true => self.keys.unwrap_or(KEYS_DEFAULT),
        };
        check_range("--keys", keys, 1, KEYS_MAX)?;
        let zipf_exponent = match distribution {
            KeyDistribution::Zipfian => {
                let exponent = self.zipf_exponent.unwrap_or(ZIPF_EXPONENT_DEFAULT);
                if !(exponent > 0.0 && exponent <= ZIPF_EXPONENT_MAX) {
                    return Err(BenchError::Usage(format!(
                        "--zipf-exponent {exponent} is out of range: give a number above 0 \
                         and at most {ZIPF_EXPONENT_MAX}"
                    )));
                }
                Some(exponent)
            }
            KeyDistribution::Uniform => None,
        };
        let read_ratio = match workload {
            Workload::Kv => {
                let ratio = self.read_ratio.unwrap_or(READ_RATIO_DEFAULT);
                if !(0.0..=1.0).contains(&ratio) {
                    return Err(BenchError::Usage(format!(
                        "--read-ratio {ratio} is out of range: give a share from 0 to 1"
                    )));
                }
                Some(ratio)
            }
            _ => None,
        };

        check_range("--concurrency", self.concurrency, 1, CONCURRENCY_MAX)?;
        check_range("--connections", self.connections, 1, CONNECTIONS_MAX)?;
        if self.connections > self.concurrency {
            return Err(BenchError::Usage(format!(
                "--connections {} is more than --concurrency {}: a connection with no \
                 request in flight measures nothing",
                self.connections, self.concurrency
            )));
        }

        let stop_after = match (self.duration, self.requests) {
            (Some(_), Some(_)) => {
                return Err(BenchError::Usage(
                    "give --duration or --requests, not both".to_owned(),
                ))
            }
            (_, Some(requests)) => {
                check_range("--requests", requests, 1, REQUESTS_MAX)?;
                StopAfter::Requests(requests)
            }
            (duration, None) => {
                let duration = duration.unwrap_or(DURATION_DEFAULT);
                if duration.is_zero() || duration > DURATION_MAX {
                    return Err(BenchError::Usage(format!(
                        "--duration {} is out of range: give more than 0 and at most {}",
                        format_duration(duration),
                        format_duration(DURATION_MAX)
                    )));
                }
                StopAfter::Duration(duration)
            }
        };
        if self.warmup > WARMUP_MAX {
            return Err(BenchError::Usage(format!(
                "--warmup {} is out of range: at most {}",
                format_duration(self.warmup),
                format_duration(WARMUP_MAX)
            )));
        }

        if self.key_prefix.is_empty() || self.key_prefix.len() > KEY_PREFIX_BYTES_MAX {
            return Err(BenchError::Usage(format!(
                "--key-prefix must be 1 to {KEY_PREFIX_BYTES_MAX} bytes, not {}",
                self.key_prefix.len()
            )));
        }

        let request_timeout = match timeout_ms {
            0 => REQUEST_TIMEOUT_WHEN_NONE,
            ms => Duration::from_millis(ms),
        };

        Ok(BenchConfig {
            server: server_url.to_owned(),
            workload,
            keys,
            distribution,
            zipf_exponent,
            read_ratio,
            concurrency: self.concurrency,
            connections: self.connections,
            stop_after,
            warmup: self.warmup,
            key_prefix: self.key_prefix,
            seed: self.seed.unwrap_or_else(rand::random),
            request_timeout,
            json: self.json,
            pipeline: self.pipeline,
            request_ids: self.request_ids,
        })
    }
}

impl BenchConfig {
    /// The key of index `index` (in `0..keys`).
    pub fn key(&self, index: u64) -> String {
        key_name(self.workload, &self.key_prefix, index)
    }

    /// The `statehouse` command line that repeats this configuration exactly (same seed,
    /// hence the same key choices per request slot).
    pub fn command_line(&self) -> String {
        let mut words = vec![
            "statehouse".to_owned(),
            "--server".to_owned(),
            self.server.clone(),
            "--timeout-ms".to_owned(),
            self.request_timeout.as_millis().to_string(),
            "bench".to_owned(),
            "--workload".to_owned(),
            self.workload.name().to_owned(),
        ];
        let mut option = |name: &str, value: String| {
            words.push(format!("--{name}"));
            words.push(value);
        };
        if self.workload.has_keys() {
            option("keys", self.keys.to_string());
            option("distribution", self.distribution.name().to_owned());
        }
        if let Some(exponent) = self.zipf_exponent {
            option("zipf-exponent", exponent.to_string());
        }
        if let Some(ratio) = self.read_ratio {
            option("read-ratio", ratio.to_string());
        }
        option("concurrency", self.concurrency.to_string());
        option("connections", self.connections.to_string());
        match self.stop_after {
            StopAfter::Duration(duration) => option("duration", format_duration(duration)),
            StopAfter::Requests(requests) => option("requests", requests.to_string()),
        }
        option("warmup", format_duration(self.warmup));
        option("key-prefix", shell_quote(&self.key_prefix));
        option("seed", self.seed.to_string());
        if self.pipeline {
            words.push("--pipeline".to_owned());
        }
        if self.json {
            words.push("--json".to_owned());
        }
        words.join(" ")
    }

    /// The configuration as the JSON report's `config` object.
    pub fn to_json(&self) -> Value {
        let (duration_s, requests) = match self.stop_after {
            StopAfter::Duration(duration) => (Some(duration.as_secs_f64()), None),
            StopAfter::Requests(requests) => (None, Some(requests)),
        };
        json!({
            "server": self.server,
            "workload": self.workload.name(),
            "entity_type": self.workload.entity_type(),
            "keys": self.keys,
            "distribution": self.distribution.name(),
            "zipf_exponent": self.zipf_exponent,
            "read_ratio": self.read_ratio,
            "concurrency": self.concurrency,
            "connections": self.connections,
            "pipeline": self.pipeline,
            "request_ids": self.request_ids,
            "duration_s": duration_s,
            "requests": requests,
            "warmup_s": self.warmup.as_secs_f64(),
            "key_prefix": self.key_prefix,
            "seed": self.seed,
            "request_timeout_ms": u64::try_from(self.request_timeout.as_millis()).unwrap_or(u64::MAX),
            "command": self.command_line(),
        })
    }
}

/// The key of index `index` of a workload: `PREFIX-INDEX`, or `PREFIX-hot` for `hot`.
pub fn key_name(workload: Workload, key_prefix: &str, index: u64) -> String {
    match workload {
        Workload::Hot => format!("{key_prefix}-hot"),
        _ => format!("{key_prefix}-{index}"),
    }
}

/// Refuses `value` outside `min..=max`, naming the option.
fn check_range<T>(option: &str, value: T, min: T, max: T) -> Result<(), BenchError>
where
    T: PartialOrd + std::fmt::Display,
{
    if value < min || value > max {
        return Err(BenchError::Usage(format!(
            "{option} {value} is out of range: give {min} to {max}"
        )));
    }
    Ok(())
}

/// Parses a duration with a unit: `500us`, `300ms`, `1.5s`, `2m`, `1h` (`0s` is zero).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{text:?} has no unit: write e.g. 10s, 300ms, 2m"))?;
    let (number, unit) = text.split_at(split);
    let seconds_per_unit = match unit.trim() {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use us, ms, s, m or h"
            ))
        }
    };
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a number followed by a unit, e.g. 10s"))?;
    Duration::try_from_secs_f64(number * seconds_per_unit)
        .map_err(|err| format!("{text:?} is not a usable duration: {err}"))
}

/// Formats a duration so that [`parse_duration`] reads it back exactly: whole seconds as
/// `10s`, else whole milliseconds as `300ms`, else microseconds.
pub fn format_duration(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{}s", duration.as_secs())
    } else if duration.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", duration.as_millis())
    } else {
        format!("{}us", duration.as_micros())
    }
}

/// Quotes a word for a POSIX shell when it holds anything but safe characters.
fn shell_quote(word: &str) -> String {
    let safe = word
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:=@".contains(c));
    if safe {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Parses `statehouse bench`'s options the way the CLI does.
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(words: &[&str]) -> Result<BenchArgs, clap::Error> {
        let mut argv = vec!["bench"];
        argv.extend_from_slice(words);
        Cli::try_parse_from(argv).map(|cli| cli.args)
    }

    fn config(words: &[&str]) -> Result<BenchConfig, BenchError> {
        parse(words)
            .expect("the words parse")
            .into_config("http://127.0.0.1:1", 30_000)
    }

    fn usage_error(words: &[&str]) -> String {
        match config(words) {
            Err(BenchError::Usage(message)) => message,
            other => panic!("{words:?} should be refused, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_settled() {
        let config = config(&["--workload", "incr", "--seed", "7"]).unwrap();
        assert_eq!(config.keys, KEYS_DEFAULT);
        assert_eq!(config.distribution, KeyDistribution::Uniform);
        assert_eq!(config.zipf_exponent, None);
        assert_eq!(config.read_ratio, None);
        assert_eq!(config.concurrency, 64);
        assert_eq!(config.connections, 1);
        assert_eq!(
            config.stop_after,
            StopAfter::Duration(Duration::from_secs(10))
        );
        assert_eq!(config.warmup, Duration::from_secs(2));
        assert_eq!(config.key_prefix, "bench");
        assert_eq!(config.seed, 7);
        assert_eq!(config.request_timeout, Duration::from_secs(30));

        let kv = self::config(&["--workload", "kv", "--distribution", "zipfian"]).unwrap();
        assert_eq!(kv.read_ratio, Some(READ_RATIO_DEFAULT));
        assert_eq!(kv.zipf_exponent, Some(ZIPF_EXPONENT_DEFAULT));
        assert_eq!(kv.workload.entity_type(), Some("kv"));

        let hot = self::config(&["--workload", "hot"]).unwrap();
        assert_eq!(hot.keys, 1);
        assert_eq!(hot.key(0), "bench-hot");

        let ping = self::config(&["--workload", "ping"]).unwrap();
        assert_eq!(ping.workload.entity_type(), None);
        assert!(!ping.command_line().contains("--keys"), "{ping:?}");
    }

    #[test]
    fn options_that_do_not_apply_are_refused() {
        let message = usage_error(&["--workload", "hot", "--keys", "5"]);
        assert!(
            message.contains("--keys does not apply to --workload hot"),
            "{message}"
        );
        let message = usage_error(&["--workload", "hot", "--distribution", "zipfian"]);
        assert!(message.contains("--distribution"), "{message}");
        let message = usage_error(&["--workload", "incr", "--read-ratio", "0.5"]);
        assert!(message.contains("only `kv`"), "{message}");
        for option in [&["--keys", "5"][..], &["--pipeline"], &["--request-ids"]] {
            let mut words = vec!["--workload", "ping"];
            words.extend_from_slice(option);
            let message = usage_error(&words);
            assert!(
                message.contains(&format!("{} does not apply to --workload ping", option[0])),
                "{message}"
            );
        }
        let message = usage_error(&["--workload", "incr", "--zipf-exponent", "1.2"]);
        assert!(
            message.contains("needs --distribution zipfian"),
            "{message}"
        );
    }

    #[test]
    fn values_out_of_range_are_refused() {
        for (words, expected) in [
            (&["--workload", "incr", "--keys", "0"][..], "--keys 0"),
            (
                &["--workload", "incr", "--concurrency", "0"][..],
                "--concurrency 0",
            ),
            (
                &["--workload", "incr", "--concurrency", "100000"][..],
                "--concurrency",
            ),
            (
                &["--workload", "incr", "--connections", "0"][..],
                "--connections 0",
            ),
            (
                &[
                    "--workload",
                    "incr",
                    "--concurrency",
                    "2",
                    "--connections",
                    "3",
                ][..],
                "more than --concurrency 2",
            ),
            (
                &["--workload", "incr", "--requests", "0"][..],
                "--requests 0",
            ),
            (
                &["--workload", "incr", "--duration", "0s"][..],
                "--duration 0s",
            ),
            (
                &["--workload", "incr", "--duration", "25h"][..],
                "--duration",
            ),
            (&["--workload", "incr", "--warmup", "2h"][..], "--warmup"),
            (
                &["--workload", "incr", "--key-prefix", ""][..],
                "--key-prefix",
            ),
            (
                &["--workload", "kv", "--read-ratio", "1.5"][..],
                "--read-ratio 1.5",
            ),
            (
                &["--workload", "kv", "--read-ratio", "NaN"][..],
                "--read-ratio",
            ),
            (
                &[
                    "--workload",
                    "incr",
                    "--distribution",
                    "zipfian",
                    "--zipf-exponent",
                    "0",
                ][..],
                "--zipf-exponent 0",
            ),
            (
                &[
                    "--workload",
                    "get",
                    "--distribution",
                    "zipfian",
                    "--zipf-exponent",
                    "inf",
                ][..],
                "--zipf-exponent",
            ),
        ] {
            let message = usage_error(words);
            assert!(message.contains(expected), "{words:?}: {message}");
        }
        let long_prefix = "p".repeat(KEY_PREFIX_BYTES_MAX + 1);
        let message = usage_error(&["--workload", "incr", "--key-prefix", &long_prefix]);
        assert!(message.contains("--key-prefix"), "{message}");
    }

    #[test]
    fn clap_refuses_what_cannot_parse() {
        assert!(parse(&[]).is_err(), "--workload is required");
        assert!(parse(&["--workload", "sql"]).is_err());
        assert!(parse(&["--workload", "incr", "--duration", "10"]).is_err());
        assert!(parse(&["--workload", "incr", "--duration", "1s", "--requests", "5"]).is_err());
        assert!(parse(&["--workload", "incr", "--keys", "-1"]).is_err());
    }

    #[test]
    fn durations_parse_with_units_and_round_trip() {
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "10", "s", "10 parsecs", "1.2.3s", "-1s", "1e3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
        for duration in [
            Duration::ZERO,
            Duration::from_secs(10),
            Duration::from_millis(300),
            Duration::from_millis(1500),
            Duration::from_micros(1_000_250),
        ] {
            assert_eq!(parse_duration(&format_duration(duration)), Ok(duration));
        }
    }

    #[test]
    fn the_command_line_repeats_the_configuration() {
        let original = config(&[
            "--workload",
            "kv",
            "--keys",
            "20",
            "--distribution",
            "zipfian",
            "--zipf-exponent",
            "1.1",
            "--read-ratio",
            "0.25",
            "--concurrency",
            "8",
            "--connections",
            "2",
            "--requests",
            "500",
            "--warmup",
            "100ms",
            "--key-prefix",
            "it's",
            "--seed",
            "42",
            "--json",
        ])
        .unwrap();
        let line = original.command_line();
        assert!(
            line.starts_with("statehouse --server http://127.0.0.1:1 --timeout-ms 30000 bench "),
            "{line}"
        );
        assert!(line.contains(r"--key-prefix 'it'\''s'"), "{line}");
        // Splitting on spaces works here because only the quoted prefix needs quoting and
        // it has no space; unquote it by hand.
        let words: Vec<String> = line
            .split(' ')
            .skip(6)
            .map(|word| word.replace(r"'\''", "'").trim_matches('\'').to_owned())
            .collect();
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let again = parse(&words)
            .unwrap()
            .into_config("http://127.0.0.1:1", 30_000);
        assert_eq!(again.unwrap(), original);
    }

    #[test]
    fn the_config_json_names_every_field() {
        let config = config(&["--workload", "incr", "--requests", "9", "--seed", "3"]).unwrap();
        let json = config.to_json();
        assert_eq!(json["workload"], "incr");
        assert_eq!(json["entity_type"], "counter");
        assert_eq!(json["keys"], 10_000);
        assert_eq!(json["requests"], 9);
        assert_eq!(json["duration_s"], Value::Null);
        assert_eq!(json["warmup_s"], 2.0);
        assert_eq!(json["seed"], 3);
        assert_eq!(json["request_timeout_ms"], 30_000);
        assert_eq!(json["command"], config.command_line());
    }

    #[test]
    fn a_zero_timeout_still_bounds_every_request() {
        let config = parse(&["--workload", "get"])
            .unwrap()
            .into_config("http://x:1", 0)
            .unwrap();
        assert_eq!(config.request_timeout, REQUEST_TIMEOUT_WHEN_NONE);
    }
}
