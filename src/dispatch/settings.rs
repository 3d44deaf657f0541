//! Settings of `eventpipe dispatch`: its flags (each falling back to its environment variable),
//! the file's `[dispatch]` table and the resolved `DispatchSettings`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use crate::config::Settings;
use crate::settings::{layer, topic_name, ConfigError, FileTable, Setting, SettingName};
use crate::stage::InputTopics;

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
    /// Obey flow control's pauses (`eventpipe flows`), kept in PostgreSQL (`--postgres-url`).
    #[arg(long, env = "EVENTPIPE_DISPATCH_FLOWS")]
    pub flows: Option<bool>,
}

/// The config file's `[dispatch]` table.
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
    pub flows: Option<bool>,
}

impl FileTable for FileDispatch {
    const NAME: &'static str = "dispatch";
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
    /// Obey the pauses of scope `dispatch` and `all` (PostgreSQL at the global `postgres.url`).
    pub flows: bool,
}

/// A list of topics or a pattern, not both (resolved together).
const INPUT: SettingName = SettingName::new(
    "dispatch.input_topics / dispatch.input_pattern",
    "EVENTPIPE_DISPATCH_INPUT_TOPICS / EVENTPIPE_DISPATCH_INPUT_PATTERN",
    "--input-topics / --input-pattern",
);
const DEFAULT_INPUT_TOPICS: [&str; 3] = ["create_user_in", "update_user_in", "task_in"];
const GROUP_ID: Setting<String> = Setting::new(
    "dispatch.group_id",
    "EVENTPIPE_DISPATCH_GROUP_ID",
    "--group-id",
)
.default("eventpipe-dispatch");
const ROUTES_FILE: Setting<PathBuf> = Setting::new(
    "dispatch.routes_file",
    "EVENTPIPE_DISPATCH_ROUTES_FILE",
    "--routes-file",
)
.default("topics/routes.toml");
const SERVICE: Setting<String> = Setting::new(
    "dispatch.service",
    "EVENTPIPE_DISPATCH_SERVICE",
    "--service",
)
.default("eventpipe-dispatch");
const DEAD_LETTER_SUFFIX: Setting<String> = Setting::new(
    "dispatch.dead_letter_suffix",
    "EVENTPIPE_DISPATCH_DEAD_LETTER_SUFFIX",
    "--dead-letter-suffix",
)
.default(crate::topics::DEAD_LETTER_SUFFIX);
const MAX_ENVELOPE_BYTES: Setting<usize> = Setting::new(
    "dispatch.max_envelope_bytes",
    "EVENTPIPE_DISPATCH_MAX_ENVELOPE_BYTES",
    "--max-envelope-bytes",
)
.default(crate::envelope::DEFAULT_MAX_ENVELOPE_BYTES)
.at_least(64);
const DRAIN_TIMEOUT_SECS: Setting<u64> = Setting::new(
    "dispatch.drain_timeout_secs",
    "EVENTPIPE_DISPATCH_DRAIN_TIMEOUT_SECS",
    "--drain-timeout-secs",
)
.default(30);
const EXACTLY_ONCE: Setting<bool> = Setting::new(
    "dispatch.exactly_once",
    "EVENTPIPE_DISPATCH_EXACTLY_ONCE",
    "--exactly-once",
)
.default(false);
const FLOWS: Setting<bool> =
    Setting::new("dispatch.flows", "EVENTPIPE_DISPATCH_FLOWS", "--flows").default(false);
/// Default: `<group id>-<hostname>`.
const TRANSACTIONAL_ID: Setting<String> = Setting::new(
    "dispatch.transactional_id",
    "EVENTPIPE_DISPATCH_TRANSACTIONAL_ID",
    "--transactional-id",
);

impl DispatchSettings {
    /// Merges `eventpipe dispatch` flags (and their environment variables) over the config
    /// file's `[dispatch]` table.
    pub fn load(args: &DispatchArgs, settings: &Settings) -> Result<Self, ConfigError> {
        Self::resolve(args, &settings.file.table()?)
    }

    /// Merges `eventpipe dispatch` flags (and their environment variables) over the file.
    pub fn resolve(args: &DispatchArgs, file: &FileDispatch) -> Result<Self, ConfigError> {
        let group_id = GROUP_ID.resolve(&args.group_id, &file.group_id)?;
        Ok(DispatchSettings {
            input: input(args, file)?,
            transactional_id: TRANSACTIONAL_ID.resolve_or(
                &args.transactional_id,
                &file.transactional_id,
                || format!("{group_id}-{}", hostname()),
            )?,
            group_id,
            routes_file: ROUTES_FILE.resolve(&args.routes_file, &file.routes_file)?,
            service: SERVICE.resolve(&args.service, &file.service)?,
            dead_letter_suffix: DEAD_LETTER_SUFFIX
                .resolve(&args.dead_letter_suffix, &file.dead_letter_suffix)?,
            max_envelope_bytes: MAX_ENVELOPE_BYTES
                .resolve(&args.max_envelope_bytes, &file.max_envelope_bytes)?,
            drain_timeout: Duration::from_secs(
                DRAIN_TIMEOUT_SECS.resolve(&args.drain_timeout_secs, &file.drain_timeout_secs)?,
            ),
            exactly_once: EXACTLY_ONCE.resolve(&args.exactly_once, &file.exactly_once)?,
            flows: FLOWS.resolve(&args.flows, &file.flows)?,
        })
    }
}

/// The input topics: a pattern or a list (the default list when neither is set).
fn input(args: &DispatchArgs, file: &FileDispatch) -> Result<InputTopics, ConfigError> {
    let pattern = layer(&args.input_pattern, &file.input_pattern);
    let topics = layer(&args.input_topics, &file.input_topics);
    match (pattern, topics) {
        (Some(_), Some(_)) => Err(INPUT.invalid("both", "set a topic list or a pattern, not both")),
        // librdkafka treats a subscription starting with ^ as a regular expression.
        (Some(pattern), None) if pattern.starts_with('^') => Ok(InputTopics::Pattern(pattern)),
        (Some(pattern), None) => Ok(InputTopics::Pattern(format!("^{pattern}"))),
        (None, topics) => {
            let topics: Vec<String> = topics
                .unwrap_or_else(|| DEFAULT_INPUT_TOPICS.map(String::from).to_vec())
                .into_iter()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect();
            for topic in &topics {
                topic_name(topic).map_err(|reason| INPUT.invalid(topic.as_str(), reason))?;
            }
            if topics.is_empty() {
                return Err(INPUT.invalid("", "no input topics"));
            }
            Ok(InputTopics::Names(topics))
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_then_the_file_then_flags() {
        let s =
            DispatchSettings::resolve(&DispatchArgs::default(), &FileDispatch::default()).unwrap();
        assert!(matches!(&s.input, InputTopics::Names(names) if names == &DEFAULT_INPUT_TOPICS));
        assert_eq!(s.group_id, "eventpipe-dispatch");
        assert!(s.transactional_id.starts_with("eventpipe-dispatch-"));
        assert_eq!(s.routes_file, PathBuf::from("topics/routes.toml"));
        assert_eq!(s.dead_letter_suffix, ".dlq");
        assert_eq!(s.drain_timeout, Duration::from_secs(30));
        assert!(!s.exactly_once);

        let file = FileDispatch {
            input_pattern: Some(".*_in".into()),
            group_id: Some("g".into()),
            exactly_once: Some(true),
            ..Default::default()
        };
        let s = DispatchSettings::resolve(&DispatchArgs::default(), &file).unwrap();
        assert!(matches!(&s.input, InputTopics::Pattern(p) if p == "^.*_in"));
        assert!(s.transactional_id.starts_with("g-"));
        assert!(s.exactly_once);
        let args = DispatchArgs {
            group_id: Some("flag".into()),
            exactly_once: Some(false),
            ..Default::default()
        };
        let s = DispatchSettings::resolve(&args, &file).unwrap();
        assert_eq!(s.group_id, "flag");
        assert!(!s.exactly_once);
    }

    #[test]
    fn bad_values_name_the_setting_on_one_line() {
        let file = FileDispatch {
            input_pattern: Some(".*".into()),
            ..Default::default()
        };
        let cases = [
            (
                DispatchArgs {
                    input_topics: Some(vec!["a b".into()]),
                    ..Default::default()
                },
                FileDispatch::default(),
                "EVENTPIPE_DISPATCH_INPUT_TOPICS",
            ),
            (
                DispatchArgs {
                    input_topics: Some(vec!["a".into()]),
                    ..Default::default()
                },
                file,
                "not both",
            ),
            (
                DispatchArgs {
                    max_envelope_bytes: Some(10),
                    ..Default::default()
                },
                FileDispatch::default(),
                "EVENTPIPE_DISPATCH_MAX_ENVELOPE_BYTES",
            ),
        ];
        for (args, file, expected) in cases {
            let message = DispatchSettings::resolve(&args, &file)
                .unwrap_err()
                .to_string();
            assert!(message.contains(expected), "{message} names {expected}");
            assert!(!message.contains('\n'));
        }
    }
}
