//! The client's request ids, retries and dead-letter calls against a tiny in-process tonic
//! server on a loopback port: a fake `EntityService` that answers a scripted number of
//! failures before succeeding and records every attempt (request id, durable flag, deadline),
//! and a fake `AdminService` serving two pages of dead letters.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use statehouse_client::{CallOptions, CastOptions, Client, Code, RetryPolicy};
use statehouse_proto::v1::admin_service_server::{AdminService, AdminServiceServer};
use statehouse_proto::v1::entity_service_server::{EntityService, EntityServiceServer};
use statehouse_proto::v1::*;
use statehouse_proto::value::json_to_proto;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// One request as the fake server saw it.
#[derive(Debug, Clone)]
struct Attempt {
    request_id: String,
    durable: bool,
    /// The `grpc-timeout` header, if any.
    timeout: Option<String>,
}

#[derive(Debug, Default)]
struct Script {
    /// Fail this many attempts before answering OK.
    failures: usize,
    /// With this code.
    code: Option<Code>,
    attempts: Vec<Attempt>,
}

#[derive(Clone, Default)]
struct Fake {
    script: Arc<Mutex<Script>>,
}

impl Fake {
    fn failing(failures: usize, code: Code) -> Fake {
        let fake = Fake::default();
        {
            let mut script = fake.script.lock().unwrap();
            script.failures = failures;
            script.code = Some(code);
        }
        fake
    }

    fn attempts(&self) -> Vec<Attempt> {
        self.script.lock().unwrap().attempts.clone()
    }

    /// Records an attempt; answers the scripted failure, or the number of attempts so far
    /// and whether an earlier attempt carried the same request id.
    fn attempt<T>(
        &self,
        request: &Request<T>,
        request_id: &str,
        durable: bool,
    ) -> Result<(usize, bool), Status> {
        let mut script = self.script.lock().unwrap();
        let seen = script.attempts.iter().any(|a| a.request_id == request_id);
        script.attempts.push(Attempt {
            request_id: request_id.to_owned(),
            durable,
            timeout: request
                .metadata()
                .get("grpc-timeout")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned),
        });
        if script.failures > 0 {
            script.failures -= 1;
            let code = script.code.unwrap_or(Code::Unavailable);
            return Err(Status::new(code, "scripted failure"));
        }
        Ok((script.attempts.len(), seen))
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl EntityService for Fake {
    type PipelineStream = Boxed<PipelineResponse>;
    type WatchStream = Boxed<WatchEvent>;

    async fn call(&self, request: Request<CallRequest>) -> Result<Response<CallResponse>, Status> {
        let id = request.get_ref().request_id.clone();
        let (attempts, seen) = self.attempt(&request, &id, false)?;
        Ok(Response::new(CallResponse {
            reply: Some(json_to_proto(json!({"attempts": attempts}))),
            seq: 1,
            // As a server answers a retry of a call whose first attempt committed.
            deduplicated: seen,
        }))
    }

    async fn cast(&self, request: Request<CastRequest>) -> Result<Response<CastResponse>, Status> {
        let (id, durable) = (
            request.get_ref().request_id.clone(),
            request.get_ref().durable,
        );
        let (_, seen) = self.attempt(&request, &id, durable)?;
        Ok(Response::new(CastResponse { deduplicated: seen }))
    }

    async fn get(&self, _: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn stop(&self, _: Request<StopRequest>) -> Result<Response<StopResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn delete(&self, _: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    /// Answers each call with the request id it carried.
    async fn pipeline(
        &self,
        request: Request<Streaming<PipelineRequest>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        use tokio_stream::StreamExt as _;
        let answers = request.into_inner().map(|request| {
            request.map(|request| PipelineResponse {
                id: request.id,
                reply: Some(json_to_proto(json!({"request_id": request.request_id}))),
                seq: 1,
                code: 0,
                error: String::new(),
                deduplicated: !request.request_id.is_empty(),
            })
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Serves two pages of dead letters of `crashy/k`, and redrive/discard of letter `1`.
#[derive(Clone, Default)]
struct FakeAdmin {
    list_requests: Arc<Mutex<Vec<ListDeadLettersRequest>>>,
}

fn wire_letter(id: &str) -> DeadLetter {
    DeadLetter {
        r#type: "crashy".into(),
        key: "k".into(),
        id: id.into(),
        kind: "durable_cast".into(),
        message: Some(json_to_proto(json!({"op": "poison"}))),
        reason: "poison pill".into(),
        attempts: 4,
        dead_at_ms: 1_700_000_000_000,
        origin: "client".into(),
    }
}

#[tonic::async_trait]
impl AdminService for FakeAdmin {
    async fn server_stats(
        &self,
        _: Request<ServerStatsRequest>,
    ) -> Result<Response<ServerStatsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn supervision_tree(
        &self,
        _: Request<SupervisionTreeRequest>,
    ) -> Result<Response<SupervisionTreeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn reset_entity(
        &self,
        _: Request<ResetEntityRequest>,
    ) -> Result<Response<ResetEntityResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn deploy_behaviour(
        &self,
        _: Request<DeployBehaviourRequest>,
    ) -> Result<Response<DeployBehaviourResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_behaviours(
        &self,
        _: Request<ListBehavioursRequest>,
    ) -> Result<Response<ListBehavioursResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn rollback_behaviour(
        &self,
        _: Request<RollbackBehaviourRequest>,
    ) -> Result<Response<RollbackBehaviourResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let request = request.into_inner();
        self.list_requests.lock().unwrap().push(request.clone());
        let response = match request.page_token.as_str() {
            "" => ListDeadLettersResponse {
                dead_letters: vec![wire_letter("1"), wire_letter("2")],
                next_page_token: "page-2".into(),
            },
            "page-2" => ListDeadLettersResponse {
                dead_letters: vec![wire_letter("3")],
                next_page_token: String::new(),
            },
            other => return Err(Status::invalid_argument(format!("bad token {other}"))),
        };
        Ok(Response::new(response))
    }

    async fn redrive_dead_letter(
        &self,
        request: Request<RedriveDeadLetterRequest>,
    ) -> Result<Response<RedriveDeadLetterResponse>, Status> {
        match request.get_ref().id.as_str() {
            "1" => Ok(Response::new(RedriveDeadLetterResponse {})),
            _ => Err(Status::not_found("no such dead letter")),
        }
    }

    async fn discard_dead_letter(
        &self,
        request: Request<DiscardDeadLetterRequest>,
    ) -> Result<Response<DiscardDeadLetterResponse>, Status> {
        Ok(Response::new(DiscardDeadLetterResponse {
            existed: request.get_ref().id == "1",
        }))
    }
}

/// Serves `fake` and `admin` on 127.0.0.1:0; returns the server's URL.
async fn serve_url(fake: Fake, admin: FakeAdmin) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EntityServiceServer::new(fake))
            .add_service(AdminServiceServer::new(admin))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{address}")
}

/// Serves `fake` and `admin` on 127.0.0.1:0; returns a client connected to them.
async fn serve(fake: Fake, admin: FakeAdmin) -> Client {
    Client::connect(serve_url(fake, admin).await).await.unwrap()
}

/// Runs the `statehouse` CLI against `url`; returns (exit code, stdout, stderr).
async fn cli(url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_statehouse"))
        .arg("--server")
        .arg(url)
        .args(args)
        .output()
        .await
        .unwrap();
    let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
    (out.status.code(), text(out.stdout), text(out.stderr))
}

/// A fast schedule for tests: 1 ms, 2 ms, 4 ms, … capped at 8 ms.
fn quick(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(8),
    }
}

fn ids(attempts: &[Attempt]) -> Vec<&str> {
    attempts.iter().map(|a| a.request_id.as_str()).collect()
}

#[tokio::test]
async fn unavailable_is_retried_with_the_same_generated_request_id() {
    let fake = Fake::failing(3, Code::Unavailable);
    let client = serve(fake.clone(), FakeAdmin::default())
        .await
        .with_retry(quick(5));
    let outcome = client
        .call("counter", "k", json!({"op": "incr"}))
        .await
        .unwrap();
    assert_eq!(outcome.reply, json!({"attempts": 4}));
    assert!(outcome.deduplicated);
    let attempts = fake.attempts();
    assert_eq!(attempts.len(), 4);
    let first = attempts[0].request_id.clone();
    assert_eq!(first.len(), 32);
    assert!(first.bytes().all(|b| b.is_ascii_hexdigit()), "{first}");
    assert!(ids(&attempts).iter().all(|id| *id == first), "{attempts:?}");

    // The next logical call gets a new id.
    client
        .call("counter", "k", json!({"op": "incr"}))
        .await
        .unwrap();
    let attempts = fake.attempts();
    assert_eq!(attempts.len(), 5);
    assert_ne!(attempts[4].request_id, first);
}

#[tokio::test]
async fn a_callers_request_id_is_sent_verbatim_on_every_attempt() {
    let fake = Fake::failing(1, Code::Unavailable);
    let client = serve(fake.clone(), FakeAdmin::default()).await;
    let options = CallOptions::new().request_id("order-42").retry(quick(3));
    let outcome = client
        .call_with("counter", "k", json!({"op": "incr"}), options)
        .await
        .unwrap();
    assert!(outcome.deduplicated);
    assert_eq!(ids(&fake.attempts()), ["order-42", "order-42"]);
}

#[tokio::test]
async fn other_codes_are_not_retried() {
    for code in [
        Code::Aborted,
        Code::ResourceExhausted,
        Code::InvalidArgument,
    ] {
        let fake = Fake::failing(1, code);
        let client = serve(fake.clone(), FakeAdmin::default())
            .await
            .with_retry(quick(5));
        let err = client.call("counter", "k", json!({})).await.unwrap_err();
        assert_eq!(err.code(), code);
        assert_eq!(fake.attempts().len(), 1, "{code:?}");
        assert_eq!(err.to_string(), "scripted failure");
    }
}

#[tokio::test]
async fn attempts_are_bounded_and_the_error_says_how_many() {
    let fake = Fake::failing(usize::MAX, Code::Unavailable);
    let client = serve(fake.clone(), FakeAdmin::default())
        .await
        .with_retry(quick(5));
    let err = client.call("counter", "k", json!({})).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.to_string().contains("after 5 attempts"), "{err}");
    assert_eq!(fake.attempts().len(), 5);

    // No retry at all: one attempt, the server's message as it is.
    let fake = Fake::failing(usize::MAX, Code::Unavailable);
    let client = serve(fake.clone(), FakeAdmin::default()).await;
    let err = client
        .call_with("counter", "k", json!({}), CallOptions::new().no_retry())
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "scripted failure");
    assert_eq!(fake.attempts().len(), 1);
}

#[tokio::test]
async fn retries_stop_at_the_timeout_and_each_attempt_gets_what_remains() {
    let fake = Fake::failing(usize::MAX, Code::Unavailable);
    let slow = RetryPolicy {
        max_attempts: 1000,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(100),
    };
    let client = serve(fake.clone(), FakeAdmin::default())
        .await
        .with_retry(slow)
        .with_timeout(Duration::from_millis(400));
    let started = Instant::now();
    let err = client.call("counter", "k", json!({})).await.unwrap_err();
    let elapsed = started.elapsed();
    // The last failure, or (on a loaded machine) the deadline reached during the last attempt.
    assert!(
        matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{err}"
    );
    // Without the deadline, 1000 attempts 100 ms apart would take 100 s; with it the call
    // ends at about 400 ms (slack for a loaded machine: this is no timing measurement).
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
    let attempts = fake.attempts();
    // Waits of 50..=100 ms: 4 to 8 attempts fit in 400 ms (3 on a very slow machine).
    assert!((3..=8).contains(&attempts.len()), "{attempts:?}");
    // grpc-timeout shrinks from one attempt to the next ("400m", then less).
    let millis: Vec<u64> = attempts
        .iter()
        .map(|a| {
            let header = a
                .timeout
                .as_deref()
                .expect("every attempt carries a deadline");
            parse_grpc_timeout_ms(header)
        })
        .collect();
    assert!(millis[0] <= 400 && millis[0] >= 200, "{millis:?}");
    assert!(millis.windows(2).all(|w| w[1] < w[0]), "{millis:?}");
}

/// `grpc-timeout` as milliseconds (`400m`, `399999u`, `1S`, …).
fn parse_grpc_timeout_ms(header: &str) -> u64 {
    let (number, unit) = header.split_at(header.len() - 1);
    let number: u64 = number.parse().unwrap();
    match unit {
        "H" => number * 3_600_000,
        "M" => number * 60_000,
        "S" => number * 1000,
        "m" => number,
        "u" => number / 1000,
        "n" => number / 1_000_000,
        other => panic!("unknown grpc-timeout unit {other}"),
    }
}

#[tokio::test]
async fn casts_carry_the_durable_flag_and_retry_with_one_id() {
    let fake = Fake::failing(2, Code::Unavailable);
    let client = serve(fake.clone(), FakeAdmin::default())
        .await
        .with_retry(quick(5));
    let options = CastOptions::new().durable(true).request_id("cast-1");
    let outcome = client
        .cast_with("counter", "k", json!({"op": "incr"}), options)
        .await
        .unwrap();
    assert!(outcome.deduplicated);
    let attempts = fake.attempts();
    assert_eq!(ids(&attempts), ["cast-1", "cast-1", "cast-1"]);
    assert!(attempts.iter().all(|a| a.durable));

    // A plain cast: not durable, a generated id.
    client
        .cast("counter", "k", json!({"op": "incr"}))
        .await
        .unwrap();
    let last = fake.attempts().pop().unwrap();
    assert!(!last.durable);
    assert_eq!(last.request_id.len(), 32);
}

#[tokio::test]
async fn an_invalid_request_id_is_refused_before_sending() {
    let fake = Fake::default();
    let client = serve(fake.clone(), FakeAdmin::default()).await;
    for id in ["", "tab\t", &"x".repeat(129)] {
        let err = client
            .call_with("counter", "k", json!({}), CallOptions::new().request_id(id))
            .await
            .unwrap_err();
        assert!(err.is_local_input(), "{err}");
        assert_eq!(err.code(), Code::InvalidArgument);
        let err = client
            .cast_with("counter", "k", json!({}), CastOptions::new().request_id(id))
            .await
            .unwrap_err();
        assert!(err.is_local_input(), "{err}");
    }
    assert!(fake.attempts().is_empty());
}

#[tokio::test]
async fn pipelined_calls_carry_their_request_id() {
    let client = serve(Fake::default(), FakeAdmin::default()).await;
    let (sender, mut receiver) = client.pipeline().await.unwrap();
    let err = sender
        .send_with("counter", "k", json!({}), Some("é"))
        .await
        .unwrap_err();
    assert!(err.is_local_input(), "{err}");
    let with_id = sender
        .send_with("counter", "k", json!({}), Some("p-1"))
        .await
        .unwrap();
    let without = sender.send("counter", "k", json!({})).await.unwrap();
    drop(sender);
    let mut answers = std::collections::HashMap::new();
    while let Some(result) = receiver.next().await {
        let result = result.unwrap();
        answers.insert(result.id, result.outcome.unwrap());
    }
    assert_eq!(answers.len(), 2);
    assert_eq!(answers[&with_id].reply, json!({"request_id": "p-1"}));
    assert!(answers[&with_id].deduplicated);
    assert_eq!(answers[&without].reply, json!({"request_id": ""}));
    assert!(!answers[&without].deduplicated);
}

#[tokio::test]
async fn dead_letters_are_listed_across_pages_redriven_and_discarded() {
    let admin = FakeAdmin::default();
    let client = serve(Fake::default(), admin.clone()).await;
    let letters = client
        .list_all_dead_letters(Some("crashy"), Some("k"))
        .await
        .unwrap();
    let letter_ids: Vec<&str> = letters.iter().map(|l| l.id.as_str()).collect();
    assert_eq!(letter_ids, ["1", "2", "3"]);
    assert_eq!(letters[0].message, json!({"op": "poison"}));
    assert_eq!(letters[0].entity_type, "crashy");
    let requests = admin.list_requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        (requests[0].r#type.as_str(), requests[0].key.as_str()),
        ("crashy", "k")
    );
    assert_eq!(requests[1].page_token, "page-2");

    let page = client.list_dead_letters(None, None, 2, None).await.unwrap();
    assert_eq!(page.next_page_token.as_deref(), Some("page-2"));

    let err = client
        .list_dead_letters(None, Some("k"), 0, None)
        .await
        .unwrap_err();
    assert!(err.is_local_input());
    assert!(err.to_string().contains("needs a type"), "{err}");

    client
        .redrive_dead_letter("crashy", "k", "1")
        .await
        .unwrap();
    let err = client
        .redrive_dead_letter("crashy", "k", "9")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(client
        .discard_dead_letter("crashy", "k", "1")
        .await
        .unwrap());
    assert!(!client
        .discard_dead_letter("crashy", "k", "9")
        .await
        .unwrap());
}

#[tokio::test]
async fn the_cli_sends_request_ids_and_durable_casts_and_notes_deduplication() {
    let fake = Fake::failing(1, Code::Unavailable);
    let url = serve_url(fake.clone(), FakeAdmin::default()).await;
    let (code, stdout, stderr) =
        cli(&url, &["call", "counter", "k", "{}", "--request-id", "r-1"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), r#"{"attempts":2}"#);
    assert!(
        stderr.contains("deduplicated") && stderr.contains("r-1"),
        "{stderr}"
    );
    assert_eq!(ids(&fake.attempts()), ["r-1", "r-1"]);

    let (code, stdout, stderr) = cli(&url, &["cast", "counter", "k", "{}", "--durable"]).await;
    assert_eq!((code, stdout.trim()), (Some(0), "{}"), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    let last = fake.attempts().pop().unwrap();
    assert!(last.durable);
    assert_eq!(last.request_id.len(), 32);

    // --no-retry: one attempt; the error names the request id to repeat it with.
    fake.script.lock().unwrap().failures = 5;
    let before = fake.attempts().len();
    let (code, _, stderr) = cli(
        &url,
        &[
            "call",
            "counter",
            "k",
            "{}",
            "--no-retry",
            "--request-id",
            "r-2",
        ],
    )
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: UNAVAILABLE: scripted failure"),
        "{stderr}"
    );
    assert!(stderr.contains("--request-id r-2"), "{stderr}");
    assert_eq!(fake.attempts().len(), before + 1);
}

#[tokio::test]
async fn the_cli_lists_redrives_and_discards_dead_letters() {
    let url = serve_url(Fake::default(), FakeAdmin::default()).await;
    let (code, stdout, stderr) = cli(&url, &["dead-letters", "--type", "crashy"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(lines[0].starts_with("TYPE"), "{stdout}");
    assert!(
        lines[1].starts_with("crashy  k    1   durable_cast  4         poison pill"),
        "{stdout}"
    );

    let (code, stdout, _) = cli(&url, &["dead-letters", "--json"]).await;
    assert_eq!(code, Some(0));
    let letters: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(letters.as_array().map(Vec::len), Some(3));
    assert_eq!(letters[2]["id"], "3");
    assert_eq!(letters[2]["type"], "crashy");
    assert_eq!(letters[2]["origin"], "client");

    let (code, stdout, _) = cli(&url, &["redrive", "crashy", "k", "1"]).await;
    assert_eq!((code, stdout.trim()), (Some(0), r#"{"redriven":true}"#));
    let (code, _, stderr) = cli(&url, &["redrive", "crashy", "k", "9"]).await;
    assert_eq!(code, Some(1));
    assert!(stderr.starts_with("error: NOT_FOUND: "), "{stderr}");
    let (code, stdout, _) = cli(&url, &["discard", "crashy", "k", "9"]).await;
    assert_eq!((code, stdout.trim()), (Some(0), r#"{"existed":false}"#));
}
