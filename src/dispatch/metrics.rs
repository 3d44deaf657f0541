//! The dispatcher's hot-path metric handles, looked up once per label value and reused, so a
//! record costs an atomic add instead of a registry lookup and a label allocation.

use std::collections::HashMap;
use std::sync::Arc;

use metrics::{Counter, Histogram};

/// Per-loop handles (owned by the consume loop, no locking).
#[derive(Default)]
pub struct LoopMetrics {
    consumed: HashMap<Arc<str>, Counter>,
    handler_seconds: HashMap<String, Histogram>,
    dead_lettered: HashMap<(Arc<str>, &'static str), Counter>,
}

impl LoopMetrics {
    /// A record flow control held, or skipped while re-reading after a resume (rare enough
    /// for a registry lookup).
    pub fn flow(&mut self, decision: crate::flows::hold::Decision) {
        let decision = match decision {
            crate::flows::hold::Decision::Hold(_) => "held",
            crate::flows::hold::Decision::Release(_) => "released",
            crate::flows::hold::Decision::Skip => "skipped",
            crate::flows::hold::Decision::Deliver => return,
        };
        metrics::counter!("eventpipe_dispatch_flow_records_total", "decision" => decision)
            .increment(1);
    }

    pub fn consumed(&mut self, topic: &Arc<str>) {
        self.consumed
            .entry(topic.clone())
            .or_insert_with(|| metrics::counter!("eventpipe_dispatch_consumed_total", "topic" => topic.to_string()))
            .increment(1);
    }

    pub fn handler_seconds(&mut self, action: &str, seconds: f64) {
        if let Some(histogram) = self.handler_seconds.get(action) {
            histogram.record(seconds);
            return;
        }
        let histogram = metrics::histogram!("eventpipe_dispatch_handler_seconds", "action" => action.to_string());
        histogram.record(seconds);
        self.handler_seconds.insert(action.to_string(), histogram);
    }

    pub fn dead_lettered(&mut self, topic: &Arc<str>, kind: &'static str) {
        self.dead_lettered
            .entry((topic.clone(), kind))
            .or_insert_with(|| {
                metrics::counter!("eventpipe_dispatch_dead_lettered_total", "topic" => topic.to_string(), "kind" => kind)
            })
            .increment(1);
    }
}

/// Registers help text (and units) for every dispatcher metric, so /metrics is self-describing
/// and passes `promtool check metrics`.
pub fn describe() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(
        "eventpipe_dispatch_consumed_total",
        "Input records consumed, by topic."
    );
    describe_counter!(
        "eventpipe_dispatch_dead_lettered_total",
        "Input records sent to the dead-letter topic, by input topic and error kind."
    );
    describe_histogram!(
        "eventpipe_dispatch_handler_seconds",
        Unit::Seconds,
        "Time to decode, route and build the outputs of one input, by action."
    );
    describe_histogram!(
        "eventpipe_dispatch_end_to_end_seconds",
        Unit::Seconds,
        "Time from the input record's timestamp to its output's acknowledgement."
    );
}
