//! `eventpipe store`: every record of the stored topics kept in PostgreSQL (`events`), once per
//! Kafka coordinate, committed before its offset; history queries and replay read it back.

pub mod history;
pub mod metrics;
pub mod pipeline;
pub mod replay;
pub mod row;
pub mod schema;
pub mod settings;
pub mod verify;
pub mod writer;

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::{redact_url, Settings};
use crate::log::bulk::Backoff;
use crate::telemetry::Readiness;
pub use settings::{FileStore, StoreArgs, StoreSettings};

/// Connections the store's writer and maintenance use.
const POOL_CONNECTIONS: u32 = 4;

/// Connects to PostgreSQL (waiting while it is unreachable) and applies the store's schema;
/// `None` if shutdown came first.
pub async fn connect_waiting(
    url: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<sqlx::PgPool>> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match schema::connect(url, POOL_CONNECTIONS).await {
            Ok(pool) => return Ok(Some(pool)),
            Err(schema::SchemaError::Postgres(error)) if retryable(&error) => {
                let delay = backoff.next_delay(rand::random());
                tracing::warn!(%error, url = redact_url(url), delay_ms = delay.as_millis() as u64, "waiting for PostgreSQL");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Ok(None),
                }
            }
            Err(error) => {
                return Err(error).with_context(|| format!("PostgreSQL at {}", redact_url(url)))
            }
        }
    }
}

/// Failures worth waiting out: the server is not there (yet), or is starting or stopping.
fn retryable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("57") || code.starts_with("08")),
        _ => false,
    }
}

/// Runs the store stage until `shutdown`; prints its summary line.
pub async fn run(
    settings: &Settings,
    store: StoreSettings,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    crate::codec::describe_metrics("store");
    readiness.register("kafka");
    readiness.register("postgres");
    let Some(pool) = connect_waiting(settings.postgres_url.as_str(), &shutdown).await? else {
        return Ok(());
    };
    readiness.set("postgres", true);
    let (codecs, registry) = crate::codec::shared(settings)?;
    tracing::info!(inputs = ?store.inputs, retention = ?store.retention, "storing events");
    let summary = pipeline::run(
        &settings.kafka,
        &store,
        pool,
        codecs,
        registry,
        readiness,
        shutdown,
    )
    .await
    .context("store stage")?;
    println!("store stopped: {summary}");
    Ok(())
}
