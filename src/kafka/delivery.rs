//! Bounded in-flight produce: keeps at most N delivery reports outstanding (backpressure instead
//! of an unbounded queue) and counts what Kafka acknowledged, failing on the first lost record.

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use super::client::{KafkaError, PipelineContext};

/// Sends records and awaits their delivery reports with a cap on how many are outstanding.
pub struct BoundedSender<'p> {
    producer: &'p FutureProducer<PipelineContext>,
    in_flight: FuturesUnordered<DeliveryFuture>,
    max_in_flight: usize,
    delivered: u64,
}

impl<'p> BoundedSender<'p> {
    pub fn new(producer: &'p FutureProducer<PipelineContext>, max_in_flight: usize) -> Self {
        BoundedSender {
            producer,
            in_flight: FuturesUnordered::new(),
            max_in_flight: max_in_flight.max(1),
            delivered: 0,
        }
    }

    /// Enqueues one record, first waiting for a delivery report if the window is full.
    pub async fn send(&mut self, record: FutureRecord<'_, [u8], [u8]>) -> Result<(), KafkaError> {
        while self.in_flight.len() >= self.max_in_flight {
            self.complete_one().await?;
        }
        let mut record = record;
        loop {
            match self.producer.send_result(record) {
                Ok(future) => {
                    self.in_flight.push(future);
                    return Ok(());
                }
                // librdkafka's own queue is full: wait for a report to free room, then retry.
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    returned,
                )) => {
                    record = returned;
                    if self.in_flight.is_empty() {
                        self.producer
                            .poll(Timeout::After(std::time::Duration::from_millis(10)));
                    } else {
                        self.complete_one().await?;
                    }
                }
                Err((error, _)) => return Err(KafkaError::Client(error)),
            }
        }
    }

    async fn complete_one(&mut self) -> Result<(), KafkaError> {
        if let Some(report) = self.in_flight.next().await {
            match report {
                Ok(Ok(_)) => self.delivered += 1,
                Ok(Err((error, _))) => return Err(KafkaError::Client(error)),
                Err(_canceled) => {
                    return Err(KafkaError::Client(rdkafka::error::KafkaError::Canceled))
                }
            }
        }
        Ok(())
    }

    /// Awaits every outstanding report; returns how many records Kafka acknowledged in total.
    pub async fn finish(mut self) -> Result<u64, KafkaError> {
        while !self.in_flight.is_empty() {
            self.complete_one().await?;
        }
        Ok(self.delivered)
    }

    pub fn delivered(&self) -> u64 {
        self.delivered
    }
}
