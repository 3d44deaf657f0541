//! `eventpipe store verify`: compares the store with what a read_committed consumer finds in
//! Kafka for every stored topic-partition, and reports missing, unexpected and duplicated rows.
//!
//! Offsets are compared record by record, not by arithmetic: transaction markers and compaction
//! leave holes in a partition's offsets. Records the store's group has not reached yet are
//! pending, not missing; records older than the store's oldest partition expired by retention.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use chrono::NaiveDate;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;

use super::row::HEADER_REPLAY_ID;
use crate::config::KafkaSettings;
use crate::kafka::client::{create_client, require_topics, wait_for_broker};
use crate::kafka::{ClientKind, KafkaError, PipelineContext};

/// Rows read from the store per query.
const CHUNK_ROWS: i64 = 50_000;
/// Longest wait for the consumer's next record before the partition is taken as read.
const READ_IDLE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("reading Kafka: {0}")]
    Consumer(#[from] RdKafkaError),
    #[error("reading the store: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("no partition of {topic} answered within {seconds}s")]
    Stalled { topic: String, seconds: u64 },
}

/// What Kafka holds for one partition, as a read_committed consumer sees it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KafkaSide {
    /// Offsets the store must have (once it has consumed them).
    pub expected: Vec<i64>,
    /// The store group's committed offset: an absent record at or past it is not consumed yet
    /// rather than missing. None when the group has committed nothing here.
    pub committed: Option<i64>,
    /// Offsets of replayed records (the store skips them by design).
    pub replays: u64,
    /// Offsets older than the store's oldest partition: dropped by retention.
    pub expired: u64,
}

/// The comparison of one topic-partition.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PartitionReport {
    pub topic: String,
    pub partition: i32,
    pub in_kafka: u64,
    pub stored: u64,
    pub missing: Vec<(i64, i64)>,
    pub unexpected: Vec<(i64, i64)>,
    pub duplicated: Vec<i64>,
    pub replays: u64,
    pub pending: u64,
    pub expired: u64,
}

impl PartitionReport {
    pub fn missing_count(&self) -> u64 {
        count(&self.missing)
    }

    pub fn unexpected_count(&self) -> u64 {
        count(&self.unexpected)
    }

    pub fn is_exact(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.duplicated.is_empty()
    }
}

fn count(ranges: &[(i64, i64)]) -> u64 {
    ranges.iter().map(|(a, b)| (b - a + 1) as u64).sum()
}

fn show_ranges(ranges: &[(i64, i64)]) -> String {
    const SHOWN: usize = 20;
    let mut parts: Vec<String> = ranges
        .iter()
        .take(SHOWN)
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}..={b}")
            }
        })
        .collect();
    if ranges.len() > SHOWN {
        parts.push(format!("and {} more ranges", ranges.len() - SHOWN));
    }
    parts.join(", ")
}

impl fmt::Display for PartitionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}[{}]: {} in Kafka, {} stored, {} missing, {} unexpected, {} duplicated",
            if self.is_exact() { "ok    " } else { "GAP   " },
            self.topic,
            self.partition,
            self.in_kafka,
            self.stored,
            self.missing_count(),
            self.unexpected_count(),
            self.duplicated.len()
        )?;
        write_notes(f, self.replays, self.pending, self.expired)?;
        if !self.missing.is_empty() {
            write!(
                f,
                "\n         missing offsets: {}",
                show_ranges(&self.missing)
            )?;
        }
        if !self.unexpected.is_empty() {
            write!(
                f,
                "\n         unexpected offsets: {}",
                show_ranges(&self.unexpected)
            )?;
        }
        if !self.duplicated.is_empty() {
            let shown: Vec<String> = self
                .duplicated
                .iter()
                .take(20)
                .map(i64::to_string)
                .collect();
            write!(f, "\n         duplicated offsets: {}", shown.join(", "))?;
        }
        Ok(())
    }
}

/// The sums over every partition verified: the summary line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Totals {
    pub partitions: usize,
    pub topics: usize,
    pub in_kafka: u64,
    pub stored: u64,
    pub missing: u64,
    pub unexpected: u64,
    pub duplicated: u64,
    pub replays: u64,
    pub pending: u64,
    pub expired: u64,
}

impl Totals {
    pub fn of(reports: &[PartitionReport]) -> Totals {
        let topics: BTreeSet<&str> = reports.iter().map(|r| r.topic.as_str()).collect();
        reports.iter().fold(
            Totals {
                partitions: reports.len(),
                topics: topics.len(),
                ..Totals::default()
            },
            |mut total, report| {
                total.in_kafka += report.in_kafka;
                total.stored += report.stored;
                total.missing += report.missing_count();
                total.unexpected += report.unexpected_count();
                total.duplicated += report.duplicated.len() as u64;
                total.replays += report.replays;
                total.pending += report.pending;
                total.expired += report.expired;
                total
            },
        )
    }
}

impl fmt::Display for Totals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "verified {} partitions of {} topics: {} records in Kafka, {} stored, {} missing, \
             {} unexpected, {} duplicated",
            self.partitions,
            self.topics,
            self.in_kafka,
            self.stored,
            self.missing,
            self.unexpected,
            self.duplicated
        )?;
        write_notes(f, self.replays, self.pending, self.expired)
    }
}

/// The records that are rightly absent from the store, when there are any.
fn write_notes(
    f: &mut fmt::Formatter<'_>,
    replays: u64,
    pending: u64,
    expired: u64,
) -> fmt::Result {
    for (label, n) in [
        ("replayed (not stored by design)", replays),
        ("not consumed yet", pending),
        ("expired by retention", expired),
    ] {
        if n > 0 {
            write!(f, ", {n} {label}")?;
        }
    }
    Ok(())
}

/// Sorted offsets as inclusive ranges of consecutive values.
pub fn ranges(offsets: &[i64]) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = Vec::new();
    for &offset in offsets {
        match out.last_mut() {
            Some((_, end)) if *end + 1 == offset => *end = offset,
            _ => out.push((offset, offset)),
        }
    }
    out
}

/// Compares what Kafka has with the store's offsets (both sorted; `stored` may repeat).
pub fn compare(topic: &str, partition: i32, kafka: &KafkaSide, stored: &[i64]) -> PartitionReport {
    let expected: BTreeSet<i64> = kafka.expected.iter().copied().collect();
    let mut seen: BTreeSet<i64> = BTreeSet::new();
    let mut duplicated = Vec::new();
    let mut unexpected = Vec::new();
    for &offset in stored {
        if !seen.insert(offset) {
            if duplicated.last() != Some(&offset) {
                duplicated.push(offset);
            }
        } else if !expected.contains(&offset) {
            unexpected.push(offset);
        }
    }
    let committed = kafka.committed.unwrap_or(i64::MAX);
    let (pending, missing): (Vec<i64>, Vec<i64>) = expected
        .difference(&seen)
        .copied()
        .partition(|&offset| offset >= committed);
    PartitionReport {
        topic: topic.to_string(),
        partition,
        in_kafka: kafka.expected.len() as u64,
        stored: (seen.len() - unexpected.len()) as u64,
        missing: ranges(&missing),
        unexpected: ranges(&unexpected),
        duplicated,
        replays: kafka.replays,
        pending: pending.len() as u64,
        expired: kafka.expired,
    }
}

/// Verifies `topics` (all the store holds when empty); one report per topic-partition.
pub async fn verify(
    kafka: &KafkaSettings,
    pool: &PgPool,
    topics: &[String],
    store_group: &str,
) -> Result<Vec<PartitionReport>, VerifyError> {
    let topics: Vec<String> = if topics.is_empty() {
        sqlx::query_scalar("SELECT DISTINCT topic FROM events ORDER BY 1")
            .fetch_all(pool)
            .await?
    } else {
        topics.to_vec()
    };
    let oldest_day: Option<NaiveDate> = super::schema::existing_partitions(pool)
        .await?
        .into_iter()
        .next();
    let mut reports = Vec::new();
    for topic in &topics {
        let sides = read_kafka(kafka, topic, store_group, oldest_day).await?;
        for (partition, side) in sides {
            let stored = stored_offsets(pool, topic, partition, &side).await?;
            reports.push(compare(topic, partition, &side, &stored));
        }
    }
    Ok(reports)
}

/// The store's offsets of one partition over the range Kafka was read in, in order.
async fn stored_offsets(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    kafka: &KafkaSide,
) -> Result<Vec<i64>, sqlx::Error> {
    let (Some(&first), Some(&last)) = (kafka.expected.first(), kafka.expected.last()) else {
        return Ok(Vec::new());
    };
    let mut offsets = Vec::with_capacity(kafka.expected.len());
    let mut cursor = first - 1;
    loop {
        // Keyset by offset; a duplicated offset comes once with its count.
        let chunk: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT kafka_offset, count(*) FROM events
             WHERE topic = $1 AND kafka_partition = $2 AND kafka_offset > $3 AND kafka_offset <= $4
             GROUP BY kafka_offset ORDER BY kafka_offset LIMIT $5",
        )
        .bind(topic)
        .bind(partition)
        .bind(cursor)
        .bind(last)
        .bind(CHUNK_ROWS)
        .fetch_all(pool)
        .await?;
        let Some(&(end, _)) = chunk.last() else { break };
        for (offset, copies) in &chunk {
            offsets.extend(std::iter::repeat_n(*offset, *copies as usize));
        }
        if (chunk.len() as i64) < CHUNK_ROWS {
            break;
        }
        cursor = end;
    }
    Ok(offsets)
}

/// Reads every partition of `topic` from its start to its end as read_committed.
async fn read_kafka(
    settings: &KafkaSettings,
    topic: &str,
    store_group: &str,
    oldest_day: Option<NaiveDate>,
) -> Result<BTreeMap<i32, KafkaSide>, VerifyError> {
    let mut kafka = settings.clone();
    // The store's group id only to read its committed offsets: assigned, never subscribed, and
    // auto-commit off, so it neither joins the group nor moves anything.
    kafka
        .properties
        .insert("group.id".into(), store_group.into());
    kafka
        .properties
        .insert("enable.auto.commit".into(), "false".into());
    kafka
        .properties
        .insert("enable.partition.eof".into(), "true".into());
    kafka
        .properties
        .insert("isolation.level".into(), "read_committed".into());
    let context = PipelineContext::default();
    let consumer: StreamConsumer<PipelineContext> =
        create_client(&kafka, ClientKind::Consumer, context.clone())?;
    let metadata = wait_for_broker(consumer.client(), &context, &kafka)?;
    require_topics(&metadata, &[topic], &kafka)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    let mut wanted = TopicPartitionList::new();
    for &partition in &partitions {
        wanted.add_partition(topic, partition);
    }
    let committed: BTreeMap<i32, i64> = consumer
        .committed_offsets(wanted, Duration::from_secs(10))?
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(offset) => Some((e.partition(), offset)),
            _ => None,
        })
        .collect();
    let mut sides: BTreeMap<i32, KafkaSide> = BTreeMap::new();
    let mut open: BTreeSet<i32> = BTreeSet::new();
    let mut assignment = TopicPartitionList::new();
    for &partition in &partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
        sides.insert(
            partition,
            KafkaSide {
                committed: committed.get(&partition).copied(),
                ..KafkaSide::default()
            },
        );
        if high > low {
            open.insert(partition);
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .map_err(VerifyError::Consumer)?;
        }
    }
    if open.is_empty() {
        return Ok(sides);
    }
    consumer.assign(&assignment)?;
    let oldest_ms = oldest_day.map(|day| {
        day.and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_utc()
            .timestamp_millis()
    });
    while !open.is_empty() {
        let message = match tokio::time::timeout(READ_IDLE, consumer.recv()).await {
            Err(_) => {
                return Err(VerifyError::Stalled {
                    topic: topic.into(),
                    seconds: READ_IDLE.as_secs(),
                })
            }
            Ok(Err(RdKafkaError::PartitionEOF(partition))) => {
                open.remove(&partition);
                continue;
            }
            Ok(Err(error)) => return Err(error.into()),
            Ok(Ok(message)) => message,
        };
        let side = sides.entry(message.partition()).or_default();
        let replayed = message
            .headers()
            .is_some_and(|h| h.iter().any(|h| h.key == HEADER_REPLAY_ID));
        let timestamp = message.timestamp().to_millis().unwrap_or(0);
        if replayed {
            side.replays += 1;
        } else if oldest_ms.is_some_and(|oldest| timestamp < oldest) {
            side.expired += 1;
        } else {
            side.expected.push(message.offset());
        }
    }
    Ok(sides)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_join_consecutive_offsets() {
        assert_eq!(ranges(&[1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 7), (9, 10)]);
        assert!(ranges(&[]).is_empty());
    }

    #[test]
    fn compare_finds_missing_unexpected_and_duplicated_rows() {
        // Offset 5 is a transaction marker: Kafka never shows it, so it is not missing.
        let kafka = KafkaSide {
            expected: vec![0, 1, 2, 3, 4, 6, 7, 8],
            ..KafkaSide::default()
        };
        let report = compare("t", 0, &kafka, &[0, 1, 1, 4, 6, 8, 9]);
        assert_eq!(report.missing, vec![(2, 3), (7, 7)]);
        assert_eq!(report.unexpected, vec![(9, 9)]);
        assert_eq!(report.duplicated, vec![1]);
        assert_eq!(report.stored, 5);
        assert!(!report.is_exact());
        let text = report.to_string();
        assert!(text.contains("3 missing"), "{text}");
        assert!(text.contains("missing offsets: 2..=3"), "{text}");
        let exact = compare("t", 0, &kafka, &kafka.expected);
        assert!(exact.is_exact(), "{exact}");
        // Past the store group's committed offset an absent record is pending, not missing.
        let running = KafkaSide {
            committed: Some(7),
            ..kafka.clone()
        };
        let report = compare("t", 0, &running, &[0, 1, 2, 3, 4, 6]);
        assert!(report.is_exact(), "{report}");
        assert_eq!(report.pending, 2);
    }
}
