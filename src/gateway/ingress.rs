//! `POST /v1/topics/{topic}/events`: one JSON envelope, or a batch as JSON lines, validated as the
//! dispatcher validates, stamped with the caller's service, keyed, and produced to Kafka; answered
//! only once Kafka has acknowledged each event (acks=all, idempotent), with its partition and offset.
//!
//! A batch answers 200 when every line went in, 207 with each line's status when only some did,
//! and the lines' common status when none did; a full in-flight budget is 429, Kafka not
//! acknowledging in time 503 with `Retry-After`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::codec::{Codec, CodecError, Format};
use crate::envelope::{Envelope, EnvelopeRef, DEFAULT_MAX_ENVELOPE_BYTES};
use crate::gateway::http::ApiError;
use crate::gateway::Gateway;
use crate::kafka::acks::AckingProducer;
use crate::produce::{key_from, key_in_json};

/// Seconds a client is told to wait when Kafka is not acknowledging or the budget is full.
const RETRY_AFTER_SECS: u64 = 2;

/// The producing half of the gateway.
pub struct Ingress {
    pub producer: AckingProducer,
    pub in_flight: Arc<Semaphore>,
    pub max_in_flight: usize,
    pub codec: Codec,
    pub key_field: String,
    pub produce_timeout: Duration,
}

/// One line's outcome.
#[derive(Debug, Serialize)]
pub struct LineResult {
    pub line: usize,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Serialize)]
struct BatchAnswer {
    topic: String,
    accepted: usize,
    rejected: usize,
    results: Vec<LineResult>,
}

#[derive(Serialize)]
struct SingleAnswer<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
}

/// A line ready to produce: borrowed from the request's body unless it had to be rewritten.
struct Prepared<'a> {
    value: Cow<'a, [u8]>,
    key: Option<String>,
    service: Cow<'a, str>,
    action: Cow<'a, str>,
}

pub async fn post_events(
    State(gateway): State<Arc<Gateway>>,
    Path(topic): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let principal = gateway.auth.authenticate(&headers, None).await?;
    accept(&gateway, &principal, &topic, &pairs, &headers, body).await
}

async fn accept(
    gateway: &Gateway,
    principal: &crate::gateway::auth::Principal,
    topic: &str,
    pairs: &[(String, String)],
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if !gateway.sessions.side.serves(topic) {
        return Err(ApiError::not_found(
            "unknown_topic",
            format!("topic {topic} is not served by this gateway"),
        ));
    }
    let sender = principal.sender_for(topic)?.map(str::to_string);
    let mut key = None;
    for (name, value) in pairs {
        match name.as_str() {
            "key" => key = Some(value.clone()),
            other => {
                return Err(ApiError::bad_request(
                    "unknown_parameter",
                    format!("unknown query parameter {other:?} (expected key)"),
                ))
            }
        }
    }
    let batch = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.starts_with("application/x-ndjson") || v.starts_with("application/jsonl")
        });
    let text = std::str::from_utf8(&body)
        .map_err(|e| ApiError::bad_request("not_utf8", format!("the body is not UTF-8: {e}")))?;
    let ingress = &gateway.ingress;
    let lines: Vec<&str> = if batch {
        text.lines().filter(|l| !l.trim().is_empty()).collect()
    } else {
        vec![text]
    };
    if lines.is_empty() {
        return Err(ApiError::bad_request("empty", "the body holds no event"));
    }
    let mut results: Vec<LineResult> = Vec::with_capacity(lines.len());
    let mut ready: Vec<(usize, Prepared)> = Vec::with_capacity(lines.len());
    for (index, line) in lines.iter().enumerate() {
        match prepare(ingress, line, sender.as_deref(), key.as_deref()) {
            Ok(prepared) => ready.push((index, prepared)),
            Err(error) => results.push(rejected(index + 1, &error)),
        }
    }
    // Avro topics: encoded through the codec (a value that does not fit is the line's fault).
    let avro = ingress.codec.settings().output_format(topic) != Format::Json;
    let mut encoded: Vec<(usize, Prepared)> = Vec::with_capacity(ready.len());
    for (index, mut prepared) in ready {
        if !avro {
            encoded.push((index, prepared));
            continue;
        }
        match ingress
            .codec
            .encode(topic, prepared.value.into_owned())
            .await
        {
            Ok(value) => {
                prepared.value = Cow::Owned(value);
                encoded.push((index, prepared));
            }
            Err(CodecError::Record(error)) => results.push(rejected(
                index + 1,
                &ApiError::bad_request("avro_encode", error.reason),
            )),
            Err(CodecError::Unavailable(reason)) => results.push(rejected(
                index + 1,
                &ApiError::unavailable(
                    "schema_registry_unavailable",
                    format!("the schema registry is unavailable: {reason}"),
                    RETRY_AFTER_SECS,
                ),
            )),
        }
    }
    if !encoded.is_empty() {
        let permits = u32::try_from(encoded.len()).unwrap_or(u32::MAX);
        if encoded.len() > ingress.max_in_flight {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "batch_too_large",
                format!(
                    "{} events in one request; at most {} (--max-in-flight)",
                    encoded.len(),
                    ingress.max_in_flight
                ),
            ));
        }
        let Ok(_permit) = ingress.in_flight.clone().try_acquire_many_owned(permits) else {
            return Err(ApiError {
                retry_after_secs: Some(RETRY_AFTER_SECS),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "busy",
                    "the gateway has as many events in flight as it allows; retry shortly",
                )
            });
        };
        let mut batch = ingress.producer.batch();
        for (_, prepared) in &encoded {
            let record_headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header {
                    key: "service",
                    value: Some(prepared.service.as_bytes()),
                })
                .insert(Header {
                    key: "action",
                    value: Some(prepared.action.as_bytes()),
                });
            batch
                .send(
                    topic,
                    prepared.key.as_deref().map(str::as_bytes),
                    &prepared.value,
                    record_headers,
                    ingress.produce_timeout,
                )
                .await;
        }
        for ((index, _), ack) in encoded.iter().zip(batch.acks().await) {
            results.push(match ack {
                Ok((partition, offset)) => LineResult {
                    line: index + 1,
                    status: 200,
                    partition: Some(partition),
                    offset: Some(offset),
                    error: None,
                    message: None,
                },
                Err(error) => rejected(index + 1, &kafka_error(&error)),
            });
        }
        let accepted = results.iter().filter(|r| r.status == 200).count();
        metrics::counter!("eventpipe_gateway_events_accepted_total", "topic" => topic.to_string())
            .increment(accepted as u64);
    }
    results.sort_by_key(|r| r.line);
    let rejected_count = results.iter().filter(|r| r.status != 200).count();
    if rejected_count > 0 {
        metrics::counter!("eventpipe_gateway_events_rejected_total", "topic" => topic.to_string())
            .increment(rejected_count as u64);
    }
    if !batch {
        let result = results.remove(0);
        return match (result.partition, result.offset) {
            (Some(partition), Some(offset)) => Ok(Json(SingleAnswer {
                topic,
                partition,
                offset,
            })
            .into_response()),
            _ => Err(ApiError {
                retry_after_secs: (result.status == 503 || result.status == 429)
                    .then_some(RETRY_AFTER_SECS),
                ..ApiError::new(
                    StatusCode::from_u16(result.status).unwrap_or(StatusCode::BAD_REQUEST),
                    result.error.unwrap_or("rejected"),
                    result.message.unwrap_or_default(),
                )
            }),
        };
    }
    let accepted = results.len() - rejected_count;
    let status = if rejected_count == 0 {
        StatusCode::OK
    } else if accepted > 0 {
        StatusCode::MULTI_STATUS
    } else {
        // None went in: the lines' status when they agree (all 400, all 503), else 207.
        let first = results[0].status;
        if results.iter().all(|r| r.status == first) {
            StatusCode::from_u16(first).unwrap_or(StatusCode::BAD_REQUEST)
        } else {
            StatusCode::MULTI_STATUS
        }
    };
    let mut response = (
        status,
        Json(BatchAnswer {
            topic: topic.to_string(),
            accepted,
            rejected: rejected_count,
            results,
        }),
    )
        .into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, RETRY_AFTER_SECS.into());
    }
    Ok(response)
}

fn rejected(line: usize, error: &ApiError) -> LineResult {
    LineResult {
        line,
        status: error.status.as_u16(),
        partition: None,
        offset: None,
        error: Some(error.code),
        message: Some(error.message.clone()),
    }
}

/// Validates one envelope and stamps it with the caller's service.
fn prepare<'a>(
    ingress: &Ingress,
    line: &'a str,
    sender: Option<&str>,
    key: Option<&str>,
) -> Result<Prepared<'a>, ApiError> {
    if line.len() > DEFAULT_MAX_ENVELOPE_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "oversized",
            format!(
                "an event of {} bytes; at most {DEFAULT_MAX_ENVELOPE_BYTES}",
                line.len()
            ),
        ));
    }
    // The common case, an envelope that names its sender: validated in place as the dispatcher
    // reads it (no JSON tree) and sent as the bytes that came.
    if let Ok(envelope) = EnvelopeRef::decode(line.as_bytes(), DEFAULT_MAX_ENVELOPE_BYTES) {
        if let Some(sender) = sender {
            if envelope.service != sender {
                return Err(ApiError::forbidden(format!(
                    "this credential sends as {sender:?}; the envelope claims to be from {:?}",
                    envelope.service
                )));
            }
        }
        let key = match key {
            Some(key) => Some(key.to_string()),
            None => key_of(&envelope, line, &ingress.key_field),
        };
        return Ok(Prepared {
            value: Cow::Borrowed(line.as_bytes()),
            key,
            service: envelope.service,
            action: envelope.action,
        });
    }
    // Anything else: a tree, to stamp a missing sender or to say precisely what is wrong.
    let mut value: Value = serde_json::from_str(line)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("malformed JSON: {e}")))?;
    if let (Some(sender), Some(object)) = (sender, value.as_object_mut()) {
        match object.get("service") {
            None | Some(Value::Null) => {
                object.insert("service".into(), Value::String(sender.into()));
            }
            Some(Value::String(claimed)) if claimed != sender => {
                return Err(ApiError::forbidden(format!(
                    "this credential sends as {sender:?}; the envelope claims to be from {claimed:?}"
                )));
            }
            Some(_) => {}
        }
    }
    let envelope = Envelope::from_value(value.clone()).map_err(|e| {
        ApiError::bad_request(
            "invalid_envelope",
            format!(
                "{e} ({}: expected {{service, action, payload: {{message, timestamp, data}}}})",
                e.kind()
            ),
        )
    })?;
    let key = match key {
        Some(key) => Some(key.to_string()),
        None if ingress.key_field.is_empty() => None,
        None => key_from(&value, &ingress.key_field),
    };
    Ok(Prepared {
        value: Cow::Owned(serde_json::to_vec(&value).unwrap_or_default()),
        key,
        service: Cow::Owned(envelope.service),
        action: Cow::Owned(envelope.action),
    })
}

/// The record key at `pointer`: from `payload.data` alone when the pointer is inside it (the
/// usual `/payload/data/user_id`), else from the whole envelope.
fn key_of(envelope: &EnvelopeRef<'_>, line: &str, pointer: &str) -> Option<String> {
    if pointer.is_empty() {
        return None;
    }
    if let Some(inside) = pointer.strip_prefix("/payload/data") {
        if inside.is_empty() || inside.starts_with('/') {
            return key_in_json(envelope.payload.data?.get(), inside);
        }
    }
    key_in_json(line, pointer)
}

fn kafka_error(error: &RdKafkaError) -> ApiError {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::QueueFull) => ApiError {
            retry_after_secs: Some(RETRY_AFTER_SECS),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "busy",
                "the producer's queue is full; retry shortly",
            )
        },
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "oversized",
            format!("Kafka refused the event's size: {error}"),
        ),
        _ => ApiError::unavailable(
            "kafka_unavailable",
            format!("Kafka did not acknowledge the event in time: {error}; it may or may not be in Kafka, retry it (a retry may duplicate it)"),
            RETRY_AFTER_SECS,
        ),
    }
}
