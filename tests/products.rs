//! The product catalogue on the real stack: `generate products` seeds the catalogue and sends
//! changes; `eventpipe materialise` leaves `products` equal to the last change per product as an
//! independent reader of the topic computes it; duplicates and reversed versions are skipped;
//! malformed and negative changes are dead-lettered with their reason.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Outgoing, StageProcess};
use rdkafka::message::Message;
use serde_json::{json, Value};

use eventpipe::config::Settings;

const TIMEOUT: Duration = Duration::from_secs(90);

/// A topic of changes with its dead-letter topic, and a database of its own.
struct Fixture {
    settings: Settings,
    topic: String,
    dlq: String,
    group: String,
    pool: sqlx::PgPool,
    url: String,
}

async fn fixture(partitions: i32) -> Fixture {
    let settings = common::settings();
    let topic = common::unique("product_changes");
    let dlq = format!("{topic}.dlq");
    common::create_topic(&settings, &topic, partitions).await;
    common::create_topic(&settings, &dlq, 1).await;
    let (pool, url) = common::fresh_database_url(&settings).await;
    Fixture {
        settings,
        group: common::unique("materialise"),
        topic,
        dlq,
        pool,
        url,
    }
}

impl Fixture {
    fn materialise(&self) -> StageProcess {
        StageProcess::start(
            &[
                "materialise",
                "--topic",
                &self.topic,
                "--group-id",
                &self.group,
                "--postgres-url",
                &self.url,
            ],
            &[],
        )
    }

    fn generate(&self, products: u64, count: u64, seed: u64) -> String {
        let output = common::run_eventpipe(
            &[
                "generate",
                "products",
                "--products",
                &products.to_string(),
                "--count",
                &count.to_string(),
                "--rate",
                "0",
                "--seed",
                &seed.to_string(),
                "--topic",
                &self.topic,
                "--postgres-url",
                &self.url,
            ],
            &[(
                "KAFKA_BOOTSTRAP_SERVERS",
                &self.settings.kafka.bootstrap_servers,
            )],
            None,
        );
        assert!(output.status.success(), "{}", common::stderr(&output));
        common::stdout(&output)
    }

    /// key -> (version, state) of every row.
    async fn rows(&self) -> BTreeMap<String, (i64, Value)> {
        self.try_rows().await.unwrap()
    }

    /// `rows`, or why not (the stage has not created the table yet).
    async fn try_rows(&self) -> Result<BTreeMap<String, (i64, Value)>, String> {
        let rows: Vec<(String, i64, String)> =
            sqlx::query_as("SELECT key, version, state::text FROM products")
                .fetch_all(&self.pool)
                .await
                .map_err(|e| e.to_string())?;
        Ok(rows
            .into_iter()
            .map(|(key, version, state)| (key, (version, serde_json::from_str(&state).unwrap())))
            .collect())
    }

    /// Waits until every key of `expected` has its expected version in the table.
    async fn wait_for_versions(&self, expected: &BTreeMap<String, (i64, Value)>) {
        common::wait_until(TIMEOUT, "products to reach the last versions", async || {
            let rows = self.try_rows().await?;
            let behind: Vec<_> = expected
                .iter()
                .filter(|(key, (version, _))| rows.get(*key).map(|r| r.0) != Some(*version))
                .map(|(key, (version, _))| (key.clone(), *version, rows.get(key).map(|r| r.0)))
                .collect();
            if behind.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} behind, e.g. {:?}",
                    behind.len(),
                    &behind[..behind.len().min(3)]
                ))
            }
        })
        .await
    }
}

/// The last change per product by version, computed from the topic as a plain reader sees it.
fn last_change_per_key(
    settings: &Settings,
    topic: &str,
) -> (usize, BTreeMap<String, (i64, Value)>) {
    let records = common::read_to_end(settings, topic);
    let mut last: BTreeMap<String, (i64, Value)> = BTreeMap::new();
    for record in &records {
        let value = common::json(record);
        let version = value["version"].as_i64().unwrap();
        let entry = last.entry(common::key(record)).or_insert((-1, Value::Null));
        if version > entry.0 {
            *entry = (version, value);
        }
    }
    (records.len(), last)
}

fn counter(metrics: &str, outcome: &str) -> f64 {
    common::metric_value(
        metrics,
        "eventpipe_materialise_changes_total",
        &[&format!("outcome=\"{outcome}\"")],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_table_equals_the_last_change_per_product() {
    let f = fixture(3).await;
    let (products, seed) = (25u64, 11);
    let first = f.generate(products, 400, seed);
    assert!(first.contains("(25 created now)"), "{first}");

    // The catalogue: every product at version 0 with its seeded values, and a photo each.
    let seeded = eventpipe::catalogue::seeded(seed, products);
    let rows = f.rows().await;
    assert_eq!(rows.len(), products as usize);
    for product in &seeded {
        let (version, state) = &rows[&product.id.to_string()];
        assert_eq!(*version, 0);
        assert_eq!(state["name"], json!(product.name));
        assert_eq!(state["price_cents"], json!(product.price_cents));
        assert_eq!(state["stock"], json!(product.stock));
    }
    let photos: Vec<(String, String, Vec<u8>)> =
        sqlx::query_as("SELECT product_id, content_type, bytes FROM product_photos")
            .fetch_all(&f.pool)
            .await
            .unwrap();
    assert_eq!(photos.len(), products as usize);
    assert!(photos
        .iter()
        .all(|(_, kind, bytes)| kind == "image/svg+xml" && bytes.starts_with(b"<svg")));

    let stage = f.materialise();
    for round in [400usize, 450] {
        if round == 450 {
            // A second run finds the catalogue and continues it with newer versions.
            let second = f.generate(products, 50, seed + 1);
            assert!(second.contains("(0 created now)"), "{second}");
        }
        let (sent, expected) = last_change_per_key(&f.settings, &f.topic);
        assert_eq!(sent, round);
        f.wait_for_versions(&expected).await;
        let rows = f.rows().await;
        assert_eq!(rows.len(), products as usize);
        for product in &seeded {
            let key = product.id.to_string();
            let (version, state) = &rows[&key];
            match expected.get(&key) {
                Some((last_version, last)) => {
                    assert_eq!(version, last_version, "{key}");
                    for field in ["price_cents", "stock", "changed", "changed_at"] {
                        assert_eq!(state[field], last[field], "{key}.{field}");
                    }
                }
                None => assert_eq!(*version, 0, "{key} never changed"),
            }
            assert_eq!(state["name"], json!(product.name), "{key} keeps its name");
        }
        common::wait_for_committed_end(&f.settings, &f.group, &f.topic, TIMEOUT).await;
        let metrics = stage.metrics().await;
        assert_eq!(
            counter(&metrics, "applied") + counter(&metrics, "stale"),
            round as f64,
            "{metrics}"
        );
    }
    assert!(common::read_to_end(&f.settings, &f.dlq).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_changes_are_skipped_and_bad_ones_dead_lettered_with_a_reason() {
    let f = fixture(1).await;
    let record = |key: Option<&str>, value: &str| Outgoing {
        topic: f.topic.clone(),
        key: key.map(|k| k.as_bytes().to_vec()),
        value: value.as_bytes().to_vec(),
        headers: Vec::new(),
        timestamp_ms: None,
    };
    let good = [
        record(
            Some("a"),
            r#"{"version": 1, "price_cents": 100, "stock": 1}"#,
        ),
        record(Some("a"), r#"{"version": 3, "price_cents": 300}"#),
        // Reversed: older than what is applied.
        record(
            Some("a"),
            r#"{"version": 2, "price_cents": 200, "stock": 2}"#,
        ),
        // A duplicate of version 3 (a re-send): not newer, skipped.
        record(Some("a"), r#"{"version": 3, "price_cents": 999}"#),
        record(Some("b"), r#"{"version": 5, "stock": 5}"#),
        record(Some("b"), r#"{"version": 4, "stock": 4}"#),
    ];
    // Each bad record with the dead letter's kind and a word its reason must hold.
    let bad = [
        (
            record(Some("c"), "{not json"),
            "malformed_json",
            "key must be a string",
        ),
        (
            record(Some("c"), "[1, 2]"),
            "malformed_json",
            "not an object",
        ),
        (
            record(Some("c"), r#"{"price_cents": 1}"#),
            "missing_version",
            "version",
        ),
        (
            record(Some("c"), r#"{"version": 1, "price_cents": -5}"#),
            "invalid_value",
            "price_cents",
        ),
        (
            record(Some("c"), r#"{"version": 1, "stock": -1}"#),
            "invalid_value",
            "stock",
        ),
        (record(None, r#"{"version": 1}"#), "bad_key", "no key"),
    ];
    let mut all: Vec<Outgoing> = good.to_vec();
    // Interleaved: a bad record never holds the good ones back.
    for (i, (bad, _, _)) in bad.iter().enumerate() {
        all.insert(1 + 2 * i, bad.clone());
    }
    common::produce_outgoing(&f.settings, &all).await;

    let stage = f.materialise();
    let expected: BTreeMap<String, (i64, Value)> = [
        // Fields a change does not name keep their value: a's stock comes from version 1.
        (
            "a".to_string(),
            (3, json!({"version": 3, "price_cents": 300, "stock": 1})),
        ),
        ("b".to_string(), (5, json!({"version": 5, "stock": 5}))),
    ]
    .into();
    f.wait_for_versions(&expected).await;
    common::wait_for_committed_end(&f.settings, &f.group, &f.topic, TIMEOUT).await;
    assert_eq!(f.rows().await, expected, "c never reached the table");

    let dead = common::read_to_end(&f.settings, &f.dlq);
    assert_eq!(dead.len(), bad.len());
    for (message, (sent, kind, word)) in dead.iter().zip(&bad) {
        let headers = common::headers(message);
        assert_eq!(message.payload().unwrap(), sent.value.as_slice());
        assert_eq!(headers["eventpipe.error.kind"], *kind, "{headers:?}");
        assert!(
            headers["eventpipe.error.reason"].contains(word),
            "{kind}: {headers:?}"
        );
        assert_eq!(headers["eventpipe.source.topic"], f.topic);
    }

    let metrics = stage.metrics().await;
    let (applied, stale) = (counter(&metrics, "applied"), counter(&metrics, "stale"));
    assert_eq!(applied + stale, good.len() as f64, "{metrics}");
    assert!(
        stale >= 3.0,
        "the reversed, duplicate and older changes: {metrics}"
    );
    for (kind, count) in [
        ("malformed_json", 2.0),
        ("missing_version", 1.0),
        ("invalid_value", 2.0),
        ("bad_key", 1.0),
    ] {
        let label = format!("kind=\"{kind}\"");
        let seen = common::metric_value(
            &metrics,
            "eventpipe_materialise_dead_lettered_total",
            &[&label],
        );
        assert_eq!(seen, Some(count), "{kind}: {metrics}");
    }
}

/// A GET with the admin credential and `if_none_match`, if any: status, headers, body.
async fn get(
    gateway: &common::gateway::GatewayProcess,
    path: &str,
    token: &str,
    if_none_match: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut request = reqwest::Client::new().get(gateway.url(path));
    if !token.is_empty() {
        request = request.bearer_auth(token);
    }
    if let Some(etag) = if_none_match {
        request = request.header("if-none-match", etag);
    }
    let response = request.send().await.expect("the gateway answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.bytes().await.unwrap().to_vec())
}

fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or_default()
}

async fn photo_counter(gateway: &common::gateway::GatewayProcess, outcome: &str) -> f64 {
    let metrics = gateway.process.metrics().await;
    common::metric_value(
        &metrics,
        "eventpipe_gateway_photo_cache_total",
        &[&format!("outcome=\"{outcome}\"")],
    )
    .unwrap_or(0.0)
}

/// A catalogue of `products` (one change sent) and a gateway reading it with Redis at `redis`.
async fn gateway_on_catalogue(
    f: &Fixture,
    products: u64,
    redis: Option<&str>,
) -> common::gateway::GatewayProcess {
    f.generate(products, 1, 5);
    let prefix = format!("{}:", common::unique("photo"));
    let mut extra = vec!["--photo-cache-prefix", &prefix];
    if let Some(redis) = redis {
        extra.extend(["--redis-url", redis]);
    }
    common::gateway::GatewayProcess::start(std::slice::from_ref(&f.topic), &f.url, &extra).await
}

#[tokio::test(flavor = "multi_thread")]
async fn products_and_photos_are_served_and_the_second_photo_request_hits_the_cache() {
    use common::gateway::ADMIN;
    let f = fixture(1).await;
    let gateway = gateway_on_catalogue(&f, 3, None).await;

    let rows = f.rows().await;
    let (status, headers, body) = get(&gateway, "/v1/products/2", ADMIN, None).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let product: Value = serde_json::from_slice(&body).unwrap();
    let (version, state) = &rows["2"];
    assert_eq!(product["version"], json!(version));
    assert_eq!(product["price_cents"], state["price_cents"]);
    assert_eq!(product["stock"], state["stock"]);
    assert_eq!(product["name"], state["name"]);
    assert_eq!(product["photo"], json!("/v1/products/2/photo"));
    let etag = header(&headers, "etag").to_string();
    assert_eq!(etag, format!("\"v{version}\""));
    assert_eq!(
        get(&gateway, "/v1/products/2", ADMIN, Some(&etag)).await.0,
        304
    );
    assert_eq!(get(&gateway, "/v1/products/99", ADMIN, None).await.0, 404);
    assert_eq!(get(&gateway, "/v1/products/2", "", None).await.0, 401);

    let (stored_etag, stored): (String, Vec<u8>) =
        sqlx::query_as("SELECT etag, bytes FROM product_photos WHERE product_id = '2'")
            .fetch_one(&f.pool)
            .await
            .unwrap();
    for (attempt, source) in [(1, "postgres"), (2, "redis")] {
        let (status, headers, body) = get(&gateway, "/v1/products/2/photo", ADMIN, None).await;
        assert_eq!(status, 200, "attempt {attempt}");
        assert_eq!(body, stored, "attempt {attempt}");
        assert_eq!(header(&headers, "content-type"), "image/svg+xml");
        assert_eq!(header(&headers, "etag"), stored_etag);
        assert!(header(&headers, "cache-control").contains("max-age="));
        assert_eq!(
            header(&headers, "x-photo-source"),
            source,
            "attempt {attempt}"
        );
    }
    assert_eq!(photo_counter(&gateway, "miss").await, 1.0);
    assert_eq!(photo_counter(&gateway, "hit").await, 1.0);
    assert_eq!(photo_counter(&gateway, "error").await, 0.0);
    let (status, _, body) = get(&gateway, "/v1/products/2/photo", ADMIN, Some(&stored_etag)).await;
    assert_eq!((status, body.len()), (304, 0));
    assert_eq!(
        get(&gateway, "/v1/products/99/photo", ADMIN, None).await.0,
        404
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redis_down_photos_come_from_postgres_and_a_counter_says_so() {
    use common::gateway::ADMIN;
    let f = fixture(1).await;
    // Nothing listens on port 1: Redis is down for this gateway.
    let gateway = gateway_on_catalogue(&f, 2, Some("redis://127.0.0.1:1")).await;
    for _ in 0..2 {
        let (status, headers, body) = get(&gateway, "/v1/products/1/photo", ADMIN, None).await;
        assert_eq!(status, 200);
        assert!(body.starts_with(b"<svg"));
        assert_eq!(header(&headers, "x-photo-source"), "postgres");
    }
    assert_eq!(photo_counter(&gateway, "error").await, 2.0);
    assert_eq!(photo_counter(&gateway, "hit").await, 0.0);
}
