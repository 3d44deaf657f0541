//! Settings of `eventpipe log`, layered flags > environment > the file's `[log]` > defaults,
//! validated into `LogSettings`; bad values become one-line `ConfigError`s naming the setting.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use super::document::IndexPattern;
use super::template::DataMapping;
use crate::config::{ConfigError, SettingName};

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

const fn name(key: &'static str, env: &'static str, flag: &'static str) -> SettingName {
    SettingName { key, env, flag }
}

const INPUT_TOPIC: SettingName = name(
    "log.input_topic",
    "EVENTPIPE_LOG_INPUT_TOPIC",
    "--input-topic",
);
const DEAD_LETTER_TOPIC: SettingName = name(
    "log.dead_letter_topic",
    "EVENTPIPE_LOG_DEAD_LETTER_TOPIC",
    "--dead-letter-topic",
);
const INDEX_PATTERN: SettingName = name(
    "log.index_pattern",
    "EVENTPIPE_LOG_INDEX_PATTERN",
    "--index-pattern",
);
const TEMPLATE_NAME: SettingName = name(
    "log.template_name",
    "EVENTPIPE_LOG_TEMPLATE_NAME",
    "--template-name",
);
const DATA_MAPPING: SettingName = name(
    "log.data_mapping",
    "EVENTPIPE_LOG_DATA_MAPPING",
    "--data-mapping",
);
const BATCH_SIZE: SettingName = name("log.batch_size", "EVENTPIPE_LOG_BATCH_SIZE", "--batch-size");
const BATCH_MAX_BYTES: SettingName = name(
    "log.batch_max_bytes",
    "EVENTPIPE_LOG_BATCH_MAX_BYTES",
    "--batch-max-bytes",
);
const BULK_CONCURRENCY: SettingName = name(
    "log.bulk_concurrency",
    "EVENTPIPE_LOG_BULK_CONCURRENCY",
    "--bulk-concurrency",
);
const SHARDS: SettingName = name("log.shards", "EVENTPIPE_LOG_SHARDS", "--shards");
const AUTH: SettingName = name(
    "log.username/password/api_key",
    "ELASTICSEARCH_USERNAME/PASSWORD/API_KEY",
    "--elasticsearch-username/-password/-api-key",
);
const MAX_ENVELOPE_BYTES: SettingName = name(
    "log.max_envelope_bytes",
    "EVENTPIPE_LOG_MAX_ENVELOPE_BYTES",
    "--max-envelope-bytes",
);

fn invalid(setting: &SettingName, value: impl Into<String>, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        setting: setting.to_string(),
        value: value.into(),
        reason: reason.to_string(),
    }
}

impl LogSettings {
    /// Merges `eventpipe log` flags (and their environment variables) over the file's `[log]`.
    pub fn resolve(args: &LogArgs, file: &FileLog) -> Result<LogSettings, ConfigError> {
        let input_topic = args
            .input_topic
            .clone()
            .or(file.input_topic.clone())
            .unwrap_or_else(|| "info_in".into());
        if !crate::settings::valid_topic_name(&input_topic) {
            return Err(invalid(&INPUT_TOPIC, input_topic, "not a valid topic name"));
        }
        let dead_letter_topic = args
            .dead_letter_topic
            .clone()
            .or(file.dead_letter_topic.clone())
            .unwrap_or_else(|| crate::stage::dead_letter::dead_letter_topic(&input_topic, ".dlq"));
        if !crate::settings::valid_topic_name(&dead_letter_topic)
            || dead_letter_topic == input_topic
        {
            return Err(invalid(
                &DEAD_LETTER_TOPIC,
                dead_letter_topic,
                "must be a valid topic name other than the input topic",
            ));
        }
        let pattern_raw = args
            .index_pattern
            .clone()
            .or(file.index_pattern.clone())
            .unwrap_or_else(|| "logger-service-%Y.%m.%d".into());
        let index_pattern = IndexPattern::parse(&pattern_raw)
            .map_err(|reason| invalid(&INDEX_PATTERN, pattern_raw.as_str(), reason))?;
        let template_name = args
            .template_name
            .clone()
            .or(file.template_name.clone())
            .unwrap_or_else(|| "logger-service".into());
        if template_name.is_empty()
            || !template_name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
        {
            return Err(invalid(
                &TEMPLATE_NAME,
                template_name,
                "expected lowercase letters, digits, - _ .",
            ));
        }
        let data_mapping = match args.data_mapping.clone().or(file.data_mapping.clone()) {
            None => None,
            Some(raw) => Some(DataMapping::parse(&raw).ok_or_else(|| {
                invalid(
                    &DATA_MAPPING,
                    raw.as_str(),
                    "expected flattened, flat_object or disabled",
                )
            })?),
        };
        let batch_size = args.batch_size.or(file.batch_size).unwrap_or(1000) as usize;
        if !(1..=100_000).contains(&batch_size) {
            return Err(invalid(
                &BATCH_SIZE,
                batch_size.to_string(),
                "expected 1 to 100000",
            ));
        }
        let batch_max_bytes = args
            .batch_max_bytes
            .or(file.batch_max_bytes)
            .unwrap_or(5 * 1024 * 1024) as usize;
        if batch_max_bytes < 1024 {
            return Err(invalid(
                &BATCH_MAX_BYTES,
                batch_max_bytes.to_string(),
                "must be at least 1024",
            ));
        }
        let bulk_concurrency =
            args.bulk_concurrency.or(file.bulk_concurrency).unwrap_or(2) as usize;
        if !(1..=16).contains(&bulk_concurrency) {
            return Err(invalid(
                &BULK_CONCURRENCY,
                bulk_concurrency.to_string(),
                "expected 1 to 16",
            ));
        }
        let shards = args.shards.or(file.shards).unwrap_or(1);
        if shards == 0 {
            return Err(invalid(&SHARDS, "0", "must be at least 1"));
        }
        let max_envelope_bytes = args
            .max_envelope_bytes
            .or(file.max_envelope_bytes)
            .map_or(crate::envelope::DEFAULT_MAX_ENVELOPE_BYTES, |b| b as usize);
        if max_envelope_bytes < 64 {
            return Err(invalid(
                &MAX_ENVELOPE_BYTES,
                max_envelope_bytes.to_string(),
                "must be at least 64",
            ));
        }
        let username = args
            .elasticsearch_username
            .clone()
            .or(file.username.clone());
        let password = args
            .elasticsearch_password
            .clone()
            .or(file.password.clone());
        let api_key = args.elasticsearch_api_key.clone().or(file.api_key.clone());
        let auth = match (username, password, api_key) {
            (None, None, None) => Auth::None,
            (None, None, Some(key)) => Auth::ApiKey(key),
            (Some(username), Some(password), None) => Auth::Basic { username, password },
            (_, _, Some(_)) => {
                return Err(invalid(
                    &AUTH,
                    "both",
                    "set an API key or a username and password, not both",
                ))
            }
            _ => {
                return Err(invalid(
                    &AUTH,
                    "incomplete",
                    "basic authentication needs both a username and a password",
                ))
            }
        };
        let millis = |flag: Option<u32>, file: Option<u32>, default: u32| {
            Duration::from_millis(u64::from(flag.or(file).unwrap_or(default).max(1)))
        };
        let secs = |flag: Option<u32>, file: Option<u32>, default: u32| {
            Duration::from_secs(u64::from(flag.or(file).unwrap_or(default).max(1)))
        };
        Ok(LogSettings {
            group_id: args
                .group_id
                .clone()
                .or(file.group_id.clone())
                .unwrap_or_else(|| "eventpipe-log".into()),
            input_topic,
            dead_letter_topic,
            index_pattern,
            template_name,
            template_priority: args
                .template_priority
                .or(file.template_priority)
                .unwrap_or(200),
            replicas: args.replicas.or(file.replicas).unwrap_or(0),
            shards,
            data_mapping,
            batch_size,
            batch_max_bytes,
            bulk_concurrency,
            flush_interval: millis(args.flush_interval_ms, file.flush_interval_ms, 200),
            retry_initial_backoff: millis(
                args.retry_initial_backoff_ms,
                file.retry_initial_backoff_ms,
                100,
            ),
            retry_max_backoff: millis(args.retry_max_backoff_ms, file.retry_max_backoff_ms, 5000),
            request_timeout: secs(args.request_timeout_secs, file.request_timeout_secs, 30),
            drain_timeout: secs(args.drain_timeout_secs, file.drain_timeout_secs, 10),
            max_envelope_bytes,
            auth,
            ca_cert: args.elasticsearch_ca_cert.clone().or(file.ca_cert.clone()),
            insecure: args
                .elasticsearch_insecure
                .or(file.insecure)
                .unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> FileLog {
        crate::config::parse_file(text).unwrap().log
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
