//! The one loop every stage runs in: connect, subscribe, feed records to the stage in order,
//! produce what it returns, commit by the offset policy, and drain on revocation and on stop.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ack::{lock, AckTracker, PartitionId};
use super::client::{
    blocking, create_producer, driver_merges, fetched, same_partitions, warn_unless_co_partitioned,
    DEAD_LETTER_HEADROOM, TRANSACTION_TIMEOUT,
};
use super::commit::Committer;
use super::context::{cap_below, Shared, StageContext};
use super::io::{Acks, DeadLetters, StageIo};
use super::merge::{Merger, Next};
use super::metrics::describe_metrics;
use super::output::{self, Deliveries, Delivery, OutputProducer, SendError};
use super::{
    dead_letter, AsRecordHeaders, Checkpoint, DeadLetter, Handled, OffsetPolicy, OutputRecord,
    PartitionHooks, Record, Stage, StageError, StageSpec,
};
use crate::config::KafkaSettings;
use crate::kafka::client::{client_config, require_topics, wait_for_broker};
use crate::kafka::{ClientKind, KafkaError, PipelineContext};
use crate::telemetry::Readiness;

/// A record its dependency could not take is retried after this, doubling up to `MAX_RETRY`.
const FIRST_RETRY: Duration = Duration::from_millis(5);
const MAX_RETRY: Duration = Duration::from_secs(1);
/// How long a record may wait for its dependency before the assignment is paused.
const PAUSE_AFTER: Duration = Duration::from_secs(1);
/// Bounds on the wait between re-sends of failed dead letters.
const DEAD_LETTER_FIRST_BACKOFF: Duration = Duration::from_millis(100);
const DEAD_LETTER_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long an empty input partition that has more to deliver may hold back the records of its
/// co-partitioned topics (Kafka Streams' `max.task.idle.ms`). A caught-up partition holds
/// nothing back, so this is paid only while a fetch is on its way.
const MERGE_MAX_IDLE: Duration = Duration::from_secs(1);
/// The same for a partition no fetch has answered for since the assignment (a loaded broker
/// can take seconds to answer the first one).
const MERGE_FIRST_FETCH_IDLE: Duration = Duration::from_secs(5);
/// Records buffered for the merge at most; past it the oldest head goes regardless.
const MERGE_MAX_BUFFERED: usize = 10_000;
/// Runs a stage until `shutdown` is cancelled or the stage cannot go on without losing data.
/// `build` makes the stage once the runtime's clients exist; the stage is returned at the end
/// (for its summary).
pub async fn run<S: Stage>(
    kafka: &KafkaSettings,
    spec: StageSpec,
    hooks: Arc<dyn PartitionHooks>,
    readiness: Readiness,
    shutdown: CancellationToken,
    build: impl FnOnce(StageIo) -> S,
) -> Result<S, StageError> {
    describe_metrics(spec.name);
    let log = PipelineContext::default();
    let tracker: Arc<Mutex<AckTracker>> = Arc::default();
    let deliveries = Arc::new(Deliveries::new(spec.name, tracker.clone()));
    let producer = Arc::new(create_producer(kafka, &spec, &log, deliveries.clone())?);
    let metadata = blocking(|| wait_for_broker(producer.client(), &log, kafka))?;
    let required: Vec<&str> = spec.required_topics.iter().map(String::as_str).collect();
    require_topics(&metadata, &required, kafka)?;
    warn_unless_co_partitioned(&spec, &metadata);
    if let OffsetPolicy::Transactional { .. } = spec.policy {
        // Fences any earlier producer with this id and aborts its unfinished transaction.
        let producer = producer.clone();
        blocking(move || producer.init_transactions(TRANSACTION_TIMEOUT))
            .map_err(KafkaError::Client)?;
    }

    let shared = Arc::new(Shared {
        stage: spec.name,
        policy: spec.policy.clone(),
        tracker: tracker.clone(),
        committer: Committer::new(spec.name),
        hooks,
        producer: producer.clone(),
        drain_timeout: spec.drain_timeout,
        revoked: AtomicBool::new(false),
        closing: AtomicBool::new(false),
        assignment_generation: AtomicU64::new(0),
    });
    let mut consumer_config = client_config(kafka, ClientKind::Consumer);
    consumer_config.set("group.id", &spec.group_id);
    if consumer_config.get("statistics.interval.ms").is_none() {
        consumer_config.set("statistics.interval.ms", "5000");
    }
    if let OffsetPolicy::Transactional { .. } = spec.policy {
        consumer_config.set("isolation.level", "read_committed");
    }
    let lag_metric: &'static str =
        Box::leak(format!("eventpipe_{}_consumer_lag_messages", spec.name).into_boxed_str());
    let consumer: StreamConsumer<StageContext> = consumer_config
        .create_with_context(StageContext {
            log: log.clone(),
            lag_metric,
            shared: shared.clone(),
        })
        .map_err(KafkaError::Client)?;
    let subscription = spec.inputs.subscription();
    consumer
        .subscribe(&subscription)
        .map_err(KafkaError::Client)?;
    readiness.register("kafka");
    readiness.set("kafka", true);
    tracing::info!(stage = spec.name, inputs = ?subscription, group_id = spec.group_id, "consuming");

    let io = StageIo {
        acks: Acks {
            tracker: tracker.clone(),
        },
        dead_letters: DeadLetters {
            stage: spec.name,
            producer: producer.clone(),
            topics: spec.dead_letters.clone(),
        },
        readiness: readiness.clone(),
    };
    let mut stage = build(io);
    let in_flight_gauge = metrics::gauge!(format!("eventpipe_{}_in_flight_inputs", spec.name));
    let mut driver = Driver {
        merging: driver_merges(&spec.inputs),
        max_dead_letter_bytes: spec.max_record_bytes + DEAD_LETTER_HEADROOM,
        spec,
        consumer: Arc::new(consumer),
        shared,
        producer,
        deliveries,
        topics: Vec::new(),
        held: None,
        merger: Merger::new(MERGE_MAX_IDLE, MERGE_FIRST_FETCH_IDLE, MERGE_MAX_BUFFERED),
        assignment_generation: 0,
        paused: None,
        transaction: None,
        dead_letter_backoff: DEAD_LETTER_FIRST_BACKOFF,
        next_dead_letter_resend: Instant::now(),
        in_flight_gauge,
    };
    let outcome = driver.run_loop(&mut stage, &shutdown).await;
    let outcome = driver.stop(&mut stage, outcome).await;
    readiness.set("kafka", false);
    tracing::info!(
        stage = driver.spec.name,
        unacknowledged = lock(&tracker).in_flight(),
        "stage stopped"
    );
    outcome.map(|()| stage)
}

/// A record whose dependency was down: kept (copied) and retried, in order.
struct Held {
    message: OwnedMessage,
    /// Already tracked in the ack tracker (at least once).
    since: Instant,
    retry_at: Instant,
    delay: Duration,
    dependency: &'static str,
    reason: String,
}

/// The open transaction (exactly once).
struct Transaction {
    /// First offset (to rewind to on abort) and next offset (to commit) per partition.
    first: BTreeMap<PartitionId, i64>,
    next: BTreeMap<PartitionId, i64>,
    inputs: usize,
    opened: Instant,
}

struct Driver {
    spec: StageSpec,
    consumer: Arc<StreamConsumer<StageContext>>,
    shared: Arc<Shared>,
    producer: Arc<OutputProducer>,
    deliveries: Arc<Deliveries>,
    /// Interned topic names; a stage reads a handful, so a scan beats hashing per record.
    topics: Vec<Arc<str>>,
    held: Option<Held>,
    /// Several input topics: records go through the timestamp merge per partition number.
    merging: bool,
    /// The merge buffers; for a single input topic, the in-order queue of records that arrived
    /// while a record was held.
    merger: Merger<OwnedMessage>,
    /// The context's assignment generation the merge buffers were last synced with.
    assignment_generation: u64,
    /// The paused assignment, while a dependency is down.
    paused: Option<TopicPartitionList>,
    transaction: Option<Transaction>,
    dead_letter_backoff: Duration,
    next_dead_letter_resend: Instant,
    max_dead_letter_bytes: usize,
    in_flight_gauge: metrics::Gauge,
}

/// What became of one attempt at a record.
enum Step {
    Handled,
    /// Its dependency is down: keep it and retry.
    Unavailable {
        dependency: &'static str,
        reason: String,
    },
}

impl Driver {
    fn at_least_once(&self) -> bool {
        !matches!(self.spec.policy, OffsetPolicy::Transactional { .. })
    }

    fn topic(&mut self, name: &str) -> Arc<str> {
        if let Some(topic) = self.topics.iter().find(|t| &***t == name) {
            return topic.clone();
        }
        let topic: Arc<str> = name.into();
        self.topics.push(topic.clone());
        topic
    }

    async fn run_loop<S: Stage>(
        &mut self,
        stage: &mut S,
        shutdown: &CancellationToken,
    ) -> Result<(), StageError> {
        let mut tick = tokio::time::interval(self.spec.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The deadline of a timer that is not armed: read once, not per record.
        let never = Instant::now() + Duration::from_secs(86_400 * 365);
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            self.sync_assignment();
            // What the merge (or the queue of records that arrived while paused) lets go now.
            let mut wake = None;
            if self.held.is_none() && self.merger.buffered() > 0 {
                match self.merger.next(Instant::now(), |topic, partition, next| {
                    fetched(&self.consumer, topic, partition, next)
                }) {
                    Next::Record(message) => {
                        if let Some((dependency, reason)) =
                            self.first_attempt(stage, &message).await?
                        {
                            self.hold(message, dependency, reason);
                        }
                        if futures::FutureExt::now_or_never(tick.tick()).is_some() {
                            self.on_tick(stage).await?;
                        }
                        continue;
                    }
                    Next::WaitUntil(at) => wake = Some(at),
                    Next::Empty => {}
                }
            }
            let retry_at = self.held.as_ref().map_or(never, |h| h.retry_at);
            // With a record held, new records are taken only once the assignment is paused
            // (they are then the few already fetched, kept in order): polling must go on so
            // the group keeps this member.
            let take_records =
                (self.held.is_none() || self.paused.is_some()) && !self.merger.is_full();
            // Its own handle: a received record borrows the consumer, not the driver.
            let consumer = self.consumer.clone();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => self.on_tick(stage).await?,
                _ = tokio::time::sleep_until(retry_at), if self.held.is_some() => {
                    self.retry_held(stage).await?;
                }
                _ = tokio::time::sleep_until(wake.unwrap_or(retry_at)), if wake.is_some() => {}
                received = consumer.recv(), if take_records => {
                    let message = match received {
                        Ok(message) => message,
                        Err(error) => {
                            tracing::warn!(stage = self.spec.name, %error, "consumer error");
                            continue;
                        }
                    };
                    self.sync_assignment();
                    if self.merging || self.held.is_some() || self.merger.buffered() > 0 {
                        self.merger.push(message.detach());
                        if self.held.is_some() {
                            self.pause();
                        }
                        continue;
                    }
                    // One input topic, nothing queued: straight from librdkafka's buffer.
                    if let Some((dependency, reason)) = self.first_attempt(stage, &message).await? {
                        self.hold(message.detach(), dependency, reason);
                    }
                }
            }
        }
    }

    /// The first attempt at a record: begin its bookkeeping and hand it to the stage; returns
    /// why not, if its dependency is down (the caller then holds the record).
    async fn first_attempt<S: Stage, M: Message + AsRecordHeaders>(
        &mut self,
        stage: &mut S,
        message: &M,
    ) -> Result<Option<(&'static str, String)>, StageError> {
        let topic = self.topic(message.topic());
        let record = Record::from_message(message, &topic);
        self.begin(&record);
        Ok(match self.attempt(stage, &record).await? {
            Step::Handled => None,
            Step::Unavailable { dependency, reason } => Some((dependency, reason)),
        })
    }

    /// After a rebalance, every assigned partition is fetched again from its committed offset:
    /// what the loop kept (merge buffers, a held record) would come twice and out of order, so
    /// it is dropped; the new assignment starts unpaused.
    fn sync_assignment(&mut self) {
        let generation = self.shared.assignment_generation.load(Ordering::Acquire);
        if generation == self.assignment_generation {
            return;
        }
        self.assignment_generation = generation;
        if self.held.take().is_some() {
            tracing::info!(
                stage = self.spec.name,
                "rebalanced while a record was held; it is read again from the committed offset"
            );
        }
        if self.paused.take().is_some() {
            metrics::gauge!(format!("eventpipe_{}_paused", self.spec.name)).set(0.0);
        }
        let assignment = self.consumer.assignment().unwrap_or_default();
        let partitions: Vec<(Arc<str>, i32)> = assignment
            .elements()
            .iter()
            .map(|e| (self.topic(e.topic()), e.partition()))
            .collect();
        self.merger.assign(&partitions);
    }

    /// Bookkeeping before a record's first attempt: at least once, the handling itself owes
    /// one acknowledgement, so nothing the stage does with the record can complete it early.
    fn begin(&mut self, record: &Record<'_>) {
        if let OffsetPolicy::AckedPrefix = self.spec.policy {
            lock(&self.shared.tracker).track(&record.partition_id(), record.offset, 1);
        }
    }

    async fn attempt<S: Stage>(
        &mut self,
        stage: &mut S,
        record: &Record<'_>,
    ) -> Result<Step, StageError> {
        match stage.handle(record).await {
            Ok(handled) => {
                self.dispose(record, handled).await?;
                Ok(Step::Handled)
            }
            Err(StageError::Unavailable { dependency, reason }) => {
                Ok(Step::Unavailable { dependency, reason })
            }
            Err(error) => Err(error),
        }
    }

    fn hold(&mut self, message: OwnedMessage, dependency: &'static str, reason: String) {
        // Debug only: a sink briefly behind holds records many times a second (backpressure);
        // a hold that lasts is announced at warn when it pauses the assignment.
        tracing::debug!(
            stage = self.spec.name,
            dependency,
            %reason,
            "{} unavailable; waiting (the record is held and retried)",
            dependency.replace('_', " ")
        );
        let now = Instant::now();
        self.held = Some(Held {
            message,
            since: now,
            retry_at: now + FIRST_RETRY,
            delay: FIRST_RETRY,
            dependency,
            reason,
        });
    }

    /// Tries the held record again; once it is handled, what arrived meanwhile (queued in the
    /// merge, in order) goes next.
    async fn retry_held<S: Stage>(&mut self, stage: &mut S) -> Result<(), StageError> {
        let Some(held) = self.held.take() else {
            return Ok(());
        };
        let topic = self.topic(held.message.topic());
        let record = Record::from_message(&held.message, &topic);
        match self.attempt(stage, &record).await? {
            Step::Handled => self.resume(),
            Step::Unavailable { dependency, reason } => {
                let delay = (held.delay * 2).min(MAX_RETRY);
                let pause = held.since.elapsed() >= PAUSE_AFTER;
                self.held = Some(Held {
                    retry_at: Instant::now() + delay,
                    delay,
                    dependency,
                    reason,
                    ..held
                });
                if pause {
                    self.pause();
                }
            }
        }
        Ok(())
    }

    /// Pauses the whole assignment (again, after a rebalance added partitions).
    fn pause(&mut self) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        if self
            .paused
            .as_ref()
            .is_some_and(|p| same_partitions(p, &assignment))
        {
            return;
        }
        match self.consumer.pause(&assignment) {
            Ok(()) => {
                if self.paused.is_none() {
                    let (dependency, reason) = self
                        .held
                        .as_ref()
                        .map(|h| (h.dependency, h.reason.as_str()))
                        .unwrap_or_default();
                    tracing::warn!(
                        stage = self.spec.name,
                        dependency,
                        reason,
                        partitions = %super::context::describe(&assignment),
                        "{} unavailable; waiting: consumption paused until it is back (polling goes on)",
                        dependency.replace('_', " ")
                    );
                    metrics::gauge!(format!("eventpipe_{}_paused", self.spec.name)).set(1.0);
                }
                self.paused = Some(assignment);
            }
            Err(error) => tracing::warn!(stage = self.spec.name, %error, "pausing partitions"),
        }
    }

    fn resume(&mut self) {
        if self.paused.take().is_none() {
            return;
        }
        if let Ok(assignment) = self.consumer.assignment() {
            if let Err(error) = self.consumer.resume(&assignment) {
                tracing::warn!(stage = self.spec.name, %error, "resuming partitions");
            }
        }
        metrics::gauge!(format!("eventpipe_{}_paused", self.spec.name)).set(0.0);
        tracing::info!(
            stage = self.spec.name,
            "dependency available again; consuming"
        );
    }

    /// Produces what the stage made of a record and books its acknowledgements.
    async fn dispose(&mut self, record: &Record<'_>, handled: Handled) -> Result<(), StageError> {
        let handled = match handled {
            Handled::Outputs(outputs) => {
                match outputs
                    .iter()
                    .find(|o| o.size() > self.spec.max_record_bytes)
                {
                    Some(big) => Handled::DeadLetter(DeadLetter::new(
                        "output_too_large",
                        format!(
                            "an output to {} is {} bytes, above the producer's limit of {} (kafka property message.max.bytes)",
                            big.topic,
                            big.size(),
                            self.spec.max_record_bytes
                        ),
                    )),
                    None => Handled::Outputs(outputs),
                }
            }
            other => other,
        };
        let pending = matches!(handled, Handled::Pending);
        let (outputs, dead_letter) = match handled {
            Handled::Outputs(outputs) => (outputs, false),
            Handled::DeadLetter(dead_letter) => {
                let topic = self.spec.dead_letters.for_input(record.topic);
                let output = dead_letter::record(self.spec.name, &dead_letter, record, &topic);
                if output.size() > self.max_dead_letter_bytes {
                    return Err(StageError::Fatal(format!(
                        "the dead letter of {}[{}]@{} is {} bytes, above the producer's limit of {} (raise kafka property message.max.bytes and the dead-letter topic's max.message.bytes)",
                        record.topic, record.partition, record.offset, output.size(), self.max_dead_letter_bytes
                    )));
                }
                (vec![output], true)
            }
            Handled::Pending | Handled::Done => (Vec::new(), false),
        };
        let id = record.partition_id();
        match &self.spec.policy {
            OffsetPolicy::AckedPrefix => {
                if !outputs.is_empty() {
                    lock(&self.shared.tracker).add(&id, record.offset, outputs.len() as u32);
                }
                self.send_all(&outputs, Some(record), dead_letter).await?;
                // The handling's own acknowledgement; a `Pending` record leaves it to the stage.
                if !pending {
                    lock(&self.shared.tracker).ack(&id, record.offset);
                }
            }
            OffsetPolicy::Checkpoint => {
                if !outputs.is_empty() {
                    lock(&self.shared.tracker).track(&id, record.offset, outputs.len() as u32);
                }
                self.send_all(&outputs, Some(record), dead_letter).await?;
            }
            OffsetPolicy::Transactional { batch_size, .. } => {
                let batch_size = *batch_size;
                self.begin_transaction()?;
                self.send_all(&outputs, None, dead_letter).await?;
                let transaction = self.transaction.as_mut().expect("begun above");
                transaction.first.entry(id.clone()).or_insert(record.offset);
                transaction.next.insert(id, record.offset + 1);
                transaction.inputs += 1;
                if transaction.inputs >= batch_size {
                    self.end_transaction().await?;
                }
            }
        }
        Ok(())
    }

    /// Hands outputs to the producer; `input` is acknowledged by their delivery reports.
    async fn send_all(
        &self,
        outputs: &[OutputRecord],
        input: Option<&Record<'_>>,
        dead_letter: bool,
    ) -> Result<(), StageError> {
        for output in outputs {
            let token = Box::new(Delivery {
                input: input.map(|r| (r.partition_id(), r.offset)),
                dead_letter,
                input_timestamp_ms: input.and_then(|r| r.timestamp_ms),
            });
            match output::send(&self.producer, output, token).await {
                Ok(()) => {}
                // Checked against the limit before sending: only a user's smaller
                // `message.max.bytes` gets here.
                Err(SendError::TooLarge) => {
                    self.deliveries.fail(format!(
                        "an output to {} of {} bytes was refused as too large (kafka property message.max.bytes is below the stage's limit of {})",
                        output.topic,
                        output.size(),
                        self.spec.max_record_bytes
                    ));
                }
                Err(SendError::Refused(reason)) => self.deliveries.fail(reason),
            }
        }
        Ok(())
    }

    fn begin_transaction(&mut self) -> Result<(), StageError> {
        if self.transaction.is_some() {
            return Ok(());
        }
        self.shared.revoked.store(false, Ordering::SeqCst);
        self.producer
            .begin_transaction()
            .map_err(KafkaError::Client)?;
        self.transaction = Some(Transaction {
            first: BTreeMap::new(),
            next: BTreeMap::new(),
            inputs: 0,
            opened: Instant::now(),
        });
        Ok(())
    }

    /// Commits the open transaction with its input offsets, or aborts it and rewinds.
    async fn end_transaction(&mut self) -> Result<(), StageError> {
        let Some(transaction) = self.transaction.take() else {
            return Ok(());
        };
        let stage = self.spec.name;
        let failure = self.deliveries.take_failure();
        let revoked = self.shared.revoked.load(Ordering::SeqCst);
        let outcome = match (failure, revoked) {
            (Some(reason), _) => Err(reason),
            (None, true) => Err("partitions revoked mid-transaction".to_string()),
            (None, false) => {
                let mut offsets = TopicPartitionList::new();
                for (id, next) in &transaction.next {
                    let _ = offsets.add_partition_offset(
                        &id.topic,
                        id.partition,
                        Offset::Offset(*next),
                    );
                }
                match self.consumer.group_metadata() {
                    None => Err("consumer has no group metadata".to_string()),
                    Some(group) => {
                        let producer = self.producer.clone();
                        blocking(move || {
                            producer
                                .send_offsets_to_transaction(&offsets, &group, TRANSACTION_TIMEOUT)
                                .and_then(|()| producer.commit_transaction(TRANSACTION_TIMEOUT))
                        })
                        .map_err(|e| e.to_string())
                    }
                }
            }
        };
        match outcome {
            Ok(()) => {
                metrics::counter!(format!("eventpipe_{stage}_transactions_total"), "outcome" => "committed").increment(1);
            }
            Err(reason) => {
                tracing::warn!(stage, %reason, inputs = transaction.inputs, "aborting transaction; its inputs will be processed again");
                metrics::counter!(format!("eventpipe_{stage}_transactions_total"), "outcome" => "aborted").increment(1);
                let producer = self.producer.clone();
                blocking(move || {
                    // An abort that overtakes the registration of the transaction's partitions
                    // can fail for good with INVALID_TXN_STATE (confluentinc/librdkafka#4849,
                    // seen here on a revocation): let what was sent land first.
                    let _ = producer.flush(TRANSACTION_TIMEOUT);
                    producer.abort_transaction(TRANSACTION_TIMEOUT)
                })
                .map_err(KafkaError::Client)?;
                self.rewind(&transaction.first);
            }
        }
        Ok(())
    }

    /// After an abort (or at the stage's request), moves still-owned partitions back to the given offsets. What the
    /// loop kept of those partitions (merge buffers, a held record) is dropped: librdkafka
    /// delivers it again from the rewound position, and keeping both would handle it twice.
    fn rewind(&mut self, first: &BTreeMap<PartitionId, i64>) {
        let assignment = self.consumer.assignment().unwrap_or_default();
        let mut seek = TopicPartitionList::new();
        let mut sought = Vec::new();
        for (id, offset) in first {
            if assignment.find_partition(&id.topic, id.partition).is_some() {
                let _ = seek.add_partition_offset(&id.topic, id.partition, Offset::Offset(*offset));
                sought.push((id.topic.clone(), id.partition));
            }
        }
        if seek.count() > 0 {
            if let Err(error) = self.consumer.seek_partitions(seek, Duration::from_secs(10)) {
                tracing::error!(stage = self.spec.name, %error, "rewinding after an abort failed");
            }
        }
        self.merger.forget(&sought);
        let held_sought = self.held.as_ref().is_some_and(|held| {
            sought
                .iter()
                .any(|(t, p)| **t == *held.message.topic() && *p == held.message.partition())
        });
        if held_sought {
            self.held = None;
            self.resume();
        }
    }

    /// The stage asked to read partitions again: what it handled of them becomes durable, it
    /// records where they stood, their committed offsets move back (so a crash or a rebalance
    /// re-reads as well), then they are sought back like after an abort.
    async fn rewind_for_stage<S: Stage>(
        &mut self,
        stage: &mut S,
        wanted: Vec<PartitionId>,
    ) -> Result<(), StageError> {
        let name = self.spec.name;
        if self.spec.policy == OffsetPolicy::Checkpoint {
            tracing::warn!(
                stage = name,
                "rewinds are not offered under the checkpoint policy"
            );
            return Ok(());
        }
        let assignment = self.consumer.assignment().unwrap_or_default();
        let wanted: Vec<PartitionId> = wanted
            .into_iter()
            .filter(|id| assignment.find_partition(&id.topic, id.partition).is_some())
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        if self.at_least_once() {
            let deadline = Instant::now() + self.spec.drain_timeout;
            while Instant::now() < deadline && !self.deliveries.has_failure() {
                let pending: usize = {
                    let tracker = lock(&self.shared.tracker);
                    wanted.iter().map(|id| tracker.pending_on(id)).sum()
                };
                if pending == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            self.commit(stage, CommitMode::Sync);
        } else {
            self.end_transaction().await?;
        }
        // The broker's committed offsets: what is durably decided, whatever aborted or timed out.
        let mut list = TopicPartitionList::new();
        for id in &wanted {
            list.add_partition(&id.topic, id.partition);
        }
        let consumer = self.consumer.clone();
        let committed = match blocking(move || {
            consumer.committed_offsets(list, Duration::from_secs(10))
        }) {
            Ok(committed) => committed,
            Err(error) => {
                tracing::warn!(stage = name, %error, "reading committed offsets to rewind; trying again");
                return Ok(());
            }
        };
        let mut targets = BTreeMap::new();
        for id in &wanted {
            let position = committed
                .find_partition(&id.topic, id.partition)
                .map(|e| e.offset());
            // Never committed: nothing is decided yet; asked again once something is.
            let Some(Offset::Offset(position)) = position else {
                continue;
            };
            match stage.rewind_from(id, position).await {
                Ok(Some(target)) => {
                    targets.insert(id.clone(), target);
                }
                Ok(None) => {}
                Err(StageError::Unavailable { dependency, reason }) => {
                    tracing::warn!(stage = name, dependency, %reason, "rewind deferred to the next tick");
                }
                Err(error) => return Err(error),
            }
        }
        if targets.is_empty() {
            return Ok(());
        }
        let moved_back = if self.at_least_once() {
            {
                let mut tracker = lock(&self.shared.tracker);
                for id in targets.keys() {
                    tracker.forget(id);
                }
            }
            let checkpoints = targets
                .iter()
                .map(|(id, offset)| {
                    let checkpoint = Checkpoint {
                        next_offset: *offset,
                        metadata: None,
                    };
                    (id.clone(), checkpoint)
                })
                .collect();
            self.shared
                .committer
                .commit_now(&*self.consumer, checkpoints)
        } else {
            let mut offsets = TopicPartitionList::new();
            for (id, offset) in &targets {
                let _ =
                    offsets.add_partition_offset(&id.topic, id.partition, Offset::Offset(*offset));
            }
            match self.consumer.group_metadata() {
                None => false,
                Some(group) => {
                    let producer = self.producer.clone();
                    blocking(move || {
                        let outcome = producer
                            .begin_transaction()
                            .and_then(|()| {
                                producer.send_offsets_to_transaction(
                                    &offsets,
                                    &group,
                                    TRANSACTION_TIMEOUT,
                                )
                            })
                            .and_then(|()| producer.commit_transaction(TRANSACTION_TIMEOUT));
                        if outcome.is_err() {
                            let _ = producer.abort_transaction(TRANSACTION_TIMEOUT);
                        }
                        outcome.is_ok()
                    })
                }
            }
        };
        if !moved_back {
            // Reading again still moves the committed offset back with the first commit.
            tracing::warn!(stage = name, "committing the rewound offsets failed; a crash before the next commit leaves the release unfinished");
        }
        tracing::info!(
            stage = name,
            partitions = targets.len(),
            "rewinding at the stage's request"
        );
        self.rewind(&targets);
        Ok(())
    }

    async fn on_tick<S: Stage>(&mut self, stage: &mut S) -> Result<(), StageError> {
        if self.at_least_once() {
            if let Some(reason) = self.deliveries.take_failure() {
                return Err(StageError::Fatal(reason));
            }
            self.resend_dead_letters(false).await;
        }
        stage.tick().await?;
        let wanted = stage.rewinds();
        if !wanted.is_empty() {
            self.rewind_for_stage(stage, wanted).await?;
        }
        match &self.spec.policy {
            OffsetPolicy::Transactional { batch_time, .. } => {
                if self.transaction.as_ref().is_some_and(|t| {
                    t.opened.elapsed() >= *batch_time || self.shared.revoked.load(Ordering::SeqCst)
                }) {
                    self.end_transaction().await?;
                }
            }
            _ => self.commit(stage, CommitMode::Async),
        }
        self.in_flight_gauge
            .set(lock(&self.shared.tracker).in_flight() as f64);
        Ok(())
    }

    /// Re-sends failed dead letters, with backoff unless `now`.
    async fn resend_dead_letters(&mut self, now: bool) {
        if self.deliveries.pending_retries() == 0 {
            self.dead_letter_backoff = DEAD_LETTER_FIRST_BACKOFF;
            return;
        }
        if !now && Instant::now() < self.next_dead_letter_resend {
            return;
        }
        output::resend_dead_letters(&self.producer).await;
        self.next_dead_letter_resend = Instant::now() + self.dead_letter_backoff;
        self.dead_letter_backoff = (self.dead_letter_backoff * 2).min(DEAD_LETTER_MAX_BACKOFF);
    }

    /// What each partition may commit under the policy.
    fn desired<S: Stage>(&self, stage: &S) -> Vec<(PartitionId, Checkpoint)> {
        let tracker = lock(&self.shared.tracker);
        match self.spec.policy {
            OffsetPolicy::AckedPrefix => tracker
                .committable_offsets()
                .map(|(id, next_offset)| {
                    (
                        id.clone(),
                        Checkpoint {
                            next_offset,
                            metadata: None,
                        },
                    )
                })
                .collect(),
            OffsetPolicy::Checkpoint => stage
                .checkpoints()
                .into_iter()
                .map(|(id, checkpoint)| {
                    let first_pending = tracker.first_pending(&id);
                    (id, cap_below(checkpoint, first_pending))
                })
                .collect(),
            OffsetPolicy::Transactional { .. } => Vec::new(),
        }
    }

    fn commit<S: Stage>(&self, stage: &S, mode: CommitMode) {
        let desired = self.desired(stage);
        self.shared.committer.commit(&*self.consumer, desired, mode);
    }

    /// Graceful stop (or the fatal path): let the stage hand over what it buffered, wait for
    /// acknowledgements within the drain deadline, then commit. Unacknowledged inputs are
    /// re-delivered after a restart.
    async fn stop<S: Stage>(
        &mut self,
        stage: &mut S,
        outcome: Result<(), StageError>,
    ) -> Result<(), StageError> {
        let deadline = Instant::now() + self.spec.drain_timeout;
        let outcome = match outcome {
            Ok(()) => stage.finish(deadline).await,
            Err(error) => Err(error),
        };
        if !self.at_least_once() {
            if outcome.is_ok() {
                self.end_transaction().await?;
            } else if self.transaction.take().is_some() {
                let producer = self.producer.clone();
                let _ = blocking(move || producer.abort_transaction(TRANSACTION_TIMEOUT));
            }
            self.shared.closing.store(true, Ordering::Relaxed);
            return outcome;
        }
        // Wait for delivery reports (librdkafka's thread) and re-send failed dead letters,
        // unless an output is lost: its input can never complete.
        while Instant::now() < deadline && !self.deliveries.has_failure() {
            self.resend_dead_letters(true).await;
            // A record held for its dependency owes its handling: it never completes here.
            let stuck =
                usize::from(self.held.is_some() && self.spec.policy == OffsetPolicy::AckedPrefix);
            if lock(&self.shared.tracker).in_flight() <= stuck {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.commit(stage, CommitMode::Sync);
        self.shared.closing.store(true, Ordering::Relaxed);
        match (outcome, self.deliveries.take_failure()) {
            (Err(error), _) => Err(error),
            (Ok(()), Some(reason)) => Err(StageError::Fatal(reason)),
            (Ok(()), None) => Ok(()),
        }
    }
}
