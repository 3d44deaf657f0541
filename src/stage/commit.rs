//! Offset commits of the at-least-once policies: what each partition may commit, what the broker
//! confirmed (through the commit callback), and retrying what was requested but not confirmed.
//!
//! eventpipe commits explicitly instead of using librdkafka's auto-commit: an automatic commit of
//! a stale offset store could land after the revocation's synchronous commit and move a
//! partition back, re-delivering finished work.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use super::{Checkpoint, PartitionId};

/// A requested commit not confirmed within this time is requested again.
const RETRY_UNCONFIRMED_AFTER: Duration = Duration::from_secs(1);

#[derive(Default)]
struct State {
    /// What the broker confirmed, per partition.
    confirmed: BTreeMap<PartitionId, Checkpoint>,
    /// What was last requested and when, to avoid re-sending the same commit every tick.
    requested: BTreeMap<PartitionId, (Checkpoint, Instant)>,
}

/// Commit bookkeeping shared by the loop (which requests) and the consumer context (whose
/// commit callback confirms).
pub(crate) struct Committer {
    stage: &'static str,
    state: Mutex<State>,
    failures: metrics::Counter,
}

impl Committer {
    pub(crate) fn new(stage: &'static str) -> Committer {
        Committer {
            stage,
            state: Mutex::default(),
            failures: metrics::counter!("eventpipe_stage_commit_failures_total", "stage" => stage),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests (asynchronously, or synchronously for a final commit) the checkpoints of
    /// assigned partitions that differ from what the broker confirmed. A failed commit is
    /// logged, counted and requested again on a later call.
    pub(crate) fn commit<C: ConsumerContext, K: Consumer<C>>(
        &self,
        consumer: &K,
        desired: Vec<(PartitionId, Checkpoint)>,
        mode: CommitMode,
    ) {
        let assigned = consumer.assignment().unwrap_or_default();
        let now = Instant::now();
        let due: Vec<(PartitionId, Checkpoint)> = {
            let state = self.state();
            desired
                .into_iter()
                // A partition revoked since: its offsets were committed by the revocation.
                .filter(|(id, _)| assigned.find_partition(&id.topic, id.partition).is_some())
                .filter(|(id, checkpoint)| state.confirmed.get(id) != Some(checkpoint))
                .filter(|(id, checkpoint)| {
                    matches!(mode, CommitMode::Sync)
                        || !state.requested.get(id).is_some_and(|(requested, at)| {
                            requested == checkpoint && now - *at < RETRY_UNCONFIRMED_AFTER
                        })
                })
                .collect()
        };
        if due.is_empty() {
            return;
        }
        match consumer.commit(&commit_list(&due), mode) {
            Ok(()) => {
                let mut state = self.state();
                for (id, checkpoint) in due {
                    if matches!(mode, CommitMode::Sync) {
                        state.requested.remove(&id);
                        state.confirmed.insert(id, checkpoint);
                    } else {
                        state.requested.insert(id, (checkpoint, now));
                    }
                }
            }
            Err(error) => self.failed(&error.to_string(), mode),
        }
    }

    /// Commits `checkpoints` synchronously, whatever was confirmed before (a partition moved
    /// back commits a lower offset); false when the commit failed.
    pub(crate) fn commit_now<C: ConsumerContext, K: Consumer<C>>(
        &self,
        consumer: &K,
        checkpoints: Vec<(PartitionId, Checkpoint)>,
    ) -> bool {
        match consumer.commit(&commit_list(&checkpoints), CommitMode::Sync) {
            Ok(()) => {
                let mut state = self.state();
                for (id, checkpoint) in checkpoints {
                    state.requested.remove(&id);
                    state.confirmed.insert(id, checkpoint);
                }
                true
            }
            Err(error) => {
                self.failed(&error.to_string(), CommitMode::Sync);
                false
            }
        }
    }

    /// The commit callback: an asynchronous commit completed.
    pub(crate) fn completed(
        &self,
        result: &rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        if let Err(error) = result {
            self.failed(&error.to_string(), CommitMode::Async);
            return;
        }
        let mut state = self.state();
        for element in offsets.elements() {
            let Offset::Offset(next_offset) = element.offset() else {
                continue;
            };
            let id = PartitionId {
                topic: element.topic().into(),
                partition: element.partition(),
            };
            let metadata = Some(element.metadata().to_string()).filter(|m| !m.is_empty());
            state.requested.remove(&id);
            state.confirmed.insert(
                id,
                Checkpoint {
                    next_offset,
                    metadata,
                },
            );
        }
    }

    fn failed(&self, error: &str, mode: CommitMode) {
        self.failures.increment(1);
        // Requested again on the next tick (or, for a final commit, re-delivered after a restart).
        self.state().requested.clear();
        let stage = self.stage;
        match mode {
            CommitMode::Async => {
                tracing::warn!(stage, %error, "offset commit failed; retrying on the next tick")
            }
            CommitMode::Sync => tracing::warn!(
                stage,
                %error,
                "offset commit failed; inputs since the last commit will be re-delivered"
            ),
        }
    }

    /// Commits a revoked partition's final checkpoint synchronously and forgets it.
    pub(crate) fn commit_revoked<C: ConsumerContext, K: Consumer<C>>(
        &self,
        consumer: &K,
        revoked: Vec<(PartitionId, Checkpoint)>,
        all_revoked: &[PartitionId],
    ) {
        {
            let mut state = self.state();
            for id in all_revoked {
                state.confirmed.remove(id);
                state.requested.remove(id);
            }
        }
        if revoked.is_empty() {
            return;
        }
        match consumer.commit(&commit_list(&revoked), CommitMode::Sync) {
            Ok(()) => tracing::info!(
                stage = self.stage,
                partitions = revoked.len(),
                "committed revoked partitions"
            ),
            Err(error) => {
                self.failures.increment(1);
                tracing::warn!(stage = self.stage, %error, "commit on revocation failed; the next owner re-reads from the previous commit")
            }
        }
    }
}

/// A commit list: each partition's next offset, with its metadata when it has some.
pub(crate) fn commit_list(checkpoints: &[(PartitionId, Checkpoint)]) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for (id, checkpoint) in checkpoints {
        let mut element = list.add_partition(&id.topic, id.partition);
        let _ = element.set_offset(Offset::Offset(checkpoint.next_offset));
        if let Some(metadata) = &checkpoint.metadata {
            element.set_metadata(metadata.clone());
        }
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(partition: i32) -> PartitionId {
        PartitionId {
            topic: "in".into(),
            partition,
        }
    }

    #[test]
    fn commit_lists_carry_offsets_and_metadata() {
        let list = commit_list(&[
            (
                id(0),
                Checkpoint {
                    next_offset: 42,
                    metadata: Some("m".into()),
                },
            ),
            (
                id(1),
                Checkpoint {
                    next_offset: 7,
                    metadata: None,
                },
            ),
        ]);
        let first = list.find_partition("in", 0).unwrap();
        assert_eq!(first.offset(), Offset::Offset(42));
        assert_eq!(first.metadata(), "m");
        assert_eq!(
            list.find_partition("in", 1).unwrap().offset(),
            Offset::Offset(7)
        );
    }

    #[test]
    fn only_a_confirmed_commit_stops_the_retries() {
        let committer = Committer::new("test");
        let checkpoint = Checkpoint {
            next_offset: 5,
            metadata: None,
        };
        committer
            .state()
            .requested
            .insert(id(0), (checkpoint.clone(), Instant::now()));
        // A failed asynchronous commit: the request is forgotten, so the next tick sends it again.
        committer.completed(
            &Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::RequestTimedOut,
            )),
            &commit_list(&[(id(0), checkpoint.clone())]),
        );
        assert!(committer.state().requested.is_empty());
        assert!(committer.state().confirmed.is_empty());
        committer.completed(&Ok(()), &commit_list(&[(id(0), checkpoint.clone())]));
        assert_eq!(committer.state().confirmed.get(&id(0)), Some(&checkpoint));
    }
}
