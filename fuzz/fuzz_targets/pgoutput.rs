//! Any bytes as one pgoutput message: the decoder returns a message or an error, never panics;
//! a Relation is checked as an outbox table, an Insert against the outbox's columns.
#![no_main]

use pgoutput::outbox::OutboxColumns;
use pgoutput::{decode, Message};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static OUTBOX: OnceLock<OutboxColumns> = OnceLock::new();
    let outbox = OUTBOX.get_or_init(|| {
        outbox_columns()
            .and_then(Result::ok)
            .expect("the captured Relation is an outbox")
    });
    match decode(data) {
        Ok(Message::Relation(rel)) => {
            let _ = OutboxColumns::of(&rel);
        }
        Ok(Message::Insert { new, .. }) => {
            let _ = outbox.event(&new);
        }
        _ => {}
    }
});

/// The real outbox table's Relation message, as Postgres 15 sent it (id, aggregate_type,
/// aggregate_id, event_type, payload, traceparent, created_at).
fn outbox_columns() -> Option<Result<OutboxColumns, pgoutput::outbox::OutboxError>> {
    let mut m = vec![b'R'];
    m.extend(16_384u32.to_be_bytes());
    m.extend(b"public\0outbox_events\0");
    m.push(b'd');
    let cols: [(&str, u32); 7] = [
        ("id", 2950),
        ("aggregate_type", 25),
        ("aggregate_id", 25),
        ("event_type", 25),
        ("payload", 3802),
        ("traceparent", 25),
        ("created_at", 1184),
    ];
    m.extend((cols.len() as u16).to_be_bytes());
    for (i, (name, oid)) in cols.iter().enumerate() {
        m.push(u8::from(i == 0));
        m.extend(name.as_bytes());
        m.push(0);
        m.extend(oid.to_be_bytes());
        m.extend((-1i32).to_be_bytes());
    }
    match decode(&m).ok()? {
        Message::Relation(rel) => OutboxColumns::of(&rel),
        _ => None,
    }
}
