//! The end-to-end test harness: [`TestServer`] starts the real `statehouse-server` binary on a
//! temporary data dir and a free loopback port, and kills, terminates and restarts it, so
//! every test in `tests/tests/` reads as a story.
//!
//! # Layout
//!
//! - [`behaviours`]: entity types for tests (crash on command, monitor others), served by the
//!   `statehouse-test-server` binary (`src/bin/`), the example of embedding statehouse.
//! - [`TestServer`]: one server process (and its successors after a restart) on one data dir.
//! - [`bin_dir`], [`server_bin`], [`cli_bin`]: where the binaries under test are.
//! - [`CliRun`]: the outcome of one run of the `statehouse` CLI against a [`TestServer`].
//! - [`test_seed`]: the seed of a randomised test, printed so a failure can be replayed.
//!
//! # Finding the binaries
//!
//! `$STATEHOUSE_BIN_DIR` if set, else the directory two levels above the running test
//! executable (`target/debug/deps/x` → `target/debug`). `cargo test --workspace` builds the
//! binaries; `cargo test -p statehouse-tests` alone does not, so run
//! `cargo build --workspace --bins` first in that case.
//!
//! # Bounds
//!
//! Every wait here is bounded ([`LISTEN_TIMEOUT`], [`EXIT_TIMEOUT`]) and fails with the
//! server's log. When a test panics while a `TestServer` is alive, the end of the log is
//! printed, so a failing test shows what the server said.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub mod behaviours;

use statehouse_client::Client;
use tempfile::TempDir;

/// The longest a server may take from spawn to its `listening on` log line.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest a server may take to exit after SIGTERM or SIGKILL.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest the harness waits for a dead server's output pipes to close.
const STREAMS_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The deadline [`TestServer::client`] puts on every request, so no test waits forever.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The most server output kept in memory; later output is dropped (and says so).
pub const LOG_BYTES_MAX: usize = 32 * 1024 * 1024;

/// How many lines of the log a failing test prints.
const LOG_TAIL_LINES: usize = 200;

/// What the server logs once it serves, followed by its address.
const LISTENING_MARKER: &str = "listening on";

/// A `statehouse-server` process on a temporary data dir, and its log.
///
/// Dropping it kills the process (SIGKILL) and removes the data dir.
pub struct TestServer {
    /// The server binary: `statehouse-server`, or the embedding example with test behaviours.
    binary: PathBuf,
    /// Flags after `--data-dir` and `--listen`, kept for restarts.
    extra_args: Vec<String>,
    data_dir: TempDir,
    running: Option<Running>,
    addr: SocketAddr,
    /// How many processes have been started on this data dir.
    starts: usize,
    log: Arc<Log>,
    /// Whether a failure message already included the log, so dropping during the panic
    /// need not print it again.
    log_shown: AtomicBool,
}

/// The live process of a [`TestServer`].
struct Running {
    child: Child,
    readers: Vec<JoinHandle<()>>,
}

/// The server's stdout and stderr, appended by reader threads, across restarts.
struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
}

#[derive(Default)]
struct LogState {
    text: String,
    truncated: bool,
    /// The address of the current process, once it logged `listening on`.
    listening: Option<SocketAddr>,
    /// Output streams of the current process that reached end of file.
    streams_closed: usize,
    /// Which start of the server is current (1, 2, …); a reader of an earlier process
    /// that is still draining must not count for this one.
    run: usize,
}

impl TestServer {
    /// Starts a server with the default settings.
    pub fn start() -> TestServer {
        TestServer::start_with(&[])
    }

    /// Starts a server with extra flags, e.g. `&["--snapshot-every-events", "5"]`. They are
    /// passed again on every [`restart`](Self::restart).
    pub fn start_with(extra_args: &[&str]) -> TestServer {
        TestServer::start_binary(server_bin(), extra_args)
    }

    /// Starts `statehouse-test-server` (the built-ins plus the test behaviours in
    /// [`behaviours`], embedded through `statehouse_server::cli`) with these extra flags.
    pub fn start_embedded(extra_args: &[&str]) -> TestServer {
        TestServer::start_binary(test_server_bin(), extra_args)
    }

    fn start_binary(binary: PathBuf, extra_args: &[&str]) -> TestServer {
        let data_dir = tempfile::Builder::new()
            .prefix("statehouse-e2e-")
            .tempdir()
            .expect("create a temporary data dir");
        let mut server = TestServer {
            binary,
            extra_args: extra_args.iter().map(|arg| arg.to_string()).collect(),
            data_dir,
            running: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            starts: 0,
            log: Arc::new(Log {
                state: Mutex::new(LogState::default()),
                changed: Condvar::new(),
            }),
            log_shown: AtomicBool::new(false),
        };
        server.spawn();
        server
    }

    /// Starts the server again on the same data dir with the same flags, after
    /// [`kill`](Self::kill) or [`terminate`](Self::terminate). It gets a new port.
    pub fn restart(&mut self) {
        assert!(
            self.running.is_none(),
            "restart() needs a stopped server: call kill() or terminate() first"
        );
        self.spawn();
    }

    /// Kills the server with SIGKILL (no shutdown code runs) and waits for it to exit.
    pub fn kill(&mut self) -> ExitStatus {
        let running = self
            .running
            .as_mut()
            .expect("kill(): the server is not running");
        // On Unix, Child::kill sends SIGKILL.
        running.child.kill().expect("send SIGKILL to the server");
        self.reap()
    }

    /// Sends SIGTERM (graceful shutdown) and waits for the server to exit, returning its exit
    /// status. Fails if it does not exit within [`EXIT_TIMEOUT`].
    ///
    /// A graceful shutdown needs the clients' cooperation (HTTP/2 connections close with a
    /// GOAWAY/ping exchange), so in an async test the client tasks must keep running while
    /// this waits: call it from a `#[tokio::test(flavor = "multi_thread")]` test. On a
    /// current-thread runtime it fails at once instead of hanging.
    pub fn terminate(&mut self) -> ExitStatus {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            assert!(
                runtime.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread,
                "terminate() blocks this thread while the server waits for its clients to \
                 close their connections, which their tasks cannot do on a current-thread \
                 runtime: use #[tokio::test(flavor = \"multi_thread\")]"
            );
            return tokio::task::block_in_place(|| self.send_sigterm_and_reap());
        }
        self.send_sigterm_and_reap()
    }

    fn send_sigterm_and_reap(&mut self) -> ExitStatus {
        let running = self
            .running
            .as_mut()
            .expect("terminate(): the server is not running");
        let pid = libc::pid_t::try_from(running.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) has no memory effects; the child is not reaped yet (we hold it and
        // have not waited), so the pid still names our child and cannot have been reused.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(
            sent,
            0,
            "send SIGTERM to the server: {}",
            std::io::Error::last_os_error()
        );
        self.reap()
    }

    /// Waits (at most `timeout`) for the server to exit by itself, e.g. after its root
    /// supervisor gave up, and returns its exit status.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let running = self
                .running
                .as_mut()
                .expect("wait_for_exit(): the server is not running");
            if running
                .child
                .try_wait()
                .expect("wait for the server")
                .is_some()
            {
                return self.reap();
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit by itself within {timeout:?}\n{}",
                self.failure_log()
            );
            // std offers no wait with a timeout; a short poll is the bounded alternative.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (at most `timeout`) until the log contains `needle`; returns whether it did.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Whether a server process is running (started and not yet killed or terminated).
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// The address the current (or last) process listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL of the current (or last) process, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id of the running server.
    pub fn pid(&self) -> u32 {
        self.running
            .as_ref()
            .expect("pid(): the server is not running")
            .child
            .id()
    }

    /// A client connected to the running server, with a [`CLIENT_TIMEOUT`] deadline on every
    /// request.
    pub async fn client(&self) -> Client {
        match Client::connect(self.url()).await {
            Ok(client) => client.with_timeout(CLIENT_TIMEOUT),
            Err(err) => panic!(
                "connect to the test server at {}: {err}\n{}",
                self.url(),
                self.failure_log()
            ),
        }
    }

    /// The data dir, shared by every process of this server.
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// Everything the server processes wrote to stdout and stderr so far, each start
    /// introduced by a `=== start N ===` line.
    pub fn log(&self) -> String {
        self.log.lock().text.clone()
    }

    /// Runs the `statehouse` CLI against this server: `statehouse --server URL ARGS…`.
    pub fn cli(&self, args: &[&str]) -> CliRun {
        let output = Command::new(cli_bin())
            .arg("--server")
            .arg(self.url())
            .args(args)
            .env_remove("STATEHOUSE_SERVER")
            .output()
            .expect("run the statehouse CLI");
        CliRun { output }
    }

    /// Spawns a process on the data dir and waits until it logs its address.
    fn spawn(&mut self) {
        self.starts += 1;
        {
            let mut state = self.log.lock();
            state.listening = None;
            state.streams_closed = 0;
            state.run = self.starts;
            let banner = format!("=== start {} ===\n", self.starts);
            state.append(&banner);
        }
        let mut child = Command::new(&self.binary)
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .args(["--listen", "127.0.0.1:0"])
            .args(&self.extra_args)
            // Plain text logs at info level, so the `listening on` line is there to read.
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("STATEHOUSE_TEST_RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "start {}: {err}; build it with `cargo build --workspace --bins`",
                    self.binary.display()
                )
            });
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let readers = vec![
            spawn_reader(stdout, Arc::clone(&self.log), self.starts),
            spawn_reader(stderr, Arc::clone(&self.log), self.starts),
        ];
        self.running = Some(Running { child, readers });
        self.addr = self.wait_listening();
    }

    /// Waits (bounded by [`LISTEN_TIMEOUT`]) for the current process's `listening on` line.
    fn wait_listening(&mut self) -> SocketAddr {
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        let mut state = self.log.lock();
        loop {
            if let Some(addr) = state.listening {
                return addr;
            }
            if state.streams_closed == 2 {
                drop(state);
                let status = self.reap();
                panic!(
                    "the server exited ({status}) before logging `{LISTENING_MARKER} ADDR`\n{}",
                    self.failure_log()
                );
            }
            let now = Instant::now();
            if now >= deadline {
                drop(state);
                panic!(
                    "the server did not log `{LISTENING_MARKER} ADDR` within {LISTEN_TIMEOUT:?}\n{}",
                    self.failure_log()
                );
            }
            state = self
                .log
                .changed
                .wait_timeout(state, deadline - now)
                .expect("log lock")
                .0;
        }
    }

    /// Waits (bounded by [`EXIT_TIMEOUT`]) for the process to exit, and for its output to be
    /// read to the end.
    fn reap(&mut self) -> ExitStatus {
        let mut running = self.running.take().expect("a running server");
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let status = loop {
            match running.child.try_wait().expect("wait for the server") {
                Some(status) => break status,
                None if Instant::now() >= deadline => {
                    // Do not leave it behind; the panic below reports the failure.
                    let _ = running.child.kill();
                    let _ = running.child.wait();
                    panic!(
                        "the server did not exit within {EXIT_TIMEOUT:?}\n{}",
                        self.failure_log()
                    );
                }
                // std offers no wait with a timeout; a short poll is the bounded alternative.
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        // A reader ends at end of file, which comes once the process is gone, unless a
        // grandchild inherited the pipes: then stop waiting and let the reader run on.
        if self.wait_streams_closed(STREAMS_CLOSE_TIMEOUT) {
            for reader in running.readers {
                let _ = reader.join();
            }
        }
        let exit = format!("=== exited: {status} ===\n");
        self.log.lock().append(&exit);
        status
    }

    /// Waits up to `timeout` for both output streams of the current process to reach end
    /// of file; returns whether they did.
    fn wait_streams_closed(&self, timeout: Duration) -> bool {
        let state = self.log.lock();
        let (state, _) = self
            .log
            .changed
            .wait_timeout_while(state, timeout, |state| state.streams_closed < 2)
            .expect("log lock");
        state.streams_closed == 2
    }

    /// [`Self::log_tail`] for a failure message, remembering it was shown.
    fn failure_log(&self) -> String {
        self.log_shown.store(true, Ordering::Relaxed);
        self.log_tail()
    }

    /// The last [`LOG_TAIL_LINES`] lines of the log, framed for a failure message.
    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        format!(
            "--- server log ({} of {} lines, data dir {}) ---\n{}\n--- end of server log ---",
            tail.len(),
            lines.len(),
            self.data_dir().display(),
            tail.join("\n")
        )
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut running) = self.running.take() {
            let _ = running.child.kill();
            let _ = running.child.wait();
        }
        if std::thread::panicking() && !self.log_shown.load(Ordering::Relaxed) {
            eprintln!("{}", self.log_tail());
        }
    }
}

impl Log {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        // A reader thread cannot panic while holding the lock; recover the text if one did.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl LogState {
    fn append(&mut self, text: &str) {
        if self.text.len() + text.len() <= LOG_BYTES_MAX {
            self.text.push_str(text);
        } else if !self.truncated {
            self.truncated = true;
            let note = format!("=== log truncated at {LOG_BYTES_MAX} bytes ===\n");
            self.text.push_str(&note);
        }
    }
}

/// Copies one output stream of the server into the log, line by line, noting the
/// `listening on` address and the end of the stream.
fn spawn_reader(stream: impl Read + Send + 'static, log: Arc<Log>, run: usize) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    let mut state = log.lock();
                    state.append(&text);
                    if !text.ends_with('\n') {
                        state.append("\n");
                    }
                    if state.run == run && state.listening.is_none() {
                        state.listening = parse_listening(&text);
                    }
                    log.changed.notify_all();
                }
            }
        }
        let mut state = log.lock();
        if state.run == run {
            state.streams_closed += 1;
        }
        drop(state);
        log.changed.notify_all();
    })
}

/// Finds the address in a log line containing `listening on ADDR` (tolerating colour codes
/// and a `key=` prefix).
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    let plain = strip_ansi(line);
    let (_, rest) = plain.split_once(LISTENING_MARKER)?;
    rest.split_whitespace().find_map(|token| {
        let token = token.rsplit('=').next().unwrap_or(token);
        let token = token.trim_matches(|c: char| "\"'`,;()[]{}".contains(c));
        token.parse().ok()
    })
}

/// Removes ANSI escape sequences (`ESC [ … letter`).
fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// The directory holding the binaries under test: `$STATEHOUSE_BIN_DIR`, else two levels
/// above the running test executable (`target/debug/deps/x` → `target/debug`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STATEHOUSE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// The `statehouse-server` binary under test.
pub fn server_bin() -> PathBuf {
    existing_bin("statehouse-server")
}

/// `statehouse-test-server`: the embedding example with the test behaviours.
pub fn test_server_bin() -> PathBuf {
    existing_bin("statehouse-test-server")
}

/// `statehouse-noop-server`: the benchmark baseline whose handlers do nothing.
pub fn noop_server_bin() -> PathBuf {
    existing_bin("statehouse-noop-server")
}

/// The `statehouse` CLI binary under test.
pub fn cli_bin() -> PathBuf {
    existing_bin("statehouse")
}

fn existing_bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} does not exist: run `cargo build --workspace --bins` first \
         (or `cargo test --workspace`, which builds it), or point STATEHOUSE_BIN_DIR at the \
         directory holding it",
        path.display()
    );
    path
}

/// The outcome of one run of the `statehouse` CLI.
#[derive(Debug)]
pub struct CliRun {
    /// The raw process output.
    pub output: Output,
}

impl CliRun {
    /// The exit code (`None` if killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }

    /// Stdout as text.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    /// Stderr as text.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// Stdout parsed as JSON; fails the test, showing both streams, if the run failed or
    /// printed something else.
    pub fn json(&self) -> serde_json::Value {
        assert!(self.output.status.success(), "the CLI failed: {self:#?}");
        serde_json::from_str(self.stdout().trim())
            .unwrap_or_else(|err| panic!("the CLI printed no JSON ({err}): {self:#?}"))
    }
}

/// Opens the sled database of a stopped server's data dir, to look at what it left on disk
/// (the server holds sled's lock while it runs).
pub fn open_stopped_state(server: &TestServer) -> sled::Db {
    sled::Config::new()
        .path(server.data_dir().join("state"))
        .open()
        .expect("open the stopped server's sled database")
}

/// The shard trees (`shard-N`) of a data dir's sled database.
pub fn shard_trees(db: &sled::Db) -> Vec<sled::Tree> {
    db.tree_names()
        .into_iter()
        .filter(|name| name.starts_with(b"shard-"))
        .map(|name| db.open_tree(name).expect("open a shard tree"))
        .collect()
}

/// The seed of a randomised test: `$STATEHOUSE_TEST_SEED` if set, else a fresh one. It is
/// printed, so a failing run can be repeated with `STATEHOUSE_TEST_SEED=<seed>`.
pub fn test_seed() -> u64 {
    let seed = match std::env::var("STATEHOUSE_TEST_SEED") {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|err| panic!("STATEHOUSE_TEST_SEED={text:?} is not a u64: {err}")),
        Err(_) => rand::random(),
    };
    eprintln!("seed: {seed} (re-run with STATEHOUSE_TEST_SEED={seed})");
    seed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_address_in_listening_lines() {
        let addr: SocketAddr = "127.0.0.1:41234".parse().unwrap();
        for line in [
            "2024-01-01T00:00:00Z  INFO statehouse_server: listening on 127.0.0.1:41234\n",
            "INFO listening on addr=127.0.0.1:41234",
            "\u{1b}[32m INFO\u{1b}[0m listening on \u{1b}[3maddr\u{1b}[0m=127.0.0.1:41234",
            "listening on 127.0.0.1:41234 (grpc)",
            "listening on \"127.0.0.1:41234\"",
        ] {
            assert_eq!(parse_listening(line), Some(addr), "{line:?}");
        }
        assert_eq!(parse_listening("starting up"), None);
        assert_eq!(parse_listening("listening on soon"), None);
    }

    #[test]
    fn the_log_is_bounded() {
        let mut state = LogState::default();
        state.append(&"x".repeat(LOG_BYTES_MAX));
        state.append("more");
        state.append("even more");
        assert!(state.truncated);
        assert_eq!(state.text.matches("log truncated").count(), 1);
    }
}
