//! The store benchmark: rows per second of `eventpipe store` into an empty `events` table, next
//! to one raw COPY of the same rows and a services-style Python consumer, each in a fresh database.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use eventpipe::config::Settings;
use eventpipe::store::row::{copy_rows, StoredRow, COPY_COLUMNS};
use eventpipe::store::{schema, FileStore, StoreArgs, StoreSettings};
use sqlx::{Connection, PgConnection};
use tokio::io::AsyncBufReadExt;

use crate::measure::{
    cpu_seconds, kill, peak_rss_mib, preload_envelopes, read_backlog, start_stage, wait_for_metric,
    BenchResult, BenchTopics,
};

/// `eventpipe-bench store`: the records, and the Python that runs the services-style baseline.
#[derive(Debug, clap::Args)]
pub struct StoreBenchOptions {
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// A Python with confluent-kafka and psycopg, to also run the services-style store
    /// (bench/reference_store.py) as a baseline.
    #[arg(long, env = "EVENTPIPE_BENCH_PYTHON")]
    pub python: Option<PathBuf>,
}

/// COPY data is sent in messages of this size (a row may span two: COPY does not mind).
const COPY_CHUNK_BYTES: usize = 1 << 20;

/// The stage's counters of rows written, new or already there: the backlog is stored when they
/// add up to it.
const STORED_ROWS: [&str; 2] = [
    r#"eventpipe_store_rows_total{outcome="stored"}"#,
    r#"eventpipe_store_rows_total{outcome="already_stored"}"#,
];

/// Runs the raw COPY, the stage and the Python consumer over the same records, each into a fresh
/// database; results raw COPY first (the ratios are to it). `eventpipe` is the binary measured.
pub async fn run(
    settings: &Settings,
    eventpipe: &Path,
    options: StoreBenchOptions,
) -> anyhow::Result<Vec<BenchResult>> {
    let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S");
    let input = format!("bench-store-{stamp}-in");
    let topics = [
        (input.clone(), options.partitions),
        (format!("{input}.dlq"), 1),
    ];
    let bench_topics = BenchTopics::create(&settings.kafka, &topics).await?;
    let mut databases = Databases {
        server: settings.postgres_url.clone(),
        prefix: format!("bench_store_{stamp}"),
        created: Vec::new(),
    };
    let outcome = workloads(settings, eventpipe, &options, &input, &mut databases).await;
    databases.drop_all().await;
    bench_topics.delete().await;
    outcome
}

async fn workloads(
    settings: &Settings,
    eventpipe: &Path,
    options: &StoreBenchOptions,
    input: &str,
    databases: &mut Databases,
) -> anyhow::Result<Vec<BenchResult>> {
    let n = options.records;
    preload_envelopes(&settings.kafka, input, n).await?;
    // The settings the stage resolves for the same flags: the same rows, the same batches.
    let store = StoreSettings::resolve(
        &StoreArgs {
            topics: Some(vec![input.to_string()]),
            ..StoreArgs::default()
        },
        &FileStore::default(),
    )?;

    eprintln!("building the COPY text of the same {n} records");
    let mut copy = CopyText::of_backlog(settings, &store, input, options.partitions, n)?;
    eprintln!(
        "baseline: one COPY of {} MiB into an empty events table",
        copy.text.len() >> 20
    );
    let database = databases.fresh("copy").await?;
    let mut raw = raw_copy(databases, &database, &copy, n).await?;
    let days = std::mem::take(&mut copy.days);
    drop(copy);
    raw.ratio_to_baseline = Some(1.0);
    let baseline_rate = raw.records_per_second;
    let mut results = vec![raw];

    eprintln!("eventpipe store over the {n}-record backlog");
    let database = databases.fresh("stage").await?;
    let mut stage = stage_run(settings, &store, eventpipe, databases, &database, n).await?;
    stage.ratio_to_baseline = Some(stage.records_per_second / baseline_rate);
    let stage_rate = stage.records_per_second;
    results.push(stage);

    if let Some(python) = &options.python {
        eprintln!("baseline: the services' Python consumer (bench/reference_store.py)");
        let database = databases.fresh("python").await?;
        let mut reference =
            python_run(settings, python, databases, &database, &days, input, n).await?;
        reference.ratio_to_baseline = Some(reference.records_per_second / baseline_rate);
        println!(
            "store: eventpipe / raw COPY = {:.3}, eventpipe / Python = {:.2}",
            stage_rate / baseline_rate,
            stage_rate / reference.records_per_second
        );
        results.push(reference);
    } else {
        println!(
            "store: eventpipe / raw COPY = {:.3}",
            stage_rate / baseline_rate
        );
    }
    Ok(results)
}

/// The rows of the backlog in COPY's text format, as the stage makes them, and their days.
struct CopyText {
    text: Vec<u8>,
    days: BTreeSet<NaiveDate>,
}

impl CopyText {
    fn of_backlog(
        settings: &Settings,
        store: &StoreSettings,
        input: &str,
        partitions: i32,
        n: u64,
    ) -> anyhow::Result<CopyText> {
        let mut copy = CopyText {
            text: Vec::new(),
            days: BTreeSet::new(),
        };
        read_backlog(&settings.kafka, input, partitions, n, |record| {
            let row = StoredRow::from_json_topic(record, store.max_json_bytes);
            copy.days.insert(schema::day_of(row.kafka_time()));
            copy_rows([&row], &mut copy.text);
            Ok(())
        })?;
        Ok(copy)
    }
}

/// A database of this run, with the store's schema or to get it.
struct Database {
    name: String,
    url: String,
}

/// The databases a run creates on the stack's server, each dropped when it ends.
struct Databases {
    server: reqwest::Url,
    prefix: String,
    created: Vec<String>,
}

impl Databases {
    async fn admin(&self) -> sqlx::Result<PgConnection> {
        PgConnection::connect(self.server.as_str()).await
    }

    /// A new empty database named after the run and `variant`.
    async fn fresh(&mut self, variant: &str) -> anyhow::Result<Database> {
        let name = format!("{}_{variant}", self.prefix);
        // Names are ours (a timestamp and a fixed word): nothing to quote.
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut self.admin().await?)
            .await?;
        self.created.push(name.clone());
        let mut url = self.server.clone();
        url.set_path(&format!("/{name}"));
        Ok(Database {
            name,
            url: url.to_string(),
        })
    }

    /// Writes out what earlier variants left dirty, so each starts from the same state.
    async fn checkpoint(&self) -> anyhow::Result<()> {
        sqlx::query("CHECKPOINT")
            .execute(&mut self.admin().await?)
            .await?;
        Ok(())
    }

    /// CPU seconds so far of the client backends connected to `database` (on this machine).
    async fn backends_cpu(&self, database: &Database) -> Option<f64> {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'",
        )
        .bind(&database.name)
        .fetch_all(&mut self.admin().await.ok()?)
        .await
        .ok()?;
        pids.iter().map(|&pid| cpu_seconds(pid as u32)).sum()
    }

    async fn drop_all(&self) {
        let Ok(mut admin) = self.admin().await else {
            tracing::warn!("could not connect to drop the benchmark databases");
            return;
        };
        for name in &self.created {
            let statement = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            if let Err(error) = sqlx::query(&statement).execute(&mut admin).await {
                tracing::warn!(%error, database = %name, "dropping a benchmark database");
            }
        }
    }
}

/// Rows in `database`'s `events`: every variant must have stored the backlog exactly once.
async fn check_stored(database: &Database, n: u64) -> anyhow::Result<()> {
    let mut connection = PgConnection::connect(&database.url).await?;
    let (rows, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (topic, kafka_partition, kafka_offset)) FROM events",
    )
    .fetch_one(&mut connection)
    .await?;
    anyhow::ensure!(
        rows as u64 == n && distinct == rows,
        "{}: {rows} rows, {distinct} distinct coordinates, {n} expected",
        database.name
    );
    Ok(())
}

/// CPU seconds of a measured span, from the readings before and after it.
fn spent(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    before.zip(after).map(|(before, after)| after - before)
}

fn per_million(cpu: Option<f64>, n: u64) -> Option<f64> {
    cpu.map(|cpu| cpu / n as f64 * 1e6)
}

/// The baseline: one COPY of all the rows into the empty table (schema and partitions made
/// beforehand), timed from the statement to its end; CPU of this process and of its backend.
async fn raw_copy(
    databases: &Databases,
    database: &Database,
    copy: &CopyText,
    n: u64,
) -> anyhow::Result<BenchResult> {
    let pool = schema::connect(&database.url, 1).await?;
    let mut connection = pool.acquire().await?;
    schema::ensure_partitions(&mut connection, &copy.days).await?;
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *connection)
        .await?;
    databases.checkpoint().await?;
    let (cpu_before, server_before) =
        (cpu_seconds(std::process::id()), cpu_seconds(backend as u32));
    let started = Instant::now();
    let mut stream = connection
        .copy_in_raw(&format!("COPY events ({COPY_COLUMNS}) FROM STDIN"))
        .await?;
    for chunk in copy.text.chunks(COPY_CHUNK_BYTES) {
        stream.send(chunk).await?;
    }
    let inserted = stream.finish().await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = spent(cpu_before, cpu_seconds(std::process::id()));
    let server = spent(server_before, cpu_seconds(backend as u32));
    drop(connection);
    pool.close().await;
    anyhow::ensure!(inserted == n, "COPY inserted {inserted} of {n} rows");
    check_stored(database, n).await?;
    Ok(BenchResult {
        server_cpu_seconds_per_million: per_million(server, n),
        ..BenchResult::throughput("store", "baseline: one raw COPY", n, seconds, cpu, None)
    })
}

/// The stage as users run it (`eventpipe store`) into a fresh database (it applies its schema
/// and makes its partitions), timed from start until its /metrics count every row written.
async fn stage_run(
    settings: &Settings,
    store: &StoreSettings,
    eventpipe: &Path,
    databases: &Databases,
    database: &Database,
    n: u64,
) -> anyhow::Result<BenchResult> {
    let eventpipe::stage::InputTopics::Names(topics) = &store.inputs else {
        anyhow::bail!("the benchmark names its topic");
    };
    databases.checkpoint().await?;
    let started = Instant::now();
    let (mut child, port) = start_stage(
        eventpipe,
        &settings.kafka,
        &[
            "store",
            "--topics",
            &topics.join(","),
            "--group-id",
            &format!("{}-group", database.name),
            "--postgres-url",
            &database.url,
        ],
    )?;
    let done = wait_for_metric(
        &mut child,
        port,
        &STORED_ROWS,
        n as f64,
        Duration::from_secs(1800),
    )
    .await;
    let pid = child.id();
    let server = databases.backends_cpu(database).await;
    let (cpu, rss) = (cpu_seconds(pid), peak_rss_mib(pid));
    kill(child);
    let seconds = (done?.ok_or_else(|| anyhow::anyhow!("the stage did not store the backlog"))?
        - started)
        .as_secs_f64();
    check_stored(database, n).await?;
    Ok(BenchResult {
        server_cpu_seconds_per_million: per_million(server, n),
        ..BenchResult::throughput(
            "store",
            format!("eventpipe store, batch {}", store.batch_size),
            n,
            seconds,
            cpu,
            rss,
        )
    })
}

/// The services' way: bench/reference_store.py into a fresh database with the same schema and
/// partitions, timed from its start until it reports every row committed.
async fn python_run(
    settings: &Settings,
    python: &Path,
    databases: &Databases,
    database: &Database,
    days: &BTreeSet<NaiveDate>,
    input: &str,
    n: u64,
) -> anyhow::Result<BenchResult> {
    {
        let pool = schema::connect(&database.url, 1).await?;
        schema::ensure_partitions(&mut *pool.acquire().await?, days).await?;
        pool.close().await;
    }
    databases.checkpoint().await?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/reference_store.py");
    let started = Instant::now();
    let mut child = tokio::process::Command::new(python)
        .args([
            script,
            &settings.kafka.bootstrap_servers,
            input,
            &format!("{}-group", database.name),
            &database.url,
            &n.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut line = String::new();
    tokio::io::BufReader::new(stdout)
        .read_line(&mut line)
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    let pid = child.id().unwrap_or_default();
    let server = databases.backends_cpu(database).await;
    let (cpu, rss) = (cpu_seconds(pid), peak_rss_mib(pid));
    drop(child.stdin.take());
    let status = child.wait().await?;
    anyhow::ensure!(
        line.trim() == format!("stored {n}"),
        "the Python reference store did not finish ({status}): {line:?}"
    );
    check_stored(database, n).await?;
    Ok(BenchResult {
        server_cpu_seconds_per_million: per_million(server, n),
        ..BenchResult::throughput(
            "store",
            "baseline: services' Python + psycopg",
            n,
            seconds,
            cpu,
            rss,
        )
    })
}
