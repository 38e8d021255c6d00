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

/// Prunes once a minute until `shutdown`; `pruned` counts the rows deleted.
pub async fn prune_every_minute(
    pool: deadpool_postgres::Pool,
    retention: std::time::Duration,
    pruned: prometheus_client::metrics::counter::Counter,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(client) = pool.get().await else {
            continue;
        };
        match prune(&client, retention).await {
            Ok(0) => {}
            Ok(n) => {
                pruned.inc_by(n);
                tracing::info!(rows = n, "pruned outbox");
            }
            Err(e) => tracing::warn!(error = %crate::db::describe(&e), "outbox pruning failed"),
        }
    }
}

/// `OUTBOX_RETENTION`: how long outbox rows are kept.
#[derive(Clone, Debug, clap::Args)]
pub struct RetentionArgs {
    /// How long outbox rows are kept before the pruner deletes them (the relay reads the WAL,
    /// so this is only for operators looking back).
    #[arg(long, env = "OUTBOX_RETENTION", default_value = "24h", value_parser = crate::config::parse_duration)]
    pub outbox_retention: std::time::Duration,
}
