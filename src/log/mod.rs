//! `eventpipe log`: ships info_in to Elasticsearch as documents people search in Kibana.
//! Not built yet (issue #4); this module holds its settings and entry point.

use clap::Args;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::telemetry::Readiness;

/// Flags of `eventpipe log`; each falls back to its environment variable, then the file's [log].
#[derive(Debug, Default, Clone, Args)]
pub struct LogArgs {}

/// The config file's `[log]` table.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileLog {}

pub async fn run(
    _settings: &Settings,
    _args: LogArgs,
    _readiness: Readiness,
    _shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::bail!("the log stage is not built yet (issue #4)")
}
