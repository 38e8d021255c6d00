//! The tasks table, its `task.process` outbox events, and completions. Every change to a task
//! happens in one transaction with its event (or, for completions, its notification).

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use schemas::{TaskCompleted, TaskOutcome, TaskProcess};
use tokio_postgres::Row;
use uuid::Uuid;

/// The channel api-grpc replicas LISTEN on to learn that a task changed.
pub const NOTIFY_CHANNEL: &str = "kafkify_task_changed";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Pending,
    Completed,
    Failed,
}

impl Status {
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Pending => "PENDING",
            Status::Completed => "COMPLETED",
            Status::Failed => "FAILED",
        }
    }

    fn parse(s: &str) -> Status {
        match s {
            "COMPLETED" => Status::Completed,
            "FAILED" => Status::Failed,
            _ => Status::Pending,
        }
    }

    pub fn is_final(&self) -> bool {
        !matches!(self, Status::Pending)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: Uuid,
    pub task_type: String,
    /// JSON text.
    pub input: String,
    pub status: Status,
    pub result: Option<String>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str =
    "id, task_type, input::text, status, result::text, error, created_at, updated_at, completed_at";

fn task(row: &Row) -> Task {
    Task {
        id: row.get(0),
        task_type: row.get(1),
        input: row.get(2),
        status: Status::parse(row.get(3)),
        result: row.get(4),
        error: row.get(5),
        created_at: row.get(6),
        updated_at: row.get(7),
        completed_at: row.get(8),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("idempotency key `{0}` was already used for a different task")]
    KeyReused(String),
    /// The statement outran the caller's deadline (`statement_timeout` set from
    /// `grpc-timeout`); its transaction rolled back.
    #[error("the deadline passed before the database finished: {0}")]
    DeadlineExceeded(String),
    #[error("database: {0}")]
    Db(String),
    #[error("database pool: {0}")]
    Pool(String),
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> StoreError {
        if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) {
            return StoreError::DeadlineExceeded(platform::db::describe(&e));
        }
        StoreError::Db(platform::db::describe(&e))
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> StoreError {
        StoreError::Pool(e.to_string())
    }
}

/// A new task: stored PENDING with its `task.process` event. With an idempotency key, a task
/// already stored under it is returned instead, if it is the same request.
pub async fn create(
    pool: &Pool,
    task_type: &str,
    input: &serde_json::Value,
    idempotency_key: Option<&str>,
    traceparent: Option<&str>,
    deadline: Option<std::time::Instant>,
) -> Result<Task, StoreError> {
    let mut client = pool.get().await?;
    // Measured after the wait for a connection: what is left is what Postgres may use.
    let deadline = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
    // A caller's deadline bounds each statement in Postgres too, so a call that runs out of time
    // while waiting on a lock rolls back there rather than committing after the caller has
    // been told DEADLINE_EXCEEDED. (Postgres 15 has no transaction_timeout; per statement is
    // the closest bound.)
    let time_limit = deadline.map(|d| {
        format!(
            "SET LOCAL statement_timeout = {}",
            d.as_millis().clamp(1, i32::MAX as u128)
        )
    });
    let id = Uuid::now_v7();
    let now = Utc::now();
    let now = DateTime::<Utc>::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
    let insert_sql = format!(
        "INSERT INTO tasks (id, task_type, input, idempotency_key, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $5)
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING {COLUMNS}"
    );
    let event = TaskProcess {
        task_id: id,
        task_type: task_type.to_string(),
        input: input.to_string(),
        created_at: now.timestamp_micros(),
    };
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&id, &task_type, input, &idempotency_key, &now];
    let Some(key) = idempotency_key else {
        // Without a key nothing can conflict: the whole transaction goes out in one round trip.
        let begin = match &time_limit {
            Some(limit) => format!("BEGIN; {limit}"),
            None => "BEGIN".to_string(),
        };
        let created = platform::outbox::write_with_event(
            &client,
            &begin,
            &insert_sql,
            &params,
            &event,
            traceparent,
        )
        .await?;
        // RETURNING always yields the row when the insert happened.
        return created
            .map(|r| task(&r))
            .ok_or_else(|| StoreError::Db("insert returned no row".into()));
    };
    let tx = client.transaction().await?;
    if let Some(limit) = &time_limit {
        tx.batch_execute(limit).await?;
    }
    let insert = tx.prepare_cached(&insert_sql).await?;
    let created = match tx.query_opt(&insert, &params).await? {
        Some(row) => {
            platform::outbox::insert(&tx, &event, traceparent).await?;
            row
        }
        None => {
            let existing = tx
                .query_one(
                    &format!("SELECT {COLUMNS}, (task_type = $2 AND input = $3) FROM tasks WHERE idempotency_key = $1"),
                    &[&key, &task_type, input],
                )
                .await?;
            tx.rollback().await?;
            let same: bool = existing.get(9);
            return if same {
                Ok(task(&existing))
            } else {
                Err(StoreError::KeyReused(key.to_string()))
            };
        }
    };
    tx.commit().await?;
    Ok(task(&created))
}

pub async fn get(pool: &Pool, id: Uuid) -> Result<Option<Task>, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(&format!("SELECT {COLUMNS} FROM tasks WHERE id = $1"))
        .await?;
    Ok(client.query_opt(&stmt, &[&id]).await?.as_ref().map(task))
}

/// Tasks in (created_at, id) order after `after`, optionally of one status; `limit + 1` are
/// fetched so the caller knows whether there is a next page.
pub async fn list(
    pool: &Pool,
    status: Option<Status>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<Task>, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM tasks
             WHERE ($1::text IS NULL OR status = $1)
               AND ($3::uuid IS NULL OR (created_at, id) > ($2::timestamptz, $3::uuid))
             ORDER BY created_at, id
             LIMIT $4"
        ))
        .await?;
    let status = status.map(|s| s.as_str());
    let (after_time, after_id) = match after {
        Some((t, id)) => (Some(t), Some(id)),
        None => (None, None),
    };
    let rows = client
        .query(&stmt, &[&status, &after_time, &after_id, &(limit + 1)])
        .await?;
    Ok(rows.iter().map(task).collect())
}

/// Records a `task.completed` event. Idempotent: only a PENDING task changes, so a duplicated
/// or late event is a no-op. Returns whether the task changed; replicas are told through
/// NOTIFY, in the same transaction.
pub async fn complete(pool: &Pool, event: &TaskCompleted) -> Result<bool, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let status = match event.status {
        TaskOutcome::Completed => Status::Completed,
        TaskOutcome::Failed => Status::Failed,
    };
    // The worker sends JSON text; anything else is kept as a JSON string rather than lost.
    let result: Option<serde_json::Value> = event
        .result
        .as_ref()
        .map(|r| serde_json::from_str(r).unwrap_or_else(|_| serde_json::Value::String(r.clone())));
    let completed_at =
        DateTime::<Utc>::from_timestamp_micros(event.completed_at).unwrap_or_else(Utc::now);
    let stmt = tx
        .prepare_cached(
            "UPDATE tasks SET status = $2, result = $3, error = $4, completed_at = $5,
                    updated_at = greatest(clock_timestamp(), updated_at + interval '1 microsecond')
             WHERE id = $1 AND status = 'PENDING'",
        )
        .await?;
    let changed = tx
        .execute(
            &stmt,
            &[
                &event.task_id,
                &status.as_str(),
                &result,
                &event.error,
                &completed_at,
            ],
        )
        .await?
        == 1;
    if changed {
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&NOTIFY_CHANNEL, &event.task_id.to_string()],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(changed)
}
