//! processed_events and the worker's outbox. One transaction per event: the event's row, and
//! for a task its `task.completed` event, or nothing at all if the event was seen before.

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use uuid::Uuid;

use crate::decode::Decoded;

/// Where a record came from.
pub struct Origin<'a> {
    pub event_id: Uuid,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a str>,
    pub commit_ts: Option<DateTime<Utc>>,
    pub traceparent: Option<&'a str>,
}

/// A database failure: always transient from the worker's point of view, so it retries.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {}", platform::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// Records the event once. Returns false if it was already recorded (a redelivery), in which
/// case nothing changes, the task is not run again and no second completion is written.
pub async fn record(
    pool: &Pool,
    origin: &Origin<'_>,
    event: &Decoded,
    completion: Option<&schemas::TaskCompleted>,
) -> Result<bool, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let stmt = tx
        .prepare_cached(
            "INSERT INTO processed_events (event_id, topic, partition, \"offset\", event_type, event_key, payload, commit_ts)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (event_id) DO NOTHING",
        )
        .await?;
    let inserted = tx
        .execute(
            &stmt,
            &[
                &origin.event_id,
                &origin.topic,
                &origin.partition,
                &origin.offset,
                &event.event_type(),
                &origin.key,
                &event.payload(),
                &origin.commit_ts,
            ],
        )
        .await?;
    if inserted == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    if let Some(done) = completion {
        platform::outbox::insert(&tx, done, origin.traceparent).await?;
    }
    tx.commit().await?;
    Ok(true)
}
