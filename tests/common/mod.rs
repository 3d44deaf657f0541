//! Integration-test harness: settings for the real local stack (from `scripts/stack env`) and
//! fresh, uniquely named topics, consumer groups, databases and indices for every test.
#![allow(dead_code)] // each test file uses a different part of the harness

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use eventpipe::config::{Settings, SettingsArgs};
use eventpipe::kafka::client::{create_client, wait_for_broker};
use eventpipe::kafka::{ClientKind, PipelineContext};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message, OwnedMessage};

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
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metadata = wait_for_broker(admin.inner(), &context, &settings.kafka).unwrap();
        let ready = metadata.topics().iter().any(|t| {
            t.name() == name
                && t.partitions().len() == partitions as usize
                && t.partitions().iter().all(|p| p.leader() >= 0)
        });
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "topic {name} never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

/// Reads everything that arrives until `quiet` passes with no new message.
pub async fn consume_until_quiet(
    settings: &Settings,
    topic: &str,
    quiet: Duration,
) -> Vec<OwnedMessage> {
    let consumer = consumer(settings, topic);
    let mut messages = Vec::new();
    while let Ok(received) = tokio::time::timeout(quiet, consumer.recv()).await {
        messages.push(
            received
                .unwrap_or_else(|e| panic!("consuming {topic}: {e}"))
                .detach(),
        );
    }
    messages
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

/// The eventpipe binary built for this test run.
pub fn eventpipe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_eventpipe"))
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

/// A free loopback port for a child's telemetry endpoint.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An `eventpipe` stage running as a child process, its stderr captured to a file.
pub struct StageProcess {
    child: std::process::Child,
    pub log_path: PathBuf,
    pub metrics_port: u16,
}

impl StageProcess {
    /// Starts `eventpipe <args>` with the stack's environment and its own metrics port.
    pub fn start(args: &[&str], extra_env: &[(&str, &str)]) -> StageProcess {
        use std::process::{Command, Stdio};
        let settings = settings();
        // A caller may pin the telemetry address (e.g. a port Prometheus scrapes).
        let metrics_port = extra_env
            .iter()
            .find(|(name, _)| *name == "EVENTPIPE_METRICS_ADDRESS")
            .and_then(|(_, address)| address.rsplit(':').next()?.parse().ok())
            .unwrap_or_else(free_port);
        let log_path = std::env::temp_dir().join(format!("{}.log", unique("stage")));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = Command::new(eventpipe_bin());
        command
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("KAFKA_BOOTSTRAP_SERVERS", &settings.kafka.bootstrap_servers)
            .env(
                "EVENTPIPE_METRICS_ADDRESS",
                format!("127.0.0.1:{metrics_port}"),
            )
            .env("EVENTPIPE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (name, value) in extra_env {
            command.env(name, value);
        }
        StageProcess {
            child: command.spawn().expect("eventpipe starts"),
            log_path,
            metrics_port,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGTERM, then waits for a graceful exit; returns the exit status.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.log());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "stage did not stop within 60s after SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no drain, no commit, as a crash.
    pub fn kill9(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log()
    }

    /// The Prometheus text of the stage's /metrics, once it answers.
    pub async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = reqwest::get(&url).await {
                if response.status().is_success() {
                    return response.text().await.unwrap();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no /metrics at {url}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Readiness status code of /ready (None until the endpoint answers).
    pub async fn ready_status(&self) -> Option<u16> {
        let url = format!("http://127.0.0.1:{}/ready", self.metrics_port);
        reqwest::get(&url).await.ok().map(|r| r.status().as_u16())
    }
}

impl Drop for StageProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
