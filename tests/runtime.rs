//! The stage runtime in process, against the real Kafka (and Elasticsearch): a stage built and run
//! until a token is cancelled, no child process. What the black-box tests cannot reach: a
//! dependency down for longer than the poll interval, a revocation with one worker thread.

mod common;
#[path = "common/elasticsearch.rs"]
mod es;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventpipe::stage::{
    self, DeadLetterTopic, Handled, InputTopics, OffsetPolicy, PartitionHooks, PartitionId, Record,
    Stage, StageError, StageSpec,
};
use eventpipe::telemetry::Readiness;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Counts rebalance callbacks: one assignment and no revocation means the member never left.
#[derive(Default)]
struct CountingHooks {
    assigned: AtomicUsize,
    revoked: AtomicUsize,
}

impl PartitionHooks for CountingHooks {
    fn assigned(&self, _: &PartitionId, _: Option<&str>) {
        self.assigned.fetch_add(1, Ordering::SeqCst);
    }
    fn revoked(&self, _: &PartitionId) -> Option<stage::Checkpoint> {
        self.revoked.fetch_add(1, Ordering::SeqCst);
        None
    }
}

/// A stage whose dependency is down until `up_at`: meanwhile every record is refused as
/// unavailable. Records handled are noted, in order.
struct DownThenUp {
    up_at: Instant,
    attempts_while_down: Arc<AtomicUsize>,
    handled: Arc<Mutex<Vec<(i32, i64)>>>,
}

impl Stage for DownThenUp {
    async fn handle(&mut self, record: &Record<'_>) -> Result<Handled, StageError> {
        if Instant::now() < self.up_at {
            self.attempts_while_down.fetch_add(1, Ordering::SeqCst);
            return Err(StageError::Unavailable {
                dependency: "test_dependency",
                reason: "down on purpose".into(),
            });
        }
        self.handled
            .lock()
            .unwrap()
            .push((record.partition, record.offset));
        Ok(Handled::Done)
    }
}

fn spec(topic: &str, group: &str) -> StageSpec {
    StageSpec {
        name: "runtime_test",
        inputs: InputTopics::Names(vec![topic.to_string()]),
        group_id: group.to_string(),
        required_topics: vec![topic.to_string()],
        dead_letters: DeadLetterTopic::Suffix(".dlq".into()),
        policy: OffsetPolicy::AckedPrefix,
        drain_timeout: Duration::from_secs(10),
        tick: Duration::from_millis(100),
        max_record_bytes: 1_000_000,
    }
}

/// The consumer must poll at least every `max.poll.interval.ms` or it leaves the group; a stage
/// waiting out its dependency by blocking would be dropped and its partitions reassigned. The
/// runtime holds the record, pauses the partitions and keeps polling instead.
#[tokio::test(flavor = "multi_thread")]
async fn a_dependency_down_for_twice_the_poll_interval_pauses_without_leaving_the_group() {
    let mut settings = common::settings();
    let topic = common::unique("runtime-down");
    let group = format!("{topic}-group");
    common::create_topic(&settings, &topic, 2).await;
    let records: Vec<(String, Vec<u8>)> = (0..100)
        .map(|i| (format!("k{}", i % 10), format!("record {i}").into_bytes()))
        .collect();
    common::produce_all(&settings, &topic, &records).await;

    // The smallest session the broker allows (6 s), and a poll interval just above it.
    let poll_interval = Duration::from_secs(7);
    for (key, value) in [
        ("session.timeout.ms", "6000"),
        ("max.poll.interval.ms", "7000"),
    ] {
        settings
            .kafka
            .properties
            .insert(key.to_string(), value.to_string());
    }
    let hooks = Arc::new(CountingHooks::default());
    let handled: Arc<Mutex<Vec<(i32, i64)>>> = Arc::default();
    let attempts_while_down = Arc::new(AtomicUsize::new(0));
    let shutdown = CancellationToken::new();
    let running = {
        let (kafka, hooks, handled, attempts, shutdown, spec) = (
            settings.kafka.clone(),
            hooks.clone(),
            handled.clone(),
            attempts_while_down.clone(),
            shutdown.clone(),
            spec(&topic, &group),
        );
        tokio::spawn(async move {
            stage::run(&kafka, spec, hooks, Readiness::default(), shutdown, |_| {
                DownThenUp {
                    up_at: Instant::now() + 2 * poll_interval + Duration::from_secs(1),
                    attempts_while_down: attempts,
                    handled,
                }
            })
            .await
            .map(|_| ())
        })
    };

    common::wait_until(
        Duration::from_secs(90),
        "every record handled after the outage",
        async || {
            let count = handled.lock().unwrap().len();
            if count == records.len() {
                Ok(())
            } else {
                Err(format!("{count} handled"))
            }
        },
    )
    .await;
    common::wait_for_committed_end(&settings, &group, &topic, Duration::from_secs(30)).await;
    shutdown.cancel();
    running.await.unwrap().expect("the stage stops cleanly");

    assert!(
        attempts_while_down.load(Ordering::SeqCst) > 1,
        "the held record was retried during the outage"
    );
    assert_eq!(
        (
            hooks.assigned.load(Ordering::SeqCst),
            hooks.revoked.load(Ordering::SeqCst)
        ),
        (2, 2),
        "both partitions assigned once and revoked only at the stop: the member never left the group"
    );
    // Every record once, in offset order per partition.
    let handled = handled.lock().unwrap().clone();
    for partition in 0..2 {
        let offsets: Vec<i64> = handled
            .iter()
            .filter(|(p, _)| *p == partition)
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(
            offsets,
            (0..offsets.len() as i64).collect::<Vec<_>>(),
            "partition {partition}"
        );
    }
}

/// Two log stages in one process (each built and run until its token is cancelled) share the
/// work of one group: every event is indexed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn two_log_stages_in_one_process_share_the_work() {
    let settings = common::settings();
    let topic = common::unique("runtime-revoke");
    let group = format!("{topic}-group");
    let prefix = common::unique("runtime-revoke-idx");
    common::create_topic(&settings, &topic, 4).await;
    common::create_topic(&settings, &format!("{topic}.dlq"), 1).await;
    let total = 4000;
    let records: Vec<es::TestRecord> = (0..total)
        .map(|i| es::TestRecord {
            key: i.to_string(),
            value: serde_json::to_vec(&json!({"service": "lk", "action": "create_user",
                "payload": {"message": format!("event {i}"), "timestamp": "2024-05-01T12:00:00",
                "data": {"i": i}}}))
            .unwrap(),
            headers: vec![],
        })
        .collect();
    es::produce_records(&settings, &topic, &records).await;

    let drain_timeout_secs = 30;
    let args = |topic: &str| eventpipe::log::LogArgs {
        input_topic: Some(topic.to_string()),
        group_id: Some(group.clone()),
        index_pattern: Some(format!("{prefix}-%Y.%m.%d")),
        template_name: Some(prefix.clone()),
        batch_size: Some(200),
        flush_interval_ms: Some(50),
        drain_timeout_secs: Some(drain_timeout_secs),
        ..Default::default()
    };
    // A log stage in this process, until its token is cancelled.
    let spawn = |args: eventpipe::log::LogArgs, stop: CancellationToken| {
        let settings = settings.clone();
        tokio::spawn(async move {
            let log = eventpipe::log::LogSettings::load(&args, &settings)?;
            eventpipe::log::run(&settings, log, Readiness::default(), stop).await
        })
    };
    let first_stop = CancellationToken::new();
    let first = spawn(args(&topic), first_stop.clone());
    let indices = format!("{prefix}-*");
    es::wait_for_count(&settings, &indices, 1, Duration::from_secs(60)).await;
    // A second member joins: the first is revoked while its indexer holds batches.
    let second_stop = CancellationToken::new();
    let second = spawn(args(&topic), second_stop.clone());
    common::wait_for_committed_end(&settings, &group, &topic, Duration::from_secs(90)).await;
    assert_eq!(
        es::count(&settings, &indices, json!({"match_all": {}})).await,
        total as u64,
        "every event indexed once"
    );
    first_stop.cancel();
    second_stop.cancel();
    first.await.unwrap().expect("first member stops cleanly");
    second.await.unwrap().expect("second member stops cleanly");
}

/// Takes records into a sink task of its own (as the log stage's indexer) that acknowledges
/// them once `gate` is open; `outstanding` counts what it holds.
struct HandOff {
    sink: tokio::sync::mpsc::UnboundedSender<(PartitionId, i64)>,
    outstanding: Arc<AtomicUsize>,
}

impl HandOff {
    fn start(
        io: stage::StageIo,
        gate: tokio::sync::watch::Receiver<bool>,
        outstanding: Arc<AtomicUsize>,
        acknowledged: Arc<Mutex<Vec<(i32, i64)>>>,
    ) -> HandOff {
        let (sink, mut records) = tokio::sync::mpsc::unbounded_channel::<(PartitionId, i64)>();
        let held = outstanding.clone();
        tokio::spawn(async move {
            let mut gate = gate;
            while let Some((partition, offset)) = records.recv().await {
                let _ = gate.wait_for(|open| *open).await;
                io.acks.ack(&partition, offset);
                acknowledged
                    .lock()
                    .unwrap()
                    .push((partition.partition, offset));
                held.fetch_sub(1, Ordering::SeqCst);
            }
        });
        HandOff { sink, outstanding }
    }
}

impl Stage for HandOff {
    async fn handle(&mut self, record: &Record<'_>) -> Result<Handled, StageError> {
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        let _ = self.sink.send((record.partition_id(), record.offset));
        Ok(Handled::Pending)
    }
}

/// A revocation waits for the sink's outstanding records, and says when it starts waiting.
struct DrainHooks {
    outstanding: Arc<AtomicUsize>,
    draining: Arc<tokio::sync::Notify>,
}

impl PartitionHooks for DrainHooks {
    fn outstanding(&self, _: &[PartitionId]) -> Option<usize> {
        self.draining.notify_one();
        Some(self.outstanding.load(Ordering::SeqCst))
    }
}

/// A revocation waits (bounded) for work the stage's own task holds. With one worker thread, a
/// drain that slept on the worker (as the log stage's did) kept that task from running, so it
/// always burned its whole timeout. The runtime waits off the worker: the task finishes the
/// work, the drain ends, and the rebalance completes long before the drain timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_revocation_drain_lets_the_stages_own_tasks_run_on_a_single_worker() {
    let settings = common::settings();
    let topic = common::unique("runtime-drain");
    let group = format!("{topic}-group");
    common::create_topic(&settings, &topic, 2).await;
    let records: Vec<(String, Vec<u8>)> = (0..200)
        .map(|i| (format!("k{i}"), format!("record {i}").into_bytes()))
        .collect();
    common::produce_all(&settings, &topic, &records).await;

    let drain_timeout = Duration::from_secs(120);
    let acknowledged: Arc<Mutex<Vec<(i32, i64)>>> = Arc::default();
    let start = |gate: tokio::sync::watch::Receiver<bool>,
                 draining: Arc<tokio::sync::Notify>,
                 stop: CancellationToken| {
        let outstanding = Arc::new(AtomicUsize::new(0));
        let hooks = Arc::new(DrainHooks {
            outstanding: outstanding.clone(),
            draining,
        });
        let kafka = settings.kafka.clone();
        let spec = StageSpec {
            drain_timeout,
            ..spec(&topic, &group)
        };
        let acknowledged = acknowledged.clone();
        let held = outstanding.clone();
        let handle = tokio::spawn(async move {
            stage::run(&kafka, spec, hooks, Readiness::default(), stop, |io| {
                HandOff::start(io, gate, held, acknowledged)
            })
            .await
            .map(|_| ())
        });
        (handle, outstanding)
    };
    // The first member holds everything it takes until its gate opens.
    let (open_first, first_gate) = tokio::sync::watch::channel(false);
    let first_draining = Arc::new(tokio::sync::Notify::new());
    let first_stop = CancellationToken::new();
    let (first, first_holds) = start(first_gate, first_draining.clone(), first_stop.clone());
    common::wait_until(
        Duration::from_secs(60),
        "the first member to hold every record",
        async || match first_holds.load(Ordering::SeqCst) {
            held if held == records.len() => Ok(()),
            held => Err(format!("{held} held")),
        },
    )
    .await;
    // A second member joins (its gate always open): the first is revoked while holding work.
    let (_open_second, second_gate) = tokio::sync::watch::channel(true);
    let second_stop = CancellationToken::new();
    let (second, _) = start(
        second_gate,
        Arc::new(tokio::sync::Notify::new()),
        second_stop.clone(),
    );
    // The first member's drain has begun; its sink task can finish only if the drain lets it run.
    first_draining.notified().await;
    open_first.send(true).unwrap();
    // Well below the drain timeout: a drain stalling the only worker would still be waiting.
    common::wait_for_committed_end(&settings, &group, &topic, Duration::from_secs(60)).await;
    first_stop.cancel();
    second_stop.cancel();
    first.await.unwrap().expect("first member stops cleanly");
    second.await.unwrap().expect("second member stops cleanly");
    let mut handled = acknowledged.lock().unwrap().clone();
    handled.sort_unstable();
    handled.dedup();
    assert_eq!(handled.len(), records.len(), "every record acknowledged");
}
