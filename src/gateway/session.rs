//! One subscriber's stream, whatever carries it (SSE or WebSocket): resolve where it starts,
//! catch up (from the event store past what Kafka holds, then from Kafka), hand over to the live
//! hub with no gap and no duplicate at the boundary, then follow live until it ends.
//!
//! The handover: a connection first catches up without a live feed (a long backlog must not
//! overflow one); once close to the reader it registers, which snapshots the reader's position
//! `L` atomically with joining, reads the small rest `[cursor, L)` from Kafka, and from then on
//! takes the live events, all of which are at or after `L`. An overflow during that last stretch
//! only means the live traffic outran the catch-up: it goes round again.
//!
//! Flow control (`holds`): events a pause holds are not written, the cursor keeps them owed;
//! when the pause is over the stream leaves the live feed, writes a pause's injected history
//! first, re-reads what was held, and goes round the same catch-up-then-live loop.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, Semaphore};

use crate::filter::FilterSet;
use crate::gateway::cursor::{Cursor, Injected, Start};
use crate::gateway::event::Event;
use crate::gateway::fanout::{Hub, LiveFeed};
use crate::gateway::holds::{self, EventAt, FlowContext, StreamFlows, StreamPause};
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
    /// The instance's pause watcher (none: no flow control).
    pub flows: Option<FlowContext>,
}

/// What a client asked for.
#[derive(Debug, Clone)]
pub struct SessionRequest {
    pub filters: FilterSet,
    /// Empty: every served topic.
    pub topics: Vec<String>,
    pub start: Start,
    /// The durable subscription attached, if any (`subscription:NAME` pauses hold its events).
    pub subscription: Option<String>,
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
            // What pauses held before the client went away is still owed.
            cursor.take_flow_state(given);
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
    let mut flows = StreamFlows::new(context.flows.clone(), request.subscription.clone());
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
    refresh(&mut flows, &cursor).await?;
    loop {
        if settle(context, request, &mut flows, &mut cursor, writer).await? {
            // The live feed queued meanwhile: catch up from the cursor instead.
            early_feed = None;
        }
        let feed = match early_feed.take() {
            Some(feed) => feed,
            None => {
                let target = context.hub.positions(topics);
                if backlog(&cursor, &target) > context.live_margin {
                    catch_up(context, request, &mut flows, &mut cursor, &target, writer).await?;
                    continue;
                }
                let feed = context.hub.register(request.filters.clone(), topics);
                let start = feed.start.clone();
                catch_up(context, request, &mut flows, &mut cursor, &start, writer).await?;
                if feed.was_slow() {
                    metrics::counter!("eventpipe_gateway_catch_up_restarts_total").increment(1);
                    continue;
                }
                feed
            }
        };
        live(feed, &mut cursor, &mut flows, writer).await?;
    }
}

/// Takes the current pauses; a pause the cursor names that cannot be looked up fails the
/// stream (the client resumes from its cursor) rather than guess what it held.
async fn refresh(flows: &mut StreamFlows, cursor: &Cursor) -> Result<(), Ended> {
    flows.refresh(cursor).await.map_err(|error| {
        tracing::warn!(%error, "reading a pause a stream's cursor names");
        Ended::Failed
    })
}

/// What the pauses ask of the stream before it reads on, in the order a subscriber sees it: a
/// pause's injected history, then the events held by pauses that are over. Whether it did any.
async fn settle(
    context: &SessionContext,
    request: &SessionRequest,
    flows: &mut StreamFlows,
    cursor: &mut Cursor,
    writer: &Writer,
) -> Result<bool, Ended> {
    if flows.is_idle() || !flows.due(cursor) {
        return Ok(false);
    }
    let pauses: Vec<StreamPause> = flows.pauses().to_vec();
    for pause in &pauses {
        let Some(injection) = &pause.inject else {
            continue;
        };
        // Over before this stream began it: the stream never saw the pause hold.
        let started = cursor.injected(&pause.id);
        if started == Some(Injected::Done) || (!pause.holding && started.is_none()) {
            continue;
        }
        inject(context, request, flows, cursor, pause, injection, writer).await?;
    }
    let due: Vec<Due> = cursor
        .holds()
        .filter_map(|(topic, partition, id, first)| {
            let pause = pauses.iter().find(|p| p.id == id && !p.holding)?;
            Some(Due {
                topic: topic.to_string(),
                partition,
                pause: id.to_string(),
                first,
                filters: pause.filters.clone(),
            })
        })
        .collect();
    if !due.is_empty() {
        release(context, request, flows, cursor, &due, writer).await?;
    }
    for pause in pauses.iter().filter(|p| !p.holding) {
        cursor.set_injected(&pause.id, None);
    }
    refresh(flows, cursor).await?;
    Ok(true)
}

/// What one pause that is over still owes on one partition: `[first, cursor)`.
#[derive(Debug, Clone)]
struct Due {
    topic: String,
    partition: i32,
    pause: String,
    first: i64,
    filters: FilterSet,
}

/// Re-reads what `due` held and writes it, in partition order; then forgets those holds.
async fn release(
    context: &SessionContext,
    request: &SessionRequest,
    flows: &mut StreamFlows,
    cursor: &mut Cursor,
    due: &[Due],
    writer: &Writer,
) -> Result<(), Ended> {
    let mut ranges: Vec<Range> = Vec::new();
    for owed in due {
        let Some(until) = cursor.get(&owed.topic, owed.partition) else {
            continue;
        };
        match ranges
            .iter_mut()
            .find(|r| r.topic == owed.topic && r.partition == owed.partition)
        {
            Some(range) => range.from = range.from.min(owed.first),
            None => ranges.push(Range {
                topic: owed.topic.clone(),
                partition: owed.partition,
                from: owed.first,
                until,
            }),
        }
    }
    read(
        context,
        request,
        flows,
        &Pass::Release(due),
        ranges,
        cursor,
        writer,
    )
    .await?;
    for owed in due {
        cursor.set_held_from(&owed.topic, owed.partition, &owed.pause, None);
    }
    Ok(())
}

/// Writes a pause's history injection: the store's selection, narrowed to what this stream
/// selects, marked replay, resumed after the last one written if the stream began it before.
/// What the stream has not read yet (at or past its cursor) or a pause holds is left out: it
/// comes live or with its release, so nothing comes twice.
async fn inject(
    context: &SessionContext,
    request: &SessionRequest,
    flows: &StreamFlows,
    cursor: &mut Cursor,
    pause: &StreamPause,
    injection: &crate::flows::store::Injection,
    writer: &Writer,
) -> Result<(), Ended> {
    let skipped = |why: String| Outgoing::Notice {
        kind: "replay_skipped",
        message: format!("the history of pause {} is not delivered: {why}", pause.id),
    };
    let Some(store) = &context.store else {
        cursor.set_injected(&pause.id, Some(Injected::Done));
        return writer
            .send(skipped("this gateway has no event store".into()))
            .await;
    };
    let mut selection = match injection.selection() {
        Ok(selection) => selection,
        Err(error) => {
            cursor.set_injected(&pause.id, Some(Injected::Done));
            return writer.send(skipped(error.to_string())).await;
        }
    };
    selection.topics = request.topics.clone();
    if let Some(Injected::UpTo(seq)) = cursor.injected(&pause.id) {
        // The rest of what the first attempt selected: everything after its last one.
        selection.after_seq = Some(seq);
        selection.last = None;
    }
    let bound = cursor.clone();
    let mut reader =
        match history::History::open(store.clone(), &selection, STORE_CHUNK as u64).await {
            Ok(reader) => reader,
            Err(error) if no_events_table(&error) => {
                cursor.set_injected(&pause.id, Some(Injected::Done));
                return writer
                    .send(skipped(
                        "there is no event store (run eventpipe store)".into(),
                    ))
                    .await;
            }
            Err(error) => {
                tracing::warn!(%error, "injecting history: reading the event store");
                return Err(Ended::Failed);
            }
        };
    let injected = metrics::counter!(holds::INJECTED, "pause" => pause.id.clone());
    let mut wrote = false;
    loop {
        let chunk = match reader.next_chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(error) => {
                tracing::warn!(%error, "injecting history: reading the event store");
                return Err(Ended::Failed);
            }
        };
        for stored in &chunk {
            let Some(topic) = context.side.topic(&stored.topic).cloned() else {
                continue;
            };
            let read_live = bound
                .get(&stored.topic, stored.partition)
                .is_none_or(|next| stored.offset >= next);
            if read_live
                || !request.filters.matches(&stored.service, &stored.action)
                || flows.owed(cursor, EventAt::stored(stored)).is_some()
            {
                continue;
            }
            cursor.set_injected(&pause.id, Some(Injected::UpTo(stored.seq)));
            wrote = true;
            injected.increment(1);
            writer
                .send(Outgoing::Event {
                    event: Arc::new(Event::injected(stored, topic)),
                    id: cursor.encode(),
                })
                .await?;
        }
    }
    cursor.set_injected(&pause.id, Some(Injected::Done));
    if wrote || pause.holding {
        // The stored position of a durable subscription learns it is done.
        writer
            .send(Outgoing::Position {
                id: cursor.encode(),
            })
            .await?;
    }
    Ok(())
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

/// How a read of offset ranges treats each event.
enum Pass<'a> {
    /// Read for the first time, past the cursor (which moves): what a pause holds is held.
    Forward,
    /// Re-read below the cursor after pauses are over: only what they held goes out.
    Release(&'a [Due]),
}

impl Pass<'_> {
    /// Whether an event goes out; moves the cursor (or the hold it is released from) past it.
    fn take(
        &self,
        request: &SessionRequest,
        flows: &StreamFlows,
        cursor: &mut Cursor,
        at: EventAt<'_>,
    ) -> bool {
        let EventAt {
            topic,
            partition,
            offset,
            service,
            action,
        } = at;
        match self {
            Pass::Forward => {
                cursor.advance(topic, partition, offset);
                request.filters.matches(service, action)
                    && (flows.is_idle() || !flows.hold(cursor, at))
            }
            Pass::Release(due) => {
                let owed = due.iter().find(|d| {
                    d.topic == topic
                        && d.partition == partition
                        && d.first <= offset
                        && d.filters.matches(service, action)
                });
                // A pause made since with the same filters may hold it now: it stays held.
                let held_again = || {
                    flows.pauses().iter().any(|q| {
                        q.holding
                            && q.filters.matches(service, action)
                            && cursor
                                .held_from(topic, partition, &q.id)
                                .is_some_and(|first| first <= offset)
                    })
                };
                match owed {
                    Some(owed) if request.filters.matches(service, action) && !held_again() => {
                        cursor.set_held_from(topic, partition, &owed.pause, Some(offset + 1));
                        metrics::counter!(holds::RELEASED, "pause" => owed.pause.clone())
                            .increment(1);
                        true
                    }
                    _ => false,
                }
            }
        }
    }
}

/// Writes every selected event in `[cursor, target)` and moves `cursor` to `target`.
async fn catch_up(
    context: &SessionContext,
    request: &SessionRequest,
    flows: &mut StreamFlows,
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
    let before = cursor.encode();
    let wrote_event = read(
        context,
        request,
        flows,
        &Pass::Forward,
        ranges,
        cursor,
        writer,
    )
    .await?;
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

/// Reads `ranges` (from the store what Kafka no longer holds, then from Kafka) and writes what
/// `pass` takes; whether it wrote an event.
async fn read(
    context: &SessionContext,
    request: &SessionRequest,
    flows: &mut StreamFlows,
    pass: &Pass<'_>,
    mut ranges: Vec<Range>,
    cursor: &mut Cursor,
    writer: &Writer,
) -> Result<bool, Ended> {
    ranges.retain(|r| r.from < r.until);
    if ranges.is_empty() {
        return Ok(false);
    }
    let _permit = context
        .catch_ups
        .acquire()
        .await
        .map_err(|_| Ended::Failed)?;
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
            wrote_event |= from_store(
                context,
                request,
                flows,
                pass,
                range,
                stored_until,
                cursor,
                writer,
            )
            .await?;
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
            if flows.changed() {
                refresh(flows, cursor).await?;
            }
            if pass.take(request, flows, cursor, EventAt::of(&event)) {
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
    Ok(wrote_event)
}

/// `[range.from, until)` of one partition from the event store; whether an event was written.
#[allow(clippy::too_many_arguments)]
async fn from_store(
    context: &SessionContext,
    request: &SessionRequest,
    flows: &StreamFlows,
    pass: &Pass<'_>,
    range: &Range,
    until: i64,
    cursor: &mut Cursor,
    writer: &Writer,
) -> Result<bool, Ended> {
    let forward = matches!(pass, Pass::Forward);
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
        if forward {
            cursor.set(&range.topic, range.partition, until);
        }
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
            if pass.take(request, flows, cursor, EventAt::stored(stored)) {
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
    if forward {
        cursor.set(&range.topic, range.partition, until);
    }
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

/// Live events, taken from the feed as many at a time as are waiting, until the feed ends
/// (`Err`) or the pauses ask the stream to leave it (`Ok`: an injection to write, or held events
/// to release first).
async fn live(
    mut feed: LiveFeed,
    cursor: &mut Cursor,
    flows: &mut StreamFlows,
    writer: &Writer,
) -> Result<(), Ended> {
    // Something may have come due while the stream caught up (its look at the pauses then
    // consumed the change the watch would wake it for).
    if !flows.is_idle() && flows.due(cursor) {
        return Ok(());
    }
    let mut batch = Vec::with_capacity(LIVE_BATCH);
    loop {
        let received = tokio::select! {
            // Events first: while they are waiting, the watch is not even polled (a pause is
            // taken at the next batch either way; the watch wakes an idle stream for a resume
            // or an injection).
            biased;
            received = feed.receiver.recv_many(&mut batch, LIVE_BATCH) => received,
            () = flows.wait_changed() => {
                refresh(flows, cursor).await?;
                if flows.due(cursor) {
                    return Ok(());
                }
                continue;
            }
        };
        if received == 0 {
            return Err(if feed.was_slow() {
                Ended::Slow
            } else {
                Ended::Failed
            });
        }
        // Under steady traffic the watch branch is never polled: look here (an atomic load).
        let refreshed = flows.changed();
        if refreshed {
            refresh(flows, cursor).await?;
        }
        for event in batch.drain(..) {
            if cursor
                .get(&event.topic, event.partition)
                .is_some_and(|next| event.offset < next)
            {
                continue;
            }
            cursor.advance(&event.topic, event.partition, event.offset);
            // No pause touches the stream: one branch per event.
            if !flows.is_idle() && flows.hold(cursor, EventAt::of(&event)) {
                continue;
            }
            let id = cursor.encode();
            writer.send(Outgoing::Event { event, id }).await?;
        }
        if refreshed && flows.due(cursor) {
            return Ok(());
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
