//! The store's logic on the stage runtime: each record becomes a row (raw with the reason when it
//! is not a readable value), rows are batched and written by one writer task in order, and a
//! record is acknowledged only when the transaction holding its row has committed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::row::{json_problem, Body, StoredRow, HEADER_REPLAY_ID};
use super::schema;
use super::settings::StoreSettings;
use super::writer::Writer;
use crate::codec::{decode_with_writer_schema, CodecError, Registry};
use crate::config::{CodecSettings, Format, KafkaSettings};
use crate::postgres::WriteRetry;
use crate::stage::batch::{BatchLimits, Batcher, WriterHooks};
use crate::stage::{
    DeadLetterTopic, Handled, OffsetPolicy, PartitionId, Record, Stage, StageError, StageIo,
    StageSpec,
};
use crate::telemetry::Readiness;

/// How often acknowledged offsets are committed (the runtime's tick).
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// How often partitions ahead are created and expired ones dropped.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(600);

/// What a store run did, for the caller's summary line.
#[derive(Debug, Default)]
pub struct StoreSummary {
    pub consumed: AtomicU64,
    pub stored: AtomicU64,
    /// Rows already in the store (a re-delivery after a restart or rebalance).
    pub duplicates: AtomicU64,
    /// Rows stored raw: not a readable value, or refused by PostgreSQL as one.
    pub raw: AtomicU64,
    /// Records a replay re-published: not stored again.
    pub replays_skipped: AtomicU64,
}

impl std::fmt::Display for StoreSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "consumed {}, stored {}, already stored {}, stored raw {}, replays skipped {}",
            get(&self.consumed),
            get(&self.stored),
            get(&self.duplicates),
            get(&self.raw),
            get(&self.replays_skipped)
        )
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// The store as the runtime sees it. It never dead-letters (bad input is stored raw), so it
/// needs no dead-letter topic.
pub fn stage_spec(kafka: &KafkaSettings, settings: &StoreSettings) -> StageSpec {
    StageSpec {
        name: "store",
        inputs: settings.inputs.clone(),
        group_id: settings.group_id.clone(),
        required_topics: match &settings.inputs {
            crate::stage::InputTopics::Names(names) => names.clone(),
            crate::stage::InputTopics::Pattern(_) => Vec::new(),
        },
        dead_letters: DeadLetterTopic::Suffix(crate::topics::DEAD_LETTER_SUFFIX.into()),
        policy: OffsetPolicy::AckedPrefix,
        drain_timeout: settings.drain_timeout,
        tick: COMMIT_INTERVAL.min(settings.flush_interval),
        max_record_bytes: kafka.max_record_bytes(),
    }
}

/// Runs the store until `shutdown`, or until PostgreSQL refuses a row in every form.
pub async fn run(
    kafka: &KafkaSettings,
    settings: &StoreSettings,
    pool: PgPool,
    codecs: Arc<CodecSettings>,
    registry: Option<Arc<Registry>>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<Arc<StoreSummary>, StageError> {
    super::metrics::describe();
    let summary = Arc::new(StoreSummary::default());
    let maintenance = tokio::spawn(maintain(
        pool.clone(),
        settings.retention,
        shutdown.child_token(),
    ));
    let limits = BatchLimits {
        max_items: settings.batch_size,
        max_bytes: settings.batch_max_bytes,
        max_age: settings.flush_interval,
    };
    let handed = Arc::new(AtomicUsize::new(0));
    let hooks = Arc::new(WriterHooks {
        handed: handed.clone(),
    });
    let result = crate::stage::run(
        kafka,
        stage_spec(kafka, settings),
        hooks,
        readiness,
        shutdown,
        |io| {
            let writer = BatchWriter {
                writer: Arc::new(tokio::sync::Mutex::new(Writer::new(pool))),
                io,
                summary: summary.clone(),
                retry_initial: settings.retry_initial_backoff,
                retry_max: settings.retry_max_backoff,
            };
            // One write at a time: rows commit in the order the runtime handed them over, so `seq`
            // follows each partition's (and the merged inputs') order.
            let batcher = Batcher::start(
                limits,
                "postgres",
                1,
                handed.clone(),
                move |rows, give_up| {
                    let writer = writer.clone();
                    async move { writer.write(rows, give_up).await }
                },
            );
            StoreStage {
                batcher,
                codecs,
                registry,
                max_json_bytes: settings.max_json_bytes,
                summary: summary.clone(),
            }
        },
    )
    .await;
    maintenance.abort();
    result.map(|_| summary)
}

/// Partitions for today and the days ahead, and retention, at start and every interval.
async fn maintain(pool: PgPool, retention: Option<Duration>, stop: CancellationToken) {
    loop {
        let now = chrono::Utc::now();
        let mut writer = Writer::new(pool.clone());
        if let Err(error) = writer.create_partitions(schema::days_ahead(now)).await {
            tracing::warn!(%error, "could not create the partitions ahead (retried later; rows create theirs)");
        }
        if let Some(retention) = retention {
            match schema::existing_partitions(&pool).await {
                Ok(existing) => {
                    let expired = schema::expired(&existing, now, retention);
                    match schema::drop_partitions(&pool, &expired).await {
                        Ok(dropped) if dropped > 0 => {
                            metrics::counter!("eventpipe_store_partitions_dropped_total")
                                .increment(dropped as u64)
                        }
                        Ok(_) => {}
                        Err(error) => {
                            tracing::warn!(%error, "retention: dropping partitions failed")
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "retention: listing partitions failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(MAINTENANCE_INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// The writer task's side: writes a batch until it is stored, then acknowledges its records.
#[derive(Clone)]
struct BatchWriter {
    writer: Arc<tokio::sync::Mutex<Writer>>,
    io: StageIo,
    summary: Arc<StoreSummary>,
    retry_initial: Duration,
    retry_max: Duration,
}

impl BatchWriter {
    async fn write(
        &self,
        rows: Vec<StoredRow>,
        give_up: CancellationToken,
    ) -> Result<(), StageError> {
        let mut writer = self.writer.lock().await;
        let mut retry = WriteRetry::new(
            "store",
            &self.io.readiness,
            self.retry_initial,
            self.retry_max,
        );
        let written = loop {
            if give_up.is_cancelled() {
                // Left unacknowledged: read again after the restart, stored once.
                return Ok(());
            }
            match retry.attempt(writer.write(&rows)).await {
                Ok(written) => break written,
                Err(error) => retry.wait(&error, rows.len(), &give_up).await,
            }
        };
        metrics::counter!("eventpipe_store_batches_total").increment(1);
        metrics::counter!("eventpipe_store_rows_total", "outcome" => "stored")
            .increment(written.inserted);
        metrics::counter!("eventpipe_store_rows_total", "outcome" => "already_stored")
            .increment(written.duplicates);
        metrics::counter!("eventpipe_store_refused_rows_total").increment(written.made_raw);
        add(&self.summary.stored, written.inserted);
        add(&self.summary.duplicates, written.duplicates);
        add(&self.summary.raw, written.made_raw);
        let now_ms = chrono::Utc::now().timestamp_millis();
        let latency = metrics::histogram!("eventpipe_store_end_to_end_seconds");
        for row in &rows {
            let partition = PartitionId {
                topic: row.topic.clone(),
                partition: row.partition,
            };
            self.io.acks.ack(&partition, row.offset);
            if row.kafka_time_ms > 0 {
                latency.record((now_ms - row.kafka_time_ms).max(0) as f64 / 1000.0);
            }
        }
        Ok(())
    }
}

/// An Avro topic's value as the store keeps it: decoded with its writer schema (its frame kept
/// for replay), or raw with the reason when it cannot be read; `Err` only when the registry is
/// unreachable (the record is fine, wait).
pub async fn avro_body(
    registry: &Registry,
    payload: &[u8],
    max_json_bytes: usize,
) -> Result<Body, String> {
    Ok(match decode_with_writer_schema(registry, payload).await {
        Ok((schema_id, json)) => {
            let json = json.to_string().into_bytes();
            match json_problem(&json, max_json_bytes) {
                None => Body::Avro {
                    json,
                    frame: payload.to_vec(),
                    schema_id,
                },
                Some(reason) => Body::Raw {
                    bytes: payload.to_vec(),
                    reason,
                },
            }
        }
        Err(CodecError::Record(error)) => Body::Raw {
            bytes: payload.to_vec(),
            reason: format!("{}: {}", error.kind, error.reason),
        },
        Err(CodecError::Unavailable(reason)) => return Err(reason),
    })
}

/// The store's state between records: the batches, and how to read Avro topics.
pub struct StoreStage {
    batcher: Batcher<StoredRow>,
    codecs: Arc<CodecSettings>,
    registry: Option<Arc<Registry>>,
    max_json_bytes: usize,
    summary: Arc<StoreSummary>,
}

impl StoreStage {
    /// An Avro topic's record: decoded with its writer schema, its frame kept for replay; raw
    /// with the reason when it cannot be read.
    async fn avro_row(&self, record: &Record<'_>) -> Result<StoredRow, StageError> {
        let Some(registry) = &self.registry else {
            return Err(StageError::Unavailable {
                dependency: "schema_registry",
                reason: "no schema registry configured for an Avro topic".into(),
            });
        };
        let body = match avro_body(registry, record.payload, self.max_json_bytes).await {
            Ok(body) => body,
            Err(reason) => {
                metrics::counter!("eventpipe_schema_registry_errors_total", "stage" => "store")
                    .increment(1);
                return Err(StageError::Unavailable {
                    dependency: "schema_registry",
                    reason,
                });
            }
        };
        Ok(StoredRow::new(record, body))
    }
}

impl Stage for StoreStage {
    async fn handle(&mut self, record: &Record<'_>) -> Result<Handled, StageError> {
        self.batcher.check_room()?;
        if record.header(HEADER_REPLAY_ID).is_some() {
            add(&self.summary.replays_skipped, 1);
            metrics::counter!("eventpipe_store_replays_skipped_total").increment(1);
            return Ok(Handled::Outputs(Vec::new()));
        }
        let row = match self.codecs.input_format(record.topic) {
            Format::Json => StoredRow::from_json_topic(record, self.max_json_bytes),
            Format::Avro => self.avro_row(record).await?,
        };
        add(&self.summary.consumed, 1);
        if let Body::Raw { .. } = row.body {
            add(&self.summary.raw, 1);
            metrics::counter!("eventpipe_store_raw_rows_total").increment(1);
        }
        let bytes = row.approximate_bytes();
        self.batcher.push(row, bytes)?;
        Ok(Handled::Pending)
    }

    async fn tick(&mut self) -> Result<(), StageError> {
        self.batcher.tick()
    }

    async fn finish(&mut self, deadline: tokio::time::Instant) -> Result<(), StageError> {
        self.batcher.finish(deadline).await
    }
}
