//! The envelope services publish: `{service, action, payload: {message, timestamp, data}}`.
//! Decoding validates every field and says precisely what is wrong, for the dead-letter reason.

use std::borrow::Cow;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

/// Records larger than this are refused before parsing (a runaway producer must not cost memory).
/// Below librdkafka's `message.max.bytes` (1,000,000) with room for what the dispatcher adds
/// (the `source` block, headers), so an accepted envelope's outputs fit what the producer sends.
pub const DEFAULT_MAX_ENVELOPE_BYTES: usize = 900 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub service: String,
    pub action: String,
    pub payload: Payload,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    pub message: String,
    /// As the services write it: `datetime.utcnow().isoformat()`, usually without a zone.
    pub timestamp: String,
    #[serde(default)]
    pub data: Value,
}

/// Why a record is not a valid envelope; `kind()` is the low-cardinality label and DLQ header.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("record is {size} bytes, above the limit of {limit}")]
    Oversized { size: usize, limit: usize },
    #[error("record is not valid UTF-8: {0}")]
    NotUtf8(String),
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("field `{field}` must be {expected}, found {found}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    #[error("field `action` is empty")]
    EmptyAction,
    /// A field-level defect found by the typed (zero-copy) decoder; `kind` is one of
    /// `missing_field` or `wrong_type`, `reason` serde's description with its position.
    #[error("{reason}")]
    Schema { kind: &'static str, reason: String },
}

impl DecodeError {
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Oversized { .. } => "oversized",
            DecodeError::NotUtf8(_) => "not_utf8",
            DecodeError::MalformedJson(_) => "malformed_json",
            DecodeError::MissingField(_) => "missing_field",
            DecodeError::WrongType { .. } => "wrong_type",
            DecodeError::EmptyAction => "empty_action",
            DecodeError::Schema { kind, .. } => kind,
        }
    }
}

impl Envelope {
    /// Validates raw record bytes into an envelope, checking size, encoding, JSON and each field.
    pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<Envelope, DecodeError> {
        if bytes.len() > max_bytes {
            return Err(DecodeError::Oversized {
                size: bytes.len(),
                limit: max_bytes,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|e| DecodeError::NotUtf8(e.to_string()))?;
        let value: Value =
            serde_json::from_str(text).map_err(|e| DecodeError::MalformedJson(e.to_string()))?;
        Envelope::from_value(value)
    }

    /// Validates an already parsed JSON value (also used by `eventpipe produce`).
    pub fn from_value(mut value: Value) -> Result<Envelope, DecodeError> {
        let root = as_object(&mut value, "envelope")?;
        let service = take_string(root, "service")?;
        let action = take_string(root, "action")?;
        if action.trim().is_empty() {
            return Err(DecodeError::EmptyAction);
        }
        let mut payload_value = root
            .remove("payload")
            .ok_or(DecodeError::MissingField("payload"))?;
        let payload = as_object(&mut payload_value, "payload")?;
        let message = take_string(payload, "message")?;
        let timestamp = take_string(payload, "timestamp")?;
        let data = payload.remove("data").unwrap_or(Value::Null);
        Ok(Envelope {
            service,
            action,
            payload: Payload {
                message,
                timestamp,
                data,
            },
        })
    }
}

/// A borrowed view of an envelope for the hot path: strings point into the record where they
/// need no unescaping, and `data` stays raw JSON, copied through without being parsed.
#[derive(Debug, Deserialize)]
pub struct EnvelopeRef<'a> {
    #[serde(borrow)]
    pub service: Cow<'a, str>,
    #[serde(borrow)]
    pub action: Cow<'a, str>,
    #[serde(borrow)]
    pub payload: PayloadRef<'a>,
}

#[derive(Debug, Deserialize)]
pub struct PayloadRef<'a> {
    #[serde(borrow)]
    pub message: Cow<'a, str>,
    #[serde(borrow)]
    pub timestamp: Cow<'a, str>,
    /// `None` when absent or null.
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
}

impl<'a> EnvelopeRef<'a> {
    /// Validates raw record bytes like `Envelope::decode`, without building a JSON tree.
    pub fn decode(bytes: &'a [u8], max_bytes: usize) -> Result<EnvelopeRef<'a>, DecodeError> {
        if bytes.len() > max_bytes {
            return Err(DecodeError::Oversized {
                size: bytes.len(),
                limit: max_bytes,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|e| DecodeError::NotUtf8(e.to_string()))?;
        let envelope: EnvelopeRef<'a> = serde_json::from_str(text).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => {
                    let reason = e.to_string();
                    let kind = if reason.starts_with("missing field") {
                        "missing_field"
                    } else {
                        "wrong_type"
                    };
                    DecodeError::Schema { kind, reason }
                }
                _ => DecodeError::MalformedJson(e.to_string()),
            }
        })?;
        if envelope.action.trim().is_empty() {
            return Err(DecodeError::EmptyAction);
        }
        Ok(envelope)
    }

    /// `payload.data` as a JSON tree (Null when absent), for handlers that edit fields.
    pub fn data_value(&self) -> Value {
        self.payload
            .data
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
            .unwrap_or(Value::Null)
    }
}

/// Parses the services' timestamps: RFC 3339, or ISO 8601 without a zone (taken as UTC).
pub fn parse_timestamp(raw: &str) -> Option<DateTime<Utc>> {
    let raw = raw.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Some(t.with_timezone(&Utc));
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(raw, format).ok())
        .map(|naive| naive.and_utc())
}

/// The current UTC time formatted the way downstream consumers expect (RFC 3339, microseconds, Z).
pub fn now_timestamp() -> String {
    Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn as_object<'a>(
    value: &'a mut Value,
    field: &'static str,
) -> Result<&'a mut serde_json::Map<String, Value>, DecodeError> {
    let found = json_type(value);
    value.as_object_mut().ok_or(DecodeError::WrongType {
        field,
        expected: "an object",
        found,
    })
}

fn take_string(
    object: &mut serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<String, DecodeError> {
    match object.remove(field) {
        None => Err(DecodeError::MissingField(field)),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(DecodeError::WrongType {
            field,
            expected: "a string",
            found: json_type(&other),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"service":"lk","action":"create_user","payload":{"message":"It is create_user","timestamp":"2024-05-01T12:00:00.123456","data":{"user_id":42}}}"#;

    #[test]
    fn decodes_the_services_envelope() {
        let e = Envelope::decode(GOOD.as_bytes(), DEFAULT_MAX_ENVELOPE_BYTES).unwrap();
        assert_eq!(e.service, "lk");
        assert_eq!(e.action, "create_user");
        assert_eq!(e.payload.message, "It is create_user");
        assert_eq!(e.payload.data["user_id"], 42);
    }

    #[test]
    fn each_defect_has_its_kind() {
        let cases: &[(&[u8], &str)] = &[
            (b"{not json", "malformed_json"),
            (b"\xff\xfe", "not_utf8"),
            (b"[1,2]", "wrong_type"),
            (
                br#"{"action":"a","payload":{"message":"m","timestamp":"t"}}"#,
                "missing_field",
            ),
            (
                br#"{"service":1,"action":"a","payload":{"message":"m","timestamp":"t"}}"#,
                "wrong_type",
            ),
            (
                br#"{"service":"s","action":" ","payload":{"message":"m","timestamp":"t"}}"#,
                "empty_action",
            ),
            (
                br#"{"service":"s","action":"a","payload":"x"}"#,
                "wrong_type",
            ),
            (
                br#"{"service":"s","action":"a","payload":{"message":"m"}}"#,
                "missing_field",
            ),
        ];
        for (bytes, kind) in cases {
            let err = Envelope::decode(bytes, DEFAULT_MAX_ENVELOPE_BYTES).unwrap_err();
            assert_eq!(err.kind(), *kind, "{err}");
        }
        let err = Envelope::decode(GOOD.as_bytes(), 10).unwrap_err();
        assert_eq!(err.kind(), "oversized");
    }

    #[test]
    fn the_borrowed_view_agrees_with_the_owned_decoder() {
        let cases: &[&[u8]] = &[
            GOOD.as_bytes(),
            b"{not json",
            b"\xff\xfe",
            b"[1,2]",
            br#"{"action":"a","payload":{"message":"m","timestamp":"t"}}"#,
            br#"{"service":1,"action":"a","payload":{"message":"m","timestamp":"t"}}"#,
            br#"{"service":"s","action":" ","payload":{"message":"m","timestamp":"t"}}"#,
            br#"{"service":"s","action":"a","payload":"x"}"#,
            br#"{"service":"s","action":"a","payload":{"message":"m"}}"#,
            br#"{"service":"s","action":"a","payload":{"message":"m\n\u00e9","timestamp":"t","data":null}}"#,
        ];
        for bytes in cases {
            let owned = Envelope::decode(bytes, DEFAULT_MAX_ENVELOPE_BYTES);
            let borrowed = EnvelopeRef::decode(bytes, DEFAULT_MAX_ENVELOPE_BYTES);
            match (owned, borrowed) {
                (Ok(o), Ok(b)) => {
                    assert_eq!(o.service, b.service);
                    assert_eq!(o.action, b.action);
                    assert_eq!(o.payload.message, b.payload.message);
                    assert_eq!(o.payload.timestamp, b.payload.timestamp);
                    assert_eq!(o.payload.data, b.data_value());
                }
                (Err(o), Err(b)) => assert_eq!(o.kind(), b.kind(), "{o} / {b}"),
                (o, b) => panic!("decoders disagree: {o:?} / {b:?}"),
            }
        }
    }

    #[test]
    fn timestamps_without_zone_are_utc() {
        let t = parse_timestamp("2024-05-01T12:00:00.123456").unwrap();
        assert_eq!(t.to_rfc3339(), "2024-05-01T12:00:00.123456+00:00");
        let t = parse_timestamp("2024-05-01T14:00:00+02:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2024-05-01T12:00:00+00:00");
        assert!(parse_timestamp("yesterday").is_none());
    }
}
