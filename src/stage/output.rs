//! The runtime's one producer, for a stage's outputs and its dead letters: delivery reports
//! acknowledge inputs, a failed dead letter is re-sent (never dropped), a lost output is fatal.
//! The one place that waits out librdkafka's full queue (`QueueFull`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;

use super::ack::{lock, AckTracker, PartitionId};
use crate::kafka::PipelineContext;

/// A record to produce.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputRecord {
    pub topic: Arc<str>,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(Cow<'static, str>, Vec<u8>)>,
}

impl OutputRecord {
    /// Bytes librdkafka counts against `message.max.bytes`, roughly: key, value and headers.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.value.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// Travels with a produced record and comes back in its delivery report.
pub(crate) struct Delivery {
    /// The input this record was derived from (acknowledged on delivery), if any.
    pub input: Option<(PartitionId, i64)>,
    pub dead_letter: bool,
    pub input_timestamp_ms: Option<i64>,
}

/// Shared by the loop and the delivery callbacks (librdkafka's poll thread).
pub(crate) struct Deliveries {
    pub stage: &'static str,
    pub tracker: Arc<Mutex<AckTracker>>,
    /// Dead letters whose delivery failed; the loop re-sends them with backoff.
    retries: Mutex<Vec<(OwnedMessage, Box<Delivery>)>>,
    /// Set when an output is lost for good (at least once: the stage stops without committing
    /// past it; exactly once: the open transaction aborts).
    failure: Mutex<Option<String>>,
    produced: Mutex<HashMap<String, metrics::Counter>>,
    end_to_end: metrics::Histogram,
    dead_letter_retries: metrics::Counter,
}

impl Deliveries {
    pub(crate) fn new(stage: &'static str, tracker: Arc<Mutex<AckTracker>>) -> Deliveries {
        Deliveries {
            stage,
            tracker,
            retries: Mutex::default(),
            failure: Mutex::default(),
            produced: Mutex::default(),
            end_to_end: metrics::histogram!(format!("eventpipe_{stage}_end_to_end_seconds")),
            dead_letter_retries: metrics::counter!(format!(
                "eventpipe_{stage}_dead_letter_retries_total"
            )),
        }
    }

    fn produced(&self, topic: &str) {
        let mut produced = self.produced.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(counter) = produced.get(topic) {
            counter.increment(1);
            return;
        }
        let counter = metrics::counter!(format!("eventpipe_{}_produced_total", self.stage), "topic" => topic.to_string());
        counter.increment(1);
        produced.insert(topic.to_string(), counter);
    }

    pub(crate) fn fail(&self, reason: String) {
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        failure.get_or_insert(reason);
    }

    /// The first lost output since the last call, if any.
    pub(crate) fn take_failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    pub(crate) fn has_failure(&self) -> bool {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    pub(crate) fn pending_retries(&self) -> usize {
        self.retries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn take_retries(&self) -> Vec<(OwnedMessage, Box<Delivery>)> {
        std::mem::take(&mut *self.retries.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Producer context: delivery reports acknowledge inputs and keep failed dead letters.
pub(crate) struct DeliveryContext {
    pub log: PipelineContext,
    pub deliveries: Arc<Deliveries>,
}

crate::kafka::client::logs_through_pipeline_context!(DeliveryContext);

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<Delivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, token: Box<Delivery>) {
        let deliveries = &self.deliveries;
        match result {
            Ok(message) => {
                if let Some((partition, offset)) = &token.input {
                    lock(&deliveries.tracker).ack(partition, *offset);
                }
                deliveries.produced(message.topic());
                if let (false, Some(ms)) = (token.dead_letter, token.input_timestamp_ms) {
                    let now = chrono::Utc::now().timestamp_millis();
                    deliveries
                        .end_to_end
                        .record((now - ms).max(0) as f64 / 1000.0);
                }
            }
            Err((error, message)) if token.dead_letter => {
                tracing::warn!(stage = deliveries.stage, %error, topic = message.topic(), "dead-letter write failed; retrying");
                deliveries.dead_letter_retries.increment(1);
                deliveries
                    .retries
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((message.detach(), token));
            }
            Err((error, message)) => {
                let input = token
                    .input
                    .as_ref()
                    .map(|(p, o)| format!(" for input {}[{}]@{o}", p.topic, p.partition))
                    .unwrap_or_default();
                let hint = if is_too_large(error) {
                    " (the broker refused its size: raise the topic's max.message.bytes, or lower the stage's max envelope bytes)"
                } else {
                    ""
                };
                let reason = format!(
                    "output to {}{input} was not delivered: {error}{hint}",
                    message.topic()
                );
                tracing::error!(stage = deliveries.stage, %reason, "an output could not be delivered");
                deliveries.fail(reason);
            }
        }
    }
}

pub(crate) type OutputProducer = ThreadedProducer<DeliveryContext>;

fn is_too_large(error: &RdKafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
    )
}

/// Why a record was not handed to librdkafka.
#[derive(Debug)]
pub(crate) enum SendError {
    /// Larger than the producer accepts: the input is dead-lettered instead.
    TooLarge,
    /// Refused for another reason that waiting cannot fix.
    Refused(String),
}

/// Hands one record to librdkafka, waiting while its queue is full (backpressure).
pub(crate) async fn send(
    producer: &OutputProducer,
    output: &OutputRecord,
    token: Box<Delivery>,
) -> Result<(), SendError> {
    let headers = output.headers.iter().fold(
        OwnedHeaders::new_with_capacity(output.headers.len()),
        |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v),
            })
        },
    );
    let mut record = BaseRecord::with_opaque_to(&output.topic, token)
        .payload(&output.value)
        .headers(headers);
    if let Some(key) = &output.key {
        record = record.key(key);
    }
    send_base(producer, record).await
}

async fn send_base<K, P>(
    producer: &OutputProducer,
    mut record: BaseRecord<'_, K, P, Box<Delivery>>,
) -> Result<(), SendError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((error, _)) if is_too_large(&error) => return Err(SendError::TooLarge),
            Err((error, returned)) => {
                return Err(SendError::Refused(format!(
                    "produce to {} refused: {error}",
                    returned.topic
                )))
            }
        }
    }
}

/// Re-sends the dead letters whose delivery failed; returns how many were re-sent.
pub(crate) async fn resend_dead_letters(producer: &OutputProducer) -> usize {
    let deliveries = producer.context().deliveries.clone();
    let retries = deliveries.take_retries();
    let count = retries.len();
    for (message, token) in retries {
        let headers = message.headers().cloned().unwrap_or_default();
        let mut record = BaseRecord::with_opaque_to(message.topic(), token)
            .headers(headers)
            .payload(message.payload().unwrap_or_default());
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Err(error) = send_base(producer, record).await {
            // Not retryable by waiting: the input stays unacknowledged (re-delivered after a
            // restart), and the stage says why instead of looping.
            deliveries.fail(format!("dead letter not accepted: {error:?}"));
        }
    }
    count
}
