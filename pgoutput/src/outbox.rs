//! From a decoded pgoutput insert on `outbox_events` to an [`OutboxEvent`]. Pure.
//!
//! Columns are found by name in the relation, not by position, so adding a column to the table
//! (a migration) does not shift what the relay reads.

use crate::{Datum, Relation};

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
    use crate::tests::outbox_relation;
    use crate::{decode, Message};

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

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The Relation and Insert messages PostgreSQL 15.18 sent for one outbox insert, captured
    /// from a real replication stream (pgoutput, proto_version 1) of the `rest` migrations.
    const CAPTURED_RELATION: &str = "520000497f7075626c6963006f7574626f785f6576656e7473006400070169640000000b86ffffffff006167677265676174655f747970650000000019ffffffff006167677265676174655f69640000000019ffffffff006576656e745f747970650000000019ffffffff007061796c6f61640000000edaffffffff007472616365706172656e740000000019ffffffff00637265617465645f617400000004a0ffffffff";
    const CAPTURED_INSERT: &str = "490000497f4e0007740000002430623665316635352d376431632d346138652d396333662d35653262386630643461313174000000087265736f757263657400000004722d343274000000107265736f757263652e64656c6574656474000000657b2276657273696f6e223a20332c202264656c657465645f6174223a20313736343039373230303030303030302c20227265736f757263655f6964223a202230623665316635352d376431632d346138652d396333662d356532623866306434613131227d740000003730302d34626639326633353737623334646136613363653932396430653065343733362d303066303637616130626139303262372d30317400000016323032362d31312d32352031393a30303a30302b3030";

    #[test]
    fn captured_bytes_decode_to_the_outbox_row() {
        let Message::Relation(rel) = decode(&unhex(CAPTURED_RELATION)).unwrap() else {
            panic!()
        };
        assert_eq!(
            (rel.oid, rel.name.as_str(), rel.columns.len()),
            (18815, "outbox_events", 7)
        );
        assert_eq!(rel.columns[0].type_oid, 2950, "uuid");
        assert_eq!(rel.columns[4].type_oid, 3802, "jsonb");
        let Message::Insert { relation, new } = decode(&unhex(CAPTURED_INSERT)).unwrap() else {
            panic!()
        };
        assert_eq!(relation, rel.oid);
        let event = OutboxColumns::of(&rel)
            .unwrap()
            .unwrap()
            .event(&new)
            .unwrap();
        assert_eq!(
            event,
            OutboxEvent {
                id: "0b6e1f55-7d1c-4a8e-9c3f-5e2b8f0d4a11".into(),
                aggregate_type: "resource".into(),
                aggregate_id: "r-42".into(),
                event_type: "resource.deleted".into(),
                // jsonb's own text form: keys reordered, spaces added.
                payload: r#"{"version": 3, "deleted_at": 1764097200000000, "resource_id": "0b6e1f55-7d1c-4a8e-9c3f-5e2b8f0d4a11"}"#.into(),
                traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            }
        );
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
