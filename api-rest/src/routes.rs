//! The HTTP surface: `/api/v1/resources` and its error handling. Handlers parse and check
//! everything before touching the database, so bad input changes nothing.

use std::collections::HashMap;
use std::time::Instant;

use actix_web::http::header::{self, HeaderMap};
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tracing::Instrument;
use uuid::Uuid;

use crate::error::{ApiError, FieldError, Problem};
use crate::metrics::Metrics;
use crate::model::{self, Cursor, IfMatch, Resource, ResourceInput, ResourcePage, SortKey};
use crate::store::{self, Idempotency, ListQuery};

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

/// What every handler needs.
pub struct AppState {
    pub pool: Pool,
    pub metrics: Metrics,
    /// Largest request body accepted, in bytes.
    pub max_body: usize,
}

/// Reads a JSON body: the content type must be JSON, the body at most `max_body` bytes,
/// syntax errors are 400 and type or field errors 422, naming the field.
async fn read_json<T: DeserializeOwned>(
    req: &HttpRequest,
    mut payload: web::Payload,
    max_body: usize,
) -> Result<T, ApiError> {
    check_content_type(req.headers())?;
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
    {
        if len > max_body {
            return Err(ApiError::TooLarge { limit: max_body });
        }
    }
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("cannot read the body: {e}")))?;
        if body.len() + chunk.len() > max_body {
            return Err(ApiError::TooLarge { limit: max_body });
        }
        body.extend_from_slice(&chunk);
    }
    // serde would happily read a struct from a JSON array (fields by position); the API takes
    // objects only.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(_) => ApiError::invalid(vec![FieldError::new("body", "must be a JSON object")]),
            Err(e) => ApiError::BadRequest(format!("the body is not valid JSON: {e}")),
        });
    }
    let mut de = serde_json::Deserializer::from_slice(&body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let message = strip_position(&inner.to_string());
                ApiError::invalid(vec![FieldError::new(field_of(&path, &message), message)])
            }
            _ => ApiError::BadRequest(format!("the body is not valid JSON: {inner}")),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))?;
    Ok(value)
}

/// The field a deserialization error is about: its path, or for a missing field the field
/// named in the message (serde reports that one at the enclosing object).
fn field_of(path: &str, message: &str) -> String {
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next());
    match (path, missing) {
        (".", Some(name)) => name.to_string(),
        (_, Some(name)) => format!("{path}.{name}"),
        (".", None) => "body".to_string(),
        (_, None) => path.to_string(),
    }
}

/// serde's messages end with " at line 1 column 17", which means nothing to an API client.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::UnsupportedMediaType(
            "Content-Type must be application/json".into(),
        ));
    };
    let text = value.to_str().unwrap_or_default().to_ascii_lowercase();
    let mut parts = text.split(';').map(str::trim);
    let essence = parts.next().unwrap_or_default();
    let json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    if !json {
        return Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type must be application/json, got `{essence}`"
        )));
    }
    for param in parts {
        if let Some(charset) = param.strip_prefix("charset=") {
            if charset.trim_matches('"') != "utf-8" {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "charset must be utf-8, got `{charset}`"
                )));
            }
        }
    }
    Ok(())
}

/// The database span for a write, and the `traceparent` its outbox row carries: the span's
/// own context (or, with none, the caller's well-formed `traceparent`).
fn write_span(req: &HttpRequest, operation: &'static str) -> (tracing::Span, Option<String>) {
    let incoming = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok());
    let span = platform::trace::db_span(operation, "resources");
    let tp = platform::trace::traceparent_of(&span, incoming);
    (span, tp)
}

fn if_match(req: &HttpRequest) -> Result<Option<IfMatch>, ApiError> {
    match req.headers().get(header::IF_MATCH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(IfMatch::parse)
            .map(Some)
            .ok_or_else(|| {
                ApiError::BadRequest(
                    "If-Match must be * or a list of quoted ETags like \"3\"".into(),
                )
            }),
    }
}

fn resource_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::NotFound(format!("no resource with id `{raw}`")))
}

fn with_resource(mut resp: actix_web::HttpResponseBuilder, r: &Resource) -> HttpResponse {
    resp.insert_header((header::ETAG, model::etag(r.version)))
        .json(r)
}

fn validated(input: ResourceInput) -> Result<ResourceInput, ApiError> {
    let errors = input.validate();
    if errors.is_empty() {
        Ok(input)
    } else {
        Err(ApiError::invalid(errors))
    }
}

/// Times one database operation for the `db_transaction_duration_seconds` histogram.
async fn timed<T>(
    state: &AppState,
    operation: &'static str,
    f: impl std::future::Future<Output = T>,
) -> T {
    let started = Instant::now();
    let out = f.await;
    state.metrics.observe_db(operation, started.elapsed());
    out
}

/// Create a resource (and its `resource.created` event).
#[utoipa::path(
    post, path = "/api/v1/resources", tag = "resources",
    request_body(content = ResourceInput, content_type = "application/json"),
    params(
        ("Idempotency-Key" = Option<String>, Header, pattern = r"^[!-~]{1,255}$", description = "Retries with the same key and body return the first response and create nothing"),
        ("traceparent" = Option<String>, Header, description = "W3C trace context: the request continues it, and its event carries the trace on through Kafka"),
    ),
    responses(
        (status = 201, description = "Created", body = Resource, headers(("ETag" = String), ("Location" = String))),
        (status = 400, description = "Malformed JSON or header", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Idempotency-Key reused with a different body", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let input = validated(read_json::<ResourceInput>(&req, payload, state.max_body).await?)?;
    let key = match req.headers().get("Idempotency-Key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(model::idempotency_key)
                .ok_or_else(|| {
                    ApiError::BadRequest(
                        "Idempotency-Key must be 1–255 visible ASCII characters".into(),
                    )
                })?,
        ),
    };
    // The hash covers the parsed request, so whitespace or key order do not count as a change.
    let idempotency = key.map(|key| Idempotency {
        key,
        request_hash: Sha256::digest(serde_json::to_vec(&input).unwrap_or_default()).to_vec(),
    });
    let (span, tp) = write_span(&req, "INSERT");
    let created = timed(
        &state,
        "create",
        store::create(&state.pool, &input, idempotency, tp.as_deref()).instrument(span),
    )
    .await?;
    let id = created.body["id"].as_str().unwrap_or_default().to_string();
    let version = created.body["version"].as_i64().unwrap_or_default();
    let mut resp = HttpResponse::build(
        actix_web::http::StatusCode::from_u16(created.status)
            .unwrap_or(actix_web::http::StatusCode::CREATED),
    );
    resp.insert_header((header::LOCATION, format!("/api/v1/resources/{id}")))
        .insert_header((header::ETAG, model::etag(version)));
    if created.replayed {
        resp.insert_header(("Idempotency-Replayed", "true"));
    }
    Ok(resp.json(created.body))
}

/// List resources, a page at a time (keyset pagination, stable order).
#[utoipa::path(
    get, path = "/api/v1/resources", tag = "resources",
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 200, description = "1–200, default 50"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page: <id>.<updated_at in µs>.<name> of its last item, valid for either sort (pattern in the document)"),
        ("sort" = Option<SortKey>, Query, description = "updated_at (default) or name; ties broken by id"),
        ("name_prefix" = Option<String>, Query, description = "only names starting with this"),
        ("updated_after" = Option<String>, Query, description = "only resources updated after this RFC 3339 time"),
    ),
    responses(
        (status = 200, description = "One page", body = ResourcePage),
        (status = 400, description = "Malformed query string", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid parameters", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let params = web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest(format!("malformed query string: {e}")))?
        .into_inner();
    let query = list_query(&params)?;
    let (items, next) = timed(&state, "list", store::list(&state.pool, &query)).await?;
    Ok(HttpResponse::Ok().json(ResourcePage {
        items,
        next_cursor: next.map(|c| c.encode()),
    }))
}

/// The list's answer without its body.
#[utoipa::path(
    head, path = "/api/v1/resources", tag = "resources", operation_id = "head_resources",
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 200, description = "as for GET"),
        ("cursor" = Option<String>, Query, description = "as for GET"),
        ("sort" = Option<SortKey>, Query, description = "as for GET"),
        ("name_prefix" = Option<String>, Query, description = "as for GET"),
        ("updated_after" = Option<String>, Query, description = "as for GET"),
    ),
    responses(
        (status = 200, description = "The page exists"),
        (status = 400, description = "Malformed query string"),
        (status = 422, description = "Invalid parameters"),
    )
)]
pub async fn head_list(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    list(req, state).await
}

fn list_query(params: &HashMap<String, String>) -> Result<ListQuery, ApiError> {
    let mut errors = Vec::new();
    for name in params.keys() {
        if !["limit", "cursor", "sort", "name_prefix", "updated_after"].contains(&name.as_str()) {
            errors.push(FieldError::new(name.clone(), "unknown query parameter"));
        }
    }
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => match v.parse::<i64>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                errors.push(FieldError::new(
                    "limit",
                    format!("must be a whole number from 1 to {MAX_LIMIT}"),
                ));
                DEFAULT_LIMIT
            }
        },
    };
    let sort = match params.get("sort").map(String::as_str) {
        None | Some("updated_at") => SortKey::UpdatedAt,
        Some("name") => SortKey::Name,
        Some(_) => {
            errors.push(FieldError::new("sort", "must be updated_at or name"));
            SortKey::UpdatedAt
        }
    };
    let cursor = match params.get("cursor") {
        None => None,
        Some(c) => match Cursor::decode(c) {
            Some(c) => Some(c),
            None => {
                errors.push(FieldError::new(
                    "cursor",
                    "must be <id>.<microseconds>.<name>, as next_cursor returns it",
                ));
                None
            }
        },
    };
    let updated_after = match params.get("updated_after") {
        None => None,
        Some(t) => match DateTime::parse_from_rfc3339(t) {
            Ok(t) => Some(t.with_timezone(&Utc)),
            Err(_) => {
                errors.push(FieldError::new(
                    "updated_after",
                    "must be an RFC 3339 time like 2026-01-31T12:00:00Z",
                ));
                None
            }
        },
    };
    let name_prefix = params.get("name_prefix").cloned();
    if name_prefix
        .as_deref()
        .is_some_and(|p| p.contains('\0') || p.chars().count() > model::NAME_MAX)
    {
        errors.push(FieldError::new(
            "name_prefix",
            "must be at most 200 characters without NUL",
        ));
    }
    if !errors.is_empty() {
        errors.sort_by(|a, b| a.field.cmp(&b.field));
        return Err(ApiError::invalid(errors));
    }
    Ok(ListQuery {
        sort,
        limit,
        name_prefix,
        updated_after,
        cursor,
    })
}

/// Get one resource. `If-None-Match` with its current ETag answers 304, without a body.
#[utoipa::path(
    get, path = "/api/v1/resources/{id}", tag = "resources",
    params(
        ("id" = Uuid, Path),
        ("If-None-Match" = Option<String>, Header, description = "ETag(s) the client holds, or *: 304 if one is current (weak comparison); anything else is ignored"),
    ),
    responses(
        (status = 200, description = "The resource", body = Resource, headers(("ETag" = String))),
        (status = 304, description = "The client's copy is current", headers(("ETag" = String))),
        (status = 404, description = "No such resource", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = resource_id(&path)?;
    let r = timed(&state, "get", store::get(&state.pool, id)).await?;
    let current = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|h| model::none_match(h, r.version));
    if current {
        return Ok(HttpResponse::NotModified()
            .insert_header((header::ETAG, model::etag(r.version)))
            .finish());
    }
    Ok(with_resource(HttpResponse::Ok(), &r))
}

/// GET's answer without its body (actix-web sends a HEAD response's headers only).
#[utoipa::path(
    head, path = "/api/v1/resources/{id}", tag = "resources", operation_id = "head_resource",
    params(
        ("id" = Uuid, Path),
        ("If-None-Match" = Option<String>, Header, description = "as for GET"),
    ),
    responses(
        (status = 200, description = "The resource exists", headers(("ETag" = String))),
        (status = 304, description = "The client's copy is current", headers(("ETag" = String))),
        (status = 404, description = "No such resource"),
    )
)]
pub async fn head(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    get(req, path, state).await
}

/// Replace a resource (and publish `resource.updated`). `If-Match` makes it conditional.
#[utoipa::path(
    put, path = "/api/v1/resources/{id}", tag = "resources",
    request_body(content = ResourceInput, content_type = "application/json"),
    params(
        ("id" = Uuid, Path),
        ("If-Match" = Option<String>, Header, pattern = r#"^\s*(\*|((W/)?"[^",]*"(\s*,\s*(W/)?"[^",]*")*)?)\s*$"#, description = "ETag(s) the current version must match, or *; an empty list matches nothing (412)"),
    ),
    responses(
        (status = 200, description = "Replaced", body = Resource, headers(("ETag" = String))),
        (status = 400, description = "Malformed JSON or header", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such resource", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "If-Match did not match", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn replace(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = resource_id(&path)?;
    let condition = if_match(&req)?;
    let input = validated(read_json::<ResourceInput>(&req, payload, state.max_body).await?)?;
    let (span, tp) = write_span(&req, "UPDATE");
    let r = timed(
        &state,
        "replace",
        store::replace(&state.pool, id, &input, condition, tp.as_deref()).instrument(span),
    )
    .await?;
    Ok(with_resource(HttpResponse::Ok(), &r))
}

/// Delete a resource (and publish `resource.deleted`). `If-Match` makes it conditional.
#[utoipa::path(
    delete, path = "/api/v1/resources/{id}", tag = "resources",
    params(
        ("id" = Uuid, Path),
        ("If-Match" = Option<String>, Header, pattern = r#"^\s*(\*|((W/)?"[^",]*"(\s*,\s*(W/)?"[^",]*")*)?)\s*$"#, description = "ETag(s) the current version must match, or *; an empty list matches nothing (412)"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Malformed If-Match", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such resource", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "If-Match did not match", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = resource_id(&path)?;
    let condition = if_match(&req)?;
    let (span, tp) = write_span(&req, "DELETE");
    timed(
        &state,
        "delete",
        store::delete(&state.pool, id, condition, tp.as_deref()).instrument(span),
    )
    .await?;
    Ok(HttpResponse::NoContent().finish())
}

pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!("no route for {}", req.path())))
}

/// 405 with the `Allow` header RFC 9110 asks for: the methods `allow` lists.
pub fn method_not_allowed(req: &HttpRequest, allow: &'static str) -> HttpResponse {
    use actix_web::ResponseError;
    let mut resp =
        ApiError::MethodNotAllowed(format!("{} is not allowed on {}", req.method(), req.path()))
            .error_response();
    resp.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn list_parameters_are_checked_together() {
        let q = list_query(&params(&[])).unwrap();
        assert_eq!((q.limit, q.sort), (DEFAULT_LIMIT, SortKey::UpdatedAt));
        let Err(ApiError::Invalid { errors, .. }) = list_query(&params(&[
            ("limit", "0"),
            ("sort", "size"),
            ("colour", "red"),
            ("updated_after", "today"),
        ])) else {
            panic!()
        };
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["colour", "limit", "sort", "updated_after"]);
        // A cursor names a position in both orders.
        let c = Cursor {
            id: Uuid::nil(),
            updated_at: Utc::now(),
            name: "a".into(),
        }
        .encode();
        assert!(list_query(&params(&[("cursor", &c)])).is_ok());
        assert!(list_query(&params(&[("cursor", &c), ("sort", "name")])).is_ok());
        assert!(list_query(&params(&[("cursor", "")])).is_err());
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        assert!(check_content_type(&h).is_err());
        for ok in [
            "application/json",
            "Application/JSON; charset=UTF-8",
            "application/merge-patch+json",
        ] {
            h.insert(header::CONTENT_TYPE, ok.parse().unwrap());
            assert!(check_content_type(&h).is_ok(), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/json; charset=latin1",
            "application/jsonx",
        ] {
            h.insert(header::CONTENT_TYPE, bad.parse().unwrap());
            assert!(check_content_type(&h).is_err(), "{bad}");
        }
    }

    #[test]
    fn fields_of_serde_errors() {
        assert_eq!(field_of(".", "missing field `name`"), "name");
        assert_eq!(
            field_of("colour", "unknown field `colour`, expected one of `name`"),
            "colour"
        );
        assert_eq!(
            field_of(
                "attributes.n",
                "invalid type: floating point `1e308`, expected a string"
            ),
            "attributes.n"
        );
        assert_eq!(
            field_of(".", "invalid type: sequence, expected struct ResourceInput"),
            "body"
        );
    }

    #[test]
    fn serde_positions_are_dropped() {
        assert_eq!(
            strip_position("invalid type: integer `5`, expected a string at line 1 column 10"),
            "invalid type: integer `5`, expected a string"
        );
    }
}
