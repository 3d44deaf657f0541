//! Integration-test harness: settings for the real local stack (from `scripts/stack env`) and
//! fresh, uniquely named topics, consumer groups, databases and indices for every test.
#![allow(dead_code)] // each test file uses a different part of the harness

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use eventpipe::config::{Settings, SettingsArgs};
use eventpipe::kafka::client::{create_client, wait_for_broker};
use eventpipe::kafka::{ClientKind, PipelineContext};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

pub mod browser;
pub mod gateway;

/// Settings as the stages would see them with `eval "$(scripts/stack env)"`.
pub fn settings() -> Settings {
    let var = |name: &str| std::env::var(name).ok();
    let args = SettingsArgs {
        bootstrap_servers: var("KAFKA_BOOTSTRAP_SERVERS"),
        elasticsearch_url: var("ELASTICSEARCH_URL"),
        schema_registry_url: var("SCHEMA_REGISTRY_URL"),
        postgres_url: var("POSTGRES_CONNECTION_STRING"),
        ..Default::default()
    };
    Settings::load(&args).expect("stack settings are valid")
}

/// A name no other test (or earlier run) uses: `<prefix>-<pid>-<nanos>`.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{}", std::process::id(), nanos % 10_000_000_000)
}

/// How often `wait_until` looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Polls `probe` until it returns `Ok`, and returns that value; panics naming `what` and the
/// last `Err` (what was seen instead) once `timeout` passed. The timeout only bounds a hang: a
/// test waits for a condition, never for a time.
pub async fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "waited {timeout:?} for {what}; last seen: {seen}"
            ),
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Creates a topic and waits until its metadata shows every partition with a leader.
pub async fn create_topic(settings: &Settings, name: &str, partitions: i32) {
    let context = PipelineContext::default();
    let admin: AdminClient<PipelineContext> =
        create_client(&settings.kafka, ClientKind::Admin, context.clone()).unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create_topics request");
    for result in results {
        result.unwrap_or_else(|(topic, code)| panic!("creating {topic}: {code:?}"));
    }
    wait_for_partitions(&admin, &context, settings, name, partitions as usize).await;
}

/// Waits until the metadata shows `name` with `partitions` partitions, each with a leader.
async fn wait_for_partitions(
    admin: &AdminClient<PipelineContext>,
    context: &PipelineContext,
    settings: &Settings,
    name: &str,
    partitions: usize,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metadata = wait_for_broker(admin.inner(), context, &settings.kafka).unwrap();
        let ready = metadata.topics().iter().any(|t| {
            t.name() == name
                && t.partitions().len() == partitions
                && t.partitions().iter().all(|p| p.leader() >= 0)
        });
        if ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "topic {name} never had {partitions} partitions with leaders"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Grows `name` to `partitions` partitions and waits until each has a leader.
pub async fn grow_topic(settings: &Settings, name: &str, partitions: usize) {
    use rdkafka::admin::NewPartitions;
    let context = PipelineContext::default();
    let admin: AdminClient<PipelineContext> =
        create_client(&settings.kafka, ClientKind::Admin, context.clone()).unwrap();
    let results = admin
        .create_partitions(
            &[NewPartitions::new(name, partitions)],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create_partitions request");
    for result in results {
        result.unwrap_or_else(|(topic, code)| panic!("growing {topic}: {code:?}"));
    }
    wait_for_partitions(&admin, &context, settings, name, partitions).await;
}

/// A consumer in a fresh group reading `topic` from the beginning.
pub fn consumer(settings: &Settings, topic: &str) -> StreamConsumer<PipelineContext> {
    let mut kafka = settings.kafka.clone();
    kafka
        .properties
        .insert("group.id".into(), unique("test-group"));
    // Tests read; they do not need to store offsets.
    kafka
        .properties
        .insert("enable.auto.commit".into(), "false".into());
    let consumer: StreamConsumer<PipelineContext> =
        create_client(&kafka, ClientKind::Consumer, PipelineContext::default()).unwrap();
    consumer.subscribe(&[topic]).unwrap();
    consumer
}

/// The next message before `deadline`, skipping transient client errors (a broker connection
/// being re-established is not a test failure); `None` when the deadline passes.
pub async fn next_message(
    consumer: &StreamConsumer<PipelineContext>,
    deadline: tokio::time::Instant,
) -> Option<OwnedMessage> {
    loop {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(message)) => return Some(message.detach()),
            Ok(Err(error)) => {
                eprintln!("transient consumer error (retrying): {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => return None,
        }
    }
}

/// Reads until `count` messages arrived or `timeout` passed; returns what arrived.
pub async fn consume(
    settings: &Settings,
    topic: &str,
    count: usize,
    timeout: Duration,
) -> Vec<OwnedMessage> {
    let consumer = consumer(settings, topic);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut messages = Vec::new();
    while messages.len() < count {
        match next_message(&consumer, deadline).await {
            Some(message) => messages.push(message),
            None => break,
        }
    }
    messages
}

/// A consumer that never joins a group (it is only asked about offsets, or assigned partitions):
/// `group` is the group whose committed offsets it reads, or a fresh one.
fn plain_consumer(settings: &Settings, group: Option<&str>) -> BaseConsumer<PipelineContext> {
    let mut kafka = settings.kafka.clone();
    kafka.properties.insert(
        "group.id".into(),
        group.map_or_else(|| unique("test-group"), str::to_string),
    );
    create_client(&kafka, ClientKind::Consumer, PipelineContext::default()).unwrap()
}

const KAFKA_TIMEOUT: Duration = Duration::from_secs(15);

fn partitions(consumer: &BaseConsumer<PipelineContext>, topic: &str) -> Vec<i32> {
    let metadata = consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    assert!(!partitions.is_empty(), "{topic} has partitions");
    partitions
}

/// Each partition's end offset (high watermark): the offset the next record will get.
pub fn end_offsets(settings: &Settings, topic: &str) -> BTreeMap<i32, i64> {
    let consumer = plain_consumer(settings, None);
    partitions(&consumer, topic)
        .into_iter()
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, KAFKA_TIMEOUT)
                .unwrap_or_else(|e| panic!("watermarks of {topic}[{p}]: {e}"));
            (p, high)
        })
        .collect()
}

/// The offsets `group` committed on `topic`, per partition; 0 where it committed nothing (the
/// tests' topics are fresh, and the stages reset to the earliest offset: where they would start).
pub fn committed_offsets(settings: &Settings, group: &str, topic: &str) -> BTreeMap<i32, i64> {
    let consumer = plain_consumer(settings, Some(group));
    let mut tpl = TopicPartitionList::new();
    for p in partitions(&consumer, topic) {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, KAFKA_TIMEOUT)
        .unwrap_or_else(|e| panic!("committed offsets of {group} on {topic}: {e}"));
    committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => (e.partition(), o),
            _ => (e.partition(), 0),
        })
        .collect()
}

/// Waits until `group` committed every record of `topic`: the stage consuming it has finished
/// all of it (offsets are committed only behind completed work).
pub async fn wait_for_committed_end(
    settings: &Settings,
    group: &str,
    topic: &str,
    timeout: Duration,
) {
    let end = end_offsets(settings, topic);
    wait_until(
        timeout,
        &format!("{group} to commit the end of {topic} {end:?}"),
        async || {
            let committed = committed_offsets(settings, group, topic);
            if committed == end {
                Ok(())
            } else {
                Err(format!("{committed:?}"))
            }
        },
    )
    .await
}

/// Waits until `group` has no member (a killed one is expired by its session timeout): from then
/// on nothing commits for the group, so its committed offsets are the ones a restart starts at.
pub async fn wait_for_empty_group(settings: &Settings, group: &str, timeout: Duration) {
    let consumer = plain_consumer(settings, None);
    wait_until(timeout, &format!("group {group} to be empty"), async || {
        let list = consumer
            .fetch_group_list(Some(group), KAFKA_TIMEOUT)
            .map_err(|e| e.to_string())?;
        match list.groups().iter().find(|g| g.name() == group) {
            Some(g) if !g.members().is_empty() => Err(format!(
                "state {}, {} member(s)",
                g.state(),
                g.members().len()
            )),
            _ => Ok(()),
        }
    })
    .await
}

/// The settings of a `read_committed` reader: it sees only committed transactions.
pub fn read_committed(settings: &Settings) -> Settings {
    let mut reader = settings.clone();
    reader
        .kafka
        .properties
        .insert("isolation.level".into(), "read_committed".into());
    reader
}

/// Every record of `topic` up to its end offsets as they are now, in partition order: the
/// topic's whole content, not "what arrived before a quiet period". Read with `settings`'
/// isolation level; positions (not counts) decide the end, so transaction markers are skipped.
pub fn read_to_end(settings: &Settings, topic: &str) -> Vec<OwnedMessage> {
    let end = end_offsets(settings, topic);
    let consumer = plain_consumer(settings, None);
    let mut tpl = TopicPartitionList::new();
    for p in end.keys() {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut messages = Vec::new();
    loop {
        let position = consumer.position().unwrap();
        let done = end.iter().all(|(p, high)| {
            *high == 0
                || matches!(
                    position.find_partition(topic, *p).map(|e| e.offset()),
                    Some(Offset::Offset(at)) if at >= *high
                )
        });
        if done {
            messages.retain(|m: &OwnedMessage| m.offset() < end[&m.partition()]);
            return messages;
        }
        assert!(
            Instant::now() < deadline,
            "reading {topic} to {end:?}: at {position:?} after {} records",
            messages.len()
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => messages.push(message.detach()),
            Some(Err(error)) => eprintln!("transient consumer error (retrying): {error}"),
            None => {}
        }
    }
}

/// The message's headers as a map of UTF-8 strings.
pub fn headers(message: &OwnedMessage) -> HashMap<String, String> {
    message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| {
                    (
                        h.key.to_string(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn key(message: &OwnedMessage) -> String {
    String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned()
}

pub fn json(message: &OwnedMessage) -> serde_json::Value {
    serde_json::from_slice(message.payload().expect("message has a payload"))
        .expect("payload is JSON")
}

/// A database of its own for one test, dropped by nobody: names are unique per run.
pub async fn fresh_database(settings: &Settings) -> (sqlx::PgPool, String) {
    let name = unique("test_db").replace('-', "_");
    let admin = sqlx::PgPool::connect(settings.postgres_url.as_str())
        .await
        .expect("PostgreSQL from scripts/stack is reachable");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    let mut url = settings.postgres_url.clone();
    url.set_path(&name);
    let pool = sqlx::PgPool::connect(url.as_str()).await.unwrap();
    (pool, name)
}

/// A fresh database (as `fresh_database`) and its URL, for a stage's `--postgres-url`.
pub async fn fresh_database_url(settings: &Settings) -> (sqlx::PgPool, String) {
    let (pool, name) = fresh_database(settings).await;
    let mut url = settings.postgres_url.clone();
    url.set_path(&name);
    (pool, url.to_string())
}

/// The eventpipe binary built for this test run, or `EVENTPIPE_TEST_BIN` (to show that a
/// regression test fails on an older build).
pub fn eventpipe_bin() -> PathBuf {
    std::env::var_os("EVENTPIPE_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_eventpipe")))
}

/// Runs the binary with the given arguments, environment pointed at the stack, and stdin.
pub fn run_eventpipe(args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut command = Command::new(eventpipe_bin());
    command
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().expect("eventpipe binary runs");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// What a stage logs (at info, target `eventpipe::telemetry`) once its endpoint is bound.
const SERVING: &str = "serving /metrics, /health and /ready";

/// The address in a stage's "serving /metrics" log line, text (`address=127.0.0.1:41234`) or
/// JSON (`"address":"127.0.0.1:41234"`) format.
fn served_address(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter(|l| l.contains(SERVING))
        .find_map(|line| {
            let (_, rest) = line
                .split_once("address=")
                .or_else(|| line.split_once("\"address\":\""))?;
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']')))
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        })
}

/// An `eventpipe` stage running as a child process, its stderr captured to a file.
///
/// Its telemetry endpoint is bound by the child itself on `127.0.0.1:0` and found in its log:
/// the kernel hands every stage its own port, so no two tests (or processes) can race for one,
/// as they could when the test picked a free port and the child bound it later.
pub struct StageProcess {
    child: Mutex<std::process::Child>,
    pub log_path: PathBuf,
    address: OnceLock<SocketAddr>,
}

impl StageProcess {
    /// Starts `eventpipe <args>` with the stack's environment and its own metrics port.
    pub fn start(args: &[&str], extra_env: &[(&str, &str)]) -> StageProcess {
        use std::process::{Command, Stdio};
        let settings = settings();
        let log_path = std::env::temp_dir().join(format!("{}.log", unique("stage")));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = Command::new(eventpipe_bin());
        command
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("KAFKA_BOOTSTRAP_SERVERS", &settings.kafka.bootstrap_servers)
            .env("EVENTPIPE_METRICS_ADDRESS", "127.0.0.1:0")
            .env("EVENTPIPE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (name, value) in extra_env {
            if *name == "EVENTPIPE_LOG" {
                // The bound address is found in the telemetry line: keep it whatever the filter.
                command.env(name, format!("{value},eventpipe::telemetry=info"));
            } else {
                command.env(name, value);
            }
        }
        StageProcess {
            child: Mutex::new(command.spawn().expect("eventpipe starts")),
            log_path,
            address: OnceLock::new(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn child(&self) -> std::sync::MutexGuard<'_, std::process::Child> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn signal(&self, signal: &str) {
        let pid = self.child().id().to_string();
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// The telemetry endpoint's address, once the stage logged it.
    pub fn try_metrics_address(&self) -> Option<SocketAddr> {
        if let Some(address) = self.address.get() {
            return Some(*address);
        }
        let address = served_address(&self.log())?;
        Some(*self.address.get_or_init(|| address))
    }

    /// The telemetry endpoint's address; waits for the stage to bind it (30 s at most), and
    /// fails at once if the stage exited instead.
    pub async fn metrics_address(&self) -> SocketAddr {
        wait_until(
            Duration::from_secs(30),
            "the stage's telemetry endpoint",
            async || {
                if let Some(address) = self.try_metrics_address() {
                    return Ok(address);
                }
                if let Some(status) = self.child().try_wait().unwrap() {
                    panic!(
                        "stage exited ({status}) before serving /metrics:\n{}",
                        self.log()
                    );
                }
                Err(format!(
                    "no {SERVING:?} line in the log yet:\n{}",
                    self.log()
                ))
            },
        )
        .await
    }

    /// SIGTERM, then waits for a graceful exit; returns the exit status.
    pub fn terminate(self) -> (std::process::ExitStatus, String) {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child().try_wait().unwrap() {
                return (status, self.log());
            }
            if Instant::now() > deadline {
                let _ = self.child().kill();
                panic!(
                    "stage did not stop within 60s after SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no drain, no commit, as a crash.
    pub fn kill9(self) -> String {
        {
            let mut child = self.child();
            let _ = child.kill();
            let _ = child.wait();
        }
        self.log()
    }

    /// SIGSTOP: the stage stops where it is (no more commits, no more requests) until `resume`
    /// or `kill9`; a test can then look at the state a crash at this moment would leave.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after `freeze`.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// The Prometheus text of the stage's /metrics, once it answers.
    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.metrics_address().await);
        wait_until(Duration::from_secs(30), &url, async || {
            let response = reqwest::get(&url).await.map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                return Err(format!("status {}:\n{}", response.status(), self.log()));
            }
            response.text().await.map_err(|e| e.to_string())
        })
        .await
    }

    /// Readiness status code of /ready (None until the endpoint answers).
    pub async fn ready_status(&self) -> Option<u16> {
        let url = format!("http://{}/ready", self.try_metrics_address()?);
        reqwest::get(&url).await.ok().map(|r| r.status().as_u16())
    }

    /// Waits until /ready answers 200 (60 s at most).
    pub async fn wait_ready(&self) {
        wait_until(
            Duration::from_secs(60),
            "the stage to be ready",
            async || match self.ready_status().await {
                Some(200) => Ok(()),
                other => Err(format!("/ready {other:?}:\n{}", self.log())),
            },
        )
        .await
    }
}

impl Drop for StageProcess {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The value of a counter sample whose line starts with `name{` and contains every label.
pub fn metric_value(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The series of a per-partition lag gauge (`<stage>_consumer_lag_messages`): the partitions
/// the stage owns and fetches, with their lag.
pub fn lag_series(metrics: &str, metric: &str) -> BTreeMap<(String, i32), i64> {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(metric)?.strip_prefix('{'))
        .filter_map(|rest| {
            let (labels, value) = rest.split_once("} ")?;
            let label = |name: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                    .map(|v| v.trim_end_matches('"').to_string())
            };
            Some((
                (label("topic")?, label("partition")?.parse().ok()?),
                value.trim().parse().ok()?,
            ))
        })
        .collect()
}

/// Produces records, each to the partition given, and waits for every delivery report.
pub async fn produce_to_partitions(
    settings: &Settings,
    topic: &str,
    records: &[(i32, String, Vec<u8>)],
) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer<PipelineContext> = create_client(
        &settings.kafka,
        ClientKind::Producer,
        PipelineContext::default(),
    )
    .unwrap();
    for (partition, key, value) in records {
        producer
            .send(
                FutureRecord::to(topic)
                    .partition(*partition)
                    .key(key.as_bytes())
                    .payload(value.as_slice()),
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}[{partition}]: {e}"));
    }
}

/// A record with its topic and an explicit Kafka timestamp.
#[derive(Clone)]
pub struct TimedRecord {
    pub topic: String,
    pub key: String,
    pub value: Vec<u8>,
    pub timestamp_ms: i64,
}

/// Produces records with their timestamps; `one_by_one` waits for each delivery report before
/// the next send (the broker then holds them in exactly this order), else all at once.
pub async fn produce_timed(settings: &Settings, records: &[TimedRecord], one_by_one: bool) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer<PipelineContext> = create_client(
        &settings.kafka,
        ClientKind::Producer,
        PipelineContext::default(),
    )
    .unwrap();
    let mut pending = Vec::new();
    for record in records {
        let future = producer
            .send_result(
                FutureRecord::to(&record.topic)
                    .key(record.key.as_bytes())
                    .payload(record.value.as_slice())
                    .timestamp(record.timestamp_ms),
            )
            .expect("enqueued");
        if one_by_one {
            future.await.expect("not cancelled").expect("delivered");
        } else {
            pending.push(future);
        }
    }
    for future in pending {
        future.await.expect("not cancelled").expect("delivered");
    }
}

/// Produces records (key, value, headers) and waits for every delivery report.
pub async fn produce_all(settings: &Settings, topic: &str, records: &[(String, Vec<u8>)]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer<PipelineContext> = create_client(
        &settings.kafka,
        ClientKind::Producer,
        PipelineContext::default(),
    )
    .unwrap();
    let futures: Vec<_> = records
        .iter()
        .map(|(key, value)| {
            producer
                .send_result(
                    FutureRecord::to(topic)
                        .key(key.as_bytes())
                        .payload(value.as_slice()),
                )
                .expect("enqueued")
        })
        .collect();
    for future in futures {
        future.await.expect("not cancelled").expect("delivered");
    }
}

/// `promtool check metrics` (installed with the stack's Prometheus) lints the exposition.
pub fn assert_promtool_accepts(metrics: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed by scripts/stack");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A codec that reads and writes Avro on every topic, registering its schema when a subject
/// lacks it (tests own their subjects: `<unique topic>-value`).
pub fn avro_codec(schema: eventpipe::codec::SchemaName) -> eventpipe::codec::Codec {
    eventpipe::codec::Codec::new(avro_settings(), Some(registry()), schema)
}

pub fn avro_settings() -> std::sync::Arc<eventpipe::codec::CodecSettings> {
    std::sync::Arc::new(eventpipe::codec::CodecSettings {
        input: eventpipe::codec::Format::Avro,
        output: eventpipe::codec::Format::Avro,
        auto_register: true,
        ..Default::default()
    })
}

pub fn registry() -> std::sync::Arc<eventpipe::codec::Registry> {
    std::sync::Arc::new(eventpipe::codec::Registry::new(&settings().schema_registry_url).unwrap())
}

/// Registers a built-in schema as `<topic>-value`.
pub async fn register(topic: &str, schema: eventpipe::codec::SchemaName) -> u32 {
    registry()
        .register(&eventpipe::codec::value_subject(topic), schema.text())
        .await
        .expect("registered")
}

/// A consumed Avro record's value as JSON (the test's own decoding, through the registry).
pub async fn avro_json(
    codec: &eventpipe::codec::Codec,
    message: &OwnedMessage,
) -> serde_json::Value {
    let bytes = message.payload().unwrap_or_default();
    let json = codec
        .decode(message.topic(), bytes)
        .await
        .unwrap_or_else(|e| panic!("{} offset {}: {e}", message.topic(), message.offset()));
    serde_json::from_slice(&json).unwrap()
}

/// Runs `scripts/stack ACTION SERVICE` on the shared stack.
fn stack_service(action: &str, service: &str) {
    let status = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack"))
        .args([action, service])
        .status()
        .expect("scripts/stack runs");
    assert!(status.success(), "scripts/stack {action} {service}");
}

/// A service of the shared stack stopped for an outage test. It is started again by
/// `end_after`, or when the guard is dropped: a failing test does not leave it down for the rest.
pub struct Outage {
    service: &'static str,
    began: Instant,
    ended: bool,
}

impl Outage {
    pub fn begin(service: &'static str) -> Outage {
        stack_service("down", service);
        Outage {
            service,
            began: Instant::now(),
            ended: false,
        }
    }

    /// Starts the service again once it has been down for `minimum` (the outage's length is
    /// the experiment, not a synchronisation).
    pub async fn end_after(mut self, minimum: Duration) {
        let elapsed = self.began.elapsed();
        if elapsed < minimum {
            tokio::time::sleep(minimum - elapsed).await;
        }
        stack_service("up", self.service);
        self.ended = true;
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if !self.ended {
            stack_service("up", self.service);
        }
    }
}

/// A record as a producer sends it: any topic, key, headers and timestamp.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// None: the producer's clock.
    pub timestamp_ms: Option<i64>,
}

/// Produces `records` and waits for every delivery report.
pub async fn produce_outgoing(settings: &Settings, records: &[Outgoing]) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer<PipelineContext> = create_client(
        &settings.kafka,
        ClientKind::Producer,
        PipelineContext::default(),
    )
    .unwrap();
    let mut pending = Vec::new();
    for record in records {
        let headers = record
            .headers
            .iter()
            .fold(OwnedHeaders::new(), |headers, (key, value)| {
                headers.insert(Header {
                    key,
                    value: Some(value),
                })
            });
        let mut outgoing = FutureRecord::<[u8], [u8]>::to(&record.topic)
            .payload(&record.value)
            .headers(headers);
        if let Some(key) = &record.key {
            outgoing = outgoing.key(key);
        }
        if let Some(timestamp) = record.timestamp_ms {
            outgoing = outgoing.timestamp(timestamp);
        }
        pending.push(producer.send_result(outgoing).expect("enqueued"));
    }
    for future in pending {
        future.await.expect("not cancelled").expect("delivered");
    }
}

/// Deletes the first `per_partition` records of every partition of `topic` (as retention would);
/// returns how many records Kafka no longer holds.
pub async fn delete_records_before(settings: &Settings, topic: &str, per_partition: i64) -> u64 {
    let context = PipelineContext::default();
    let admin: AdminClient<PipelineContext> =
        create_client(&settings.kafka, ClientKind::Admin, context).unwrap();
    let ends = end_offsets(settings, topic);
    let mut offsets = TopicPartitionList::new();
    let mut deleted = 0;
    for (partition, end) in &ends {
        let before = per_partition.min(*end);
        deleted += before as u64;
        offsets
            .add_partition_offset(topic, *partition, Offset::Offset(before))
            .unwrap();
    }
    let result = admin
        .delete_records(&offsets, &AdminOptions::new())
        .await
        .expect("records are deleted");
    for element in result.elements() {
        assert!(element.error().is_ok(), "{element:?}");
    }
    deleted
}
