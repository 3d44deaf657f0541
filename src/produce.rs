//! `eventpipe produce`: sends JSON lines (a file or stdin) to a topic, each envelope validated,
//! with `service`/`action` headers and a key taken from the envelope, as services should send.

use std::io::BufRead;
use std::path::PathBuf;

use rdkafka::producer::BaseRecord;
use serde::Deserializer as _;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::codec::{Codec, CodecError, RecordError};
use crate::config::KafkaSettings;
use crate::envelope::Envelope;
use crate::kafka::client::{require_topics, wait_for_broker};
use crate::kafka::delivery::{owned_headers, BoundedSender, CountedProducer};
use crate::kafka::KafkaError;

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("{source_name} line {line}: {reason} (use --raw to send lines unchecked)")]
    InvalidLine {
        source_name: String,
        line: usize,
        reason: String,
    },
    #[error("reading {source_name}: {error}")]
    Read {
        source_name: String,
        error: std::io::Error,
    },
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("schema registry: {0}")]
    Registry(String),
}

pub struct ProduceOptions {
    pub topic: String,
    /// JSON lines file; stdin when `None` or `-`.
    pub input: Option<PathBuf>,
    /// JSON pointer into the envelope whose value becomes the record key.
    pub key_pointer: String,
    /// Send each line as it is, without validating it as an envelope (for testing dead letters).
    pub raw: bool,
    /// The topic's format: validated lines are encoded with it (Avro: envelope schema).
    pub codec: Codec,
}

/// A record ready to send: key, headers and the bytes of the value.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedRecord {
    pub key: Option<String>,
    pub headers: Vec<(&'static str, String)>,
    pub value: Vec<u8>,
}

/// Validates one line and derives key and headers; `Ok(None)` for blank lines.
pub fn prepare_line(
    line: &str,
    key_pointer: &str,
    raw: bool,
) -> Result<Option<PreparedRecord>, String> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    if raw {
        let key = serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|v| key_from(&v, key_pointer));
        return Ok(Some(PreparedRecord {
            key,
            headers: Vec::new(),
            value: line.as_bytes().to_vec(),
        }));
    }
    let value: Value = serde_json::from_str(line).map_err(|e| format!("malformed JSON: {e}"))?;
    let key = key_from(&value, key_pointer);
    let envelope = Envelope::from_value(value).map_err(|e| e.to_string())?;
    Ok(Some(PreparedRecord {
        key,
        headers: envelope_headers(&envelope),
        value: line.trim().as_bytes().to_vec(),
    }))
}

/// The headers consumers filter on without parsing the body.
pub fn envelope_headers(envelope: &Envelope) -> Vec<(&'static str, String)> {
    vec![
        ("service", envelope.service.clone()),
        ("action", envelope.action.clone()),
    ]
}

/// The key at `pointer`: strings as they are, numbers and booleans in their JSON spelling.
pub fn key_from(value: &Value, pointer: &str) -> Option<String> {
    match value.pointer(pointer)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other @ (Value::Number(_) | Value::Bool(_)) => Some(other.to_string()),
        _ => None,
    }
}

/// [`key_from`] of the JSON text `json`, without building its tree: each level is scanned for
/// the pointer's next segment only (the rest is skipped unparsed), and just the leaf is read.
pub fn key_in_json(json: &str, pointer: &str) -> Option<String> {
    let mut current: &RawValue = serde_json::from_str(json).ok()?;
    if !pointer.is_empty() {
        for segment in pointer.strip_prefix('/')?.split('/') {
            // Unescaped only when it holds an escape: no allocation per line for `/user_id`.
            let segment: std::borrow::Cow<str> = if segment.contains('~') {
                segment.replace("~1", "/").replace("~0", "~").into()
            } else {
                segment.into()
            };
            let mut deserializer = serde_json::Deserializer::from_str(current.get());
            current = deserializer
                .deserialize_any(Child { segment: &segment })
                .ok()??;
        }
    }
    let leaf: Value = serde_json::from_str(current.get()).ok()?;
    key_from(&leaf, "")
}

/// Finds one member of an object (the last of that name, as a tree would keep) or one element
/// of an array, as raw JSON.
struct Child<'s> {
    segment: &'s str,
}

impl<'de> serde::de::Visitor<'de> for Child<'_> {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object or an array")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if name == self.segment {
                found = Some(map.next_value::<&'de RawValue>()?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // As JSON Pointer reads an index: digits only, no leading zero.
        let wanted: Option<usize> = (self.segment == "0"
            || !self.segment.starts_with('0') && self.segment.bytes().all(|b| b.is_ascii_digit()))
        .then(|| self.segment.parse().ok())
        .flatten();
        let mut found = None;
        let mut index = 0;
        while let Some(element) = seq.next_element::<&'de RawValue>()? {
            if Some(index) == wanted {
                found = Some(element);
            }
            index += 1;
        }
        Ok(found)
    }

    // A scalar has no children.
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// Sends every line and waits for Kafka to acknowledge all of them; returns the count.
pub async fn run(settings: &KafkaSettings, options: ProduceOptions) -> Result<u64, ProduceError> {
    let context = crate::kafka::PipelineContext::default();
    let producer = CountedProducer::create(settings, context.clone())?;
    let metadata = wait_for_broker(producer.client(), &context, settings)?;
    require_topics(&metadata, &[options.topic.as_str()], settings)?;

    let (source_name, reader): (String, Box<dyn BufRead>) = match &options.input {
        Some(path) if path.as_os_str() != "-" => {
            let file = std::fs::File::open(path).map_err(|error| ProduceError::Read {
                source_name: path.display().to_string(),
                error,
            })?;
            (
                path.display().to_string(),
                Box::new(std::io::BufReader::new(file)),
            )
        }
        _ => ("stdin".to_string(), Box::new(std::io::stdin().lock())),
    };

    let mut sender = BoundedSender::new(&producer, 10_000);
    for (index, line) in reader.lines().enumerate() {
        let line = line.map_err(|error| ProduceError::Read {
            source_name: source_name.clone(),
            error,
        })?;
        let prepared =
            prepare_line(&line, &options.key_pointer, options.raw).map_err(|reason| {
                ProduceError::InvalidLine {
                    source_name: source_name.clone(),
                    line: index + 1,
                    reason,
                }
            })?;
        let Some(mut prepared) = prepared else {
            continue;
        };
        if !options.raw {
            prepared.value = match options.codec.encode(&options.topic, prepared.value).await {
                Ok(value) => value,
                Err(CodecError::Record(RecordError { reason, .. })) => {
                    return Err(ProduceError::InvalidLine {
                        source_name: source_name.clone(),
                        line: index + 1,
                        reason,
                    })
                }
                Err(CodecError::Unavailable(reason)) => return Err(ProduceError::Registry(reason)),
            };
        }
        let mut record = BaseRecord::<[u8], [u8]>::to(&options.topic)
            .payload(prepared.value.as_slice())
            .headers(owned_headers(&prepared.headers));
        if let Some(key) = &prepared.key {
            record = record.key(key.as_bytes());
        }
        sender.send(record).await?;
    }
    Ok(sender.finish().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"service":"lk","action":"create_user","payload":{"message":"m","timestamp":"2024-05-01T12:00:00","data":{"user_id":42}}}"#;

    #[test]
    fn envelope_line_gets_key_and_headers() {
        let record = prepare_line(LINE, "/payload/data/user_id", false)
            .unwrap()
            .unwrap();
        assert_eq!(record.key.as_deref(), Some("42"));
        assert_eq!(
            record.headers,
            vec![
                ("service", "lk".to_string()),
                ("action", "create_user".to_string())
            ]
        );
        assert_eq!(record.value, LINE.as_bytes());
    }

    #[test]
    fn invalid_lines_are_refused_unless_raw() {
        assert!(prepare_line("{\"service\":\"x\"}", "/k", false)
            .unwrap_err()
            .contains("missing field `action`"));
        let raw = prepare_line("not json at all", "/k", true)
            .unwrap()
            .unwrap();
        assert_eq!(raw.value, b"not json at all");
        assert!(raw.key.is_none());
        assert!(prepare_line("   ", "/k", false).unwrap().is_none());
    }

    #[test]
    fn a_key_read_without_the_tree_is_the_key_the_tree_gives() {
        let json = r#"{"a": {"id": 42, "name": "x\"y", "list": [1, {"k": true}], "n": null,
            "f": 1e3, "a/b": "slash", "t~": "tilde", "nested": {"deep": [7]}}, "id": "top", "id": "last"}"#;
        let tree: Value = serde_json::from_str(json).unwrap();
        for pointer in [
            "",
            "/id",
            "/a/id",
            "/a/name",
            "/a/list/0",
            "/a/list/1/k",
            "/a/list/01",
            "/a/list/2",
            "/a/n",
            "/a/f",
            "/a/a~1b",
            "/a/t~0",
            "/a/nested",
            "/a/nested/deep/0",
            "/missing",
            "/a/id/x",
            "no-slash",
        ] {
            assert_eq!(
                key_in_json(json, pointer),
                key_from(&tree, pointer),
                "{pointer}"
            );
        }
        assert_eq!(key_in_json("not json", "/id"), None);
    }
}
