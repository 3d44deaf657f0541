//! One consumed record as a row of the `events` table, and the rows of a batch in PostgreSQL's
//! COPY text format. Pure: no I/O, so what is stored for every kind of input is unit-tested.
//!
//! Nothing is refused: a value that is not a readable JSON (or Avro) record is kept raw with the
//! reason, and service/action come from the headers when the value cannot name them.

use std::fmt::Write as _;
use std::sync::Arc;

use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use serde::Deserialize;

use crate::envelope::parse_timestamp;
use crate::filter::SenderAndType;
use crate::stage::Record;

/// Header a replay stamps on what it re-publishes: the store does not store it again.
pub const HEADER_REPLAY_ID: &str = "eventpipe.replay.id";
pub const HEADER_REPLAY_TOPIC: &str = "eventpipe.replay.topic";
pub const HEADER_REPLAY_PARTITION: &str = "eventpipe.replay.partition";
pub const HEADER_REPLAY_OFFSET: &str = "eventpipe.replay.offset";
pub const HEADER_REPLAY_SEQ: &str = "eventpipe.replay.seq";
/// The prefix every replay header shares (stages carry them through to their outputs).
pub const REPLAY_HEADER_PREFIX: &str = "eventpipe.replay.";

/// How a value is kept.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// JSON text, stored as `value` (jsonb).
    Json(Vec<u8>),
    /// A decoded Avro record as JSON text, and its frame, kept for byte-exact replay.
    Avro {
        json: Vec<u8>,
        frame: Vec<u8>,
        schema_id: u32,
    },
    /// Bytes that are not a readable value, with why.
    Raw { bytes: Vec<u8>, reason: String },
}

impl Body {
    pub fn format(&self) -> &'static str {
        match self {
            Body::Json(_) => "json",
            Body::Avro { .. } => "avro",
            Body::Raw { .. } => "raw",
        }
    }

    fn len(&self) -> usize {
        match self {
            Body::Json(json) => json.len(),
            Body::Avro { json, frame, .. } => json.len() + frame.len(),
            Body::Raw { bytes, reason } => bytes.len() + reason.len(),
        }
    }
}

/// One row of `events`, owned: it outlives the consumed message until its batch commits.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Kafka timestamp in ms (0 when the record has none, or one outside years 1..=9999).
    pub kafka_time_ms: i64,
    pub event_time: Option<DateTime<Utc>>,
    pub service: String,
    pub action: String,
    pub key: Option<Vec<u8>>,
    /// JSON text of `[[name, value], ...]`, none without headers.
    pub headers: Option<String>,
    pub body: Body,
}

/// Just `payload.timestamp` of an envelope.
#[derive(Deserialize)]
struct EventTime<'a> {
    #[serde(borrow, default)]
    payload: Option<PayloadTime<'a>>,
}

#[derive(Deserialize)]
struct PayloadTime<'a> {
    #[serde(borrow, default)]
    timestamp: Option<std::borrow::Cow<'a, str>>,
}

/// PostgreSQL's timestamptz covers more, but years outside 1..=9999 are not event times anyone
/// meant; they are stored as null rather than refused.
fn plausible(time: DateTime<Utc>) -> Option<DateTime<Utc>> {
    (1..=9999).contains(&time.year()).then_some(time)
}

fn event_time(json: &[u8]) -> Option<DateTime<Utc>> {
    let parsed: EventTime<'_> = serde_json::from_slice(json).ok()?;
    parse_timestamp(&parsed.payload?.timestamp?).and_then(plausible)
}

/// Why `bytes` cannot be stored as jsonb, if they cannot.
pub fn json_problem(bytes: &[u8], max_json_bytes: usize) -> Option<String> {
    if bytes.len() > max_json_bytes {
        return Some(format!(
            "oversized: {} bytes, more than the {max_json_bytes} stored as JSON",
            bytes.len()
        ));
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => return Some(format!("not UTF-8: {error}")),
    };
    if let Err(error) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
        return Some(format!("not JSON: {error}"));
    }
    // jsonb cannot hold a NUL character; the escape is the only way JSON text spells one.
    if contains_nul_escape(text) {
        return Some("not storable as jsonb: contains \\u0000".into());
    }
    None
}

fn contains_nul_escape(text: &str) -> bool {
    text.as_bytes()
        .windows(6)
        .any(|w| w[0] == b'\\' && w[1] == b'u' && &w[2..] == b"0000")
}

/// Headers as the JSON text of `[[name, value], ...]`.
pub fn headers_json(record: &Record<'_>) -> Option<String> {
    if record.headers.is_empty() {
        return None;
    }
    let pairs: Vec<serde_json::Value> = record
        .headers
        .iter()
        // jsonb cannot hold NUL: a name has it replaced (a value with one is kept as hex).
        .map(|(name, value)| serde_json::json!([name.replace('\0', "\u{fffd}"), bytes_json(value)]))
        .collect();
    Some(serde_json::Value::Array(pairs).to_string())
}

/// Lowercase hex: how the store spells bytes that are not UTF-8 (`{"hex": ...}`).
pub fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// The bytes of `hex` text; `None` when it is not an even number of hex digits.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

/// Bytes as the store shows them in JSON: a string when UTF-8 (and without NUL, which jsonb
/// cannot hold), else `{"hex": "..."}`.
pub fn bytes_json(bytes: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.contains('\0') => serde_json::Value::String(text.to_string()),
        _ => serde_json::json!({ "hex": hex(bytes) }),
    }
}

/// The headers `headers_json` stored, back as (name, bytes) pairs in order.
pub fn parse_stored_headers(headers: &serde_json::Value) -> Result<Vec<(String, Vec<u8>)>, String> {
    let pairs = headers
        .as_array()
        .ok_or_else(|| format!("headers are not an array: {headers}"))?;
    pairs
        .iter()
        .map(|pair| {
            let (name, value) = match pair.as_array().map(Vec::as_slice) {
                Some([serde_json::Value::String(name), value]) => (name, value),
                _ => return Err(format!("a header is not [name, value]: {pair}")),
            };
            let bytes = match value {
                serde_json::Value::String(text) => text.as_bytes().to_vec(),
                other => other
                    .get("hex")
                    .and_then(serde_json::Value::as_str)
                    .and_then(unhex)
                    .ok_or_else(|| format!("header {name:?} has an unreadable value: {other}"))?,
            };
            Ok((name.clone(), bytes))
        })
        .collect()
}

impl StoredRow {
    /// The row of `record` whose value is `body` (the caller decoded Avro, or not).
    pub fn new(record: &Record<'_>, body: Body) -> StoredRow {
        // A raw value may still be JSON (too big, or holding a NUL jsonb refuses): it names its
        // sender, type and time all the same.
        let json = match &body {
            Body::Json(json) | Body::Avro { json, .. } => Some(json.as_slice()),
            Body::Raw { bytes, .. } => Some(bytes.as_slice()),
        };
        let names = SenderAndType::of(record.header("service"), record.header("action"), json);
        StoredRow {
            topic: record.topic.clone(),
            partition: record.partition,
            offset: record.offset,
            // A timestamp PostgreSQL could not take (a producer's bogus CreateTime) is stored as
            // none, the same way every time, so a re-delivery still meets its row.
            kafka_time_ms: record
                .timestamp_ms
                .and_then(DateTime::from_timestamp_millis)
                .and_then(plausible)
                .map_or(0, |time| time.timestamp_millis()),
            event_time: json.and_then(event_time),
            service: names.service.into_owned(),
            action: names.action.into_owned(),
            key: record.key.map(<[u8]>::to_vec),
            headers: headers_json(record),
            body,
        }
    }

    /// A JSON topic's record: JSON when it is storable as jsonb, else raw with the reason.
    pub fn from_json_topic(record: &Record<'_>, max_json_bytes: usize) -> StoredRow {
        let body = match json_problem(record.payload, max_json_bytes) {
            None => Body::Json(record.payload.to_vec()),
            Some(reason) => Body::Raw {
                bytes: record.payload.to_vec(),
                reason,
            },
        };
        StoredRow::new(record, body)
    }

    /// The same record kept raw: PostgreSQL refused what it was stored as.
    pub fn into_raw(self, reason: String) -> StoredRow {
        let bytes = match self.body {
            Body::Json(json) => json,
            Body::Avro { frame, .. } => frame,
            Body::Raw { bytes, .. } => bytes,
        };
        StoredRow {
            body: Body::Raw { bytes, reason },
            ..self
        }
    }

    /// Roughly what the row costs in memory and on the wire (for batch limits).
    pub fn approximate_bytes(&self) -> usize {
        96 + self.topic.len()
            + self.service.len()
            + self.action.len()
            + self.key.as_ref().map_or(0, Vec::len)
            + self.headers.as_ref().map_or(0, String::len)
            + self.body.len()
    }

    pub fn kafka_time(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.kafka_time_ms).unwrap_or_default()
    }
}

/// The columns `copy_rows` writes, in order (`seq` and `stored_at` take their defaults).
pub const COPY_COLUMNS: &str = "topic, kafka_partition, kafka_offset, kafka_time, event_time, \
     service, action, key, headers, value, raw, format, schema_id, reason";

/// Appends `rows` to `out` in COPY's text format (tab-separated, `\N` for null).
pub fn copy_rows<'a>(rows: impl IntoIterator<Item = &'a StoredRow>, out: &mut Vec<u8>) {
    for row in rows {
        copy_text(&row.topic, out);
        tab(out);
        let _ = write_display(out, row.partition);
        tab(out);
        let _ = write_display(out, row.offset);
        tab(out);
        copy_time(row.kafka_time(), out);
        tab(out);
        match row.event_time {
            Some(time) => copy_time(time, out),
            None => null(out),
        }
        tab(out);
        copy_text(&row.service, out);
        tab(out);
        copy_text(&row.action, out);
        tab(out);
        match &row.key {
            Some(key) => copy_bytea(key, out),
            None => null(out),
        }
        tab(out);
        match &row.headers {
            Some(headers) => copy_text(headers, out),
            None => null(out),
        }
        tab(out);
        let (value, raw, schema_id, reason) = match &row.body {
            Body::Json(json) => (Some(json.as_slice()), None, None, None),
            Body::Avro {
                json,
                frame,
                schema_id,
            } => (
                Some(json.as_slice()),
                Some(frame.as_slice()),
                Some(*schema_id),
                None,
            ),
            Body::Raw { bytes, reason } => (None, Some(bytes.as_slice()), None, Some(reason)),
        };
        match value {
            // Checked to be UTF-8 when the body was made: escaped as the bytes they are.
            Some(json) => copy_escaped(json, out),
            None => null(out),
        }
        tab(out);
        match raw {
            Some(raw) => copy_bytea(raw, out),
            None => null(out),
        }
        tab(out);
        copy_text(row.body.format(), out);
        tab(out);
        match schema_id {
            Some(id) => {
                let _ = write_display(out, id);
            }
            None => null(out),
        }
        tab(out);
        match reason {
            Some(reason) => copy_text(reason, out),
            None => null(out),
        }
        out.push(b'\n');
    }
}

fn write_display(out: &mut Vec<u8>, value: impl std::fmt::Display) -> std::io::Result<()> {
    use std::io::Write;
    write!(out, "{value}")
}

fn tab(out: &mut Vec<u8>) {
    out.push(b'\t');
}

fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(b"\\N");
}

/// RFC 3339 in UTC with microseconds (`2024-05-01T12:00:00.123456Z`), digit by digit: two
/// timestamps a row, written without an intermediate String.
fn copy_time(time: DateTime<Utc>, out: &mut Vec<u8>) {
    use chrono::Timelike;
    let Ok(year @ 0..=9999) = u32::try_from(time.year()) else {
        out.extend_from_slice(time.to_rfc3339_opts(SecondsFormat::Micros, true).as_bytes());
        return;
    };
    let digits = |out: &mut Vec<u8>, value: u32, width: u32| {
        for place in (0..width).rev() {
            out.push(b'0' + (value / 10u32.pow(place) % 10) as u8);
        }
    };
    digits(out, year, 4);
    out.push(b'-');
    digits(out, time.month(), 2);
    out.push(b'-');
    digits(out, time.day(), 2);
    out.push(b'T');
    digits(out, time.hour(), 2);
    out.push(b':');
    digits(out, time.minute(), 2);
    out.push(b':');
    digits(out, time.second(), 2);
    out.push(b'.');
    // A leap second's nanoseconds run past 1e9 (chrono prints it as second 60): only the
    // fraction is written here.
    digits(out, time.nanosecond() % 1_000_000_000 / 1_000, 6);
    out.push(b'Z');
}

/// Text with COPY's escapes. PostgreSQL text cannot hold NUL: it becomes U+FFFD (only in text
/// columns built from headers or the reason; values with NUL are kept raw).
fn copy_text(text: &str, out: &mut Vec<u8>) {
    copy_escaped(text.as_bytes(), out);
}

/// UTF-8 bytes with COPY's escapes, copied in runs between the bytes that need one (those are
/// ASCII, so a run never splits a character).
fn copy_escaped(bytes: &[u8], out: &mut Vec<u8>) {
    out.reserve(bytes.len());
    let mut run = 0;
    for (at, &byte) in bytes.iter().enumerate() {
        if byte > b'\r' && byte != b'\\' {
            continue;
        }
        let escape: &[u8] = match byte {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            0 => "\u{fffd}".as_bytes(),
            _ => continue,
        };
        out.extend_from_slice(&bytes[run..at]);
        out.extend_from_slice(escape);
        run = at + 1;
    }
    out.extend_from_slice(&bytes[run..]);
}

/// bytea in hex form; its backslash escaped for COPY.
fn copy_bytea(bytes: &[u8], out: &mut Vec<u8>) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(3 + bytes.len() * 2);
    out.extend_from_slice(b"\\\\x");
    for byte in bytes {
        out.push(DIGITS[(byte >> 4) as usize]);
        out.push(DIGITS[(byte & 0xf) as usize]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::RecordHeaders;

    fn record<'a>(
        topic: &'a Arc<str>,
        payload: &'a [u8],
        headers: &'a [(&'a str, &'a [u8])],
    ) -> Record<'a> {
        Record {
            topic,
            partition: 2,
            offset: 41,
            timestamp_ms: Some(1_714_564_800_123),
            key: Some(b"42"),
            payload,
            headers: if headers.is_empty() {
                RecordHeaders::None
            } else {
                RecordHeaders::Pairs(headers)
            },
        }
    }

    const ENVELOPE: &[u8] = br#"{"service":"lk","action":"create_user","payload":{"message":"m","timestamp":"2024-05-01T12:00:00.123456","data":{"user_id":42}}}"#;

    #[test]
    fn an_envelope_is_stored_as_json_with_its_sender_type_and_event_time() {
        let topic: Arc<str> = "create_user_in".into();
        let row = StoredRow::from_json_topic(&record(&topic, ENVELOPE, &[]), 1 << 20);
        assert_eq!(row.service, "lk");
        assert_eq!(row.action, "create_user");
        assert_eq!(
            row.event_time
                .unwrap()
                .to_rfc3339_opts(SecondsFormat::Micros, true),
            "2024-05-01T12:00:00.123456Z"
        );
        assert_eq!(row.body, Body::Json(ENVELOPE.to_vec()));
        assert_eq!(row.kafka_time_ms, 1_714_564_800_123);
    }

    #[test]
    fn headers_name_sender_and_type_first_and_are_kept_in_order() {
        let topic: Arc<str> = "t".into();
        let headers: &[(&str, &[u8])] = &[
            ("service", b"arm"),
            ("action", b"update_user"),
            ("bin", b"\xff\x00"),
            ("nul", b"a\x00b"),
        ];
        let row = StoredRow::from_json_topic(&record(&topic, ENVELOPE, headers), 1 << 20);
        assert_eq!(
            (row.service.as_str(), row.action.as_str()),
            ("arm", "update_user")
        );
        assert_eq!(
            row.headers.as_deref(),
            Some(
                r#"[["service","arm"],["action","update_user"],["bin",{"hex":"ff00"}],["nul",{"hex":"610062"}]]"#
            )
        );
    }

    #[test]
    fn stored_headers_read_back_as_the_bytes_they_were() {
        let topic: Arc<str> = "t".into();
        let headers: &[(&str, &[u8])] = &[("service", b"arm"), ("bin", b"\xff\x00"), ("e", b"")];
        let row = StoredRow::from_json_topic(&record(&topic, ENVELOPE, headers), 1 << 20);
        let stored: serde_json::Value = serde_json::from_str(&row.headers.unwrap()).unwrap();
        let back = parse_stored_headers(&stored).unwrap();
        let expected: Vec<(String, Vec<u8>)> = headers
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_vec()))
            .collect();
        assert_eq!(back, expected);
        assert_eq!(unhex("00ABff"), Some(vec![0, 0xab, 0xff]));
        for bad in ["abc", "zz", "é0"] {
            assert_eq!(unhex(bad), None, "{bad}");
        }
        for bad in [
            serde_json::json!({"a": 1}),
            serde_json::json!([["a"]]),
            serde_json::json!([["a", {"hex": "f"}]]),
        ] {
            assert!(parse_stored_headers(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn what_is_not_storable_json_is_kept_raw_with_the_reason() {
        let topic: Arc<str> = "t".into();
        for (payload, reason) in [
            (&b"\xff\xfe not utf-8"[..], "not UTF-8"),
            (&b"{\"service\": "[..], "not JSON"),
            (&br#"{"a":"nul \u0000 here"}"#[..], "\\u0000"),
            (&[b' '; 64][..], "not JSON"),
        ] {
            let row = StoredRow::from_json_topic(&record(&topic, payload, &[]), 1 << 20);
            match &row.body {
                Body::Raw { bytes, reason: why } => {
                    assert_eq!(bytes, payload);
                    assert!(why.contains(reason), "{why}");
                }
                other => panic!("{other:?}"),
            }
            assert_eq!((row.service.as_str(), row.action.as_str()), ("", ""));
        }
        let mut far = record(&topic, ENVELOPE, &[]);
        far.timestamp_ms = Some(i64::MAX / 4);
        assert_eq!(StoredRow::from_json_topic(&far, 1 << 20).kafka_time_ms, 0);
        let row = StoredRow::from_json_topic(&record(&topic, ENVELOPE, &[]), 10);
        assert!(matches!(&row.body, Body::Raw { reason, .. } if reason.starts_with("oversized")));
        // A raw record still has the sender and type its headers or its JSON give.
        let nul = br#"{"service":"lk","action":"a","nul":"\u0000"}"#;
        let row = StoredRow::from_json_topic(&record(&topic, nul, &[]), 1 << 20);
        assert_eq!((row.service.as_str(), row.action.as_str()), ("lk", "a"));
        assert!(matches!(row.body, Body::Raw { .. }));
        let headers: &[(&str, &[u8])] = &[("service", b"lk"), ("action", b"x")];
        let row = StoredRow::from_json_topic(&record(&topic, b"\xff", headers), 1 << 20);
        assert_eq!((row.service.as_str(), row.action.as_str()), ("lk", "x"));
    }

    #[test]
    fn copy_text_escapes_what_copy_would_misread() {
        let topic: Arc<str> = "t".into();
        let payload = br#"{"service":"l\tk","action":"a\\b","payload":{"message":"x\ny"}}"#;
        let mut row = StoredRow::from_json_topic(&record(&topic, payload, &[]), 1 << 20);
        row.key = Some(vec![0, 0xab]);
        let mut out = Vec::new();
        copy_rows([&row], &mut out);
        let line = String::from_utf8(out).unwrap();
        assert!(line.ends_with('\n'));
        let fields: Vec<&str> = line.trim_end_matches('\n').split('\t').collect();
        assert_eq!(fields.len(), COPY_COLUMNS.split(',').count(), "{line}");
        assert_eq!(fields[0], "t");
        assert_eq!(fields[1], "2");
        assert_eq!(fields[2], "41");
        assert_eq!(fields[3], "2024-05-01T12:00:00.123000Z");
        assert_eq!(fields[4], "\\N", "no payload.timestamp");
        // The JSON's own backslashes are doubled for COPY; serde decoded the service's \t.
        assert_eq!(fields[5], "l\\tk");
        assert_eq!(fields[7], "\\\\x00ab");
        assert_eq!(
            fields[9],
            r#"{"service":"l\\tk","action":"a\\\\b","payload":{"message":"x\\ny"}}"#
        );
        assert_eq!(fields[11], "json");
    }

    #[test]
    fn times_and_escapes_are_written_as_chrono_and_the_byte_rules_would() {
        let times = [
            "2024-05-01T12:00:00.123456Z",
            "0001-01-01T00:00:00Z",
            "1970-01-01T00:00:00.000001Z",
            "9999-12-31T23:59:59.999999999Z",
        ];
        for text in times {
            let time: DateTime<Utc> = text.parse().unwrap();
            let mut out = Vec::new();
            copy_time(time, &mut out);
            let expected = time.to_rfc3339_opts(SecondsFormat::Micros, true);
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
        // Outside four-digit years chrono's own form is kept.
        let far = DateTime::from_timestamp(400_000_000_000, 0).unwrap();
        let mut out = Vec::new();
        copy_time(far, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            far.to_rfc3339_opts(SecondsFormat::Micros, true)
        );

        let mut out = Vec::new();
        copy_escaped("é\\t\tx\u{1}\n\r\0ü".as_bytes(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "é\\\\t\\tx\u{1}\\n\\r\u{fffd}ü"
        );
    }
}
