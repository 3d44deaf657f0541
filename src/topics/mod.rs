//! Topic definitions (topics/topics.toml) and the pure plan that brings a cluster in line with
//! them: create what is missing, grow partitions, set configs — never delete or shrink; `admin`
//! reads and changes a live cluster.

pub mod admin;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;

use crate::codec::SchemaName;
use crate::settings::valid_topic_name;

/// Suffix of dead-letter topics: `<input topic>.dlq`.
pub const DEAD_LETTER_SUFFIX: &str = ".dlq";

#[derive(Debug, thiserror::Error)]
pub enum TopicsFileError {
    #[error("topics file {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// The file's shape: defaults, then one `[[topics]]` table per topic.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicsFile {
    #[serde(default)]
    defaults: Defaults,
    #[serde(default)]
    topics: Vec<TopicEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Defaults {
    partitions: i32,
    replication_factor: i32,
    config: BTreeMap<String, String>,
    dead_letter_config: BTreeMap<String, String>,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            partitions: 3,
            replication_factor: 1,
            config: BTreeMap::new(),
            dead_letter_config: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicEntry {
    name: String,
    partitions: Option<i32>,
    replication_factor: Option<i32>,
    #[serde(default)]
    config: BTreeMap<String, String>,
    /// Also define `<name>.dlq` for records this topic's consumers cannot process.
    #[serde(default)]
    dead_letter: bool,
    #[serde(default)]
    description: String,
    /// The schemas/ file (stem) of this topic's record values, registered as `<name>-value`.
    value_schema: Option<String>,
    /// `eventpipe store` keeps every record of this topic by default.
    #[serde(default)]
    stored: bool,
}

/// One topic as it should exist on the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub config: BTreeMap<String, String>,
    pub description: String,
    /// What this topic's values are (`eventpipe schemas register` uses it); none for dead
    /// letters, which keep whatever bytes failed.
    pub value_schema: Option<SchemaName>,
    /// Kept by `eventpipe store` by default.
    pub stored: bool,
}

/// What the cluster has now for one topic (`None` in the plan input means it does not exist).
#[derive(Debug, Clone, PartialEq)]
pub struct ExistingTopic {
    pub partitions: i32,
    pub replication_factor: i32,
    /// Current values of the keys the spec sets (missing: at its default).
    pub config: BTreeMap<String, String>,
}

/// One step of the plan; `Display` is the line `topics apply` prints.
#[derive(Debug, Clone, PartialEq)]
pub enum TopicChange {
    Create(TopicSpec),
    AddPartitions {
        topic: String,
        from: i32,
        to: i32,
    },
    SetConfig {
        topic: String,
        key: String,
        from: Option<String>,
        to: String,
    },
    /// A difference that applying cannot fix without deleting data; reported, not acted on.
    Drift {
        topic: String,
        reason: String,
    },
    Unchanged {
        topic: String,
    },
}

impl fmt::Display for TopicChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicChange::Create(spec) => write!(
                f,
                "create  {} (partitions={}, replication={}{})",
                spec.name,
                spec.partitions,
                spec.replication_factor,
                spec.config
                    .iter()
                    .map(|(k, v)| format!(", {k}={v}"))
                    .collect::<String>()
            ),
            TopicChange::AddPartitions { topic, from, to } => {
                write!(f, "alter   {topic}: partitions {from} -> {to}")
            }
            TopicChange::SetConfig {
                topic,
                key,
                from,
                to,
            } => write!(
                f,
                "alter   {topic}: {key} {} -> {to}",
                from.as_deref().unwrap_or("(default)")
            ),
            TopicChange::Drift { topic, reason } => write!(f, "warning {topic}: {reason}"),
            TopicChange::Unchanged { topic } => write!(f, "ok      {topic}"),
        }
    }
}

/// Loads and expands the definitions file (dead-letter topics included), in file order.
pub fn load(path: &Path) -> Result<Vec<TopicSpec>, TopicsFileError> {
    let invalid = |reason: String| TopicsFileError::Invalid {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
    parse(&text).map_err(invalid)
}

/// Parses definitions text; errors are one line.
pub fn parse(text: &str) -> Result<Vec<TopicSpec>, String> {
    let file: TopicsFile = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let message = e.message().replace('\n', " ");
        match line {
            Some(line) => format!("line {line}: {message}"),
            None => message,
        }
    })?;
    let mut specs: Vec<TopicSpec> = Vec::new();
    for entry in file.topics {
        let partitions = entry.partitions.unwrap_or(file.defaults.partitions);
        let replication_factor = entry
            .replication_factor
            .unwrap_or(file.defaults.replication_factor);
        if !valid_topic_name(&entry.name) {
            return Err(format!(
                "topic name {:?} must be 1-249 characters of [a-zA-Z0-9._-]",
                entry.name
            ));
        }
        if partitions < 1 || replication_factor < 1 {
            return Err(format!(
                "topic {}: partitions and replication_factor must be at least 1",
                entry.name
            ));
        }
        let value_schema = match &entry.value_schema {
            None => None,
            Some(stem) => Some(SchemaName::from_stem(stem).ok_or_else(|| {
                format!(
                    "topic {}: value_schema {stem:?} is not a file under schemas/ (one of {})",
                    entry.name,
                    SchemaName::ALL.map(SchemaName::file_stem).join(", ")
                )
            })?),
        };
        let mut config = file.defaults.config.clone();
        config.extend(entry.config);
        let dead_letter = entry.dead_letter.then(|| {
            let mut dlq_config = config.clone();
            dlq_config.extend(file.defaults.dead_letter_config.clone());
            TopicSpec {
                name: format!("{}{DEAD_LETTER_SUFFIX}", entry.name),
                partitions,
                replication_factor,
                config: dlq_config,
                description: format!("dead letters of {}", entry.name),
                value_schema: None,
                stored: false,
            }
        });
        specs.push(TopicSpec {
            name: entry.name,
            partitions,
            replication_factor,
            config,
            description: entry.description,
            value_schema,
            stored: entry.stored,
        });
        specs.extend(dead_letter);
    }
    let mut seen = std::collections::HashSet::new();
    for spec in &specs {
        if !seen.insert(spec.name.as_str()) {
            return Err(format!("topic {} is defined twice", spec.name));
        }
    }
    Ok(specs)
}

/// The topics the definitions mark `stored = true`, in file order.
pub fn stored_topics(path: &Path) -> Result<Vec<String>, TopicsFileError> {
    Ok(load(path)?
        .into_iter()
        .filter(|spec| spec.stored)
        .map(|spec| spec.name)
        .collect())
}

/// Compares the definitions with the cluster and lists the changes, one or more per topic.
pub fn plan(desired: &[TopicSpec], existing: &BTreeMap<String, ExistingTopic>) -> Vec<TopicChange> {
    let mut changes = Vec::new();
    for spec in desired {
        let Some(current) = existing.get(&spec.name) else {
            changes.push(TopicChange::Create(spec.clone()));
            continue;
        };
        let before = changes.len();
        if current.partitions < spec.partitions {
            changes.push(TopicChange::AddPartitions {
                topic: spec.name.clone(),
                from: current.partitions,
                to: spec.partitions,
            });
        } else if current.partitions > spec.partitions {
            changes.push(TopicChange::Drift {
                topic: spec.name.clone(),
                reason: format!(
                    "has {} partitions, definition says {} (partitions are never removed)",
                    current.partitions, spec.partitions
                ),
            });
        }
        if current.replication_factor != spec.replication_factor {
            changes.push(TopicChange::Drift {
                topic: spec.name.clone(),
                reason: format!(
                    "replication factor is {}, definition says {} (reassign partitions to change it)",
                    current.replication_factor, spec.replication_factor
                ),
            });
        }
        for (key, value) in &spec.config {
            let now = current.config.get(key);
            if now != Some(value) {
                changes.push(TopicChange::SetConfig {
                    topic: spec.name.clone(),
                    key: key.clone(),
                    from: now.cloned(),
                    to: value.clone(),
                });
            }
        }
        if changes.len() == before {
            changes.push(TopicChange::Unchanged {
                topic: spec.name.clone(),
            });
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[defaults]
partitions = 3
config = { "retention.ms" = "604800000" }
dead_letter_config = { "retention.ms" = "2592000000" }

[[topics]]
name = "create_user_in"
dead_letter = true

[[topics]]
name = "info_in"
partitions = 6
config = { "cleanup.policy" = "delete" }
"#;

    #[test]
    fn expands_dead_letter_topics_after_their_input() {
        let specs = parse(FILE).unwrap();
        let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["create_user_in", "create_user_in.dlq", "info_in"]);
        assert_eq!(specs[1].config["retention.ms"], "2592000000");
        assert_eq!(specs[0].config["retention.ms"], "604800000");
        assert_eq!(specs[2].partitions, 6);
        assert_eq!(specs[2].config.len(), 2);
    }

    #[test]
    fn rejects_unknown_keys_duplicates_and_bad_names() {
        assert!(parse("[[topics]]\nname = \"a\"\npartition = 3\n")
            .unwrap_err()
            .starts_with("line 3: unknown field `partition`"));
        assert!(
            parse("[[topics]]\nname = \"a\"\n[[topics]]\nname = \"a\"\n")
                .unwrap_err()
                .contains("defined twice")
        );
        assert!(parse("[[topics]]\nname = \"a b\"\n").is_err());
        assert!(parse("[[topics]]\nname = \"a\"\npartitions = 0\n").is_err());
    }

    #[test]
    fn plan_creates_grows_sets_and_never_shrinks() {
        let specs = parse(FILE).unwrap();
        let mut existing = BTreeMap::new();
        existing.insert(
            "create_user_in".to_string(),
            ExistingTopic {
                partitions: 1,
                replication_factor: 1,
                config: BTreeMap::from([("retention.ms".into(), "1000".into())]),
            },
        );
        existing.insert(
            "info_in".to_string(),
            ExistingTopic {
                partitions: 12,
                replication_factor: 1,
                config: BTreeMap::from([
                    ("retention.ms".into(), "604800000".into()),
                    ("cleanup.policy".into(), "delete".into()),
                ]),
            },
        );
        let changes = plan(&specs, &existing);
        let lines: Vec<String> = changes.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "alter   create_user_in: partitions 1 -> 3",
                "alter   create_user_in: retention.ms 1000 -> 604800000",
                "create  create_user_in.dlq (partitions=3, replication=1, retention.ms=2592000000)",
                "warning info_in: has 12 partitions, definition says 6 (partitions are never removed)",
            ]
        );
    }

    #[test]
    fn plan_of_an_applied_cluster_is_all_unchanged() {
        let specs = parse(FILE).unwrap();
        let existing = specs
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    ExistingTopic {
                        partitions: s.partitions,
                        replication_factor: s.replication_factor,
                        config: s.config.clone(),
                    },
                )
            })
            .collect();
        assert!(plan(&specs, &existing)
            .iter()
            .all(|c| matches!(c, TopicChange::Unchanged { .. })));
    }
}
