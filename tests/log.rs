//! `eventpipe log` against the real stack: every event becomes exactly one searchable document,
//! poison goes to the dead-letter topic with Elasticsearch's reason, and a crash duplicates nothing.

mod common;
#[path = "common/elasticsearch.rs"]
mod es;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::StageProcess;
use es::TestRecord;
use serde_json::{json, Value};

/// A fresh input topic (with its .dlq), index pattern, template and group for one test.
struct Fixture {
    settings: eventpipe::config::Settings,
    topic: String,
    prefix: String,
}

impl Fixture {
    async fn new(name: &str) -> Fixture {
        let settings = common::settings();
        let topic = common::unique(name);
        common::create_topic(&settings, &topic, 3).await;
        common::create_topic(&settings, &format!("{topic}.dlq"), 1).await;
        // Index names must be lowercase; unique() already is.
        let prefix = common::unique(&format!("{name}-idx"));
        Fixture {
            settings,
            topic,
            prefix,
        }
    }

    /// Every index this test's stage can write.
    fn indices(&self) -> String {
        format!("{}-*", self.prefix)
    }

    fn group(&self) -> String {
        format!("{}-group", self.topic)
    }

    /// Waits until the stage committed the whole input topic: every record is indexed or
    /// dead-lettered (offsets are committed only behind that).
    async fn wait_until_all_handled(&self) {
        common::wait_for_committed_end(
            &self.settings,
            &self.group(),
            &self.topic,
            Duration::from_secs(90),
        )
        .await;
    }

    fn start(&self, extra: &[&str], env: &[(&str, &str)]) -> StageProcess {
        let pattern = format!("{}-%Y.%m.%d", self.prefix);
        let group = self.group();
        let mut args = vec![
            "log",
            "--input-topic",
            &self.topic,
            "--index-pattern",
            &pattern,
            "--template-name",
            &self.prefix,
            "--group-id",
            &group,
            "--flush-interval-ms",
            "50",
        ];
        args.extend_from_slice(extra);
        StageProcess::start(&args, env)
    }
}

/// One generated event and what a user should find for it.
struct Event {
    executer: &'static str,
    action: &'static str,
    level: &'static str,
    word: &'static str,
    time: Option<DateTime<Utc>>,
    record: TestRecord,
}

/// Events covering the ways level and timestamp arrive: payload, header, default; zone-less,
/// `Z`, missing. Plain envelopes and dispatcher outputs (with a `source` block) alternate.
fn events(count: usize) -> Vec<Event> {
    let executers = ["lk", "orm", "eventpipe-dispatch"];
    let actions = ["create_user", "update_user", "start_task"];
    let words = ["apple", "banana", "cherry", "damson"];
    let base = DateTime::parse_from_rfc3339("2024-05-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    (0..count)
        .map(|i| {
            let executer = executers[i % 3];
            let action = actions[(i / 3) % 3];
            let word = words[i % 4];
            let time = (i % 10 != 9).then(|| base + chrono::Duration::minutes(37 * i as i64));
            let timestamp = time.map(|t| {
                if i % 2 == 0 {
                    t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string() // zone-less, as utcnow()
                } else {
                    t.to_rfc3339()
                }
            });
            let (level, in_payload, in_header) = match i % 5 {
                0 => ("error", Some("ERROR"), None),
                1 => ("warning", None, Some("warning")),
                _ => ("info", None, None),
            };
            let mut payload = json!({
                "message": format!("User {word} number {i} changed"),
                "data": {"user_id": i, "nested": {"flag": i % 2 == 0}},
            });
            if let Some(t) = &timestamp {
                payload["timestamp"] = json!(t);
            }
            if let Some(level) = in_payload {
                payload["level"] = json!(level);
            }
            let mut envelope = json!({"service": executer, "action": action, "payload": payload});
            if i % 2 == 1 {
                envelope["source"] = json!({"service": "lk", "action": action, "topic": "create_user_in",
                    "partition": 0, "offset": i, "timestamp": "2024-05-01T12:00:00.123456", "key": i.to_string()});
            }
            let mut headers = vec![
                ("service".to_string(), executer.to_string()),
                ("action".to_string(), action.to_string()),
            ];
            if let Some(level) = in_header {
                headers.push(("level".into(), level.into()));
            }
            Event {
                executer,
                action,
                level,
                word,
                time,
                record: TestRecord {
                    key: i.to_string(),
                    value: serde_json::to_vec(&envelope).unwrap(),
                    headers,
                },
            }
        })
        .collect()
}

fn records(events: &[Event]) -> Vec<TestRecord> {
    events
        .iter()
        .map(|e| TestRecord {
            key: e.record.key.clone(),
            value: e.record.value.clone(),
            headers: e.record.headers.clone(),
        })
        .collect()
}

fn tally<K: Ord>(events: &[Event], key: impl Fn(&Event) -> K) -> BTreeMap<K, u64> {
    let mut counts = BTreeMap::new();
    for event in events {
        *counts.entry(key(event)).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn every_event_becomes_one_document_searchable_like_in_kibana() {
    let f = Fixture::new("log-search").await;
    let events = events(120);
    let produced_from = Utc::now();
    es::produce_records(&f.settings, &f.topic, &records(&events)).await;
    let produced_to = Utc::now();
    let stage = f.start(&["--batch-size", "25"], &[]);
    let n = events.len() as u64;
    let indices = f.indices();
    let indexed = es::wait_for_count(&f.settings, &indices, n, Duration::from_secs(90)).await;
    assert_eq!(indexed, n, "stage log:\n{}", stage.log());
    // Nothing more arrives later: once the stage committed every record, exactly one document
    // per event.
    f.wait_until_all_handled().await;
    let total = es::count(&f.settings, &indices, json!({"match_all": {}})).await;
    assert_eq!(total, n);

    for (field, expected) in [
        ("executer", tally(&events, |e| e.executer)),
        ("action", tally(&events, |e| e.action)),
        ("level", tally(&events, |e| e.level)),
    ] {
        for (value, want) in expected {
            let got = es::count(&f.settings, &indices, json!({"term": {field: value}})).await;
            assert_eq!(got, want, "{field}:{value}");
        }
    }
    // ECS alias: dashboards filtering on log.level see the same documents.
    let errors = tally(&events, |e| e.level)["error"];
    let by_alias = es::count(
        &f.settings,
        &indices,
        json!({"term": {"log.level": "error"}}),
    )
    .await;
    assert_eq!(by_alias, errors);
    for (word, want) in tally(&events, |e| e.word) {
        let got = es::count(&f.settings, &indices, json!({"match": {"message": word}})).await;
        assert_eq!(got, want, "message contains {word}");
    }
    let from = DateTime::parse_from_rfc3339("2024-05-01T10:00:00Z").unwrap();
    let to = DateTime::parse_from_rfc3339("2024-05-02T20:00:00Z").unwrap();
    let in_range = events
        .iter()
        .filter(|e| e.time.is_some_and(|t| t >= from && t < to))
        .count() as u64;
    let got = es::count(
        &f.settings,
        &indices,
        json!({"range": {"@timestamp": {"gte": from.to_rfc3339(), "lt": to.to_rfc3339()}}}),
    )
    .await;
    assert_eq!(got, in_range, "time range");
    let without_time = events.iter().filter(|e| e.time.is_none()).count() as u64;
    let marked = es::count(
        &f.settings,
        &indices,
        json!({"term": {"tags": "timestamp_from_kafka"}}),
    )
    .await;
    assert_eq!(marked, without_time);
    let user_7 = es::count(
        &f.settings,
        &indices,
        json!({"term": {"data.user_id": "7"}}),
    )
    .await;
    assert_eq!(user_7, 1, "data leaves are searchable");

    // One index per event day; events without a timestamp are dated by their Kafka record.
    let event_days: BTreeSet<String> = events
        .iter()
        .filter_map(|e| e.time)
        .map(|t| format!("{}-{}", f.prefix, t.format("%Y.%m.%d")))
        .collect();
    let kafka_days: BTreeSet<String> = [produced_from, produced_to]
        .iter()
        .map(|t| format!("{}-{}", f.prefix, t.format("%Y.%m.%d")))
        .collect();
    let response = es::search(
        &f.settings,
        &indices,
        json!({"size": 0, "aggs": {"indices": {"terms": {"field": "_index", "size": 100}}}}),
    )
    .await;
    let found: BTreeSet<String> = response["aggregations"]["indices"]["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["key"].as_str().unwrap().to_string())
        .collect();
    let extra: BTreeSet<String> = found.difference(&event_days).cloned().collect();
    assert!(event_days.is_subset(&found), "{found:?}");
    assert!(
        !extra.is_empty() && extra.is_subset(&kafka_days),
        "{extra:?} are the record days {kafka_days:?}"
    );

    // A dispatcher output keeps both trails: the info_in record and the original source.
    let hit = es::search(
        &f.settings,
        &indices,
        json!({"query": {"term": {"kafka.key": "3"}}}),
    )
    .await;
    let doc = &hit["hits"]["hits"][0]["_source"];
    assert_eq!(doc["service"], "logger-service");
    assert_eq!(doc["kafka"]["topic"], f.topic.as_str());
    assert_eq!(doc["origin"]["offset"], 3);
    assert_eq!(doc["origin"]["topic"], "create_user_in");
    assert_eq!(doc["message"], "User damson number 3 changed");
    let id = hit["hits"]["hits"][0]["_id"].as_str().unwrap();
    let expected_id = format!(
        "{}-{}-{}",
        f.topic, doc["kafka"]["partition"], doc["kafka"]["offset"]
    );
    assert_eq!(id, expected_id);

    let metrics = stage.metrics().await;
    let indexed_metric = common::metric_value(&metrics, "eventpipe_log_indexed_total", &[]);
    assert_eq!(indexed_metric, Some(n as f64));
    let (status, log) = stage.terminate();
    assert!(status.success(), "{log}");
}

/// `data` nested deeper than the template's flattened depth limit: Elasticsearch rejects it.
fn too_deep() -> Value {
    let mut data = json!("bottom");
    for _ in 0..30 {
        data = json!({ "level": data });
    }
    data
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_goes_to_the_dead_letter_topic_with_the_reason_while_the_rest_is_indexed() {
    let f = Fixture::new("log-poison").await;
    let good = events(30);
    let mut all = records(&good);
    let poison = json!({"service": "lk", "action": "create_user",
        "payload": {"message": "too deep", "timestamp": "2024-05-01T12:00:00", "data": too_deep()}});
    all.insert(
        10,
        TestRecord {
            key: "poison".into(),
            value: serde_json::to_vec(&poison).unwrap(),
            headers: vec![("service".into(), "lk".into())],
        },
    );
    all.insert(
        20,
        TestRecord {
            key: "garbage".into(),
            value: b"{not json".to_vec(),
            headers: vec![],
        },
    );
    es::produce_records(&f.settings, &f.topic, &all).await;
    let stage = f.start(&[], &[]);
    let n = good.len() as u64;
    let indexed = es::wait_for_count(&f.settings, &f.indices(), n, Duration::from_secs(90)).await;
    assert_eq!(indexed, n, "{}", stage.log());

    let dead = common::consume(
        &f.settings,
        &format!("{}.dlq", f.topic),
        2,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(dead.len(), 2, "{}", stage.log());
    let by_key: BTreeMap<String, _> = dead.iter().map(|m| (common::key(m), m)).collect();
    let rejected = by_key["poison"];
    let headers = common::headers(rejected);
    assert_eq!(headers["eventpipe.error.kind"], "elasticsearch_rejected");
    assert_eq!(headers["eventpipe.elasticsearch.status"], "400");
    assert!(
        headers["eventpipe.error.reason"].contains("[data]"),
        "Elasticsearch's reason names the field: {headers:?}"
    );
    assert_eq!(headers["eventpipe.source.topic"], f.topic);
    assert_eq!(headers["service"], "lk", "original headers are kept");
    assert_eq!(common::json(rejected), poison, "original bytes untouched");
    let garbage = common::headers(by_key["garbage"]);
    assert_eq!(garbage["eventpipe.error.kind"], "malformed_json");

    // Still exactly the good ones once the stage committed every record.
    f.wait_until_all_handled().await;
    assert_eq!(
        es::count(&f.settings, &f.indices(), json!({"match_all": {}})).await,
        n
    );
    let metrics = stage.metrics().await;
    for kind in ["elasticsearch_rejected", "malformed_json"] {
        let label = format!("kind=\"{kind}\"");
        assert_eq!(
            common::metric_value(&metrics, "eventpipe_log_dead_lettered_total", &[&label]),
            Some(1.0),
            "{kind}"
        );
    }
    let (status, log) = stage.terminate();
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn avro_events_are_indexed_and_bad_avro_is_dead_lettered() {
    use eventpipe::codec::SchemaName;
    use rdkafka::message::Message;
    let f = Fixture::new("log-avro").await;
    common::register(&f.topic, SchemaName::Event).await;
    let codec = common::avro_codec(SchemaName::Event);
    // The Avro event has a timestamp: the stage's fallback for missing ones is a JSON matter.
    let events: Vec<Event> = events(60)
        .into_iter()
        .filter(|e| e.time.is_some())
        .collect();
    let mut all = Vec::new();
    for event in &events {
        let value = codec
            .encode(&f.topic, event.record.value.clone())
            .await
            .expect("every generated event fits schemas/event.avsc");
        all.push(TestRecord {
            key: event.record.key.clone(),
            value,
            headers: event.record.headers.clone(),
        });
    }
    let json_bytes = events[0].record.value.clone();
    all.insert(
        7,
        TestRecord {
            key: "json".into(),
            value: json_bytes.clone(),
            headers: vec![],
        },
    );
    es::produce_records(&f.settings, &f.topic, &all).await;
    let stage = f.start(&[], &[("EVENTPIPE_INPUT_FORMAT", "avro")]);
    let n = events.len() as u64;
    let indexed = es::wait_for_count(&f.settings, &f.indices(), n, Duration::from_secs(90)).await;
    assert_eq!(indexed, n, "{}", stage.log());
    for (field, expected) in [
        ("executer", tally(&events, |e| e.executer)),
        ("level", tally(&events, |e| e.level)),
    ] {
        for (value, want) in expected {
            let got = es::count(&f.settings, &f.indices(), json!({"term": {field: value}})).await;
            assert_eq!(got, want, "{field}:{value}");
        }
    }
    // payload.data travelled as JSON text inside Avro and is searchable field by field again.
    let user = events[3].record.key.clone();
    let found = es::count(
        &f.settings,
        &f.indices(),
        json!({"term": {"data.user_id": user}}),
    )
    .await;
    assert_eq!(found, 1);
    let with_origin = events.iter().filter(|e| {
        serde_json::from_slice::<serde_json::Value>(&e.record.value).unwrap()["source"].is_object()
    });
    let got = es::count(
        &f.settings,
        &f.indices(),
        json!({"exists": {"field": "origin.topic"}}),
    )
    .await;
    assert_eq!(
        got,
        with_origin.count() as u64,
        "the dispatcher's trail survives Avro"
    );

    let dead = common::consume(
        &f.settings,
        &format!("{}.dlq", f.topic),
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        common::headers(&dead[0])["eventpipe.error.kind"],
        "avro_magic"
    );
    assert_eq!(dead[0].payload().unwrap(), json_bytes.as_slice());
    let (status, log) = stage.terminate();
    assert!(status.success(), "{log}");
}

/// Documents whose Kafka offset is at or above its partition's entry in `committed`: what a
/// restart from those offsets reads again.
fn at_or_beyond(committed: &BTreeMap<i32, i64>) -> Value {
    let per_partition: Vec<Value> = committed
        .iter()
        .map(|(p, o)| {
            json!({"bool": {"filter": [
                {"term": {"kafka.partition": p}},
                {"range": {"kafka.offset": {"gte": o}}}
            ]}})
        })
        .collect();
    json!({"bool": {"should": per_partition, "minimum_should_match": 1}})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_logger_restarts_without_duplicates() {
    let f = Fixture::new("log-kill").await;
    let events = events(2000);
    es::produce_records(&f.settings, &f.topic, &records(&events)).await;
    let n = events.len() as u64;
    let group = f.group();
    let indices = f.indices();
    // Small batches make the run long enough to kill it in the middle.
    let small = ["--batch-size", "20"];
    // A short session timeout lets the group notice the killed member quickly.
    let fast_failover = [("EVENTPIPE_KAFKA_SESSION_TIMEOUT_MS", "6000")];
    let first = f.start(&small, &fast_failover);
    let before = es::wait_for_count(&f.settings, &indices, n / 10, Duration::from_secs(90)).await;
    assert!(before >= n / 10, "{}", first.log());
    // Crash at a moment when Elasticsearch holds documents past the committed offsets (indexed,
    // not yet committed), so the restart must deliver them again: freeze the stage, look, and
    // kill it frozen, or let it run on and look again.
    common::wait_until(
        Duration::from_secs(60),
        "documents indexed beyond the committed offsets",
        async || {
            first.freeze();
            let committed = common::committed_offsets(&f.settings, &group, &f.topic);
            let beyond = es::count(&f.settings, &indices, at_or_beyond(&committed)).await;
            if beyond > 0 {
                return Ok(());
            }
            first.resume();
            Err(format!("committed {committed:?}, nothing indexed beyond"))
        },
    )
    .await;
    let first_log = first.kill9();
    // Once the killed member expired nothing commits for the group any more: the restart
    // starts from these offsets.
    common::wait_for_empty_group(&f.settings, &group, Duration::from_secs(60)).await;
    let committed = common::committed_offsets(&f.settings, &group, &f.topic);
    let end = common::end_offsets(&f.settings, &f.topic);
    let replayed: i64 = end.iter().map(|(p, e)| e - committed[p]).sum();
    let beyond = es::count(&f.settings, &indices, at_or_beyond(&committed)).await;
    let at_kill = es::count(&f.settings, &indices, json!({"match_all": {}})).await;
    eprintln!(
        "killed with {at_kill} of {n} documents indexed, {beyond} of them past the committed \
         offsets {committed:?}; the restart reads {replayed} records again"
    );
    assert!(beyond > 0, "{first_log}");

    let second = f.start(&small, &fast_failover);
    // Done when it committed the end and accounted for every record it read: each is a new
    // document (`indexed`) or an answered 409 (`already_indexed`), exactly once.
    let counters = async || {
        let metrics = second.metrics().await;
        let counter = |name| common::metric_value(&metrics, name, &[]).unwrap_or(0.0) as i64;
        (
            counter("eventpipe_log_indexed_total"),
            counter("eventpipe_log_already_indexed_total"),
        )
    };
    common::wait_until(
        Duration::from_secs(120),
        "the restart to handle every record it read",
        async || {
            let (indexed, already) = counters().await;
            let at = common::committed_offsets(&f.settings, &group, &f.topic);
            if at == end && indexed + already >= replayed {
                Ok(())
            } else {
                Err(format!(
                    "committed {at:?} of {end:?}, {indexed} indexed + {already} already indexed \
                     of {replayed}:\n{}",
                    second.log()
                ))
            }
        },
    )
    .await;
    let (indexed, already) = counters().await;
    eprintln!("the restart indexed {indexed} and answered 409 for {already}");
    assert_eq!(
        es::count(&f.settings, &indices, json!({"match_all": {}})).await,
        n,
        "exactly one document per event"
    );
    assert!(
        already > 0,
        "the restart re-delivered records, and Elasticsearch answered 409 for them"
    );
    assert!(
        already >= beyond as i64,
        "each of the {beyond} documents past the committed offsets came back as a 409"
    );
    assert_eq!(
        indexed + already,
        replayed,
        "each record read again counted once, as new or already indexed"
    );
    let (status, log) = second.terminate();
    assert!(status.success(), "{log}");
}

#[test]
fn kibana_saved_objects_match_the_default_index_pattern() {
    let defaults = eventpipe::log::LogSettings::resolve(&Default::default(), &Default::default())
        .expect("defaults are valid");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kibana/saved_objects.ndjson"
    ))
    .unwrap();
    let objects: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    let data_view = objects
        .iter()
        .find(|o| o["type"] == "index-pattern")
        .expect("a data view");
    assert_eq!(
        data_view["attributes"]["title"],
        defaults.index_pattern.wildcard().as_str()
    );
    assert_eq!(data_view["attributes"]["timeFieldName"], "@timestamp");
    let search = objects
        .iter()
        .find(|o| o["type"] == "search")
        .expect("a saved search");
    assert_eq!(search["references"][0]["id"], data_view["id"]);
    let source: Value = serde_json::from_str(
        search["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(source["query"]["query"], "level:error");
}
