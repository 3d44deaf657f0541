//! Observability on the real stack: the three stages run on the ports the local Prometheus
//! scrapes (19464-19466), fed with good and bad traffic; then every query of every Grafana
//! dashboard is evaluated through Prometheus's HTTP API and must return data.
//! Uses fixed ports: stop `scripts/demo` first (`scripts/demo stop`).

mod common;

use std::time::{Duration, Instant};

use common::StageProcess;
use serde_json::{json, Value};

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
    let prometheus =
        std::env::var("PROMETHEUS_URL").unwrap_or_else(|_| "http://127.0.0.1:19090".into());
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
        &[("EVENTPIPE_METRICS_ADDRESS", "127.0.0.1:19464")],
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
        &[
            ("EVENTPIPE_METRICS_ADDRESS", "127.0.0.1:19465"),
            ("ELASTICSEARCH_URL", settings.elasticsearch_url.as_str()),
        ],
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
        &[
            ("EVENTPIPE_METRICS_ADDRESS", "127.0.0.1:19466"),
            ("STORAGE_TYPE", "kafka"),
            ("AGGREGATION_INTERVAL", "1"),
        ],
    );
    for stage in [&dispatch, &log, &aggregate] {
        let deadline = Instant::now() + Duration::from_secs(60);
        while stage.ready_status().await != Some(200) {
            assert!(
                Instant::now() < deadline,
                "stage not ready:\n{}",
                stage.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Traffic for a while, good and bad, so rates have two samples and every series exists.
    let started = Instant::now();
    let mut round = 0u64;
    while started.elapsed() < Duration::from_secs(25) {
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
        round += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Two more scrapes after the last traffic (scrape interval 5 s).
    tokio::time::sleep(Duration::from_secs(11)).await;

    for stage in [&dispatch, &log, &aggregate] {
        common::assert_promtool_accepts(&stage.metrics().await);
    }
    let mut empty = Vec::new();
    for (panel, expr) in dashboard_queries() {
        if prometheus_query(&prometheus, &expr).await.is_empty() {
            empty.push(format!("{panel}: {expr}"));
        }
    }
    let logs = format!(
        "dispatch:\n{}\nlog:\n{}\naggregate:\n{}",
        dispatch.log(),
        log.log(),
        aggregate.log()
    );
    assert!(
        empty.is_empty(),
        "queries without data:\n{}\n\n{logs}",
        empty.join("\n")
    );
    for stage in [dispatch, log, aggregate] {
        let (status, output) = stage.terminate();
        assert!(status.success(), "{output}");
    }
}
