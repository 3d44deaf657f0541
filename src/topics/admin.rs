//! Topic administration against a live cluster: read what exists (partitions, replication,
//! configs), apply a `topics::plan`, and render `topics list`.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, ConfigSource, NewPartitions, NewTopic,
    ResourceSpecifier, TopicReplication,
};
use rdkafka::metadata::Metadata;
use rdkafka::types::RDKafkaErrorCode;

use super::{plan, ExistingTopic, TopicChange, TopicSpec};
use crate::config::KafkaSettings;
use crate::kafka::client::{
    create_client, wait_for_broker, ClientKind, KafkaError, PipelineContext,
};

/// An admin client already proven to reach the cluster.
pub struct Admin {
    client: AdminClient<PipelineContext>,
    context: PipelineContext,
    settings: KafkaSettings,
}

/// The outcome of one applied change, for the report.
pub struct Applied {
    pub change: TopicChange,
    pub error: Option<String>,
}

impl Admin {
    /// Connects (bounded by the connect timeout) so later calls fail only for real reasons.
    pub fn connect(settings: &KafkaSettings) -> Result<Admin, KafkaError> {
        let context = PipelineContext::default();
        let client: AdminClient<PipelineContext> =
            create_client(settings, ClientKind::Admin, context.clone())?;
        wait_for_broker(client.inner(), &context, settings)?;
        Ok(Admin {
            client,
            context,
            settings: settings.clone(),
        })
    }

    pub fn metadata(&self) -> Result<Metadata, KafkaError> {
        wait_for_broker(self.client.inner(), &self.context, &self.settings)
    }

    fn options(&self) -> AdminOptions {
        AdminOptions::new()
            .request_timeout(Some(self.settings.connect_timeout))
            .operation_timeout(Some(Duration::from_secs(30)))
    }

    /// Current state of the named topics that exist, with the values of `config_keys` for each.
    pub async fn existing(
        &self,
        specs: &[TopicSpec],
    ) -> Result<BTreeMap<String, ExistingTopic>, KafkaError> {
        let metadata = self.metadata()?;
        let mut existing = BTreeMap::new();
        for topic in metadata.topics() {
            let Some(spec) = specs.iter().find(|s| s.name == topic.name()) else {
                continue;
            };
            if topic.error().is_some() || topic.partitions().is_empty() {
                continue;
            }
            let replication_factor = topic
                .partitions()
                .iter()
                .map(|p| p.replicas().len() as i32)
                .max()
                .unwrap_or(0);
            let configs = self.topic_configs(topic.name()).await?;
            let config = spec
                .config
                .keys()
                .filter_map(|k| configs.get(k).map(|(v, _)| (k.clone(), v.clone())))
                .collect();
            existing.insert(
                topic.name().to_string(),
                ExistingTopic {
                    partitions: topic.partitions().len() as i32,
                    replication_factor,
                    config,
                },
            );
        }
        Ok(existing)
    }

    /// All config values of a topic with whether each was set on the topic itself (dynamic).
    async fn topic_configs(
        &self,
        topic: &str,
    ) -> Result<BTreeMap<String, (String, bool)>, KafkaError> {
        let results = self
            .client
            .describe_configs(&[ResourceSpecifier::Topic(topic)], &self.options())
            .await?;
        let mut configs = BTreeMap::new();
        for result in results {
            let resource = result
                .map_err(|code| KafkaError::Client(rdkafka::error::KafkaError::AdminOp(code)))?;
            for entry in resource.entries {
                if let Some(value) = entry.value {
                    let dynamic = matches!(entry.source, ConfigSource::DynamicTopic);
                    configs.insert(entry.name, (value, dynamic));
                }
            }
        }
        Ok(configs)
    }

    /// Plans against the live cluster and applies each change; failures are reported per change.
    pub async fn apply(&self, specs: &[TopicSpec]) -> Result<Vec<Applied>, KafkaError> {
        let existing = self.existing(specs).await?;
        let mut applied = Vec::new();
        for change in plan(specs, &existing) {
            let error = self.apply_one(&change).await.err();
            applied.push(Applied { change, error });
        }
        Ok(applied)
    }

    /// Waits (bounded) until a new topic shows in metadata with leaders, so the next command
    /// (a producer, or `topics apply` run again) sees it.
    async fn wait_until_visible(&self, topic: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            let visible = self.metadata().is_ok_and(|m| {
                m.topics().iter().any(|t| {
                    t.name() == topic
                        && !t.partitions().is_empty()
                        && t.partitions().iter().all(|p| p.leader() >= 0)
                })
            });
            if visible {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn apply_one(&self, change: &TopicChange) -> Result<(), String> {
        match change {
            TopicChange::Create(spec) => {
                let mut topic = NewTopic::new(
                    &spec.name,
                    spec.partitions,
                    TopicReplication::Fixed(spec.replication_factor),
                );
                for (key, value) in &spec.config {
                    topic = topic.set(key, value);
                }
                let results = self
                    .client
                    .create_topics(&[topic], &self.options())
                    .await
                    .map_err(|e| e.to_string())?;
                // Created concurrently by someone else (or metadata was stale): the goal is met.
                let results = results.into_iter().map(|r| match r {
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => Ok(()),
                    other => other.map(|_| ()),
                });
                first_error(results)?;
                self.wait_until_visible(&spec.name).await;
                Ok(())
            }
            TopicChange::AddPartitions { topic, to, .. } => {
                let results = self
                    .client
                    .create_partitions(&[NewPartitions::new(topic, *to as usize)], &self.options())
                    .await
                    .map_err(|e| e.to_string())?;
                first_error(results.into_iter().map(|r| r.map(|_| ())))
            }
            TopicChange::SetConfig { topic, key, to, .. } => {
                // AlterConfigs replaces every dynamic config of the topic, so resend the ones
                // already set there: applying one key must never reset another.
                let current = self.topic_configs(topic).await.map_err(|e| e.to_string())?;
                let mut values: BTreeMap<&str, &str> = current
                    .iter()
                    .filter(|(_, (_, dynamic))| *dynamic)
                    .map(|(k, (v, _))| (k.as_str(), v.as_str()))
                    .collect();
                values.insert(key, to);
                let mut alter = AlterConfig::new(ResourceSpecifier::Topic(topic));
                for (k, v) in values {
                    alter = alter.set(k, v);
                }
                let results = self
                    .client
                    .alter_configs(&[alter], &self.options())
                    .await
                    .map_err(|e| e.to_string())?;
                first_error(results.into_iter().map(|r| r.map(|_| ())))
            }
            TopicChange::Drift { .. } | TopicChange::Unchanged { .. } => Ok(()),
        }
    }
}

fn first_error<E: std::fmt::Debug>(
    results: impl Iterator<Item = Result<(), (impl std::fmt::Debug, E)>>,
) -> Result<(), String> {
    for result in results {
        if let Err((what, code)) = result {
            return Err(format!("{what:?}: {code:?}"));
        }
    }
    Ok(())
}

/// One row of `topics list`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TopicRow {
    pub name: String,
    pub partitions: usize,
    pub replication_factor: usize,
    pub under_replicated: usize,
    pub defined: bool,
}

/// Rows for every non-internal topic, sorted by name, marking those defined under topics/.
pub fn topic_rows(metadata: &Metadata, specs: &[TopicSpec]) -> Vec<TopicRow> {
    let mut rows: Vec<TopicRow> = metadata
        .topics()
        .iter()
        .filter(|t| !t.name().starts_with("__"))
        .map(|t| TopicRow {
            name: t.name().to_string(),
            partitions: t.partitions().len(),
            replication_factor: t
                .partitions()
                .iter()
                .map(|p| p.replicas().len())
                .max()
                .unwrap_or(0),
            under_replicated: t
                .partitions()
                .iter()
                .filter(|p| p.isr().len() < p.replicas().len())
                .count(),
            defined: specs.iter().any(|s| s.name == t.name()),
        })
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    rows
}
