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

/// Sets the `<metric>{topic, partition}` gauge for the partitions this member owns.
pub fn record_lag(metric: &'static str, statistics: &Statistics) {
    for (topic, stats) in &statistics.topics {
        for (partition, p) in &stats.partitions {
            // consumer_lag is -1 for partitions this member does not own: they are not reported.
            if *partition >= 0 && p.consumer_lag >= 0 {
                metrics::gauge!(metric, "topic" => topic.clone(), "partition" => partition.to_string())
                    .set(p.consumer_lag as f64);
            }
        }
    }
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
