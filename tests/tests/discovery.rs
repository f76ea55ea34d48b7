//! What a generic gRPC tool relies on: standard health checking, and server reflection
//! (v1 and v1alpha) describing statehouse's services, so `grpcurl` or
//! `examples/grpc_call.py` can call them without generated code.

use statehouse_tests::TestServer;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

async fn channel(server: &TestServer) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_serving() {
    let server = TestServer::start();
    let mut health = HealthClient::new(channel(&server).await);
    for service in ["", "statehouse.v1.EntityService"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response.status(),
            ServingStatus::Serving,
            "service {service:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_and_describes_the_entity_service() {
    let server = TestServer::start();
    let mut reflection = ServerReflectionClient::new(channel(&server).await);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("statehouse.v1.EntityService".into()),
    ]
    .map(|request| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    });
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();

    let listed = responses.message().await.unwrap().unwrap().message_response;
    let Some(MessageResponse::ListServicesResponse(listed)) = listed else {
        panic!("expected a service list, got {listed:?}");
    };
    let names: Vec<_> = listed.service.iter().map(|s| s.name.as_str()).collect();
    for expected in ["statehouse.v1.EntityService", "grpc.health.v1.Health"] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }

    let described = responses.message().await.unwrap().unwrap().message_response;
    let Some(MessageResponse::FileDescriptorResponse(files)) = described else {
        panic!("expected file descriptors, got {described:?}");
    };
    // The descriptor is binary protobuf; the method names appear in it verbatim.
    let bytes: Vec<u8> = files.file_descriptor_proto.concat();
    for method in ["Call", "Cast", "Get", "Stop", "Delete", "List"] {
        assert!(
            bytes.windows(method.len()).any(|w| w == method.as_bytes()),
            "method {method} not described"
        );
    }
}
