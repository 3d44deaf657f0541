//! The log stage's I/O: consume, map, batch (count, bytes, time), bulk-index with retries, and
//! dead-letter what cannot be indexed; offsets are stored only for acknowledged records.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::bulk::{bulk_lines, Backoff, BulkError, ItemOutcome};
use super::document::{map_record, RecordMeta};
use super::elasticsearch::Elasticsearch;
use super::settings::LogSettings;
use crate::codec::{until_available, Codec, RecordError};
use crate::config::KafkaSettings;
use crate::dead_letter::{self, SourcePosition};
use crate::envelope::DecodeError;
use crate::kafka::ack::{AckTracker, PartitionId};
use crate::kafka::client::{client_config, create_client, require_topics, wait_for_broker};
use crate::kafka::offsets::{self, StoredOffsets, TrackingContext};
use crate::kafka::{ClientKind, KafkaError, PipelineContext};
use crate::telemetry::Readiness;

/// How often newly acknowledged offsets are committed (asynchronously).
const STORE_INTERVAL: Duration = Duration::from_millis(100);
/// How long the indexer may be behind before the partitions are paused (fetching stops).
const PAUSE_AFTER: Duration = Duration::from_secs(1);
/// The stage name in dead-letter headers.
const STAGE: &str = "log";
/// Dead-letter kind of documents Elasticsearch refused for good.
const REJECTED_KIND: &str = "elasticsearch_rejected";
pub const HEADER_ES_STATUS: &str = "eventpipe.elasticsearch.status";
pub const HEADER_ES_ERROR_TYPE: &str = "eventpipe.elasticsearch.error.type";

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("stopped to avoid losing data: {0}")]
    Fatal(String),
}

/// A consumed record, kept until its document is acknowledged, to dead-letter it untouched.
struct Original {
    partition: PartitionId,
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Option<OwnedHeaders>,
}

enum Work {
    Index {
        original: Original,
        lines: Vec<u8>,
    },
    DeadLetter {
        original: Original,
        kind: &'static str,
        reason: String,
        extra_headers: Vec<(&'static str, String)>,
    },
}

impl Work {
    fn original(&self) -> &Original {
        match self {
            Work::Index { original, .. } | Work::DeadLetter { original, .. } => original,
        }
    }
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
        self.bytes += match &work {
            Work::Index { lines, .. } => lines.len(),
            Work::DeadLetter { original, .. } => original.payload.as_ref().map_or(0, Vec::len),
        };
        self.opened.get_or_insert_with(Instant::now);
        self.items.push(work);
    }

    fn is_full(&self, settings: &LogSettings) -> bool {
        self.items.len() >= settings.batch_size || self.bytes >= settings.batch_max_bytes
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
) -> Result<(), LogError> {
    let log = PipelineContext::default();
    let tracker: Arc<Mutex<AckTracker>> = Arc::default();
    // Set once the final commit is done: revocation while closing must not wait again.
    let closing = Arc::new(AtomicBool::new(false));
    // Records handed to the indexer and not yet acknowledged or dead-lettered.
    let handed = Arc::new(AtomicUsize::new(0));
    let producer: FutureProducer<PipelineContext> =
        create_client(kafka, ClientKind::Producer, log.clone())?;
    let metadata = wait_for_broker(producer.client(), &log, kafka)?;
    require_topics(
        &metadata,
        &[&settings.input_topic, &settings.dead_letter_topic],
        kafka,
    )?;

    let mut consumer_config = client_config(kafka, ClientKind::Consumer);
    consumer_config.set("group.id", &settings.group_id);
    if consumer_config.get("statistics.interval.ms").is_none() {
        consumer_config.set("statistics.interval.ms", "5000");
    }
    // On revocation, the indexer (another task) gets up to the drain deadline to finish what
    // it holds, so its offsets are committed and the next owner does not index it again.
    // Records still buffered in this loop cannot progress (the loop is blocked in the callback):
    // they are not waited for; the next owner re-reads them and Elasticsearch answers 409.
    // Blocking is what librdkafka expects of a rebalance callback.
    let drain: offsets::Drain = {
        let (handed, closing) = (handed.clone(), closing.clone());
        let timeout = settings.drain_timeout;
        Box::new(move |_| {
            let deadline = std::time::Instant::now() + timeout;
            while !closing.load(Ordering::Relaxed)
                && handed.load(Ordering::Relaxed) > 0
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let consumer: StreamConsumer<TrackingContext> = consumer_config
        .create_with_context(TrackingContext::new(
            log.clone(),
            tracker.clone(),
            "eventpipe_log_consumer_lag_messages",
            drain,
        ))
        .map_err(KafkaError::Client)?;
    consumer
        .subscribe(&[&settings.input_topic])
        .map_err(KafkaError::Client)?;
    readiness.set("kafka", true);
    tracing::info!(
        input = settings.input_topic,
        group_id = settings.group_id,
        index_pattern = settings.index_pattern.as_str(),
        dead_letter_topic = settings.dead_letter_topic,
        "logging to Elasticsearch"
    );

    // The channel holds one batch: with `bulk_concurrency` being indexed, one waiting here and
    // one filling, memory stays bounded by batch_max_bytes × (bulk_concurrency + 3).
    let (batches, receiver) = mpsc::channel::<Batch>(1);
    let give_up = CancellationToken::new();
    let failed = CancellationToken::new();
    let fatal: Arc<Mutex<Option<String>>> = Arc::default();
    let indexer = Indexer {
        elasticsearch,
        producer,
        tracker: tracker.clone(),
        handed: handed.clone(),
        dead_letter_topic: settings.dead_letter_topic.clone(),
        retry_initial: settings.retry_initial_backoff,
        retry_max: settings.retry_max_backoff,
        readiness: readiness.clone(),
        give_up: give_up.clone(),
        metrics: IndexerMetrics::default(),
    };
    let concurrency = settings.bulk_concurrency;
    let indexer_task = {
        let failed = failed.clone();
        let fatal = fatal.clone();
        tokio::spawn(async move {
            if let Err(error) = indexer.run(receiver, concurrency).await {
                tracing::error!(%error, "indexer stopped");
                *fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
                failed.cancel();
            }
        })
    };

    let mut stored = StoredOffsets::new();
    let mut topic_ids = offsets::TopicIds::default();
    // One input topic: the counter handle is resolved once, not per record.
    let consumed =
        metrics::counter!("eventpipe_log_consumed_total", "topic" => settings.input_topic.clone());
    let mut store_tick = tokio::time::interval(STORE_INTERVAL);
    store_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Batch::default();
    // A closed batch the indexer has no room for yet.
    let mut waiting: Option<Batch> = None;
    let mut backpressure = Backpressure::default();

    let outcome = loop {
        let due = batch
            .opened
            .map(|opened| opened + settings.flush_interval)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        // Both buffers full: take no more records; librdkafka's bounded queue holds the rest.
        // If that lasts, the partitions are paused so polling (rebalances, the poll interval)
        // goes on without fetching.
        let full = waiting.is_some() && batch.is_full(settings);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            _ = failed.cancelled() => {
                let reason = fatal.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default();
                break Err(LogError::Fatal(reason));
            }
            permit = batches.reserve(), if waiting.is_some() => {
                let Ok(permit) = permit else { break Err(LogError::Fatal("indexer stopped".into())) };
                let handing = waiting.take().unwrap_or_default();
                handed.fetch_add(handing.items.len(), Ordering::Relaxed);
                permit.send(handing);
                backpressure.resume(&consumer);
                if batch.is_full(settings) {
                    waiting = Some(std::mem::take(&mut batch));
                }
            }
            _ = tokio::time::sleep_until(due), if waiting.is_none() && !batch.items.is_empty() => {
                waiting = Some(std::mem::take(&mut batch));
            }
            _ = store_tick.tick() => {
                offsets::commit_committable(&consumer, &tracker, &mut stored);
                if full {
                    backpressure.stalled(&consumer);
                }
                metrics::gauge!("eventpipe_log_in_flight_records")
                    .set(offsets::lock(&tracker).in_flight() as f64);
            }
            received = consumer.recv(), if !full || backpressure.is_paused() => {
                let message = match received {
                    Ok(message) => message,
                    Err(error) => {
                        tracing::warn!(%error, "consumer error");
                        continue;
                    }
                };
                let original = message.payload().unwrap_or_default();
                let Some(decoded) =
                    until_available("log", &shutdown, || codec.decode(message.topic(), original)).await
                else {
                    break Ok(());
                };
                consumed.increment(1);
                let work = prepare(&message, &decoded, topic_ids.get(message.topic()), settings);
                let original = work.original();
                offsets::lock(&tracker).track(&original.partition, original.offset, 1);
                batch.push(work);
                if batch.is_full(settings) && waiting.is_none() {
                    waiting = Some(std::mem::take(&mut batch));
                }
            }
        }
    };

    // Graceful stop: hand over what is buffered, let the indexer finish within the deadline,
    // then store and commit what was acknowledged. Unacknowledged records are re-delivered.
    let deadline = Instant::now() + settings.drain_timeout;
    for pending in [waiting.take(), Some(batch)].into_iter().flatten() {
        if pending.items.is_empty() || outcome.is_err() {
            continue;
        }
        handed.fetch_add(pending.items.len(), Ordering::Relaxed);
        if tokio::time::timeout_at(deadline, batches.send(pending))
            .await
            .is_err()
        {
            break;
        }
    }
    drop(batches);
    let stopper = {
        let give_up = give_up.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            give_up.cancel();
        })
    };
    let _ = indexer_task.await;
    stopper.abort();
    offsets::commit_committable(&consumer, &tracker, &mut stored);
    offsets::commit_stored(&consumer, &stored);
    closing.store(true, Ordering::Relaxed);
    readiness.set("kafka", false);
    tracing::info!(
        unacknowledged = offsets::lock(&tracker).in_flight(),
        "log stage stopped"
    );
    outcome
}

/// Pauses the whole assignment when the indexer has been behind for a while (Elasticsearch
/// slow or down), and resumes it when the indexer takes the waiting batch.
#[derive(Default)]
struct Backpressure {
    stalled_since: Option<Instant>,
    /// The paused assignment: after a rebalance, the new assignment is paused too.
    paused: Option<Vec<(String, i32)>>,
}

impl Backpressure {
    fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    /// Called while both buffers are full; pauses once that has lasted `PAUSE_AFTER`.
    fn stalled<C: ConsumerContext>(&mut self, consumer: &StreamConsumer<C>) {
        let since = *self.stalled_since.get_or_insert_with(Instant::now);
        if since.elapsed() < PAUSE_AFTER {
            return;
        }
        let Ok(assignment) = consumer.assignment() else {
            return;
        };
        let partitions: Vec<(String, i32)> = assignment
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        if self.paused.as_ref() == Some(&partitions) {
            return;
        }
        match consumer.pause(&assignment) {
            Ok(()) => {
                if self.paused.is_none() {
                    tracing::warn!(
                        partitions = %offsets::describe(&assignment),
                        "Elasticsearch is behind; pausing consumption"
                    );
                    metrics::gauge!("eventpipe_log_paused").set(1.0);
                }
                self.paused = Some(partitions);
            }
            Err(error) => tracing::warn!(%error, "pausing partitions"),
        }
    }

    fn resume<C: ConsumerContext>(&mut self, consumer: &StreamConsumer<C>) {
        self.stalled_since = None;
        if self.paused.take().is_none() {
            return;
        }
        if let Ok(assignment) = consumer.assignment() {
            if let Err(error) = consumer.resume(&assignment) {
                tracing::warn!(%error, "resuming partitions");
            }
        }
        metrics::gauge!("eventpipe_log_paused").set(0.0);
        tracing::info!("Elasticsearch caught up; consuming again");
    }
}

/// The bulk lines of one consumed record, or why it is not a loggable envelope (the stage's
/// mapping; the benchmark builds its baseline file with it).
pub(super) fn document_lines(
    message: &BorrowedMessage<'_>,
    topic: &str,
    settings: &LogSettings,
) -> Result<Vec<u8>, DecodeError> {
    lines_of(
        message.payload().unwrap_or_default(),
        message,
        topic,
        settings,
    )
}

/// `document_lines` of a value already decoded to JSON (from Avro, say).
fn lines_of(
    json: &[u8],
    message: &BorrowedMessage<'_>,
    topic: &str,
    settings: &LogSettings,
) -> Result<Vec<u8>, DecodeError> {
    let level_header = message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case("level"))
            .and_then(|h| h.value)
    });
    let meta = RecordMeta {
        topic,
        partition: message.partition(),
        offset: message.offset(),
        timestamp_ms: message.timestamp().to_millis(),
        key: message.key(),
        level_header,
    };
    map_record(
        json,
        &meta,
        &settings.index_pattern,
        settings.max_envelope_bytes,
    )
    .map(|mapped| bulk_lines(&mapped.index, &mapped.id, &mapped.document))
}

/// Maps one consumed record to bulk lines, or to a dead letter saying why it cannot be logged.
fn prepare(
    message: &BorrowedMessage<'_>,
    decoded: &Result<Cow<'_, [u8]>, RecordError>,
    topic: Arc<str>,
    settings: &LogSettings,
) -> Work {
    let lines = match decoded {
        Ok(json) => {
            lines_of(json, message, &topic, settings).map_err(|e| (e.kind(), e.to_string()))
        }
        Err(error) => Err((error.kind, error.reason.clone())),
    };
    let original = Original {
        partition: PartitionId {
            topic,
            partition: message.partition(),
        },
        offset: message.offset(),
        timestamp_ms: message.timestamp().to_millis(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec),
        headers: message.headers().map(|h| h.detach()),
    };
    match lines {
        Ok(lines) => Work::Index { original, lines },
        Err((kind, reason)) => Work::DeadLetter {
            original,
            kind,
            reason,
            extra_headers: Vec::new(),
        },
    }
}

/// Indexes batches one at a time, retrying until each record is acknowledged or dead-lettered.
struct Indexer {
    elasticsearch: Elasticsearch,
    producer: FutureProducer<PipelineContext>,
    tracker: Arc<Mutex<AckTracker>>,
    handed: Arc<AtomicUsize>,
    dead_letter_topic: String,
    retry_initial: Duration,
    retry_max: Duration,
    readiness: Readiness,
    /// Cancelled at the drain deadline: stop retrying and leave the rest unacknowledged.
    give_up: CancellationToken,
    metrics: IndexerMetrics,
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
    async fn run(self, batches: mpsc::Receiver<Batch>, concurrency: usize) -> Result<(), LogError> {
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
        offsets::lock(&self.tracker).ack(&original.partition, original.offset);
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

    async fn index(&self, batch: Batch) -> Result<(), LogError> {
        let handed = batch.items.len();
        let result = self.index_batch(batch).await;
        self.handed.fetch_sub(handed, Ordering::Relaxed);
        result
    }

    async fn index_batch(&self, batch: Batch) -> Result<(), LogError> {
        let mut to_index = Vec::new();
        let mut dead = Vec::new();
        for work in batch.items {
            match work {
                Work::Index { original, lines } => to_index.push((original, lines)),
                dead_letter @ Work::DeadLetter { .. } => dead.push(dead_letter),
            }
        }
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
                            }
                            ItemOutcome::AlreadyIndexed => {
                                self.ack(&original);
                                self.metrics.already_indexed.increment(1);
                            }
                            ItemOutcome::Retry { reason } => {
                                retry_reason = reason;
                                retry.push((original, lines));
                            }
                            ItemOutcome::Rejected {
                                status,
                                error_type,
                                reason,
                            } => dead.push(Work::DeadLetter {
                                original,
                                kind: REJECTED_KIND,
                                reason,
                                extra_headers: vec![
                                    (HEADER_ES_STATUS, status.to_string()),
                                    (HEADER_ES_ERROR_TYPE, error_type),
                                ],
                            }),
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
                Err(BulkError::Fatal(reason)) => return Err(LogError::Fatal(reason)),
            }
        }
        self.dead_letter(dead).await;
        Ok(())
    }

    fn elasticsearch_up(&self, up: bool) {
        self.readiness.set("elasticsearch", up);
        metrics::gauge!("eventpipe_log_elasticsearch_up").set(if up { 1.0 } else { 0.0 });
    }

    /// Writes dead letters and acknowledges each once Kafka has it; failures are retried until
    /// delivered or the stage gives up (then the records are re-delivered after a restart).
    async fn dead_letter(&self, mut pending: Vec<Work>) {
        let mut backoff = Backoff::new(self.retry_initial, self.retry_max);
        while !pending.is_empty() && !self.give_up.is_cancelled() {
            let mut sends = Vec::with_capacity(pending.len());
            for work in &pending {
                let Work::DeadLetter {
                    original,
                    kind,
                    reason,
                    extra_headers,
                } = work
                else {
                    continue;
                };
                let source = SourcePosition {
                    topic: &original.partition.topic,
                    partition: original.partition.partition,
                    offset: original.offset,
                    timestamp_ms: original.timestamp_ms,
                };
                let headers = dead_letter::headers(STAGE, kind, reason, &source)
                    .into_iter()
                    .chain(extra_headers.iter().cloned())
                    .fold(original.headers.clone().unwrap_or_default(), |h, (k, v)| {
                        h.insert(Header {
                            key: k,
                            value: Some(v.as_bytes()),
                        })
                    });
                let mut record: FutureRecord<'_, [u8], [u8]> =
                    FutureRecord::to(&self.dead_letter_topic).headers(headers);
                if let Some(payload) = &original.payload {
                    record = record.payload(payload.as_slice());
                }
                if let Some(key) = &original.key {
                    record = record.key(key.as_slice());
                }
                sends.push(self.producer.send(record, Duration::from_secs(30)));
            }
            let results = futures::future::join_all(sends).await;
            let mut failed = Vec::new();
            for (work, result) in pending.into_iter().zip(results) {
                let Work::DeadLetter { original, kind, .. } = &work else {
                    continue;
                };
                match result {
                    Ok(_) => {
                        tracing::debug!(kind, topic = %original.partition.topic, partition = original.partition.partition, offset = original.offset, "dead-lettered");
                        metrics::counter!("eventpipe_log_dead_lettered_total", "kind" => *kind)
                            .increment(1);
                        self.ack(original);
                    }
                    Err((error, _)) => {
                        tracing::warn!(%error, topic = self.dead_letter_topic, "dead-letter write failed; retrying");
                        failed.push(work);
                    }
                }
            }
            if !failed.is_empty() {
                self.pause(backoff.next_delay(rand::random())).await;
            }
            pending = failed;
        }
    }
}
