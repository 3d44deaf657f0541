//! Observability on the real stack: the four stages run fed with good and bad traffic (the store
//! keeps the dispatcher's input and the log's, on a fresh database of its own), and a gateway
//! on that database takes posted events (good and bad) for the dispatcher's input and streams
//! them to SSE and WebSocket clients, a durable subscription's and resuming ones; all scraped
//! by a Prometheus running deploy/prometheus.yml; every query of every Grafana dashboard is
//! evaluated through Prometheus's HTTP API and must return data.
//!
//! The stages bind their own ports (see `common::StageProcess`), so the Prometheus is the
//! test's own: the stack's binary with deploy/prometheus.yml as it is, except that the five
//! stage targets point at the ports the stages bound and the rule files are found from the
//! repository. It binds its own port too. Nothing is fixed, so the test runs next to
//! `scripts/demo` or another run of itself, and only its own stages can answer the queries.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::gateway::{Client, GatewayProcess, SseClient, ADMIN};
use common::StageProcess;
use serde_json::{json, Value};

/// A Prometheus process of this test, with its own configuration, data and port.
struct Prometheus {
    child: std::process::Child,
    dir: PathBuf,
    url: String,
}

impl Prometheus {
    /// deploy/prometheus.yml with `targets` (default target → address) replaced.
    fn config(targets: &[(&str, SocketAddr)]) -> String {
        let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
        let mut config = std::fs::read_to_string(format!("{deploy}/prometheus.yml")).unwrap();
        let mut replace = |from: String, to: String| {
            assert_eq!(
                config.matches(&from).count(),
                1,
                "deploy/prometheus.yml has {from} once"
            );
            config = config.replace(&from, &to);
        };
        for (default, address) in targets {
            replace(format!("\"{default}\""), format!("\"{address}\""));
        }
        replace(
            "- prometheus/rules/*.yml".into(),
            format!("- {deploy}/prometheus/rules/*.yml"),
        );
        config
    }

    async fn start(targets: &[(&str, SocketAddr)]) -> Prometheus {
        let dir = std::env::temp_dir().join(common::unique("prometheus"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, Self::config(targets)).unwrap();
        let log_path = dir.join("prometheus.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg("--web.listen-address=127.0.0.1:0")
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus is installed by scripts/stack");
        let mut prometheus = Prometheus {
            child,
            dir,
            url: String::new(),
        };
        // `msg="Listening on" address=127.0.0.1:41234`: the port the kernel gave it.
        let address: SocketAddr = common::wait_until(
            Duration::from_secs(60),
            "Prometheus to listen",
            async || {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                log.lines()
                    .filter(|l| l.contains("msg=\"Listening on\""))
                    .find_map(|l| l.rsplit_once("address=")?.1.trim().parse().ok())
                    .ok_or(log)
            },
        )
        .await;
        prometheus.url = format!("http://{address}");
        let ready = format!("{}/-/ready", prometheus.url);
        common::wait_until(
            Duration::from_secs(60),
            &ready,
            async || match reqwest::get(&ready).await {
                Ok(response) if response.status().is_success() => Ok(()),
                other => Err(format!("{other:?}")),
            },
        )
        .await;
        prometheus
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every Prometheus expression in deploy/grafana/dashboards, with where it comes from.
fn dashboard_queries() -> Vec<(String, String)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/dashboards");
    let mut queries = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let dashboard: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                queries.push((
                    format!(
                        "{} / {}",
                        dashboard["title"].as_str().unwrap(),
                        panel["title"].as_str().unwrap()
                    ),
                    target["expr"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    assert!(queries.len() > 20, "dashboards found: {}", queries.len());
    queries
}

/// Reads a client's frames until its stream ends (or the task is aborted), as a browser would.
fn keep_reading(mut client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while client.next().await.is_some() {} })
}

async fn prometheus_query(prometheus: &str, expr: &str) -> Vec<Value> {
    let url = url::Url::parse_with_params(&format!("{prometheus}/api/v1/query"), [("query", expr)])
        .unwrap();
    let response: Value = reqwest::Client::new()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(response["status"], "success", "{expr}: {response}");
    response["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn every_dashboard_query_returns_data_for_a_running_pipeline() {
    let settings = common::settings();
    let base = common::unique("observe");
    let (create, info, events, aggregated) = (
        format!("{base}-create"),
        format!("{base}-info"),
        format!("{base}-events"),
        format!("{base}-aggregated"),
    );
    for topic in [&create, &info, &events, &aggregated] {
        common::create_topic(&settings, topic, 2).await;
        common::create_topic(&settings, &format!("{topic}.dlq"), 1).await;
    }
    let routes = std::env::temp_dir().join(format!("{base}-routes.toml"));
    std::fs::write(
        &routes,
        format!("[[routes]]\naction = \"create_user\"\n[[routes.outputs]]\ntopic = \"{info}\"\nmessage = \"User created\"\n"),
    )
    .unwrap();

    let dispatch = StageProcess::start(
        &[
            "dispatch",
            "--input-topics",
            &create,
            "--routes-file",
            routes.to_str().unwrap(),
            "--group-id",
            &format!("{base}-d"),
        ],
        &[],
    );
    let log = StageProcess::start(
        &[
            "log",
            "--input-topic",
            &info,
            "--group-id",
            &format!("{base}-l"),
            "--index-pattern",
            &format!("{base}-%Y.%m.%d"),
            "--template-name",
            &base,
        ],
        &[("ELASTICSEARCH_URL", settings.elasticsearch_url.as_str())],
    );
    let aggregate = StageProcess::start(
        &[
            "aggregate",
            "--input-topic",
            &events,
            "--group-id",
            &format!("{base}-a"),
            "--kafka-topic",
            &aggregated,
            "--idle-timeout-ms",
            "1000",
        ],
        &[("STORAGE_TYPE", "kafka"), ("AGGREGATION_INTERVAL", "1")],
    );
    // The store keeps what the dispatcher and the log read, bad input included (stored raw).
    let (_store_db, store_url) = common::fresh_database_url(&settings).await;
    let store = StageProcess::start(
        &[
            "store",
            "--topics",
            &format!("{create},{info}"),
            "--postgres-url",
            &store_url,
            "--group-id",
            &format!("{base}-s"),
        ],
        &[],
    );
    // The gateway serves the dispatcher's input, on the store's database (history, and
    // catch-ups older than Kafka holds, read the store's table).
    let gateway = GatewayProcess::start(std::slice::from_ref(&create), &store_url, &[]).await;
    for stage in [&dispatch, &log, &aggregate, &store, &gateway.process] {
        stage.wait_ready().await;
    }
    // Clients that stay: a live SSE and WebSocket stream, and an SSE attachment to a durable
    // subscription. Each reads every frame as it comes.
    let stream_query = format!("filter=*:*&topics={create}");
    let subscription = format!("{base}-sub");
    let (status, body) = gateway
        .call(
            reqwest::Method::PUT,
            &format!("/v1/subscriptions/{subscription}"),
            Some(json!({"filters": ["lk:*"], "topics": [&create]})),
            ADMIN,
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let live_sse = gateway.sse(&stream_query, None, ADMIN).await;
    assert_eq!(live_sse.status, 200, "{}", live_sse.error_body);
    let attached = SseClient::connect(
        &gateway.url(&format!("/v1/subscriptions/{subscription}/stream")),
        None,
        ADMIN,
    )
    .await;
    assert_eq!(attached.status, 200, "{}", attached.error_body);
    let readers = [
        keep_reading(Client::Sse(live_sse)),
        keep_reading(Client::Ws(Box::new(gateway.ws(&stream_query, ADMIN).await))),
        keep_reading(Client::Sse(attached)),
    ];
    // The targets deploy/prometheus.yml names for the stages, now where they listen.
    let prometheus = Prometheus::start(&[
        ("127.0.0.1:19464", dispatch.metrics_address().await),
        ("127.0.0.1:19465", log.metrics_address().await),
        ("127.0.0.1:19466", aggregate.metrics_address().await),
        ("127.0.0.1:19467", store.metrics_address().await),
        ("127.0.0.1:19468", gateway.process.metrics_address().await),
    ])
    .await;

    // Traffic, good and bad, until every dashboard query returns data: rates need two scrapes
    // of a series (scrape interval 5 s), and every series must exist.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut round = 0u64;
    let empty = loop {
        let now = chrono::Utc::now();
        let mut envelopes: Vec<(String, Vec<u8>)> = (0..50)
            .map(|i| {
                let body = json!({"service": "lk", "action": "create_user", "payload": {
                    "message": "It is create_user", "timestamp": now.naive_utc().to_string(),
                    "data": {"user_id": i, "round": round}}});
                (i.to_string(), body.to_string().into_bytes())
            })
            .collect();
        envelopes.push(("bad".into(), b"{not json".to_vec()));
        common::produce_all(&settings, &create, &envelopes).await;
        common::produce_all(&settings, &info, &[("bad".into(), b"[1, 2, 3]".to_vec())]).await;
        let mut samples: Vec<(String, Vec<u8>)> = ["cpu", "mem"]
            .iter()
            .flat_map(|name| {
                ["count", "sum", "avg", "min", "max"].map(|function| {
                    let event = json!({"name": name, "function": function, "value": round as f64 + 0.5,
                        "timestamp": now.to_rfc3339()});
                    (name.to_string(), event.to_string().into_bytes())
                })
            })
            .collect();
        samples.push(("bad".into(), br#"{"name":"cpu","function":"median_of_medians","value":1,"timestamp":"2024-01-01T00:00:00Z"}"#.to_vec()));
        common::produce_all(&settings, &events, &samples).await;
        // Through the gateway: envelopes and one malformed line (a 207, the bad line rejected).
        let mut lines: Vec<String> = (0..10)
            .map(|i| common::gateway::envelope("lk", "create_user", i, round))
            .collect();
        lines.push("{not json".into());
        let (status, answer) = gateway.post_lines(&create, &lines, ADMIN).await;
        assert_eq!(status, 207, "{answer}");
        // A client resuming from the earliest offset (a catch-up read from Kafka) that leaves
        // after its first event (dropped as gone).
        let mut resuming = Client::Sse(
            gateway
                .sse(&format!("{stream_query}&from=earliest"), None, ADMIN)
                .await,
        );
        while resuming
            .next()
            .await
            .is_some_and(|frame| frame.kind != "event")
        {}
        drop(resuming);
        round += 1;

        let mut empty = Vec::new();
        for (panel, expr) in dashboard_queries() {
            if prometheus_query(&prometheus.url, &expr).await.is_empty() {
                empty.push(format!("{panel}: {expr}"));
            }
        }
        if empty.is_empty() || Instant::now() > deadline {
            break empty;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    eprintln!(
        "{} queries without data after {round} rounds of traffic",
        empty.len()
    );
    for stage in [&dispatch, &log, &aggregate, &store, &gateway.process] {
        common::assert_promtool_accepts(&stage.metrics().await);
    }
    let logs = format!(
        "dispatch:\n{}\nlog:\n{}\naggregate:\n{}\nstore:\n{}\ngateway:\n{}",
        dispatch.log(),
        log.log(),
        aggregate.log(),
        store.log(),
        gateway.process.log()
    );
    assert!(
        empty.is_empty(),
        "queries without data after {round} rounds of traffic:\n{}\n\n{logs}",
        empty.join("\n")
    );
    for reader in readers {
        reader.abort();
    }
    for stage in [dispatch, log, aggregate, store, gateway.process] {
        let (status, output) = stage.terminate();
        assert!(status.success(), "{output}");
    }
}
