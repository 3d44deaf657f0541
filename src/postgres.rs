//! PostgreSQL for the commands that keep tables of their own: pools connected quietly (no
//! "already exists" notices) with the command's migrations applied, and the writers' retry.

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

/// How a stage's writer retries a batch PostgreSQL did not take: with backoff, keeping the
/// stage's `eventpipe_<stage>_batch_seconds`, `_retries_total`, `_postgres_up` and its
/// readiness (`postgres`) current. The store and the materialiser write through it:
///
/// ```ignore
/// let written = loop {
///     if give_up.is_cancelled() { return Ok(()) } // unacknowledged: read again later
///     match retry.attempt(write(&rows)).await {
///         Ok(written) => break written,
///         Err(error) => retry.wait(&error, rows.len(), &give_up).await,
///     }
/// };
/// ```
pub struct WriteRetry<'a> {
    stage: &'static str,
    readiness: &'a crate::telemetry::Readiness,
    backoff: crate::log::bulk::Backoff,
}

impl<'a> WriteRetry<'a> {
    pub fn new(
        stage: &'static str,
        readiness: &'a crate::telemetry::Readiness,
        initial: Duration,
        max: Duration,
    ) -> Self {
        WriteRetry {
            stage,
            readiness,
            backoff: crate::log::bulk::Backoff::new(initial, max),
        }
    }

    /// One write attempt, timed, with PostgreSQL's state set from its outcome.
    pub async fn attempt<T, E>(
        &self,
        write: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = std::time::Instant::now();
        let result = write.await;
        metrics::histogram!(format!("eventpipe_{}_batch_seconds", self.stage))
            .record(started.elapsed().as_secs_f64());
        let up = result.is_ok();
        self.readiness.set("postgres", up);
        metrics::gauge!(format!("eventpipe_{}_postgres_up", self.stage)).set(if up {
            1.0
        } else {
            0.0
        });
        result
    }

    /// After a failed attempt: counts and logs it, then waits the backoff (or until `give_up`).
    pub async fn wait(
        &mut self,
        error: &(dyn std::fmt::Display + Sync),
        rows: usize,
        give_up: &tokio_util::sync::CancellationToken,
    ) {
        let delay = self.backoff.next_delay(rand::random());
        metrics::counter!(format!("eventpipe_{}_retries_total", self.stage)).increment(1);
        tracing::warn!(
            %error,
            rows,
            attempt = self.backoff.attempts(),
            delay_ms = delay.as_millis() as u64,
            "writing to PostgreSQL failed; retrying (consumption pauses meanwhile)"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = give_up.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every stage's migrator shares one `_sqlx_migrations` table and ignores the others'
    /// versions: two directories using one version would make one of them fail its checksum.
    #[test]
    fn migration_versions_are_unique_across_every_directory() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut seen = std::collections::HashMap::new();
        for directory in std::fs::read_dir(&root).unwrap() {
            let directory = directory.unwrap().path();
            for file in std::fs::read_dir(&directory).unwrap() {
                let file = file.unwrap().path();
                let name = file.file_name().unwrap().to_string_lossy().into_owned();
                let version = name.split('_').next().unwrap().to_string();
                if let Some(other) = seen.insert(version.clone(), file.clone()) {
                    panic!(
                        "version {version}: {} and {}",
                        other.display(),
                        file.display()
                    );
                }
            }
        }
        assert!(seen.len() >= 7, "{seen:?}");
    }
}
