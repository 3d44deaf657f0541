//! Bounded in-flight produce: keeps at most N records unacknowledged (backpressure instead of an
//! unbounded queue) and counts what Kafka acknowledged, failing on the first lost record.

// The producer's context counts delivery reports as librdkafka's poll thread hands them over,
// instead of a oneshot future per record: at 100 k records/s a future, its channel and its wake
// cost as much as the produce itself (the store's replay measured it, BENCHMARKS.md).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::Client;
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::Notify;

use super::client::{create_client, ClientKind, KafkaError, PipelineContext};
use crate::config::KafkaSettings;

/// Delivery reports counted: acknowledged, failed (the first failure kept), and a wake-up for
/// whoever waits for room or for the end.
#[derive(Default)]
pub struct DeliveryCounts {
    acknowledged: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<rdkafka::error::KafkaError>>,
    reported: Notify,
}

impl DeliveryCounts {
    fn resolved(&self) -> u64 {
        // `failed` first: a report counted between the two loads is then seen as unresolved,
        // never as resolved twice.
        let failed = self.failed.load(Ordering::Acquire);
        failed + self.acknowledged.load(Ordering::Acquire)
    }

    fn take_failure(&self) -> Option<rdkafka::error::KafkaError> {
        self.first_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Waits until `done` holds, re-checked after every delivery report.
    async fn wait_until(&self, done: impl Fn(&Self) -> bool) {
        loop {
            let reported = self.reported.notified();
            tokio::pin!(reported);
            // Registered before the check: a report between the check and the await still wakes.
            reported.as_mut().enable();
            if done(self) {
                return;
            }
            reported.await;
        }
    }
}

/// The producer's context: librdkafka's logs as [`PipelineContext`] routes them, and the counts.
pub struct CountingContext {
    log: PipelineContext,
    counts: Arc<DeliveryCounts>,
}

crate::kafka::client::logs_through_pipeline_context!(CountingContext);

impl ProducerContext for CountingContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let counts = &self.counts;
        match result {
            Ok(_) => {
                counts.acknowledged.fetch_add(1, Ordering::Release);
            }
            Err((error, _)) => {
                counts
                    .first_failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(|| error.clone());
                counts.failed.fetch_add(1, Ordering::Release);
            }
        }
        counts.reported.notify_waiters();
    }
}

/// An idempotent, acks=all producer whose deliveries are counted; send through [`BoundedSender`].
pub struct CountedProducer {
    producer: ThreadedProducer<CountingContext>,
    counts: Arc<DeliveryCounts>,
}

impl CountedProducer {
    /// `log` is the context whose connection state `wait_for_broker` marks.
    pub fn create(settings: &KafkaSettings, log: PipelineContext) -> Result<Self, KafkaError> {
        let counts = Arc::new(DeliveryCounts::default());
        let context = CountingContext {
            log,
            counts: counts.clone(),
        };
        let producer = create_client(settings, ClientKind::Producer, context)?;
        Ok(CountedProducer { producer, counts })
    }

    pub fn client(&self) -> &Client<CountingContext> {
        self.producer.client()
    }
}

/// Sends records through a [`CountedProducer`] with a cap on how many are unacknowledged.
/// One sender at a time per producer: it counts the reports that arrive while it lives.
pub struct BoundedSender<'p> {
    producer: &'p CountedProducer,
    max_in_flight: u64,
    /// Reports already counted when this sender began (a producer outlives its senders).
    resolved_before: u64,
    acknowledged_before: u64,
    sent: u64,
}

impl<'p> BoundedSender<'p> {
    pub fn new(producer: &'p CountedProducer, max_in_flight: usize) -> Self {
        let counts = &producer.counts;
        BoundedSender {
            producer,
            max_in_flight: max_in_flight.max(1) as u64,
            resolved_before: counts.resolved(),
            acknowledged_before: counts.acknowledged.load(Ordering::Acquire),
            sent: 0,
        }
    }

    fn in_flight(&self, counts: &DeliveryCounts) -> u64 {
        (self.sent + self.resolved_before).saturating_sub(counts.resolved())
    }

    fn failure(&self) -> Result<(), KafkaError> {
        match self.producer.counts.take_failure() {
            Some(error) => Err(KafkaError::Client(error)),
            None => Ok(()),
        }
    }

    /// Enqueues one record, first waiting for room if the window is full.
    pub async fn send(&mut self, record: BaseRecord<'_, [u8], [u8]>) -> Result<(), KafkaError> {
        let producer = self.producer;
        let counts = &*producer.counts;
        if self.in_flight(counts) >= self.max_in_flight {
            let window = self.max_in_flight;
            counts
                .wait_until(|counts| self.in_flight(counts) < window)
                .await;
        }
        self.failure()?;
        let mut record = record;
        loop {
            match producer.producer.send(record) {
                Ok(()) => {
                    self.sent += 1;
                    return Ok(());
                }
                // librdkafka's own queue is full: wait for a report to free room, then retry.
                Err((
                    rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                    returned,
                )) => {
                    record = returned;
                    let before = counts.resolved();
                    let freed = counts.wait_until(|counts| counts.resolved() > before);
                    // A queue full of records sent by another client of this producer frees
                    // room without this sender seeing a report of its own: retry regardless.
                    let _ = tokio::time::timeout(Duration::from_millis(10), freed).await;
                }
                Err((error, _)) => return Err(KafkaError::Client(error)),
            }
        }
    }

    /// Records Kafka acknowledged so far, of this sender's.
    pub fn delivered(&self) -> u64 {
        self.producer.counts.acknowledged.load(Ordering::Acquire) - self.acknowledged_before
    }

    /// Awaits every outstanding report; returns how many records Kafka acknowledged in total.
    pub async fn finish(self) -> Result<u64, KafkaError> {
        let counts = &*self.producer.counts;
        counts
            .wait_until(|counts| self.in_flight(counts) == 0)
            .await;
        self.failure()?;
        Ok(self.delivered())
    }
}

/// Kafka headers from name/value pairs, in order.
pub fn owned_headers<K: AsRef<str>, V: AsRef<[u8]>>(headers: &[(K, V)]) -> OwnedHeaders {
    headers.iter().fold(
        OwnedHeaders::new_with_capacity(headers.len()),
        |owned, (key, value)| {
            owned.insert(Header {
                key: key.as_ref(),
                value: Some(value.as_ref()),
            })
        },
    )
}
