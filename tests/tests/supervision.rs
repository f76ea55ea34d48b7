//! Supervision through the real binary (`statehouse-test-server`, which embeds the server
//! with the `crashy` and `watcher` test behaviours): a poison message is contained to its own
//! entity, quarantined, cleared through the admin API; shards restart and the root gives up
//! with a non-zero exit; monitors deliver `DOWN`s.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use statehouse_client::{Client, Code};
use statehouse_tests::TestServer;

/// Writes a config file next to the test's data and returns the flags that load it.
fn config_flags(toml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("statehouse.toml");
    std::fs::write(&path, toml).unwrap();
    (dir, path)
}

async fn crashy(
    client: &Client,
    key: &str,
    message: Value,
) -> Result<Value, statehouse_client::ClientError> {
    client
        .call("crashy", key, message)
        .await
        .map(|outcome| outcome.reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_message_is_contained_quarantined_and_cleared() {
    let (_dir, config) = config_flags(
        "[supervision]\nquarantine_ms = 600000\n[supervision.entity]\nmax_restarts = 3\nmax_seconds = 60\n",
    );
    let server = TestServer::start_embedded(&["--config", config.to_str().unwrap()]);
    let client = server.client().await;
    assert_eq!(
        crashy(&client, "poison", json!({"op": "incr", "by": 5}))
            .await
            .unwrap(),
        json!({"value": 5})
    );

    // Load on many keys while one key is poisoned again and again.
    let stop_at = Instant::now() + Duration::from_millis(1500);
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..40).map(|_| AtomicU64::new(0)).collect());
    let mut workers = Vec::new();
    for worker in 0..8u64 {
        let client = client.clone();
        let acked = acked.clone();
        workers.push(tokio::spawn(async move {
            let mut n = worker;
            while Instant::now() < stop_at {
                let key = (n % 40) as usize;
                let reply = crashy(&client, &format!("k{key}"), json!({"op": "incr"})).await;
                reply.unwrap_or_else(|e| panic!("a bystander failed during the poisoning: {e}"));
                acked[key].fetch_add(1, Ordering::SeqCst);
                n += 8;
            }
        }));
    }
    let mut codes = Vec::new();
    for _ in 0..6 {
        let err = crashy(
            &client,
            "poison",
            json!({"op": "crash", "reason": "poison pill"}),
        )
        .await
        .unwrap_err();
        codes.push(err.code());
        if err.code() == Code::FailedPrecondition {
            let message = err.to_string();
            assert!(
                message.contains("crash-looping") && message.contains("tried again"),
                "{message}"
            );
        }
    }
    for worker in workers {
        worker.await.unwrap();
    }
    // Three restarts allowed, the fourth crash quarantines, then the entity is refused.
    assert_eq!(codes[..4], [Code::Aborted; 4]);
    assert_eq!(codes[4..], [Code::FailedPrecondition; 2]);
    for (key, count) in acked.iter().enumerate() {
        let value = crashy(&client, &format!("k{key}"), json!({"op": "get"}))
            .await
            .unwrap();
        assert_eq!(value["value"], count.load(Ordering::SeqCst), "k{key}");
    }

    // The tree shows it quarantined, with the reason.
    let tree = server.cli(&["tree", "--json"]).json();
    let poison = find(&tree, "crashy/poison").expect("the quarantined entity is in the tree");
    assert_eq!(poison["state"], "quarantined");
    assert_eq!(poison["last_crash"], "poison pill");
    assert!(server
        .cli(&["tree"])
        .stdout()
        .contains("crashy/poison [entity] quarantined"));

    // Cleared through the admin API; its state is exactly its last committed state.
    assert_eq!(
        server.cli(&["reset", "crashy", "poison"]).json(),
        json!({"was_quarantined": true})
    );
    assert_eq!(
        crashy(&client, "poison", json!({"op": "get"}))
            .await
            .unwrap(),
        json!({"value": 5})
    );
    assert_eq!(
        crashy(&client, "poison", json!({"op": "incr"}))
            .await
            .unwrap(),
        json!({"value": 6})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn panics_are_crashes_too_and_the_process_survives() {
    let server = TestServer::start_embedded(&[]);
    let client = server.client().await;
    crashy(&client, "p", json!({"op": "incr"})).await.unwrap();
    let err = crashy(&client, "p", json!({"op": "panic"}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert!(err.to_string().contains("panic requested"), "{err}");
    assert_eq!(
        crashy(&client, "p", json!({"op": "get"})).await.unwrap(),
        json!({"value": 1})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shards_restart_past_their_intensity_and_the_root_gives_up_past_its_own() {
    let (_dir, config) = config_flags(
        "[supervision.entity]\nmax_restarts = 0\n\
         [supervision.shard]\nmax_restarts = 0\nbackoff_initial_ms = 50\nbackoff_max_ms = 50\n\
         [supervision.root]\nmax_restarts = 1\nmax_seconds = 60\n",
    );
    let mut server = TestServer::start_embedded(&["--config", config.to_str().unwrap()]);
    let client = server.client().await;

    // First crash: quarantine, past the shard's intensity, so the shard restarts.
    let err = crashy(&client, "a", json!({"op": "crash"}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert!(
        server.wait_for_log("shard restarting", Duration::from_secs(10)),
        "{}",
        server.log()
    );
    let tree = client.supervision_tree(0).await.unwrap();
    assert_eq!(
        tree.children
            .iter()
            .map(|shard| shard.restarts)
            .sum::<u64>(),
        1
    );
    assert_eq!(tree.restarts, 1, "the root counted the shard's restart");

    // Second shard restart: past the root's intensity. The process stops, says why, exits 1.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match crashy(&client, "b", json!({"op": "crash"})).await {
            Err(err) if err.code() == Code::Aborted => break,
            // The shard may still be in its restart backoff.
            Err(err) if err.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => panic!("expected a crash, got {other:?}"),
        }
    }
    let status = tokio::task::block_in_place(|| server.wait_for_exit(Duration::from_secs(30)));
    assert_eq!(status.code(), Some(1), "{}", server.log());
    let log = server.log();
    assert!(log.contains("root supervisor gives up"), "{log}");
    assert!(log.contains("crashed past the root's intensity"), "{log}");

    // Nothing acknowledged was lost on the way down.
    server.restart();
    let client = server.client().await;
    let err = crashy(&client, "a", json!({"op": "get"})).await;
    assert_eq!(err.unwrap(), json!({"value": 0}));
}

#[tokio::test(flavor = "multi_thread")]
async fn monitors_deliver_down_for_crash_stop_and_delete() {
    let server = TestServer::start_embedded(&[]);
    let client = server.client().await;
    for key in ["t-crash", "t-stop", "t-delete"] {
        crashy(&client, key, json!({"op": "incr"})).await.unwrap();
        let monitor = json!({"op": "monitor", "type": "crashy", "key": key});
        client.call("watcher", "w", monitor).await.unwrap();
    }
    assert_eq!(
        crashy(&client, "t-crash", json!({"op": "crash"}))
            .await
            .unwrap_err()
            .code(),
        Code::Aborted
    );
    assert!(client.stop("crashy", "t-stop").await.unwrap());
    assert!(client.delete("crashy", "t-delete").await.unwrap());
    // A monitor on an entity that is not active answers at once (OTP's noproc).
    let monitor = json!({"op": "monitor", "type": "crashy", "key": "never-started"});
    client.call("watcher", "w", monitor).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let downs = loop {
        let reply = client
            .call("watcher", "w", json!({"op": "downs"}))
            .await
            .unwrap()
            .reply;
        let downs: Vec<(String, String)> = reply["downs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["key"].as_str().unwrap().to_owned(),
                    d["reason"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        if downs.len() >= 4 || Instant::now() > deadline {
            break downs;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut downs = downs;
    downs.sort();
    let expected = [
        ("never-started", "not_active"),
        ("t-crash", "crashed"),
        ("t-delete", "deleted"),
        ("t-stop", "stopped"),
    ];
    assert_eq!(downs, expected.map(|(k, r)| (k.to_owned(), r.to_owned())));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tree_shows_root_storage_shards_and_grpc() {
    let server = TestServer::start_with(&["--shards", "2"]);
    let client = server.client().await;
    client.counter("visits").incr(1).await.unwrap();
    let text = server.cli(&["tree"]).stdout();
    assert!(
        text.starts_with("root [supervisor, one_for_one] running"),
        "{text}"
    );
    for line in [
        "├─ storage [worker] running",
        "shard-0 [supervisor, one_for_one]",
        "shard-1 [supervisor, one_for_one]",
        "└─ grpc [worker] running",
        "counter/visits [entity] running, mailbox 0",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
    let tree = server.cli(&["tree", "--json"]).json();
    assert_eq!(tree["name"], "root");
    assert_eq!(tree["children"].as_array().unwrap().len(), 4);
}

fn find<'a>(node: &'a Value, name: &str) -> Option<&'a Value> {
    if node["name"] == name {
        return Some(node);
    }
    node["children"]
        .as_array()?
        .iter()
        .find_map(|child| find(child, name))
}
