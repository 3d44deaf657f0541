//! `eventpipe aggregate`: windows events by name, function and interval and sinks the
//! aggregates to Kafka or PostgreSQL. Not built yet (issue #5); this is its entry point.

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::telemetry::Readiness;

/// Flags of `eventpipe aggregate` beyond the global STORAGE_TYPE, KAFKA_TOPIC and
/// AGGREGATION_INTERVAL; each falls back to its environment variable, then the file.
#[derive(Debug, Default, Clone, Args)]
pub struct AggregateArgs {}

pub async fn run(
    _settings: &Settings,
    _args: AggregateArgs,
    _readiness: Readiness,
    _shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::bail!("the aggregate stage is not built yet (issue #5)")
}
