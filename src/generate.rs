//! Synthetic traffic: the services' envelopes (create_user, update_user, start_task) and the
//! aggregator's events `{name, function, value, timestamp}`, deterministic for a seed, paced.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::BaseRecord;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::codec::{Codec, CodecError, SchemaName};
use crate::config::KafkaSettings;
use crate::kafka::client::{require_topics, wait_for_broker};
use crate::kafka::delivery::{owned_headers, BoundedSender, CountedProducer};
use crate::kafka::KafkaError;

/// The aggregation functions every aggregator understands.
pub const FUNCTIONS: [&str; 5] = ["count", "sum", "avg", "min", "max"];

/// The services' actions and the topic each is published to.
pub const ACTIONS: [(&str, &str); 3] = [
    ("create_user", "create_user_in"),
    ("update_user", "update_user_in"),
    ("start_task", "task_in"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrafficKind {
    /// Service envelopes to create_user_in, update_user_in and task_in.
    Envelopes,
    /// Aggregator events to events_in.
    Events,
}

/// One generated record.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedRecord {
    pub topic: String,
    pub key: String,
    pub headers: Vec<(&'static str, String)>,
    pub value: Vec<u8>,
}

/// Deterministic generator: the same seed gives the same sequence (timestamps aside).
pub struct Generator {
    kind: TrafficKind,
    rng: StdRng,
    sequence: u64,
    users: u64,
    series: u64,
    topic_override: Option<String>,
}

impl Generator {
    pub fn new(
        kind: TrafficKind,
        seed: u64,
        users: u64,
        series: u64,
        topic: Option<String>,
    ) -> Self {
        Generator {
            kind,
            rng: StdRng::seed_from_u64(seed),
            sequence: 0,
            users: users.max(1),
            series: series.max(1),
            topic_override: topic,
        }
    }

    /// The next record, stamped with `now` as its event time.
    pub fn next_record(&mut self, now: DateTime<Utc>) -> GeneratedRecord {
        self.sequence += 1;
        match self.kind {
            TrafficKind::Envelopes => self.envelope(now),
            TrafficKind::Events => self.event(now),
        }
    }

    fn envelope(&mut self, now: DateTime<Utc>) -> GeneratedRecord {
        let (action, topic) = ACTIONS[self.rng.random_range(0..ACTIONS.len())];
        let user_id = self.rng.random_range(1..=self.users);
        // Zone-less microsecond ISO time: what `datetime.utcnow().isoformat()` writes.
        let timestamp = now.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string();
        // Fields like the services' (contact details, client, task parameters): ~300 bytes a
        // record, the size the benchmarks are specified for.
        let data = match action {
            "start_task" => json!({
                "user_id": user_id, "seq": self.sequence,
                "task_id": format!("task-{}", self.sequence), "kind": "report",
                "params": {"period": "2024-05", "format": "pdf", "notify": true, "locale": "ru_RU"},
                "priority": "normal", "requested_via": "web",
            }),
            _ => json!({
                "user_id": user_id, "seq": self.sequence,
                "email": format!("user{user_id}@example.com"),
                "name": format!("User {user_id}"),
                "phone": format!("+7 900 {:07}", user_id % 10_000_000),
                "locale": "ru_RU", "client": "web/2.14.1 (Linux x86_64)",
            }),
        };
        let body = json!({
            "service": "lk",
            "action": action,
            "payload": {"message": format!("It is {action}"), "timestamp": timestamp, "data": data},
        });
        GeneratedRecord {
            topic: self
                .topic_override
                .clone()
                .unwrap_or_else(|| topic.to_string()),
            key: user_id.to_string(),
            headers: vec![
                ("service", "lk".to_string()),
                ("action", action.to_string()),
            ],
            value: serde_json::to_vec(&body).expect("a json! value always serializes"),
        }
    }

    fn event(&mut self, now: DateTime<Utc>) -> GeneratedRecord {
        let series = self.rng.random_range(0..self.series);
        let name = format!("metric_{series:05}");
        let function = FUNCTIONS[(series % FUNCTIONS.len() as u64) as usize];
        // Two decimals keep sums exactly checkable in tests that recompute them.
        let value = (self.rng.random_range(0..100_000) as f64) / 100.0;
        let body = json!({
            "name": name,
            "function": function,
            "value": value,
            "timestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        });
        GeneratedRecord {
            topic: self
                .topic_override
                .clone()
                .unwrap_or_else(|| "events_in".into()),
            key: name,
            headers: vec![("service", "generator".into()), ("action", "event".into())],
            value: serde_json::to_vec(&body).expect("a json! value always serializes"),
        }
    }

    /// Topics this generator writes to, to check they exist before sending.
    pub fn topics(&self) -> Vec<String> {
        match (&self.topic_override, self.kind) {
            (Some(topic), _) => vec![topic.clone()],
            (None, TrafficKind::Envelopes) => ACTIONS.iter().map(|(_, t)| t.to_string()).collect(),
            (None, TrafficKind::Events) => vec!["events_in".into()],
        }
    }
}

/// Spreads `rate` records per second over ticks (10 ms by default), carrying fractions so the
/// mean is exact.
pub struct Pacer {
    per_tick: f64,
    carry: f64,
    tick: Duration,
}

pub const PACER_TICK: Duration = Duration::from_millis(10);

impl Pacer {
    pub fn new(rate_per_second: u64) -> Self {
        Pacer::with_tick(rate_per_second, PACER_TICK)
    }

    /// Bursts every `tick` (a timer's interval) instead of every 10 ms.
    pub fn with_tick(rate_per_second: u64, tick: Duration) -> Self {
        Pacer {
            per_tick: rate_per_second as f64 * tick.as_secs_f64(),
            carry: 0.0,
            tick,
        }
    }

    /// How many records to send in the next tick.
    pub fn next_batch(&mut self) -> u64 {
        self.carry += self.per_tick;
        let whole = self.carry.floor();
        self.carry -= whole;
        whole as u64
    }
}

/// What the paced publisher sends: the envelope and event generator, the catalogue's changes.
pub trait RecordSource {
    /// The next record, stamped with `now` as its event time.
    fn next_record(&mut self, now: DateTime<Utc>) -> GeneratedRecord;
    /// Topics it writes to, to check they exist before sending.
    fn topics(&self) -> Vec<String>;
}

impl RecordSource for Generator {
    fn next_record(&mut self, now: DateTime<Utc>) -> GeneratedRecord {
        Generator::next_record(self, now)
    }

    fn topics(&self) -> Vec<String> {
        Generator::topics(self)
    }
}

pub struct GenerateOptions {
    pub kind: TrafficKind,
    pub count: u64,
    /// Records per second; 0 sends as fast as the broker acknowledges.
    pub rate: u64,
    pub seed: u64,
    pub users: u64,
    pub series: u64,
    pub topic: Option<String>,
}

/// Produces `count` JSON records (paced) and returns how many Kafka acknowledged; stops on
/// `shutdown`.
pub async fn run(
    settings: &KafkaSettings,
    options: GenerateOptions,
    shutdown: CancellationToken,
) -> Result<u64, GenerateError> {
    let schema = options.kind.schema();
    run_encoded(settings, options, &Codec::json(schema), shutdown).await
}

impl TrafficKind {
    /// The schema of what this kind generates.
    pub fn schema(self) -> SchemaName {
        match self {
            TrafficKind::Envelopes => SchemaName::Envelope,
            TrafficKind::Events => SchemaName::AggregateEvent,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("encoding a generated record: {0}")]
    Codec(#[from] CodecError),
}

/// `run`, with each record in its topic's format (`codec`: JSON or Avro).
pub async fn run_encoded(
    settings: &KafkaSettings,
    options: GenerateOptions,
    codec: &Codec,
    shutdown: CancellationToken,
) -> Result<u64, GenerateError> {
    let mut generator = Generator::new(
        options.kind,
        options.seed,
        options.users,
        options.series,
        options.topic,
    );
    let pacer = (options.rate > 0).then(|| Pacer::new(options.rate));
    publish(
        settings,
        &mut generator,
        Some(options.count),
        pacer,
        Some(codec),
        shutdown,
    )
    .await
}

/// Sends `source`'s records (`limit` of them, or until `shutdown` when `None`), `pacer`'s
/// batch each of its ticks (as fast as Kafka acknowledges without one), each encoded by
/// `codec` (as generated without one); returns how many Kafka acknowledged.
pub async fn publish(
    settings: &KafkaSettings,
    source: &mut impl RecordSource,
    limit: Option<u64>,
    mut pacer: Option<Pacer>,
    codec: Option<&Codec>,
    shutdown: CancellationToken,
) -> Result<u64, GenerateError> {
    let context = crate::kafka::PipelineContext::default();
    let producer = CountedProducer::create(settings, context.clone())?;
    let metadata = wait_for_broker(producer.client(), &context, settings)?;
    let topics = source.topics();
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    require_topics(&metadata, &topic_refs, settings)?;

    let mut sender = BoundedSender::new(&producer, 50_000);
    let mut ticker = tokio::time::interval(pacer.as_ref().map_or(PACER_TICK, |p| p.tick));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    let mut last_report = std::time::Instant::now();
    while limit.is_none_or(|limit| sent < limit) && !shutdown.is_cancelled() {
        let batch = match pacer.as_mut() {
            Some(pacer) => {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = shutdown.cancelled() => break,
                }
                pacer.next_batch()
            }
            None => 1_000,
        }
        .min(limit.map_or(u64::MAX, |limit| limit - sent));
        for _ in 0..batch {
            let record = source.next_record(Utc::now());
            let value = match codec {
                Some(codec) => codec.encode(&record.topic, record.value).await?,
                None => record.value,
            };
            sender
                .send(
                    BaseRecord::to(&record.topic)
                        .key(record.key.as_bytes())
                        .payload(value.as_slice())
                        .headers(owned_headers(&record.headers)),
                )
                .await?;
        }
        sent += batch;
        if last_report.elapsed() >= Duration::from_secs(5) {
            tracing::info!(sent, acknowledged = sender.delivered(), "generating");
            last_report = std::time::Instant::now();
        }
    }
    Ok(sender.finish().await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Envelope, DEFAULT_MAX_ENVELOPE_BYTES};

    #[test]
    fn envelopes_are_valid_and_routed_by_action() {
        let mut generator = Generator::new(TrafficKind::Envelopes, 7, 100, 1, None);
        for _ in 0..300 {
            let record = generator.next_record(Utc::now());
            let envelope = Envelope::decode(&record.value, DEFAULT_MAX_ENVELOPE_BYTES).unwrap();
            let topic = ACTIONS
                .iter()
                .find(|(a, _)| *a == envelope.action)
                .unwrap()
                .1;
            assert_eq!(record.topic, topic);
            assert_eq!(record.key, envelope.payload.data["user_id"].to_string());
            assert!(crate::envelope::parse_timestamp(&envelope.payload.timestamp).is_some());
            assert!(
                record.value.len() > 150 && record.value.len() < 400,
                "{}",
                record.value.len()
            );
        }
    }

    #[test]
    fn same_seed_same_sequence() {
        let now = Utc::now();
        let mut a = Generator::new(TrafficKind::Events, 1, 1, 50, None);
        let mut b = Generator::new(TrafficKind::Events, 1, 1, 50, None);
        for _ in 0..100 {
            assert_eq!(a.next_record(now), b.next_record(now));
        }
    }

    #[test]
    fn events_have_name_function_value_timestamp() {
        let mut generator = Generator::new(TrafficKind::Events, 3, 1, 10, None);
        let record = generator.next_record(Utc::now());
        let event: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
        assert_eq!(event["name"].as_str().unwrap(), record.key);
        assert!(FUNCTIONS.contains(&event["function"].as_str().unwrap()));
        assert!(event["value"].is_f64());
        assert_eq!(record.topic, "events_in");
    }

    #[test]
    fn pacer_hits_the_rate_exactly_over_a_second() {
        for rate in [1u64, 7, 333, 5_000, 20_000] {
            let mut pacer = Pacer::new(rate);
            let total: u64 = (0..100).map(|_| pacer.next_batch()).sum();
            assert!(total.abs_diff(rate) <= 1, "rate {rate} gave {total}");
        }
    }
}
