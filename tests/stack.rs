//! Proves the local stack is real: Kafka, Elasticsearch, the schema registry and PostgreSQL
//! each do their job end to end, with fresh topics, indices, subjects and databases per test.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use apache_avro::types::Value as AvroValue;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::schema_registry_common::SubjectNameStrategy;
use serde_json::json;

use eventpipe::kafka::client::create_client;
use eventpipe::kafka::{ClientKind, PipelineContext};

#[tokio::test]
async fn kafka_delivers_every_record_once_in_key_order_with_headers() {
    let settings = common::settings();
    let topic = common::unique("stack-roundtrip");
    common::create_topic(&settings, &topic, 3).await;

    let producer: FutureProducer<PipelineContext> = create_client(
        &settings.kafka,
        ClientKind::Producer,
        PipelineContext::default(),
    )
    .unwrap();
    let keys = 10;
    let per_key = 30;
    for seq in 0..per_key {
        for k in 0..keys {
            let body = json!({"key": k, "seq": seq}).to_string();
            let key = format!("user-{k}");
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&body).headers(
                        OwnedHeaders::new().insert(Header {
                            key: "action",
                            value: Some("create_user"),
                        }),
                    ),
                    Duration::from_secs(10),
                )
                .await
                .expect("delivered");
        }
    }

    // Every send was acknowledged above, so the topic's content up to its end is the whole answer.
    let messages = common::read_to_end(&settings, &topic);
    assert_eq!(messages.len(), keys * per_key, "every record arrives");
    let mut seen = HashSet::new();
    let mut last_seq: BTreeMap<String, i64> = BTreeMap::new();
    let mut partitions_used = HashSet::new();
    for message in &messages {
        let body = common::json(message);
        let key = common::key(message);
        assert_eq!(key, format!("user-{}", body["key"]));
        assert!(
            seen.insert((key.clone(), body["seq"].as_i64().unwrap())),
            "no duplicates"
        );
        let seq = body["seq"].as_i64().unwrap();
        if let Some(previous) = last_seq.insert(key.clone(), seq) {
            assert!(seq > previous, "key {key}: seq {seq} after {previous}");
        }
        assert_eq!(common::headers(message)["action"], "create_user");
        partitions_used.insert(message.partition());
    }
    assert!(partitions_used.len() > 1, "keys spread over partitions");
}

#[tokio::test]
async fn elasticsearch_indexes_and_searches_a_document() {
    let settings = common::settings();
    let index = common::unique("stack-index");
    let http = reqwest::Client::new();
    let base = settings.elasticsearch_url.clone();

    let document = json!({
        "@timestamp": "2024-05-01T12:00:00Z", "executer": "lk", "action": "create_user",
        "message": "User created for Alice", "level": "info"
    });
    let response = http
        .put(
            base.join(&format!("{index}/_doc/1?refresh=wait_for"))
                .unwrap(),
        )
        .json(&document)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "index: {}",
        response.text().await.unwrap()
    );

    let found: serde_json::Value = http
        .post(base.join(&format!("{index}/_search")).unwrap())
        .json(&json!({"query": {"match": {"message": "alice"}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found["hits"]["total"]["value"], 1, "{found}");
    assert_eq!(found["hits"]["hits"][0]["_source"]["executer"], "lk");

    let missing: serde_json::Value = http
        .post(base.join(&format!("{index}/_search")).unwrap())
        .json(&json!({"query": {"match": {"message": "bob"}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(missing["hits"]["total"]["value"], 0);

    let deleted = http
        .delete(base.join(&index).unwrap())
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
}

#[tokio::test]
async fn registry_registers_and_serves_an_avro_schema_in_wire_format() {
    let settings = common::settings();
    let topic = common::unique("stack-avro");
    let schema = json!({
        "type": "record", "name": "AggregatorEvent", "namespace": "eventpipe",
        "fields": [
            {"name": "name", "type": "string"},
            {"name": "value", "type": "double"}
        ]
    })
    .to_string();
    let registry = settings
        .schema_registry_url
        .as_str()
        .trim_end_matches('/')
        .to_string();
    let http = reqwest::Client::new();
    let registered: serde_json::Value = http
        .post(format!("{registry}/subjects/{topic}-value/versions"))
        .header("Content-Type", "application/vnd.schemaregistry.v1+json")
        .json(&json!({ "schema": schema }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = registered["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("no id in {registered}"));

    let fetched: serde_json::Value = http
        .get(format!("{registry}/schemas/ids/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let fetched_schema: serde_json::Value =
        serde_json::from_str(fetched["schema"].as_str().unwrap()).unwrap();
    assert_eq!(fetched_schema["name"], "AggregatorEvent");

    // Confluent wire format through the registry: magic byte, schema id, Avro body.
    let encoder = AvroEncoder::new(SrSettings::new(registry.clone()));
    let bytes = encoder
        .encode(
            vec![
                ("name", AvroValue::String("cpu_load".into())),
                ("value", AvroValue::Double(0.42)),
            ],
            SubjectNameStrategy::TopicNameStrategy(topic.clone(), false),
        )
        .await
        .expect("encode");
    assert_eq!(bytes[0], 0, "magic byte");
    assert_eq!(
        i32::from_be_bytes(bytes[1..5].try_into().unwrap()) as i64,
        id
    );

    let decoder = AvroDecoder::new(SrSettings::new(registry));
    let decoded = decoder.decode(Some(&bytes)).await.expect("decode");
    assert_eq!(
        decoded.value,
        AvroValue::Record(vec![
            ("name".into(), AvroValue::String("cpu_load".into())),
            ("value".into(), AvroValue::Double(0.42)),
        ])
    );
}

#[tokio::test]
async fn postgres_fresh_database_answers_queries() {
    let settings = common::settings();
    let (pool, name) = common::fresh_database(&settings).await;
    let current: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(current, name);

    sqlx::query("CREATE TABLE samples (name text NOT NULL, value double precision NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let values = [0.5, 1.25, 2.0, 4.75];
    for value in values {
        sqlx::query("INSERT INTO samples (name, value) VALUES ('cpu', $1)")
            .bind(value)
            .execute(&pool)
            .await
            .unwrap();
    }
    let (count, sum): (i64, f64) =
        sqlx::query_as("SELECT count(*), sum(value) FROM samples WHERE name = 'cpu'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(count, values.len() as i64);
    assert_eq!(sum, values.iter().sum::<f64>());
}
