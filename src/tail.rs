//! `eventpipe tail`: prints records of a topic as JSON lines (key, headers, value, position)
//! without joining a consumer group, so looking never moves anybody's offsets.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

use crate::codec::{decode_with_writer_schema, Registry};
use crate::config::KafkaSettings;
use crate::kafka::client::{create_client, require_topics, wait_for_broker};
use crate::kafka::{ClientKind, KafkaError, PipelineContext};

pub struct TailOptions {
    pub topic: String,
    /// Stop after this many records.
    pub count: usize,
    /// Start at the newest records instead of the oldest.
    pub from_end: bool,
    /// Stop when nothing arrives for this long.
    pub idle: Duration,
}

/// Prints records until `count` or `idle`; returns how many were printed.
pub async fn run(
    settings: &KafkaSettings,
    registry: Option<&Registry>,
    options: TailOptions,
) -> Result<usize, KafkaError> {
    let mut kafka = settings.clone();
    // librdkafka needs a group id even for manual assignment; nothing is committed under it.
    kafka
        .properties
        .entry("group.id".into())
        .or_insert_with(|| "eventpipe-tail".into());
    kafka
        .properties
        .insert("enable.auto.commit".into(), "false".into());
    let context = PipelineContext::default();
    let consumer: StreamConsumer<PipelineContext> =
        create_client(&kafka, ClientKind::Consumer, context.clone())?;
    let metadata = wait_for_broker(consumer.client(), &context, &kafka)?;
    require_topics(&metadata, &[options.topic.as_str()], &kafka)?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == options.topic)
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions as i32 {
        let start = if options.from_end {
            Offset::End
        } else {
            Offset::Beginning
        };
        assignment
            .add_partition_offset(&options.topic, partition, start)
            .map_err(KafkaError::Client)?;
    }
    consumer.assign(&assignment).map_err(KafkaError::Client)?;

    let mut printed = 0;
    while printed < options.count {
        let message = match tokio::time::timeout(options.idle, consumer.recv()).await {
            Err(_) => break,
            Ok(Err(error)) => {
                tracing::warn!(%error, "consumer error");
                continue;
            }
            Ok(Ok(message)) => message,
        };
        let headers: BTreeMap<&str, String> = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key,
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let payload = message.payload().unwrap_or_default();
        // Confluent-framed Avro (first byte 0) is shown decoded, with its schema id.
        let avro = match (registry, payload.first()) {
            (Some(registry), Some(0)) => decode_with_writer_schema(registry, payload).await.ok(),
            _ => None,
        };
        let (schema_id, value) = match avro {
            Some((id, value)) => (Some(id), value),
            None => (
                None,
                serde_json::from_slice::<Value>(payload).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(payload).into_owned())
                }),
            ),
        };
        let mut line = json!({
            "topic": message.topic(),
            "partition": message.partition(),
            "offset": message.offset(),
            "timestamp_ms": message.timestamp().to_millis(),
            "key": message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            "headers": headers,
            "value": value,
        });
        if let Some(id) = schema_id {
            line["schema_id"] = json!(id);
        }
        println!("{line}");
        printed += 1;
    }
    Ok(printed)
}
