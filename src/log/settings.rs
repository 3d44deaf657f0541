//! Settings of `eventpipe log`, layered flags > environment > the file's `[log]` > defaults,
//! validated into `LogSettings`; bad values become one-line `ConfigError`s naming the setting.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use super::document::IndexPattern;
use super::template::DataMapping;
use crate::config::Settings;
use crate::settings::{layer, ConfigError, FileTable, Setting, SettingName};

/// A secret from a flag, the environment or the file: never shown by `Debug`.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// Flags of `eventpipe log`; each falls back to its environment variable, then the file's [log].
#[derive(Debug, Default, Clone, Args)]
pub struct LogArgs {
    /// Topic to ship to Elasticsearch (default: info_in).
    #[arg(long, env = "EVENTPIPE_LOG_INPUT_TOPIC")]
    pub input_topic: Option<String>,
    #[arg(long, env = "EVENTPIPE_LOG_GROUP_ID")]
    pub group_id: Option<String>,
    /// Where unloggable records and rejected documents go (default: <input topic>.dlq).
    #[arg(long, env = "EVENTPIPE_LOG_DEAD_LETTER_TOPIC")]
    pub dead_letter_topic: Option<String>,
    /// strftime pattern of index names, dated by @timestamp (default: logger-service-%Y.%m.%d).
    #[arg(long, env = "EVENTPIPE_LOG_INDEX_PATTERN")]
    pub index_pattern: Option<String>,
    /// Name of the index template installed at start-up (default: logger-service).
    #[arg(long, env = "EVENTPIPE_LOG_TEMPLATE_NAME")]
    pub template_name: Option<String>,
    /// Template priority; templates with equal priority must not overlap (default: 200).
    #[arg(long, env = "EVENTPIPE_LOG_TEMPLATE_PRIORITY")]
    pub template_priority: Option<u32>,
    /// Replicas per index; 0 suits a single node (default: 0).
    #[arg(long, env = "EVENTPIPE_LOG_REPLICAS")]
    pub replicas: Option<u32>,
    #[arg(long, env = "EVENTPIPE_LOG_SHARDS")]
    pub shards: Option<u32>,
    /// How `data` is mapped: flattened (Elasticsearch), flat_object (OpenSearch) or disabled
    /// (not searchable); default: flattened, falling back to disabled if the server lacks it.
    #[arg(long, env = "EVENTPIPE_LOG_DATA_MAPPING")]
    pub data_mapping: Option<String>,
    /// Documents per bulk request (default: 1000).
    #[arg(long, env = "EVENTPIPE_LOG_BATCH_SIZE")]
    pub batch_size: Option<u32>,
    /// Bytes per bulk request (default: 5242880).
    #[arg(long, env = "EVENTPIPE_LOG_BATCH_MAX_BYTES")]
    pub batch_max_bytes: Option<u32>,
    /// Bulk requests in flight at once (default: 2).
    #[arg(long, env = "EVENTPIPE_LOG_BULK_CONCURRENCY")]
    pub bulk_concurrency: Option<u32>,
    /// Longest wait before a partial batch is sent, in milliseconds (default: 200).
    #[arg(long, env = "EVENTPIPE_LOG_FLUSH_INTERVAL_MS")]
    pub flush_interval_ms: Option<u32>,
    /// First retry delay in milliseconds; doubles up to --retry-max-backoff-ms (default: 100).
    #[arg(long, env = "EVENTPIPE_LOG_RETRY_INITIAL_BACKOFF_MS")]
    pub retry_initial_backoff_ms: Option<u32>,
    #[arg(long, env = "EVENTPIPE_LOG_RETRY_MAX_BACKOFF_MS")]
    pub retry_max_backoff_ms: Option<u32>,
    /// Timeout of one bulk request in seconds (default: 30).
    #[arg(long, env = "EVENTPIPE_LOG_REQUEST_TIMEOUT_SECS")]
    pub request_timeout_secs: Option<u32>,
    /// How long shutdown and revocation wait for in-flight batches (default: 10).
    #[arg(long, env = "EVENTPIPE_LOG_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: Option<u32>,
    #[arg(long, env = "EVENTPIPE_LOG_MAX_ENVELOPE_BYTES")]
    pub max_envelope_bytes: Option<u32>,
    /// Basic authentication user (with --elasticsearch-password).
    #[arg(long, env = "ELASTICSEARCH_USERNAME")]
    pub elasticsearch_username: Option<String>,
    #[arg(long, env = "ELASTICSEARCH_PASSWORD", hide_env_values = true)]
    pub elasticsearch_password: Option<Secret>,
    /// API key (the base64 `encoded` form), sent as `Authorization: ApiKey ...`.
    #[arg(long, env = "ELASTICSEARCH_API_KEY", hide_env_values = true)]
    pub elasticsearch_api_key: Option<Secret>,
    /// PEM file of a CA to trust for https:// (in addition to the system's).
    #[arg(long, env = "ELASTICSEARCH_CA_CERT")]
    pub elasticsearch_ca_cert: Option<PathBuf>,
    /// Accept any server certificate (testing only).
    #[arg(long, env = "ELASTICSEARCH_INSECURE")]
    pub elasticsearch_insecure: Option<bool>,
}

/// The config file's `[log]` table.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileLog {
    pub input_topic: Option<String>,
    pub group_id: Option<String>,
    pub dead_letter_topic: Option<String>,
    pub index_pattern: Option<String>,
    pub template_name: Option<String>,
    pub template_priority: Option<u32>,
    pub replicas: Option<u32>,
    pub shards: Option<u32>,
    pub data_mapping: Option<String>,
    pub batch_size: Option<u32>,
    pub batch_max_bytes: Option<u32>,
    pub bulk_concurrency: Option<u32>,
    pub flush_interval_ms: Option<u32>,
    pub retry_initial_backoff_ms: Option<u32>,
    pub retry_max_backoff_ms: Option<u32>,
    pub request_timeout_secs: Option<u32>,
    pub drain_timeout_secs: Option<u32>,
    pub max_envelope_bytes: Option<u32>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub api_key: Option<Secret>,
    pub ca_cert: Option<PathBuf>,
    pub insecure: Option<bool>,
}

/// How to authenticate to Elasticsearch.
#[derive(Debug, Clone, PartialEq)]
pub enum Auth {
    None,
    Basic { username: String, password: Secret },
    ApiKey(Secret),
}

/// Resolved, validated settings of the log stage.
#[derive(Debug, Clone)]
pub struct LogSettings {
    pub input_topic: String,
    pub group_id: String,
    pub dead_letter_topic: String,
    pub index_pattern: IndexPattern,
    pub template_name: String,
    pub template_priority: u32,
    pub replicas: u32,
    pub shards: u32,
    /// None: flattened, with a fallback to disabled if the server does not know flattened.
    pub data_mapping: Option<DataMapping>,
    pub batch_size: usize,
    pub batch_max_bytes: usize,
    pub bulk_concurrency: usize,
    pub flush_interval: Duration,
    pub retry_initial_backoff: Duration,
    pub retry_max_backoff: Duration,
    pub request_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_envelope_bytes: usize,
    pub auth: Auth,
    pub ca_cert: Option<PathBuf>,
    pub insecure: bool,
}

impl FileTable for FileLog {
    const NAME: &'static str = "log";
}

const INPUT_TOPIC: Setting<String> = Setting::new(
    "log.input_topic",
    "EVENTPIPE_LOG_INPUT_TOPIC",
    "--input-topic",
)
.default("info_in")
.topic_name();
const GROUP_ID: Setting<String> =
    Setting::new("log.group_id", "EVENTPIPE_LOG_GROUP_ID", "--group-id").default("eventpipe-log");
/// Default: `<input topic>.dlq`.
const DEAD_LETTER_TOPIC: Setting<String> = Setting::new(
    "log.dead_letter_topic",
    "EVENTPIPE_LOG_DEAD_LETTER_TOPIC",
    "--dead-letter-topic",
)
.topic_name();
const INDEX_PATTERN: Setting<String> = Setting::new(
    "log.index_pattern",
    "EVENTPIPE_LOG_INDEX_PATTERN",
    "--index-pattern",
)
.default("logger-service-%Y.%m.%d");
const TEMPLATE_NAME: Setting<String> = Setting::new(
    "log.template_name",
    "EVENTPIPE_LOG_TEMPLATE_NAME",
    "--template-name",
)
.default("logger-service")
.check(template_name);
const TEMPLATE_PRIORITY: Setting<u32> = Setting::new(
    "log.template_priority",
    "EVENTPIPE_LOG_TEMPLATE_PRIORITY",
    "--template-priority",
)
.default(200);
const REPLICAS: Setting<u32> =
    Setting::new("log.replicas", "EVENTPIPE_LOG_REPLICAS", "--replicas").default(0);
const SHARDS: Setting<u32> = Setting::new("log.shards", "EVENTPIPE_LOG_SHARDS", "--shards")
    .default(1)
    .at_least(1);
/// Default: flattened, falling back to disabled if the server lacks it.
const DATA_MAPPING: Setting<String> = Setting::new(
    "log.data_mapping",
    "EVENTPIPE_LOG_DATA_MAPPING",
    "--data-mapping",
);
const BATCH_SIZE: Setting<u32> =
    Setting::new("log.batch_size", "EVENTPIPE_LOG_BATCH_SIZE", "--batch-size")
        .default(1000)
        .between(1, 100_000);
const BATCH_MAX_BYTES: Setting<u32> = Setting::new(
    "log.batch_max_bytes",
    "EVENTPIPE_LOG_BATCH_MAX_BYTES",
    "--batch-max-bytes",
)
.default(5 * 1024 * 1024)
.at_least(1024);
const BULK_CONCURRENCY: Setting<u32> = Setting::new(
    "log.bulk_concurrency",
    "EVENTPIPE_LOG_BULK_CONCURRENCY",
    "--bulk-concurrency",
)
.default(2)
.between(1, 16);
const FLUSH_INTERVAL_MS: Setting<u32> = Setting::new(
    "log.flush_interval_ms",
    "EVENTPIPE_LOG_FLUSH_INTERVAL_MS",
    "--flush-interval-ms",
)
.default(200);
const RETRY_INITIAL_BACKOFF_MS: Setting<u32> = Setting::new(
    "log.retry_initial_backoff_ms",
    "EVENTPIPE_LOG_RETRY_INITIAL_BACKOFF_MS",
    "--retry-initial-backoff-ms",
)
.default(100);
const RETRY_MAX_BACKOFF_MS: Setting<u32> = Setting::new(
    "log.retry_max_backoff_ms",
    "EVENTPIPE_LOG_RETRY_MAX_BACKOFF_MS",
    "--retry-max-backoff-ms",
)
.default(5000);
const REQUEST_TIMEOUT_SECS: Setting<u32> = Setting::new(
    "log.request_timeout_secs",
    "EVENTPIPE_LOG_REQUEST_TIMEOUT_SECS",
    "--request-timeout-secs",
)
.default(30);
const DRAIN_TIMEOUT_SECS: Setting<u32> = Setting::new(
    "log.drain_timeout_secs",
    "EVENTPIPE_LOG_DRAIN_TIMEOUT_SECS",
    "--drain-timeout-secs",
)
.default(10);
const MAX_ENVELOPE_BYTES: Setting<u32> = Setting::new(
    "log.max_envelope_bytes",
    "EVENTPIPE_LOG_MAX_ENVELOPE_BYTES",
    "--max-envelope-bytes",
)
.default(crate::envelope::DEFAULT_MAX_ENVELOPE_BYTES as u32)
.at_least(64);
/// Basic authentication or an API key (resolved together).
const AUTH: SettingName = SettingName::new(
    "log.username/password/api_key",
    "ELASTICSEARCH_USERNAME/PASSWORD/API_KEY",
    "--elasticsearch-username/-password/-api-key",
);
const CA_CERT: Setting<PathBuf> = Setting::new(
    "log.ca_cert",
    "ELASTICSEARCH_CA_CERT",
    "--elasticsearch-ca-cert",
);
const INSECURE: Setting<bool> = Setting::new(
    "log.insecure",
    "ELASTICSEARCH_INSECURE",
    "--elasticsearch-insecure",
)
.default(false);

/// The check of `log.template_name`.
fn template_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
    match valid {
        true => Ok(()),
        false => Err("expected lowercase letters, digits, - _ .".into()),
    }
}

impl LogSettings {
    /// Merges `eventpipe log` flags (and their environment variables) over the config file's
    /// `[log]` table.
    pub fn load(args: &LogArgs, settings: &Settings) -> Result<LogSettings, ConfigError> {
        Self::resolve(args, &settings.file.table()?)
    }

    /// Merges `eventpipe log` flags (and their environment variables) over the file's `[log]`.
    pub fn resolve(args: &LogArgs, file: &FileLog) -> Result<LogSettings, ConfigError> {
        let input_topic = INPUT_TOPIC.resolve(&args.input_topic, &file.input_topic)?;
        let dead_letter_topic = DEAD_LETTER_TOPIC.resolve_or(
            &args.dead_letter_topic,
            &file.dead_letter_topic,
            || crate::stage::dead_letter::dead_letter_topic(&input_topic, ".dlq"),
        )?;
        if dead_letter_topic == input_topic {
            return Err(DEAD_LETTER_TOPIC.invalid(
                dead_letter_topic,
                "must be a valid topic name other than the input topic",
            ));
        }
        type Unit = fn(u64) -> Duration;
        let (millis, secs): (Unit, Unit) = (Duration::from_millis, Duration::from_secs);
        // 0 means the shortest: 1 ms or 1 s.
        let duration =
            |setting: &Setting<u32>, flag: &Option<u32>, file: &Option<u32>, unit: Unit| {
                let value = setting.resolve(flag, file)?;
                Ok::<_, ConfigError>(unit(u64::from(value.max(1))))
            };
        Ok(LogSettings {
            group_id: GROUP_ID.resolve(&args.group_id, &file.group_id)?,
            input_topic,
            dead_letter_topic,
            index_pattern: INDEX_PATTERN.resolve_with(
                &args.index_pattern,
                &file.index_pattern,
                |raw| IndexPattern::parse(raw),
            )?,
            template_name: TEMPLATE_NAME.resolve(&args.template_name, &file.template_name)?,
            template_priority: TEMPLATE_PRIORITY
                .resolve(&args.template_priority, &file.template_priority)?,
            replicas: REPLICAS.resolve(&args.replicas, &file.replicas)?,
            shards: SHARDS.resolve(&args.shards, &file.shards)?,
            data_mapping: DATA_MAPPING.optional_with(
                &args.data_mapping,
                &file.data_mapping,
                |raw| {
                    DataMapping::parse(raw)
                        .ok_or_else(|| "expected flattened, flat_object or disabled".to_string())
                },
            )?,
            batch_size: BATCH_SIZE.resolve(&args.batch_size, &file.batch_size)? as usize,
            batch_max_bytes: BATCH_MAX_BYTES
                .resolve(&args.batch_max_bytes, &file.batch_max_bytes)?
                as usize,
            bulk_concurrency: BULK_CONCURRENCY
                .resolve(&args.bulk_concurrency, &file.bulk_concurrency)?
                as usize,
            flush_interval: duration(
                &FLUSH_INTERVAL_MS,
                &args.flush_interval_ms,
                &file.flush_interval_ms,
                millis,
            )?,
            retry_initial_backoff: duration(
                &RETRY_INITIAL_BACKOFF_MS,
                &args.retry_initial_backoff_ms,
                &file.retry_initial_backoff_ms,
                millis,
            )?,
            retry_max_backoff: duration(
                &RETRY_MAX_BACKOFF_MS,
                &args.retry_max_backoff_ms,
                &file.retry_max_backoff_ms,
                millis,
            )?,
            request_timeout: duration(
                &REQUEST_TIMEOUT_SECS,
                &args.request_timeout_secs,
                &file.request_timeout_secs,
                secs,
            )?,
            drain_timeout: duration(
                &DRAIN_TIMEOUT_SECS,
                &args.drain_timeout_secs,
                &file.drain_timeout_secs,
                secs,
            )?,
            max_envelope_bytes: MAX_ENVELOPE_BYTES
                .resolve(&args.max_envelope_bytes, &file.max_envelope_bytes)?
                as usize,
            auth: auth(args, file)?,
            ca_cert: CA_CERT.optional(&args.elasticsearch_ca_cert, &file.ca_cert)?,
            insecure: INSECURE.resolve(&args.elasticsearch_insecure, &file.insecure)?,
        })
    }
}

/// Basic authentication, an API key or none; not both, and not half of basic.
fn auth(args: &LogArgs, file: &FileLog) -> Result<Auth, ConfigError> {
    let username = layer(&args.elasticsearch_username, &file.username);
    let password = layer(&args.elasticsearch_password, &file.password);
    let api_key = layer(&args.elasticsearch_api_key, &file.api_key);
    match (username, password, api_key) {
        (None, None, None) => Ok(Auth::None),
        (None, None, Some(key)) => Ok(Auth::ApiKey(key)),
        (Some(username), Some(password), None) => Ok(Auth::Basic { username, password }),
        (_, _, Some(_)) => Err(AUTH.invalid(
            "both",
            "set an API key or a username and password, not both",
        )),
        _ => Err(AUTH.invalid(
            "incomplete",
            "basic authentication needs both a username and a password",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> FileLog {
        crate::config::ConfigFile::new("test.toml", text)
            .table()
            .unwrap()
    }

    #[test]
    fn defaults_follow_the_issue() {
        let s = LogSettings::resolve(&LogArgs::default(), &FileLog::default()).unwrap();
        assert_eq!(s.input_topic, "info_in");
        assert_eq!(s.dead_letter_topic, "info_in.dlq");
        assert_eq!(s.index_pattern.as_str(), "logger-service-%Y.%m.%d");
        assert_eq!(s.replicas, 0);
        assert_eq!(s.auth, Auth::None);
    }

    #[test]
    fn flags_beat_the_file_and_the_dead_letter_topic_follows_the_input() {
        let f = file("[log]\ninput_topic = \"app_logs\"\nbatch_size = 10\npassword = \"hunter2\"\nusername = \"u\"\n");
        let s = LogSettings::resolve(&LogArgs::default(), &f).unwrap();
        assert_eq!(s.dead_letter_topic, "app_logs.dlq");
        assert_eq!(s.batch_size, 10);
        assert!(!format!("{s:?}").contains("hunter2"), "secrets stay hidden");
        let args = LogArgs {
            batch_size: Some(20),
            ..Default::default()
        };
        assert_eq!(LogSettings::resolve(&args, &f).unwrap().batch_size, 20);
    }

    #[test]
    fn bad_values_name_the_setting_on_one_line() {
        let cases = [
            (
                LogArgs {
                    index_pattern: Some("Logs-%Y".into()),
                    ..Default::default()
                },
                "EVENTPIPE_LOG_INDEX_PATTERN",
            ),
            (
                LogArgs {
                    data_mapping: Some("nested".into()),
                    ..Default::default()
                },
                "--data-mapping",
            ),
            (
                LogArgs {
                    batch_size: Some(0),
                    ..Default::default()
                },
                "log.batch_size",
            ),
            (
                LogArgs {
                    elasticsearch_username: Some("u".into()),
                    ..Default::default()
                },
                "ELASTICSEARCH_USERNAME",
            ),
            (
                LogArgs {
                    input_topic: Some("bad topic".into()),
                    ..Default::default()
                },
                "EVENTPIPE_LOG_INPUT_TOPIC",
            ),
        ];
        for (args, expected) in cases {
            let message = LogSettings::resolve(&args, &FileLog::default())
                .unwrap_err()
                .to_string();
            assert!(message.contains(expected), "{message} names {expected}");
            assert!(!message.contains('\n'));
        }
    }
}
