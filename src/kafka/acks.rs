//! Acknowledged batches: each record's partition and offset (or its error) filled in by
//! librdkafka's delivery reports, and the batch's one waiter woken once, when the last lands.

// The gateway answers a request only when Kafka acknowledged every line, with each line's
// coordinates. A delivery future per line (FutureProducer) costs a channel, a task wake and a
// poll of the joined futures per record; here a report writes one slot and counts down.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::{DeliveryResult, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::Notify;

use super::client::{create_client, ClientKind, KafkaError, PipelineContext};
use crate::config::KafkaSettings;

/// Where Kafka put a record, or why it did not.
pub type Ack = Result<(i32, i64), RdKafkaError>;

/// One batch's reports.
struct Batch {
    slots: Mutex<Vec<Option<Ack>>>,
    outstanding: AtomicUsize,
    done: Notify,
}

impl Batch {
    fn settle(&self, slot: usize, ack: Ack) {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())[slot] = Some(ack);
        if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            // notify_one keeps a permit: a waiter that has not started waiting yet still wakes.
            self.done.notify_one();
        }
    }
}

/// A record's delivery opaque: its batch and its place in it.
pub struct Slot {
    batch: Arc<Batch>,
    index: usize,
}

/// The producer's context: librdkafka's logs routed as [`PipelineContext`] does, reports to slots.
pub struct AckContext {
    log: PipelineContext,
}

crate::kafka::client::logs_through_pipeline_context!(AckContext);

impl ProducerContext for AckContext {
    type DeliveryOpaque = Box<Slot>;

    fn delivery(&self, result: &DeliveryResult<'_>, slot: Box<Slot>) {
        let ack = match result {
            Ok(message) => Ok((message.partition(), message.offset())),
            Err((error, _)) => Err(error.clone()),
        };
        slot.batch.settle(slot.index, ack);
    }
}

/// A producer whose sends are grouped in batches answered together.
pub struct AckingProducer {
    producer: ThreadedProducer<AckContext>,
}

impl AckingProducer {
    /// `log` is the context whose connection state `wait_for_broker` marks.
    pub fn create(settings: &KafkaSettings, log: PipelineContext) -> Result<Self, KafkaError> {
        let producer = create_client(settings, ClientKind::Producer, AckContext { log })?;
        Ok(AckingProducer { producer })
    }

    /// A batch: send each record with [`AckBatch::send`], then wait with [`AckBatch::acks`].
    pub fn batch(&self) -> AckBatch<'_> {
        AckBatch {
            producer: &self.producer,
            batch: Arc::new(Batch {
                slots: Mutex::new(Vec::new()),
                outstanding: AtomicUsize::new(0),
                done: Notify::new(),
            }),
        }
    }
}

/// Records sent together; their acknowledgements come back in the order they were sent.
pub struct AckBatch<'p> {
    producer: &'p ThreadedProducer<AckContext>,
    batch: Arc<Batch>,
}

impl AckBatch<'_> {
    /// Hands the next record to librdkafka, retrying while its queue is full until
    /// `queue_timeout`; a record that cannot be enqueued is settled with the error at once.
    pub async fn send(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: OwnedHeaders,
        queue_timeout: Duration,
    ) {
        // The slot exists and is counted before librdkafka can report on it.
        let index = {
            let mut slots = self.batch.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.push(None);
            slots.len() - 1
        };
        self.batch.outstanding.fetch_add(1, Ordering::AcqRel);
        let slot = Box::new(Slot {
            batch: self.batch.clone(),
            index,
        });
        let mut record = BaseRecord::with_opaque_to(topic, slot)
            .payload(payload)
            .headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        let deadline = Instant::now() + queue_timeout;
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned))
                    if Instant::now() < deadline =>
                {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((error, returned)) => {
                    returned.delivery_opaque.batch.settle(index, Err(error));
                    return;
                }
            }
        }
    }

    /// Waits for every report; the acknowledgements in the order the records were sent.
    pub async fn acks(self) -> Vec<Ack> {
        // The count may have touched zero between two sends (a stale permit): re-checked.
        while self.batch.outstanding.load(Ordering::Acquire) > 0 {
            self.batch.done.notified().await;
        }
        let slots =
            std::mem::take(&mut *self.batch.slots.lock().unwrap_or_else(|p| p.into_inner()));
        slots
            .into_iter()
            .map(|ack| ack.unwrap_or(Err(RdKafkaError::MessageProduction(RDKafkaErrorCode::Fail))))
            .collect()
    }
}
