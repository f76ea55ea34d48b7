//! The load generator: opens the gRPC channels, keeps `concurrency` requests in flight over
//! them, and runs one phase (warm-up or measurement) until its [`Limit`].
//!
//! Each request slot is one task that sends a request, awaits its answer, records it and
//! sends the next, so exactly `concurrency` requests are in flight (closed loop, like
//! `redis-benchmark`). Slots are spread round-robin over the channels.
//!
//! The hot path calls the generated tonic client directly rather than [`crate::Client`]:
//! requests are built from pre-encoded `google.protobuf.Value` messages, with no JSON
//! conversion and no reply decoding, so the client spends its CPU on the wire, not on
//! bookkeeping (client and server usually share the machine). Every request carries the
//! run's deadline as `grpc-timeout`, and the client gives up at the same instant, so every
//! phase ends by itself even if the server stops answering.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use statehouse_proto::v1::entity_service_client::EntityServiceClient;
use statehouse_proto::v1::{CallRequest, GetRequest, PipelineRequest};
use statehouse_proto::value::json_to_proto;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The TTL of the `lease` workload's leases: long enough that they stay pending for the run.
const LEASE_TTL_MS: u64 = 3_600_000;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

use super::args::{key_name, BenchConfig, Workload};
use super::keys::KeyChooser;
use super::report::Recorder;
use crate::client::CONNECT_TIMEOUT;
use crate::error::error_chain;
use crate::ClientError;

/// Fields of each `kv` map the `kv` workload reads and writes: `f0` … `f7`.
pub const KV_FIELDS: usize = 8;

/// The generated clients of one channel: the entity service, and the health service that
/// `ping` measures.
#[derive(Debug, Clone)]
pub struct RawClient {
    entities: EntityServiceClient<Channel>,
    health: HealthClient<Channel>,
}

/// Opens `connections` gRPC channels to `url`, each its own TCP connection.
pub async fn open_channels(url: &str, connections: usize) -> Result<Vec<RawClient>, ClientError> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|err| ClientError::InvalidUrl {
            url: url.to_owned(),
            reason: error_chain(&err),
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        let channel = endpoint
            .connect()
            .await
            .map_err(|err| ClientError::Connect {
                url: url.to_owned(),
                reason: error_chain(&err),
            })?;
        clients.push(RawClient {
            entities: EntityServiceClient::new(channel.clone()),
            health: HealthClient::new(channel),
        });
    }
    Ok(clients)
}

/// What every request of a run is made of: the workload, its key chooser and the
/// pre-encoded messages. Shared by all slots.
#[derive(Debug)]
pub struct Plan {
    workload: Workload,
    entity_type: Option<&'static str>,
    key_prefix: String,
    chooser: KeyChooser,
    read_ratio: f64,
    timeout: Duration,
    incr: prost_types::Value,
    acquire: prost_types::Value,
    kv_gets: Vec<prost_types::Value>,
    request_ids: bool,
}

/// One request, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// A `Call` RPC.
    Call(CallRequest),
    /// A `Get` RPC.
    Get(GetRequest),
    /// A health `Check` RPC.
    Ping(HealthCheckRequest),
}

impl Plan {
    /// The plan of `config`'s workload.
    pub fn new(config: &BenchConfig) -> Plan {
        Plan {
            workload: config.workload,
            request_ids: config.request_ids,
            entity_type: config.workload.entity_type(),
            key_prefix: config.key_prefix.clone(),
            chooser: KeyChooser::new(
                config.keys,
                config.distribution,
                config.zipf_exponent.unwrap_or(1.0),
            ),
            read_ratio: config.read_ratio.unwrap_or(0.0),
            timeout: config.request_timeout,
            incr: json_to_proto(json!({"op": "incr"})),
            acquire: json_to_proto(
                json!({"op": "acquire", "holder": "bench", "ttl_ms": LEASE_TTL_MS}),
            ),
            kv_gets: (0..KV_FIELDS)
                .map(|field| json_to_proto(json!({"op": "get", "field": format!("f{field}")})))
                .collect(),
        }
    }

    /// The next request of a slot, drawn with the slot's `rng`.
    pub fn next_op(&self, rng: &mut impl Rng) -> Op {
        let Some(entity_type) = self.entity_type else {
            // The whole server, as a health check of "" asks.
            return Op::Ping(HealthCheckRequest::default());
        };
        let key = key_name(
            self.workload,
            &self.key_prefix,
            self.chooser.next_index(rng),
        );
        let message = match self.workload {
            Workload::Get => {
                return Op::Get(GetRequest {
                    r#type: entity_type.to_owned(),
                    key,
                })
            }
            Workload::Incr | Workload::Hot | Workload::Lua => self.incr.clone(),
            Workload::Lease => self.acquire.clone(),
            Workload::Ping => unreachable!("ping has no entity type"),
            Workload::Kv => {
                let field = rng.gen_range(0..KV_FIELDS);
                // gen::<f64>() is in [0, 1): a ratio of 1 always reads, 0 never does.
                if rng.gen::<f64>() < self.read_ratio {
                    self.kv_gets[field].clone()
                } else {
                    let value: u32 = rng.gen();
                    json_to_proto(
                        json!({"op": "put", "field": format!("f{field}"), "value": value}),
                    )
                }
            }
        };
        Op::Call(CallRequest {
            r#type: entity_type.to_owned(),
            key,
            message: Some(message),
            // By default the server's raw path; `--request-ids` adds a fresh idempotency key.
            request_id: if self.request_ids {
                format!("{:032x}", rng.gen::<u128>())
            } else {
                String::new()
            },
        })
    }
}

/// When a phase stops sending.
#[derive(Debug)]
pub enum Limit {
    /// No request is sent at or after this instant.
    Until(Instant),
    /// This many more requests are sent, in total over all slots.
    Count(AtomicU64),
}

impl Limit {
    /// A limit of `requests` requests.
    pub fn count(requests: u64) -> Limit {
        Limit::Count(AtomicU64::new(requests))
    }

    /// Takes the right to send one more request; false once the phase is over.
    fn take(&self) -> bool {
        match self {
            Limit::Until(deadline) => Instant::now() < *deadline,
            Limit::Count(remaining) => remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                    left.checked_sub(1)
                })
                .is_ok(),
        }
    }
}

/// Runs one phase: `concurrency` slots over `clients` until `limit`, each slot seeded from
/// `seed` and its number. Returns what was recorded and how long the phase took from its
/// first request to its last answer.
pub async fn run_phase(
    clients: &[RawClient],
    plan: &Arc<Plan>,
    concurrency: usize,
    limit: Limit,
    seed: u64,
) -> (Recorder, Duration) {
    assert!(!clients.is_empty(), "a phase needs a channel");
    let limit = Arc::new(limit);
    let recorder = Arc::new(Mutex::new(Recorder::new()));
    let started = Instant::now();
    let mut slots = JoinSet::new();
    for slot in 0..concurrency {
        let client = clients[slot % clients.len()].clone();
        // SmallRng::seed_from_u64 scrambles its seed, so neighbouring seeds give unrelated
        // streams.
        let rng = SmallRng::seed_from_u64(seed.wrapping_add(slot as u64));
        slots.spawn(run_slot(
            client,
            Arc::clone(plan),
            Arc::clone(&limit),
            Arc::clone(&recorder),
            rng,
        ));
    }
    finish_phase(slots, recorder, started).await
}

/// Waits for every task of a phase, then hands back what they recorded and how long the
/// phase took.
async fn finish_phase(
    mut tasks: JoinSet<()>,
    recorder: Arc<Mutex<Recorder>>,
    started: Instant,
) -> (Recorder, Duration) {
    while let Some(joined) = tasks.join_next().await {
        if let Err(err) = joined {
            // A task only ends by returning; a panic there is a bug to surface as is.
            if err.is_panic() {
                std::panic::resume_unwind(err.into_panic());
            }
        }
    }
    let elapsed = started.elapsed();
    let recorder = match Arc::try_unwrap(recorder) {
        Ok(recorder) => recorder
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner),
        // Every task has ended, so no other reference is left.
        Err(_) => unreachable!("a task outlived its phase"),
    };
    (recorder, elapsed)
}

/// Runs one phase on `Pipeline` streams: one per channel, `concurrency` calls in flight spread
/// over them. Like [`run_phase`] otherwise.
pub async fn run_phase_pipelined(
    clients: &[RawClient],
    plan: &Arc<Plan>,
    concurrency: usize,
    limit: Limit,
    seed: u64,
) -> (Recorder, Duration) {
    assert!(!clients.is_empty(), "a phase needs a channel");
    let limit = Arc::new(limit);
    let recorder = Arc::new(Mutex::new(Recorder::new()));
    let started = Instant::now();
    let mut streams = JoinSet::new();
    for (index, client) in clients.iter().enumerate() {
        let in_flight =
            concurrency / clients.len() + usize::from(index < concurrency % clients.len());
        let rng = SmallRng::seed_from_u64(seed.wrapping_add(index as u64));
        streams.spawn(run_stream(
            client.clone(),
            Arc::clone(plan),
            Arc::clone(&limit),
            Arc::clone(&recorder),
            rng,
            in_flight,
        ));
    }
    finish_phase(streams, recorder, started).await
}

/// One `Pipeline` stream keeping `in_flight` calls outstanding until the limit says stop.
async fn run_stream(
    mut client: RawClient,
    plan: Arc<Plan>,
    limit: Arc<Limit>,
    recorder: Arc<Mutex<Recorder>>,
    mut rng: SmallRng,
    in_flight: usize,
) {
    let (requests, outbound) = tokio::sync::mpsc::channel(in_flight.max(1));
    let mut sent_at: HashMap<u64, Instant> = HashMap::with_capacity(in_flight);
    let mut next_id = 0u64;
    let mut send_next = |sent_at: &mut HashMap<u64, Instant>, rng: &mut SmallRng| {
        if !limit.take() {
            return None;
        }
        let Op::Call(call) = plan.next_op(rng) else {
            unreachable!("--pipeline is refused for workloads that are not calls")
        };
        let id = next_id;
        next_id += 1;
        sent_at.insert(id, Instant::now());
        Some(PipelineRequest {
            id,
            r#type: call.r#type,
            key: call.key,
            message: call.message,
            request_id: call.request_id,
        })
    };
    // Fill the window before the stream opens; the channel holds exactly that many.
    for _ in 0..in_flight {
        let Some(request) = send_next(&mut sent_at, &mut rng) else {
            break;
        };
        if requests.try_send(request).is_err() {
            break;
        }
    }
    let record_all = |sent_at: &mut HashMap<u64, Instant>, code: Code, message: &str| {
        let mut recorder = recorder.lock().unwrap_or_else(PoisonError::into_inner);
        for _ in sent_at.drain() {
            recorder.record_error(code, message);
        }
    };
    let mut inbound = match client
        .entities
        .pipeline(ReceiverStream::new(outbound))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return record_all(&mut sent_at, status.code(), status.message()),
    };
    while !sent_at.is_empty() {
        let answer = match tokio::time::timeout(plan.timeout, inbound.message()).await {
            Ok(Ok(Some(answer))) => answer,
            Ok(Ok(None)) => {
                return record_all(&mut sent_at, Code::Unavailable, "the pipeline stream ended")
            }
            Ok(Err(status)) => return record_all(&mut sent_at, status.code(), status.message()),
            Err(_) => {
                return record_all(
                    &mut sent_at,
                    Code::DeadlineExceeded,
                    "no answer within the deadline",
                )
            }
        };
        if let Some(started) = sent_at.remove(&answer.id) {
            let latency = started.elapsed();
            let mut recorder = recorder.lock().unwrap_or_else(PoisonError::into_inner);
            if answer.code == 0 {
                recorder.record_ok(latency);
            } else {
                recorder.record_error(Code::from_i32(answer.code), &answer.error);
            }
        }
        if let Some(request) = send_next(&mut sent_at, &mut rng) {
            if requests.send(request).await.is_err() {
                return record_all(
                    &mut sent_at,
                    Code::Unavailable,
                    "the pipeline stream closed",
                );
            }
        }
    }
}

/// One request slot: send, await, record, until the limit says stop.
async fn run_slot(
    mut client: RawClient,
    plan: Arc<Plan>,
    limit: Arc<Limit>,
    recorder: Arc<Mutex<Recorder>>,
    mut rng: SmallRng,
) {
    while limit.take() {
        let op = plan.next_op(&mut rng);
        let started = Instant::now();
        let outcome = send(&mut client, op, plan.timeout).await;
        let latency = started.elapsed();
        // Uncontended on the CLI's single-threaded runtime; brief on any other.
        let mut recorder = recorder.lock().unwrap_or_else(PoisonError::into_inner);
        match outcome {
            Ok(()) => recorder.record_ok(latency),
            Err(status) => {
                let code = deadline_code(status.code(), latency, plan.timeout);
                recorder.record_error(code, status.message());
            }
        }
    }
}

/// Sends one request with the deadline `timeout`, and waits at most that long.
async fn send(client: &mut RawClient, op: Op, timeout: Duration) -> Result<(), tonic::Status> {
    match op {
        Op::Call(call) => within(timeout, client.entities.call(with_deadline(call, timeout))).await,
        Op::Get(get) => within(timeout, client.entities.get(with_deadline(get, timeout))).await,
        Op::Ping(check) => {
            within(timeout, client.health.check(with_deadline(check, timeout))).await
        }
    }
}

/// `message` as a request carrying the deadline `timeout` (`grpc-timeout`).
fn with_deadline<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    request
}

/// Waits at most `timeout` for `answer`, keeping only whether it succeeded.
async fn within<T>(
    timeout: Duration,
    answer: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<(), tonic::Status> {
    match tokio::time::timeout(timeout, answer).await {
        Ok(answered) => answered.map(drop),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer within the deadline of {} ms",
            timeout.as_millis()
        ))),
    }
}

/// tonic's server answers an expired `grpc-timeout` with `CANCELLED`; past the deadline that
/// is the deadline, and is counted as `DEADLINE_EXCEEDED` as [`crate::Client`] reports it.
fn deadline_code(code: Code, latency: Duration, timeout: Duration) -> Code {
    if code == Code::Cancelled && latency >= timeout {
        Code::DeadlineExceeded
    } else {
        code
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::args::{KeyDistribution, StopAfter};
    use statehouse_proto::value::proto_to_json;

    fn config(workload: Workload, read_ratio: Option<f64>) -> BenchConfig {
        BenchConfig {
            server: "http://127.0.0.1:1".to_owned(),
            workload,
            keys: if workload.has_keys() { 20 } else { 1 },
            distribution: KeyDistribution::Uniform,
            zipf_exponent: None,
            read_ratio,
            concurrency: 4,
            connections: 1,
            stop_after: StopAfter::Requests(10),
            warmup: Duration::ZERO,
            key_prefix: "p".to_owned(),
            seed: 1,
            request_timeout: Duration::from_secs(1),
            json: false,
            pipeline: false,
            request_ids: false,
        }
    }

    fn call_of(op: Op) -> (String, String, serde_json::Value) {
        match op {
            Op::Call(call) => (
                call.r#type,
                call.key,
                proto_to_json(call.message.unwrap()).unwrap(),
            ),
            other => panic!("expected a call, got {other:?}"),
        }
    }

    #[test]
    fn incr_and_hot_increment_counters() {
        let mut rng = SmallRng::seed_from_u64(1);
        let plan = Plan::new(&config(Workload::Incr, None));
        for _ in 0..100 {
            let (entity_type, key, message) = call_of(plan.next_op(&mut rng));
            assert_eq!(entity_type, "counter");
            let index: u64 = key.strip_prefix("p-").unwrap().parse().unwrap();
            assert!(index < 20);
            assert_eq!(message, json!({"op": "incr"}));
        }
        let plan = Plan::new(&config(Workload::Hot, None));
        let (_, key, _) = call_of(plan.next_op(&mut rng));
        assert_eq!(key, "p-hot");
    }

    #[test]
    fn get_reads_counters() {
        let mut rng = SmallRng::seed_from_u64(1);
        let plan = Plan::new(&config(Workload::Get, None));
        match plan.next_op(&mut rng) {
            Op::Get(get) => {
                assert_eq!(get.r#type, "counter");
                assert!(get.key.starts_with("p-"), "{get:?}");
            }
            other => panic!("expected a get, got {other:?}"),
        }
    }

    #[test]
    fn ping_checks_the_health_of_the_whole_server() {
        let mut rng = SmallRng::seed_from_u64(1);
        let plan = Plan::new(&config(Workload::Ping, None));
        assert_eq!(
            plan.next_op(&mut rng),
            Op::Ping(HealthCheckRequest {
                service: String::new()
            })
        );
    }

    #[test]
    fn kv_mixes_reads_and_writes_by_the_ratio() {
        let mut rng = SmallRng::seed_from_u64(1);
        for (ratio, low, high) in [(0.0, 0, 0), (1.0, 1000, 1000), (0.9, 870, 930)] {
            let plan = Plan::new(&config(Workload::Kv, Some(ratio)));
            let mut reads = 0;
            for _ in 0..1000 {
                let (entity_type, _, message) = call_of(plan.next_op(&mut rng));
                assert_eq!(entity_type, "kv");
                let field = message["field"].as_str().unwrap();
                assert!(field.starts_with('f') && field.len() == 2, "{message}");
                match message["op"].as_str().unwrap() {
                    "get" => reads += 1,
                    "put" => assert!(message["value"].is_u64(), "{message}"),
                    other => panic!("unexpected op {other}"),
                }
            }
            assert!(
                (low..=high).contains(&reads),
                "ratio {ratio}: {reads} reads"
            );
        }
    }

    #[test]
    fn a_count_limit_hands_out_exactly_its_count() {
        let limit = Limit::count(3);
        assert!(limit.take() && limit.take() && limit.take());
        assert!(!limit.take());
        assert!(!limit.take());
        let past = Limit::Until(Instant::now());
        assert!(!past.take());
    }

    #[test]
    fn cancelled_past_the_deadline_is_deadline_exceeded() {
        let timeout = Duration::from_millis(10);
        assert_eq!(
            deadline_code(Code::Cancelled, Duration::from_millis(11), timeout),
            Code::DeadlineExceeded
        );
        assert_eq!(
            deadline_code(Code::Cancelled, Duration::from_millis(1), timeout),
            Code::Cancelled
        );
        assert_eq!(
            deadline_code(Code::Unavailable, Duration::from_millis(11), timeout),
            Code::Unavailable
        );
    }
}
