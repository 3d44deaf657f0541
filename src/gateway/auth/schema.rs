//! The gateway's PostgreSQL schema for credentials: its own migrations (migrations/gateway),
//! kept under the bookkeeping table the other stages' migrators share.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("PostgreSQL at {url}")]
    Connect { url: String, source: sqlx::Error },
    #[error("migrating the gateway's credential tables")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// The gateway's migrations; each migrator ignores the versions of the others (store,
/// aggregate) in the shared `_sqlx_migrations` table.
pub fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations/gateway");
    migrator.set_ignore_missing(true);
    migrator
}

/// A pool with the credential tables in place (migrations serialize on sqlx's advisory lock, so
/// instances and the CLI may start together).
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, SchemaError> {
    let connect_error = |source| SchemaError::Connect {
        url: crate::config::redact_url(url),
        source,
    };
    // Without it, every run of a command prints PostgreSQL's "already exists, skipping" notice
    // of the migrator's CREATE TABLE IF NOT EXISTS.
    let options = PgConnectOptions::from_str(url)
        .map_err(connect_error)?
        .options([("client_min_messages", "warning")]);
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(connect_error)?;
    migrator().run(&pool).await?;
    Ok(pool)
}
