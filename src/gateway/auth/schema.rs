//! The gateway's PostgreSQL schema for credentials: its own migrations (migrations/gateway),
//! kept under the bookkeeping table the other stages' migrators share.

use sqlx::PgPool;

pub use crate::postgres::SchemaError;

/// The gateway's migrations; each migrator ignores the versions of the others (store,
/// aggregate, flows) in the shared `_sqlx_migrations` table.
pub fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations/gateway");
    migrator.set_ignore_missing(true);
    migrator
}

/// A pool with the credential tables in place.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, SchemaError> {
    crate::postgres::connect_migrated(
        url,
        max_connections,
        &migrator(),
        "gateway's credential tables",
    )
    .await
}
