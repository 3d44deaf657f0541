//! Settings of `eventpipe materialise`: its flags (each falling back to its environment variable),
//! the file's `[materialise]` table and the resolved settings, one-line errors naming a setting.

use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use super::change::Rules;
use super::table::TableName;
use crate::config::Settings;
use crate::settings::{ConfigError, FileTable, Setting};

/// Flags of `eventpipe materialise`; the defaults materialise the product catalogue.
#[derive(Debug, Default, Clone, Args)]
pub struct MaterialiseArgs {
    /// The topic of changes, keyed by the row's key (default: product_changes).
    #[arg(long, env = "EVENTPIPE_MATERIALISE_TOPIC")]
    pub topic: Option<String>,
    /// The PostgreSQL table holding the latest state per key (default: products).
    #[arg(long, env = "EVENTPIPE_MATERIALISE_TABLE")]
    pub table: Option<String>,
    /// The top-level field holding each change's version (default: version).
    #[arg(long, env = "EVENTPIPE_MATERIALISE_VERSION_FIELD")]
    pub version_field: Option<String>,
    /// Fields that must be 0 or more when present, comma-separated (default: price_cents,stock).
    #[arg(
        long,
        env = "EVENTPIPE_MATERIALISE_NON_NEGATIVE",
        value_delimiter = ','
    )]
    pub non_negative: Option<Vec<String>>,
    /// Consumer group of the stage's instances (default: eventpipe-materialise-<table>).
    #[arg(long, env = "EVENTPIPE_MATERIALISE_GROUP_ID")]
    pub group_id: Option<String>,
    /// Changes per database transaction (default: 1000).
    #[arg(long, env = "EVENTPIPE_MATERIALISE_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Longest wait before a partial batch is written, in milliseconds (default: 50).
    #[arg(long, env = "EVENTPIPE_MATERIALISE_FLUSH_INTERVAL_MS")]
    pub flush_interval_ms: Option<u64>,
    /// Larger change records are dead-lettered, in bytes (default: 65536).
    #[arg(long, env = "EVENTPIPE_MATERIALISE_MAX_VALUE_BYTES")]
    pub max_value_bytes: Option<usize>,
    /// How long a revocation or a stop waits for changes being written, in seconds (default: 30).
    #[arg(long, env = "EVENTPIPE_MATERIALISE_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: Option<u64>,
}

/// The config file's `[materialise]` table.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileMaterialise {
    pub topic: Option<String>,
    pub table: Option<String>,
    pub version_field: Option<String>,
    pub non_negative: Option<Vec<String>>,
    pub group_id: Option<String>,
    pub batch_size: Option<usize>,
    pub flush_interval_ms: Option<u64>,
    pub max_value_bytes: Option<usize>,
    pub drain_timeout_secs: Option<u64>,
}

impl FileTable for FileMaterialise {
    const NAME: &'static str = "materialise";
}

/// Resolved, validated settings of the materialise stage.
#[derive(Debug, Clone)]
pub struct MaterialiseSettings {
    pub topic: String,
    pub table: TableName,
    pub rules: Rules,
    pub group_id: String,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub drain_timeout: Duration,
}

const TOPIC: Setting<String> = Setting::new(
    "materialise.topic",
    "EVENTPIPE_MATERIALISE_TOPIC",
    "--topic",
)
.default("product_changes")
.topic_name();
const TABLE: Setting<String> = Setting::new(
    "materialise.table",
    "EVENTPIPE_MATERIALISE_TABLE",
    "--table",
)
.default("products");
const VERSION_FIELD: Setting<String> = Setting::new(
    "materialise.version_field",
    "EVENTPIPE_MATERIALISE_VERSION_FIELD",
    "--version-field",
)
.default("version")
.check(field_name);
const NON_NEGATIVE: Setting<String> = Setting::new(
    "materialise.non_negative",
    "EVENTPIPE_MATERIALISE_NON_NEGATIVE",
    "--non-negative",
)
.check(field_name);
const GROUP_ID: Setting<String> = Setting::new(
    "materialise.group_id",
    "EVENTPIPE_MATERIALISE_GROUP_ID",
    "--group-id",
);
const BATCH_SIZE: Setting<usize> = Setting::new(
    "materialise.batch_size",
    "EVENTPIPE_MATERIALISE_BATCH_SIZE",
    "--batch-size",
)
.default(1000)
.between(1, 100_000);
const FLUSH_INTERVAL_MS: Setting<u64> = Setting::new(
    "materialise.flush_interval_ms",
    "EVENTPIPE_MATERIALISE_FLUSH_INTERVAL_MS",
    "--flush-interval-ms",
)
.default(50)
.between(1, 60_000);
const MAX_VALUE_BYTES: Setting<usize> = Setting::new(
    "materialise.max_value_bytes",
    "EVENTPIPE_MATERIALISE_MAX_VALUE_BYTES",
    "--max-value-bytes",
)
.default(64 * 1024)
.between(2, 1024 * 1024);
const DRAIN_TIMEOUT_SECS: Setting<u64> = Setting::new(
    "materialise.drain_timeout_secs",
    "EVENTPIPE_MATERIALISE_DRAIN_TIMEOUT_SECS",
    "--drain-timeout-secs",
)
.default(30)
.at_least(1);

/// The catalogue's fields that must never go below zero.
const DEFAULT_NON_NEGATIVE: [&str; 2] = ["price_cents", "stock"];

fn field_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.chars().any(char::is_control) {
        return Err("expected a field name".into());
    }
    Ok(())
}

impl MaterialiseSettings {
    pub fn load(args: &MaterialiseArgs, settings: &Settings) -> Result<Self, ConfigError> {
        Self::resolve(args, &settings.file.table()?)
    }

    pub fn resolve(args: &MaterialiseArgs, file: &FileMaterialise) -> Result<Self, ConfigError> {
        let table = TABLE.resolve_with(&args.table, &file.table, |name| TableName::parse(name))?;
        let non_negative = match crate::settings::layer(&args.non_negative, &file.non_negative) {
            Some(fields) => fields
                .into_iter()
                .filter(|f| !f.is_empty())
                .map(|field| NON_NEGATIVE.resolve(&Some(field), &None))
                .collect::<Result<Vec<_>, _>>()?,
            None => DEFAULT_NON_NEGATIVE.map(String::from).to_vec(),
        };
        let group_id = GROUP_ID.resolve_or(&args.group_id, &file.group_id, || {
            format!("eventpipe-materialise-{table}")
        })?;
        Ok(MaterialiseSettings {
            topic: TOPIC.resolve(&args.topic, &file.topic)?,
            rules: Rules {
                version_field: VERSION_FIELD.resolve(&args.version_field, &file.version_field)?,
                non_negative,
                max_value_bytes: MAX_VALUE_BYTES
                    .resolve(&args.max_value_bytes, &file.max_value_bytes)?,
            },
            table,
            group_id,
            batch_size: BATCH_SIZE.resolve(&args.batch_size, &file.batch_size)?,
            flush_interval: Duration::from_millis(
                FLUSH_INTERVAL_MS.resolve(&args.flush_interval_ms, &file.flush_interval_ms)?,
            ),
            drain_timeout: Duration::from_secs(
                DRAIN_TIMEOUT_SECS.resolve(&args.drain_timeout_secs, &file.drain_timeout_secs)?,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_materialise_the_catalogue() {
        let settings =
            MaterialiseSettings::resolve(&MaterialiseArgs::default(), &FileMaterialise::default())
                .unwrap();
        assert_eq!(settings.topic, "product_changes");
        assert_eq!(settings.table.as_str(), "products");
        assert_eq!(settings.group_id, "eventpipe-materialise-products");
        assert_eq!(settings.rules.version_field, "version");
        assert_eq!(settings.rules.non_negative, ["price_cents", "stock"]);
    }

    #[test]
    fn a_bad_table_is_one_line_naming_the_setting() {
        let args = MaterialiseArgs {
            table: Some("Robert'); DROP TABLE x".into()),
            ..MaterialiseArgs::default()
        };
        let error = MaterialiseSettings::resolve(&args, &FileMaterialise::default()).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("--table") && text.contains("EVENTPIPE_MATERIALISE_TABLE"),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");
    }
}
