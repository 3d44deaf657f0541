//! Typed settings for every command, layered flags > environment > config file > defaults.
//! Environment names follow the existing services (KAFKA_BOOTSTRAP_SERVERS, STORAGE_TYPE, ...).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::codec::{CodecSettings, Format};
pub use crate::settings::{ConfigError, SettingName};
use clap::Args;
use serde::Deserialize;
use url::Url;

/// Defaults point at the local stack that `scripts/stack up` starts, so a developer needs no setup.
pub const DEFAULT_BOOTSTRAP_SERVERS: &str = "127.0.0.1:19092";
pub const DEFAULT_ELASTICSEARCH_URL: &str = "http://127.0.0.1:19200";
pub const DEFAULT_SCHEMA_REGISTRY_URL: &str = "http://127.0.0.1:18081/apis/ccompat/v7";
pub const DEFAULT_POSTGRES_URL: &str = "postgres://eventpipe:eventpipe@127.0.0.1:15432/eventpipe";
pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:9464";

/// Environment variables with this prefix become librdkafka properties:
/// `EVENTPIPE_KAFKA_SECURITY_PROTOCOL=SSL` sets `security.protocol=SSL`.
pub const KAFKA_PROPERTY_ENV_PREFIX: &str = "EVENTPIPE_KAFKA_";

const BOOTSTRAP: SettingName = SettingName {
    key: "kafka.bootstrap_servers",
    env: "KAFKA_BOOTSTRAP_SERVERS",
    flag: "--bootstrap-servers",
};
const CONNECT_TIMEOUT: SettingName = SettingName {
    key: "kafka.connect_timeout_secs",
    env: "EVENTPIPE_CONNECT_TIMEOUT_SECS",
    flag: "--connect-timeout-secs",
};
const KAFKA_PROPERTY: SettingName = SettingName {
    key: "kafka.properties",
    env: "EVENTPIPE_KAFKA_<PROPERTY>",
    flag: "-X/--kafka-property",
};
const ELASTICSEARCH: SettingName = SettingName {
    key: "elasticsearch.url",
    env: "ELASTICSEARCH_URL",
    flag: "--elasticsearch-url",
};
const SCHEMA_REGISTRY: SettingName = SettingName {
    key: "schema_registry.url",
    env: "SCHEMA_REGISTRY_URL",
    flag: "--schema-registry-url",
};
const INPUT_FORMAT: SettingName = SettingName {
    key: "codec.input_format",
    env: "EVENTPIPE_INPUT_FORMAT",
    flag: "--input-format",
};
const OUTPUT_FORMAT: SettingName = SettingName {
    key: "codec.output_format",
    env: "EVENTPIPE_OUTPUT_FORMAT",
    flag: "--output-format",
};
const TOPIC_FORMAT: SettingName = SettingName {
    key: "codec.topics",
    env: "EVENTPIPE_TOPIC_FORMATS",
    flag: "--topic-format",
};
const POSTGRES: SettingName = SettingName {
    key: "postgres.url",
    env: "POSTGRES_CONNECTION_STRING",
    flag: "--postgres-url",
};
const LOG_FORMAT: SettingName = SettingName {
    key: "telemetry.log_format",
    env: "EVENTPIPE_LOG_FORMAT",
    flag: "--log-format",
};
const METRICS_ADDRESS: SettingName = SettingName {
    key: "telemetry.metrics_address",
    env: "EVENTPIPE_METRICS_ADDRESS",
    flag: "--metrics-address",
};
const STORAGE_TYPE: SettingName = SettingName {
    key: "aggregate.storage_type",
    env: "STORAGE_TYPE",
    flag: "--storage-type",
};
const AGGREGATION_INTERVAL: SettingName = SettingName {
    key: "aggregate.interval_secs",
    env: "AGGREGATION_INTERVAL",
    flag: "--aggregation-interval",
};

/// Global flags; each falls back to its environment variable (clap's `env`), then to the file.
#[derive(Debug, Default, Clone, Args)]
pub struct SettingsArgs {
    /// TOML config file (see eventpipe.example.toml).
    #[arg(long, global = true, env = "EVENTPIPE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers, host:port[,host:port].
    #[arg(long, global = true, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: Option<String>,
    /// Any librdkafka property, KEY=VALUE; repeatable (TLS, SASL, tuning).
    #[arg(
        short = 'X',
        long = "kafka-property",
        global = true,
        value_name = "KEY=VALUE"
    )]
    pub kafka_properties: Vec<String>,
    /// How long to wait for Kafka before giving up with an error.
    #[arg(long, global = true, env = "EVENTPIPE_CONNECT_TIMEOUT_SECS")]
    pub connect_timeout_secs: Option<u64>,
    #[arg(long, global = true, env = "ELASTICSEARCH_URL")]
    pub elasticsearch_url: Option<String>,
    #[arg(long, global = true, env = "SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<String>,
    #[arg(long, global = true, env = "POSTGRES_CONNECTION_STRING")]
    pub postgres_url: Option<String>,
    /// Format of the topics a stage reads: json or avro (Confluent framing, schema registry).
    #[arg(long, global = true, env = "EVENTPIPE_INPUT_FORMAT")]
    pub input_format: Option<String>,
    /// Format of the topics a stage writes (dead letters always keep the input's bytes).
    #[arg(long, global = true, env = "EVENTPIPE_OUTPUT_FORMAT")]
    pub output_format: Option<String>,
    /// One topic's format, TOPIC=json|avro, over the defaults; repeatable or comma-separated.
    #[arg(
        long = "topic-format",
        global = true,
        env = "EVENTPIPE_TOPIC_FORMATS",
        value_delimiter = ',',
        value_name = "TOPIC=FORMAT"
    )]
    pub topic_formats: Vec<String>,
    /// Register a stage's writer schema if its subject lacks it (default: refuse and wait for
    /// `eventpipe schemas register`, the compatibility-checked step).
    #[arg(long, global = true, env = "EVENTPIPE_SCHEMA_AUTO_REGISTER")]
    pub schema_auto_register: Option<bool>,
    /// Log format: text or json (one JSON object per line).
    #[arg(long, global = true, env = "EVENTPIPE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Log filter in RUST_LOG syntax, e.g. `info,eventpipe=debug`.
    #[arg(long, global = true, env = "EVENTPIPE_LOG")]
    pub log_level: Option<String>,
    /// Address of the /metrics, /health and /ready endpoint.
    #[arg(long, global = true, env = "EVENTPIPE_METRICS_ADDRESS")]
    pub metrics_address: Option<String>,
    /// Aggregate sink: kafka or postgres.
    #[arg(long, global = true, env = "STORAGE_TYPE")]
    pub storage_type: Option<String>,
    /// Topic the aggregator writes to when the sink is kafka.
    #[arg(long, global = true, env = "KAFKA_TOPIC")]
    pub kafka_topic: Option<String>,
    /// Aggregation window in seconds.
    #[arg(long, global = true, env = "AGGREGATION_INTERVAL")]
    pub aggregation_interval: Option<String>,
}

/// The config file's shape; unknown keys are errors so typos do not pass silently.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileSettings {
    pub kafka: FileKafka,
    pub elasticsearch: FileUrl,
    pub schema_registry: FileUrl,
    pub postgres: FileUrl,
    pub codec: FileCodec,
    pub telemetry: FileTelemetry,
    pub aggregate: FileAggregate,
    pub dispatch: FileDispatch,
    pub log: crate::log::FileLog,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileDispatch {
    pub input_topics: Option<Vec<String>>,
    pub input_pattern: Option<String>,
    pub group_id: Option<String>,
    pub routes_file: Option<PathBuf>,
    pub service: Option<String>,
    pub dead_letter_suffix: Option<String>,
    pub max_envelope_bytes: Option<usize>,
    pub drain_timeout_secs: Option<u64>,
    pub exactly_once: Option<bool>,
    pub transactional_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileKafka {
    pub bootstrap_servers: Option<String>,
    pub connect_timeout_secs: Option<u64>,
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileUrl {
    pub url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileCodec {
    pub input_format: Option<String>,
    pub output_format: Option<String>,
    /// Topic name to format, over the defaults.
    pub topics: BTreeMap<String, String>,
    pub auto_register: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileTelemetry {
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    pub metrics_address: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileAggregate {
    pub storage_type: Option<String>,
    pub output_topic: Option<String>,
    pub interval_secs: Option<u64>,
    pub input_topic: Option<String>,
    pub group_id: Option<String>,
    pub advance_ms: Option<u64>,
    pub allowed_lateness_ms: Option<u64>,
    pub grace_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub max_open_windows: Option<usize>,
    pub metrics_topic: Option<String>,
    pub metrics_interval_secs: Option<u64>,
}

/// Resolved, validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub elasticsearch_url: Url,
    pub schema_registry_url: Url,
    pub postgres_url: Url,
    /// Which topics are JSON and which Avro.
    pub codec: CodecSettings,
    pub telemetry: TelemetrySettings,
    pub aggregate: AggregateSettings,
    /// Dispatch settings from the file and defaults; `eventpipe dispatch` merges its flags over
    /// `file_dispatch` with `DispatchSettings::resolve`.
    pub dispatch: DispatchSettings,
    pub file_dispatch: FileDispatch,
    /// The file's `[log]` table; `eventpipe log` merges its flags over it.
    pub file_log: crate::log::FileLog,
}

/// Where the dispatcher reads, how it names itself, and its delivery mode.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub input: InputTopics,
    pub group_id: String,
    pub routes_file: PathBuf,
    /// The `service` of every envelope the dispatcher emits.
    pub service: String,
    pub dead_letter_suffix: String,
    pub max_envelope_bytes: usize,
    /// How long shutdown and revocation wait for in-flight outputs before giving up on them.
    pub drain_timeout: Duration,
    /// Kafka transactions: consume-transform-produce with offsets in the transaction.
    pub exactly_once: bool,
    /// Stable per instance, so a restarted instance fences its predecessor's open transaction.
    pub transactional_id: String,
}

pub use crate::stage::InputTopics;

/// Flags of `eventpipe dispatch`; each falls back to its environment variable, then the file.
#[derive(Debug, Default, Clone, Args)]
pub struct DispatchArgs {
    /// Input topics, comma-separated (default: create_user_in,update_user_in,task_in).
    #[arg(long, env = "EVENTPIPE_DISPATCH_INPUT_TOPICS", value_delimiter = ',')]
    pub input_topics: Option<Vec<String>>,
    /// Regular expression of input topics instead of a list, e.g. `.*_in`.
    #[arg(long, env = "EVENTPIPE_DISPATCH_INPUT_PATTERN")]
    pub input_pattern: Option<String>,
    #[arg(long, env = "EVENTPIPE_DISPATCH_GROUP_ID")]
    pub group_id: Option<String>,
    #[arg(long, env = "EVENTPIPE_DISPATCH_ROUTES_FILE")]
    pub routes_file: Option<PathBuf>,
    /// Service name written into every output envelope.
    #[arg(long, env = "EVENTPIPE_DISPATCH_SERVICE")]
    pub service: Option<String>,
    #[arg(long, env = "EVENTPIPE_DISPATCH_DEAD_LETTER_SUFFIX")]
    pub dead_letter_suffix: Option<String>,
    #[arg(long, env = "EVENTPIPE_DISPATCH_MAX_ENVELOPE_BYTES")]
    pub max_envelope_bytes: Option<usize>,
    #[arg(long, env = "EVENTPIPE_DISPATCH_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: Option<u64>,
    /// Use Kafka transactions (exactly-once) instead of at-least-once.
    #[arg(long, env = "EVENTPIPE_DISPATCH_EXACTLY_ONCE")]
    pub exactly_once: Option<bool>,
    /// Transactional id of this instance (default: `<group id>-<hostname>`); one per instance.
    #[arg(long, env = "EVENTPIPE_DISPATCH_TRANSACTIONAL_ID")]
    pub transactional_id: Option<String>,
}

const DISPATCH_INPUT: SettingName = SettingName {
    key: "dispatch.input_topics / dispatch.input_pattern",
    env: "EVENTPIPE_DISPATCH_INPUT_TOPICS / EVENTPIPE_DISPATCH_INPUT_PATTERN",
    flag: "--input-topics / --input-pattern",
};
const DISPATCH_MAX_BYTES: SettingName = SettingName {
    key: "dispatch.max_envelope_bytes",
    env: "EVENTPIPE_DISPATCH_MAX_ENVELOPE_BYTES",
    flag: "--max-envelope-bytes",
};

impl DispatchSettings {
    /// Merges `eventpipe dispatch` flags (and their environment variables) over the file.
    pub fn resolve(args: &DispatchArgs, file: &FileDispatch) -> Result<Self, ConfigError> {
        let pattern = args.input_pattern.clone().or(file.input_pattern.clone());
        let topics = args.input_topics.clone().or(file.input_topics.clone());
        let input = match (pattern, topics) {
            (Some(_), Some(_)) => {
                return Err(
                    DISPATCH_INPUT.invalid("both", "set a topic list or a pattern, not both")
                )
            }
            (Some(pattern), None) => {
                // librdkafka treats a subscription starting with ^ as a regular expression.
                let pattern = if pattern.starts_with('^') {
                    pattern
                } else {
                    format!("^{pattern}")
                };
                InputTopics::Pattern(pattern)
            }
            (None, topics) => {
                let topics: Vec<String> = topics
                    .unwrap_or_else(|| {
                        ["create_user_in", "update_user_in", "task_in"]
                            .map(String::from)
                            .to_vec()
                    })
                    .into_iter()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
                    .collect();
                if let Some(bad) = topics
                    .iter()
                    .find(|t| !crate::settings::valid_topic_name(t))
                {
                    return Err(DISPATCH_INPUT.invalid(bad.as_str(), "not a valid topic name"));
                }
                if topics.is_empty() {
                    return Err(DISPATCH_INPUT.invalid("", "no input topics"));
                }
                InputTopics::Names(topics)
            }
        };
        let max_envelope_bytes = args
            .max_envelope_bytes
            .or(file.max_envelope_bytes)
            .unwrap_or(crate::envelope::DEFAULT_MAX_ENVELOPE_BYTES);
        if max_envelope_bytes < 64 {
            return Err(
                DISPATCH_MAX_BYTES.invalid(max_envelope_bytes.to_string(), "must be at least 64")
            );
        }
        let group_id = args
            .group_id
            .clone()
            .or(file.group_id.clone())
            .unwrap_or_else(|| "eventpipe-dispatch".into());
        let transactional_id = args
            .transactional_id
            .clone()
            .or(file.transactional_id.clone())
            .unwrap_or_else(|| format!("{group_id}-{}", hostname()));
        Ok(DispatchSettings {
            input,
            group_id,
            transactional_id,
            routes_file: args
                .routes_file
                .clone()
                .or(file.routes_file.clone())
                .unwrap_or_else(|| PathBuf::from("topics/routes.toml")),
            service: args
                .service
                .clone()
                .or(file.service.clone())
                .unwrap_or_else(|| "eventpipe-dispatch".into()),
            dead_letter_suffix: args
                .dead_letter_suffix
                .clone()
                .or(file.dead_letter_suffix.clone())
                .unwrap_or_else(|| crate::topics::DEAD_LETTER_SUFFIX.into()),
            max_envelope_bytes,
            drain_timeout: Duration::from_secs(
                args.drain_timeout_secs
                    .or(file.drain_timeout_secs)
                    .unwrap_or(30),
            ),
            exactly_once: args.exactly_once.or(file.exactly_once).unwrap_or(false),
        })
    }
}

#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    /// Extra librdkafka properties, applied after eventpipe's own defaults so users can override them.
    pub properties: BTreeMap<String, String>,
    pub connect_timeout: Duration,
}

impl KafkaSettings {
    /// The largest record a producer sends: librdkafka's `message.max.bytes` (user property or
    /// its default). Outputs above it dead-letter their input instead of failing the stage.
    pub fn max_record_bytes(&self) -> usize {
        self.properties
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(LIBRDKAFKA_MESSAGE_MAX_BYTES)
    }
}

/// librdkafka's default `message.max.bytes`.
pub const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;

impl KafkaSettings {
    /// Properties with secrets masked, for logs.
    pub fn redacted_properties(&self) -> BTreeMap<String, String> {
        self.properties
            .iter()
            .map(|(k, v)| {
                let secret = ["password", "secret", "key.pem", "oauthbearer.config"]
                    .iter()
                    .any(|s| k.contains(s));
                (k.clone(), if secret { "***".into() } else { v.clone() })
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    pub log_filter: String,
    pub metrics_address: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageType {
    Kafka,
    Postgres,
}

#[derive(Debug, Clone)]
pub struct AggregateSettings {
    pub storage_type: StorageType,
    pub output_topic: String,
    pub interval: Duration,
    /// The file's other `[aggregate]` keys; `eventpipe aggregate` merges its flags over them.
    pub file: FileAggregate,
}

impl Settings {
    /// Reads the config file (if any) and the process environment, then merges with `args`.
    pub fn load(args: &SettingsArgs) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileSettings::default(),
        };
        let env_properties = kafka_properties_from_env(std::env::vars());
        Settings::resolve(args, file, env_properties)
    }

    /// Pure merge of the layers; `env_properties` are the `EVENTPIPE_KAFKA_*` variables.
    pub fn resolve(
        args: &SettingsArgs,
        file: FileSettings,
        env_properties: BTreeMap<String, String>,
    ) -> Result<Settings, ConfigError> {
        let bootstrap_servers = args
            .bootstrap_servers
            .clone()
            .or(file.kafka.bootstrap_servers)
            .unwrap_or_else(|| DEFAULT_BOOTSTRAP_SERVERS.into());
        validate_bootstrap(&bootstrap_servers)?;

        let mut properties = file.kafka.properties;
        properties.extend(env_properties);
        for pair in &args.kafka_properties {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| KAFKA_PROPERTY.invalid(pair.as_str(), "expected KEY=VALUE"))?;
            properties.insert(key.trim().to_string(), value.trim().to_string());
        }
        if properties.contains_key("bootstrap.servers") {
            return Err(
                KAFKA_PROPERTY.invalid("bootstrap.servers", format!("set {BOOTSTRAP} instead"))
            );
        }

        let connect_timeout_secs = args
            .connect_timeout_secs
            .or(file.kafka.connect_timeout_secs)
            .unwrap_or(15);
        if connect_timeout_secs == 0 {
            return Err(CONNECT_TIMEOUT.invalid("0", "must be at least 1"));
        }

        let elasticsearch_url = parse_http_url(
            &ELASTICSEARCH,
            args.elasticsearch_url.clone().or(file.elasticsearch.url),
            DEFAULT_ELASTICSEARCH_URL,
        )?;
        let schema_registry_url = parse_http_url(
            &SCHEMA_REGISTRY,
            args.schema_registry_url
                .clone()
                .or(file.schema_registry.url),
            DEFAULT_SCHEMA_REGISTRY_URL,
        )?;
        let postgres_url = parse_postgres_url(
            args.postgres_url
                .clone()
                .or(file.postgres.url)
                .unwrap_or_else(|| DEFAULT_POSTGRES_URL.into()),
        )?;

        let codec = resolve_codec(args, file.codec)?;

        let log_format = match args
            .log_format
            .clone()
            .or(file.telemetry.log_format)
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(LOG_FORMAT.invalid(other, "expected text or json")),
        };
        let log_filter = args
            .log_level
            .clone()
            .or(file.telemetry.log_level)
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| "info".into());
        let metrics_raw = args
            .metrics_address
            .clone()
            .or(file.telemetry.metrics_address)
            .unwrap_or_else(|| DEFAULT_METRICS_ADDRESS.into());
        let metrics_address = metrics_raw.parse::<SocketAddr>().map_err(|e| {
            METRICS_ADDRESS.invalid(metrics_raw.as_str(), format!("{e} (expected IP:PORT)"))
        })?;

        let storage_type = match args
            .storage_type
            .clone()
            .or(file.aggregate.storage_type.clone())
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("kafka") => StorageType::Kafka,
            Some("postgres") | Some("postgresql") => StorageType::Postgres,
            Some(other) => return Err(STORAGE_TYPE.invalid(other, "expected kafka or postgres")),
        };
        let output_topic = args
            .kafka_topic
            .clone()
            .or(file.aggregate.output_topic.clone())
            .unwrap_or_else(|| "events_aggregated".into());
        let interval_secs = match &args.aggregation_interval {
            Some(raw) => raw.trim().parse::<u64>().map_err(|_| {
                AGGREGATION_INTERVAL.invalid(raw.as_str(), "expected whole seconds")
            })?,
            None => file.aggregate.interval_secs.unwrap_or(60),
        };
        if interval_secs == 0 {
            return Err(AGGREGATION_INTERVAL.invalid("0", "must be at least 1 second"));
        }

        let dispatch = DispatchSettings::resolve(&DispatchArgs::default(), &file.dispatch)?;
        Ok(Settings {
            dispatch,
            file_dispatch: file.dispatch,
            file_log: file.log,
            kafka: KafkaSettings {
                bootstrap_servers,
                properties,
                connect_timeout: Duration::from_secs(connect_timeout_secs),
            },
            elasticsearch_url,
            schema_registry_url,
            postgres_url,
            codec,
            telemetry: TelemetrySettings {
                log_format,
                log_filter,
                metrics_address,
            },
            aggregate: AggregateSettings {
                storage_type,
                output_topic,
                interval: Duration::from_secs(interval_secs),
                file: file.aggregate,
            },
        })
    }
}

fn parse_format(name: &SettingName, raw: &str) -> Result<Format, ConfigError> {
    raw.parse::<Format>()
        .map_err(|reason| name.invalid(raw, reason))
}

/// Formats: flags (and their variables) over the file's `[codec]` table, json by default.
fn resolve_codec(args: &SettingsArgs, file: FileCodec) -> Result<CodecSettings, ConfigError> {
    let input = args.input_format.clone().or(file.input_format);
    let output = args.output_format.clone().or(file.output_format);
    let mut topics = BTreeMap::new();
    for (topic, raw) in file.topics {
        topics.insert(topic, parse_format(&TOPIC_FORMAT, &raw)?);
    }
    for pair in args.topic_formats.iter().filter(|p| !p.trim().is_empty()) {
        let (topic, raw) = pair
            .split_once('=')
            .ok_or_else(|| TOPIC_FORMAT.invalid(pair.as_str(), "expected TOPIC=json|avro"))?;
        if !crate::settings::valid_topic_name(topic.trim()) {
            return Err(TOPIC_FORMAT.invalid(pair.as_str(), "not a valid topic name"));
        }
        topics.insert(topic.trim().to_string(), parse_format(&TOPIC_FORMAT, raw)?);
    }
    Ok(CodecSettings {
        input: input
            .map(|raw| parse_format(&INPUT_FORMAT, &raw))
            .transpose()?
            .unwrap_or_default(),
        output: output
            .map(|raw| parse_format(&OUTPUT_FORMAT, &raw))
            .transpose()?
            .unwrap_or_default(),
        topics,
        auto_register: args
            .schema_auto_register
            .or(file.auto_register)
            .unwrap_or(false),
    })
}

/// This machine's name, for default instance ids.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Parses the TOML config file into its typed shape; errors become one line with the line number.
pub fn read_file(path: &Path) -> Result<FileSettings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    parse_file(&text).map_err(|reason| ConfigError::File {
        path: path.to_path_buf(),
        reason,
    })
}

/// Parses config text; the error is a single line (`line N: message`).
pub fn parse_file(text: &str) -> Result<FileSettings, String> {
    toml::from_str::<FileSettings>(text).map_err(|e| {
        let message = e.message().replace('\n', " ");
        match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}: {message}")
            }
            None => message,
        }
    })
}

/// Collects `EVENTPIPE_KAFKA_SOME_NAME=value` into `some.name=value`.
pub fn kafka_properties_from_env(
    vars: impl Iterator<Item = (String, String)>,
) -> BTreeMap<String, String> {
    vars.filter_map(|(name, value)| {
        let rest = name.strip_prefix(KAFKA_PROPERTY_ENV_PREFIX)?;
        if rest.is_empty() {
            return None;
        }
        Some((rest.to_ascii_lowercase().replace('_', "."), value))
    })
    .collect()
}

fn validate_bootstrap(servers: &str) -> Result<(), ConfigError> {
    if servers.trim().is_empty() {
        return Err(BOOTSTRAP.invalid(servers, "must not be empty"));
    }
    for server in servers.split(',') {
        let server = server.trim();
        // librdkafka also accepts a `PROTOCOL://` prefix; the port is what people forget.
        let host_port = server.rsplit("://").next().unwrap_or(server);
        let valid = host_port
            .rsplit_once(':')
            .map(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            .unwrap_or(false);
        if !valid {
            return Err(BOOTSTRAP.invalid(servers, format!("{server:?} is not host:port")));
        }
    }
    Ok(())
}

fn parse_http_url(
    name: &SettingName,
    raw: Option<String>,
    default: &str,
) -> Result<Url, ConfigError> {
    let raw = raw.unwrap_or_else(|| default.into());
    let mut url = Url::parse(raw.trim()).map_err(|e| name.invalid(raw.as_str(), e))?;
    // A trailing slash makes `join("subjects")` append instead of replacing the last segment.
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(name.invalid(
            raw.as_str(),
            "expected an http:// or https:// URL with a host",
        ));
    }
    Ok(url)
}

fn parse_postgres_url(raw: String) -> Result<Url, ConfigError> {
    let url = Url::parse(raw.trim()).map_err(|e| POSTGRES.invalid(redact_url(&raw), e))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(POSTGRES.invalid(
            redact_url(&raw),
            "expected postgres://user:password@host:port/database",
        ));
    }
    Ok(url)
}

/// Hides the password of a URL so it can be logged or shown in an error.
pub fn redact_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        Ok(url) => url.to_string(),
        Err(_) => "<unparseable>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(args: SettingsArgs, file: &str) -> Result<Settings, ConfigError> {
        Settings::resolve(&args, parse_file(file).unwrap(), BTreeMap::new())
    }

    #[test]
    fn defaults_point_at_the_local_stack() {
        let s = resolve(SettingsArgs::default(), "").unwrap();
        assert_eq!(s.kafka.bootstrap_servers, DEFAULT_BOOTSTRAP_SERVERS);
        assert_eq!(s.elasticsearch_url.as_str(), "http://127.0.0.1:19200/");
        assert_eq!(
            s.schema_registry_url.join("subjects").unwrap().as_str(),
            "http://127.0.0.1:18081/apis/ccompat/v7/subjects"
        );
        assert_eq!(s.aggregate.storage_type, StorageType::Kafka);
        assert_eq!(s.aggregate.interval, Duration::from_secs(60));
        assert_eq!(s.aggregate.output_topic, "events_aggregated");
    }

    #[test]
    fn flags_beat_file_and_file_beats_defaults() {
        let file = "[kafka]\nbootstrap_servers = \"file:1\"\n[aggregate]\nstorage_type = \"postgres\"\ninterval_secs = 5\n";
        let s = resolve(SettingsArgs::default(), file).unwrap();
        assert_eq!(s.kafka.bootstrap_servers, "file:1");
        assert_eq!(s.aggregate.storage_type, StorageType::Postgres);
        assert_eq!(s.aggregate.interval, Duration::from_secs(5));

        let args = SettingsArgs {
            bootstrap_servers: Some("flag:2".into()),
            aggregation_interval: Some("7".into()),
            ..Default::default()
        };
        let s = resolve(args, file).unwrap();
        assert_eq!(s.kafka.bootstrap_servers, "flag:2");
        assert_eq!(s.aggregate.interval, Duration::from_secs(7));
    }

    #[test]
    fn kafka_properties_merge_file_env_then_flags() {
        let file = parse_file(
            "[kafka.properties]\n\"security.protocol\" = \"SSL\"\n\"linger.ms\" = \"1\"\n",
        )
        .unwrap();
        let env = kafka_properties_from_env(
            [
                ("EVENTPIPE_KAFKA_LINGER_MS".to_string(), "2".to_string()),
                (
                    "EVENTPIPE_KAFKA_SASL_PASSWORD".to_string(),
                    "hunter2".to_string(),
                ),
                ("UNRELATED".to_string(), "x".to_string()),
            ]
            .into_iter(),
        );
        let args = SettingsArgs {
            kafka_properties: vec!["security.protocol=SASL_SSL".into()],
            ..Default::default()
        };
        let s = Settings::resolve(&args, file, env).unwrap();
        assert_eq!(s.kafka.properties["security.protocol"], "SASL_SSL");
        assert_eq!(s.kafka.properties["linger.ms"], "2");
        assert_eq!(s.kafka.redacted_properties()["sasl.password"], "***");
        assert_eq!(s.kafka.properties.len(), 3);
    }

    #[test]
    fn unknown_key_in_file_is_one_line_naming_key_and_line() {
        let err = parse_file("[kafka]\nbootstrap_servers = \"a:1\"\nbootstrap_server = \"b:2\"\n")
            .unwrap_err();
        assert!(
            err.starts_with("line 3: unknown field `bootstrap_server`"),
            "{err}"
        );
        assert!(!err.contains('\n'));
    }

    #[test]
    fn bad_values_name_the_setting() {
        let cases: Vec<(SettingsArgs, &str)> = vec![
            (
                SettingsArgs {
                    elasticsearch_url: Some("not a url".into()),
                    ..Default::default()
                },
                "ELASTICSEARCH_URL",
            ),
            (
                SettingsArgs {
                    schema_registry_url: Some("ftp://x".into()),
                    ..Default::default()
                },
                "SCHEMA_REGISTRY_URL",
            ),
            (
                SettingsArgs {
                    postgres_url: Some("mysql://u:secret@h/db".into()),
                    ..Default::default()
                },
                "POSTGRES_CONNECTION_STRING",
            ),
            (
                SettingsArgs {
                    bootstrap_servers: Some("localhost".into()),
                    ..Default::default()
                },
                "KAFKA_BOOTSTRAP_SERVERS",
            ),
            (
                SettingsArgs {
                    storage_type: Some("redis".into()),
                    ..Default::default()
                },
                "STORAGE_TYPE",
            ),
            (
                SettingsArgs {
                    aggregation_interval: Some("1m".into()),
                    ..Default::default()
                },
                "AGGREGATION_INTERVAL",
            ),
            (
                SettingsArgs {
                    metrics_address: Some("9464".into()),
                    ..Default::default()
                },
                "EVENTPIPE_METRICS_ADDRESS",
            ),
            (
                SettingsArgs {
                    kafka_properties: vec!["novalue".into()],
                    ..Default::default()
                },
                "kafka.properties",
            ),
        ];
        for (args, expected) in cases {
            let message = resolve(args, "").unwrap_err().to_string();
            assert!(
                message.contains(expected),
                "{message} should name {expected}"
            );
            assert!(!message.contains('\n'));
            assert!(!message.contains("secret"), "password leaked: {message}");
        }
    }
}
