//! `statehouse bench` against a real server: every workload runs a tiny configuration and
//! reports sane numbers, a count-bounded run sends exactly its count, and bad options are
//! refused before anything is sent. These check that the bench reports, not how fast.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::Value;
use statehouse_tests::{cli_bin, noop_server_bin, parse_listening, TestServer};

/// The options every smoke run shares: short, small, JSON.
const SMOKE: &[&str] = &[
    "--duration",
    "300ms",
    "--warmup",
    "100ms",
    "--concurrency",
    "4",
    "--json",
];

/// Checks the fields every report has: a measured count, no errors, a positive
/// throughput, and percentiles in order.
fn check_report(report: &Value, workload: &str) {
    let context = format!("{workload}: {report:#}");
    assert_eq!(report["workload"], workload, "{context}");
    assert_eq!(report["config"]["workload"], workload, "{context}");
    assert!(
        report["config"]["command"]
            .as_str()
            .is_some_and(|command| command.contains("bench --workload")),
        "{context}"
    );
    let count = report["count"].as_u64().expect("count");
    assert!(count > 0, "{context}");
    assert_eq!(report["errors_total"], 0, "{context}");
    assert_eq!(report["errors"], serde_json::json!({}), "{context}");
    assert!(
        report["elapsed_s"].as_f64().expect("elapsed_s") > 0.0,
        "{context}"
    );
    assert!(
        report["ops_per_s"].as_f64().expect("ops_per_s") > 0.0,
        "{context}"
    );
    let latency = &report["latency_us"];
    let percentiles: Vec<u64> = ["min", "p50", "p90", "p99", "p999", "max"]
        .iter()
        .map(|field| {
            latency[field]
                .as_u64()
                .unwrap_or_else(|| panic!("latency_us.{field} missing: {context}"))
        })
        .collect();
    assert!(
        percentiles.windows(2).all(|pair| pair[0] <= pair[1]),
        "percentiles out of order: {context}"
    );
    assert!(percentiles[5] > 0, "{context}");
    let mean = latency["mean"].as_f64().expect("latency_us.mean");
    assert!(
        (percentiles[0] as f64..=percentiles[5] as f64).contains(&mean),
        "{context}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_workload_reports_throughput_and_ordered_percentiles() {
    let server = TestServer::start();
    for (workload, extra) in [
        ("incr", &["--keys", "20", "--key-prefix", "smoke-incr"][..]),
        ("hot", &["--key-prefix", "smoke-hot"][..]),
        (
            "kv",
            &[
                "--keys",
                "20",
                "--distribution",
                "zipfian",
                "--connections",
                "2",
                "--key-prefix",
                "smoke-kv",
            ][..],
        ),
        ("get", &["--keys", "20", "--key-prefix", "smoke-get"][..]),
        ("lua", &["--keys", "20", "--key-prefix", "smoke-lua"][..]),
        ("ping", &[][..]),
    ] {
        let mut args = vec!["bench", "--workload", workload];
        args.extend_from_slice(SMOKE);
        args.extend_from_slice(extra);
        let run = server.cli(&args);
        assert_eq!(run.code(), Some(0), "{run:#?}\n{}", server.log_tail());
        let report = run.json();
        check_report(&report, workload);
        let config = &report["config"];
        assert_eq!(config["concurrency"], 4, "{report:#}");
        assert_eq!(config["duration_s"], 0.3, "{report:#}");
        assert_eq!(config["warmup_s"], 0.1, "{report:#}");
        match workload {
            "hot" => assert_eq!(config["keys"], 1),
            "ping" => assert_eq!(config["entity_type"], Value::Null, "{report:#}"),
            "kv" => {
                assert_eq!(config["keys"], 20);
                assert_eq!(config["connections"], 2);
                assert_eq!(config["read_ratio"], 0.9);
                assert_eq!(config["zipf_exponent"], 0.99);
            }
            _ => assert_eq!(config["keys"], 20),
        }
    }

    // The load was real: the increments created counters, only within the key range.
    let client = server.client().await;
    let keys = client
        .list_all("counter", "smoke-incr-", 0)
        .await
        .expect("list the incr workload's counters");
    assert!(!keys.is_empty() && keys.len() <= 20, "{keys:?}");
    let hot = client.get("counter", "smoke-hot-hot").await.expect("get");
    assert!(hot.seq > 0, "{hot:?}");
    // `get` pre-populated every one of its keys.
    let read = client
        .list_all("counter", "smoke-get-", 0)
        .await
        .expect("list the get workload's counters");
    assert_eq!(read.len(), 20, "{read:?}");
    // `lua` deployed its counter script and drove it.
    let lua = client
        .list_all("bench_lua", "smoke-lua-", 0)
        .await
        .expect("list the lua counters");
    assert!(!lua.is_empty() && lua.len() <= 20, "{lua:?}");
}

/// The baseline server answers the `incr` workload's calls, unary and pipelined, without
/// errors, and refuses what it does not serve.
#[test]
fn the_noop_baseline_answers_increments_unary_and_pipelined() {
    let mut noop = KillOnDrop(
        Command::new(noop_server_bin())
            .arg("127.0.0.1:0")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start statehouse-noop-server"),
    );
    let mut first_line = String::new();
    BufReader::new(noop.0.stdout.take().expect("its stdout"))
        .read_line(&mut first_line)
        .expect("read its first line");
    let address =
        parse_listening(&first_line).unwrap_or_else(|| panic!("no address in {first_line:?}"));
    let url = format!("http://{address}");
    let bench = |workload: &str, extra: &[&str]| {
        let mut args = vec!["--server", url.as_str(), "bench", "--workload", workload];
        args.extend_from_slice(&["--requests", "200", "--warmup", "0s", "--json"]);
        args.extend_from_slice(extra);
        Command::new(cli_bin())
            .args(&args)
            .output()
            .expect("run the bench")
    };
    for extra in [&[][..], &["--pipeline"][..]] {
        let run = bench("incr", extra);
        assert!(run.status.success(), "{run:?}");
        let report: Value = serde_json::from_slice(&run.stdout).expect("a JSON report");
        check_report(&report, "incr");
        assert_eq!(report["count"], 200, "{report:#}");
    }
    // `Get` is not served: every request fails, and the bench says so.
    let run = bench("get", &["--keys", "3"]);
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("UNIMPLEMENTED"), "{stderr}");
}

/// A child process killed (and reaped) when the test ends, also when it fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_count_sends_exactly_that_many_increments_unary_and_pipelined() {
    let server = TestServer::start();
    let client = server.client().await;
    for (prefix, pipeline) in [("exact", false), ("piped", true)] {
        let mut args = vec![
            "bench",
            "--workload",
            "incr",
            "--requests",
            "300",
            "--warmup",
            "0s",
            "--keys",
            "10",
            "--concurrency",
            "8",
            "--connections",
            "3",
            "--key-prefix",
            prefix,
            "--json",
        ];
        if pipeline {
            args.push("--pipeline");
        }
        let report = server.cli(&args).json();
        check_report(&report, "incr");
        assert_eq!(report["count"], 300, "{report:#}");
        assert_eq!(report["config"]["requests"], 300, "{report:#}");
        assert_eq!(report["config"]["pipeline"], pipeline, "{report:#}");

        // With no warm-up and no errors, the counters add up to the count.
        let mut total = 0;
        for index in 0..10 {
            match client.get("counter", &format!("{prefix}-{index}")).await {
                Ok(state) => total += state.state["value"].as_i64().expect("a counter value"),
                // A key no request happened to pick has no state.
                Err(err) if err.code() == tonic::Code::NotFound => {}
                Err(err) => panic!("get {prefix}-{index}: {err}"),
            }
        }
        assert_eq!(total, 300, "pipeline: {pipeline}");
    }
}

#[test]
fn bad_options_exit_2_before_connecting_and_no_server_exits_1() {
    let bench = |args: &[&str]| {
        Command::new(cli_bin())
            // Port 1 on loopback: nothing listens there.
            .args(["--server", "http://127.0.0.1:1", "bench"])
            .args(args)
            .env_remove("STATEHOUSE_SERVER")
            .output()
            .expect("run the statehouse CLI")
    };
    for args in [
        &["--workload", "kv", "--read-ratio", "2"][..],
        &["--workload", "hot", "--keys", "5"][..],
        &["--workload", "incr", "--duration", "1s", "--requests", "5"][..],
        &["--workload", "incr", "--duration", "ten"][..],
        &["--workload", "nope"][..],
    ] {
        let out = bench(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("127.0.0.1:1"),
            "{args:?} connected: {stderr}"
        );
    }
    let out = bench(&[
        "--workload",
        "incr",
        "--duration",
        "100ms",
        "--warmup",
        "0s",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: UNAVAILABLE"), "{stderr}");
    assert!(out.stdout.is_empty(), "{out:?}");
}

#[test]
fn help_documents_the_workloads_and_the_report() {
    let out = Command::new(cli_bin())
        .args(["bench", "--help"])
        .output()
        .expect("run the statehouse CLI");
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--workload",
        "--keys",
        "--distribution",
        "--zipf-exponent",
        "--read-ratio",
        "--concurrency",
        "--connections",
        "--duration",
        "--requests",
        "--warmup",
        "--key-prefix",
        "--json",
        "incr",
        "hot",
        "kv",
        "get",
        "lua",
        "--pipeline",
        "p99.9",
    ] {
        assert!(help.contains(word), "{word} missing from:\n{help}");
    }
}
