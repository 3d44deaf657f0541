//! Help text for every aggregator metric, registered at start-up so /metrics describes itself
//! (and passes `promtool check metrics`); counters a dashboard plots start at zero.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub fn describe() {
    describe_counter!(
        "eventpipe_aggregate_aggregated_events_total",
        "Events accepted into a window."
    );
    describe_counter!(
        "eventpipe_aggregate_failed_events_total",
        "Events dead-lettered, by reason (bad input, unknown function, too late, ...)."
    );
    describe_counter!(
        "eventpipe_aggregate_late_events_total",
        "Events behind the watermark, by outcome: accepted (within grace) or dead_lettered."
    );
    describe_counter!(
        "eventpipe_aggregate_emitted_windows_total",
        "Aggregates written to the sink (re-emissions of updated windows included)."
    );
    describe_counter!(
        "eventpipe_aggregate_evicted_windows_total",
        "Windows closed early because the open-window cap was reached."
    );
    describe_counter!(
        "eventpipe_aggregate_sink_retries_total",
        "Sink writes (Kafka or PostgreSQL) that failed and were retried."
    );
    describe_gauge!(
        "eventpipe_aggregate_open_windows",
        "Aggregates (name x function x window) held in memory that can still change."
    );
    describe_gauge!(
        "eventpipe_aggregate_watermark_lag_seconds",
        Unit::Seconds,
        "Wall-clock time minus the watermark."
    );
    describe_histogram!(
        "eventpipe_aggregate_end_to_end_seconds",
        Unit::Seconds,
        "From the newest contributing record's Kafka timestamp to the sink acknowledging the window's aggregate (includes waiting for the window to close)."
    );
    describe_histogram!(
        "eventpipe_aggregate_processing_seconds",
        Unit::Seconds,
        "Time to process one input event."
    );
    // A retry counter that never moved is still a series: dashboards and alerts see 0, not nothing.
    metrics::counter!("eventpipe_aggregate_sink_retries_total").absolute(0);
    for outcome in ["accepted", "dead_lettered"] {
        metrics::counter!("eventpipe_aggregate_late_events_total", "outcome" => outcome)
            .absolute(0);
    }
}
