//! The `statehouse-server` binary's start-up contract: flags, refused settings, refused data
//! dirs. (Serving is tested end to end in the workspace's `tests/` crate.) Being an
//! integration test of this package also makes `cargo test --workspace` build the binary.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn server() -> Command {
    Command::new(env!("CARGO_BIN_EXE_statehouse-server"))
}

/// Runs the command to completion, failing the test if it takes longer than a minute.
fn run_bounded(mut command: Command) -> Output {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn statehouse-server");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("poll child").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("statehouse-server did not exit within a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect output")
}

#[test]
fn help_names_every_setting() {
    let output = run_bounded({
        let mut c = server();
        c.arg("--help");
        c
    });
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--listen",
        "--data-dir",
        "--shards",
        "--durability",
        "--snapshot-every-events",
        "--idle-timeout-ms",
        "--config",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
}

#[test]
fn out_of_range_settings_are_refused_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_bounded({
        let mut c = server();
        c.args(["--shards", "0", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path());
        c
    });
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("shards"));
}

#[test]
fn a_config_file_with_an_unknown_field_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("statehouse.toml");
    std::fs::write(&path, "shard = 4\n").unwrap();
    let output = run_bounded({
        let mut c = server();
        c.arg("--config").arg(&path);
        c
    });
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown field"));
}

#[test]
fn a_data_dir_from_a_newer_server_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path().join("state")).unwrap();
        let meta = db.open_tree("meta").unwrap();
        meta.insert("format_version", &99u32.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let output = run_bounded({
        let mut c = server();
        c.args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path());
        c
    });
    assert!(!output.status.success());
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        log.contains("newer"),
        "the refusal should say the data dir is newer:\n{log}"
    );
}
