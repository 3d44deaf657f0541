//! `eventpipe log`: ships info_in to Elasticsearch as the documents people search in Kibana,
//! at least once with idempotent ids (so effectively once), with dead letters and backpressure.

pub mod bulk;
pub mod document;
pub mod elasticsearch;
pub mod metrics;
pub mod pipeline;
pub mod settings;
pub mod template;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::codec::{Codec, SchemaName};
use crate::config::Settings;
use crate::telemetry::Readiness;
use bulk::Backoff;
use elasticsearch::{Elasticsearch, ElasticsearchError};
pub use pipeline::document_lines;
pub use settings::{FileLog, LogArgs, LogSettings};
use template::{index_template, DataMapping, TemplateOptions};

/// Installs the index template (waiting for Elasticsearch), then runs the consume → bulk loop
/// until `shutdown`.
pub async fn run(
    settings: &Settings,
    log: LogSettings,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    metrics::describe();
    crate::codec::describe_metrics("log");
    readiness.register("kafka");
    readiness.register("elasticsearch");
    let client = Elasticsearch::new(&settings.elasticsearch_url, &log)?;
    let installed = install_template(&client, &log, &shutdown).await?;
    if !installed {
        return Ok(());
    }
    readiness.set("elasticsearch", true);
    ::metrics::gauge!("eventpipe_log_elasticsearch_up").set(1.0);
    let codec = Codec::from_settings(settings, SchemaName::Event)?;
    let summary = pipeline::run(&settings.kafka, &log, client, codec, readiness, shutdown)
        .await
        .context("log stage")?;
    println!("log stopped: {summary}");
    Ok(())
}

/// Puts the index template, retrying while Elasticsearch is unreachable; false if shutdown
/// came first. Without an explicit `data_mapping`, a server lacking `flattened` (OpenSearch)
/// gets `flat_object`, and failing that a non-indexed `data`.
pub async fn install_template(
    client: &Elasticsearch,
    log: &LogSettings,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let candidates = match log.data_mapping {
        Some(chosen) => vec![chosen],
        None => vec![
            DataMapping::Flattened,
            DataMapping::FlatObject,
            DataMapping::Disabled,
        ],
    };
    let mut backoff = Backoff::new(log.retry_initial_backoff, log.retry_max_backoff);
    let mut candidate = 0;
    loop {
        let data = candidates[candidate];
        let template = index_template(&TemplateOptions {
            index_wildcard: log.index_pattern.wildcard(),
            shards: log.shards,
            replicas: log.replicas,
            data,
            priority: log.template_priority,
        });
        match client
            .put_index_template(&log.template_name, &template)
            .await
        {
            Ok(()) => {
                tracing::info!(template = log.template_name, pattern = %log.index_pattern.wildcard(), ?data, "index template installed");
                return Ok(true);
            }
            Err(error) if error.is_retryable() => {
                let delay = backoff.next_delay(rand::random());
                tracing::warn!(%error, delay_ms = delay.as_millis() as u64, "waiting for Elasticsearch to install the index template");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Ok(false),
                }
            }
            Err(ElasticsearchError::Refused { body, .. })
                if candidate + 1 < candidates.len()
                    && body.contains("mapper_parsing_exception") =>
            {
                tracing::warn!(?data, reason = %body, "data mapping not supported here; trying the next");
                candidate += 1;
            }
            Err(error) => return Err(error).context("installing the index template"),
        }
    }
}
