//! processed_events and the worker's outbox. One transaction per batch of one partition's
//! records: every new event's row, and for each new task its `task.completed` event. An event
//! seen before (a redelivery) changes nothing: its task is not completed a second time.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use uuid::Uuid;

use crate::decode::Decoded;

/// One record to store, with where it came from.
pub struct Row<'a> {
    pub event_id: Uuid,
    pub offset: i64,
    pub key: Option<&'a str>,
    pub event: Decoded,
    pub commit_ts: Option<DateTime<Utc>>,
    /// The `task.completed` event a task record produces, and the trace context its outbox
    /// row carries.
    pub completion: Option<(schemas::TaskCompleted, Option<String>)>,
}

/// A database failure: always transient from the worker's point of view, so it retries.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {}", platform::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// One statement for any batch size: the columns travel as arrays. `processed_at` is the
/// moment of the insert, just before the commit, so commit_ts → processed_at is the pipeline's
/// end-to-end latency.
const INSERT: &str = "INSERT INTO processed_events
        (event_id, topic, partition, \"offset\", event_type, event_key, payload, commit_ts, processed_at)
    SELECT e, $2, $3, o, t, k, p::jsonb, c, clock_timestamp()
    FROM UNNEST($1::uuid[], $4::bigint[], $5::text[], $6::text[], $7::text[], $8::timestamptz[])
        AS r(e, o, t, k, p, c)
    ORDER BY o
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id";

/// Records `rows` (one partition's, in offset order) in one transaction. Returns, per row,
/// whether it was new; a row whose event was recorded before, by an earlier delivery or
/// earlier in this batch, is not, and neither it nor its completion changes anything.
pub async fn record_batch(
    pool: &Pool,
    topic: &str,
    partition: i32,
    rows: &[Row<'_>],
) -> Result<Vec<bool>, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let stmt = tx.prepare_cached(INSERT).await?;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
    let offsets: Vec<i64> = rows.iter().map(|r| r.offset).collect();
    let types: Vec<&str> = rows.iter().map(|r| r.event.event_type()).collect();
    let keys: Vec<Option<&str>> = rows.iter().map(|r| r.key).collect();
    let payloads: Vec<String> = rows.iter().map(|r| r.event.payload()).collect();
    let commits: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.commit_ts).collect();
    let inserted: HashSet<Uuid> = tx
        .query(
            &stmt,
            &[
                &ids, &topic, &partition, &offsets, &types, &keys, &payloads, &commits,
            ],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let fresh = first_of_each(rows.iter().map(|r| r.event_id), &inserted);
    // Sent together on the connection, not one round trip each.
    let completions = rows
        .iter()
        .zip(&fresh)
        .filter(|(_, new)| **new)
        .filter_map(|(r, _)| r.completion.as_ref())
        .map(|(done, tp)| platform::outbox::insert(&tx, done, tp.as_deref()));
    futures::future::try_join_all(completions).await?;
    tx.commit().await?;
    Ok(fresh)
}

/// Per id, in order: true for the first occurrence of an id that was inserted.
fn first_of_each(ids: impl Iterator<Item = Uuid>, inserted: &HashSet<Uuid>) -> Vec<bool> {
    let mut seen = HashSet::new();
    ids.map(|id| inserted.contains(&id) && seen.insert(id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_of_an_inserted_id_is_new() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let inserted = HashSet::from([a, c]);
        assert_eq!(
            first_of_each([a, b, a, c, b].into_iter(), &inserted),
            [true, false, false, true, false]
        );
    }
}
