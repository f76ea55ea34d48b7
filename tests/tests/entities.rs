//! The entity lifecycle through `EntityService`: `Cast`, `List` (prefix and paging), `Stop`
//! (passivate, then reactivate with state intact) and `Delete`.

use serde_json::json;
use statehouse_client::Code;
use statehouse_tests::TestServer;

#[tokio::test]
async fn list_filters_by_prefix_and_pages_in_key_order() {
    let server = TestServer::start();
    let client = server.client().await;
    let mut users: Vec<String> = (1..=25).map(|i| format!("user-{i:02}")).collect();
    // Created out of order; listed in key order.
    users.reverse();
    for key in &users {
        client.counter(key.as_str()).incr(1).await.unwrap();
    }
    users.sort();
    for key in ["order-1", "order-2", "order-3"] {
        client.counter(key).incr(1).await.unwrap();
    }
    // Other types do not show up in a counter listing.
    client.register("user-99").set(1).await.unwrap();

    assert_eq!(client.list_all("counter", "user-", 7).await.unwrap(), users);
    assert_eq!(
        client.list_all("counter", "order-", 0).await.unwrap(),
        vec!["order-1", "order-2", "order-3"]
    );
    assert_eq!(client.list_all("counter", "", 0).await.unwrap().len(), 28);
    assert!(client
        .list_all("counter", "nobody-", 5)
        .await
        .unwrap()
        .is_empty());

    // Page by page: 10 + 10 + 5.
    let first = client.list("counter", "user-", 10, None).await.unwrap();
    assert_eq!(first.keys, users[..10]);
    let token = first.next_page_token.expect("a second page");
    let second = client
        .list("counter", "user-", 10, Some(&token))
        .await
        .unwrap();
    assert_eq!(second.keys, users[10..20]);
    let token = second.next_page_token.expect("a third page");
    let third = client
        .list("counter", "user-", 10, Some(&token))
        .await
        .unwrap();
    assert_eq!(third.keys, users[20..]);
    assert_eq!(third.next_page_token, None);
}

#[tokio::test]
async fn stop_passivates_and_the_next_call_reactivates_with_state_intact() {
    let server = TestServer::start();
    let client = server.client().await;
    let sessions = client.counter("sessions");
    for _ in 0..3 {
        sessions.incr(1).await.unwrap();
    }
    assert!(client.stop("counter", "sessions").await.unwrap());
    assert!(!client.stop("counter", "sessions").await.unwrap());

    let state = client.get("counter", "sessions").await.unwrap();
    assert_eq!(state.state, json!({"value": 3}));
    assert_eq!(state.seq, 3);
    assert!(!state.active, "a stopped entity is not in memory");

    assert_eq!(sessions.incr(1).await.unwrap(), 4);
    let state = client.get("counter", "sessions").await.unwrap();
    assert_eq!((state.seq, state.active), (4, true));
}

#[tokio::test]
async fn delete_removes_the_entity_and_a_new_one_starts_from_scratch() {
    let server = TestServer::start();
    let client = server.client().await;
    let doomed = client.kv("doomed");
    doomed.put("a", 1).await.unwrap();
    doomed.put("b", 2).await.unwrap();
    client.kv("kept").put("a", 1).await.unwrap();

    assert!(client.delete("kv", "doomed").await.unwrap());
    let err = client.get("kv", "doomed").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    assert!(!client.delete("kv", "doomed").await.unwrap());
    assert_eq!(client.list_all("kv", "", 0).await.unwrap(), vec!["kept"]);

    // The key is free again: a new incarnation with no memory of the old one.
    assert_eq!(doomed.fields().await.unwrap(), Vec::<String>::new());
    doomed.put("c", 3).await.unwrap();
    let state = client.get("kv", "doomed").await.unwrap();
    assert_eq!(state.seq, 1);
    assert_eq!(
        state.state["fields"]
            .as_object()
            .map(|f| f.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["c".to_owned()])
    );
}

#[tokio::test]
async fn cast_is_accepted_and_handled_in_mailbox_order() {
    let server = TestServer::start();
    let client = server.client().await;
    for _ in 0..5 {
        client
            .cast("counter", "casts", json!({"op": "incr", "by": 2}))
            .await
            .unwrap();
    }
    // The call queues behind the casts in the entity's mailbox.
    assert_eq!(client.counter("casts").get().await.unwrap(), 10);

    // A cast to an unknown type is refused up front.
    let err = client
        .cast("no-such-type", "k", json!({"op": "incr"}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
}

/// The state the supervision tree shows for `counter/KEY` (`None` if it is not there).
fn tree_state(server: &TestServer, key: &str) -> Option<String> {
    fn find(node: &serde_json::Value, name: &str) -> Option<String> {
        if node["name"] == name {
            return node["state"].as_str().map(str::to_owned);
        }
        node["children"]
            .as_array()?
            .iter()
            .find_map(|child| find(child, name))
    }
    find(
        &server.cli(&["tree", "--json"]).json(),
        &format!("counter/{key}"),
    )
}

/// Polls (bounded) until the tree shows `counter/KEY` in `state`.
async fn wait_for_tree_state(server: &TestServer, key: &str, state: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while tree_state(server, key).as_deref() != Some(state) {
        assert!(
            std::time::Instant::now() < deadline,
            "counter/{key} never became {state}: {:?}",
            tree_state(server, key)
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_entities_hibernate_stay_active_and_resume_with_state_intact() {
    let mut server = TestServer::start_with(&["--hibernate-after-ms", "50"]);
    let client = server.client().await;
    client.counter("sleepy").incr(5).await.unwrap();
    wait_for_tree_state(&server, "sleepy", "hibernating").await;
    // `Get` reads it without waking it; it is still active.
    let got = client.get("counter", "sleepy").await.unwrap();
    assert_eq!((got.state, got.active), (json!({"value": 5}), true));
    assert_eq!(
        tree_state(&server, "sleepy").as_deref(),
        Some("hibernating")
    );
    // A call resumes it where it was, and it hibernates again.
    assert_eq!(client.counter("sleepy").incr(1).await.unwrap(), 6);
    wait_for_tree_state(&server, "sleepy", "hibernating").await;

    // Hibernating changes nothing about durability: killed now, it comes back from disk.
    server.kill();
    server.restart();
    let client = server.client().await;
    assert_eq!(client.counter("sleepy").incr(1).await.unwrap(), 7);
    server.terminate();

    // With hibernation off, an idle entity stays running until it passivates.
    let mut server =
        TestServer::start_with(&["--hibernate-after-ms", "0", "--idle-timeout-ms", "400"]);
    let client = server.client().await;
    client.counter("awake").incr(1).await.unwrap();
    assert_eq!(tree_state(&server, "awake").as_deref(), Some("running"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while let Some(state) = tree_state(&server, "awake") {
        assert_eq!(state, "running");
        assert!(std::time::Instant::now() < deadline, "never passivated");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    server.terminate();
}
