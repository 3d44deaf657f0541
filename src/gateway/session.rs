//! One subscriber's stream, whatever carries it (SSE or WebSocket): resolve where it starts,
//! catch up (from the event store past what Kafka holds, then from Kafka), hand over to the live
//! hub with no gap and no duplicate at the boundary, then follow live until it ends.
//!
//! The handover: a connection first catches up without a live feed (a long backlog must not
//! overflow one); once close to the reader it registers, which snapshots the reader's position
//! `L` atomically with joining, reads the small rest `[cursor, L)` from Kafka, and from then on
//! takes the live events, all of which are at or after `L`. An overflow during that last stretch
//! only means the live traffic outran the catch-up: it goes round again.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, Semaphore};

use crate::filter::FilterSet;
use crate::gateway::cursor::{Cursor, Start};
use crate::gateway::event::Event;
use crate::gateway::fanout::{Hub, LiveFeed};
use crate::gateway::kafka::{CatchUp, KafkaSide, Range};
use crate::store::history;

/// Stored events read per query when catching up from the store.
const STORE_CHUNK: i64 = 1000;

/// What every session needs from the gateway.
pub struct SessionContext {
    pub side: Arc<KafkaSide>,
    pub hub: Arc<Hub>,
    /// The event store, for positions older than Kafka retains.
    pub store: Option<PgPool>,
    pub catch_ups: Arc<Semaphore>,
    /// A client that accepts nothing for this long is disconnected.
    pub write_timeout: Duration,
    /// A backlog longer than this is caught up before the live feed is joined.
    pub live_margin: u64,
}

/// What a client asked for.
#[derive(Debug, Clone)]
pub struct SessionRequest {
    pub filters: FilterSet,
    /// Empty: every served topic.
    pub topics: Vec<String>,
    pub start: Start,
}

/// What the transport writes, in order.
#[derive(Debug)]
pub enum Outgoing {
    /// An event, with the cursor that resumes right after it.
    Event { event: Arc<Event>, id: String },
    /// Where the stream stands without an event to carry it (the start; after a catch-up that
    /// read only events the filters leave out).
    Position { id: String },
    /// Something the client should know that is not an event (`gap`, `cursor_ahead`).
    Notice { kind: &'static str, message: String },
    /// The last frame: why the stream ends (`slow`, `revoked`, `shutdown`, ...).
    End { code: &'static str, reason: String },
}

/// Why a session ended on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Its queue filled while live: the client reads more slowly than events arrive.
    Slow,
    /// The client accepted nothing for the write timeout.
    Stalled,
    /// The transport is gone (the client disconnected).
    ClientGone,
    /// Kafka or the store could not be read.
    Failed,
}

impl Ended {
    pub fn code(self) -> &'static str {
        match self {
            Ended::Slow => "slow",
            Ended::Stalled => "stalled",
            Ended::ClientGone => "gone",
            Ended::Failed => "unavailable",
        }
    }

    /// For the client's last frame.
    pub fn reason(self) -> &'static str {
        match self {
            Ended::Slow => "slow consumer: events arrived faster than this connection read them; reconnect with your last event id to resume",
            Ended::Stalled => "the connection accepted nothing for too long; reconnect with your last event id to resume",
            Ended::ClientGone => "client disconnected",
            Ended::Failed => "the gateway could not read the events; reconnect with your last event id to resume",
        }
    }
}

/// Where `request` starts, as a cursor over its partitions, and notices for the client.
pub async fn resolve_start(
    context: &SessionContext,
    request: &SessionRequest,
) -> Result<(Cursor, Vec<Outgoing>), Ended> {
    let side = &context.side;
    let topics = &request.topics;
    let mut notices = Vec::new();
    let failed = |error: crate::kafka::KafkaError| {
        tracing::warn!(%error, "resolving a start position");
        Ended::Failed
    };
    let cursor = match &request.start {
        Start::Now => context.hub.positions(topics),
        Start::Earliest => side.earliest(topics).await.map_err(failed)?,
        Start::Time(time) => {
            let mut cursor = side.offsets_for_time(topics, *time).await.map_err(failed)?;
            if let Some(store) = &context.store {
                // Kafka may no longer hold the oldest of them: the store may.
                let starts: Vec<(String, i32, i64)> = cursor
                    .iter()
                    .map(|(t, p, o)| (t.to_string(), p, o))
                    .collect();
                for (topic, partition, offset) in starts {
                    let (low, _) = side.watermarks(&topic, partition).await.map_err(failed)?;
                    if offset == low && low > 0 {
                        if let Ok(Some(stored)) =
                            history::first_offset_since(store, &topic, partition, *time, low).await
                        {
                            cursor.set(&topic, partition, stored);
                        }
                    }
                }
            }
            cursor
        }
        Start::After(given) => {
            let live = context.hub.positions(topics);
            let mut cursor = Cursor::default();
            let mut unknown = Vec::new();
            for (topic, partition, end) in live.iter() {
                match given.get(topic, partition) {
                    Some(next) if next > end => {
                        notices.push(Outgoing::Notice {
                            kind: "cursor_ahead",
                            message: format!(
                                "your cursor is past the end of {topic}/{partition} ({next} > {end}): resuming from the end"
                            ),
                        });
                        cursor.set(topic, partition, end);
                    }
                    Some(next) => cursor.set(topic, partition, next),
                    None => unknown.push(topic.to_string()),
                }
            }
            // A partition the cursor does not name (a topic added to the request, a partition
            // added to a topic): the client has seen nothing of it.
            if !unknown.is_empty() {
                unknown.dedup();
                let earliest = side.earliest(&unknown).await.map_err(failed)?;
                for (topic, partition, low) in earliest.iter() {
                    if cursor.get(topic, partition).is_none() {
                        cursor.set(topic, partition, low);
                    }
                }
            }
            cursor
        }
    };
    Ok((cursor, notices))
}

/// Runs the session to its end, writing to `out`. The caller stops it (by dropping it) for its
/// own reasons: shutdown, a revoked credential.
pub async fn run(
    context: &SessionContext,
    request: SessionRequest,
    out: mpsc::Sender<Outgoing>,
) -> Ended {
    let writer = Writer {
        out,
        timeout: context.write_timeout,
    };
    match drive(context, &request, &writer).await {
        Ok(never) => match never {},
        Err(ended) => ended,
    }
}

enum Never {}

async fn drive(
    context: &SessionContext,
    request: &SessionRequest,
    writer: &Writer,
) -> Result<Never, Ended> {
    let topics = &request.topics;
    // `now` joins the live feed first, so nothing between resolving and joining is missed.
    let mut early_feed = match request.start {
        Start::Now => Some(context.hub.register(request.filters.clone(), topics)),
        _ => None,
    };
    let (mut cursor, notices) = match &early_feed {
        Some(feed) => (feed.start.clone(), Vec::new()),
        None => resolve_start(context, request).await?,
    };
    writer
        .send(Outgoing::Position {
            id: cursor.encode(),
        })
        .await?;
    for notice in notices {
        writer.send(notice).await?;
    }
    loop {
        let feed = match early_feed.take() {
            Some(feed) => feed,
            None => {
                let target = context.hub.positions(topics);
                if backlog(&cursor, &target) > context.live_margin {
                    catch_up(context, request, &mut cursor, &target, writer).await?;
                    continue;
                }
                let feed = context.hub.register(request.filters.clone(), topics);
                let start = feed.start.clone();
                catch_up(context, request, &mut cursor, &start, writer).await?;
                if feed.was_slow() {
                    metrics::counter!("eventpipe_gateway_catch_up_restarts_total").increment(1);
                    continue;
                }
                feed
            }
        };
        return Err(live(feed, &mut cursor, writer).await);
    }
}

/// Where a cursor stands in a partition it does not name: one added to a topic after the stream
/// started (every start position names every partition served then), so all of it is new.
const UNNAMED_PARTITION_START: i64 = 0;

/// Events between `cursor` and `target`, summed over partitions.
fn backlog(cursor: &Cursor, target: &Cursor) -> u64 {
    target
        .iter()
        .map(|(topic, partition, end)| {
            let at = cursor
                .get(topic, partition)
                .unwrap_or(UNNAMED_PARTITION_START);
            (end - at).max(0) as u64
        })
        .sum()
}

/// Writes every selected event in `[cursor, target)` and moves `cursor` to `target`.
async fn catch_up(
    context: &SessionContext,
    request: &SessionRequest,
    cursor: &mut Cursor,
    target: &Cursor,
    writer: &Writer,
) -> Result<(), Ended> {
    let mut ranges = Vec::new();
    for (topic, partition, until) in target.iter() {
        let from = cursor
            .get(topic, partition)
            .unwrap_or(UNNAMED_PARTITION_START);
        if from < until {
            ranges.push(Range {
                topic: topic.to_string(),
                partition,
                from,
                until,
            });
        }
    }
    if ranges.is_empty() {
        return Ok(());
    }
    let _permit = context
        .catch_ups
        .acquire()
        .await
        .map_err(|_| Ended::Failed)?;
    let before = cursor.encode();
    let mut wrote_event = false;
    // What Kafka no longer holds comes from the store first, partition by partition.
    for range in &mut ranges {
        let (low, _) = context
            .side
            .watermarks(&range.topic, range.partition)
            .await
            .map_err(|error| {
                tracing::warn!(%error, "catch-up: reading watermarks");
                Ended::Failed
            })?;
        if range.from < low {
            let stored_until = low.min(range.until);
            wrote_event |=
                from_store(context, request, range, stored_until, cursor, writer).await?;
            range.from = stored_until;
        }
    }
    ranges.retain(|r| r.from < r.until);
    let catch_up = CatchUp::start(context.side.clone(), &ranges).map_err(|error| {
        tracing::warn!(%error, "catch-up: starting a reader");
        Ended::Failed
    })?;
    if let Some(mut catch_up) = catch_up {
        while let Some(event) = catch_up.next().await {
            cursor.advance(&event.topic, event.partition, event.offset);
            if request.filters.matches(&event.service, &event.action) {
                wrote_event = true;
                writer
                    .send(Outgoing::Event {
                        event: Arc::new(event),
                        id: cursor.encode(),
                    })
                    .await?;
            }
        }
    }
    for (topic, partition, until) in target.iter() {
        if cursor.get(topic, partition).is_none_or(|at| at < until) {
            cursor.set(topic, partition, until);
        }
    }
    let after = cursor.encode();
    if after != before && !wrote_event {
        writer.send(Outgoing::Position { id: after }).await?;
    }
    Ok(())
}

/// `[range.from, until)` of one partition from the event store; whether an event was written.
async fn from_store(
    context: &SessionContext,
    request: &SessionRequest,
    range: &Range,
    until: i64,
    cursor: &mut Cursor,
    writer: &Writer,
) -> Result<bool, Ended> {
    let Some(store) = &context.store else {
        writer
            .send(Outgoing::Notice {
                kind: "gap",
                message: format!(
                    "offsets {}..{} of {}/{} are no longer in Kafka and this gateway has no event store: they are skipped",
                    range.from, until, range.topic, range.partition
                ),
            })
            .await?;
        cursor.set(&range.topic, range.partition, until);
        return Ok(false);
    };
    let Some(topic) = context.side.topic(&range.topic).cloned() else {
        return Ok(false);
    };
    metrics::counter!("eventpipe_gateway_catch_up_reads_total", "source" => "store").increment(1);
    let mut wrote = false;
    let mut from = range.from;
    loop {
        let chunk = match history::by_offsets(
            store,
            &range.topic,
            range.partition,
            from,
            until,
            STORE_CHUNK,
        )
        .await
        {
            Ok(chunk) => chunk,
            Err(error) if no_events_table(&error) => {
                writer
                    .send(Outgoing::Notice {
                        kind: "gap",
                        message: format!(
                            "offsets {from}..{until} of {}/{} are no longer in Kafka and there is no event store (run eventpipe store): they are skipped",
                            range.topic, range.partition
                        ),
                    })
                    .await?;
                break;
            }
            Err(error) => {
                tracing::warn!(%error, "catch-up: reading the event store");
                return Err(Ended::Failed);
            }
        };
        let Some(last) = chunk.last() else {
            break;
        };
        from = last.offset + 1;
        for stored in &chunk {
            cursor.advance(&range.topic, range.partition, stored.offset);
            if request.filters.matches(&stored.service, &stored.action) {
                wrote = true;
                writer
                    .send(Outgoing::Event {
                        event: Arc::new(Event::from_stored(stored, topic.clone())),
                        id: cursor.encode(),
                    })
                    .await?;
            }
        }
        if (chunk.len() as i64) < STORE_CHUNK {
            break;
        }
    }
    cursor.set(&range.topic, range.partition, until);
    Ok(wrote)
}

/// Whether PostgreSQL says the `events` table does not exist (the store never ran here).
fn no_events_table(error: &history::HistoryError) -> bool {
    match error {
        history::HistoryError::Postgres(sqlx::Error::Database(db)) => {
            db.code().as_deref() == Some("42P01")
        }
        _ => false,
    }
}

/// Live events until the feed ends, taken from the feed as many at a time as are waiting.
async fn live(mut feed: LiveFeed, cursor: &mut Cursor, writer: &Writer) -> Ended {
    let mut batch = Vec::with_capacity(LIVE_BATCH);
    loop {
        if feed.receiver.recv_many(&mut batch, LIVE_BATCH).await == 0 {
            return if feed.was_slow() {
                Ended::Slow
            } else {
                Ended::Failed
            };
        }
        for event in batch.drain(..) {
            if cursor
                .get(&event.topic, event.partition)
                .is_some_and(|next| event.offset < next)
            {
                continue;
            }
            cursor.advance(&event.topic, event.partition, event.offset);
            let id = cursor.encode();
            if let Err(ended) = writer.send(Outgoing::Event { event, id }).await {
                return ended;
            }
        }
    }
}

/// Live events taken from the feed at once, at most.
const LIVE_BATCH: usize = 64;

/// The transport's queue, with the write timeout.
struct Writer {
    out: mpsc::Sender<Outgoing>,
    timeout: Duration,
}

impl Writer {
    async fn send(&self, item: Outgoing) -> Result<(), Ended> {
        // The transport usually has room: no timer and no wait for that case.
        let item = match self.out.try_send(item) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Ended::ClientGone),
            Err(mpsc::error::TrySendError::Full(item)) => item,
        };
        match tokio::time::timeout(self.timeout, self.out.send(item)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Ended::ClientGone),
            Err(_) => Err(Ended::Stalled),
        }
    }
}
