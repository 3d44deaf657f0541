//! `eventpipe replay`: re-publishes a history [`Selection`] to one topic or to each event's
//! original topic, with its original key and headers plus the `eventpipe.replay.*` headers.
//!
//! One replay id per run marks everything it sends: the store skips such records (history is not
//! stored twice) and the dispatcher carries the headers through, so later stages can tell history
//! from live traffic. Every record is confirmed by Kafka (idempotent producer, delivery reports
//! awaited) before the summary counts it; `--rate` paces the sends.

use std::collections::HashSet;
use std::fmt;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use chrono::Utc;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rdkafka::producer::BaseRecord;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::history::{self, History, HistoryError, Selection, SelectionArgs, StoredEvent};
use super::row::{
    parse_stored_headers, HEADER_REPLAY_ID, HEADER_REPLAY_OFFSET, HEADER_REPLAY_PARTITION,
    HEADER_REPLAY_SEQ, HEADER_REPLAY_TOPIC, REPLAY_HEADER_PREFIX,
};
use crate::config::{KafkaSettings, Settings};
use crate::generate::{Pacer, PACER_TICK};
use crate::kafka::client::{require_topics, wait_for_broker};
use crate::kafka::delivery::{owned_headers, BoundedSender, CountedProducer};
use crate::kafka::{KafkaError, PipelineContext};

/// Records awaiting their delivery report at most.
const MAX_IN_FLIGHT: usize = 10_000;
/// Chunks read ahead of the one being produced.
const PREFETCH_CHUNKS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("stored event {seq}: {reason}")]
    Unreadable { seq: i64, reason: String },
    #[error("{sent} records sent but {delivered} confirmed by Kafka")]
    Unconfirmed { sent: u64, delivered: u64 },
}

/// Where and how fast.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Everything to this topic; `None`: each event to its original topic.
    pub to_topic: Option<String>,
    /// Events per second; 0 = as fast as Kafka confirms.
    pub rate: u64,
    pub chunk_size: u64,
}

/// What a replay did.
#[derive(Debug, Clone)]
pub struct ReplaySummary {
    pub replay_id: String,
    /// Events Kafka confirmed.
    pub replayed: u64,
    pub to_topic: Option<String>,
    pub elapsed: Duration,
    /// Stopped by a signal before the selection was read to its end.
    pub interrupted: bool,
}

impl fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seconds = self.elapsed.as_secs_f64();
        write!(
            f,
            "{}replayed {} events to {} in {seconds:.2}s ({:.0}/s), replay id {}",
            if self.interrupted {
                "interrupted: "
            } else {
                ""
            },
            self.replayed,
            self.to_topic.as_deref().unwrap_or("their original topics"),
            self.replayed as f64 / seconds.max(1e-9),
            self.replay_id
        )
    }
}

/// A fresh id for one replay run: 16 random hex digits.
pub fn new_replay_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The headers a replayed record carries: the event's own, in order (minus replay headers of an
/// earlier run), then this run's id and the event's coordinates in the store and in Kafka.
pub fn replay_headers(
    event: &StoredEvent,
    replay_id: &str,
) -> Result<Vec<(String, Vec<u8>)>, ReplayError> {
    let mut headers = match &event.headers {
        Some(stored) => serde_json::from_str(stored.get())
            .map_err(|error| error.to_string())
            .and_then(|json| parse_stored_headers(&json))
            .map_err(|reason| ReplayError::Unreadable {
                seq: event.seq,
                reason,
            })?,
        None => Vec::new(),
    };
    headers.retain(|(name, _)| !name.starts_with(REPLAY_HEADER_PREFIX));
    for (name, value) in [
        (HEADER_REPLAY_ID, replay_id.to_string()),
        (HEADER_REPLAY_TOPIC, event.topic.clone()),
        (HEADER_REPLAY_PARTITION, event.partition.to_string()),
        (HEADER_REPLAY_OFFSET, event.offset.to_string()),
        (HEADER_REPLAY_SEQ, event.seq.to_string()),
    ] {
        headers.push((name.to_string(), value.into_bytes()));
    }
    Ok(headers)
}

/// Re-publishes `selection` as `replay_id`; `progress` is told each chunk's count once sent.
pub async fn run(
    kafka: &KafkaSettings,
    pool: PgPool,
    selection: &Selection,
    options: &ReplayOptions,
    replay_id: &str,
    mut progress: impl FnMut(u64),
    shutdown: &CancellationToken,
) -> Result<ReplaySummary, ReplayError> {
    let started = Instant::now();
    let context = PipelineContext::default();
    let producer = CountedProducer::create(kafka, context.clone())?;
    let metadata = wait_for_broker(producer.client(), &context, kafka)?;
    let mut known_topics: HashSet<String> = HashSet::new();
    if let Some(topic) = &options.to_topic {
        require_topics(&metadata, &[topic], kafka)?;
    }
    let mut history = History::open(pool, selection, options.chunk_size).await?;
    // The next chunks are read while this one is produced: the store and Kafka work at once.
    let (chunks, mut next_chunks) = tokio::sync::mpsc::channel(PREFETCH_CHUNKS);
    let reader = tokio::spawn(async move {
        while let Some(chunk) = history.next_chunk().await.transpose() {
            let failed = chunk.is_err();
            if chunks.send(chunk).await.is_err() || failed {
                break;
            }
        }
    });
    let mut sender = BoundedSender::new(&producer, MAX_IN_FLIGHT);
    let mut pacer = (options.rate > 0).then(|| Pacer::new(options.rate));
    let mut ticker = tokio::time::interval(PACER_TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut allowance = 0u64;
    let mut sent = 0u64;
    let mut interrupted = false;
    'chunks: while let Some(chunk) = next_chunks.recv().await {
        let events = chunk?;
        for event in &events {
            if shutdown.is_cancelled() {
                interrupted = true;
                break 'chunks;
            }
            if let Some(pacer) = pacer.as_mut() {
                while allowance == 0 {
                    ticker.tick().await;
                    allowance = pacer.next_batch();
                }
                allowance -= 1;
            }
            let topic = options.to_topic.as_deref().unwrap_or(&event.topic);
            if options.to_topic.is_none() && !known_topics.contains(topic) {
                require_topics(&metadata, &[topic], kafka)?;
                known_topics.insert(topic.to_string());
            }
            let headers = owned_headers(&replay_headers(event, replay_id)?);
            let mut record = BaseRecord::<[u8], [u8]>::to(topic)
                .payload(event.value_bytes())
                .headers(headers);
            if let Some(key) = &event.key {
                record = record.key(key.as_slice());
            }
            sender.send(record).await?;
            sent += 1;
        }
        progress(events.len() as u64);
    }
    reader.abort();
    let delivered = sender.finish().await?;
    if delivered != sent {
        return Err(ReplayError::Unconfirmed { sent, delivered });
    }
    Ok(ReplaySummary {
        replay_id: replay_id.to_string(),
        replayed: delivered,
        to_topic: options.to_topic.clone(),
        elapsed: started.elapsed(),
        interrupted,
    })
}

/// A progress bar on stderr when it is a terminal; hidden otherwise (logs and pipes stay clean).
fn progress_bar(total: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(total) => (
            ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()),
            "{bar:40} {pos}/{len} events replayed ({per_sec}, {elapsed})",
        ),
        None => (
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            "{spinner} {pos} events replayed ({per_sec}, {elapsed})",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// `eventpipe replay`: prints the replay id first and the summary line last.
pub async fn run_command(
    settings: &Settings,
    args: &SelectionArgs,
    to_topic: Option<String>,
    rate: u64,
) -> anyhow::Result<()> {
    let selection = args.selection(Utc::now())?;
    let pool = history::connect(settings.postgres_url.as_str()).await?;
    let replay_id = new_replay_id();
    println!(
        "replay id {replay_id}: replaying {} to {}",
        selection.filters,
        to_topic.as_deref().unwrap_or("their original topics")
    );
    let shutdown = crate::shutdown::install_signal_handlers();
    let total = match (selection.last, selection.limit) {
        (Some(last), Some(limit)) => Some(last.min(limit)),
        (last, limit) => last.or(limit),
    };
    let bar = progress_bar(total);
    let options = ReplayOptions {
        to_topic,
        rate,
        chunk_size: args.chunk_size,
    };
    let summary = run(
        &settings.kafka,
        pool,
        &selection,
        &options,
        &replay_id,
        |count| bar.inc(count),
        &shutdown,
    )
    .await;
    bar.finish_and_clear();
    let summary = summary?;
    println!("{summary}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn event(headers: Option<&str>) -> StoredEvent {
        StoredEvent {
            seq: 12,
            topic: "users_in".into(),
            partition: 2,
            offset: 40,
            key: Some(b"42".to_vec()),
            kafka_time: Utc::now(),
            event_time: None,
            service: "lk".into(),
            action: "create_user".into(),
            headers: headers.map(|h| RawValue::from_string(h.into()).unwrap()),
            value: Some(RawValue::from_string("{}".into()).unwrap()),
            raw: None,
            format: "json".into(),
            schema_id: None,
            reason: None,
        }
    }

    #[test]
    fn replayed_records_keep_their_headers_and_say_where_they_came_from() {
        let stored =
            r#"[["service", "lk"], ["bin", {"hex": "ff00"}], ["eventpipe.replay.id", "old"]]"#;
        let headers = replay_headers(&event(Some(stored)), "abc").unwrap();
        let expected: Vec<(String, Vec<u8>)> = [
            ("service", &b"lk"[..]),
            ("bin", b"\xff\x00"),
            ("eventpipe.replay.id", b"abc"),
            ("eventpipe.replay.topic", b"users_in"),
            ("eventpipe.replay.partition", b"2"),
            ("eventpipe.replay.offset", b"40"),
            ("eventpipe.replay.seq", b"12"),
        ]
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_vec()))
        .collect();
        assert_eq!(headers, expected);
        assert_eq!(replay_headers(&event(None), "abc").unwrap().len(), 5);
        let unreadable = replay_headers(&event(Some(r#"{"a": 1}"#)), "abc").unwrap_err();
        assert!(
            unreadable.to_string().starts_with("stored event 12: "),
            "{unreadable}"
        );
    }

    #[test]
    fn the_summary_is_one_line_with_the_rate_and_the_id() {
        let summary = ReplaySummary {
            replay_id: "0123456789abcdef".into(),
            replayed: 500,
            to_topic: None,
            elapsed: Duration::from_millis(250),
            interrupted: false,
        };
        assert_eq!(
            summary.to_string(),
            "replayed 500 events to their original topics in 0.25s (2000/s), replay id 0123456789abcdef"
        );
        assert_eq!(new_replay_id().len(), 16);
        assert_ne!(new_replay_id(), new_replay_id());
    }
}
