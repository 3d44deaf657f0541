//! `eventpipe aggregate`: windows events by name, function and event-time interval and sinks the
//! aggregates to Kafka or PostgreSQL, exactly per window despite crashes, rebalances and late data.
//!
//! Layers: `event` (decode) → `function` (exact accumulators) → `window` (pure engine, time passed
//! in) → `pipeline` (Kafka I/O, checkpoints) → `sink` (Kafka topic or PostgreSQL upsert).

pub mod event;
pub mod function;
pub mod metrics;
pub mod pipeline;
pub mod settings;
pub mod sink;
pub mod window;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::kafka::PipelineContext;
use crate::telemetry::Readiness;
pub use settings::{AggregateArgs, AggregateSettings, FileAggregate, StorageType};

/// Connects the sink (Kafka producer or PostgreSQL), then aggregates until `shutdown`.
pub async fn run(
    settings: &Settings,
    aggregate: AggregateSettings,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut config = aggregate.pipeline;
    let (formats, registry) = crate::codec::shared(settings)?;
    config.codecs = pipeline::AggregateCodecs::new(formats.clone(), registry.clone());
    let sink = match aggregate.storage_type {
        StorageType::Kafka => sink::Sink::Kafka {
            codec: crate::codec::Codec::new(formats, registry, crate::codec::SchemaName::Aggregate),
            producer: crate::kafka::delivery::CountedProducer::create(
                &settings.kafka,
                PipelineContext::default(),
            )?,
            topic: aggregate.output_topic,
        },
        StorageType::Postgres => {
            readiness.register("postgres");
            let pool = sink::connect_postgres(settings.postgres_url.as_str())
                .await
                .with_context(|| {
                    format!(
                        "connecting to PostgreSQL at {} (POSTGRES_CONNECTION_STRING)",
                        crate::config::redact_url(settings.postgres_url.as_str())
                    )
                })?;
            readiness.set("postgres", true);
            sink::Sink::Postgres { pool }
        }
    };
    let summary = pipeline::run(&settings.kafka, &config, sink, readiness, shutdown).await?;
    println!(
        "aggregate stopped: aggregated {}, failed {}, emitted {} window aggregates",
        summary.aggregated, summary.failed, summary.emitted
    );
    Ok(())
}
