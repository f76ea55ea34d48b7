//! The built-in behaviours, `counter`, `register` and `kv`, through `Call` and `Get` on the
//! real server, using the client library's typed handles and its raw JSON calls.

use serde_json::json;
use statehouse_client::{Code, KvCas, KvField};
use statehouse_tests::TestServer;

#[tokio::test]
async fn counter_counts_and_get_shows_the_committed_state() {
    let server = TestServer::start();
    let client = server.client().await;
    let visits = client.counter("visits");

    assert_eq!(visits.incr(1).await.unwrap(), 1);
    assert_eq!(visits.incr(5).await.unwrap(), 6);
    assert_eq!(visits.decr(2).await.unwrap(), 4);
    // A read changes nothing and commits no event.
    assert_eq!(visits.get().await.unwrap(), 4);

    // `by` defaults to 1; the sequence number counts the events committed so far.
    let outcome = client
        .call("counter", "visits", json!({"op": "incr"}))
        .await
        .unwrap();
    assert_eq!(outcome.reply, json!({"value": 5}));
    assert_eq!(outcome.seq, 4);

    let state = client.get("counter", "visits").await.unwrap();
    assert_eq!(state.state, json!({"value": 5}));
    assert_eq!(state.seq, 4);
    assert!(state.active, "an entity that just answered is active");

    assert_eq!(visits.reset().await.unwrap(), 0);
    assert_eq!(visits.decr(3).await.unwrap(), -3);
    let state = client.get("counter", "visits").await.unwrap();
    assert_eq!(state.state, json!({"value": -3}));
    assert_eq!(state.seq, 6);
}

#[tokio::test]
async fn counters_are_independent_per_key() {
    let server = TestServer::start();
    let client = server.client().await;
    for (key, by) in [("a", 1), ("b", 10), ("c", 100)] {
        assert_eq!(client.counter(key).incr(by).await.unwrap(), by);
    }
    assert_eq!(client.counter("a").get().await.unwrap(), 1);
    assert_eq!(client.counter("b").get().await.unwrap(), 10);
    assert_eq!(client.counter("c").get().await.unwrap(), 100);
}

#[tokio::test]
async fn a_counter_that_was_only_read_has_no_committed_state() {
    let server = TestServer::start();
    let client = server.client().await;
    assert_eq!(client.counter("untouched").get().await.unwrap(), 0);
    let err = client.get("counter", "untouched").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
}

#[tokio::test]
async fn register_sets_and_compares_and_sets_by_version() {
    let server = TestServer::start();
    let client = server.client().await;
    let leader = client.register("leader");

    let fresh = leader.get().await.unwrap();
    assert_eq!((fresh.value, fresh.version), (json!(null), 0));

    let set = leader.set("node-a").await.unwrap();
    assert_eq!((set.value, set.version), (json!("node-a"), 1));

    let won = leader.cas(1, "node-b").await.unwrap();
    assert!(won.ok);
    assert_eq!((won.value, won.version), (json!("node-b"), 2));

    // A stale version loses and reports what is there now.
    let lost = leader.cas(1, "node-c").await.unwrap();
    assert!(!lost.ok);
    assert_eq!((lost.value, lost.version), (json!("node-b"), 2));

    // Raw replies are exactly as documented.
    let reply = client
        .call("register", "leader", json!({"op": "get"}))
        .await
        .unwrap()
        .reply;
    assert_eq!(reply, json!({"value": "node-b", "version": 2}));
    let reply = client
        .call(
            "register",
            "leader",
            json!({"op": "cas", "expected_version": 2, "value": {"node": "d", "term": [1, 2]}}),
        )
        .await
        .unwrap()
        .reply;
    assert_eq!(
        reply,
        json!({"ok": true, "value": {"node": "d", "term": [1, 2]}, "version": 3})
    );

    let state = client.get("register", "leader").await.unwrap();
    assert_eq!(
        state.state,
        json!({"value": {"node": "d", "term": [1, 2]}, "version": 3})
    );
    // The failed compare-and-set committed nothing.
    assert_eq!(state.seq, 3);
}

#[tokio::test]
async fn kv_keeps_fields_with_growing_versions() {
    let server = TestServer::start();
    let client = server.client().await;
    let config = client.kv("config");

    assert_eq!(config.get("colour").await.unwrap(), None);

    let v1 = config.put("colour", "blue").await.unwrap();
    let v2 = config.put("size", 42).await.unwrap();
    let v3 = config.put("colour", "green").await.unwrap();
    assert!(0 < v1 && v1 < v2 && v2 < v3, "versions {v1} {v2} {v3}");
    assert_eq!(
        config.get("colour").await.unwrap(),
        Some(KvField {
            value: json!("green"),
            version: v3
        })
    );

    // Compare-and-set against a stale version loses and reports the current one.
    assert_eq!(
        config.cas("colour", v1, "red").await.unwrap(),
        KvCas {
            ok: false,
            version: v3
        }
    );
    let won = config.cas("colour", v3, "red").await.unwrap();
    assert!(won.ok && won.version > v3, "{won:?}");

    // Expected version 0 means "only if absent".
    let created = config.cas("owner", 0, "ops").await.unwrap();
    assert!(created.ok, "{created:?}");
    let again = config.cas("owner", 0, "dev").await.unwrap();
    assert_eq!(
        again,
        KvCas {
            ok: false,
            version: created.version
        }
    );

    assert!(config.delete("size").await.unwrap());
    assert!(!config.delete("size").await.unwrap());
    assert_eq!(config.get("size").await.unwrap(), None);
    assert_eq!(config.fields().await.unwrap(), vec!["colour", "owner"]);

    // Raw replies are exactly as documented.
    let reply = client
        .call("kv", "config", json!({"op": "get", "field": "nope"}))
        .await
        .unwrap()
        .reply;
    assert_eq!(
        reply,
        json!({"field": "nope", "found": false, "value": null, "version": 0})
    );
    let reply = client
        .call("kv", "config", json!({"op": "get", "field": "owner"}))
        .await
        .unwrap()
        .reply;
    assert_eq!(
        reply,
        json!({"field": "owner", "found": true, "value": "ops", "version": created.version})
    );

    let state = client.get("kv", "config").await.unwrap().state;
    assert_eq!(
        state["fields"]["colour"],
        json!({"value": "red", "version": won.version})
    );
    assert_eq!(
        state["fields"]["owner"],
        json!({"value": "ops", "version": created.version})
    );
    assert_eq!(
        state["fields"].as_object().map(|f| f.len()),
        Some(2),
        "{state}"
    );
    let revision = state["revision"].as_u64().expect("an integer revision");
    assert!(revision >= created.version.max(won.version), "{state}");
}
