//! Measurement helpers for benchmarks: process CPU time and peak memory from /proc, watermark
//! polling to know when a topic has received N records, and the result line format.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventpipe::codec::{Codec, SchemaName};
use eventpipe::config::KafkaSettings;
use eventpipe::generate::{self, GenerateOptions, TrafficKind};
use eventpipe::kafka::client::create_client;
use eventpipe::kafka::{ClientKind, KafkaError, PipelineContext};
use eventpipe::stage::Record;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Topics a benchmark creates for itself and deletes when it ends, whatever happened.
pub struct BenchTopics {
    admin: AdminClient<PipelineContext>,
    names: Vec<String>,
}

impl BenchTopics {
    /// Creates every (name, partitions) topic.
    pub async fn create(kafka: &KafkaSettings, topics: &[(String, i32)]) -> anyhow::Result<Self> {
        let admin: AdminClient<PipelineContext> =
            create_client(kafka, ClientKind::Admin, PipelineContext::default())?;
        let new_topics: Vec<NewTopic> = topics
            .iter()
            .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
            .collect();
        admin
            .create_topics(&new_topics, &AdminOptions::new())
            .await?;
        Ok(BenchTopics {
            admin,
            names: topics.iter().map(|(name, _)| name.clone()).collect(),
        })
    }

    pub async fn delete(self) {
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        if let Err(error) = self.admin.delete_topics(&names, &AdminOptions::new()).await {
            tracing::warn!(%error, "deleting benchmark topics");
        }
    }
}

/// Fills `topic` with `n` generated service envelopes (~300 bytes each), all acknowledged.
pub async fn preload_envelopes(kafka: &KafkaSettings, topic: &str, n: u64) -> anyhow::Result<()> {
    preload_envelopes_as(kafka, topic, n, &Codec::json(SchemaName::Envelope)).await
}

/// `preload_envelopes` in the topic's format per `codec` (the same envelopes: same seed).
pub async fn preload_envelopes_as(
    kafka: &KafkaSettings,
    topic: &str,
    n: u64,
    codec: &Codec,
) -> anyhow::Result<()> {
    eprintln!("preloading {n} envelopes into {topic}");
    let loaded = generate::run_encoded(
        kafka,
        GenerateOptions {
            kind: TrafficKind::Envelopes,
            count: n,
            rate: 0,
            seed: 1,
            users: 10_000,
            series: 1,
            topic: Some(topic.to_string()),
        },
        codec,
        CancellationToken::new(),
    )
    .await?;
    anyhow::ensure!(loaded == n, "preloaded {loaded} of {n}");
    Ok(())
}

/// Reads the first `n` records of `topic` from the start of its `partitions` (a manual
/// assignment: nothing is committed) and hands each to `each` as a stage sees it.
pub fn read_backlog(
    kafka: &KafkaSettings,
    topic: &str,
    partitions: i32,
    n: u64,
    mut each: impl FnMut(&Record<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer<PipelineContext> =
        from_beginning(kafka, &format!("{topic}-backlog-reader"), topic, partitions)?;
    let name: Arc<str> = topic.into();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut read = 0;
    while read < n {
        anyhow::ensure!(Instant::now() < deadline, "read {read} of {n} records");
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        each(&Record::from_message(&message?, &name))?;
        read += 1;
    }
    Ok(())
}

/// A consumer of `partitions` of `topic` from their beginning: a manual assignment, nothing
/// committed (librdkafka still wants a group id: `group`).
pub fn from_beginning<C>(
    kafka: &KafkaSettings,
    group: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<C>
where
    C: Consumer<PipelineContext> + rdkafka::config::FromClientConfigAndContext<PipelineContext>,
{
    let mut kafka = kafka.clone();
    kafka.properties.insert("group.id".into(), group.into());
    let consumer: C = create_client(&kafka, ClientKind::Consumer, PipelineContext::default())?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

/// Sends one record, waiting while librdkafka's queue is full (the background thread drains it);
/// any other error is returned.
pub fn send_waiting<C: ProducerContext>(
    producer: &ThreadedProducer<C>,
    mut record: BaseRecord<'_, [u8], [u8], C::DeliveryOpaque>,
) -> anyhow::Result<()> {
    while let Err((error, returned)) = producer.send(record) {
        anyhow::ensure!(
            matches!(
                error,
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull
                )
            ),
            "produce: {error}"
        );
        record = returned;
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// One benchmark result: printed as a table row and as a JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub bench: String,
    pub variant: String,
    pub records: u64,
    pub seconds: f64,
    pub records_per_second: f64,
    /// CPU seconds (user + system) of the measured process per million records.
    pub cpu_seconds_per_million: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    /// This variant's throughput divided by the baseline's, measured in the same run.
    pub ratio_to_baseline: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<Percentiles>,
    /// CPU seconds per million records of the database server processes that served this
    /// variant (PostgreSQL's backends), where the sink runs on this machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_seconds_per_million: Option<f64>,
    /// Figures of this workload's own that the columns do not hold (e.g. the gateway's RSS per
    /// idle connection, frames lost), by name; in the JSON line as fields of their own.
    #[serde(flatten)]
    pub details: BTreeMap<String, f64>,
}

impl BenchResult {
    /// A throughput result: `n` records in `seconds`, with the measured process's CPU and memory.
    pub fn throughput(
        bench: &str,
        variant: impl Into<String>,
        n: u64,
        seconds: f64,
        cpu_seconds: Option<f64>,
        peak_rss_mib: Option<f64>,
    ) -> BenchResult {
        BenchResult {
            bench: bench.into(),
            variant: variant.into(),
            records: n,
            seconds,
            records_per_second: n as f64 / seconds,
            cpu_seconds_per_million: cpu_seconds.map(|c| c / n as f64 * 1e6),
            peak_rss_mib,
            ratio_to_baseline: None,
            latency_ms: None,
            server_cpu_seconds_per_million: None,
            details: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// Exact percentiles (nearest rank) of the samples, in the samples' unit.
    pub fn of(samples: &mut [f64]) -> Option<Percentiles> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            samples[(((samples.len() as f64) * q).ceil() as usize).clamp(1, samples.len()) - 1]
        };
        Some(Percentiles {
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: samples[samples.len() - 1],
        })
    }
}

/// Prints the results as a table, then one JSON line each. The server's CPU has a column only
/// when some result measured it.
pub fn report(results: &[BenchResult]) {
    let server = results
        .iter()
        .any(|r| r.server_cpu_seconds_per_million.is_some());
    let opt =
        |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    let server_column = |text: String| {
        if server {
            format!(" {text:>11}")
        } else {
            String::new()
        }
    };
    println!(
        "{:<10} {:<34} {:>10} {:>8} {:>11} {:>9}{} {:>9} {:>7} {:>28}",
        "BENCH",
        "VARIANT",
        "RECORDS",
        "SECONDS",
        "RECORDS/S",
        "CPU-S/M",
        server_column("PG-CPU-S/M".into()),
        "RSS-MiB",
        "RATIO",
        "LATENCY ms p50/p90/p99/max"
    );
    for r in results {
        let latency = r.latency_ms.as_ref().map_or("-".to_string(), |l| {
            format!("{:.1}/{:.1}/{:.1}/{:.1}", l.p50, l.p90, l.p99, l.max)
        });
        println!(
            "{:<10} {:<34} {:>10} {:>8.2} {:>11.0} {:>9}{} {:>9} {:>7} {:>28}",
            r.bench,
            r.variant,
            r.records,
            r.seconds,
            r.records_per_second,
            opt(r.cpu_seconds_per_million, 2),
            server_column(opt(r.server_cpu_seconds_per_million, 2)),
            opt(r.peak_rss_mib, 1),
            opt(r.ratio_to_baseline, 3),
            latency
        );
        if !r.details.is_empty() {
            let details: Vec<String> = r
                .details
                .iter()
                .map(|(name, value)| format!("{name}={}", round_for_display(*value)))
                .collect();
            println!("{:<10} {}", "", details.join(" "));
        }
    }
    for r in results {
        println!("{}", serde_json::to_string(r).expect("results serialize"));
    }
}

/// A detail's value as the table shows it: whole numbers as they are, others to 3 decimals.
fn round_for_display(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value:.3}")
    }
}

/// CPU seconds (user + system) a process has used so far, from /proc/<pid>/stat.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"), 11)
}

/// CPU seconds the calling thread has used so far: what a single-threaded in-process workload
/// costs, without the idle Kafka client threads the same process may also hold.
pub fn thread_cpu_seconds() -> Option<f64> {
    stat_cpu_seconds("/proc/thread-self/stat", 11)
}

/// CPU seconds of this process's children that have exited and been waited for (cutime +
/// cstime), grandchildren included: the cost of a tool run through wrapper scripts.
pub fn children_cpu_seconds() -> Option<f64> {
    stat_cpu_seconds("/proc/self/stat", 13)
}

/// Sums two adjacent tick fields of a /proc stat file, counted from after the command name.
fn stat_cpu_seconds(path: &str, first: usize) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesised command name: index 11/12 are utime and stime (fields 14
    // and 15), 13/14 are cutime and cstime (fields 16 and 17).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields.get(first)?.parse::<f64>().ok()? + fields.get(first + 1)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    // Linux has used USER_HZ = 100 on every mainstream architecture for decades.
    100.0
}

/// Peak resident memory (VmHWM) of a process in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    Some(status_kib(pid, "VmHWM:")? / 1024.0)
}

/// Resident memory now (VmRSS) of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmRSS:")
}

/// A `kB` line of /proc/<pid>/status.
fn status_kib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Watches a topic's high watermarks (the number of records written, for a fresh topic).
pub struct TopicWatcher {
    consumer: BaseConsumer<PipelineContext>,
    topic: String,
    partitions: i32,
}

impl TopicWatcher {
    pub fn new(settings: &KafkaSettings, topic: &str, partitions: i32) -> Result<Self, KafkaError> {
        let mut kafka = settings.clone();
        kafka
            .properties
            .insert("group.id".into(), "eventpipe-bench-watcher".into());
        Ok(TopicWatcher {
            consumer: create_client(&kafka, ClientKind::Consumer, PipelineContext::default())?,
            topic: topic.to_string(),
            partitions,
        })
    }

    /// Records written to the topic so far (sum of high watermarks).
    pub fn written(&self) -> Result<u64, KafkaError> {
        let mut total = 0;
        for partition in 0..self.partitions {
            let (_, high) = self
                .consumer
                .fetch_watermarks(&self.topic, partition, Duration::from_secs(10))
                .map_err(KafkaError::Client)?;
            total += high.max(0) as u64;
        }
        Ok(total)
    }

    /// Blocks until `target` records were written or `timeout` passes; returns when it reached it.
    pub fn wait_for(&self, target: u64, timeout: Duration) -> Result<Option<Instant>, KafkaError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.written()? >= target {
                return Ok(Some(Instant::now()));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts `eventpipe` with Kafka's address, warn-level logs and /metrics on a free port, then
/// `args` (the stage and its flags); returns the child and its metrics port. Its standard output
/// (the summary line a stop prints) is discarded: the benchmark prints its own.
pub fn start_stage(
    eventpipe: &Path,
    kafka: &KafkaSettings,
    args: &[&str],
) -> anyhow::Result<(Child, u16)> {
    let port = free_port()?;
    let child = Command::new(eventpipe)
        .args([
            "--bootstrap-servers",
            &kafka.bootstrap_servers,
            "--metrics-address",
            &format!("127.0.0.1:{port}"),
            "--log-level",
            "warn",
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    Ok((child, port))
}

/// A free loopback port for a child's /metrics endpoint.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The sum of the named series (without labels) in a Prometheus text exposition.
pub fn metric_sum(text: &str, names: &[&str]) -> f64 {
    text.lines()
        .filter(|line| {
            names.iter().any(|name| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' '))
            })
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The sum of the named counters on a child's /metrics; `None` while it does not answer.
pub async fn scrape(http: &reqwest::Client, port: u16, names: &[&str]) -> Option<f64> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let text = http.get(&url).send().await.ok()?.text().await.ok()?;
    Some(metric_sum(&text, names))
}

/// Polls a child stage's /metrics until the named counters sum to `target`; returns when, or
/// `None` on timeout. Fails if the child exits first (it cannot get there any more).
pub async fn wait_for_metric(
    child: &mut Child,
    port: u16,
    names: &[&str],
    target: f64,
    timeout: Duration,
) -> anyhow::Result<Option<Instant>> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if scrape(&http, port, names)
            .await
            .is_some_and(|v| v >= target)
        {
            return Ok(Some(Instant::now()));
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the stage exited early ({status})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(None)
}

/// Ends a child once its measurement is over: nothing left to commit matters, so no drain.
pub fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&mut samples).unwrap();
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
        assert!(Percentiles::of(&mut []).is_none());
    }

    #[test]
    fn reads_this_process_cpu_and_memory() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(peak_rss_mib(pid).unwrap() > 1.0);
        assert!(rss_kib(pid).unwrap() > 1024.0);
        assert!(thread_cpu_seconds().unwrap() >= 0.0);
        assert!(children_cpu_seconds().unwrap() >= 0.0);
    }

    #[test]
    fn sums_unlabelled_series_by_exact_name() {
        let text = "# HELP a_total help\na_total 3\na_total_more 100\nb_total 4.5\nc{x=\"1\"} 9\n";
        assert_eq!(metric_sum(text, &["a_total", "b_total"]), 7.5);
        assert_eq!(metric_sum(text, &["missing"]), 0.0);
    }
}
