//! `statehouse.v1.EntityService`: wire ↔ domain for `Call`, `Cast` (plain or durable, with
//! request ids), `Get`, `Stop`, `Delete`, `List`, `Pipeline`, `Watch`.

use std::sync::Arc;

use statehouse_proto::v1::entity_service_server::EntityService;
use statehouse_proto::v1::{
    CallRequest, CallResponse, CastRequest, CastResponse, DeleteRequest, DeleteResponse,
    GetRequest, GetResponse, ListRequest, ListResponse, PipelineRequest, PipelineResponse,
    StopRequest, StopResponse, WatchEvent, WatchRequest,
};
use statehouse_proto::value::{json_to_proto, proto_to_json};
use std::pin::Pin;

use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use tokio::time::Instant;

use crate::address::EntityId;
use crate::behaviour::Value;
use crate::shard::Shards;

use super::{deadline, status};

/// Serves `EntityService` over the server's shards.
pub struct EntityApi {
    shards: Arc<Shards>,
}

impl EntityApi {
    pub fn new(shards: Arc<Shards>) -> Self {
        EntityApi { shards }
    }
}

/// The address as sent; `shard/` validates it.
fn address(entity_type: String, key: String) -> EntityId {
    EntityId {
        entity_type: entity_type.into(),
        key: key.into(),
    }
}

/// Calls in flight on one `Pipeline` stream, at most: past it the server stops reading the
/// stream until some complete (back-pressure through HTTP/2 flow control).
pub const PIPELINE_IN_FLIGHT_MAX: usize = 4096;

/// The response stream of `Watch`.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;

/// The response stream of `Pipeline`.
pub type PipelineStream = Pin<Box<dyn Stream<Item = Result<PipelineResponse, Status>> + Send>>;

/// One `Pipeline` call, answered as `Call` would answer it.
async fn pipeline_call(
    shards: &Shards,
    request: PipelineRequest,
    deadline: Option<Instant>,
) -> PipelineResponse {
    let id = request.id;
    let outcome = match message(request.message) {
        Ok(message) => shards
            .call(
                address(request.r#type, request.key),
                message,
                deadline,
                request_id(request.request_id),
            )
            .await
            .map_err(Status::from),
        Err(status) => Err(status),
    };
    match outcome {
        Ok(outcome) => PipelineResponse {
            id,
            reply: Some(json_to_proto(outcome.reply)),
            seq: outcome.seq,
            code: 0,
            error: String::new(),
            deduplicated: outcome.deduplicated,
        },
        Err(status) => PipelineResponse {
            id,
            reply: None,
            seq: 0,
            code: status.code() as i32,
            error: status.message().to_owned(),
            deduplicated: false,
        },
    }
}

/// The request id as sent: empty means none.
fn request_id(request_id: String) -> Option<String> {
    (!request_id.is_empty()).then_some(request_id)
}

/// The message of a `Call` or `Cast`: required, and convertible to JSON.
fn message(value: Option<prost_types::Value>) -> Result<Value, Status> {
    let value = value
        .ok_or_else(|| status::invalid_argument("message is required, e.g. {\"op\": \"get\"}"))?;
    proto_to_json(value).map_err(|e| status::invalid_argument(format!("invalid message: {e}")))
}

#[tonic::async_trait]
impl EntityService for EntityApi {
    type PipelineStream = PipelineStream;
    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let request = request.into_inner();
        let feed = self
            .shards
            .watch(address(request.r#type, request.key), request.from_seq)
            .await?;
        let stream = ReceiverStream::new(feed).map(|message| {
            message.map_err(Status::from).map(|message| WatchEvent {
                seq: message.seq,
                events: message.events.into_iter().map(json_to_proto).collect(),
                state: message.state.map(json_to_proto),
                note: message.note.unwrap_or_default(),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn pipeline(
        &self,
        request: Request<Streaming<PipelineRequest>>,
    ) -> Result<Response<PipelineStream>, Status> {
        // The stream's deadline bounds every call on it.
        let deadline = deadline::from_metadata(request.metadata());
        let mut inbound = request.into_inner();
        let (responses, outbound) = mpsc::channel(PIPELINE_IN_FLIGHT_MAX);
        let shards = self.shards.clone();
        tokio::spawn(async move {
            // Polled here rather than spawned: no task per call, one waker per stream.
            let mut in_flight = FuturesUnordered::new();
            let mut reading = true;
            loop {
                tokio::select! {
                    next = inbound.message(), if reading && in_flight.len() < PIPELINE_IN_FLIGHT_MAX => match next {
                        Ok(Some(request)) => in_flight.push(pipeline_call(&shards, request, deadline)),
                        Ok(None) => reading = false,
                        Err(status) => {
                            // The client's side of the stream broke; nobody reads the answers.
                            tracing::debug!(%status, "pipeline stream ended with an error");
                            break;
                        }
                    },
                    Some(response) = in_flight.next(), if !in_flight.is_empty() => {
                        if responses.send(Ok(response)).await.is_err() {
                            break;
                        }
                    },
                    else => break,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(outbound))))
    }

    async fn call(&self, request: Request<CallRequest>) -> Result<Response<CallResponse>, Status> {
        let deadline = deadline::from_metadata(request.metadata());
        let request = request.into_inner();
        let message = message(request.message)?;
        let outcome = self
            .shards
            .call(
                address(request.r#type, request.key),
                message,
                deadline,
                request_id(request.request_id),
            )
            .await?;
        Ok(Response::new(CallResponse {
            reply: Some(json_to_proto(outcome.reply)),
            seq: outcome.seq,
            deduplicated: outcome.deduplicated,
        }))
    }

    async fn cast(&self, request: Request<CastRequest>) -> Result<Response<CastResponse>, Status> {
        let deadline = deadline::from_metadata(request.metadata());
        let request = request.into_inner();
        let message = message(request.message)?;
        let id = address(request.r#type, request.key);
        let request_id = request_id(request.request_id);
        let deduplicated = if request.durable {
            self.shards
                .durable_cast(id, message, deadline, request_id)
                .await?
        } else {
            self.shards.cast(id, message, request_id)?;
            false
        };
        Ok(Response::new(CastResponse { deduplicated }))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let request = request.into_inner();
        let (view, active) = self
            .shards
            .get(address(request.r#type, request.key))
            .await?;
        Ok(Response::new(GetResponse {
            state: Some(json_to_proto(view.state)),
            seq: view.seq,
            active,
        }))
    }

    async fn stop(&self, request: Request<StopRequest>) -> Result<Response<StopResponse>, Status> {
        let request = request.into_inner();
        let was_active = self
            .shards
            .stop(address(request.r#type, request.key))
            .await?;
        Ok(Response::new(StopResponse { was_active }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let deadline = deadline::from_metadata(request.metadata());
        let request = request.into_inner();
        let existed = self
            .shards
            .delete(address(request.r#type, request.key), deadline)
            .await?;
        Ok(Response::new(DeleteResponse { existed }))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let request = request.into_inner();
        let token = (!request.page_token.is_empty()).then_some(request.page_token.as_str());
        let page = self
            .shards
            .list(
                &request.r#type,
                &request.key_prefix,
                request.page_size as usize,
                token,
            )
            .await?;
        Ok(Response::new(ListResponse {
            keys: page.keys,
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }
}
