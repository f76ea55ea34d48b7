//! `statehouse.v1.AdminService`: the supervision tree and entity reset.

use std::sync::Arc;

use statehouse_proto::v1::admin_service_server::AdminService;
use statehouse_proto::v1::{
    ResetEntityRequest, ResetEntityResponse, SupervisionTreeRequest, SupervisionTreeResponse,
    TreeNode as WireNode,
};
use tonic::{Request, Response, Status};

use crate::address::EntityId;
use crate::shard::Shards;
use crate::supervisor::{NodeKind, Strategy, TreeNode};

/// Entities per shard in a tree unless the request says otherwise, and the most it may ask.
const TREE_ENTITIES_DEFAULT: usize = 100;
const TREE_ENTITIES_MAX: usize = 10_000;

/// Serves `AdminService` over the server's shards.
pub struct AdminApi {
    shards: Arc<Shards>,
}

impl AdminApi {
    pub fn new(shards: Arc<Shards>) -> Self {
        AdminApi { shards }
    }
}

fn to_wire(node: TreeNode) -> WireNode {
    WireNode {
        name: node.name,
        kind: match node.kind {
            NodeKind::Supervisor => "supervisor",
            NodeKind::Worker => "worker",
            NodeKind::Entity => "entity",
        }
        .into(),
        strategy: match node.strategy {
            None => "",
            Some(Strategy::OneForOne) => "one_for_one",
            Some(Strategy::OneForAll) => "one_for_all",
            Some(Strategy::RestForOne) => "rest_for_one",
        }
        .into(),
        state: node.state,
        restarts: node.restarts,
        restarts_in_window: node.restarts_in_window,
        mailbox_len: node.mailbox_len,
        last_crash: node.last_crash.unwrap_or_default(),
        children: node.children.into_iter().map(to_wire).collect(),
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn supervision_tree(
        &self,
        request: Request<SupervisionTreeRequest>,
    ) -> Result<Response<SupervisionTreeResponse>, Status> {
        let entities = match request.into_inner().entities_per_shard as usize {
            0 => TREE_ENTITIES_DEFAULT,
            n => n.min(TREE_ENTITIES_MAX),
        };
        let root = to_wire(self.shards.tree(entities));
        Ok(Response::new(SupervisionTreeResponse { root: Some(root) }))
    }

    async fn reset_entity(
        &self,
        request: Request<ResetEntityRequest>,
    ) -> Result<Response<ResetEntityResponse>, Status> {
        let request = request.into_inner();
        let id = EntityId {
            entity_type: request.r#type,
            key: request.key,
        };
        let was_quarantined = self.shards.reset(id).await?;
        Ok(Response::new(ResetEntityResponse { was_quarantined }))
    }
}
