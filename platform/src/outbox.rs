//! Writing an outbox row: the one way every service publishes an event. Call it inside the
//! transaction that makes the change the event describes.

use schemas::Event;

const INSERT: &str =
    "INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload, traceparent)
                      VALUES ($1, $2, $3, $4, $5, $6)";

/// Inserts `event` into `outbox_events` (a cached prepared statement). The event id is a
/// time-ordered UUID (v7), so ids sort roughly by creation and the primary key index stays
/// append-mostly.
pub async fn insert<E: Event>(
    tx: &deadpool_postgres::Transaction<'_>,
    event: &E,
    traceparent: Option<&str>,
) -> Result<uuid::Uuid, tokio_postgres::Error> {
    let id = uuid::Uuid::now_v7();
    // Serializing our own types cannot fail: they hold only strings, numbers and maps.
    let payload = serde_json::to_value(event).unwrap_or_default();
    let stmt = tx.prepare_cached(INSERT).await?;
    tx.execute(
        &stmt,
        &[
            &id,
            &E::AGGREGATE_TYPE,
            &event.aggregate_id(),
            &E::EVENT_TYPE,
            &payload,
            &traceparent,
        ],
    )
    .await?;
    Ok(id)
}

/// Deletes outbox rows older than `retention`, a batch at a time, until none are left. The
/// relay reads the WAL, not the table, so old rows are only of use to an operator looking back.
pub async fn prune(
    client: &tokio_postgres::Client,
    retention: std::time::Duration,
) -> Result<u64, tokio_postgres::Error> {
    let secs = retention.as_secs_f64();
    let mut total = 0;
    loop {
        let n = client
            .execute(
                "DELETE FROM outbox_events WHERE id IN (
                   SELECT id FROM outbox_events
                   WHERE created_at < now() - make_interval(secs => $1) LIMIT 5000)",
                &[&secs],
            )
            .await?;
        total += n;
        if n < 5000 {
            return Ok(total);
        }
    }
}
