//! `statehouse`: the command-line client of a statehouse server.
//!
//! Every subcommand prints JSON on stdout. On failure it prints `error: CODE: message` on
//! stderr (CODE is the gRPC code name, e.g. `INVALID_ARGUMENT`) and exits with status 2 when
//! the local input was wrong (a JSON argument that does not parse, a bad URL) and 1 when the
//! server or the connection failed.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use statehouse_client::client::check_exact_integers;
use statehouse_client::{Client, ClientError};

/// Talk to the entities of a statehouse server. Prints JSON on stdout.
#[derive(Debug, Parser)]
#[command(name = "statehouse", version)]
struct Cli {
    /// The server's URL.
    #[arg(
        long,
        global = true,
        env = "STATEHOUSE_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,

    /// Deadline of each request in milliseconds, sent to the server (0: none).
    #[arg(long, global = true, default_value_t = 30_000)]
    timeout_ms: u64,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send a message and print the entity's reply, e.g. `call counter visits '{"op":"incr"}'`.
    Call {
        /// The entity type, e.g. `counter`.
        #[arg(value_name = "TYPE")]
        entity_type: String,
        /// The entity key.
        key: String,
        /// The message, as JSON.
        #[arg(value_name = "JSON")]
        message: String,
    },
    /// Enqueue a message without waiting for the reply; prints `{}` once accepted.
    Cast {
        /// The entity type.
        #[arg(value_name = "TYPE")]
        entity_type: String,
        /// The entity key.
        key: String,
        /// The message, as JSON.
        #[arg(value_name = "JSON")]
        message: String,
    },
    /// Print the entity's committed state: `{"state":…,"seq":…,"active":…}`.
    Get {
        /// The entity type.
        #[arg(value_name = "TYPE")]
        entity_type: String,
        /// The entity key.
        key: String,
    },
    /// Passivate the entity (its state stays on disk); prints `{"was_active": bool}`.
    Stop {
        /// The entity type.
        #[arg(value_name = "TYPE")]
        entity_type: String,
        /// The entity key.
        key: String,
    },
    /// Watch an entity's committed turns, one JSON line each, until interrupted or ended.
    Watch {
        /// The entity type.
        #[arg(value_name = "TYPE")]
        entity_type: String,
        /// The entity key.
        key: String,
        /// Start after this sequence number, catching up from storage (default: from now).
        #[arg(long)]
        from: Option<u64>,
    },
    /// Print the supervision tree: root, storage, shards and their active or quarantined
    /// entities, with states, restart counts, mailbox lengths and last crash reasons.
    Tree {
        /// Print JSON instead of the drawn tree.
        #[arg(long)]
        json: bool,
        /// At most this many entities under each shard (0: the server's default, 100).
        #[arg(long, default_value_t = 0)]
        entities: u32,
    },
    /// Deploy a Lua script as the next version of a behaviour; prints `{"name":…,"version":N}`.
    Deploy {
        /// The behaviour (entity type) name.
        name: String,
        /// The script file.
        file: std::path::PathBuf,
    },
    /// List the built-in and deployed behaviours with their versions, as JSON.
    Behaviours,
    /// Make the version before the active one active again; prints `{"name","from","to"}`.
    Rollback {
        /// The behaviour name.
        name: String,
    },
    /// Clear an entity's quarantine and crash history; prints `{"was_quarantined": bool}`.
    Reset {
        /// The entity type.
        #[arg(value_name = "TYPE")]
        entity_type: String,
        /// The entity key.
        key: String,
    },
    /// Print the keys of existing entities of a type as a JSON array, following all pages.
    List {
        /// The entity type.
        #[arg(value_name = "TYPE")]
        entity_type: String,
        /// Only keys starting with this prefix.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Keys fetched per request (0: the server's default).
        #[arg(long, default_value_t = 0)]
        page_size: u32,
    },
    /// Remove the entity and all its durable data; prints `{"existed": bool}`.
    Delete {
        /// The entity type.
        #[arg(value_name = "TYPE")]
        entity_type: String,
        /// The entity key.
        key: String,
    },
    /// Load-test the server with a workload; print throughput and latency percentiles.
    Bench(statehouse_client::bench::BenchArgs),
}

/// Why the command failed, which decides the exit status.
#[derive(Debug)]
enum Failure {
    /// The command line was wrong; exit 2.
    LocalInput(String),
    /// The server, the connection or a reply failed; exit 1.
    Client(ClientError),
    /// The output could not be written; exit 1.
    Output(std::io::Error),
}

impl From<ClientError> for Failure {
    fn from(err: ClientError) -> Self {
        if err.is_local_input() {
            Failure::LocalInput(err.to_string())
        } else {
            Failure::Client(err)
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let (line, status) = match failure {
                Failure::LocalInput(message) => (format!("INVALID_ARGUMENT: {message}"), 2),
                Failure::Client(err) => (format!("{}: {err}", err.code_name()), 1),
                Failure::Output(err) => (format!("cannot write the output: {err}"), 1),
            };
            // Nothing better to do if stderr itself is gone.
            let _ = writeln!(std::io::stderr(), "error: {line}");
            ExitCode::from(status)
        }
    }
}

/// Runs one subcommand and prints its JSON result.
async fn run(cli: Cli) -> Result<(), Failure> {
    let server = Server {
        url: cli.server,
        timeout_ms: cli.timeout_ms,
    };
    // Each arm parses its local input before connecting, so a typo is reported as such even
    // when no server is running.
    let output = match cli.command {
        Command::Call {
            entity_type,
            key,
            message,
        } => {
            let message = parse_json_argument(&message)?;
            let client = server.connect().await?;
            client.call(&entity_type, &key, message).await?.reply
        }
        Command::Cast {
            entity_type,
            key,
            message,
        } => {
            let message = parse_json_argument(&message)?;
            let client = server.connect().await?;
            client.cast(&entity_type, &key, message).await?;
            json!({})
        }
        Command::Get { entity_type, key } => {
            let client = server.connect().await?;
            let state = client.get(&entity_type, &key).await?;
            json!({"state": state.state, "seq": state.seq, "active": state.active})
        }
        Command::Stop { entity_type, key } => {
            let client = server.connect().await?;
            json!({"was_active": client.stop(&entity_type, &key).await?})
        }
        Command::Delete { entity_type, key } => {
            let client = server.connect().await?;
            json!({"existed": client.delete(&entity_type, &key).await?})
        }
        Command::Watch {
            entity_type,
            key,
            from,
        } => {
            let client = server.connect().await?;
            let mut watch = client.watch(&entity_type, &key, from).await?;
            let mut stdout = std::io::stdout().lock();
            while let Some(update) = watch.next().await {
                let line = serde_json::to_string(&update?)
                    .map_err(|e| Failure::Output(std::io::Error::other(e)))?;
                writeln!(stdout, "{line}").map_err(Failure::Output)?;
                stdout.flush().map_err(Failure::Output)?;
            }
            return Ok(());
        }
        Command::Tree { json, entities } => {
            let client = server.connect().await?;
            let tree = client.supervision_tree(entities).await?;
            if !json {
                let mut stdout = std::io::stdout().lock();
                write!(stdout, "{}", tree.render()).map_err(Failure::Output)?;
                return stdout.flush().map_err(Failure::Output);
            }
            serde_json::to_value(&tree).map_err(|e| Failure::Output(std::io::Error::other(e)))?
        }
        Command::Deploy { name, file } => {
            let source = std::fs::read_to_string(&file).map_err(|e| {
                Failure::LocalInput(format!("cannot read script {}: {e}", file.display()))
            })?;
            let client = server.connect().await?;
            json!({"name": name, "version": client.deploy_behaviour(&name, &source).await?})
        }
        Command::Behaviours => {
            let client = server.connect().await?;
            serde_json::to_value(client.list_behaviours().await?)
                .map_err(|e| Failure::Output(std::io::Error::other(e)))?
        }
        Command::Rollback { name } => {
            let client = server.connect().await?;
            let (from, to) = client.rollback_behaviour(&name).await?;
            json!({"name": name, "from": from, "to": to})
        }
        Command::Reset { entity_type, key } => {
            let client = server.connect().await?;
            json!({"was_quarantined": client.reset_entity(&entity_type, &key).await?})
        }
        Command::List {
            entity_type,
            prefix,
            page_size,
        } => {
            let client = server.connect().await?;
            json!(client.list_all(&entity_type, &prefix, page_size).await?)
        }
        // The benchmark prints its own report (text or JSON).
        Command::Bench(args) => {
            use statehouse_client::bench::{run_command, BenchError};
            return run_command(args, &server.url, server.timeout_ms)
                .await
                .map_err(|err| match err {
                    BenchError::Usage(message) => Failure::LocalInput(message),
                    BenchError::Client(err) => Failure::from(err),
                    BenchError::Output(err) => Failure::Output(err),
                });
        }
    };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{output}").map_err(Failure::Output)?;
    stdout.flush().map_err(Failure::Output)
}

/// Where and how to connect, from the global flags.
struct Server {
    url: String,
    timeout_ms: u64,
}

impl Server {
    /// Connects, applying the request deadline.
    async fn connect(&self) -> Result<Client, Failure> {
        let client = Client::connect(self.url.clone()).await?;
        Ok(match self.timeout_ms {
            0 => client,
            ms => client.with_timeout(Duration::from_millis(ms)),
        })
    }
}

/// Parses the JSON argument of `call` and `cast`, saying what is wrong with it.
fn parse_json_argument(text: &str) -> Result<Value, Failure> {
    let message = serde_json::from_str(text).map_err(|err| {
        Failure::LocalInput(format!(
            "argument JSON is not valid JSON ({err}): {text:?}; \
             quote it for the shell, e.g. '{{\"op\":\"incr\"}}'"
        ))
    })?;
    check_exact_integers(&message)
        .map_err(|err| Failure::LocalInput(format!("argument JSON: {err}")))?;
    Ok(message)
}
