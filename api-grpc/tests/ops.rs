//! api-grpc against the real stack: gRPC health and reflection, ops endpoints, SIGTERM.

use std::time::Duration;

use prost::Message as _;

use test_support::service::{check_bad_setting, check_ops_contract, Service};
use test_support::{stack, Source, TestDb};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const BIN: &str = env!("CARGO_BIN_EXE_api-grpc");

fn env(db: &TestDb) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.owner_dsn()),
        ("KAFKA_BROKERS", stack().kafka_brokers.clone()),
        ("GRPC_ADDR", "127.0.0.1:0".into()),
    ]
}

#[tokio::test]
async fn serves_ops_endpoints_and_stops_on_sigterm() {
    let db = TestDb::create(Source::Grpc).await;
    check_ops_contract(BIN, &env(&db), "kafkify_api_grpc").await;
    db.cleanup().await;
}

#[tokio::test]
async fn grpc_health_follows_readiness() {
    let db = TestDb::create(Source::Grpc).await;
    let mut service = Service::spawn(BIN, &env(&db));
    service
        .wait_for("/ready", 200, Duration::from_secs(30))
        .await;
    let grpc_addr = service.addr("grpc_addr").expect("listening");
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .expect("gRPC port answers");
    let mut health = HealthClient::new(channel);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == ServingStatus::Serving as i32 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {status} after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Reflection lists the task service, so `grpcurl -plaintext host:port list` works.
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list")
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "kafkify.task.v1.TaskService"
        ]
    );
    // The same over v1alpha, which Python's grpcio-reflection, Postman, Evans and older grpcurl
    // speak; and the descriptor such a client asks for next, to build its requests.
    {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        let channel = tonic::transport::Channel::from_shared(format!("http://{grpc_addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let requests = vec![
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            },
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(
                    "kafkify.task.v1.TaskService".into(),
                )),
            },
        ];
        let mut responses = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter(requests))
            .await
            .expect("v1alpha reflection is served")
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            responses.message().await.unwrap().unwrap().message_response
        else {
            panic!("not a service list")
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
                "kafkify.task.v1.TaskService"
            ]
        );
        let Some(MessageResponse::FileDescriptorResponse(files)) =
            responses.message().await.unwrap().unwrap().message_response
        else {
            panic!("no file descriptor for the task service")
        };
        let file = prost_types::FileDescriptorProto::decode(&files.file_descriptor_proto[0][..])
            .expect("a FileDescriptorProto");
        assert_eq!(file.package(), "kafkify.task.v1");
        assert!(file.service.iter().any(|s| s.name() == "TaskService"));
    }
    drop(service);
    db.cleanup().await;
}

#[test]
fn a_bad_setting_stops_start_up_naming_it() {
    let url = "postgres://u:p@127.0.0.1/grpc".to_string();
    check_bad_setting(BIN, &[("DATABASE_URL", url.clone())], "API_KEYS");
    // TLS and SASL settings are checked together at start-up.
    check_bad_setting(
        BIN,
        &[
            ("DATABASE_URL", url.clone()),
            ("KAFKA_SECURITY_PROTOCOL", "sasl-ssl".into()),
        ],
        "KAFKA_SASL_MECHANISM",
    );
    check_bad_setting(
        BIN,
        &[
            ("DATABASE_URL", url.clone()),
            ("KAFKA_SECURITY_PROTOCOL", "ssl".into()),
            ("KAFKA_SSL_CA_LOCATION", "/nonexistent/ca.pem".into()),
        ],
        "KAFKA_SSL_CA_LOCATION",
    );
    check_bad_setting(
        BIN,
        &[
            ("DATABASE_URL", url.clone()),
            ("KAFKA_SECURITY_PROTOCOL", "tls".into()),
        ],
        "KAFKA_SECURITY_PROTOCOL",
    );
    check_bad_setting(
        BIN,
        &[("DATABASE_URL", url.clone()), ("API_AUTH", "maybe".into())],
        "API_AUTH",
    );
    check_bad_setting(
        BIN,
        &[("DATABASE_URL", url), ("GRPC_ADDR", "9090".into())],
        "GRPC_ADDR",
    );
}
