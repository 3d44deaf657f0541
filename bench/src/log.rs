//! The log benchmark: documents per second of `eventpipe log` over a preloaded backlog, next to
//! a baseline that bulk-loads the same documents from a file with the same batch size, same run.

use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use eventpipe::config::Settings;
use eventpipe::log::bulk::ItemOutcome;
use eventpipe::log::elasticsearch::Elasticsearch;
use eventpipe::log::{document_lines, install_template, LogArgs, LogSettings};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::measure::{
    cpu_seconds, kill, peak_rss_mib, preload_envelopes, read_backlog, start_stage, wait_for_metric,
    BenchResult, BenchTopics,
};

/// `eventpipe-bench log`: the backlog and the bulk settings shared by the stage and baselines.
#[derive(Debug, clap::Args)]
pub struct LogBenchOptions {
    #[arg(long, default_value_t = 200_000)]
    pub records: u64,
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// Documents per bulk request, for the stage and the baseline alike.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// Bulk requests in flight, for the stage and the baseline alike (the stage's default).
    #[arg(long = "bulk-concurrency", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub concurrency: u32,
    /// Skip the extra baseline that sends one bulk request at a time (what concurrency buys).
    #[arg(long = "no-sequential-baseline", action = clap::ArgAction::SetFalse)]
    pub sequential_baseline: bool,
}

/// Runs the baseline and the stage over the same records; results baseline first.
/// `eventpipe` is the binary whose `log` is measured.
pub async fn run(
    settings: &Settings,
    eventpipe: &Path,
    options: LogBenchOptions,
) -> anyhow::Result<Vec<BenchResult>> {
    let base = format!("bench-log-{}", chrono::Utc::now().format("%Y%m%d%H%M%S"));
    let input = format!("{base}-in");
    let topics = [
        (input.clone(), options.partitions),
        (format!("{input}.dlq"), 1),
    ];
    let bench_topics = BenchTopics::create(&settings.kafka, &topics).await?;
    let outcome = workloads(settings, eventpipe, &options, &base, &input).await;
    bench_topics.delete().await;
    let _ = delete_indices(settings, &format!("{base}-*")).await;
    if let Ok(url) = settings
        .elasticsearch_url
        .join(&format!("_index_template/{base}-*"))
    {
        let _ = reqwest::Client::new().delete(url).send().await;
    }
    outcome
}

/// Deletes the indices matching `pattern` by name (clusters may refuse wildcard deletes).
async fn delete_indices(settings: &Settings, pattern: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let list = settings
        .elasticsearch_url
        .join(&format!("_cat/indices/{pattern}?h=index&format=json"))?;
    let indices: Vec<serde_json::Value> = http
        .get(list)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    for index in indices.iter().filter_map(|i| i["index"].as_str()) {
        http.delete(settings.elasticsearch_url.join(index)?)
            .send()
            .await?
            .error_for_status()?;
    }
    Ok(())
}

/// Settings of one variant: its own index pattern and template, the same batch size, and
/// `concurrency` bulk requests in flight.
fn variant(
    settings: &Settings,
    base: &str,
    name: &str,
    batch_size: usize,
    concurrency: u32,
) -> anyhow::Result<LogSettings> {
    let args = LogArgs {
        index_pattern: Some(format!("{base}-{name}-%Y.%m.%d")),
        template_name: Some(format!("{base}-{name}")),
        batch_size: Some(u32::try_from(batch_size)?),
        bulk_concurrency: Some(concurrency),
        ..Default::default()
    };
    Ok(LogSettings::load(&args, settings)?)
}

async fn workloads(
    settings: &Settings,
    eventpipe: &Path,
    options: &LogBenchOptions,
    base: &str,
    input: &str,
) -> anyhow::Result<Vec<BenchResult>> {
    let n = options.records;
    preload_envelopes(&settings.kafka, input, n).await?;

    let raw = variant(
        settings,
        base,
        "raw",
        options.batch_size,
        options.concurrency,
    )?;
    let file = std::env::temp_dir().join(format!("{base}-bulk.ndjson"));
    eprintln!("writing the same documents to {}", file.display());
    write_bulk_file(settings, &raw, input, options.partitions, n, &file)?;
    let baselines = baselines(settings, options, base, &raw, &file, n).await;
    let _ = std::fs::remove_file(&file);
    let mut results = baselines?;
    let baseline_rate = results[0].records_per_second;

    eprintln!("eventpipe log over the {n}-record backlog");
    let staged = variant(
        settings,
        base,
        "log",
        options.batch_size,
        options.concurrency,
    )?;
    let mut stage = stage_run(
        settings,
        &staged,
        eventpipe,
        input,
        &format!("{base}-group"),
        n,
    )
    .await?;
    stage.ratio_to_baseline = Some(stage.records_per_second / baseline_rate);
    results.push(stage);
    Ok(results)
}

/// The like-for-like baseline (the stage's concurrency) first, then optionally one request at a
/// time; ratios are to the first. The file names its index, so the second run starts from a
/// deleted index (else every document would already exist and nothing would be indexed).
async fn baselines(
    settings: &Settings,
    options: &LogBenchOptions,
    base: &str,
    raw: &LogSettings,
    file: &Path,
    n: u64,
) -> anyhow::Result<Vec<BenchResult>> {
    eprintln!(
        "baseline: bulk-load {} in batches of {}, {} in flight",
        file.display(),
        options.batch_size,
        options.concurrency
    );
    let mut baseline = bulk_from_file(settings, raw, file, n).await?;
    baseline.ratio_to_baseline = Some(1.0);
    let mut results = vec![baseline];
    if options.sequential_baseline && options.concurrency > 1 {
        eprintln!("baseline: the same, one request at a time");
        delete_indices(settings, &format!("{base}-raw-*")).await?;
        let sequential = variant(settings, base, "raw", options.batch_size, 1)?;
        let mut result = bulk_from_file(settings, &sequential, file, n).await?;
        result.ratio_to_baseline = Some(result.records_per_second / results[0].records_per_second);
        results.push(result);
    }
    Ok(results)
}

/// Reads the backlog once and writes the bulk lines the stage would send, with its mapping.
fn write_bulk_file(
    settings: &Settings,
    log: &LogSettings,
    input: &str,
    partitions: i32,
    n: u64,
    path: &Path,
) -> anyhow::Result<()> {
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    read_backlog(&settings.kafka, input, partitions, n, |record| {
        if let Ok(lines) = document_lines(record, record.payload, log) {
            out.write_all(&lines)?;
        }
        Ok(())
    })?;
    out.flush()?;
    Ok(())
}

/// The next bulk body of up to `batch_size` documents (two lines each: action and source).
fn next_batch(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    batch_size: usize,
) -> std::io::Result<Option<(Vec<u8>, usize)>> {
    let mut body = Vec::new();
    let mut items = 0;
    while items < batch_size {
        let (Some(action), Some(source)) = (lines.next(), lines.next()) else {
            break;
        };
        for line in [action?, source?] {
            body.extend_from_slice(line.as_bytes());
            body.push(b'\n');
        }
        items += 1;
    }
    Ok((items > 0).then_some((body, items)))
}

/// The baseline: the file's documents in bulk requests of the same size, with up to
/// `log.bulk_concurrency` requests in flight, as the stage sends them.
async fn bulk_from_file(
    settings: &Settings,
    log: &LogSettings,
    path: &Path,
    n: u64,
) -> anyhow::Result<BenchResult> {
    let client = Elasticsearch::new(&settings.elasticsearch_url, log)?;
    anyhow::ensure!(
        install_template(&client, log, &CancellationToken::new()).await?,
        "index template not installed"
    );
    let cpu_before = cpu_seconds(std::process::id());
    let started = Instant::now();
    let mut lines = std::io::BufReader::new(std::fs::File::open(path)?).lines();
    let batches = std::iter::from_fn(|| next_batch(&mut lines, log.batch_size).transpose());
    let client = &client;
    let mut requests = futures::stream::iter(batches)
        .map(|batch| async move {
            let (body, items) = batch?;
            anyhow::Ok(client.bulk(body, items).await?)
        })
        .buffer_unordered(log.bulk_concurrency.max(1));
    let mut indexed = 0u64;
    while let Some(outcomes) = requests.next().await {
        indexed += outcomes?
            .iter()
            .filter(|o| matches!(o, ItemOutcome::Indexed))
            .count() as u64;
    }
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(indexed == n, "baseline indexed {indexed} of {n}");
    let cpu = cpu_seconds(std::process::id())
        .zip(cpu_before)
        .map(|(a, b)| a - b);
    Ok(log_result(
        format!(
            "baseline: bulk from file, batch {}, {} in flight",
            log.batch_size, log.bulk_concurrency
        ),
        n,
        seconds,
        cpu,
        None,
    ))
}

/// A throughput result of this benchmark.
fn log_result(
    variant: String,
    n: u64,
    seconds: f64,
    cpu: Option<f64>,
    rss: Option<f64>,
) -> BenchResult {
    BenchResult::throughput("log", variant, n, seconds, cpu, rss)
}

/// The stage as users run it (`eventpipe log`), timed from start until `n` documents are
/// acknowledged, as its own /metrics reports.
async fn stage_run(
    settings: &Settings,
    log: &LogSettings,
    eventpipe: &Path,
    input: &str,
    group: &str,
    n: u64,
) -> anyhow::Result<BenchResult> {
    let started = Instant::now();
    let (mut child, port) = start_stage(
        eventpipe,
        &settings.kafka,
        &[
            "--elasticsearch-url",
            settings.elasticsearch_url.as_str(),
            "log",
            "--input-topic",
            input,
            "--group-id",
            group,
            "--index-pattern",
            log.index_pattern.as_str(),
            "--template-name",
            &log.template_name,
            "--batch-size",
            &log.batch_size.to_string(),
            "--bulk-concurrency",
            &log.bulk_concurrency.to_string(),
        ],
    )?;
    let done = wait_for_metric(
        &mut child,
        port,
        &[
            "eventpipe_log_indexed_total",
            "eventpipe_log_already_indexed_total",
        ],
        n as f64,
        Duration::from_secs(1800),
    )
    .await;
    let pid = child.id();
    let (cpu, rss) = (cpu_seconds(pid), peak_rss_mib(pid));
    kill(child);
    let seconds = (done?.ok_or_else(|| anyhow::anyhow!("the stage did not index the backlog"))?
        - started)
        .as_secs_f64();
    Ok(log_result(
        format!(
            "eventpipe log, batch {}, {} in flight",
            log.batch_size, log.bulk_concurrency
        ),
        n,
        seconds,
        cpu,
        rss,
    ))
}
