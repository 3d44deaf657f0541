//! Help text of the metrics the runtime records for every stage (`eventpipe_<stage>_...`), so
//! /metrics is self-describing whichever stages run.

/// Help text for the runtime's metrics of one stage.
pub(super) fn describe_metrics(stage: &'static str) {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        format!("eventpipe_{stage}_produced_total"),
        "Output records acknowledged by Kafka, by output topic (dead letters included)."
    );
    describe_counter!(
        format!("eventpipe_{stage}_dead_letter_retries_total"),
        "Dead-letter writes that failed and were retried."
    );
    describe_gauge!(
        format!("eventpipe_{stage}_paused"),
        "1 while consumption is paused because a dependency is down or behind."
    );
    describe_counter!(
        format!("eventpipe_{stage}_transactions_total"),
        "Exactly once: transactions by outcome (committed, aborted)."
    );
    describe_counter!(
        "eventpipe_stage_commit_failures_total",
        "Offset commits that failed (retried on the next tick), by stage."
    );
    describe_gauge!(
        format!("eventpipe_{stage}_in_flight_inputs"),
        "Inputs consumed and not yet acknowledged (or awaiting their dead letter)."
    );
    metrics::gauge!(format!("eventpipe_{stage}_paused")).set(0.0);
}
