//! What a stage holds from the runtime to finish records later (`Handled::Pending`): the
//! acknowledgement handle and the dead-letter writer, usable from any task of the stage.

use std::sync::{Arc, Mutex};

use rdkafka::producer::Producer;

use super::ack::{lock, AckTracker, PartitionId};
use super::output::{self, Delivery, OutputProducer};
use super::{dead_letter, DeadLetter, DeadLetterTopic, Record};
use crate::telemetry::Readiness;

/// What a stage gets from the runtime to acknowledge and dead-letter records it handles later
/// (`Handled::Pending`), from any task.
#[derive(Clone)]
pub struct StageIo {
    pub acks: Acks,
    pub dead_letters: DeadLetters,
    pub readiness: Readiness,
}

/// Acknowledges records the stage handled as `Handled::Pending`.
#[derive(Clone)]
pub struct Acks {
    pub(super) tracker: Arc<Mutex<AckTracker>>,
}

impl Acks {
    /// The record at `offset` is durably handled; each `Pending` record is acknowledged once.
    pub fn ack(&self, partition: &PartitionId, offset: i64) {
        lock(&self.tracker).ack(partition, offset);
    }
}

/// Writes dead letters of `Pending` records: the record is acknowledged when its dead letter is.
#[derive(Clone)]
pub struct DeadLetters {
    pub(super) stage: &'static str,
    pub(super) producer: Arc<OutputProducer>,
    pub(super) topics: DeadLetterTopic,
}

impl DeadLetters {
    pub async fn send(&self, record: &Record<'_>, dead_letter: &DeadLetter) {
        let output = dead_letter::record(
            self.stage,
            dead_letter,
            record,
            &self.topics.for_input(record.topic),
        );
        let token = Box::new(Delivery {
            input: Some((record.partition_id(), record.offset)),
            dead_letter: true,
            input_timestamp_ms: record.timestamp_ms,
        });
        if let Err(error) = output::send(&self.producer, &output, token).await {
            self.producer
                .context()
                .deliveries
                .fail(format!("dead letter not accepted: {error:?}"));
        }
    }
}
