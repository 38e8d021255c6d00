//! From a decoded pgoutput insert on `outbox_events` to an [`OutboxEvent`]. Pure.
//!
//! Columns are found by name in the relation, not by position, so adding a column to the table
//! (a migration) does not shift what the relay reads.

use crate::pgoutput::{Datum, Relation};

/// The name of the outbox table in every source database.
pub const OUTBOX_TABLE: &str = "outbox_events";

/// One committed outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    /// The jsonb payload in PostgreSQL's text form.
    pub payload: String,
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboxError {
    #[error("table {table} has no column `{column}`; is it the outbox?")]
    MissingColumn { table: String, column: &'static str },
    #[error("outbox row has {got} columns, its relation {expected}")]
    Arity { got: usize, expected: usize },
    #[error("outbox column `{0}` is NULL")]
    Null(&'static str),
    #[error("outbox column `{0}` is not text (binary mode is not used by the relay)")]
    NotText(&'static str),
    #[error("outbox column `{0}` is not UTF-8")]
    NotUtf8(&'static str),
}

/// Where each column we read sits in the relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxColumns {
    id: usize,
    aggregate_type: usize,
    aggregate_id: usize,
    event_type: usize,
    payload: usize,
    traceparent: Option<usize>,
    width: usize,
}

impl OutboxColumns {
    /// `None` for a table that is not the outbox: the publication should hold only outboxes, and
    /// the relay ignores anything else rather than guess.
    pub fn of(relation: &Relation) -> Option<Result<OutboxColumns, OutboxError>> {
        if relation.name != OUTBOX_TABLE {
            return None;
        }
        let find = |column: &'static str| {
            relation
                .columns
                .iter()
                .position(|c| c.name == column)
                .ok_or_else(|| OutboxError::MissingColumn {
                    table: format!("{}.{}", relation.namespace, relation.name),
                    column,
                })
        };
        Some((|| {
            Ok(OutboxColumns {
                id: find("id")?,
                aggregate_type: find("aggregate_type")?,
                aggregate_id: find("aggregate_id")?,
                event_type: find("event_type")?,
                payload: find("payload")?,
                traceparent: find("traceparent").ok(),
                width: relation.columns.len(),
            })
        })())
    }

    pub fn event(&self, row: &[Datum]) -> Result<OutboxEvent, OutboxError> {
        if row.len() != self.width {
            return Err(OutboxError::Arity {
                got: row.len(),
                expected: self.width,
            });
        }
        Ok(OutboxEvent {
            id: text(row, self.id, "id")?.ok_or(OutboxError::Null("id"))?,
            aggregate_type: text(row, self.aggregate_type, "aggregate_type")?
                .ok_or(OutboxError::Null("aggregate_type"))?,
            aggregate_id: text(row, self.aggregate_id, "aggregate_id")?
                .ok_or(OutboxError::Null("aggregate_id"))?,
            event_type: text(row, self.event_type, "event_type")?
                .ok_or(OutboxError::Null("event_type"))?,
            payload: text(row, self.payload, "payload")?.ok_or(OutboxError::Null("payload"))?,
            traceparent: match self.traceparent {
                Some(i) => text(row, i, "traceparent")?,
                None => None,
            },
        })
    }
}

fn text(row: &[Datum], i: usize, name: &'static str) -> Result<Option<String>, OutboxError> {
    match &row[i] {
        Datum::Null => Ok(None),
        Datum::Text(bytes) => String::from_utf8(bytes.clone())
            .map(Some)
            .map_err(|_| OutboxError::NotUtf8(name)),
        Datum::Binary(_) | Datum::UnchangedToast => Err(OutboxError::NotText(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::tests::outbox_relation;
    use crate::pgoutput::{decode, Message};

    fn relation() -> Relation {
        match decode(&outbox_relation(1)).unwrap() {
            Message::Relation(r) => r,
            other => panic!("{other:?}"),
        }
    }

    fn t(s: &str) -> Datum {
        Datum::Text(s.as_bytes().to_vec())
    }

    #[test]
    fn reads_an_outbox_row() {
        let cols = OutboxColumns::of(&relation()).unwrap().unwrap();
        let row = vec![
            t("0b6e1f55-0000-4000-8000-000000000001"),
            t("resource"),
            t("r-1"),
            t("resource.created"),
            t(r#"{"a": 1}"#),
            Datum::Null,
            t("2026-11-25 19:00:00+00"),
        ];
        let e = cols.event(&row).unwrap();
        assert_eq!(e.id, "0b6e1f55-0000-4000-8000-000000000001");
        assert_eq!(
            (e.aggregate_id.as_str(), e.event_type.as_str()),
            ("r-1", "resource.created")
        );
        assert_eq!(e.payload, r#"{"a": 1}"#);
        assert_eq!(e.traceparent, None);
    }

    #[test]
    fn columns_are_found_by_name() {
        let mut rel = relation();
        rel.columns.reverse();
        let cols = OutboxColumns::of(&rel).unwrap().unwrap();
        let mut row = vec![
            t("id"),
            t("agg"),
            t("key"),
            t("x.y"),
            t("{}"),
            t("00-abc-def-01"),
            t("ts"),
        ];
        row.reverse();
        let e = cols.event(&row).unwrap();
        assert_eq!((e.id.as_str(), e.event_type.as_str()), ("id", "x.y"));
        assert_eq!(e.traceparent.as_deref(), Some("00-abc-def-01"));
    }

    #[test]
    fn other_tables_and_bad_rows() {
        let mut other = relation();
        other.name = "resources".into();
        assert!(OutboxColumns::of(&other).is_none());

        let mut missing = relation();
        missing.columns.retain(|c| c.name != "payload");
        assert!(matches!(
            OutboxColumns::of(&missing),
            Some(Err(OutboxError::MissingColumn {
                column: "payload",
                ..
            }))
        ));

        let cols = OutboxColumns::of(&relation()).unwrap().unwrap();
        assert_eq!(
            cols.event(&[t("x")]),
            Err(OutboxError::Arity {
                got: 1,
                expected: 7
            })
        );
        let mut row = vec![
            t("id"),
            t("agg"),
            t("key"),
            t("x.y"),
            Datum::Null,
            Datum::Null,
            t("ts"),
        ];
        assert_eq!(cols.event(&row), Err(OutboxError::Null("payload")));
        row[4] = Datum::Binary(vec![1]);
        assert_eq!(cols.event(&row), Err(OutboxError::NotText("payload")));
        row[4] = Datum::Text(vec![0xff]);
        assert_eq!(cols.event(&row), Err(OutboxError::NotUtf8("payload")));
    }
}
