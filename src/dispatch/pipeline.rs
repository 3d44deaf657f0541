//! The dispatcher's I/O loop, at-least-once: consume, transform, produce with delivery reports
//! feeding an ack tracker; offsets are stored only for fully acknowledged inputs; revocation and
//! shutdown flush in-flight outputs within the drain deadline, then commit.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use tokio_util::sync::CancellationToken;

use super::metrics::{DeliveryMetrics, LoopMetrics};
use super::transform::{Disposition, InputRecord, OutputRecord, Transformer};
use crate::codec::{until_available, Codec, Format, RecordError};
use crate::config::{InputTopics, KafkaSettings};
use crate::envelope::now_timestamp;
use crate::kafka::ack::{AckTracker, PartitionId};
use crate::kafka::client::{client_config, require_topics, wait_for_broker};
use crate::kafka::offsets::{
    commit_committable, commit_stored, lock, StoredOffsets, TopicIds, TrackingContext,
};
use crate::kafka::{ClientKind, KafkaError, PipelineContext};
use crate::telemetry::Readiness;

/// How often newly acknowledged offsets are committed (asynchronously).
const STORE_INTERVAL: Duration = Duration::from_millis(100);

/// Attached to every produced record; comes back in its delivery report.
struct DeliveryToken {
    partition: PartitionId,
    offset: i64,
    dead_letter: bool,
    input_timestamp_ms: Option<i64>,
}

/// State shared by the loop, the delivery callback and the rebalance callback.
struct Shared {
    tracker: Arc<Mutex<AckTracker>>,
    /// Set when an output is lost for good: the stage stops without storing past it.
    fatal: Mutex<Option<String>>,
    /// Dead-letter records whose delivery failed; they are re-sent, never dropped.
    dead_letter_retries: Mutex<Vec<(OwnedMessage, Box<DeliveryToken>)>>,
    /// The stage's stop signal, for waits inside the loop (the schema registry).
    shutdown: CancellationToken,
}

impl Shared {
    fn tracker(&self) -> std::sync::MutexGuard<'_, AckTracker> {
        lock(&self.tracker)
    }
}

/// Producer context: delivery reports drive the ack tracker.
struct DeliveryContext {
    log: PipelineContext,
    shared: Arc<Shared>,
    metrics: DeliveryMetrics,
}

crate::kafka::client::logging_client_context!(DeliveryContext);

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<DeliveryToken>;

    fn delivery(&self, result: &DeliveryResult<'_>, token: Box<DeliveryToken>) {
        match result {
            Ok(message) => {
                self.shared.tracker().ack(&token.partition, token.offset);
                self.metrics.produced(message.topic());
                if let Some(ms) = token.input_timestamp_ms {
                    self.metrics.end_to_end(ms);
                }
            }
            Err((error, message)) if token.dead_letter => {
                tracing::warn!(%error, topic = message.topic(), "dead-letter write failed; retrying");
                metrics::counter!("eventpipe_dispatch_dead_letter_retries_total").increment(1);
                let mut retries = self
                    .shared
                    .dead_letter_retries
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                retries.push((message.detach(), token));
            }
            Err((error, message)) => {
                let reason = format!(
                    "output to {} for input {}[{}]@{} was not delivered: {error}",
                    message.topic(),
                    token.partition.topic,
                    token.partition.partition,
                    token.offset
                );
                tracing::error!(%reason, "stopping: an output could not be delivered");
                let mut fatal = self.shared.fatal.lock().unwrap_or_else(|p| p.into_inner());
                fatal.get_or_insert(reason);
            }
        }
    }
}

/// What a dispatcher run did, for the caller's summary line.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DispatchSummary {
    pub consumed: u64,
    pub routed: u64,
    pub dead_lettered: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("stopped to avoid losing data: {0}")]
    OutputLost(String),
}

/// Runs the at-least-once dispatcher until `shutdown` is cancelled or an output is lost.
pub async fn run(
    kafka: &KafkaSettings,
    input: &InputTopics,
    group_id: &str,
    drain_timeout: Duration,
    transformer: Transformer,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<DispatchSummary, DispatchError> {
    let log = PipelineContext::default();
    let shared = Arc::new(Shared {
        tracker: Arc::new(Mutex::new(AckTracker::default())),
        fatal: Mutex::new(None),
        dead_letter_retries: Mutex::new(Vec::new()),
        shutdown: shutdown.clone(),
    });

    let producer: Arc<ThreadedProducer<DeliveryContext>> = Arc::new(
        client_config(kafka, ClientKind::Producer)
            .create_with_context(DeliveryContext {
                metrics: DeliveryMetrics::default(),
                log: log.clone(),
                shared: shared.clone(),
            })
            .map_err(KafkaError::Client)?,
    );
    let metadata = wait_for_broker(producer.client(), &log, kafka)?;
    let required = required_topics(&transformer, input);
    let required: Vec<&str> = required.iter().map(String::as_str).collect();
    require_topics(&metadata, &required, kafka)?;

    let mut consumer_config = client_config(kafka, ClientKind::Consumer);
    consumer_config.set("group.id", group_id);
    if consumer_config.get("statistics.interval.ms").is_none() {
        consumer_config.set("statistics.interval.ms", "5000");
    }
    // On revocation: wait (bounded) for in-flight outputs, so their inputs can be committed.
    let drain_producer = producer.clone();
    let drain_tracker = shared.tracker.clone();
    let drain = Box::new(move |partitions: &rdkafka::TopicPartitionList| {
        let ids: Vec<PartitionId> = partitions
            .elements()
            .iter()
            .map(|e| PartitionId {
                topic: e.topic().into(),
                partition: e.partition(),
            })
            .collect();
        drain_outputs(&drain_producer, &drain_tracker, drain_timeout, |tracker| {
            ids.iter().map(|id| tracker.pending_on(id)).sum()
        });
    });
    let consumer: StreamConsumer<TrackingContext> = consumer_config
        .create_with_context(TrackingContext::new(
            log.clone(),
            shared.tracker.clone(),
            "eventpipe_dispatch_consumer_lag_messages",
            drain,
        ))
        .map_err(KafkaError::Client)?;
    let subscription = subscription(input);
    consumer
        .subscribe(&subscription)
        .map_err(KafkaError::Client)?;
    readiness.register("kafka");
    readiness.set("kafka", true);
    tracing::info!(inputs = ?subscription, group_id, actions = ?transformer.router.actions(), "dispatching");

    let mut summary = DispatchSummary::default();
    let mut loop_metrics = LoopMetrics::default();
    let mut stored = StoredOffsets::new();
    let mut topic_ids = TopicIds::default();
    let mut store_tick = tokio::time::interval(STORE_INTERVAL);
    store_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let outcome = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            _ = store_tick.tick() => {
                if let Some(reason) = shared.fatal.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                    break Err(DispatchError::OutputLost(reason));
                }
                resend_dead_letters(&shared, &producer).await;
                commit_committable(&consumer, &shared.tracker, &mut stored);
                metrics::gauge!("eventpipe_dispatch_in_flight_inputs").set(shared.tracker().in_flight() as f64);
            }
            received = consumer.recv() => {
                let message = match received {
                    Ok(message) => message,
                    Err(error) => {
                        tracing::warn!(%error, "consumer error");
                        continue;
                    }
                };
                let topic_id = topic_ids.get(message.topic());
                process(&message, topic_id, &transformer, &shared, &producer, &mut summary, &mut loop_metrics).await;
            }
        }
    };

    // Graceful stop: no more input; flush outputs (bounded), resend dead letters, commit.
    let deadline = Instant::now() + drain_timeout;
    // Inputs whose output was lost, or whose dead letter awaits a resend, never complete here.
    let stuck = shared
        .fatal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_some()
        || !lock_retries(&shared).is_empty();
    drain_outputs(&producer, &shared.tracker, drain_timeout, |tracker| {
        if stuck {
            0
        } else {
            tracker.in_flight()
        }
    });
    while Instant::now() < deadline
        && !shared
            .dead_letter_retries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    {
        resend_dead_letters(&shared, &producer).await;
        let _ = producer.flush(deadline.saturating_duration_since(Instant::now()));
    }
    commit_committable(&consumer, &shared.tracker, &mut stored);
    commit_stored(&consumer, &stored);
    readiness.set("kafka", false);
    tracing::info!(
        consumed = summary.consumed,
        routed = summary.routed,
        dead_lettered = summary.dead_lettered,
        in_flight = shared.tracker().in_flight(),
        "dispatcher stopped"
    );
    outcome.map(|()| summary)
}

/// Topics that must exist before dispatching: every route's outputs and, for named inputs,
/// the inputs and their dead-letter topics. (A pattern's matches are not known in advance.)
pub(super) fn required_topics(transformer: &Transformer, input: &InputTopics) -> Vec<String> {
    let mut required = transformer.router.output_topics().to_vec();
    if let InputTopics::Names(names) = input {
        for name in names {
            required.push(name.clone());
            required.push(crate::dead_letter::dead_letter_topic(
                name,
                &transformer.dead_letter_suffix,
            ));
        }
    }
    required
}

/// What to subscribe to: the named topics, or the pattern (librdkafka reads `^...` as a regex).
pub(super) fn subscription(input: &InputTopics) -> Vec<&str> {
    match input {
        InputTopics::Names(names) => names.iter().map(String::as_str).collect(),
        InputTopics::Pattern(pattern) => vec![pattern.as_str()],
    }
}

/// Decodes (JSON or Avro), routes and encodes one consumed message, counting it; returns its
/// outputs and whether they are a dead letter, or `None` when shutdown came while waiting for
/// the schema registry (the message is then left unprocessed, to be consumed again). Shared by
/// the at-least-once and the transactional loops.
pub(super) async fn transform_message(
    message: &BorrowedMessage<'_>,
    topic_id: &Arc<str>,
    transformer: &Transformer,
    summary: &mut DispatchSummary,
    metrics: &mut LoopMetrics,
    shutdown: &CancellationToken,
) -> Option<(Vec<OutputRecord>, bool)> {
    let headers: Vec<(&str, &[u8])> = message
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key, h.value.unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    let original = message.payload().unwrap_or_default();
    let codecs = &transformer.codecs;
    let decoded = until_available("dispatch", shutdown, || {
        codecs.input.decode(message.topic(), original)
    })
    .await?;
    summary.consumed += 1;
    metrics.consumed(topic_id);
    let input = InputRecord {
        topic: message.topic(),
        partition: message.partition(),
        offset: message.offset(),
        timestamp_ms: message.timestamp().to_millis(),
        key: message.key(),
        payload: decoded.as_deref().unwrap_or(original),
        original,
        headers,
    };
    let started = Instant::now();
    let disposition = match &decoded {
        Ok(_) => transformer.transform(&input, &now_timestamp()),
        Err(error) => transformer.dead_letter(&input, error.kind, &error.reason),
    };
    let disposition = match disposition {
        Disposition::Routed { action, outputs } => {
            match encode_outputs(outputs, &codecs.output, shutdown).await? {
                Ok(outputs) => Disposition::Routed { action, outputs },
                Err(error) => transformer.dead_letter(&input, error.kind, &error.reason),
            }
        }
        dead_letter => dead_letter,
    };
    match disposition {
        Disposition::Routed { action, outputs } => {
            metrics.handler_seconds(&action, started.elapsed().as_secs_f64());
            summary.routed += 1;
            Some((outputs, false))
        }
        Disposition::DeadLetter { kind, record } => {
            tracing::debug!(
                kind,
                topic = input.topic,
                partition = input.partition,
                offset = input.offset,
                "dead-lettering"
            );
            metrics.dead_lettered(topic_id, kind);
            summary.dead_lettered += 1;
            Some((vec![record], true))
        }
    }
}

/// Outputs in their topics' formats (JSON outputs untouched); an output that does not fit its
/// schema fails the whole input, which is then dead-lettered; `None` on shutdown.
async fn encode_outputs(
    mut outputs: Vec<OutputRecord>,
    codec: &Codec,
    shutdown: &CancellationToken,
) -> Option<Result<Vec<OutputRecord>, RecordError>> {
    for output in &mut outputs {
        if codec.settings().output_format(&output.topic) == Format::Json {
            continue;
        }
        let encoded = until_available("dispatch", shutdown, || {
            codec.encode(&output.topic, output.value.clone())
        })
        .await?;
        match encoded {
            Ok(value) => output.value = value,
            Err(error) => return Some(Err(error)),
        }
    }
    Some(Ok(outputs))
}

async fn process(
    message: &BorrowedMessage<'_>,
    topic_id: Arc<str>,
    transformer: &Transformer,
    shared: &Shared,
    producer: &ThreadedProducer<DeliveryContext>,
    summary: &mut DispatchSummary,
    metrics: &mut LoopMetrics,
) {
    let Some((outputs, dead_letter)) = transform_message(
        message,
        &topic_id,
        transformer,
        summary,
        metrics,
        &shared.shutdown,
    )
    .await
    else {
        return;
    };
    let partition = PartitionId {
        topic: topic_id,
        partition: message.partition(),
    };
    // Track before sending: a delivery report may arrive before `send` returns.
    shared
        .tracker()
        .track(&partition, message.offset(), outputs.len() as u32);
    let input_timestamp_ms = message.timestamp().to_millis();
    for output in &outputs {
        let token = Box::new(DeliveryToken {
            partition: partition.clone(),
            offset: message.offset(),
            dead_letter,
            input_timestamp_ms,
        });
        send_record(producer, base_record(output, token)).await;
    }
}

/// The librdkafka record for one output, carrying `opaque` to its delivery report.
pub(super) fn base_record<D: rdkafka::util::IntoOpaque>(
    output: &OutputRecord,
    opaque: D,
) -> BaseRecord<'_, Vec<u8>, Vec<u8>, D> {
    let headers = output.headers.iter().fold(
        OwnedHeaders::new_with_capacity(output.headers.len()),
        |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v),
            })
        },
    );
    let mut record = BaseRecord::with_opaque_to(&output.topic, opaque)
        .payload(&output.value)
        .headers(headers);
    if let Some(key) = &output.key {
        record = record.key(key);
    }
    record
}

async fn send_record(
    producer: &ThreadedProducer<DeliveryContext>,
    mut record: BaseRecord<'_, Vec<u8>, Vec<u8>, Box<DeliveryToken>>,
) {
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((error, returned)) => {
                // Not retryable by waiting (e.g. message too large): report as a failed delivery
                // so the tracker and the dead-letter rules see it like any other failure.
                tracing::error!(%error, topic = returned.topic, "produce refused");
                let token = returned.delivery_opaque;
                let mut fatal = producer
                    .context()
                    .shared
                    .fatal
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                fatal.get_or_insert(format!(
                    "produce to {} refused for input {}[{}]@{}: {error}",
                    returned.topic, token.partition.topic, token.partition.partition, token.offset
                ));
                return;
            }
        }
    }
}

async fn resend_dead_letters(shared: &Shared, producer: &ThreadedProducer<DeliveryContext>) {
    let retries = std::mem::take(
        &mut *shared
            .dead_letter_retries
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    );
    for (message, token) in retries {
        let headers = message.headers().cloned().unwrap_or_default();
        let mut record = BaseRecord::with_opaque_to(message.topic(), token).headers(headers);
        let payload = message.payload().map(<[u8]>::to_vec).unwrap_or_default();
        let key = message.key().map(<[u8]>::to_vec);
        record = record.payload(&payload);
        if let Some(key) = &key {
            record = record.key(key);
        }
        send_record(producer, record).await;
    }
}

/// Waits, up to `timeout`, until `pending(tracker)` is zero: flushes the producer, then lets the
/// delivery callbacks finish. `flush` returns once reports are dequeued, while their callbacks
/// (which acknowledge inputs) may still be running on the producer's thread; committing before
/// they finish would commit too little and re-deliver inputs that were in fact done.
fn drain_outputs<C: ProducerContext>(
    producer: &ThreadedProducer<C>,
    tracker: &Mutex<AckTracker>,
    timeout: Duration,
    pending: impl Fn(&AckTracker) -> usize,
) {
    let deadline = Instant::now() + timeout;
    if let Err(error) = producer.flush(timeout) {
        tracing::warn!(%error, "in-flight outputs not all acknowledged within the drain deadline; their inputs will be re-delivered");
    }
    while pending(&lock(tracker)) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn lock_retries(
    shared: &Shared,
) -> std::sync::MutexGuard<'_, Vec<(OwnedMessage, Box<DeliveryToken>)>> {
    shared
        .dead_letter_retries
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}
