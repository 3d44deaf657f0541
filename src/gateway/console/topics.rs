//! The console's view of Kafka's topics: every topic with its partitions, records held, and how
//! full its retention is (the age of its oldest retained record against `retention.ms`).
//!
//! Scanned in the background, and only while someone looks (a scan reads one record of every
//! partition), so the overview answers from memory however many topics the cluster holds.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::admin::{AdminClient, AdminOptions, OwnedResourceSpecifier, ResourceSpecifier};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaSettings;
use crate::kafka::client::{create_client, ClientKind, KafkaError, PipelineContext};

/// How often topics are scanned while the console is open.
const SCAN_EVERY: Duration = Duration::from_secs(10);
/// A scan stops once nobody asked for the overview for this long.
const LOOKED_AT_WITHIN: Duration = Duration::from_secs(60);
/// Bounds of one scan: a cluster with thousands of partitions is shown in part, said so.
const MAX_PARTITIONS: usize = 2000;
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the oldest records may take to arrive, over all partitions.
const OLDEST_WITHIN: Duration = Duration::from_secs(3);
/// describe_configs resources per request.
const CONFIG_BATCH: usize = 100;

#[derive(Debug, Clone, Serialize)]
pub struct PartitionView {
    pub partition: i32,
    pub low: i64,
    pub high: i64,
    /// Kafka time of its oldest retained record (Unix ms); `None`: empty or not read in time.
    pub oldest: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopicView {
    pub name: String,
    pub partitions: Vec<PartitionView>,
    /// Records between the low and high watermarks (an upper bound: compaction and transaction
    /// markers leave holes).
    pub records: i64,
    /// `None`: unknown; -1: kept for ever.
    pub retention_ms: Option<i64>,
    pub retention_bytes: Option<i64>,
    pub oldest_age_ms: Option<i64>,
    /// Oldest age / retention.ms: 1.0 is when Kafka starts deleting.
    pub retention_fill: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TopicsView {
    pub scanned_at: Option<DateTime<Utc>>,
    /// Why the last scan failed (its topics, if any, are the scan before).
    pub error: Option<String>,
    /// Set when the cluster holds more partitions than one scan reads.
    pub truncated: bool,
    pub topics: Vec<TopicView>,
}

/// The latest scan and the clients it uses.
pub struct Topics {
    view: Mutex<TopicsView>,
    looked_at: Mutex<Option<Instant>>,
    wake: Notify,
    settings: KafkaSettings,
}

impl Topics {
    pub fn new(settings: &KafkaSettings) -> Arc<Topics> {
        let mut settings = settings.clone();
        let properties = [
            // Assigned, never committed: the group id only satisfies librdkafka.
            ("group.id", "eventpipe-gateway-console"),
            ("enable.auto.commit", "false"),
            // One record of each partition is all a scan wants.
            ("max.partition.fetch.bytes", "16384"),
            ("queued.max.messages.kbytes", "4096"),
        ];
        for (name, value) in properties {
            settings.properties.insert(name.into(), value.into());
        }
        Arc::new(Topics {
            view: Mutex::new(TopicsView::default()),
            looked_at: Mutex::new(None),
            wake: Notify::new(),
            settings,
        })
    }

    /// The latest scan; also says someone is looking, so scans go on (the first one now).
    pub fn view(&self) -> TopicsView {
        let first = self
            .looked_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(Instant::now())
            .is_none_or(|at| at.elapsed() > LOOKED_AT_WITHIN);
        if first {
            self.wake.notify_one();
        }
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn looked_at_lately(&self) -> bool {
        self.looked_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() <= LOOKED_AT_WITHIN)
    }

    /// Scans while someone looks, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut clients: Option<Clients> = None;
        loop {
            if self.looked_at_lately() {
                let result = match &clients {
                    Some(clients) => scan(clients).await,
                    None => match Clients::connect(&self.settings) {
                        Ok(made) => scan(clients.insert(made)).await,
                        Err(error) => Err(error.to_string()),
                    },
                };
                let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
                match result {
                    Ok(scanned) => *view = scanned,
                    Err(error) => {
                        tracing::debug!(%error, "console: scanning topics");
                        view.error = Some(error);
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SCAN_EVERY) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}

struct Clients {
    consumer: Arc<BaseConsumer<PipelineContext>>,
    admin: AdminClient<PipelineContext>,
}

impl Clients {
    fn connect(settings: &KafkaSettings) -> Result<Clients, KafkaError> {
        Ok(Clients {
            consumer: Arc::new(create_client(
                settings,
                ClientKind::Consumer,
                PipelineContext::default(),
            )?),
            admin: create_client(settings, ClientKind::Admin, PipelineContext::default())?,
        })
    }
}

/// Partitions with their watermarks and oldest record, read off the async threads.
type Scanned = (Vec<(String, Vec<PartitionView>)>, bool);

async fn scan(clients: &Clients) -> Result<TopicsView, String> {
    let consumer = clients.consumer.clone();
    let (partitions, truncated) = tokio::task::spawn_blocking(move || read_partitions(&consumer))
        .await
        .map_err(|e| format!("topic scan stopped: {e}"))??;
    let names: Vec<&str> = partitions.iter().map(|(name, _)| name.as_str()).collect();
    let configs = retention_configs(&clients.admin, &names).await;
    let now = Utc::now().timestamp_millis();
    let topics = partitions
        .into_iter()
        .map(|(name, partitions)| {
            let (retention_ms, retention_bytes) = configs.get(&name).copied().unwrap_or_default();
            let records = partitions.iter().map(|p| (p.high - p.low).max(0)).sum();
            let oldest = partitions.iter().filter_map(|p| p.oldest).min();
            let oldest_age_ms = oldest.map(|at| (now - at).max(0));
            let retention_fill = match (oldest_age_ms, retention_ms) {
                (Some(age), Some(ms)) if ms > 0 => Some(age as f64 / ms as f64),
                _ => None,
            };
            TopicView {
                name,
                partitions,
                records,
                retention_ms,
                retention_bytes,
                oldest_age_ms,
                retention_fill,
            }
        })
        .collect();
    Ok(TopicsView {
        scanned_at: Some(Utc::now()),
        error: None,
        truncated,
        topics,
    })
}

/// Every topic but Kafka's internal ones, its watermarks and the Kafka time of its oldest
/// record. Blocking.
fn read_partitions(consumer: &BaseConsumer<PipelineContext>) -> Result<Scanned, String> {
    let metadata = consumer
        .fetch_metadata(None, METADATA_TIMEOUT)
        .map_err(|e| format!("Kafka metadata: {e}"))?;
    let mut topics: Vec<(String, Vec<i32>)> = metadata
        .topics()
        .iter()
        .filter(|t| !t.name().starts_with("__") && t.error().is_none())
        .map(|t| {
            let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
            ids.sort_unstable();
            (t.name().to_string(), ids)
        })
        .collect();
    topics.sort();
    let mut budget = MAX_PARTITIONS;
    let mut truncated = false;
    let mut scanned = Vec::new();
    for (name, ids) in topics {
        if ids.len() > budget {
            truncated = true;
            break;
        }
        budget -= ids.len();
        let partitions = ids
            .into_iter()
            .map(|partition| {
                let (low, high) = consumer
                    .fetch_watermarks(&name, partition, WATERMARK_TIMEOUT)
                    .unwrap_or((-1, -1));
                PartitionView {
                    partition,
                    low,
                    high,
                    oldest: None,
                }
            })
            .collect();
        scanned.push((name, partitions));
    }
    read_oldest(consumer, &mut scanned);
    Ok((scanned, truncated))
}

/// Fills each non-empty partition's `oldest` with its first record's Kafka time, within
/// [`OLDEST_WITHIN`] over all of them.
fn read_oldest(
    consumer: &BaseConsumer<PipelineContext>,
    scanned: &mut [(String, Vec<PartitionView>)],
) {
    let mut assignment = TopicPartitionList::new();
    for (name, partitions) in scanned.iter() {
        for p in partitions.iter().filter(|p| p.high > p.low && p.low >= 0) {
            if assignment
                .add_partition_offset(name, p.partition, Offset::Offset(p.low))
                .is_err()
            {
                continue;
            }
        }
    }
    let wanted = assignment.count();
    if wanted == 0 || consumer.assign(&assignment).is_err() {
        return;
    }
    let mut oldest: HashMap<(String, i32), i64> = HashMap::new();
    let deadline = Instant::now() + OLDEST_WITHIN;
    while oldest.len() < wanted {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        // Errors (a partition gone since the metadata) only leave its age unknown.
        if let Some(Ok(message)) = consumer.poll(left.min(Duration::from_millis(200))) {
            if let Some(at) = message.timestamp().to_millis() {
                oldest
                    .entry((message.topic().to_string(), message.partition()))
                    .or_insert(at);
            }
        }
    }
    let _ = consumer.unassign();
    for (name, partitions) in scanned.iter_mut() {
        for p in partitions.iter_mut() {
            p.oldest = oldest.get(&(name.clone(), p.partition)).copied();
        }
    }
}

/// `retention.ms` and `retention.bytes` of each topic; topics whose configs cannot be read are
/// left out (shown as unknown).
async fn retention_configs(
    admin: &AdminClient<PipelineContext>,
    names: &[&str],
) -> BTreeMap<String, (Option<i64>, Option<i64>)> {
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
    let mut configs = BTreeMap::new();
    for chunk in names.chunks(CONFIG_BATCH) {
        let resources: Vec<ResourceSpecifier> = chunk
            .iter()
            .map(|name| ResourceSpecifier::Topic(name))
            .collect();
        let Ok(results) = admin.describe_configs(&resources, &options).await else {
            continue;
        };
        for resource in results.into_iter().flatten() {
            let OwnedResourceSpecifier::Topic(name) = &resource.specifier else {
                continue;
            };
            let value = |key: &str| {
                resource
                    .get(key)
                    .and_then(|entry| entry.value.as_deref())
                    .and_then(|v| v.parse::<i64>().ok())
            };
            configs.insert(
                name.clone(),
                (value("retention.ms"), value("retention.bytes")),
            );
        }
    }
    configs
}
