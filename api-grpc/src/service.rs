//! `TaskService`: checks every request before touching the database and maps each failure to
//! the status code a client can act on. Database text never reaches a client.

use std::pin::Pin;
use std::time::{Duration, Instant};

use base64::Engine;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use futures::Stream;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use uuid::Uuid;

use crate::pb;
use crate::store::{self, StoreError};

pub const MAX_INPUT_BYTES: usize = 64 * 1024;
/// The fully qualified service name, as spans and health checks name it.
pub const SERVICE: &str = "kafkify.task.v1.TaskService";
const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 200;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: String,
}

/// RPC metrics (prefix `kafkify_api_grpc_`).
#[derive(Clone)]
pub struct RpcMetrics {
    duration: Family<RpcLabels, Histogram>,
    in_flight: Gauge,
    /// Shared with the completions consumer.
    pub db: platform::db::QueryMetrics,
}

impl RpcMetrics {
    pub fn register(registry: &mut Registry) -> RpcMetrics {
        let m = RpcMetrics {
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.00025, 2.0, 16))
            }),
            in_flight: Gauge::default(),
            db: platform::db::QueryMetrics::register(registry),
        };
        registry.register(
            "rpc_duration_seconds",
            "RPC duration by method and status code",
            m.duration.clone(),
        );
        registry.register("rpcs_in_flight", "RPCs being served", m.in_flight.clone());
        m
    }

    /// Runs one RPC in its server span (a child of the caller's `traceparent`), counting it.
    async fn track<T>(
        &self,
        method: &'static str,
        traceparent: Option<String>,
        f: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let started = Instant::now();
        let span = tracing::info_span!(
            target: platform::trace::TARGET,
            "rpc",
            otel.name = format!("{SERVICE}/{method}"),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = SERVICE,
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        platform::trace::continue_from(&span, traceparent.as_deref());
        self.in_flight.inc();
        let out = f.instrument(span.clone()).await;
        self.in_flight.dec();
        let code = match &out {
            Ok(_) => "OK".to_string(),
            Err(s) => format!("{:?}", s.code()),
        };
        let numeric = out.as_ref().err().map_or(0, |s| s.code() as i32);
        span.record("rpc.grpc.status_code", numeric);
        // Server spans are errors for the codes that mean the server failed.
        if matches!(
            out.as_ref().err().map(|s| s.code()),
            Some(
                tonic::Code::Internal
                    | tonic::Code::Unavailable
                    | tonic::Code::DataLoss
                    | tonic::Code::Unknown
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unimplemented
            )
        ) {
            span.record("otel.status_code", "ERROR");
        }
        self.duration
            .get_or_create(&RpcLabels { method, code })
            .observe(started.elapsed().as_secs_f64());
        out
    }
}

pub struct TaskService {
    pub pool: Pool,
    pub metrics: RpcMetrics,
    /// Ids of tasks that changed (from NOTIFY), for WatchTask.
    pub changes: broadcast::Sender<Uuid>,
}

fn db_status(e: StoreError) -> Status {
    match e {
        StoreError::KeyReused(_) => Status::already_exists(e.to_string()),
        // The server's own expiry: the caller may see this or its client's CANCELLED, whichever
        // comes first; nothing was written either way.
        StoreError::DeadlineExceeded(_) => Status::deadline_exceeded(
            "the deadline passed before the task was stored; nothing was written",
        ),
        StoreError::Db(cause) | StoreError::Pool(cause) => {
            tracing::error!(%cause, "database failure");
            Status::unavailable("the database is unavailable; retry later")
        }
    }
}

fn parse_id(id: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(id).map_err(|_| Status::invalid_argument(format!("id `{id}` is not a UUID")))
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn to_pb(t: store::Task) -> pb::Task {
    pb::Task {
        id: t.id.to_string(),
        r#type: t.task_type,
        input: t.input,
        status: match t.status {
            store::Status::Pending => pb::TaskStatus::Pending,
            store::Status::Completed => pb::TaskStatus::Completed,
            store::Status::Failed => pb::TaskStatus::Failed,
        } as i32,
        result: t.result,
        error: t.error,
        created_at: Some(timestamp(t.created_at)),
        updated_at: Some(timestamp(t.updated_at)),
        completed_at: t.completed_at.map(timestamp),
    }
}

/// Task types: 1–100 of a-z, 0-9, '.', '_' and '-'.
fn valid_type(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 100
        && t.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// The time left of the caller's deadline, from the `grpc-timeout` header (digits and a unit:
/// H, M, S, m, u or n). tonic enforces it on the call; we also hand it to Postgres.
fn deadline<T>(req: &Request<T>) -> Option<Duration> {
    parse_grpc_timeout(req.metadata().get("grpc-timeout")?.to_str().ok()?)
}

fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The caller's W3C trace context; a malformed one is dropped, as in the REST API.
fn traceparent<T>(req: &Request<T>) -> Option<String> {
    let tp = req.metadata().get("traceparent")?.to_str().ok()?;
    platform::trace::parse(tp).map(|cx| platform::trace::format(&cx))
}

/// Page tokens: base64url of "<created_at micros>:<id>:<status filter>".
fn page_token(t: &store::Task, status: i32) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
        "{}:{}:{status}",
        t.created_at.timestamp_micros(),
        t.id
    ))
}

fn parse_page_token(token: &str, status: i32) -> Result<(DateTime<Utc>, Uuid), Status> {
    let bad = || Status::invalid_argument("page_token is not a token this service returned");
    let text = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let text = String::from_utf8(text).map_err(|_| bad())?;
    let mut parts = text.splitn(3, ':');
    let micros: i64 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let id = parts
        .next()
        .and_then(|p| Uuid::parse_str(p).ok())
        .ok_or_else(bad)?;
    let filter: i32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    if filter != status {
        return Err(Status::failed_precondition(
            "page_token belongs to a listing with another status filter",
        ));
    }
    Ok((
        DateTime::<Utc>::from_timestamp_micros(micros).ok_or_else(bad)?,
        id,
    ))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Task, Status>> + Send>>;

#[tonic::async_trait]
impl pb::task_service_server::TaskService for TaskService {
    async fn process_task(
        &self,
        req: Request<pb::ProcessTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let tp = traceparent(&req);
        let deadline = deadline(&req).map(|d| Instant::now() + d);
        let r = req.into_inner();
        self.metrics
            .track("ProcessTask", tp.clone(), async {
                if !valid_type(&r.r#type) {
                    return Err(Status::invalid_argument(
                        "type must be 1–100 characters of a-z, 0-9, '.', '_' and '-'",
                    ));
                }
                if r.input.len() > MAX_INPUT_BYTES {
                    return Err(Status::invalid_argument(format!(
                        "input must be at most {MAX_INPUT_BYTES} bytes"
                    )));
                }
                let input: serde_json::Value = serde_json::from_str(&r.input)
                    .map_err(|e| Status::invalid_argument(format!("input is not JSON: {e}")))?;
                if r.input.contains("\\u0000") {
                    return Err(Status::invalid_argument(
                        "input must not contain the NUL character",
                    ));
                }
                let key = (!r.idempotency_key.is_empty()).then_some(r.idempotency_key.as_str());
                if key.is_some_and(|k| {
                    k.len() > 255 || !k.bytes().all(|b| (0x21..=0x7e).contains(&b))
                }) {
                    return Err(Status::invalid_argument(
                        "idempotency_key must be 1–255 visible ASCII characters",
                    ));
                }
                // The task.process row carries the database span's context: the relay's span
                // becomes its child.
                let span = platform::trace::db_span("INSERT", "tasks");
                let tp = platform::trace::traceparent_of(&span, tp.as_deref());
                let create =
                    store::create(&self.pool, &r.r#type, &input, key, tp.as_deref(), deadline)
                        .instrument(span);
                let task = self
                    .metrics
                    .db
                    .time("process_task", create)
                    .await
                    .map_err(db_status)?;
                Ok(Response::new(to_pb(task)))
            })
            .await
    }

    async fn get_task_status(
        &self,
        req: Request<pb::GetTaskStatusRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        self.metrics
            .track("GetTaskStatus", traceparent(&req), async {
                let id = parse_id(&req.get_ref().id)?;
                let task = self.metrics.db.time("get_task", store::get(&self.pool, id));
                match task.await.map_err(db_status)? {
                    Some(t) => Ok(Response::new(to_pb(t))),
                    None => Err(Status::not_found(format!("no task with id {id}"))),
                }
            })
            .await
    }

    async fn list_tasks(
        &self,
        req: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        self.metrics
            .track("ListTasks", traceparent(&req), async {
                let r = req.into_inner();
                let limit = match r.page_size {
                    0 => DEFAULT_PAGE,
                    n if (1..=MAX_PAGE as i32).contains(&n) => n as i64,
                    n => {
                        return Err(Status::invalid_argument(format!(
                            "page_size must be 0–{MAX_PAGE}, got {n}"
                        )))
                    }
                };
                let status = match pb::TaskStatus::try_from(r.status) {
                    Ok(pb::TaskStatus::Unspecified) => None,
                    Ok(pb::TaskStatus::Pending) => Some(store::Status::Pending),
                    Ok(pb::TaskStatus::Completed) => Some(store::Status::Completed),
                    Ok(pb::TaskStatus::Failed) => Some(store::Status::Failed),
                    Err(_) => {
                        return Err(Status::invalid_argument(format!(
                            "status {} is not a TaskStatus",
                            r.status
                        )))
                    }
                };
                let after = match r.page_token.as_str() {
                    "" => None,
                    token => Some(parse_page_token(token, r.status)?),
                };
                let list = store::list(&self.pool, status, after, limit);
                let mut tasks = self
                    .metrics
                    .db
                    .time("list_tasks", list)
                    .await
                    .map_err(db_status)?;
                let next_page_token = if tasks.len() as i64 > limit {
                    tasks.truncate(limit as usize);
                    tasks
                        .last()
                        .map(|t| page_token(t, r.status))
                        .unwrap_or_default()
                } else {
                    String::new()
                };
                Ok(Response::new(pb::ListTasksResponse {
                    tasks: tasks.into_iter().map(to_pb).collect(),
                    next_page_token,
                }))
            })
            .await
    }

    type WatchTaskStream = WatchStream;

    async fn watch_task(
        &self,
        req: Request<pb::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let id = parse_id(&req.get_ref().id)?;
        // Subscribe before the first read, so no change falls between them.
        let mut changes = self.changes.subscribe();
        let first = store::get(&self.pool, id)
            .await
            .map_err(db_status)?
            .ok_or_else(|| Status::not_found(format!("no task with id {id}")))?;
        let pool = self.pool.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last = first.updated_at;
            let done = first.status.is_final();
            if tx.send(Ok(to_pb(first))).await.is_err() || done {
                return;
            }
            loop {
                // A NOTIFY for this task, or every second in case one was missed (another replica's
                // listener reconnecting, a lagging subscriber).
                tokio::select! {
                    _ = tx.closed() => return,
                    changed = changes.recv() => match changed {
                        Ok(changed) if changed != id => continue,
                        _ => {}
                    },
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                let task = match store::get(&pool, id).await {
                    Ok(Some(t)) => t,
                    Ok(None) => {
                        let _ = tx
                            .send(Err(Status::not_found(format!(
                                "task {id} no longer exists"
                            ))))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(db_status(e))).await;
                        return;
                    }
                };
                if task.updated_at != last {
                    last = task.updated_at;
                    let done = task.status.is_final();
                    if tx.send(Ok(to_pb(task))).await.is_err() || done {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Forwards NOTIFYs on [`store::NOTIFY_CHANNEL`] to `changes`, reconnecting when the
/// connection drops, until `shutdown`. Counts each one in `received`: watchers also poll every
/// second as a safety net, so only this counter shows that notifications arrive at all.
pub async fn listen(
    url: platform::db::PgUrl,
    changes: broadcast::Sender<Uuid>,
    received: prometheus_client::metrics::counter::Counter,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use futures::StreamExt;
    while !shutdown.is_cancelled() {
        // The pool's TLS settings: with sslmode=require this connection is encrypted too.
        let connected = url.config.connect(url.tls()).await;
        let (client, mut connection) = match connected {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %platform::db::describe(&e), "task notifications: cannot connect; retrying");
                tokio::select! { _ = shutdown.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(2)) => continue }
            }
        };
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        let listen_sql = format!("LISTEN {}", store::NOTIFY_CHANNEL);
        let listen = client.batch_execute(&listen_sql);
        tokio::pin!(listen);
        let mut listening = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = &mut listen, if !listening => {
                    if let Err(e) = r {
                        tracing::warn!(error = %platform::db::describe(&e), "task notifications: LISTEN failed");
                        break;
                    }
                    listening = true;
                }
                m = messages.next() => match m {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                        received.inc();
                        if let Ok(id) = Uuid::parse_str(n.payload()) {
                            let _ = changes.send(id);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                },
            }
        }
        tokio::select! { _ = shutdown.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
    }
}

/// gRPC's status code table answers a message larger than allowed with RESOURCE_EXHAUSTED;
/// tonic's decoder says OUT_OF_RANGE. Its answer is rewritten on the way out (it is a
/// trailers-only response, so the status is in the headers).
pub fn oversized_is_resource_exhausted<B>(
    mut resp: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    // Every response passes here: parse the status, and read the message only for that one.
    let headers = resp.headers_mut();
    let out_of_range = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        == Some(tonic::Code::OutOfRange as i32);
    // The message is percent-encoded on the wire.
    let too_large = || {
        headers.get("grpc-message").is_some_and(|m| {
            String::from_utf8_lossy(m.as_bytes())
                .replace("%20", " ")
                .contains("message length too large")
        })
    };
    if out_of_range && too_large() {
        headers.insert(
            "grpc-status",
            tonic::codegen::http::HeaderValue::from(tonic::Code::ResourceExhausted as i32),
        );
    }
    resp
}

/// The interceptor that lets a call in only with a valid `authorization: Bearer <key>`.
pub fn authenticate(
    keys: platform::auth::ApiKeys,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |req: tonic::Request<()>| {
        let header = req.metadata().get("authorization").map(|v| v.as_bytes());
        match keys.check(header) {
            Ok(()) => Ok(req),
            Err(why) => Err(tonic::Status::unauthenticated(why.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_types() {
        assert!(valid_type("checksum"));
        assert!(valid_type("image.resize-v2_x"));
        assert!(!valid_type(""));
        assert!(!valid_type("Upper"));
        assert!(!valid_type(&"a".repeat(101)));
    }

    #[test]
    fn page_tokens_round_trip_and_keep_their_filter() {
        let now = DateTime::<Utc>::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let t = store::Task {
            id: Uuid::from_u128(5),
            task_type: "t".into(),
            input: "{}".into(),
            status: store::Status::Pending,
            result: None,
            error: None,
            created_at: now,
            updated_at: now,
            completed_at: None,
        };
        let token = page_token(&t, 1);
        assert_eq!(parse_page_token(&token, 1).unwrap(), (now, t.id));
        assert_eq!(
            parse_page_token(&token, 2).unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            parse_page_token("garbage!", 1).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn grpc_timeout_header() {
        assert_eq!(parse_grpc_timeout("300m"), Some(Duration::from_millis(300)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("999999u"),
            Some(Duration::from_micros(999_999))
        );
        // At most eight digits, a known unit, nothing else.
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("+1S"), None);
    }
}
