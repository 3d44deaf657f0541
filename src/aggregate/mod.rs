//! `eventpipe aggregate`: windows events by name, function and event-time interval and sinks the
//! aggregates to Kafka or PostgreSQL, exactly per window despite crashes, rebalances and late data.
//!
//! Layers: `event` (decode) → `function` (exact accumulators) → `window` (pure engine, time passed
//! in) → `pipeline` (Kafka I/O, checkpoints) → `sink` (Kafka topic or PostgreSQL upsert).

pub mod event;
pub mod function;
pub mod metrics;
pub mod pipeline;
pub mod sink;
pub mod window;

use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::config::{AggregateSettings, ConfigError, SettingName, Settings, StorageType};
use crate::kafka::client::create_client;
use crate::kafka::{ClientKind, PipelineContext};
use crate::telemetry::Readiness;
use pipeline::PipelineConfig;
use window::EngineConfig;

/// Flags of `eventpipe aggregate` beyond the global STORAGE_TYPE, KAFKA_TOPIC and
/// AGGREGATION_INTERVAL; each falls back to its environment variable, then the file.
#[derive(Debug, Default, Clone, Args)]
pub struct AggregateArgs {
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

const ADVANCE: SettingName = SettingName {
    key: "aggregate.advance_ms",
    env: "EVENTPIPE_AGGREGATE_ADVANCE_MS",
    flag: "--advance-ms",
};
const MAX_OPEN: SettingName = SettingName {
    key: "aggregate.max_open_windows",
    env: "EVENTPIPE_AGGREGATE_MAX_OPEN_WINDOWS",
    flag: "--max-open-windows",
};
const METRICS_INTERVAL: SettingName = SettingName {
    key: "aggregate.metrics_interval_secs",
    env: "EVENTPIPE_AGGREGATE_METRICS_INTERVAL_SECS",
    flag: "--metrics-interval-secs",
};
const INPUT_TOPIC: SettingName = SettingName {
    key: "aggregate.input_topic / aggregate.metrics_topic",
    env: "EVENTPIPE_AGGREGATE_INPUT_TOPIC / EVENTPIPE_AGGREGATE_METRICS_TOPIC",
    flag: "--input-topic / --metrics-topic",
};

fn invalid(name: &SettingName, value: impl ToString, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        setting: name.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// The setting's value (or `default` when unset), refusing zero.
fn at_least_one<T>(name: &SettingName, value: Option<T>, default: T) -> Result<T, ConfigError>
where
    T: PartialEq + From<u8> + ToString,
{
    let value = value.unwrap_or(default);
    if value == T::from(0) {
        return Err(invalid(name, 0, "must be at least 1"));
    }
    Ok(value)
}

/// Merges `eventpipe aggregate` flags (and their environment variables) over the file.
pub fn resolve(
    settings: &AggregateSettings,
    args: &AggregateArgs,
) -> Result<PipelineConfig, ConfigError> {
    let file = &settings.file;
    let size_ms = settings.interval.as_millis() as i64;
    let advance_ms = args
        .advance_ms
        .or(file.advance_ms)
        .map_or(size_ms, |a| a as i64);
    if advance_ms <= 0 || advance_ms > size_ms {
        return Err(invalid(
            &ADVANCE,
            advance_ms,
            "must be between 1 and the aggregation interval in ms",
        ));
    }
    let max_open_windows = at_least_one(
        &MAX_OPEN,
        args.max_open_windows.or(file.max_open_windows),
        1_000_000,
    )?;
    let metrics_interval_secs = at_least_one(
        &METRICS_INTERVAL,
        args.metrics_interval_secs.or(file.metrics_interval_secs),
        10,
    )?;
    let input_topic = args
        .input_topic
        .clone()
        .or(file.input_topic.clone())
        .unwrap_or_else(|| "events_in".into());
    let metrics_topic = args
        .metrics_topic
        .clone()
        .or(file.metrics_topic.clone())
        .unwrap_or_else(|| "service_metrics".into());
    for topic in [&input_topic, &metrics_topic] {
        if !crate::settings::valid_topic_name(topic) {
            return Err(invalid(&INPUT_TOPIC, topic, "not a valid topic name"));
        }
    }
    let ms = |arg: Option<u64>, file: Option<u64>, default: u64| arg.or(file).unwrap_or(default);
    Ok(PipelineConfig {
        codecs: pipeline::AggregateCodecs::json(),
        dead_letter_topic: crate::stage::dead_letter::dead_letter_topic(
            &input_topic,
            crate::topics::DEAD_LETTER_SUFFIX,
        ),
        input_topic,
        group_id: args
            .group_id
            .clone()
            .or(file.group_id.clone())
            .unwrap_or_else(|| "eventpipe-aggregate".into()),
        metrics_topic,
        metrics_interval: Duration::from_secs(metrics_interval_secs),
        engine: EngineConfig {
            size_ms,
            advance_ms,
            allowed_lateness_ms: ms(args.allowed_lateness_ms, file.allowed_lateness_ms, 2_000)
                as i64,
            grace_ms: ms(args.grace_ms, file.grace_ms, 60_000) as i64,
            idle_timeout: Duration::from_millis(ms(
                args.idle_timeout_ms,
                file.idle_timeout_ms,
                30_000,
            )),
            max_open_windows,
        },
    })
}

pub async fn run(
    settings: &Settings,
    args: AggregateArgs,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut config = resolve(&settings.aggregate, &args)?;
    let (formats, registry) = crate::codec::shared(settings)?;
    config.codecs = pipeline::AggregateCodecs::new(formats.clone(), registry.clone());
    let sink = match settings.aggregate.storage_type {
        StorageType::Kafka => sink::Sink::Kafka {
            codec: crate::codec::Codec::new(formats, registry, crate::codec::SchemaName::Aggregate),
            producer: create_client(
                &settings.kafka,
                ClientKind::Producer,
                PipelineContext::default(),
            )?,
            topic: settings.aggregate.output_topic.clone(),
        },
        StorageType::Postgres => {
            readiness.register("postgres");
            let pool = sink::connect_postgres(settings.postgres_url.as_str())
                .await
                .with_context(|| {
                    format!(
                        "connecting to PostgreSQL at {} (POSTGRES_CONNECTION_STRING)",
                        crate::config::redact_url(settings.postgres_url.as_str())
                    )
                })?;
            readiness.set("postgres", true);
            sink::Sink::Postgres { pool }
        }
    };
    let summary = pipeline::run(&settings.kafka, &config, sink, readiness, shutdown).await?;
    println!(
        "aggregate stopped: aggregated {}, failed {}, emitted {} window aggregates",
        summary.aggregated, summary.failed, summary.emitted
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_file, SettingsArgs};

    fn aggregate(file: &str) -> AggregateSettings {
        Settings::resolve(
            &SettingsArgs::default(),
            parse_file(file).unwrap(),
            Default::default(),
        )
        .unwrap()
        .aggregate
    }

    #[test]
    fn flags_beat_file_and_defaults_are_tumbling() {
        let settings =
            aggregate("[aggregate]\ninterval_secs = 10\ngrace_ms = 5\ngroup_id = \"g\"\n");
        let config = resolve(&settings, &AggregateArgs::default()).unwrap();
        assert_eq!(config.engine.size_ms, 10_000);
        assert_eq!(config.engine.advance_ms, 10_000);
        assert_eq!(config.engine.grace_ms, 5);
        assert_eq!(config.group_id, "g");
        assert_eq!(config.dead_letter_topic, "events_in.dlq");
        let args = AggregateArgs {
            grace_ms: Some(7),
            advance_ms: Some(2_500),
            ..Default::default()
        };
        let config = resolve(&settings, &args).unwrap();
        assert_eq!(config.engine.grace_ms, 7);
        assert_eq!(config.engine.advance_ms, 2_500);
    }

    #[test]
    fn bad_values_name_the_setting() {
        let settings = aggregate("[aggregate]\ninterval_secs = 1\n");
        let cases = [
            (
                AggregateArgs {
                    advance_ms: Some(2_000),
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
        ];
        for (args, expected) in cases {
            let message = resolve(&settings, &args).unwrap_err().to_string();
            assert!(message.contains(expected), "{message}");
            assert!(!message.contains('\n'));
        }
    }
}
