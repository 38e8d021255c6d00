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

/// The position after the last item of a page: that item's id, `updated_at` and name, as
/// `<id>.<updated_at in microseconds since the epoch>.<name>`. It names a position in both sort
/// orders, so every string of [`CURSOR_PATTERN`] is a valid cursor for either `sort`: a client
/// generated from the spec cannot build a well-formed cursor that is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub id: Uuid,
    pub updated_at: DateTime<Utc>,
    pub name: String,
}

/// The cursor's grammar, stated in the OpenAPI document. Sixteen digits of microseconds reach
/// well past any real `updated_at` (±317 years around 1970) and always make a valid time.
pub const CURSOR_PATTERN: &str = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.-?[0-9]{1,16}\.[^\x00]{0,200}$";

impl Cursor {
    pub fn encode(&self) -> String {
        format!(
            "{}.{}.{}",
            self.id,
            self.updated_at.timestamp_micros(),
            self.name
        )
    }

    /// Parses exactly [`CURSOR_PATTERN`].
    pub fn decode(text: &str) -> Option<Cursor> {
        let (id, rest) = text.split_once('.')?;
        let (micros, name) = rest.split_once('.')?;
        let lower_hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c) || c == '-';
        if id.len() != 36 || !id.chars().all(lower_hex) {
            return None;
        }
        let digits = micros.strip_prefix('-').unwrap_or(micros);
        if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if name.contains('\0') || name.chars().count() > NAME_MAX {
            return None;
        }
        Some(Cursor {
            id: Uuid::parse_str(id).ok()?,
            updated_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            name: name.to_string(),
        })
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
        // `#entity-tag` allows an empty list (RFC 9110 §5.6.1): it matches no version.
        if header.is_empty() {
            return Some(IfMatch::Versions(Vec::new()));
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

/// Whether an `If-None-Match` header matches the current version, so a GET may answer 304.
/// The comparison is weak (RFC 9110 §13.1.2): `W/"3"` matches version 3, and `*` matches any
/// existing resource. A header that is not a list of entity tags matches nothing, so the
/// request gets the full answer, as if it had not been sent.
pub fn none_match(header: &str, version: i64) -> bool {
    let header = header.trim();
    if header == "*" {
        return true;
    }
    header.split(',').any(|tag| {
        let tag = tag.trim();
        let tag = tag.strip_prefix("W/").unwrap_or(tag);
        tag.strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .and_then(|t| t.parse::<i64>().ok())
            == Some(version)
    })
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
            id: Uuid::from_u128(1),
            updated_at: DateTime::from_timestamp_micros(1_764_633_600_123_456).unwrap(),
            name: "b.c with dots".into(),
        };
        assert_eq!(
            c.encode(),
            "00000000-0000-0000-0000-000000000001.1764633600123456.b.c with dots"
        );
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        let ok = "00000000-0000-0000-0000-00000000000a.-12.";
        assert_eq!(Cursor::decode(ok).map(|c| c.name), Some(String::new()));
        for bad in [
            "!!",
            "e30",
            "00000000-0000-0000-0000-00000000000A.1.x", // upper-case hex is not the grammar
            "00000000-0000-0000-0000-000000000001..x",
            "00000000-0000-0000-0000-000000000001.12345678901234567.x",
            "00000000-0000-0000-0000-000000000001.1x.y",
            "00000000-0000-0000-0000-000000000001.1.a\0b",
            "0000000-00000-0000-0000-000000000001.1.x",
        ] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
        let long = format!("00000000-0000-0000-0000-000000000001.1.{}", "n".repeat(201));
        assert_eq!(Cursor::decode(&long), None);
    }

    #[test]
    fn if_match() {
        assert!(none_match("\"3\"", 3));
        assert!(none_match("W/\"3\"", 3), "If-None-Match compares weakly");
        assert!(none_match("\"1\", W/\"3\"", 3));
        assert!(none_match(" * ", 7));
        assert!(!none_match("\"2\"", 3));
        assert!(!none_match("3", 3), "an unquoted tag is no tag");
        assert!(!none_match("", 3));
        assert!(!none_match("null", 3));
        assert!(!none_match("\"9\", *", 3), "* only stands alone");
        assert_eq!(IfMatch::parse("*"), Some(IfMatch::Any));
        assert_eq!(IfMatch::parse(" "), Some(IfMatch::Versions(vec![])));
        assert_eq!(IfMatch::parse("null"), None);
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
