//! Writes a batch of rows to `events` in one transaction: COPY straight into the table (the fast
//! path), a staged `INSERT ... ON CONFLICT DO NOTHING` when some rows are already there (a
//! re-delivery), and a split down to the one row PostgreSQL refuses, which is then kept raw.
//!
//! Every write takes the write-order lock before drawing sequence numbers, so rows commit in
//! `seq` order across instances (see migrations/store). What is not the data's fault (the
//! connection, the server) is returned for the caller to retry; nothing is ever dropped.

use std::collections::BTreeSet;

use chrono::NaiveDate;
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};

use super::row::{copy_rows, StoredRow, COPY_COLUMNS};
use super::schema::{day_of, ensure_partitions};

/// Advisory lock taken by every transaction that draws from `events_seq`.
const WRITE_ORDER_LOCK: i64 = 0x6576_7374_6f72_6502;

/// What one batch write did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Rows added.
    pub inserted: u64,
    /// Rows that were already stored (re-delivered).
    pub duplicates: u64,
    /// Rows PostgreSQL refused as they were, stored raw with its reason.
    pub made_raw: u64,
}

impl std::ops::AddAssign for Written {
    fn add_assign(&mut self, other: Written) {
        self.inserted += other.inserted;
        self.duplicates += other.duplicates;
        self.made_raw += other.made_raw;
    }
}

/// How a failed statement is handled.
enum Failure {
    /// Some rows are stored already: write the batch through the conflict-tolerant path.
    Duplicate,
    /// The data: find the row, keep it raw.
    Data(String),
    /// A partition is missing (dropped by retention meanwhile): learn the partitions again.
    NoPartition(sqlx::Error),
    /// Anything else: the caller retries.
    Other(sqlx::Error),
}

fn classify(error: sqlx::Error) -> Failure {
    let code = error
        .as_database_error()
        .and_then(|e| e.code())
        .map(|code| code.into_owned());
    match code.as_deref() {
        Some("23505") => Failure::Duplicate,
        // Class 22: data exceptions (bad jsonb, bad encoding); 54: limits (an index row too big).
        Some(code) if code.starts_with("22") || code.starts_with("54") => {
            Failure::Data(error.to_string())
        }
        Some("23514") => Failure::NoPartition(error),
        _ => Failure::Other(error),
    }
}

/// The store's writer: one connection pool and the partitions known to exist.
pub struct Writer {
    pool: PgPool,
    partitions: BTreeSet<NaiveDate>,
}

impl Writer {
    pub fn new(pool: PgPool) -> Writer {
        Writer {
            pool,
            partitions: BTreeSet::new(),
        }
    }

    /// Forgets the partitions it knew (a retention drop may have removed one).
    pub fn forget_partitions(&mut self) {
        self.partitions.clear();
    }

    /// Writes every row, or returns the error to retry on (some rows may be stored then: the
    /// retry finds them as duplicates).
    pub async fn write(&mut self, rows: &[StoredRow]) -> Result<Written, sqlx::Error> {
        self.ensure_partitions(rows).await?;
        let mut written = Written::default();
        // Ranges still to write, last first; a refused range is split in halves.
        let whole = 0..rows.len();
        let mut pending: Vec<std::ops::Range<usize>> = vec![whole];
        while let Some(range) = pending.pop() {
            let chunk = &rows[range.clone()];
            match self.write_chunk(chunk).await {
                Ok(done) => written += done,
                Err(Failure::Data(reason)) if chunk.len() == 1 => {
                    let row = chunk[0].clone();
                    let was_raw = matches!(row.body, super::row::Body::Raw { .. });
                    tracing::warn!(
                        topic = %row.topic, partition = row.partition, offset = row.offset,
                        %reason, "PostgreSQL refused a row; storing it raw"
                    );
                    let mut raw = row.into_raw(format!("refused by PostgreSQL: {reason}"));
                    if was_raw {
                        // Refused even raw: the sender or type is what breaks a limit.
                        raw.service.clear();
                        raw.action.clear();
                    }
                    match self.write_chunk(std::slice::from_ref(&raw)).await {
                        Ok(done) => {
                            written += done;
                            written.made_raw += 1;
                        }
                        Err(Failure::Data(reason)) => {
                            return Err(sqlx::Error::Protocol(format!(
                                "PostgreSQL refuses even the raw form of {}/{}/{}: {reason}",
                                raw.topic, raw.partition, raw.offset
                            )))
                        }
                        Err(failure) => return Err(self.retry_on(failure)),
                    }
                }
                Err(Failure::Data(_)) => {
                    let middle = range.start + chunk.len() / 2;
                    pending.push(middle..range.end);
                    pending.push(range.start..middle);
                }
                Err(failure) => return Err(self.retry_on(failure)),
            }
        }
        Ok(written)
    }

    fn retry_on(&mut self, failure: Failure) -> sqlx::Error {
        match failure {
            Failure::NoPartition(error) => {
                self.forget_partitions();
                error
            }
            Failure::Other(error) => error,
            Failure::Duplicate | Failure::Data(_) => {
                sqlx::Error::Protocol("duplicate rows after the conflict-tolerant insert".into())
            }
        }
    }

    async fn ensure_partitions(&mut self, rows: &[StoredRow]) -> Result<(), sqlx::Error> {
        let missing: BTreeSet<NaiveDate> = rows
            .iter()
            .map(|row| day_of(row.kafka_time()))
            .filter(|day| !self.partitions.contains(day))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut connection = self.pool.acquire().await?;
        ensure_partitions(&mut connection, &missing).await?;
        self.partitions.extend(missing);
        Ok(())
    }

    /// Creates `days`' partitions (today and the days ahead, at start and on the hour).
    pub async fn create_partitions(
        &mut self,
        days: BTreeSet<NaiveDate>,
    ) -> Result<(), sqlx::Error> {
        let mut connection = self.pool.acquire().await?;
        ensure_partitions(&mut connection, &days).await?;
        self.partitions.extend(days);
        Ok(())
    }

    /// One transaction: COPY, or on a duplicate the staged conflict-tolerant insert.
    async fn write_chunk(&self, rows: &[StoredRow]) -> Result<Written, Failure> {
        let mut text = Vec::with_capacity(rows.iter().map(StoredRow::approximate_bytes).sum());
        copy_rows(rows, &mut text);
        match copy_direct(&self.pool, &text).await {
            Ok(inserted) => Ok(Written {
                inserted,
                ..Written::default()
            }),
            Err(error) => match classify(error) {
                Failure::Duplicate => {
                    let inserted = copy_staged(&self.pool, &text).await.map_err(classify)?;
                    Ok(Written {
                        inserted,
                        duplicates: rows.len() as u64 - inserted,
                        made_raw: 0,
                    })
                }
                other => Err(other),
            },
        }
    }
}

/// Takes the write-order lock: sequence numbers drawn after it commit in order.
async fn lock_write_order(connection: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(WRITE_ORDER_LOCK)
        .execute(connection)
        .await
        .map(|_| ())
}

/// A connection whose statement failed is closed, not returned to the pool: a COPY cut short
/// leaves nothing worth reusing.
fn discard_on_error<T>(connection: PoolConnection<Postgres>, result: &Result<T, sqlx::Error>) {
    if result.is_err() {
        drop(connection.detach());
    }
}

async fn copy_direct(pool: &PgPool, text: &[u8]) -> Result<u64, sqlx::Error> {
    let mut connection = pool.acquire().await?;
    let result = async {
        let mut transaction = sqlx::Connection::begin(&mut *connection).await?;
        lock_write_order(&mut transaction).await?;
        let mut copy = transaction
            .copy_in_raw(&format!("COPY events ({COPY_COLUMNS}) FROM STDIN"))
            .await?;
        copy.send(text).await?;
        let inserted = copy.finish().await?;
        transaction.commit().await?;
        Ok(inserted)
    }
    .await;
    discard_on_error(connection, &result);
    result
}

/// COPY into a temporary table, then insert what is not stored yet, in arrival order.
async fn copy_staged(pool: &PgPool, text: &[u8]) -> Result<u64, sqlx::Error> {
    let mut connection = pool.acquire().await?;
    let result = async {
        let mut transaction = sqlx::Connection::begin(&mut *connection).await?;
        sqlx::query(&format!(
            "CREATE TEMPORARY TABLE IF NOT EXISTS events_incoming ON COMMIT DELETE ROWS \
             AS SELECT {COPY_COLUMNS} FROM events WITH NO DATA"
        ))
        .execute(&mut *transaction)
        .await?;
        let mut copy = transaction
            .copy_in_raw(&format!("COPY events_incoming ({COPY_COLUMNS}) FROM STDIN"))
            .await?;
        copy.send(text).await?;
        copy.finish().await?;
        lock_write_order(&mut transaction).await?;
        let inserted = sqlx::query(&format!(
            "INSERT INTO events ({COPY_COLUMNS}) \
             SELECT {COPY_COLUMNS} FROM events_incoming ORDER BY ctid \
             ON CONFLICT DO NOTHING"
        ))
        .execute(&mut *transaction)
        .await?
        .rows_affected();
        transaction.commit().await?;
        Ok(inserted)
    }
    .await;
    discard_on_error(connection, &result);
    result
}
