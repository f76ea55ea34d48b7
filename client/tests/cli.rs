//! The `statehouse` CLI without a server: help, local input errors, an unreachable server.
//!
//! Tests that need a running server live in the `statehouse-tests` crate (`tests/tests/cli.rs`).
//! Having this file also makes `cargo test --workspace` build the `statehouse` binary.

use std::process::{Command, Output};

fn statehouse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_statehouse"))
        .args(args)
        .env_remove("STATEHOUSE_SERVER")
        .output()
        .expect("run the statehouse binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_lists_every_subcommand() {
    let out = statehouse(&["--help"]);
    assert!(out.status.success(), "{out:?}");
    let help = text(&out.stdout);
    for word in [
        "call",
        "cast",
        "get",
        "stop",
        "list",
        "delete",
        "dead-letters",
        "redrive",
        "discard",
        "--server",
        "--timeout-ms",
    ] {
        assert!(
            help.contains(word),
            "--help does not mention {word}:\n{help}"
        );
    }
}

#[test]
fn json_that_does_not_parse_exits_2_naming_the_argument() {
    // The port is never reached: the JSON is checked before connecting.
    let out = statehouse(&[
        "--server",
        "http://127.0.0.1:1",
        "call",
        "counter",
        "k",
        "{op: incr}",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: INVALID_ARGUMENT: argument JSON is not valid JSON"),
        "{stderr}"
    );
    assert!(stderr.contains("{op: incr}"), "{stderr}");
}

#[test]
fn cast_checks_its_json_too() {
    let out = statehouse(&["cast", "counter", "k", "[1,"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("argument JSON"), "{out:?}");
}

#[test]
fn a_server_url_without_scheme_exits_2() {
    let out = statehouse(&["--server", "127.0.0.1:50051", "get", "counter", "k"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("invalid server URL"), "{stderr}");
    assert!(stderr.contains("http://HOST:PORT"), "{stderr}");
}

#[test]
fn an_unreachable_server_exits_1_with_unavailable() {
    // Nothing listens on loopback port 1, so the connection is refused at once.
    let out = statehouse(&["--server", "http://127.0.0.1:1", "get", "counter", "k"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("error: UNAVAILABLE: "), "{stderr}");
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
}

#[test]
fn the_server_can_come_from_the_environment() {
    let out = Command::new(env!("CARGO_BIN_EXE_statehouse"))
        .args(["list", "counter"])
        .env("STATEHOUSE_SERVER", "http://127.0.0.1:1")
        .output()
        .expect("run the statehouse binary");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("127.0.0.1:1"), "{out:?}");
}

#[test]
fn missing_arguments_are_usage_errors() {
    let out = statehouse(&["call", "counter"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("<KEY>"), "{out:?}");
}

#[test]
fn integers_the_wire_cannot_carry_exactly_exit_2() {
    let out = statehouse(&[
        "--server",
        "http://127.0.0.1:1",
        "call",
        "counter",
        "k",
        r#"{"op":"incr","by":9007199254740993}"#,
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: INVALID_ARGUMENT: argument JSON: "),
        "{stderr}"
    );
    assert!(
        stderr.contains("message.by is 9007199254740993"),
        "{stderr}"
    );
}

#[test]
fn an_invalid_request_id_exits_2_before_connecting() {
    for command in ["call", "cast"] {
        let long = "x".repeat(129);
        for id in ["", "tab\there", long.as_str()] {
            let out = statehouse(&[
                "--server",
                "http://127.0.0.1:1",
                command,
                "counter",
                "k",
                "{}",
                "--request-id",
                id,
            ]);
            assert_eq!(out.status.code(), Some(2), "{command} {id:?}: {out:?}");
            let stderr = text(&out.stderr);
            assert!(
                stderr.starts_with("error: INVALID_ARGUMENT: invalid request id"),
                "{stderr}"
            );
        }
    }
}

#[test]
fn a_dead_letter_key_filter_needs_a_type() {
    let out = statehouse(&["dead-letters", "--key", "k"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("--type"), "{out:?}");
}
