//! Bad input gets the documented gRPC code, a message naming what was wrong, and changes
//! nothing: the entity's state and sequence number are the same before and after.

use serde_json::{json, Value};
use statehouse_client::{Client, Code, EntityState};
use statehouse_tests::TestServer;

/// The entity's committed state, or `None` if it has none (`NOT_FOUND`).
async fn committed(client: &Client, entity_type: &str, key: &str) -> Option<EntityState> {
    match client.get(entity_type, key).await {
        Ok(state) => Some(state),
        Err(err) if err.code() == Code::NotFound => None,
        Err(err) => panic!("get {entity_type}/{key}: {err}"),
    }
}

/// Sends `message`, expects `code` with a message containing every one of `mentions`, and
/// checks the entity is unchanged.
async fn assert_refused(
    client: &Client,
    entity_type: &str,
    key: &str,
    message: Value,
    code: Code,
    mentions: &[&str],
) {
    let before = committed(client, entity_type, key).await;
    let err = client
        .call(entity_type, key, message.clone())
        .await
        .expect_err(&format!("{entity_type}/{key} accepted {message}"));
    assert_eq!(err.code(), code, "{entity_type}/{key} {message}: {err}");
    let text = err.to_string();
    assert!(!text.is_empty(), "{message}: an empty error message");
    for mention in mentions {
        assert!(
            text.contains(mention),
            "{entity_type}/{key} {message}: the error {text:?} does not mention {mention:?}"
        );
    }
    let after = committed(client, entity_type, key).await;
    assert_eq!(
        before.as_ref().map(|s| (&s.state, s.seq)),
        after.as_ref().map(|s| (&s.state, s.seq)),
        "{entity_type}/{key} changed after the refused message {message}"
    );
}

#[tokio::test]
async fn an_unknown_type_is_not_found() {
    let server = TestServer::start();
    let client = server.client().await;
    assert_refused(
        &client,
        "no-such-type",
        "k",
        json!({"op": "incr"}),
        Code::NotFound,
        &["no-such-type"],
    )
    .await;
    let err = client.get("no-such-type", "k").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
}

#[tokio::test]
async fn bad_counter_messages_are_invalid_and_change_nothing() {
    let server = TestServer::start();
    let client = server.client().await;
    // One counter with state, one that never committed anything.
    assert_eq!(client.counter("c").incr(7).await.unwrap(), 7);
    for key in ["c", "fresh"] {
        let cases: Vec<(Value, &[&str])> = vec![
            (json!({"op": "frobnicate"}), &["frobnicate"]),
            (json!({"by": 1}), &["op"]),
            (json!({"op": "incr", "by": 1.5}), &[]),
            (json!({"op": "incr", "by": "2"}), &[]),
            (json!({"op": "decr", "by": true}), &[]),
            (json!("incr"), &[]),
            (json!(7), &[]),
            (json!(null), &[]),
        ];
        for (message, mentions) in cases {
            assert_refused(
                &client,
                "counter",
                key,
                message,
                Code::InvalidArgument,
                mentions,
            )
            .await;
        }
    }
    assert_eq!(client.counter("c").get().await.unwrap(), 7);
    assert!(committed(&client, "counter", "fresh").await.is_none());
}

#[tokio::test]
async fn bad_register_and_kv_messages_are_invalid_and_change_nothing() {
    let server = TestServer::start();
    let client = server.client().await;
    client.register("r").set("kept").await.unwrap();
    client.kv("m").put("f", 1).await.unwrap();

    let cases: Vec<(&str, &str, Value, &[&str])> = vec![
        (
            "register",
            "r",
            json!({"op": "swap", "value": 1}),
            &["swap"],
        ),
        (
            "register",
            "r",
            json!({"op": "cas", "value": 1}),
            &["expected_version"],
        ),
        (
            "register",
            "r",
            json!({"op": "cas", "expected_version": "1", "value": 1}),
            &[],
        ),
        (
            "register",
            "r",
            json!({"op": "cas", "expected_version": -1, "value": 1}),
            &[],
        ),
        ("kv", "m", json!({"op": "put", "value": 1}), &["field"]),
        ("kv", "m", json!({"op": "get", "field": 3}), &[]),
        ("kv", "m", json!({"op": "erase", "field": "f"}), &["erase"]),
        (
            "kv",
            "m",
            json!({"op": "cas", "field": "f", "value": 2}),
            &["expected_version"],
        ),
    ];
    for (entity_type, key, message, mentions) in cases {
        assert_refused(
            &client,
            entity_type,
            key,
            message,
            Code::InvalidArgument,
            mentions,
        )
        .await;
    }
    let kept = client.register("r").get().await.unwrap();
    assert_eq!((kept.value, kept.version), (json!("kept"), 1));
    assert_eq!(client.kv("m").fields().await.unwrap(), vec!["f"]);
}

#[tokio::test]
async fn malformed_addresses_are_invalid() {
    let server = TestServer::start();
    let client = server.client().await;
    let err = client
        .call("counter", "", json!({"op": "incr"}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let err = client
        .call("counter", &"k".repeat(4096), json!({"op": "incr"}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(client.list_all("counter", "", 0).await.unwrap().is_empty());
}

#[tokio::test]
async fn refused_messages_leave_nothing_to_list() {
    let server = TestServer::start();
    let client = server.client().await;
    for key in ["x1", "x2"] {
        let err = client
            .call("counter", key, json!({"op": "nope"}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    }
    assert!(client.list_all("counter", "", 0).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_message_must_be_a_json_object() {
    // serde would read an array as the fields of a command in order (`["incr", 5]` as
    // `{"op":"incr","by":5}`); the documented messages are objects, so arrays are refused.
    let server = TestServer::start();
    let client = server.client().await;
    client.counter("c").incr(1).await.unwrap();
    client.register("r").set("kept").await.unwrap();
    client.kv("m").put("f", 1).await.unwrap();
    let cases = [
        ("counter", "c", json!(["incr"])),
        ("counter", "c", json!(["incr", 5])),
        ("register", "r", json!(["set", "replaced"])),
        ("kv", "m", json!(["put", "g", 2])),
        ("kv", "m", json!([{"op": "fields"}])),
    ];
    for (entity_type, key, message) in cases {
        assert_refused(
            &client,
            entity_type,
            key,
            message,
            Code::InvalidArgument,
            &[],
        )
        .await;
    }
}

#[tokio::test]
async fn a_call_past_its_deadline_is_deadline_exceeded() {
    let server = TestServer::start();
    let client = server.client().await;
    client.counter("slow").incr(1).await.unwrap();
    let hurried = client.with_timeout(std::time::Duration::from_nanos(1));
    for _ in 0..50 {
        let err = hurried.counter("slow").incr(1).await.unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    }
}
