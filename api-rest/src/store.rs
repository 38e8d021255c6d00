//! The resources table and its outbox events. Every write changes the row and inserts exactly
//! one outbox event in the same transaction; a failure rolls both back.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use schemas::{ResourceCreated, ResourceDeleted, ResourceUpdated};
use tokio_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::error::ApiError;
use crate::model::{Cursor, IfMatch, Resource, ResourceInput, SortKey};

const COLUMNS: &str = "id, name, description, attributes, version, created_at, updated_at";

fn resource(row: &Row) -> Resource {
    let attributes: serde_json::Value = row.get("attributes");
    Resource {
        id: row.get("id"),
        name: row.get("name"),
        description: row.get("description"),
        attributes: serde_json::from_value(attributes).unwrap_or_default(),
        version: row.get("version"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
    }
}

fn attributes_json(attributes: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::to_value(attributes).unwrap_or_default()
}

/// What a create returned: the status and body, and whether it is a replay of an earlier
/// request with the same `Idempotency-Key`.
pub struct Created {
    pub status: u16,
    pub body: serde_json::Value,
    pub replayed: bool,
}

/// An `Idempotency-Key` and the hash of the request it came with.
pub struct Idempotency<'a> {
    pub key: &'a str,
    pub request_hash: Vec<u8>,
}

const INSERT_RESOURCE: &str =
    "INSERT INTO resources (id, name, description, attributes, version, created_at, updated_at)
     VALUES ($1, $2, $3, $4, 1, $5, $5)";

/// A new resource (version 1, now) and its `resource.created` event.
fn new_resource(id: Uuid, input: &ResourceInput) -> (Resource, ResourceCreated) {
    let now = Utc::now();
    // Postgres keeps microseconds; so must the event and the response.
    let now = DateTime::<Utc>::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
    let created = Resource {
        id,
        name: input.name.clone(),
        description: input.description.clone(),
        attributes: input.attributes.clone(),
        version: 1,
        created_at: now,
        updated_at: now,
    };
    let event = ResourceCreated {
        resource_id: created.id,
        name: created.name.clone(),
        description: created.description.clone(),
        attributes: created.attributes.clone(),
        version: created.version,
        created_at: now.timestamp_micros(),
    };
    (created, event)
}

pub async fn create(
    pool: &Pool,
    input: &ResourceInput,
    idempotency: Option<Idempotency<'_>>,
    traceparent: Option<&str>,
) -> Result<Created, ApiError> {
    let mut client = pool.get().await?;
    let id = Uuid::now_v7();
    if idempotency.is_none() {
        // Without a key nothing can conflict: the whole transaction goes out in one round trip.
        let (created, event) = new_resource(id, input);
        let attributes = attributes_json(&input.attributes);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [
            &id,
            &input.name,
            &input.description,
            &attributes,
            &created.created_at,
        ];
        platform::outbox::write_with_event(
            &client,
            "BEGIN",
            INSERT_RESOURCE,
            &params,
            &event,
            traceparent,
        )
        .await?;
        return Ok(Created {
            status: 201,
            body: serde_json::to_value(&created).unwrap_or_default(),
            replayed: false,
        });
    }
    let tx = client.transaction().await?;
    if let Some(idem) = &idempotency {
        // A concurrent request with the same key waits here until the first commits, then
        // replays its response.
        let claimed = tx
            .execute(
                "INSERT INTO idempotency_keys (key, request_hash, resource_id) VALUES ($1, $2, $3)
                 ON CONFLICT (key) DO NOTHING",
                &[&idem.key, &idem.request_hash, &id],
            )
            .await?;
        if claimed == 0 {
            let row = tx
                .query_one(
                    "SELECT request_hash, status, response FROM idempotency_keys WHERE key = $1",
                    &[&idem.key],
                )
                .await?;
            tx.rollback().await?;
            let hash: Vec<u8> = row.get(0);
            if hash != idem.request_hash {
                return Err(ApiError::Conflict(format!(
                    "Idempotency-Key `{}` was already used with a different request",
                    idem.key
                )));
            }
            let status: Option<i16> = row.get(1);
            let body: Option<serde_json::Value> = row.get(2);
            return match (status, body) {
                (Some(status), Some(body)) => Ok(Created {
                    status: status as u16,
                    body,
                    replayed: true,
                }),
                _ => Err(ApiError::Conflict(format!(
                    "a request with Idempotency-Key `{}` is in progress",
                    idem.key
                ))),
            };
        }
    }
    // The row's values are all known here, so the resource and its event are sent together
    // (tokio-postgres pipelines them on the connection): one round trip instead of two.
    let (created, event) = new_resource(id, input);
    let now = created.created_at;
    let stmt = tx.prepare_cached(INSERT_RESOURCE).await?;
    let attributes = attributes_json(&input.attributes);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&id, &input.name, &input.description, &attributes, &now];
    let row = tx.execute(&stmt, &params);
    let outbox = platform::outbox::insert(&tx, &event, traceparent);
    tokio::try_join!(row, outbox)?;
    let body = serde_json::to_value(&created).unwrap_or_default();
    if let Some(idem) = &idempotency {
        tx.execute(
            "UPDATE idempotency_keys SET status = 201, response = $2 WHERE key = $1",
            &[&idem.key, &body],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Created {
        status: 201,
        body,
        replayed: false,
    })
}

pub async fn get(pool: &Pool, id: Uuid) -> Result<Resource, ApiError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(&format!("SELECT {COLUMNS} FROM resources WHERE id = $1"))
        .await?;
    match client.query_opt(&stmt, &[&id]).await? {
        Some(row) => Ok(resource(&row)),
        None => Err(not_found(id)),
    }
}

fn not_found(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("no resource with id {id}"))
}

/// Filters and position of one page.
pub struct ListQuery {
    pub sort: SortKey,
    pub limit: i64,
    pub name_prefix: Option<String>,
    pub updated_after: Option<DateTime<Utc>>,
    pub cursor: Option<Cursor>,
}

/// One page in (sort key, id) order, and the cursor of the next page if there is one.
pub async fn list(pool: &Pool, q: &ListQuery) -> Result<(Vec<Resource>, Option<Cursor>), ApiError> {
    let client = pool.get().await?;
    let (order, after) = match q.sort {
        SortKey::UpdatedAt => (
            "updated_at",
            "(updated_at, id) > ($3::timestamptz, $4::uuid)",
        ),
        SortKey::Name => ("name", "(name, id) > ($3::text, $4::uuid)"),
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM resources
         WHERE ($1::text IS NULL OR starts_with(name, $1))
           AND ($2::timestamptz IS NULL OR updated_at > $2)
           AND ($4::uuid IS NULL OR {after})
         ORDER BY {order}, id
         LIMIT $5"
    );
    let stmt = client.prepare_cached(&sql).await?;
    let (after_id, after_name, after_time) = match &q.cursor {
        Some(c) => (Some(c.id), Some(c.name.clone()), Some(c.updated_at)),
        None => (None, None, None),
    };
    let fetch = q.limit + 1;
    let rows = match q.sort {
        SortKey::UpdatedAt => {
            client
                .query(
                    &stmt,
                    &[
                        &q.name_prefix,
                        &q.updated_after,
                        &after_time,
                        &after_id,
                        &fetch,
                    ],
                )
                .await?
        }
        SortKey::Name => {
            client
                .query(
                    &stmt,
                    &[
                        &q.name_prefix,
                        &q.updated_after,
                        &after_name,
                        &after_id,
                        &fetch,
                    ],
                )
                .await?
        }
    };
    let mut items: Vec<Resource> = rows.iter().map(resource).collect();
    let next = if items.len() as i64 > q.limit {
        items.truncate(q.limit as usize);
        items.last().map(|last| Cursor {
            id: last.id,
            updated_at: last.updated_at,
            name: last.name.clone(),
        })
    } else {
        None
    };
    Ok((items, next))
}

/// Why a conditional write did not happen.
async fn missed(tx: &impl GenericClient, id: Uuid, if_match: &Option<IfMatch>) -> ApiError {
    match tx
        .query_opt("SELECT version FROM resources WHERE id = $1", &[&id])
        .await
    {
        Ok(Some(row)) => {
            let version: i64 = row.get(0);
            let wanted = match if_match {
                Some(IfMatch::Versions(v)) => format!("{v:?}"),
                _ => "any".into(),
            };
            ApiError::PreconditionFailed(format!(
                "resource {id} is at version {version}; If-Match asked for {wanted}"
            ))
        }
        Ok(None) => not_found(id),
        Err(e) => e.into(),
    }
}

fn versions(if_match: &Option<IfMatch>) -> Option<Vec<i64>> {
    match if_match {
        Some(IfMatch::Versions(v)) => Some(v.clone()),
        Some(IfMatch::Any) | None => None,
    }
}

pub async fn replace(
    pool: &Pool,
    id: Uuid,
    input: &ResourceInput,
    if_match: Option<IfMatch>,
    traceparent: Option<&str>,
) -> Result<Resource, ApiError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let stmt = tx
        .prepare_cached(&format!(
            "UPDATE resources
             SET name = $2, description = $3, attributes = $4, version = version + 1,
                 updated_at = greatest(now(), updated_at + interval '1 microsecond')
             WHERE id = $1 AND ($5::bigint[] IS NULL OR version = ANY($5))
             RETURNING {COLUMNS}"
        ))
        .await?;
    let row = tx
        .query_opt(
            &stmt,
            &[
                &id,
                &input.name,
                &input.description,
                &attributes_json(&input.attributes),
                &versions(&if_match),
            ],
        )
        .await?;
    let Some(row) = row else {
        let err = missed(&*tx, id, &if_match).await;
        tx.rollback().await?;
        return Err(err);
    };
    let updated = resource(&row);
    let event = ResourceUpdated {
        resource_id: updated.id,
        name: updated.name.clone(),
        description: updated.description.clone(),
        attributes: updated.attributes.clone(),
        version: updated.version,
        updated_at: updated.updated_at.timestamp_micros(),
    };
    platform::outbox::insert(&tx, &event, traceparent).await?;
    tx.commit().await?;
    Ok(updated)
}

pub async fn delete(
    pool: &Pool,
    id: Uuid,
    if_match: Option<IfMatch>,
    traceparent: Option<&str>,
) -> Result<(), ApiError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let stmt = tx
        .prepare_cached(
            "DELETE FROM resources WHERE id = $1 AND ($2::bigint[] IS NULL OR version = ANY($2))
             RETURNING version, clock_timestamp()",
        )
        .await?;
    let Some(row) = tx.query_opt(&stmt, &[&id, &versions(&if_match)]).await? else {
        let err = missed(&*tx, id, &if_match).await;
        tx.rollback().await?;
        return Err(err);
    };
    let deleted_at: DateTime<Utc> = row.get(1);
    let event = ResourceDeleted {
        resource_id: id,
        version: row.get(0),
        deleted_at: deleted_at.timestamp_micros(),
    };
    platform::outbox::insert(&tx, &event, traceparent).await?;
    tx.commit().await?;
    Ok(())
}
