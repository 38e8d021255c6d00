//! A decoder for pgoutput protocol version 1 messages (PostgreSQL "Logical Replication Message
//! Formats"). Pure: bytes in, typed messages out, no I/O. `pgwire-replication` hands us Begin,
//! Commit and Message already typed and everything else as raw `XLogData`; this module decodes
//! all of them so the stream can be tested on captured bytes.
//!
//! Malformed or unknown input is an error, never a panic: the bytes come from the network.

pub mod outbox;

use std::fmt;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A WAL position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl std::str::FromStr for Lsn {
    type Err = DecodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DecodeError::Malformed(format!("`{s}` is not an LSN like 16/B374D848"));
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let hi = u64::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| bad())?;
        if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
            return Err(bad());
        }
        Ok(Lsn(hi << 32 | lo))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput message truncated: needed {needed} more bytes for {what}")]
    Truncated { what: &'static str, needed: usize },
    #[error("unknown pgoutput message type {0:#04x}")]
    UnknownMessage(u8),
    #[error("malformed pgoutput message: {0}")]
    Malformed(String),
}

/// One column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub part_of_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// A table's shape, sent before the first change to it and again whenever it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

/// One column value of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    Null,
    /// A TOASTed value that did not change (updates only).
    UnchangedToast,
    Text(Vec<u8>),
    Binary(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: Lsn,
        commit_time_micros: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time_micros: i64,
    },
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Vec<Datum>,
    },
    Update {
        relation: u32,
        old: Option<Vec<Datum>>,
        new: Vec<Datum>,
    },
    Delete {
        relation: u32,
        old: Vec<Datum>,
    },
    Truncate {
        options: u8,
        relations: Vec<u32>,
    },
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Vec<u8>,
    },
}

/// Decodes one pgoutput message (the payload of one `XLogData`).
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { buf: bytes };
    let tag = r.u8("message type")?;
    let msg = match tag {
        b'B' => Message::Begin {
            final_lsn: Lsn(r.u64("final LSN")?),
            commit_time_micros: r.i64("commit time")?,
            xid: r.u32("xid")?,
        },
        b'C' => Message::Commit {
            flags: r.u8("flags")?,
            commit_lsn: Lsn(r.u64("commit LSN")?),
            end_lsn: Lsn(r.u64("end LSN")?),
            commit_time_micros: r.i64("commit time")?,
        },
        b'O' => Message::Origin {
            commit_lsn: Lsn(r.u64("origin LSN")?),
            name: r.cstr("origin name")?,
        },
        b'R' => {
            let oid = r.u32("relation oid")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.i16("column count")?;
            if n < 0 {
                return Err(DecodeError::Malformed(format!("negative column count {n}")));
            }
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                columns.push(Column {
                    part_of_key: r.u8("column flags")? & 1 == 1,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("column type")?,
                    type_modifier: r.i32("type modifier")?,
                });
            }
            Message::Relation(Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            oid: r.u32("type oid")?,
            namespace: r.cstr("type namespace")?,
            name: r.cstr("type name")?,
        },
        b'I' => {
            let relation = r.u32("relation oid")?;
            r.expect(b'N', "new tuple marker")?;
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32("relation oid")?;
            let mut old = None;
            let mut marker = r.u8("tuple marker")?;
            if marker == b'K' || marker == b'O' {
                old = Some(r.tuple()?);
                marker = r.u8("new tuple marker")?;
            }
            if marker != b'N' {
                return Err(DecodeError::Malformed(format!(
                    "update tuple marker {marker:#04x}"
                )));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32("relation oid")?;
            let marker = r.u8("old tuple marker")?;
            if marker != b'K' && marker != b'O' {
                return Err(DecodeError::Malformed(format!(
                    "delete tuple marker {marker:#04x}"
                )));
            }
            Message::Delete {
                relation,
                old: r.tuple()?,
            }
        }
        b'T' => {
            let n = r.i32("relation count")?;
            let options = r.u8("truncate options")?;
            if n < 0 {
                return Err(DecodeError::Malformed(format!(
                    "negative relation count {n}"
                )));
            }
            let relations = (0..n)
                .map(|_| r.u32("relation oid"))
                .collect::<Result<_, _>>()?;
            Message::Truncate { options, relations }
        }
        b'M' => {
            let transactional = r.u8("message flags")? & 1 == 1;
            let lsn = Lsn(r.u64("message LSN")?);
            let prefix = r.cstr("message prefix")?;
            let len = r.len("message length")?;
            Message::Message {
                transactional,
                lsn,
                prefix,
                content: r.take(len, "message content")?.to_vec(),
            }
        }
        other => return Err(DecodeError::UnknownMessage(other)),
    };
    if !r.buf.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} trailing bytes after a {:?} message",
            r.buf.len(),
            tag as char
        )));
    }
    Ok(msg)
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                what,
                needed: n - self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// A non-negative Int32 length.
    fn len(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let n = self.i32(what)?;
        usize::try_from(n).map_err(|_| DecodeError::Malformed(format!("negative {what} {n}")))
    }

    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated { what, needed: 1 })?;
        let s = std::str::from_utf8(&self.buf[..end])
            .map_err(|_| DecodeError::Malformed(format!("{what} is not UTF-8")))?
            .to_string();
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    fn expect(&mut self, byte: u8, what: &'static str) -> Result<(), DecodeError> {
        let got = self.u8(what)?;
        if got == byte {
            Ok(())
        } else {
            Err(DecodeError::Malformed(format!(
                "{what}: expected {:?}, got {got:#04x}",
                byte as char
            )))
        }
    }

    fn tuple(&mut self) -> Result<Vec<Datum>, DecodeError> {
        let n = self.i16("tuple column count")?;
        if n < 0 {
            return Err(DecodeError::Malformed(format!(
                "negative tuple column count {n}"
            )));
        }
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            out.push(match self.u8("column kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                b't' => {
                    let len = self.len("column length")?;
                    Datum::Text(self.take(len, "column value")?.to_vec())
                }
                b'b' => {
                    let len = self.len("column length")?;
                    Datum::Binary(self.take(len, "column value")?.to_vec())
                }
                other => return Err(DecodeError::Malformed(format!("column kind {other:#04x}"))),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds pgoutput bytes by hand, as the server sends them.
    #[derive(Default)]
    pub(crate) struct Bytes(pub Vec<u8>);

    impl Bytes {
        pub fn tag(t: u8) -> Self {
            Bytes(vec![t])
        }
        pub fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        pub fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn cstr(mut self, s: &str) -> Self {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        pub fn text(self, s: &str) -> Self {
            let mut b = self.u8(b't').i32(s.len() as i32);
            b.0.extend_from_slice(s.as_bytes());
            b
        }
    }

    /// A Relation message for `outbox_events` in the shape PostgreSQL 15 sends it (see
    /// `outbox::tests` for bytes captured from a real server), columns in table order.
    pub(crate) fn outbox_relation(oid: u32) -> Vec<u8> {
        let mut b = Bytes::tag(b'R')
            .i32(oid as i32)
            .cstr("public")
            .cstr("outbox_events")
            .u8(b'd')
            .i16(7);
        for (key, name, ty) in [
            (1, "id", 2950),
            (0, "aggregate_type", 25),
            (0, "aggregate_id", 25),
            (0, "event_type", 25),
            (0, "payload", 3802),
            (0, "traceparent", 25),
            (0, "created_at", 1184),
        ] {
            b = b.u8(key).cstr(name).i32(ty).i32(-1);
        }
        b.0
    }

    #[test]
    fn begin_and_commit() {
        let begin = Bytes::tag(b'B').u64(0x16_B374_D848).u64(1000).i32(742).0;
        assert_eq!(
            decode(&begin),
            Ok(Message::Begin {
                final_lsn: Lsn(0x16_B374_D848),
                commit_time_micros: 1000,
                xid: 742
            })
        );
        let commit = Bytes::tag(b'C').u8(0).u64(10).u64(20).u64(30).0;
        assert_eq!(
            decode(&commit),
            Ok(Message::Commit {
                flags: 0,
                commit_lsn: Lsn(10),
                end_lsn: Lsn(20),
                commit_time_micros: 30
            })
        );
    }

    #[test]
    fn relation_then_insert() {
        let rel = decode(&outbox_relation(16390)).unwrap();
        let Message::Relation(rel) = rel else {
            panic!("{rel:?}")
        };
        assert_eq!(
            (rel.oid, rel.namespace.as_str(), rel.name.as_str()),
            (16390, "public", "outbox_events")
        );
        assert_eq!(rel.columns.len(), 7);
        assert!(rel.columns[0].part_of_key && !rel.columns[1].part_of_key);
        assert_eq!(rel.columns[4].type_oid, 3802);

        let insert = Bytes::tag(b'I')
            .i32(16390)
            .u8(b'N')
            .i16(3)
            .text("abc")
            .u8(b'n')
            .u8(b'u')
            .0;
        assert_eq!(
            decode(&insert),
            Ok(Message::Insert {
                relation: 16390,
                new: vec![
                    Datum::Text(b"abc".to_vec()),
                    Datum::Null,
                    Datum::UnchangedToast
                ]
            })
        );
    }

    #[test]
    fn origin_type_truncate_message() {
        assert_eq!(
            decode(&Bytes::tag(b'O').u64(99).cstr("node_a").0),
            Ok(Message::Origin {
                commit_lsn: Lsn(99),
                name: "node_a".into()
            })
        );
        assert_eq!(
            decode(&Bytes::tag(b'Y').i32(77).cstr("public").cstr("mood").0),
            Ok(Message::Type {
                oid: 77,
                namespace: "public".into(),
                name: "mood".into()
            })
        );
        assert_eq!(
            decode(&Bytes::tag(b'T').i32(2).u8(1).i32(5).i32(6).0),
            Ok(Message::Truncate {
                options: 1,
                relations: vec![5, 6]
            })
        );
        let m = Bytes::tag(b'M')
            .u8(1)
            .u64(42)
            .cstr("kafkify")
            .i32(2)
            .u8(b'h')
            .u8(b'i')
            .0;
        assert_eq!(
            decode(&m),
            Ok(Message::Message {
                transactional: true,
                lsn: Lsn(42),
                prefix: "kafkify".into(),
                content: b"hi".to_vec()
            })
        );
    }

    #[test]
    fn update_and_delete() {
        let u = Bytes::tag(b'U')
            .i32(1)
            .u8(b'O')
            .i16(1)
            .text("old")
            .u8(b'N')
            .i16(1)
            .text("new")
            .0;
        assert_eq!(
            decode(&u),
            Ok(Message::Update {
                relation: 1,
                old: Some(vec![Datum::Text(b"old".to_vec())]),
                new: vec![Datum::Text(b"new".to_vec())]
            })
        );
        let u = Bytes::tag(b'U').i32(1).u8(b'N').i16(0).0;
        assert_eq!(
            decode(&u),
            Ok(Message::Update {
                relation: 1,
                old: None,
                new: vec![]
            })
        );
        let d = Bytes::tag(b'D')
            .i32(1)
            .u8(b'K')
            .i16(1)
            .u8(b'b')
            .i32(1)
            .u8(7)
            .0;
        assert_eq!(
            decode(&d),
            Ok(Message::Delete {
                relation: 1,
                old: vec![Datum::Binary(vec![7])]
            })
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert_eq!(
            decode(&[]),
            Err(DecodeError::Truncated {
                what: "message type",
                needed: 1
            })
        );
        assert_eq!(decode(b"Z"), Err(DecodeError::UnknownMessage(b'Z')));
        // Every prefix of a valid message fails cleanly.
        let full = outbox_relation(1);
        for cut in 0..full.len() {
            assert!(decode(&full[..cut]).is_err(), "prefix of {cut} bytes");
        }
        let insert = Bytes::tag(b'I').i32(1).u8(b'N').i16(1).text("abc").0;
        for cut in 0..insert.len() {
            assert!(decode(&insert[..cut]).is_err(), "prefix of {cut} bytes");
        }
        // A length that points past the end, a negative length, a bad marker, trailing bytes.
        assert!(decode(&Bytes::tag(b'I').i32(1).u8(b'N').i16(1).u8(b't').i32(1000).0).is_err());
        assert!(decode(&Bytes::tag(b'I').i32(1).u8(b'N').i16(1).u8(b't').i32(-1).0).is_err());
        assert!(decode(&Bytes::tag(b'I').i32(1).u8(b'X').i16(0).0).is_err());
        assert!(decode(&Bytes::tag(b'I').i32(1).u8(b'N').i16(-3).0).is_err());
        assert!(decode(&Bytes::tag(b'I').i32(1).u8(b'N').i16(0).u8(0).0).is_err());
        assert!(decode(&Bytes::tag(b'R').i32(1).cstr("public").u8(0xff).u8(0).0).is_err());
    }

    #[test]
    fn lsn_text_form() {
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!("16/B374D848".parse::<Lsn>(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("0/0".parse::<Lsn>(), Ok(Lsn(0)));
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("1FFFFFFFF/0".parse::<Lsn>().is_err());
    }
}
