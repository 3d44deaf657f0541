//! The gateway through a Kafka broker restart: ingress answers 503 with Retry-After while the
//! broker is down, loses nothing it acknowledged, and an open stream carries on afterwards with
//! every event Kafka holds, once. Stops the shared Kafka.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::gateway::{collect_events, envelope, Client, GatewayProcess, ADMIN};
use rdkafka::Message;

/// Stopping the Kafka every other test uses would fail them: run this one alone with
/// `cargo test --test gateway_outage -- --ignored`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "stops the shared Kafka; run alone with --ignored"]
async fn a_broker_restart_is_503_meanwhile_and_loses_nothing_acknowledged() {
    let settings = common::settings();
    let topic = common::unique("gw-outage");
    common::create_topic(&settings, &topic, 3).await;
    let (_, database) = common::fresh_database_url(&settings).await;
    let topics = vec![topic.clone()];
    let gateway =
        GatewayProcess::start(&topics, &database, &["--produce-timeout-ms", "3000"]).await;
    let mut client = Client::Sse(gateway.sse("filter=*:*", None, ADMIN).await);
    client.started().await;
    let mut acknowledged: HashSet<(i64, i64)> = HashSet::new();
    let mut n = 0;
    let post = async |n: &mut u64| {
        *n += 1;
        let response = reqwest::Client::new()
            .post(gateway.url(&format!("/v1/topics/{topic}/events")))
            .bearer_auth(ADMIN)
            .body(envelope("lk", "create_user", *n % 7, *n))
            .send()
            .await
            .expect("the gateway answers");
        let status = response.status().as_u16();
        let retry_after = response.headers().get("retry-after").cloned();
        let answer: serde_json::Value = response.json().await.unwrap_or_default();
        (status, retry_after, answer)
    };
    for _ in 0..30 {
        let (status, _, answer) = post(&mut n).await;
        assert_eq!(status, 200, "{answer}");
        acknowledged.insert((
            answer["partition"].as_i64().unwrap(),
            answer["offset"].as_i64().unwrap(),
        ));
    }
    let outage = common::Outage::begin("kafka");
    // While it is down: 503 with Retry-After (never a 2xx for what Kafka did not take).
    let mut unavailable = 0;
    while unavailable < 3 {
        let (status, retry_after, answer) = post(&mut n).await;
        match status {
            503 => {
                assert!(retry_after.is_some(), "503 says when to retry");
                assert_eq!(answer["error"], "kafka_unavailable", "{answer}");
                unavailable += 1;
            }
            200 => panic!("acknowledged while the broker is down: {answer}"),
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    outage.end_after(Duration::from_secs(10)).await;
    // Back: accepted again (retrying as a client told Retry-After would).
    let mut accepted_again = 0;
    common::wait_until(
        Duration::from_secs(120),
        "ingress to accept again",
        async || {
            let (status, _, answer) = post(&mut n).await;
            if status == 200 {
                acknowledged.insert((
                    answer["partition"].as_i64().unwrap(),
                    answer["offset"].as_i64().unwrap(),
                ));
                accepted_again += 1;
            }
            if accepted_again >= 20 {
                Ok(())
            } else {
                Err(format!("{status}: {answer}"))
            }
        },
    )
    .await;
    let in_kafka: HashSet<(i64, i64)> = common::read_to_end(&settings, &topic)
        .iter()
        .map(|m| (m.partition() as i64, m.offset()))
        .collect();
    assert!(
        acknowledged.is_subset(&in_kafka),
        "every acknowledged event is in Kafka"
    );
    // The open stream carried on: every event Kafka holds, once (those whose request timed out
    // and were written after all included: they are in Kafka, so they are delivered).
    let frames = collect_events(&mut client, in_kafka.len()).await;
    let delivered: HashSet<(i64, i64)> = frames
        .iter()
        .map(|f| {
            (
                f.data["partition"].as_i64().unwrap(),
                f.data["offset"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(delivered, in_kafka);
    println!(
        "acknowledged {}, in Kafka {}, 503 answers {unavailable}, delivered {}",
        acknowledged.len(),
        in_kafka.len(),
        frames.len()
    );
}
