//! The pauses in PostgreSQL (migrations/flows): creating one (refused when it overlaps an active
//! pause), resuming, listing, and the holders' per-partition bookkeeping of holds and releases.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::{PauseState, Scope};
use crate::filter::{FilterError, FilterSet};

/// Serializes pause creation: the overlap check and the insert see every other creation.
const PAUSE_LOCK: i64 = 0x6570_666c_6f77_7301; // "epflows" + 1

#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error(transparent)]
    BadFilter(#[from] FilterError),
    #[error("{0}")]
    BadScope(String),
    #[error("conflicts with active pause {id} ({filters}, scope {scope}): an event would be held by both")]
    Conflict {
        id: String,
        filters: String,
        scope: String,
    },
    #[error("no pause {0}")]
    NotFound(String),
    #[error("history injection: {0}")]
    BadInjection(String),
    #[error("no subscription {0:?}: create it with PUT /v1/subscriptions/{0}")]
    NoSubscription(String),
    #[error("no active pause has exactly the filters {0}")]
    NoneMatching(String),
    #[error("flow control database: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error(transparent)]
    Schema(#[from] crate::postgres::SchemaError),
}

impl FlowError {
    /// A database that is out of reach (retry) rather than a request that is wrong.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            FlowError::Postgres(
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
            ) | FlowError::Schema(_)
        )
    }
}

/// A fresh pause id: 12 hex digits (48 random bits; pauses are few).
fn new_id() -> String {
    format!("{:012x}", rand::random::<u64>() >> 16)
}

/// How long an injection's pause stays paused at least: every instance's watcher has read it
/// (every 250 ms) and each stream it holds has begun the injection.
pub const MIN_INJECT_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// Flow control's migrations; like every stage's, they ignore the others' versions.
pub fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations/flows");
    migrator.set_ignore_missing(true);
    migrator
}

/// One holder's progress on one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct HoldRow {
    #[serde(skip)]
    pub pause_id: String,
    pub holder: String,
    pub topic: String,
    #[sqlx(rename = "kafka_partition")]
    pub partition: i32,
    pub first_held: i64,
    pub first_held_time: Option<DateTime<Utc>>,
    pub held: i64,
    pub last_held: i64,
    pub resume_at: Option<i64>,
    pub released: i64,
    pub last_released: Option<i64>,
    pub drained_at: Option<DateTime<Utc>>,
}

impl HoldRow {
    /// `held`, `releasing` (moved back, re-reading) or `drained`.
    pub fn progress(&self) -> &'static str {
        match (self.resume_at, self.drained_at) {
            (_, Some(_)) => "drained",
            (Some(_), None) => "releasing",
            (None, None) => "holding",
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct PauseColumns {
    id: String,
    filters: Vec<String>,
    scope: String,
    reason: String,
    state: String,
    paused_by: String,
    paused_at: DateTime<Utc>,
    resumed_by: Option<String>,
    resume_requested_at: Option<DateTime<Utc>>,
    resumed_at: Option<DateTime<Utc>>,
    inject: Option<String>,
}

/// A history injection carried by a pause: what each gateway stream it holds reads from the
/// event store and delivers, marked replay, before the events it held (README "Flow control").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Injection {
    /// The store selection's SERVICE:ACTION filters (the pause's own when none were given).
    pub filters: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

impl Injection {
    /// From a request's words (the CLI's flags, the API's fields, named by `name`): the store
    /// filters (the pause's when empty), the last N, a Kafka-time range as history takes it.
    pub fn parse(
        pause_filters: &FilterSet,
        store_filters: &[String],
        last: Option<u64>,
        since: Option<&str>,
        until: Option<&str>,
        name: fn(&str) -> String,
    ) -> Result<Injection, FlowError> {
        let bad =
            |field: &str, why: String| FlowError::BadInjection(format!("{}: {why}", name(field)));
        let filters = match store_filters.is_empty() {
            true => pause_filters
                .filters()
                .iter()
                .map(ToString::to_string)
                .collect(),
            false => FilterSet::parse(store_filters)
                .map_err(|e| bad("store-filter", e.to_string()))?
                .filters()
                .iter()
                .map(ToString::to_string)
                .collect(),
        };
        if last == Some(0) {
            return Err(bad("last", "expected at least 1".into()));
        }
        if last.is_none() && since.is_none() {
            return Err(bad(
                "last",
                format!(
                    "name the history to inject: {} N or {} TIME",
                    name("last"),
                    name("since")
                ),
            ));
        }
        let now = Utc::now();
        let time = |field: &str, text: Option<&str>| {
            text.map(|text| {
                crate::store::history::parse_time(text, now)
                    .map_err(|why| bad(field, format!("{text:?}: {why}")))
            })
            .transpose()
        };
        let (since, until) = (time("since", since)?, time("until", until)?);
        if let (Some(since), Some(until)) = (since, until) {
            if until <= since {
                return Err(bad("until", "expected a time after since".into()));
            }
        }
        Ok(Injection {
            filters,
            last,
            since,
            until,
        })
    }

    /// The store selection it reads (the stream narrows it to its own filters and topics).
    pub fn selection(&self) -> Result<crate::store::history::Selection, FilterError> {
        let mut selection = crate::store::history::Selection::of(FilterSet::parse(&self.filters)?);
        selection.last = self.last;
        selection.since = self.since;
        selection.until = self.until;
        Ok(selection)
    }
}

/// A pause with its holders' progress.
#[derive(Debug, Clone)]
pub struct Pause {
    pub id: String,
    pub filters: FilterSet,
    pub scope: Scope,
    pub reason: String,
    pub state: PauseState,
    pub paused_by: String,
    pub paused_at: DateTime<Utc>,
    pub resumed_by: Option<String>,
    pub resume_requested_at: Option<DateTime<Utc>>,
    pub resumed_at: Option<DateTime<Utc>>,
    /// The history the gateway's streams deliver before what this pause held.
    pub inject: Option<Injection>,
    pub holds: Vec<HoldRow>,
}

impl Pause {
    /// A row that no longer parses (written by hand, or by a newer version) is left out with a
    /// warning rather than failing every instance's view.
    fn from_columns(row: PauseColumns) -> Option<Pause> {
        let parsed = (
            FilterSet::parse(&row.filters),
            row.scope.parse::<Scope>(),
            PauseState::parse(&row.state),
            row.inject
                .as_deref()
                .map(serde_json::from_str::<Injection>)
                .transpose(),
        );
        match parsed {
            (Ok(filters), Ok(scope), Some(state), Ok(inject)) => Some(Pause {
                id: row.id,
                filters,
                scope,
                reason: row.reason,
                state,
                paused_by: row.paused_by,
                paused_at: row.paused_at,
                resumed_by: row.resumed_by,
                resume_requested_at: row.resume_requested_at,
                resumed_at: row.resumed_at,
                inject,
                holds: Vec::new(),
            }),
            _ => {
                tracing::warn!(
                    pause = row.id,
                    "pause left out: its filters, scope or state do not parse"
                );
                None
            }
        }
    }

    /// Events held and not yet released, over every holder and partition.
    pub fn held_now(&self) -> i64 {
        self.holds
            .iter()
            .map(|h| (h.held - h.released).max(0))
            .sum()
    }

    /// The Kafka time of the oldest event still held, if any.
    pub fn oldest_held(&self) -> Option<DateTime<Utc>> {
        self.holds
            .iter()
            .filter(|h| h.drained_at.is_none())
            .filter_map(|h| h.first_held_time)
            .min()
    }

    /// As the API and `flows list --json` show it.
    pub fn view(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "filters": self.filters.filters().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "scope": self.scope.to_string(),
            "reason": self.reason,
            "status": self.state.as_str(),
            "paused_by": self.paused_by,
            "paused_at": self.paused_at,
            "resumed_by": self.resumed_by,
            "resume_requested_at": self.resume_requested_at,
            "resumed_at": self.resumed_at,
            "inject": self.inject,
            "held": self.held_now(),
            "oldest_held_at": self.oldest_held(),
            "partitions": self.holds.iter().map(|h| {
                let mut view = serde_json::json!(h);
                view["progress"] = h.progress().into();
                view
            }).collect::<Vec<_>>(),
        })
    }
}

/// A pause to create.
#[derive(Debug, Clone)]
pub struct PauseRequest {
    pub filters: FilterSet,
    pub scope: Scope,
    pub reason: String,
    /// Who asked: `admin`, `cli:<user>`.
    pub by: String,
    /// History for the gateway's streams to deliver first (scope gateway or subscription).
    pub inject: Option<Injection>,
}

/// What the database answered a holder registering its first held record of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// Hold it; the row as it stands now.
    Hold(HoldRow),
    /// The pause no longer holds here (resumed, or resuming with nothing held on this
    /// partition, or moved back already): route it, and here is the row if there is one.
    Release(Option<HoldRow>),
}

const PAUSE_COLUMNS: &str = "id, filters, scope, reason, state, paused_by, paused_at, resumed_by,
     resume_requested_at, resumed_at, inject";
const HOLD_COLUMNS: &str = "pause_id, holder, topic, kafka_partition, first_held, first_held_time,
     held, last_held, resume_at, released, last_released, drained_at";

/// The pauses' tables through one pool.
#[derive(Debug, Clone)]
pub struct FlowStore {
    pool: PgPool,
}

impl FlowStore {
    /// Connects and applies flow control's migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<FlowStore, FlowError> {
        let pool = crate::postgres::connect_migrated(
            url,
            max_connections,
            &migrator(),
            "flow control tables",
        )
        .await?;
        Ok(FlowStore { pool })
    }

    /// Over an existing pool (the gateway's), with flow control's migrations applied.
    pub async fn on(pool: PgPool) -> Result<FlowStore, FlowError> {
        migrator()
            .run(&pool)
            .await
            .map_err(|source| crate::postgres::SchemaError::Migrate {
                what: "flow control tables",
                source,
            })?;
        Ok(FlowStore { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates a pause, unless an active pause in an overlapping scope has overlapping filters.
    pub async fn pause(&self, request: PauseRequest) -> Result<Pause, FlowError> {
        if let Some(inject) = &request.inject {
            self.check_injection(&request.scope, inject).await?;
        }
        let mut transaction = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PAUSE_LOCK)
            .execute(&mut *transaction)
            .await?;
        let active: Vec<PauseColumns> = sqlx::query_as(&format!(
            "SELECT {PAUSE_COLUMNS} FROM flow_pauses WHERE state <> 'resumed'"
        ))
        .fetch_all(&mut *transaction)
        .await?;
        for other in active.into_iter().filter_map(Pause::from_columns) {
            if other.scope.overlaps(&request.scope) && other.filters.overlaps(&request.filters) {
                return Err(FlowError::Conflict {
                    id: other.id,
                    filters: other.filters.to_string(),
                    scope: other.scope.to_string(),
                });
            }
        }
        let filters: Vec<String> = request
            .filters
            .filters()
            .iter()
            .map(ToString::to_string)
            .collect();
        let inject = request
            .inject
            .as_ref()
            .map(|inject| serde_json::to_string(inject).unwrap_or_default());
        let row: PauseColumns = sqlx::query_as(&format!(
            "INSERT INTO flow_pauses (id, filters, scope, reason, state, paused_by, inject)
             VALUES ($1, $2, $3, $4, 'paused', $5, $6) RETURNING {PAUSE_COLUMNS}"
        ))
        .bind(new_id())
        .bind(&filters)
        .bind(request.scope.to_string())
        .bind(&request.reason)
        .bind(&request.by)
        .bind(inject)
        .fetch_one(&mut *transaction)
        .await?;
        transaction.commit().await?;
        tracing::debug!(pause = row.id, filters = %request.filters, scope = %request.scope, "flow paused");
        Pause::from_columns(row).ok_or_else(|| FlowError::NotFound("just created".into()))
    }

    /// An injection reaches the gateway's streams only, and a named subscription must exist.
    async fn check_injection(&self, scope: &Scope, inject: &Injection) -> Result<(), FlowError> {
        FilterSet::parse(&inject.filters)?;
        match scope {
            Scope::Gateway => Ok(()),
            Scope::Subscription(name) => {
                let exists: Option<bool> = sqlx::query_scalar(
                    "SELECT CASE WHEN to_regclass('gateway_subscriptions') IS NULL THEN false
                     ELSE EXISTS (SELECT 1 FROM gateway_subscriptions WHERE name = $1) END",
                )
                .bind(name)
                .fetch_one(&self.pool)
                .await?;
                match exists {
                    Some(true) => Ok(()),
                    _ => Err(FlowError::NoSubscription(name.clone())),
                }
            }
            Scope::Dispatch | Scope::All => Err(FlowError::BadScope(format!(
                "scope {scope}: history injection is not supported there yet; it reaches the \
                 gateway's streams: scope gateway or subscription:NAME"
            ))),
        }
    }

    /// History injection, one call: pauses the flow with `injection` (each gateway stream the
    /// pause holds delivers it, marked replay, then the events held), and resumes it after
    /// `window` (at least [`MIN_INJECT_WINDOW`]) in a task. The pause, paused.
    pub async fn inject(
        &self,
        mut request: PauseRequest,
        injection: Injection,
        window: std::time::Duration,
    ) -> Result<(Pause, tokio::task::JoinHandle<()>), FlowError> {
        request.inject = Some(injection);
        let by = request.by.clone();
        let pause = self.pause(request).await?;
        let store = self.clone();
        let id = pause.id.clone();
        let resume = tokio::spawn(async move {
            tokio::time::sleep(window.max(MIN_INJECT_WINDOW)).await;
            // Resumed by hand meanwhile: nothing to do (resume is idempotent).
            if let Err(error) = store.resume(&id, &by).await {
                tracing::warn!(%error, pause = id, "resuming an injection's pause failed: resume it with eventpipe flows resume");
            }
        });
        Ok((pause, resume))
    }

    /// Asks the holders to release what `id` held (idempotent: a pause resuming or resumed
    /// already stays so); resumed at once when nothing was held.
    pub async fn resume(&self, id: &str, by: &str) -> Result<Pause, FlowError> {
        sqlx::query(
            "UPDATE flow_pauses SET state = 'resuming', resumed_by = $2, resume_requested_at = now()
             WHERE id = $1 AND state = 'paused'",
        )
        .bind(id)
        .bind(by)
        .execute(&self.pool)
        .await?;
        self.finish_if_drained(id).await?;
        let pause = self.get(id).await?;
        tracing::debug!(
            pause = id,
            status = pause.state.as_str(),
            "flow resume requested"
        );
        Ok(pause)
    }

    /// Resumes the active pauses whose filters are exactly `filters` (in any order).
    pub async fn resume_matching(
        &self,
        filters: &FilterSet,
        by: &str,
    ) -> Result<Vec<Pause>, FlowError> {
        let same = |pause: &Pause| {
            let mut a: Vec<_> = pause.filters.filters().to_vec();
            let mut b: Vec<_> = filters.filters().to_vec();
            a.sort();
            b.sort();
            a == b
        };
        let ids: Vec<String> = self
            .list(false)
            .await?
            .into_iter()
            .filter(|p| p.state == PauseState::Paused && same(p))
            .map(|p| p.id)
            .collect();
        if ids.is_empty() {
            return Err(FlowError::NoneMatching(filters.to_string()));
        }
        let mut resumed = Vec::new();
        for id in ids {
            resumed.push(self.resume(&id, by).await?);
        }
        Ok(resumed)
    }

    /// `resumed` once every partition that held something is drained (the pause row is locked,
    /// so a holder registering a hold meanwhile either comes first and keeps it resuming, or
    /// sees it resumed and does not hold).
    pub async fn finish_if_drained(&self, id: &str) -> Result<(), FlowError> {
        let mut transaction = self.pool.begin().await?;
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM flow_pauses WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *transaction)
                .await?;
        match state.as_deref() {
            None => return Err(FlowError::NotFound(id.to_string())),
            Some("resuming") => {}
            Some(_) => return Ok(()),
        }
        let finished = sqlx::query(
            "UPDATE flow_pauses SET state = 'resumed', resumed_at = now()
             WHERE id = $1 AND NOT EXISTS (
                 SELECT 1 FROM flow_holds WHERE pause_id = $1 AND drained_at IS NULL)",
        )
        .bind(id)
        .execute(&mut *transaction)
        .await?
        .rows_affected();
        transaction.commit().await?;
        if finished > 0 {
            tracing::debug!(pause = id, "flow resumed: every held event released");
        }
        Ok(())
    }

    /// One pause with its progress.
    pub async fn get(&self, id: &str) -> Result<Pause, FlowError> {
        let row: Option<PauseColumns> = sqlx::query_as(&format!(
            "SELECT {PAUSE_COLUMNS} FROM flow_pauses WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let mut pause = row
            .and_then(Pause::from_columns)
            .ok_or_else(|| FlowError::NotFound(id.to_string()))?;
        pause.holds = sqlx::query_as(&format!(
            "SELECT {HOLD_COLUMNS} FROM flow_holds WHERE pause_id = $1
             ORDER BY holder, topic, kafka_partition"
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(pause)
    }

    /// The pauses, newest first, with their progress; `all` includes resumed ones.
    pub async fn list(&self, all: bool) -> Result<Vec<Pause>, FlowError> {
        let rows: Vec<PauseColumns> = sqlx::query_as(&format!(
            "SELECT {PAUSE_COLUMNS} FROM flow_pauses WHERE $1 OR state <> 'resumed'
             ORDER BY paused_at DESC, id"
        ))
        .bind(all)
        .fetch_all(&self.pool)
        .await?;
        let holds: Vec<HoldRow> = sqlx::query_as(&format!(
            "SELECT {HOLD_COLUMNS} FROM flow_holds h
             WHERE $1 OR EXISTS (SELECT 1 FROM flow_pauses p WHERE p.id = h.pause_id AND p.state <> 'resumed')
             ORDER BY holder, topic, kafka_partition"
        ))
        .bind(all)
        .fetch_all(&self.pool)
        .await?;
        let mut pauses: Vec<Pause> = rows.into_iter().filter_map(Pause::from_columns).collect();
        for hold in holds {
            if let Some(pause) = pauses.iter_mut().find(|p| p.id == hold.pause_id) {
                pause.holds.push(hold);
            }
        }
        Ok(pauses)
    }

    /// A holder's rows on one partition, for the active pauses.
    pub async fn holds_of(
        &self,
        holder: &str,
        topic: &str,
        partition: i32,
    ) -> Result<Vec<HoldRow>, FlowError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {HOLD_COLUMNS} FROM flow_holds h
             WHERE holder = $1 AND topic = $2 AND kafka_partition = $3
               AND EXISTS (SELECT 1 FROM flow_pauses p WHERE p.id = h.pause_id AND p.state <> 'resumed')"
        ))
        .bind(holder)
        .bind(topic)
        .bind(partition)
        .fetch_all(&self.pool)
        .await?)
    }

    /// A holder's first held record of a partition (since it was assigned): the row is written
    /// (or its `first_held` lowered) before the record's offset may be committed, under a share
    /// lock on the pause, so a concurrent resume sees it.
    pub async fn register_hold(
        &self,
        pause_id: &str,
        holder: &str,
        topic: &str,
        partition: i32,
        offset: i64,
        time: Option<DateTime<Utc>>,
    ) -> Result<Registration, FlowError> {
        let mut transaction = self.pool.begin().await?;
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM flow_pauses WHERE id = $1 FOR SHARE")
                .bind(pause_id)
                .fetch_optional(&mut *transaction)
                .await?;
        let existing: Option<HoldRow> = sqlx::query_as(&format!(
            "SELECT {HOLD_COLUMNS} FROM flow_holds
             WHERE pause_id = $1 AND holder = $2 AND topic = $3 AND kafka_partition = $4"
        ))
        .bind(pause_id)
        .bind(holder)
        .bind(topic)
        .bind(partition)
        .fetch_optional(&mut *transaction)
        .await?;
        let holds = match (state.as_deref(), &existing) {
            (Some("paused"), _) => true,
            // Resuming: a partition that held nothing has nothing to release first, and one
            // moved back already is live past its resume_at; one not moved back yet holds on.
            (Some("resuming"), Some(row)) => row.resume_at.is_none(),
            _ => false,
        };
        if !holds {
            transaction.commit().await?;
            return Ok(Registration::Release(existing));
        }
        let row: HoldRow = sqlx::query_as(&format!(
            "INSERT INTO flow_holds (pause_id, holder, topic, kafka_partition, first_held,
                                     first_held_time, last_held)
             VALUES ($1, $2, $3, $4, $5, $6, $5 - 1)
             ON CONFLICT (pause_id, holder, topic, kafka_partition) DO UPDATE SET
                 first_held = LEAST(flow_holds.first_held, excluded.first_held),
                 first_held_time = CASE WHEN excluded.first_held < flow_holds.first_held
                     THEN excluded.first_held_time ELSE flow_holds.first_held_time END
             RETURNING {HOLD_COLUMNS}"
        ))
        .bind(pause_id)
        .bind(holder)
        .bind(topic)
        .bind(partition)
        .bind(offset)
        .bind(time)
        .fetch_one(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(Registration::Hold(row))
    }

    /// Adds to the held and released counts (each record counted once: only offsets past the
    /// last counted add, so a re-read after a crash does not count twice).
    pub async fn add_counts(&self, counts: &[CountUpdate]) -> Result<(), FlowError> {
        for count in counts {
            sqlx::query(
                "UPDATE flow_holds SET
                     held = held + CASE WHEN $5 > last_held THEN $6 ELSE 0 END,
                     last_held = GREATEST(last_held, $5),
                     released = released + CASE WHEN $7 > COALESCE(last_released, -1) THEN $8 ELSE 0 END,
                     last_released = GREATEST(COALESCE(last_released, -1), $7)
                 WHERE pause_id = $1 AND holder = $2 AND topic = $3 AND kafka_partition = $4",
            )
            .bind(&count.pause_id)
            .bind(&count.holder)
            .bind(&count.topic)
            .bind(count.partition)
            .bind(count.last_held)
            .bind(count.held)
            .bind(count.last_released)
            .bind(count.released)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// A holder moves a partition back to release `pause_ids`: records where it stood (the
    /// furthest of `position` and the resume_at of releases still under way on the partition,
    /// so everything it decided before is known as decided) and returns the rows; a row with
    /// nothing to re-read is drained at once.
    pub async fn begin_release(
        &self,
        pause_ids: &[String],
        holder: &str,
        topic: &str,
        partition: i32,
        position: i64,
    ) -> Result<Vec<HoldRow>, FlowError> {
        let mut transaction = self.pool.begin().await?;
        let decided: Option<i64> = sqlx::query_scalar(
            "SELECT max(resume_at) FROM flow_holds
             WHERE holder = $1 AND topic = $2 AND kafka_partition = $3 AND drained_at IS NULL",
        )
        .bind(holder)
        .bind(topic)
        .bind(partition)
        .fetch_one(&mut *transaction)
        .await?;
        let resume_at = decided.map_or(position, |d| d.max(position));
        let rows: Vec<HoldRow> = sqlx::query_as(&format!(
            "UPDATE flow_holds SET resume_at = $5,
                 drained_at = CASE WHEN first_held >= $5 THEN now() END
             WHERE pause_id = ANY($1) AND holder = $2 AND topic = $3 AND kafka_partition = $4
               AND resume_at IS NULL
               AND EXISTS (SELECT 1 FROM flow_pauses p WHERE p.id = pause_id AND p.state = 'resuming')
             RETURNING {HOLD_COLUMNS}"
        ))
        .bind(pause_ids)
        .bind(holder)
        .bind(topic)
        .bind(partition)
        .bind(resume_at)
        .fetch_all(&mut *transaction)
        .await?;
        transaction.commit().await?;
        for row in rows.iter().filter(|r| r.drained_at.is_some()) {
            self.finish_if_drained(&row.pause_id).await?;
        }
        Ok(rows)
    }

    /// A partition re-read up to its resume_at: drained; the pause is resumed with the last.
    pub async fn mark_drained(
        &self,
        pause_id: &str,
        holder: &str,
        topic: &str,
        partition: i32,
    ) -> Result<(), FlowError> {
        sqlx::query(
            "UPDATE flow_holds SET drained_at = now()
             WHERE pause_id = $1 AND holder = $2 AND topic = $3 AND kafka_partition = $4
               AND drained_at IS NULL",
        )
        .bind(pause_id)
        .bind(holder)
        .bind(topic)
        .bind(partition)
        .execute(&self.pool)
        .await?;
        self.finish_if_drained(pause_id).await
    }
}

/// Counts a holder adds for one partition: `held` records up to offset `last_held`, `released`
/// up to `last_released` (-1: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountUpdate {
    pub pause_id: String,
    pub holder: String,
    pub topic: String,
    pub partition: i32,
    pub held: i64,
    pub last_held: i64,
    pub released: i64,
    pub last_released: i64,
}
