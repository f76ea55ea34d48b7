//! Wiring: opens the store, builds the shards, serves gRPC, and shuts down in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use statehouse_proto::v1::admin_service_server::AdminServiceServer;
use statehouse_proto::v1::entity_service_server::EntityServiceServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::behaviour::lua::LuaCompiler;
use crate::behaviour::BehaviourCompiler;
use crate::behaviour::BehaviourRegistry;
use crate::config::{Config, ConfigError};
use crate::deployment::{DeployError, Deployments};
use crate::grpc::{AdminApi, EntityApi};
use crate::shard::Shards;
use crate::shutdown::Shutdown;
use crate::stats::{AllocatorProbe, StatsSource};
use crate::storage::{SledStore, Store, StoreError};
use crate::supervisor::RootSupervisor;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open data dir: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load deployed behaviours: {0}")]
    Deployments(#[from] DeployError),
    #[error("the root supervisor gave up: {0}")]
    GaveUp(String),
    #[error("server reflection: {0}")]
    Reflection(#[source] tonic_reflection::server::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("graceful shutdown did not finish within {0:?}")]
    ShutdownTimeout(Duration),
    #[error("start-up task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A statehouse server: configuration plus the entity types it serves.
pub struct Server {
    config: Config,
    registry: BehaviourRegistry,
    compiler: Option<Arc<dyn BehaviourCompiler>>,
    allocator: Option<AllocatorProbe>,
}

impl Server {
    /// A server with the built-in entity types.
    pub fn new(config: Config) -> Self {
        Server::with_registry(config, BehaviourRegistry::with_builtins())
    }

    /// A server with the given entity types (embedders add their own Rust behaviours here).
    pub fn with_registry(config: Config, registry: BehaviourRegistry) -> Self {
        Server {
            config,
            registry,
            compiler: default_compiler(),
            allocator: None,
        }
    }

    /// Reports the global allocator's figures in the server's stats through `probe`.
    pub fn with_allocator_probe(mut self, probe: AllocatorProbe) -> Self {
        self.allocator = Some(probe);
        self
    }

    /// Replaces the script engine used for deployed behaviours (`None`: deploys are refused).
    pub fn with_compiler(mut self, compiler: Option<Arc<dyn BehaviourCompiler>>) -> Self {
        self.compiler = compiler;
        self
    }

    /// Opens the data dir (migrations and journal recovery run here), serves until `shutdown`
    /// triggers, then shuts down gracefully: no new RPCs, in-flight ones finish, every entity
    /// drains its mailbox, the journal syncs and a checkpoint runs.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), ServerError> {
        let config = self.config;
        config.validate()?;
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        let store_config = config.store_config();
        tracing::info!(data_dir = %config.data_dir.display(), "opening data dir");
        let store: Arc<dyn Store> =
            tokio::task::spawn_blocking(move || SledStore::open(store_config)).await??;
        tracing::info!(shards = store.shard_count(), durability = ?config.durability, "data dir ready");

        let root = Arc::new(RootSupervisor::new(
            store.shard_count(),
            config.supervision.root,
            shutdown.clone(),
        ));
        let registry = Arc::new(self.registry);
        let deployments =
            Arc::new(Deployments::load(registry.clone(), store.clone(), self.compiler).await?);
        let shards = Arc::new(Shards::new(
            registry,
            store.clone(),
            config.entity_config(),
            config.supervision.clone(),
            root.clone(),
        ));
        let admin = AdminApi::new(
            shards.clone(),
            deployments,
            StatsSource::new(self.allocator),
        );
        let served = serve_with_drain_limit(&config, shards.clone(), admin, shutdown.clone()).await;

        // Whatever ended serving, entities and the store still close in order.
        shutdown.trigger();
        shards.shutdown().await;
        let closed = store.close().await;
        served?;
        closed?;
        if let Some(reason) = root.gave_up() {
            return Err(ServerError::GaveUp(reason.to_owned()));
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Serves until `shutdown`, then gives in-flight RPCs `shutdown_timeout_ms` to finish. A
/// client that never lets its connection close cannot hold the shutdown hostage: past the
/// limit its connection is dropped and entities and the store close as usual, so the drain of
/// mailboxes and the final checkpoint always happen.
async fn serve_with_drain_limit(
    config: &Config,
    shards: Arc<Shards>,
    admin: AdminApi,
    shutdown: Shutdown,
) -> Result<(), ServerError> {
    let limit = Duration::from_millis(config.shutdown_timeout_ms);
    let drain_expired = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.triggered().await;
            tokio::time::sleep(limit).await;
        }
    };
    tokio::select! {
        served = serve(config, shards, admin, shutdown) => served,
        () = drain_expired => {
            tracing::warn!(?limit, "in-flight requests did not finish in time; closing their connections");
            Ok(())
        }
    }
}

/// Binds the listener and serves gRPC until `shutdown`.
async fn serve(
    config: &Config,
    shards: Arc<Shards>,
    admin: AdminApi,
    shutdown: Shutdown,
) -> Result<(), ServerError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            address: config.listen,
            source,
        })?;
    let address = listener.local_addr().map_err(|source| ServerError::Bind {
        address: config.listen,
        source,
    })?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<EntityServiceServer<EntityApi>>()
        .await;
    // Both reflection versions: grpcurl and Python's grpcio-reflection still ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(statehouse_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(ServerError::Reflection)?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(ServerError::Reflection)?;
    let admin = AdminServiceServer::new(admin);
    let entities = EntityServiceServer::new(EntityApi::new(shards))
        .max_decoding_message_size(config.message_bytes_max)
        .max_encoding_message_size(config.message_bytes_max);

    // TCP_NODELAY: without it, small replies wait for delayed ACKs (~40 ms stalls).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tracing::info!("listening on {address}");
    let stopping = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.triggered().await;
            health_reporter
                .set_not_serving::<EntityServiceServer<EntityApi>>()
                .await;
            tracing::info!("no longer accepting requests; finishing those in flight");
        }
    };
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(entities)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, stopping)
        .await?;
    Ok(())
}

/// Runs `server` until SIGTERM or Ctrl-C. For `main`.
pub async fn run_until_signalled(server: Server) -> Result<(), ServerError> {
    let shutdown = Shutdown::new();
    shutdown
        .trigger_on_signals()
        .map_err(ServerError::Signals)?;
    server.run(shutdown).await
}

/// The script engine a server uses unless told otherwise: Lua (Luau), default limits.
fn default_compiler() -> Option<Arc<dyn BehaviourCompiler>> {
    Some(Arc::new(LuaCompiler::default()))
}
