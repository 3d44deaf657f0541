//! The gateway on the real stack: events posted over HTTP reach SSE and WebSocket subscribers of
//! each of the five filter kinds exactly once and in order (checked against an independent read
//! of Kafka); cursors resume across the catch-up/live boundary, across instances and a kill -9;
//! slow clients are dropped and resume losing nothing; bad input gets a clear status.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::gateway::{
    collect_events, collect_events_until_slow, envelope, store_until_it_holds, wait_until_sleeping,
    Api, Client, Frame, GatewayProcess, SseClient, WsClient, ADMIN,
};
use common::{
    create_topic, fresh_database_url, grow_topic, produce_to_partitions, read_to_end, settings,
    unique,
};
use eventpipe::filter::FilterSet;
use rdkafka::Message;
use serde_json::Value;

const SENDERS: [&str; 3] = ["lk", "arm", "ops"];
const ACTIONS: [&str; 3] = ["create_user", "update_user", "run_task"];

/// Two fresh topics of three partitions and a fresh database.
async fn fixture(prefix: &str) -> (Vec<String>, String) {
    let settings = settings();
    let topics = vec![
        unique(&format!("{prefix}-a")),
        unique(&format!("{prefix}-b")),
    ];
    for topic in &topics {
        create_topic(&settings, topic, 3).await;
    }
    let (_, url) = fresh_database_url(&settings).await;
    (topics, url)
}

/// `count` envelopes over every sender × action, spread over the topics; posted in batches.
async fn post_traffic(gateway: &Api, topics: &[String], count: u64, first: u64) {
    let mut batches: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for n in first..first + count {
        let service = SENDERS[(n % 3) as usize];
        let action = ACTIONS[((n / 3) % 3) as usize];
        let topic = &topics[(n % topics.len() as u64) as usize];
        batches
            .entry(topic)
            .or_default()
            .push(envelope(service, action, n % 17, n));
    }
    for (topic, lines) in batches {
        for chunk in lines.chunks(200) {
            let (status, answer) = gateway.post_lines(topic, chunk, ADMIN).await;
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer["accepted"], chunk.len(), "{answer}");
        }
    }
}

/// What an independent reader finds in Kafka: `(topic, partition, offset)` of every record the
/// filters select, by the envelope's own service and action.
fn independently_selected(topics: &[String], filters: &FilterSet) -> HashSet<(String, i64, i64)> {
    let settings = settings();
    let mut selected = HashSet::new();
    for topic in topics {
        for message in read_to_end(&settings, topic) {
            let value = common::json(&message);
            let (service, action) = (
                value["service"].as_str().unwrap_or_default(),
                value["action"].as_str().unwrap_or_default(),
            );
            if filters.matches(service, action) {
                use rdkafka::Message;
                selected.insert((topic.clone(), message.partition() as i64, message.offset()));
            }
        }
    }
    selected
}

fn coordinates(frames: &[Frame]) -> HashSet<(String, i64, i64)> {
    frames.iter().map(Frame::coordinates).collect()
}

/// The five subscription kinds of the services' plan, as query strings and filter sets.
fn five_kinds() -> Vec<(&'static str, FilterSet)> {
    [
        ("filter=lk:*", vec!["lk:*"]),
        (
            "filter=*:create_user&filter=*:update_user",
            vec!["*:create_user", "*:update_user"],
        ),
        (
            "filter=lk:create_user,arm:update_user",
            vec!["lk:create_user", "arm:update_user"],
        ),
        ("filter=lk:*&filter=arm:*", vec!["lk:*", "arm:*"]),
        ("filter=*:*", vec!["*:*"]),
    ]
    .into_iter()
    .map(|(query, filters)| (query, FilterSet::parse(&filters).unwrap()))
    .collect()
}

#[tokio::test]
async fn each_filter_kind_receives_exactly_what_it_selects_over_sse_and_websocket() {
    let (topics, database) = fixture("gw-kinds").await;
    let gateway = GatewayProcess::start(&topics, &database, &[]).await;
    let mut clients = Vec::new();
    for (query, filters) in five_kinds() {
        let mut sse = Client::Sse(gateway.sse(query, None, ADMIN).await);
        sse.started().await;
        let mut ws = Client::Ws(Box::new(gateway.ws(query, ADMIN).await));
        ws.started().await;
        clients.push((query, filters.clone(), sse));
        clients.push((query, filters, ws));
    }
    post_traffic(&gateway, &topics, 600, 0).await;
    for (query, filters, client) in &mut clients {
        let expected = independently_selected(&topics, filters);
        assert!(!expected.is_empty());
        let frames = collect_events(client, expected.len()).await;
        assert_eq!(coordinates(&frames), expected, "{query}");
        for frame in &frames {
            let value = &frame.data["value"];
            assert_eq!(frame.event, value["action"], "the event name is the action");
            assert_eq!(frame.data["service"], value["service"]);
            assert!(frame.id.is_some(), "every event frame is resumable");
        }
    }
}

#[tokio::test]
async fn a_client_reconnecting_with_its_cursor_misses_nothing_and_gets_nothing_twice() {
    let (topics, database) = fixture("gw-resume").await;
    // A small queue: a reconnect after a few hundred events catches up before it joins live.
    let gateway = GatewayProcess::start(&topics, &database, &["--client-queue", "64"]).await;
    let total = 1500u64;
    let filters = FilterSet::parse(&["lk:*", "arm:*"]).unwrap();
    let mut client = Client::Sse(gateway.sse("filter=lk:*,arm:*", None, ADMIN).await);
    client.started().await;
    let traffic = {
        let topics = topics.clone();
        let base = gateway.base.clone();
        tokio::spawn(async move {
            let poster = Api { base };
            for round in 0..15 {
                post_traffic(&poster, &topics, 100, round * 100).await;
            }
        })
    };
    // Disconnect and resume, alternating transports, while the traffic flows.
    let mut received: Vec<Frame> = Vec::new();
    let expected_total = (0..total).filter(|n| n % 3 != 2).count();
    let mut round = 0;
    while received.len() < expected_total {
        let want = (expected_total - received.len()).min(137);
        // Dropped as slow under load is a reconnect like the others: the cursor resumes it.
        let (frames, _slow) = collect_events_until_slow(&mut client, want).await;
        received.extend(frames);
        let cursor = client.last_id().expect("an id to resume from");
        round += 1;
        client = if round % 2 == 0 {
            Client::Sse(gateway.sse("filter=lk:*,arm:*", Some(&cursor), ADMIN).await)
        } else {
            Client::Ws(Box::new(
                gateway
                    .ws(&format!("filter=lk:*,arm:*&from={cursor}"), ADMIN)
                    .await,
            ))
        };
    }
    traffic.await.unwrap();
    let expected = independently_selected(&topics, &filters);
    assert_eq!(expected.len(), expected_total);
    let got = coordinates(&received);
    assert_eq!(
        got.len(),
        received.len(),
        "nothing twice across {round} reconnects"
    );
    assert_eq!(got, expected, "nothing missing across {round} reconnects");
}

#[tokio::test]
async fn a_client_moves_to_another_instance_after_a_kill_9_and_misses_nothing() {
    let (topics, database) = fixture("gw-kill").await;
    let first = GatewayProcess::start(&topics, &database, &[]).await;
    let second = GatewayProcess::start(&topics, &database, &[]).await;
    let mut client = Client::Ws(Box::new(first.ws("filter=*:*", ADMIN).await));
    client.started().await;
    post_traffic(&first, &topics, 300, 0).await;
    let before = collect_events(&mut client, 120).await;
    let cursor = client.last_id().unwrap();
    first.process.kill9();
    post_traffic(&second, &topics, 300, 300).await;
    let mut client = Client::Sse(second.sse("filter=*:*", Some(&cursor), ADMIN).await);
    let after = collect_events(&mut client, 600 - 120).await;
    let mut all = coordinates(&before);
    for coordinate in coordinates(&after) {
        assert!(all.insert(coordinate.clone()), "{coordinate:?} twice");
    }
    assert_eq!(
        all,
        independently_selected(&topics, &FilterSet::everything())
    );
}

#[tokio::test]
async fn a_slow_client_is_dropped_with_a_reason_and_resumes_losing_nothing() {
    let (topics, database) = fixture("gw-slow").await;
    let gateway = GatewayProcess::start(&topics, &database, &["--client-queue", "16"]).await;
    let mut client = Client::Ws(Box::new(gateway.ws("filter=*:*", ADMIN).await));
    client.started().await;
    // The client reads nothing while 6,000 events (about 3 MB of frames) pass.
    post_traffic(&gateway, &topics, 6000, 0).await;
    let mut received = Vec::new();
    let mut reason = None;
    while let Some(frame) = client.next().await {
        match frame.kind.as_str() {
            "event" => received.push(frame),
            "disconnect" => reason = Some(frame.data.clone()),
            _ => {}
        }
    }
    let reason = reason.expect("a disconnect frame before the close");
    assert_eq!(reason["code"], "slow", "{reason}");
    let Client::Ws(ws) = &client else {
        unreachable!()
    };
    assert_eq!(
        ws.closed.as_ref().map(|c| c.0),
        Some(4008),
        "{:?}",
        ws.closed
    );
    assert!(received.len() < 6000, "it was dropped before the end");
    let cursor = client.last_id().unwrap();
    let mut client = Client::Sse(gateway.sse("filter=*:*", Some(&cursor), ADMIN).await);
    let rest = collect_events(&mut client, 6000 - received.len()).await;
    let mut all = coordinates(&received);
    for coordinate in coordinates(&rest) {
        assert!(all.insert(coordinate.clone()), "{coordinate:?} twice");
    }
    assert_eq!(all.len(), 6000);
    let metrics = gateway.process.metrics().await;
    assert!(
        common::metric_value(
            &metrics,
            "eventpipe_gateway_clients_dropped_total",
            &["reason=\"slow\""]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn strangers_and_bad_requests_get_a_clear_status_and_reason() {
    let (topics, database) = fixture("gw-bad").await;
    let gateway = GatewayProcess::start(&topics, &database, &["--max-body-bytes", "65536"]).await;
    let topic = &topics[0];
    let line = envelope("lk", "create_user", 1, 1);
    // No credential, a made-up one.
    for token in ["", "ep_made_up_secret"] {
        let (status, answer) = gateway
            .post_lines(topic, std::slice::from_ref(&line), token)
            .await;
        assert_eq!(status, 401, "{answer}");
        let sse = SseClient::connect(&gateway.url("/v1/stream?filter=*:*"), None, token).await;
        assert_eq!(sse.status, 401, "{}", sse.error_body);
        let ws = WsClient::try_connect(
            &format!("{}/v1/ws?filter=*:*", gateway.base.replace("http", "ws")),
            token,
        )
        .await;
        assert!(ws.is_err(), "a stranger's WebSocket is refused");
    }
    // An unknown topic, a bad filter, a bad cursor, an unknown parameter.
    let (status, answer) = gateway
        .post_lines("no-such-topic", std::slice::from_ref(&line), ADMIN)
        .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (404, Some("unknown_topic")),
        "{answer}"
    );
    for (query, code) in [
        ("filter=lk", "bad_filter"),
        ("filter=a:b:c", "bad_filter"),
        ("", "bad_filter"),
        ("filter=*:*&from=not-a-cursor", "bad_cursor"),
        ("filter=*:*&colour=red", "unknown_parameter"),
        ("filter=*:*&topics=elsewhere", "unknown_topic"),
    ] {
        let sse =
            SseClient::connect(&gateway.url(&format!("/v1/stream?{query}")), None, ADMIN).await;
        let body: Value = serde_json::from_str(&sse.error_body).unwrap_or(Value::Null);
        assert_eq!(body["error"], code, "{query}: {}", sse.error_body);
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // A batch reports each line: good ones in, bad ones with their reason.
    let lines = vec![
        line.clone(),
        "{not json".to_string(),
        r#"{"service":"lk","action":"","payload":{"message":"m","timestamp":"t"}}"#.to_string(),
        r#"{"service":"lk","action":"x","payload":{"message":1,"timestamp":"t"}}"#.to_string(),
        envelope("lk", "update_user", 2, 2),
    ];
    let (status, answer) = gateway.post_lines(topic, &lines, ADMIN).await;
    assert_eq!(status, 207, "{answer}");
    let statuses: Vec<u64> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 400, 400, 400, 200], "{answer}");
    assert_eq!(answer["results"][1]["error"], "malformed_json");
    assert!(
        answer["results"][3]["message"]
            .as_str()
            .unwrap()
            .contains("message"),
        "{answer}"
    );
    // Exactly the two good lines are in Kafka.
    let stored = read_to_end(&settings(), topic);
    assert_eq!(stored.len(), 2);
    // Oversized bodies and non-UTF-8.
    let big = "x".repeat(70_000);
    let response = reqwest::Client::new()
        .post(gateway.url(&format!("/v1/topics/{topic}/events")))
        .bearer_auth(ADMIN)
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let answer: Value = response
        .json()
        .await
        .expect("413 in the JSON every answer has");
    assert_eq!(answer["error"], "too_large", "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("max_body_bytes"),
        "{answer}"
    );
    let response = reqwest::Client::new()
        .post(gateway.url(&format!("/v1/topics/{topic}/events")))
        .bearer_auth(ADMIN)
        .body(vec![0xff, 0xfe, b'{'])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    // A WebSocket client that sends messages is closed with a policy reason; others go on.
    let mut talker = gateway.ws("filter=*:*", ADMIN).await;
    let mut listener = Client::Ws(Box::new(gateway.ws("filter=*:*", ADMIN).await));
    listener.started().await;
    talker.send_text("garbage").await;
    while talker.next().await.is_some() {}
    assert_eq!(
        talker.closed.as_ref().map(|c| c.0),
        Some(1008),
        "{:?}",
        talker.closed
    );
    let (status, _) = gateway
        .post_lines(topic, &[envelope("arm", "x", 3, 3)], ADMIN)
        .await;
    assert_eq!(status, 200);
    let frames = collect_events(&mut listener, 1).await;
    assert_eq!(frames[0].data["service"], "arm");
    // Every answer is counted by route pattern and status (no topic name in a label).
    let metrics = gateway.process.metrics().await;
    let count = |route: &str, status: &str| {
        common::metric_value(
            &metrics,
            "eventpipe_gateway_requests_total",
            &[
                &format!("route=\"{route}\""),
                &format!("status=\"{status}\""),
            ],
        )
        .unwrap_or(0.0)
    };
    assert!(
        count("/v1/topics/{topic}/events", "401") >= 2.0,
        "{metrics}"
    );
    assert!(
        count("/v1/topics/{topic}/events", "404") >= 1.0,
        "{metrics}"
    );
    assert!(count("/v1/stream", "400") >= 5.0, "{metrics}");
    assert!(
        count("/v1/topics/{topic}/events", "207") >= 1.0,
        "{metrics}"
    );
    common::assert_promtool_accepts(&metrics);
}

#[tokio::test]
async fn a_position_older_than_kafka_holds_is_caught_up_from_the_event_store() {
    let (topics, database) = fixture("gw-store").await;
    let topics = vec![topics[0].clone()];
    let gateway = GatewayProcess::start(&topics, &database, &[]).await;
    let mut client = Client::Sse(gateway.sse("filter=*:*", None, ADMIN).await);
    let start = client.started().await;
    post_traffic(&gateway, &topics, 90, 0).await;
    collect_events(&mut client, 90).await;
    // The store keeps everything; then Kafka forgets the first records of every partition.
    let store = store_until_it_holds(&topics, &database, 90).await;
    drop(store);
    let deleted = common::delete_records_before(&settings(), &topics[0], 20).await;
    assert!(deleted > 0);
    let mut client = Client::Sse(gateway.sse("filter=*:*", Some(&start), ADMIN).await);
    let frames = collect_events(&mut client, 90).await;
    assert_eq!(
        coordinates(&frames).len(),
        90,
        "every event, the forgotten ones from the store"
    );
    let from_store = frames.iter().filter(|f| f.data["seq"].is_i64()).count();
    assert_eq!(
        from_store as u64, deleted,
        "the records Kafka no longer holds came from the store"
    );
}

#[tokio::test]
async fn a_durable_subscription_sleeps_while_its_client_is_away_and_catches_up_on_any_instance() {
    use reqwest::Method;
    let (topics, database) = fixture("gw-durable").await;
    let first = GatewayProcess::start(&topics, &database, &[]).await;
    let second = GatewayProcess::start(&topics, &database, &[]).await;
    let (_, key) = first
        .consumer_key(&unique("reader"), &["lk:*", "arm:*"])
        .await;
    let name = unique("orders");
    let path = format!("/v1/subscriptions/{name}");
    // A stranger may not make one; a consumer may not ask beyond its filters.
    let spec = serde_json::json!({"filters": ["lk:*"]});
    assert_eq!(
        first
            .call(Method::PUT, &path, Some(spec.clone()), "")
            .await
            .0,
        401
    );
    let (status, answer) = first
        .call(
            Method::PUT,
            &path,
            Some(serde_json::json!({"filters": ["*:*"]})),
            &key,
        )
        .await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("*:*"),
        "{answer}"
    );
    let (status, answer) = first.call(Method::PUT, &path, Some(spec), &key).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["state"], "sleeping");
    // Events before the first attachment are kept: the position was taken at creation.
    post_traffic(&first, &topics, 90, 0).await;
    let lk = FilterSet::parse(&["lk:*"]).unwrap();
    let mut client =
        Client::Sse(SseClient::connect(&first.url(&format!("{path}/stream")), None, &key).await);
    let early = collect_events(&mut client, 30).await;
    let (_, listed) = first
        .call(Method::GET, "/v1/subscriptions", None, &key)
        .await;
    assert_eq!(listed[0]["state"], "active", "{listed}");
    drop(client);
    wait_until_sleeping(&first, &path, &key).await;
    // 1,000 events pass while it sleeps; its position stays and its lag shows them.
    post_traffic(&first, &topics, 1000, 90).await;
    let (_, asleep) = first.call(Method::GET, &path, None, &key).await;
    assert_eq!(asleep["state"], "sleeping");
    let lag = common::wait_until(Duration::from_secs(30), "the lag to show", async || {
        let (_, answer) = second.call(Method::GET, &path, None, &key).await;
        match answer["lag"].as_u64() {
            Some(lag) if lag >= 1000 => Ok(lag),
            _ => Err(answer.to_string()),
        }
    })
    .await;
    assert!(lag <= 1090, "{lag}");
    // Attached again through the other instance, over WebSocket, with no cursor of its own.
    let ws_url = format!("{}{path}/ws", second.base.replace("http://", "ws://"));
    let mut client = Client::Ws(Box::new(WsClient::connect(&ws_url, &key).await));
    let expected = independently_selected(&topics, &lk);
    let rest = collect_events(&mut client, expected.len() - early.len()).await;
    let mut all = coordinates(&early);
    for coordinate in coordinates(&rest) {
        assert!(all.insert(coordinate.clone()), "{coordinate:?} twice");
    }
    assert_eq!(all, expected, "everything it missed, once");
    // A client's own cursor wins over the stored position: from its first event on again.
    let own = early[0].id.clone().unwrap();
    let mut again = Client::Sse(
        SseClient::connect(&first.url(&format!("{path}/stream")), Some(&own), &key).await,
    );
    let replayed = collect_events(&mut again, expected.len() - 1).await;
    assert_eq!(coordinates(&replayed).len(), expected.len() - 1);
    // The newer attachment took over: the WebSocket one is ended with a reason.
    let mut ended = None;
    while let Some(frame) = client.next().await {
        if frame.kind == "disconnect" {
            ended = Some(frame.data["code"].clone());
        }
    }
    assert_eq!(ended, Some(Value::from("replaced")));
    assert_eq!(first.call(Method::DELETE, &path, None, &key).await.0, 204);
    assert_eq!(first.call(Method::GET, &path, None, &key).await.0, 404);
}

#[tokio::test]
async fn a_revoked_key_stops_its_open_streams_within_a_second() {
    use reqwest::Method;
    let (topics, database) = fixture("gw-revoke").await;
    let gateway = GatewayProcess::start(&topics, &database, &[]).await;
    let (id, key) = gateway.consumer_key(&unique("viewer"), &["*:*"]).await;
    let mut sse = Client::Sse(gateway.sse("filter=*:*", None, &key).await);
    sse.started().await;
    let mut ws = Client::Ws(Box::new(gateway.ws("filter=*:*", &key).await));
    ws.started().await;
    let (status, _) = gateway
        .call(Method::DELETE, &format!("/v1/admin/keys/{id}"), None, ADMIN)
        .await;
    assert_eq!(status, 204, "revoked");
    let revoked_at = std::time::Instant::now();
    for client in [&mut sse, &mut ws] {
        let mut code = None;
        while let Some(frame) = client.next().await {
            if frame.kind == "disconnect" {
                code = Some(frame.data["code"].clone());
            }
        }
        assert_eq!(code, Some(Value::from("revoked")));
    }
    let elapsed = revoked_at.elapsed();
    println!("open streams of a revoked key ended {elapsed:?} after the revocation");
    assert!(gateway.sse("filter=*:*", None, &key).await.status == 401);
}

#[tokio::test]
async fn the_listener_serves_https_with_the_configured_certificate() {
    let (topics, database) = fixture("gw-tls").await;
    let dir = std::env::temp_dir().join(unique("gw-tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let gateway = GatewayProcess::start(
        &topics,
        &database,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    assert!(gateway.base.starts_with("https://"), "{}", gateway.base);
    let trusted = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let answer = trusted
        .post(gateway.url(&format!("/v1/topics/{}/events", topics[0])))
        .bearer_auth(ADMIN)
        .body(envelope("lk", "create_user", 1, 1))
        .send()
        .await
        .expect("HTTPS answers");
    assert_eq!(answer.status(), 200);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["offset"], 0, "{answer}");
    // A client that does not trust the certificate, or speaks plain HTTP, gets nothing.
    assert!(reqwest::get(gateway.url("/v1/stream")).await.is_err());
    let plain = gateway.base.replace("https://", "http://");
    assert!(reqwest::get(format!("{plain}/v1/stream")).await.is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn sse_says_how_soon_to_reconnect_and_keeps_idle_connections_alive() {
    use futures::StreamExt;
    let (topics, database) = fixture("gw-alive").await;
    let gateway = GatewayProcess::start(&topics, &database, &["--keep-alive-secs", "1"]).await;
    let response = reqwest::Client::new()
        .get(gateway.url("/v1/stream?filter=*:*"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let mut body = response.bytes_stream();
    let mut text = String::new();
    // Nothing is posted: only the start position, the retry hint and keep-alive comments come.
    let retry_hint = |text: &str| text.lines().any(|l| l.replace(' ', "") == "retry:2000");
    let comments = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with(':') && l.contains("keep-alive"))
            .count()
    };
    // One deadline for the whole wait: comments that never match must fail, not loop.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !(retry_hint(&text) && comments(&text) >= 2) {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .unwrap_or_else(|_| panic!("a retry hint and two keep-alive comments; got {text:?}"))
            .expect("the stream stays open")
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.starts_with("id:"), "the start position first: {text}");
}

#[tokio::test]
async fn a_stream_can_start_at_the_earliest_event_or_at_a_time() {
    let (topics, database) = fixture("gw-start").await;
    let gateway = GatewayProcess::start(&topics, &database, &[]).await;
    post_traffic(&gateway, &topics, 60, 0).await;
    // A time after every event of the first batch and before any of the second.
    let between = chrono::Utc::now() + chrono::Duration::milliseconds(2);
    while chrono::Utc::now() <= between {
        tokio::task::yield_now().await;
    }
    post_traffic(&gateway, &topics, 60, 60).await;
    let mut earliest = Client::Sse(gateway.sse("filter=*:*&from=earliest", None, ADMIN).await);
    assert_eq!(collect_events(&mut earliest, 120).await.len(), 120);
    let time = between.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut since = Client::Ws(Box::new(
        gateway.ws(&format!("filter=*:*&from={time}"), ADMIN).await,
    ));
    let frames = collect_events(&mut since, 60).await;
    for frame in &frames {
        let n = frame.data["value"]["payload"]["data"]["n"]
            .as_u64()
            .unwrap();
        assert!(n >= 60, "event {n} is older than {time}");
    }
}

#[tokio::test]
async fn a_producer_key_sends_only_as_its_service_and_the_gateway_stamps_and_keys_events() {
    use reqwest::Method;
    let (topics, database) = fixture("gw-producer").await;
    let topic = &topics[0];
    let gateway = GatewayProcess::start(&topics, &database, &[]).await;
    let (status, issued) = gateway
        .call(
            Method::POST,
            "/v1/admin/keys",
            Some(serde_json::json!({"kind": "producer", "service": "lk"})),
            ADMIN,
        )
        .await;
    assert_eq!(status, 201, "{issued}");
    let producer = issued["key"].as_str().unwrap().to_string();
    let unsigned = r#"{"action":"create_user","payload":{"message":"m","timestamp":"2026-12-01T09:00:00","data":{"user_id":42}}}"#;
    let (status, answer) = gateway
        .post_lines(topic, &[unsigned.to_string()], &producer)
        .await;
    assert_eq!(status, 200, "stamped with the key's service: {answer}");
    let (status, answer) = gateway
        .post_lines(topic, &[envelope("arm", "create_user", 7, 1)], &producer)
        .await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["results"][0]["message"]
            .as_str()
            .unwrap()
            .contains("arm"),
        "{answer}"
    );
    let (status, answer) = gateway
        .post_lines(topic, &[envelope("lk", "update_user", 7, 2)], &producer)
        .await;
    assert_eq!(status, 200, "{answer}");
    let response = reqwest::Client::new()
        .post(gateway.url(&format!("/v1/topics/{topic}/events?key=order-9")))
        .bearer_auth(&producer)
        .body(envelope("lk", "run_task", 7, 3))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (_, consumer) = gateway.consumer_key(&unique("reader"), &["*:*"]).await;
    let (status, _) = gateway
        .post_lines(topic, &[envelope("lk", "x", 1, 4)], &consumer)
        .await;
    assert_eq!(status, 403, "a consumer's key sends nothing");
    // What Kafka holds: the three accepted events, each with its sender and type as headers and
    // in the value, keyed by payload.data.user_id unless ?key= said otherwise.
    let records = read_to_end(&settings(), topic);
    let mut seen: Vec<(String, String, String, String)> = records
        .iter()
        .map(|m| {
            let headers = common::headers(m);
            let value = common::json(m);
            assert_eq!(headers["service"], value["service"]);
            assert_eq!(headers["action"], value["action"]);
            (
                common::key(m),
                headers["service"].clone(),
                headers["action"].clone(),
                value["payload"]["message"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("42".into(), "lk".into(), "create_user".into(), "m".into()),
            (
                "7".into(),
                "lk".into(),
                "update_user".into(),
                "event 2".into()
            ),
            (
                "order-9".into(),
                "lk".into(),
                "run_task".into(),
                "event 3".into()
            ),
        ]
    );
}

#[tokio::test]
async fn partitions_added_to_a_served_topic_are_followed_live_and_by_resuming_clients() {
    let (topics, database) = fixture("gw-grow").await;
    let gateway = GatewayProcess::start(&topics, &database, &[]).await;
    let mut live = Client::Sse(gateway.sse("filter=*:*", None, ADMIN).await);
    let before_growth = live.started().await;
    let mut ws = Client::Ws(Box::new(gateway.ws("filter=lk:*", ADMIN).await));
    ws.started().await;

    grow_topic(&settings(), &topics[0], 5).await;
    let records: Vec<(i32, String, Vec<u8>)> = (0..20u64)
        .map(|n| {
            let service = SENDERS[(n % 2) as usize];
            let line = envelope(service, "create_user", n, n);
            (3 + (n % 2) as i32, format!("user-{n}"), line.into_bytes())
        })
        .collect();
    produce_to_partitions(&settings(), &topics[0], &records).await;

    // Nothing was posted to the old partitions: every event is from a new one, once, in order.
    let expected: BTreeMap<(String, i64, i64), ()> = read_to_end(&settings(), &topics[0])
        .iter()
        .map(|m| ((topics[0].clone(), m.partition() as i64, m.offset()), ()))
        .collect();
    assert_eq!(expected.len(), 20);
    let arrived = collect_events(&mut live, 20).await;
    let mut got: Vec<_> = arrived.iter().map(Frame::coordinates).collect();
    got.sort();
    assert_eq!(got, expected.keys().cloned().collect::<Vec<_>>());
    let lk_only = collect_events(&mut ws, 10).await;
    assert!(lk_only.iter().all(|f| f.data["service"] == "lk"));

    // A client resuming from a cursor made before the growth has seen nothing of the new
    // partitions: it gets all of them.
    let mut resumed = Client::Sse(gateway.sse("filter=*:*", Some(&before_growth), ADMIN).await);
    let again = collect_events(&mut resumed, 20).await;
    let mut again: Vec<_> = again.iter().map(Frame::coordinates).collect();
    again.sort();
    assert_eq!(again, expected.keys().cloned().collect::<Vec<_>>());
}

#[tokio::test]
async fn a_websocket_client_that_acknowledges_resumes_after_its_last_ack_not_its_last_frame() {
    use reqwest::Method;
    let (topics, database) = fixture("gw-acks").await;
    let gateway = GatewayProcess::start(&topics, &database, &[]).await;
    let (_, key) = gateway.consumer_key(&unique("acker"), &["lk:*"]).await;
    let name = unique("acked");
    let path = format!("/v1/subscriptions/{name}");
    let spec = serde_json::json!({"filters": ["lk:*"]});
    assert_eq!(
        gateway.call(Method::PUT, &path, Some(spec), &key).await.0,
        201
    );
    post_traffic(&gateway, &topics, 90, 0).await;
    let ws_url = format!("{}{path}/ws", gateway.base.replace("http://", "ws://"));

    // Thirty events arrive; the client confirms only the first ten, then goes away.
    let mut acking = WsClient::connect(&format!("{ws_url}?ack=client"), &key).await;
    let mut frames = Vec::new();
    while frames.len() < 30 {
        let frame = acking.next().await.expect("the stream stays open");
        if frame.kind == "event" {
            frames.push(frame);
        }
    }
    let tenth = frames[9].id.clone().unwrap();
    acking
        .send_text(&serde_json::json!({"type": "ack", "id": tenth}).to_string())
        .await;
    common::wait_until(
        Duration::from_secs(30),
        "the acknowledged id to be stored",
        async || {
            let (_, answer) = gateway.call(Method::GET, &path, None, &key).await;
            match answer["position"].as_str() {
                Some(position) if position == tenth => Ok(()),
                _ => Err(answer.to_string()),
            }
        },
    )
    .await;
    drop(acking);
    wait_until_sleeping(&gateway, &path, &key).await;
    let (_, asleep) = gateway.call(Method::GET, &path, None, &key).await;
    assert_eq!(
        asleep["position"],
        tenth.as_str(),
        "released at the ack, not the last frame"
    );

    // Back without a cursor of its own: from the eleventh on, nothing missing, nothing before.
    let mut back = Client::Ws(Box::new(WsClient::connect(&ws_url, &key).await));
    let rest = collect_events(&mut back, 20).await;
    assert_eq!(coordinates(&rest), coordinates(&frames[10..]));
    drop(back);

    // A message that is not an ack closes with a policy error and moves nothing.
    wait_until_sleeping(&gateway, &path, &key).await;
    let (_, before) = gateway.call(Method::GET, &path, None, &key).await;
    let mut rude = WsClient::connect(&format!("{ws_url}?ack=client"), &key).await;
    rude.send_text("{\"type\":\"ack\",\"id\":\"not a cursor\"}")
        .await;
    while rude.next().await.is_some() {}
    let (code, reason) = rude.closed.clone().expect("a close frame");
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("ack"), "{reason}");
    let (_, after) = gateway.call(Method::GET, &path, None, &key).await;
    assert_eq!(after["position"], before["position"]);

    // Only a durable WebSocket attachment takes acknowledgements.
    let (status, answer) = gateway
        .call(Method::GET, "/v1/stream?filter=lk:*&ack=client", None, &key)
        .await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("ack=client"));
}

#[tokio::test]
async fn history_over_http_is_the_stores_selection_as_json_lines_or_as_resumable_sse() {
    let (topics, database) = fixture("gw-history").await;
    let gateway = GatewayProcess::start(&topics, &database, &[]).await;
    post_traffic(&gateway, &topics, 120, 0).await;
    let _store = store_until_it_holds(&topics, &database, 120).await;
    let filters = FilterSet::parse(&["lk:*", "arm:update_user"]).unwrap();
    let expected = independently_selected(&topics, &filters);
    let query = "/v1/history?filter=lk:*&filter=arm:update_user";
    let http = reqwest::Client::new();
    let get = |path: String, accept: &'static str, last: Option<String>| {
        let mut request = http.get(gateway.url(&path)).bearer_auth(ADMIN);
        request = request.header("accept", accept);
        if let Some(last) = last {
            request = request.header("last-event-id", last);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let content_type = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_string();
            (status, content_type, response.text().await.unwrap())
        }
    };
    let coordinates_of = |events: &[Value]| -> HashSet<(String, i64, i64)> {
        events
            .iter()
            .map(|e| {
                (
                    e["topic"].as_str().unwrap().to_string(),
                    e["partition"].as_i64().unwrap(),
                    e["offset"].as_i64().unwrap(),
                )
            })
            .collect()
    };

    // JSON lines: exactly the selection, in ascending seq.
    let (status, content_type, body) = get(query.to_string(), "*/*", None).await;
    assert_eq!(
        (status, content_type.as_str()),
        (200, "application/x-ndjson"),
        "{body}"
    );
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(coordinates_of(&lines), expected);
    assert_eq!(lines.len(), expected.len(), "each once");
    let seqs: Vec<i64> = lines.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "ascending seq: {seqs:?}"
    );

    // SSE: the same events, id = seq, event = action, and an `end` that counts them.
    let sse_blocks = |body: &str| -> (Vec<(i64, String, Value)>, Option<Value>) {
        let mut events = Vec::new();
        let mut end = None;
        for block in body.split("\n\n").filter(|b| !b.trim().is_empty()) {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                    .map(str::to_string)
            };
            let data: Value = serde_json::from_str(&field("data").unwrap()).unwrap();
            match field("event").as_deref() {
                Some("end") => end = Some(data),
                Some(name) => events.push((
                    field("id").unwrap().parse().unwrap(),
                    name.to_string(),
                    data,
                )),
                None => panic!("a block without an event name: {block}"),
            }
        }
        (events, end)
    };
    let (status, content_type, body) = get(query.to_string(), "text/event-stream", None).await;
    assert_eq!(
        (status, content_type.as_str()),
        (200, "text/event-stream"),
        "{body}"
    );
    let (events, end) = sse_blocks(&body);
    assert_eq!(end, Some(serde_json::json!({"events": expected.len()})));
    let data: Vec<Value> = events.iter().map(|(_, _, d)| d.clone()).collect();
    assert_eq!(coordinates_of(&data), expected);
    for (seq, name, data) in &events {
        assert_eq!(Some(*seq), data["seq"].as_i64());
        assert_eq!(name, data["action"].as_str().unwrap());
    }
    // A reconnect with Last-Event-ID resumes after that seq; format=sse works without Accept.
    let fifth = events[4].0;
    let (_, _, rest) = get(
        format!("{query}&format=sse"),
        "*/*",
        Some(fifth.to_string()),
    )
    .await;
    let (rest, end) = sse_blocks(&rest);
    assert_eq!(rest.len(), events.len() - 5);
    assert!(rest.iter().all(|(seq, _, _)| *seq > fifth));
    assert_eq!(end, Some(serde_json::json!({"events": events.len() - 5})));

    // Strangers, narrower credentials and bad input: a status with the reason.
    let stranger = http.get(gateway.url(query)).send().await.unwrap();
    assert_eq!(stranger.status().as_u16(), 401);
    let (_, key) = gateway.consumer_key(&unique("lk-reader"), &["lk:*"]).await;
    let (status, answer) = gateway
        .call(reqwest::Method::GET, "/v1/history?filter=*:*", None, &key)
        .await;
    assert_eq!(status, 403, "{answer}");
    for (bad, code) in [
        ("/v1/history?filter=lk", "bad_filter"),
        ("/v1/history?filter=lk:*&format=xml", "bad_parameter"),
        ("/v1/history?filter=lk:*&last=ten", "bad_parameter"),
    ] {
        let (status, answer) = gateway.call(reqwest::Method::GET, bad, None, ADMIN).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some(code)),
            "{bad}: {answer}"
        );
    }
}
