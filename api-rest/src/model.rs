//! What the API accepts and returns, and the field rules. Pure: no I/O.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::FieldError;

pub const NAME_MAX: usize = 200;
pub const DESCRIPTION_MAX: usize = 2000;
pub const ATTRIBUTES_MAX: usize = 50;
pub const ATTRIBUTE_KEY_MAX: usize = 100;
pub const ATTRIBUTE_VALUE_MAX: usize = 1000;

/// A resource as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Resource {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub attributes: BTreeMap<String, String>,
    /// Incremented by every update; the `ETag` is this number in quotes.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The body of `POST /api/v1/resources` and `PUT /api/v1/resources/{id}` (a full replacement).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceInput {
    /// 1–200 characters, not all blank.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub name: String,
    /// Up to 2000 characters.
    #[serde(default)]
    #[schema(max_length = 2000)]
    pub description: String,
    /// Up to 50 string-to-string pairs; keys 1–100 characters, values up to 1000.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

impl ResourceInput {
    /// Every rule the input breaks, each naming its field.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        check_text(&mut errors, "name", &self.name, 1, NAME_MAX);
        if self.name.trim().is_empty() && !self.name.is_empty() {
            errors.push(FieldError::new("name", "must not be blank"));
        }
        check_text(
            &mut errors,
            "description",
            &self.description,
            0,
            DESCRIPTION_MAX,
        );
        if self.attributes.len() > ATTRIBUTES_MAX {
            errors.push(FieldError::new(
                "attributes",
                format!(
                    "must have at most {ATTRIBUTES_MAX} entries, got {}",
                    self.attributes.len()
                ),
            ));
        }
        for (k, v) in &self.attributes {
            check_text(&mut errors, "attributes (key)", k, 1, ATTRIBUTE_KEY_MAX);
            check_text(
                &mut errors,
                &format!("attributes.{k}"),
                v,
                0,
                ATTRIBUTE_VALUE_MAX,
            );
        }
        errors
    }
}

/// A text field's length in characters, and no NUL (Postgres text cannot hold it; refusing it
/// here keeps it from becoming a database error).
fn check_text(errors: &mut Vec<FieldError>, field: &str, value: &str, min: usize, max: usize) {
    let len = value.chars().count();
    if len < min || len > max {
        let range = if min == 0 {
            format!("at most {max}")
        } else {
            format!("{min}–{max}")
        };
        errors.push(FieldError::new(
            field,
            format!("must be {range} characters, got {len}"),
        ));
    }
    if value.contains('\0') {
        errors.push(FieldError::new(field, "must not contain the NUL character"));
    }
}

/// One page of `GET /api/v1/resources`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResourcePage {
    pub items: Vec<Resource>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A page is sorted by this key, then by id, so the order is total and stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SortKey {
    UpdatedAt,
    Name,
}

/// The position after the last item of a page. Opaque to clients (base64url JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub sort: SortKey,
    /// The last item's sort value: a name, or an RFC 3339 time with microseconds.
    pub after: String,
    pub id: Uuid,
}

impl Cursor {
    pub fn encode(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(self).unwrap_or_default())
    }

    pub fn decode(text: &str) -> Option<Cursor> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()?;
        let cursor: Cursor = serde_json::from_slice(&bytes).ok()?;
        if cursor.sort == SortKey::UpdatedAt && DateTime::parse_from_rfc3339(&cursor.after).is_err()
        {
            return None;
        }
        Some(cursor)
    }
}

/// `ETag` of a version: a strong tag, the version number in quotes.
pub fn etag(version: i64) -> String {
    format!("\"{version}\"")
}

/// What an `If-Match` header asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    /// `*`: any current version.
    Any,
    /// One of these versions.
    Versions(Vec<i64>),
}

impl IfMatch {
    /// Parses `"3"`, `"3", "4"` or `*`. A tag that is not one of our versions can never match,
    /// which is what 412 is for, so it parses as an impossible version; so does a weak tag
    /// (`W/"3"`), since If-Match compares strongly (RFC 9110 §13.1.1).
    pub fn parse(header: &str) -> Option<IfMatch> {
        let header = header.trim();
        if header == "*" {
            return Some(IfMatch::Any);
        }
        let mut versions = Vec::new();
        for tag in header.split(',') {
            let tag = tag.trim();
            let (weak, tag) = match tag.strip_prefix("W/") {
                Some(t) => (true, t),
                None => (false, tag),
            };
            let inner = tag.strip_prefix('"')?.strip_suffix('"')?;
            versions.push(if weak {
                -1
            } else {
                inner.parse::<i64>().unwrap_or(-1)
            });
        }
        Some(IfMatch::Versions(versions))
    }
}

/// An `Idempotency-Key`: 1–255 visible ASCII characters.
pub fn idempotency_key(header: &str) -> Option<&str> {
    let ok = !header.is_empty()
        && header.len() <= 255
        && header.bytes().all(|b| (0x21..=0x7e).contains(&b));
    ok.then_some(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str) -> ResourceInput {
        ResourceInput {
            name: name.into(),
            description: String::new(),
            attributes: BTreeMap::new(),
        }
    }

    #[test]
    fn field_rules() {
        assert!(input("ok").validate().is_empty());
        assert_eq!(input("").validate()[0].field, "name");
        assert_eq!(input("   ").validate()[0].message, "must not be blank");
        assert_eq!(
            input(&"x".repeat(201)).validate()[0].message,
            "must be 1–200 characters, got 201"
        );
        assert!(
            input(&"é".repeat(200)).validate().is_empty(),
            "characters, not bytes"
        );
        assert_eq!(
            input("a\0b").validate()[0].message,
            "must not contain the NUL character"
        );
        let mut many = input("ok");
        many.attributes = (0..51).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(many.validate()[0].field, "attributes");
        let mut bad = input("ok");
        bad.attributes.insert(String::new(), "x".repeat(1001));
        let fields: Vec<String> = bad.validate().into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["attributes (key)", "attributes."]);
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = Cursor {
            sort: SortKey::Name,
            after: "b".into(),
            id: Uuid::from_u128(1),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("!!"), None);
        assert_eq!(Cursor::decode("e30"), None); // {}
        let bad_time = Cursor {
            sort: SortKey::UpdatedAt,
            after: "yesterday".into(),
            id: Uuid::nil(),
        };
        assert_eq!(Cursor::decode(&bad_time.encode()), None);
    }

    #[test]
    fn if_match() {
        assert_eq!(IfMatch::parse("*"), Some(IfMatch::Any));
        assert_eq!(IfMatch::parse("\"3\""), Some(IfMatch::Versions(vec![3])));
        assert_eq!(IfMatch::parse("W/\"3\""), Some(IfMatch::Versions(vec![-1])));
        assert_eq!(
            IfMatch::parse("\"1\", \"3\""),
            Some(IfMatch::Versions(vec![1, 3]))
        );
        assert_eq!(IfMatch::parse("\"abc\""), Some(IfMatch::Versions(vec![-1])));
        assert_eq!(IfMatch::parse("3"), None);
    }

    #[test]
    fn idempotency_headers() {
        assert_eq!(idempotency_key("abc-123"), Some("abc-123"));
        assert_eq!(idempotency_key(""), None);
        assert_eq!(idempotency_key("has space"), None);
        assert_eq!(idempotency_key(&"k".repeat(256)), None);
    }
}
