//! The gateway's Kafka side: the live reader feeding the hub, catch-up reads of an offset range
//! per partition for a connection that resumes, and the offset look-ups a start position needs.
//!
//! Nothing here joins a consumer group or commits: every instance reads every partition itself,
//! and a client's position is its cursor.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::codec::Registry;
use crate::config::{CodecSettings, KafkaSettings};
use crate::gateway::cursor::Cursor;
use crate::gateway::event::Event;
use crate::gateway::fanout::Hub;
use crate::kafka::client::{create_client, require_topics, wait_for_broker};
use crate::kafka::{ClientKind, KafkaError, PipelineContext};
use crate::log::bulk::Backoff;
use crate::stage::Record;

/// How long a blocking look-up (watermarks, offsets for a time) may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// What the Kafka side shares: settings, how to read values, and a client for look-ups.
pub struct KafkaSide {
    settings: KafkaSettings,
    codecs: Arc<CodecSettings>,
    registry: Option<Arc<Registry>>,
    lookups: Arc<BaseConsumer<PipelineContext>>,
    /// One `Arc<str>` per served topic.
    topics: HashMap<String, Arc<str>>,
    /// Every served partition, sorted; grows when a topic gains partitions (`LiveReader`).
    partitions: RwLock<Vec<(Arc<str>, i32)>>,
}

impl KafkaSide {
    /// Connects (within the configured bound), checks every served topic exists and learns
    /// their partitions. Blocking: call it at start-up.
    pub fn connect(
        settings: &KafkaSettings,
        topics: &[String],
        codecs: Arc<CodecSettings>,
        registry: Option<Arc<Registry>>,
    ) -> Result<KafkaSide, KafkaError> {
        let mut settings = settings.clone();
        // librdkafka wants a group id even for manual assignment; nothing is committed under it.
        settings
            .properties
            .entry("group.id".into())
            .or_insert_with(|| "eventpipe-gateway".into());
        settings
            .properties
            .insert("enable.auto.commit".into(), "false".into());
        let context = PipelineContext::default();
        let lookups: BaseConsumer<PipelineContext> =
            create_client(&settings, ClientKind::Consumer, context.clone())?;
        let metadata = wait_for_broker(lookups.client(), &context, &settings)?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        require_topics(&metadata, &names, &settings)?;
        let interned: HashMap<String, Arc<str>> = topics
            .iter()
            .map(|t| (t.clone(), Arc::from(t.as_str())))
            .collect();
        let mut partitions = Vec::new();
        for topic in metadata.topics() {
            if let Some(name) = interned.get(topic.name()) {
                for partition in topic.partitions() {
                    partitions.push((name.clone(), partition.id()));
                }
            }
        }
        partitions.sort();
        Ok(KafkaSide {
            settings,
            codecs,
            registry,
            lookups: Arc::new(lookups),
            topics: interned,
            partitions: RwLock::new(partitions),
        })
    }

    /// Every served partition.
    pub fn partitions(&self) -> Vec<(Arc<str>, i32)> {
        self.partitions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The served partitions of `topics` (all when empty).
    pub fn partitions_of(&self, topics: &[String]) -> Vec<(Arc<str>, i32)> {
        let mut partitions = self.partitions();
        partitions.retain(|(t, _)| topics.is_empty() || topics.iter().any(|x| **x == **t));
        partitions
    }

    /// Partitions the served topics have gained since they were last looked at, now served too.
    async fn learn_new_partitions(&self) -> Result<Vec<(Arc<str>, i32)>, KafkaError> {
        let metadata = self
            .look_up("metadata", |lookups| {
                lookups.fetch_metadata(None, LOOKUP_TIMEOUT)
            })
            .await?;
        let mut known = self.partitions.write().unwrap_or_else(|p| p.into_inner());
        let mut new = Vec::new();
        for topic in metadata.topics() {
            let Some(name) = self.topics.get(topic.name()) else {
                continue;
            };
            for partition in topic.partitions() {
                let entry = (name.clone(), partition.id());
                if known.binary_search(&entry).is_err() {
                    new.push(entry);
                }
            }
        }
        known.extend(new.iter().cloned());
        known.sort();
        Ok(new)
    }

    pub fn serves(&self, topic: &str) -> bool {
        self.topics.contains_key(topic)
    }

    pub fn topic(&self, name: &str) -> Option<&Arc<str>> {
        self.topics.get(name)
    }

    /// The low and high watermarks of one partition.
    pub async fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64), KafkaError> {
        let topic = topic.to_string();
        self.look_up("watermark", move |lookups| {
            lookups.fetch_watermarks(&topic, partition, LOOKUP_TIMEOUT)
        })
        .await
    }

    /// A blocking look-up through the shared client, off the async workers.
    async fn look_up<T: Send + 'static>(
        &self,
        what: &'static str,
        call: impl FnOnce(&BaseConsumer<PipelineContext>) -> rdkafka::error::KafkaResult<T>
            + Send
            + 'static,
    ) -> Result<T, KafkaError> {
        let lookups = self.lookups.clone();
        tokio::task::spawn_blocking(move || call(&lookups).map_err(KafkaError::Client))
            .await
            .map_err(|e| KafkaError::Config(format!("{what} look-up stopped: {e}")))?
    }

    /// The oldest offsets Kafka still holds for `topics`' partitions.
    pub async fn earliest(&self, topics: &[String]) -> Result<Cursor, KafkaError> {
        let mut cursor = Cursor::default();
        for (topic, partition) in self.partitions_of(topics) {
            let (low, _) = self.watermarks(&topic, partition).await?;
            cursor.set(&topic, partition, low);
        }
        Ok(cursor)
    }

    /// Per partition, the first offset whose Kafka time is at or after `time` (the high
    /// watermark where there is none yet).
    pub async fn offsets_for_time(
        &self,
        topics: &[String],
        time: DateTime<Utc>,
    ) -> Result<Cursor, KafkaError> {
        let mut list = TopicPartitionList::new();
        for (topic, partition) in self.partitions_of(topics) {
            list.add_partition_offset(&topic, partition, Offset::Offset(time.timestamp_millis()))
                .map_err(KafkaError::Client)?;
        }
        let found = self
            .look_up("offset", move |lookups| {
                lookups.offsets_for_times(list, LOOKUP_TIMEOUT)
            })
            .await?;
        let found: Vec<(String, i32, Offset)> = found
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition(), e.offset()))
            .collect();
        let mut cursor = Cursor::default();
        for (topic, partition, offset) in found {
            let offset = match offset {
                Offset::Offset(offset) => offset,
                // No record at or after the time yet: from the end.
                _ => self.watermarks(&topic, partition).await?.1,
            };
            cursor.set(&topic, partition, offset);
        }
        Ok(cursor)
    }

    fn consumer(&self) -> Result<StreamConsumer<PipelineContext>, KafkaError> {
        create_client(
            &self.settings,
            ClientKind::Consumer,
            PipelineContext::default(),
        )
    }

    async fn event(&self, message: &impl MessageRecord, topic: &Arc<str>) -> Event {
        let record = message.record(topic);
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match Event::from_record(&record, &self.codecs, self.registry.as_deref()).await {
                Ok(event) => return event,
                Err(error) => {
                    // The record is fine; the registry that reads it is not: wait for it, in
                    // order, rather than skip an event.
                    let delay = backoff.next_delay(rand::random());
                    tracing::warn!(%error, topic = &**topic, delay_ms = delay.as_millis() as u64, "waiting for the schema registry");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// A consumed message as the runtime's `Record`.
trait MessageRecord {
    fn record<'a>(&'a self, topic: &'a Arc<str>) -> Record<'a>;
}

impl MessageRecord for rdkafka::message::BorrowedMessage<'_> {
    fn record<'a>(&'a self, topic: &'a Arc<str>) -> Record<'a> {
        Record::from_message(self, topic)
    }
}

/// The live reader, positioned at the end of every served partition, with the hub told where
/// each starts — before any connection is accepted, so every feed starts at a known position.
pub struct LiveReader {
    side: Arc<KafkaSide>,
    hub: Arc<Hub>,
    consumer: StreamConsumer<PipelineContext>,
}

impl LiveReader {
    pub async fn position(side: Arc<KafkaSide>, hub: Arc<Hub>) -> Result<LiveReader, KafkaError> {
        let consumer = side.consumer()?;
        let mut assignment = TopicPartitionList::new();
        for (topic, partition) in side.partitions() {
            let (_, high) = side.watermarks(&topic, partition).await?;
            hub.set_position(&topic, partition, high);
            assignment
                .add_partition_offset(&topic, partition, Offset::Offset(high))
                .map_err(KafkaError::Client)?;
        }
        consumer.assign(&assignment).map_err(KafkaError::Client)?;
        Ok(LiveReader {
            side,
            hub,
            consumer,
        })
    }

    /// Publishes each event to the hub until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), KafkaError> {
        let LiveReader {
            side,
            hub,
            consumer,
        } = self;
        tracing::info!(
            partitions = side.partitions().len(),
            "following the served topics live"
        );
        run_loop(&side, &hub, &consumer, &shutdown).await
    }
}

async fn run_loop(
    side: &KafkaSide,
    hub: &Hub,
    consumer: &StreamConsumer<PipelineContext>,
    shutdown: &CancellationToken,
) -> Result<(), KafkaError> {
    // Handles looked up once, not per event (a labelled counter is a registry look-up).
    let mut read_by_topic: HashMap<Arc<str>, metrics::Counter> = HashMap::new();
    let queued = metrics::counter!("eventpipe_gateway_frames_queued_total");
    let dropped_slow =
        metrics::counter!("eventpipe_gateway_clients_dropped_total", "reason" => "slow");
    let mut refresh = tokio::time::interval(PARTITION_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = refresh.tick() => {
                follow_new_partitions(side, hub, consumer).await;
                continue;
            }
            message = consumer.recv() => message,
        };
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "live reader: consumer error");
                continue;
            }
        };
        let Some(topic) = side.topic(message.topic()).cloned() else {
            continue;
        };
        read_by_topic
            .entry(topic.clone())
            .or_insert_with(|| metrics::counter!("eventpipe_gateway_events_read_total", "topic" => topic.to_string()))
            .increment(1);
        if nobody_selects(hub, &message, &topic) {
            continue;
        }
        let event = Arc::new(side.event(&message, &topic).await);
        let published = hub.publish(&event);
        queued.increment(published.delivered as u64);
        if published.dropped_slow > 0 {
            dropped_slow.increment(published.dropped_slow as u64);
        }
    }
}

/// How often the reader looks for partitions the served topics gained.
const PARTITION_REFRESH: Duration = Duration::from_secs(5);

/// Serves partitions added to a topic since the gateway started: each is followed from its
/// oldest record (every record of a partition nobody knew of is new to every subscriber), and
/// the hub learns where before the reader delivers any of it.
async fn follow_new_partitions(
    side: &KafkaSide,
    hub: &Hub,
    consumer: &StreamConsumer<PipelineContext>,
) {
    let new = match side.learn_new_partitions().await {
        Ok(new) if new.is_empty() => return,
        Ok(new) => new,
        Err(error) => {
            tracing::debug!(%error, "looking for new partitions");
            return;
        }
    };
    let mut assignment = TopicPartitionList::new();
    for (topic, partition) in &new {
        let low = side
            .watermarks(topic, *partition)
            .await
            .map_or(0, |(low, _)| low);
        hub.set_position(topic, *partition, low);
        let _ = assignment.add_partition_offset(topic, *partition, Offset::Offset(low));
    }
    match consumer.incremental_assign(&assignment) {
        Ok(()) => {
            tracing::info!(partitions = ?new, "following partitions added to the served topics")
        }
        Err(error) => tracing::warn!(%error, "assigning partitions added to the served topics"),
    }
}

/// Whether no connection selects this record, judged by its `service`/`action` headers (an
/// event without them is built, as its sender and type are in its body); the hub then moves past
/// it without the event's JSON ever being made.
fn nobody_selects(
    hub: &Hub,
    message: &rdkafka::message::BorrowedMessage<'_>,
    topic: &Arc<str>,
) -> bool {
    let record = message.record(topic);
    let header = |name| {
        record
            .header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
    };
    match (header("service"), header("action")) {
        (Some(service), Some(action)) => hub.skip_unwanted(
            topic,
            message.partition(),
            message.offset(),
            service,
            action,
        ),
        _ => false,
    }
}

/// One offset range of one partition: `[from, until)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub topic: String,
    pub partition: i32,
    pub from: i64,
    pub until: i64,
}

/// Reads ranges from Kafka, each partition in offset order, and then ends.
pub struct CatchUp {
    side: Arc<KafkaSide>,
    consumer: StreamConsumer<PipelineContext>,
    /// Unfinished partitions and where they end.
    until: HashMap<(Arc<str>, i32), i64>,
}

impl CatchUp {
    /// `None` when every range is empty.
    pub fn start(side: Arc<KafkaSide>, ranges: &[Range]) -> Result<Option<CatchUp>, KafkaError> {
        let mut assignment = TopicPartitionList::new();
        let mut until = HashMap::new();
        for range in ranges.iter().filter(|r| r.from < r.until) {
            let Some(topic) = side.topic(&range.topic).cloned() else {
                continue;
            };
            assignment
                .add_partition_offset(&range.topic, range.partition, Offset::Offset(range.from))
                .map_err(KafkaError::Client)?;
            until.insert((topic, range.partition), range.until);
        }
        if until.is_empty() {
            return Ok(None);
        }
        let consumer = side.consumer()?;
        consumer.assign(&assignment).map_err(KafkaError::Client)?;
        metrics::counter!("eventpipe_gateway_catch_up_reads_total", "source" => "kafka")
            .increment(1);
        Ok(Some(CatchUp {
            side,
            consumer,
            until,
        }))
    }

    /// The next event of any unfinished partition; `None` once every range is read.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if self.until.is_empty() {
                return None;
            }
            match tokio::time::timeout(Duration::from_millis(250), self.consumer.recv()).await {
                Ok(Ok(message)) => {
                    let Some(topic) = self.side.topic(message.topic()).cloned() else {
                        continue;
                    };
                    let key = (topic.clone(), message.partition());
                    let Some(&until) = self.until.get(&key) else {
                        continue;
                    };
                    if message.offset() >= until {
                        self.until.remove(&key);
                        continue;
                    }
                    if message.offset() + 1 >= until {
                        self.until.remove(&key);
                    }
                    return Some(self.side.event(&message, &topic).await);
                }
                Ok(Err(error)) => tracing::warn!(%error, "catch-up: consumer error"),
                // Nothing came: a range may end in offsets no record has (transaction markers,
                // aborted records); the position says whether it is read.
                Err(_) => self.drop_finished(),
            }
        }
    }

    fn drop_finished(&mut self) {
        let Ok(positions) = self.consumer.position() else {
            return;
        };
        for element in positions.elements() {
            if let (Offset::Offset(position), Some(topic)) =
                (element.offset(), self.side.topic(element.topic()))
            {
                let key = (topic.clone(), element.partition());
                if self.until.get(&key).is_some_and(|until| position >= *until) {
                    self.until.remove(&key);
                }
            }
        }
    }
}
