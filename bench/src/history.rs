//! The event store read back: "the last 10 of two types from one sender" latency on a store of a
//! million events, a filtered range streamed (rows/s, peak RSS at growing sizes), and replay.
//!
//! Replay is measured against a raw produce of the very records it publishes (same keys, values
//! and headers, read from the store beforehand), in the same run: the ratio is what reading the
//! store and confirming every delivery cost over producing alone.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use eventpipe::config::Settings;
use eventpipe::filter::FilterSet;
use eventpipe::kafka::client::create_client;
use eventpipe::kafka::{ClientKind, PipelineContext};
use eventpipe::store::history::{History, Selection};
use eventpipe::store::replay::{self, ReplayOptions};
use eventpipe::store::row::{Body, StoredRow};
use eventpipe::store::writer::Writer;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use tokio_util::sync::CancellationToken;

use crate::measure::{self, BenchResult, BenchTopics, Percentiles};

#[derive(Debug, Clone, Args)]
pub struct HistoryBenchOptions {
    /// Events in the store (synthetic envelopes of ~300 B).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Times the "last 10" query is run.
    #[arg(long, default_value_t = 500)]
    pub queries: usize,
    /// Rows of the streamed filtered range (also run at a tenth and at everything it selects).
    #[arg(long, default_value_t = 100_000)]
    pub range_rows: u64,
    /// Skip the replay part.
    #[arg(long)]
    pub no_replay: bool,
}

const SERVICES: [&str; 5] = ["lk", "arm", "orm", "tg", "crm"];
const ACTIONS: [&str; 4] = ["create_user", "update_user", "start_task", "notify"];
const TOPIC: &str = "bench_history_in";
const PARTITIONS: i32 = 6;
/// Rows per write while filling the store.
const LOAD_CHUNK: usize = 20_000;

/// Event `i` as the store would keep it (deterministic: the same store in every run).
fn row(i: u64, topic: &Arc<str>, start_ms: i64) -> StoredRow {
    let service = SERVICES[(i % 5) as usize];
    let action = ACTIONS[((i / 5) % 4) as usize];
    let value = format!(
        r#"{{"service":"{service}","action":"{action}","payload":{{"message":"It is {action} number {i}","timestamp":"2026-12-01T09:00:00.{:06}","data":{{"user_id":{},"email":"user{}@example.com","plan":"standard"}}}}}}"#,
        i % 1_000_000,
        i % 10_000,
        i % 10_000
    );
    StoredRow {
        topic: topic.clone(),
        partition: (i % PARTITIONS as u64) as i32,
        offset: (i / PARTITIONS as u64) as i64,
        kafka_time_ms: start_ms + i as i64,
        event_time: None,
        service: service.into(),
        action: action.into(),
        key: Some((i % 10_000).to_string().into_bytes()),
        headers: Some(format!(
            r#"[["service","{service}"],["action","{action}"]]"#
        )),
        body: Body::Json(value.into_bytes()),
    }
}

/// A database of the benchmark's own, with the store's schema.
async fn fresh_store(settings: &Settings) -> anyhow::Result<(sqlx::PgPool, String)> {
    let name = format!(
        "bench_history_{}",
        chrono::Utc::now().format("%Y%m%d%H%M%S%3f")
    );
    let admin = sqlx::PgPool::connect(settings.postgres_url.as_str()).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await?;
    let mut url = settings.postgres_url.clone();
    url.set_path(&name);
    let pool = eventpipe::store::schema::connect(url.as_str(), 4).await?;
    Ok((pool, url.to_string()))
}

pub async fn run(
    settings: &Settings,
    eventpipe: &std::path::Path,
    options: HistoryBenchOptions,
) -> anyhow::Result<Vec<BenchResult>> {
    let mut results = Vec::new();
    let (pool, url) = fresh_store(settings).await?;
    let topic: Arc<str> = TOPIC.into();
    let start_ms = chrono::Utc::now().timestamp_millis() - options.events as i64;

    eprintln!("filling the store with {} events", options.events);
    let mut writer = Writer::new(pool.clone());
    let started = Instant::now();
    let mut next = 0;
    while next < options.events {
        let end = (next + LOAD_CHUNK as u64).min(options.events);
        let rows: Vec<StoredRow> = (next..end).map(|i| row(i, &topic, start_ms)).collect();
        writer.write(&rows).await?;
        next = end;
    }
    results.push(BenchResult::throughput(
        "history",
        "fill: the store's writer, in process",
        options.events,
        started.elapsed().as_secs_f64(),
        None,
        None,
    ));
    sqlx::query("ANALYZE events").execute(&pool).await?;

    // The services' question: the last 10 events of types create_user and update_user from lk.
    let mut last_ten = Selection::of(FilterSet::parse(&["lk:create_user,lk:update_user"])?);
    last_ten.last = Some(10);
    let mut samples = Vec::with_capacity(options.queries);
    let started = Instant::now();
    for _ in 0..options.queries {
        let began = Instant::now();
        let mut history = History::open(pool.clone(), &last_ten, 1000).await?;
        let mut returned = 0;
        while let Some(chunk) = history.next_chunk().await? {
            returned += chunk.len();
        }
        samples.push(began.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(returned == 10, "the last 10 returned {returned}");
    }
    let mut result = BenchResult::throughput(
        "history",
        "last 10 of lk:create_user,update_user",
        options.queries as u64,
        started.elapsed().as_secs_f64(),
        None,
        None,
    );
    result.latency_ms = Percentiles::of(&mut samples);
    results.push(result);

    // A filtered range streamed by the CLI, as a user would: rows/s, and memory that does not
    // grow with the size of the answer.
    for limit in [options.range_rows / 10, options.range_rows, 0] {
        let mut command = Command::new(eventpipe);
        command.args([
            "history",
            "--filter",
            "*:create_user",
            "--postgres-url",
            &url,
        ]);
        if limit > 0 {
            command.args(["--limit", &limit.to_string()]);
        }
        let started = Instant::now();
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let pid = child.id();
        let mut stdout = child.stdout.take().expect("piped");
        let counter = std::thread::spawn(move || -> std::io::Result<u64> {
            use std::io::Read;
            let mut buffer = vec![0u8; 1 << 16];
            let mut lines = 0;
            loop {
                let n = stdout.read(&mut buffer)?;
                if n == 0 {
                    return Ok(lines);
                }
                lines += buffer[..n].iter().filter(|&&b| b == b'\n').count() as u64;
            }
        });
        let (mut peak, mut cpu) = (None, None);
        while child.try_wait()?.is_none() {
            peak = measure::peak_rss_mib(pid).or(peak);
            cpu = measure::cpu_seconds(pid).or(cpu);
            std::thread::sleep(Duration::from_millis(20));
        }
        let seconds = started.elapsed().as_secs_f64();
        let lines = counter.join().expect("counter")?;
        anyhow::ensure!(
            limit == 0 || lines == limit,
            "history --limit {limit} printed {lines} lines"
        );
        results.push(BenchResult::throughput(
            "history",
            format!("stream *:create_user, {lines} rows"),
            lines,
            seconds,
            cpu.map(|c| c * 1e6 / lines.max(1) as f64),
            peak,
        ));
    }

    if !options.no_replay {
        results.extend(replay_vs_raw_produce(settings, pool, options.events).await?);
    }
    Ok(results)
}

/// A record as the replay publishes it: key, value, headers.
type Outgoing = (Option<Vec<u8>>, Vec<u8>, Vec<(String, Vec<u8>)>);

/// Replay of every event against a raw produce of the same records.
async fn replay_vs_raw_produce(
    settings: &Settings,
    pool: sqlx::PgPool,
    events: u64,
) -> anyhow::Result<Vec<BenchResult>> {
    let stamp = chrono::Utc::now().format("%H%M%S%3f");
    let replay_topic = format!("bench-replay-{stamp}");
    let raw_topic = format!("bench-replay-raw-{stamp}");
    let topics = BenchTopics::create(
        &settings.kafka,
        &[
            (replay_topic.clone(), PARTITIONS),
            (raw_topic.clone(), PARTITIONS),
        ],
    )
    .await?;
    let everything = Selection::of(FilterSet::everything());

    eprintln!("reading the {events} records a replay publishes, for the raw baseline");
    let replay_id = replay::new_replay_id();
    let mut records: Vec<Outgoing> = Vec::with_capacity(events as usize);
    let mut history = History::open(pool.clone(), &everything, 5000).await?;
    while let Some(chunk) = history.next_chunk().await? {
        for event in chunk {
            let headers = replay::replay_headers(&event, &replay_id)?;
            records.push((event.key.clone(), event.value_bytes().to_vec(), headers));
        }
    }

    let producer: ThreadedProducer<PipelineContext> = create_client(
        &settings.kafka,
        ClientKind::Producer,
        PipelineContext::default(),
    )?;
    let started = Instant::now();
    for (key, value, headers) in &records {
        let headers = headers.iter().fold(
            OwnedHeaders::new_with_capacity(headers.len()),
            |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v),
                })
            },
        );
        let mut record = BaseRecord::<[u8], [u8]>::to(&raw_topic)
            .payload(value)
            .headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        measure::send_waiting(&producer, record)?;
    }
    producer.flush(Duration::from_secs(120))?;
    let raw_seconds = started.elapsed().as_secs_f64();
    let raw = BenchResult::throughput(
        "replay",
        "baseline: raw produce of the same records",
        records.len() as u64,
        raw_seconds,
        None,
        None,
    );
    drop(records);

    let started = Instant::now();
    let summary = replay::run(
        &settings.kafka,
        pool,
        &everything,
        &ReplayOptions {
            to_topic: Some(replay_topic),
            rate: 0,
            chunk_size: 5000,
        },
        &replay_id,
        |_| {},
        &CancellationToken::new(),
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        summary.replayed == events,
        "replayed {} of {events}",
        summary.replayed
    );
    let mut replayed = BenchResult::throughput(
        "replay",
        "eventpipe replay (store → Kafka)",
        summary.replayed,
        seconds,
        None,
        None,
    );
    replayed.ratio_to_baseline = Some(raw_seconds / seconds);
    topics.delete().await;
    Ok(vec![raw, replayed])
}
