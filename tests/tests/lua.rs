//! Lua behaviours through the real binary: deploy, durability across SIGKILL, hot upgrade
//! under concurrent calls with a state-changing `migrate`, passive migration, rollback, the
//! sandbox and its limits, and scripts refused at deploy time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use statehouse_client::{Client, Code};
use statehouse_tests::TestServer;

const CART_V1: &str = include_str!("../../server/src/behaviour/lua/examples/cart_v1.lua");
const CART_V2: &str = include_str!("../../server/src/behaviour/lua/examples/cart_v2.lua");
const TALLY_V1: &str = include_str!("../scripts/tally_v1.lua");
const TALLY_V2: &str = include_str!("../scripts/tally_v2.lua");
const ESCAPE: &str = include_str!("../scripts/escape.lua");

async fn call(client: &Client, entity_type: &str, key: &str, message: Value) -> Value {
    match client.call(entity_type, key, message.clone()).await {
        Ok(outcome) => outcome.reply,
        Err(err) => panic!("{entity_type}/{key} {message}: {err}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployed_cart_survives_sigkill_and_so_does_its_deployment() {
    let mut server = TestServer::start();
    let client = server.client().await;
    assert_eq!(client.deploy_behaviour("cart", CART_V1).await.unwrap(), 1);
    call(
        &client,
        "cart",
        "alice",
        json!({"op": "add", "sku": "apple", "price": 0.5, "qty": 4}),
    )
    .await;
    call(
        &client,
        "cart",
        "alice",
        json!({"op": "add", "sku": "pear", "price": 1.25}),
    )
    .await;
    let total = call(&client, "cart", "alice", json!({"op": "total"})).await;
    assert_eq!(total, json!({"total": 3.25, "count": 5}));

    server.kill();
    server.restart();
    let client = server.client().await;
    assert_eq!(
        call(&client, "cart", "alice", json!({"op": "total"})).await,
        total
    );
    let listed = server.cli(&["behaviours"]).json();
    let cart = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "cart")
        .expect("cart is listed");
    assert_eq!(
        (cart["builtin"].clone(), cart["active_version"].clone()),
        (json!(false), json!(1))
    );
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["name"] == "counter" && b["builtin"] == true));

    // The README's upgrade: version 2 keeps prices in cents as a sorted list of lines.
    assert_eq!(client.deploy_behaviour("cart", CART_V2).await.unwrap(), 2);
    let total = call(&client, "cart", "alice", json!({"op": "total"})).await;
    assert_eq!(total, json!({"total_cents": 325, "count": 5}));
    let state = client.get("cart", "alice").await.unwrap().state;
    assert_eq!(
        state["lines"][0],
        json!({"sku": "apple", "qty": 4, "unit_cents": 50})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrade_under_concurrent_calls_loses_nothing_and_migrates_passive_entities() {
    let server = TestServer::start();
    let client = server.client().await;
    assert_eq!(client.deploy_behaviour("tally", TALLY_V1).await.unwrap(), 1);
    // A passive entity: written by version 1, then out of memory during the upgrade.
    for _ in 0..3 {
        call(&client, "tally", "passive", json!({"op": "incr"})).await;
    }
    assert!(client.stop("tally", "passive").await.unwrap());

    let replies: Arc<Mutex<Vec<(String, u64, u64)>>> = Arc::default();
    let stop_at = Instant::now() + Duration::from_millis(1200);
    let mut workers = Vec::new();
    for worker in 0..8 {
        let (client, replies) = (client.clone(), replies.clone());
        workers.push(tokio::spawn(async move {
            let key = format!("k{}", worker % 4);
            while Instant::now() < stop_at {
                let reply = call(&client, "tally", &key, json!({"op": "incr"})).await;
                let (version, value) = (
                    reply["version"].as_u64().unwrap(),
                    reply["value"].as_u64().unwrap(),
                );
                replies.lock().unwrap().push((key.clone(), version, value));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let deployed = server
        .cli(&["deploy", "tally", &write_temp(TALLY_V2)])
        .json();
    assert_eq!(deployed, json!({"name": "tally", "version": 2}));
    for worker in workers {
        worker.await.unwrap();
    }

    let mut by_key: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for (key, version, value) in replies.lock().unwrap().iter() {
        by_key
            .entry(key.clone())
            .or_default()
            .push((*value, *version));
    }
    let mut versions_seen = [0usize; 3];
    for (key, mut answers) in by_key {
        answers.sort();
        // Every increment answered exactly once: the values are 1..=n with no gap or repeat.
        let values: Vec<u64> = answers.iter().map(|(value, _)| *value).collect();
        assert_eq!(
            values,
            (1..=values.len() as u64).collect::<Vec<_>>(),
            "{key}"
        );
        // Each reply came from one version, and once version 2 answered, version 1 never did.
        let versions: Vec<u64> = answers.iter().map(|(_, version)| *version).collect();
        assert!(
            versions.windows(2).all(|w| w[0] <= w[1]),
            "{key}: {versions:?}"
        );
        for version in versions {
            versions_seen[version as usize] += 1;
        }
        let state = client.get("tally", &key).await.unwrap().state;
        assert_eq!(state, json!({"count": values.len(), "shape": 2}), "{key}");
    }
    assert!(
        versions_seen[1] > 0 && versions_seen[2] > 0,
        "both versions answered: {versions_seen:?}"
    );

    // The passive entity replays its version-1 journal with version 1, then migrates.
    assert_eq!(
        client.get("tally", "passive").await.unwrap().state,
        json!({"count": 3, "shape": 2})
    );
    assert_eq!(
        call(&client, "tally", "passive", json!({"op": "incr"})).await,
        json!({"version": 2, "value": 4})
    );

    // Rollback: version 1 is active again, and its migrate brings the state back.
    assert_eq!(
        server.cli(&["rollback", "tally"]).json(),
        json!({"name": "tally", "from": 2, "to": 1})
    );
    assert_eq!(
        call(&client, "tally", "passive", json!({"op": "incr"})).await,
        json!({"version": 1, "value": 5})
    );
    assert_eq!(
        client.get("tally", "passive").await.unwrap().state,
        json!({"n": 5})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sandbox_refuses_escapes_and_stops_runaway_scripts() {
    let server = TestServer::start();
    let client = server.client().await;
    client.deploy_behaviour("escape", ESCAPE).await.unwrap();
    client.counter("bystander").incr(1).await.unwrap();
    let probes = [
        ("os_execute", "os"),
        ("io_open", "io"),
        ("require", "require"),
        ("load_bytecode", "load"),
        ("infinite_loop", "budget"),
        ("recursion", "stack"),
        ("huge_string", "memory"),
        ("growing_table", "memory"),
    ];
    for (op, hint) in probes {
        let err = client
            .call("escape", op, json!({"op": op}))
            .await
            .expect_err(op);
        assert_eq!(err.code(), Code::Aborted, "{op}: {err}");
        let message = err.to_string().to_lowercase();
        assert!(
            message.contains(hint),
            "{op}: the error should name {hint:?}: {message}"
        );
        // The server and other entities are unaffected; the same behaviour still serves.
        assert_eq!(
            call(&client, "escape", "calm", json!({"op": "ok"})).await,
            json!("fine")
        );
        assert_eq!(client.counter("bystander").get().await.unwrap(), 1);
    }
    assert!(!std::path::Path::new("/tmp/statehouse-escaped").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_scripts_are_refused_at_deploy_and_the_running_version_keeps_serving() {
    let server = TestServer::start();
    let client = server.client().await;
    client.deploy_behaviour("tally", TALLY_V1).await.unwrap();
    call(&client, "tally", "t", json!({"op": "incr"})).await;
    let bad = [
        ("function init(key, arg)\n  return {}\nend\nfunction handle_call(msg, state, ctx)\n  return (\nend\n", "line"),
        ("function init(key, arg) return {} end\n", "handle_call"),
        ("function init(key, arg) return function() end end\nfunction handle_call(m, s, c) return 1 end\n", "init"),
        ("function init(key, arg) error('no state for you') end\nfunction handle_call(m, s, c) return 1 end\n", "no state for you"),
    ];
    for (source, hint) in bad {
        let err = client
            .deploy_behaviour("tally", source)
            .await
            .expect_err(hint);
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(
            err.to_string().contains(hint),
            "the refusal should name {hint:?}: {err}"
        );
    }
    let cli = server.cli(&["deploy", "counter", &write_temp(TALLY_V1)]);
    assert_eq!(cli.code(), Some(1));
    assert!(
        cli.stderr().contains("INVALID_ARGUMENT") && cli.stderr().contains("built into"),
        "{}",
        cli.stderr()
    );
    // Still version 1, still serving.
    assert_eq!(
        call(&client, "tally", "t", json!({"op": "incr"})).await,
        json!({"version": 1, "value": 2})
    );
    let listed = client.list_behaviours().await.unwrap();
    let tally = listed.iter().find(|b| b.name == "tally").unwrap();
    assert_eq!((tally.active_version, tally.versions.len()), (1, 1));
}

/// Writes a script to a file that lives as long as the test process, for the CLI.
fn write_temp(source: &str) -> String {
    let file = tempfile::Builder::new().suffix(".lua").tempfile().unwrap();
    std::fs::write(file.path(), source).unwrap();
    let (_, path) = file.keep().unwrap();
    path.to_string_lossy().into_owned()
}

const REMINDER: &str = include_str!("../scripts/reminder.lua");

#[tokio::test(flavor = "multi_thread")]
async fn lua_entities_set_timers_send_and_ask() {
    let server = TestServer::start();
    let client = server.client().await;
    client.deploy_behaviour("reminder", REMINDER).await.unwrap();
    call(
        &client,
        "reminder",
        "r",
        json!({"op": "remind", "after_ms": 50, "note": "stand up"}),
    )
    .await;
    for _ in 0..2 {
        call(&client, "reminder", "r", json!({"op": "notify", "to": "x"})).await;
    }
    let started = std::time::Instant::now();
    loop {
        let value = client
            .get("counter", "x")
            .await
            .map(|s| s.state["value"].clone())
            .ok();
        let state = call(&client, "reminder", "r", json!({"op": "get"})).await;
        if value == Some(json!(2)) && state["fired"] == json!(["stand up"]) {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "counter {value:?}, reminder {state}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    call(
        &client,
        "reminder",
        "r",
        json!({"op": "ask", "to": "x", "tag": "q"}),
    )
    .await;
    let started = std::time::Instant::now();
    loop {
        let state = call(&client, "reminder", "r", json!({"op": "get"})).await;
        if state["replies"] == json!([{"tag": "q", "reply": {"value": 2}}]) {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "reminder {state}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
