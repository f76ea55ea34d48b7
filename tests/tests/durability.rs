//! Durability through the real binary: a graceful stop (SIGTERM) keeps everything, and a
//! SIGKILL in the middle of a load keeps every acknowledged change and invents none.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use statehouse_client::{Client, Code};
use statehouse_tests::{server_bin, test_seed, TestServer, CLIENT_TIMEOUT};

/// A second server on a data dir in use exits with a clear error before touching anything,
/// and the first one carries on, its journal intact: it rolls through segments its
/// preparer made (which a second server that got further would have taken over), and a
/// restart finds everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_a_data_dir_in_use_is_refused() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), "journal_segment_bytes = 1048576\n").unwrap();
    let config_path = config.path().to_str().unwrap().to_owned();
    let mut server = TestServer::start_with(&["--config", &config_path]);
    let client = server.client().await;
    client.counter("before").incr(1).await.unwrap();

    let second = std::process::Command::new(server_bin())
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(server.data_dir())
        .output()
        .expect("run a second server");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "the second server must fail: {stderr}"
    );
    assert!(
        stderr.contains("in use by another process"),
        "the refusal names the cause: {stderr}"
    );

    // ~3 MiB of journal: at least two rolls onto prepared segments.
    let big = "x".repeat(100 * 1024);
    for i in 0..32 {
        client
            .kv(format!("big-{i}"))
            .put("v", big.as_str())
            .await
            .unwrap();
    }
    client.counter("after").incr(2).await.unwrap();
    drop(client);
    server.kill();
    server.restart();
    let client = server.client().await;
    assert_eq!(client.counter("before").incr(0).await.unwrap(), 1);
    assert_eq!(client.counter("after").incr(0).await.unwrap(), 2);
    let last = client.get("kv", "big-31").await.unwrap();
    assert_eq!(
        last.state["fields"]["v"]["value"].as_str().map(str::len),
        Some(big.len())
    );
}

// Multi-threaded: the clients' connection tasks must run while terminate() waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_then_restart_keeps_all_state() {
    let mut server = TestServer::start();
    let client = server.client().await;
    for i in 0..20 {
        client.counter(format!("c-{i}")).incr(i + 1).await.unwrap();
    }
    client.register("leader").set("node-a").await.unwrap();
    client.register("leader").cas(1, "node-b").await.unwrap();
    let kv = client.kv("settings");
    kv.put("mode", "fast").await.unwrap();
    kv.put("limit", 10).await.unwrap();
    kv.delete("mode").await.unwrap();
    let settings_before = client.get("kv", "settings").await.unwrap();
    drop(client);

    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");

    server.restart();
    let client = server.client().await;
    for i in 0..20 {
        let state = client.get("counter", &format!("c-{i}")).await.unwrap();
        assert_eq!(state.state, json!({"value": i + 1}));
        assert_eq!(state.seq, 1);
    }
    let leader = client.get("register", "leader").await.unwrap();
    assert_eq!(leader.state, json!({"value": "node-b", "version": 2}));
    let settings = client.get("kv", "settings").await.unwrap();
    assert_eq!(
        (settings.state, settings.seq),
        (settings_before.state, settings_before.seq)
    );
    // And the entities carry on from there.
    assert_eq!(client.counter("c-0").incr(1).await.unwrap(), 2);
    assert_eq!(client.kv("settings").fields().await.unwrap(), vec!["limit"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_keeps_every_acknowledged_increment() {
    sigkill_under_load(
        &[],
        Load {
            keys: 200,
            tasks: 16,
            acks_min: 500,
            acks_per_key_max_min: 1,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_across_snapshot_boundaries() {
    // 40 keys and a snapshot every 5 events: each key crosses several snapshots, and the
    // kill lands between them.
    sigkill_under_load(
        &["--snapshot-every-events", "5"],
        Load {
            keys: 40,
            tasks: 16,
            acks_min: 500,
            acks_per_key_max_min: 12,
        },
    )
    .await;
}

/// The shape of one load run.
struct Load {
    /// Distinct counters.
    keys: usize,
    /// Concurrent client tasks, each with its own connection.
    tasks: usize,
    /// Acknowledged increments needed, in total, before the kill.
    acks_min: u64,
    /// Acknowledged increments needed on the busiest key before the kill.
    acks_per_key_max_min: u64,
}

/// The least time the load runs before the kill.
const LOAD_MIN: Duration = Duration::from_secs(2);
/// The longest the load may take to reach its acknowledgement targets.
const LOAD_MAX: Duration = Duration::from_secs(60);

/// Per-key counts of increments sent and acknowledged, shared by the load tasks.
struct Tally {
    sent: Vec<AtomicU64>,
    acked: Vec<AtomicU64>,
    in_flight: AtomicU64,
    /// Set just before the SIGKILL: errors after it are expected, errors before are not.
    killing: AtomicBool,
    errors_before_kill: Mutex<Vec<String>>,
}

impl Tally {
    fn new(keys: usize) -> Tally {
        Tally {
            sent: (0..keys).map(|_| AtomicU64::new(0)).collect(),
            acked: (0..keys).map(|_| AtomicU64::new(0)).collect(),
            in_flight: AtomicU64::new(0),
            killing: AtomicBool::new(false),
            errors_before_kill: Mutex::new(Vec::new()),
        }
    }

    fn total_acked(&self) -> u64 {
        self.acked.iter().map(|a| a.load(Ordering::SeqCst)).sum()
    }

    fn busiest_acked(&self) -> u64 {
        self.acked
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .max()
            .unwrap_or(0)
    }
}

fn load_key(index: usize) -> String {
    format!("load-{index:03}")
}

/// Runs `load.tasks` clients incrementing random counters, SIGKILLs the server while
/// increments are in flight, restarts it, and checks `acked <= value <= sent` for every key.
async fn sigkill_under_load(extra_args: &[&str], load: Load) {
    let seed = test_seed();
    let mut server = TestServer::start_with(extra_args);
    let tally = Arc::new(Tally::new(load.keys));

    let mut tasks = Vec::new();
    for task in 0..load.tasks {
        let client = server.client().await;
        let tally = Arc::clone(&tally);
        let rng = StdRng::seed_from_u64(seed.wrapping_add(task as u64));
        tasks.push(tokio::spawn(increment_until_error(client, tally, rng)));
    }

    // Let the load run, then wait until enough is acknowledged and something is in flight.
    tokio::time::sleep(LOAD_MIN).await;
    let started = Instant::now();
    while tally.total_acked() < load.acks_min
        || tally.busiest_acked() < load.acks_per_key_max_min
        || tally.in_flight.load(Ordering::SeqCst) == 0
    {
        assert!(
            started.elapsed() < LOAD_MAX,
            "seed {seed}: the load did not reach {} acks ({} on one key) in {LOAD_MAX:?}: \
             {} acked, {} on the busiest key; errors: {:?}",
            load.acks_min,
            load.acks_per_key_max_min,
            tally.total_acked(),
            tally.busiest_acked(),
            tally.errors_before_kill.lock().unwrap()
        );
        // The tasks make progress on other threads; check again shortly.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tally.killing.store(true, Ordering::SeqCst);
    let in_flight_at_kill = tally.in_flight.load(Ordering::SeqCst);
    server.kill();

    // Every task ends at its first error, which the kill causes; the client deadline
    // bounds the wait.
    for task in tasks {
        tokio::time::timeout(CLIENT_TIMEOUT * 2, task)
            .await
            .expect("a load task ends after the kill")
            .expect("a load task does not panic");
    }
    let errors = tally.errors_before_kill.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "seed {seed}: increments failed before the kill: {errors:?}"
    );

    server.restart();
    let client = server.client().await;
    let mut violations = Vec::new();
    let (mut sent_total, mut acked_total, mut value_total) = (0, 0, 0);
    for index in 0..load.keys {
        let key = load_key(index);
        let sent = tally.sent[index].load(Ordering::SeqCst);
        let acked = tally.acked[index].load(Ordering::SeqCst);
        let value = match client.get("counter", &key).await {
            Ok(state) => state.state["value"]
                .as_u64()
                .unwrap_or_else(|| panic!("{key}: a non-negative integer value: {state:?}")),
            Err(err) if err.code() == Code::NotFound => 0,
            Err(err) => panic!("seed {seed}: get {key} after restart: {err}"),
        };
        if !(acked <= value && value <= sent) {
            violations.push(format!("{key}: acked {acked}, value {value}, sent {sent}"));
        }
        sent_total += sent;
        acked_total += acked;
        value_total += value;
    }
    eprintln!(
        "seed {seed}, flags {extra_args:?}: {sent_total} increments sent, {acked_total} acknowledged, \
         {in_flight_at_kill} in flight at the kill, {value_total} recovered"
    );
    assert!(
        violations.is_empty(),
        "seed {seed}: {} keys break acked <= value <= sent:\n{}",
        violations.len(),
        violations.join("\n")
    );

    // The recovered counters carry on.
    let key = load_key(0);
    let before = client.counter(key.as_str()).get().await.unwrap();
    assert_eq!(
        client.counter(key.as_str()).incr(1).await.unwrap(),
        before + 1
    );
}

/// One load task: increments random counters until the first error (the kill), counting
/// each increment as sent before it leaves and as acknowledged once it is answered.
async fn increment_until_error(client: Client, tally: Arc<Tally>, mut rng: StdRng) {
    loop {
        let index = rng.gen_range(0..tally.sent.len());
        tally.sent[index].fetch_add(1, Ordering::SeqCst);
        tally.in_flight.fetch_add(1, Ordering::SeqCst);
        let result = client.counter(load_key(index)).incr(1).await;
        tally.in_flight.fetch_sub(1, Ordering::SeqCst);
        match result {
            Ok(_) => {
                tally.acked[index].fetch_add(1, Ordering::SeqCst);
            }
            Err(err) => {
                if !tally.killing.load(Ordering::SeqCst) {
                    tally.errors_before_kill.lock().unwrap().push(format!(
                        "{}: {}: {err}",
                        load_key(index),
                        err.code_name()
                    ));
                }
                return;
            }
        }
    }
}
