//! `statehouse.v1.AdminService`: the supervision tree, entity reset, deployed behaviours,
//! dead letters, and the server's stats.

use std::sync::Arc;

use statehouse_proto::v1::admin_service_server::AdminService;
use statehouse_proto::v1::{
    BehaviourInfo, BehaviourVersion, DeadLetter as WireDeadLetter, DeployBehaviourRequest,
    DeployBehaviourResponse, DiscardDeadLetterRequest, DiscardDeadLetterResponse,
    ListBehavioursRequest, ListBehavioursResponse, ListDeadLettersRequest, ListDeadLettersResponse,
    RedriveDeadLetterRequest, RedriveDeadLetterResponse, ResetEntityRequest, ResetEntityResponse,
    RollbackBehaviourRequest, RollbackBehaviourResponse, ServerStatsRequest, ServerStatsResponse,
    SupervisionTreeRequest, SupervisionTreeResponse, TreeNode as WireNode,
};
use statehouse_proto::value::json_to_proto;
use tonic::{Request, Response, Status};

use crate::address::EntityId;
use crate::deployment::Deployments;
use crate::shard::{DeadLetterFilter, Shards};
use crate::stats::{ServerStats, StatsSource};
use crate::supervisor::{NodeKind, Strategy, TreeNode};

/// Entities per shard in a tree unless the request says otherwise, and the most it may ask.
const TREE_ENTITIES_DEFAULT: usize = 100;
const TREE_ENTITIES_MAX: usize = 10_000;

/// Dead letters per page unless the request says otherwise, and the most it may ask.
const DEAD_LETTERS_PAGE_DEFAULT: usize = 100;
const DEAD_LETTERS_PAGE_MAX: usize = 1000;

/// Serves `AdminService` over the server's shards.
pub struct AdminApi {
    shards: Arc<Shards>,
    deployments: Arc<Deployments>,
    stats: StatsSource,
}

impl AdminApi {
    pub fn new(shards: Arc<Shards>, deployments: Arc<Deployments>, stats: StatsSource) -> Self {
        AdminApi {
            shards,
            deployments,
            stats,
        }
    }
}

fn stats_to_wire(stats: ServerStats) -> ServerStatsResponse {
    ServerStatsResponse {
        uptime_ms: u64::try_from(stats.uptime.as_millis()).unwrap_or(u64::MAX),
        shards: stats.shards,
        entities_active: stats.entities_active,
        entities_hibernating: stats.entities_hibernating,
        resident_bytes: stats.resident_bytes,
        allocated_bytes: stats.allocator.map(|allocator| allocator.allocated_bytes),
        allocator_resident_bytes: stats.allocator.map(|allocator| allocator.resident_bytes),
        commits: stats.store.commits,
        journal_rounds: stats.store.journal_rounds,
        journal_fsyncs: stats.store.journal_fsyncs,
        journal_bytes_written: stats.store.journal_bytes,
        checkpoints: stats.store.checkpoints,
        overlay_bytes: stats.store.overlay_bytes,
        state_disk_bytes: stats.disk.state_bytes,
        journal_disk_bytes: stats.disk.journal_bytes,
        journal_segments: stats.disk.journal_segments,
        replies_forgotten: stats.replies_forgotten,
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

    async fn deploy_behaviour(
        &self,
        request: Request<DeployBehaviourRequest>,
    ) -> Result<Response<DeployBehaviourResponse>, Status> {
        let request = request.into_inner();
        let version = self
            .deployments
            .deploy(&request.name, &request.source)
            .await?;
        Ok(Response::new(DeployBehaviourResponse { version }))
    }

    async fn list_behaviours(
        &self,
        _request: Request<ListBehavioursRequest>,
    ) -> Result<Response<ListBehavioursResponse>, Status> {
        let mut behaviours: Vec<BehaviourInfo> = self
            .deployments
            .static_types()
            .into_iter()
            .map(|name| BehaviourInfo {
                name,
                builtin: true,
                active_version: 1,
                versions: Vec::new(),
            })
            .collect();
        behaviours.extend(self.deployments.list().into_iter().map(|deployed| {
            BehaviourInfo {
                name: deployed.name,
                builtin: false,
                active_version: deployed.active,
                versions: deployed
                    .versions
                    .into_iter()
                    .map(|(version, deployed_at_ms)| BehaviourVersion {
                        version,
                        deployed_at_ms,
                    })
                    .collect(),
            }
        }));
        Ok(Response::new(ListBehavioursResponse { behaviours }))
    }

    async fn rollback_behaviour(
        &self,
        request: Request<RollbackBehaviourRequest>,
    ) -> Result<Response<RollbackBehaviourResponse>, Status> {
        let (from_version, to_version) = self
            .deployments
            .rollback(&request.into_inner().name)
            .await?;
        Ok(Response::new(RollbackBehaviourResponse {
            from_version,
            to_version,
        }))
    }

    async fn reset_entity(
        &self,
        request: Request<ResetEntityRequest>,
    ) -> Result<Response<ResetEntityResponse>, Status> {
        let request = request.into_inner();
        let id = EntityId {
            entity_type: request.r#type.into(),
            key: request.key.into(),
        };
        let was_quarantined = self.shards.reset(id).await?;
        Ok(Response::new(ResetEntityResponse { was_quarantined }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let request = request.into_inner();
        let filter = match (request.r#type.is_empty(), request.key.is_empty()) {
            (true, true) => DeadLetterFilter::All,
            (false, true) => DeadLetterFilter::Type(request.r#type),
            (false, false) => {
                DeadLetterFilter::Entity(EntityId::new(request.r#type, request.key).map_err(
                    |e| Status::invalid_argument(format!("invalid entity address: {e}")),
                )?)
            }
            (true, false) => {
                return Err(Status::invalid_argument(
                    "a key filter needs a type: set type as well",
                ))
            }
        };
        let page_size = match request.page_size {
            0 => DEAD_LETTERS_PAGE_DEFAULT,
            n => (n as usize).min(DEAD_LETTERS_PAGE_MAX),
        };
        let after = if request.page_token.is_empty() {
            None
        } else {
            let (entity_type, key, id): (String, String, String) =
                serde_json::from_str(&request.page_token).map_err(|_| {
                    Status::invalid_argument(
                        "invalid page token: pass the next_page_token of the previous page",
                    )
                })?;
            Some((
                EntityId {
                    entity_type: entity_type.into(),
                    key: key.into(),
                },
                id,
            ))
        };
        let mut found = self
            .shards
            .dead_letters(filter, after, page_size + 1)
            .await?;
        let next_page_token = if found.len() > page_size {
            found.truncate(page_size);
            found
                .last()
                .map(|d| serde_json::json!([d.entity.entity_type, d.entity.key, d.id]).to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        let dead_letters = found
            .into_iter()
            .map(|d| WireDeadLetter {
                r#type: d.entity.entity_type.into(),
                key: d.entity.key.into(),
                id: d.id,
                kind: d.kind,
                message: Some(json_to_proto(d.message)),
                reason: d.reason,
                attempts: d.attempts,
                dead_at_ms: d.dead_at_ms,
                origin: d.origin,
            })
            .collect();
        Ok(Response::new(ListDeadLettersResponse {
            dead_letters,
            next_page_token,
        }))
    }

    async fn redrive_dead_letter(
        &self,
        request: Request<RedriveDeadLetterRequest>,
    ) -> Result<Response<RedriveDeadLetterResponse>, Status> {
        let request = request.into_inner();
        let id = EntityId {
            entity_type: request.r#type.into(),
            key: request.key.into(),
        };
        if !self.shards.redrive(id.clone(), request.id.clone()).await? {
            return Err(Status::not_found(format!(
                "{id} has no dead letter {:?}; list them with ListDeadLetters",
                request.id
            )));
        }
        Ok(Response::new(RedriveDeadLetterResponse {}))
    }

    async fn discard_dead_letter(
        &self,
        request: Request<DiscardDeadLetterRequest>,
    ) -> Result<Response<DiscardDeadLetterResponse>, Status> {
        let request = request.into_inner();
        let id = EntityId {
            entity_type: request.r#type.into(),
            key: request.key.into(),
        };
        let existed = self.shards.discard(id, request.id).await?;
        Ok(Response::new(DiscardDeadLetterResponse { existed }))
    }

    async fn server_stats(
        &self,
        _request: Request<ServerStatsRequest>,
    ) -> Result<Response<ServerStatsResponse>, Status> {
        let stats = self.stats.collect(&self.shards).await?;
        Ok(Response::new(stats_to_wire(stats)))
    }
}
