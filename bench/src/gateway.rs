//! The gateway benchmark (issue #14): events in over HTTP next to a direct rdkafka producer, single
//! event requests next to single awaited produces, and the live fan-out to many SSE/WebSocket clients.
//!
//! Every part runs its baseline in the same run. The fan-out's load generator is this process:
//! Kafka traffic at a fixed rate with the send time in each event, thousands of clients on one
//! tokio runtime, each checking it received exactly the events its filter selects.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use eventpipe::config::{KafkaSettings, Settings};
use eventpipe::generate::{GeneratedRecord, Generator, Pacer, TrafficKind, PACER_TICK};
use eventpipe::kafka::client::create_client;
use eventpipe::kafka::{ClientKind, PipelineContext};
use futures::{SinkExt, StreamExt};
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::measure::{
    cpu_seconds, free_port, from_beginning, peak_rss_mib, rss_kib, BenchResult, BenchTopics,
    Percentiles, TopicWatcher,
};

/// `eventpipe-bench gateway`: sizes of the three parts, and which to run.
#[derive(Debug, clap::Args)]
pub struct GatewayBenchOptions {
    /// Envelopes (~300 B) sent through each ingress path: gateway batches and direct producer.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Partitions of every topic the benchmark creates.
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// Lines per NDJSON request.
    #[arg(long, default_value_t = 500)]
    pub batch_lines: usize,
    /// NDJSON requests in flight at once (the direct producer gets the same number of events in
    /// flight: batch lines × this).
    #[arg(long, default_value_t = 4)]
    pub batches_in_flight: usize,
    /// Single-event requests (and, for the baseline, single awaited produces).
    #[arg(long, default_value_t = 20_000)]
    pub requests: u64,
    /// Keep-alive connections the single-event requests are spread over (one request at a time
    /// each); the baseline runs as many concurrent produce loops.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Fan-out runs: concurrent clients of each (half SSE, half WebSocket), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000, 10_000])]
    pub clients: Vec<usize>,
    /// Events per second produced to Kafka during a fan-out run.
    #[arg(long, default_value_t = 5_000)]
    pub rate: u64,
    /// Seconds of traffic of each fan-out run.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Which parts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [Part::Ingress, Part::Single, Part::Fanout])]
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// NDJSON batches vs a direct producer.
    Ingress,
    /// Single-event requests with keep-alive vs single awaited produces.
    Single,
    /// Live fan-out to SSE and WebSocket clients.
    Fanout,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Part::Ingress => "ingress",
            Part::Single => "single",
            Part::Fanout => "fanout",
        })
    }
}

/// The admin credential of the benchmark's gateways (loopback only, a throwaway database).
const TOKEN: &str = "bench-gateway-admin-token-0123456789";

/// How long an event may wait for Kafka: the gateway's default `--produce-timeout-ms`, given to
/// the direct producer too so both run with the same settings.
const PRODUCE_TIMEOUT: Duration = Duration::from_millis(10_000);

/// Clients connecting at once (the listener's backlog must not overflow).
const CONNECTING_AT_ONCE: usize = 200;

pub async fn run(
    settings: &Settings,
    eventpipe: &Path,
    options: GatewayBenchOptions,
) -> anyhow::Result<Vec<BenchResult>> {
    raise_open_files_limit(options.clients.iter().copied().max().unwrap_or(0))?;
    let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S");
    let base = format!("bench-gateway-{stamp}");
    let names = Names { base: base.clone() };
    let mut topics = vec![
        (names.warm_up(), 1),
        (names.ingress_direct(), options.partitions),
        (names.ingress(), options.partitions),
        (names.single_direct(), options.partitions),
        (names.single(), options.partitions),
    ];
    for clients in &options.clients {
        topics.push((names.fanout(*clients), options.partitions));
    }
    let bench_topics = BenchTopics::create(&settings.kafka, &topics).await?;
    wait_for_leaders(&settings.kafka, &topics).await?;
    let database = format!("bench_gateway_{stamp}");
    let outcome = async {
        let url = create_database(settings, &database).await?;
        workloads(settings, eventpipe, &options, &names, &url).await
    }
    .await;
    drop_database(settings, &database).await;
    bench_topics.delete().await;
    outcome
}

/// The topics of one run.
struct Names {
    base: String,
}

impl Names {
    /// Where every producer, the gateway's too, sends one record before its timed part: the
    /// idempotent producer's id and the broker connection are set up outside the clock.
    fn warm_up(&self) -> String {
        format!("{}-warm-up", self.base)
    }
    fn ingress_direct(&self) -> String {
        format!("{}-ingress-direct", self.base)
    }
    fn ingress(&self) -> String {
        format!("{}-ingress", self.base)
    }
    fn single_direct(&self) -> String {
        format!("{}-single-direct", self.base)
    }
    fn single(&self) -> String {
        format!("{}-single", self.base)
    }
    fn fanout(&self, clients: usize) -> String {
        format!("{}-fanout-{clients}", self.base)
    }
}

async fn workloads(
    settings: &Settings,
    eventpipe: &Path,
    options: &GatewayBenchOptions,
    names: &Names,
    database_url: &str,
) -> anyhow::Result<Vec<BenchResult>> {
    let mut results = Vec::new();
    let wants = |part| options.parts.contains(&part);
    if wants(Part::Ingress) || wants(Part::Single) {
        let records = envelopes(options.events.max(options.requests));
        let gateway = GatewayChild::start(
            eventpipe,
            &settings.kafka,
            &[names.ingress(), names.single(), names.warm_up()],
            database_url,
        )
        .await?;
        gateway.warm_up(&names.warm_up(), &records[0]).await?;
        if wants(Part::Ingress) {
            let n = options.events as usize;
            let window = options.batch_lines * options.batches_in_flight;
            eprintln!("ingress baseline: {n} envelopes by a FutureProducer, {window} in flight");
            let direct = direct_ingress(
                settings,
                &names.warm_up(),
                &names.ingress_direct(),
                &records[..n],
                window,
            )
            .await?;
            check_written(settings, &names.ingress_direct(), options.partitions, n).await?;
            eprintln!(
                "ingress: the same {n} envelopes as NDJSON, {} lines a request, {} in flight",
                options.batch_lines, options.batches_in_flight
            );
            let through =
                gateway_ingress(&gateway, &names.ingress(), &records[..n], options).await?;
            check_written(settings, &names.ingress(), options.partitions, n).await?;
            let ratio = push_pair(&mut results, direct, through);
            println!("gateway ingress: NDJSON through the gateway / direct producer = {ratio:.3} (target >= 0.5)");
        }
        if wants(Part::Single) {
            let n = options.requests as usize;
            eprintln!(
                "single baseline: {n} produces, each awaited, {} at once",
                options.connections
            );
            let direct = direct_single(
                settings,
                &names.warm_up(),
                &names.single_direct(),
                &records[..n],
                options.connections,
            )
            .await?;
            check_written(settings, &names.single_direct(), options.partitions, n).await?;
            eprintln!(
                "single: {n} one-event requests over {} keep-alive connections",
                options.connections
            );
            let through = gateway_single(
                &gateway,
                &names.single(),
                &records[..n],
                options.connections,
            )
            .await?;
            check_written(settings, &names.single(), options.partitions, n).await?;
            let ratio = push_pair(&mut results, direct, through);
            println!("gateway single-event requests / single awaited produces = {ratio:.3}");
        }
        gateway.stop().await;
    }
    if wants(Part::Fanout) {
        for &clients in &options.clients {
            eprintln!(
                "fan-out: {clients} clients, {}/s for {}s",
                options.rate, options.seconds
            );
            let topic = names.fanout(clients);
            let gateway = GatewayChild::start(
                eventpipe,
                &settings.kafka,
                std::slice::from_ref(&topic),
                database_url,
            )
            .await?;
            let outcome = fanout(
                settings,
                &gateway,
                &names.warm_up(),
                &topic,
                clients,
                options,
            )
            .await;
            gateway.stop().await;
            results.extend(outcome?);
        }
    }
    Ok(results)
}

/// Appends a part's baseline and the gateway's result with its ratio to it; returns the ratio.
fn push_pair(results: &mut Vec<BenchResult>, baseline: BenchResult, through: BenchResult) -> f64 {
    let ratio = through.records_per_second / baseline.records_per_second;
    results.push(BenchResult {
        ratio_to_baseline: Some(1.0),
        ..baseline
    });
    results.push(BenchResult {
        ratio_to_baseline: Some(ratio),
        ..through
    });
    ratio
}

/// `n` generated service envelopes (the preload's generator and seed: ~300 B, keyed by user).
fn envelopes(n: u64) -> Vec<GeneratedRecord> {
    let mut generator = Generator::new(TrafficKind::Envelopes, 1, 10_000, 1, None);
    let now = chrono::Utc::now();
    (0..n).map(|_| generator.next_record(now)).collect()
}

/// The headers the gateway sets on what it produces: the sender and the type.
fn envelope_headers(service: &str, action: &str) -> OwnedHeaders {
    OwnedHeaders::new()
        .insert(Header {
            key: "service",
            value: Some(service.as_bytes()),
        })
        .insert(Header {
            key: "action",
            value: Some(action.as_bytes()),
        })
}

fn header<'a>(record: &'a GeneratedRecord, name: &str) -> &'a str {
    record
        .headers
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("", |(_, v)| v.as_str())
}

/// The gateway's producer: eventpipe's producer defaults (idempotent, acks=all, linger 1 ms,
/// lz4) with the gateway's message timeout.
fn producer(kafka: &KafkaSettings) -> anyhow::Result<FutureProducer<PipelineContext>> {
    let mut kafka = kafka.clone();
    kafka
        .properties
        .entry("message.timeout.ms".into())
        .or_insert_with(|| PRODUCE_TIMEOUT.as_millis().to_string());
    Ok(create_client(
        &kafka,
        ClientKind::Producer,
        PipelineContext::default(),
    )?)
}

/// Waits until every partition of the new topics answers a watermark query (has a leader): a
/// gateway started before that fails its start-up look-ups.
async fn wait_for_leaders(kafka: &KafkaSettings, topics: &[(String, i32)]) -> anyhow::Result<()> {
    let kafka = kafka.clone();
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        for (topic, partitions) in &topics {
            let watcher = TopicWatcher::new(&kafka, topic, *partitions)?;
            while let Err(error) = watcher.written() {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "topic {topic} has no leader after 60 s: {error}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    })
    .await?
}

/// Every record landed: the fresh topic's high watermarks add up to `n`.
async fn check_written(
    settings: &Settings,
    topic: &str,
    partitions: i32,
    n: usize,
) -> anyhow::Result<()> {
    let kafka = settings.kafka.clone();
    let topic = topic.to_string();
    let written = tokio::task::spawn_blocking(move || {
        TopicWatcher::new(&kafka, &topic, partitions)?.written()
    })
    .await??;
    anyhow::ensure!(written == n as u64, "{written} records in Kafka, {n} sent");
    eprintln!("  checked: {written} records in Kafka");
    Ok(())
}

fn spent(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    before.zip(after).map(|(before, after)| after - before)
}

/// The baseline: the same envelopes (keys, headers) by a FutureProducer with the gateway's
/// settings, `window` sends in flight; the CPU is this process's.
async fn direct_ingress(
    settings: &Settings,
    warm_up_topic: &str,
    topic: &str,
    records: &[GeneratedRecord],
    window: usize,
) -> anyhow::Result<BenchResult> {
    let producer = producer(&settings.kafka)?;
    warm_up(&producer, warm_up_topic).await?;
    let cpu_before = cpu_seconds(std::process::id());
    let started = Instant::now();
    let mut sends = futures::stream::iter(records)
        .map(|record| {
            let record_headers =
                envelope_headers(header(record, "service"), header(record, "action"));
            producer.send(
                FutureRecord::to(topic)
                    .key(record.key.as_str())
                    .payload(record.value.as_slice())
                    .headers(record_headers),
                PRODUCE_TIMEOUT,
            )
        })
        .buffer_unordered(window.max(1));
    while let Some(sent) = sends.next().await {
        sent.map_err(|(error, _)| anyhow::anyhow!("direct produce: {error}"))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = spent(cpu_before, cpu_seconds(std::process::id()));
    Ok(BenchResult::throughput(
        "gateway",
        format!("baseline: producer, {window} in flight"),
        records.len() as u64,
        seconds,
        cpu,
        None,
    ))
}

/// Sends one record to the warm-up topic and waits for it, so no timed part pays for the
/// producer's start (its idempotent producer id, the broker connection).
async fn warm_up(producer: &FutureProducer<PipelineContext>, topic: &str) -> anyhow::Result<()> {
    producer
        .send(
            FutureRecord::<str, [u8]>::to(topic).payload(b"warm-up".as_slice()),
            PRODUCE_TIMEOUT,
        )
        .await
        .map_err(|(error, _)| anyhow::anyhow!("warm-up produce: {error}"))?;
    Ok(())
}

/// The same envelopes as NDJSON batches to the gateway, `batches_in_flight` requests at once
/// over keep-alive connections; timed from the first request to the last answer (each answer
/// comes after Kafka acknowledged every line). The CPU and memory are the gateway's.
async fn gateway_ingress(
    gateway: &GatewayChild,
    topic: &str,
    records: &[GeneratedRecord],
    options: &GatewayBenchOptions,
) -> anyhow::Result<BenchResult> {
    let bodies: Vec<(usize, Vec<u8>)> = records
        .chunks(options.batch_lines.max(1))
        .map(|chunk| {
            let mut body = Vec::with_capacity(chunk.iter().map(|r| r.value.len() + 1).sum());
            for record in chunk {
                body.extend_from_slice(&record.value);
                body.push(b'\n');
            }
            (chunk.len(), body)
        })
        .collect();
    let queue = Arc::new(Mutex::new(bodies));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(options.batches_in_flight)
        .build()?;
    let url = format!("{}/v1/topics/{topic}/events", gateway.base);
    let cpu_before = cpu_seconds(gateway.pid);
    let started = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..options.batches_in_flight.max(1) {
        let (queue, http, url) = (queue.clone(), http.clone(), url.clone());
        senders.push(tokio::spawn(async move {
            let mut accepted = 0u64;
            loop {
                let Some((lines, body)) = queue.lock().expect("not poisoned").pop() else {
                    return anyhow::Ok(accepted);
                };
                let response = http
                    .post(&url)
                    .bearer_auth(TOKEN)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await?;
                let status = response.status();
                let answer: serde_json::Value = response.json().await?;
                anyhow::ensure!(
                    status.is_success() && answer["accepted"].as_u64() == Some(lines as u64),
                    "a batch of {lines} answered {status}: {}",
                    truncated(&answer.to_string())
                );
                accepted += lines as u64;
            }
        }));
    }
    let mut accepted = 0;
    for sender in senders {
        accepted += sender.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = spent(cpu_before, cpu_seconds(gateway.pid));
    anyhow::ensure!(accepted == records.len() as u64, "{accepted} accepted");
    Ok(BenchResult::throughput(
        "gateway",
        format!(
            "gateway NDJSON {}/req x{}",
            options.batch_lines, options.batches_in_flight
        ),
        accepted,
        seconds,
        cpu,
        peak_rss_mib(gateway.pid),
    ))
}

fn truncated(text: &str) -> &str {
    let mut end = text.len().min(300);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The baseline of single requests: `concurrency` loops, each producing one record and awaiting
/// its acknowledgement before the next; latency per produce.
async fn direct_single(
    settings: &Settings,
    warm_up_topic: &str,
    topic: &str,
    records: &[GeneratedRecord],
    concurrency: usize,
) -> anyhow::Result<BenchResult> {
    let producer = Arc::new(producer(&settings.kafka)?);
    warm_up(&producer, warm_up_topic).await?;
    let records = Arc::new(records.to_vec());
    let cpu_before = cpu_seconds(std::process::id());
    let (mut latencies, seconds) = closed_loops(records.len(), concurrency, {
        let topic = topic.to_string();
        let records = records.clone();
        move |i| {
            let (producer, records, topic) = (producer.clone(), records.clone(), topic.clone());
            async move {
                let record = &records[i];
                producer
                    .send(
                        FutureRecord::to(&topic)
                            .key(record.key.as_str())
                            .payload(record.value.as_slice())
                            .headers(envelope_headers(
                                header(record, "service"),
                                header(record, "action"),
                            )),
                        PRODUCE_TIMEOUT,
                    )
                    .await
                    .map_err(|(error, _)| anyhow::anyhow!("direct produce: {error}"))?;
                Ok(())
            }
        }
    })
    .await?;
    let cpu = spent(cpu_before, cpu_seconds(std::process::id()));
    Ok(BenchResult {
        latency_ms: Percentiles::of(&mut latencies),
        ..BenchResult::throughput(
            "gateway",
            format!("baseline: send().await x{concurrency}"),
            records.len() as u64,
            seconds,
            cpu,
            None,
        )
    })
}

/// One-event requests (`application/json`) over `connections` keep-alive connections, one
/// request at a time each; latency per request, from sending it to its answer.
async fn gateway_single(
    gateway: &GatewayChild,
    topic: &str,
    records: &[GeneratedRecord],
    connections: usize,
) -> anyhow::Result<BenchResult> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()?;
    let url = format!("{}/v1/topics/{topic}/events", gateway.base);
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(records.iter().map(|r| r.value.clone()).collect());
    let cpu_before = cpu_seconds(gateway.pid);
    let (mut latencies, seconds) = closed_loops(records.len(), connections, move |i| {
        let (http, url, body) = (http.clone(), url.clone(), bodies[i].clone());
        async move {
            let response = http
                .post(&url)
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            let status = response.status();
            let answer = response.bytes().await?;
            anyhow::ensure!(
                status.is_success(),
                "a single event answered {status}: {}",
                String::from_utf8_lossy(&answer)
            );
            Ok(())
        }
    })
    .await?;
    let cpu = spent(cpu_before, cpu_seconds(gateway.pid));
    Ok(BenchResult {
        latency_ms: Percentiles::of(&mut latencies),
        ..BenchResult::throughput(
            "gateway",
            format!("gateway 1 event/req x{connections}"),
            records.len() as u64,
            seconds,
            cpu,
            peak_rss_mib(gateway.pid),
        )
    })
}

/// Runs operations `0..n` in `concurrency` loops, each awaiting one before starting its next
/// (loop `c` runs `c`, `c + concurrency`, ...); returns each one's latency in milliseconds and
/// the seconds of the whole.
async fn closed_loops<F, Fut>(
    n: usize,
    concurrency: usize,
    operation: F,
) -> anyhow::Result<(Vec<f64>, f64)>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let concurrency = concurrency.max(1);
    let started = Instant::now();
    let loops: Vec<_> = (0..concurrency)
        .map(|first| {
            let operation = operation.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                for i in (first..n).step_by(concurrency) {
                    let sent = Instant::now();
                    operation(i).await?;
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(n);
    for one in loops {
        latencies.extend(one.await??);
    }
    Ok((latencies, started.elapsed().as_secs_f64()))
}

/// A gateway process: `eventpipe gateway` on a free loopback port, found from its stdout line.
struct GatewayChild {
    child: tokio::process::Child,
    pid: u32,
    base: String,
    address: SocketAddr,
}

impl GatewayChild {
    async fn start(
        eventpipe: &Path,
        kafka: &KafkaSettings,
        topics: &[String],
        database_url: &str,
    ) -> anyhow::Result<GatewayChild> {
        let mut child = tokio::process::Command::new(eventpipe)
            .args([
                "--bootstrap-servers",
                &kafka.bootstrap_servers,
                "--metrics-address",
                &format!("127.0.0.1:{}", free_port()?),
                "--log-level",
                "warn",
                "gateway",
                "--listen",
                "127.0.0.1:0",
                "--topics",
                &topics.join(","),
                "--admin-token",
                TOKEN,
                "--postgres-url",
                database_url,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().unwrap_or_default();
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let address = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(address) = line.strip_prefix("gateway listening on ") {
                    return anyhow::Ok(address.trim().parse::<SocketAddr>()?);
                }
            }
            anyhow::bail!("the gateway exited before listening")
        })
        .await
        .map_err(|_| anyhow::anyhow!("the gateway did not listen within 60 s"))??;
        // Its last line ("gateway stopped") goes nowhere: the benchmark kills it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(GatewayChild {
            child,
            pid,
            base: format!("http://{address}"),
            address,
        })
    }

    /// One event through the gateway before anything is timed (its producer starts as the
    /// direct one does, outside the clock).
    async fn warm_up(&self, topic: &str, record: &GeneratedRecord) -> anyhow::Result<()> {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/topics/{topic}/events", self.base))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(record.value.clone())
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "the warm-up event answered {}",
            response.status()
        );
        Ok(())
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

async fn create_database(settings: &Settings, name: &str) -> anyhow::Result<String> {
    let mut admin = PgConnection::connect(settings.postgres_url.as_str()).await?;
    // The name is ours (a fixed word and a timestamp): nothing to quote.
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    let mut url = settings.postgres_url.clone();
    url.set_path(&format!("/{name}"));
    Ok(url.to_string())
}

async fn drop_database(settings: &Settings, name: &str) {
    let dropped = async {
        let mut admin = PgConnection::connect(settings.postgres_url.as_str()).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await?;
        Ok::<(), sqlx::Error>(())
    };
    if let Err(error) = dropped.await {
        tracing::warn!(%error, database = name, "dropping the benchmark database");
    }
}

/// Raises this process's open-file limit to its hard limit (children inherit it): `clients`
/// connections on each side need as many descriptors, and some more.
fn raise_open_files_limit(clients: usize) -> anyhow::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            anyhow::bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                anyhow::bail!("setrlimit: {}", std::io::Error::last_os_error());
            }
        }
    }
    let needed = clients as u64 + 1024;
    anyhow::ensure!(
        limit.rlim_cur >= needed,
        "{clients} clients need {needed} open files; the hard limit is {} (raise it with ulimit -Hn)",
        limit.rlim_cur
    );
    Ok(())
}

// ---- fan-out ------------------------------------------------------------------------------

/// The fan-out traffic: 25 senders × 4 types = 100 kinds, event `seq` of kind `seq % 100`.
const SERVICES: usize = 25;
const ACTIONS: usize = 4;
const KINDS: usize = SERVICES * ACTIONS;

fn service_of(kind: usize) -> String {
    format!("svc{:02}", kind / ACTIONS)
}

fn action_of(kind: usize) -> String {
    format!("act{}", kind % ACTIONS)
}

/// Client `j`'s filter and the kinds it selects: even clients take a whole sender (`svcNN:*`,
/// 4 % of the traffic), odd ones two exact sender:type pairs (2 %); every kind is selected by
/// about 3 % of the clients. Clients 0, 1 of every 4 use SSE, 2, 3 WebSocket.
fn client_filter(j: usize) -> (String, Vec<usize>) {
    let k = j / 2;
    if j % 2 == 0 {
        let service = k % SERVICES;
        (
            format!("svc{service:02}:*"),
            (0..ACTIONS).map(|a| service * ACTIONS + a).collect(),
        )
    } else {
        let first = (k * 7 + 3) % KINDS;
        let second = (first + 37) % KINDS;
        (
            format!(
                "{}:{},{}:{}",
                service_of(first),
                action_of(first),
                service_of(second),
                action_of(second)
            ),
            vec![first, second],
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Sse,
    Ws,
}

fn transport_of(j: usize) -> Transport {
    if j % 4 < 2 {
        Transport::Sse
    } else {
        Transport::Ws
    }
}

/// An envelope of the fan-out traffic (~300 B) with its sequence number and send time.
fn fanout_envelope(seq: u64, sent_us: u64) -> (String, String, String, Vec<u8>) {
    let kind = (seq % KINDS as u64) as usize;
    let (service, action) = (service_of(kind), action_of(kind));
    let user = seq % 10_000;
    let value = format!(
        r#"{{"service":"{service}","action":"{action}","payload":{{"message":"It is {action} number {seq}","timestamp":"2026-12-01T09:00:00.000000","data":{{"user_id":{user},"bench_seq":{seq},"sent_us":{sent_us},"email":"user{user}@example.com","name":"User {user}","locale":"ru_RU","client":"web/2.14.1 (Linux x86_64)"}}}}}}"#
    );
    (service, action, user.to_string(), value.into_bytes())
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The unsigned integer after `key` in `text` (the frames are not parsed: a client only needs
/// the two numbers the benchmark put in the payload).
fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(text, key)? + key.len();
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&text[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// What the clients share: how many are ready, how many frames all have received.
#[derive(Default)]
struct Tally {
    ready: AtomicUsize,
    failed: AtomicUsize,
    frames: AtomicU64,
}

/// What one client saw.
#[derive(Debug)]
struct ClientOutcome {
    transport: Transport,
    kinds: Vec<usize>,
    ready: bool,
    frames: u64,
    seq_sum: u64,
    latencies_us: Vec<u32>,
    /// Why the stream ended before the benchmark stopped it (a `disconnect` frame, an error).
    ended: Option<String>,
}

impl ClientOutcome {
    /// An event frame (the JSON of an SSE `data:` line or a WebSocket text frame).
    fn event(&mut self, frame: &[u8], tally: &Tally) {
        let (Some(seq), Some(sent)) = (
            number_after(frame, b"\"bench_seq\":"),
            number_after(frame, b"\"sent_us\":"),
        ) else {
            return;
        };
        self.frames += 1;
        self.seq_sum += seq;
        let latency = now_us().saturating_sub(sent);
        self.latencies_us
            .push(u32::try_from(latency).unwrap_or(u32::MAX));
        tally.frames.fetch_add(1, Ordering::Relaxed);
    }

    fn started(&mut self, tally: &Tally) {
        if !self.ready {
            self.ready = true;
            tally.ready.fetch_add(1, Ordering::Release);
        }
    }
}

/// What every client of a run shares: where to connect, the gate that bounds connecting, the
/// tally, and the signal to stop.
struct Crowd {
    address: SocketAddr,
    gate: Semaphore,
    tally: Tally,
    stop: CancellationToken,
}

/// One client: connects (at most `CONNECTING_AT_ONCE` at a time), reads until `stop`.
async fn client(j: usize, crowd: Arc<Crowd>) -> ClientOutcome {
    let (filter, kinds) = client_filter(j);
    let transport = transport_of(j);
    let mut outcome = ClientOutcome {
        transport,
        kinds,
        ready: false,
        frames: 0,
        seq_sum: 0,
        latencies_us: Vec::new(),
        ended: None,
    };
    let read = match transport {
        Transport::Sse => sse_client(&crowd, &filter, &mut outcome).await,
        Transport::Ws => ws_client(&crowd, &filter, &mut outcome).await,
    };
    if let Err(error) = read {
        if !outcome.ready {
            crowd.tally.failed.fetch_add(1, Ordering::Relaxed);
        }
        outcome.ended.get_or_insert(error.to_string());
    }
    outcome
}

/// An SSE client on a raw connection, as a browser's EventSource reads: HTTP/1.1, chunked.
async fn sse_client(
    crowd: &Crowd,
    filter: &str,
    outcome: &mut ClientOutcome,
) -> anyhow::Result<()> {
    let Crowd {
        address,
        gate,
        tally,
        stop,
    } = crowd;
    let permit = gate.acquire().await?;
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET /v1/stream?filter={filter} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut decoder = SseDecoder::default();
    let mut buffer = vec![0u8; 16 * 1024];
    let mut permit = Some(permit);
    loop {
        let read = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            read = stream.read(&mut buffer) => read?,
        };
        if read == 0 {
            anyhow::bail!("the gateway closed the stream");
        }
        decoder.push(&buffer[..read])?;
        while let Some(block) = decoder.next_block() {
            if block.starts_with(b":") {
                continue; // keep-alive comment
            }
            if memchr::memmem::find(&block, b"event: disconnect").is_some() {
                let data = block
                    .split(|b| *b == b'\n')
                    .find(|l| l.starts_with(b"data:"));
                let frame: serde_json::Value =
                    serde_json::from_slice(data.and_then(|l| l.get(5..)).unwrap_or_default())
                        .unwrap_or_default();
                outcome.ended = Some(format!("disconnect: {}", frame["code"]));
                return Ok(());
            }
            if memchr::memmem::find(&block, b"\ndata:").is_some() || block.starts_with(b"data:") {
                outcome.event(&block, tally);
            } else if block.starts_with(b"id:") || memchr::memmem::find(&block, b"\nid:").is_some()
            {
                outcome.started(tally);
                permit.take();
            }
        }
        anyhow::ensure!(
            !decoder.ended,
            "the gateway ended the stream without a reason"
        );
    }
}

/// The body of an SSE response: the status line and headers checked, chunks undone, frames
/// (blocks ending in a blank line) handed out one by one.
#[derive(Default)]
struct SseDecoder {
    raw: Vec<u8>,
    headers_read: bool,
    chunked: bool,
    /// Bytes left of the chunk being read, and whether its CRLF is still to come.
    chunk_left: usize,
    chunk_crlf: bool,
    body: Vec<u8>,
    /// Where the next frame starts in `body`.
    frame_start: usize,
    /// The body's last chunk arrived.
    ended: bool,
}

impl SseDecoder {
    fn push(&mut self, data: &[u8]) -> anyhow::Result<()> {
        if self.ended {
            return Ok(()); // the last chunk's CRLF (or trailers)
        }
        self.raw.extend_from_slice(data);
        if !self.headers_read {
            let Some(end) = memchr::memmem::find(&self.raw, b"\r\n\r\n") else {
                return Ok(());
            };
            let head = String::from_utf8_lossy(&self.raw[..end]).to_ascii_lowercase();
            anyhow::ensure!(
                head.starts_with("http/1.1 200"),
                "the stream answered {}",
                String::from_utf8_lossy(&self.raw)
            );
            self.chunked = head.contains("transfer-encoding: chunked");
            self.headers_read = true;
            self.raw.drain(..end + 4);
        }
        if !self.chunked {
            self.body.append(&mut self.raw);
            return Ok(());
        }
        let mut at = 0;
        loop {
            if self.chunk_left > 0 {
                let take = self.chunk_left.min(self.raw.len() - at);
                self.body.extend_from_slice(&self.raw[at..at + take]);
                at += take;
                self.chunk_left -= take;
                if self.chunk_left > 0 {
                    break;
                }
                self.chunk_crlf = true;
            }
            if self.chunk_crlf {
                if self.raw.len() - at < 2 {
                    break;
                }
                at += 2;
                self.chunk_crlf = false;
            }
            let Some(end) = memchr::memmem::find(&self.raw[at..], b"\r\n") else {
                break;
            };
            let line = std::str::from_utf8(&self.raw[at..at + end])?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)?;
            at += end + 2;
            if size == 0 {
                // The last chunk: the frames before it are still to be read.
                self.ended = true;
                at = self.raw.len();
                break;
            }
            self.chunk_left = size;
        }
        self.raw.drain(..at);
        Ok(())
    }

    fn next_block(&mut self) -> Option<Vec<u8>> {
        let rest = &self.body[self.frame_start..];
        match memchr::memmem::find(rest, b"\n\n") {
            Some(end) => {
                let block = rest[..end].to_vec();
                self.frame_start += end + 2;
                Some(block)
            }
            None => {
                self.body.drain(..self.frame_start);
                self.frame_start = 0;
                None
            }
        }
    }
}

/// A WebSocket client (tokio-tungstenite, Nagle off): text frames of JSON.
async fn ws_client(crowd: &Crowd, filter: &str, outcome: &mut ClientOutcome) -> anyhow::Result<()> {
    let Crowd {
        address,
        gate,
        tally,
        stop,
    } = crowd;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    let permit = gate.acquire().await?;
    let mut request = format!("ws://{address}/v1/ws?filter={filter}").into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(request, None, true).await?;
    let mut permit = Some(permit);
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => {
                let _ = socket.close(None).await;
                return Ok(());
            }
            message = socket.next() => message,
        };
        match message {
            None => anyhow::bail!("the gateway closed the socket"),
            Some(message) => match message? {
                WsMessage::Text(text) => {
                    let text = text.as_bytes();
                    // Events are spliced with their type first; the rare other frames
                    // are parsed (their keys come in any order).
                    if text.starts_with(br#"{"type":"event""#) {
                        outcome.event(text, tally);
                        continue;
                    }
                    let frame: serde_json::Value = serde_json::from_slice(text)?;
                    match frame["type"].as_str() {
                        Some("position") => {
                            outcome.started(tally);
                            permit.take();
                        }
                        Some("disconnect") => {
                            outcome.ended = Some(format!("disconnect: {}", frame["code"]));
                            return Ok(());
                        }
                        _ => {}
                    }
                }
                WsMessage::Ping(data) => socket.send(WsMessage::Pong(data)).await?,
                WsMessage::Close(frame) => {
                    outcome.ended = Some(format!("closed: {frame:?}"));
                    return Ok(());
                }
                _ => {}
            },
        }
    }
}

/// Produce-to-consume latency of a plain consumer with the gateway reader's settings, reading
/// the same traffic: the floor under the gateway's delivery latency.
async fn direct_consumer(
    kafka: &KafkaSettings,
    topic: &str,
    partitions: i32,
    total: u64,
    stop: CancellationToken,
) -> anyhow::Result<Vec<u32>> {
    let consumer: StreamConsumer<PipelineContext> =
        from_beginning(kafka, &format!("{topic}-direct-reader"), topic, partitions)?;
    let mut latencies = Vec::with_capacity(total as usize);
    while (latencies.len() as u64) < total {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            message = consumer.recv() => message?,
        };
        if let Some(sent) = message
            .payload()
            .and_then(|p| number_after(p, b"\"sent_us\":"))
        {
            let latency = now_us().saturating_sub(sent);
            latencies.push(u32::try_from(latency).unwrap_or(u32::MAX));
        }
    }
    Ok(latencies)
}

/// Nearest-rank percentiles of microsecond samples, in milliseconds.
fn percentiles_ms(samples: &mut [u32]) -> Option<Percentiles> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let rank = |q: f64| {
        let index = (((samples.len() as f64) * q).ceil() as usize).clamp(1, samples.len()) - 1;
        f64::from(samples[index]) / 1000.0
    };
    Some(Percentiles {
        p50: rank(0.50),
        p90: rank(0.90),
        p99: rank(0.99),
        max: f64::from(samples[samples.len() - 1]) / 1000.0,
    })
}

/// One fan-out run: `clients` clients connect to a fresh gateway (RSS measured with none and
/// with all of them idle), then `rate` events/s go to Kafka for `seconds`; every client's
/// frames are checked against what its filter selects of what was produced.
async fn fanout(
    settings: &Settings,
    gateway: &GatewayChild,
    warm_up_topic: &str,
    topic: &str,
    clients: usize,
    options: &GatewayBenchOptions,
) -> anyhow::Result<Vec<BenchResult>> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_empty = rss_kib(gateway.pid);

    let crowd = Arc::new(Crowd {
        address: gateway.address,
        gate: Semaphore::new(CONNECTING_AT_ONCE),
        tally: Tally::default(),
        stop: CancellationToken::new(),
    });
    let (tally, stop) = (&crowd.tally, &crowd.stop);
    let connecting = Instant::now();
    // SSE clients first, then WebSocket ones: the RSS after each wave, idle, gives each
    // transport's cost per connection.
    let mut tasks = Vec::with_capacity(clients);
    let mut rss_after = Vec::new();
    for transport in [Transport::Sse, Transport::Ws] {
        for j in (0..clients).filter(|j| transport_of(*j) == transport) {
            tasks.push(tokio::spawn(client(j, crowd.clone())));
        }
        let deadline = Instant::now() + Duration::from_secs(180);
        while tally.ready.load(Ordering::Acquire) + tally.failed.load(Ordering::Relaxed)
            < tasks.len()
        {
            if Instant::now() > deadline {
                stop.cancel();
                anyhow::bail!(
                    "{} of {} clients connected within 180 s",
                    tally.ready.load(Ordering::Acquire),
                    tasks.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        rss_after.push((
            tasks.len() - tally.failed.load(Ordering::Relaxed),
            rss_kib(gateway.pid),
        ));
    }
    let failed = tally.failed.load(Ordering::Relaxed);
    eprintln!(
        "  {} clients connected in {:.1}s ({failed} failed)",
        clients - failed,
        connecting.elapsed().as_secs_f64()
    );
    let (sse_clients, rss_sse) = rss_after[0];
    let (all_clients, rss_idle) = rss_after[1];
    let per_connection = |from: Option<f64>, to: Option<f64>, n: usize| {
        from.zip(to).map(|(from, to)| (to - from) / n.max(1) as f64)
    };
    let idle_per_sse = per_connection(rss_empty, rss_sse, sse_clients);
    let idle_per_ws = per_connection(rss_sse, rss_idle, all_clients - sse_clients);

    let total = options.rate * options.seconds;
    let reader_stop = CancellationToken::new();
    let reader = {
        let (kafka, topic, stop) = (
            settings.kafka.clone(),
            topic.to_string(),
            reader_stop.clone(),
        );
        let partitions = options.partitions;
        tokio::spawn(async move { direct_consumer(&kafka, &topic, partitions, total, stop).await })
    };
    let producer = producer(&settings.kafka)?;
    warm_up(&producer, warm_up_topic).await?;
    // The reader's assignment settles before the clock starts.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (gateway_cpu_before, own_cpu_before) =
        (cpu_seconds(gateway.pid), cpu_seconds(std::process::id()));
    let started = Instant::now();
    let mut pacer = Pacer::new(options.rate);
    let mut ticker = tokio::time::interval(PACER_TICK);
    let mut deliveries = Vec::with_capacity(total as usize);
    let mut seq = 0;
    while seq < total {
        ticker.tick().await;
        for _ in 0..pacer.next_batch().min(total - seq) {
            let (service, action, key, value) = fanout_envelope(seq, now_us());
            let record = FutureRecord::to(topic)
                .key(key.as_str())
                .payload(value.as_slice())
                .headers(envelope_headers(&service, &action));
            match producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((error, _)) => anyhow::bail!("producing the fan-out traffic: {error}"),
            }
            seq += 1;
        }
    }
    let produced_in = started.elapsed().as_secs_f64();
    for delivery in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((error, _))) => anyhow::bail!("a fan-out event was not acknowledged: {error}"),
            Err(_) => anyhow::bail!("a fan-out event's delivery was cancelled"),
        }
    }

    // What each kind of event was produced: how many, and the sum of their sequence numbers.
    let mut per_kind = [(0u64, 0u64); KINDS];
    for seq in 0..total {
        let kind = &mut per_kind[(seq % KINDS as u64) as usize];
        kind.0 += 1;
        kind.1 += seq;
    }
    let expected_of = |kinds: &[usize]| {
        kinds.iter().fold((0, 0), |(n, sum), kind| {
            (n + per_kind[*kind].0, sum + per_kind[*kind].1)
        })
    };
    let expected_total: u64 = (0..clients)
        .map(|j| expected_of(&client_filter(j).1).0)
        .sum();
    // Until every frame arrived, or nothing arrives for 5 s (30 s at most).
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (tally.frames.load(Ordering::Relaxed), Instant::now());
    let mut last_frame_at = Instant::now();
    loop {
        let frames = tally.frames.load(Ordering::Relaxed);
        if frames != last.0 {
            last = (frames, Instant::now());
            last_frame_at = Instant::now();
        }
        if frames >= expected_total
            || last.1.elapsed() > Duration::from_secs(5)
            || Instant::now() > drain_deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = (last_frame_at - started).as_secs_f64().max(produced_in);
    let gateway_cpu = spent(gateway_cpu_before, cpu_seconds(gateway.pid));
    let own_cpu = spent(own_cpu_before, cpu_seconds(std::process::id()));
    let gateway_rss = peak_rss_mib(gateway.pid);
    stop.cancel();
    let mut outcomes = Vec::with_capacity(clients);
    for task in tasks {
        outcomes.push(task.await?);
    }
    reader_stop.cancel();
    let mut direct_latencies = reader.await??;

    // Every client against its filter's share of what was produced.
    let mut incomplete = 0u64;
    let mut dropped = 0u64;
    let mut lost = 0i64;
    let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
    for outcome in &outcomes {
        let (expected, expected_sum) = expected_of(&outcome.kinds);
        if outcome.frames != expected || outcome.seq_sum != expected_sum {
            incomplete += 1;
            lost += expected as i64 - outcome.frames as i64;
        }
        if let Some(reason) = &outcome.ended {
            dropped += 1;
            let transport = match outcome.transport {
                Transport::Sse => "SSE",
                Transport::Ws => "WS",
            };
            *reasons
                .entry(format!("{transport} {}", truncated(reason)))
                .or_default() += 1;
        }
    }
    let delivered: u64 = outcomes.iter().map(|o| o.frames).sum();
    let ended = if reasons.is_empty() {
        String::new()
    } else {
        let counts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n}× {r}")).collect();
        format!(": {}", counts.join(", "))
    };
    if incomplete > 0 {
        println!("gateway fan-out {clients}: LOST FRAMES — {incomplete} of {clients} clients did not receive exactly what their filters select by the end of the drain (30 s at most after the traffic; {lost} of {expected_total} frames short); {dropped} streams ended early{ended}");
    } else {
        println!(
            "gateway fan-out {clients}: every client received exactly the events its filter selects"
        );
    }

    let idle_per_connection = per_connection(rss_empty, rss_idle, all_clients);
    let mut baseline = BenchResult {
        ratio_to_baseline: Some(1.0),
        latency_ms: percentiles_ms(&mut direct_latencies),
        ..BenchResult::throughput(
            "gateway",
            format!("baseline: consumer, {clients} clients"),
            direct_latencies.len() as u64,
            seconds,
            None,
            None,
        )
    };
    baseline
        .details
        .insert("events_produced".into(), total as f64);
    let mut results = vec![baseline];

    let per_million = |cpu: Option<f64>, n: u64| cpu.map(|c| c / n.max(1) as f64 * 1e6);
    let mut all: Vec<u32> = Vec::with_capacity(delivered as usize);
    for outcome in &outcomes {
        all.extend_from_slice(&outcome.latencies_us);
    }
    let mut combined = BenchResult {
        cpu_seconds_per_million: per_million(gateway_cpu, delivered),
        ratio_to_baseline: Some(delivered as f64 / expected_total.max(1) as f64),
        latency_ms: percentiles_ms(&mut all),
        ..BenchResult::throughput(
            "gateway",
            format!("fan-out {clients} clients, SSE+WS"),
            delivered,
            seconds,
            None,
            gateway_rss,
        )
    };
    drop(all);
    let details = &mut combined.details;
    details.insert("clients".into(), clients as f64);
    details.insert("clients_failed_to_connect".into(), failed as f64);
    details.insert("clients_incomplete".into(), incomplete as f64);
    details.insert("clients_ended_early".into(), dropped as f64);
    details.insert("frames_expected".into(), expected_total as f64);
    details.insert("frames_lost".into(), lost as f64);
    details.insert("events_per_second".into(), options.rate as f64);
    if let Some(cpu) = gateway_cpu {
        details.insert("gateway_cores".into(), cpu / seconds);
    }
    if let Some(cpu) = own_cpu {
        details.insert("load_generator_cores".into(), cpu / seconds);
    }
    if let Some(kib) = rss_empty {
        details.insert("gateway_rss_no_clients_mib".into(), kib / 1024.0);
    }
    if let Some(kib) = rss_idle {
        details.insert("gateway_rss_idle_clients_mib".into(), kib / 1024.0);
    }
    if let Some(kib) = idle_per_connection {
        details.insert("rss_per_idle_connection_kib".into(), kib);
    }
    if let Some(kib) = idle_per_sse {
        details.insert("rss_per_idle_sse_kib".into(), kib);
    }
    if let Some(kib) = idle_per_ws {
        details.insert("rss_per_idle_ws_kib".into(), kib);
    }
    results.push(combined);

    for (transport, name) in [(Transport::Sse, "SSE"), (Transport::Ws, "WS")] {
        let mine: Vec<&ClientOutcome> = outcomes
            .iter()
            .filter(|o| o.transport == transport)
            .collect();
        let frames: u64 = mine.iter().map(|o| o.frames).sum();
        let expected: u64 = mine.iter().map(|o| expected_of(&o.kinds).0).sum();
        let mut latencies: Vec<u32> = mine
            .iter()
            .flat_map(|o| o.latencies_us.iter().copied())
            .collect();
        results.push(BenchResult {
            ratio_to_baseline: Some(frames as f64 / expected.max(1) as f64),
            latency_ms: percentiles_ms(&mut latencies),
            ..BenchResult::throughput(
                "gateway",
                format!("  {name}: {} clients", mine.len()),
                frames,
                seconds,
                None,
                None,
            )
        });
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_is_selected_by_about_three_percent_of_the_clients() {
        let clients = 1000;
        let mut selected = [0usize; KINDS];
        for j in 0..clients {
            let (filter, kinds) = client_filter(j);
            let parsed = eventpipe::filter::FilterSet::parse(&[filter.as_str()]).unwrap();
            for (kind, count) in selected.iter_mut().enumerate() {
                let matches = parsed.matches(&service_of(kind), &action_of(kind));
                assert_eq!(matches, kinds.contains(&kind), "{filter} and kind {kind}");
                *count += usize::from(matches);
            }
        }
        assert!(
            selected.iter().all(|&n| (20..=40).contains(&n)),
            "{selected:?}"
        );
        assert_eq!(selected.iter().sum::<usize>(), 3 * clients);
    }

    #[test]
    fn an_envelope_carries_its_numbers_and_is_about_300_bytes() {
        let (service, action, _, value) = fanout_envelope(1234, 1_700_000_000_000_000);
        assert_eq!((service.as_str(), action.as_str()), ("svc08", "act2"));
        assert!((250..=350).contains(&value.len()), "{}", value.len());
        assert_eq!(number_after(&value, b"\"bench_seq\":"), Some(1234));
        assert_eq!(
            number_after(&value, b"\"sent_us\":"),
            Some(1_700_000_000_000_000)
        );
        let envelope: serde_json::Value = serde_json::from_slice(&value).unwrap();
        assert!(eventpipe::envelope::Envelope::from_value(envelope).is_ok());
    }

    #[test]
    fn the_sse_decoder_undoes_chunks_split_anywhere() {
        let mut body = String::from(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
        );
        // Frames split over chunks and chunks holding parts of two frames.
        for chunk in [
            "retry: 2000\nid: ",
            "a\n\n",
            ":keep-alive\n\nid: b\nevent: x\ndata: {\"a\":1}\n\n",
        ] {
            body.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
        }
        body.push_str("0\r\n\r\n");
        for split in 1..body.len() {
            let mut decoder = SseDecoder::default();
            let mut blocks = Vec::new();
            for part in [&body.as_bytes()[..split], &body.as_bytes()[split..]] {
                decoder.push(part).unwrap();
                while let Some(block) = decoder.next_block() {
                    blocks.push(String::from_utf8(block).unwrap());
                }
            }
            assert_eq!(
                blocks,
                [
                    "retry: 2000\nid: a",
                    ":keep-alive",
                    "id: b\nevent: x\ndata: {\"a\":1}"
                ],
                "split at {split}"
            );
            assert!(decoder.ended, "split at {split}");
        }
    }

    #[test]
    fn percentiles_of_microseconds_are_in_milliseconds() {
        let mut samples: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        let p = percentiles_ms(&mut samples).unwrap();
        assert_eq!((p.p50, p.p99, p.max), (50.0, 99.0, 100.0));
    }
}
