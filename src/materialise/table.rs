//! The materialised table: one row per key with its version and state (jsonb), created when
//! missing, and the batch upsert that moves a row only forward in version.

use sqlx::PgPool;

use super::change::Change;

/// Serialises concurrent `CREATE TABLE IF NOT EXISTS` of one table (the generator and the stage
/// may start together; PostgreSQL's IF NOT EXISTS still races on the catalogue).
const CREATE_LOCK: i64 = 0x6d61_7465_7269_616c;

/// A table name checked as a plain lower-case SQL identifier (it is spliced into statements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName(String);

impl TableName {
    pub fn parse(name: &str) -> Result<TableName, String> {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        if !first_ok
            || name.len() > 63
            || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err("expected a lower-case SQL name: a-z, 0-9 and _, not starting with a digit, at most 63 characters".into());
        }
        Ok(TableName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Creates the table if it does not exist yet.
pub async fn ensure(pool: &PgPool, table: &TableName) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(CREATE_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (
             key text PRIMARY KEY,
             version bigint NOT NULL,
             state jsonb NOT NULL,
             updated_at timestamptz NOT NULL DEFAULT now()
         )"
    ))
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Applies a batch's rounds (`change::rounds`) in one transaction, a statement each: a row
/// moves only when the change's version is newer than the row's, its state merged over the
/// row's (fields the change does not name are kept). Returns how many changes were applied
/// (inserted or moved a row); the rest were stale.
pub async fn upsert(
    pool: &PgPool,
    table: &TableName,
    rounds: &[Vec<&Change>],
) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut applied = 0;
    for round in rounds {
        applied += upsert_round(&mut tx, table, round).await?;
    }
    tx.commit().await?;
    Ok(applied)
}

/// One round: at most one change per key (a statement may touch a row only once).
async fn upsert_round(
    tx: &mut sqlx::PgTransaction<'_>,
    table: &TableName,
    changes: &[&Change],
) -> Result<u64, sqlx::Error> {
    let keys: Vec<&str> = changes.iter().map(|c| c.key.as_str()).collect();
    let versions: Vec<i64> = changes.iter().map(|c| c.version).collect();
    let states: Vec<&str> = changes.iter().map(|c| c.state.as_str()).collect();
    let result = sqlx::query(&format!(
        "INSERT INTO {table} AS t (key, version, state)
         SELECT key, version, state::jsonb
           FROM UNNEST($1::text[], $2::int8[], $3::text[]) AS u(key, version, state)
         ON CONFLICT (key) DO UPDATE
            SET version = excluded.version, state = t.state || excluded.state, updated_at = now()
          WHERE excluded.version > t.version"
    ))
    .bind(&keys)
    .bind(&versions)
    .bind(&states)
    .execute(&mut **tx)
    .await?;
    Ok(result.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        assert!(TableName::parse("products").is_ok());
        assert!(TableName::parse("_p2").is_ok());
        for bad in [
            "",
            "2p",
            "Products",
            "p; DROP TABLE x",
            "a-b",
            &"x".repeat(64),
        ] {
            assert!(TableName::parse(bad).is_err(), "{bad}");
        }
    }
}
