//! `statehouse-noop-server`: a baseline for benchmarks, not a database.
//!
//! It serves `statehouse.v1.EntityService` and gRPC health with the transport settings of
//! `statehouse-server` (tonic, `TCP_NODELAY`, the same HTTP/2 keepalive and message size
//! limits), and its handlers do nothing: every `Call` is answered at once with an empty
//! reply and sequence number 0, every `Pipeline` request likewise, with no entity, journal
//! or disk behind them. Every other RPC answers `UNIMPLEMENTED`.
//!
//! `statehouse bench --workload incr` against it measures what the same requests cost in
//! transport and message codec alone on this machine: the "no-op tonic server" that
//! issue 6 compares durable increments with. (`bench --workload ping` against the real
//! server is a lighter baseline: a health check's messages are nearly empty.)
//!
//! Usage: `statehouse-noop-server [ADDRESS]` (default `127.0.0.1:50052`). It prints
//! `listening on ADDRESS` once it accepts connections, and runs until killed.

use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Duration;

use statehouse_proto::v1::entity_service_server::{EntityService, EntityServiceServer};
use statehouse_proto::v1::{
    CallRequest, CallResponse, CastRequest, CastResponse, DeleteRequest, DeleteResponse,
    GetRequest, GetResponse, ListRequest, ListResponse, PipelineRequest, PipelineResponse,
    StopRequest, StopResponse, WatchEvent, WatchRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

/// The address it listens on without an argument.
const DEFAULT_ADDRESS: &str = "127.0.0.1:50052";

/// The largest message, as `statehouse-server`'s default `message_bytes_max`.
const MESSAGE_BYTES_MAX: usize = 4 << 20;

/// Pipeline answers buffered per stream, as `statehouse-server` allows in flight.
const PIPELINE_BUFFER: usize = 4096;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Handlers that answer without doing anything.
struct NoopEntities;

#[tonic::async_trait]
impl EntityService for NoopEntities {
    type PipelineStream = ResponseStream<PipelineResponse>;
    type WatchStream = ResponseStream<WatchEvent>;

    async fn call(&self, _: Request<CallRequest>) -> Result<Response<CallResponse>, Status> {
        Ok(Response::new(CallResponse::default()))
    }

    async fn pipeline(
        &self,
        request: Request<Streaming<PipelineRequest>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        let mut inbound = request.into_inner();
        let (responses, outbound) = mpsc::channel(PIPELINE_BUFFER);
        tokio::spawn(async move {
            while let Ok(Some(request)) = inbound.message().await {
                let response = PipelineResponse {
                    id: request.id,
                    ..PipelineResponse::default()
                };
                if responses.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(outbound))))
    }

    async fn cast(&self, _: Request<CastRequest>) -> Result<Response<CastResponse>, Status> {
        Err(unimplemented())
    }

    async fn get(&self, _: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        Err(unimplemented())
    }

    async fn stop(&self, _: Request<StopRequest>) -> Result<Response<StopResponse>, Status> {
        Err(unimplemented())
    }

    async fn delete(&self, _: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        Err(unimplemented())
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Err(unimplemented())
    }

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(unimplemented())
    }
}

fn unimplemented() -> Status {
    Status::unimplemented("statehouse-noop-server answers only Call and Pipeline")
}

#[tokio::main]
async fn main() -> ExitCode {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DEFAULT_ADDRESS.to_owned());
    let address: SocketAddr = match address.parse() {
        Ok(address) => address,
        Err(err) => {
            eprintln!("statehouse-noop-server: {address:?} is not a socket address: {err}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("statehouse-noop-server: cannot listen on {address}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().unwrap_or(address);
    let (_health_reporter, health_service) = tonic_health::server::health_reporter();
    let entities = EntityServiceServer::new(NoopEntities)
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX);
    // As statehouse-server: small replies must not wait for delayed ACKs.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    println!("listening on {local}");
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(entities)
        .serve_with_incoming(incoming)
        .await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("statehouse-noop-server: {err}");
            ExitCode::FAILURE
        }
    }
}
