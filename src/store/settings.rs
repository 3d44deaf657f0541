//! Settings of `eventpipe store`: its flags (each falling back to its environment variable), the
//! file's `[store]` table and the resolved `StoreSettings`, with one-line errors naming a setting.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use crate::config::Settings;
use crate::settings::{layer, ConfigError, FileTable, Setting};
use crate::stage::InputTopics;

/// Flags of `eventpipe store`; each falls back to its environment variable, then the file.
#[derive(Debug, Default, Clone, Args)]
pub struct StoreArgs {
    /// Topics to store, comma-separated (default: those topics/topics.toml marks `stored`).
    #[arg(long, env = "EVENTPIPE_STORE_TOPICS", value_delimiter = ',')]
    pub topics: Option<Vec<String>>,
    /// Store every topic matching this regex instead (e.g. `^.*_in$`).
    #[arg(long, env = "EVENTPIPE_STORE_INPUT_PATTERN")]
    pub input_pattern: Option<String>,
    /// Topic definitions whose `stored = true` topics are stored by default.
    #[arg(long, env = "EVENTPIPE_TOPICS_FILE")]
    pub topics_file: Option<PathBuf>,
    /// Consumer group of the store's instances (default: eventpipe-store).
    #[arg(long, env = "EVENTPIPE_STORE_GROUP_ID")]
    pub group_id: Option<String>,
    /// Rows per database transaction (default: 5000).
    #[arg(long, env = "EVENTPIPE_STORE_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Bytes per database transaction (default: 8388608).
    #[arg(long, env = "EVENTPIPE_STORE_BATCH_MAX_BYTES")]
    pub batch_max_bytes: Option<usize>,
    /// Longest wait before a partial batch is written, in milliseconds (default: 100).
    #[arg(long, env = "EVENTPIPE_STORE_FLUSH_INTERVAL_MS")]
    pub flush_interval_ms: Option<u64>,
    /// Keep this long, by Kafka time, then drop whole days: `30d`, `12h`, `90m` or seconds
    /// (default: forever).
    #[arg(long, env = "EVENTPIPE_STORE_RETENTION")]
    pub retention: Option<String>,
    /// Values larger than this are stored raw instead of as jsonb (default: 1048576).
    #[arg(long, env = "EVENTPIPE_STORE_MAX_JSON_BYTES")]
    pub max_json_bytes: Option<usize>,
    /// First retry delay when PostgreSQL fails, in milliseconds; doubles up to
    /// --retry-max-backoff-ms (default: 100).
    #[arg(long, env = "EVENTPIPE_STORE_RETRY_INITIAL_BACKOFF_MS")]
    pub retry_initial_backoff_ms: Option<u64>,
    /// Longest retry delay in milliseconds (default: 5000).
    #[arg(long, env = "EVENTPIPE_STORE_RETRY_MAX_BACKOFF_MS")]
    pub retry_max_backoff_ms: Option<u64>,
    /// How long a revocation or a stop waits for rows being written, in seconds (default: 30).
    #[arg(long, env = "EVENTPIPE_STORE_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: Option<u64>,
}

/// The config file's `[store]` table.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileStore {
    pub topics: Option<Vec<String>>,
    pub input_pattern: Option<String>,
    pub topics_file: Option<PathBuf>,
    pub group_id: Option<String>,
    pub batch_size: Option<usize>,
    pub batch_max_bytes: Option<usize>,
    pub flush_interval_ms: Option<u64>,
    pub retention: Option<String>,
    pub max_json_bytes: Option<usize>,
    pub retry_initial_backoff_ms: Option<u64>,
    pub retry_max_backoff_ms: Option<u64>,
    pub drain_timeout_secs: Option<u64>,
}

impl FileTable for FileStore {
    const NAME: &'static str = "store";
}

/// Resolved, validated settings of the store stage.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub inputs: InputTopics,
    pub group_id: String,
    pub batch_size: usize,
    pub batch_max_bytes: usize,
    pub flush_interval: Duration,
    pub retention: Option<Duration>,
    pub max_json_bytes: usize,
    pub retry_initial_backoff: Duration,
    pub retry_max_backoff: Duration,
    pub drain_timeout: Duration,
}

const TOPICS_FILE: Setting<PathBuf> = Setting::new(
    "store.topics_file",
    "EVENTPIPE_TOPICS_FILE",
    "--topics-file",
)
.default("topics/topics.toml");
const TOPICS: Setting<String> =
    Setting::new("store.topics", "EVENTPIPE_STORE_TOPICS", "--topics").topic_name();
const INPUT_PATTERN: Setting<String> = Setting::new(
    "store.input_pattern",
    "EVENTPIPE_STORE_INPUT_PATTERN",
    "--input-pattern",
);
const GROUP_ID: Setting<String> =
    Setting::new("store.group_id", "EVENTPIPE_STORE_GROUP_ID", "--group-id")
        .default("eventpipe-store");
const BATCH_SIZE: Setting<usize> = Setting::new(
    "store.batch_size",
    "EVENTPIPE_STORE_BATCH_SIZE",
    "--batch-size",
)
.default(5000)
.between(1, 1_000_000);
const BATCH_MAX_BYTES: Setting<usize> = Setting::new(
    "store.batch_max_bytes",
    "EVENTPIPE_STORE_BATCH_MAX_BYTES",
    "--batch-max-bytes",
)
.default(8 * 1024 * 1024)
.at_least(1024);
const FLUSH_INTERVAL_MS: Setting<u64> = Setting::new(
    "store.flush_interval_ms",
    "EVENTPIPE_STORE_FLUSH_INTERVAL_MS",
    "--flush-interval-ms",
)
.default(100)
.between(1, 60_000);
const RETENTION: Setting<String> = Setting::new(
    "store.retention",
    "EVENTPIPE_STORE_RETENTION",
    "--retention",
);
const MAX_JSON_BYTES: Setting<usize> = Setting::new(
    "store.max_json_bytes",
    "EVENTPIPE_STORE_MAX_JSON_BYTES",
    "--max-json-bytes",
)
.default(1024 * 1024)
.at_least(2);
const RETRY_INITIAL_BACKOFF_MS: Setting<u64> = Setting::new(
    "store.retry_initial_backoff_ms",
    "EVENTPIPE_STORE_RETRY_INITIAL_BACKOFF_MS",
    "--retry-initial-backoff-ms",
)
.default(100)
.at_least(1);
const RETRY_MAX_BACKOFF_MS: Setting<u64> = Setting::new(
    "store.retry_max_backoff_ms",
    "EVENTPIPE_STORE_RETRY_MAX_BACKOFF_MS",
    "--retry-max-backoff-ms",
)
.default(5000)
.at_least(1);
const DRAIN_TIMEOUT_SECS: Setting<u64> = Setting::new(
    "store.drain_timeout_secs",
    "EVENTPIPE_STORE_DRAIN_TIMEOUT_SECS",
    "--drain-timeout-secs",
)
.default(30)
.at_least(1);

/// The topics a stage names (`--topics`, each a valid name, at least one), else those the
/// topics file marks `stored = true` (the store's inputs, the gateway's topics): each given as
/// its setting with its flag and file values, so an error names the stage's own setting.
pub fn named_or_stored_topics(
    topics: (&Setting<String>, &Option<Vec<String>>, &Option<Vec<String>>),
    topics_file: (&Setting<PathBuf>, &Option<PathBuf>, &Option<PathBuf>),
) -> Result<Vec<String>, ConfigError> {
    let (setting, flag, file) = topics;
    if let Some(named) = layer(flag, file) {
        for topic in &named {
            setting.resolve(&Some(topic.clone()), &None)?;
        }
        if named.is_empty() {
            return Err(setting.invalid("", "name at least one topic"));
        }
        return Ok(named);
    }
    let (setting, flag, file) = topics_file;
    let path = setting.resolve(flag, file)?;
    let stored = crate::topics::stored_topics(&path)
        .map_err(|e| setting.invalid(path.display().to_string(), e))?;
    if stored.is_empty() {
        return Err(setting.invalid(
            path.display().to_string(),
            "marks no topic `stored = true`; name them with --topics",
        ));
    }
    Ok(stored)
}

/// `30d`, `12h`, `90m`, `45s` or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| "expected a whole number with d, h, m or s (e.g. 30d)".to_string())?;
    let seconds = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(format!("unknown unit {unit:?} (expected d, h, m or s)")),
    };
    if number == 0 {
        return Err("must be more than 0".into());
    }
    Ok(Duration::from_secs(number.saturating_mul(seconds)))
}

impl StoreSettings {
    pub fn load(args: &StoreArgs, settings: &Settings) -> Result<StoreSettings, ConfigError> {
        Self::resolve(args, &settings.file.table()?)
    }

    pub fn resolve(args: &StoreArgs, file: &FileStore) -> Result<StoreSettings, ConfigError> {
        let inputs = match INPUT_PATTERN.optional(&args.input_pattern, &file.input_pattern)? {
            Some(pattern) => {
                let pattern = if pattern.starts_with('^') {
                    pattern
                } else {
                    format!("^{pattern}")
                };
                InputTopics::Pattern(pattern)
            }
            None => InputTopics::Names(named_or_stored_topics(
                (&TOPICS, &args.topics, &file.topics),
                (&TOPICS_FILE, &args.topics_file, &file.topics_file),
            )?),
        };
        let retry_initial_backoff_ms = RETRY_INITIAL_BACKOFF_MS.resolve(
            &args.retry_initial_backoff_ms,
            &file.retry_initial_backoff_ms,
        )?;
        let retry_max_backoff_ms =
            RETRY_MAX_BACKOFF_MS.resolve(&args.retry_max_backoff_ms, &file.retry_max_backoff_ms)?;
        Ok(StoreSettings {
            inputs,
            group_id: GROUP_ID.resolve(&args.group_id, &file.group_id)?,
            batch_size: BATCH_SIZE.resolve(&args.batch_size, &file.batch_size)?,
            batch_max_bytes: BATCH_MAX_BYTES
                .resolve(&args.batch_max_bytes, &file.batch_max_bytes)?,
            flush_interval: Duration::from_millis(
                FLUSH_INTERVAL_MS.resolve(&args.flush_interval_ms, &file.flush_interval_ms)?,
            ),
            retention: RETENTION.optional_with(&args.retention, &file.retention, |text| {
                parse_duration(text)
            })?,
            max_json_bytes: MAX_JSON_BYTES.resolve(&args.max_json_bytes, &file.max_json_bytes)?,
            retry_initial_backoff: Duration::from_millis(retry_initial_backoff_ms),
            retry_max_backoff: Duration::from_millis(
                retry_max_backoff_ms.max(retry_initial_backoff_ms),
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
    fn durations_read_with_units_and_bad_ones_say_why() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3_600)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("3w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("0d").unwrap_err().contains("more than 0"));
        assert!(parse_duration("d").is_err());
    }

    #[test]
    fn the_default_topics_are_those_the_topics_file_marks_stored() {
        let args = StoreArgs {
            topics_file: Some(concat!(env!("CARGO_MANIFEST_DIR"), "/topics/topics.toml").into()),
            ..StoreArgs::default()
        };
        let settings = StoreSettings::resolve(&args, &FileStore::default()).unwrap();
        assert_eq!(
            settings.inputs,
            InputTopics::Names(
                ["create_user_in", "update_user_in", "task_in", "info_in"]
                    .map(String::from)
                    .to_vec()
            )
        );
    }

    #[test]
    fn bad_settings_are_one_line_errors_naming_the_setting() {
        let bad = StoreArgs {
            topics: Some(vec!["ok".into(), "not ok!".into()]),
            ..StoreArgs::default()
        };
        let error = StoreSettings::resolve(&bad, &FileStore::default()).unwrap_err();
        assert!(error.to_string().contains("--topics"), "{error}");
        let bad = StoreArgs {
            topics: Some(vec!["t".into()]),
            retention: Some("forever".into()),
            ..StoreArgs::default()
        };
        let error = StoreSettings::resolve(&bad, &FileStore::default()).unwrap_err();
        assert!(error.to_string().contains("--retention"), "{error}");
        let pattern = StoreArgs {
            input_pattern: Some(".*_in".into()),
            ..StoreArgs::default()
        };
        let settings = StoreSettings::resolve(&pattern, &FileStore::default()).unwrap();
        assert_eq!(settings.inputs, InputTopics::Pattern("^.*_in".into()));
    }
}
