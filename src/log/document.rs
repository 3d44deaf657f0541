//! Document mapping, pure: an info_in record becomes the Elasticsearch document Kibana users
//! search (field names kept from the old Logstash logger), its date-based index and its `_id`.

use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, SecondsFormat, Utc};
use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::envelope::{parse_timestamp, DecodeError, Envelope, Payload};

/// The `service` field of every document: the old logger used it as the index name.
pub const LOGGER_SERVICE: &str = "logger-service";
/// Tag on documents whose `@timestamp` is the Kafka record's, not the event's.
pub const TIMESTAMP_FALLBACK_TAG: &str = "timestamp_from_kafka";
/// Level when neither the payload nor the `level` header names one.
pub const DEFAULT_LEVEL: &str = "info";

/// The consumed record around the payload: where it sits in Kafka and its `level` header.
#[derive(Debug, Clone, Copy)]
pub struct RecordMeta<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    /// The `level` header's value, if the producer set one.
    pub level_header: Option<&'a [u8]>,
}

/// One document ready for the bulk API.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedDocument {
    pub index: String,
    pub id: String,
    /// The document's JSON.
    pub document: Vec<u8>,
}

/// A strftime pattern for index names, validated once: `logger-service-%Y.%m.%d`.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexPattern {
    pattern: String,
}

impl IndexPattern {
    /// Checks that the pattern renders to a valid Elasticsearch index name for any date.
    pub fn parse(pattern: &str) -> Result<IndexPattern, String> {
        if StrftimeItems::new(pattern).any(|item| matches!(item, Item::Error)) {
            return Err("not a valid strftime pattern".into());
        }
        let candidate = IndexPattern {
            pattern: pattern.to_string(),
        };
        let sample = candidate.render(&DateTime::<Utc>::UNIX_EPOCH);
        if sample.is_empty() || sample.len() > 255 {
            return Err("index names must be 1-255 bytes".into());
        }
        if sample.starts_with(['-', '_', '+', '.']) {
            return Err("index names must not start with -, _, + or .".into());
        }
        if sample
            .chars()
            .any(|c| c.is_uppercase() || "\\/*?\"<>| ,#:%".contains(c))
        {
            return Err(
                "index names must be lowercase without \\ / * ? \" < > | space , # : %".into(),
            );
        }
        if candidate.prefix().is_empty() {
            return Err("the pattern must start with a fixed prefix (for the template)".into());
        }
        Ok(candidate)
    }

    /// The index for a document dated `at` (UTC).
    pub fn render(&self, at: &DateTime<Utc>) -> String {
        at.format(&self.pattern).to_string()
    }

    /// The text before the first date field, e.g. `logger-service-`.
    fn prefix(&self) -> &str {
        self.pattern.split('%').next().unwrap_or_default()
    }

    /// The index template's pattern: every index this pattern can produce, e.g. `logger-service-*`.
    pub fn wildcard(&self) -> String {
        format!("{}*", self.prefix())
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }
}

/// The deterministic `_id`: a replay or a restart writes the same id, so no duplicate appears.
/// Partition and offset are the last two fields, so ids stay unambiguous for any topic name.
pub fn document_id(topic: &str, partition: i32, offset: i64) -> String {
    format!("{topic}-{partition}-{offset}")
}

/// Maps one record's bytes to its document, or says why it is not a loggable envelope.
pub fn map_record(
    payload: &[u8],
    meta: &RecordMeta<'_>,
    pattern: &IndexPattern,
    max_bytes: usize,
) -> Result<MappedDocument, DecodeError> {
    if payload.len() <= max_bytes {
        if let Some(mapped) = map_typical(payload, meta, pattern) {
            return Ok(mapped);
        }
    }
    map_any(payload, meta, pattern, max_bytes)
}

/// The fast path, for the records the dispatcher writes: a borrowed, typed read with `data`
/// kept as raw JSON, serialized straight to the document (no JSON tree). `None` for anything
/// unusual (a missing or non-string timestamp, odd types, an empty action, invalid input):
/// `map_any` then maps it, or says precisely what is wrong, exactly as before.
fn map_typical(
    payload: &[u8],
    meta: &RecordMeta<'_>,
    pattern: &IndexPattern,
) -> Option<MappedDocument> {
    let input: TypicalInput<'_> = serde_json::from_slice(payload).ok()?;
    if input.action.trim().is_empty() {
        return None;
    }
    let event_time = parse_timestamp(&input.payload.timestamp);
    let timestamp = match event_time {
        Some(t) => t,
        None => meta
            .timestamp_ms
            .and_then(DateTime::<Utc>::from_timestamp_millis)?,
    };
    let level = document_level(input.payload.level.as_deref(), meta);
    let origin = input.source.as_ref().map(|source| {
        let (timestamp, timestamp_raw) = match source.timestamp.as_deref() {
            None => (None, None),
            Some(raw) => match parse_timestamp(raw) {
                Some(t) => (Some(format_time(&t)), None),
                None => (None, Some(raw)),
            },
        };
        TypicalOrigin {
            service: source.service.as_deref(),
            action: source.action.as_deref(),
            topic: source.topic.as_deref(),
            key: source.key.as_deref(),
            partition: source.partition,
            offset: source.offset,
            timestamp,
            timestamp_raw,
        }
    });
    let fallback = event_time.is_none();
    let document = TypicalDocument {
        timestamp: format_time(&timestamp),
        service: LOGGER_SERVICE,
        executer: &input.service,
        message: &input.payload.message,
        level,
        action: &input.action,
        kafka: KafkaTrail {
            topic: meta.topic,
            partition: meta.partition,
            offset: meta.offset,
            key: meta.key.map(String::from_utf8_lossy),
            timestamp: meta
                .timestamp_ms
                .and_then(DateTime::<Utc>::from_timestamp_millis)
                .map(|t| format_time(&t)),
        },
        data: input.payload.data,
        origin,
        tags: fallback.then_some([TIMESTAMP_FALLBACK_TAG]),
        timestamp_raw: fallback.then_some(&*input.payload.timestamp),
    };
    Some(MappedDocument {
        index: pattern.render(&timestamp),
        id: document_id(meta.topic, meta.partition, meta.offset),
        document: serde_json::to_vec(&document).ok()?,
    })
}

#[derive(Deserialize)]
struct TypicalInput<'a> {
    #[serde(borrow)]
    service: Cow<'a, str>,
    #[serde(borrow)]
    action: Cow<'a, str>,
    #[serde(borrow)]
    payload: TypicalPayload<'a>,
    #[serde(borrow, default)]
    source: Option<TypicalSource<'a>>,
}

#[derive(Deserialize)]
struct TypicalPayload<'a> {
    #[serde(borrow)]
    message: Cow<'a, str>,
    #[serde(borrow)]
    timestamp: Cow<'a, str>,
    #[serde(borrow, default)]
    level: Option<Cow<'a, str>>,
    /// `None` when absent or null, as in the general path.
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct TypicalSource<'a> {
    #[serde(borrow, default)]
    service: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    topic: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    key: Option<Cow<'a, str>>,
    #[serde(default)]
    partition: Option<i64>,
    #[serde(default)]
    offset: Option<i64>,
    #[serde(borrow, default)]
    timestamp: Option<Cow<'a, str>>,
}

/// The document `map_any` builds, field for field.
#[derive(Serialize)]
struct TypicalDocument<'a> {
    #[serde(rename = "@timestamp")]
    timestamp: String,
    service: &'static str,
    executer: &'a str,
    message: &'a str,
    level: String,
    action: &'a str,
    kafka: KafkaTrail<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    origin: Option<TypicalOrigin<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tags: Option<[&'static str; 1]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp_raw: Option<&'a str>,
}

#[derive(Serialize)]
struct KafkaTrail<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<String>,
}

#[derive(Serialize)]
struct TypicalOrigin<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partition: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp_raw: Option<&'a str>,
}

/// Maps any record, typical or not: the general path (a JSON tree), lenient where a log line
/// is still worth keeping and precise about why when it is not.
fn map_any(
    payload: &[u8],
    meta: &RecordMeta<'_>,
    pattern: &IndexPattern,
    max_bytes: usize,
) -> Result<MappedDocument, DecodeError> {
    let LogInput {
        envelope,
        raw_timestamp,
        payload_level,
        source,
    } = decode(payload, max_bytes)?;
    let Envelope {
        service: executer,
        action,
        payload: Payload { message, data, .. },
    } = envelope;

    // A log line is worth keeping even with a broken timestamp: fall back, mark, keep the raw.
    let event_time = raw_timestamp
        .as_ref()
        .and_then(Value::as_str)
        .and_then(parse_timestamp);
    let (timestamp, fallback) = match event_time {
        Some(t) => (t, false),
        None => {
            let record_time = meta
                .timestamp_ms
                .and_then(DateTime::<Utc>::from_timestamp_millis)
                .ok_or(DecodeError::MissingField("payload.timestamp"))?;
            (record_time, true)
        }
    };

    let level = document_level(payload_level.as_ref().and_then(Value::as_str), meta);

    let mut kafka = json!({
        "topic": meta.topic,
        "partition": meta.partition,
        "offset": meta.offset,
    });
    if let Some(key) = meta.key {
        kafka["key"] = Value::String(String::from_utf8_lossy(key).into_owned());
    }
    if let Some(ms) = meta
        .timestamp_ms
        .and_then(DateTime::<Utc>::from_timestamp_millis)
    {
        kafka["timestamp"] = Value::String(format_time(&ms));
    }

    let mut document = json!({
        "@timestamp": format_time(&timestamp),
        "service": LOGGER_SERVICE,
        "executer": executer,
        "message": message,
        "level": level,
        "action": action,
        "kafka": kafka,
    });
    if !data.is_null() {
        document["data"] = data;
    }
    if let Some(Value::Object(source)) = source {
        document["origin"] = Value::Object(origin(source));
    }
    if fallback {
        document["tags"] = json!([TIMESTAMP_FALLBACK_TAG]);
        if let Some(raw) = raw_timestamp {
            document["timestamp_raw"] = Value::String(match raw {
                Value::String(s) => s,
                other => other.to_string(),
            });
        }
    }
    Ok(MappedDocument {
        index: pattern.render(&timestamp),
        id: document_id(meta.topic, meta.partition, meta.offset),
        document: serde_json::to_vec(&document).expect("a JSON value always serializes"),
    })
}

/// The dispatcher's `source` block, reduced to the typed fields the template maps, so a
/// malformed block cannot make the whole document fail on a type conflict.
fn origin(mut source: Map<String, Value>) -> Map<String, Value> {
    let mut origin = Map::new();
    for field in ["service", "action", "topic", "key"] {
        if let Some(Value::String(s)) = source.remove(field) {
            origin.insert(field.into(), Value::String(s));
        }
    }
    for field in ["partition", "offset"] {
        if let Some(n) = source.remove(field).filter(Value::is_i64) {
            origin.insert(field.into(), n);
        }
    }
    if let Some(Value::String(raw)) = source.remove("timestamp") {
        match parse_timestamp(&raw) {
            Some(t) => origin.insert("timestamp".into(), Value::String(format_time(&t))),
            None => origin.insert("timestamp_raw".into(), Value::String(raw)),
        };
    }
    origin
}

/// The payload's level, else the `level` header's, else the default; normalized.
fn document_level(payload_level: Option<&str>, meta: &RecordMeta<'_>) -> String {
    payload_level
        .and_then(normalize_level)
        .or_else(|| {
            meta.level_header
                .and_then(|value| std::str::from_utf8(value).ok())
                .and_then(normalize_level)
        })
        .unwrap_or_else(|| DEFAULT_LEVEL.to_string())
}

/// Lowercase and trimmed, so `ERROR` and `error` are one term in Kibana; empty means unset.
fn normalize_level(raw: &str) -> Option<String> {
    let level = raw.trim().to_ascii_lowercase();
    (!level.is_empty()).then_some(level)
}

fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// An envelope plus what the log stage reads beyond it.
struct LogInput {
    envelope: Envelope,
    /// Taken out before validation: the log stage falls back instead of refusing.
    raw_timestamp: Option<Value>,
    payload_level: Option<Value>,
    /// The dispatcher's trail, absent from plain envelopes.
    source: Option<Value>,
}

/// Validates like `Envelope::decode` (same error kinds), except that a missing or non-string
/// timestamp is allowed, and keeps the fields the envelope type does not carry.
fn decode(bytes: &[u8], max_bytes: usize) -> Result<LogInput, DecodeError> {
    if bytes.len() > max_bytes {
        return Err(DecodeError::Oversized {
            size: bytes.len(),
            limit: max_bytes,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| DecodeError::NotUtf8(e.to_string()))?;
    let mut value: Value =
        serde_json::from_str(text).map_err(|e| DecodeError::MalformedJson(e.to_string()))?;
    let (mut raw_timestamp, mut payload_level, mut source) = (None, None, None);
    if let Some(root) = value.as_object_mut() {
        source = root.remove("source");
        if let Some(payload) = root.get_mut("payload").and_then(Value::as_object_mut) {
            raw_timestamp = payload.remove("timestamp");
            payload_level = payload.remove("level");
            payload.insert("timestamp".into(), Value::String(String::new()));
        }
    }
    Ok(LogInput {
        envelope: Envelope::from_value(value)?,
        raw_timestamp,
        payload_level,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISPATCHED: &str = r#"{"service":"eventpipe-dispatch","action":"create_user","payload":{"message":"User created","timestamp":"2026-11-23T18:00:00.123456Z","data":{"user_id":42}},"source":{"service":"lk","action":"create_user","topic":"create_user_in","partition":0,"offset":42,"timestamp":"2024-05-01T12:00:00.123456","key":"42"}}"#;

    fn meta(level_header: Option<&[u8]>) -> RecordMeta<'_> {
        RecordMeta {
            topic: "info_in",
            partition: 3,
            offset: 7,
            timestamp_ms: Some(1_700_000_000_250),
            key: Some(b"42"),
            level_header,
        }
    }

    fn pattern() -> IndexPattern {
        IndexPattern::parse("logger-service-%Y.%m.%d").unwrap()
    }

    /// A mapped document with its JSON parsed, for assertions.
    #[derive(Debug)]
    struct Mapped {
        index: String,
        id: String,
        document: Value,
    }

    fn map(payload: &str, level_header: Option<&[u8]>) -> Result<Mapped, DecodeError> {
        map_record(payload.as_bytes(), &meta(level_header), &pattern(), 1 << 20).map(|m| Mapped {
            index: m.index,
            id: m.id,
            document: serde_json::from_slice(&m.document).unwrap(),
        })
    }

    #[test]
    fn the_fast_path_maps_typical_records_exactly_like_the_general_one() {
        let typical = [
            DISPATCHED.to_string(),
            r#"{"service":"lk","action":"a","payload":{"message":"m","timestamp":"2024-05-01T23:59:59.5","data":{"x":[1,{"y":null}],"big":12345678901234567890}}}"#.into(),
            r#"{"service":"lk","action":"a","payload":{"message":"m","timestamp":"2024-05-01T12:00:00Z","level":" ERROR ","data":null}}"#.into(),
            r#"{"service":"lk","action":"a","payload":{"message":"m\n\"q\"","timestamp":"yesterday"},"extra":1}"#.into(),
            r#"{"service":"lk","action":"a","payload":{"message":"m","timestamp":"2024-05-01T12:00:00"},"source":{"topic":"t","timestamp":"soon","partition":1}}"#.into(),
            r#"{"service":"lk","action":"a","payload":{"message":"m","timestamp":"2024-05-01T12:00:00","level":null},"source":null}"#.into(),
        ];
        for payload in &typical {
            for (key, header) in [(Some(&b"42"[..]), None), (None, Some(&b"Warning"[..]))] {
                let meta = RecordMeta {
                    key,
                    level_header: header,
                    ..meta(None)
                };
                let fast = map_typical(payload.as_bytes(), &meta, &pattern())
                    .unwrap_or_else(|| panic!("fast path taken: {payload}"));
                let general = map_any(payload.as_bytes(), &meta, &pattern(), 1 << 20).unwrap();
                assert_eq!((&fast.index, &fast.id), (&general.index, &general.id));
                let fast: Value = serde_json::from_slice(&fast.document).unwrap();
                let general: Value = serde_json::from_slice(&general.document).unwrap();
                assert_eq!(fast, general, "{payload}");
            }
        }
        // Unusual records leave the fast path (and the general one decides).
        for payload in [
            r#"{"service":"lk","action":" ","payload":{"message":"m","timestamp":"t"}}"#,
            r#"{"service":"lk","action":"a","payload":{"message":"m"}}"#,
            r#"{"service":"lk","action":"a","payload":{"message":"m","timestamp":5}}"#,
            r#"{"service":"lk","action":"a","payload":{"message":"m","timestamp":"t","level":3}}"#,
            r#"{"service":"lk","action":"a","payload":{"message":"m","timestamp":"t"},"source":{"partition":"x"}}"#,
        ] {
            assert!(
                map_typical(payload.as_bytes(), &meta(None), &pattern()).is_none(),
                "{payload}"
            );
        }
    }

    #[test]
    fn dispatcher_output_maps_to_the_kibana_fields_with_trace() {
        let mapped = map(DISPATCHED, None).unwrap();
        let d = &mapped.document;
        assert_eq!(d["@timestamp"], "2026-11-23T18:00:00.123456Z");
        assert_eq!(d["service"], LOGGER_SERVICE);
        assert_eq!(d["executer"], "eventpipe-dispatch");
        assert_eq!(d["message"], "User created");
        assert_eq!(d["level"], DEFAULT_LEVEL);
        assert_eq!(d["action"], "create_user");
        assert_eq!(d["data"]["user_id"], 42);
        assert_eq!(d["kafka"]["topic"], "info_in");
        assert_eq!(d["kafka"]["partition"], 3);
        assert_eq!(d["kafka"]["offset"], 7);
        assert_eq!(d["kafka"]["key"], "42");
        assert_eq!(d["kafka"]["timestamp"], "2023-11-14T22:13:20.250000Z");
        assert_eq!(d["origin"]["service"], "lk");
        assert_eq!(d["origin"]["topic"], "create_user_in");
        assert_eq!(d["origin"]["offset"], 42);
        assert_eq!(d["origin"]["timestamp"], "2024-05-01T12:00:00.123456Z");
        assert!(d.get("tags").is_none());
        assert_eq!(mapped.index, "logger-service-2026.11.23");
        assert_eq!(mapped.id, "info_in-3-7");
    }

    #[test]
    fn zoneless_timestamps_are_utc_and_plain_envelopes_have_no_origin() {
        let plain = r#"{"service":"lk","action":"a","payload":{"message":"m","timestamp":"2024-05-01T23:59:59.5"}}"#;
        let d = map(plain, None).unwrap();
        assert_eq!(d.document["@timestamp"], "2024-05-01T23:59:59.500000Z");
        assert_eq!(d.index, "logger-service-2024.05.01");
        assert!(d.document.get("origin").is_none());
        assert!(d.document.get("data").is_none());
    }

    #[test]
    fn missing_or_bad_timestamps_fall_back_to_the_record_time_and_are_marked() {
        for (payload, raw) in [
            (r#"{"message":"m"}"#, None),
            (
                r#"{"message":"m","timestamp":"yesterday"}"#,
                Some("yesterday"),
            ),
            (r#"{"message":"m","timestamp":17}"#, Some("17")),
        ] {
            let envelope = format!(r#"{{"service":"s","action":"a","payload":{payload}}}"#);
            let d = map(&envelope, None).unwrap().document;
            assert_eq!(d["@timestamp"], d["kafka"]["timestamp"], "{payload}");
            assert_eq!(d["tags"], json!([TIMESTAMP_FALLBACK_TAG]));
            assert_eq!(d.get("timestamp_raw").and_then(Value::as_str), raw);
        }
        let no_record_time = RecordMeta {
            timestamp_ms: None,
            ..meta(None)
        };
        let err = map_record(
            br#"{"service":"s","action":"a","payload":{"message":"m"}}"#,
            &no_record_time,
            &pattern(),
            1 << 20,
        )
        .unwrap_err();
        assert_eq!(err.kind(), "missing_field");
    }

    #[test]
    fn level_comes_from_payload_then_header_then_default() {
        let with_level = r#"{"service":"s","action":"a","payload":{"message":"m","timestamp":"2024-01-01T00:00:00","level":" ERROR "}}"#;
        let without = r#"{"service":"s","action":"a","payload":{"message":"m","timestamp":"2024-01-01T00:00:00"}}"#;
        let header = Some(b"Warning".as_slice());
        assert_eq!(map(with_level, header).unwrap().document["level"], "error");
        assert_eq!(map(without, header).unwrap().document["level"], "warning");
        assert_eq!(map(without, None).unwrap().document["level"], DEFAULT_LEVEL);
    }

    #[test]
    fn a_malformed_source_block_keeps_only_well_typed_fields() {
        let odd = r#"{"service":"s","action":"a","payload":{"message":"m","timestamp":"2024-01-01T00:00:00"},"source":{"topic":5,"partition":"x","offset":9,"timestamp":"soon"}}"#;
        let origin = &map(odd, None).unwrap().document["origin"];
        assert_eq!(origin, &json!({"offset": 9, "timestamp_raw": "soon"}));
    }

    #[test]
    fn records_that_are_not_envelopes_say_why() {
        let cases = [
            ("{not json", "malformed_json"),
            ("[1]", "wrong_type"),
            (
                r#"{"action":"a","payload":{"message":"m"}}"#,
                "missing_field",
            ),
            (
                r#"{"service":"s","action":"","payload":{"message":"m"}}"#,
                "empty_action",
            ),
            (
                r#"{"service":"s","action":"a","payload":{}}"#,
                "missing_field",
            ),
            (r#"{"service":"s","action":"a","payload":[]}"#, "wrong_type"),
        ];
        for (payload, kind) in cases {
            assert_eq!(map(payload, None).unwrap_err().kind(), kind, "{payload}");
        }
        let err = map_record(b"\xff", &meta(None), &pattern(), 1 << 20).unwrap_err();
        assert_eq!(err.kind(), "not_utf8");
        let err = map_record(DISPATCHED.as_bytes(), &meta(None), &pattern(), 10).unwrap_err();
        assert_eq!(err.kind(), "oversized");
    }

    #[test]
    fn index_patterns_are_validated_and_give_the_template_wildcard() {
        let p = pattern();
        assert_eq!(p.wildcard(), "logger-service-*");
        assert!(IndexPattern::parse("Logger-%Y").is_err());
        assert!(IndexPattern::parse("%Y.%m").is_err(), "no fixed prefix");
        assert!(IndexPattern::parse("logs-%Q").is_err());
        assert!(IndexPattern::parse("_logs-%Y").is_err());
        let monthly = IndexPattern::parse("app-logs-%Y-%m").unwrap();
        let t = DateTime::parse_from_rfc3339("2024-02-29T23:00:00-02:00").unwrap();
        assert_eq!(monthly.render(&t.with_timezone(&Utc)), "app-logs-2024-03");
    }

    #[test]
    fn ids_depend_only_on_the_record_position() {
        let a = map(DISPATCHED, None).unwrap();
        let b = map(DISPATCHED, Some(b"error")).unwrap();
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, document_id("info_in", 3, 8));
    }
}
