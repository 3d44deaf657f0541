//! Settings of `eventpipe gateway`: its flags (each falling back to its environment variable),
//! the file's `[gateway]` table and the resolved `GatewaySettings`, with one-line errors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use super::console::stages::repeated_name;
use super::console::{StageTarget, DEFAULT_STAGES};
use crate::config::{redact_url, Settings};
use crate::settings::{layer, ConfigError, FileTable, Setting, SettingName};
use crate::store::settings::named_or_stored_topics;

/// Flags of `eventpipe gateway`; each falls back to its environment variable, then the file.
#[derive(Default, Clone, Args)]
pub struct GatewayArgs {
    /// Address the HTTP API listens on (default: 127.0.0.1:19480).
    #[arg(long, env = "EVENTPIPE_GATEWAY_LISTEN")]
    pub listen: Option<String>,
    /// Topics the gateway accepts events for and streams, comma-separated (default: those
    /// topics/topics.toml marks `stored`).
    #[arg(long, env = "EVENTPIPE_GATEWAY_TOPICS", value_delimiter = ',')]
    pub topics: Option<Vec<String>>,
    /// Topic definitions whose `stored = true` topics are served by default.
    #[arg(long, env = "EVENTPIPE_TOPICS_FILE")]
    pub topics_file: Option<PathBuf>,
    /// The administrator's credential (a long random string); without it no admin call is
    /// accepted. Never logged.
    #[arg(long, env = "EVENTPIPE_GATEWAY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// JSON pointer into an envelope whose value becomes the record key when the request names
    /// none with ?key= (default: /payload/data/user_id).
    #[arg(long, env = "EVENTPIPE_GATEWAY_KEY_FIELD")]
    pub key_field: Option<String>,
    /// Largest request body in bytes; larger ones are answered 413 (default: 4194304).
    #[arg(long, env = "EVENTPIPE_GATEWAY_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Events being produced at once, over all requests; a request that would exceed it is
    /// answered 429 (default: 10000).
    #[arg(long, env = "EVENTPIPE_GATEWAY_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// How long an event may wait for Kafka's acknowledgement before its request is answered
    /// 503, in milliseconds (default: 10000).
    #[arg(long, env = "EVENTPIPE_GATEWAY_PRODUCE_TIMEOUT_MS")]
    pub produce_timeout_ms: Option<u64>,
    /// Events queued for one client before it counts as slow and is disconnected (it resumes
    /// from its cursor) (default: 1024).
    #[arg(long, env = "EVENTPIPE_GATEWAY_CLIENT_QUEUE")]
    pub client_queue: Option<usize>,
    /// Seconds between SSE keep-alive comments and WebSocket pings (default: 15).
    #[arg(long, env = "EVENTPIPE_GATEWAY_KEEP_ALIVE_SECS")]
    pub keep_alive_secs: Option<u64>,
    /// A client that accepts nothing for this many seconds is disconnected (default: 30).
    #[arg(long, env = "EVENTPIPE_GATEWAY_WRITE_TIMEOUT_SECS")]
    pub write_timeout_secs: Option<u64>,
    /// Catch-up reads from Kafka running at once; more clients catching up wait (default: 16).
    #[arg(long, env = "EVENTPIPE_GATEWAY_MAX_CATCH_UPS")]
    pub max_catch_ups: Option<usize>,
    /// PEM certificate chain: serve HTTPS instead of HTTP (with --tls-key).
    #[arg(long, env = "EVENTPIPE_GATEWAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert, PKCS#8 (`openssl pkcs8 -topk8 -nocrypt` converts others).
    #[arg(long, env = "EVENTPIPE_GATEWAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// A stage the console shows: NAME=URL of its /metrics, or NAME=self for this gateway;
    /// repeat it, or comma-separate (default: scripts/demo's dispatch, log, aggregate and store
    /// ports, and gateway=self).
    #[arg(
        long = "console-stage",
        value_name = "NAME=URL",
        env = "EVENTPIPE_GATEWAY_CONSOLE_STAGES",
        value_delimiter = ','
    )]
    pub console_stages: Option<Vec<String>>,
    /// Redis of the photo cache (default: redis://127.0.0.1:16379, the local stack's).
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// How long a cached photo lives in Redis, in seconds (default: 300).
    #[arg(long, env = "EVENTPIPE_GATEWAY_PHOTO_CACHE_TTL_SECS")]
    pub photo_cache_ttl_secs: Option<u64>,
    /// Prefix of the photo cache's Redis keys, so catalogues sharing a Redis keep apart
    /// (default: eventpipe:photo:).
    #[arg(long, env = "EVENTPIPE_GATEWAY_PHOTO_CACHE_PREFIX")]
    pub photo_cache_prefix: Option<String>,
    /// The products' table, as `eventpipe materialise --table` keeps it (default: products).
    #[arg(long, env = "EVENTPIPE_GATEWAY_PRODUCTS_TABLE")]
    pub products_table: Option<String>,
}

impl std::fmt::Debug for GatewayArgs {
    // By hand: the admin token must never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayArgs")
            .field("listen", &self.listen)
            .field("topics", &self.topics)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

/// The config file's `[gateway]` table.
#[derive(Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileGateway {
    pub listen: Option<String>,
    pub topics: Option<Vec<String>>,
    pub topics_file: Option<PathBuf>,
    pub admin_token: Option<String>,
    pub key_field: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub max_in_flight: Option<usize>,
    pub produce_timeout_ms: Option<u64>,
    pub client_queue: Option<usize>,
    pub keep_alive_secs: Option<u64>,
    pub write_timeout_secs: Option<u64>,
    pub max_catch_ups: Option<usize>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub console_stages: Option<Vec<String>>,
    pub redis_url: Option<String>,
    pub photo_cache_ttl_secs: Option<u64>,
    pub photo_cache_prefix: Option<String>,
    pub products_table: Option<String>,
}

impl std::fmt::Debug for FileGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileGateway")
            .field("listen", &self.listen)
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

impl FileTable for FileGateway {
    const NAME: &'static str = "gateway";
}

/// Resolved, validated settings of the gateway.
#[derive(Clone)]
pub struct GatewaySettings {
    pub listen: SocketAddr,
    pub topics: Vec<String>,
    pub admin_token: Option<String>,
    pub key_field: String,
    pub max_body_bytes: usize,
    pub max_in_flight: usize,
    pub produce_timeout: Duration,
    pub client_queue: usize,
    pub keep_alive: Duration,
    pub write_timeout: Duration,
    pub max_catch_ups: usize,
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The stages the console scrapes.
    pub console_stages: Vec<StageTarget>,
    /// The photo cache.
    pub redis_url: String,
    pub photo_cache_ttl: Duration,
    pub photo_cache_prefix: String,
    pub products_table: crate::materialise::table::TableName,
}

impl std::fmt::Debug for GatewaySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewaySettings")
            .field("listen", &self.listen)
            .field("topics", &self.topics)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("key_field", &self.key_field)
            .field("max_in_flight", &self.max_in_flight)
            .field("client_queue", &self.client_queue)
            .finish_non_exhaustive()
    }
}

const REDIS_URL: Setting<String> = Setting::new("gateway.redis_url", "REDIS_URL", "--redis-url")
    .default("redis://127.0.0.1:16379");
const PHOTO_CACHE_TTL_SECS: Setting<u64> = Setting::new(
    "gateway.photo_cache_ttl_secs",
    "EVENTPIPE_GATEWAY_PHOTO_CACHE_TTL_SECS",
    "--photo-cache-ttl-secs",
)
.default(300)
.between(1, 7 * 86_400);
const PHOTO_CACHE_PREFIX: Setting<String> = Setting::new(
    "gateway.photo_cache_prefix",
    "EVENTPIPE_GATEWAY_PHOTO_CACHE_PREFIX",
    "--photo-cache-prefix",
)
.default("eventpipe:photo:");
const PRODUCTS_TABLE: Setting<String> = Setting::new(
    "gateway.products_table",
    "EVENTPIPE_GATEWAY_PRODUCTS_TABLE",
    "--products-table",
)
.default("products");

const LISTEN: Setting<String> =
    Setting::new("gateway.listen", "EVENTPIPE_GATEWAY_LISTEN", "--listen")
        .default("127.0.0.1:19480");
const TOPICS: Setting<String> =
    Setting::new("gateway.topics", "EVENTPIPE_GATEWAY_TOPICS", "--topics").topic_name();
const TOPICS_FILE: Setting<PathBuf> = Setting::new(
    "gateway.topics_file",
    "EVENTPIPE_TOPICS_FILE",
    "--topics-file",
)
.default("topics/topics.toml");
const ADMIN_TOKEN: Setting<String> = Setting::new(
    "gateway.admin_token",
    "EVENTPIPE_GATEWAY_ADMIN_TOKEN",
    "--admin-token",
);
const KEY_FIELD: Setting<String> = Setting::new(
    "gateway.key_field",
    "EVENTPIPE_GATEWAY_KEY_FIELD",
    "--key-field",
)
.default("/payload/data/user_id");
const MAX_BODY_BYTES: Setting<usize> = Setting::new(
    "gateway.max_body_bytes",
    "EVENTPIPE_GATEWAY_MAX_BODY_BYTES",
    "--max-body-bytes",
)
.default(4 * 1024 * 1024)
.between(1024, 256 * 1024 * 1024);
const MAX_IN_FLIGHT: Setting<usize> = Setting::new(
    "gateway.max_in_flight",
    "EVENTPIPE_GATEWAY_MAX_IN_FLIGHT",
    "--max-in-flight",
)
.default(10_000)
.between(1, 10_000_000);
const PRODUCE_TIMEOUT_MS: Setting<u64> = Setting::new(
    "gateway.produce_timeout_ms",
    "EVENTPIPE_GATEWAY_PRODUCE_TIMEOUT_MS",
    "--produce-timeout-ms",
)
.default(10_000)
.between(100, 600_000);
const CLIENT_QUEUE: Setting<usize> = Setting::new(
    "gateway.client_queue",
    "EVENTPIPE_GATEWAY_CLIENT_QUEUE",
    "--client-queue",
)
.default(1024)
.between(1, 1_000_000);
const KEEP_ALIVE_SECS: Setting<u64> = Setting::new(
    "gateway.keep_alive_secs",
    "EVENTPIPE_GATEWAY_KEEP_ALIVE_SECS",
    "--keep-alive-secs",
)
.default(15)
.between(1, 3600);
const WRITE_TIMEOUT_SECS: Setting<u64> = Setting::new(
    "gateway.write_timeout_secs",
    "EVENTPIPE_GATEWAY_WRITE_TIMEOUT_SECS",
    "--write-timeout-secs",
)
.default(30)
.between(1, 3600);
const MAX_CATCH_UPS: Setting<usize> = Setting::new(
    "gateway.max_catch_ups",
    "EVENTPIPE_GATEWAY_MAX_CATCH_UPS",
    "--max-catch-ups",
)
.default(16)
.between(1, 1024);
const TLS_CERT: Setting<PathBuf> = Setting::new(
    "gateway.tls_cert",
    "EVENTPIPE_GATEWAY_TLS_CERT",
    "--tls-cert",
);
const TLS_KEY: Setting<PathBuf> =
    Setting::new("gateway.tls_key", "EVENTPIPE_GATEWAY_TLS_KEY", "--tls-key");
const CONSOLE_STAGES: SettingName = SettingName::new(
    "gateway.console_stages",
    "EVENTPIPE_GATEWAY_CONSOLE_STAGES",
    "--console-stage",
);

/// The console's stages: the flag's (or its variable's), else the file's, else the defaults.
fn console_stages(args: &GatewayArgs, file: &FileGateway) -> Result<Vec<StageTarget>, ConfigError> {
    let texts: Vec<String> = layer(&args.console_stages, &file.console_stages)
        .unwrap_or_else(|| DEFAULT_STAGES.iter().map(|s| s.to_string()).collect());
    let targets = texts
        .iter()
        .map(|text| {
            // The reason never repeats the URL's password; the value shown is redacted too.
            StageTarget::parse(text)
                .map_err(|reason| CONSOLE_STAGES.invalid(redact_stage(text), reason))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(name) = repeated_name(&targets) {
        return Err(CONSOLE_STAGES.invalid(name, "a stage name given twice"));
    }
    Ok(targets)
}

/// `NAME=URL` with the URL's password hidden.
fn redact_stage(text: &str) -> String {
    match text.split_once('=') {
        Some((name, url)) => format!("{name}={}", redact_url(url)),
        None => text.to_string(),
    }
}

impl GatewaySettings {
    pub fn load(args: &GatewayArgs, settings: &Settings) -> Result<GatewaySettings, ConfigError> {
        Self::resolve(args, &settings.file.table()?)
    }

    pub fn resolve(args: &GatewayArgs, file: &FileGateway) -> Result<GatewaySettings, ConfigError> {
        let listen_text = LISTEN.resolve(&args.listen, &file.listen)?;
        let listen: SocketAddr = listen_text.parse().map_err(|e| {
            LISTEN.invalid(listen_text.clone(), format!("{e} (e.g. 127.0.0.1:19480)"))
        })?;
        let topics = named_or_stored_topics(
            (&TOPICS, &args.topics, &file.topics),
            (&TOPICS_FILE, &args.topics_file, &file.topics_file),
        )?;
        // Set but empty (`EVENTPIPE_GATEWAY_ADMIN_TOKEN=` in a compose file) means none.
        let admin_token = ADMIN_TOKEN
            .optional(&args.admin_token, &file.admin_token)?
            .filter(|token| !token.is_empty());
        if let Some(token) = &admin_token {
            if token.len() < 16 {
                // The value itself is never echoed: it is a secret.
                return Err(ADMIN_TOKEN.invalid(
                    "<redacted>",
                    "use at least 16 characters (e.g. openssl rand -hex 32)",
                ));
            }
        }
        let key_field = KEY_FIELD.resolve(&args.key_field, &file.key_field)?;
        if !key_field.is_empty() && !key_field.starts_with('/') {
            return Err(KEY_FIELD.invalid(
                key_field,
                "a JSON pointer starts with / (e.g. /payload/data/user_id), or is empty for none",
            ));
        }
        let tls = match (
            TLS_CERT.optional(&args.tls_cert, &file.tls_cert)?,
            TLS_KEY.optional(&args.tls_key, &file.tls_key)?,
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(cert), None) => {
                return Err(TLS_KEY.invalid(
                    "",
                    format!("--tls-cert {} needs its private key", cert.display()),
                ))
            }
            (None, Some(key)) => {
                return Err(TLS_CERT.invalid(
                    "",
                    format!("--tls-key {} needs its certificate", key.display()),
                ))
            }
        };
        Ok(GatewaySettings {
            listen,
            topics,
            admin_token,
            key_field,
            max_body_bytes: MAX_BODY_BYTES.resolve(&args.max_body_bytes, &file.max_body_bytes)?,
            max_in_flight: MAX_IN_FLIGHT.resolve(&args.max_in_flight, &file.max_in_flight)?,
            produce_timeout: Duration::from_millis(
                PRODUCE_TIMEOUT_MS.resolve(&args.produce_timeout_ms, &file.produce_timeout_ms)?,
            ),
            client_queue: CLIENT_QUEUE.resolve(&args.client_queue, &file.client_queue)?,
            keep_alive: Duration::from_secs(
                KEEP_ALIVE_SECS.resolve(&args.keep_alive_secs, &file.keep_alive_secs)?,
            ),
            write_timeout: Duration::from_secs(
                WRITE_TIMEOUT_SECS.resolve(&args.write_timeout_secs, &file.write_timeout_secs)?,
            ),
            max_catch_ups: MAX_CATCH_UPS.resolve(&args.max_catch_ups, &file.max_catch_ups)?,
            tls,
            console_stages: console_stages(args, file)?,
            redis_url: REDIS_URL.resolve_with(&args.redis_url, &file.redis_url, |text| {
                match url::Url::parse(text) {
                    Ok(url) if matches!(url.scheme(), "redis" | "rediss") => Ok(text.clone()),
                    Ok(_) => Err("expected a redis:// or rediss:// URL".into()),
                    Err(error) => Err(format!("{error} (e.g. redis://127.0.0.1:16379)")),
                }
            })?,
            photo_cache_ttl: Duration::from_secs(
                PHOTO_CACHE_TTL_SECS
                    .resolve(&args.photo_cache_ttl_secs, &file.photo_cache_ttl_secs)?,
            ),
            photo_cache_prefix: PHOTO_CACHE_PREFIX
                .resolve(&args.photo_cache_prefix, &file.photo_cache_prefix)?,
            products_table: PRODUCTS_TABLE.resolve_with(
                &args.products_table,
                &file.products_table,
                |name| crate::materialise::table::TableName::parse(name),
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_topics() -> GatewayArgs {
        GatewayArgs {
            topics: Some(vec!["task_in".into()]),
            ..GatewayArgs::default()
        }
    }

    #[test]
    fn defaults_serve_the_stored_topics_on_a_loopback_port() {
        let args = GatewayArgs {
            topics_file: Some(concat!(env!("CARGO_MANIFEST_DIR"), "/topics/topics.toml").into()),
            ..GatewayArgs::default()
        };
        let settings = GatewaySettings::resolve(&args, &FileGateway::default()).unwrap();
        assert_eq!(settings.listen.to_string(), "127.0.0.1:19480");
        assert_eq!(
            settings.topics,
            ["create_user_in", "update_user_in", "task_in", "info_in"].map(String::from)
        );
        assert_eq!(settings.keep_alive, Duration::from_secs(15));
        assert!(settings.admin_token.is_none());
    }

    #[test]
    fn console_stages_default_to_the_demo_and_are_checked() {
        let settings = GatewaySettings::resolve(&with_topics(), &FileGateway::default()).unwrap();
        let names: Vec<&str> = settings
            .console_stages
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["dispatch", "log", "aggregate", "store", "gateway"]);
        let file = FileGateway {
            console_stages: Some(vec!["d=http://127.0.0.1:1/metrics".into()]),
            ..FileGateway::default()
        };
        let settings = GatewaySettings::resolve(&with_topics(), &file).unwrap();
        assert_eq!(settings.console_stages.len(), 1);
        for bad in [
            vec!["d=ftp://u:hunter2@h/".to_string()],
            vec!["d=self".into(), "d=self".into()],
            vec!["nameless".into()],
        ] {
            let args = GatewayArgs {
                console_stages: Some(bad.clone()),
                ..with_topics()
            };
            let error = GatewaySettings::resolve(&args, &FileGateway::default())
                .unwrap_err()
                .to_string();
            assert!(error.contains("--console-stage"), "{error}");
            assert!(!error.contains("hunter2"), "{error}");
        }
    }

    #[test]
    fn bad_settings_name_the_setting_and_never_echo_the_admin_token() {
        let short = GatewayArgs {
            admin_token: Some("hunter2".into()),
            ..with_topics()
        };
        let error = GatewaySettings::resolve(&short, &FileGateway::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("--admin-token"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
        let listen = GatewayArgs {
            listen: Some("localhost".into()),
            ..with_topics()
        };
        let error = GatewaySettings::resolve(&listen, &FileGateway::default()).unwrap_err();
        assert!(error.to_string().contains("--listen"), "{error}");
        let half_tls = GatewayArgs {
            tls_cert: Some("cert.pem".into()),
            ..with_topics()
        };
        let error = GatewaySettings::resolve(&half_tls, &FileGateway::default()).unwrap_err();
        assert!(error.to_string().contains("--tls-key"), "{error}");
        let secret = GatewayArgs {
            admin_token: Some("a-long-secret-admin-token".into()),
            ..with_topics()
        };
        let settings = GatewaySettings::resolve(&secret, &FileGateway::default()).unwrap();
        assert!(!format!("{settings:?}{secret:?}").contains("a-long-secret"));
        let empty = GatewayArgs {
            admin_token: Some(String::new()),
            ..with_topics()
        };
        let settings = GatewaySettings::resolve(&empty, &FileGateway::default()).unwrap();
        assert!(settings.admin_token.is_none(), "empty means no admin token");
    }
}
