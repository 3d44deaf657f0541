//! The log stage's logic on the stage runtime: map each record to bulk lines, batch them (count,
//! bytes, time), and bulk-index with retries in a task of its own; the runtime acknowledges,
//! commits and dead-letters. Records are acknowledged when Elasticsearch has them.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::bulk::{bulk_lines, Backoff, BulkError, ItemOutcome};
use super::document::{map_record, RecordMeta};
use super::elasticsearch::Elasticsearch;
use super::settings::LogSettings;
use crate::codec::{available, Codec, RecordError};
use crate::config::KafkaSettings;
use crate::envelope::DecodeError;
use crate::stage::{
    DeadLetter, DeadLetterTopic, Handled, InputTopics, OffsetPolicy, PartitionHooks, PartitionId,
    Record, RecordHeaders, Stage, StageError, StageIo, StageSpec,
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

/// Records bound for one bulk request; full by count or bytes, due by age.
#[derive(Default)]
struct Batch {
    items: Vec<Work>,
    bytes: usize,
    opened: Option<Instant>,
}

impl Batch {
    fn push(&mut self, work: Work) {
        self.bytes += work.lines.len();
        self.opened.get_or_insert_with(Instant::now);
        self.items.push(work);
    }

    fn is_full(&self, settings: &LogSettings) -> bool {
        self.items.len() >= settings.batch_size || self.bytes >= settings.batch_max_bytes
    }
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

/// A revocation waits only for what the indexer holds: records still in a batch cannot
/// progress while the runtime is in the rebalance callback; the next owner re-reads them and
/// Elasticsearch answers 409 (the ids are deterministic).
pub struct LogHooks {
    handed: Arc<AtomicUsize>,
}

impl PartitionHooks for LogHooks {
    fn outstanding(&self, _: &[PartitionId]) -> Option<usize> {
        Some(self.handed.load(Ordering::Relaxed))
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
        Arc::new(LogHooks {
            handed: handed.clone(),
        }),
        readiness,
        shutdown,
        |io| LogStage::start(settings.clone(), elasticsearch, codec, io, handed),
    )
    .await
    .map(|stage| stage.summary)
}

/// The log stage's state between records: the filling batch, a closed one waiting for room,
/// and the indexer task.
pub struct LogStage {
    settings: LogSettings,
    codec: Codec,
    batch: Batch,
    /// A closed batch the indexer has no room for yet.
    waiting: Option<Batch>,
    /// One batch of room: with `bulk_concurrency` being indexed, one waiting here and one
    /// filling, memory stays bounded by batch_max_bytes × (bulk_concurrency + 3).
    batches: Option<mpsc::Sender<Batch>>,
    indexer: Option<JoinHandle<()>>,
    handed: Arc<AtomicUsize>,
    /// Cancelled at the drain deadline: the indexer stops retrying.
    give_up: CancellationToken,
    /// Set when the indexer stopped for good.
    fatal: Arc<Mutex<Option<String>>>,
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
        let (batches, receiver) = mpsc::channel::<Batch>(1);
        let summary = Arc::new(LogSummary::default());
        let give_up = CancellationToken::new();
        let fatal: Arc<Mutex<Option<String>>> = Arc::default();
        let indexer = Indexer {
            elasticsearch,
            io,
            handed: handed.clone(),
            retry_initial: settings.retry_initial_backoff,
            retry_max: settings.retry_max_backoff,
            give_up: give_up.clone(),
            metrics: IndexerMetrics::default(),
            summary: summary.clone(),
        };
        let concurrency = settings.bulk_concurrency;
        let indexer = {
            let fatal = fatal.clone();
            tokio::spawn(async move {
                if let Err(error) = indexer.run(receiver, concurrency).await {
                    tracing::error!(%error, "indexer stopped");
                    *fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
                }
            })
        };
        LogStage {
            // One input topic: the counter handle is resolved once, not per record.
            consumed: metrics::counter!("eventpipe_log_consumed_total", "topic" => settings.input_topic.clone()),
            settings,
            codec,
            batch: Batch::default(),
            waiting: None,
            batches: Some(batches),
            indexer: Some(indexer),
            handed,
            give_up,
            fatal,
            summary,
        }
    }

    fn check_indexer(&self) -> Result<(), StageError> {
        match &*self.fatal.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(reason) => Err(StageError::Fatal(reason.clone())),
            None => Ok(()),
        }
    }

    /// Hands the waiting batch to the indexer if it has room; true when nothing is left waiting.
    fn hand_over(&mut self) -> Result<bool, StageError> {
        let Some(waiting) = self.waiting.take() else {
            return Ok(true);
        };
        let Some(batches) = &self.batches else {
            return Err(StageError::Fatal("indexer stopped".into()));
        };
        let count = waiting.items.len();
        // Counted before the handover: the indexer may finish it before `try_send` returns.
        self.handed.fetch_add(count, Ordering::Relaxed);
        match batches.try_send(waiting) {
            Ok(()) => {
                if self.batch.is_full(&self.settings) {
                    self.waiting = Some(std::mem::take(&mut self.batch));
                }
                Ok(self.waiting.is_none())
            }
            Err(mpsc::error::TrySendError::Full(waiting)) => {
                self.handed.fetch_sub(count, Ordering::Relaxed);
                self.waiting = Some(waiting);
                Ok(false)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.handed.fetch_sub(count, Ordering::Relaxed);
                self.check_indexer()?;
                Err(StageError::Fatal("indexer stopped".into()))
            }
        }
    }
}

impl Stage for LogStage {
    async fn handle(&mut self, record: &Record<'_>) -> Result<Handled, StageError> {
        self.check_indexer()?;
        self.hand_over()?;
        // Both buffers full: the runtime keeps this record and retries it, pausing the
        // partitions if that lasts (Elasticsearch slow or down).
        if self.waiting.is_some() && self.batch.is_full(&self.settings) {
            return Err(StageError::Unavailable {
                dependency: "elasticsearch",
                reason: "the indexer is behind".into(),
            });
        }
        let decoded = available("log", self.codec.decode(record.topic, record.payload).await)?;
        self.consumed.increment(1);
        LogSummary::add(&self.summary.consumed);
        match prepare(record, &decoded, &self.settings) {
            Ok(lines) => {
                self.batch.push(Work {
                    original: Original::of(record),
                    lines,
                });
                if self.batch.is_full(&self.settings) && self.waiting.is_none() {
                    self.waiting = Some(std::mem::take(&mut self.batch));
                    self.hand_over()?;
                }
                Ok(Handled::Pending)
            }
            Err((kind, reason)) => {
                metrics::counter!("eventpipe_log_dead_lettered_total", "kind" => kind).increment(1);
                Ok(Handled::DeadLetter(DeadLetter::new(kind, reason)))
            }
        }
    }

    async fn tick(&mut self) -> Result<(), StageError> {
        self.check_indexer()?;
        let due = self
            .batch
            .opened
            .is_some_and(|opened| opened.elapsed() >= self.settings.flush_interval);
        if due && self.waiting.is_none() {
            self.waiting = Some(std::mem::take(&mut self.batch));
        }
        self.hand_over()?;
        Ok(())
    }

    /// Hands over what is buffered, lets the indexer finish within the deadline, then stops it.
    async fn finish(&mut self, deadline: Instant) -> Result<(), StageError> {
        self.check_indexer()?;
        if let Some(batches) = self.batches.take() {
            for pending in [self.waiting.take(), Some(std::mem::take(&mut self.batch))]
                .into_iter()
                .flatten()
            {
                if pending.items.is_empty() {
                    continue;
                }
                let count = pending.items.len();
                self.handed.fetch_add(count, Ordering::Relaxed);
                if tokio::time::timeout_at(deadline, batches.send(pending))
                    .await
                    .is_err()
                {
                    self.handed.fetch_sub(count, Ordering::Relaxed);
                    break;
                }
            }
        }
        let stopper = {
            let give_up = self.give_up.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline).await;
                give_up.cancel();
            })
        };
        if let Some(indexer) = self.indexer.take() {
            let _ = indexer.await;
        }
        stopper.abort();
        self.check_indexer()
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

/// Indexes batches one at a time, retrying until each record is acknowledged or dead-lettered.
struct Indexer {
    elasticsearch: Elasticsearch,
    io: StageIo,
    handed: Arc<AtomicUsize>,
    retry_initial: Duration,
    retry_max: Duration,
    /// Cancelled at the drain deadline: stop retrying and leave the rest unacknowledged.
    give_up: CancellationToken,
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
    /// Up to `concurrency` bulk requests at once: Elasticsearch indexes one batch while the
    /// next travels. Acknowledgements may then come out of order; the tracker only commits
    /// the contiguous acknowledged prefix.
    async fn run(
        self,
        batches: mpsc::Receiver<Batch>,
        concurrency: usize,
    ) -> Result<(), StageError> {
        use futures::stream::{StreamExt, TryStreamExt};
        let batches = futures::stream::unfold(batches, |mut batches| async move {
            batches.recv().await.map(|batch| (batch, batches))
        });
        batches
            .map(|batch| self.index(batch))
            .buffer_unordered(concurrency.max(1))
            .try_for_each(|()| async { Ok(()) })
            .await
    }

    fn ack(&self, original: &Original) {
        self.io.acks.ack(&original.partition, original.offset);
        if let Some(produced_ms) = original.timestamp_ms {
            let now_ms = chrono::Utc::now().timestamp_millis();
            self.metrics
                .end_to_end_seconds
                .record((now_ms - produced_ms).max(0) as f64 / 1000.0);
        }
    }

    /// Sleeps `delay`, or less if the stage gives up meanwhile.
    async fn pause(&self, delay: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.give_up.cancelled() => {}
        }
    }

    async fn index(&self, batch: Batch) -> Result<(), StageError> {
        let handed = batch.items.len();
        let result = self.index_batch(batch).await;
        self.handed.fetch_sub(handed, Ordering::Relaxed);
        result
    }

    async fn index_batch(&self, batch: Batch) -> Result<(), StageError> {
        let mut to_index: Vec<(Original, Vec<u8>)> = batch
            .items
            .into_iter()
            .map(|work| (work.original, work.lines))
            .collect();
        let mut backoff = Backoff::new(self.retry_initial, self.retry_max);
        while !to_index.is_empty() && !self.give_up.is_cancelled() {
            let body: Vec<u8> = to_index
                .iter()
                .flat_map(|(_, lines)| lines.iter().copied())
                .collect();
            let started = std::time::Instant::now();
            let result = tokio::select! {
                result = self.elasticsearch.bulk(body, to_index.len()) => result,
                _ = self.give_up.cancelled() => break,
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
                        self.pause(delay).await;
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
                    self.pause(delay).await;
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
