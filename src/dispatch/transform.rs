//! The pure per-record step of the dispatcher: raw record in, output records (or one dead-letter
//! record) out. No I/O here, so every routing and bad-input rule is unit-tested without a broker.

use std::borrow::Cow;
use std::sync::Arc;

use serde::Serialize;

use super::handler::{Inbound, OutData};
use super::registry::Router;
use crate::codec::{Codec, CodecSettings, Registry, SchemaName};
use crate::envelope::EnvelopeRef;
use crate::stage::dead_letter;
pub use crate::stage::OutputRecord;
#[cfg(test)]
use crate::stage::RecordHeaders;
use crate::stage::{DeadLetter, Record};
use crate::store::row::REPLAY_HEADER_PREFIX;

/// A consumed record as the transform needs it.
pub struct InputRecord<'a> {
    pub record: &'a Record<'a>,
    /// The value as JSON (decoded from Avro when the topic is Avro); `record.payload` is the
    /// value as consumed, what a dead letter carries.
    pub payload: &'a [u8],
}

/// The output envelope, serialized straight from borrowed parts (no intermediate JSON tree).
#[derive(Serialize)]
struct OutputEnvelope<'a> {
    service: &'a str,
    action: &'a str,
    payload: OutputPayload<'a>,
    /// Enough for a Kibana user to follow the event back to its input record.
    source: Source<'a>,
}

#[derive(Serialize)]
struct OutputPayload<'a> {
    message: &'a str,
    timestamp: &'a str,
    data: &'a OutData<'a>,
}

#[derive(Serialize)]
struct Source<'a> {
    service: &'a str,
    action: &'a str,
    topic: &'a str,
    partition: i32,
    offset: i64,
    timestamp: &'a str,
    key: Option<&'a str>,
}

/// What became of one input.
#[derive(Debug, PartialEq)]
pub enum Disposition {
    /// The handler's outputs (possibly none: a route with no outputs consumes silently).
    Routed {
        action: String,
        outputs: Vec<OutputRecord>,
    },
    /// The original record, to the dead-letter topic, with `kind` as the metric label.
    DeadLetter(DeadLetter),
}

pub struct Transformer {
    pub router: Router,
    /// Input envelopes and output events on the wire: JSON or Avro, per topic.
    pub codecs: DispatchCodecs,
    pub service: String,
    pub max_envelope_bytes: usize,
}

/// The dispatcher's two codecs: envelopes in, events out.
#[derive(Clone, Debug)]
pub struct DispatchCodecs {
    pub input: Codec,
    pub output: Codec,
}

impl DispatchCodecs {
    pub fn new(settings: Arc<CodecSettings>, registry: Option<Arc<Registry>>) -> DispatchCodecs {
        DispatchCodecs {
            input: Codec::new(settings.clone(), registry.clone(), SchemaName::Envelope),
            output: Codec::new(settings, registry, SchemaName::Event),
        }
    }

    /// JSON everywhere, no registry.
    pub fn json() -> DispatchCodecs {
        DispatchCodecs::new(Arc::default(), None)
    }
}

impl Transformer {
    /// Decodes, routes and builds the outputs of one record; `now` is the outputs' timestamp.
    pub fn transform(&self, input: &InputRecord<'_>, now: &str) -> Disposition {
        let envelope = match EnvelopeRef::decode(input.payload, self.max_envelope_bytes) {
            Ok(envelope) => envelope,
            Err(error) => return self.dead_letter(error.kind(), &error.to_string()),
        };
        let Some(handler) = self.router.handler(&envelope.action) else {
            return self.dead_letter(
                "unknown_action",
                &format!("no route for action {:?}", envelope.action),
            );
        };
        let inbound = Inbound {
            envelope: &envelope,
            topic: input.record.topic,
            partition: input.record.partition,
            offset: input.record.offset,
        };
        let outbound = match handler.handle(&inbound) {
            Ok(outbound) => outbound,
            Err(error) => return self.dead_letter("handler_error", &error.0),
        };
        let key_text = input.record.key.map(String::from_utf8_lossy);
        let partition_text = input.record.partition.to_string();
        let offset_text = input.record.offset.to_string();
        // A replayed input's outputs are history too: every later stage can tell.
        let replay_headers: Vec<(Cow<'static, str>, Vec<u8>)> = input
            .record
            .headers
            .iter()
            .filter(|(name, _)| name.starts_with(REPLAY_HEADER_PREFIX))
            .map(|(name, value)| (Cow::Owned(name.to_string()), value.to_vec()))
            .collect();
        let outputs = outbound
            .into_iter()
            .map(|out| {
                let body = OutputEnvelope {
                    service: &self.service,
                    action: &out.action,
                    payload: OutputPayload {
                        message: &out.message,
                        timestamp: now,
                        data: &out.data,
                    },
                    source: Source {
                        service: &envelope.service,
                        action: &envelope.action,
                        topic: input.record.topic,
                        partition: input.record.partition,
                        offset: input.record.offset,
                        timestamp: &envelope.payload.timestamp,
                        key: key_text.as_deref(),
                    },
                };
                let value = serde_json::to_vec(&body).expect("output envelopes always serialize");
                let mut headers = vec![
                    (Cow::Borrowed("service"), self.service.as_bytes().to_vec()),
                    (Cow::Borrowed("action"), out.action.as_bytes().to_vec()),
                    (
                        Cow::Borrowed("source.service"),
                        envelope.service.as_bytes().to_vec(),
                    ),
                    (
                        Cow::Borrowed(dead_letter::HEADER_SOURCE_TOPIC),
                        input.record.topic.as_bytes().to_vec(),
                    ),
                    (
                        Cow::Borrowed(dead_letter::HEADER_SOURCE_PARTITION),
                        partition_text.as_bytes().to_vec(),
                    ),
                    (
                        Cow::Borrowed(dead_letter::HEADER_SOURCE_OFFSET),
                        offset_text.as_bytes().to_vec(),
                    ),
                ];
                headers.extend(replay_headers.iter().cloned());
                OutputRecord {
                    topic: out.topic,
                    key: input.record.key.map(<[u8]>::to_vec),
                    value,
                    headers,
                }
            })
            .collect();
        Disposition::Routed {
            action: envelope.action.into_owned(),
            outputs,
        }
    }

    /// The input, untouched, to its dead-letter topic with `kind` and `reason` as headers.
    pub fn dead_letter(&self, kind: &'static str, reason: &str) -> Disposition {
        Disposition::DeadLetter(DeadLetter::new(kind, reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::registry::HandlerRegistry;
    use crate::dispatch::routes;
    use serde_json::Value;

    fn transformer() -> Transformer {
        let routes = routes::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/topics/routes.toml"
        )))
        .unwrap();
        Transformer {
            router: HandlerRegistry::with_builtins().build(&routes).unwrap(),
            codecs: DispatchCodecs::json(),
            service: "eventpipe-dispatch".into(),
            max_envelope_bytes: 4096,
        }
    }

    fn record<'a>(topic: &'a Arc<str>, payload: &'a [u8]) -> Record<'a> {
        Record {
            topic,
            partition: 1,
            offset: 17,
            timestamp_ms: Some(1_714_564_800_000),
            key: Some(b"42"),
            payload,
            headers: RecordHeaders::Pairs(&[("trace", b"abc")]),
        }
    }

    fn header<'r>(record: &'r OutputRecord, name: &str) -> &'r str {
        let value = &record.headers.iter().find(|(k, _)| k == name).unwrap().1;
        std::str::from_utf8(value).unwrap()
    }

    #[test]
    fn builtin_actions_reproduce_the_services() {
        let t = transformer();
        let cases = [
            (
                "create_user_in",
                "create_user",
                vec![("info_in", "User created")],
            ),
            (
                "update_user_in",
                "update_user",
                vec![("info_in", "User updated")],
            ),
            (
                "task_in",
                "start_task",
                vec![
                    ("info_in", "Task started"),
                    ("worker_start_orm", "Task forwarded to the ORM worker"),
                ],
            ),
        ];
        for (topic, action, expected) in cases {
            let body = format!(
                r#"{{"service":"lk","action":"{action}","payload":{{"message":"It is {action}","timestamp":"2024-05-01T12:00:00.123456","data":{{"user_id":42}}}}}}"#
            );
            let topic_id: Arc<str> = topic.into();
            let record = record(&topic_id, body.as_bytes());
            let input = InputRecord {
                record: &record,
                payload: record.payload,
            };
            let Disposition::Routed { outputs, .. } = t.transform(&input, "NOW") else {
                panic!("{action} routed")
            };
            assert_eq!(outputs.len(), expected.len());
            for (output, (out_topic, message)) in outputs.iter().zip(expected) {
                assert_eq!(&*output.topic, out_topic);
                assert_eq!(
                    output.key.as_deref(),
                    Some(&b"42"[..]),
                    "key kept for per-key order"
                );
                let v: Value = serde_json::from_slice(&output.value).unwrap();
                assert_eq!(v["service"], "eventpipe-dispatch");
                assert_eq!(v["action"], action);
                assert_eq!(v["payload"]["message"], message);
                assert_eq!(v["payload"]["timestamp"], "NOW");
                assert_eq!(v["payload"]["data"]["user_id"], 42);
                assert_eq!(v["source"]["service"], "lk");
                assert_eq!(v["source"]["topic"], topic);
                assert_eq!(v["source"]["partition"], 1);
                assert_eq!(v["source"]["offset"], 17);
                assert_eq!(v["source"]["timestamp"], "2024-05-01T12:00:00.123456");
                assert_eq!(v["source"]["key"], "42");
                assert_eq!(header(output, "action"), action);
                assert_eq!(header(output, "eventpipe.source.offset"), "17");
            }
        }
    }

    #[test]
    fn replay_headers_are_carried_to_every_output_and_live_traffic_gets_none() {
        let t = transformer();
        let body = br#"{"service":"lk","action":"start_task","payload":{"message":"m","timestamp":"2024-05-01T12:00:00","data":{"user_id":42}}}"#;
        let topic: Arc<str> = "task_in".into();
        const REPLAYED: &[(&str, &[u8])] = &[
            ("trace", b"abc"),
            ("eventpipe.replay.id", b"0123456789abcdef"),
            ("eventpipe.replay.seq", b"77"),
            ("eventpipe.replay.offset", b"\xff"),
        ];
        let outputs_of = |headers: &'static [(&'static str, &'static [u8])]| {
            let mut input = record(&topic, body);
            input.headers = RecordHeaders::Pairs(headers);
            let transformed = t.transform(
                &InputRecord {
                    record: &input,
                    payload: input.payload,
                },
                "NOW",
            );
            match transformed {
                Disposition::Routed { outputs, .. } => outputs,
                other => panic!("{other:?}"),
            }
        };
        let outputs = outputs_of(REPLAYED);
        assert_eq!(outputs.len(), 2, "start_task has two outputs");
        for output in &outputs {
            let carried: Vec<(&str, &[u8])> = output
                .headers
                .iter()
                .filter(|(name, _)| name.starts_with("eventpipe.replay."))
                .map(|(name, value)| (name.as_ref(), value.as_slice()))
                .collect();
            assert_eq!(
                carried,
                REPLAYED[1..].to_vec(),
                "in order, bytes as they were"
            );
            assert!(output.headers.iter().all(|(name, _)| name != "trace"));
        }
        for output in outputs_of(&[("trace", b"abc")]) {
            assert!(output
                .headers
                .iter()
                .all(|(name, _)| !name.starts_with("eventpipe.replay.")));
        }
    }

    #[test]
    fn bad_input_goes_to_the_dead_letter_topic_with_original_bytes() {
        let t = transformer();
        let big = format!(
            r#"{{"service":"lk","action":"create_user","payload":{{"message":"{}","timestamp":"t","data":{{}}}}}}"#,
            "x".repeat(5000)
        );
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{oops".to_vec(), "malformed_json"),
            (b"\xc3\x28".to_vec(), "not_utf8"),
            (br#"{"service":"lk","payload":{"message":"m","timestamp":"t"}}"#.to_vec(), "missing_field"),
            (br#"{"service":"lk","action":7,"payload":{"message":"m","timestamp":"t"}}"#.to_vec(), "wrong_type"),
            (br#"{"service":"lk","action":"","payload":{"message":"m","timestamp":"t"}}"#.to_vec(), "empty_action"),
            (br#"{"service":"lk","action":"delete_everything","payload":{"message":"m","timestamp":"t"}}"#.to_vec(), "unknown_action"),
            (big.into_bytes(), "oversized"),
        ];
        let topic: Arc<str> = "task_in".into();
        for (payload, expected_kind) in cases {
            let input = record(&topic, &payload);
            let transformed = t.transform(
                &InputRecord {
                    record: &input,
                    payload: &payload,
                },
                "NOW",
            );
            match transformed {
                Disposition::DeadLetter(dead_letter) => {
                    assert_eq!(dead_letter.kind, expected_kind);
                    // The record the runtime writes for it.
                    let record =
                        dead_letter::record("dispatch", &dead_letter, &input, "task_in.dlq");
                    assert_eq!(&*record.topic, "task_in.dlq");
                    assert_eq!(record.value, payload, "original bytes kept");
                    assert_eq!(record.key.as_deref(), Some(&b"42"[..]));
                    assert_eq!(header(&record, "eventpipe.error.kind"), expected_kind);
                    assert!(!header(&record, "eventpipe.error.reason").is_empty());
                    assert_eq!(header(&record, "eventpipe.source.topic"), "task_in");
                    assert_eq!(header(&record, "eventpipe.source.partition"), "1");
                    assert_eq!(header(&record, "eventpipe.source.offset"), "17");
                    assert_eq!(header(&record, "trace"), "abc", "original headers kept");
                }
                other => panic!("{expected_kind}: {other:?}"),
            }
        }
    }
}
