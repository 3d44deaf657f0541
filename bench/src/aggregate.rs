//! The aggregate benchmark: `eventpipe aggregate` over a preloaded backlog of events (per window
//! size) next to a raw consume of the same topic, the window engine alone in memory, and checks.
//!
//! Event times are synthetic (a fixed step per event), so the windows a run creates do not depend
//! on how fast the preload went; the same events feed the in-memory engine run and the checks.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use eventpipe::aggregate::event::Event;
use eventpipe::aggregate::window::{Emission, Engine, EngineConfig, Outcome};
use eventpipe::aggregate::{AggregateArgs, AggregateSettings};
use eventpipe::config::Settings;
use eventpipe::generate::{Generator, TrafficKind};
use eventpipe::kafka::client::client_config;
use eventpipe::kafka::ClientKind;
use eventpipe::stage::PartitionId;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use crate::measure::{
    cpu_seconds, kill, peak_rss_mib, scrape, send_waiting, start_stage, thread_cpu_seconds,
    wait_for_metric, BenchResult, BenchTopics,
};

/// Event time advances 10 µs per event (100,000 events per second of event time): 10 M events
/// span 100 s, so 100 one-second windows and two or three 60-second ones per series.
const EVENT_TIME_STEP_US: i64 = 10;
/// The stage emits a quiet partition's windows after this long (its default is 30 s). Once the
/// backlog is consumed, the last windows wait for it: it bounds the run, not the throughput.
/// Not shorter: on a loaded machine a partition can go a second without being fetched, its
/// windows close early and are re-emitted when its next events arrive (correct, but extra work).
const IDLE_TIMEOUT_MS: u64 = 5_000;
/// The output is complete when the emitted count has not moved for this long after the idle
/// timeout could have closed the last windows (emissions are written every 200 ms).
const SETTLED: Duration = Duration::from_secs(2);
/// How often the stage writes closed windows (pipeline's EMIT_INTERVAL); the in-memory run
/// takes emissions at the same pace so the engine does the same bookkeeping.
const EMIT_INTERVAL: Duration = Duration::from_millis(200);
/// Upper bound of `--events`: 100 M decoded events take roughly 10 GiB in this process.
const MAX_EVENTS: u64 = 100_000_000;
/// Longest wait for any phase; a run that gets stuck fails instead of hanging.
const PHASE_TIMEOUT: Duration = Duration::from_secs(1800);

/// `eventpipe-bench aggregate`: the backlog and the window sizes to run the stage with.
#[derive(Debug, clap::Args)]
pub struct AggregateBenchOptions {
    #[arg(long, default_value_t = 10_000_000)]
    pub events: u64,
    /// Distinct series names (each with one of count, sum, avg, min, max).
    #[arg(long, default_value_t = 10_000)]
    pub series: u64,
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// Window sizes in seconds (tumbling), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,60")]
    pub windows: Vec<u64>,
}

/// One preloaded event and the partition it was written to.
type Preloaded = Vec<(i32, Event)>;
/// (name, window start ms) → events in that window: what the emitted counts must add up to.
type Counts<'a> = HashMap<(&'a str, i64), u64>;
/// The same, as read back from an output.
type Observed = HashMap<(String, i64), u64>;

/// Runs every aggregate workload; results: the engine alone, the raw consume, then the stage.
/// `eventpipe` is the binary whose `aggregate` is measured.
pub async fn run(
    settings: &Settings,
    eventpipe: &Path,
    options: AggregateBenchOptions,
) -> anyhow::Result<Vec<BenchResult>> {
    // The events are also kept decoded in memory: some 100 bytes each, with the checks' maps.
    anyhow::ensure!(
        (1..=MAX_EVENTS).contains(&options.events),
        "--events must be between 1 and {MAX_EVENTS}"
    );
    anyhow::ensure!(options.series > 0, "--series must be at least 1");
    anyhow::ensure!(options.partitions > 0, "--partitions must be at least 1");
    anyhow::ensure!(
        !options.windows.is_empty() && options.windows.iter().all(|w| *w > 0),
        "--windows must list window sizes of at least 1 second"
    );
    let base = format!("bench-agg-{}", chrono::Utc::now().format("%Y%m%d%H%M%S"));
    let input = format!("{base}-in");
    let mut topics = vec![
        (input.clone(), options.partitions),
        (format!("{input}.dlq"), 1),
        (format!("{base}-metrics"), 1),
    ];
    for window in &options.windows {
        topics.push((format!("{base}-out{window}s"), options.partitions));
    }
    let bench_topics = BenchTopics::create(&settings.kafka, &topics).await?;
    let outcome = workloads(settings, eventpipe, &options, &base, &input).await;
    bench_topics.delete().await;
    outcome
}

async fn workloads(
    settings: &Settings,
    eventpipe: &Path,
    options: &AggregateBenchOptions,
    base: &str,
    input: &str,
) -> anyhow::Result<Vec<BenchResult>> {
    let n = options.events;
    let events = preload(settings, input, options)?;
    let mut results = Vec::new();
    let mut failed_checks = Vec::new();
    let mut check = |what: String, expected: &Counts<'_>, observed: &Observed| {
        let verdict = verify(expected, observed, n);
        // On stdout, so scripts/bench saves it next to the figures.
        println!("# check {what}: {verdict}");
        if !verdict.ok() {
            failed_checks.push(what);
        }
    };

    let mut expected = Vec::new();
    for window in &options.windows {
        let config = engine_config(settings, *window)?;
        expected.push(expected_counts(&events, &config));
    }
    for (window, expected) in options.windows.iter().zip(&expected) {
        eprintln!("window engine alone, {window} s windows, {n} events in memory");
        let config = engine_config(settings, *window)?;
        let (result, observed) = engine_run(&events, config, options.partitions, input, *window);
        results.push(result);
        check(format!("engine, {window} s windows"), expected, &observed);
    }

    eprintln!("baseline: raw consume of {input}");
    let baseline = raw_consume(settings, input, &format!("{base}-raw"), n)?;
    let baseline_rate = baseline.records_per_second;
    results.push(baseline);

    for (window, expected) in options.windows.iter().zip(&expected) {
        eprintln!("eventpipe aggregate, {window} s windows, over the {n}-event backlog");
        let output = format!("{base}-out{window}s");
        let mut staged = stage_run(
            settings,
            &StageRun {
                eventpipe,
                input,
                output: &output,
                metrics_topic: &format!("{base}-metrics"),
                group: &format!("{base}-{window}s"),
                window_secs: *window,
                events: n,
                aggregates: expected.len() as u64,
            },
        )
        .await?;
        staged.ratio_to_baseline = Some(staged.records_per_second / baseline_rate);
        results.push(staged);
        let observed = read_aggregates(settings, &output, options.partitions)?;
        check(
            format!("eventpipe aggregate, {window} s windows"),
            expected,
            &observed,
        );
    }
    if !failed_checks.is_empty() {
        crate::measure::report(&results);
        anyhow::bail!(
            "the aggregates do not add up to the events: {}",
            failed_checks.join(", ")
        );
    }
    Ok(results)
}

/// The engine configuration the stage resolves for this window size with the benchmark's flags.
fn engine_config(settings: &Settings, window_secs: u64) -> anyhow::Result<EngineConfig> {
    let args = AggregateArgs {
        aggregation_interval: Some(window_secs.to_string()),
        idle_timeout_ms: Some(IDLE_TIMEOUT_MS),
        ..Default::default()
    };
    Ok(AggregateSettings::load(&args, settings)?.pipeline.engine)
}

/// Stable partition of a series name, so the engine run partitions exactly as the topic does.
fn partition_of(name: &str, partitions: i32) -> i32 {
    // FNV-1a: deterministic across runs and processes (std's hasher is randomly seeded).
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % partitions as u64) as i32
}

/// Counts delivery reports: the preload must know every record landed.
#[derive(Default)]
struct Deliveries {
    delivered: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.delivered.fetch_add(1, Ordering::Relaxed),
            Err((error, _)) => {
                if self.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(%error, "preload record not delivered");
                }
                1
            }
        };
    }
}

/// Writes the events to `topic` (explicit partitions, large lz4 batches) and returns them decoded.
fn preload(
    settings: &Settings,
    topic: &str,
    options: &AggregateBenchOptions,
) -> anyhow::Result<Preloaded> {
    let n = options.events;
    eprintln!(
        "preloading {n} events ({} series, count/sum/avg/min/max) into {topic}",
        options.series
    );
    let mut config = client_config(&settings.kafka, ClientKind::Producer);
    // Throughput over latency for the preload only: big batches, a deep queue, lz4 (default).
    config
        .set("linger.ms", "50")
        .set("batch.size", "1000000")
        .set("batch.num.messages", "100000")
        .set("queue.buffering.max.messages", "1000000");
    let producer: ThreadedProducer<Deliveries> =
        config.create_with_context(Deliveries::default())?;
    let mut generator = Generator::new(TrafficKind::Events, 1, 1, options.series, None);
    // Whole minutes, so 60-second windows line up with the start of the data.
    let start_us = (Utc::now().timestamp() / 60 - 60) * 60 * 1_000_000;
    let mut events = Vec::with_capacity(usize::try_from(n)?);
    let started = Instant::now();
    for i in 0..n {
        let time = DateTime::from_timestamp_micros(start_us + i as i64 * EVENT_TIME_STEP_US)
            .ok_or_else(|| anyhow::anyhow!("event time out of range"))?;
        let record = generator.next_record(time);
        let event = Event::decode(&record.value)?;
        let partition = partition_of(&event.name, options.partitions);
        send_waiting(
            &producer,
            BaseRecord::to(topic)
                .partition(partition)
                .key(record.key.as_bytes())
                .payload(record.value.as_slice()),
        )?;
        events.push((partition, event));
        if (i + 1) % 1_000_000 == 0 {
            eprintln!(
                "  preloaded {} / {n} ({:.0} events/s)",
                i + 1,
                (i + 1) as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    producer.flush(Duration::from_secs(300))?;
    let context = producer.context();
    let (delivered, failed) = (
        context.delivered.load(Ordering::Relaxed),
        context.failed.load(Ordering::Relaxed),
    );
    anyhow::ensure!(
        delivered == n && failed == 0,
        "preload: {delivered} of {n} delivered, {failed} failed"
    );
    eprintln!(
        "  preloaded {n} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(events)
}

/// What each (series, window) must count, from the events themselves.
fn expected_counts<'a>(events: &'a Preloaded, config: &EngineConfig) -> Counts<'a> {
    let windows = Engine::new(config.clone());
    let mut counts = Counts::new();
    for (_, event) in events {
        for start in windows.window_starts(event.time_ms) {
            *counts.entry((event.name.as_str(), start)).or_default() += 1;
        }
    }
    counts
}

/// The outcome of comparing emitted aggregates (the latest per key) with the events.
struct Verdict {
    aggregates: usize,
    expected_aggregates: usize,
    counted: u64,
    events: u64,
    wrong: usize,
}

impl Verdict {
    fn ok(&self) -> bool {
        self.wrong == 0 && self.counted == self.events
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} aggregates (expected {}), their counts sum to {} (events: {}), {} with a wrong count: {}",
            self.aggregates,
            self.expected_aggregates,
            self.counted,
            self.events,
            self.wrong,
            if self.ok() { "ok" } else { "FAILED" }
        )
    }
}

/// Every key's count must equal the events in its window, and no key may be extra.
fn verify(expected: &Counts<'_>, observed: &Observed, events: u64) -> Verdict {
    let wrong_or_missing = expected
        .iter()
        .filter(|((name, start), count)| observed.get(&(name.to_string(), *start)) != Some(*count))
        .count();
    let extra = observed
        .keys()
        .filter(|(name, start)| !expected.contains_key(&(name.as_str(), *start)))
        .count();
    Verdict {
        aggregates: observed.len(),
        expected_aggregates: expected.len(),
        counted: observed.values().sum(),
        events,
        wrong: wrong_or_missing + extra,
    }
}

/// The window engine alone on the preloaded events, on its own thread (so its CPU time is the
/// engine's only): apply every event, take emissions at the stage's pace, then close everything
/// as the idle timeout would. Returns the result and the emitted counts.
fn engine_run(
    events: &Preloaded,
    config: EngineConfig,
    partitions: i32,
    topic: &str,
    window_secs: u64,
) -> (BenchResult, Observed) {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let idle_timeout = config.idle_timeout;
                let mut engine = Engine::new(config);
                let ids: Vec<PartitionId> = (0..partitions)
                    .map(|partition| PartitionId {
                        topic: topic.into(),
                        partition,
                    })
                    .collect();
                for id in &ids {
                    engine.assign(id.clone(), None);
                }
                let mut offsets = vec![0i64; ids.len()];
                let mut emitted: Vec<Emission> = Vec::new();
                let mut take = |engine: &mut Engine, now: Instant| {
                    let emissions = engine.take_emissions(now);
                    engine.acknowledge(&emissions);
                    emitted.extend(emissions);
                };
                let cpu_before = thread_cpu_seconds();
                let started = Instant::now();
                let (mut now, mut last_take) = (started, started);
                let mut rejected = 0u64;
                for (i, (partition, event)) in events.iter().enumerate() {
                    // The clock every 1024 events: cheap, and well under the emit interval.
                    if i % 1024 == 0 {
                        now = Instant::now();
                        if now - last_take >= EMIT_INTERVAL {
                            take(&mut engine, now);
                            last_take = now;
                        }
                    }
                    let p = *partition as usize;
                    if !matches!(
                        engine.apply(&ids[p], offsets[p], event, now),
                        Outcome::Accepted { .. }
                    ) {
                        rejected += 1;
                    }
                    offsets[p] += 1;
                }
                take(&mut engine, Instant::now() + idle_timeout);
                let seconds = started.elapsed().as_secs_f64();
                let cpu = thread_cpu_seconds()
                    .zip(cpu_before)
                    .map(|(after, before)| after - before);
                if rejected > 0 {
                    println!("# engine, {window_secs} s windows: {rejected} events rejected");
                }
                let observed: Observed = emitted
                    .into_iter()
                    .map(|e| ((e.name, e.window_start_ms), e.count))
                    .collect();
                let result = BenchResult::throughput(
                    "aggregate",
                    format!("window engine alone, {window_secs} s windows"),
                    events.len() as u64,
                    seconds,
                    cpu,
                    None,
                );
                (result, observed)
            })
            .join()
            // The engine asserts only on its configuration, which `resolve` validated.
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The baseline: an rdkafka consumer with the stage's client settings reading every record of
/// the topic and touching its payload, timed like the stage, from creation to the last record.
fn raw_consume(
    settings: &Settings,
    topic: &str,
    group: &str,
    n: u64,
) -> anyhow::Result<BenchResult> {
    let cpu_before = cpu_seconds(std::process::id());
    let started = Instant::now();
    let mut config = client_config(&settings.kafka, ClientKind::Consumer);
    config.set("group.id", group);
    let consumer: BaseConsumer = config.create()?;
    consumer.subscribe(&[topic])?;
    let deadline = started + PHASE_TIMEOUT;
    let (mut read, mut bytes) = (0u64, 0u64);
    while read < n {
        anyhow::ensure!(Instant::now() < deadline, "raw consume read {read} of {n}");
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        bytes += message?.payload().map_or(0, |p| p.len() as u64);
        read += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(std::process::id())
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    eprintln!("  read {read} records, {bytes} payload bytes");
    Ok(BenchResult {
        ratio_to_baseline: Some(1.0),
        ..BenchResult::throughput("aggregate", "baseline: raw consume", n, seconds, cpu, None)
    })
}

/// One run of the stage over the backlog.
struct StageRun<'a> {
    /// The eventpipe binary to run `aggregate` of.
    eventpipe: &'a Path,
    input: &'a str,
    output: &'a str,
    metrics_topic: &'a str,
    group: &'a str,
    window_secs: u64,
    events: u64,
    /// Distinct (series, window) aggregates the events make.
    aggregates: u64,
}

/// After the backlog is consumed: waits until the idle timeout has passed and the emitted count
/// has been still for `SETTLED`; returns the count and when it last moved. The count cannot be
/// compared with the distinct aggregates: re-emitted windows count again.
async fn wait_for_last_emission(
    child: &mut std::process::Child,
    port: u16,
    consumed: Instant,
) -> anyhow::Result<Option<(f64, Instant)>> {
    let http = reqwest::Client::new();
    let earliest = consumed + Duration::from_millis(IDLE_TIMEOUT_MS);
    let deadline = earliest + Duration::from_secs(120);
    let mut last: Option<(f64, Instant)> = None;
    while Instant::now() < deadline {
        if let Some(emitted) =
            scrape(&http, port, &["eventpipe_aggregate_emitted_windows_total"]).await
        {
            let now = Instant::now();
            match last {
                Some((previous, since)) if previous == emitted => {
                    if now >= earliest && now - since >= SETTLED {
                        return Ok(last);
                    }
                }
                _ => last = Some((emitted, now)),
            }
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the stage exited early ({status})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(None)
}

/// The real `eventpipe aggregate` as a child process, timed from start until its /metrics count
/// every event as aggregated (or dead-lettered): the consume rate, comparable with the baseline.
/// Closed windows are written along the way; the run then waits for the last windows (the idle
/// timeout closes them) so the output can be checked, and reports that time separately.
async fn stage_run(settings: &Settings, run: &StageRun<'_>) -> anyhow::Result<BenchResult> {
    let started = Instant::now();
    let (mut child, port) = start_stage(
        run.eventpipe,
        &settings.kafka,
        &[
            "aggregate",
            "--storage-type",
            "kafka",
            "--kafka-topic",
            run.output,
            "--aggregation-interval",
            &run.window_secs.to_string(),
            "--input-topic",
            run.input,
            "--group-id",
            run.group,
            "--metrics-topic",
            run.metrics_topic,
            "--idle-timeout-ms",
            &IDLE_TIMEOUT_MS.to_string(),
        ],
    )?;
    let pid = child.id();
    let consumed = wait_for_metric(
        &mut child,
        port,
        &[
            "eventpipe_aggregate_aggregated_events_total",
            "eventpipe_aggregate_failed_events_total",
        ],
        run.events as f64,
        PHASE_TIMEOUT,
    )
    .await;
    let cpu = cpu_seconds(pid);
    let written = match &consumed {
        Ok(Some(consumed)) => wait_for_last_emission(&mut child, port, *consumed).await,
        _ => Ok(None),
    };
    let rss = peak_rss_mib(pid);
    kill(child);
    let consumed =
        consumed?.ok_or_else(|| anyhow::anyhow!("the stage did not consume the backlog"))?;
    match written? {
        Some((emitted, written)) => println!(
            "# eventpipe aggregate, {} s windows: backlog consumed after {:.2} s; last of {emitted} \
             emitted records ({} distinct aggregates, the rest re-emissions) written after {:.2} s \
             (the last windows close after the {IDLE_TIMEOUT_MS} ms idle timeout)",
            run.window_secs,
            (consumed - started).as_secs_f64(),
            run.aggregates,
            (written - started).as_secs_f64()
        ),
        None => println!(
            "# eventpipe aggregate, {} s windows: the emitted count did not settle",
            run.window_secs
        ),
    }
    Ok(BenchResult::throughput(
        "aggregate",
        format!("eventpipe aggregate, {} s windows", run.window_secs),
        run.events,
        (consumed - started).as_secs_f64(),
        cpu,
        rss,
    ))
}

/// Reads an output topic from the beginning to its end; the latest record per key wins, as an
/// upserting reader would keep it (a window re-emitted after late events replaces its first).
fn read_aggregates(settings: &Settings, topic: &str, partitions: i32) -> anyhow::Result<Observed> {
    let mut config = client_config(&settings.kafka, ClientKind::Consumer);
    // librdkafka wants a group even for a manual assignment; nothing is committed.
    config.set("group.id", format!("{topic}-check"));
    let consumer: BaseConsumer = config.create()?;
    let mut assignment = TopicPartitionList::new();
    let mut remaining = 0usize;
    let mut ends = HashMap::new();
    for partition in 0..partitions {
        let (_, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
        if high > 0 {
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
            ends.insert(partition, high);
            remaining += 1;
        }
    }
    let mut observed = Observed::new();
    if remaining == 0 {
        return Ok(observed);
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + PHASE_TIMEOUT;
    while remaining > 0 {
        anyhow::ensure!(Instant::now() < deadline, "reading {topic} timed out");
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        let record: serde_json::Value =
            serde_json::from_slice(message.payload().unwrap_or_default())?;
        let name = record["name"].as_str().unwrap_or_default().to_string();
        let start = record["window_start"]
            .as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map_or(i64::MIN, |t| t.timestamp_millis());
        let count = record["count"].as_u64().unwrap_or(0);
        observed.insert((name, start), count);
        if ends.get(&message.partition()) == Some(&(message.offset() + 1)) {
            remaining -= 1;
        }
    }
    Ok(observed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_in_range() {
        for name in ["metric_00000", "metric_09999", "x"] {
            let p = partition_of(name, 6);
            assert!((0..6).contains(&p));
            assert_eq!(p, partition_of(name, 6));
        }
        assert_eq!(partition_of("anything", 1), 0);
    }

    fn event(name: &str, time_ms: i64) -> Event {
        Event {
            name: name.into(),
            function: eventpipe::aggregate::function::Function::Count,
            value: 0.0,
            time_ms,
            record_ms: None,
        }
    }

    #[test]
    fn verify_requires_every_count_and_nothing_extra() {
        let config = EngineConfig {
            size_ms: 1000,
            advance_ms: 1000,
            allowed_lateness_ms: 0,
            grace_ms: 0,
            idle_timeout: Duration::from_secs(1),
            max_open_windows: 100,
        };
        let events: Preloaded = vec![
            (0, event("a", 100)),
            (0, event("a", 900)),
            (0, event("a", 1100)),
            (0, event("b", 100)),
        ];
        let expected = expected_counts(&events, &config);
        assert_eq!(expected[&("a", 0)], 2);
        let mut observed: Observed = [
            (("a".to_string(), 0), 2),
            (("a".to_string(), 1000), 1),
            (("b".to_string(), 0), 1),
        ]
        .into();
        assert!(verify(&expected, &observed, 4).ok());
        observed.insert(("a".to_string(), 0), 1);
        assert!(!verify(&expected, &observed, 4).ok());
        observed.insert(("a".to_string(), 0), 2);
        observed.insert(("c".to_string(), 0), 0);
        assert!(!verify(&expected, &observed, 4).ok());
    }

    #[test]
    fn the_engine_run_counts_every_event() {
        let config = EngineConfig {
            size_ms: 1000,
            advance_ms: 1000,
            allowed_lateness_ms: 2000,
            grace_ms: 60_000,
            idle_timeout: Duration::from_millis(1),
            max_open_windows: 1000,
        };
        let events: Preloaded = (0..5000)
            .map(|i| {
                let name = format!("s{}", i % 7);
                (partition_of(&name, 3), event(&name, i64::from(i)))
            })
            .collect();
        let expected = expected_counts(&events, &config);
        let (result, observed) = engine_run(&events, config, 3, "t", 1);
        assert_eq!(result.records, 5000);
        assert!(verify(&expected, &observed, 5000).ok());
    }
}
