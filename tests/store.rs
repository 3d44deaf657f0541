//! `eventpipe store` on the real stack: every record of the stored topics is in PostgreSQL once,
//! with the fields an independent Kafka reader finds (bad input kept raw with its reason),
//! `store verify` agrees and finds a gap, a kill -9 and restart and several instances with one
//! killed lose and duplicate nothing, and retention drops whole expired days.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::StageProcess;
use rdkafka::message::{Headers, Message, OwnedMessage};
use serde_json::{json, Value};
use sqlx::Row;

use eventpipe::config::Settings;

const SERVICES: [&str; 3] = ["lk", "arm", "orm"];
const ACTIONS: [&str; 3] = ["create_user", "update_user", "start_task"];
/// Values above this are stored raw in these tests (`--max-json-bytes`).
const MAX_JSON_BYTES: usize = 2_000;

use common::Outgoing as Produced;

async fn produce(settings: &Settings, records: &[Produced]) {
    common::produce_outgoing(settings, records).await
}

fn envelope(i: usize, service: &str, action: &str) -> Value {
    json!({"service": service, "action": action,
           "payload": {"message": format!("event {i}"), "timestamp": "2024-05-01T12:00:00.123456",
                       "data": {"user_id": i % 97, "i": i}}})
}

/// `count` envelopes spread over `topics`; every third one without service/action headers (the
/// store then reads them from the envelope).
fn envelopes(topics: &[String], count: usize) -> Vec<Produced> {
    (0..count)
        .map(|i| {
            let (service, action) = (SERVICES[i % 3], ACTIONS[(i / 3) % 3]);
            let headers = if i % 3 == 0 {
                Vec::new()
            } else {
                vec![
                    ("service".to_string(), service.as_bytes().to_vec()),
                    ("action".to_string(), action.as_bytes().to_vec()),
                    ("trace".to_string(), format!("t{i}").into_bytes()),
                ]
            };
            Produced {
                topic: topics[i % topics.len()].clone(),
                key: Some(format!("{}", i % 97).into_bytes()),
                value: serde_json::to_vec(&envelope(i, service, action)).unwrap(),
                headers,
                timestamp_ms: None,
            }
        })
        .collect()
}

/// Records the store must keep raw, each with the words its reason must contain.
fn bad_records(topic: &str) -> Vec<(Produced, &'static str)> {
    let raw = |value: Vec<u8>, headers: Vec<(String, Vec<u8>)>| Produced {
        topic: topic.to_string(),
        key: None,
        value,
        headers,
        timestamp_ms: None,
    };
    let oversized = serde_json::to_vec(&json!({"service": "lk", "action": "create_user",
        "payload": {"message": "x".repeat(MAX_JSON_BYTES), "timestamp": "2024-05-01T12:00:00"}}))
    .unwrap();
    // Random hex does not compress: the index entry really is that long.
    let sender: String = (0..3_000)
        .map(|_| format!("{:x}", rand::random::<u8>() % 16))
        .collect();
    let huge_sender =
        serde_json::to_vec(&json!({"service": sender, "action": "create_user", "payload": {}}))
            .unwrap();
    vec![
        (raw(b"\xff\xfe\x00 not UTF-8".to_vec(), vec![]), "not UTF-8"),
        (raw(b"{\"service\": \"lk\", ".to_vec(), vec![]), "not JSON"),
        (raw(b"".to_vec(), vec![]), "not JSON"),
        (
            raw(
                br#"{"service":"lk","action":"x","nul":"\u0000"}"#.to_vec(),
                vec![],
            ),
            "\\u0000",
        ),
        // JSON that jsonb takes, but a sender too long for its index: PostgreSQL refuses the
        // row; it is stored raw, without the sender, with PostgreSQL's reason.
        (raw(huge_sender.clone(), vec![]), "refused by PostgreSQL"),
        (
            raw(
                oversized,
                vec![
                    ("service".into(), b"lk".to_vec()),
                    ("action".into(), b"big".to_vec()),
                ],
            ),
            "oversized",
        ),
    ]
}

/// The database URL of a fresh database, and a pool on it.
async fn fresh_store(settings: &Settings) -> (sqlx::PgPool, String) {
    common::fresh_database_url(settings).await
}

fn start_store(topics: &[String], url: &str, group: &str, extra: &[&str]) -> StageProcess {
    let topics = topics.join(",");
    let max_json = MAX_JSON_BYTES.to_string();
    let mut args = vec![
        "store",
        "--topics",
        &topics,
        "--postgres-url",
        url,
        "--group-id",
        group,
        "--max-json-bytes",
        &max_json,
    ];
    args.extend_from_slice(extra);
    StageProcess::start(&args, &[])
}

async fn row_count(pool: &sqlx::PgPool) -> i64 {
    // The table exists once the stage migrated; before that there is nothing stored.
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

async fn wait_for_rows(pool: &sqlx::PgPool, expected: i64, stage: &[&StageProcess]) {
    common::wait_until(
        Duration::from_secs(120),
        &format!("{expected} rows in the store"),
        async || {
            let count = row_count(pool).await;
            if count == expected {
                Ok(())
            } else {
                let logs: Vec<String> = stage.iter().map(|s| s.log()).collect();
                let tail: String = logs
                    .iter()
                    .flat_map(|l| l.lines().rev().take(5))
                    .collect::<Vec<_>>()
                    .join("\n");
                Err(format!("{count} rows; logs end:\n{tail}"))
            }
        },
    )
    .await
}

/// Every record of `topics` as an independent reader finds it, by coordinates.
fn kafka_records(
    settings: &Settings,
    topics: &[String],
) -> BTreeMap<(String, i32, i64), OwnedMessage> {
    topics
        .iter()
        .flat_map(|topic| common::read_to_end(settings, topic))
        .map(|m| ((m.topic().to_string(), m.partition(), m.offset()), m))
        .collect()
}

/// One stored row, as the test reads it back.
#[derive(Debug)]
struct StoredRow {
    seq: i64,
    key: Option<Vec<u8>>,
    kafka_time_ms: i64,
    event_time: Option<String>,
    service: String,
    action: String,
    headers: Option<Value>,
    value: Option<Value>,
    raw: Option<Vec<u8>>,
    format: String,
    reason: Option<String>,
}

async fn stored_rows(pool: &sqlx::PgPool) -> BTreeMap<(String, i32, i64), Vec<StoredRow>> {
    let rows = sqlx::query(
        "SELECT seq, topic, kafka_partition, kafka_offset, key,
                (extract(epoch from kafka_time) * 1000)::bigint AS kafka_time_ms,
                to_char(event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') AS event_time,
                service, action, headers, value, raw, format, reason
         FROM events ORDER BY seq",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut by_coordinates: BTreeMap<(String, i32, i64), Vec<StoredRow>> = BTreeMap::new();
    for row in rows {
        by_coordinates
            .entry((
                row.get("topic"),
                row.get("kafka_partition"),
                row.get("kafka_offset"),
            ))
            .or_default()
            .push(StoredRow {
                seq: row.get("seq"),
                key: row.get("key"),
                kafka_time_ms: row.get("kafka_time_ms"),
                event_time: row.get("event_time"),
                service: row.get("service"),
                action: row.get("action"),
                headers: row.get("headers"),
                value: row.get("value"),
                raw: row.get("raw"),
                format: row.get("format"),
                reason: row.get("reason"),
            });
    }
    by_coordinates
}

/// What the store should have made of `message`, worked out without the store's code.
fn expected_sender_and_type(message: &OwnedMessage) -> (String, String) {
    let headers = common::headers(message);
    let body: Option<Value> = message
        .payload()
        .and_then(|p| serde_json::from_slice(p).ok());
    let from_body = |field: &str| {
        body.as_ref()
            .and_then(|b| b.get(field))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    (
        headers
            .get("service")
            .cloned()
            .unwrap_or_else(|| from_body("service")),
        headers
            .get("action")
            .cloned()
            .unwrap_or_else(|| from_body("action")),
    )
}

fn verify(url: &str, topics: &[String], group: &str) -> (bool, String) {
    let topics = topics.join(",");
    let output = common::run_eventpipe(
        &[
            "store",
            "verify",
            "--topic",
            &topics,
            "--group-id",
            group,
            "--postgres-url",
            url,
        ],
        &[],
        None,
    );
    (
        output.status.success(),
        format!("{}{}", common::stdout(&output), common::stderr(&output)),
    )
}

async fn fresh_topics(settings: &Settings, prefix: &str, count: usize) -> Vec<String> {
    let mut topics = Vec::new();
    for i in 0..count {
        let topic = common::unique(&format!("{prefix}{i}"));
        common::create_topic(settings, &topic, 3).await;
        topics.push(topic);
    }
    topics
}

#[tokio::test(flavor = "multi_thread")]
async fn every_record_is_stored_once_with_its_fields_and_bad_input_kept_raw() {
    let settings = common::settings();
    let topics = fresh_topics(&settings, "store-all", 3).await;
    let (pool, url) = fresh_store(&settings).await;
    let group = common::unique("store-all-group");
    let good = envelopes(&topics, 3_000);
    let bad = bad_records(&topics[0]);
    produce(&settings, &good).await;
    let bad_only: Vec<Produced> = bad.iter().map(|(record, _)| record.clone()).collect();
    produce(&settings, &bad_only).await;
    let total = (good.len() + bad.len()) as i64;

    let stage = start_store(&topics, &url, &group, &["--batch-size", "500"]);
    wait_for_rows(&pool, total, &[&stage]).await;

    let kafka = kafka_records(&settings, &topics);
    assert_eq!(
        kafka.len() as i64,
        total,
        "the independent reader sees everything"
    );
    let stored = stored_rows(&pool).await;
    let bad_reasons: BTreeMap<Vec<u8>, &str> = bad
        .iter()
        .map(|(r, reason)| (r.value.clone(), *reason))
        .collect();
    for (coordinates, message) in &kafka {
        let rows = stored
            .get(coordinates)
            .unwrap_or_else(|| panic!("{coordinates:?} not stored"));
        assert_eq!(rows.len(), 1, "{coordinates:?} stored {} times", rows.len());
        let row = &rows[0];
        let payload = message.payload().unwrap_or_default();
        assert_eq!(row.key.as_deref(), message.key(), "{coordinates:?} key");
        assert_eq!(
            Some(row.kafka_time_ms),
            message.timestamp().to_millis(),
            "{coordinates:?} Kafka time"
        );
        let refused = bad_reasons.get(payload) == Some(&"refused by PostgreSQL");
        let expected_names = if refused {
            (String::new(), String::new())
        } else {
            expected_sender_and_type(message)
        };
        assert_eq!(
            (row.service.clone(), row.action.clone()),
            expected_names,
            "{coordinates:?} sender and type"
        );
        let headers: Vec<Value> = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| json!([h.key, String::from_utf8_lossy(h.value.unwrap_or_default())]))
                    .collect()
            })
            .unwrap_or_default();
        if headers.is_empty() {
            assert_eq!(row.headers, None, "{coordinates:?}");
        } else {
            assert_eq!(row.headers, Some(Value::Array(headers)), "{coordinates:?}");
        }
        match bad_reasons.get(payload) {
            Some(reason) => {
                assert_eq!(row.format, "raw", "{coordinates:?}");
                assert_eq!(row.raw.as_deref(), Some(payload), "raw bytes kept");
                assert_eq!(row.value, None);
                let why = row.reason.as_deref().unwrap_or_default();
                assert!(
                    why.contains(reason),
                    "{coordinates:?}: {why} lacks {reason}"
                );
            }
            None => {
                assert_eq!(row.format, "json", "{coordinates:?}");
                let original: Value = serde_json::from_slice(payload).unwrap();
                assert_eq!(row.value.as_ref(), Some(&original), "{coordinates:?} value");
                assert_eq!(row.raw, None);
                assert_eq!(
                    row.event_time.as_deref(),
                    Some("2024-05-01T12:00:00.123456"),
                    "payload.timestamp read as UTC"
                );
            }
        }
    }
    assert_eq!(stored.len(), kafka.len(), "nothing stored that Kafka lacks");
    // Within a partition, the global sequence follows the offsets.
    let mut last_seq: BTreeMap<(String, i32), (i64, i64)> = BTreeMap::new();
    for ((topic, partition, offset), rows) in &stored {
        let seq = rows[0].seq;
        if let Some((previous_offset, previous_seq)) =
            last_seq.insert((topic.clone(), *partition), (*offset, seq))
        {
            assert!(
                seq > previous_seq,
                "{topic}[{partition}] offset {offset} has seq {seq} after {previous_offset}'s {previous_seq}"
            );
        }
    }

    common::wait_for_committed_end(&settings, &group, &topics[0], Duration::from_secs(60)).await;
    let metrics = stage.metrics().await;
    let stored_metric = common::metric_value(
        &metrics,
        "eventpipe_store_rows_total",
        &["outcome=\"stored\""],
    );
    assert_eq!(stored_metric, Some(total as f64), "{metrics}");
    common::assert_promtool_accepts(&metrics);

    let (exact, report) = verify(&url, &topics, &group);
    assert!(exact, "verify finds the store exact:\n{report}");
    assert!(
        report.contains(&format!(
            "{total} records in Kafka, {total} stored, 0 missing, 0 unexpected, 0 duplicated"
        )),
        "{report}"
    );
    // A gap: verify names it and fails.
    let (topic, partition, offset) = kafka.keys().nth(100).unwrap().clone();
    sqlx::query(
        "DELETE FROM events WHERE topic = $1 AND kafka_partition = $2 AND kafka_offset = $3",
    )
    .bind(&topic)
    .bind(partition)
    .bind(offset)
    .execute(&pool)
    .await
    .unwrap();
    let (exact, report) = verify(&url, &topics, &group);
    assert!(!exact, "a deleted row is a gap:\n{report}");
    assert!(
        report.contains(&format!("{topic}[{partition}]"))
            && report.contains(&format!("missing offsets: {offset}")),
        "{report}"
    );

    let (status, log) = stage.terminate();
    assert!(status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "store stopped: consumed {total}, stored {total}, already stored 0"
        )),
        "{log}"
    );
}

/// Every coordinate once: what the unique constraint and `verify` both promise, checked here
/// by counting, independently of either.
async fn assert_each_coordinate_once(pool: &sqlx::PgPool, expected: usize) {
    let (rows, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (topic, kafka_partition, kafka_offset)) FROM events",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((rows, distinct), (expected as i64, expected as i64));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_9_mid_stream_and_a_restart_lose_and_duplicate_nothing() {
    let settings = common::settings();
    let topics = fresh_topics(&settings, "store-kill", 2).await;
    let (pool, url) = fresh_store(&settings).await;
    let group = common::unique("store-kill-group");
    let records = envelopes(&topics, 20_000);
    produce(&settings, &records).await;

    let extra = ["--batch-size", "200", "--flush-interval-ms", "20"];
    let first = start_store(&topics, &url, &group, &extra);
    common::wait_until(Duration::from_secs(60), "some rows stored", async || {
        let count = row_count(&pool).await;
        if count >= 3_000 {
            Ok(())
        } else {
            Err(format!("{count} rows"))
        }
    })
    .await;
    let log = first.kill9();
    let at_kill = row_count(&pool).await;
    assert!(at_kill < records.len() as i64, "killed mid-stream:\n{log}");

    let second = start_store(&topics, &url, &group, &extra);
    wait_for_rows(&pool, records.len() as i64, &[&second]).await;
    for topic in &topics {
        common::wait_for_committed_end(&settings, &group, topic, Duration::from_secs(60)).await;
    }
    assert_each_coordinate_once(&pool, records.len()).await;
    let (exact, report) = verify(&url, &topics, &group);
    assert!(exact, "{report}");
    assert!(
        report.contains("0 missing, 0 unexpected, 0 duplicated"),
        "{report}"
    );
    let (status, log) = second.terminate();
    assert!(status.success(), "{log}");
}

async fn instances_with_one_killed(instances: usize) {
    let settings = common::settings();
    let topics = fresh_topics(&settings, &format!("store-x{instances}-"), 2).await;
    let (pool, url) = fresh_store(&settings).await;
    let group = common::unique("store-instances-group");
    let records = envelopes(&topics, 30_000);
    let extra = ["--batch-size", "200", "--flush-interval-ms", "20"];
    let mut stages: Vec<StageProcess> = (0..instances)
        .map(|_| start_store(&topics, &url, &group, &extra))
        .collect();
    for stage in &stages {
        stage.wait_ready().await;
    }
    produce(&settings, &records).await;
    common::wait_until(Duration::from_secs(60), "some rows stored", async || {
        let count = row_count(&pool).await;
        if count >= 5_000 {
            Ok(())
        } else {
            Err(format!("{count} rows"))
        }
    })
    .await;
    let killed = stages.remove(0);
    killed.kill9();
    let survivors: Vec<&StageProcess> = stages.iter().collect();
    wait_for_rows(&pool, records.len() as i64, &survivors).await;
    for topic in &topics {
        common::wait_for_committed_end(&settings, &group, topic, Duration::from_secs(90)).await;
    }
    assert_each_coordinate_once(&pool, records.len()).await;
    let (exact, report) = verify(&url, &topics, &group);
    assert!(exact, "{report}");
    for stage in stages {
        let (status, log) = stage.terminate();
        assert!(status.success(), "{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_one_killed_mid_stream_store_everything_once() {
    instances_with_one_killed(2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_instances_one_killed_mid_stream_store_everything_once() {
    instances_with_one_killed(3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_drops_whole_expired_days_and_verify_counts_them_expired() {
    let settings = common::settings();
    let topics = fresh_topics(&settings, "store-retention", 1).await;
    let (pool, url) = fresh_store(&settings).await;
    let group = common::unique("store-retention-group");
    let now_ms = chrono::Utc::now().timestamp_millis();
    let old_ms = now_ms - 40 * 86_400_000;
    let mut records = envelopes(&topics, 300);
    for (i, record) in records.iter_mut().enumerate() {
        record.timestamp_ms = Some(if i < 100 { old_ms + i as i64 } else { now_ms });
    }
    produce(&settings, &records).await;

    // Without retention, the old days are kept.
    let stage = start_store(&topics, &url, &group, &[]);
    wait_for_rows(&pool, 300, &[&stage]).await;
    common::wait_for_committed_end(&settings, &group, &topics[0], Duration::from_secs(60)).await;
    let (status, log) = stage.terminate();
    assert!(status.success(), "{log}");
    let old_day = chrono::DateTime::from_timestamp_millis(old_ms)
        .unwrap()
        .format("events_p%Y%m%d")
        .to_string();
    let partitions = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'events'",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect::<BTreeSet<String>>()
    };
    assert!(partitions().await.contains(&old_day));

    // With 30 days' retention, the 40-day-old partition goes whole; today's rows stay.
    let stage = start_store(&topics, &url, &group, &["--retention", "30d"]);
    common::wait_until(
        Duration::from_secs(60),
        "the expired partition dropped",
        async || {
            let now = partitions().await;
            if now.contains(&old_day) {
                Err(format!("{now:?}"))
            } else {
                Ok(())
            }
        },
    )
    .await;
    assert_eq!(row_count(&pool).await, 200);
    let (exact, report) = verify(&url, &topics, &group);
    assert!(exact, "{report}");
    assert!(report.contains("100 expired by retention"), "{report}");
    let (status, log) = stage.terminate();
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_settings_are_one_line_errors_naming_the_setting() {
    for (args, named) in [
        (vec!["store", "--topics", "bad topic!"], "--topics"),
        (
            vec!["store", "--topics", "t", "--retention", "forever"],
            "--retention",
        ),
        (
            vec!["store", "--topics", "t", "--batch-size", "0"],
            "--batch-size",
        ),
    ] {
        let output = common::run_eventpipe(&args, &[], None);
        let stderr = common::stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    // A database the store never wrote to: verify says so in one line.
    let settings = common::settings();
    let (_pool, url) = fresh_store(&settings).await;
    let output = common::run_eventpipe(
        &["store", "verify", "--topic", "t", "--postgres-url", &url],
        &[],
        None,
    );
    let stderr = common::stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("run eventpipe store first"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn avro_records_are_stored_decoded_with_their_frames_and_bad_frames_raw() {
    use eventpipe::codec::SchemaName;
    let settings = common::settings();
    let topics = fresh_topics(&settings, "store-avro", 1).await;
    let topic = &topics[0];
    let schema_id = common::register(topic, SchemaName::Envelope).await;
    let codec = common::avro_codec(SchemaName::Envelope);
    let mut records = Vec::new();
    for i in 0..200 {
        let json = serde_json::to_vec(&envelope(i, SERVICES[i % 3], ACTIONS[i % 3])).unwrap();
        records.push(Produced {
            topic: topic.clone(),
            key: Some(i.to_string().into_bytes()),
            value: codec.encode(topic, json).await.unwrap(),
            headers: Vec::new(),
            timestamp_ms: None,
        });
    }
    let mut bad_frame = records[0].value.clone();
    bad_frame[0] = 7;
    let mut truncated = records[1].value.clone();
    truncated.truncate(truncated.len() / 2);
    for value in [bad_frame.clone(), truncated.clone()] {
        records.push(Produced {
            value,
            ..records[0].clone()
        });
    }
    produce(&settings, &records).await;
    let (pool, url) = fresh_store(&settings).await;
    let group = common::unique("store-avro-group");
    let format = format!("{topic}=avro");
    let stage = start_store(&topics, &url, &group, &["--topic-format", &format]);
    wait_for_rows(&pool, records.len() as i64, &[&stage]).await;

    let kafka = kafka_records(&settings, &topics);
    let stored = stored_rows(&pool).await;
    let schema_ids: BTreeMap<(String, i32, i64), Option<i32>> =
        sqlx::query("SELECT topic, kafka_partition, kafka_offset, schema_id FROM events")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| {
                (
                    (
                        r.get("topic"),
                        r.get("kafka_partition"),
                        r.get("kafka_offset"),
                    ),
                    r.get("schema_id"),
                )
            })
            .collect();
    let (mut decoded, mut raw) = (0, 0);
    for (coordinates, message) in &kafka {
        let row = &stored[coordinates][0];
        let payload = message.payload().unwrap_or_default();
        assert_eq!(
            row.raw.as_deref(),
            Some(payload),
            "the frame is kept byte for byte"
        );
        if payload == bad_frame.as_slice() || payload == truncated.as_slice() {
            raw += 1;
            assert_eq!(row.format, "raw");
            let reason = row.reason.as_deref().unwrap_or_default();
            assert!(reason.starts_with("avro_"), "{reason}");
        } else {
            decoded += 1;
            assert_eq!(row.format, "avro");
            assert_eq!(schema_ids[coordinates], Some(schema_id as i32));
            // The test's own decoding, through the registry, is what the store holds.
            assert_eq!(row.value, Some(common::avro_json(&codec, message).await));
            let (service, action) = (
                row.value.as_ref().unwrap()["service"].as_str().unwrap(),
                row.value.as_ref().unwrap()["action"].as_str().unwrap(),
            );
            assert_eq!(
                (row.service.as_str(), row.action.as_str()),
                (service, action)
            );
        }
    }
    assert_eq!((decoded, raw), (200, 2));
    let (status, log) = stage.terminate();
    assert!(status.success(), "{log}");
}
