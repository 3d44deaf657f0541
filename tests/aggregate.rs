//! `eventpipe aggregate` on the real stack: with either sink, every window equals an independent
//! offline computation over the same input — with out-of-order, late, too-late and bad events,
//! the idle-timeout flush, a kill -9 and restart, and three instances with one killed mid-run.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::StageProcess;
use eventpipe::codec::{Codec, SchemaName};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Event times start here (2024-05-01T12:00:00Z): windows are the same in every run.
const T0_MS: i64 = 1_714_564_800_000;
const EXACT: [&str; 5] = ["count", "sum", "avg", "min", "max"];
const WITH_PERCENTILES: [&str; 8] = ["count", "sum", "avg", "min", "max", "p50", "p90", "p99"];
/// The documented bound of the percentile sketch.
const PERCENTILE_RELATIVE_ERROR: f64 = 0.01;

/// (name, function, window start ms) → (value, count).
type Table = BTreeMap<(String, String, i64), (f64, i64)>;

#[derive(Debug, Clone)]
struct TestEvent {
    name: String,
    function: &'static str,
    value: f64,
    time_ms: i64,
}

impl TestEvent {
    fn record(&self) -> (String, Vec<u8>) {
        let time = chrono::DateTime::from_timestamp_millis(self.time_ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let body = json!({"name": self.name, "function": self.function, "value": self.value, "timestamp": time});
        (self.name.clone(), serde_json::to_vec(&body).unwrap())
    }
}

/// `count` events over `series` names spread evenly over `span_ms`, each up to `jitter_ms` out
/// of order; values have two decimals.
fn generate(
    functions: &[&'static str],
    seed: u64,
    count: usize,
    series: usize,
    span_ms: i64,
    jitter_ms: i64,
) -> Vec<TestEvent> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let s = rng.random_range(0..series);
            TestEvent {
                name: format!("series_{s}"),
                function: functions[rng.random_range(0..functions.len())],
                value: rng.random_range(0..100_000) as f64 / 100.0,
                time_ms: T0_MS
                    + span_ms * i as i64 / count as i64
                    + rng.random_range(0..=jitter_ms),
            }
        })
        .collect()
}

/// The exact sum, computed independently of the stage: every f64 input is an integer multiple
/// of 2^-60 here, so i128 arithmetic is exact and `as f64` rounds once, to nearest-even.
fn exact_sum(values: &[f64]) -> f64 {
    let scaled: i128 = values
        .iter()
        .map(|v| {
            let bits = v.to_bits();
            let exponent = ((bits >> 52) & 0x7ff) as i32;
            let mantissa =
                (bits & ((1 << 52) - 1)) as i128 | if exponent == 0 { 0 } else { 1 << 52 };
            let shift = exponent.max(1) - 1075 + 60;
            assert!(
                *v == 0.0 || shift >= 0,
                "value {v} too small for the test's fixed point"
            );
            let shift = shift.max(0);
            let magnitude = mantissa << shift;
            if v.is_sign_negative() {
                -magnitude
            } else {
                magnitude
            }
        })
        .sum();
    scaled as f64 * 2f64.powi(-60)
}

/// What the aggregates must be: each function computed offline over the events' windows.
fn offline(events: &[TestEvent], size_ms: i64, advance_ms: i64) -> Table {
    let mut groups: BTreeMap<(String, String, i64), Vec<f64>> = BTreeMap::new();
    for e in events {
        let mut start = e.time_ms.div_euclid(advance_ms) * advance_ms;
        while start + size_ms > e.time_ms {
            groups
                .entry((e.name.clone(), e.function.to_string(), start))
                .or_default()
                .push(e.value);
            start -= advance_ms;
        }
    }
    groups
        .into_iter()
        .map(|(key, values)| {
            let count = values.len() as i64;
            let value = match key.1.as_str() {
                "count" => count as f64,
                "sum" => exact_sum(&values),
                "avg" => exact_sum(&values) / count as f64,
                "min" => values.iter().cloned().fold(f64::INFINITY, f64::min),
                "max" => values.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                percentile => {
                    // The exact value at rank ⌊q·(n−1)⌋, which the sketch approximates.
                    let q = percentile[1..].parse::<f64>().unwrap() / 100.0;
                    let mut sorted = values.clone();
                    sorted.sort_by(f64::total_cmp);
                    sorted[(q * (count - 1) as f64).floor() as usize]
                }
            };
            (key, (value, count))
        })
        .collect()
}

/// Same windows and counts; values equal, or for percentiles within the sketch's error bound.
fn matches(actual: &Table, expected: &Table) -> bool {
    actual.len() == expected.len()
        && expected
            .iter()
            .all(|(key, row)| actual.get(key).is_some_and(|a| row_matches(key, row, a)))
}

fn row_matches(key: &(String, String, i64), expected: &(f64, i64), actual: &(f64, i64)) -> bool {
    let ((value, count), (v, c)) = (expected, actual);
    c == count
        && if key.1.starts_with('p') {
            (v - value).abs() <= PERCENTILE_RELATIVE_ERROR * value.abs() * (1.0 + 1e-9)
        } else {
            v == value
        }
}

/// Fresh topics and group for one test.
struct Fixture {
    settings: eventpipe::config::Settings,
    input: String,
    output: String,
    metrics: String,
    group: String,
}

impl Fixture {
    async fn new() -> Fixture {
        let settings = common::settings();
        let base = common::unique("aggregate");
        let fixture = Fixture {
            input: format!("{base}-in"),
            output: format!("{base}-out"),
            metrics: format!("{base}-metrics"),
            group: format!("{base}-group"),
            settings,
        };
        common::create_topic(&fixture.settings, &fixture.input, 6).await;
        common::create_topic(&fixture.settings, &format!("{}.dlq", fixture.input), 1).await;
        common::create_topic(&fixture.settings, &fixture.output, 3).await;
        common::create_topic(&fixture.settings, &fixture.metrics, 1).await;
        fixture
    }

    /// Environment of a stage on this fixture: 1 s windows, 0.5 s lateness, 30 s grace, 2 s idle.
    fn env<'a>(&'a self, sink: &'a [(&'a str, String)]) -> Vec<(&'a str, String)> {
        let mut env: Vec<(&str, String)> = vec![
            ("AGGREGATION_INTERVAL", "1".into()),
            ("KAFKA_TOPIC", self.output.clone()),
            ("EVENTPIPE_AGGREGATE_INPUT_TOPIC", self.input.clone()),
            ("EVENTPIPE_AGGREGATE_GROUP_ID", self.group.clone()),
            ("EVENTPIPE_AGGREGATE_METRICS_TOPIC", self.metrics.clone()),
            ("EVENTPIPE_AGGREGATE_METRICS_INTERVAL_SECS", "1".into()),
            ("EVENTPIPE_AGGREGATE_ALLOWED_LATENESS_MS", "500".into()),
            ("EVENTPIPE_AGGREGATE_GRACE_MS", "30000".into()),
            ("EVENTPIPE_AGGREGATE_IDLE_TIMEOUT_MS", "2000".into()),
            ("EVENTPIPE_KAFKA_SESSION_TIMEOUT_MS", "6000".into()),
        ];
        env.extend(sink.iter().cloned());
        env
    }

    fn start(&self, sink: &[(&str, String)], extra: &[(&str, String)]) -> StageProcess {
        let mut env = self.env(sink);
        env.extend(extra.iter().cloned());
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        StageProcess::start(&["aggregate"], &env)
    }

    async fn produce(&self, events: &[TestEvent]) {
        self.produce_as(events, None).await;
    }

    /// Produces the events as JSON, or encoded with `codec` (Avro).
    async fn produce_as(&self, events: &[TestEvent], codec: Option<&Codec>) {
        let mut records: Vec<_> = events.iter().map(TestEvent::record).collect();
        if let Some(codec) = codec {
            for (_, value) in &mut records {
                *value = codec.encode(&self.input, value.clone()).await.unwrap();
            }
        }
        for chunk in records.chunks(5000) {
            common::produce_all(&self.settings, &self.input, chunk).await;
        }
    }
}

/// A fresh database and the sink environment pointing at it.
async fn postgres_sink(
    settings: &eventpipe::config::Settings,
) -> (sqlx::PgPool, Vec<(&'static str, String)>) {
    let (pool, url) = common::fresh_database_url(settings).await;
    let env = vec![
        ("STORAGE_TYPE", "postgres".to_string()),
        ("POSTGRES_CONNECTION_STRING", url),
    ];
    (pool, env)
}

async fn read_table(pool: &sqlx::PgPool) -> Table {
    let rows: Vec<(String, String, chrono::DateTime<chrono::Utc>, f64, i64)> =
        sqlx::query_as("SELECT name, function, window_start, value, count FROM events_aggregated")
            .fetch_all(pool)
            .await
            .unwrap_or_default(); // the table appears when the stage has migrated
    rows.into_iter()
        .map(|(n, f, s, v, c)| ((n, f, s.timestamp_millis()), (v, c)))
        .collect()
}

/// Polls the table until it equals `expected`; on timeout fails showing the first difference.
async fn wait_for_table(
    pool: &sqlx::PgPool,
    expected: &Table,
    timeout: Duration,
    stage_log: impl Fn() -> String,
) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let table = read_table(pool).await;
        if matches(&table, expected) {
            return;
        }
        if std::time::Instant::now() > deadline {
            report_difference(&table, expected, &stage_log());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn report_difference(actual: &Table, expected: &Table, log: &str) -> ! {
    let missing: Vec<_> = expected
        .iter()
        .filter(|(k, _)| !actual.contains_key(*k))
        .take(5)
        .collect();
    let wrong: Vec<_> = expected
        .iter()
        .filter_map(|(k, v)| {
            actual
                .get(k)
                .filter(|a| !row_matches(k, v, a))
                .map(|a| (k, v, a))
        })
        .take(5)
        .collect();
    let extra: Vec<_> = actual
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .take(5)
        .collect();
    let tail: String = log
        .lines()
        .rev()
        .take(30)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    panic!(
        "aggregates differ: {} rows vs {} expected\nmissing {missing:?}\nwrong (expected, actual) {wrong:?}\nextra {extra:?}\nstage log tail:\n{tail}",
        actual.len(),
        expected.len()
    );
}

/// Reads the output topic until the latest record per (name, function, window) equals `expected`.
async fn wait_for_topic(
    settings: &eventpipe::config::Settings,
    topic: &str,
    expected: &Table,
    timeout: Duration,
) {
    wait_for_topic_as(settings, topic, expected, timeout, None).await;
}

/// `wait_for_topic` for a topic whose records are decoded with `codec` (Avro).
async fn wait_for_topic_as(
    settings: &eventpipe::config::Settings,
    topic: &str,
    expected: &Table,
    timeout: Duration,
    codec: Option<&Codec>,
) {
    let consumer = common::consumer(settings, topic);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut table = Table::new();
    while !matches(&table, expected) {
        let Some(message) = common::next_message(&consumer, deadline).await else {
            report_difference(&table, expected, "");
        };
        let record = match codec {
            Some(codec) => common::avro_json(codec, &message).await,
            None => common::json(&message),
        };
        assert_eq!(
            common::key(&message),
            record["name"].as_str().unwrap(),
            "keyed by name"
        );
        let start =
            chrono::DateTime::parse_from_rfc3339(record["window_start"].as_str().unwrap()).unwrap();
        let end =
            chrono::DateTime::parse_from_rfc3339(record["window_end"].as_str().unwrap()).unwrap();
        assert!(end > start && record["emitted_at"].is_string());
        // Keyed by name: one partition per name, so the last record read is the latest emitted.
        table.insert(
            (
                record["name"].as_str().unwrap().to_string(),
                record["function"].as_str().unwrap().to_string(),
                start.timestamp_millis(),
            ),
            (
                record["value"].as_f64().unwrap(),
                record["count"].as_i64().unwrap(),
            ),
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_sink_is_exact_with_out_of_order_late_bad_events_and_idle_flush() {
    let fixture = Fixture::new().await;
    let (pool, sink) = postgres_sink(&fixture.settings).await;
    // 20 s of events up to 400 ms out of order (within the 500 ms allowed lateness).
    let mut events = generate(&EXACT, 1, 4000, 12, 20_000, 400);
    // Late but within grace: windows 2–4 s were emitted long before these arrive.
    let late = generate(&EXACT, 2, 200, 12, 3_000, 0)
        .into_iter()
        .map(|mut e| {
            e.time_ms += 2_000;
            e
        })
        .collect::<Vec<_>>();
    events.extend(late.iter().cloned());
    let expected = offline(&events, 1000, 1000);
    // The newest window closes only by the idle timeout: the watermark never passes its end.
    let newest = expected.keys().map(|k| k.2).max().unwrap();
    assert!(newest + 1000 > events.iter().map(|e| e.time_ms).max().unwrap() - 500);

    // Too late (an hour old, beyond the 30 s grace) and bad input: dead-lettered, not counted.
    let mut rejected: Vec<(String, Vec<u8>)> = generate(&EXACT, 3, 30, 12, 1000, 0)
        .into_iter()
        .map(|mut e| {
            e.time_ms -= 3_600_000;
            e.record()
        })
        .collect();
    let bad: [&[u8]; 5] = [
        br#"{"name":"series_1","function":"median","value":1,"timestamp":"2024-05-01T12:00:01Z"}"#,
        br#"{"name":"series_1","function":"sum","value":"abc","timestamp":"2024-05-01T12:00:01Z"}"#,
        br#"{"function":"sum","value":1,"timestamp":"2024-05-01T12:00:01Z"}"#,
        br#"{"name":"series_1","function":"sum","value":1}"#,
        b"{not json",
    ];
    rejected.extend(bad.iter().map(|b| ("series_1".to_string(), b.to_vec())));

    let stage = fixture.start(&sink, &[]);
    fixture.produce(&events[..4000]).await;
    // The late events must arrive after the windows they fall into were closed and written:
    // wait until each of those windows that has on-time events is in the table, with exactly
    // the on-time aggregate. Their rows must then change (the final table has the late events
    // in them) for the test to pass.
    let on_time = offline(&events[..4000], 1000, 1000);
    let late_windows = offline(&late, 1000, 1000);
    let written_before: Table = on_time
        .iter()
        .filter(|(key, _)| late_windows.contains_key(*key))
        .map(|(key, row)| (key.clone(), *row))
        .collect();
    assert!(
        written_before.len() > 10,
        "the late events hit emitted windows"
    );
    common::wait_until(
        Duration::from_secs(60),
        "the windows of the late events to be written",
        async || {
            let table = read_table(&pool).await;
            let written = written_before
                .iter()
                .filter(|(key, row)| table.get(*key).is_some_and(|a| row_matches(key, row, a)))
                .count();
            if written == written_before.len() {
                Ok(())
            } else {
                Err(format!("{written} of {} written", written_before.len()))
            }
        },
    )
    .await;
    fixture.produce(&events[4000..]).await;
    common::produce_all(&fixture.settings, &fixture.input, &rejected).await;

    wait_for_table(&pool, &expected, Duration::from_secs(60), || stage.log()).await;

    let dead = common::consume(
        &fixture.settings,
        &format!("{}.dlq", fixture.input),
        rejected.len(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(dead.len(), rejected.len());
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for message in &dead {
        let headers = common::headers(message);
        assert_eq!(headers["eventpipe.source.topic"], fixture.input);
        assert!(!headers["eventpipe.error.reason"].is_empty());
        *kinds
            .entry(headers["eventpipe.error.kind"].clone())
            .or_default() += 1;
    }
    let expected_kinds: BTreeMap<String, usize> = [
        ("late_event", 30),
        ("unknown_function", 1),
        ("non_numeric_value", 1),
        ("missing_field", 2),
        ("malformed_json", 1),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    assert_eq!(kinds, expected_kinds);

    let metrics = stage.metrics().await;
    let metric =
        |name: &str, labels: &[&str]| common::metric_value(&metrics, name, labels).unwrap_or(0.0);
    assert_eq!(
        metric("eventpipe_aggregate_aggregated_events_total", &[]),
        events.len() as f64
    );
    assert_eq!(
        metric(
            "eventpipe_aggregate_failed_events_total",
            &["reason=\"late_event\""]
        ),
        30.0
    );
    assert_eq!(
        metric(
            "eventpipe_aggregate_failed_events_total",
            &["reason=\"missing_field\""]
        ),
        2.0
    );
    // Every late event took the late path: behind its partition's watermark (the on-time events
    // before it in the partition moved it to ~20 s), within the grace, its window re-emitted.
    assert_eq!(
        metric(
            "eventpipe_aggregate_late_events_total",
            &["outcome=\"accepted\""]
        ),
        late.len() as f64
    );
    assert_eq!(
        metric(
            "eventpipe_aggregate_late_events_total",
            &["outcome=\"dead_lettered\""]
        ),
        30.0
    );
    // Emitted windows stay open (changeable) until the watermark passes their end + grace.
    assert!(metric("eventpipe_aggregate_open_windows", &[]) > 0.0);
    assert!(metrics.contains("eventpipe_aggregate_processing_seconds_bucket"));
    assert!(metrics.contains("eventpipe_aggregate_watermark_lag_seconds"));

    // The JSON metrics records, as the replaced service published them (cumulative counts).
    let consumer = common::consumer(&fixture.settings, &fixture.metrics);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let message = common::next_message(&consumer, deadline)
            .await
            .expect("a metrics record with the final counts");
        let record = common::json(&message);
        assert!(record["processing_time"].is_f64());
        if record["aggregated_events_count"] == json!(events.len())
            && record["failed_events_count"] == json!(rejected.len())
        {
            break;
        }
    }

    let (status, log) = stage.terminate();
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_sink_with_hopping_windows_is_exact() {
    let fixture = Fixture::new().await;
    let sink = [("STORAGE_TYPE", "kafka".to_string())];
    let events = generate(&WITH_PERCENTILES, 4, 3000, 8, 10_000, 300);
    let expected = offline(&events, 1000, 500);
    let stage = fixture.start(&sink, &[("EVENTPIPE_AGGREGATE_ADVANCE_MS", "500".into())]);
    fixture.produce(&events).await;
    wait_for_topic(
        &fixture.settings,
        &fixture.output,
        &expected,
        Duration::from_secs(60),
    )
    .await;
    let (status, log) = stage.terminate();
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn avro_in_and_out_is_exact() {
    let fixture = Fixture::new().await;
    common::register(&fixture.input, SchemaName::AggregateEvent).await;
    common::register(&fixture.output, SchemaName::Aggregate).await;
    common::register(&fixture.metrics, SchemaName::Metrics).await;
    let events = generate(&EXACT, 9, 2000, 6, 8_000, 200);
    let expected = offline(&events, 1000, 1000);
    fixture
        .produce_as(
            &events,
            Some(&common::avro_codec(SchemaName::AggregateEvent)),
        )
        .await;
    let stage = fixture.start(
        &[("STORAGE_TYPE", "kafka".to_string())],
        &[
            ("EVENTPIPE_INPUT_FORMAT", "avro".into()),
            ("EVENTPIPE_OUTPUT_FORMAT", "avro".into()),
        ],
    );
    wait_for_topic_as(
        &fixture.settings,
        &fixture.output,
        &expected,
        Duration::from_secs(60),
        Some(&common::avro_codec(SchemaName::Aggregate)),
    )
    .await;
    // The stage's own metrics records are Avro too, and count what it aggregated.
    let metrics_codec = common::avro_codec(SchemaName::Metrics);
    let records = common::consume(
        &fixture.settings,
        &fixture.metrics,
        1,
        Duration::from_secs(30),
    )
    .await;
    let record = common::avro_json(&metrics_codec, &records[0]).await;
    assert_eq!(record["service"], "eventpipe-aggregate");
    assert!(record["aggregated_events_count"].as_i64().is_some());
    // End-to-end latency: one observation per written aggregate, from its newest record's
    // Kafka timestamp (now-ish, unlike the 2024 event times) to the sink's acknowledgement.
    let metrics = stage.metrics().await;
    let emitted = common::metric_value(&metrics, "eventpipe_aggregate_emitted_windows_total", &[]);
    let observed = common::metric_value(
        &metrics,
        "eventpipe_aggregate_end_to_end_seconds_count",
        &[],
    );
    let seconds = common::metric_value(&metrics, "eventpipe_aggregate_end_to_end_seconds_sum", &[]);
    assert!(emitted.unwrap_or(0.0) >= expected.len() as f64, "{metrics}");
    assert_eq!(observed, emitted, "{metrics}");
    let mean = seconds.unwrap() / observed.unwrap();
    assert!((0.0..60.0).contains(&mean), "mean end-to-end {mean} s");
    let (status, log) = stage.terminate();
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_and_restart_neither_loses_nor_double_counts() {
    let fixture = Fixture::new().await;
    let (pool, sink) = postgres_sink(&fixture.settings).await;
    let events = generate(&EXACT, 5, 60_000, 50, 60_000, 400);
    let expected = offline(&events, 1000, 1000);
    fixture.produce(&events[..30_000]).await;

    let stage = fixture.start(&sink, &[]);
    // Kill while windows are open and partly written.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = stage.metrics().await;
        let done =
            common::metric_value(&metrics, "eventpipe_aggregate_aggregated_events_total", &[])
                .unwrap_or(0.0);
        // Some windows are already written: the restart must overwrite, not add to, them.
        if done >= 10_000.0 && !read_table(&pool).await.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no progress:\n{}",
            stage.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stage.kill9();
    fixture.produce(&events[30_000..]).await;

    let stage = fixture.start(&sink, &[]);
    wait_for_table(&pool, &expected, Duration::from_secs(90), || stage.log()).await;
    let (status, log) = stage.terminate();
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn three_instances_with_one_killed_mid_run_are_exact() {
    let fixture = Fixture::new().await;
    let (pool, sink) = postgres_sink(&fixture.settings).await;
    let events = generate(&WITH_PERCENTILES, 6, 60_000, 60, 60_000, 400);
    let expected = offline(&events, 1000, 1000);

    let stages: Vec<StageProcess> = (0..3).map(|_| fixture.start(&sink, &[])).collect();
    for stage in &stages {
        stage.metrics().await;
    }
    // Produce in slices so the kill lands while every instance is busy.
    let mut stages = stages.into_iter();
    let victim = stages.next().unwrap();
    let survivors: Vec<StageProcess> = stages.collect();
    let mut victim = Some(victim);
    for (i, slice) in events.chunks(10_000).enumerate() {
        fixture.produce(slice).await;
        if i == 2 {
            // Half the input is still to come when the victim dies: its partitions move to the
            // survivors mid-run, with windows open.
            let victim = victim.take().unwrap();
            common::wait_until(
                Duration::from_secs(60),
                "the victim owned partitions and worked",
                async || {
                    let metrics = victim.metrics().await;
                    match common::metric_value(
                        &metrics,
                        "eventpipe_aggregate_aggregated_events_total",
                        &[],
                    ) {
                        Some(done) if done > 0.0 => Ok(()),
                        done => Err(format!("aggregated {done:?}:\n{}", victim.log())),
                    }
                },
            )
            .await;
            victim.kill9();
        }
    }
    wait_for_table(&pool, &expected, Duration::from_secs(120), || {
        survivors
            .iter()
            .map(|s| s.log())
            .collect::<Vec<_>>()
            .join("\n---\n")
    })
    .await;
    for stage in survivors {
        let (status, log) = stage.terminate();
        assert!(status.success(), "{log}");
    }
}
