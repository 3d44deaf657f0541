//! The dispatcher's I/O loop, at-least-once: consume, transform, produce with delivery reports
//! feeding an ack tracker; offsets are stored only for fully acknowledged inputs; revocation and
//! shutdown flush in-flight outputs within the drain deadline, then commit.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::metrics::{DeliveryMetrics, LoopMetrics};
use super::transform::{Disposition, InputRecord, OutputRecord, Transformer};
use crate::config::{InputTopics, KafkaSettings};
use crate::envelope::now_timestamp;
use crate::kafka::ack::{AckTracker, PartitionId};
use crate::kafka::client::{client_config, require_topics, wait_for_broker};
use crate::kafka::{ClientKind, KafkaError, PipelineContext};
use crate::telemetry::Readiness;

/// How often acknowledged offsets are handed to librdkafka (which commits them every second).
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
    tracker: Mutex<AckTracker>,
    /// Set when an output is lost for good: the stage stops without storing past it.
    fatal: Mutex<Option<String>>,
    /// Dead-letter records whose delivery failed; they are re-sent, never dropped.
    dead_letter_retries: Mutex<Vec<(OwnedMessage, Box<DeliveryToken>)>>,
    producer: OnceLock<Arc<ThreadedProducer<DeliveryContext>>>,
    drain_timeout: Duration,
}

impl Shared {
    fn tracker(&self) -> std::sync::MutexGuard<'_, AckTracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits (bounded) for outstanding deliveries, then commits what they made committable
    /// for `partitions` and forgets them. Used on revocation.
    fn drain_and_commit(
        &self,
        consumer: &BaseConsumer<RebalanceContext>,
        partitions: &TopicPartitionList,
    ) {
        if let Some(producer) = self.producer.get() {
            if let Err(error) = producer.flush(self.drain_timeout) {
                tracing::warn!(%error, "in-flight outputs not all acknowledged within the drain deadline; their inputs will be re-delivered");
            }
        }
        let mut commit = TopicPartitionList::new();
        {
            let mut tracker = self.tracker();
            for element in partitions.elements() {
                let id = PartitionId {
                    topic: element.topic().into(),
                    partition: element.partition(),
                };
                let pending = tracker.pending_on(&id);
                if let Some(next) = tracker.forget(&id) {
                    let _ = commit.add_partition_offset(
                        element.topic(),
                        element.partition(),
                        Offset::Offset(next),
                    );
                }
                if pending > 0 {
                    tracing::warn!(
                        topic = element.topic(),
                        partition = element.partition(),
                        pending,
                        "revoked with unacknowledged inputs; they will be re-delivered"
                    );
                }
            }
        }
        if commit.count() > 0 {
            match consumer.commit(&commit, CommitMode::Sync) {
                Ok(()) => {
                    tracing::info!(partitions = commit.count(), "committed revoked partitions")
                }
                Err(error) => {
                    tracing::warn!(%error, "commit on revocation failed; inputs since the last commit will be re-delivered")
                }
            }
        }
    }
}

/// Producer context: delivery reports drive the ack tracker.
struct DeliveryContext {
    log: PipelineContext,
    shared: Arc<Shared>,
    metrics: DeliveryMetrics,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        self.log.log(level, facility, message);
    }
    fn error(&self, error: RdKafkaError, reason: &str) {
        self.log.error(error, reason);
    }
}

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

/// Consumer context: commits on revocation, reports lag from librdkafka statistics.
struct RebalanceContext {
    log: PipelineContext,
    shared: Arc<Shared>,
}

impl ClientContext for RebalanceContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        self.log.log(level, facility, message);
    }
    fn error(&self, error: RdKafkaError, reason: &str) {
        self.log.error(error, reason);
    }
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                // consumer_lag is -1 for partitions this member does not own: they are not reported.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    metrics::gauge!("eventpipe_dispatch_consumer_lag_messages", "topic" => topic.clone(), "partition" => partition.to_string())
                        .set(p.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                tracing::info!(partitions = %describe(partitions), "partitions revoked; draining");
                self.shared.drain_and_commit(consumer, partitions);
            }
            Rebalance::Assign(partitions) => {
                tracing::info!(partitions = %describe(partitions), "partitions assigned");
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }
}

fn describe(partitions: &TopicPartitionList) -> String {
    partitions
        .elements()
        .iter()
        .map(|e| format!("{}[{}]", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
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
        tracker: Mutex::new(AckTracker::default()),
        fatal: Mutex::new(None),
        dead_letter_retries: Mutex::new(Vec::new()),
        producer: OnceLock::new(),
        drain_timeout,
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
    let mut required: Vec<String> = transformer.router.output_topics().to_vec();
    if let InputTopics::Names(names) = input {
        for name in names {
            required.push(name.clone());
            required.push(crate::dead_letter::dead_letter_topic(
                name,
                &transformer.dead_letter_suffix,
            ));
        }
    }
    let required: Vec<&str> = required.iter().map(String::as_str).collect();
    require_topics(&metadata, &required, kafka)?;
    let _ = shared.producer.set(producer.clone());

    let mut consumer_config = client_config(kafka, ClientKind::Consumer);
    consumer_config.set("group.id", group_id);
    if consumer_config.get("statistics.interval.ms").is_none() {
        consumer_config.set("statistics.interval.ms", "5000");
    }
    let consumer: StreamConsumer<RebalanceContext> = consumer_config
        .create_with_context(RebalanceContext {
            log: log.clone(),
            shared: shared.clone(),
        })
        .map_err(KafkaError::Client)?;
    let subscription: Vec<&str> = match input {
        InputTopics::Names(names) => names.iter().map(String::as_str).collect(),
        InputTopics::Pattern(pattern) => vec![pattern.as_str()],
    };
    consumer
        .subscribe(&subscription)
        .map_err(KafkaError::Client)?;
    readiness.register("kafka");
    readiness.set("kafka", true);
    tracing::info!(inputs = ?subscription, group_id, actions = ?transformer.router.actions(), "dispatching");

    let mut summary = DispatchSummary::default();
    let mut loop_metrics = LoopMetrics::default();
    let mut stored: BTreeMap<PartitionId, i64> = BTreeMap::new();
    let mut topic_ids: BTreeMap<String, Arc<str>> = BTreeMap::new();
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
                store_offsets(&consumer, &shared, &mut stored);
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
                let topic_id = topic_ids
                    .entry(message.topic().to_string())
                    .or_insert_with(|| message.topic().into())
                    .clone();
                process(&message, topic_id, &transformer, &shared, &producer, &mut summary, &mut loop_metrics).await;
            }
        }
    };

    // Graceful stop: no more input; flush outputs (bounded), resend dead letters, commit.
    let deadline = Instant::now() + drain_timeout;
    let _ = producer.flush(drain_timeout);
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
    store_offsets(&consumer, &shared, &mut stored);
    let mut commit = TopicPartitionList::new();
    for (id, next) in &stored {
        let _ = commit.add_partition_offset(&id.topic, id.partition, Offset::Offset(*next));
    }
    if commit.count() > 0 {
        if let Err(error) = consumer.commit(&commit, CommitMode::Sync) {
            tracing::warn!(%error, "final commit failed; some inputs will be re-delivered");
        }
    }
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

/// Decodes and routes one consumed message, counting it; returns its outputs and whether they
/// are a dead letter. Shared by the at-least-once and the transactional loops.
pub(super) fn transform_message(
    message: &BorrowedMessage<'_>,
    topic_id: &Arc<str>,
    transformer: &Transformer,
    summary: &mut DispatchSummary,
    metrics: &mut LoopMetrics,
) -> (Vec<OutputRecord>, bool) {
    summary.consumed += 1;
    metrics.consumed(topic_id);
    let headers: Vec<(&str, &[u8])> = message
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key, h.value.unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    let input = InputRecord {
        topic: message.topic(),
        partition: message.partition(),
        offset: message.offset(),
        timestamp_ms: message.timestamp().to_millis(),
        key: message.key(),
        payload: message.payload().unwrap_or_default(),
        headers,
    };
    let started = Instant::now();
    match transformer.transform(&input, &now_timestamp()) {
        Disposition::Routed { action, outputs } => {
            metrics.handler_seconds(&action, started.elapsed().as_secs_f64());
            summary.routed += 1;
            (outputs, false)
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
            (vec![record], true)
        }
    }
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
    let (outputs, dead_letter) =
        transform_message(message, &topic_id, transformer, summary, metrics);
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

/// Hands newly committable offsets to librdkafka; they are committed by the auto-commit timer.
fn store_offsets(
    consumer: &StreamConsumer<RebalanceContext>,
    shared: &Shared,
    stored: &mut BTreeMap<PartitionId, i64>,
) {
    let committable = shared.tracker().take_committable();
    if committable.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (id, next) in &committable {
        let _ = tpl.add_partition_offset(&id.topic, id.partition, Offset::Offset(*next));
    }
    match consumer.store_offsets(&tpl) {
        Ok(()) => {
            for (id, next) in committable {
                stored.insert(id, next);
            }
        }
        // A partition revoked since: its offsets were committed by the revocation handler.
        Err(error) => tracing::debug!(%error, "storing offsets"),
    }
}
