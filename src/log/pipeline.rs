//! The log stage's logic on the stage runtime: map each record to bulk lines, batch them (count,
//! bytes, time), and bulk-index with retries in a task of its own; the runtime acknowledges,
//! commits and dead-letters. Records are acknowledged when Elasticsearch has them.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::bulk::{bulk_lines, Backoff, BulkError, ItemOutcome};
use super::document::{map_record, RecordMeta};
use super::elasticsearch::Elasticsearch;
use super::settings::LogSettings;
use crate::codec::{available, Codec, RecordError};
use crate::config::KafkaSettings;
use crate::envelope::DecodeError;
use crate::stage::batch::{BatchLimits, Batcher, WriterHooks};
use crate::stage::{
    DeadLetter, DeadLetterTopic, Handled, InputTopics, OffsetPolicy, PartitionId, Record,
    RecordHeaders, Stage, StageError, StageIo, StageSpec,
};
use crate::telemetry::Readiness;

/// How often acknowledged offsets are committed (the runtime's tick).
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// Dead-letter kind of documents Elasticsearch refused for good.
const REJECTED_KIND: &str = "elasticsearch_rejected";
pub const HEADER_ES_STATUS: &str = "eventpipe.elasticsearch.status";
pub const HEADER_ES_ERROR_TYPE: &str = "eventpipe.elasticsearch.error.type";

/// A consumed record, kept until its document is acknowledged, to dead-letter it untouched.
struct Original {
    partition: PartitionId,
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Option<OwnedHeaders>,
}

impl Original {
    fn of(record: &Record<'_>) -> Original {
        let headers = (!record.headers.is_empty()).then(|| {
            record.headers.iter().fold(
                OwnedHeaders::new_with_capacity(record.headers.len()),
                |h, (key, value)| {
                    h.insert(Header {
                        key,
                        value: Some(value),
                    })
                },
            )
        });
        Original {
            partition: record.partition_id(),
            offset: record.offset,
            timestamp_ms: record.timestamp_ms,
            key: record.key.map(<[u8]>::to_vec),
            payload: record.payload.to_vec(),
            headers,
        }
    }

    fn record(&self) -> Record<'_> {
        Record {
            topic: &self.partition.topic,
            partition: self.partition.partition,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            key: self.key.as_deref(),
            payload: &self.payload,
            headers: self
                .headers
                .as_ref()
                .map_or(RecordHeaders::None, RecordHeaders::Owned),
        }
    }
}

struct Work {
    original: Original,
    lines: Vec<u8>,
}

/// What a log stage run did, for the caller's summary line.
#[derive(Debug, Default)]
pub struct LogSummary {
    pub consumed: AtomicU64,
    pub indexed: AtomicU64,
    /// Documents Elasticsearch already had (a re-delivery after a restart or rebalance).
    pub already_indexed: AtomicU64,
    pub dead_lettered: AtomicU64,
}

impl LogSummary {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl std::fmt::Display for LogSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "consumed {}, indexed {}, already indexed {}, dead-lettered {}",
            get(&self.consumed),
            get(&self.indexed),
            get(&self.already_indexed),
            get(&self.dead_lettered)
        )
    }
}

/// The log stage as the runtime sees it.
pub fn stage_spec(kafka: &KafkaSettings, settings: &LogSettings) -> StageSpec {
    StageSpec {
        name: "log",
        inputs: InputTopics::Names(vec![settings.input_topic.clone()]),
        group_id: settings.group_id.clone(),
        required_topics: vec![
            settings.input_topic.clone(),
            settings.dead_letter_topic.clone(),
        ],
        dead_letters: DeadLetterTopic::Topic(settings.dead_letter_topic.clone()),
        policy: OffsetPolicy::AckedPrefix,
        drain_timeout: settings.drain_timeout,
        tick: COMMIT_INTERVAL.min(settings.flush_interval),
        max_record_bytes: kafka.max_record_bytes(),
    }
}

/// Runs the log stage until `shutdown` is cancelled or a document would be lost.
pub async fn run(
    kafka: &KafkaSettings,
    settings: &LogSettings,
    elasticsearch: Elasticsearch,
    codec: Codec,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<Arc<LogSummary>, StageError> {
    // Records handed to the indexer and not yet acknowledged or dead-lettered.
    let handed = Arc::new(AtomicUsize::new(0));
    tracing::info!(
        input = settings.input_topic,
        index_pattern = settings.index_pattern.as_str(),
        dead_letter_topic = settings.dead_letter_topic,
        "logging to Elasticsearch"
    );
    crate::stage::run(
        kafka,
        stage_spec(kafka, settings),
        Arc::new(WriterHooks {
            handed: handed.clone(),
        }),
        readiness,
        shutdown,
        |io| LogStage::start(settings.clone(), elasticsearch, codec, io, handed),
    )
    .await
    .map(|stage| stage.summary)
}

/// The log stage's state between records: the batches (filling, waiting, being indexed) and
/// the codec. Memory stays bounded by batch_max_bytes × (bulk_concurrency + 3).
pub struct LogStage {
    settings: LogSettings,
    codec: Codec,
    batcher: Batcher<Work>,
    consumed: metrics::Counter,
    summary: Arc<LogSummary>,
}

impl LogStage {
    fn start(
        settings: LogSettings,
        elasticsearch: Elasticsearch,
        codec: Codec,
        io: StageIo,
        handed: Arc<AtomicUsize>,
    ) -> LogStage {
        let summary = Arc::new(LogSummary::default());
        let indexer = Arc::new(Indexer {
            elasticsearch,
            io,
            retry_initial: settings.retry_initial_backoff,
            retry_max: settings.retry_max_backoff,
            metrics: IndexerMetrics::default(),
            summary: summary.clone(),
        });
        let limits = BatchLimits {
            max_items: settings.batch_size,
            max_bytes: settings.batch_max_bytes,
            max_age: settings.flush_interval,
        };
        // Up to `bulk_concurrency` bulk requests at once: Elasticsearch indexes one batch while
        // the next travels. Acknowledgements may then come out of order; the tracker only
        // commits the contiguous acknowledged prefix.
        let batcher = Batcher::start(
            limits,
            "elasticsearch",
            settings.bulk_concurrency,
            handed,
            move |items: Vec<Work>, give_up: CancellationToken| {
                let indexer = indexer.clone();
                async move { indexer.index_batch(items, give_up).await }
            },
        );
        LogStage {
            // One input topic: the counter handle is resolved once, not per record.
            consumed: metrics::counter!("eventpipe_log_consumed_total", "topic" => settings.input_topic.clone()),
            settings,
            codec,
            batcher,
            summary,
        }
    }
}

impl Stage for LogStage {
    async fn handle(&mut self, record: &Record<'_>) -> Result<Handled, StageError> {
        // Both buffers full: the runtime keeps this record and retries it, pausing the
        // partitions if that lasts (Elasticsearch slow or down).
        self.batcher.check_room()?;
        let decoded = available("log", self.codec.decode(record.topic, record.payload).await)?;
        self.consumed.increment(1);
        LogSummary::add(&self.summary.consumed);
        match prepare(record, &decoded, &self.settings) {
            Ok(lines) => {
                let bytes = lines.len();
                self.batcher.push(
                    Work {
                        original: Original::of(record),
                        lines,
                    },
                    bytes,
                )?;
                Ok(Handled::Pending)
            }
            Err((kind, reason)) => {
                metrics::counter!("eventpipe_log_dead_lettered_total", "kind" => kind).increment(1);
                Ok(Handled::DeadLetter(DeadLetter::new(kind, reason)))
            }
        }
    }

    async fn tick(&mut self) -> Result<(), StageError> {
        self.batcher.tick()
    }

    /// Hands over what is buffered, lets the indexer finish within the deadline, then stops it.
    async fn finish(&mut self, deadline: Instant) -> Result<(), StageError> {
        self.batcher.finish(deadline).await
    }
}

/// The bulk lines of one consumed record, or why it is not a loggable envelope (the stage's
/// mapping; the benchmark builds its baseline file with it).
pub fn document_lines(
    record: &Record<'_>,
    json: &[u8],
    settings: &LogSettings,
) -> Result<Vec<u8>, DecodeError> {
    let meta = RecordMeta {
        topic: record.topic,
        partition: record.partition,
        offset: record.offset,
        timestamp_ms: record.timestamp_ms,
        key: record.key,
        level_header: record.header("level"),
    };
    map_record(
        json,
        &meta,
        &settings.index_pattern,
        settings.max_envelope_bytes,
    )
    .map(|mapped| bulk_lines(&mapped.index, &mapped.id, &mapped.document))
}

/// Maps one consumed record to bulk lines, or says why it cannot be logged.
fn prepare(
    record: &Record<'_>,
    decoded: &Result<Cow<'_, [u8]>, RecordError>,
    settings: &LogSettings,
) -> Result<Vec<u8>, (&'static str, String)> {
    match decoded {
        Ok(json) => document_lines(record, json, settings).map_err(|e| (e.kind(), e.to_string())),
        Err(error) => Err((error.kind, error.reason.clone())),
    }
}

/// Indexes batches, retrying until each record is acknowledged or dead-lettered.
struct Indexer {
    elasticsearch: Elasticsearch,
    io: StageIo,
    retry_initial: Duration,
    retry_max: Duration,
    metrics: IndexerMetrics,
    summary: Arc<LogSummary>,
}

/// Metric handles resolved once, off the per-document path.
struct IndexerMetrics {
    indexed: metrics::Counter,
    already_indexed: metrics::Counter,
    retries: metrics::Counter,
    bulk_seconds: metrics::Histogram,
    end_to_end_seconds: metrics::Histogram,
}

impl Default for IndexerMetrics {
    fn default() -> Self {
        IndexerMetrics {
            indexed: metrics::counter!("eventpipe_log_indexed_total"),
            already_indexed: metrics::counter!("eventpipe_log_already_indexed_total"),
            retries: metrics::counter!("eventpipe_log_bulk_retries_total"),
            bulk_seconds: metrics::histogram!("eventpipe_log_bulk_seconds"),
            end_to_end_seconds: metrics::histogram!("eventpipe_log_end_to_end_seconds"),
        }
    }
}

impl Indexer {
    fn ack(&self, original: &Original) {
        self.io.acks.ack(&original.partition, original.offset);
        if let Some(produced_ms) = original.timestamp_ms {
            let now_ms = chrono::Utc::now().timestamp_millis();
            self.metrics
                .end_to_end_seconds
                .record((now_ms - produced_ms).max(0) as f64 / 1000.0);
        }
    }

    /// Indexes one batch, retrying until each record is acknowledged or dead-lettered, or the
    /// stage gives up (cancelled at the drain deadline: the rest stays unacknowledged).
    async fn index_batch(
        &self,
        items: Vec<Work>,
        give_up: CancellationToken,
    ) -> Result<(), StageError> {
        // Sleeps `delay`, or less if the stage gives up meanwhile.
        let pause = |delay: Duration| {
            let give_up = give_up.clone();
            async move {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = give_up.cancelled() => {}
                }
            }
        };
        let mut to_index: Vec<(Original, Vec<u8>)> = items
            .into_iter()
            .map(|work| (work.original, work.lines))
            .collect();
        let mut backoff = Backoff::new(self.retry_initial, self.retry_max);
        while !to_index.is_empty() && !give_up.is_cancelled() {
            let body: Vec<u8> = to_index
                .iter()
                .flat_map(|(_, lines)| lines.iter().copied())
                .collect();
            let started = std::time::Instant::now();
            let result = tokio::select! {
                result = self.elasticsearch.bulk(body, to_index.len()) => result,
                _ = give_up.cancelled() => break,
            };
            self.metrics
                .bulk_seconds
                .record(started.elapsed().as_secs_f64());
            match result {
                Ok(outcomes) => {
                    self.elasticsearch_up(true);
                    let sent = to_index.len();
                    let mut retry = Vec::new();
                    let mut retry_reason = String::new();
                    for ((original, lines), outcome) in to_index.into_iter().zip(outcomes) {
                        match outcome {
                            ItemOutcome::Indexed => {
                                self.ack(&original);
                                self.metrics.indexed.increment(1);
                                LogSummary::add(&self.summary.indexed);
                            }
                            ItemOutcome::AlreadyIndexed => {
                                self.ack(&original);
                                self.metrics.already_indexed.increment(1);
                                LogSummary::add(&self.summary.already_indexed);
                            }
                            ItemOutcome::Retry { reason } => {
                                retry_reason = reason;
                                retry.push((original, lines));
                            }
                            ItemOutcome::Rejected {
                                status,
                                error_type,
                                reason,
                            } => {
                                // Acknowledged by the runtime once the dead letter is in Kafka.
                                let dead_letter = DeadLetter {
                                    kind: REJECTED_KIND,
                                    reason,
                                    extra_headers: vec![
                                        (HEADER_ES_STATUS, status.to_string()),
                                        (HEADER_ES_ERROR_TYPE, error_type),
                                    ],
                                };
                                metrics::counter!("eventpipe_log_dead_lettered_total", "kind" => REJECTED_KIND).increment(1);
                                LogSummary::add(&self.summary.dead_lettered);
                                self.io
                                    .dead_letters
                                    .send(&original.record(), &dead_letter)
                                    .await;
                            }
                        }
                    }
                    if !retry.is_empty() {
                        if retry.len() < sent {
                            backoff.reset();
                        }
                        let delay = backoff.next_delay(rand::random());
                        tracing::warn!(
                            items = retry.len(),
                            reason = retry_reason,
                            delay_ms = delay.as_millis() as u64,
                            "Elasticsearch asked to retry some items"
                        );
                        self.metrics.retries.increment(retry.len() as u64);
                        pause(delay).await;
                    }
                    to_index = retry;
                }
                Err(BulkError::Retryable(reason)) => {
                    self.elasticsearch_up(false);
                    let delay = backoff.next_delay(rand::random());
                    tracing::warn!(
                        items = to_index.len(),
                        attempt = backoff.attempts(),
                        %reason,
                        delay_ms = delay.as_millis() as u64,
                        "bulk request failed; retrying (consumption pauses meanwhile)"
                    );
                    self.metrics.retries.increment(to_index.len() as u64);
                    pause(delay).await;
                }
                Err(BulkError::Fatal(reason)) => return Err(StageError::Fatal(reason)),
            }
        }
        Ok(())
    }

    fn elasticsearch_up(&self, up: bool) {
        self.io.readiness.set("elasticsearch", up);
        metrics::gauge!("eventpipe_log_elasticsearch_up").set(if up { 1.0 } else { 0.0 });
    }
}
