//! Flow control in the gateway on the real stack: a pause of scope gateway or subscription:NAME
//! holds its events from SSE/WebSocket streams while the others keep arriving, resume delivers
//! them in order once; a durable subscription keeps them across a reconnect; history injection.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::gateway::{
    envelope, store_until_it_holds, wait_until_sleeping, Api, Client, Frame, GatewayProcess, ADMIN,
};
use common::{create_topic, fresh_database_url, settings, unique};
use reqwest::Method;
use serde_json::{json, Value};

/// A fresh topic of two partitions and a fresh database.
async fn fixture(prefix: &str) -> (Vec<String>, String) {
    let settings = settings();
    let topic = unique(prefix);
    create_topic(&settings, &topic, 2).await;
    let (_, url) = fresh_database_url(&settings).await;
    (vec![topic], url)
}

/// An event as the test tracks it: sender and its number (unique over a test).
type Sent = (String, u64);

/// Posts one batch to `topic`, in this order; users 1 and 2 spread it over both partitions.
async fn post(gateway: &Api, topic: &str, events: &[Sent]) {
    let lines: Vec<String> = events
        .iter()
        .map(|(service, n)| envelope(service, "update_user", n % 2 + 1, *n))
        .collect();
    let (status, answer) = gateway.post_lines(topic, &lines, ADMIN).await;
    assert_eq!(status, 200, "{answer}");
}

fn batch(services: &[&str], first: u64, count: u64) -> Vec<Sent> {
    (first..first + count)
        .map(|n| {
            (
                services[(n % services.len() as u64) as usize].to_string(),
                n,
            )
        })
        .collect()
}

/// What an event frame carries: sender, number, partition, offset, replay.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Got {
    service: String,
    n: u64,
    partition: i64,
    offset: i64,
    replay: bool,
}

fn got(frame: &Frame) -> Got {
    let data = &frame.data;
    let value = if data["value"].is_object() {
        &data["value"]
    } else {
        data
    };
    Got {
        service: data["service"].as_str().unwrap_or_default().to_string(),
        n: value["payload"]["data"]["n"].as_u64().unwrap_or(u64::MAX),
        partition: data["partition"].as_i64().unwrap_or(-1),
        offset: data["offset"].as_i64().unwrap_or(-1),
        replay: data["replay"] == json!(true),
    }
}

/// Reads event frames into `into` until `done` says the ones read so far suffice.
async fn read_until(client: &mut Client, into: &mut Vec<Got>, done: impl Fn(&[Got]) -> bool) {
    while !done(into) {
        let frame = client.next().await.expect("the stream goes on");
        match frame.kind.as_str() {
            "event" => into.push(got(&frame)),
            "disconnect" => panic!("disconnected: {frame:?} after {into:?}"),
            _ => {}
        }
    }
}

fn has_all(frames: &[Got], wanted: &[Sent]) -> bool {
    wanted.iter().all(|(s, n)| {
        frames
            .iter()
            .any(|g| &g.service == s && g.n == *n && !g.replay)
    })
}

fn of(sent: &[Sent], service: &str) -> Vec<Sent> {
    sent.iter().filter(|(s, _)| s == service).cloned().collect()
}

/// Each live (non-replay) event at most once, and each sender's events per partition in offset
/// order (the order they were produced).
fn assert_once_in_order(frames: &[Got]) {
    let mut seen = HashSet::new();
    let mut last: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for g in frames.iter().filter(|g| !g.replay) {
        assert!(seen.insert(g.n), "event {} twice: {frames:?}", g.n);
        if let Some(before) = last.insert((g.service.clone(), g.partition), g.offset) {
            assert!(g.offset > before, "{g:?} after offset {before}: {frames:?}");
        }
    }
}

async fn pause(gateway: &Api, filters: &[&str], scope: &str) -> String {
    let (status, answer) = gateway
        .call(
            Method::POST,
            "/v1/admin/flows",
            Some(json!({"filters": filters, "scope": scope})),
            ADMIN,
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    answer["id"].as_str().unwrap().to_string()
}

async fn resume(gateway: &Api, id: &str) {
    let (status, answer) = gateway
        .call(
            Method::POST,
            &format!("/v1/admin/flows/{id}/resume"),
            None,
            ADMIN,
        )
        .await;
    assert_eq!(status, 202, "{answer}");
}

/// Posts an lk probe and then an arm probe of the same user (one partition, lk first) until an
/// arm probe arrives with its lk probe not before it: the stream holds lk now. Returns the
/// probes sent; the frames read go into `frames`.
async fn until_holding(
    gateway: &Api,
    topic: &str,
    client: &mut Client,
    frames: &mut Vec<Got>,
    first: u64,
) -> Vec<Sent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut sent = Vec::new();
    for round in 0.. {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway never held lk: {frames:?}"
        );
        // Both even: the same user, the same partition, lk's offset first.
        let (lk, arm) = (first + 4 * round, first + 4 * round + 2);
        let probe = vec![("lk".to_string(), lk), ("arm".to_string(), arm)];
        post(gateway, topic, &probe).await;
        sent.extend(probe);
        read_until(client, frames, |f| f.iter().any(|g| g.n == arm)).await;
        if !frames.iter().any(|g| g.n == lk) {
            return sent;
        }
    }
    unreachable!()
}

#[tokio::test]
async fn a_gateway_pause_holds_lk_while_arm_flows_and_resume_delivers_them_in_order_once() {
    let (topics, database) = fixture("gwf-live").await;
    let topic = &topics[0];
    let gateway = GatewayProcess::start(&topics, &database, &[]).await;
    let mut sse = Client::Sse(gateway.sse("filter=*:*", None, ADMIN).await);
    sse.started().await;
    let mut ws = Client::Ws(Box::new(gateway.ws("filter=*:*", ADMIN).await));
    ws.started().await;
    let id = pause(&gateway, &["lk:*"], "gateway").await;
    let mut sse_frames = Vec::new();
    let probes = until_holding(&gateway, topic, &mut sse, &mut sse_frames, 0).await;
    // While paused: lk is held, arm keeps coming (after the held lk events of its partition).
    let paused = batch(&["lk", "arm"], 1000, 40);
    post(&gateway, topic, &paused).await;
    read_until(&mut sse, &mut sse_frames, |f| {
        has_all(f, &of(&paused, "arm"))
    })
    .await;
    let held_lk: Vec<u64> = of(&paused, "lk").iter().map(|(_, n)| *n).collect();
    assert!(
        !sse_frames.iter().any(|g| held_lk.contains(&g.n)),
        "no lk event of the paused batch arrives while paused: {sse_frames:?}"
    );
    let mut ws_frames = Vec::new();
    read_until(&mut ws, &mut ws_frames, |f| has_all(f, &of(&paused, "arm"))).await;
    assert!(!ws_frames.iter().any(|g| held_lk.contains(&g.n)));

    resume(&gateway, &id).await;
    let live = batch(&["lk", "arm"], 2000, 20);
    post(&gateway, topic, &live).await;
    let everything: Vec<Sent> = [probes.clone(), paused.clone(), live.clone()].concat();
    for (client, frames) in [(&mut sse, &mut sse_frames), (&mut ws, &mut ws_frames)] {
        read_until(client, frames, |f| has_all(f, &everything)).await;
        assert_once_in_order(frames);
        // lk: the held ones (every paused-batch one) before any lk posted after the resume.
        let lk: Vec<u64> = frames
            .iter()
            .filter(|g| g.service == "lk")
            .map(|g| g.n)
            .collect();
        let first_live = lk.iter().position(|n| *n >= 2000).unwrap();
        assert!(
            lk[first_live..].iter().all(|n| *n >= 2000),
            "held lk events before live ones: {lk:?}"
        );
        assert!(
            lk[..first_live]
                .iter()
                .filter(|n| held_lk.contains(n))
                .count()
                == held_lk.len()
        );
        assert_eq!(frames.len(), everything.len(), "nothing more: {frames:?}");
    }
}

#[tokio::test]
async fn a_durable_subscription_paused_by_name_gets_everything_once_across_reconnects() {
    let (topics, database) = fixture("gwf-durable").await;
    let topic = &topics[0];
    let gateway = GatewayProcess::start(&topics, &database, &[]).await;
    let name = unique("billing");
    let (status, answer) = gateway
        .call(
            Method::PUT,
            &format!("/v1/subscriptions/{name}"),
            Some(json!({"filters": ["*:*"]})),
            ADMIN,
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    let path = format!("/v1/subscriptions/{name}/stream");
    let connect = async || {
        Client::Sse(common::gateway::SseClient::connect(&gateway.url(&path), None, ADMIN).await)
    };
    let mut first = connect().await;
    first.started().await;
    // A plain stream is not in the pause's scope: it gets lk at once.
    let mut other = Client::Sse(gateway.sse("filter=lk:*", None, ADMIN).await);
    other.started().await;

    let id = pause(&gateway, &["lk:*"], &format!("subscription:{name}")).await;
    let mut frames = Vec::new();
    let probes = until_holding(&gateway, topic, &mut first, &mut frames, 0).await;
    let before = batch(&["lk", "arm"], 1000, 20);
    post(&gateway, topic, &before).await;
    read_until(&mut first, &mut frames, |f| has_all(f, &of(&before, "arm"))).await;
    assert!(!frames.iter().any(|g| g.service == "lk" && g.n >= 1000));
    let mut other_frames = Vec::new();
    read_until(&mut other, &mut other_frames, |f| {
        has_all(f, &of(&before, "lk"))
    })
    .await;
    drop(first);
    wait_until_sleeping(&gateway, &format!("/v1/subscriptions/{name}"), ADMIN).await;

    // Away while paused; back while still paused (its position says what is held: arm goes
    // on, lk stays held); away again across the resume.
    let away = batch(&["lk", "arm"], 2000, 20);
    post(&gateway, topic, &away).await;
    let mut back = connect().await;
    back.started().await;
    read_until(&mut back, &mut frames, |f| has_all(f, &of(&away, "arm"))).await;
    assert!(
        !frames.iter().any(|g| g.service == "lk" && g.n >= 1000),
        "lk stays held after a reconnect while paused: {frames:?}"
    );
    drop(back);
    wait_until_sleeping(&gateway, &format!("/v1/subscriptions/{name}"), ADMIN).await;
    resume(&gateway, &id).await;
    let after = batch(&["lk", "arm"], 3000, 20);
    post(&gateway, topic, &after).await;

    let mut second = connect().await;
    second.started().await;
    let everything: Vec<Sent> = [probes, before, away, after].concat();
    read_until(&mut second, &mut frames, |f| has_all(f, &everything)).await;
    assert_once_in_order(&frames);
    assert_eq!(frames.len(), everything.len(), "nothing more: {frames:?}");
}

#[tokio::test]
async fn an_injection_delivers_the_history_marked_replay_then_the_held_then_live() {
    let (topics, database) = fixture("gwf-inject").await;
    let topic = &topics[0];
    let gateway = GatewayProcess::start(&topics, &database, &[]).await;
    let history = batch(&["lk", "arm", "lk"], 0, 12);
    post(&gateway, topic, &history).await;
    let _store = store_until_it_holds(&topics, &database, history.len() as i64).await;
    let mut client = Client::Ws(Box::new(gateway.ws("filter=*:*", ADMIN).await));
    client.started().await;

    let (status, answer) = gateway
        .call(
            Method::POST,
            "/v1/admin/flows/inject",
            Some(
                json!({"filters": ["lk:*"], "scope": "gateway", "last": 3, "resume_after": "10m"}),
            ),
            ADMIN,
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["status"], "paused", "{answer}");
    let id = answer["id"].as_str().unwrap().to_string();
    // The last 3 lk events of the store, in their order, marked replay.
    let last_lk: Vec<u64> = of(&history, "lk")
        .iter()
        .rev()
        .take(3)
        .rev()
        .map(|(_, n)| *n)
        .collect();
    let mut frames = Vec::new();
    read_until(&mut client, &mut frames, |f| f.len() >= 3).await;
    let replayed: Vec<(u64, bool)> = frames.iter().map(|g| (g.n, g.replay)).collect();
    assert_eq!(
        replayed,
        last_lk.iter().map(|n| (*n, true)).collect::<Vec<_>>(),
        "{frames:?}"
    );
    // The stream holds lk now (it delivered the injection): arm flows, lk is held.
    let paused = batch(&["lk", "arm"], 1000, 20);
    post(&gateway, topic, &paused).await;
    read_until(&mut client, &mut frames, |f| {
        has_all(f, &of(&paused, "arm"))
    })
    .await;
    assert!(!frames[3..].iter().any(|g| g.service == "lk"), "{frames:?}");
    resume(&gateway, &id).await;
    let live = batch(&["lk", "arm"], 2000, 20);
    post(&gateway, topic, &live).await;
    let everything: Vec<Sent> = [paused.clone(), live.clone()].concat();
    read_until(&mut client, &mut frames, |f| has_all(f, &everything)).await;
    assert_once_in_order(&frames);
    assert_eq!(
        frames.len(),
        3 + everything.len(),
        "nothing more: {frames:?}"
    );
    // Event by event, lk: history (replay), then the held ones in order, then live.
    let lk: Vec<(u64, bool)> = frames
        .iter()
        .filter(|g| g.service == "lk")
        .map(|g| (g.n, g.replay))
        .collect();
    let mut expected: Vec<(u64, bool)> = last_lk.iter().map(|n| (*n, true)).collect();
    for part in [&paused, &live] {
        // Per partition in order; the two partitions interleave, so compare per partition.
        expected.extend(of(part, "lk").iter().map(|(_, n)| (*n, false)));
    }
    let by_partition = |items: &[(u64, bool)], parity: u64| -> Vec<(u64, bool)> {
        items
            .iter()
            .filter(|(n, replay)| *replay || n % 2 == parity)
            .cloned()
            .collect()
    };
    for parity in [0, 1] {
        assert_eq!(
            by_partition(&lk, parity),
            by_partition(&expected, parity),
            "lk on the partition of parity {parity}"
        );
    }
    assert!(frames[3..].iter().all(|g| !g.replay));
}

#[tokio::test]
async fn bad_injections_get_a_clear_status_and_change_nothing() {
    let (topics, database) = fixture("gwf-bad").await;
    let gateway = GatewayProcess::start(&topics, &database, &[]).await;
    let inject = |body: Value, token: &'static str| {
        let gateway = gateway.api.clone();
        async move {
            gateway
                .call(Method::POST, "/v1/admin/flows/inject", Some(body), token)
                .await
        }
    };
    for (body, token, status, code) in [
        (
            json!({"filters": ["lk"], "scope": "gateway", "last": 3}),
            ADMIN,
            400,
            "bad_filter",
        ),
        (
            json!({"filters": ["lk:*"], "scope": "gateway", "last": 3, "store_filters": ["a:b:c"]}),
            ADMIN,
            400,
            "bad_parameter",
        ),
        (
            json!({"filters": ["lk:*"], "scope": "subscription:nobody", "last": 3}),
            ADMIN,
            404,
            "unknown_subscription",
        ),
        (
            json!({"filters": ["lk:*"], "scope": "dispatch", "last": 3}),
            ADMIN,
            400,
            "bad_scope",
        ),
        (
            json!({"filters": ["lk:*"], "scope": "gateway"}),
            ADMIN,
            400,
            "bad_parameter",
        ),
        (
            json!({"filters": ["lk:*"], "scope": "gateway", "last": 0}),
            ADMIN,
            400,
            "bad_parameter",
        ),
        (
            json!({"filters": ["lk:*"], "scope": "gateway", "since": "yesterday"}),
            ADMIN,
            400,
            "bad_parameter",
        ),
        (
            json!({"filters": ["lk:*"], "scope": "gateway", "last": 3}),
            "",
            401,
            "unauthorized",
        ),
        (
            json!({"filters": ["lk:*"], "scope": "gateway", "last": 3}),
            "not-the-admin-token",
            401,
            "unauthorized",
        ),
    ] {
        let (got, answer) = inject(body.clone(), token).await;
        assert_eq!(got, status, "{body} → {answer}");
        assert_eq!(answer["error"], code, "{body} → {answer}");
        assert!(
            answer["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
    }
    // The CLI: one line naming the flag, a failing exit code.
    let env = [("POSTGRES_CONNECTION_STRING", database.as_str())];
    let cli = |args: &[&str]| {
        let mut all = vec!["flows", "inject", "--filter", "lk:*"];
        all.extend_from_slice(args);
        common::run_eventpipe(&all, &env, None)
    };
    for (args, says) in [
        (vec!["--scope", "gateway"], "--last"),
        (vec!["--scope", "gateway", "--last", "0"], "--last"),
        (
            vec!["--scope", "gateway", "--last", "3", "--store-filter", "lk"],
            "--store-filter",
        ),
        (vec!["--scope", "gateway", "--since", "someday"], "--since"),
        (
            vec![
                "--scope",
                "gateway",
                "--last",
                "3",
                "--resume-after",
                "soon",
            ],
            "--resume-after",
        ),
        (vec!["--scope", "nowhere", "--last", "3"], "--scope"),
        (vec!["--scope", "dispatch", "--last", "3"], "not supported"),
        (
            vec!["--scope", "subscription:nobody", "--last", "3"],
            "no subscription \"nobody\"",
        ),
    ] {
        let output = cli(&args);
        let stderr = common::stderr(&output);
        assert!(!output.status.success(), "{args:?}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
        assert!(errors[0].contains(says), "{args:?}: {stderr}");
    }
    let (status, answer) = gateway
        .call(Method::GET, "/v1/admin/flows?all=true", None, ADMIN)
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer["pauses"], json!([]), "nothing was paused: {answer}");

    // And a good one: paused with its selection, resumed by itself after the window.
    let output = cli(&["--scope", "gateway", "--last", "3", "--reason", "replay"]);
    assert!(output.status.success(), "{}", common::stderr(&output));
    let id = common::stdout(&output).trim().to_string();
    let (_, pause) = gateway
        .call(Method::GET, &format!("/v1/admin/flows/{id}"), None, ADMIN)
        .await;
    assert_eq!(pause["status"], "resumed", "{pause}");
    assert_eq!(
        pause["inject"],
        json!({"filters": ["lk:*"], "last": 3}),
        "{pause}"
    );
}
