//! The aggregator's logic on the stage runtime: feed events to the window engine, write closed
//! windows to the sink, dead-letter bad input; the runtime commits each partition's checkpoint.
//!
//! Each commit carries the partition's horizon as commit metadata (the runtime's `Checkpoint`
//! policy): the next owner of the partition restores it, so its replay accepts and rejects
//! exactly the events this instance did (see `window`).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::event::Event;
use super::sink::{Sink, SinkError};
use super::window::{Checkpoint, Engine, EngineConfig, Outcome};
use crate::codec::{available, until_available, Codec, CodecSettings, Registry, SchemaName};
use crate::config::KafkaSettings;
use crate::kafka::client::create_client;
use crate::kafka::{ClientKind, KafkaError, PipelineContext};
use crate::stage::{
    self, DeadLetter, DeadLetterTopic, Handled, InputTopics, OffsetPolicy, PartitionHooks,
    PartitionId, Record, Stage, StageError, StageSpec,
};
use crate::telemetry::Readiness;

/// How often closed windows are written: the emission latency floor, and the sink batch size.
/// Checkpoints are committed on the same tick.
const EMIT_INTERVAL: Duration = Duration::from_millis(200);
/// The longest wait between two attempts to write to a failing sink.
const MAX_SINK_BACKOFF: Duration = Duration::from_secs(5);
const FIRST_SINK_BACKOFF: Duration = Duration::from_millis(100);
/// How long a graceful stop waits for dead letters in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
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
    Stage(#[from] StageError),
    #[error("encoding output: {0}")]
    Codec(crate::codec::RecordError),
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

fn metadata(checkpoint: Checkpoint) -> stage::Checkpoint {
    stage::Checkpoint {
        next_offset: checkpoint.next_offset,
        metadata: (checkpoint.horizon_ms > i64::MIN)
            .then(|| format!("{HORIZON_METADATA_PREFIX}{}", checkpoint.horizon_ms)),
    }
}

fn parse_horizon(metadata: &str) -> Option<i64> {
    metadata.strip_prefix(HORIZON_METADATA_PREFIX)?.parse().ok()
}

/// On assignment restores each partition's horizon from its commit metadata; on revocation
/// hands its final checkpoint to the runtime and drops its windows (the next owner rebuilds
/// them from the checkpoint).
struct AggregateHooks {
    engine: SharedEngine,
}

impl PartitionHooks for AggregateHooks {
    fn assigned(&self, partition: &PartitionId, committed_metadata: Option<&str>) {
        let horizon = committed_metadata.and_then(parse_horizon);
        tracing::info!(topic = %partition.topic, partition = partition.partition, horizon_ms = ?horizon, "partition assigned");
        lock(&self.engine).assign(partition.clone(), horizon);
    }

    fn revoked(&self, partition: &PartitionId) -> Option<stage::Checkpoint> {
        lock(&self.engine).revoke(partition).map(metadata)
    }
}

/// The aggregator as the runtime sees it.
pub fn stage_spec(kafka: &KafkaSettings, config: &PipelineConfig, sink: &Sink) -> StageSpec {
    let mut required = vec![
        config.input_topic.clone(),
        config.dead_letter_topic.clone(),
        config.metrics_topic.clone(),
    ];
    if let Sink::Kafka { topic, .. } = sink {
        required.push(topic.clone());
    }
    StageSpec {
        name: "aggregate",
        inputs: InputTopics::Names(vec![config.input_topic.clone()]),
        group_id: config.group_id.clone(),
        required_topics: required,
        dead_letters: DeadLetterTopic::Topic(config.dead_letter_topic.clone()),
        policy: OffsetPolicy::Checkpoint,
        drain_timeout: DRAIN_TIMEOUT,
        tick: EMIT_INTERVAL,
        max_record_bytes: kafka.max_record_bytes(),
    }
}

/// Runs the aggregator until `shutdown` is cancelled or an output cannot be written.
pub async fn run(
    kafka: &KafkaSettings,
    config: &PipelineConfig,
    sink: Sink,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<AggregateSummary, AggregateError> {
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
    super::metrics::describe();
    crate::codec::describe_metrics("aggregate");
    let producer: FutureProducer<PipelineContext> =
        create_client(kafka, ClientKind::Producer, PipelineContext::default())?;
    let engine: SharedEngine = Arc::new(Mutex::new(Engine::new(config.engine.clone())));
    tracing::info!(input = %config.input_topic, engine = ?config.engine, "aggregating");
    let spec = stage_spec(kafka, config, &sink);
    let hooks = Arc::new(AggregateHooks {
        engine: engine.clone(),
    });
    let stage = stage::run(kafka, spec, hooks, readiness, shutdown, |_| {
        AggregateStage {
            engine,
            sink,
            config: config.clone(),
            producer,
            totals: Totals::default(),
            unwritten: Vec::new(),
            sink_backoff: FIRST_SINK_BACKOFF,
            next_sink_attempt: None,
            last_metrics: Instant::now(),
            metrics: EventMetrics::default(),
        }
    })
    .await?;
    let summary = stage.totals.summary.clone();
    tracing::info!(
        aggregated = summary.aggregated,
        failed = summary.failed,
        emitted = summary.emitted,
        open_windows = lock(&stage.engine).open_windows(),
        "aggregator stopped"
    );
    Ok(summary)
}

/// Running totals, also published as JSON to the metrics topic.
#[derive(Default)]
struct Totals {
    summary: AggregateSummary,
    processing: Duration,
}

struct AggregateStage {
    engine: SharedEngine,
    sink: Sink,
    config: PipelineConfig,
    /// For the metrics records (fire and forget).
    producer: FutureProducer<PipelineContext>,
    totals: Totals,
    /// Closed windows taken from the engine that the sink has not accepted yet.
    unwritten: Vec<super::window::Emission>,
    sink_backoff: Duration,
    /// Set while the sink is failing: when to try again.
    next_sink_attempt: Option<Instant>,
    last_metrics: Instant,
    metrics: EventMetrics,
}

/// Per-event metric handles, resolved once rather than looked up in the registry per event.
struct EventMetrics {
    aggregated: metrics::Counter,
    processing_seconds: metrics::Histogram,
}

impl Default for EventMetrics {
    fn default() -> Self {
        EventMetrics {
            aggregated: metrics::counter!("eventpipe_aggregate_aggregated_events_total"),
            processing_seconds: metrics::histogram!("eventpipe_aggregate_processing_seconds"),
        }
    }
}

impl Stage for AggregateStage {
    async fn handle(&mut self, record: &Record<'_>) -> Result<Handled, StageError> {
        // A failing sink stops consumption (the runtime pauses the partitions and keeps
        // polling); the windows are retried on the tick; nothing is skipped.
        if self.next_sink_attempt.is_some() {
            return Err(StageError::Unavailable {
                dependency: self.sink.name(),
                reason: "writing aggregates failed; retrying".into(),
            });
        }
        let decoded = available(
            "aggregate",
            self.config
                .codecs
                .input
                .decode(record.topic, record.payload)
                .await,
        )?;
        let started = Instant::now();
        let id = record.partition_id();
        let event = decoded
            .map_err(|e| (e.kind, e.reason))
            .and_then(|json| Event::decode(&json).map_err(|e| (e.kind(), e.to_string())))
            .map(|event| Event {
                record_ms: record.timestamp_ms,
                ..event
            });
        let rejection = match event {
            Ok(event) => {
                let outcome = lock(&self.engine).apply(&id, record.offset, &event, started);
                match outcome {
                    Outcome::Accepted { late } => {
                        self.totals.summary.aggregated += 1;
                        self.metrics.aggregated.increment(1);
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
                        tracing::debug!(topic = %record.topic, partition = record.partition, offset = record.offset, "record of an unassigned partition ignored");
                        None
                    }
                }
            }
            Err(rejected) => Some(rejected),
        };
        let handled = match rejection {
            Some((kind, reason)) => {
                self.totals.summary.failed += 1;
                metrics::counter!("eventpipe_aggregate_failed_events_total", "reason" => kind)
                    .increment(1);
                tracing::debug!(kind, %reason, topic = %record.topic, partition = record.partition, offset = record.offset, "dead-lettering");
                // The runtime holds the checkpoint below this offset until its dead letter is in.
                lock(&self.engine).skip(&id, record.offset);
                Handled::DeadLetter(DeadLetter::new(kind, reason))
            }
            None => Handled::Done,
        };
        let elapsed = started.elapsed();
        self.totals.processing += elapsed;
        self.metrics
            .processing_seconds
            .record(elapsed.as_secs_f64());
        Ok(handled)
    }

    async fn tick(&mut self) -> Result<(), StageError> {
        self.flush().await;
        if self.last_metrics.elapsed() >= self.config.metrics_interval {
            self.last_metrics = Instant::now();
            publish_metrics(&self.producer, &self.config, &mut self.totals).await;
        }
        Ok(())
    }

    /// Graceful stop: write what is closed (one attempt). Open windows are not emitted: the
    /// next owner rebuilds them from the committed checkpoint.
    async fn finish(&mut self, _deadline: tokio::time::Instant) -> Result<(), StageError> {
        self.next_sink_attempt = None;
        self.flush().await;
        match self.next_sink_attempt {
            Some(_) => Err(StageError::Fatal(
                "closed windows not written at shutdown; they are re-read after the restart".into(),
            )),
            None => Ok(()),
        }
    }

    fn checkpoints(&self) -> Vec<(PartitionId, stage::Checkpoint)> {
        lock(&self.engine)
            .checkpoints()
            .into_iter()
            .map(|(id, checkpoint)| (id, metadata(checkpoint)))
            .collect()
    }
}

impl AggregateStage {
    /// Writes every changed closed window and acknowledges it; a failure is retried on a later
    /// tick, with backoff, while `handle` holds new records back.
    async fn flush(&mut self) {
        if self.next_sink_attempt.is_some_and(|at| Instant::now() < at) {
            return;
        }
        if self.unwritten.is_empty() {
            self.unwritten = lock(&self.engine).take_emissions(Instant::now());
        }
        if !self.unwritten.is_empty() {
            if let Err(error) = self.sink.write(&self.unwritten).await {
                self.sink_failed(error);
                return;
            }
            let emissions = std::mem::take(&mut self.unwritten);
            self.totals.summary.emitted += emissions.len() as u64;
            // End to end: from the newest contributing record's timestamp to the sink's acknowledgement.
            let acknowledged_ms = chrono::Utc::now().timestamp_millis();
            let end_to_end = metrics::histogram!("eventpipe_aggregate_end_to_end_seconds");
            for newest in emissions.iter().filter_map(|e| e.newest_record_ms) {
                end_to_end.record((acknowledged_ms - newest).max(0) as f64 / 1000.0);
            }
            metrics::counter!("eventpipe_aggregate_emitted_windows_total")
                .increment(emissions.len() as u64);
            lock(&self.engine).acknowledge(&emissions);
        }
        if self.next_sink_attempt.take().is_some() {
            tracing::info!(sink = self.sink.name(), "aggregates written again");
        }
        self.sink_backoff = FIRST_SINK_BACKOFF;
        let (open, evicted, watermark) = {
            let engine = lock(&self.engine);
            (
                engine.open_windows(),
                engine.evicted_windows(),
                engine.min_watermark_ms(),
            )
        };
        metrics::gauge!("eventpipe_aggregate_open_windows").set(open as f64);
        metrics::counter!("eventpipe_aggregate_evicted_windows_total").absolute(evicted);
        if let Some(watermark) = watermark {
            let lag = (Utc::now().timestamp_millis() - watermark).max(0) as f64 / 1000.0;
            metrics::gauge!("eventpipe_aggregate_watermark_lag_seconds").set(lag);
        }
    }

    fn sink_failed(&mut self, error: SinkError) {
        tracing::warn!(%error, retry_in = ?self.sink_backoff, "writing aggregates failed; retrying");
        metrics::counter!("eventpipe_aggregate_sink_retries_total").increment(1);
        self.next_sink_attempt = Some(Instant::now() + self.sink_backoff);
        self.sink_backoff = (self.sink_backoff * 2).min(MAX_SINK_BACKOFF);
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
    fn horizons_round_trip_through_commit_metadata() {
        let with = metadata(Checkpoint {
            next_offset: 42,
            horizon_ms: 1_714_564_800_000,
        });
        assert_eq!(with.next_offset, 42);
        assert_eq!(
            with.metadata.as_deref().and_then(parse_horizon),
            Some(1_714_564_800_000)
        );
        let without = metadata(Checkpoint {
            next_offset: 7,
            horizon_ms: i64::MIN,
        });
        assert_eq!(without.metadata, None, "no horizon yet");
        assert_eq!(parse_horizon("written by another tool"), None);
    }
}
