//! The deliver/skip rule of flow control, pure: what one partition's consumer does with a record
//! given the pauses that apply to it, first pass or re-read after a resume moved it back.

use crate::filter::FilterSet;

/// One pause as it applies to one partition of one consumer.
#[derive(Debug, Clone)]
pub struct PartitionPause<'a> {
    pub filters: &'a FilterSet,
    /// Holds matching records read for the first time: paused, or resuming while this
    /// partition has not moved back yet (its `resume_at` is unknown).
    pub holding: bool,
    /// The first offset it held here, if any.
    pub first_held: Option<i64>,
    /// Where this partition stood when it moved back to release; set once, on resume.
    pub resume_at: Option<i64>,
}

impl PartitionPause<'_> {
    /// `offset` lies in what this pause releases: `[first_held, resume_at)`.
    fn releases(&self, offset: i64) -> bool {
        matches!((self.first_held, self.resume_at), (Some(first), Some(end)) if first <= offset && offset < end)
    }
}

/// What becomes of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Route it as usual.
    Deliver,
    /// Read for the first time and matched by pause `n`: not routed, kept in Kafka.
    Hold(usize),
    /// Re-read after a resume and held by pause `n` then: route it now.
    Release(usize),
    /// Re-read after a resume, and decided on the first pass (routed then, or still held by
    /// another pause): nothing to do.
    Skip,
}

/// The rule. Below any pause's `resume_at` a record was read before: it is routed iff the
/// resuming pause held it (it lies in the pause's released range and matches its filters).
/// Everything else is read for the first time: held by the holding pause that matches (at most
/// one, since overlapping pauses are refused), else routed.
pub fn decide(pauses: &[PartitionPause<'_>], offset: i64, service: &str, action: &str) -> Decision {
    let read_before = pauses
        .iter()
        .any(|p| p.resume_at.is_some_and(|end| offset < end));
    if read_before {
        return pauses
            .iter()
            .position(|p| p.releases(offset) && p.filters.matches(service, action))
            .map_or(Decision::Skip, Decision::Release);
    }
    pauses
        .iter()
        .position(|p| p.holding && p.filters.matches(service, action))
        .map_or(Decision::Deliver, Decision::Hold)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters(text: &str) -> FilterSet {
        FilterSet::parse(&[text]).unwrap()
    }

    #[test]
    fn a_paused_flow_holds_only_its_events_and_the_others_flow() {
        let lk = filters("lk:*");
        let pauses = [PartitionPause {
            filters: &lk,
            holding: true,
            first_held: Some(10),
            resume_at: None,
        }];
        assert_eq!(decide(&pauses, 12, "lk", "create_user"), Decision::Hold(0));
        assert_eq!(decide(&pauses, 13, "arm", "create_user"), Decision::Deliver);
        assert_eq!(decide(&[], 13, "lk", "create_user"), Decision::Deliver);
    }

    #[test]
    fn a_resumed_range_releases_exactly_what_was_held_then_goes_live() {
        let lk = filters("lk:*");
        let arm = filters("arm:update_user");
        let pauses = [
            // lk held from 10 and resumed at 20.
            PartitionPause {
                filters: &lk,
                holding: false,
                first_held: Some(10),
                resume_at: Some(20),
            },
            // arm:update_user still paused, holding since 15.
            PartitionPause {
                filters: &arm,
                holding: true,
                first_held: Some(15),
                resume_at: None,
            },
        ];
        // Re-read: lk's held events go, everything else there was decided already.
        assert_eq!(
            decide(&pauses, 12, "lk", "update_user"),
            Decision::Release(0)
        );
        assert_eq!(decide(&pauses, 12, "orm", "start_task"), Decision::Skip);
        assert_eq!(decide(&pauses, 16, "arm", "update_user"), Decision::Skip);
        // lk events before the pause began holding were routed then.
        assert_eq!(decide(&pauses, 9, "lk", "update_user"), Decision::Skip);
        // From resume_at on: live, and the other pause still holds.
        assert_eq!(decide(&pauses, 20, "lk", "update_user"), Decision::Deliver);
        assert_eq!(decide(&pauses, 21, "arm", "update_user"), Decision::Hold(1));
        assert_eq!(decide(&pauses, 22, "orm", "start_task"), Decision::Deliver);
    }

    #[test]
    fn a_resuming_pause_holds_until_its_partition_moved_back() {
        let lk = filters("lk:*");
        let pauses = [PartitionPause {
            filters: &lk,
            holding: true,
            first_held: Some(3),
            resume_at: None,
        }];
        // Routing it now would overtake the events held before it.
        assert_eq!(decide(&pauses, 30, "lk", "create_user"), Decision::Hold(0));
    }

    #[test]
    fn two_releases_on_one_partition_each_route_their_own() {
        let lk = filters("lk:*");
        let arm = filters("arm:*");
        let pauses = [
            PartitionPause {
                filters: &lk,
                holding: false,
                first_held: Some(10),
                resume_at: Some(40),
            },
            PartitionPause {
                filters: &arm,
                holding: false,
                first_held: Some(5),
                resume_at: Some(40),
            },
        ];
        assert_eq!(decide(&pauses, 7, "lk", "x"), Decision::Skip);
        assert_eq!(decide(&pauses, 7, "arm", "x"), Decision::Release(1));
        assert_eq!(decide(&pauses, 11, "lk", "x"), Decision::Release(0));
        assert_eq!(decide(&pauses, 11, "orm", "x"), Decision::Skip);
    }
}
