//! Batching for stages that write to a sink of their own and acknowledge later
//! (`Handled::Pending`): one filling batch, one closed batch waiting for room, and a writer task.
//!
//! Memory is bounded by (writer concurrency + 3) batches (filling, waiting, one queued, those
//! being written); when both buffers are full the stage answers `Unavailable`, and the runtime
//! holds the record and pauses the assignment (polling goes on): backpressure, never growth.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{PartitionHooks, PartitionId, StageError};

/// When a batch is full (by count or bytes) or due (by age).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchLimits {
    pub max_items: usize,
    pub max_bytes: usize,
    pub max_age: Duration,
}

/// Items bound for one write.
pub struct Batch<T> {
    pub items: Vec<T>,
    bytes: usize,
    opened: Option<Instant>,
}

impl<T> Default for Batch<T> {
    fn default() -> Self {
        Batch {
            items: Vec::new(),
            bytes: 0,
            opened: None,
        }
    }
}

impl<T> Batch<T> {
    fn push(&mut self, item: T, bytes: usize) {
        self.bytes += bytes;
        self.opened.get_or_insert_with(Instant::now);
        self.items.push(item);
    }

    fn is_full(&self, limits: &BatchLimits) -> bool {
        self.items.len() >= limits.max_items || self.bytes >= limits.max_bytes
    }

    fn is_due(&self, limits: &BatchLimits) -> bool {
        self.opened
            .is_some_and(|opened| opened.elapsed() >= limits.max_age)
    }
}

/// The stage's side of the batching: fill, close, hand over, and the final drain.
pub struct Batcher<T> {
    limits: BatchLimits,
    /// Named in the `Unavailable` answer while the writer is behind.
    dependency: &'static str,
    filling: Batch<T>,
    /// A closed batch the writer has no room for yet.
    waiting: Option<Batch<T>>,
    sender: Option<mpsc::Sender<Batch<T>>>,
    writer: Option<JoinHandle<()>>,
    /// Items handed to the writer and not yet written (what a revocation waits for).
    handed: Arc<AtomicUsize>,
    /// Cancelled at the drain deadline: the writer stops retrying.
    give_up: CancellationToken,
    /// Set when the writer stopped for good.
    fatal: Arc<Mutex<Option<String>>>,
}

impl<T: Send + 'static> Batcher<T> {
    /// Starts the writer task: `write` gets each batch's items and the give-up token, and
    /// retries until the items are acknowledged (or the token is cancelled); an error stops
    /// the stage. Up to `concurrency` writes run at once, finishing in any order; with 1 the
    /// batches are written one after the other, in order. `handed` counts the items handed to
    /// the writer and not yet written (what the stage's `PartitionHooks::outstanding` reports).
    pub fn start<W, F>(
        limits: BatchLimits,
        dependency: &'static str,
        concurrency: usize,
        handed: Arc<AtomicUsize>,
        write: W,
    ) -> Batcher<T>
    where
        W: Fn(Vec<T>, CancellationToken) -> F + Send + Sync + 'static,
        F: Future<Output = Result<(), StageError>> + Send,
    {
        let (sender, receiver) = mpsc::channel::<Batch<T>>(1);
        let give_up = CancellationToken::new();
        let fatal: Arc<Mutex<Option<String>>> = Arc::default();
        let writer = {
            let (handed, give_up, fatal) = (handed.clone(), give_up.clone(), fatal.clone());
            tokio::spawn(async move {
                use futures::stream::{StreamExt, TryStreamExt};
                let batches = futures::stream::unfold(receiver, |mut receiver| async move {
                    receiver.recv().await.map(|batch| (batch, receiver))
                });
                let write = &write;
                let result = batches
                    .map(|batch| {
                        let (handed, give_up) = (handed.clone(), give_up.clone());
                        async move {
                            let count = batch.items.len();
                            let result = write(batch.items, give_up).await;
                            handed.fetch_sub(count, Ordering::Relaxed);
                            result
                        }
                    })
                    .buffer_unordered(concurrency.max(1))
                    .try_for_each(|()| async { Ok(()) })
                    .await;
                if let Err(error) = result {
                    tracing::error!(%error, "writer stopped");
                    *fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
                }
            })
        };
        Batcher {
            limits,
            dependency,
            filling: Batch::default(),
            waiting: None,
            sender: Some(sender),
            writer: Some(writer),
            handed,
            give_up,
            fatal,
        }
    }

    fn check_writer(&self) -> Result<(), StageError> {
        match &*self.fatal.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(reason) => Err(StageError::Fatal(reason.clone())),
            None => Ok(()),
        }
    }

    /// Before taking a record: `Unavailable` while both buffers are full (the writer is behind).
    pub fn check_room(&mut self) -> Result<(), StageError> {
        self.check_writer()?;
        self.hand_over()?;
        if self.waiting.is_some() && self.filling.is_full(&self.limits) {
            return Err(StageError::Unavailable {
                dependency: self.dependency,
                reason: "the writer is behind".into(),
            });
        }
        Ok(())
    }

    /// Adds an item (call `check_room` first); closes the batch when it is full.
    pub fn push(&mut self, item: T, bytes: usize) -> Result<(), StageError> {
        self.filling.push(item, bytes);
        if self.filling.is_full(&self.limits) && self.waiting.is_none() {
            self.waiting = Some(std::mem::take(&mut self.filling));
            self.hand_over()?;
        }
        Ok(())
    }

    /// Closes the filling batch when it is due and hands over what waits.
    pub fn tick(&mut self) -> Result<(), StageError> {
        self.check_writer()?;
        if self.filling.is_due(&self.limits) && self.waiting.is_none() {
            self.waiting = Some(std::mem::take(&mut self.filling));
        }
        self.hand_over()
    }

    /// Hands the waiting batch to the writer if it has room.
    fn hand_over(&mut self) -> Result<(), StageError> {
        let Some(waiting) = self.waiting.take() else {
            return Ok(());
        };
        let Some(sender) = &self.sender else {
            return Err(StageError::Fatal("writer stopped".into()));
        };
        let count = waiting.items.len();
        // Counted before the handover: the writer may finish it before `try_send` returns.
        self.handed.fetch_add(count, Ordering::Relaxed);
        match sender.try_send(waiting) {
            Ok(()) => {
                if self.filling.is_full(&self.limits) {
                    self.waiting = Some(std::mem::take(&mut self.filling));
                }
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(waiting)) => {
                self.handed.fetch_sub(count, Ordering::Relaxed);
                self.waiting = Some(waiting);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.handed.fetch_sub(count, Ordering::Relaxed);
                self.check_writer()?;
                Err(StageError::Fatal("writer stopped".into()))
            }
        }
    }

    /// Graceful stop: hands over what is buffered, lets the writer finish until `deadline`,
    /// then tells it to give up (what it did not write stays unacknowledged, read again later).
    pub async fn finish(&mut self, deadline: Instant) -> Result<(), StageError> {
        self.check_writer()?;
        if let Some(sender) = self.sender.take() {
            for pending in [self.waiting.take(), Some(std::mem::take(&mut self.filling))]
                .into_iter()
                .flatten()
            {
                if pending.items.is_empty() {
                    continue;
                }
                let count = pending.items.len();
                self.handed.fetch_add(count, Ordering::Relaxed);
                if tokio::time::timeout_at(deadline, sender.send(pending))
                    .await
                    .is_err()
                {
                    self.handed.fetch_sub(count, Ordering::Relaxed);
                    break;
                }
            }
        }
        let stopper = {
            let give_up = self.give_up.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline).await;
                give_up.cancel();
            })
        };
        if let Some(writer) = self.writer.take() {
            let _ = writer.await;
        }
        stopper.abort();
        self.check_writer()
    }
}

/// The hooks of a stage whose records wait in a `Batcher`: a revocation waits only for what
/// the writer holds (`handed`). Records still in a batch cannot progress while the runtime is in
/// the rebalance callback; the next owner reads them again, and the stage's sink is idempotent.
pub struct WriterHooks {
    pub handed: Arc<AtomicUsize>,
}

impl PartitionHooks for WriterHooks {
    fn outstanding(&self, _: &[PartitionId]) -> Option<usize> {
        Some(self.handed.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_close_when_full_and_the_writer_gets_them_in_order() {
        let written: Arc<Mutex<Vec<Vec<u32>>>> = Arc::default();
        let limits = BatchLimits {
            max_items: 3,
            max_bytes: usize::MAX,
            max_age: Duration::from_secs(3600),
        };
        let sink = written.clone();
        let mut batcher = Batcher::start(
            limits,
            "sink",
            1,
            Arc::default(),
            move |items: Vec<u32>, _| {
                let sink = sink.clone();
                async move {
                    sink.lock().unwrap().push(items);
                    Ok(())
                }
            },
        );
        for i in 0..7 {
            loop {
                match batcher.check_room() {
                    Ok(()) => break,
                    Err(StageError::Unavailable { .. }) => tokio::task::yield_now().await,
                    Err(other) => panic!("{other}"),
                }
            }
            batcher.push(i, 1).unwrap();
        }
        batcher
            .finish(Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            *written.lock().unwrap(),
            vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]
        );
        assert_eq!(batcher.handed.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_writer_error_stops_the_stage() {
        let limits = BatchLimits {
            max_items: 1,
            max_bytes: usize::MAX,
            max_age: Duration::from_secs(3600),
        };
        let mut batcher =
            Batcher::start(limits, "sink", 1, Arc::default(), |_: Vec<u32>, _| async {
                Err(StageError::Fatal("disk on fire".into()))
            });
        batcher.push(1, 1).unwrap();
        let error = batcher
            .finish(Instant::now() + Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("disk on fire"), "{error}");
    }
}
