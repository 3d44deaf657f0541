//! The broker benchmark: Kafka's own perf tools (ProducerPerformance, ConsumerPerformance) run on
//! the same machine with the dispatch benchmark's records: the ceiling the broker itself sets.

use std::io::Write;
use std::process::{Command, Stdio};

use eventpipe::config::Settings;
use eventpipe::generate::{Generator, TrafficKind};

use crate::measure::{children_cpu_seconds, BenchResult, BenchTopics};

/// Distinct envelopes in the payload file; the producer tool picks one at random per record.
const PAYLOADS: usize = 10_000;

/// `eventpipe-bench broker`: how many records the perf tools send and read, over how many
/// partitions.
#[derive(Debug, clap::Args)]
pub struct BrokerBenchOptions {
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
}

/// Runs the producer tool into a fresh topic, then the consumer tool over what it wrote.
pub async fn run(
    settings: &Settings,
    options: BrokerBenchOptions,
) -> anyhow::Result<Vec<BenchResult>> {
    let BrokerBenchOptions {
        records,
        partitions,
    } = options;
    anyhow::ensure!(records > 0, "--records must be at least 1");
    anyhow::ensure!(partitions > 0, "--partitions must be at least 1");
    let topic = format!("bench-broker-{}", chrono::Utc::now().format("%Y%m%d%H%M%S"));
    let bench_topics = BenchTopics::create(&settings.kafka, &[(topic.clone(), partitions)]).await?;
    let payloads = std::env::temp_dir().join(format!("{topic}-payloads.txt"));
    let outcome = match write_payloads(&payloads) {
        Ok(()) => tools(settings, &topic, &payloads, records),
        Err(error) => Err(error),
    };
    let _ = std::fs::remove_file(&payloads);
    bench_topics.delete().await;
    outcome
}

/// The dispatch benchmark's envelopes (~300 bytes), one per line, for `--payload-file`.
fn write_payloads(path: &std::path::Path) -> anyhow::Result<()> {
    let mut generator = Generator::new(TrafficKind::Envelopes, 1, 10_000, 1, None);
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut bytes = 0;
    for _ in 0..PAYLOADS {
        // Compact JSON never contains a raw newline: the tool's default delimiter is safe.
        let record = generator.next_record(chrono::Utc::now());
        bytes += record.value.len();
        file.write_all(&record.value)?;
        file.write_all(b"\n")?;
    }
    file.flush()?;
    eprintln!(
        "payloads: {PAYLOADS} envelopes, {} bytes on average",
        bytes / PAYLOADS
    );
    Ok(())
}

fn tools(
    settings: &Settings,
    topic: &str,
    payloads: &std::path::Path,
    records: u64,
) -> anyhow::Result<Vec<BenchResult>> {
    let bootstrap = &settings.kafka.bootstrap_servers;
    let n = records.to_string();
    eprintln!("kafka ProducerPerformance: {records} records into {topic}");
    let payloads = payloads.to_string_lossy();
    // eventpipe's producer settings (kafka::client), so the rate compares with its producers.
    let (output, cpu) = kafka_tool(&[
        "org.apache.kafka.tools.ProducerPerformance",
        "--topic",
        topic,
        "--num-records",
        &n,
        "--throughput",
        "-1",
        "--payload-file",
        &payloads,
        "--producer-props",
        &format!("bootstrap.servers={bootstrap}"),
        "acks=all",
        "enable.idempotence=true",
        "compression.type=lz4",
        "linger.ms=1",
    ])?;
    let rate = producer_rate(&output)
        .ok_or_else(|| anyhow::anyhow!("no summary line in ProducerPerformance output"))?;
    let produced = result(
        "kafka producer perf test (acks=all, lz4)",
        records,
        rate,
        cpu,
    );

    eprintln!("kafka ConsumerPerformance: {records} records from {topic}");
    let (output, cpu) = kafka_tool(&[
        "org.apache.kafka.tools.ConsumerPerformance",
        "--bootstrap-server",
        bootstrap,
        "--topic",
        topic,
        "--num-records",
        &n,
        "--group",
        &format!("{topic}-perf"),
        "--timeout",
        "60000",
    ])?;
    let rate = consumer_rate(&output)
        .ok_or_else(|| anyhow::anyhow!("no nMsg.sec in ConsumerPerformance output"))?;
    let consumed = result("kafka consumer perf test", records, rate, cpu);
    Ok(vec![produced, consumed])
}

/// A tool's own rate (it times itself, without the JVM start), with the CPU of the whole run.
fn result(variant: &str, records: u64, rate: f64, cpu: Option<f64>) -> BenchResult {
    BenchResult::throughput("broker", variant, records, records as f64 / rate, cpu, None)
}

/// Runs a Kafka tool class through `scripts/stack kafka-tool`; returns its stdout and the CPU
/// seconds it used (JVM start and JIT included: what running the tool costs).
fn kafka_tool(args: &[&str]) -> anyhow::Result<(String, Option<f64>)> {
    let stack = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack");
    let before = children_cpu_seconds();
    let output = Command::new(stack)
        .arg("kafka-tool")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()?;
    let cpu = children_cpu_seconds()
        .zip(before)
        .map(|(after, before)| after - before);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    // The raw output goes to stdout too, so scripts/bench keeps it with the figures.
    for line in stdout.lines() {
        println!("# {line}");
    }
    anyhow::ensure!(
        output.status.success(),
        "{} failed ({})",
        args[0],
        output.status
    );
    Ok((stdout, cpu))
}

/// Records/s from ProducerPerformance's summary: `N records sent, R records/sec (...), ...`.
fn producer_rate(output: &str) -> Option<f64> {
    let line = output.lines().rev().find(|l| l.contains("records sent"))?;
    let (_, after) = line.split_once("records sent,")?;
    after.split_whitespace().next()?.parse().ok()
}

/// nMsg.sec from ConsumerPerformance's CSV (header line, then one line of values): records over
/// the whole run, group join included, as the other benchmarks' consumers are timed.
fn consumer_rate(output: &str) -> Option<f64> {
    let mut lines = output.lines().skip_while(|l| !l.contains("nMsg.sec"));
    let header: Vec<&str> = lines.next()?.split(',').map(str::trim).collect();
    let values: Vec<&str> = lines.next()?.split(',').map(str::trim).collect();
    let column = header.iter().position(|h| *h == "nMsg.sec")?;
    values.get(column)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_tools_summaries() {
        let producer = "500000 records sent, 100000.0 records/sec (28.61 MB/sec), 3.1 ms avg latency\n\
            1000000 records sent, 131926.121372 records/sec (37.74 MB/sec), 2.50 ms avg latency, 250.00 ms max latency\n";
        assert_eq!(producer_rate(producer), Some(131_926.121372));
        let consumer = "start.time, end.time, data.consumed.in.MB, MB.sec, data.consumed.in.nMsg, nMsg.sec, rebalance.time.ms, fetch.time.ms, fetch.MB.sec, fetch.nMsg.sec\n\
            2026-11-23 20:00:00:000, 2026-11-23 20:00:05:000, 286.1, 57.2, 1000000, 200000.0, 3000, 2000, 143.0, 500000.0\n";
        assert_eq!(consumer_rate(consumer), Some(200_000.0));
        assert_eq!(producer_rate("nothing"), None);
        assert_eq!(consumer_rate("nothing"), None);
    }
}
