//! `statehouse`: the command-line client of a statehouse server.
//!
//! Every subcommand prints JSON on stdout (`tree`, `stats` and `dead-letters` print for
//! people unless given `--json`). On failure it prints `error: CODE: message` on stderr
//! (CODE is the gRPC code name, e.g. `INVALID_ARGUMENT`) and exits with status 2 when the
//! local input was wrong (a JSON argument that does not parse, a bad URL or request id) and 1
//! when the server or the connection failed.
//!
//! `call` and `cast` send a request id (`--request-id`, or a generated one) and retry
//! `UNAVAILABLE` with it (unless `--no-retry`); when a call fails without a known outcome the
//! error names the id, so the call can be retried by hand without running twice.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use statehouse_client::admin::render_dead_letters;
use statehouse_client::client::check_exact_integers;
use statehouse_client::{request_id, CallOptions, CastOptions, Client, ClientError, Code};

/// jemalloc, like the server: `bench` allocates per request on every thread, and on a
/// machine shared with the server the client's allocator time is time the server loses.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// A reply the server had stored for an earlier request with the same id is printed the
    /// same, with a note on stderr.
    Call {
        /// The entity type, e.g. `counter`.
        #[arg(value_name = "TYPE")]
        entity_type: String,
        /// The entity key.
        key: String,
        /// The message, as JSON.
        #[arg(value_name = "JSON")]
        message: String,
        /// The idempotency key (1-128 printable ASCII characters; default: a random one). A
        /// repeat with the same id gets the stored reply without running the handler again.
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
        /// Make one attempt: do not retry UNAVAILABLE.
        #[arg(long)]
        no_retry: bool,
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
        /// Write the message to the entity's durable inbox before returning, so it is
        /// processed even if the server crashes first.
        #[arg(long)]
        durable: bool,
        /// The idempotency key (default: a random one); a durable cast repeated with the same
        /// id is accepted once.
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
        /// Make one attempt: do not retry UNAVAILABLE.
        #[arg(long)]
        no_retry: bool,
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
    /// Print the server's figures: active and hibernating entities, memory (resident, per
    /// active entity, allocated), commits, journal and disk.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
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
    /// List dead letters (durable messages the server gave up on) as a table: type, key, id,
    /// kind, attempts, reason.
    DeadLetters {
        /// Only those of this entity type.
        #[arg(long = "type", value_name = "TYPE")]
        entity_type: Option<String>,
        /// Only those of this key (needs --type).
        #[arg(long, requires = "entity_type")]
        key: Option<String>,
        /// Print JSON (every field, the message included) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Put a dead letter back into its entity's durable inbox; prints `{"redriven": true}`.
    Redrive {
        /// The entity type.
        #[arg(value_name = "TYPE")]
        entity_type: String,
        /// The entity key.
        key: String,
        /// The dead letter's id (see `dead-letters`).
        id: String,
    },
    /// Drop a dead letter for good; prints `{"existed": bool}`.
    Discard {
        /// The entity type.
        #[arg(value_name = "TYPE")]
        entity_type: String,
        /// The entity key.
        key: String,
        /// The dead letter's id (see `dead-letters`).
        id: String,
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
            request_id,
            no_retry,
        } => {
            let message = parse_json_argument(&message)?;
            let id = request_id_argument(request_id)?;
            let mut options = CallOptions::new().request_id(id.clone());
            if no_retry {
                options = options.no_retry();
            }
            let client = server.connect().await?;
            let outcome = client
                .call_with(&entity_type, &key, message, options)
                .await
                .map_err(|err| naming_request_id(err, &id))?;
            if outcome.deduplicated {
                note_deduplicated(&id);
            }
            outcome.reply
        }
        Command::Cast {
            entity_type,
            key,
            message,
            durable,
            request_id,
            no_retry,
        } => {
            let message = parse_json_argument(&message)?;
            let id = request_id_argument(request_id)?;
            let mut options = CastOptions::new().request_id(id.clone()).durable(durable);
            if no_retry {
                options = options.no_retry();
            }
            let client = server.connect().await?;
            let outcome = client
                .cast_with(&entity_type, &key, message, options)
                .await
                .map_err(|err| naming_request_id(err, &id))?;
            if outcome.deduplicated {
                note_deduplicated(&id);
            }
            json!({})
        }
        Command::DeadLetters {
            entity_type,
            key,
            json,
        } => {
            let client = server.connect().await?;
            let letters = client
                .list_all_dead_letters(entity_type.as_deref(), key.as_deref())
                .await?;
            if !json {
                let mut stdout = std::io::stdout().lock();
                write!(stdout, "{}", render_dead_letters(&letters)).map_err(Failure::Output)?;
                return stdout.flush().map_err(Failure::Output);
            }
            serde_json::to_value(&letters).map_err(|e| Failure::Output(std::io::Error::other(e)))?
        }
        Command::Redrive {
            entity_type,
            key,
            id,
        } => {
            let client = server.connect().await?;
            client.redrive_dead_letter(&entity_type, &key, &id).await?;
            json!({"redriven": true})
        }
        Command::Discard {
            entity_type,
            key,
            id,
        } => {
            let client = server.connect().await?;
            json!({"existed": client.discard_dead_letter(&entity_type, &key, &id).await?})
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
        Command::Stats { json } => {
            let client = server.connect().await?;
            let stats = client.server_stats().await?;
            if !json {
                let mut stdout = std::io::stdout().lock();
                write!(stdout, "{}", stats.render()).map_err(Failure::Output)?;
                return stdout.flush().map_err(Failure::Output);
            }
            serde_json::to_value(&stats).map_err(|e| Failure::Output(std::io::Error::other(e)))?
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

/// The request id of `call` or `cast`: the one given (checked before connecting), or a fresh
/// one, which the CLI knows so that an error can name it.
fn request_id_argument(given: Option<String>) -> Result<String, Failure> {
    match given {
        Some(id) => {
            request_id::validate(&id)?;
            Ok(id)
        }
        None => Ok(request_id::generate()),
    }
}

/// Adds the request id to a failure whose outcome is unknown (the request may have been
/// applied), so the user can repeat it with `--request-id` without it running twice.
fn naming_request_id(err: ClientError, id: &str) -> ClientError {
    match err {
        ClientError::Status { code, message }
            if matches!(
                code,
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
            ) =>
        {
            ClientError::Status {
                code,
                message: format!(
                    "{message} (request id {id}: repeat with --request-id {id} to get its \
                     outcome without applying it twice)"
                ),
            }
        }
        err => err,
    }
}

/// Says on stderr that the answer was the stored one of an earlier request.
fn note_deduplicated(id: &str) {
    // Only a note: if stderr is gone, the answer on stdout still stands.
    let _ = writeln!(
        std::io::stderr(),
        "note: deduplicated: request id {id} was already applied; this is its stored outcome"
    );
}
