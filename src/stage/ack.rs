//! Acknowledgement tracking for at-least-once delivery: an input offset becomes committable only
//! when every output derived from it (and every earlier offset of its partition) is acknowledged.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Identifies a partition of an input topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionId {
    pub topic: Arc<str>,
    pub partition: i32,
}

#[derive(Debug, Default)]
struct PartitionState {
    /// Offsets in arrival order with the number of outputs still awaiting acknowledgement.
    pending: VecDeque<(i64, u32)>,
    /// The next offset to consume once everything before it is acknowledged (Kafka's commit form).
    committable: Option<i64>,
    /// `committable` as last handed out by `take_committable`, to avoid re-storing the same value.
    stored: Option<i64>,
}

/// Per-partition bookkeeping of in-flight inputs. Not thread-safe by itself: wrap in a mutex
/// where delivery callbacks and the consumer loop share it.
#[derive(Debug, Default)]
pub struct AckTracker {
    partitions: BTreeMap<PartitionId, PartitionState>,
    in_flight: usize,
}

impl AckTracker {
    /// Records a consumed offset that will produce `outputs` records (0: done at once).
    /// Offsets of one partition must be tracked in increasing order.
    pub fn track(&mut self, id: &PartitionId, offset: i64, outputs: u32) {
        let state = self.partitions.entry(id.clone()).or_default();
        debug_assert!(state.pending.back().is_none_or(|(last, _)| *last < offset));
        state.pending.push_back((offset, outputs));
        self.in_flight += 1;
        Self::advance(state, &mut self.in_flight);
    }

    /// `offset` (already tracked) will produce `outputs` more records.
    pub fn add(&mut self, id: &PartitionId, offset: i64, outputs: u32) {
        let Some(state) = self.partitions.get_mut(id) else {
            return;
        };
        if let Ok(index) = state.pending.binary_search_by_key(&offset, |(o, _)| *o) {
            state.pending[index].1 += outputs;
        }
    }

    /// One output of `offset` was acknowledged. Unknown offsets (a revoked partition) are ignored.
    pub fn ack(&mut self, id: &PartitionId, offset: i64) {
        let Some(state) = self.partitions.get_mut(id) else {
            return;
        };
        if let Ok(index) = state.pending.binary_search_by_key(&offset, |(o, _)| *o) {
            let remaining = &mut state.pending[index].1;
            *remaining = remaining.saturating_sub(1);
            Self::advance(state, &mut self.in_flight);
        }
    }

    fn advance(state: &mut PartitionState, in_flight: &mut usize) {
        while let Some((offset, 0)) = state.pending.front().copied() {
            state.pending.pop_front();
            *in_flight -= 1;
            state.committable = Some(offset + 1);
        }
    }

    /// Committable offsets that changed since the last call, as (partition, next offset).
    pub fn take_committable(&mut self) -> Vec<(PartitionId, i64)> {
        let mut changed = Vec::new();
        for (id, state) in &mut self.partitions {
            if let Some(next) = state.committable {
                if state.stored != Some(next) {
                    state.stored = Some(next);
                    changed.push((id.clone(), next));
                }
            }
        }
        changed
    }

    /// Every partition's committable offset (Kafka's "next offset" form), whether or not it
    /// changed: the committer compares them with what the broker confirmed.
    pub fn committable_offsets(&self) -> impl Iterator<Item = (&PartitionId, i64)> {
        self.partitions
            .iter()
            .filter_map(|(id, state)| Some((id, state.committable?)))
    }

    /// The oldest offset of a partition still awaiting acknowledgement.
    pub fn first_pending(&self, id: &PartitionId) -> Option<i64> {
        self.partitions.get(id)?.pending.front().map(|(o, _)| *o)
    }

    /// Inputs not yet fully acknowledged, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Inputs not yet fully acknowledged on one partition.
    pub fn pending_on(&self, id: &PartitionId) -> usize {
        self.partitions.get(id).map_or(0, |s| s.pending.len())
    }

    /// Forgets a partition (after its final commit on revoke); late acks for it are ignored.
    pub fn forget(&mut self, id: &PartitionId) -> Option<i64> {
        let state = self.partitions.remove(id)?;
        self.in_flight -= state.pending.len();
        state.committable
    }
}

/// Locks a tracker shared with delivery callbacks. A poisoned lock only means a panic
/// elsewhere; the bookkeeping itself stays consistent.
pub fn lock(tracker: &std::sync::Mutex<AckTracker>) -> std::sync::MutexGuard<'_, AckTracker> {
    tracker.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> PartitionId {
        PartitionId {
            topic: "in".into(),
            partition: n,
        }
    }

    #[test]
    fn commits_only_the_contiguous_acknowledged_prefix() {
        let mut t = AckTracker::default();
        for offset in 10..15 {
            t.track(&p(0), offset, 2);
        }
        assert!(t.take_committable().is_empty());
        // Offset 11 completes first: nothing committable while 10 is pending.
        t.ack(&p(0), 11);
        t.ack(&p(0), 11);
        assert!(t.take_committable().is_empty());
        t.ack(&p(0), 10);
        assert!(
            t.take_committable().is_empty(),
            "10 still has one output pending"
        );
        t.ack(&p(0), 10);
        assert_eq!(t.take_committable(), vec![(p(0), 12)]);
        assert!(
            t.take_committable().is_empty(),
            "unchanged offsets are not repeated"
        );
        assert_eq!(t.in_flight(), 3);
    }

    #[test]
    fn zero_output_inputs_complete_immediately_and_partitions_are_independent() {
        let mut t = AckTracker::default();
        t.track(&p(0), 0, 0);
        t.track(&p(1), 5, 1);
        t.track(&p(1), 6, 0);
        assert_eq!(t.take_committable(), vec![(p(0), 1)]);
        t.ack(&p(1), 5);
        assert_eq!(t.take_committable(), vec![(p(1), 7)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn forgotten_partitions_ignore_late_acks() {
        let mut t = AckTracker::default();
        t.track(&p(0), 1, 1);
        t.track(&p(0), 2, 1);
        t.ack(&p(0), 1);
        assert_eq!(t.forget(&p(0)), Some(2));
        assert_eq!(t.in_flight(), 0);
        t.ack(&p(0), 2);
        assert!(t.take_committable().is_empty());
    }

    #[test]
    fn many_random_orders_never_commit_past_a_pending_offset() {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for _ in 0..200 {
            let mut t = AckTracker::default();
            let mut acks: Vec<i64> = Vec::new();
            for offset in 0..50 {
                t.track(&p(0), offset, 2);
                acks.extend([offset, offset]);
            }
            acks.shuffle(&mut rng);
            let mut remaining = [2u32; 50];
            let mut committed = 0;
            for offset in acks {
                t.ack(&p(0), offset);
                remaining[offset as usize] -= 1;
                if let Some((_, next)) = t.take_committable().pop() {
                    assert!(next > committed);
                    committed = next;
                }
                let expected = remaining.iter().position(|r| *r > 0).unwrap_or(50) as i64;
                assert_eq!(
                    committed, expected,
                    "committed exactly the acknowledged prefix"
                );
            }
            assert_eq!(committed, 50);
        }
    }
}
