//! [`Client`]: one connection to a statehouse server and the six `EntityService` calls.
//!
//! The client speaks JSON ([`serde_json::Value`]) and converts to and from the wire's
//! `google.protobuf.Value` with `statehouse_proto::value`. It is cheap to clone: clones share
//! one HTTP/2 connection, so concurrent tasks each take a clone.
//!
//! Deadlines: with [`Client::with_timeout`] every request carries a `grpc-timeout` header the
//! server honours end to end, and the client itself gives up at the same instant, so no call
//! waits longer than the timeout even if the server never answers.
//!
//! Idempotency and retries: every `Call` and `Cast` carries a request id (see
//! [`crate::request_id`]), generated per logical call unless the caller brings one in
//! [`CallOptions`] / [`CastOptions`]. A request answered `UNAVAILABLE` is retried with the
//! same id under the client's [`RetryPolicy`] ([`Client::with_retry`]), which the server's
//! deduplication makes safe; the timeout bounds the call with all its retries.

use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::Value;
use statehouse_proto::v1::admin_service_client::AdminServiceClient;
use statehouse_proto::v1::entity_service_client::EntityServiceClient;
use statehouse_proto::v1::{
    CallRequest, CastRequest, DeleteRequest, DiscardDeadLetterRequest, GetRequest,
    ListDeadLettersRequest, ListRequest, RedriveDeadLetterRequest, StopRequest,
};
use statehouse_proto::value::{json_to_proto, proto_to_json};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

use crate::admin::{BehaviourInfo, DeadLetter, DeadLetterPage, ServerStats, TreeNode};
use crate::error::{error_chain, ClientError};
use crate::pipeline::{PipelineReceiver, PipelineSender, PIPELINE_SEND_BUFFER};
use crate::request_id;
use crate::retry::RetryPolicy;
use crate::watch::Watch;
use crate::{Counter, Kv, Register};

/// The longest [`Client::connect`] waits for the TCP (and HTTP/2) connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest integer magnitude the wire carries exactly: numbers travel as doubles.
/// [`Client::call`] and [`Client::cast`] refuse messages with larger integers rather than
/// send a different number.
pub const EXACT_INTEGER_MAX: u64 = 1 << 53;

/// The most pages [`Client::list_all`] (and [`Client::list_all_dead_letters`]) follows:
/// 100 000 pages of up to 1000 keys. A bound, so a server that never stops handing out page
/// tokens cannot keep the client looping.
pub const LIST_PAGES_MAX: usize = 100_000;

/// A connection to one statehouse server.
#[derive(Debug, Clone)]
pub struct Client {
    inner: EntityServiceClient<Channel>,
    admin: AdminServiceClient<Channel>,
    url: String,
    timeout: Option<Duration>,
    retry: RetryPolicy,
}

/// What a [`Client::call`] returns: the entity's reply and its sequence number after the
/// message (the number of events it has committed).
#[derive(Debug, Clone, PartialEq)]
pub struct CallOutcome {
    /// The behaviour's reply.
    pub reply: Value,
    /// The entity's sequence number after this message.
    pub seq: u64,
    /// True when the reply is the server's stored reply to an earlier request with the same
    /// request id (e.g. the first attempt of a retried call committed): the handler did not
    /// run again.
    pub deduplicated: bool,
}

/// What a [`Client::cast_with`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CastOutcome {
    /// True when a durable cast with this request id had already been accepted, so it was
    /// not enqueued again.
    pub deduplicated: bool,
}

/// Per-call options of [`Client::call_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallOptions {
    /// The request id (idempotency key); `None`: a fresh one per call. Must be 1..=128 bytes
    /// of printable ASCII.
    pub request_id: Option<String>,
    /// How to retry `UNAVAILABLE`; `None`: the client's policy ([`Client::with_retry`]).
    pub retry: Option<RetryPolicy>,
}

impl CallOptions {
    /// The defaults: a generated request id, the client's retry policy.
    pub fn new() -> Self {
        CallOptions::default()
    }

    /// Uses `id` as the request id.
    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into());
        self
    }

    /// Retries with `policy` instead of the client's.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Makes exactly one attempt.
    pub fn no_retry(self) -> Self {
        self.retry(RetryPolicy::none())
    }
}

/// Per-cast options of [`Client::cast_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CastOptions {
    /// The request id (idempotency key); `None`: a fresh one per cast.
    pub request_id: Option<String>,
    /// How to retry `UNAVAILABLE`; `None`: the client's policy.
    pub retry: Option<RetryPolicy>,
    /// Write the message to the entity's durable inbox before the cast returns, so it is
    /// processed even if the server crashes first; with a request id it is accepted once.
    pub durable: bool,
}

impl CastOptions {
    /// The defaults: a generated request id, the client's retry policy, not durable.
    pub fn new() -> Self {
        CastOptions::default()
    }

    /// Uses `id` as the request id.
    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into());
        self
    }

    /// Retries with `policy` instead of the client's.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Makes exactly one attempt.
    pub fn no_retry(self) -> Self {
        self.retry(RetryPolicy::none())
    }

    /// Makes the cast durable (see [`CastOptions::durable`]).
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }
}

/// An entity's last committed state, as [`Client::get`] returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityState {
    /// The state value.
    pub state: Value,
    /// The number of events the entity has committed.
    pub seq: u64,
    /// Whether the entity was in memory when the server answered.
    pub active: bool,
}

/// One page of keys from [`Client::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    /// Keys in key order.
    pub keys: Vec<String>,
    /// The token for the next page, or `None` when this is the last page.
    pub next_page_token: Option<String>,
}

impl Client {
    /// Connects to the server at `url`, e.g. `http://127.0.0.1:50051`, waiting at most
    /// [`CONNECT_TIMEOUT`]. Only plain `http://` is supported.
    pub async fn connect(url: impl Into<String>) -> Result<Client, ClientError> {
        let url = url.into();
        let endpoint = endpoint_for(&url)?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|err| ClientError::Connect {
                url: url.clone(),
                reason: error_chain(&err),
            })?;
        Ok(Client {
            inner: EntityServiceClient::new(channel.clone()),
            admin: AdminServiceClient::new(channel),
            url,
            timeout: None,
            retry: RetryPolicy::default(),
        })
    }

    /// Returns this client with `policy` as the default retry policy of its calls and casts
    /// (initially [`RetryPolicy::default`]; [`RetryPolicy::none`] turns retries off).
    pub fn with_retry(mut self, policy: RetryPolicy) -> Client {
        self.retry = policy;
        self
    }

    /// The default retry policy of calls and casts.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// Returns this client with a deadline on every request it sends (sent to the server
    /// as `grpc-timeout`). Answers arriving later fail with `DEADLINE_EXCEEDED`.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = Some(timeout);
        self
    }

    /// The per-request deadline, if one is set.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The URL this client connected to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends `message` to the entity `(entity_type, key)` and waits for its reply, which the
    /// server sends only once the changes the message caused are durable.
    ///
    /// The request carries a fresh request id and is retried on `UNAVAILABLE` under the
    /// client's [`RetryPolicy`]; [`Client::call_with`] chooses otherwise.
    pub async fn call(
        &self,
        entity_type: &str,
        key: &str,
        message: Value,
    ) -> Result<CallOutcome, ClientError> {
        self.call_with(entity_type, key, message, CallOptions::default())
            .await
    }

    /// [`Client::call`] with a caller's request id and/or retry policy.
    pub async fn call_with(
        &self,
        entity_type: &str,
        key: &str,
        message: Value,
        options: CallOptions,
    ) -> Result<CallOutcome, ClientError> {
        check_exact_integers(&message)?;
        let request = CallRequest {
            r#type: entity_type.to_owned(),
            key: key.to_owned(),
            message: Some(json_to_proto(message)),
            request_id: request_id::resolve(options.request_id.as_deref())?,
        };
        let policy = options.retry.unwrap_or(self.retry);
        let response = self
            .retrying(policy, |budget| {
                let mut inner = self.inner.clone();
                let request = self.request_within(request.clone(), budget);
                async move { self.send_within(inner.call(request), budget).await }
            })
            .await?;
        let reply = decode_value(response.reply, || format!("call {entity_type}/{key}"))?;
        Ok(CallOutcome {
            reply,
            seq: response.seq,
            deduplicated: response.deduplicated,
        })
    }

    /// Enqueues `message` in the entity's mailbox and returns once the server accepted it,
    /// without waiting for the entity to handle it.
    ///
    /// Like [`Client::call`], it carries a fresh request id and is retried on `UNAVAILABLE`;
    /// [`Client::cast_with`] makes it durable or chooses the id and retries.
    pub async fn cast(
        &self,
        entity_type: &str,
        key: &str,
        message: Value,
    ) -> Result<(), ClientError> {
        self.cast_with(entity_type, key, message, CastOptions::default())
            .await
            .map(drop)
    }

    /// [`Client::cast`] with options: durable (written to the entity's durable inbox before
    /// the server accepts it), a caller's request id, a retry policy.
    pub async fn cast_with(
        &self,
        entity_type: &str,
        key: &str,
        message: Value,
        options: CastOptions,
    ) -> Result<CastOutcome, ClientError> {
        check_exact_integers(&message)?;
        let request = CastRequest {
            r#type: entity_type.to_owned(),
            key: key.to_owned(),
            message: Some(json_to_proto(message)),
            request_id: request_id::resolve(options.request_id.as_deref())?,
            durable: options.durable,
        };
        let policy = options.retry.unwrap_or(self.retry);
        let response = self
            .retrying(policy, |budget| {
                let mut inner = self.inner.clone();
                let request = self.request_within(request.clone(), budget);
                async move { self.send_within(inner.cast(request), budget).await }
            })
            .await?;
        Ok(CastOutcome {
            deduplicated: response.deduplicated,
        })
    }

    /// Returns the entity's last committed state. An entity that never committed a change
    /// answers `NOT_FOUND`.
    pub async fn get(&self, entity_type: &str, key: &str) -> Result<EntityState, ClientError> {
        let request = GetRequest {
            r#type: entity_type.to_owned(),
            key: key.to_owned(),
        };
        let mut inner = self.inner.clone();
        let response = self.send(inner.get(self.request(request))).await?;
        let state = decode_value(response.state, || format!("get {entity_type}/{key}"))?;
        Ok(EntityState {
            state,
            seq: response.seq,
            active: response.active,
        })
    }

    /// Passivates the entity (its state stays on disk). Returns whether it was active.
    pub async fn stop(&self, entity_type: &str, key: &str) -> Result<bool, ClientError> {
        let request = StopRequest {
            r#type: entity_type.to_owned(),
            key: key.to_owned(),
        };
        let mut inner = self.inner.clone();
        let response = self.send(inner.stop(self.request(request))).await?;
        Ok(response.was_active)
    }

    /// Removes the entity and all its durable data. Returns whether it had committed state.
    pub async fn delete(&self, entity_type: &str, key: &str) -> Result<bool, ClientError> {
        let request = DeleteRequest {
            r#type: entity_type.to_owned(),
            key: key.to_owned(),
        };
        let mut inner = self.inner.clone();
        let response = self.send(inner.delete(self.request(request))).await?;
        Ok(response.existed)
    }

    /// Lists one page of the keys of existing entities of `entity_type` that start with
    /// `key_prefix`, in key order. `page_size` 0 means the server's default; `page_token` is
    /// `None` for the first page, else the previous page's `next_page_token`.
    pub async fn list(
        &self,
        entity_type: &str,
        key_prefix: &str,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<ListPage, ClientError> {
        let request = ListRequest {
            r#type: entity_type.to_owned(),
            key_prefix: key_prefix.to_owned(),
            page_size,
            page_token: page_token.unwrap_or_default().to_owned(),
        };
        let mut inner = self.inner.clone();
        let response = self.send(inner.list(self.request(request))).await?;
        Ok(ListPage {
            keys: response.keys,
            next_page_token: Some(response.next_page_token).filter(|token| !token.is_empty()),
        })
    }

    /// Lists every key of `entity_type` starting with `key_prefix`, following the pages
    /// (at most [`LIST_PAGES_MAX`] of them).
    pub async fn list_all(
        &self,
        entity_type: &str,
        key_prefix: &str,
        page_size: u32,
    ) -> Result<Vec<String>, ClientError> {
        collect_pages(&format!("list {entity_type}"), |token| async move {
            let page = self
                .list(entity_type, key_prefix, page_size, token.as_deref())
                .await?;
            Ok((page.keys, page.next_page_token))
        })
        .await
    }

    /// One page of dead letters: messages the server gave up on. `entity_type` `None` (or
    /// empty) means every type; `key` narrows to one entity and needs a type. `page_size` 0
    /// means the server's default; `page_token` is `None` for the first page.
    pub async fn list_dead_letters(
        &self,
        entity_type: Option<&str>,
        key: Option<&str>,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<DeadLetterPage, ClientError> {
        let entity_type = entity_type.unwrap_or_default();
        let key = key.unwrap_or_default();
        if entity_type.is_empty() && !key.is_empty() {
            return Err(ClientError::InvalidRequest {
                reason: format!("a key filter ({key:?}) needs a type filter too"),
            });
        }
        let request = ListDeadLettersRequest {
            r#type: entity_type.to_owned(),
            key: key.to_owned(),
            page_size,
            page_token: page_token.unwrap_or_default().to_owned(),
        };
        let mut admin = self.admin.clone();
        let response = self
            .send(admin.list_dead_letters(self.request(request)))
            .await?;
        let dead_letters = response
            .dead_letters
            .into_iter()
            .map(DeadLetter::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DeadLetterPage {
            dead_letters,
            next_page_token: Some(response.next_page_token).filter(|token| !token.is_empty()),
        })
    }

    /// Every dead letter matching the filters of [`Client::list_dead_letters`], following the
    /// pages (at most [`LIST_PAGES_MAX`] of them).
    pub async fn list_all_dead_letters(
        &self,
        entity_type: Option<&str>,
        key: Option<&str>,
    ) -> Result<Vec<DeadLetter>, ClientError> {
        collect_pages("list dead letters", |token| async move {
            let page = self
                .list_dead_letters(entity_type, key, 0, token.as_deref())
                .await?;
            Ok((page.dead_letters, page.next_page_token))
        })
        .await
    }

    /// Puts dead letter `id` of entity `(entity_type, key)` back into the entity's durable
    /// inbox and removes the dead letter. `NOT_FOUND` if there is no such dead letter.
    pub async fn redrive_dead_letter(
        &self,
        entity_type: &str,
        key: &str,
        id: &str,
    ) -> Result<(), ClientError> {
        let request = RedriveDeadLetterRequest {
            r#type: entity_type.to_owned(),
            key: key.to_owned(),
            id: id.to_owned(),
        };
        let mut admin = self.admin.clone();
        self.send(admin.redrive_dead_letter(self.request(request)))
            .await?;
        Ok(())
    }

    /// Removes dead letter `id` of entity `(entity_type, key)` for good. Returns whether it
    /// existed.
    pub async fn discard_dead_letter(
        &self,
        entity_type: &str,
        key: &str,
        id: &str,
    ) -> Result<bool, ClientError> {
        let request = DiscardDeadLetterRequest {
            r#type: entity_type.to_owned(),
            key: key.to_owned(),
            id: id.to_owned(),
        };
        let mut admin = self.admin.clone();
        let response = self
            .send(admin.discard_dead_letter(self.request(request)))
            .await?;
        Ok(response.existed)
    }

    /// A typed handle on the built-in `counter` entity `key`.
    pub fn counter(&self, key: impl Into<String>) -> Counter {
        Counter::new(self.clone(), key.into())
    }

    /// A typed handle on the built-in `register` entity `key`.
    pub fn register(&self, key: impl Into<String>) -> Register {
        Register::new(self.clone(), key.into())
    }

    /// A typed handle on the built-in `kv` entity `key`.
    pub fn kv(&self, key: impl Into<String>) -> Kv {
        Kv::new(self.clone(), key.into())
    }

    /// Watches an entity's committed turns: from now (its current state first), or after
    /// `from_seq` (catching up from storage). See [`crate::watch`].
    pub async fn watch(
        &self,
        entity_type: &str,
        key: &str,
        from_seq: Option<u64>,
    ) -> Result<Watch, ClientError> {
        let request = statehouse_proto::v1::WatchRequest {
            r#type: entity_type.to_owned(),
            key: key.to_owned(),
            from_seq,
        };
        let mut inner = self.inner.clone();
        // A watch runs until ended: no deadline on the stream.
        let updates = inner.watch(Request::new(request)).await?.into_inner();
        Ok(Watch::new(updates))
    }

    /// Opens a `Pipeline` stream: many calls in flight on one stream (see [`crate::pipeline`]).
    pub async fn pipeline(&self) -> Result<(PipelineSender, PipelineReceiver), ClientError> {
        let (requests, outbound) = tokio::sync::mpsc::channel(PIPELINE_SEND_BUFFER);
        let mut inner = self.inner.clone();
        // The stream's deadline would bound every call on it, so pipelines carry none.
        let responses = inner
            .pipeline(tokio_stream::wrappers::ReceiverStream::new(outbound))
            .await?
            .into_inner();
        Ok((
            PipelineSender::new(requests),
            PipelineReceiver::new(responses),
        ))
    }

    /// The server's figures now: entities, memory, journal, disk.
    pub async fn server_stats(&self) -> Result<ServerStats, ClientError> {
        let request = statehouse_proto::v1::ServerStatsRequest {};
        let mut admin = self.admin.clone();
        let response = self.send(admin.server_stats(self.request(request))).await?;
        Ok(ServerStats::from(response))
    }

    /// The server's supervision tree, with at most `entities_per_shard` entities under each
    /// shard (0: the server's default).
    pub async fn supervision_tree(&self, entities_per_shard: u32) -> Result<TreeNode, ClientError> {
        let request = statehouse_proto::v1::SupervisionTreeRequest { entities_per_shard };
        let mut admin = self.admin.clone();
        let response = self
            .send(admin.supervision_tree(self.request(request)))
            .await?;
        let root = response.root.ok_or_else(|| ClientError::UnexpectedReply {
            request: "supervision tree".into(),
            reason: "the server sent no root node".into(),
            reply: Value::Null,
        })?;
        Ok(TreeNode::from(root))
    }

    /// Deploys `source` as the next version of behaviour `name`; returns the new version.
    pub async fn deploy_behaviour(&self, name: &str, source: &str) -> Result<u32, ClientError> {
        let request = statehouse_proto::v1::DeployBehaviourRequest {
            name: name.to_owned(),
            source: source.to_owned(),
        };
        let mut admin = self.admin.clone();
        Ok(self
            .send(admin.deploy_behaviour(self.request(request)))
            .await?
            .version)
    }

    /// The built-in and deployed behaviours.
    pub async fn list_behaviours(&self) -> Result<Vec<BehaviourInfo>, ClientError> {
        let mut admin = self.admin.clone();
        let request = statehouse_proto::v1::ListBehavioursRequest {};
        let response = self
            .send(admin.list_behaviours(self.request(request)))
            .await?;
        Ok(response
            .behaviours
            .into_iter()
            .map(BehaviourInfo::from)
            .collect())
    }

    /// Makes the version before the active one active again; returns `(from, to)`.
    pub async fn rollback_behaviour(&self, name: &str) -> Result<(u32, u32), ClientError> {
        let request = statehouse_proto::v1::RollbackBehaviourRequest {
            name: name.to_owned(),
        };
        let mut admin = self.admin.clone();
        let response = self
            .send(admin.rollback_behaviour(self.request(request)))
            .await?;
        Ok((response.from_version, response.to_version))
    }

    /// Clears an entity's quarantine and crash history; returns whether it was quarantined.
    pub async fn reset_entity(&self, entity_type: &str, key: &str) -> Result<bool, ClientError> {
        let request = statehouse_proto::v1::ResetEntityRequest {
            r#type: entity_type.to_owned(),
            key: key.to_owned(),
        };
        let mut admin = self.admin.clone();
        let response = self.send(admin.reset_entity(self.request(request))).await?;
        Ok(response.was_quarantined)
    }

    /// Wraps a message in a request carrying this client's deadline.
    fn request<T>(&self, message: T) -> Request<T> {
        self.request_within(message, self.timeout)
    }

    /// Wraps a message in a request carrying the deadline `budget` from now.
    fn request_within<T>(&self, message: T, budget: Option<Duration>) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(budget) = budget {
            request.set_timeout(budget);
        }
        request
    }

    /// Awaits one RPC, giving up at this client's deadline even if the server stays silent.
    async fn send<T>(
        &self,
        rpc: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, ClientError> {
        self.send_within(rpc, self.timeout).await
    }

    /// Awaits one RPC, giving up after `budget` even if the server stays silent.
    ///
    /// tonic's server transport answers an expired `grpc-timeout` with `CANCELLED`
    /// ("Timeout expired"). A `CANCELLED` that arrives after the deadline has passed is that
    /// deadline, so it is reported as `DEADLINE_EXCEEDED`, as gRPC clients do.
    async fn send_within<T>(
        &self,
        rpc: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
        budget: Option<Duration>,
    ) -> Result<T, ClientError> {
        let Some(budget) = budget else {
            return Ok(rpc.await?.into_inner());
        };
        let started = Instant::now();
        // The message names the whole call's deadline, which retries share.
        let timeout = self.timeout.unwrap_or(budget);
        let deadline_exceeded = |detail: String| ClientError::Status {
            code: Code::DeadlineExceeded,
            message: format!("deadline of {} ms exceeded{detail}", timeout.as_millis()),
        };
        match tokio::time::timeout(budget, rpc).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) if status.code() == Code::Cancelled && started.elapsed() >= budget => {
                Err(deadline_exceeded(format!(
                    " (the server answered CANCELLED: {})",
                    status.message()
                )))
            }
            Ok(Err(status)) => Err(status.into()),
            Err(_) => Err(deadline_exceeded(" with no answer".to_owned())),
        }
    }

    /// Runs `attempt` until it succeeds, fails with a code `policy` does not retry, runs out
    /// of attempts, or the client's timeout would pass before the next attempt could start.
    /// Each attempt gets what remains of the timeout as its `budget`.
    async fn retrying<T, F, Fut>(
        &self,
        policy: RetryPolicy,
        mut attempt: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(Option<Duration>) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let deadline = self.timeout.map(|timeout| Instant::now() + timeout);
        let remaining =
            || deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()));
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let err = match attempt(remaining()).await {
                Ok(answer) => return Ok(answer),
                Err(err) => err,
            };
            let jitter = rand::random::<f64>();
            match policy.next_wait(attempts, err.code(), remaining(), jitter) {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return Err(gave_up(err, attempts)),
            }
        }
    }
}

/// The error of the last attempt, saying how many were made when there was more than one.
fn gave_up(err: ClientError, attempts: u32) -> ClientError {
    match err {
        ClientError::Status { code, message } if attempts > 1 => ClientError::Status {
            code,
            message: format!("{message} (after {attempts} attempts)"),
        },
        err => err,
    }
}

/// Fetches pages with `fetch(page_token)` until the last one (at most [`LIST_PAGES_MAX`]),
/// refusing a server that hands back the token it was given, which would loop forever.
async fn collect_pages<T, F, Fut>(request: &str, mut fetch: F) -> Result<Vec<T>, ClientError>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, Option<String>), ClientError>>,
{
    let mut items = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..LIST_PAGES_MAX {
        let (page, next) = fetch(token.clone()).await?;
        items.extend(page);
        match next {
            None => return Ok(items),
            Some(next) if token.as_deref() == Some(next.as_str()) => {
                return Err(ClientError::UnexpectedReply {
                    request: request.to_owned(),
                    reason: format!("the server returned page token {next:?} twice"),
                    reply: Value::Null,
                });
            }
            Some(next) => token = Some(next),
        }
    }
    Err(ClientError::UnexpectedReply {
        request: request.to_owned(),
        reason: format!("more than {LIST_PAGES_MAX} pages"),
        reply: Value::Null,
    })
}

/// Refuses a message holding an integer beyond ±[`EXACT_INTEGER_MAX`], which the wire's
/// doubles would silently round (`9007199254740993` would arrive as `…992`).
/// [`Client::call`] and [`Client::cast`] run it; it is public so a caller can check input
/// before connecting.
pub fn check_exact_integers(message: &Value) -> Result<(), ClientError> {
    match find_inexact_integer(message, "message", 0) {
        None => Ok(()),
        Some((path, number)) => Err(ClientError::InvalidMessage {
            reason: format!(
                "{path} is {number}: numbers travel as doubles, which hold integers exactly \
                 only up to {EXACT_INTEGER_MAX} (2^53); send it as a string instead"
            ),
        }),
    }
}

/// The path and text of the first integer beyond ±2^53 in `value`. Stops looking below
/// the wire's nesting limit, which the server enforces itself.
fn find_inexact_integer(value: &Value, path: &str, depth: usize) -> Option<(String, String)> {
    if depth > statehouse_proto::value::MAX_DEPTH {
        return None;
    }
    match value {
        Value::Number(number) => {
            let magnitude = number
                .as_u64()
                .or_else(|| number.as_i64().map(i64::unsigned_abs))?;
            (magnitude > EXACT_INTEGER_MAX).then(|| (path.to_owned(), number.to_string()))
        }
        Value::Array(items) => items.iter().enumerate().find_map(|(index, item)| {
            find_inexact_integer(item, &format!("{path}[{index}]"), depth + 1)
        }),
        Value::Object(fields) => fields.iter().find_map(|(name, field)| {
            find_inexact_integer(field, &format!("{path}.{name}"), depth + 1)
        }),
        Value::Null | Value::Bool(_) | Value::String(_) => None,
    }
}

/// Parses and checks a server URL into a tonic endpoint.
fn endpoint_for(url: &str) -> Result<Endpoint, ClientError> {
    let invalid = |reason: String| ClientError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    match url.split_once("://") {
        Some(("http", _)) => {}
        Some((scheme, _)) => {
            return Err(invalid(format!(
                "scheme {scheme:?} is not supported; use http://HOST:PORT"
            )))
        }
        None => return Err(invalid("no scheme; use http://HOST:PORT".to_owned())),
    }
    let endpoint =
        Endpoint::from_shared(url.to_owned()).map_err(|err| invalid(error_chain(&err)))?;
    Ok(endpoint.connect_timeout(CONNECT_TIMEOUT))
}

/// Turns an optional wire value into JSON; a missing value is `null`.
pub(crate) fn decode_value(
    value: Option<prost_types::Value>,
    request: impl FnOnce() -> String,
) -> Result<Value, ClientError> {
    proto_to_json(value.unwrap_or_default()).map_err(|err| ClientError::UnexpectedReply {
        request: request(),
        reason: err.to_string(),
        reply: Value::Null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::value::Kind;

    #[test]
    fn urls_need_the_http_scheme() {
        assert!(endpoint_for("http://127.0.0.1:50051").is_ok());
        let err = endpoint_for("127.0.0.1:50051").unwrap_err();
        assert!(err.is_local_input());
        assert!(err.to_string().contains("no scheme"), "{err}");
        let err = endpoint_for("ftp://host:1").unwrap_err();
        assert!(err.to_string().contains("\"ftp\""), "{err}");
        assert!(endpoint_for("http://exa mple:1").is_err());
    }

    #[test]
    fn integers_beyond_2_pow_53_are_refused_before_sending() {
        use serde_json::json;
        let exact = EXACT_INTEGER_MAX as i64;
        assert!(check_exact_integers(&json!({"op": "incr", "by": exact})).is_ok());
        assert!(check_exact_integers(&json!({"by": -exact, "f": 1e300})).is_ok());
        let err = check_exact_integers(&json!({"op": "set", "value": {"ids": [1, exact + 1]}}))
            .unwrap_err();
        assert!(err.is_local_input());
        assert_eq!(err.code(), Code::InvalidArgument);
        let text = err.to_string();
        assert!(text.contains("message.value.ids[1]"), "{text}");
        assert!(text.contains("9007199254740993"), "{text}");
        assert!(check_exact_integers(&json!({"by": i64::MIN})).is_err());
        assert!(check_exact_integers(&json!({"by": u64::MAX})).is_err());
    }

    #[test]
    fn missing_values_decode_as_null() {
        assert_eq!(decode_value(None, String::new).unwrap(), Value::Null);
    }

    #[test]
    fn undecodable_values_are_unexpected_replies() {
        let nan = prost_types::Value {
            kind: Some(Kind::NumberValue(f64::NAN)),
        };
        let err = decode_value(Some(nan), || "call counter/k".to_owned()).unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(err.to_string().contains("call counter/k"), "{err}");
    }

    #[tokio::test]
    async fn unreachable_servers_are_unavailable() {
        // Port 1 on loopback: nothing listens there, so the connection is refused at once.
        let err = Client::connect("http://127.0.0.1:1").await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    }
}
