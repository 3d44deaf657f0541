//! The consumer context of every stage: librdkafka's logs into `tracing`, consumer lag into a
//! gauge, commit confirmations into the committer, and rebalances into the offset policy's drain.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::producer::Producer;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, TopicPartitionList};

use super::ack::{lock, AckTracker, PartitionId};
use super::commit::Committer;
use super::output::OutputProducer;
use super::{lag, Checkpoint, OffsetPolicy, PartitionHooks};
use crate::kafka::PipelineContext;

/// Bound on fetching committed offsets (and their metadata) while partitions are assigned.
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(10);

/// What the loop and the rebalance callback share.
pub(crate) struct Shared {
    pub stage: &'static str,
    pub policy: OffsetPolicy,
    pub tracker: Arc<Mutex<AckTracker>>,
    pub committer: Committer,
    pub hooks: Arc<dyn PartitionHooks>,
    pub producer: Arc<OutputProducer>,
    pub drain_timeout: Duration,
    /// Exactly once: a revocation happened, so the open transaction must abort.
    pub revoked: AtomicBool,
    /// Set once the final commit is done: a revocation while closing must not wait again.
    pub closing: AtomicBool,
    /// Bumped on every assignment change, so the loop re-syncs its merge buffers.
    pub assignment_generation: AtomicU64,
}

pub(crate) struct StageContext {
    pub log: PipelineContext,
    pub lag_metric: &'static str,
    pub shared: Arc<Shared>,
}

impl ClientContext for StageContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        self.log.log(level, facility, message);
    }
    fn error(&self, error: RdKafkaError, reason: &str) {
        self.log.error(error, reason);
    }
    fn stats(&self, statistics: Statistics) {
        let read_committed = matches!(self.shared.policy, OffsetPolicy::Transactional { .. });
        lag::record(self.lag_metric, &statistics, read_committed);
    }
}

impl ConsumerContext for StageContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let stage = self.shared.stage;
        match rebalance {
            Rebalance::Revoke(partitions) => {
                self.shared
                    .assignment_generation
                    .fetch_add(1, Ordering::AcqRel);
                tracing::info!(stage, partitions = %describe(partitions), "partitions revoked");
                lag::forget(partitions);
                self.revoke(consumer, partitions);
            }
            // Before librdkafka starts fetching, so no record arrives for a partition whose
            // state is not restored yet.
            Rebalance::Assign(partitions) => {
                self.shared
                    .assignment_generation
                    .fetch_add(1, Ordering::AcqRel);
                tracing::info!(stage, partitions = %describe(partitions), "partitions assigned");
                self.assign(consumer, partitions);
            }
            Rebalance::Error(error) => tracing::warn!(stage, %error, "rebalance error"),
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        self.shared.committer.completed(&result, offsets);
    }
}

impl StageContext {
    fn assign(&self, consumer: &BaseConsumer<Self>, partitions: &TopicPartitionList) {
        let shared = &self.shared;
        let committed = match shared.policy {
            OffsetPolicy::Checkpoint => consumer
                .committed_offsets(partitions.clone(), COMMITTED_TIMEOUT)
                .map_err(|error| tracing::warn!(stage = shared.stage, %error, "cannot read committed metadata; starting without it"))
                .ok(),
            _ => None,
        };
        for element in partitions.elements() {
            let metadata = committed.as_ref().and_then(|c| {
                c.find_partition(element.topic(), element.partition())
                    .map(|e| e.metadata().to_string())
            });
            shared.hooks.assigned(
                &id(element.topic(), element.partition()),
                metadata.as_deref(),
            );
        }
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>, partitions: &TopicPartitionList) {
        let shared = &self.shared;
        let ids: Vec<PartitionId> = partitions
            .elements()
            .iter()
            .map(|e| id(e.topic(), e.partition()))
            .collect();
        if let OffsetPolicy::Transactional { .. } = shared.policy {
            tracing::info!(
                stage = shared.stage,
                "aborting the open transaction: partitions revoked"
            );
            shared.revoked.store(true, Ordering::SeqCst);
            for id in &ids {
                shared.hooks.revoked(id);
            }
            return;
        }
        if !shared.closing.load(Ordering::Relaxed) {
            self.drain(&ids);
        }
        let mut final_checkpoints = Vec::new();
        {
            let mut tracker = lock(&shared.tracker);
            for id in &ids {
                let pending = tracker.pending_on(id);
                let first_pending = tracker.first_pending(id);
                let acked = tracker.forget(id);
                let stage_checkpoint = shared.hooks.revoked(id);
                let checkpoint = match shared.policy {
                    OffsetPolicy::Checkpoint => {
                        stage_checkpoint.map(|c| cap_below(c, first_pending))
                    }
                    _ => acked.map(|next_offset| Checkpoint {
                        next_offset,
                        metadata: None,
                    }),
                };
                if pending > 0 {
                    tracing::warn!(
                        stage = shared.stage,
                        topic = %id.topic,
                        partition = id.partition,
                        pending,
                        "revoked with unacknowledged inputs; they will be re-delivered"
                    );
                }
                if let Some(checkpoint) = checkpoint {
                    final_checkpoints.push((id.clone(), checkpoint));
                }
            }
        }
        shared
            .committer
            .commit_revoked(consumer, final_checkpoints, &ids);
    }

    /// Waits (bounded by the drain timeout) until the revoked partitions' in-flight work is
    /// acknowledged, so it is committed and the next owner does not do it again. This runs
    /// inside librdkafka's rebalance callback, on the task that polls the consumer: on a
    /// multi-threaded runtime the wait moves off the worker (`block_in_place`), so the tasks it
    /// waits for (the log stage's indexer) keep running.
    fn drain(&self, ids: &[PartitionId]) {
        let shared = &self.shared;
        let deadline = Instant::now() + shared.drain_timeout;
        let multi_threaded = tokio::runtime::Handle::try_current().is_ok_and(|handle| {
            handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        });
        let wait = || {
            if let Err(error) = shared.producer.flush(shared.drain_timeout) {
                tracing::warn!(stage = shared.stage, %error, "in-flight outputs not all acknowledged within the drain deadline; their inputs will be re-delivered");
            }
            loop {
                let outstanding = shared.hooks.outstanding(ids).unwrap_or_else(|| {
                    let tracker = lock(&shared.tracker);
                    ids.iter().map(|id| tracker.pending_on(id)).sum()
                });
                if outstanding == 0 || Instant::now() >= deadline {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        if multi_threaded {
            tokio::task::block_in_place(wait);
        } else if let Err(error) = shared.producer.flush(shared.drain_timeout) {
            // A single-threaded runtime cannot run the stage's own tasks meanwhile: only the
            // producer's delivery reports (librdkafka's thread) can make progress.
            tracing::warn!(stage = shared.stage, %error, "in-flight outputs not all acknowledged within the drain deadline; their inputs will be re-delivered");
        }
    }
}

/// A checkpoint never moves past an offset whose dead letter is still in flight.
pub(crate) fn cap_below(checkpoint: Checkpoint, first_pending: Option<i64>) -> Checkpoint {
    match first_pending {
        Some(pending) if pending < checkpoint.next_offset => Checkpoint {
            next_offset: pending,
            ..checkpoint
        },
        _ => checkpoint,
    }
}

fn id(topic: &str, partition: i32) -> PartitionId {
    PartitionId {
        topic: topic.into(),
        partition,
    }
}

/// `topic[partition],...` for log lines.
pub(crate) fn describe(partitions: &TopicPartitionList) -> String {
    partitions
        .elements()
        .iter()
        .map(|e| format!("{}[{}]", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}
