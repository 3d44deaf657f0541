//! `eventpipe materialise`: the latest state per key of a topic, kept in a PostgreSQL table and
//! moved only by newer versions, so re-deliveries and out-of-order changes never move a row back.
//!
//! A stage of the runtime (`crate::stage`): each record is checked (`change`), bad ones are
//! dead-lettered with the reason, good ones batched; the writer task upserts a batch in one
//! transaction (`table`) and only then acknowledges its records, so offsets follow the commit.

pub mod change;
pub mod settings;
pub mod table;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use self::change::{Change, Rules};
use self::table::TableName;
use crate::config::{redact_url, KafkaSettings, Settings};
use crate::postgres::WriteRetry;
use crate::stage::batch::{BatchLimits, Batcher, WriterHooks};
use crate::stage::{
    DeadLetter, DeadLetterTopic, Handled, InputTopics, OffsetPolicy, PartitionId, Record, Stage,
    StageError, StageIo, StageSpec,
};
use crate::telemetry::Readiness;
pub use settings::{FileMaterialise, MaterialiseArgs, MaterialiseSettings};

/// Batches are small (a change is a few hundred bytes): the count and age limits decide.
const BATCH_MAX_BYTES: usize = 8 * 1024 * 1024;
const RETRY_INITIAL: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Runs the stage until `shutdown`; prints its summary line.
pub async fn run(
    settings: &Settings,
    materialise: MaterialiseSettings,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    describe_metrics();
    readiness.register("kafka");
    readiness.register("postgres");
    let url = settings.postgres_url.as_str();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .with_context(|| format!("PostgreSQL at {}", redact_url(url)))?;
    table::ensure(&pool, &materialise.table)
        .await
        .with_context(|| format!("creating the table {}", materialise.table))?;
    readiness.set("postgres", true);
    tracing::info!(topic = %materialise.topic, table = %materialise.table, "materialising the latest state per key");
    run_stage(&settings.kafka, &materialise, pool, readiness, shutdown)
        .await
        .context("materialise stage")?;
    println!("materialise stopped");
    Ok(())
}

/// The stage as the runtime sees it: one input, its `.dlq`, the acknowledged prefix.
pub fn stage_spec(kafka: &KafkaSettings, settings: &MaterialiseSettings) -> StageSpec {
    let dead_letters = DeadLetterTopic::Suffix(crate::topics::DEAD_LETTER_SUFFIX.into());
    StageSpec {
        name: "materialise",
        inputs: InputTopics::Names(vec![settings.topic.clone()]),
        group_id: settings.group_id.clone(),
        required_topics: vec![
            settings.topic.clone(),
            dead_letters.for_input(&settings.topic),
        ],
        dead_letters,
        policy: OffsetPolicy::AckedPrefix,
        drain_timeout: settings.drain_timeout,
        tick: settings.flush_interval.min(Duration::from_millis(100)),
        max_record_bytes: kafka.max_record_bytes(),
    }
}

/// Runs the stage on the runtime until `shutdown` (or until the writer stops for good).
pub async fn run_stage(
    kafka: &KafkaSettings,
    settings: &MaterialiseSettings,
    pool: PgPool,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), StageError> {
    let limits = BatchLimits {
        max_items: settings.batch_size,
        max_bytes: BATCH_MAX_BYTES,
        max_age: settings.flush_interval,
    };
    let handed = Arc::new(AtomicUsize::new(0));
    let hooks = Arc::new(WriterHooks {
        handed: handed.clone(),
    });
    crate::stage::run(
        kafka,
        stage_spec(kafka, settings),
        hooks,
        readiness,
        shutdown,
        |io| {
            let writer = Arc::new(BatchWriter {
                pool,
                table: settings.table.clone(),
                io,
            });
            // One write at a time: a key's changes reach the table in the order they were read.
            let batcher = Batcher::start(limits, "postgres", 1, handed, move |items, give_up| {
                let writer = writer.clone();
                async move { writer.write(items, give_up).await }
            });
            MaterialiseStage {
                batcher,
                rules: settings.rules.clone(),
            }
        },
    )
    .await
    .map(|_| ())
}

/// A change waiting in a batch, with the input it acknowledges once written.
struct Pending {
    change: Change,
    partition: PartitionId,
    offset: i64,
}

/// The writer task's side: upserts a batch until PostgreSQL has it, then acknowledges it.
struct BatchWriter {
    pool: PgPool,
    table: TableName,
    io: StageIo,
}

impl BatchWriter {
    async fn write(
        &self,
        items: Vec<Pending>,
        give_up: CancellationToken,
    ) -> Result<(), StageError> {
        let rounds = change::rounds(items.iter().map(|p| &p.change));
        let mut retry =
            WriteRetry::new("materialise", &self.io.readiness, RETRY_INITIAL, RETRY_MAX);
        let applied = loop {
            if give_up.is_cancelled() {
                // Left unacknowledged: read again after the restart; the upsert is idempotent.
                return Ok(());
            }
            match retry
                .attempt(table::upsert(&self.pool, &self.table, &rounds))
                .await
            {
                Ok(applied) => break applied,
                Err(error) => retry.wait(&error, items.len(), &give_up).await,
            }
        };
        let stale = items.len() as u64 - applied;
        metrics::counter!("eventpipe_materialise_changes_total", "outcome" => "applied")
            .increment(applied);
        metrics::counter!("eventpipe_materialise_changes_total", "outcome" => "stale")
            .increment(stale);
        for item in &items {
            self.io.acks.ack(&item.partition, item.offset);
        }
        Ok(())
    }
}

/// The stage's state between records: the batches and the rules a change must satisfy.
struct MaterialiseStage {
    batcher: Batcher<Pending>,
    rules: Rules,
}

impl Stage for MaterialiseStage {
    async fn handle(&mut self, record: &Record<'_>) -> Result<Handled, StageError> {
        self.batcher.check_room()?;
        match change::parse(record.key, record.payload, &self.rules) {
            Err(invalid) => {
                metrics::counter!("eventpipe_materialise_dead_lettered_total", "kind" => invalid.kind())
                    .increment(1);
                Ok(Handled::DeadLetter(DeadLetter::new(
                    invalid.kind(),
                    invalid.to_string(),
                )))
            }
            Ok(change) => {
                let bytes = change.key.len() + change.state.len();
                let pending = Pending {
                    change,
                    partition: record.partition_id(),
                    offset: record.offset,
                };
                self.batcher.push(pending, bytes)?;
                Ok(Handled::Pending)
            }
        }
    }

    async fn tick(&mut self) -> Result<(), StageError> {
        self.batcher.tick()
    }

    async fn finish(&mut self, deadline: tokio::time::Instant) -> Result<(), StageError> {
        self.batcher.finish(deadline).await
    }
}

/// Help text for every metric of the stage, and the series that only failures move.
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "eventpipe_materialise_changes_total",
        "Valid changes by outcome: applied (the row moved or was created) or stale (a version not newer than the row's: a re-delivery or an out-of-order change)."
    );
    describe_counter!(
        "eventpipe_materialise_dead_lettered_total",
        "Change records dead-lettered, by kind: bad_key, malformed_json, missing_version, bad_version, invalid_value (a negative price or stock)."
    );
    describe_counter!(
        "eventpipe_materialise_retries_total",
        "Batch writes retried after PostgreSQL failed."
    );
    describe_histogram!(
        "eventpipe_materialise_batch_seconds",
        Unit::Seconds,
        "Duration of one batch upsert, failed attempts included."
    );
    describe_gauge!(
        "eventpipe_materialise_postgres_up",
        "1 when the last write to PostgreSQL succeeded."
    );
    for outcome in ["applied", "stale"] {
        metrics::counter!("eventpipe_materialise_changes_total", "outcome" => outcome).absolute(0);
    }
    metrics::counter!("eventpipe_materialise_retries_total").absolute(0);
}
