//! Records of several co-partitioned input topics, merged in timestamp order per partition
//! number (as Kafka Streams does within a task), so `update_user` never overtakes `create_user`.
//!
//! The guarantee: for inputs with the same partition count whose producers use the same key →
//! partition mapping, records of one partition number are handed to the stage in Kafka timestamp
//! order across topics, and in offset order within one topic. Two records of the same millisecond
//! on different topics are in no particular order. A partition with nothing buffered holds the
//! others back only while it may have more to deliver: its position is below the high watermark
//! librdkafka last saw (at most `max_idle`), or no fetch has answered for it yet since the
//! assignment (at most `first_fetch_idle`); a caught-up partition holds nothing.
//! Memory is bounded: past `max_buffered` records the oldest head is released regardless.
//!
//! Pure state (time and the caught-up test are passed in); the driver feeds it and drains it. A
//! single-topic stage uses it only as the in-order queue of records that arrived while its
//! dependency was down.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// What an empty partition may still deliver, as far as librdkafka's last fetch tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// Nothing more: it holds nothing back.
    CaughtUp,
    /// More than what was received: wait for it, `max_idle` at most.
    Behind,
    /// No fetch has answered for it yet (just assigned): wait, `first_fetch_idle` at most.
    NotYet,
}

/// What the merge needs to know of a buffered record.
pub trait Positioned {
    fn topic(&self) -> &str;
    fn partition(&self) -> i32;
    fn offset(&self) -> i64;
    fn timestamp_ms(&self) -> Option<i64>;
}

impl Positioned for rdkafka::message::OwnedMessage {
    fn topic(&self) -> &str {
        rdkafka::Message::topic(self)
    }
    fn partition(&self) -> i32 {
        rdkafka::Message::partition(self)
    }
    fn offset(&self) -> i64 {
        rdkafka::Message::offset(self)
    }
    fn timestamp_ms(&self) -> Option<i64> {
        rdkafka::Message::timestamp(self).to_millis()
    }
}

#[derive(Debug)]
struct Buffer<T> {
    records: VecDeque<T>,
    /// The next offset after the last record received (to compare with the high watermark).
    next_offset: Option<i64>,
    /// When this buffer last became empty while others of its partition number wait on it.
    empty_since: Option<Instant>,
}

impl<T> Default for Buffer<T> {
    fn default() -> Self {
        Buffer {
            records: VecDeque::new(),
            next_offset: None,
            empty_since: None,
        }
    }
}

/// What the driver should do next.
#[derive(Debug, PartialEq)]
pub enum Next<T> {
    /// Hand this record to the stage.
    Record(T),
    /// Nothing can go yet; ask again at this time at the latest (or when a record arrives).
    WaitUntil(Instant),
    /// Nothing buffered.
    Empty,
}

/// The merge buffers of the assigned partitions.
#[derive(Debug)]
pub struct Merger<T> {
    /// By partition number, then topic (in a fixed order: ties go to the first).
    buffers: BTreeMap<i32, BTreeMap<Arc<str>, Buffer<T>>>,
    buffered: usize,
    max_idle: Duration,
    first_fetch_idle: Duration,
    max_buffered: usize,
    /// Partition numbers are served in turn, so a backlog on one does not starve the others.
    next_partition: i32,
}

impl<T: Positioned> Merger<T> {
    pub fn new(max_idle: Duration, first_fetch_idle: Duration, max_buffered: usize) -> Merger<T> {
        Merger {
            buffers: BTreeMap::new(),
            buffered: 0,
            max_idle,
            first_fetch_idle,
            max_buffered: max_buffered.max(1),
            next_partition: 0,
        }
    }

    /// The topic-partitions now assigned, after a rebalance: every buffer starts empty. A
    /// (re)assigned partition is fetched again from its committed offset, so what was buffered
    /// before would come twice, and out of order.
    pub fn assign(&mut self, assignment: &[(Arc<str>, i32)]) {
        let mut buffers: BTreeMap<i32, BTreeMap<Arc<str>, Buffer<T>>> = BTreeMap::new();
        for (topic, partition) in assignment {
            buffers
                .entry(*partition)
                .or_default()
                .insert(topic.clone(), Buffer::default());
        }
        self.buffers = buffers;
        self.buffered = 0;
    }

    /// Drops what is buffered for these partitions (they were sought back: librdkafka delivers
    /// those records again).
    pub fn forget(&mut self, partitions: &[(Arc<str>, i32)]) {
        for (topic, partition) in partitions {
            if let Some(buffer) = self
                .buffers
                .get_mut(partition)
                .and_then(|topics| topics.get_mut(topic))
            {
                self.buffered -= buffer.records.len();
                *buffer = Buffer::default();
            }
        }
    }

    /// Buffers a received record (of an assigned partition; others are dropped).
    pub fn push(&mut self, record: T) {
        let Some(buffer) = self
            .buffers
            .get_mut(&record.partition())
            .and_then(|topics| topics.get_mut(record.topic()))
        else {
            return;
        };
        buffer.next_offset = Some(record.offset() + 1);
        buffer.empty_since = None;
        buffer.records.push_back(record);
        self.buffered += 1;
    }

    pub fn is_full(&self) -> bool {
        self.buffered >= self.max_buffered
    }

    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// The next record in merge order, or how long to wait for one. `fetched(topic, partition,
    /// next_offset)` says what an empty partition may still deliver.
    pub fn next(
        &mut self,
        now: Instant,
        mut fetched: impl FnMut(&str, i32, Option<i64>) -> Fetched,
    ) -> Next<T> {
        if self.buffered == 0 {
            return Next::Empty;
        }
        let force = self.is_full();
        let mut wake: Option<Instant> = None;
        let numbers: Vec<i32> = self
            .buffers
            .range(self.next_partition..)
            .chain(self.buffers.range(..self.next_partition))
            .map(|(p, _)| *p)
            .collect();
        for number in numbers {
            let topics = self.buffers.get_mut(&number).expect("listed above");
            let Some(candidate) = topics
                .iter()
                .filter_map(|(topic, b)| Some((b.records.front()?.timestamp_ms(), topic.clone())))
                .min_by_key(|(ts, _)| ts.unwrap_or(i64::MIN))
                .map(|(_, topic)| topic)
            else {
                continue;
            };
            let mut blocked_until: Option<Instant> = None;
            if !force {
                for (topic, buffer) in topics.iter_mut() {
                    if !buffer.records.is_empty() {
                        continue;
                    }
                    let idle = match fetched(topic, number, buffer.next_offset) {
                        Fetched::CaughtUp => continue,
                        Fetched::Behind => self.max_idle,
                        Fetched::NotYet => self.first_fetch_idle,
                    };
                    let since = *buffer.empty_since.get_or_insert(now);
                    let until = since + idle;
                    if now < until {
                        blocked_until = Some(blocked_until.map_or(until, |b| b.min(until)));
                    }
                }
            }
            if let Some(until) = blocked_until {
                wake = Some(wake.map_or(until, |w| w.min(until)));
                continue;
            }
            let buffer = topics.get_mut(&candidate).expect("candidate exists");
            let record = buffer.records.pop_front().expect("candidate has a head");
            if buffer.records.is_empty() {
                buffer.empty_since = Some(now);
            }
            self.buffered -= 1;
            self.next_partition = number + 1;
            return Next::Record(record);
        }
        wake.map_or(Next::Empty, Next::WaitUntil)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Clone)]
    struct R(&'static str, i32, i64, i64);

    impl Positioned for R {
        fn topic(&self) -> &str {
            self.0
        }
        fn partition(&self) -> i32 {
            self.1
        }
        fn offset(&self) -> i64 {
            self.2
        }
        fn timestamp_ms(&self) -> Option<i64> {
            Some(self.3)
        }
    }

    fn merger(topics: &[&'static str], partitions: i32) -> Merger<R> {
        let mut m = Merger::new(Duration::from_millis(50), Duration::from_millis(500), 1000);
        let assignment: Vec<(Arc<str>, i32)> = topics
            .iter()
            .flat_map(|t| (0..partitions).map(move |p| (Arc::<str>::from(*t), p)))
            .collect();
        m.assign(&assignment);
        m
    }

    fn drain(m: &mut Merger<R>, now: Instant) -> Vec<R> {
        let mut out = Vec::new();
        while let Next::Record(r) = m.next(now, |_, _, _| Fetched::CaughtUp) {
            out.push(r);
        }
        out
    }

    #[test]
    fn a_backlog_comes_out_in_timestamp_order_across_topics() {
        let now = Instant::now();
        let mut m = merger(&["create", "update"], 1);
        // Fetched topic by topic, as after a restart: all updates first, then the creates.
        for i in 0..5 {
            m.push(R("update", 0, i, 10 * i + 5));
        }
        for i in 0..5 {
            m.push(R("create", 0, i, 10 * i));
        }
        let out: Vec<i64> = drain(&mut m, now).iter().map(|r| r.3).collect();
        assert_eq!(out, vec![0, 5, 10, 15, 20, 25, 30, 35, 40, 45]);
    }

    #[test]
    fn an_empty_partition_with_more_to_come_holds_the_others_back_at_most_max_idle() {
        let now = Instant::now();
        let mut m = merger(&["create", "update"], 1);
        m.push(R("update", 0, 0, 5));
        // `create` has not been fetched yet (not caught up): the update waits.
        let not_caught_up = |topic: &str, _: i32, _: Option<i64>| {
            if topic == "create" {
                Fetched::Behind
            } else {
                Fetched::CaughtUp
            }
        };
        assert_eq!(
            m.next(now, not_caught_up),
            Next::WaitUntil(now + Duration::from_millis(50))
        );
        // The create arrives within the wait: it goes first.
        m.push(R("create", 0, 0, 1));
        assert_eq!(
            m.next(now, not_caught_up),
            Next::Record(R("create", 0, 0, 1))
        );
        // Empty again and still not caught up: wait, but no longer than max_idle.
        let later = now + Duration::from_millis(10);
        assert_eq!(
            m.next(later, not_caught_up),
            Next::WaitUntil(now + Duration::from_millis(50))
        );
        let past = now + Duration::from_millis(60);
        assert_eq!(
            m.next(past, not_caught_up),
            Next::Record(R("update", 0, 0, 5))
        );
    }

    #[test]
    fn a_partition_not_fetched_yet_holds_the_others_back_longer() {
        let now = Instant::now();
        let mut m = merger(&["create", "update"], 1);
        m.push(R("update", 0, 0, 5));
        let not_fetched = |topic: &str, _: i32, _: Option<i64>| {
            if topic == "create" {
                Fetched::NotYet
            } else {
                Fetched::CaughtUp
            }
        };
        assert_eq!(
            m.next(now, not_fetched),
            Next::WaitUntil(now + Duration::from_millis(500))
        );
        let past = now + Duration::from_millis(501);
        assert_eq!(
            m.next(past, not_fetched),
            Next::Record(R("update", 0, 0, 5))
        );
    }

    #[test]
    fn a_caught_up_partition_holds_nothing_and_partition_numbers_are_independent() {
        let now = Instant::now();
        let mut m = merger(&["create", "update"], 2);
        m.push(R("update", 1, 0, 5));
        m.push(R("create", 0, 0, 9));
        // Partition 0 of `update` and partition 1 of `create` are caught up: nothing waits,
        // and the partition numbers are served in turn.
        let out = drain(&mut m, now);
        assert_eq!(out.len(), 2);
        assert_eq!(m.next(now, |_, _, _| Fetched::CaughtUp), Next::Empty);
    }

    #[test]
    fn the_buffer_bound_releases_the_oldest_head_regardless() {
        let now = Instant::now();
        let mut m = Merger::new(Duration::from_secs(3600), Duration::from_secs(3600), 2);
        m.assign(&[("a".into(), 0), ("b".into(), 0)]);
        m.push(R("a", 0, 0, 1));
        m.push(R("a", 0, 1, 2));
        assert!(m.is_full());
        assert_eq!(
            m.next(now, |_, _, _| Fetched::Behind),
            Next::Record(R("a", 0, 0, 1))
        );
        assert!(matches!(
            m.next(now, |_, _, _| Fetched::Behind),
            Next::WaitUntil(_)
        ));
    }

    #[test]
    fn forgotten_partitions_lose_their_buffers_and_others_keep_theirs() {
        let mut m = merger(&["a"], 2);
        m.push(R("a", 0, 0, 1));
        m.push(R("a", 1, 0, 1));
        m.forget(&[("a".into(), 0)]);
        assert_eq!(m.buffered(), 1);
        assert_eq!(drain(&mut m, Instant::now()), vec![R("a", 1, 0, 1)]);
    }

    #[test]
    fn a_rebalance_empties_every_buffer_and_unassigned_records_are_not_kept() {
        let mut m = merger(&["a"], 2);
        m.push(R("a", 0, 0, 1));
        m.push(R("a", 1, 0, 1));
        // Partition 1 stays: it is fetched again from its committed offset, so its buffer goes.
        m.assign(&[("a".into(), 1)]);
        assert_eq!(m.buffered(), 0);
        m.push(R("a", 0, 1, 2));
        assert_eq!(
            m.buffered(),
            0,
            "records of unassigned partitions are not kept"
        );
        m.push(R("a", 1, 0, 1));
        assert_eq!(drain(&mut m, Instant::now()), vec![R("a", 1, 0, 1)]);
    }
}
