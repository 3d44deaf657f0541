//! PostgreSQL pools of the commands that keep tables of their own: connected quietly (no
//! "already exists" notices) with that command's migrations applied.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("PostgreSQL at {url}")]
    Connect { url: String, source: sqlx::Error },
    #[error("migrating the {what}")]
    Migrate {
        what: &'static str,
        source: sqlx::migrate::MigrateError,
    },
}

/// A pool with `migrator` applied (migrations serialize on sqlx's advisory lock, so instances
/// and the CLI may start together); `what` names the tables in an error.
pub async fn connect_migrated(
    url: &str,
    max_connections: u32,
    migrator: &Migrator,
    what: &'static str,
) -> Result<PgPool, SchemaError> {
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
    migrator
        .run(&pool)
        .await
        .map_err(|source| SchemaError::Migrate { what, source })?;
    Ok(pool)
}
