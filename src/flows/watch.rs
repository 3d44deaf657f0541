//! Each instance's view of the active pauses: read from PostgreSQL at start (so a restarted
//! stage obeys a pause before its first record) and every 250 ms after, published to its users.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::store::{FlowError, FlowStore, Pause};

/// How often the pauses are read again: a pause or resume is obeyed within a second.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The active pauses (paused or resuming) with their holders' progress.
#[derive(Debug, Default)]
pub struct FlowView {
    pub pauses: Vec<Pause>,
}

/// Reads the pauses once, then keeps `FlowView` current until `shutdown`; a failed read keeps
/// the last view (and says so once), since holding on is safer than letting go.
pub async fn start(
    store: FlowStore,
    shutdown: CancellationToken,
) -> Result<watch::Receiver<Arc<FlowView>>, FlowError> {
    super::metrics::describe();
    let pauses = store.list(false).await?;
    let mut shown = HashMap::new();
    super::metrics::record(&pauses, &mut shown);
    let (sender, receiver) = watch::channel(Arc::new(FlowView { pauses }));
    tokio::spawn(async move {
        let mut failing = false;
        let mut interval = tokio::time::interval(POLL_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            match store.list(false).await {
                Ok(pauses) => {
                    if failing {
                        tracing::info!("flow control database reachable again");
                        failing = false;
                    }
                    super::metrics::record(&pauses, &mut shown);
                    if sender.send(Arc::new(FlowView { pauses })).is_err() {
                        return;
                    }
                }
                Err(error) if !failing => {
                    tracing::warn!(%error, "reading the pauses failed; keeping the last view");
                    failing = true;
                }
                Err(_) => {}
            }
        }
    });
    Ok(receiver)
}
