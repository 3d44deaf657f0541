//! The global settings — Kafka, the shared services' URLs, record formats, telemetry — and the
//! config file, whose per-stage tables (`[dispatch]`, `[log]`, `[aggregate]`) each stage reads
//! itself (`ConfigFile::table`). Resolution is `settings::Setting`'s: flags > environment >
//! config file > defaults. Environment names follow the existing services
//! (KAFKA_BOOTSTRAP_SERVERS, ELASTICSEARCH_URL, ...).

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use url::Url;

use crate::settings::{layer, topic_name, ConfigError, FileTable, Setting, SettingName};

/// Defaults point at the local stack that `scripts/stack up` starts, so a developer needs no setup.
pub const DEFAULT_BOOTSTRAP_SERVERS: &str = "127.0.0.1:19092";
pub const DEFAULT_ELASTICSEARCH_URL: &str = "http://127.0.0.1:19200";
pub const DEFAULT_SCHEMA_REGISTRY_URL: &str = "http://127.0.0.1:18081/apis/ccompat/v7";
pub const DEFAULT_POSTGRES_URL: &str = "postgres://eventpipe:eventpipe@127.0.0.1:15432/eventpipe";
pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:9464";

/// Environment variables with this prefix become librdkafka properties:
/// `EVENTPIPE_KAFKA_SECURITY_PROTOCOL=SSL` sets `security.protocol=SSL`.
pub const KAFKA_PROPERTY_ENV_PREFIX: &str = "EVENTPIPE_KAFKA_";

const BOOTSTRAP: Setting<String> = Setting::new(
    "kafka.bootstrap_servers",
    "KAFKA_BOOTSTRAP_SERVERS",
    "--bootstrap-servers",
)
.default(DEFAULT_BOOTSTRAP_SERVERS)
.check(host_ports);
const CONNECT_TIMEOUT: Setting<u64> = Setting::new(
    "kafka.connect_timeout_secs",
    "EVENTPIPE_CONNECT_TIMEOUT_SECS",
    "--connect-timeout-secs",
)
.default(15)
.at_least(1);
const KAFKA_PROPERTY: SettingName = SettingName::new(
    "kafka.properties",
    "EVENTPIPE_KAFKA_<PROPERTY>",
    "-X/--kafka-property",
);
const ELASTICSEARCH: Setting<String> = Setting::new(
    "elasticsearch.url",
    "ELASTICSEARCH_URL",
    "--elasticsearch-url",
)
.default(DEFAULT_ELASTICSEARCH_URL);
const SCHEMA_REGISTRY: Setting<String> = Setting::new(
    "schema_registry.url",
    "SCHEMA_REGISTRY_URL",
    "--schema-registry-url",
)
.default(DEFAULT_SCHEMA_REGISTRY_URL);
const POSTGRES: Setting<String> = Setting::new(
    "postgres.url",
    "POSTGRES_CONNECTION_STRING",
    "--postgres-url",
)
.default(DEFAULT_POSTGRES_URL);
const INPUT_FORMAT: Setting<String> = Setting::new(
    "codec.input_format",
    "EVENTPIPE_INPUT_FORMAT",
    "--input-format",
)
.default("json");
const OUTPUT_FORMAT: Setting<String> = Setting::new(
    "codec.output_format",
    "EVENTPIPE_OUTPUT_FORMAT",
    "--output-format",
)
.default("json");
const TOPIC_FORMAT: SettingName =
    SettingName::new("codec.topics", "EVENTPIPE_TOPIC_FORMATS", "--topic-format");
const AUTO_REGISTER: Setting<bool> = Setting::new(
    "codec.auto_register",
    "EVENTPIPE_SCHEMA_AUTO_REGISTER",
    "--schema-auto-register",
)
.default(false);
const LOG_FORMAT: Setting<String> = Setting::new(
    "telemetry.log_format",
    "EVENTPIPE_LOG_FORMAT",
    "--log-format",
)
.default("text");
/// Without a value in any layer: `RUST_LOG`, else `info`.
const LOG_LEVEL: Setting<String> =
    Setting::new("telemetry.log_level", "EVENTPIPE_LOG", "--log-level");
const METRICS_ADDRESS: Setting<String> = Setting::new(
    "telemetry.metrics_address",
    "EVENTPIPE_METRICS_ADDRESS",
    "--metrics-address",
)
.default(DEFAULT_METRICS_ADDRESS);

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
    /// Elasticsearch URL (also a flag of the commands that use it).
    #[arg(long, env = "ELASTICSEARCH_URL")]
    pub elasticsearch_url: Option<String>,
    #[arg(long, global = true, env = "SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<String>,
    /// PostgreSQL URL (also a flag of the commands that use it).
    #[arg(long, env = "POSTGRES_CONNECTION_STRING")]
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
    /// Address of the /metrics, /health and /ready endpoint (also a flag of the stages).
    #[arg(long, env = "EVENTPIPE_METRICS_ADDRESS")]
    pub metrics_address: Option<String>,
}

// Global settings only some commands use: their flags are flattened into those commands alone,
// so only their `--help` offers them. Before the command (and as environment variables) they
// are `SettingsArgs`'s, as they always were; given after it, they win.

/// `--elasticsearch-url` of the commands that talk to Elasticsearch.
#[derive(Debug, Default, Clone, Args)]
pub struct ElasticsearchArgs {
    /// Elasticsearch URL [env: ELASTICSEARCH_URL] (default: the local stack's).
    #[arg(long, value_name = "URL")]
    pub elasticsearch_url: Option<String>,
}

/// `--postgres-url` of the commands that talk to PostgreSQL.
#[derive(Debug, Default, Clone, Args)]
pub struct PostgresArgs {
    /// PostgreSQL URL [env: POSTGRES_CONNECTION_STRING] (default: the local stack's).
    #[arg(long, value_name = "URL")]
    pub postgres_url: Option<String>,
}

/// `--metrics-address` of the long-running stages.
#[derive(Debug, Default, Clone, Args)]
pub struct MetricsArgs {
    /// Address of the /metrics, /health and /ready endpoint [env: EVENTPIPE_METRICS_ADDRESS]
    /// (default: 127.0.0.1:9464).
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_address: Option<String>,
}

impl SettingsArgs {
    /// These settings with a command's own flags for them (given after the command) on top.
    pub fn with_command_flags(
        &self,
        elasticsearch: Option<&ElasticsearchArgs>,
        postgres: Option<&PostgresArgs>,
        metrics: Option<&MetricsArgs>,
    ) -> SettingsArgs {
        let after = |flag: Option<&Option<String>>, before: &Option<String>| {
            layer(flag.unwrap_or(&None), before)
        };
        SettingsArgs {
            elasticsearch_url: after(
                elasticsearch.map(|a| &a.elasticsearch_url),
                &self.elasticsearch_url,
            ),
            postgres_url: after(postgres.map(|a| &a.postgres_url), &self.postgres_url),
            metrics_address: after(metrics.map(|a| &a.metrics_address), &self.metrics_address),
            ..self.clone()
        }
    }
}

/// The config file's global tables; unknown keys are errors so typos do not pass silently.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileSettings {
    pub kafka: FileKafka,
    pub elasticsearch: FileUrl,
    pub schema_registry: FileUrl,
    pub postgres: FileUrl,
    pub codec: FileCodec,
    pub telemetry: FileTelemetry,
    // The stages' tables: named so that any other table is an error, read by each stage with
    // its own type (`ConfigFile::table`).
    #[serde(rename = "dispatch")]
    _dispatch: IgnoredAny,
    #[serde(rename = "log")]
    _log: IgnoredAny,
    #[serde(rename = "aggregate")]
    _aggregate: IgnoredAny,
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

/// The config file as read (empty without one): the global tables are parsed at load, each
/// stage's table by the stage, all with the line of a mistake in the error.
#[derive(Debug, Clone, Default)]
pub struct ConfigFile {
    path: PathBuf,
    text: String,
}

impl ConfigFile {
    /// Reads the TOML config file; its tables are parsed on use.
    pub fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(ConfigFile::new(path, text))
    }

    pub fn new(path: impl Into<PathBuf>, text: impl Into<String>) -> ConfigFile {
        ConfigFile {
            path: path.into(),
            text: text.into(),
        }
    }

    /// The global tables.
    pub fn global(&self) -> Result<FileSettings, ConfigError> {
        self.error_in_file(parse_file(&self.text))
    }

    /// A stage's table (its defaults if the file has none), checked by the stage's own type.
    pub fn table<T: FileTable>(&self) -> Result<T, ConfigError> {
        let seed = TableSeed::<T>(PhantomData);
        let parsed = seed.deserialize(toml::Deserializer::new(&self.text));
        self.error_in_file(parsed.map_err(|e| one_line(&self.text, &e)))
    }

    fn error_in_file<T>(&self, parsed: Result<T, String>) -> Result<T, ConfigError> {
        parsed.map_err(|reason| ConfigError::File {
            path: self.path.clone(),
            reason,
        })
    }
}

/// Deserializes the document's `T::NAME` table with `T`, skipping the others.
struct TableSeed<T>(PhantomData<T>);

impl<'de, T: FileTable> DeserializeSeed<'de> for TableSeed<T> {
    type Value = T;
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<T, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, T: FileTable> Visitor<'de> for TableSeed<T> {
    type Value = T;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a config file with an optional [{}] table", T::NAME)
    }
    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<T, M::Error> {
        let mut table = T::default();
        while let Some(key) = map.next_key::<String>()? {
            if key == T::NAME {
                table = map.next_value()?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(table)
    }
}

/// Resolved, validated global settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub elasticsearch_url: Url,
    pub schema_registry_url: Url,
    pub postgres_url: Url,
    /// Which topics are JSON and which Avro.
    pub codec: CodecSettings,
    pub telemetry: TelemetrySettings,
    /// The config file, for the stages' tables.
    pub file: ConfigFile,
}

/// A topic's record format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Json,
    Avro,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(text: &str) -> Result<Format, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "json" => Ok(Format::Json),
            "avro" => Ok(Format::Avro),
            other => Err(format!("unknown format {other:?} (expected json or avro)")),
        }
    }
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Avro => "avro",
        }
    }
}

/// Which format each topic uses: a default for the topics a stage reads, one for the topics it
/// writes, and per-topic overrides (a topic has one format, whoever reads or writes it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CodecSettings {
    pub input: Format,
    pub output: Format,
    pub topics: BTreeMap<String, Format>,
    /// Register the stage's writer schema when its subject lacks it (off: `schemas register`
    /// is the deliberate, compatibility-checked step; a stage should not evolve a contract).
    pub auto_register: bool,
}

impl CodecSettings {
    pub fn input_format(&self, topic: &str) -> Format {
        self.topics.get(topic).copied().unwrap_or(self.input)
    }

    pub fn output_format(&self, topic: &str) -> Format {
        self.topics.get(topic).copied().unwrap_or(self.output)
    }

    /// Whether any topic may be Avro, i.e. whether a registry client is needed at all.
    pub fn uses_avro(&self) -> bool {
        self.input == Format::Avro
            || self.output == Format::Avro
            || self.topics.values().any(|f| *f == Format::Avro)
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

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(text: &str) -> Result<LogFormat, String> {
        match text.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected text or json".into()),
        }
    }
}

impl Settings {
    /// Reads the config file (if any) and the process environment, then merges with `args`.
    pub fn load(args: &SettingsArgs) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            Some(path) => ConfigFile::read(path)?,
            None => ConfigFile::default(),
        };
        let env_properties = kafka_properties_from_env(std::env::vars());
        Settings::resolve(args, file, env_properties)
    }

    /// Pure merge of the layers; `env_properties` are the `EVENTPIPE_KAFKA_*` variables.
    pub fn resolve(
        args: &SettingsArgs,
        file: ConfigFile,
        env_properties: BTreeMap<String, String>,
    ) -> Result<Settings, ConfigError> {
        let global = file.global()?;
        let bootstrap_servers =
            BOOTSTRAP.resolve(&args.bootstrap_servers, &global.kafka.bootstrap_servers)?;
        let properties = kafka_properties(
            global.kafka.properties,
            env_properties,
            &args.kafka_properties,
        )?;
        let connect_timeout = Duration::from_secs(CONNECT_TIMEOUT.resolve(
            &args.connect_timeout_secs,
            &global.kafka.connect_timeout_secs,
        )?);
        let elasticsearch_url = ELASTICSEARCH.resolve_with(
            &args.elasticsearch_url,
            &global.elasticsearch.url,
            |raw| http_url(raw),
        )?;
        let schema_registry_url = SCHEMA_REGISTRY.resolve_with(
            &args.schema_registry_url,
            &global.schema_registry.url,
            |raw| http_url(raw),
        )?;
        // Resolved by hand: the error shows the URL without its password.
        let postgres_raw = POSTGRES.resolve(&args.postgres_url, &global.postgres.url)?;
        let postgres_url = postgres_url(&postgres_raw)
            .map_err(|reason| POSTGRES.invalid(redact_url(&postgres_raw), reason))?;
        let codec = resolve_codec(args, global.codec)?;
        let telemetry = TelemetrySettings {
            log_format: LOG_FORMAT.resolve_with(
                &args.log_format,
                &global.telemetry.log_format,
                |raw| raw.parse(),
            )?,
            log_filter: LOG_LEVEL.resolve_or(
                &args.log_level,
                &global.telemetry.log_level,
                || std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )?,
            metrics_address: METRICS_ADDRESS.resolve_with(
                &args.metrics_address,
                &global.telemetry.metrics_address,
                |raw| {
                    raw.parse::<SocketAddr>()
                        .map_err(|e| format!("{e} (expected IP:PORT)"))
                },
            )?,
        };
        Ok(Settings {
            kafka: KafkaSettings {
                bootstrap_servers,
                properties,
                connect_timeout,
            },
            elasticsearch_url,
            schema_registry_url,
            postgres_url,
            codec,
            telemetry,
            file,
        })
    }
}

/// The file's properties, then the environment's, then the flags'.
fn kafka_properties(
    mut properties: BTreeMap<String, String>,
    env_properties: BTreeMap<String, String>,
    flags: &[String],
) -> Result<BTreeMap<String, String>, ConfigError> {
    properties.extend(env_properties);
    for pair in flags {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| KAFKA_PROPERTY.invalid(pair.as_str(), "expected KEY=VALUE"))?;
        properties.insert(key.trim().to_string(), value.trim().to_string());
    }
    if properties.contains_key("bootstrap.servers") {
        return Err(KAFKA_PROPERTY.invalid(
            "bootstrap.servers",
            format!("set {} instead", BOOTSTRAP.name),
        ));
    }
    Ok(properties)
}

/// Formats: flags (and their variables) over the file's `[codec]` table, json by default.
fn resolve_codec(args: &SettingsArgs, file: FileCodec) -> Result<CodecSettings, ConfigError> {
    let format = |raw: &String| raw.parse::<Format>();
    let topic_format = |raw: &str| {
        raw.parse::<Format>()
            .map_err(|reason| TOPIC_FORMAT.invalid(raw, reason))
    };
    let mut topics = BTreeMap::new();
    for (topic, raw) in file.topics {
        topics.insert(topic, topic_format(&raw)?);
    }
    for pair in args.topic_formats.iter().filter(|p| !p.trim().is_empty()) {
        let (topic, raw) = pair
            .split_once('=')
            .ok_or_else(|| TOPIC_FORMAT.invalid(pair.as_str(), "expected TOPIC=json|avro"))?;
        topic_name(topic.trim()).map_err(|reason| TOPIC_FORMAT.invalid(pair.as_str(), reason))?;
        topics.insert(topic.trim().to_string(), topic_format(raw)?);
    }
    Ok(CodecSettings {
        input: INPUT_FORMAT.resolve_with(&args.input_format, &file.input_format, format)?,
        output: OUTPUT_FORMAT.resolve_with(&args.output_format, &file.output_format, format)?,
        topics,
        auto_register: AUTO_REGISTER.resolve(&args.schema_auto_register, &file.auto_register)?,
    })
}

/// Parses config text's global tables; the error is a single line (`line N: message`).
pub fn parse_file(text: &str) -> Result<FileSettings, String> {
    toml::from_str::<FileSettings>(text).map_err(|e| one_line(text, &e))
}

/// A TOML error as one line, with the line number of the mistake.
fn one_line(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

/// Variables of `scripts/stack` that share the prefix but set the local broker's ports, not a
/// client property (librdkafka has neither `port` nor `controller.port`): a shell that moved the
/// stack's ports must still run the stages.
const STACK_ONLY_KAFKA_VARS: [&str; 2] =
    ["EVENTPIPE_KAFKA_PORT", "EVENTPIPE_KAFKA_CONTROLLER_PORT"];

/// Collects `EVENTPIPE_KAFKA_SOME_NAME=value` into `some.name=value`.
pub fn kafka_properties_from_env(
    vars: impl Iterator<Item = (String, String)>,
) -> BTreeMap<String, String> {
    vars.filter_map(|(name, value)| {
        if STACK_ONLY_KAFKA_VARS.contains(&name.as_str()) {
            return None;
        }
        let rest = name.strip_prefix(KAFKA_PROPERTY_ENV_PREFIX)?;
        if rest.is_empty() {
            return None;
        }
        Some((rest.to_ascii_lowercase().replace('_', "."), value))
    })
    .collect()
}

/// The check of `kafka.bootstrap_servers`: a comma-separated list of host:port.
fn host_ports(servers: &str) -> Result<(), String> {
    if servers.trim().is_empty() {
        return Err("must not be empty".into());
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
            return Err(format!("{server:?} is not host:port"));
        }
    }
    Ok(())
}

fn http_url(raw: &str) -> Result<Url, String> {
    let mut url = Url::parse(raw.trim()).map_err(|e| e.to_string())?;
    // A trailing slash makes `join("subjects")` append instead of replacing the last segment.
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("expected an http:// or https:// URL with a host".into());
    }
    Ok(url)
}

fn postgres_url(raw: &str) -> Result<Url, String> {
    let url = Url::parse(raw.trim()).map_err(|e| e.to_string())?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err("expected postgres://user:password@host:port/database".into());
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
        Settings::resolve(&args, ConfigFile::new("test.toml", file), BTreeMap::new())
    }

    #[test]
    fn defaults_point_at_the_local_stack() {
        let s = resolve(SettingsArgs::default(), "").unwrap();
        assert_eq!(s.kafka.bootstrap_servers, DEFAULT_BOOTSTRAP_SERVERS);
        assert_eq!(s.kafka.connect_timeout, Duration::from_secs(15));
        assert_eq!(s.elasticsearch_url.as_str(), "http://127.0.0.1:19200/");
        assert_eq!(
            s.schema_registry_url.join("subjects").unwrap().as_str(),
            "http://127.0.0.1:18081/apis/ccompat/v7/subjects"
        );
        assert_eq!(s.postgres_url.as_str(), DEFAULT_POSTGRES_URL);
        assert_eq!(s.codec, CodecSettings::default());
        assert_eq!(s.telemetry.log_format, LogFormat::Text);
        assert_eq!(
            s.telemetry.metrics_address.to_string(),
            DEFAULT_METRICS_ADDRESS
        );
    }

    #[test]
    fn flags_beat_file_and_file_beats_defaults() {
        let file = "[kafka]\nbootstrap_servers = \"file:1\"\nconnect_timeout_secs = 5\n[codec]\ninput_format = \"avro\"\n";
        let s = resolve(SettingsArgs::default(), file).unwrap();
        assert_eq!(s.kafka.bootstrap_servers, "file:1");
        assert_eq!(s.kafka.connect_timeout, Duration::from_secs(5));
        assert_eq!(s.codec.input, Format::Avro);

        let args = SettingsArgs {
            bootstrap_servers: Some("flag:2".into()),
            input_format: Some("json".into()),
            ..Default::default()
        };
        let s = resolve(args, file).unwrap();
        assert_eq!(s.kafka.bootstrap_servers, "flag:2");
        assert_eq!(s.kafka.connect_timeout, Duration::from_secs(5));
        assert_eq!(s.codec.input, Format::Json);
    }

    #[test]
    fn a_commands_own_flags_beat_those_before_it() {
        let before = SettingsArgs {
            elasticsearch_url: Some("http://before:1".into()),
            postgres_url: Some("postgres://before/db".into()),
            ..Default::default()
        };
        let after = ElasticsearchArgs {
            elasticsearch_url: Some("http://after:2".into()),
        };
        let args = before.with_command_flags(Some(&after), Some(&PostgresArgs::default()), None);
        assert_eq!(args.elasticsearch_url.as_deref(), Some("http://after:2"));
        assert_eq!(args.postgres_url.as_deref(), Some("postgres://before/db"));
        assert_eq!(args.metrics_address, None);
    }

    #[test]
    fn kafka_properties_merge_file_env_then_flags() {
        let file = ConfigFile::new(
            "test.toml",
            "[kafka.properties]\n\"security.protocol\" = \"SSL\"\n\"linger.ms\" = \"1\"\n",
        );
        let env = kafka_properties_from_env(
            [
                ("EVENTPIPE_KAFKA_LINGER_MS".to_string(), "2".to_string()),
                (
                    "EVENTPIPE_KAFKA_SASL_PASSWORD".to_string(),
                    "hunter2".to_string(),
                ),
                ("UNRELATED".to_string(), "x".to_string()),
                // scripts/stack's broker ports: not client properties.
                ("EVENTPIPE_KAFKA_PORT".to_string(), "29092".to_string()),
                (
                    "EVENTPIPE_KAFKA_CONTROLLER_PORT".to_string(),
                    "29093".to_string(),
                ),
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
        let err = parse_file("[kafka]\n[stage]\n").unwrap_err();
        assert!(err.starts_with("line 2: unknown field `stage`"), "{err}");
    }

    #[derive(Debug, Default, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct FileStage {
        size: Option<u32>,
    }

    impl FileTable for FileStage {
        const NAME: &'static str = "log";
    }

    #[test]
    fn a_stage_reads_its_own_table_with_the_line_of_a_mistake() {
        let file = ConfigFile::new("x.toml", "[kafka]\n[log]\nsize = 3\n[aggregate]\nz = 1\n");
        assert_eq!(file.table::<FileStage>().unwrap().size, Some(3));
        assert_eq!(
            ConfigFile::default().table::<FileStage>().unwrap(),
            FileStage::default()
        );
        let file = ConfigFile::new("x.toml", "[log]\nsize = 3\nsise = 4\n");
        let err = file.table::<FileStage>().unwrap_err().to_string();
        assert!(
            err.starts_with("config file x.toml: line 3: unknown field `sise`"),
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
                    connect_timeout_secs: Some(0),
                    ..Default::default()
                },
                "EVENTPIPE_CONNECT_TIMEOUT_SECS",
            ),
            (
                SettingsArgs {
                    input_format: Some("xml".into()),
                    ..Default::default()
                },
                "EVENTPIPE_INPUT_FORMAT",
            ),
            (
                SettingsArgs {
                    topic_formats: vec!["a b=avro".into()],
                    ..Default::default()
                },
                "EVENTPIPE_TOPIC_FORMATS",
            ),
            (
                SettingsArgs {
                    log_format: Some("xml".into()),
                    ..Default::default()
                },
                "EVENTPIPE_LOG_FORMAT",
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
