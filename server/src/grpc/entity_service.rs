//! `statehouse.v1.EntityService`: wire ↔ domain for `Call`, `Cast`, `Get`, `Stop`, `Delete`,
//! `List`.

use std::sync::Arc;

use statehouse_proto::v1::entity_service_server::EntityService;
use statehouse_proto::v1::{
    CallRequest, CallResponse, CastRequest, CastResponse, DeleteRequest, DeleteResponse,
    GetRequest, GetResponse, ListRequest, ListResponse, StopRequest, StopResponse,
};
use statehouse_proto::value::{json_to_proto, proto_to_json};
use tonic::{Request, Response, Status};

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
    EntityId { entity_type, key }
}

/// The message of a `Call` or `Cast`: required, and convertible to JSON.
fn message(value: Option<prost_types::Value>) -> Result<Value, Status> {
    let value = value
        .ok_or_else(|| status::invalid_argument("message is required, e.g. {\"op\": \"get\"}"))?;
    proto_to_json(value).map_err(|e| status::invalid_argument(format!("invalid message: {e}")))
}

#[tonic::async_trait]
impl EntityService for EntityApi {
    async fn call(&self, request: Request<CallRequest>) -> Result<Response<CallResponse>, Status> {
        let deadline = deadline::from_metadata(request.metadata());
        let request = request.into_inner();
        let message = message(request.message)?;
        let outcome = self
            .shards
            .call(address(request.r#type, request.key), message, deadline)
            .await?;
        Ok(Response::new(CallResponse {
            reply: Some(json_to_proto(outcome.reply)),
            seq: outcome.seq,
        }))
    }

    async fn cast(&self, request: Request<CastRequest>) -> Result<Response<CastResponse>, Status> {
        let request = request.into_inner();
        let message = message(request.message)?;
        self.shards
            .cast(address(request.r#type, request.key), message)?;
        Ok(Response::new(CastResponse {}))
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
