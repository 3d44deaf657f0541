//! History queries over the event store: a [`Selection`] (filters, topics, Kafka-time range,
//! resumption point, last N) read back in ascending `seq`, in chunks, by keyset — never OFFSET.
//!
//! The library function the gateway serves and `eventpipe history` prints. Memory is bounded by
//! the chunk size whatever the size of the result: each chunk is one query `seq > cursor ORDER
//! BY seq LIMIT chunk`, and the cursor is the last `seq` returned.
//!
//! # The query
//! Each filter is one branch that its index serves: `service = $s` by `(service, seq)`, `action
//! = $a` by `(action, seq)`, both by either (the planner picks, the other side filters), `*:*` by
//! `(seq)`. The branches are combined with `UNION ALL`, each `ORDER BY seq LIMIT chunk` and the
//! whole `ORDER BY seq LIMIT chunk`, so PostgreSQL merges ordered index scans (Merge Append) and
//! stops after one chunk; an event two overlapping filters both select comes twice, adjacent,
//! and is dropped here. Every user value is a bound parameter: no user text reaches the SQL.
//!
//! `--last N` reads the same branches backwards (`ORDER BY seq DESC LIMIT N`): when N fits in
//! one chunk, that one query returns the rows themselves (`DISTINCT ON (seq)`, a Unique over the
//! merged scans), reversed here — one round trip; a larger N first finds where the last N start
//! (`min(seq)` of the same), then streams ascending from there. On 300,000 rows (lk 2% of
//! them, each type 5%), "the last 10 of `lk:create_user,lk:update_user`" plans as
//! (tests/history.rs checks it; per day partition, the empty ones ahead elided):
//!
//! ```text
//! Limit (10)
//!   Unique                                           -- an event both branches found, once
//!     Merge Append (Sort Key: seq DESC)
//!       Limit (10)
//!         Merge Append (Sort Key: seq DESC)          -- over the day partitions
//!           Index Scan Backward using events_p…_action_seq_idx
//!             Index Cond: action = 'create_user'     Filter: service = 'lk'
//!       Limit (10)
//!         … the same for update_user
//! ```
//!
//! No Sort of the selected rows (only of the few after a cursor the planner knows, when it
//! prefers the seq index for them), no Seq Scan of a partition with rows; a chunk of
//! `*:create_user,*:update_user` from the start is a Merge Append of two `(action, seq)` index
//! scans. A filter naming both sides reads one side's index and filters on the other (there is no
//! `(service, action, seq)` index).

use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use sqlx::postgres::{PgArguments, PgPoolOptions, PgRow};
use sqlx::query::Query;
use sqlx::{PgPool, Postgres, Row};

use super::row::bytes_json;
use crate::config::{redact_url, Settings};
use crate::envelope::parse_timestamp;
use crate::filter::FilterSet;
use crate::settings::ConfigError;

/// Rows per query unless told otherwise.
pub const DEFAULT_CHUNK: u64 = 1000;

/// What to read back: events matching any of `filters`, optionally narrowed.
#[derive(Debug, Clone)]
pub struct Selection {
    pub filters: FilterSet,
    /// Only these topics; empty = all.
    pub topics: Vec<String>,
    /// Kafka time at or after (prunes the day partitions before it).
    pub since: Option<DateTime<Utc>>,
    /// Kafka time before (exclusive).
    pub until: Option<DateTime<Utc>>,
    /// Only events after this `seq` (resumption: the last `seq` a reader saw).
    pub after_seq: Option<i64>,
    /// Only the last N of what the rest selects (still returned in ascending `seq`).
    pub last: Option<u64>,
    /// At most this many events.
    pub limit: Option<u64>,
}

impl Selection {
    /// Everything the filters select, unnarrowed.
    pub fn of(filters: FilterSet) -> Selection {
        Selection {
            filters,
            topics: Vec::new(),
            since: None,
            until: None,
            after_seq: None,
            last: None,
            limit: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("no event store in {database}: run eventpipe store first")]
    NoStore { database: String },
    #[error("PostgreSQL at {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("reading history: {0}")]
    Postgres(#[from] sqlx::Error),
}

/// One row of `events` as history returns it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: i64,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub kafka_time: DateTime<Utc>,
    pub event_time: Option<DateTime<Utc>>,
    pub service: String,
    pub action: String,
    /// `[[name, value], ...]` as stored (a non-UTF-8 value is `{"hex": ...}`).
    pub headers: Option<Box<RawValue>>,
    /// The JSON (jsonb's text) of json and avro rows.
    pub value: Option<Box<RawValue>>,
    /// The record's bytes for raw rows, and the Avro frame of avro rows.
    pub raw: Option<Vec<u8>>,
    /// json | avro | raw
    pub format: String,
    pub schema_id: Option<i32>,
    /// Why a raw row is not JSON.
    pub reason: Option<String>,
}

/// The JSON of one event, as history lines and the gateway's frames show it (a live event, not
/// yet stored, has no `seq`).
#[derive(Serialize)]
pub struct EventLine<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// A string when UTF-8, `{"hex": ...}` when not, null when none.
    pub key: Option<serde_json::Value>,
    /// Kafka time, RFC 3339 in milliseconds.
    pub timestamp: String,
    pub event_time: Option<String>,
    pub service: &'a str,
    pub action: &'a str,
    pub headers: Option<&'a RawValue>,
    pub value: Option<&'a RawValue>,
    /// Raw rows only: the bytes, as a key is shown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    pub format: &'a str,
    pub schema_id: Option<i32>,
}

impl Serialize for StoredEvent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        EventLine {
            seq: Some(self.seq),
            topic: &self.topic,
            partition: self.partition,
            offset: self.offset,
            key: self.key.as_deref().map(bytes_json),
            timestamp: self.kafka_time.to_rfc3339_opts(SecondsFormat::Millis, true),
            event_time: self
                .event_time
                .map(|time| time.to_rfc3339_opts(SecondsFormat::Micros, true)),
            service: &self.service,
            action: &self.action,
            headers: self.headers.as_deref(),
            value: self.value.as_deref(),
            raw: match (self.format.as_str(), &self.raw) {
                ("raw", Some(raw)) => Some(bytes_json(raw)),
                _ => None,
            },
            reason: self.reason.as_deref(),
            format: &self.format,
            schema_id: self.schema_id,
        }
        .serialize(serializer)
    }
}

/// The columns a chunk reads; jsonb as text (kept as it is, never parsed into a tree).
pub const COLUMNS: &str =
    "seq, topic, kafka_partition, kafka_offset, key, kafka_time, event_time, \
     service, action, headers::text AS headers, value::text AS value, raw, format, schema_id, \
     reason";

fn raw_json(text: Option<String>) -> Result<Option<Box<RawValue>>, sqlx::Error> {
    text.map(RawValue::from_string)
        .transpose()
        .map_err(|error| sqlx::Error::Decode(Box::new(error)))
}

impl StoredEvent {
    pub fn from_row(row: &PgRow) -> Result<StoredEvent, sqlx::Error> {
        Ok(StoredEvent {
            seq: row.try_get("seq")?,
            topic: row.try_get("topic")?,
            partition: row.try_get("kafka_partition")?,
            offset: row.try_get("kafka_offset")?,
            key: row.try_get("key")?,
            kafka_time: row.try_get("kafka_time")?,
            event_time: row.try_get("event_time")?,
            service: row.try_get("service")?,
            action: row.try_get("action")?,
            headers: raw_json(row.try_get("headers")?)?,
            value: raw_json(row.try_get("value")?)?,
            raw: row.try_get("raw")?,
            format: row.try_get("format")?,
            schema_id: row.try_get("schema_id")?,
            reason: row.try_get("reason")?,
        })
    }

    /// The bytes a replay publishes: the stored bytes when there are any (Avro frames, raw
    /// records), else the JSON.
    pub fn value_bytes(&self) -> &[u8] {
        match (&self.raw, &self.value) {
            (Some(raw), _) => raw,
            (None, Some(value)) => value.get().as_bytes(),
            (None, None) => &[],
        }
    }
}

/// Stored events of one partition with offsets in `[from, until)`, ascending, at most `limit`
/// (the gateway's catch-up past what Kafka still holds).
pub async fn by_offsets(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    from: i64,
    until: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, HistoryError> {
    let statement = format!(
        "SELECT {COLUMNS} FROM events WHERE topic = $1 AND kafka_partition = $2 \
         AND kafka_offset >= $3 AND kafka_offset < $4 ORDER BY kafka_offset LIMIT $5"
    );
    let rows = sqlx::query(&statement)
        .bind(topic)
        .bind(partition)
        .bind(from)
        .bind(until)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .iter()
        .map(StoredEvent::from_row)
        .collect::<Result<_, _>>()?)
}

/// The first stored offset of a partition below `before` whose Kafka time is at or after `time`.
pub async fn first_offset_since(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    time: DateTime<Utc>,
    before: i64,
) -> Result<Option<i64>, HistoryError> {
    Ok(sqlx::query_scalar(
        "SELECT min(kafka_offset) FROM events WHERE topic = $1 AND kafka_partition = $2 \
         AND kafka_time >= $3 AND kafka_offset < $4",
    )
    .bind(topic)
    .bind(partition)
    .bind(time)
    .bind(before)
    .fetch_one(pool)
    .await?)
}

/// A value bound to a query parameter.
#[derive(Debug, Clone, PartialEq)]
enum Bind {
    Text(String),
    Texts(Vec<String>),
    Time(DateTime<Utc>),
}

/// The statements of one selection. `$1` is the cursor (`seq >`), `$2` the row limit; the
/// selection's own values follow.
#[derive(Debug, Clone, PartialEq)]
struct Statements {
    /// The next chunk, ascending.
    chunk: String,
    /// The smallest `seq` of the last `$2` rows after `$1`.
    last_start: String,
    /// The last `$2` rows after `$1` themselves, descending (each once): a last N that fits
    /// in one chunk is one round trip.
    last_rows: String,
    binds: Vec<Bind>,
}

impl Statements {
    fn new(selection: &Selection) -> Statements {
        let mut binds = Vec::new();
        let mut parameter = |bind: Bind| {
            binds.push(bind);
            format!("${}", binds.len() + 2)
        };
        let mut common = vec!["seq > $1".to_string()];
        if !selection.topics.is_empty() {
            let topics = parameter(Bind::Texts(selection.topics.clone()));
            common.push(format!("topic = ANY({topics})"));
        }
        if let Some(since) = selection.since {
            common.push(format!("kafka_time >= {}", parameter(Bind::Time(since))));
        }
        if let Some(until) = selection.until {
            common.push(format!("kafka_time < {}", parameter(Bind::Time(until))));
        }
        let branches: Vec<String> = if selection.filters.is_everything() {
            vec![common.join(" AND ")]
        } else {
            selection
                .filters
                .filters()
                .iter()
                .map(|filter| {
                    let mut conditions = common.clone();
                    if let Some(service) = filter.service.name() {
                        let service = parameter(Bind::Text(service.to_string()));
                        conditions.push(format!("service = {service}"));
                    }
                    if let Some(action) = filter.action.name() {
                        let action = parameter(Bind::Text(action.to_string()));
                        conditions.push(format!("action = {action}"));
                    }
                    conditions.join(" AND ")
                })
                .collect()
        };
        let (chunk, last_start, last_rows) = match branches.as_slice() {
            [only] => (
                format!("SELECT {COLUMNS} FROM events WHERE {only} ORDER BY seq LIMIT $2"),
                format!(
                    "SELECT min(seq) FROM (SELECT seq FROM events WHERE {only} \
                     ORDER BY seq DESC LIMIT $2) AS last"
                ),
                format!("SELECT {COLUMNS} FROM events WHERE {only} ORDER BY seq DESC LIMIT $2"),
            ),
            several => {
                let union = |columns: &str, order: &str| {
                    several
                        .iter()
                        .map(|conditions| {
                            format!(
                                "(SELECT {columns} FROM events WHERE {conditions} \
                                 ORDER BY seq{order} LIMIT $2)"
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" UNION ALL ")
                };
                (
                    format!(
                        "SELECT * FROM ({}) AS selected ORDER BY seq LIMIT $2",
                        union(COLUMNS, "")
                    ),
                    format!(
                        "SELECT min(seq) FROM (SELECT DISTINCT seq FROM ({}) AS candidates \
                         ORDER BY seq DESC LIMIT $2) AS last",
                        union("seq", " DESC")
                    ),
                    // DISTINCT ON over the merged descending branches: a Unique node, no sort.
                    format!(
                        "SELECT DISTINCT ON (seq) * FROM ({}) AS candidates \
                         ORDER BY seq DESC LIMIT $2",
                        union(COLUMNS, " DESC")
                    ),
                )
            }
        };
        Statements {
            chunk,
            last_start,
            last_rows,
            binds,
        }
    }

    fn bound<'q>(
        &'q self,
        sql: &'q str,
        cursor: i64,
        limit: u64,
    ) -> Query<'q, Postgres, PgArguments> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut query = sqlx::query(sql).bind(cursor).bind(limit);
        for bind in &self.binds {
            query = match bind {
                Bind::Text(text) => query.bind(text.as_str()),
                Bind::Texts(texts) => query.bind(texts.as_slice()),
                Bind::Time(time) => query.bind(*time),
            };
        }
        query
    }
}

/// Connects to the store for reading: no migration runs, and a database the store never wrote
/// is a one-line error rather than an empty answer.
pub async fn connect(url: &str) -> Result<PgPool, HistoryError> {
    let connect_error = |source| HistoryError::Connect {
        url: redact_url(url),
        source,
    };
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .map_err(connect_error)?;
    let (database, stored): (String, bool) =
        sqlx::query_as("SELECT current_database()::text, to_regclass('events') IS NOT NULL")
            .fetch_one(&pool)
            .await
            .map_err(connect_error)?;
    if !stored {
        return Err(HistoryError::NoStore { database });
    }
    Ok(pool)
}

/// A selection being read: call [`History::next_chunk`] until it returns `None`.
pub struct History {
    pool: PgPool,
    statements: Statements,
    /// The last `seq` returned (or the one before the first wanted).
    cursor: i64,
    /// Events still wanted, when the selection bounds them.
    remaining: Option<u64>,
    chunk_size: u64,
    done: bool,
    /// A last N read whole at open, handed out by the first `next_chunk`.
    read_ahead: Option<Vec<StoredEvent>>,
}

impl History {
    /// Starts reading `selection`, `chunk_size` rows per query (at least 1).
    pub async fn open(
        pool: PgPool,
        selection: &Selection,
        chunk_size: u64,
    ) -> Result<History, HistoryError> {
        let statements = Statements::new(selection);
        let mut cursor = selection.after_seq.unwrap_or(i64::MIN);
        let mut remaining = selection.limit;
        let mut done = remaining == Some(0);
        let chunk_size = chunk_size.max(1);
        if let Some(last) = selection.last.filter(|&last| last <= chunk_size && !done) {
            // The whole last N in one query, descending; handed out ascending, limit applied.
            let rows = statements
                .bound(&statements.last_rows, cursor, last)
                .fetch_all(&pool)
                .await?;
            let mut events = rows
                .iter()
                .rev()
                .map(StoredEvent::from_row)
                .collect::<Result<Vec<_>, _>>()?;
            events.truncate(usize::try_from(remaining.unwrap_or(last)).unwrap_or(usize::MAX));
            return Ok(History {
                pool,
                statements,
                cursor: events.last().map_or(cursor, |event| event.seq),
                remaining: Some(0),
                chunk_size,
                done: true,
                read_ahead: Some(events).filter(|events| !events.is_empty()),
            });
        }
        if let Some(last) = selection.last {
            remaining = Some(remaining.map_or(last, |limit| limit.min(last)));
            let start: Option<i64> = statements
                .bound(&statements.last_start, cursor, last)
                .fetch_one(&pool)
                .await?
                .try_get(0)?;
            match start {
                Some(start) => cursor = start.saturating_sub(1),
                None => done = true,
            }
            done |= last == 0;
        }
        Ok(History {
            pool,
            statements,
            cursor,
            remaining,
            chunk_size,
            done,
            read_ahead: None,
        })
    }

    /// The next events in ascending `seq` (each once), or `None` when the selection is read.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<StoredEvent>>, HistoryError> {
        if let Some(events) = self.read_ahead.take() {
            return Ok(Some(events));
        }
        while !self.done {
            let wanted = self
                .remaining
                .map_or(self.chunk_size, |remaining| remaining.min(self.chunk_size));
            let rows = self
                .statements
                .bound(&self.statements.chunk, self.cursor, wanted)
                .fetch_all(&self.pool)
                .await?;
            // Fewer rows than asked for: every branch is exhausted.
            self.done = (rows.len() as u64) < wanted;
            let mut events = Vec::with_capacity(rows.len());
            for row in &rows {
                let event = StoredEvent::from_row(row)?;
                // Two overlapping filters select an event twice, adjacent in seq order.
                if event.seq > self.cursor {
                    self.cursor = event.seq;
                    events.push(event);
                }
            }
            if let Some(remaining) = self.remaining.as_mut() {
                events.truncate(usize::try_from(*remaining).unwrap_or(usize::MAX));
                *remaining -= events.len() as u64;
                self.done |= *remaining == 0;
            }
            if !events.is_empty() {
                return Ok(Some(events));
            }
        }
        Ok(None)
    }

    /// The plans PostgreSQL chooses for this selection's statements (`EXPLAIN`, text): the last
    /// N's one query, or its start then the chunk: to check which indexes serve it.
    pub async fn explain(&self, selection: &Selection) -> Result<String, HistoryError> {
        let mut plans = String::new();
        let cursor = selection.after_seq.unwrap_or(i64::MIN);
        let statements = match selection.last {
            Some(last) if last <= self.chunk_size => {
                vec![(&self.statements.last_rows, cursor, last)]
            }
            Some(last) => vec![
                (&self.statements.last_start, cursor, last),
                (&self.statements.chunk, cursor, self.chunk_size),
            ],
            None => vec![(&self.statements.chunk, self.cursor, self.chunk_size)],
        };
        for (sql, cursor, limit) in statements {
            let explain = format!("EXPLAIN {sql}");
            let rows = self
                .statements
                .bound(&explain, cursor, limit)
                .fetch_all(&self.pool)
                .await?;
            for row in rows {
                plans.push_str(&row.try_get::<String, _>(0)?);
                plans.push('\n');
            }
        }
        Ok(plans)
    }
}

/// The selection flags `eventpipe history` and `eventpipe replay` share.
#[derive(Debug, Clone, clap::Args)]
pub struct SelectionArgs {
    /// SERVICE:ACTION, either side `*` (lk:*, *:create_user, *:*); repeat or comma-separate
    /// to select what any of them matches.
    #[arg(long = "filter", required = true, value_name = "SERVICE:ACTION")]
    pub filters: Vec<String>,
    /// Only these topics (repeat or comma-separate; default: every stored topic).
    #[arg(long = "topic", value_delimiter = ',')]
    pub topics: Vec<String>,
    /// Kafka time at or after: RFC 3339, ISO 8601 without zone (UTC), a date, or relative to
    /// now (-90m, -1h, -2d).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub since: Option<String>,
    /// Kafka time before (same forms as --since).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub until: Option<String>,
    /// Only events after this sequence number (resume after the last one seen).
    #[arg(long, value_name = "SEQ")]
    pub after_seq: Option<i64>,
    /// Only the last N selected events (still in ascending order).
    #[arg(long, value_name = "N")]
    pub last: Option<u64>,
    /// At most N events.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// Rows per query.
    #[arg(long, hide = true, default_value_t = DEFAULT_CHUNK)]
    pub chunk_size: u64,
}

impl SelectionArgs {
    /// The selection, or a one-line error naming the flag and the value at fault.
    pub fn selection(&self, now: DateTime<Utc>) -> Result<Selection, ConfigError> {
        let invalid = |setting: &str, value: &str, reason: String| ConfigError::Invalid {
            setting: setting.to_string(),
            value: value.to_string(),
            reason,
        };
        let filters = FilterSet::parse(&self.filters)
            .map_err(|error| invalid("--filter", &error.filter, error.reason))?;
        let time = |flag: &str, text: &Option<String>| {
            text.as_deref()
                .map(|text| parse_time(text, now).map_err(|reason| invalid(flag, text, reason)))
                .transpose()
        };
        for (flag, value) in [
            ("--last", self.last),
            ("--limit", self.limit),
            ("--chunk-size", Some(self.chunk_size)),
        ] {
            if value == Some(0) {
                return Err(invalid(flag, "0", "expected at least 1".into()));
            }
        }
        Ok(Selection {
            filters,
            topics: self.topics.clone(),
            since: time("--since", &self.since)?,
            until: time("--until", &self.until)?,
            after_seq: self.after_seq,
            last: self.last,
            limit: self.limit,
        })
    }
}

/// RFC 3339, ISO 8601 without a zone (UTC), a date (its midnight UTC), or `-DURATION` before
/// `now` (`-90m`, `-1h`, `-2d`, `-30s`).
pub fn parse_time(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Some(ago) = text.strip_prefix('-') {
        let ago = super::settings::parse_duration(ago)?;
        return chrono::Duration::from_std(ago)
            .ok()
            .and_then(|ago| now.checked_sub_signed(ago))
            .ok_or_else(|| "too far in the past".to_string());
    }
    parse_timestamp(text)
        .or_else(|| {
            NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .ok()
                .and_then(|day| day.and_hms_opt(0, 0, 0))
                .map(|midnight| midnight.and_utc())
        })
        .ok_or_else(|| {
            "expected RFC 3339 (2026-12-01T09:00:00Z), ISO 8601 without zone (UTC), a date, \
             or a time before now (-1h, -30m, -2d)"
                .to_string()
        })
}

/// `eventpipe history`: the selection as JSON lines on stdout, written and flushed per chunk.
pub async fn print(settings: &Settings, args: &SelectionArgs) -> anyhow::Result<()> {
    let selection = args.selection(Utc::now())?;
    let pool = connect(settings.postgres_url.as_str()).await?;
    let mut history = History::open(pool, &selection, args.chunk_size).await?;
    let mut buffer = Vec::new();
    while let Some(events) = history.next_chunk().await? {
        buffer.clear();
        for event in &events {
            serde_json::to_writer(&mut buffer, event)?;
            buffer.push(b'\n');
        }
        let mut stdout = std::io::stdout().lock();
        match stdout.write_all(&buffer).and_then(|()| stdout.flush()) {
            Ok(()) => {}
            // The reader went away (`| head`): it has what it wanted.
            Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(error) => return Err(anyhow::Error::new(error).context("writing history")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selection(filters: &[&str]) -> Selection {
        Selection::of(FilterSet::parse(filters).unwrap())
    }

    #[test]
    fn one_filter_is_one_indexed_query_without_union() {
        let statements = Statements::new(&selection(&["lk:*"]));
        assert_eq!(
            statements.chunk,
            format!("SELECT {COLUMNS} FROM events WHERE seq > $1 AND service = $3 ORDER BY seq LIMIT $2")
        );
        assert_eq!(statements.binds, vec![Bind::Text("lk".into())]);
        let everything = Statements::new(&selection(&["*:*", "lk:*"]));
        assert!(everything
            .chunk
            .ends_with("WHERE seq > $1 ORDER BY seq LIMIT $2"));
        assert!(everything.binds.is_empty());
    }

    #[test]
    fn several_filters_are_ordered_limited_branches_with_every_value_bound() {
        let mut chosen = selection(&["lk:create_user", "*:update_user"]);
        chosen.topics = vec!["users_in".into()];
        chosen.since = Some("2026-12-01T09:00:00Z".parse().unwrap());
        let statements = Statements::new(&chosen);
        let common = "seq > $1 AND topic = ANY($3) AND kafka_time >= $4";
        assert_eq!(
            statements.chunk,
            format!(
                "SELECT * FROM ((SELECT {COLUMNS} FROM events WHERE {common} AND service = $5 \
                 AND action = $6 ORDER BY seq LIMIT $2) UNION ALL (SELECT {COLUMNS} FROM events \
                 WHERE {common} AND action = $7 ORDER BY seq LIMIT $2)) AS selected ORDER BY seq \
                 LIMIT $2"
            )
        );
        assert!(statements.last_start.starts_with(
            "SELECT min(seq) FROM (SELECT DISTINCT seq FROM ((SELECT seq FROM events"
        ));
        assert!(statements
            .last_start
            .contains("ORDER BY seq DESC LIMIT $2) UNION ALL"));
        assert_eq!(
            statements.binds,
            vec![
                Bind::Texts(vec!["users_in".into()]),
                Bind::Time(chosen.since.unwrap()),
                Bind::Text("lk".into()),
                Bind::Text("create_user".into()),
                Bind::Text("update_user".into()),
            ]
        );
        for name in ["users_in", "lk", "create_user", "update_user"] {
            assert!(
                !statements.chunk.contains(name),
                "{name} is bound, not written"
            );
        }
    }

    #[test]
    fn times_are_absolute_iso_dates_or_before_now() {
        let now: DateTime<Utc> = "2026-12-01T12:00:00Z".parse().unwrap();
        for (text, expected) in [
            ("2026-12-01T09:00:00+01:00", "2026-12-01T08:00:00Z"),
            ("2026-12-01T09:00:00.5", "2026-12-01T09:00:00.500Z"),
            ("2026-11-30", "2026-11-30T00:00:00Z"),
            ("-90m", "2026-12-01T10:30:00Z"),
            ("-2d", "2026-11-29T12:00:00Z"),
        ] {
            let expected: DateTime<Utc> = expected.parse().unwrap();
            assert_eq!(parse_time(text, now), Ok(expected), "{text}");
        }
        for bad in ["yesterday", "-1w", "2026-13-01", ""] {
            assert!(parse_time(bad, now).is_err(), "{bad}");
        }
    }

    /// The selection flags as the command line gives them.
    fn args(flags: &[&str]) -> SelectionArgs {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            selection: SelectionArgs,
        }
        let argv = std::iter::once("history").chain(flags.iter().copied());
        <Flags as clap::Parser>::try_parse_from(argv)
            .unwrap()
            .selection
    }

    #[test]
    fn bad_flags_are_one_line_config_errors_naming_them() {
        let now = Utc::now();
        for (flags, expected) in [
            (
                &["--filter", "lk"][..],
                "invalid setting --filter = \"lk\": expected SERVICE:ACTION",
            ),
            (
                &["--filter", "lk:*,arm:"],
                "invalid setting --filter = \"arm:\": the action is empty",
            ),
            (
                &["--filter", "lk:*", "--until", "soon"],
                "invalid setting --until = \"soon\": expected RFC 3339",
            ),
            (
                &["--filter", "lk:*", "--last", "0"],
                "invalid setting --last = \"0\": expected at least 1",
            ),
        ] {
            let error = args(flags).selection(now).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{error}");
            assert!(!error.contains('\n'), "{error}");
        }
        let chosen = args(&[
            "--filter",
            "lk:*",
            "--filter",
            "*:update_user",
            "--topic",
            "a,b",
            "--since",
            "-1h",
            "--after-seq",
            "9",
            "--last",
            "10",
            "--limit",
            "5",
        ])
        .selection(now)
        .unwrap();
        assert_eq!(chosen.filters.to_string(), "lk:*,*:update_user");
        assert_eq!(chosen.topics, ["a", "b"]);
        assert_eq!(chosen.since, Some(now - chrono::Duration::hours(1)));
        assert_eq!(
            (chosen.after_seq, chosen.last, chosen.limit),
            (Some(9), Some(10), Some(5))
        );
    }

    #[test]
    fn an_event_is_one_json_line_with_keys_and_raw_bytes_readable() {
        let event = StoredEvent {
            seq: 7,
            topic: "users_in".into(),
            partition: 1,
            offset: 41,
            key: Some(b"\xff1".to_vec()),
            kafka_time: "2026-12-01T09:00:00.123456Z".parse().unwrap(),
            event_time: None,
            service: String::new(),
            action: String::new(),
            headers: Some(RawValue::from_string(r#"[["h", {"hex": "ff"}]]"#.into()).unwrap()),
            value: None,
            raw: Some(b"{oops".to_vec()),
            format: "raw".into(),
            schema_id: None,
            reason: Some("not JSON: EOF".into()),
        };
        let line = serde_json::to_string(&event).unwrap();
        assert_eq!(
            line,
            r#"{"seq":7,"topic":"users_in","partition":1,"offset":41,"key":{"hex":"ff31"},"timestamp":"2026-12-01T09:00:00.123Z","event_time":null,"service":"","action":"","headers":[["h", {"hex": "ff"}]],"value":null,"raw":"{oops","reason":"not JSON: EOF","format":"raw","schema_id":null}"#
        );
        assert_eq!(event.value_bytes(), b"{oops");
        let json = StoredEvent {
            key: Some(b"42".to_vec()),
            value: Some(RawValue::from_string(r#"{"a": 1}"#.into()).unwrap()),
            raw: None,
            format: "json".into(),
            reason: None,
            ..event
        };
        let line: serde_json::Value = serde_json::to_value(&json).unwrap();
        assert_eq!(line["key"], "42");
        assert_eq!(line["value"], serde_json::json!({"a": 1}));
        assert!(line.get("raw").is_none() && line.get("reason").is_none());
        assert_eq!(json.value_bytes(), br#"{"a": 1}"#);
    }
}
