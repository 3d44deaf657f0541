//! The dispatch benchmark: throughput of `eventpipe dispatch` (at least once, and exactly once)
//! over a preloaded backlog next to a raw rdkafka topic-to-topic copy of the same records, its
//! CPU and peak memory, and end-to-end latency percentiles at fixed rates.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventpipe::codec::{value_subject, Codec, CodecSettings, Format, Registry, SchemaName};
use eventpipe::config::Settings;
use eventpipe::envelope::parse_timestamp;
use eventpipe::generate::{Generator, Pacer, TrafficKind, PACER_TICK};
use eventpipe::kafka::client::{client_config, create_client};
use eventpipe::kafka::{ClientKind, PipelineContext};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use crate::measure::{
    cpu_seconds, peak_rss_mib, preload_envelopes, preload_envelopes_as, send_waiting, BenchResult,
    BenchTopics, Percentiles, TopicWatcher,
};

/// `eventpipe-bench dispatch`: the backlog, the latency runs and which variants to run.
#[derive(Debug, clap::Args)]
pub struct DispatchBenchOptions {
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// Input rates (records/s) for the latency runs, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,20000")]
    pub latency_rates: Vec<u64>,
    #[arg(long, default_value_t = 20)]
    pub latency_seconds: u64,
    /// Skip the exactly-once variant.
    #[arg(long = "no-exactly-once", action = clap::ArgAction::SetFalse)]
    pub exactly_once: bool,
    /// Skip the Avro variant (the same envelopes in Avro, dispatched Avro in and out).
    #[arg(long = "no-avro", action = clap::ArgAction::SetFalse)]
    pub avro: bool,
    /// A Python with confluent-kafka, to also run the services-style reference dispatcher
    /// (bench/reference_dispatcher.py) as a baseline.
    #[arg(long, env = "EVENTPIPE_BENCH_PYTHON")]
    pub python: Option<PathBuf>,
}

/// Runs every dispatch workload and returns the results (baselines first).
/// `eventpipe` is the binary whose `dispatch` is measured.
pub async fn run(
    settings: &Settings,
    eventpipe: &Path,
    options: DispatchBenchOptions,
) -> anyhow::Result<Vec<BenchResult>> {
    let base = format!("bench-{}", chrono::Utc::now().format("%Y%m%d%H%M%S"));
    let input = format!("{base}-in");
    let mut topics = vec![
        (input.clone(), options.partitions),
        (format!("{input}.dlq"), 1),
        (format!("{base}-out"), options.partitions),
        (format!("{base}-copy"), options.partitions),
        (format!("{base}-out-eos"), options.partitions),
        (format!("{base}-py-out"), options.partitions),
        (format!("{base}-avro-in"), options.partitions),
        (format!("{base}-avro-in.dlq"), 1),
        (format!("{base}-avro-out"), options.partitions),
    ];
    for rate in &options.latency_rates {
        topics.push((format!("{base}-lat{rate}-in"), options.partitions));
        topics.push((format!("{base}-lat{rate}-in.dlq"), 1));
        topics.push((format!("{base}-lat{rate}-out"), options.partitions));
    }
    let bench_topics = BenchTopics::create(&settings.kafka, &topics).await?;
    let outcome = run_workloads(settings, eventpipe, &options, &base).await;
    bench_topics.delete().await;
    remove_routes_files(&base);
    outcome
}

/// The routes files of this run (`<base>…-routes.toml` in the temp dir): used up once it ends.
fn remove_routes_files(base: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&format!("{base}-")) && name.ends_with("-routes.toml") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

async fn run_workloads(
    settings: &Settings,
    eventpipe: &Path,
    options: &DispatchBenchOptions,
    base: &str,
) -> anyhow::Result<Vec<BenchResult>> {
    let input = format!("{base}-in");
    let n = options.records;
    preload_envelopes(&settings.kafka, &input, n).await?;

    let mut results = Vec::new();
    eprintln!("baseline: raw rdkafka copy {input} -> {base}-copy");
    let baseline = raw_copy(
        settings,
        &input,
        &format!("{base}-copy"),
        options.partitions,
        n,
    )?;
    let baseline_rate = baseline.records_per_second;
    results.push(baseline);

    let routes = routes_file(base, &format!("{base}-out"))?;
    let group = format!("{base}-group");
    // The other variants are this dispatcher with other topics, group or mode.
    let json = Dispatcher {
        eventpipe,
        input: &input,
        routes: &routes,
        group: &group,
        mode: Mode::AtLeastOnce,
    };
    eprintln!("dispatch (at least once) over the {n}-record backlog");
    let mut dispatched = dispatcher_run(
        settings,
        &json,
        &format!("{base}-out"),
        options.partitions,
        n,
    )?;
    dispatched.ratio_to_baseline = Some(dispatched.records_per_second / baseline_rate);
    let json_rate = dispatched.records_per_second;
    results.push(dispatched);

    if options.avro {
        // The same envelopes in Avro (subjects registered for the run's topics), dispatched
        // with Avro in and out: the ratio is to the JSON dispatcher of this run.
        let (avro_input, avro_output) = (format!("{base}-avro-in"), format!("{base}-avro-out"));
        let registry = Arc::new(Registry::new(&settings.schema_registry_url)?);
        registry
            .register(&value_subject(&avro_output), SchemaName::Event.text())
            .await?;
        let codec = Codec::new(
            Arc::new(CodecSettings {
                output: Format::Avro,
                auto_register: true,
                ..CodecSettings::default()
            }),
            Some(registry),
            SchemaName::Envelope,
        );
        preload_envelopes_as(&settings.kafka, &avro_input, n, &codec).await?;
        let routes = routes_file(&format!("{base}-avro"), &avro_output)?;
        eprintln!("dispatch (at least once), Avro in and out, over the same envelopes");
        let mut avro = dispatcher_run(
            settings,
            &Dispatcher {
                input: &avro_input,
                routes: &routes,
                group: &format!("{base}-group-avro"),
                mode: Mode::Avro,
                ..json
            },
            &avro_output,
            options.partitions,
            n,
        )?;
        eprintln!(
            "Avro dispatch: {:.3} of the JSON dispatcher, {:.3} of the raw copy",
            avro.records_per_second / json_rate,
            avro.records_per_second / baseline_rate
        );
        avro.ratio_to_baseline = Some(avro.records_per_second / json_rate);
        results.push(avro);
    }

    if let Some(python) = &options.python {
        eprintln!("baseline: the services' Python dispatcher (bench/reference_dispatcher.py)");
        let mut reference = python_reference(
            settings,
            python,
            &input,
            &format!("{base}-py-out"),
            options.partitions,
            n,
        )?;
        reference.ratio_to_baseline = Some(reference.records_per_second / baseline_rate);
        results.push(reference);
    }

    if options.exactly_once {
        let routes = routes_file(&format!("{base}-eos"), &format!("{base}-out-eos"))?;
        eprintln!("dispatch (exactly once) over the same backlog");
        let mut eos = dispatcher_run(
            settings,
            &Dispatcher {
                routes: &routes,
                group: &format!("{base}-group-eos"),
                mode: Mode::ExactlyOnce,
                ..json
            },
            &format!("{base}-out-eos"),
            options.partitions,
            n,
        )?;
        eos.ratio_to_baseline = Some(eos.records_per_second / baseline_rate);
        results.push(eos);
    }

    for rate in &options.latency_rates {
        eprintln!("latency at {rate}/s for {}s", options.latency_seconds);
        results.push(latency_run(settings, eventpipe, base, *rate, options.latency_seconds).await?);
    }
    Ok(results)
}

/// Routes sending every built-in action to `output` (one output per input).
fn routes_file(base: &str, output: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::temp_dir().join(format!("{base}-routes.toml"));
    let routes: String = [("create_user", "User created"), ("update_user", "User updated"), ("start_task", "Task started")]
        .iter()
        .map(|(action, message)| {
            format!("[[routes]]\naction = \"{action}\"\n[[routes.outputs]]\ntopic = \"{output}\"\nmessage = \"{message}\"\n\n")
        })
        .collect();
    std::fs::write(&path, routes)?;
    Ok(path)
}

/// The baseline: consume and re-produce every record unchanged with the same client settings.
fn raw_copy(
    settings: &Settings,
    input: &str,
    output: &str,
    partitions: i32,
    n: u64,
) -> anyhow::Result<BenchResult> {
    let watcher = TopicWatcher::new(&settings.kafka, output, partitions)?;
    let cpu_before = cpu_seconds(std::process::id());
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let copier = {
        let stop = stop.clone();
        let kafka = settings.kafka.clone();
        let (input, output) = (input.to_string(), output.to_string());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut consumer_config = client_config(&kafka, ClientKind::Consumer);
            consumer_config.set("group.id", format!("{input}-raw-copy"));
            let consumer: BaseConsumer = consumer_config.create()?;
            consumer.subscribe(&[&input])?;
            let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
                client_config(&kafka, ClientKind::Producer).create()?;
            while !stop.load(Ordering::Relaxed) {
                let Some(message) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let message = message?;
                let mut record: BaseRecord<'_, [u8], [u8]> =
                    BaseRecord::to(&output).payload(message.payload().unwrap_or_default());
                if let Some(key) = message.key() {
                    record = record.key(key);
                }
                if let Some(headers) = message.headers() {
                    record = record.headers(headers.detach());
                }
                send_waiting(&producer, record)?;
            }
            producer.flush(Duration::from_secs(30))?;
            Ok(())
        })
    };
    let done = watcher.wait_for(n, Duration::from_secs(1800))?;
    stop.store(true, Ordering::Relaxed);
    copier
        .join()
        .map_err(|_| anyhow::anyhow!("raw copy thread panicked"))??;
    let done = done.ok_or_else(|| anyhow::anyhow!("raw copy did not finish"))?;
    let seconds = (done - started).as_secs_f64();
    let cpu = cpu_before
        .zip(cpu_seconds(std::process::id()))
        .map(|(a, b)| b - a);
    Ok(BenchResult {
        ratio_to_baseline: Some(1.0),
        ..BenchResult::throughput(
            "dispatch",
            "baseline: raw rdkafka copy",
            n,
            seconds,
            cpu,
            None,
        )
    })
}

/// The services' way, for comparison: a Python confluent-kafka consumer with a handler factory.
fn python_reference(
    settings: &Settings,
    python: &PathBuf,
    input: &str,
    output: &str,
    partitions: i32,
    n: u64,
) -> anyhow::Result<BenchResult> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/reference_dispatcher.py");
    let started = Instant::now();
    let mut child = Command::new(python)
        .args([
            script,
            &settings.kafka.bootstrap_servers,
            input,
            output,
            &format!("{output}-group"),
            &n.to_string(),
        ])
        .stdin(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let done = TopicWatcher::new(&settings.kafka, output, partitions)?
        .wait_for(n, Duration::from_secs(3600))?;
    let cpu = cpu_seconds(pid);
    let rss = peak_rss_mib(pid);
    let _ = child.wait();
    let done = done.ok_or_else(|| anyhow::anyhow!("the Python reference did not finish"))?;
    let seconds = (done - started).as_secs_f64();
    Ok(BenchResult::throughput(
        "dispatch",
        "baseline: services' Python dispatcher",
        n,
        seconds,
        cpu,
        rss,
    ))
}

/// The `eventpipe dispatch` under test: the binary, what it reads, its routes, group and mode.
#[derive(Clone, Copy)]
struct Dispatcher<'a> {
    eventpipe: &'a Path,
    input: &'a str,
    routes: &'a Path,
    group: &'a str,
    mode: Mode,
}

/// Starts the real `eventpipe dispatch` as a child process.
fn spawn_dispatcher(settings: &Settings, dispatcher: &Dispatcher<'_>) -> anyhow::Result<Child> {
    let Dispatcher {
        eventpipe,
        input,
        routes,
        group,
        mode,
    } = *dispatcher;
    let format = if mode == Mode::Avro { "avro" } else { "json" };
    let child = Command::new(eventpipe)
        .args([
            "--input-format",
            format,
            "--output-format",
            format,
            "--schema-registry-url",
            settings.schema_registry_url.as_str(),
            "--bootstrap-servers",
            &settings.kafka.bootstrap_servers,
            "--metrics-address",
            "127.0.0.1:0",
            "--log-level",
            "warn",
        ])
        .args(["dispatch", "--input-topics", input, "--routes-file"])
        .arg(routes)
        .args([
            "--group-id",
            group,
            "--transactional-id",
            &format!("{group}-tx"),
        ])
        .args([
            "--exactly-once",
            if mode == Mode::ExactlyOnce {
                "true"
            } else {
                "false"
            },
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    Ok(child)
}

fn stop_dispatcher(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// How the dispatcher under test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    AtLeastOnce,
    ExactlyOnce,
    /// At least once, Avro in and out (schema registry).
    Avro,
}

/// Dispatches the whole backlog; done when every input offset is committed (exactly once: the
/// transactions committed) or, at least once, when all outputs were written.
fn dispatcher_run(
    settings: &Settings,
    dispatcher: &Dispatcher<'_>,
    output: &str,
    partitions: i32,
    n: u64,
) -> anyhow::Result<BenchResult> {
    let started = Instant::now();
    let child = spawn_dispatcher(settings, dispatcher)?;
    let pid = child.id();
    let done = if dispatcher.mode == Mode::ExactlyOnce {
        wait_for_committed(
            settings,
            dispatcher.group,
            dispatcher.input,
            partitions,
            n,
            Duration::from_secs(1800),
        )?
    } else {
        TopicWatcher::new(&settings.kafka, output, partitions)?
            .wait_for(n, Duration::from_secs(1800))?
    };
    let cpu = cpu_seconds(pid);
    let rss = peak_rss_mib(pid);
    stop_dispatcher(child);
    let done = done.ok_or_else(|| anyhow::anyhow!("dispatcher did not finish the backlog"))?;
    let seconds = (done - started).as_secs_f64();
    let variant = match dispatcher.mode {
        Mode::AtLeastOnce => "eventpipe dispatch, at least once",
        Mode::ExactlyOnce => "eventpipe dispatch, exactly once",
        Mode::Avro => "eventpipe dispatch, Avro in and out (ratio to JSON dispatch)",
    };
    Ok(BenchResult::throughput(
        "dispatch", variant, n, seconds, cpu, rss,
    ))
}

/// Waits until `group` has committed offsets summing to `n` on `topic`.
fn wait_for_committed(
    settings: &Settings,
    group: &str,
    topic: &str,
    partitions: i32,
    n: u64,
    timeout: Duration,
) -> anyhow::Result<Option<Instant>> {
    let mut kafka = settings.kafka.clone();
    kafka.properties.insert("group.id".into(), group.into());
    let consumer: BaseConsumer<PipelineContext> =
        create_client(&kafka, ClientKind::Consumer, PipelineContext::default())?;
    let mut tpl = TopicPartitionList::new();
    for partition in 0..partitions {
        tpl.add_partition(topic, partition);
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let committed = consumer.committed_offsets(tpl.clone(), Duration::from_secs(10))?;
        let total: i64 = committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum();
        // Transaction markers take offsets too, so committed positions can pass `n`.
        if total as u64 >= n {
            return Ok(Some(Instant::now()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(None)
}

/// Produces at a fixed rate through a running dispatcher and measures producer-timestamp to
/// arrival latency at the output topic.
async fn latency_run(
    settings: &Settings,
    eventpipe: &Path,
    base: &str,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<BenchResult> {
    let input = format!("{base}-lat{rate}-in");
    let output = format!("{base}-lat{rate}-out");
    let routes = routes_file(&format!("{base}-lat{rate}"), &output)?;
    let group = format!("{base}-lat{rate}-group");
    let child = spawn_dispatcher(
        settings,
        &Dispatcher {
            eventpipe,
            input: &input,
            routes: &routes,
            group: &group,
            mode: Mode::AtLeastOnce,
        },
    )?;
    let pid = child.id();

    let mut reader_settings = settings.kafka.clone();
    reader_settings
        .properties
        .insert("group.id".into(), format!("{group}-reader"));
    reader_settings
        .properties
        .insert("fetch.wait.max.ms".into(), "5".into());
    let reader: StreamConsumer<PipelineContext> = create_client(
        &reader_settings,
        ClientKind::Consumer,
        PipelineContext::default(),
    )?;
    reader.subscribe(&[&output])?;
    // Warm-up: both consumers join their groups before the clock starts.
    let _ = tokio::time::timeout(Duration::from_secs(5), reader.recv()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let total = rate * seconds;
    let mut producer_settings = settings.kafka.clone();
    producer_settings
        .properties
        .insert("linger.ms".into(), "1".into());
    let producer: rdkafka::producer::FutureProducer<PipelineContext> = create_client(
        &producer_settings,
        ClientKind::Producer,
        PipelineContext::default(),
    )?;
    let sending = tokio::spawn(async move {
        let mut generator = Generator::new(TrafficKind::Envelopes, 7, 10_000, 1, Some(input));
        let mut pacer = Pacer::new(rate);
        let mut ticker = tokio::time::interval(PACER_TICK);
        let mut sent = 0;
        while sent < total {
            ticker.tick().await;
            for _ in 0..pacer.next_batch().min(total - sent) {
                let record = generator.next_record(chrono::Utc::now());
                let _ = producer.send_result(
                    rdkafka::producer::FutureRecord::to(&record.topic)
                        .key(record.key.as_bytes())
                        .payload(record.value.as_slice()),
                );
                sent += 1;
            }
        }
        producer.flush(Duration::from_secs(30))
    });

    let mut samples = Vec::with_capacity(total as usize);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds + 30);
    while (samples.len() as u64) < total {
        let Ok(Ok(message)) = tokio::time::timeout_at(deadline, reader.recv()).await else {
            break;
        };
        let arrived = chrono::Utc::now();
        let Some(sent) = message
            .payload()
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
            .and_then(|v| v["source"]["timestamp"].as_str().and_then(parse_timestamp))
        else {
            continue;
        };
        samples.push((arrived - sent).num_microseconds().unwrap_or(0) as f64 / 1000.0);
    }
    sending.await??;
    let cpu = cpu_seconds(pid);
    let rss = peak_rss_mib(pid);
    stop_dispatcher(child);
    let received = samples.len() as u64;
    Ok(BenchResult {
        bench: "dispatch".into(),
        variant: format!("latency at {rate}/s ({received}/{total} seen)"),
        records: received,
        seconds: seconds as f64,
        records_per_second: received as f64 / seconds as f64,
        cpu_seconds_per_million: cpu.map(|c| c / total.max(1) as f64 * 1e6),
        peak_rss_mib: rss,
        ratio_to_baseline: None,
        latency_ms: Percentiles::of(&mut samples),
        server_cpu_seconds_per_million: None,
        details: Default::default(),
    })
}
