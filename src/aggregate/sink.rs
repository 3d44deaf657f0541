//! Where aggregates go: a Kafka topic keyed by name (idempotent producer) or a PostgreSQL table
//! upserted on (name, function, window_start). Both absorb re-emission: the latest value wins.

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::producer::BaseRecord;
use serde_json::json;

use super::window::Emission;
use crate::codec::{Codec, CodecError};
use crate::kafka::delivery::{BoundedSender, CountedProducer};
use crate::kafka::KafkaError;

/// Rows per INSERT: large enough to amortize the round trip, small enough for one statement.
const POSTGRES_BATCH_ROWS: usize = 5000;
/// Records awaiting a delivery report at once when writing to Kafka.
const KAFKA_MAX_IN_FLIGHT: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("writing aggregates to Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("writing aggregates to PostgreSQL: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("migrating the PostgreSQL schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The registry is unavailable (retried like any sink failure) or an aggregate does not fit
    /// the schema (a defect: retried, loudly, rather than dropped).
    #[error("encoding aggregates: {0}")]
    Codec(#[from] CodecError),
}

/// The configured output.
pub enum Sink {
    Kafka {
        producer: CountedProducer,
        topic: String,
        /// JSON or Avro (schemas/aggregate.avsc), per the topic's format.
        codec: Codec,
    },
    Postgres {
        pool: sqlx::PgPool,
    },
}

/// Connects to PostgreSQL and applies the embedded migrations (creates `events_aggregated`).
pub async fn connect_postgres(url: &str) -> Result<sqlx::PgPool, SinkError> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(std::time::Duration::from_secs(15))
        .connect(url)
        .await?;
    // sqlx serializes concurrent migrations with an advisory lock: instances may start together.
    // The store keeps its migrations apart (migrations/store) under the same bookkeeping table.
    let mut migrator = sqlx::migrate!("migrations/aggregate");
    migrator.set_ignore_missing(true);
    migrator.run(&pool).await?;
    Ok(pool)
}

fn rfc3339_ms(ms: i64) -> String {
    utc(ms).to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn utc(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// The output record as JSON (the Kafka sink's value).
pub fn record_json(emission: &Emission, emitted_at: DateTime<Utc>) -> serde_json::Value {
    json!({
        "name": emission.name,
        "function": emission.function.name(),
        "window_start": rfc3339_ms(emission.window_start_ms),
        "window_end": rfc3339_ms(emission.window_end_ms),
        "value": emission.value,
        "count": emission.count,
        "emitted_at": emitted_at.to_rfc3339_opts(SecondsFormat::Millis, true),
    })
}

impl Sink {
    /// The dependency's name, for logs and the runtime's pause.
    pub fn name(&self) -> &'static str {
        match self {
            Sink::Kafka { .. } => "kafka_sink",
            Sink::Postgres { .. } => "postgres",
        }
    }

    /// Writes every emission durably (delivery reports or a committed statement), or fails.
    pub async fn write(&self, emissions: &[Emission]) -> Result<(), SinkError> {
        if emissions.is_empty() {
            return Ok(());
        }
        let emitted_at = Utc::now();
        match self {
            Sink::Kafka {
                producer,
                topic,
                codec,
            } => {
                let mut sender = BoundedSender::new(producer, KAFKA_MAX_IN_FLIGHT);
                for emission in emissions {
                    let json = serde_json::to_vec(&record_json(emission, emitted_at))
                        .expect("a json! value always serializes");
                    let value = codec.encode(topic, json).await?;
                    sender
                        .send(
                            BaseRecord::to(topic)
                                .key(emission.name.as_bytes())
                                .payload(value.as_slice()),
                        )
                        .await?;
                }
                sender.finish().await?;
                Ok(())
            }
            Sink::Postgres { pool } => {
                // One statement must not touch a key twice; keep the latest emission per key.
                let mut latest: HashMap<(&str, &str, i64), &Emission> = HashMap::new();
                for e in emissions {
                    latest.insert((&e.name, e.function.name(), e.window_start_ms), e);
                }
                let rows: Vec<&Emission> = latest.into_values().collect();
                let mut transaction = pool.begin().await?;
                for chunk in rows.chunks(POSTGRES_BATCH_ROWS) {
                    upsert(&mut transaction, chunk, emitted_at).await?;
                }
                transaction.commit().await?;
                Ok(())
            }
        }
    }
}

async fn upsert(
    transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    rows: &[&Emission],
    emitted_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let names: Vec<&str> = rows.iter().map(|e| e.name.as_str()).collect();
    let functions: Vec<&str> = rows.iter().map(|e| e.function.name()).collect();
    let starts: Vec<DateTime<Utc>> = rows.iter().map(|e| utc(e.window_start_ms)).collect();
    let ends: Vec<DateTime<Utc>> = rows.iter().map(|e| utc(e.window_end_ms)).collect();
    let values: Vec<f64> = rows.iter().map(|e| e.value).collect();
    let counts: Vec<i64> = rows.iter().map(|e| e.count as i64).collect();
    sqlx::query(
        "INSERT INTO events_aggregated
             (name, function, window_start, window_end, value, count, emitted_at)
         SELECT name, function, window_start, window_end, value, count, $7
         FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[],
                     $5::float8[], $6::int8[])
              AS t(name, function, window_start, window_end, value, count)
         ON CONFLICT (name, function, window_start) DO UPDATE SET
             window_end = EXCLUDED.window_end, value = EXCLUDED.value,
             count = EXCLUDED.count, emitted_at = EXCLUDED.emitted_at",
    )
    .bind(names)
    .bind(functions)
    .bind(starts)
    .bind(ends)
    .bind(values)
    .bind(counts)
    .bind(emitted_at)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}
