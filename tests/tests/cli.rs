//! The `statehouse` CLI against a real server: JSON on stdout, and on error the gRPC code on
//! stderr with a non-zero exit.

use serde_json::json;
use statehouse_tests::TestServer;

#[test]
fn call_prints_the_reply_as_json() {
    let server = TestServer::start();
    let run = server.cli(&["call", "counter", "k", r#"{"op":"incr"}"#]);
    assert_eq!(run.code(), Some(0), "{run:#?}");
    assert_eq!(run.stdout(), "{\"value\":1}\n");
    assert_eq!(
        server
            .cli(&["call", "counter", "k", r#"{"op":"incr","by":41}"#])
            .json(),
        json!({"value": 42})
    );
    assert_eq!(
        server
            .cli(&["call", "register", "r", r#"{"op":"set","value":"x"}"#])
            .json(),
        json!({"value": "x", "version": 1})
    );
    assert_eq!(
        server
            .cli(&["call", "kv", "m", r#"{"op":"get","field":"f"}"#])
            .json(),
        json!({"field": "f", "found": false, "value": null, "version": 0})
    );
}

#[test]
fn get_stop_list_cast_and_delete_print_json() {
    let server = TestServer::start();
    for key in ["a-1", "a-2", "a-3", "b-1"] {
        server
            .cli(&["call", "counter", key, r#"{"op":"incr"}"#])
            .json();
    }
    assert_eq!(
        server.cli(&["get", "counter", "a-1"]).json(),
        json!({"state": {"value": 1}, "seq": 1, "active": true})
    );
    assert_eq!(
        server.cli(&["stop", "counter", "a-1"]).json(),
        json!({"was_active": true})
    );
    assert_eq!(
        server.cli(&["get", "counter", "a-1"]).json(),
        json!({"state": {"value": 1}, "seq": 1, "active": false})
    );
    assert_eq!(
        server
            .cli(&["list", "counter", "--prefix", "a-", "--page-size", "2"])
            .json(),
        json!(["a-1", "a-2", "a-3"])
    );
    assert_eq!(
        server.cli(&["list", "counter"]).json(),
        json!(["a-1", "a-2", "a-3", "b-1"])
    );
    assert_eq!(
        server
            .cli(&["cast", "counter", "b-1", r#"{"op":"incr","by":9}"#])
            .json(),
        json!({})
    );
    assert_eq!(
        server
            .cli(&["call", "counter", "b-1", r#"{"op":"get"}"#])
            .json(),
        json!({"value": 10})
    );
    assert_eq!(
        server.cli(&["delete", "counter", "a-2"]).json(),
        json!({"existed": true})
    );
    assert_eq!(
        server.cli(&["delete", "counter", "a-2"]).json(),
        json!({"existed": false})
    );
    assert_eq!(
        server.cli(&["list", "counter", "--prefix", "a-"]).json(),
        json!(["a-1", "a-3"])
    );
}

#[test]
fn server_errors_print_the_code_on_stderr_and_exit_1() {
    let server = TestServer::start();
    let cases: [(&[&str], &str); 4] = [
        (
            &["call", "counter", "k", r#"{"op":"frobnicate"}"#],
            "error: INVALID_ARGUMENT: ",
        ),
        (
            &["call", "no-such-type", "k", r#"{"op":"incr"}"#],
            "error: NOT_FOUND: ",
        ),
        (&["get", "counter", "never-written"], "error: NOT_FOUND: "),
        (
            &["call", "counter", "k", r#"{"op":"incr","by":"two"}"#],
            "error: INVALID_ARGUMENT: ",
        ),
    ];
    for (args, prefix) in cases {
        let run = server.cli(args);
        assert_eq!(run.code(), Some(1), "{args:?}: {run:#?}");
        assert!(run.stdout().is_empty(), "{args:?}: {run:#?}");
        assert!(run.stderr().starts_with(prefix), "{args:?}: {run:#?}");
    }
    assert_eq!(server.cli(&["list", "counter"]).json(), json!([]));
}

#[test]
fn bad_json_exits_2_without_touching_the_server() {
    let server = TestServer::start();
    let run = server.cli(&["call", "counter", "k", "{op:incr}"]);
    assert_eq!(run.code(), Some(2), "{run:#?}");
    assert!(run.stderr().contains("argument JSON"), "{run:#?}");
    assert_eq!(server.cli(&["list", "counter"]).json(), json!([]));
}
