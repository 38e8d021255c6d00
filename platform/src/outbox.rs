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
    let stmt = tx.prepare_cached(INSERT).await?;
    let row = Row::new(event, traceparent);
    tx.execute(&stmt, &row.params()).await?;
    Ok(row.id)
}

/// One transaction, one round trip: `begin` (e.g. `BEGIN`, optionally with `SET LOCAL`s),
/// `statement` with `params` (its row, if it returns one), the outbox row of `event`, and
/// COMMIT are queued on the connection by the first poll, in this order. If either insert
/// fails, Postgres turns the queued COMMIT into a rollback, so a failure still leaves neither
/// row; a caller that gives up after the first poll cannot stop the COMMIT, exactly as with a
/// COMMIT already sent. Statements are prepared (and cached) first, so nothing waits between
/// BEGIN and COMMIT.
pub async fn write_with_event<E: Event>(
    client: &deadpool_postgres::Client,
    begin: &str,
    statement: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    event: &E,
    traceparent: Option<&str>,
) -> Result<Option<tokio_postgres::Row>, tokio_postgres::Error> {
    let statement = client.prepare_cached(statement).await?;
    let outbox = client.prepare_cached(INSERT).await?;
    let row = Row::new(event, traceparent);
    let row_params = row.params();
    let (_, written, _, _) = tokio::try_join!(
        client.batch_execute(begin),
        client.query_opt(&statement, params),
        client.execute(&outbox, &row_params),
        client.batch_execute("COMMIT"),
    )?;
    Ok(written)
}

/// One outbox row's parameters, in the order of the prepared statement.
struct Row<'a> {
    id: uuid::Uuid,
    aggregate_type: &'static str,
    aggregate_id: String,
    event_type: &'static str,
    payload: serde_json::Value,
    traceparent: Option<&'a str>,
}

impl<'a> Row<'a> {
    fn new<E: Event>(event: &E, traceparent: Option<&'a str>) -> Row<'a> {
        Row {
            id: uuid::Uuid::now_v7(),
            aggregate_type: E::AGGREGATE_TYPE,
            aggregate_id: event.aggregate_id(),
            event_type: E::EVENT_TYPE,
            // Serializing our own types cannot fail: they hold only strings, numbers and maps.
            payload: serde_json::to_value(event).unwrap_or_default(),
            traceparent,
        }
    }

    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 6] {
        [
            &self.id,
            &self.aggregate_type,
            &self.aggregate_id,
            &self.event_type,
            &self.payload,
            &self.traceparent,
        ]
    }
}

/// A table whose rows expire by `created_at`, deleted in batches by their key column.
#[derive(Clone, Copy, Debug)]
pub struct AgedTable {
    pub table: &'static str,
    pub key: &'static str,
}

/// The outbox: the relay reads the WAL, not the table, so old rows are only of use to an
/// operator looking back.
pub const OUTBOX: AgedTable = AgedTable {
    table: "outbox_events",
    key: "id",
};

/// Deletes the rows of `t` older than `retention`, 5,000 at a time so no statement holds locks
/// for long, until none are left. Returns how many went.
pub async fn prune(
    client: &tokio_postgres::Client,
    t: AgedTable,
    retention: std::time::Duration,
) -> Result<u64, tokio_postgres::Error> {
    const BATCH: u64 = 5000;
    let sql = format!(
        "DELETE FROM {table} WHERE {key} IN (
           SELECT {key} FROM {table} WHERE created_at < now() - make_interval(secs => $1) LIMIT {BATCH})",
        table = t.table,
        key = t.key
    );
    let secs = retention.as_secs_f64();
    let mut total = 0;
    loop {
        let n = client.execute(&sql, &[&secs]).await?;
        total += n;
        if n < BATCH {
            return Ok(total);
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct TableLabel {
    table: &'static str,
}

/// Deletes expired rows once a minute; `rows_pruned_total{table}` counts them.
#[derive(Clone)]
pub struct Pruner {
    pruned: prometheus_client::metrics::family::Family<
        TableLabel,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl Pruner {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Pruner {
        let pruner = Pruner {
            pruned: Default::default(),
        };
        registry.register(
            "rows_pruned",
            "Rows deleted by age, by table",
            pruner.pruned.clone(),
        );
        pruner
    }

    /// Prunes `tables` once a minute until `shutdown`.
    pub async fn run(
        self,
        pool: deadpool_postgres::Pool,
        retention: std::time::Duration,
        tables: Vec<AgedTable>,
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
            for t in &tables {
                match prune(&client, *t, retention).await {
                    Ok(0) => {}
                    Ok(n) => {
                        self.pruned
                            .get_or_create(&TableLabel { table: t.table })
                            .inc_by(n);
                        tracing::info!(table = t.table, rows = n, "pruned expired rows");
                    }
                    Err(e) => {
                        tracing::warn!(table = t.table, error = %crate::db::describe(&e), "pruning failed")
                    }
                }
            }
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
