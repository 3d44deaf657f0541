//! The aggregator's I/O loop: consume events, feed the window engine, write closed windows to
//! the sink, dead-letter bad input, and commit each partition's checkpoint (offset + horizon).
//!
//! Offsets are committed by hand (not auto-commit) because each commit carries the partition's
//! horizon as commit metadata: the next owner of the partition restores it, so its replay
//! accepts and rejects exactly the events this instance did (see `window`).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::event::Event;
use super::sink::{Sink, SinkError};
use super::window::{Checkpoint, Engine, EngineConfig, Outcome};
use crate::codec::{until_available, Codec, CodecSettings, RecordError, Registry, SchemaName};
use crate::config::KafkaSettings;
use crate::dead_letter::{self, SourcePosition};
use crate::kafka::ack::PartitionId;
use crate::kafka::client::{client_config, create_client, require_topics, wait_for_broker};
use crate::kafka::delivery::BoundedSender;
use crate::kafka::{ClientKind, KafkaError, PipelineContext};
use crate::telemetry::Readiness;

/// How often closed windows are written: the emission latency floor, and the sink batch size.
const EMIT_INTERVAL: Duration = Duration::from_millis(200);
/// How often checkpoints are committed: the most a crash makes the next owner re-read.
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on fetching committed offsets while partitions are being assigned.
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(10);
/// Dead letters awaiting their delivery report at once.
const DEAD_LETTER_MAX_IN_FLIGHT: usize = 10_000;
/// The longest wait between two attempts to write to a failing sink.
const MAX_SINK_BACKOFF: Duration = Duration::from_secs(5);
/// Commit metadata carrying the partition's horizon (event-time ms).
const HORIZON_METADATA_PREFIX: &str = "eventpipe.aggregate.horizon_ms=";

/// Everything the loop needs besides the Kafka connection and the sink.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub input_topic: String,
    pub dead_letter_topic: String,
    pub group_id: String,
    pub metrics_topic: String,
    pub metrics_interval: Duration,
    pub engine: EngineConfig,
    /// Input events and the metrics records on the wire (the Kafka sink has its own).
    pub codecs: AggregateCodecs,
}

/// The aggregator's codecs: events in, metrics records out.
#[derive(Debug, Clone)]
pub struct AggregateCodecs {
    pub input: Codec,
    pub metrics: Codec,
}

impl AggregateCodecs {
    pub fn new(settings: Arc<CodecSettings>, registry: Option<Arc<Registry>>) -> AggregateCodecs {
        AggregateCodecs {
            input: Codec::new(
                settings.clone(),
                registry.clone(),
                SchemaName::AggregateEvent,
            ),
            metrics: Codec::new(settings, registry, SchemaName::Metrics),
        }
    }

    /// JSON everywhere, no registry.
    pub fn json() -> AggregateCodecs {
        AggregateCodecs::new(Arc::default(), None)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("stopped to avoid losing data: dead letter not delivered: {0}")]
    DeadLetterLost(KafkaError),
    #[error("encoding output: {0}")]
    Codec(RecordError),
}

/// What a run did, for the caller's summary line.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct AggregateSummary {
    pub aggregated: u64,
    pub failed: u64,
    pub emitted: u64,
}

type SharedEngine = Arc<Mutex<Engine>>;

fn lock(engine: &SharedEngine) -> MutexGuard<'_, Engine> {
    // A poisoned lock means a panic elsewhere; the engine's state is still consistent.
    engine.lock().unwrap_or_else(|p| p.into_inner())
}

fn partition_id(topic: &str, partition: i32) -> PartitionId {
    PartitionId {
        topic: topic.into(),
        partition,
    }
}

/// Adds checkpoints to a commit list, each with its horizon as metadata.
fn commit_list(checkpoints: &[(PartitionId, Checkpoint)]) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for (id, checkpoint) in checkpoints {
        let mut element = list.add_partition(&id.topic, id.partition);
        let _ = element.set_offset(Offset::Offset(checkpoint.next_offset));
        if checkpoint.horizon_ms > i64::MIN {
            element.set_metadata(format!(
                "{HORIZON_METADATA_PREFIX}{}",
                checkpoint.horizon_ms
            ));
        }
    }
    list
}

fn parse_horizon(metadata: &str) -> Option<i64> {
    metadata.strip_prefix(HORIZON_METADATA_PREFIX)?.parse().ok()
}

/// Consumer context: on revocation commits and drops the partitions' windows (the next owner
/// rebuilds them from the checkpoint); on assignment restores each partition's horizon.
struct AggregateContext {
    log: PipelineContext,
    engine: SharedEngine,
}

crate::kafka::client::logging_client_context!(
    AggregateContext,
    lag = "eventpipe_aggregate_consumer_lag_messages"
);

impl ConsumerContext for AggregateContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                let checkpoints: Vec<_> = {
                    let mut engine = lock(&self.engine);
                    partitions
                        .elements()
                        .iter()
                        .filter_map(|e| {
                            let id = partition_id(e.topic(), e.partition());
                            Some((id.clone(), engine.revoke(&id)?))
                        })
                        .collect()
                };
                tracing::info!(
                    partitions = partitions.count(),
                    "partitions revoked; committing checkpoints and dropping their windows"
                );
                if !checkpoints.is_empty() {
                    if let Err(error) =
                        consumer.commit(&commit_list(&checkpoints), CommitMode::Sync)
                    {
                        tracing::warn!(%error, "commit on revocation failed; the next owner re-reads from the previous checkpoint");
                    }
                }
            }
            // Before librdkafka starts fetching, so no message can arrive for a partition
            // whose horizon is not restored yet.
            Rebalance::Assign(partitions) => {
                let committed = consumer
                    .committed_offsets((*partitions).clone(), COMMITTED_TIMEOUT)
                    .map_err(|error| tracing::warn!(%error, "cannot read committed horizons; starting without them"))
                    .ok();
                let mut engine = lock(&self.engine);
                for element in partitions.elements() {
                    let horizon = committed.as_ref().and_then(|c| {
                        c.find_partition(element.topic(), element.partition())
                            .and_then(|e| parse_horizon(e.metadata()))
                    });
                    tracing::info!(
                        topic = element.topic(),
                        partition = element.partition(),
                        horizon_ms = ?horizon,
                        "partition assigned"
                    );
                    engine.assign(partition_id(element.topic(), element.partition()), horizon);
                }
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }
}

/// Running totals, also published as JSON to the metrics topic.
#[derive(Default)]
struct Totals {
    summary: AggregateSummary,
    processing: Duration,
}

/// Runs the aggregator until `shutdown` is cancelled or an output cannot be written.
pub async fn run(
    kafka: &KafkaSettings,
    config: &PipelineConfig,
    sink: Sink,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<AggregateSummary, AggregateError> {
    let log = PipelineContext::default();
    let producer: FutureProducer<PipelineContext> =
        create_client(kafka, ClientKind::Producer, log.clone())?;
    let metadata = wait_for_broker(producer.client(), &log, kafka)?;
    let mut required = vec![
        config.input_topic.as_str(),
        config.dead_letter_topic.as_str(),
        config.metrics_topic.as_str(),
    ];
    if let Sink::Kafka { topic, .. } = &sink {
        required.push(topic);
    }
    require_topics(&metadata, &required, kafka)?;
    // Missing writer-schema registrations show at start-up, not at the first window.
    let mut outputs = vec![(config.codecs.metrics.clone(), config.metrics_topic.clone())];
    if let Sink::Kafka { topic, codec, .. } = &sink {
        outputs.push((codec.clone(), topic.clone()));
    }
    for (codec, topic) in outputs {
        let topics = [topic];
        match until_available("aggregate", &shutdown, || codec.prepare_outputs(&topics)).await {
            Some(Ok(())) => {}
            Some(Err(error)) => return Err(AggregateError::Codec(error)),
            None => return Ok(AggregateSummary::default()),
        }
    }

    let engine: SharedEngine = Arc::new(Mutex::new(Engine::new(config.engine.clone())));
    let mut consumer_config = client_config(kafka, ClientKind::Consumer);
    consumer_config
        .set("group.id", &config.group_id)
        // Commits carry metadata and must wait for the sink: the loop commits by hand.
        .set("enable.auto.commit", "false");
    if consumer_config.get("statistics.interval.ms").is_none() {
        consumer_config.set("statistics.interval.ms", "5000");
    }
    super::metrics::describe();
    crate::codec::describe_metrics("aggregate");
    let consumer: StreamConsumer<AggregateContext> = consumer_config
        .create_with_context(AggregateContext {
            log: log.clone(),
            engine: engine.clone(),
        })
        .map_err(KafkaError::Client)?;
    consumer
        .subscribe(&[config.input_topic.as_str()])
        .map_err(KafkaError::Client)?;
    readiness.register("kafka");
    readiness.set("kafka", true);
    tracing::info!(input = %config.input_topic, group_id = %config.group_id, engine = ?config.engine, "aggregating");

    let mut totals = Totals::default();
    let mut dead_letters = BoundedSender::new(&producer, DEAD_LETTER_MAX_IN_FLIGHT);
    let mut committed: Vec<(PartitionId, Checkpoint)> = Vec::new();
    let mut emit_tick = tokio::time::interval(EMIT_INTERVAL);
    let mut commit_tick = tokio::time::interval(COMMIT_INTERVAL);
    let mut metrics_tick = tokio::time::interval(config.metrics_interval);
    for tick in [&mut emit_tick, &mut commit_tick, &mut metrics_tick] {
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }

    let outcome: Result<(), AggregateError> = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            _ = emit_tick.tick() => {
                if let Err(error) = flush(&engine, &sink, &mut dead_letters, &producer, &mut totals, &shutdown).await {
                    break Err(error);
                }
            }
            _ = commit_tick.tick() => commit(&consumer, &engine, &mut committed, CommitMode::Async),
            _ = metrics_tick.tick() => publish_metrics(&producer, config, &mut totals).await,
            received = consumer.recv() => {
                match received {
                    Ok(message) => {
                        match process(&message, &engine, &mut dead_letters, config, &mut totals, &shutdown).await {
                            Ok(true) => {}
                            // Shutdown while waiting for the registry: the message stays unread.
                            Ok(false) => break Ok(()),
                            Err(error) => break Err(error),
                        }
                    }
                    Err(error) => tracing::warn!(%error, "consumer error"),
                }
            }
        }
    };

    // Graceful stop: write what is closed, then commit. Open windows are not emitted: the next
    // owner rebuilds them from the committed checkpoint.
    let outcome = match outcome {
        Ok(()) => {
            flush(
                &engine,
                &sink,
                &mut dead_letters,
                &producer,
                &mut totals,
                // Already cancelled: one attempt; what fails is re-read after the restart.
                &shutdown,
            )
            .await
        }
        Err(error) => Err(error),
    };
    if outcome.is_ok() {
        // An earlier asynchronous commit may have failed after being accepted: commit all.
        committed.clear();
        commit(&consumer, &engine, &mut committed, CommitMode::Sync);
    }
    readiness.set("kafka", false);
    let summary = totals.summary.clone();
    tracing::info!(
        aggregated = summary.aggregated,
        failed = summary.failed,
        emitted = summary.emitted,
        open_windows = lock(&engine).open_windows(),
        "aggregator stopped"
    );
    outcome.map(|()| summary)
}

/// Decodes one message and applies it, or dead-letters it; `false` when shutdown came while
/// waiting for the schema registry (the message was not taken).
async fn process(
    message: &BorrowedMessage<'_>,
    engine: &SharedEngine,
    dead_letters: &mut BoundedSender<'_>,
    config: &PipelineConfig,
    totals: &mut Totals,
    shutdown: &CancellationToken,
) -> Result<bool, AggregateError> {
    let original = message.payload().unwrap_or_default();
    let Some(decoded) = until_available("aggregate", shutdown, || {
        config.codecs.input.decode(message.topic(), original)
    })
    .await
    else {
        return Ok(false);
    };
    let started = Instant::now();
    let id = partition_id(message.topic(), message.partition());
    let offset = message.offset();
    let event = decoded
        .map_err(|e| (e.kind, e.reason))
        .and_then(|json| Event::decode(&json).map_err(|e| (e.kind(), e.to_string())))
        .map(|event| Event {
            record_ms: message.timestamp().to_millis(),
            ..event
        });
    let rejection = match event {
        Ok(event) => {
            let outcome = lock(engine).apply(&id, offset, &event, started);
            match outcome {
                Outcome::Accepted { late } => {
                    totals.summary.aggregated += 1;
                    metrics::counter!("eventpipe_aggregate_aggregated_events_total").increment(1);
                    if late {
                        metrics::counter!("eventpipe_aggregate_late_events_total", "outcome" => "accepted").increment(1);
                    }
                    None
                }
                Outcome::TooLate => {
                    metrics::counter!("eventpipe_aggregate_late_events_total", "outcome" => "dead_lettered").increment(1);
                    Some((
                        "late_event",
                        format!(
                            "event time {} is older than the watermark minus the grace for all its windows",
                            event.time_ms
                        ),
                    ))
                }
                Outcome::Unassigned => {
                    tracing::debug!(
                        topic = message.topic(),
                        partition = message.partition(),
                        offset,
                        "message of an unassigned partition ignored"
                    );
                    None
                }
            }
        }
        Err(rejected) => Some(rejected),
    };
    if let Some((kind, reason)) = rejection {
        totals.summary.failed += 1;
        metrics::counter!("eventpipe_aggregate_failed_events_total", "reason" => kind).increment(1);
        tracing::debug!(kind, %reason, topic = message.topic(), partition = message.partition(), offset, "dead-lettering");
        {
            let mut engine = lock(engine);
            engine.skip(&id, offset);
            engine.hold(&id, offset);
        }
        send_dead_letter(message, kind, &reason, dead_letters, config).await?;
    }
    let elapsed = started.elapsed();
    totals.processing += elapsed;
    metrics::histogram!("eventpipe_aggregate_processing_seconds").record(elapsed.as_secs_f64());
    Ok(true)
}

async fn send_dead_letter(
    message: &BorrowedMessage<'_>,
    kind: &str,
    reason: &str,
    dead_letters: &mut BoundedSender<'_>,
    config: &PipelineConfig,
) -> Result<(), AggregateError> {
    let source = SourcePosition {
        topic: message.topic(),
        partition: message.partition(),
        offset: message.offset(),
        timestamp_ms: message.timestamp().to_millis(),
    };
    let added = dead_letter::headers("aggregate", kind, reason, &source);
    let mut headers = OwnedHeaders::new();
    if let Some(original) = message.headers() {
        for header in original.iter() {
            headers = headers.insert(header);
        }
    }
    for (key, value) in &added {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    let mut record = FutureRecord::to(&config.dead_letter_topic)
        .payload(message.payload().unwrap_or_default())
        .headers(headers);
    if let Some(key) = message.key() {
        record = record.key(key);
    }
    dead_letters
        .send(record)
        .await
        .map_err(AggregateError::DeadLetterLost)
}

/// Settles dead letters, then writes every changed closed window and acknowledges it.
async fn flush<'p>(
    engine: &SharedEngine,
    sink: &Sink,
    dead_letters: &mut BoundedSender<'p>,
    producer: &'p FutureProducer<PipelineContext>,
    totals: &mut Totals,
    shutdown: &CancellationToken,
) -> Result<(), AggregateError> {
    let settled = std::mem::replace(
        dead_letters,
        BoundedSender::new(producer, DEAD_LETTER_MAX_IN_FLIGHT),
    );
    settled
        .finish()
        .await
        .map_err(AggregateError::DeadLetterLost)?;
    lock(engine).release_held();

    let emissions = lock(engine).take_emissions(Instant::now());
    if !emissions.is_empty() {
        let mut backoff = Duration::from_millis(100);
        // A failing sink stops consumption (backpressure) and is retried; nothing is skipped.
        while let Err(error) = sink.write(&emissions).await {
            if shutdown.is_cancelled() {
                return Err(error.into());
            }
            tracing::warn!(%error, retry_in = ?backoff, "writing aggregates failed; retrying");
            metrics::counter!("eventpipe_aggregate_sink_retries_total").increment(1);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => return Err(error.into()),
            }
            backoff = (backoff * 2).min(MAX_SINK_BACKOFF);
        }
        totals.summary.emitted += emissions.len() as u64;
        // End to end: from the newest contributing record's timestamp to the sink's acknowledgement.
        let acknowledged_ms = chrono::Utc::now().timestamp_millis();
        let end_to_end = metrics::histogram!("eventpipe_aggregate_end_to_end_seconds");
        for newest in emissions.iter().filter_map(|e| e.newest_record_ms) {
            end_to_end.record((acknowledged_ms - newest).max(0) as f64 / 1000.0);
        }
        metrics::counter!("eventpipe_aggregate_emitted_windows_total")
            .increment(emissions.len() as u64);
    }
    let engine = {
        let mut engine = lock(engine);
        engine.acknowledge(&emissions);
        (
            engine.open_windows(),
            engine.evicted_windows(),
            engine.min_watermark_ms(),
        )
    };
    let (open, evicted, watermark) = engine;
    metrics::gauge!("eventpipe_aggregate_open_windows").set(open as f64);
    metrics::counter!("eventpipe_aggregate_evicted_windows_total").absolute(evicted);
    if let Some(watermark) = watermark {
        let lag = (Utc::now().timestamp_millis() - watermark).max(0) as f64 / 1000.0;
        metrics::gauge!("eventpipe_aggregate_watermark_lag_seconds").set(lag);
    }
    Ok(())
}

/// Commits checkpoints that changed since the last commit.
fn commit(
    consumer: &StreamConsumer<AggregateContext>,
    engine: &SharedEngine,
    committed: &mut Vec<(PartitionId, Checkpoint)>,
    mode: CommitMode,
) {
    let checkpoints = lock(engine).checkpoints();
    let changed: Vec<_> = checkpoints
        .iter()
        .filter(|c| !committed.contains(c))
        .cloned()
        .collect();
    if changed.is_empty() {
        return;
    }
    match consumer.commit(&commit_list(&changed), mode) {
        Ok(()) => *committed = checkpoints,
        Err(error) => tracing::warn!(%error, "commit failed; retrying on the next tick"),
    }
}

/// Publishes the totals as JSON to the metrics topic, as the service this stage replaces did:
/// cumulative counts, and the seconds spent processing events since the previous record.
async fn publish_metrics(
    producer: &FutureProducer<PipelineContext>,
    config: &PipelineConfig,
    totals: &mut Totals,
) {
    let record = json!({
        "service": "eventpipe-aggregate",
        "group_id": config.group_id,
        "timestamp": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "aggregated_events_count": totals.summary.aggregated,
        "failed_events_count": totals.summary.failed,
        "processing_time": totals.processing.as_secs_f64(),
    });
    totals.processing = Duration::ZERO;
    let json = serde_json::to_vec(&record).expect("a json! value always serializes");
    let value = match config
        .codecs
        .metrics
        .encode(&config.metrics_topic, json)
        .await
    {
        Ok(value) => value,
        Err(error) => {
            tracing::warn!(%error, "metrics record not encoded; skipped");
            return;
        }
    };
    // Fire and forget: a lost metrics record is not worth stopping the stage for.
    if let Err((error, _)) = producer.send_result(
        FutureRecord::<[u8], [u8]>::to(&config.metrics_topic)
            .key(config.group_id.as_bytes())
            .payload(&value),
    ) {
        tracing::warn!(%error, "metrics record not sent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_through_commit_metadata() {
        let checkpoints = vec![
            (
                partition_id("events_in", 0),
                Checkpoint {
                    next_offset: 42,
                    horizon_ms: 1_714_564_800_000,
                },
            ),
            (
                partition_id("events_in", 1),
                Checkpoint {
                    next_offset: 7,
                    horizon_ms: i64::MIN,
                },
            ),
        ];
        let list = commit_list(&checkpoints);
        let first = list.find_partition("events_in", 0).unwrap();
        assert_eq!(first.offset(), Offset::Offset(42));
        assert_eq!(parse_horizon(first.metadata()), Some(1_714_564_800_000));
        let second = list.find_partition("events_in", 1).unwrap();
        assert_eq!(parse_horizon(second.metadata()), None, "no horizon yet");
        assert_eq!(parse_horizon("written by another tool"), None);
    }
}
