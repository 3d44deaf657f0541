//! Elasticsearch and Kafka helpers of the log stage's tests: refreshed counts and searches over
//! an index pattern, waiting for a count, and producing records that carry headers.
#![allow(dead_code)] // each test file uses a different part

use std::time::{Duration, Instant};

use eventpipe::config::Settings;
use eventpipe::kafka::delivery::{owned_headers, BoundedSender, CountedProducer};
use eventpipe::kafka::PipelineContext;
use rdkafka::producer::BaseRecord;
use serde_json::{json, Value};

/// One record to produce: key, value and headers.
pub struct TestRecord {
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

/// Produces records with their headers and waits for every delivery report.
pub async fn produce_records(settings: &Settings, topic: &str, records: &[TestRecord]) {
    let producer = CountedProducer::create(&settings.kafka, PipelineContext::default()).unwrap();
    let mut sender = BoundedSender::new(&producer, 10_000);
    for record in records {
        let headers = owned_headers(&record.headers);
        let key: &[u8] = record.key.as_bytes();
        let value: &[u8] = &record.value;
        sender
            .send(
                BaseRecord::to(topic)
                    .key(key)
                    .payload(value)
                    .headers(headers),
            )
            .await
            .expect("enqueued");
    }
    let delivered = sender.finish().await.expect("delivered");
    assert_eq!(delivered, records.len() as u64);
}

fn url(settings: &Settings, path: &str) -> String {
    settings.elasticsearch_url.join(path).unwrap().to_string()
}

/// Makes everything indexed so far searchable (what Kibana users see after the refresh interval).
pub async fn refresh(settings: &Settings, index: &str) {
    let _ = reqwest::Client::new()
        .post(url(settings, &format!("{index}/_refresh")))
        .send()
        .await;
}

/// Documents in `index` (a pattern) matching `query`, after a refresh; None if unreachable.
pub async fn try_count(settings: &Settings, index: &str, query: Value) -> Option<u64> {
    refresh(settings, index).await;
    let response = reqwest::Client::new()
        .post(url(settings, &format!("{index}/_count")))
        .json(&json!({ "query": query }))
        .send()
        .await
        .ok()?;
    let body: Value = response.json().await.ok()?;
    body["count"].as_u64()
}

pub async fn count(settings: &Settings, index: &str, query: Value) -> u64 {
    try_count(settings, index, query)
        .await
        .expect("Elasticsearch answers _count")
}

/// A search request's response body.
pub async fn search(settings: &Settings, index: &str, body: Value) -> Value {
    refresh(settings, index).await;
    reqwest::Client::new()
        .post(url(settings, &format!("{index}/_search")))
        .json(&body)
        .send()
        .await
        .expect("Elasticsearch answers _search")
        .json()
        .await
        .unwrap()
}

/// Polls until `index` holds at least `expected` documents or `timeout` passes; the last count.
pub async fn wait_for_count(
    settings: &Settings,
    index: &str,
    expected: u64,
    timeout: Duration,
) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let current = try_count(settings, index, json!({"match_all": {}}))
            .await
            .unwrap_or(0);
        if current >= expected || Instant::now() > deadline {
            return current;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
