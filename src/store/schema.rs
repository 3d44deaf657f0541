//! The store's PostgreSQL schema: its own migrations (migrations/store), the daily partitions of
//! `events` created ahead of the rows that need them, and retention by dropping whole partitions.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Days, NaiveDate, Utc};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// Every writer of partitions takes this transaction lock first: two instances creating the
/// same day's partition would otherwise race on the catalog.
const PARTITION_DDL_LOCK: i64 = 0x6576_7374_6f72_6501; // "evstore" + 1
/// Partitions for today and this many days ahead exist before the rows that need them arrive.
pub const DAYS_AHEAD: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("migrating the store's schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// The store's migrations. Other stages keep theirs in `migrations/<stage>`, under the same
/// bookkeeping table: each migrator ignores the versions it does not know.
pub fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("migrations/store");
    migrator.set_ignore_missing(true);
    migrator
}

/// A pool for the store and its schema applied (migrations serialize on sqlx's advisory lock,
/// so instances may start together).
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, SchemaError> {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await?;
    migrator().run(&pool).await?;
    Ok(pool)
}

/// The partition holding `day`'s rows.
pub fn partition_name(day: NaiveDate) -> String {
    format!("events_p{}", day.format("%Y%m%d"))
}

/// The day a partition name covers, if it is one of ours.
pub fn partition_day(name: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(name.strip_prefix("events_p")?, "%Y%m%d").ok()
}

pub fn day_of(time: DateTime<Utc>) -> NaiveDate {
    time.date_naive()
}

/// Creates the partitions of `days` that do not exist yet, in one transaction.
pub async fn ensure_partitions(
    connection: &mut sqlx::PgConnection,
    days: &BTreeSet<NaiveDate>,
) -> Result<(), sqlx::Error> {
    if days.is_empty() {
        return Ok(());
    }
    let mut transaction = sqlx::Connection::begin(&mut *connection).await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(PARTITION_DDL_LOCK)
        .execute(&mut *transaction)
        .await?;
    for day in days {
        let next = day.checked_add_days(Days::new(1)).unwrap_or(*day);
        // Dates are formatted by us: no user text reaches this statement.
        let statement = format!(
            "CREATE TABLE IF NOT EXISTS {} PARTITION OF events \
             FOR VALUES FROM ('{day} 00:00:00+00') TO ('{next} 00:00:00+00')",
            partition_name(*day)
        );
        sqlx::query(&statement).execute(&mut *transaction).await?;
    }
    transaction.commit().await
}

/// The days of the partitions that exist now.
pub async fn existing_partitions(pool: &PgPool) -> Result<BTreeSet<NaiveDate>, sqlx::Error> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i
         JOIN pg_class c ON c.oid = i.inhrelid
         JOIN pg_class p ON p.oid = i.inhparent
         WHERE p.relname = 'events'",
    )
    .fetch_all(pool)
    .await?;
    Ok(names
        .iter()
        .filter_map(|name| partition_day(name))
        .collect())
}

/// Today and the days ahead, so the live edge never waits for DDL.
pub fn days_ahead(now: DateTime<Utc>) -> BTreeSet<NaiveDate> {
    let today = day_of(now);
    (0..=DAYS_AHEAD)
        .filter_map(|ahead| today.checked_add_days(Days::new(ahead)))
        .collect()
}

/// Days whose partitions lie wholly before `now - retention`: dropped whole.
pub fn expired(
    existing: &BTreeSet<NaiveDate>,
    now: DateTime<Utc>,
    retention: Duration,
) -> Vec<NaiveDate> {
    let Ok(retention) = chrono::Duration::from_std(retention) else {
        return Vec::new();
    };
    let Some(cutoff) = now.checked_sub_signed(retention) else {
        return Vec::new();
    };
    let cutoff_day = day_of(cutoff);
    // A partition ends at the next midnight: it expires once that is at or before the cutoff.
    existing
        .iter()
        .copied()
        .filter(|day| day.succ_opt().is_some_and(|end| end <= cutoff_day))
        .collect()
}

/// Drops the partitions of `days`; returns how many went.
pub async fn drop_partitions(pool: &PgPool, days: &[NaiveDate]) -> Result<usize, sqlx::Error> {
    let mut dropped = 0;
    for day in days {
        let mut transaction = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PARTITION_DDL_LOCK)
            .execute(&mut *transaction)
            .await?;
        sqlx::query(&format!("DROP TABLE IF EXISTS {}", partition_name(*day)))
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        tracing::info!(
            partition = partition_name(*day),
            "retention: dropped partition"
        );
        dropped += 1;
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn partition_names_round_trip_and_ignore_others() {
        assert_eq!(partition_name(day("2026-12-01")), "events_p20261201");
        assert_eq!(partition_day("events_p20261201"), Some(day("2026-12-01")));
        assert_eq!(partition_day("events_default"), None);
        assert_eq!(partition_day("other_p20261201"), None);
    }

    #[test]
    fn partitions_expire_only_when_wholly_older_than_the_retention() {
        let existing: BTreeSet<NaiveDate> =
            ["2026-10-30", "2026-10-31", "2026-11-01", "2026-12-01"]
                .into_iter()
                .map(day)
                .collect();
        let now = "2026-12-01T10:00:00Z".parse().unwrap();
        // 30 days back is 2026-11-01T10:00: the day of 10-31 ends at 11-01 00:00, before it.
        let gone = expired(&existing, now, Duration::from_secs(30 * 86_400));
        assert_eq!(gone, vec![day("2026-10-30"), day("2026-10-31")]);
        assert!(expired(&existing, now, Duration::from_secs(365 * 86_400)).is_empty());
    }

    #[test]
    fn days_ahead_start_today() {
        let now = "2026-12-31T23:59:00Z".parse().unwrap();
        let days: Vec<_> = days_ahead(now).into_iter().collect();
        assert_eq!(
            days,
            vec![day("2026-12-31"), day("2027-01-01"), day("2027-01-02")]
        );
    }
}
