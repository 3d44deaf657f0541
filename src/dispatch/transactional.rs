//! The dispatcher's exactly-once loop: consume-transform-produce inside Kafka transactions, the
//! input offsets sent to the same transaction, so outputs and progress commit or abort together.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::metrics::LoopMetrics;
use super::pipeline::{
    base_record, required_topics, subscription, transform_message, DispatchError, DispatchSummary,
};
use super::transform::Transformer;
use crate::config::{InputTopics, KafkaSettings};
use crate::kafka::client::{client_config, require_topics, wait_for_broker};
use crate::kafka::{ClientKind, KafkaError, PipelineContext};
use crate::telemetry::Readiness;

/// A transaction closes after this many inputs or this much time, whichever comes first:
/// larger batches amortise the commit, smaller ones bound latency and re-work after an abort.
const MAX_BATCH: usize = 10_000;
const MAX_BATCH_TIME: Duration = Duration::from_millis(100);
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Consumer context that notes a revocation so the open transaction is aborted, not committed
/// with offsets of partitions this member no longer owns.
struct RevocationFlag {
    log: PipelineContext,
    revoked: AtomicBool,
}

crate::kafka::client::logging_client_context!(RevocationFlag);

impl ConsumerContext for RevocationFlag {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                tracing::info!(
                    count = partitions.count(),
                    "partitions revoked; aborting the open transaction"
                );
                self.revoked.store(true, Ordering::SeqCst);
            }
            Rebalance::Assign(partitions) => {
                tracing::info!(count = partitions.count(), "partitions assigned")
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }
}

/// Runs the transactional dispatcher until `shutdown`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    kafka: &KafkaSettings,
    input: &InputTopics,
    group_id: &str,
    transactional_id: &str,
    transformer: Transformer,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<DispatchSummary, DispatchError> {
    let log = PipelineContext::default();
    let mut producer_config = client_config(kafka, ClientKind::Producer);
    producer_config
        .set("transactional.id", transactional_id)
        .set(
            "transaction.timeout.ms",
            TRANSACTION_TIMEOUT.as_millis().to_string(),
        )
        // librdkafka requires a record to time out no later than its transaction.
        .set(
            "message.timeout.ms",
            TRANSACTION_TIMEOUT.as_millis().to_string(),
        );
    let producer: ThreadedProducer<PipelineContext> = producer_config
        .create_with_context(log.clone())
        .map_err(KafkaError::Client)?;
    let metadata = wait_for_broker(producer.client(), &log, kafka)?;
    let required = required_topics(&transformer, input);
    let required: Vec<&str> = required.iter().map(String::as_str).collect();
    require_topics(&metadata, &required, kafka)?;
    // Fences any earlier producer with this id and aborts its unfinished transaction.
    producer
        .init_transactions(TRANSACTION_TIMEOUT)
        .map_err(KafkaError::Client)?;

    let mut consumer_config = client_config(kafka, ClientKind::Consumer);
    consumer_config
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    let consumer: StreamConsumer<RevocationFlag> = consumer_config
        .create_with_context(RevocationFlag {
            log: log.clone(),
            revoked: AtomicBool::new(false),
        })
        .map_err(KafkaError::Client)?;
    let subscription = subscription(input);
    consumer
        .subscribe(&subscription)
        .map_err(KafkaError::Client)?;
    readiness.register("kafka");
    readiness.set("kafka", true);
    tracing::info!(inputs = ?subscription, group_id, transactional_id, "dispatching exactly once");

    let mut summary = DispatchSummary::default();
    let mut loop_metrics = LoopMetrics::default();
    let mut topic_ids: BTreeMap<String, Arc<str>> = BTreeMap::new();
    while !shutdown.is_cancelled() {
        // Wait for the first input before opening a transaction: idle time costs nothing.
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            received = consumer.recv() => received,
        };
        let first = match first {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "consumer error");
                continue;
            }
        };
        consumer.context().revoked.store(false, Ordering::SeqCst);
        producer.begin_transaction().map_err(KafkaError::Client)?;
        // First offset (to rewind to on abort) and next offset (to commit) per partition.
        let mut first_offsets: BTreeMap<(Arc<str>, i32), i64> = BTreeMap::new();
        let mut next_offsets: BTreeMap<(Arc<str>, i32), i64> = BTreeMap::new();
        let mut batch_summary = DispatchSummary::default();
        let mut message = Some(first);
        let closes_at = tokio::time::Instant::now() + MAX_BATCH_TIME;
        let mut count = 0;
        let mut produce_error = None;
        while let Some(current) = message.take() {
            let topic_id = topic_ids
                .entry(current.topic().to_string())
                .or_insert_with(|| current.topic().into())
                .clone();
            let Some((outputs, _)) = transform_message(
                &current,
                &topic_id,
                &transformer,
                &mut batch_summary,
                &mut loop_metrics,
                &shutdown,
            )
            .await
            else {
                // Shutdown while waiting for the registry: this message stays unconsumed.
                break;
            };
            for output in &outputs {
                if let Err(error) = send(&producer, base_record(output, ())).await {
                    produce_error = Some(error);
                }
            }
            let key = (topic_id, current.partition());
            first_offsets.entry(key.clone()).or_insert(current.offset());
            next_offsets.insert(key, current.offset() + 1);
            count += 1;
            if count >= MAX_BATCH || produce_error.is_some() {
                break;
            }
            message = tokio::select! {
                _ = shutdown.cancelled() => None,
                _ = tokio::time::sleep_until(closes_at) => None,
                received = consumer.recv() => received.ok(),
            };
            if consumer.context().revoked.load(Ordering::SeqCst) {
                break;
            }
        }

        let revoked = consumer.context().revoked.load(Ordering::SeqCst);
        let committed = if revoked || produce_error.is_some() {
            Err(produce_error.unwrap_or_else(|| "partitions revoked mid-transaction".into()))
        } else {
            commit(&producer, &consumer, &next_offsets)
        };
        match committed {
            Ok(()) => {
                summary.consumed += batch_summary.consumed;
                summary.routed += batch_summary.routed;
                summary.dead_lettered += batch_summary.dead_lettered;
                metrics::counter!("eventpipe_dispatch_transactions_total", "outcome" => "committed").increment(1);
            }
            Err(reason) => {
                tracing::warn!(%reason, inputs = count, "aborting transaction; its inputs will be processed again");
                metrics::counter!("eventpipe_dispatch_transactions_total", "outcome" => "aborted")
                    .increment(1);
                producer
                    .abort_transaction(TRANSACTION_TIMEOUT)
                    .map_err(KafkaError::Client)?;
                rewind(&consumer, &first_offsets);
            }
        }
    }
    readiness.set("kafka", false);
    tracing::info!(
        consumed = summary.consumed,
        routed = summary.routed,
        dead_lettered = summary.dead_lettered,
        "dispatcher stopped"
    );
    Ok(summary)
}

/// Enqueues a record, waiting while the producer queue is full.
async fn send(
    producer: &ThreadedProducer<PipelineContext>,
    mut record: rdkafka::producer::BaseRecord<'_, Vec<u8>, Vec<u8>, ()>,
) -> Result<(), String> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((error, returned)) => {
                return Err(format!("produce to {} refused: {error}", returned.topic))
            }
        }
    }
}

/// Sends the batch's offsets to the transaction and commits it.
fn commit(
    producer: &ThreadedProducer<PipelineContext>,
    consumer: &StreamConsumer<RevocationFlag>,
    next_offsets: &BTreeMap<(Arc<str>, i32), i64>,
) -> Result<(), String> {
    let mut offsets = TopicPartitionList::new();
    for ((topic, partition), next) in next_offsets {
        offsets
            .add_partition_offset(topic, *partition, Offset::Offset(*next))
            .map_err(|e| e.to_string())?;
    }
    let group = consumer
        .group_metadata()
        .ok_or("consumer has no group metadata")?;
    producer
        .send_offsets_to_transaction(&offsets, &group, TRANSACTION_TIMEOUT)
        .and_then(|()| producer.commit_transaction(TRANSACTION_TIMEOUT))
        .map_err(|e| e.to_string())
}

/// After an abort, moves still-owned partitions back to the batch's first offsets so the
/// aborted inputs are processed again.
fn rewind(
    consumer: &StreamConsumer<RevocationFlag>,
    first_offsets: &BTreeMap<(Arc<str>, i32), i64>,
) {
    let assignment = consumer.assignment().unwrap_or_default();
    let mut seek = TopicPartitionList::new();
    for ((topic, partition), first) in first_offsets {
        if assignment.find_partition(topic, *partition).is_some() {
            let _ = seek.add_partition_offset(topic, *partition, Offset::Offset(*first));
        }
    }
    if seek.count() > 0 {
        if let Err(error) = consumer.seek_partitions(seek, Duration::from_secs(10)) {
            tracing::error!(%error, "rewinding after an abort failed");
        }
    }
}
