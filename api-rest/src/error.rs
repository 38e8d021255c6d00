//! Every error the API answers with, as RFC 9457 `application/problem+json`. Database text
//! never reaches a client: a database failure is logged and answered 503.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

/// One field that broke a rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The problem document (RFC 9457).
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Present on 422: every field that broke a rule.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("the body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{detail}")]
    Invalid {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("the database is unavailable")]
    Unavailable(String),
}

impl ApiError {
    pub fn invalid(errors: Vec<FieldError>) -> ApiError {
        let detail = match errors.as_slice() {
            [one] => format!("{}: {}", one.field, one.message),
            _ => format!("{} fields are invalid", errors.len()),
        };
        ApiError::Invalid { detail, errors }
    }

    fn slug(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::BadRequest(_) => ("malformed-request", "Malformed request"),
            ApiError::Unauthorized(_) => ("unauthorized", "Unauthorized"),
            ApiError::NotFound(_) => ("not-found", "Not found"),
            ApiError::MethodNotAllowed(_) => ("method-not-allowed", "Method not allowed"),
            ApiError::Conflict(_) => ("conflict", "Conflict"),
            ApiError::PreconditionFailed(_) => ("precondition-failed", "Precondition failed"),
            ApiError::TooLarge { .. } => ("payload-too-large", "Payload too large"),
            ApiError::UnsupportedMediaType(_) => {
                ("unsupported-media-type", "Unsupported media type")
            }
            ApiError::Invalid { .. } => ("invalid-fields", "Invalid fields"),
            ApiError::Unavailable(_) => ("unavailable", "Service unavailable"),
        }
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> ApiError {
        ApiError::Unavailable(platform::db::describe(&e))
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> ApiError {
        ApiError::Unavailable(e.to_string())
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Unavailable(cause) = self {
            tracing::error!(%cause, "database failure");
        }
        let (slug, title) = self.slug();
        let problem = Problem {
            kind: format!("https://kafkify.dev/problems/{slug}"),
            title: title.to_string(),
            status: self.status_code().as_u16(),
            detail: self.to_string(),
            errors: match self {
                ApiError::Invalid { errors, .. } => errors.clone(),
                _ => Vec::new(),
            },
        };
        let mut resp = HttpResponse::build(self.status_code());
        resp.content_type("application/problem+json");
        if matches!(self, ApiError::Unavailable(_)) {
            resp.insert_header(("Retry-After", "1"));
        }
        if matches!(self, ApiError::Unauthorized(_)) {
            // RFC 6750: the scheme the client should use.
            resp.insert_header(("WWW-Authenticate", r#"Bearer realm="kafkify""#));
        }
        resp.body(serde_json::to_string(&problem).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody;

    #[test]
    fn problems_name_their_fields_and_hide_database_text() {
        let e = ApiError::invalid(vec![FieldError::new(
            "name",
            "must be 1–200 characters, got 0",
        )]);
        assert_eq!(e.status_code(), 422);
        let body = e.error_response().into_body().try_into_bytes().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["detail"], "name: must be 1–200 characters, got 0");
        assert_eq!(v["errors"][0]["field"], "name");
        assert_eq!(v["type"], "https://kafkify.dev/problems/invalid-fields");

        let e =
            ApiError::Unavailable("relation \"resources\" does not exist (SQLSTATE 42P01)".into());
        let resp = e.error_response();
        assert_eq!(resp.status(), 503);
        let body = resp.into_body().try_into_bytes().unwrap();
        assert!(!String::from_utf8_lossy(&body).contains("resources"));
    }
}
