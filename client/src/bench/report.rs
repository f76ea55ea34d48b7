//! What a run measured: [`Recorder`] collects outcomes while requests complete, and
//! [`BenchReport`] summarises them as text for people or one JSON object for scripts.
//!
//! Only successful requests enter the latency histogram; failures are counted by gRPC code
//! (with the first message seen for each code), so a fast stream of errors can never make
//! the latency look good. Calls nothing but `hdrhistogram` and the config's own rendering.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tonic::Code;

use super::args::{format_duration, BenchConfig, StopAfter, Workload};
use crate::error::code_name;

/// The largest latency the histogram tells apart, in microseconds (one hour); longer ones
/// are recorded as this.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;

/// Significant decimal digits the histogram keeps: values are exact to 0.1%.
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

/// The longest error message kept per code, in bytes.
const ERROR_MESSAGE_BYTES_MAX: usize = 512;

/// Failures of one gRPC code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorTally {
    /// The gRPC code.
    pub code: Code,
    /// How many requests failed with this code.
    pub count: u64,
    /// The message of the first of them (cut to a bounded length).
    pub first_message: String,
}

/// Outcomes of the requests of one phase, as they complete.
#[derive(Debug)]
pub struct Recorder {
    latency_us: Histogram<u64>,
    errors: BTreeMap<&'static str, ErrorTally>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Recorder {
        let latency_us = Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGNIFICANT_DIGITS)
            // The bounds are constants that hdrhistogram accepts (low ≥ 1, high ≥ 2·low,
            // digits ≤ 5); this cannot fail at run time.
            .expect("valid histogram bounds");
        Recorder {
            latency_us,
            errors: BTreeMap::new(),
        }
    }

    /// Records one successful request and how long it took.
    pub fn record_ok(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.saturating_record(micros);
    }

    /// Records one failed request.
    pub fn record_error(&mut self, code: Code, message: &str) {
        let tally = self
            .errors
            .entry(code_name(code))
            .or_insert_with(|| ErrorTally {
                code,
                count: 0,
                first_message: truncate(message, ERROR_MESSAGE_BYTES_MAX),
            });
        tally.count += 1;
    }

    /// Successful requests so far.
    pub fn ok(&self) -> u64 {
        self.latency_us.len()
    }

    /// Failed requests so far.
    pub fn errors_total(&self) -> u64 {
        self.errors.values().map(|tally| tally.count).sum()
    }
}

/// The latency of successful requests, in microseconds. All zero when none succeeded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    /// The fastest.
    pub min: u64,
    /// The mean.
    pub mean: f64,
    /// The median.
    pub p50: u64,
    /// The 90th percentile.
    pub p90: u64,
    /// The 99th percentile.
    pub p99: u64,
    /// The 99.9th percentile.
    pub p999: u64,
    /// The slowest.
    pub max: u64,
}

impl LatencySummary {
    fn of(histogram: &Histogram<u64>) -> LatencySummary {
        if histogram.is_empty() {
            return LatencySummary {
                min: 0,
                mean: 0.0,
                p50: 0,
                p90: 0,
                p99: 0,
                p999: 0,
                max: 0,
            };
        }
        LatencySummary {
            min: histogram.min(),
            mean: histogram.mean(),
            p50: histogram.value_at_quantile(0.5),
            p90: histogram.value_at_quantile(0.9),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
        }
    }
}

/// The result of one benchmark run.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// The configuration that ran.
    pub config: BenchConfig,
    /// How long the measurement took, from its first request to its last answer.
    pub elapsed: Duration,
    /// Successful requests measured.
    pub count: u64,
    /// Failed requests measured, by gRPC code name.
    pub errors: BTreeMap<&'static str, ErrorTally>,
    /// The latency of the successful requests.
    pub latency_us: LatencySummary,
}

impl BenchReport {
    /// Summarises a measurement phase.
    pub fn new(config: BenchConfig, recorder: &Recorder, elapsed: Duration) -> BenchReport {
        BenchReport {
            config,
            elapsed,
            count: recorder.ok(),
            errors: recorder.errors.clone(),
            latency_us: LatencySummary::of(&recorder.latency_us),
        }
    }

    /// Successful requests per second of measurement.
    pub fn ops_per_s(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.count as f64 / seconds
        } else {
            0.0
        }
    }

    /// Failed requests measured.
    pub fn errors_total(&self) -> u64 {
        self.errors.values().map(|tally| tally.count).sum()
    }

    /// The failures of the code most requests failed with, if any failed.
    pub fn most_common_error(&self) -> Option<&ErrorTally> {
        self.errors.values().max_by_key(|tally| tally.count)
    }

    /// The report as one JSON object. Every field is always present; latencies are whole
    /// microseconds (the mean has a fraction).
    pub fn to_json(&self) -> Value {
        let errors: serde_json::Map<String, Value> = self
            .errors
            .iter()
            .map(|(code, tally)| ((*code).to_owned(), json!(tally.count)))
            .collect();
        let error_messages: serde_json::Map<String, Value> = self
            .errors
            .iter()
            .map(|(code, tally)| ((*code).to_owned(), json!(tally.first_message)))
            .collect();
        let latency = &self.latency_us;
        json!({
            "workload": self.config.workload.name(),
            "config": self.config.to_json(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "count": self.count,
            "ops_per_s": self.ops_per_s(),
            "errors_total": self.errors_total(),
            "errors": errors,
            "error_messages": error_messages,
            "latency_us": {
                "min": latency.min,
                "mean": latency.mean,
                "p50": latency.p50,
                "p90": latency.p90,
                "p99": latency.p99,
                "p999": latency.p999,
                "max": latency.max,
            },
        })
    }

    /// The report as text for a person, ending with a newline.
    pub fn to_text(&self) -> String {
        let config = &self.config;
        let mut text = String::new();
        let keys = match config.zipf_exponent {
            _ if config.workload == Workload::Ping => "no key".to_owned(),
            _ if config.keys == 1 => "1 key".to_owned(),
            Some(exponent) => format!("{} keys, zipfian s={exponent}", config.keys),
            None => format!("{} keys, {}", config.keys, config.distribution.name()),
        };
        let mix = match config.read_ratio {
            Some(ratio) => format!(", {:.0}% reads", ratio * 100.0),
            None => String::new(),
        };
        let stop = match config.stop_after {
            StopAfter::Duration(duration) => format!("for {}", format_duration(duration)),
            StopAfter::Requests(requests) => format!("{requests} requests"),
        };
        // Writing to a String cannot fail.
        let _ =
            writeln!(
            text,
            "{} on {} ({keys}{mix}): {} in flight over {} connection{}, {stop} after a {} warm-up",
            config.workload.name(),
            config.workload.entity_type().unwrap_or("the health service"),
            config.concurrency,
            config.connections,
            if config.connections == 1 { "" } else { "s" },
            format_duration(config.warmup),
        );
        let _ = writeln!(text, "  command     {}", config.command_line());
        let _ = writeln!(
            text,
            "  requests    {} ok, {} failed in {:.3} s",
            self.count,
            self.errors_total(),
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(text, "  throughput  {:.0} ops/s", self.ops_per_s());
        let latency = &self.latency_us;
        let _ = writeln!(
            text,
            "  latency µs  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (min {}, mean {:.0})",
            latency.p50,
            latency.p90,
            latency.p99,
            latency.p999,
            latency.max,
            latency.min,
            latency.mean
        );
        if self.errors.is_empty() {
            let _ = writeln!(text, "  errors      none");
        } else {
            for (code, tally) in &self.errors {
                let _ = writeln!(
                    text,
                    "  errors      {code} ×{}: {}",
                    tally.count, tally.first_message
                );
            }
        }
        text
    }
}

/// `text` cut to at most `bytes_max` bytes at a character boundary, marked with `…`.
fn truncate(text: &str, bytes_max: usize) -> String {
    if text.len() <= bytes_max {
        return text.to_owned();
    }
    let mut end = bytes_max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::args::{KeyDistribution, Workload};

    fn config() -> BenchConfig {
        BenchConfig {
            server: "http://127.0.0.1:50051".to_owned(),
            workload: Workload::Kv,
            keys: 100,
            distribution: KeyDistribution::Zipfian,
            zipf_exponent: Some(0.99),
            read_ratio: Some(0.9),
            concurrency: 64,
            connections: 2,
            stop_after: StopAfter::Duration(Duration::from_secs(10)),
            warmup: Duration::from_secs(2),
            key_prefix: "bench".to_owned(),
            seed: 5,
            request_timeout: Duration::from_secs(30),
            json: true,
            pipeline: false,
            request_ids: false,
        }
    }

    #[test]
    fn percentiles_come_from_successes_only() {
        let mut recorder = Recorder::new();
        for micros in 1..=1000 {
            recorder.record_ok(Duration::from_micros(micros));
        }
        recorder.record_error(Code::Unavailable, "server gone");
        recorder.record_error(Code::Unavailable, "second message is not kept");
        recorder.record_error(Code::ResourceExhausted, "mailbox full");
        assert_eq!(recorder.ok(), 1000);
        assert_eq!(recorder.errors_total(), 3);

        let report = BenchReport::new(config(), &recorder, Duration::from_secs(2));
        assert_eq!(report.count, 1000);
        assert_eq!(report.ops_per_s(), 500.0);
        let latency = report.latency_us;
        assert_eq!(latency.min, 1);
        assert_eq!(latency.p50, 500);
        assert_eq!(latency.p90, 900);
        assert_eq!(latency.p99, 990);
        assert_eq!(latency.p999, 999);
        assert_eq!(latency.max, 1000);
        assert!((latency.mean - 500.5).abs() < 0.5, "{}", latency.mean);
        assert_eq!(report.errors_total(), 3);
        let tally = report.most_common_error().unwrap();
        assert_eq!(tally.code, Code::Unavailable);
        assert_eq!(tally.count, 2);
        assert_eq!(tally.first_message, "server gone");
    }

    #[test]
    fn json_has_every_field() {
        let mut recorder = Recorder::new();
        recorder.record_ok(Duration::from_micros(120));
        recorder.record_ok(Duration::from_millis(3));
        recorder.record_error(Code::DeadlineExceeded, "too slow");
        let json = BenchReport::new(config(), &recorder, Duration::from_millis(500)).to_json();
        assert_eq!(json["workload"], "kv");
        assert_eq!(json["config"]["concurrency"], 64);
        assert_eq!(json["config"]["connections"], 2);
        assert_eq!(json["config"]["zipf_exponent"], 0.99);
        assert_eq!(json["config"]["read_ratio"], 0.9);
        assert_eq!(json["config"]["duration_s"], 10.0);
        assert_eq!(json["elapsed_s"], 0.5);
        assert_eq!(json["count"], 2);
        assert_eq!(json["ops_per_s"], 4.0);
        assert_eq!(json["errors_total"], 1);
        assert_eq!(json["errors"], json!({"DEADLINE_EXCEEDED": 1}));
        assert_eq!(
            json["error_messages"],
            json!({"DEADLINE_EXCEEDED": "too slow"})
        );
        let latency = &json["latency_us"];
        assert_eq!(latency["min"], 120);
        assert_eq!(latency["p50"], 120);
        // 3 ms = 3000 µs, exact to 3 significant digits.
        let max = latency["max"].as_u64().unwrap();
        assert!((2997..=3003).contains(&max), "{max}");
        for field in ["p90", "p99", "p999", "mean"] {
            assert!(latency[field].is_number(), "{field}: {latency}");
        }
    }

    #[test]
    fn an_empty_run_reports_zeros_not_garbage() {
        let report = BenchReport::new(config(), &Recorder::new(), Duration::ZERO);
        assert_eq!(report.ops_per_s(), 0.0);
        assert_eq!(report.latency_us.max, 0);
        assert_eq!(report.most_common_error(), None);
        let text = report.to_text();
        assert!(text.contains("0 ok, 0 failed"), "{text}");
    }

    #[test]
    fn text_names_the_configuration_and_the_errors() {
        let mut recorder = Recorder::new();
        recorder.record_ok(Duration::from_micros(800));
        recorder.record_error(Code::ResourceExhausted, "mailbox full");
        let text = BenchReport::new(config(), &recorder, Duration::from_secs(1)).to_text();
        assert!(
            text.starts_with(
                "kv on kv (100 keys, zipfian s=0.99, 90% reads): 64 in flight over 2 \
                 connections, for 10s after a 2s warm-up\n"
            ),
            "{text}"
        );
        assert!(text.contains("command     statehouse --server"), "{text}");
        assert!(text.contains("throughput  1 ops/s"), "{text}");
        assert!(text.contains("p50 800"), "{text}");
        assert!(
            text.contains("RESOURCE_EXHAUSTED ×1: mailbox full"),
            "{text}"
        );
    }

    #[test]
    fn latencies_beyond_the_bound_are_clamped() {
        let mut recorder = Recorder::new();
        recorder.record_ok(Duration::from_secs(10 * 3600));
        let report = BenchReport::new(config(), &recorder, Duration::from_secs(1));
        assert!(
            report.latency_us.max >= LATENCY_US_MAX,
            "{:?}",
            report.latency_us
        );
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let message = "é".repeat(ERROR_MESSAGE_BYTES_MAX);
        let cut = truncate(&message, ERROR_MESSAGE_BYTES_MAX);
        assert!(cut.len() <= ERROR_MESSAGE_BYTES_MAX + "…".len());
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("short", 10), "short");
    }
}
