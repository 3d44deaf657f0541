//! The aggregator's input event `{name, function, value, timestamp}`: decoding and validation.
//! Every rejection has a low-cardinality kind (metric label, dead-letter header) and a reason.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

use super::function::Function;
use crate::envelope::parse_timestamp;

/// One valid input event; `time_ms` is its event time in Unix milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub function: Function,
    pub value: f64,
    pub time_ms: i64,
    /// The Kafka record's timestamp (the producer's), for end-to-end latency; not event time.
    pub record_ms: Option<i64>,
}

/// Why an input record cannot be aggregated; each goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EventError {
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("missing or empty field {0:?}")]
    MissingField(&'static str),
    #[error("unknown function {0:?} (expected count, sum, avg, min, max, p50, p90 or p99)")]
    UnknownFunction(String),
    #[error("value is not a finite number: {0}")]
    NonNumericValue(String),
    #[error("timestamp {0:?} is not RFC 3339 or ISO 8601")]
    BadTimestamp(String),
}

impl EventError {
    pub fn kind(&self) -> &'static str {
        match self {
            EventError::MalformedJson(_) => "malformed_json",
            EventError::MissingField(_) => "missing_field",
            EventError::UnknownFunction(_) => "unknown_function",
            EventError::NonNumericValue(_) => "non_numeric_value",
            EventError::BadTimestamp(_) => "bad_timestamp",
        }
    }
}

/// The typical event, read borrowed and typed (no JSON tree): the fast path of `decode`.
#[derive(Deserialize)]
struct TypicalEvent<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    function: Cow<'a, str>,
    #[serde(default)]
    value: Option<f64>,
    #[serde(borrow)]
    timestamp: Cow<'a, str>,
}

impl Event {
    /// Validates one input record: the fast path for typical events, the general one (which
    /// also says precisely what is wrong) for anything else.
    pub fn decode(bytes: &[u8]) -> Result<Event, EventError> {
        match Event::decode_typical(bytes) {
            Some(event) => Ok(event),
            None => Event::decode_any(bytes),
        }
    }

    /// `None` unless the record is a well-formed event with a numeric (or, for count, absent)
    /// value: quoted numbers, odd types and every defect go to `decode_any`.
    fn decode_typical(bytes: &[u8]) -> Option<Event> {
        let input: TypicalEvent<'_> = serde_json::from_slice(bytes).ok()?;
        let name = input.name.trim();
        if name.is_empty() || input.function.trim().is_empty() {
            return None;
        }
        let function = Function::parse(&input.function)?;
        let value = match input.value {
            None if function == Function::Count => 0.0,
            None => return None,
            Some(v) if v.is_finite() => v,
            Some(_) => return None,
        };
        let time = parse_timestamp(&input.timestamp)?;
        Some(Event {
            name: input.name.into_owned(),
            function,
            value,
            time_ms: time.timestamp_millis(),
            record_ms: None,
        })
    }

    fn decode_any(bytes: &[u8]) -> Result<Event, EventError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| EventError::MalformedJson(e.to_string()))?;
        let Value::Object(fields) = value else {
            return Err(EventError::MalformedJson("not a JSON object".into()));
        };
        let text = |field: &'static str| match fields.get(field) {
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.as_str()),
            _ => Err(EventError::MissingField(field)),
        };
        let name = text("name")?;
        let function = text("function")?;
        let function = Function::parse(function)
            .ok_or_else(|| EventError::UnknownFunction(function.into()))?;
        // A count needs no value; every other function does. Numeric strings ("0.42") are
        // accepted because some services send numbers quoted.
        let value = match fields.get("value") {
            None | Some(Value::Null) if function == Function::Count => 0.0,
            None | Some(Value::Null) => return Err(EventError::MissingField("value")),
            Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
            Some(Value::String(s)) => s.trim().parse::<f64>().unwrap_or(f64::NAN),
            Some(other) => return Err(EventError::NonNumericValue(other.to_string())),
        };
        if !value.is_finite() {
            return Err(EventError::NonNumericValue(
                fields
                    .get("value")
                    .map(Value::to_string)
                    .unwrap_or_default(),
            ));
        }
        let raw_time = text("timestamp")?;
        let time =
            parse_timestamp(raw_time).ok_or_else(|| EventError::BadTimestamp(raw_time.into()))?;
        Ok(Event {
            name: name.to_string(),
            function,
            value,
            time_ms: time.timestamp_millis(),
            record_ms: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_documented_event() {
        let e = Event::decode(
            br#"{"name":"cpu_load","function":"avg","value":0.42,"timestamp":"2024-05-01T12:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(e.name, "cpu_load");
        assert_eq!(e.function, Function::Avg);
        assert_eq!(e.value, 0.42);
        assert_eq!(e.time_ms, 1_714_564_800_000);
    }

    #[test]
    fn the_fast_path_decodes_exactly_like_the_general_one() {
        let typical = [
            r#"{"name":"cpu","function":"avg","value":0.42,"timestamp":"2024-05-01T12:00:00Z"}"#,
            r#"{"name":"cpu","function":"sum","value":1165.6100000000001,"timestamp":"2024-05-01T12:00:00.5","extra":[1]}"#,
            r#"{"name":"c","function":"count","timestamp":"2024-05-01 12:00:00"}"#,
            r#"{"name":"c","function":"count","value":null,"timestamp":"2024-05-01T12:00:00+02:00"}"#,
            r#"{"name":"big","function":"max","value":12345678901234567890,"timestamp":"2024-05-01T12:00:00Z"}"#,
            r#"{"name":"p","function":"p99","value":-3,"timestamp":"2024-05-01T12:00:00Z"}"#,
        ];
        for raw in typical {
            let fast = Event::decode_typical(raw.as_bytes()).unwrap_or_else(|| panic!("{raw}"));
            assert_eq!(Ok(fast), Event::decode_any(raw.as_bytes()), "{raw}");
        }
        // Quoted numbers and every defect take the general path, which says why.
        for raw in [
            r#"{"name":"a","function":"sum","value":"0.42","timestamp":"2024-05-01T12:00:00Z"}"#,
            r#"{"name":" ","function":"sum","value":1,"timestamp":"2024-05-01T12:00:00Z"}"#,
            r#"{"name":"a","function":"median","value":1,"timestamp":"2024-05-01T12:00:00Z"}"#,
            r#"{"name":"a","function":"sum","timestamp":"2024-05-01T12:00:00Z"}"#,
            r#"{"name":"a","function":"sum","value":1,"timestamp":"yesterday"}"#,
        ] {
            assert!(Event::decode_typical(raw.as_bytes()).is_none(), "{raw}");
        }
    }

    #[test]
    fn values_parse_exactly() {
        // serde_json's fast float parser can be an ulp off; `float_roundtrip` makes it exact.
        for raw in ["1165.6100000000001", "0.1", "389.34714285714284", "1e-300"] {
            let json = format!(
                r#"{{"name":"a","function":"sum","value":{raw},"timestamp":"2024-05-01T12:00:00Z"}}"#
            );
            let event = Event::decode(json.as_bytes()).unwrap();
            assert_eq!(event.value.to_bits(), raw.parse::<f64>().unwrap().to_bits());
        }
    }

    #[test]
    fn rejections_have_kinds() {
        let kind = |bytes: &[u8]| Event::decode(bytes).unwrap_err().kind();
        assert_eq!(kind(b"{not json"), "malformed_json");
        assert_eq!(kind(b"[1]"), "malformed_json");
        assert_eq!(
            kind(br#"{"function":"sum","value":1,"timestamp":"2024-05-01T12:00:00Z"}"#),
            "missing_field"
        );
        assert_eq!(
            kind(br#"{"name":"a","function":"sum","value":1}"#),
            "missing_field"
        );
        assert_eq!(
            kind(
                br#"{"name":"a","function":"median","value":1,"timestamp":"2024-05-01T12:00:00Z"}"#
            ),
            "unknown_function"
        );
        assert_eq!(
            kind(br#"{"name":"a","function":"sum","value":"abc","timestamp":"2024-05-01T12:00:00Z"}"#),
            "non_numeric_value"
        );
        assert_eq!(
            kind(
                br#"{"name":"a","function":"sum","value":true,"timestamp":"2024-05-01T12:00:00Z"}"#
            ),
            "non_numeric_value"
        );
        assert_eq!(
            kind(br#"{"name":"a","function":"sum","value":1,"timestamp":"yesterday"}"#),
            "bad_timestamp"
        );
    }
}
