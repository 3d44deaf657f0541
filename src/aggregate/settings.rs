//! Settings of `eventpipe aggregate`, all in one place: its flags (each falling back to its
//! environment variable), the file's `[aggregate]` table and the resolved `AggregateSettings`.

use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use super::pipeline::{AggregateCodecs, PipelineConfig};
use super::window::EngineConfig;
use crate::config::Settings;
use crate::settings::{ConfigError, FileTable, Setting};

/// Flags of `eventpipe aggregate`; each falls back to its environment variable, then the file.
#[derive(Debug, Default, Clone, Args)]
pub struct AggregateArgs {
    /// Aggregate sink: kafka or postgres.
    #[arg(long, env = "STORAGE_TYPE")]
    pub storage_type: Option<String>,
    /// Topic the aggregator writes to when the sink is kafka.
    #[arg(long, env = "KAFKA_TOPIC")]
    pub kafka_topic: Option<String>,
    /// Aggregation window in seconds.
    #[arg(long, env = "AGGREGATION_INTERVAL")]
    pub aggregation_interval: Option<String>,
    /// Topic of input events (its dead letters go to `<topic>.dlq`).
    #[arg(long, env = "EVENTPIPE_AGGREGATE_INPUT_TOPIC")]
    pub input_topic: Option<String>,
    #[arg(long, env = "EVENTPIPE_AGGREGATE_GROUP_ID")]
    pub group_id: Option<String>,
    /// Hopping windows: start a window every this many ms (default: the interval, tumbling).
    #[arg(long, env = "EVENTPIPE_AGGREGATE_ADVANCE_MS")]
    pub advance_ms: Option<u64>,
    /// How far event time may go backwards before a window closes (watermark = max − this).
    #[arg(long, env = "EVENTPIPE_AGGREGATE_ALLOWED_LATENESS_MS")]
    pub allowed_lateness_ms: Option<u64>,
    /// How long after closing a window still accepts late events (and is re-emitted).
    #[arg(long, env = "EVENTPIPE_AGGREGATE_GRACE_MS")]
    pub grace_ms: Option<u64>,
    /// Emit a partition's windows after this much wall-clock time without events.
    #[arg(long, env = "EVENTPIPE_AGGREGATE_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Cap on open (name × function × window) aggregates; beyond it the oldest is force-emitted.
    #[arg(long, env = "EVENTPIPE_AGGREGATE_MAX_OPEN_WINDOWS")]
    pub max_open_windows: Option<usize>,
    /// Topic of the periodic JSON metrics records.
    #[arg(long, env = "EVENTPIPE_AGGREGATE_METRICS_TOPIC")]
    pub metrics_topic: Option<String>,
    #[arg(long, env = "EVENTPIPE_AGGREGATE_METRICS_INTERVAL_SECS")]
    pub metrics_interval_secs: Option<u64>,
}

/// The config file's `[aggregate]` table.
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

impl FileTable for FileAggregate {
    const NAME: &'static str = "aggregate";
}

/// Where the aggregates go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageType {
    Kafka,
    Postgres,
}

impl FromStr for StorageType {
    type Err = String;
    fn from_str(text: &str) -> Result<StorageType, String> {
        match text.to_ascii_lowercase().as_str() {
            "kafka" => Ok(StorageType::Kafka),
            "postgres" | "postgresql" => Ok(StorageType::Postgres),
            _ => Err("expected kafka or postgres".into()),
        }
    }
}

/// Resolved, validated settings of the aggregate stage.
#[derive(Debug, Clone)]
pub struct AggregateSettings {
    pub storage_type: StorageType,
    /// The output topic of the Kafka sink.
    pub output_topic: String,
    /// Input, windows and metrics records (the window size is the aggregation interval).
    pub pipeline: PipelineConfig,
}

const STORAGE_TYPE: Setting<String> =
    Setting::new("aggregate.storage_type", "STORAGE_TYPE", "--storage-type").default("kafka");
const OUTPUT_TOPIC: Setting<String> =
    Setting::new("aggregate.output_topic", "KAFKA_TOPIC", "--kafka-topic")
        .default("events_aggregated");
const INTERVAL_SECS: Setting<u64> = Setting::new(
    "aggregate.interval_secs",
    "AGGREGATION_INTERVAL",
    "--aggregation-interval",
)
.default(60)
.at_least(1);
const INPUT_TOPIC: Setting<String> = Setting::new(
    "aggregate.input_topic",
    "EVENTPIPE_AGGREGATE_INPUT_TOPIC",
    "--input-topic",
)
.default("events_in")
.topic_name();
const GROUP_ID: Setting<String> = Setting::new(
    "aggregate.group_id",
    "EVENTPIPE_AGGREGATE_GROUP_ID",
    "--group-id",
)
.default("eventpipe-aggregate");
/// Default: the interval (tumbling windows); at most the interval.
const ADVANCE_MS: Setting<u64> = Setting::new(
    "aggregate.advance_ms",
    "EVENTPIPE_AGGREGATE_ADVANCE_MS",
    "--advance-ms",
)
.at_least(1);
const ALLOWED_LATENESS_MS: Setting<u64> = Setting::new(
    "aggregate.allowed_lateness_ms",
    "EVENTPIPE_AGGREGATE_ALLOWED_LATENESS_MS",
    "--allowed-lateness-ms",
)
.default(2_000);
const GRACE_MS: Setting<u64> = Setting::new(
    "aggregate.grace_ms",
    "EVENTPIPE_AGGREGATE_GRACE_MS",
    "--grace-ms",
)
.default(60_000);
const IDLE_TIMEOUT_MS: Setting<u64> = Setting::new(
    "aggregate.idle_timeout_ms",
    "EVENTPIPE_AGGREGATE_IDLE_TIMEOUT_MS",
    "--idle-timeout-ms",
)
.default(30_000);
const MAX_OPEN_WINDOWS: Setting<usize> = Setting::new(
    "aggregate.max_open_windows",
    "EVENTPIPE_AGGREGATE_MAX_OPEN_WINDOWS",
    "--max-open-windows",
)
.default(1_000_000)
.at_least(1);
const METRICS_TOPIC: Setting<String> = Setting::new(
    "aggregate.metrics_topic",
    "EVENTPIPE_AGGREGATE_METRICS_TOPIC",
    "--metrics-topic",
)
.default("service_metrics")
.topic_name();
const METRICS_INTERVAL_SECS: Setting<u64> = Setting::new(
    "aggregate.metrics_interval_secs",
    "EVENTPIPE_AGGREGATE_METRICS_INTERVAL_SECS",
    "--metrics-interval-secs",
)
.default(10)
.at_least(1);

impl AggregateSettings {
    /// Merges `eventpipe aggregate` flags (and their environment variables) over the config
    /// file's `[aggregate]` table.
    pub fn load(args: &AggregateArgs, settings: &Settings) -> Result<Self, ConfigError> {
        Self::resolve(args, &settings.file.table()?)
    }

    /// Merges `eventpipe aggregate` flags (and their environment variables) over the file.
    pub fn resolve(args: &AggregateArgs, file: &FileAggregate) -> Result<Self, ConfigError> {
        let interval_flag =
            INTERVAL_SECS.parse_flag(&args.aggregation_interval, "expected whole seconds")?;
        let size_ms = INTERVAL_SECS.resolve(&interval_flag, &file.interval_secs)? * 1000;
        let advance_ms = ADVANCE_MS.resolve_or(&args.advance_ms, &file.advance_ms, || size_ms)?;
        if advance_ms > size_ms {
            return Err(ADVANCE_MS.invalid(
                advance_ms.to_string(),
                "must be between 1 and the aggregation interval in ms",
            ));
        }
        let input_topic = INPUT_TOPIC.resolve(&args.input_topic, &file.input_topic)?;
        let pipeline = PipelineConfig {
            codecs: AggregateCodecs::json(),
            dead_letter_topic: crate::stage::dead_letter::dead_letter_topic(
                &input_topic,
                crate::topics::DEAD_LETTER_SUFFIX,
            ),
            input_topic,
            group_id: GROUP_ID.resolve(&args.group_id, &file.group_id)?,
            metrics_topic: METRICS_TOPIC.resolve(&args.metrics_topic, &file.metrics_topic)?,
            metrics_interval: Duration::from_secs(
                METRICS_INTERVAL_SECS
                    .resolve(&args.metrics_interval_secs, &file.metrics_interval_secs)?,
            ),
            engine: EngineConfig {
                size_ms: size_ms as i64,
                advance_ms: advance_ms as i64,
                allowed_lateness_ms: ALLOWED_LATENESS_MS
                    .resolve(&args.allowed_lateness_ms, &file.allowed_lateness_ms)?
                    as i64,
                grace_ms: GRACE_MS.resolve(&args.grace_ms, &file.grace_ms)? as i64,
                idle_timeout: Duration::from_millis(
                    IDLE_TIMEOUT_MS.resolve(&args.idle_timeout_ms, &file.idle_timeout_ms)?,
                ),
                max_open_windows: MAX_OPEN_WINDOWS
                    .resolve(&args.max_open_windows, &file.max_open_windows)?,
            },
        };
        Ok(AggregateSettings {
            storage_type: STORAGE_TYPE.resolve_with(
                &args.storage_type,
                &file.storage_type,
                |raw| raw.parse(),
            )?,
            output_topic: OUTPUT_TOPIC.resolve(&args.kafka_topic, &file.output_topic)?,
            pipeline,
        })
    }

    /// The aggregation interval: the size of every window.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.pipeline.engine.size_ms as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigFile;

    fn file(text: &str) -> FileAggregate {
        ConfigFile::new("test.toml", text).table().unwrap()
    }

    #[test]
    fn defaults_follow_the_services() {
        let s = AggregateSettings::resolve(&AggregateArgs::default(), &FileAggregate::default())
            .unwrap();
        assert_eq!(s.storage_type, StorageType::Kafka);
        assert_eq!(s.interval(), Duration::from_secs(60));
        assert_eq!(s.output_topic, "events_aggregated");
        assert_eq!(s.pipeline.input_topic, "events_in");
        assert_eq!(s.pipeline.metrics_topic, "service_metrics");
        assert_eq!(s.pipeline.engine.max_open_windows, 1_000_000);
    }

    #[test]
    fn flags_beat_file_and_defaults_are_tumbling() {
        let file = file(
            "[aggregate]\nstorage_type = \"postgres\"\ninterval_secs = 10\ngrace_ms = 5\ngroup_id = \"g\"\n",
        );
        let s = AggregateSettings::resolve(&AggregateArgs::default(), &file).unwrap();
        assert_eq!(s.storage_type, StorageType::Postgres);
        assert_eq!(s.pipeline.engine.size_ms, 10_000);
        assert_eq!(s.pipeline.engine.advance_ms, 10_000);
        assert_eq!(s.pipeline.engine.grace_ms, 5);
        assert_eq!(s.pipeline.group_id, "g");
        assert_eq!(s.pipeline.dead_letter_topic, "events_in.dlq");
        let args = AggregateArgs {
            storage_type: Some("Kafka".into()),
            aggregation_interval: Some("7".into()),
            grace_ms: Some(7),
            advance_ms: Some(2_500),
            ..Default::default()
        };
        let s = AggregateSettings::resolve(&args, &file).unwrap();
        assert_eq!(s.storage_type, StorageType::Kafka);
        assert_eq!(s.interval(), Duration::from_secs(7));
        assert_eq!(s.pipeline.engine.grace_ms, 7);
        assert_eq!(s.pipeline.engine.advance_ms, 2_500);
    }

    #[test]
    fn bad_values_name_the_setting() {
        let file = file("[aggregate]\ninterval_secs = 1\n");
        let cases = [
            (
                AggregateArgs {
                    storage_type: Some("redis".into()),
                    ..Default::default()
                },
                "STORAGE_TYPE",
            ),
            (
                AggregateArgs {
                    aggregation_interval: Some("1m".into()),
                    ..Default::default()
                },
                "AGGREGATION_INTERVAL",
            ),
            (
                AggregateArgs {
                    aggregation_interval: Some("0".into()),
                    ..Default::default()
                },
                "AGGREGATION_INTERVAL",
            ),
            (
                AggregateArgs {
                    advance_ms: Some(2_000),
                    ..Default::default()
                },
                "EVENTPIPE_AGGREGATE_ADVANCE_MS",
            ),
            (
                AggregateArgs {
                    advance_ms: Some(0),
                    ..Default::default()
                },
                "EVENTPIPE_AGGREGATE_ADVANCE_MS",
            ),
            (
                AggregateArgs {
                    max_open_windows: Some(0),
                    ..Default::default()
                },
                "EVENTPIPE_AGGREGATE_MAX_OPEN_WINDOWS",
            ),
            (
                AggregateArgs {
                    input_topic: Some("a b".into()),
                    ..Default::default()
                },
                "EVENTPIPE_AGGREGATE_INPUT_TOPIC",
            ),
            (
                AggregateArgs {
                    metrics_topic: Some("a b".into()),
                    ..Default::default()
                },
                "EVENTPIPE_AGGREGATE_METRICS_TOPIC",
            ),
        ];
        for (args, expected) in cases {
            let message = AggregateSettings::resolve(&args, &file)
                .unwrap_err()
                .to_string();
            assert!(message.contains(expected), "{message}");
            assert!(!message.contains('\n'));
        }
    }
}
