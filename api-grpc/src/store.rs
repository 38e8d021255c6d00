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

/// What a `task.completed` event did to its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The task was PENDING and is final now.
    Applied,
    /// The task was final already (a redelivery, or a second event for it).
    Duplicate,
    /// No task has this id here.
    UnknownTask,
}

impl Completion {
    pub fn as_str(self) -> &'static str {
        match self {
            Completion::Applied => "applied",
            Completion::Duplicate => "duplicate",
            Completion::UnknownTask => "unknown_task",
        }
    }
}

/// Per event, in order: whether it is the first of its task in the batch. Only the first may
/// change the task: as one at a time, a later event for the same task finds it final. (An
/// UPDATE joined to two rows for one task would apply either of them, unpredictably.)
fn first_per_task(events: &[TaskCompleted]) -> Vec<bool> {
    let mut seen = std::collections::HashSet::new();
    events.iter().map(|e| seen.insert(e.task_id)).collect()
}

/// Records a batch of `task.completed` events (one partition's, or several's, each in its
/// order) in one transaction. Idempotent: only a PENDING task changes, so a duplicated or late
/// event is a no-op. Returns what each event did; replicas are told of every change through
/// NOTIFY, in the same transaction.
pub async fn complete(
    pool: &Pool,
    events: &[TaskCompleted],
) -> Result<Vec<Completion>, StoreError> {
    let first = first_per_task(events);
    let mut ids = Vec::new();
    let mut statuses = Vec::new();
    let mut results: Vec<Option<serde_json::Value>> = Vec::new();
    let mut errors = Vec::new();
    let mut completed = Vec::new();
    for (event, _) in events.iter().zip(&first).filter(|(_, f)| **f) {
        ids.push(event.task_id);
        statuses.push(match event.status {
            TaskOutcome::Completed => Status::Completed.as_str(),
            TaskOutcome::Failed => Status::Failed.as_str(),
        });
        // The worker sends JSON text; anything else is kept as a JSON string rather than lost.
        results.push(event.result.as_ref().map(|r| {
            serde_json::from_str(r).unwrap_or_else(|_| serde_json::Value::String(r.clone()))
        }));
        errors.push(event.error.as_deref());
        completed.push(
            DateTime::<Utc>::from_timestamp_micros(event.completed_at).unwrap_or_else(Utc::now),
        );
    }
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let update = tx
        .prepare_cached(
            "UPDATE tasks t SET status = c.status, result = c.result, error = c.error,
                    completed_at = c.completed_at,
                    updated_at = greatest(clock_timestamp(), t.updated_at + interval '1 microsecond')
             FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[], $4::text[], $5::timestamptz[])
                  AS c(id, status, result, error, completed_at)
             WHERE t.id = c.id AND t.status = 'PENDING'
             RETURNING t.id",
        )
        .await?;
    let applied: std::collections::HashSet<Uuid> = tx
        .query(&update, &[&ids, &statuses, &results, &errors, &completed])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !applied.is_empty() {
        let changed: Vec<String> = applied.iter().map(Uuid::to_string).collect();
        tx.execute(
            "SELECT pg_notify($1, id) FROM unnest($2::text[]) AS id",
            &[&NOTIFY_CHANNEL, &changed],
        )
        .await?;
    }
    // What the others found: a final task, or none.
    let others: Vec<Uuid> = events
        .iter()
        .zip(&first)
        .filter(|(e, f)| !(**f && applied.contains(&e.task_id)))
        .map(|(e, _)| e.task_id)
        .collect();
    let known: std::collections::HashSet<Uuid> = if others.is_empty() {
        Default::default()
    } else {
        tx.query("SELECT id FROM tasks WHERE id = ANY($1)", &[&others])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    tx.commit().await?;
    Ok(events
        .iter()
        .zip(&first)
        .map(|(e, f)| {
            if *f && applied.contains(&e.task_id) {
                Completion::Applied
            } else if known.contains(&e.task_id) {
                Completion::Duplicate
            } else {
                Completion::UnknownTask
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(task_id: Uuid) -> TaskCompleted {
        TaskCompleted {
            task_id,
            status: TaskOutcome::Completed,
            result: None,
            error: None,
            completed_at: 0,
        }
    }

    #[test]
    fn only_the_first_event_of_a_task_in_a_batch_may_change_it() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let events = [event(a), event(b), event(a), event(a), event(b)];
        assert_eq!(first_per_task(&events), [true, true, false, false, false]);
    }
}
