//! Consumer-side helpers shared by the at-least-once stages: storing acknowledged offsets,
//! committing on revoke and on stop, consumer lag from statistics, and the consumer context.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::kafka::ack::{AckTracker, PartitionId};
use crate::kafka::PipelineContext;

/// What a stage does on revocation before the commit: wait (bounded) for in-flight outputs.
pub type Drain = Box<dyn Fn(&TopicPartitionList) + Send + Sync>;

/// Consumer context of an at-least-once stage: librdkafka logs into `tracing`, consumer lag into
/// a gauge, and on revocation the stage's drain, then a commit of the acknowledged prefix.
pub struct TrackingContext {
    log: PipelineContext,
    tracker: Arc<Mutex<AckTracker>>,
    lag_metric: &'static str,
    drain: Drain,
}

impl TrackingContext {
    pub fn new(
        log: PipelineContext,
        tracker: Arc<Mutex<AckTracker>>,
        lag_metric: &'static str,
        drain: Drain,
    ) -> TrackingContext {
        TrackingContext {
            log,
            tracker,
            lag_metric,
            drain,
        }
    }
}

impl ClientContext for TrackingContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        self.log.log(level, facility, message);
    }
    fn error(&self, error: RdKafkaError, reason: &str) {
        self.log.error(error, reason);
    }
    fn stats(&self, statistics: Statistics) {
        record_lag(self.lag_metric, &statistics);
    }
}

impl ConsumerContext for TrackingContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                tracing::info!(partitions = %describe(partitions), "partitions revoked; draining");
                forget_lag(partitions);
                (self.drain)(partitions);
                commit_revoked(consumer, &self.tracker, partitions);
            }
            Rebalance::Assign(partitions) => {
                tracing::info!(partitions = %describe(partitions), "partitions assigned");
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }
}

/// Interned topic names: one `Arc<str>` per topic, shared by the partition ids of its records.
#[derive(Default)]
pub struct TopicIds(BTreeMap<String, Arc<str>>);

impl TopicIds {
    pub fn get(&mut self, topic: &str) -> Arc<str> {
        if let Some(id) = self.0.get(topic) {
            return id.clone();
        }
        let id: Arc<str> = topic.into();
        self.0.insert(topic.to_string(), id.clone());
        id
    }
}

/// Offsets handed to librdkafka so far, per partition (Kafka's "next offset" form).
pub type StoredOffsets = BTreeMap<PartitionId, i64>;

pub fn lock(tracker: &Mutex<AckTracker>) -> std::sync::MutexGuard<'_, AckTracker> {
    // A poisoned lock only means a panic elsewhere; the bookkeeping itself stays consistent.
    tracker.lock().unwrap_or_else(|p| p.into_inner())
}

/// Lag by metric name, then by (topic, partition).
type LagTable = BTreeMap<&'static str, BTreeMap<(String, i32), i64>>;

/// Consumer lag per owned partition, by metric name. Kept here rather than in the `metrics`
/// registry because a series must disappear when its partition is revoked, and the registry
/// cannot remove one; `render_lag` appends these to /metrics.
static LAG: Mutex<LagTable> = Mutex::new(BTreeMap::new());

fn lag_table() -> std::sync::MutexGuard<'static, LagTable> {
    LAG.lock().unwrap_or_else(|p| p.into_inner())
}

/// Replaces `metric`'s series with the partitions this member owns in `statistics`.
pub fn record_lag(metric: &'static str, statistics: &Statistics) {
    let mut owned = BTreeMap::new();
    for (topic, stats) in &statistics.topics {
        for (partition, p) in &stats.partitions {
            // consumer_lag is -1 for partitions this member does not own: they are not reported.
            // Revoked partitions linger in the statistics with their last figures; only those
            // being fetched are owned.
            if *partition >= 0 && p.consumer_lag >= 0 && p.fetch_state == "active" {
                owned.insert((topic.clone(), *partition), p.consumer_lag);
            }
        }
    }
    lag_table().insert(metric, owned);
}

/// Drops revoked partitions from every lag metric at once, without waiting for the next report.
pub fn forget_lag(partitions: &TopicPartitionList) {
    let mut table = lag_table();
    for series in table.values_mut() {
        for element in partitions.elements() {
            series.remove(&(element.topic().to_string(), element.partition()));
        }
    }
}

/// The lag gauges in Prometheus text format, for the /metrics endpoint.
pub fn render_lag() -> String {
    use std::fmt::Write;
    let mut text = String::new();
    for (metric, series) in lag_table().iter() {
        let _ = writeln!(text, "# HELP {metric} Records between the consumer position and the high watermark, per owned partition.");
        let _ = writeln!(text, "# TYPE {metric} gauge");
        for ((topic, partition), lag) in series {
            let topic = topic.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(
                text,
                "{metric}{{topic=\"{topic}\",partition=\"{partition}\"}} {lag}"
            );
        }
    }
    text
}

/// `topic[partition],...` for log lines.
pub fn describe(partitions: &TopicPartitionList) -> String {
    partitions
        .elements()
        .iter()
        .map(|e| format!("{}[{}]", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Commits (asynchronously) the offsets that became committable since the last call.
/// eventpipe commits explicitly instead of using librdkafka's auto-commit: an automatic commit
/// of a stale offset store (on a timer, or when the consumer closes) could land after the
/// revocation's synchronous commit and move a partition back, re-delivering finished work.
pub fn commit_committable<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    tracker: &Mutex<AckTracker>,
    stored: &mut StoredOffsets,
) {
    let assigned = consumer.assignment().unwrap_or_default();
    let committable: Vec<_> = lock(tracker)
        .take_committable()
        .into_iter()
        // A partition revoked since: its offsets were committed by the revocation handler.
        .filter(|(id, _)| assigned.find_partition(&id.topic, id.partition).is_some())
        .collect();
    if committable.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (id, next) in &committable {
        let _ = tpl.add_partition_offset(&id.topic, id.partition, Offset::Offset(*next));
    }
    match consumer.commit(&tpl, CommitMode::Async) {
        Ok(()) => stored.extend(committable),
        Err(error) => tracing::debug!(%error, "committing offsets"),
    }
}

/// Synchronously commits `stored` for the partitions still assigned (the final commit of a
/// graceful stop); a revoked partition's offset was committed on revocation and may have moved on.
pub fn commit_stored<C: ConsumerContext, K: Consumer<C>>(consumer: &K, stored: &StoredOffsets) {
    let assigned = consumer.assignment().unwrap_or_default();
    let mut commit = TopicPartitionList::new();
    for (id, next) in stored {
        if assigned.find_partition(&id.topic, id.partition).is_some() {
            let _ = commit.add_partition_offset(&id.topic, id.partition, Offset::Offset(*next));
        }
    }
    if commit.count() > 0 {
        if let Err(error) = consumer.commit(&commit, CommitMode::Sync) {
            tracing::warn!(%error, "final commit failed; inputs since the last commit will be re-delivered");
        }
    }
}

/// On revocation: commits what the tracker made committable for `partitions` and forgets them,
/// so the next owner starts right after the acknowledged prefix. Late acks are then ignored.
pub fn commit_revoked<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    tracker: &Mutex<AckTracker>,
    partitions: &TopicPartitionList,
) {
    let mut commit = TopicPartitionList::new();
    {
        let mut tracker = lock(tracker);
        for element in partitions.elements() {
            let id = PartitionId {
                topic: element.topic().into(),
                partition: element.partition(),
            };
            let pending = tracker.pending_on(&id);
            if let Some(next) = tracker.forget(&id) {
                let _ = commit.add_partition_offset(
                    element.topic(),
                    element.partition(),
                    Offset::Offset(next),
                );
            }
            if pending > 0 {
                tracing::warn!(
                    topic = element.topic(),
                    partition = element.partition(),
                    pending,
                    "revoked with unacknowledged inputs; they will be re-delivered"
                );
            }
        }
    }
    if commit.count() > 0 {
        match consumer.commit(&commit, CommitMode::Sync) {
            Ok(()) => tracing::info!(partitions = commit.count(), "committed revoked partitions"),
            Err(error) => {
                tracing::warn!(%error, "commit on revocation failed; inputs since the last commit will be re-delivered")
            }
        }
    }
}
