//! Flow control on the real stack: a paused flow's events are held while the other flows keep
//! arriving, the hold survives a kill -9 of the dispatcher, and resume delivers them in their
//! order, once each, before live traffic; two instances obey one pause; bad requests change nothing.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use common::gateway::{GatewayProcess, ADMIN};
use common::StageProcess;
use eventpipe::config::Settings;
use rdkafka::message::OwnedMessage;
use serde_json::{json, Value};

/// Transactions, and a short session so a killed member's partitions move on quickly.
const EXACTLY_ONCE: &[(&str, &str)] = &[
    ("EVENTPIPE_DISPATCH_EXACTLY_ONCE", "true"),
    ("EVENTPIPE_KAFKA_SESSION_TIMEOUT_MS", "6000"),
];

/// Bounds a wait for arrivals (never a pace).
const ARRIVAL: Duration = Duration::from_secs(120);

/// One input topic routed to info, a routes file, a group and a database of their own.
struct Fixture {
    input: String,
    info: String,
    routes_file: PathBuf,
    group: String,
    database_url: String,
}

impl Fixture {
    async fn new(partitions: i32) -> Fixture {
        let settings = common::settings();
        let base = common::unique("flows");
        let (_, database_url) = common::fresh_database_url(&settings).await;
        let fixture = Fixture {
            input: format!("{base}-create"),
            info: format!("{base}-info"),
            routes_file: std::env::temp_dir().join(format!("{base}-routes.toml")),
            group: format!("{base}-group"),
            database_url,
        };
        let worker = format!("{base}-worker");
        for topic in [&fixture.input, &fixture.info, &worker] {
            common::create_topic(&settings, topic, partitions).await;
        }
        common::create_topic(&settings, &format!("{}.dlq", fixture.input), 1).await;
        let routes =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/topics/routes.toml"))
                .unwrap()
                .replace("\"info_in\"", &format!("\"{}\"", fixture.info))
                .replace("\"worker_start_orm\"", &format!("\"{worker}\""));
        std::fs::write(&fixture.routes_file, routes).unwrap();
        fixture
    }

    fn env<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut env = vec![("POSTGRES_CONNECTION_STRING", self.database_url.as_str())];
        env.extend_from_slice(extra);
        env
    }

    /// A dispatcher obeying pauses, as a child process.
    fn start(&self, extra_env: &[(&str, &str)]) -> StageProcess {
        StageProcess::start(
            &[
                "dispatch",
                "--input-topics",
                &self.input,
                "--routes-file",
                self.routes_file.to_str().unwrap(),
                "--group-id",
                &self.group,
                "--flows",
                "true",
            ],
            &self.env(extra_env),
        )
    }

    /// `eventpipe flows ARGS` on this fixture's database.
    fn flows(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["flows"];
        all.extend_from_slice(args);
        common::run_eventpipe(&all, &self.env(&[]), None)
    }

    fn pause(&self, filter: &str) -> String {
        let output = self.flows(&["pause", "--filter", filter, "--reason", "test"]);
        assert!(output.status.success(), "{}", common::stderr(&output));
        common::stdout(&output).trim().to_string()
    }

    fn status(&self, id: &str) -> Value {
        let output = self.flows(&["show", id]);
        assert!(output.status.success(), "{}", common::stderr(&output));
        serde_json::from_str(&common::stdout(&output)).unwrap()
    }

    /// Waits until every partition released what the pause held, and it says resumed.
    async fn wait_resumed(&self, id: &str) {
        common::wait_until(
            Duration::from_secs(60),
            "the pause to be resumed",
            async || {
                let status = self.status(id);
                match status["status"].as_str() {
                    Some("resumed") => Ok(()),
                    _ => Err(status.to_string()),
                }
            },
        )
        .await
    }

    /// `eventpipe dispatch` (as `start`), once it is ready.
    async fn start_ready(&self, extra_env: &[(&str, &str)]) -> StageProcess {
        let stage = self.start(extra_env);
        stage.wait_ready().await;
        stage
    }

    /// While lk is paused: every arm event of `sent` arrives, and none of lk's.
    async fn assert_only_arm_arrives(&self, reader: &Settings, sent: &[Event], log: &str) {
        let arm = with_sender(sent, "arm");
        wait_for_events(reader, &self.info, &arm, "arm while lk is paused").await;
        self.assert_none_delivered(reader, &with_sender(sent, "lk"), log);
    }

    /// Asserts that none of `events` is on info yet.
    fn assert_none_delivered(&self, reader: &Settings, held: &[Event], log: &str) {
        let arrived: HashSet<Event> = events(&common::read_to_end(reader, &self.info))
            .into_iter()
            .collect();
        let delivered: Vec<&Event> = held.iter().filter(|e| arrived.contains(e)).collect();
        assert!(
            delivered.is_empty(),
            "paused events delivered: {delivered:?}\n{log}"
        );
    }

    /// Sends `service`'s create_user events `seqs` (10 users, keyed by user) and remembers them.
    async fn send(&self, sent: &mut Vec<Event>, service: &str, seqs: Range<u64>) {
        let records: Vec<(String, Vec<u8>)> = seqs
            .map(|seq| {
                let user = seq % 10;
                sent.push(Event {
                    service: service.to_string(),
                    user,
                    seq,
                });
                (user.to_string(), envelope(service, user, seq))
            })
            .collect();
        common::produce_all(&common::settings(), &self.input, &records).await;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Event {
    service: String,
    user: u64,
    seq: u64,
}

fn envelope(service: &str, user: u64, seq: u64) -> Vec<u8> {
    json!({
        "service": service,
        "action": "create_user",
        "payload": {
            "message": "It is create_user",
            "timestamp": "2026-12-01T12:00:00.123456",
            "data": {"user_id": user, "seq": seq, "sender": service}
        }
    })
    .to_string()
    .into_bytes()
}

/// The events of info's records, in each partition's order.
fn events(messages: &[OwnedMessage]) -> Vec<Event> {
    messages
        .iter()
        .map(|m| {
            let data = &common::json(m)["payload"]["data"];
            Event {
                service: data["sender"].as_str().unwrap().to_string(),
                user: data["user_id"].as_u64().unwrap(),
                seq: data["seq"].as_u64().unwrap(),
            }
        })
        .collect()
}

/// Waits until every event of `expected` is on `topic` (read to its end each time).
async fn wait_for_events(reader: &Settings, topic: &str, expected: &[Event], what: &str) {
    common::wait_until(ARRIVAL, what, async || {
        let seen: HashSet<Event> = events(&common::read_to_end(reader, topic))
            .into_iter()
            .collect();
        let missing = expected.iter().filter(|e| !seen.contains(e)).count();
        match missing {
            0 => Ok(()),
            _ => Err(format!("{missing} of {} missing", expected.len())),
        }
    })
    .await
}

/// Every output once, and each user's events of one sender in the order they were sent.
fn assert_once_in_order(outputs: &[Event], sent: &[Event], log: &str) {
    let mut seen = HashSet::new();
    let twice: Vec<&Event> = outputs.iter().filter(|e| !seen.insert(*e)).collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}\n{log}");
    let sent_set: HashSet<&Event> = sent.iter().collect();
    let missing: Vec<&Event> = sent.iter().filter(|e| !seen.contains(e)).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}\n{log}");
    assert_eq!(seen.len(), sent_set.len(), "nothing else delivered");
    let mut last: BTreeMap<(&str, u64), u64> = BTreeMap::new();
    for event in outputs {
        let key = (event.service.as_str(), event.user);
        if let Some(before) = last.insert(key, event.seq) {
            assert!(
                before < event.seq,
                "{key:?}: seq {} after {before}: out of order\n{log}",
                event.seq
            );
        }
    }
}

async fn obeyed(stage: &StageProcess, pauses: f64) {
    common::wait_until(
        Duration::from_secs(30),
        "the dispatcher to obey the pauses",
        async || {
            let metrics = stage.metrics().await;
            match common::metric_value(&metrics, "eventpipe_flows_obeyed_pauses", &[]) {
                Some(n) if n == pauses => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

fn with_sender(sent: &[Event], service: &str) -> Vec<Event> {
    sent.iter()
        .filter(|e| e.service == service)
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_paused_flow_is_held_across_a_kill_and_released_in_order_once_before_live_traffic() {
    let settings = common::settings();
    let reader = common::read_committed(&settings);
    let f = Fixture::new(3).await;
    let stage = f.start_ready(EXACTLY_ONCE).await;
    let mut sent = Vec::new();
    f.send(&mut sent, "lk", 0..20).await;
    f.send(&mut sent, "arm", 0..20).await;
    wait_for_events(&reader, &f.info, &sent, "both flows live").await;

    let id = f.pause("lk:*");
    obeyed(&stage, 1.0).await;
    let mut held = Vec::new();
    for seq in (20..60).step_by(5) {
        f.send(&mut held, "lk", seq..seq + 5).await;
        f.send(&mut held, "arm", seq..seq + 5).await;
    }
    f.assert_only_arm_arrives(&reader, &held, &stage.log())
        .await;
    let lk_held = with_sender(&held, "lk");
    common::wait_until(Duration::from_secs(30), "the held count", async || {
        let metrics = stage.metrics().await;
        let label = format!("pause=\"{id}\"");
        match common::metric_value(&metrics, "eventpipe_flows_pause_held_events", &[&label]) {
            Some(n) if n == lk_held.len() as f64 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(f.status(&id)["held"], json!(lk_held.len()));

    // A kill -9 mid-pause: the restarted dispatcher still holds lk, old and new.
    stage.kill9();
    let stage = f.start_ready(EXACTLY_ONCE).await;
    obeyed(&stage, 1.0).await;
    f.send(&mut held, "lk", 60..80).await;
    f.send(&mut held, "arm", 60..80).await;
    f.assert_only_arm_arrives(&reader, &held, &stage.log())
        .await;

    let output = f.flows(&["resume", &id]);
    assert!(output.status.success(), "{}", common::stderr(&output));
    let mut live = Vec::new();
    f.send(&mut live, "lk", 80..100).await;
    f.send(&mut live, "arm", 80..100).await;
    sent.extend(held);
    sent.extend(live);
    wait_for_events(&reader, &f.info, &sent, "every event after the resume").await;
    f.wait_resumed(&id).await;
    assert_eq!(f.status(&id)["held"], json!(0));
    let outputs = events(&common::read_to_end(&reader, &f.info));
    assert_once_in_order(&outputs, &sent, &stage.log());
    let (status, log) = stage.terminate();
    assert!(status.success(), "{log}");
}

#[tokio::test]
async fn two_dispatchers_in_one_group_both_obey_one_pause() {
    let settings = common::settings();
    let f = Fixture::new(4).await;
    let a = f.start_ready(&[]).await;
    let b = f.start_ready(&[]).await;
    // Both members own partitions before the pause (each reports lag of its own).
    common::wait_until(ARRIVAL, "both dispatchers to own partitions", async || {
        let owned_a = common::lag_series(
            &a.metrics().await,
            "eventpipe_dispatch_consumer_lag_messages",
        );
        let owned_b = common::lag_series(
            &b.metrics().await,
            "eventpipe_dispatch_consumer_lag_messages",
        );
        let all: HashSet<_> = owned_a.keys().chain(owned_b.keys()).collect();
        match !owned_a.is_empty()
            && !owned_b.is_empty()
            && all.len() == 4
            && owned_a.len() + owned_b.len() == 4
        {
            true => Ok(()),
            false => Err(format!("{owned_a:?} / {owned_b:?}")),
        }
    })
    .await;
    let mut sent = Vec::new();
    f.send(&mut sent, "lk", 0..20).await;
    f.send(&mut sent, "arm", 0..20).await;
    wait_for_events(&settings, &f.info, &sent, "both flows live").await;

    let id = f.pause("lk:*");
    obeyed(&a, 1.0).await;
    obeyed(&b, 1.0).await;
    let mut held = Vec::new();
    f.send(&mut held, "lk", 20..60).await;
    f.send(&mut held, "arm", 20..60).await;
    f.assert_only_arm_arrives(&settings, &held, &a.log()).await;
    for stage in [&a, &b] {
        let metrics = stage.metrics().await;
        let count = common::metric_value(
            &metrics,
            "eventpipe_dispatch_flow_records_total",
            &["decision=\"held\""],
        );
        assert!(
            count.unwrap_or(0.0) > 0.0,
            "each instance held some: {}",
            stage.log()
        );
    }

    let output = f.flows(&["resume", "--filter", "lk:*"]);
    assert!(output.status.success(), "{}", common::stderr(&output));
    let mut live = Vec::new();
    f.send(&mut live, "lk", 60..80).await;
    f.send(&mut live, "arm", 60..80).await;
    sent.extend(held);
    sent.extend(live);
    wait_for_events(&settings, &f.info, &sent, "every event after the resume").await;
    f.wait_resumed(&id).await;
    let outputs = events(&common::read_to_end(&settings, &f.info));
    assert_once_in_order(&outputs, &sent, &format!("{}\n{}", a.log(), b.log()));
}

/// A call (method, path, body, credential) and the status and error code it must get.
type ApiCase<'a> = (
    reqwest::Method,
    String,
    Option<Value>,
    &'a str,
    u16,
    &'a str,
);

#[tokio::test]
async fn bad_requests_get_a_clear_status_are_counted_and_change_nothing() {
    let settings = common::settings();
    let (_, database_url) = common::fresh_database_url(&settings).await;
    let topic = common::unique("flows-admin");
    common::create_topic(&settings, &topic, 1).await;
    let gateway = GatewayProcess::start(&[topic], &database_url, &[]).await;
    let env = [("POSTGRES_CONNECTION_STRING", database_url.as_str())];
    let cli = |args: &[&str]| {
        let mut all = vec!["flows"];
        all.extend_from_slice(args);
        common::run_eventpipe(&all, &env, None)
    };
    let output = cli(&["pause", "--filter", "lk:*", "--reason", "maintenance"]);
    assert!(output.status.success(), "{}", common::stderr(&output));
    let id = common::stdout(&output).trim().to_string();
    let before = common::stdout(&cli(&["list", "--json", "--all"]));

    // The CLI: one line naming what is wrong, a failing exit code.
    for (args, says) in [
        (vec!["pause", "--filter", "lk"], "\"lk\""),
        (vec!["pause", "--filter", "*:update_user"], id.as_str()),
        (
            vec!["pause", "--filter", "arm:*", "--scope", "everywhere"],
            "scope \"everywhere\"",
        ),
        (vec!["resume", "no-such-pause"], "no pause no-such-pause"),
        (
            vec!["resume", "--filter", "arm:*"],
            "no active pause has exactly the filters arm:*",
        ),
        (vec!["show", "no-such-pause"], "no pause no-such-pause"),
    ] {
        let output = cli(&args);
        let stderr = common::stderr(&output);
        assert!(!output.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let conflict = common::stderr(&cli(&["pause", "--filter", "lk:create_user"]));
    assert!(
        conflict.contains("conflicts with active pause"),
        "{conflict}"
    );

    // The admin API: a status and a code.
    let post = reqwest::Method::POST;
    let get = reqwest::Method::GET;
    let cases: Vec<ApiCase> = vec![
        (
            post.clone(),
            "/v1/admin/flows".into(),
            Some(json!({"filters": ["arm:*"]})),
            "",
            401,
            "unauthorized",
        ),
        (
            get.clone(),
            "/v1/admin/flows".into(),
            None,
            "",
            401,
            "unauthorized",
        ),
        (
            post.clone(),
            "/v1/admin/flows".into(),
            Some(json!({"filters": ["lk"]})),
            ADMIN,
            400,
            "bad_filter",
        ),
        (
            post.clone(),
            "/v1/admin/flows".into(),
            Some(json!({"filters": ["arm:*"], "scope": "x"})),
            ADMIN,
            400,
            "bad_scope",
        ),
        (
            post.clone(),
            "/v1/admin/flows".into(),
            Some(json!({"filters": ["*:create_user"]})),
            ADMIN,
            409,
            "conflicting_pause",
        ),
        (
            get.clone(),
            "/v1/admin/flows/no-such-pause".into(),
            None,
            ADMIN,
            404,
            "not_found",
        ),
        (
            post.clone(),
            "/v1/admin/flows/no-such-pause/resume".into(),
            None,
            ADMIN,
            404,
            "not_found",
        ),
        (
            post.clone(),
            format!("/v1/admin/flows/{id}/resume"),
            None,
            "",
            401,
            "unauthorized",
        ),
    ];
    for (method, path, body, token, status, code) in cases {
        let (got, answer) = gateway
            .call(method.clone(), &path, body.clone(), token)
            .await;
        assert_eq!(
            (got, answer["error"].as_str()),
            (status, Some(code)),
            "{method} {path} {body:?}: {answer}"
        );
    }
    let (_, answer) = gateway
        .call(
            post.clone(),
            "/v1/admin/flows",
            Some(json!({"filters": ["lk"]})),
            ADMIN,
        )
        .await;
    assert!(
        answer["message"].as_str().unwrap().contains("\"lk\""),
        "{answer}"
    );

    // Nothing changed.
    assert_eq!(common::stdout(&cli(&["list", "--json", "--all"])), before);
    let (status, list) = gateway
        .call(get.clone(), "/v1/admin/flows", None, ADMIN)
        .await;
    assert_eq!(status, 200);
    let pauses = list["pauses"].as_array().unwrap();
    assert_eq!(pauses.len(), 1, "{list}");
    assert_eq!(
        (pauses[0]["id"].as_str(), pauses[0]["status"].as_str()),
        (Some(id.as_str()), Some("paused"))
    );

    // What works: 202 with where to poll; a pause that held nothing is resumed at once.
    let (status, created) = gateway
        .call(
            post.clone(),
            "/v1/admin/flows",
            Some(json!({"filters": ["arm:*"], "reason": "api"})),
            ADMIN,
        )
        .await;
    assert_eq!(status, 202, "{created}");
    let url = created["status_url"].as_str().unwrap().to_string();
    let (status, shown) = gateway.call(get.clone(), &url, None, ADMIN).await;
    assert_eq!(
        (status, shown["status"].as_str()),
        (200, Some("paused")),
        "{shown}"
    );
    let (status, resumed) = gateway
        .call(post.clone(), &format!("{url}/resume"), None, ADMIN)
        .await;
    assert_eq!(
        (status, resumed["status"].as_str()),
        (202, Some("resumed")),
        "{resumed}"
    );

    let metrics = gateway.process.metrics().await;
    for (operation, outcome) in [
        ("pause", "bad_filter"),
        ("pause", "conflicting_pause"),
        ("pause", "unauthorized"),
        ("resume", "not_found"),
        ("get", "not_found"),
        ("pause", "ok"),
    ] {
        let labels = [
            format!("operation=\"{operation}\""),
            format!("outcome=\"{outcome}\""),
        ];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        assert!(
            common::metric_value(&metrics, "eventpipe_flows_requests_total", &labels)
                .unwrap_or(0.0)
                >= 1.0,
            "{operation} {outcome} counted"
        );
    }
}

#[tokio::test]
async fn a_kill_during_the_release_neither_loses_nor_repeats_a_held_event() {
    let settings = common::settings();
    let reader = common::read_committed(&settings);
    let f = Fixture::new(3).await;
    let stage = f.start_ready(EXACTLY_ONCE).await;
    let id = f.pause("lk:*");
    obeyed(&stage, 1.0).await;
    // Enough held events that re-reading them takes a while.
    let mut sent = Vec::new();
    for seq in (0..6000).step_by(500) {
        f.send(&mut sent, "lk", seq..seq + 500).await;
        f.send(&mut sent, "arm", seq..seq + 500).await;
    }
    f.assert_only_arm_arrives(&reader, &sent, &stage.log())
        .await;

    let output = f.flows(&["resume", &id]);
    assert!(output.status.success(), "{}", common::stderr(&output));
    // Killed as soon as a partition is being re-read (or, on a fast machine, once it is done).
    common::wait_until(
        Duration::from_secs(60),
        "a partition releasing",
        async || {
            let status = f.status(&id);
            let releasing = status["partitions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["progress"] == "releasing" || p["progress"] == "drained");
            match releasing {
                true => Ok(()),
                false => Err(status.to_string()),
            }
        },
    )
    .await;
    let status_at_kill = f.status(&id);
    let progress: Vec<&Value> = status_at_kill["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| &p["progress"])
        .collect();
    eprintln!("killed with the partitions {progress:?}");
    stage.kill9();
    let stage = f.start(EXACTLY_ONCE);
    f.send(&mut sent, "lk", 6000..6100).await;
    wait_for_events(&reader, &f.info, &sent, "every event after the restart").await;
    f.wait_resumed(&id).await;
    let outputs = events(&common::read_to_end(&reader, &f.info));
    assert_once_in_order(
        &outputs,
        &sent,
        &format!("killed at {status_at_kill}\n{}", stage.log()),
    );
}
