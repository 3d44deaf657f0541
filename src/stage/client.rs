//! The runtime's librdkafka clients beyond the loop: the output producer's configuration, the
//! co-partitioning check, cached high watermarks for the merge, and blocking calls off the worker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::TopicPartitionList;

use super::context::StageContext;
use super::merge::Fetched;
use super::output::{Deliveries, DeliveryContext, OutputProducer};
use super::{InputTopics, OffsetPolicy, StageSpec};
use crate::config::KafkaSettings;
use crate::kafka::client::client_config;
use crate::kafka::{ClientKind, KafkaError, PipelineContext};

/// Blocking transaction calls give up after this (librdkafka's own bound).
pub(super) const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Room above `max_record_bytes` for a dead letter's headers.
pub(super) const DEAD_LETTER_HEADROOM: usize = 16 * 1024;

pub(super) fn create_producer(
    kafka: &KafkaSettings,
    spec: &StageSpec,
    log: &PipelineContext,
    deliveries: Arc<Deliveries>,
) -> Result<OutputProducer, KafkaError> {
    let mut config = client_config(kafka, ClientKind::Producer);
    // Outputs are checked against `max_record_bytes` (the user's `message.max.bytes`, or
    // librdkafka's default) before sending; dead letters (the original record plus headers saying
    // why) get the headroom above it.
    config.set(
        "message.max.bytes",
        (spec.max_record_bytes + DEAD_LETTER_HEADROOM).to_string(),
    );
    if let OffsetPolicy::Transactional {
        transactional_id, ..
    } = &spec.policy
    {
        let timeout = TRANSACTION_TIMEOUT.as_millis().to_string();
        config
            .set("transactional.id", transactional_id)
            .set("transaction.timeout.ms", &timeout)
            // librdkafka requires a record to time out no later than its transaction.
            .set("message.timeout.ms", &timeout);
    }
    config
        .create_with_context(DeliveryContext {
            log: log.clone(),
            deliveries,
        })
        .map_err(|e| match e {
            rdkafka::error::KafkaError::ClientConfig(_, desc, key, value) => {
                KafkaError::Config(format!("{key}={value}: {desc}"))
            }
            other => KafkaError::Client(other),
        })
}

/// Several named inputs with different partition counts cannot be merged per partition number.
pub(super) fn warn_unless_co_partitioned(spec: &StageSpec, metadata: &rdkafka::metadata::Metadata) {
    let InputTopics::Names(names) = &spec.inputs else {
        return;
    };
    let counts: BTreeMap<&str, usize> = metadata
        .topics()
        .iter()
        .filter(|t| names.iter().any(|n| n == t.name()))
        .map(|t| (t.name(), t.partitions().len()))
        .collect();
    let distinct: std::collections::BTreeSet<_> = counts.values().collect();
    if distinct.len() > 1 {
        tracing::warn!(
            stage = spec.name,
            partitions = ?counts,
            "inputs are not co-partitioned (different partition counts): events of one key on different topics may be handled out of their produced order"
        );
    }
}

/// Several topics (named, or a pattern's matches) are merged per partition number.
pub(super) fn driver_merges(inputs: &InputTopics) -> bool {
    match inputs {
        InputTopics::Names(names) => names.len() > 1,
        InputTopics::Pattern(_) => true,
    }
}

/// What an empty partition may still deliver: caught up when the next offset after the last
/// record received reaches the high watermark librdkafka last saw in a fetch (no network call).
pub(super) fn fetched(
    consumer: &StreamConsumer<StageContext>,
    topic: &str,
    partition: i32,
    next_offset: Option<i64>,
) -> Fetched {
    let Ok(topic) = std::ffi::CString::new(topic) else {
        return Fetched::CaughtUp;
    };
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer lives as long as `consumer`; the topic is a valid C string;
    // librdkafka only reads its cached offsets and writes the two out-parameters.
    let error = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    if error != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || high < 0 {
        return Fetched::NotYet;
    }
    let caught_up = match next_offset {
        Some(next) => next >= high,
        // Nothing received since the assignment: caught up only if the partition is empty.
        None => high <= low,
    };
    if caught_up {
        Fetched::CaughtUp
    } else {
        Fetched::Behind
    }
}

/// Runs a blocking librdkafka call off the async worker where the runtime allows it.
pub(super) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    let multi_threaded = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_threaded {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

pub(super) fn same_partitions(a: &TopicPartitionList, b: &TopicPartitionList) -> bool {
    let list = |l: &TopicPartitionList| {
        l.elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect::<Vec<_>>()
    };
    list(a) == list(b)
}
