//! The whole pipeline as separate processes, for the tests in this folder: each test gets its
//! own databases, topics and consumer groups.

#![allow(dead_code)]

pub mod faults;

use std::time::{Duration, Instant};

use api_grpc::pb::task_service_client::TaskServiceClient;
use api_grpc::pb::{self, TaskStatus};
use test_support::service::{free_port, workspace_bin, Service};
use test_support::{consumer_group, stack, unique, Source, TestDb};

pub struct Pipeline {
    pub rest_db: TestDb,
    pub grpc_db: TestDb,
    pub worker_db: TestDb,
    pub prefix: String,
    pub group: String,
    pub relay: Service,
    pub rest: Service,
    pub grpc: Service,
    pub worker: Option<Service>,
    pub tasks: TaskServiceClient<test_support::AuthChannel>,
    pub extra: Vec<(&'static str, String)>,
    relay_env: Vec<(&'static str, String)>,
    grpc_env: Vec<(&'static str, String)>,
    pub grpc_port: u16,
}

impl Pipeline {
    pub async fn start() -> Pipeline {
        Pipeline::start_with(Vec::new()).await
    }

    /// The pipeline with `extra` settings for every service.
    pub async fn start_with(extra: Vec<(&'static str, String)>) -> Pipeline {
        let with = |base: Vec<(&'static str, String)>| [base, extra.clone()].concat();
        let (rest_db, grpc_db, worker_db) = (
            TestDb::create(Source::Rest).await,
            TestDb::create(Source::Grpc).await,
            TestDb::create(Source::Worker).await,
        );
        let prefix = format!("{}.", unique("t"));
        let kafka = || ("KAFKA_BROKERS", stack().kafka_brokers.clone());
        let registry = || ("SCHEMA_REGISTRY_URL", stack().schema_registry_url.clone());
        let relay_env = with(vec![
            ("DATABASE_URL", rest_db.relay_dsn()),
            (
                "RELAY_SOURCES",
                format!("{},{},{}", rest_db.name, grpc_db.name, worker_db.name),
            ),
            ("RELAY_TOPIC_PREFIX", prefix.clone()),
            ("RELAY_CHECKPOINT_TOPIC", format!("{prefix}checkpoints")),
            ("RELAY_TOPIC_PARTITIONS", "3".into()),
            kafka(),
            registry(),
        ]);
        let mut relay = Service::spawn(&workspace_bin("cdc-relay"), &relay_env);
        // Ready means the topics exist and the schemas are registered.
        relay.wait_for("/ready", 200, Duration::from_secs(60)).await;
        let mut rest = Service::spawn(
            &workspace_bin("api-rest"),
            &with(vec![("DATABASE_URL", rest_db.owner_dsn())]),
        );
        // api-grpc comes back on the same address after the chaos suite's restart, as behind a
        // Kubernetes Service: the load's client keeps its channel. The one chosen port here.
        let grpc_port = free_port();
        let grpc_env = with(vec![
            ("DATABASE_URL", grpc_db.owner_dsn()),
            ("GRPC_ADDR", format!("127.0.0.1:{grpc_port}")),
            ("TOPIC_PREFIX", prefix.clone()),
            ("COMPLETIONS_GROUP", consumer_group("api-grpc")),
            kafka(),
            registry(),
        ]);
        let mut grpc = Service::spawn(&workspace_bin("api-grpc"), &grpc_env);
        rest.wait_for("/ready", 200, Duration::from_secs(30)).await;
        grpc.wait_for("/ready", 200, Duration::from_secs(30)).await;
        let channel =
            tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc_port}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
        let mut p = Pipeline {
            rest_db,
            grpc_db,
            worker_db,
            prefix,
            group: consumer_group("worker"),
            relay,
            rest,
            grpc,
            worker: None,
            tasks: TaskServiceClient::new(test_support::with_key(channel)),
            extra,
            relay_env,
            grpc_env,
            grpc_port,
        };
        p.start_worker().await;
        p
    }

    pub async fn start_worker(&mut self) {
        self.spawn_worker();
        self.wait_worker_ready(Duration::from_secs(30)).await;
    }

    /// Starts the worker without waiting for it to be ready.
    pub fn spawn_worker(&mut self) {
        self.worker = Some(Service::spawn(
            &workspace_bin("worker"),
            &[
                self.extra.clone(),
                vec![
                    ("DATABASE_URL", self.worker_db.owner_dsn()),
                    ("TOPIC_PREFIX", self.prefix.clone()),
                    ("CONSUMER_GROUP", self.group.clone()),
                    ("TASK_ITERATIONS", "10".into()),
                    ("KAFKA_BROKERS", stack().kafka_brokers.clone()),
                    ("SCHEMA_REGISTRY_URL", stack().schema_registry_url.clone()),
                ],
            ]
            .concat(),
        ));
    }

    pub async fn wait_worker_ready(&mut self, limit: Duration) {
        self.worker
            .as_mut()
            .expect("a worker was started")
            .wait_for("/ready", 200, limit)
            .await;
    }

    pub fn kill_worker(&mut self) {
        let w = self.worker.take().unwrap();
        sigkill(w);
    }

    /// SIGKILLs the relay and starts a new one with the same settings.
    pub async fn restart_relay_after(&mut self, down: Duration) {
        kill_pid(self.relay.pid());
        tokio::time::sleep(down).await;
        self.relay = Service::spawn(&workspace_bin("cdc-relay"), &self.relay_env);
        self.relay
            .wait_for("/health", 200, Duration::from_secs(30))
            .await;
    }

    /// SIGKILLs api-grpc and starts a new one on the same port.
    pub async fn restart_grpc_after(&mut self, down: Duration) {
        kill_pid(self.grpc.pid());
        tokio::time::sleep(down).await;
        self.grpc = Service::spawn(&workspace_bin("api-grpc"), &self.grpc_env);
        self.grpc
            .wait_for("/ready", 200, Duration::from_secs(30))
            .await;
    }

    pub async fn create_resource(&self, name: &str) -> String {
        let resp = test_support::api_client()
            .post(format!("{}/api/v1/resources", self.rest.base()))
            .json(&serde_json::json!({ "name": name }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        resp.json::<serde_json::Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn process_task(&mut self, input: &str) -> pb::Task {
        let req = pb::ProcessTaskRequest {
            r#type: "checksum".into(),
            input: input.into(),
            idempotency_key: String::new(),
        };
        self.tasks.process_task(req).await.unwrap().into_inner()
    }

    pub async fn worker_count(&self, sql: &str) -> i64 {
        self.worker_db
            .owner()
            .await
            .query_one(sql, &[])
            .await
            .unwrap()
            .get(0)
    }

    pub async fn wait_count(&self, sql: &str, want: i64, limit: Duration) {
        let start = Instant::now();
        loop {
            let n = self.worker_count(sql).await;
            if n >= want {
                assert_eq!(n, want, "{sql}");
                return;
            }
            assert!(
                start.elapsed() < limit,
                "{sql}: {n} of {want} after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn stop(self) {
        drop(self.worker);
        drop(self.rest);
        drop(self.grpc);
        drop(self.relay);
        test_support::delete_topics_with_prefix(&self.prefix).await;
        self.rest_db.cleanup().await;
        self.grpc_db.cleanup().await;
        self.worker_db.cleanup().await;
    }
}

/// Ends a service the hard way: no shutdown hook runs.
pub fn sigkill(service: Service) {
    kill_pid(service.pid());
    drop(service);
}

pub fn kill_pid(pid: u32) {
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
}

pub async fn wait_task(
    client: &mut TaskServiceClient<test_support::AuthChannel>,
    id: &str,
    limit: Duration,
) -> pb::Task {
    let start = Instant::now();
    loop {
        let t = client
            .get_task_status(pb::GetTaskStatusRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if t.status != TaskStatus::Pending as i32 {
            return t;
        }
        assert!(
            start.elapsed() < limit,
            "task {id} still pending after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
