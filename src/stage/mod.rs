//! The stage runtime: the one consume → handle → acknowledge → commit → dead-letter path that every
//! Kafka-consuming stage plugs into. A stage supplies a `StageSpec` and its logic (`Stage`), no loop.
//!
//! What the runtime owns, once: client configuration and the logging + lag context (`context`),
//! subscription and readiness, the offset policies and their commits (`commit`, `ack`), one
//! producer for outputs and dead letters with one failure policy (`output`, `dead_letter`),
//! revocation and shutdown drains, pausing the assignment while a dependency is down, the
//! timestamp merge of co-partitioned inputs (`merge`), and the fatal path (`driver`).
//!
//! Adding a stage: write a type implementing `Stage` (how one record becomes outputs, a dead
//! letter, or work the stage acknowledges later), describe its inputs and policy in a
//! `StageSpec`, and call `stage::run`.

pub mod ack;
pub mod batch;
mod client;
mod commit;
mod context;
pub mod dead_letter;
mod driver;
mod io;
pub mod lag;
pub mod merge;
mod metrics;
pub mod output;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{BorrowedHeaders, Headers, Message, OwnedHeaders};

pub use ack::PartitionId;
pub use driver::run;
pub use io::{Acks, DeadLetters, StageIo};
pub use output::OutputRecord;

/// Inputs of a stage: named topics, or a pattern (`^...`, librdkafka reads it as a regex).
#[derive(Debug, Clone, PartialEq)]
pub enum InputTopics {
    Names(Vec<String>),
    Pattern(String),
}

impl InputTopics {
    /// What to subscribe to.
    pub fn subscription(&self) -> Vec<&str> {
        match self {
            InputTopics::Names(names) => names.iter().map(String::as_str).collect(),
            InputTopics::Pattern(pattern) => vec![pattern.as_str()],
        }
    }
}

/// Where a stage's dead letters go.
#[derive(Debug, Clone, PartialEq)]
pub enum DeadLetterTopic {
    /// `<input topic><suffix>`, one dead-letter topic per input (the dispatcher).
    Suffix(String),
    /// One topic for every input (log, aggregate).
    Topic(String),
}

impl DeadLetterTopic {
    pub fn for_input(&self, topic: &str) -> String {
        match self {
            DeadLetterTopic::Suffix(suffix) => dead_letter::dead_letter_topic(topic, suffix),
            DeadLetterTopic::Topic(topic) => topic.clone(),
        }
    }
}

/// When an input's offset may be committed.
#[derive(Debug, Clone, PartialEq)]
pub enum OffsetPolicy {
    /// The contiguous prefix of inputs whose outputs (or the stage's own acknowledgement, or their
    /// dead letter) are acknowledged, per partition: dispatch, log, store.
    AckedPrefix,
    /// The stage's own checkpoints (offset + metadata), capped below any dead letter still in
    /// flight; the stage restores its state from the metadata on assignment: aggregate.
    Checkpoint,
    /// Outputs and input offsets in one Kafka transaction, committed every `batch_time` or
    /// `batch_size` inputs; an abort rewinds to the batch's first offsets: exactly once.
    Transactional {
        transactional_id: String,
        batch_size: usize,
        batch_time: Duration,
    },
}

/// What the runtime needs to know about a stage: its name, inputs, group and policies.
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// `dispatch`, `log`, ...: metric names (`eventpipe_<name>_...`), log lines, dead-letter headers.
    pub name: &'static str,
    pub inputs: InputTopics,
    pub group_id: String,
    /// Topics that must exist before consuming (outputs, dead-letter topics, named inputs).
    pub required_topics: Vec<String>,
    pub dead_letters: DeadLetterTopic,
    pub policy: OffsetPolicy,
    /// How long a revocation or a graceful stop waits for in-flight work.
    pub drain_timeout: Duration,
    /// How often `Stage::tick` runs (and acknowledged offsets are committed).
    pub tick: Duration,
    /// The largest record (key + value + headers) the producer may send; a bigger output
    /// dead-letters its input instead (librdkafka's `message.max.bytes`).
    pub max_record_bytes: usize,
}

/// A consumed record, borrowed from librdkafka's buffer (or from a copy the runtime kept while
/// the stage's dependency was down).
#[derive(Debug)]
pub struct Record<'a> {
    /// Interned: one `Arc<str>` per topic, so partition ids are cheap to clone.
    pub topic: &'a Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub headers: RecordHeaders<'a>,
}

impl<'a> Record<'a> {
    /// A record read in place from a consumed message (librdkafka's or a kept copy).
    pub fn from_message<M: Message + AsRecordHeaders>(
        message: &'a M,
        topic: &'a Arc<str>,
    ) -> Record<'a> {
        Record {
            topic,
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            key: message.key(),
            payload: message.payload().unwrap_or_default(),
            headers: message.record_headers(),
        }
    }

    pub fn partition_id(&self) -> PartitionId {
        PartitionId {
            topic: self.topic.clone(),
            partition: self.partition,
        }
    }

    /// The first header of that name, compared without regard to case.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    }
}

/// A record's headers, read in place (no copy per record). librdkafka parses a consumed
/// message's headers (and allocates for them) on first access, so they stay unparsed until a
/// stage asks.
#[derive(Clone, Copy)]
pub enum RecordHeaders<'a> {
    None,
    Unparsed(&'a rdkafka::message::BorrowedMessage<'a>),
    Owned(&'a OwnedHeaders),
    Pairs(&'a [(&'a str, &'a [u8])]),
}

impl std::fmt::Debug for RecordHeaders<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|(k, v)| (k, String::from_utf8_lossy(v))))
            .finish()
    }
}

impl<'a> RecordHeaders<'a> {
    pub fn len(self) -> usize {
        match self {
            RecordHeaders::None => 0,
            RecordHeaders::Unparsed(message) => Message::headers(message).map_or(0, |h| h.count()),
            RecordHeaders::Owned(h) => h.count(),
            RecordHeaders::Pairs(pairs) => pairs.len(),
        }
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// (name, value) in order; a header without a value reads as empty.
    pub fn iter(self) -> impl Iterator<Item = (&'a str, &'a [u8])> {
        (0..self.len()).map(move |index| match self {
            RecordHeaders::None => unreachable!("no headers to iterate"),
            RecordHeaders::Unparsed(message) => {
                let header = borrowed_headers(message).get(index);
                (header.key, header.value.unwrap_or_default())
            }
            RecordHeaders::Owned(h) => {
                let header = h.get(index);
                (header.key, header.value.unwrap_or_default())
            }
            RecordHeaders::Pairs(pairs) => pairs[index],
        })
    }
}

/// Messages whose headers a `Record` can read in place.
pub trait AsRecordHeaders {
    fn record_headers(&self) -> RecordHeaders<'_>;
}

impl<'c> AsRecordHeaders for rdkafka::message::BorrowedMessage<'c> {
    fn record_headers(&self) -> RecordHeaders<'_> {
        RecordHeaders::Unparsed(self)
    }
}

/// The headers of a message known to have some (`len` counted them).
fn borrowed_headers<'a>(message: &'a rdkafka::message::BorrowedMessage<'a>) -> &'a BorrowedHeaders {
    Message::headers(message).expect("headers counted above")
}

impl AsRecordHeaders for rdkafka::message::OwnedMessage {
    fn record_headers(&self) -> RecordHeaders<'_> {
        Message::headers(self).map_or(RecordHeaders::None, RecordHeaders::Owned)
    }
}

/// A record that goes to the dead-letter topic, untouched, with headers saying why.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Metric label and `eventpipe.error.kind` header: low cardinality.
    pub kind: &'static str,
    pub reason: String,
    /// Stage-specific headers after the standard ones (e.g. Elasticsearch's status).
    pub extra_headers: Vec<(&'static str, String)>,
}

impl DeadLetter {
    pub fn new(kind: &'static str, reason: impl Into<String>) -> DeadLetter {
        DeadLetter {
            kind,
            reason: reason.into(),
            extra_headers: Vec::new(),
        }
    }
}

/// What became of one record.
#[derive(Debug)]
pub enum Handled {
    /// Produce these (possibly none); the input is done when Kafka acknowledged all of them.
    Outputs(Vec<OutputRecord>),
    /// Dead-letter the input; it is done when the dead letter is acknowledged.
    DeadLetter(DeadLetter),
    /// The stage took the record into its own sink and acknowledges it later, exactly once,
    /// through `StageIo::acks` (`AckedPrefix` only).
    Pending,
    /// Nothing to wait for: under `Checkpoint` the stage's checkpoint covers the record.
    Done,
}

/// Why a stage could not handle a record (or a tick).
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A dependency (schema registry, Elasticsearch, PostgreSQL, a full buffer in front of one)
    /// cannot take the record now: the runtime keeps it, retries it with backoff, and pauses
    /// the assignment meanwhile (polling goes on, so the group keeps this member).
    #[error("{dependency} unavailable: {reason}")]
    Unavailable {
        dependency: &'static str,
        reason: String,
    },
    /// Carrying on would lose data: the stage stops with this error.
    #[error("stopped to avoid losing data: {0}")]
    Fatal(String),
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaError),
}

/// A stage's logic. The runtime calls `handle` for every record in order, per partition; `tick`
/// every `StageSpec::tick`; `finish` once on a graceful stop, before the final commit.
pub trait Stage: Send {
    fn handle(
        &mut self,
        record: &Record<'_>,
    ) -> impl Future<Output = Result<Handled, StageError>> + Send;

    /// Periodic work: flush what is due (closed windows, an aged batch).
    fn tick(&mut self) -> impl Future<Output = Result<(), StageError>> + Send {
        async { Ok(()) }
    }

    /// Graceful stop: hand over and wait for buffered work until `deadline`.
    fn finish(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> impl Future<Output = Result<(), StageError>> + Send {
        let _ = deadline;
        async { Ok(()) }
    }

    /// `Checkpoint` policy: what each partition may commit now.
    fn checkpoints(&self) -> Vec<(PartitionId, Checkpoint)> {
        Vec::new()
    }

    /// Partitions the stage wants to read again from an earlier offset (flow control's
    /// resume), asked after every tick (`AckedPrefix` and `Transactional` only). The runtime
    /// makes what it handled of each durable, then calls `rewind_from`.
    fn rewinds(&mut self) -> Vec<PartitionId> {
        Vec::new()
    }

    /// Everything handled of `partition` is durable up to `position` (its next offset): the
    /// stage records what it needs and answers where to read again from (`None`: nowhere).
    /// The committed offset moves back there before the partition does, so a crash or a
    /// rebalance reads again from there too. `Unavailable`: asked again after the next tick.
    fn rewind_from(
        &mut self,
        partition: &PartitionId,
        position: i64,
    ) -> impl Future<Output = Result<Option<i64>, StageError>> + Send {
        let _ = (partition, position);
        async { Ok(None) }
    }
}

/// A checkpoint: the next offset to read after a restart and metadata to restore state from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub next_offset: i64,
    pub metadata: Option<String>,
}

/// Called on librdkafka's rebalance thread (the consumer's poll): keep them short.
pub trait PartitionHooks: Send + Sync {
    /// Before fetching starts, with the metadata of the partition's committed offset.
    fn assigned(&self, _partition: &PartitionId, _committed_metadata: Option<&str>) {}

    /// On revocation: the partition's final checkpoint (used by the `Checkpoint` policy); the
    /// stage drops the partition's state.
    fn revoked(&self, _partition: &PartitionId) -> Option<Checkpoint> {
        None
    }

    /// Work still in flight for `partitions` that a revocation should wait for (bounded by
    /// the drain timeout). By default the runtime waits for its own unacknowledged inputs.
    fn outstanding(&self, _partitions: &[PartitionId]) -> Option<usize> {
        None
    }
}

/// Hooks of a stage that needs none.
pub struct NoHooks;
impl PartitionHooks for NoHooks {}
