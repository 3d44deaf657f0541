//! One event as the gateway hands it to subscribers: its coordinates, sender and type (what
//! filters match), and its JSON — built once per event and shared by every connection it reaches.
//!
//! The JSON is the shape history lines have (`store::history::EventLine`), so a client reads live
//! frames, catch-up frames and history with one parser.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::value::RawValue;

use crate::codec::Registry;
use crate::config::{CodecSettings, Format};
use crate::stage::Record;
use crate::store::history::{EventLine, StoredEvent};
use crate::store::pipeline::avro_body;
use crate::store::row::{bytes_json, Body, StoredRow, REPLAY_HEADER_PREFIX};

/// Values larger than this are shown raw (base64-free: as the store shows bytes), not parsed.
const MAX_JSON_BYTES: usize = 1024 * 1024;

/// An event on its way to subscribers.
#[derive(Debug)]
pub struct Event {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub service: Box<str>,
    pub action: Box<str>,
    /// Kafka time in milliseconds (for the produce-to-client latency).
    pub timestamp_ms: Option<i64>,
    /// A replayed event (it carries `eventpipe.replay.*` headers).
    pub replay: bool,
    /// The frame's data: the event as JSON, on one line (`one_line`), so SSE sends it as a
    /// single `data:` field without scanning it per connection.
    pub json: Box<str>,
}

/// Why a record could not be turned into an event right now (the record itself is fine).
#[derive(Debug, Clone, thiserror::Error)]
#[error("schema registry unavailable: {0}")]
pub struct RegistryUnavailable(pub String);

impl Event {
    /// A consumed record: JSON as it is, Avro decoded with its writer schema, anything else shown
    /// raw with the reason (a subscriber sees every event, even a bad one).
    pub async fn from_record(
        record: &Record<'_>,
        codecs: &CodecSettings,
        registry: Option<&Registry>,
    ) -> Result<Event, RegistryUnavailable> {
        let row = match codecs.input_format(record.topic) {
            Format::Json => StoredRow::from_json_topic(record, MAX_JSON_BYTES),
            Format::Avro => {
                let registry = registry.ok_or_else(|| {
                    RegistryUnavailable("no schema registry configured for an Avro topic".into())
                })?;
                let body = avro_body(registry, record.payload, MAX_JSON_BYTES)
                    .await
                    .map_err(RegistryUnavailable)?;
                StoredRow::new(record, body)
            }
        };
        let replay = record
            .headers
            .iter()
            .any(|(name, _)| name.starts_with(REPLAY_HEADER_PREFIX));
        Ok(Event::from_row(&row, record.timestamp_ms, replay))
    }

    fn from_row(row: &StoredRow, timestamp_ms: Option<i64>, replay: bool) -> Event {
        let headers = row
            .headers
            .as_deref()
            .and_then(|text| serde_json::from_str::<&RawValue>(text).ok());
        let (value, raw, reason, schema_id) = match &row.body {
            Body::Json(json) => (raw_json(json), None, None, None),
            Body::Avro {
                json, schema_id, ..
            } => (raw_json(json), None, None, Some(*schema_id as i32)),
            Body::Raw { bytes, reason } => {
                (None, Some(bytes_json(bytes)), Some(reason.as_str()), None)
            }
        };
        let json = serde_json::to_string(&EventLine {
            seq: None,
            topic: &row.topic,
            partition: row.partition,
            offset: row.offset,
            key: row.key.as_deref().map(bytes_json),
            timestamp: row
                .kafka_time()
                .to_rfc3339_opts(SecondsFormat::Millis, true),
            event_time: row
                .event_time
                .map(|time| time.to_rfc3339_opts(SecondsFormat::Micros, true)),
            service: &row.service,
            action: &row.action,
            headers,
            value,
            raw,
            reason,
            format: row.body.format(),
            schema_id,
        })
        .unwrap_or_default();
        Event {
            topic: row.topic.clone(),
            partition: row.partition,
            offset: row.offset,
            service: row.service.as_str().into(),
            action: row.action.as_str().into(),
            timestamp_ms,
            replay,
            json: one_line(json),
        }
    }

    /// An event read back from the store (catching up past what Kafka still holds).
    pub fn from_stored(stored: &StoredEvent, topic: Arc<str>) -> Event {
        let replay = stored
            .headers
            .as_deref()
            .is_some_and(|h| h.get().contains(REPLAY_HEADER_PREFIX));
        Event {
            topic,
            partition: stored.partition,
            offset: stored.offset,
            service: stored.service.as_str().into(),
            action: stored.action.as_str().into(),
            timestamp_ms: Some(stored.kafka_time.timestamp_millis()),
            replay,
            json: one_line(serde_json::to_string(stored).unwrap_or_default()),
        }
    }

    /// A stored event a pause's history injection delivers: its JSON says `"replay": true`.
    pub fn injected(stored: &StoredEvent, topic: Arc<str>) -> Event {
        let mut event = Event::from_stored(stored, topic);
        event.replay = true;
        let rest = event.json.strip_prefix('{').unwrap_or("}");
        let separator = if rest.trim_start().starts_with('}') {
            ""
        } else {
            ","
        };
        event.json = format!("{{\"replay\":true{separator}{rest}").into();
        event
    }

    /// The SSE event name: the action, or `message` (the browser default) when there is none;
    /// never a line break (it would end the field).
    pub fn event_name(&self) -> &str {
        sse_event_name(&self.action)
    }

    pub fn kafka_time(&self) -> Option<DateTime<Utc>> {
        self.timestamp_ms.and_then(DateTime::from_timestamp_millis)
    }
}

/// An action as an SSE event name: `message` (the browser default) when there is none, and
/// never a line break (it would end the field).
pub fn sse_event_name(action: &str) -> &str {
    if action.is_empty() || action.contains(['\n', '\r']) {
        "message"
    } else {
        action
    }
}

/// `json` with its line breaks made spaces. A raw value embedded as it was produced may be
/// pretty-printed; JSON allows a raw line break only as whitespace between tokens (never inside a
/// string), so this changes no value.
pub fn one_line(json: String) -> Box<str> {
    if json.contains(['\n', '\r']) {
        json.replace(['\n', '\r'], " ").into()
    } else {
        json.into()
    }
}

fn raw_json(json: &[u8]) -> Option<&RawValue> {
    std::str::from_utf8(json)
        .ok()
        .and_then(|text| serde_json::from_str::<&RawValue>(text).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pretty_printed_value_becomes_one_line_with_the_same_value() {
        let pretty = "{\r\n  \"a\": [1,\n 2],\n\t\"b\": \"x\\ny\"\r}".to_string();
        let line = one_line(pretty.clone());
        assert!(!line.contains(['\n', '\r']));
        let parse = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap();
        assert_eq!(parse(&line), parse(&pretty));
        assert_eq!(parse(&line)["b"], "x\ny", "an escaped line break stays");
    }
}
