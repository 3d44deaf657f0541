//! Avro and the schema registry on the real stack: every schema round-trips through the
//! registry, a field added with a default reads both ways, an incompatible change is refused
//! naming the field, the dispatcher consumes Avro envelopes (also from the Python example) and
//! dead-letters each kind of bad Avro record, and a registry outage is waited out, not
//! dead-lettered.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::StageProcess;
use eventpipe::codec::{value_subject, Codec, SchemaName};
use rdkafka::message::{Message, OwnedMessage};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

fn envelope(action: &str, user_id: u64, seq: u64) -> Value {
    json!({"service": "lk", "action": action, "payload": {
        "message": format!("It is {action}"), "timestamp": "2024-05-01T12:00:00.123456",
        "data": {"user_id": user_id, "seq": seq, "tags": ["a", {"nested": null}]}}})
}

/// schemas/envelope.avsc with two fields added, both with defaults: a compatible evolution.
fn envelope_v2_text() -> String {
    let mut schema: Value = serde_json::from_str(SchemaName::Envelope.text()).unwrap();
    schema["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "priority", "type": "int", "default": 0}));
    schema["fields"][2]["type"]["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "trace_id", "type": "string", "default": "untraced"}));
    schema.to_string()
}

async fn encode(codec: &Codec, topic: &str, value: &Value) -> Vec<u8> {
    codec
        .encode(topic, serde_json::to_vec(value).unwrap())
        .await
        .expect("encodes")
}

async fn decode(codec: &Codec, topic: &str, bytes: &[u8]) -> Value {
    serde_json::from_slice(&codec.decode(topic, bytes).await.expect("decodes")).unwrap()
}

fn schema_id(framed: &[u8]) -> u32 {
    assert_eq!(framed[0], 0, "Confluent magic byte");
    u32::from_be_bytes(framed[1..5].try_into().unwrap())
}

#[tokio::test]
async fn every_schema_round_trips_through_the_registry() {
    let samples = [
        (SchemaName::Envelope, envelope("create_user", 42, 1)),
        (
            SchemaName::Event,
            json!({"service": "eventpipe-dispatch", "action": "create_user", "payload": {
                "message": "User created", "timestamp": "2026-11-23T18:00:00.123456Z",
                "data": {"user_id": 42}, "level": "warning"},
                "source": {"service": "lk", "action": "create_user", "topic": "create_user_in",
                "partition": 2, "offset": 12345678901_i64, "timestamp": "2024-05-01T12:00:00", "key": "42"}}),
        ),
        (
            SchemaName::AggregateEvent,
            json!({"name": "cpu_load", "function": "avg", "value": 0.42, "timestamp": "2024-05-01T12:00:00Z"}),
        ),
        (
            SchemaName::Aggregate,
            json!({"name": "cpu_load", "function": "p99", "window_start": "2024-05-01T12:00:00.000Z",
                "window_end": "2024-05-01T12:01:00.000Z", "value": 1165.6100000000001, "count": 7,
                "emitted_at": "2024-05-01T12:01:02.345Z"}),
        ),
        (
            SchemaName::Metrics,
            json!({"service": "eventpipe-aggregate", "group_id": "g", "timestamp": "2024-05-01T12:00:00.000Z",
                "aggregated_events_count": 10, "failed_events_count": 1, "processing_time": 0.25}),
        ),
    ];
    let registry = common::registry();
    for (schema, sample) in samples {
        let topic = common::unique(&format!("avro-rt-{}", schema.file_stem()));
        let codec = common::avro_codec(schema);
        let framed = encode(&codec, &topic, &sample).await;
        let registered = registry
            .lookup_id(&value_subject(&topic), schema.text())
            .await
            .unwrap();
        assert_eq!(
            schema_id(&framed),
            registered,
            "{schema:?}: framed with the subject's id"
        );
        assert!(
            framed.len() < serde_json::to_vec(&sample).unwrap().len(),
            "{schema:?}: Avro is smaller than the JSON"
        );
        assert_eq!(decode(&codec, &topic, &framed).await, sample, "{schema:?}");
    }
}

#[tokio::test]
async fn a_field_added_with_a_default_reads_both_ways() {
    let topic = common::unique("avro-evolve");
    let subject = value_subject(&topic);
    let registry = common::registry();
    registry
        .set_compatibility_level(&subject, "BACKWARD")
        .await
        .unwrap();
    let v1 = common::avro_codec(SchemaName::Envelope);
    let v2 = Codec::with_schema(
        common::avro_settings(),
        Some(registry.clone()),
        "envelope v2",
        &envelope_v2_text(),
    )
    .unwrap();

    let old = envelope("create_user", 1, 1);
    let written_by_v1 = encode(&v1, &topic, &old).await;
    let mut new = envelope("create_user", 2, 2);
    new["priority"] = json!(5);
    new["payload"]["trace_id"] = json!("abc");
    let written_by_v2 = encode(&v2, &topic, &new).await;
    let versions = registry.versions(&subject).await.unwrap();
    assert_eq!(versions.len(), 2, "the registry accepted v2 under BACKWARD");
    assert_ne!(schema_id(&written_by_v1), schema_id(&written_by_v2));

    // A v1 reader reads v2 records: the new fields are dropped, the rest intact.
    let mut expected = new.clone();
    expected.as_object_mut().unwrap().remove("priority");
    expected["payload"]
        .as_object_mut()
        .unwrap()
        .remove("trace_id");
    assert_eq!(decode(&v1, &topic, &written_by_v2).await, expected);
    // A v2 reader reads v1 records: the new fields take their defaults.
    let mut expected = old.clone();
    expected["priority"] = json!(0);
    expected["payload"]["trace_id"] = json!("untraced");
    assert_eq!(decode(&v2, &topic, &written_by_v1).await, expected);
    // And each reads its own.
    assert_eq!(decode(&v1, &topic, &written_by_v1).await, old);
    assert_eq!(decode(&v2, &topic, &written_by_v2).await, new);
}

/// A topics file naming `schema` for each topic, in a temporary directory with a copy of
/// schemas/ (so a test can edit a schema without touching the repository's).
fn schema_workspace(topics: &[(&str, SchemaName)]) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(common::unique("schemas"));
    let schemas = dir.join("schemas");
    std::fs::create_dir_all(&schemas).unwrap();
    for schema in SchemaName::ALL {
        std::fs::write(
            schemas.join(format!("{}.avsc", schema.file_stem())),
            schema.text(),
        )
        .unwrap();
    }
    let mut text = String::new();
    for (topic, schema) in topics {
        text.push_str(&format!(
            "[[topics]]\nname = \"{topic}\"\nvalue_schema = \"{}\"\n",
            schema.file_stem()
        ));
    }
    let topics_file = dir.join("topics.toml");
    std::fs::write(&topics_file, text).unwrap();
    (topics_file, schemas)
}

fn schemas_command(action: &str, topics_file: &Path, schemas: &Path) -> std::process::Output {
    common::run_eventpipe(
        &[
            "schemas",
            action,
            "--topics-file",
            topics_file.to_str().unwrap(),
            "--schemas-dir",
            schemas.to_str().unwrap(),
        ],
        &[],
        None,
    )
}

#[tokio::test]
async fn an_incompatible_change_is_refused_naming_the_field() {
    let topic = common::unique("avro-refuse");
    let (topics_file, schemas) = schema_workspace(&[(&topic, SchemaName::Envelope)]);
    let first = schemas_command("register", &topics_file, &schemas);
    assert!(first.status.success(), "{}", common::stderr(&first));
    assert!(
        common::stdout(&first).contains("registered"),
        "{}",
        common::stdout(&first)
    );
    let again = schemas_command("register", &topics_file, &schemas);
    assert!(common::stdout(&again).contains("unchanged (version 1)"));

    // A new required field without a default: old records cannot be read by the new schema.
    let mut schema: Value = serde_json::from_str(SchemaName::Envelope.text()).unwrap();
    schema["fields"][2]["type"]["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "trace_id", "type": "string"}));
    std::fs::write(schemas.join("envelope.avsc"), schema.to_string()).unwrap();
    for action in ["check", "register"] {
        let refused = schemas_command(action, &topics_file, &schemas);
        let out = common::stdout(&refused);
        assert_eq!(refused.status.code(), Some(1), "{action}: {out}");
        assert!(
            out.contains("INCOMPATIBLE")
                && out.contains(
                    "field `payload.trace_id` is not in those records and has no default"
                ),
            "{action}: {out}"
        );
        assert!(common::stderr(&refused).contains("1 of 1 subjects incompatible (BACKWARD)"));
    }
    let registry = common::registry();
    let subject = value_subject(&topic);
    assert_eq!(
        registry.versions(&subject).await.unwrap().len(),
        1,
        "nothing registered"
    );
    // `register` set BACKWARD on the subject, so the registry refuses it too, for any writer.
    assert_eq!(
        registry.compatibility_level(&subject).await.unwrap(),
        "BACKWARD"
    );
    let direct = registry.register(&subject, &schema.to_string()).await;
    assert!(direct.is_err(), "the registry itself refuses: {direct:?}");
    // A compatible change (with a default) passes the check.
    schema["fields"][2]["type"]["fields"][3]["default"] = json!("untraced");
    std::fs::write(schemas.join("envelope.avsc"), schema.to_string()).unwrap();
    let accepted = schemas_command("check", &topics_file, &schemas);
    assert!(accepted.status.success(), "{}", common::stdout(&accepted));
}

/// Fresh dispatcher topics, registered subjects and a routes file pointing at them.
struct Fixture {
    input: String,
    info: String,
    worker: String,
    group: String,
    routes_file: PathBuf,
}

impl Fixture {
    async fn new(name: &str) -> Fixture {
        let settings = common::settings();
        let base = common::unique(name);
        let f = Fixture {
            input: format!("{base}-in"),
            info: format!("{base}-info"),
            worker: format!("{base}-worker"),
            group: format!("{base}-group"),
            routes_file: std::env::temp_dir().join(format!("{base}-routes.toml")),
        };
        common::create_topic(&settings, &f.input, 3).await;
        common::create_topic(&settings, &format!("{}.dlq", f.input), 1).await;
        common::create_topic(&settings, &f.info, 3).await;
        common::create_topic(&settings, &f.worker, 3).await;
        let routes =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/topics/routes.toml"))
                .unwrap()
                .replace("\"info_in\"", &format!("\"{}\"", f.info))
                .replace("\"worker_start_orm\"", &format!("\"{}\"", f.worker));
        std::fs::write(&f.routes_file, routes).unwrap();
        // Registered the way an operator would: `eventpipe schemas register`.
        let (topics_file, schemas) = schema_workspace(&[
            (&f.input, SchemaName::Envelope),
            (&f.info, SchemaName::Event),
            (&f.worker, SchemaName::Event),
        ]);
        let registered = schemas_command("register", &topics_file, &schemas);
        assert!(
            registered.status.success(),
            "{}",
            common::stderr(&registered)
        );
        f
    }

    fn start(&self, env: &[(&str, &str)]) -> StageProcess {
        StageProcess::start(
            &[
                "dispatch",
                "--input-topics",
                &self.input,
                "--routes-file",
                self.routes_file.to_str().unwrap(),
                "--group-id",
                &self.group,
            ],
            env,
        )
    }
}

/// Decodes the dispatcher's Avro outputs and checks the fields every output carries.
async fn outputs(codec: &Codec, messages: &[OwnedMessage], input: &str) -> Vec<Value> {
    let mut values = Vec::new();
    for message in messages {
        let value = common::avro_json(codec, message).await;
        assert_eq!(value["service"], "eventpipe-dispatch");
        assert_eq!(value["source"]["topic"], input);
        assert_eq!(
            common::key(message),
            value["payload"]["data"]["user_id"].to_string(),
            "output keeps the input key: {value}"
        );
        assert_eq!(
            common::key(message),
            value["payload"]["data"]["user_id"].to_string(),
            "output keeps the input key"
        );
        values.push(value);
    }
    values
}

#[tokio::test(flavor = "multi_thread")]
async fn dispatcher_reads_and_writes_avro_and_dead_letters_each_bad_record() {
    let settings = common::settings();
    let f = Fixture::new("avro-dispatch").await;
    let envelopes = common::avro_codec(SchemaName::Envelope);
    let mut records = Vec::new();
    let good = 60u64;
    for seq in 0..good {
        let action = if seq % 2 == 0 {
            "create_user"
        } else {
            "start_task"
        };
        let value = encode(&envelopes, &f.input, &envelope(action, seq % 7, seq)).await;
        records.push(((seq % 7).to_string(), value));
    }
    let valid = records[0].1.clone();
    // A record of another registered schema: its writer schema cannot be read as an envelope.
    let other_topic = common::unique("avro-other");
    let other = encode(
        &common::avro_codec(SchemaName::AggregateEvent),
        &other_topic,
        &json!({"name": "n", "function": "sum", "value": 1.0, "timestamp": "2024-05-01T12:00:00Z"}),
    )
    .await;
    let mut unknown_id = vec![0, 0x7f, 0xff, 0xff, 0xf0];
    unknown_id.extend_from_slice(&valid[5..]);
    let mut trailing = valid.clone();
    trailing.extend_from_slice(&[1, 2, 3]);
    let bad: Vec<(&str, Vec<u8>)> = vec![
        (
            "avro_magic",
            serde_json::to_vec(&envelope("create_user", 1, 999)).unwrap(),
        ),
        ("avro_unknown_schema", unknown_id),
        ("avro_body", valid[..valid.len() - 4].to_vec()),
        ("avro_body", trailing),
        ("avro_incompatible_schema", other),
    ];
    for (i, (_, value)) in bad.iter().enumerate() {
        records.insert(i * 10 + 3, ("bad".to_string(), value.clone()));
    }
    common::produce_all(&settings, &f.input, &records).await;

    let stage = f.start(&[
        ("EVENTPIPE_INPUT_FORMAT", "avro"),
        ("EVENTPIPE_OUTPUT_FORMAT", "avro"),
    ]);
    let events = common::avro_codec(SchemaName::Event);
    let info = common::consume(&settings, &f.info, good as usize, Duration::from_secs(60)).await;
    let worker = common::consume(
        &settings,
        &f.worker,
        good as usize / 2,
        Duration::from_secs(30),
    )
    .await;
    let dead = common::consume(
        &settings,
        &format!("{}.dlq", f.input),
        bad.len(),
        Duration::from_secs(30),
    )
    .await;
    let metrics = stage.metrics().await;
    let (status, log) = stage.terminate();
    assert!(status.success(), "{log}");

    let info = outputs(&events, &info, &f.input).await;
    let mut seqs: Vec<u64> = info
        .iter()
        .map(|v| v["payload"]["data"]["seq"].as_u64().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (0..good).collect::<Vec<_>>(),
        "every good envelope once"
    );
    assert!(info
        .iter()
        .all(|v| v["payload"]["data"]["tags"] == json!(["a", {"nested": null}])));
    // `eventpipe tail` shows Avro records decoded, with their schema id.
    let tail = common::run_eventpipe(&["tail", &f.info, "--count", "1"], &[], None);
    let line: Value = serde_json::from_str(common::stdout(&tail).trim()).unwrap();
    assert!(line["schema_id"].is_u64(), "{line}");
    assert_eq!(line["value"]["service"], "eventpipe-dispatch", "{line}");
    let worker = outputs(&events, &worker, &f.input).await;
    assert!(worker
        .iter()
        .all(|v| v["action"] == "start_task" && v["payload"]["data"]["queue"] == "orm"));

    let mut kinds: Vec<String> = dead
        .iter()
        .map(|m| common::headers(m)["eventpipe.error.kind"].clone())
        .collect();
    kinds.sort();
    let mut expected: Vec<String> = bad.iter().map(|(k, _)| k.to_string()).collect();
    expected.sort();
    assert_eq!(kinds, expected);
    for message in &dead {
        let kind = &common::headers(message)["eventpipe.error.kind"];
        let original = &bad.iter().find(|(k, _)| k == kind).unwrap().1;
        if kind != "avro_body" {
            assert_eq!(
                message.payload().unwrap(),
                original.as_slice(),
                "{kind}: original bytes"
            );
        }
        assert!(!common::headers(message)["eventpipe.error.reason"].is_empty());
    }
    assert_eq!(
        common::metric_value(
            &metrics,
            "eventpipe_dispatch_dead_lettered_total",
            &["kind=\"avro_body\""]
        ),
        Some(2.0),
        "{metrics}"
    );
}

fn python() -> PathBuf {
    std::env::var_os("EVENTPIPE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap();
            PathBuf::from(home).join(".cache/eventpipe/python-venv/bin/python")
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_example_publishes_avro_the_dispatcher_consumes() {
    let settings = common::settings();
    let f = Fixture::new("avro-python").await;
    let count = 40;
    let output = std::process::Command::new(python())
        .args([
            "examples/avro_producer.py",
            "--topic",
            &f.input,
            "--action",
            "update_user",
        ])
        .args(["--count", &count.to_string(), "--users", "4"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the example's Python runs (scripts/python-env installs it)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Avro in, JSON out: formats are per topic.
    let stage = f.start(&[
        ("EVENTPIPE_INPUT_FORMAT", "avro"),
        ("EVENTPIPE_OUTPUT_FORMAT", "json"),
    ]);
    let info = common::consume(&settings, &f.info, count, Duration::from_secs(60)).await;
    let (status, log) = stage.terminate();
    assert!(status.success(), "{log}");
    let mut per_user: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for message in &info {
        let value = common::json(message);
        assert_eq!(value["action"], "update_user");
        assert_eq!(value["payload"]["message"], "User updated");
        assert_eq!(value["source"]["service"], "lk");
        assert_eq!(
            common::key(message),
            value["payload"]["data"]["user_id"].to_string()
        );
        per_user
            .entry(common::key(message))
            .or_default()
            .push(value["payload"]["data"]["seq"].as_u64().unwrap());
    }
    assert_eq!(per_user.len(), 4);
    for (user, seqs) in per_user {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted, "user {user}: in order");
        assert_eq!(seqs.len(), count / 4);
    }
}

/// A TCP proxy in front of the real registry that can cut every connection, old and new: the
/// registry becoming unreachable, as the stage sees it, without stopping the shared one.
struct Cut {
    port: u16,
    up: Arc<AtomicBool>,
    connections: Arc<std::sync::Mutex<CancellationToken>>,
}

impl Cut {
    async fn start(target: String) -> Cut {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let (accept_up, accept_connections) = (up.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accept_up.load(Ordering::SeqCst) {
                    continue; // dropped: connection reset
                }
                let cut = accept_connections.lock().unwrap().clone();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Cut {
            port,
            up,
            connections,
        }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            let mut connections = self.connections.lock().unwrap();
            connections.cancel();
            *connections = CancellationToken::new();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_outage_is_waited_out_and_nothing_is_dead_lettered() {
    let settings = common::settings();
    let f = Fixture::new("avro-outage").await;
    let registry_url = settings.schema_registry_url.clone();
    let target = format!(
        "{}:{}",
        registry_url.host_str().unwrap(),
        registry_url.port_or_known_default().unwrap()
    );
    let cut = Cut::start(target).await;
    let mut proxied = registry_url.clone();
    proxied.set_port(Some(cut.port)).unwrap();

    let v1 = common::avro_codec(SchemaName::Envelope);
    let first: Vec<_> = futures::future::join_all((0..20u64).map(|seq| {
        let v1 = v1.clone();
        let topic = f.input.clone();
        async move {
            (
                (seq % 3).to_string(),
                encode(&v1, &topic, &envelope("create_user", seq % 3, seq)).await,
            )
        }
    }))
    .await;
    common::produce_all(&settings, &f.input, &first).await;
    let stage = f.start(&[
        ("EVENTPIPE_INPUT_FORMAT", "avro"),
        ("EVENTPIPE_OUTPUT_FORMAT", "json"),
        ("SCHEMA_REGISTRY_URL", proxied.as_str()),
    ]);
    let before = common::consume(&settings, &f.info, 20, Duration::from_secs(60)).await;
    assert_eq!(before.len(), 20);

    // Records written with a schema id the stage has not seen: it must ask the registry.
    cut.set_up(false);
    let v2 = Codec::with_schema(
        common::avro_settings(),
        Some(common::registry()),
        "envelope v2",
        &envelope_v2_text(),
    )
    .unwrap();
    let mut second = Vec::new();
    for seq in 20..40u64 {
        let mut value = envelope("create_user", seq % 3, seq);
        value["payload"]["trace_id"] = json!(format!("t{seq}"));
        second.push(((seq % 3).to_string(), encode(&v2, &f.input, &value).await));
    }
    common::produce_all(&settings, &f.input, &second).await;
    // The stage met the outage: it counted registry errors and says it is waiting.
    common::wait_until(
        Duration::from_secs(60),
        "the stage to wait for the registry",
        async || {
            let metrics = stage.metrics().await;
            let errors =
                common::metric_value(&metrics, "eventpipe_schema_registry_errors_total", &[]);
            let waiting = stage.log().contains("schema registry unavailable; waiting");
            if errors.unwrap_or(0.0) >= 1.0 && waiting {
                Ok(())
            } else {
                Err(format!("errors {errors:?}, waiting logged: {waiting}"))
            }
        },
    )
    .await;
    assert_eq!(
        common::end_offsets(&settings, &f.info)
            .values()
            .sum::<i64>(),
        20,
        "nothing of the second batch is routed before the registry is back"
    );

    cut.set_up(true);
    let arrived = common::consume(&settings, &f.info, 40, Duration::from_secs(60)).await;
    assert_eq!(arrived.len(), 40, "{}", stage.log());
    // Every input handled (committed): a dead letter would have been written before.
    common::wait_for_committed_end(&settings, &f.group, &f.input, Duration::from_secs(60)).await;
    let (status, log) = stage.terminate();
    assert!(status.success(), "{log}");
    let dead = common::read_to_end(&settings, &format!("{}.dlq", f.input));
    assert!(
        dead.is_empty(),
        "an outage dead-letters nothing: {} records",
        dead.len()
    );
    let all = common::read_to_end(&settings, &f.info);
    let mut seqs: Vec<u64> = all
        .iter()
        .map(|m| common::json(m)["payload"]["data"]["seq"].as_u64().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (0..40).collect::<Vec<_>>(),
        "every record once, none lost"
    );
}
