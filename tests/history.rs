//! `eventpipe history` and `eventpipe replay` on the real stack, over what the real `eventpipe
//! store` stored: each answer compared with an independent filter over an independent Kafka read.
//!
//! The five subscription kinds (and overlapping filters), `--last`, `--since/--until`,
//! `--after-seq` across chunks, bad flags; replay to a fresh topic (every record once, in seq
//! order, key, value and headers intact plus the replay headers) and to the original topics while
//! the store runs (nothing stored twice); and the plan of "the last 10" on 300,000 rows.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use common::StageProcess;
use eventpipe::config::Settings;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::message::{Headers, Message, OwnedMessage};
use serde_json::{json, Value};

const SERVICES: [&str; 3] = ["lk", "arm", "orm"];
const ACTIONS: [&str; 3] = ["create_user", "update_user", "start_task"];

use common::Outgoing;

/// `count` envelopes from every service and action, over `topics`, 100 ms apart from
/// `start_ms`. Some name their sender and type in headers (as `eventpipe produce` does), some
/// only in the envelope, some in both with the headers disagreeing (headers win).
fn envelopes(seed: u64, count: usize, topics: &[&str], start_ms: i64) -> Vec<Outgoing> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let service = SERVICES[rng.random_range(0..SERVICES.len())];
            let action = ACTIONS[rng.random_range(0..ACTIONS.len())];
            let user = rng.random_range(0..50);
            let value = json!({
                "service": service,
                "action": action,
                "payload": {"message": format!("event {i}"), "timestamp": "2026-12-01T09:00:00.123456",
                            "data": {"user_id": user, "n": i, "ratio": 1.5}},
            });
            let headers = match i % 4 {
                0 => vec![],
                1 => vec![("trace".to_string(), vec![0xff, i as u8])],
                // Headers name the sender and type; the envelope says something else.
                2 => vec![
                    ("service".to_string(), b"lk".to_vec()),
                    ("action".to_string(), b"update_user".to_vec()),
                ],
                _ => vec![
                    ("service".to_string(), service.as_bytes().to_vec()),
                    ("action".to_string(), action.as_bytes().to_vec()),
                ],
            };
            Outgoing {
                topic: topics[i % topics.len()].to_string(),
                key: (i % 10 != 0).then(|| user.to_string().into_bytes()),
                value: serde_json::to_vec(&value).unwrap(),
                headers,
                timestamp_ms: Some(start_ms + 100 * i as i64),
            }
        })
        .collect()
}

/// Records the store keeps raw: not UTF-8, not JSON; `headers` may name a sender.
fn bad_records(topic: &str, headers: &[(&str, &[u8])], timestamp_ms: i64) -> Vec<Outgoing> {
    [&b"\xff\xfe not utf-8"[..], b"{\"service\": \"lk\", "]
        .into_iter()
        .map(|value| Outgoing {
            topic: topic.to_string(),
            key: Some(b"\xc3\x28bad-key".to_vec()),
            value: value.to_vec(),
            headers: headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_vec()))
                .collect(),
            timestamp_ms: Some(timestamp_ms),
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes as history shows them: a string when UTF-8, else `{"hex": ...}`.
fn shown(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => json!(text),
        Err(_) => json!({ "hex": hex(bytes) }),
    }
}

/// One record as an independent Kafka reader finds it, with its sender and type worked out
/// here: the `service`/`action` headers first, else the envelope, else empty.
#[derive(Debug, Clone)]
struct Found {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    timestamp_ms: i64,
    service: String,
    action: String,
}

type Coordinates = (String, i32, i64);

impl Found {
    fn of(message: &OwnedMessage) -> Found {
        let headers: Vec<(String, Vec<u8>)> = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
        };
        let envelope: Option<Value> =
            serde_json::from_slice(message.payload().unwrap_or_default()).ok();
        let field = |name: &str| {
            envelope
                .as_ref()
                .and_then(|e| e.get(name))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        Found {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().unwrap_or_default().to_vec(),
            timestamp_ms: message.timestamp().to_millis().unwrap(),
            service: header("service")
                .or_else(|| field("service"))
                .unwrap_or_default(),
            action: header("action")
                .or_else(|| field("action"))
                .unwrap_or_default(),
            headers,
        }
    }

    fn coordinates(&self) -> Coordinates {
        (self.topic.clone(), self.partition, self.offset)
    }

    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.value).ok()
    }

    /// Checks one line of `eventpipe history` against this record.
    fn check_line(&self, line: &Value) {
        let what = format!("{:?} vs {line}", self.coordinates());
        assert_eq!(
            line["key"],
            self.key.as_deref().map_or(Value::Null, shown),
            "key of {what}"
        );
        let timestamp = DateTime::from_timestamp_millis(self.timestamp_ms)
            .unwrap()
            .to_rfc3339_opts(SecondsFormat::Millis, true);
        assert_eq!(line["timestamp"], json!(timestamp), "{what}");
        assert_eq!(line["service"], json!(self.service), "{what}");
        assert_eq!(line["action"], json!(self.action), "{what}");
        let headers: Vec<Value> = self
            .headers
            .iter()
            .map(|(name, value)| json!([name, shown(value)]))
            .collect();
        let expected_headers = if headers.is_empty() {
            Value::Null
        } else {
            json!(headers)
        };
        assert_eq!(line["headers"], expected_headers, "headers of {what}");
        match self.json() {
            Some(value) => {
                assert_eq!(line["value"], value, "{what}");
                assert_eq!(line["format"], "json", "{what}");
                assert_eq!(line["event_time"], "2026-12-01T09:00:00.123456Z", "{what}");
            }
            None => {
                assert_eq!(line["value"], Value::Null, "{what}");
                assert_eq!(line["format"], "raw", "{what}");
                assert_eq!(line["raw"], shown(&self.value), "{what}");
                assert!(!line["reason"].as_str().unwrap().is_empty(), "{what}");
            }
        }
    }
}

/// A database of the test's own: its pool, name and URL.
async fn fresh_database(settings: &Settings) -> (sqlx::PgPool, String, url::Url) {
    let (pool, name) = common::fresh_database(settings).await;
    let mut url = settings.postgres_url.clone();
    url.set_path(&name);
    (pool, name, url)
}

/// A fresh database with the store stage running into it over `topics`.
struct Store {
    pool: sqlx::PgPool,
    url: String,
    group: String,
    stage: Option<StageProcess>,
}

impl Store {
    async fn start(topics: &[&str]) -> Store {
        let settings = common::settings();
        let (pool, _, url) = fresh_database(&settings).await;
        let group = common::unique("history-store");
        let stage = StageProcess::start(
            &[
                "store",
                "--topics",
                &topics.join(","),
                "--postgres-url",
                url.as_str(),
                "--group-id",
                &group,
            ],
            &[],
        );
        Store {
            pool,
            url: url.to_string(),
            group,
            stage: Some(stage),
        }
    }

    async fn rows(&self) -> Result<i64, String> {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| e.to_string())
    }

    /// Waits until `count` rows are stored (a condition, not a time).
    async fn wait_for_rows(&self, count: i64) {
        common::wait_until(
            Duration::from_secs(120),
            &format!("{count} rows stored"),
            async || match self.rows().await {
                Ok(rows) if rows == count => Ok(()),
                Ok(rows) => Err(format!("{rows} rows")),
                Err(error) => Err(error),
            },
        )
        .await;
    }

    /// `eventpipe <command> --postgres-url <this store> <args>`; stdout, stderr and exit code.
    fn run(&self, command: &str, args: &[&str]) -> (String, String, Option<i32>) {
        let mut argv = vec![command, "--postgres-url", &self.url];
        argv.extend_from_slice(args);
        let output = common::run_eventpipe(&argv, &[], None);
        (
            common::stdout(&output),
            common::stderr(&output),
            output.status.code(),
        )
    }

    /// `eventpipe history <args>` as parsed JSON lines; fails the test on an error.
    fn history(&self, args: &[&str]) -> Vec<Value> {
        let (stdout, stderr, code) = self.run("history", args);
        assert_eq!(code, Some(0), "history {args:?}: {stderr}");
        stdout
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }
}

fn coordinates(line: &Value) -> Coordinates {
    (
        line["topic"].as_str().unwrap().to_string(),
        line["partition"].as_i64().unwrap() as i32,
        line["offset"].as_i64().unwrap(),
    )
}

fn seqs(lines: &[Value]) -> Vec<i64> {
    lines
        .iter()
        .map(|line| line["seq"].as_i64().unwrap())
        .collect()
}

/// What every history answer must be: exactly the expected records, each once, in strictly
/// ascending seq, and (within a Kafka partition) seq order is offset order; each line's fields
/// equal the record's.
fn assert_answer(what: &str, lines: &[Value], expected: &[&Found]) {
    let seqs = seqs(lines);
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "{what}: seq ascending, each once"
    );
    let got: Vec<Coordinates> = lines.iter().map(coordinates).collect();
    let got_set: BTreeSet<&Coordinates> = got.iter().collect();
    assert_eq!(got_set.len(), got.len(), "{what}: no event twice");
    let want: BTreeMap<Coordinates, &Found> = expected
        .iter()
        .map(|found| (found.coordinates(), *found))
        .collect();
    let want_set: BTreeSet<&Coordinates> = want.keys().collect();
    assert_eq!(got_set, want_set, "{what}: the same events");
    let mut last_offset: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for (line, (topic, partition, offset)) in lines.iter().zip(&got) {
        want[&(topic.clone(), *partition, *offset)].check_line(line);
        let previous = last_offset.insert((topic.clone(), *partition), *offset);
        assert!(
            previous < Some(*offset),
            "{what}: {topic}[{partition}] in offset order"
        );
    }
}

/// The five subscription kinds of the issue, and two overlapping filters, as flags and as an
/// independent predicate.
type Kind = (&'static [&'static str], fn(&str, &str) -> bool);
const KINDS: [Kind; 6] = [
    (&["lk:*"], |s, _| s == "lk"),
    (&["*:create_user", "*:update_user"], |_, a| {
        a == "create_user" || a == "update_user"
    }),
    (&["lk:create_user", "arm:update_user"], |s, a| {
        (s, a) == ("lk", "create_user") || (s, a) == ("arm", "update_user")
    }),
    (&["lk:*,arm:*"], |s, _| s == "lk" || s == "arm"),
    (&["*:*"], |_, _| true),
    // Overlapping: lk:create_user is selected by both.
    (&["lk:*", "*:create_user"], |s, a| {
        s == "lk" || a == "create_user"
    }),
];

fn filter_flags(filters: &[&str]) -> Vec<String> {
    filters
        .iter()
        .flat_map(|f| ["--filter".to_string(), f.to_string()])
        .collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn history_answers_each_filter_kind_as_an_independent_filter_over_kafka_does() {
    let users = common::unique("history-users");
    let tasks = common::unique("history-tasks");
    let settings = common::settings();
    common::create_topic(&settings, &users, 3).await;
    common::create_topic(&settings, &tasks, 2).await;
    let start_ms = Utc::now().timestamp_millis() - 600_000;
    let mut records = envelopes(13, 3000, &[&users, &tasks], start_ms);
    records.extend(bad_records(&users, &[], start_ms + 150));
    common::produce_outgoing(&settings, &records).await;
    let store = Store::start(&[&users, &tasks]).await;
    store.wait_for_rows(records.len() as i64).await;

    let found: Vec<Found> = [&users, &tasks]
        .iter()
        .flat_map(|topic| common::read_to_end(&settings, topic))
        .map(|message| Found::of(&message))
        .collect();
    assert_eq!(found.len(), records.len());

    for (filters, predicate) in KINDS {
        let flags = filter_flags(filters);
        let lines = store.history(&strs(&flags));
        let expected: Vec<&Found> = found
            .iter()
            .filter(|f| predicate(&f.service, &f.action))
            .collect();
        assert!(!expected.is_empty(), "{filters:?} selects something");
        assert_answer(&format!("{filters:?}"), &lines, &expected);

        // The last 10 are the last 10 of the whole answer, in order; across chunks too.
        for chunk in ["1000", "3"] {
            let mut args = flags.clone();
            args.extend(["--last", "10", "--chunk-size", chunk].map(String::from));
            let last = store.history(&strs(&args));
            assert_eq!(
                seqs(&last),
                seqs(&lines[lines.len() - 10..]),
                "{filters:?} --last 10"
            );
        }
    }

    // A Kafka-time range: RFC 3339 since (inclusive), ISO without zone until (exclusive, UTC).
    let since = DateTime::from_timestamp_millis(start_ms + 100 * 1000).unwrap();
    let until = DateTime::from_timestamp_millis(start_ms + 100 * 2000).unwrap();
    let lines = store.history(&[
        "--filter",
        "*:update_user",
        "--since",
        &since.to_rfc3339_opts(SecondsFormat::Millis, true),
        "--until",
        &until.format("%Y-%m-%dT%H:%M:%S%.3f").to_string(),
    ]);
    let expected: Vec<&Found> = found
        .iter()
        .filter(|f| f.action == "update_user")
        .filter(|f| (since.timestamp_millis()..until.timestamp_millis()).contains(&f.timestamp_ms))
        .collect();
    assert_answer("since/until", &lines, &expected);
    // Relative times: everything was produced in the last hour, nothing in the future.
    assert_eq!(
        store.history(&["--filter", "lk:*", "--since", "-1h"]).len(),
        found.iter().filter(|f| f.service == "lk").count()
    );
    assert!(store
        .history(&["--filter", "lk:*", "--since", "2099-01-01"])
        .is_empty());

    // One topic only.
    let lines = store.history(&["--filter", "arm:*", "--topic", &tasks]);
    let expected: Vec<&Found> = found
        .iter()
        .filter(|f| f.topic == tasks && f.service == "arm")
        .collect();
    assert_answer("--topic", &lines, &expected);

    // Resumption: a first page, then --after-seq its last seq, 7 rows per query.
    let everything = store.history(&["--filter", "*:*"]);
    let first = store.history(&["--filter", "*:*", "--limit", "100", "--chunk-size", "7"]);
    assert_eq!(seqs(&first), seqs(&everything[..100]));
    let after = first.last().unwrap()["seq"].to_string();
    let rest = store.history(&[
        "--filter",
        "*:*",
        "--after-seq",
        &after,
        "--chunk-size",
        "7",
    ]);
    assert_eq!(seqs(&rest), seqs(&everything[100..]));
    // --after-seq with --last: the last 5 after that point are the last 5 overall.
    let last = store.history(&["--filter", "*:*", "--after-seq", &after, "--last", "5"]);
    assert_eq!(seqs(&last), seqs(&everything[everything.len() - 5..]));

    // Bad flags: exit 2 and one line naming the value.
    for (args, named) in [
        (&["--filter", "lk"][..], "\"lk\""),
        (&["--filter", "lk:*,arm:"], "\"arm:\""),
        (
            &["--filter", "lk:*", "--since", "yesterday"],
            "\"yesterday\"",
        ),
    ] {
        let (stdout, stderr, code) = store.run("history", args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stdout.is_empty());
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(named), "{stderr}");
    }
    drop(store.stage);
}

#[tokio::test(flavor = "multi_thread")]
async fn history_on_a_database_the_store_never_wrote_says_so_and_creates_nothing() {
    let settings = common::settings();
    let (pool, name, url) = fresh_database(&settings).await;
    let output = common::run_eventpipe(
        &["history", "--postgres-url", url.as_str(), "--filter", "*:*"],
        &[],
        None,
    );
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        common::stderr(&output).trim_end(),
        format!("error: no event store in {name}: run eventpipe store first")
    );
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(tables, 0, "history runs no migration");
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_republishes_a_selection_once_each_in_order_and_the_store_keeps_it_once() {
    let source = common::unique("replay-source");
    let target = common::unique("replay-target");
    let settings = common::settings();
    common::create_topic(&settings, &source, 2).await;
    common::create_topic(&settings, &target, 1).await;
    let start_ms = Utc::now().timestamp_millis() - 60_000;
    let mut records = envelopes(7, 400, &[&source], start_ms);
    // Raw records with a sender: replayed byte for byte.
    records.extend(bad_records(
        &source,
        &[
            ("service", b"lk"),
            ("action", b"create_user"),
            ("bin", b"\x00\xff"),
        ],
        start_ms + 50,
    ));
    common::produce_outgoing(&settings, &records).await;
    let store = Store::start(&[&source]).await;
    store.wait_for_rows(records.len() as i64).await;
    let found: BTreeMap<Coordinates, Found> = common::read_to_end(&settings, &source)
        .iter()
        .map(Found::of)
        .map(|found| (found.coordinates(), found))
        .collect();

    let filters = ["--filter", "lk:*,*:update_user"];
    let selected = store.history(&filters);
    let expected: Vec<&Found> = found
        .values()
        .filter(|f| f.service == "lk" || f.action == "update_user")
        .collect();
    assert_answer("the replayed selection", &selected, &expected);

    let started = std::time::Instant::now();
    let (stdout, stderr, code) = store.run(
        "replay",
        &[
            filters[0],
            filters[1],
            "--to-topic",
            &target,
            "--rate",
            "1000",
        ],
    );
    let elapsed = started.elapsed();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.is_empty() || !stderr.contains('\r'),
        "no progress bar off a terminal"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let replay_id = lines[0]
        .strip_prefix("replay id ")
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("{stdout}"))
        .to_string();
    let summary = lines.last().unwrap();
    assert!(
        summary.starts_with(&format!(
            "replayed {} events to {target} in ",
            selected.len()
        )) && summary.ends_with(&format!("/s), replay id {replay_id}")),
        "{summary}"
    );
    // 1000/s: at least most of the events' share of a second.
    assert!(
        elapsed.as_secs_f64() >= 0.8 * selected.len() as f64 / 1000.0,
        "{elapsed:?}"
    );

    let replayed = common::read_to_end(&settings, &target);
    assert_eq!(replayed.len(), selected.len(), "each selected event once");
    for (message, line) in replayed.iter().zip(&selected) {
        let headers: Vec<(String, Vec<u8>)> = Found::of(message).headers;
        let (original_headers, replay_headers) = headers.split_at(headers.len() - 5);
        let replay_headers: BTreeMap<&str, String> = replay_headers
            .iter()
            .map(|(name, value)| (name.as_str(), String::from_utf8(value.clone()).unwrap()))
            .collect();
        let (topic, partition, offset) = coordinates(line);
        assert_eq!(
            replay_headers,
            BTreeMap::from([
                ("eventpipe.replay.id", replay_id.clone()),
                ("eventpipe.replay.topic", topic.clone()),
                ("eventpipe.replay.partition", partition.to_string()),
                ("eventpipe.replay.offset", offset.to_string()),
                ("eventpipe.replay.seq", line["seq"].to_string()),
            ]),
            "in seq order, with the original coordinates"
        );
        let original = &found[&(topic, partition, offset)];
        assert_eq!(original_headers, original.headers.as_slice());
        assert_eq!(message.key().map(<[u8]>::to_vec), original.key);
        let value = message.payload().unwrap_or_default();
        match original.json() {
            Some(json) => assert_eq!(serde_json::from_slice::<Value>(value).unwrap(), json),
            None => assert_eq!(value, original.value.as_slice(), "raw bytes as they were"),
        }
    }

    // Back to the original topic while the store runs: consumed, not stored again.
    let (stdout, stderr, code) = store.run("replay", &["--filter", "*:*"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains(&format!(
            "replayed {} events to their original topics",
            records.len()
        )),
        "{stdout}"
    );
    assert_eq!(
        common::read_to_end(&settings, &source).len(),
        2 * records.len()
    );
    common::wait_for_committed_end(&settings, &store.group, &source, Duration::from_secs(90)).await;
    assert_eq!(
        store.rows().await,
        Ok(records.len() as i64),
        "replayed records not stored"
    );
    let (status, log) = store.stage.unwrap().terminate();
    assert!(status.success(), "{log}");
    assert!(
        log.contains(&format!("replays skipped {}", records.len())),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_last_ten_of_two_types_from_one_sender_read_indexes_only() {
    use eventpipe::filter::FilterSet;
    use eventpipe::store::history::{History, Selection};
    let settings = common::settings();
    let (_, _, url) = fresh_database(&settings).await;
    let pool = eventpipe::store::schema::connect(url.as_str(), 2)
        .await
        .unwrap();
    let mut connection = pool.acquire().await.unwrap();
    eventpipe::store::schema::ensure_partitions(
        &mut connection,
        &eventpipe::store::schema::days_ahead(Utc::now()),
    )
    .await
    .unwrap();
    drop(connection);
    sqlx::query(
        "INSERT INTO events (topic, kafka_partition, kafka_offset, kafka_time, service, action, \
         value, format) \
         SELECT 'users_in', 0, g, date_trunc('day', now()) + g * interval '1 ms', \
                CASE WHEN g % 50 = 0 THEN 'lk' WHEN g % 2 = 0 THEN 'arm' ELSE 'orm' END, \
                CASE (g / 50) % 20 WHEN 1 THEN 'create_user' WHEN 2 THEN 'update_user' \
                     ELSE 'start_task' END, \
                '{\"n\": 1}', 'json' \
         FROM generate_series(1, 300000) AS g",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("VACUUM ANALYZE events")
        .execute(&pool)
        .await
        .unwrap();

    // A sender with 2% of the events, two types with 5% each: what the indexes are for.
    let mut selection =
        Selection::of(FilterSet::parse(&["lk:create_user,lk:update_user"]).unwrap());
    selection.last = Some(10);
    let today = eventpipe::store::schema::partition_name(Utc::now().date_naive());
    let history = History::open(pool.clone(), &selection, 1000).await.unwrap();
    let plan = history.explain(&selection).await.unwrap();
    eprintln!("the last 10 of lk:create_user,lk:update_user:\n{plan}");
    assert_reads_indexes(&plan, &today);
    // Either side's index serves a filter naming both (the planner picks); the other filters.
    assert!(
        ["service", "action"].iter().any(|side| plan
            .contains(&format!("Index Scan Backward using {today}_{side}_seq_idx"))),
        "{plan}"
    );
    // The ascending chunks from the start: one ordered index scan per filter, merged.
    let everything_of_two_types =
        Selection::of(FilterSet::parse(&["*:create_user,*:update_user"]).unwrap());
    let history = History::open(pool.clone(), &everything_of_two_types, 1000)
        .await
        .unwrap();
    let plan = history.explain(&everything_of_two_types).await.unwrap();
    eprintln!("a chunk of *:create_user,*:update_user:\n{plan}");
    assert_reads_indexes(&plan, &today);
    assert!(
        plan.contains(&format!("Index Scan using {today}_action_seq_idx")),
        "{plan}"
    );

    let mut history = History::open(pool.clone(), &selection, 1000).await.unwrap();
    let last = history.next_chunk().await.unwrap().unwrap();
    let expected_last: Vec<i64> = sqlx::query_scalar(
        "SELECT seq FROM (SELECT seq FROM events WHERE service = 'lk' \
         AND action IN ('create_user', 'update_user') ORDER BY seq DESC LIMIT 10) AS l ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        last.iter().map(|e| e.seq).collect::<Vec<_>>(),
        expected_last
    );
    assert!(history.next_chunk().await.unwrap().is_none());
}

/// The plan merges ordered index scans: no Sort of more than a handful of rows (the few after a
/// cursor the planner knows), no Seq Scan of the partition holding the rows (empty partitions
/// ahead are scanned for free), and a Merge Append.
fn assert_reads_indexes(plan: &str, partition_with_rows: &str) {
    let nodes: Vec<&str> = plan
        .lines()
        .map(|line| line.trim_start().trim_start_matches("->").trim_start())
        .collect();
    let estimated_rows = |node: &str| -> u64 {
        let rows = node.split("rows=").nth(1).unwrap_or("0");
        rows[..rows.find(' ').unwrap_or(rows.len())]
            .parse()
            .unwrap_or(0)
    };
    for node in &nodes {
        if node.starts_with("Sort ") {
            assert!(
                estimated_rows(node) <= 100,
                "a Sort of many rows: {node}\n{plan}"
            );
        }
        if node.starts_with("Seq Scan") {
            assert!(!node.contains(partition_with_rows), "{node}\n{plan}");
        }
    }
    assert!(
        nodes.iter().any(|node| node.starts_with("Merge Append")),
        "{plan}"
    );
}
