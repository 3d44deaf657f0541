//! The log stage's metrics described once at start-up (help text and units), so /metrics is
//! self-describing, passes `promtool check metrics`, and every dashboard series exists from the start.

/// Registers help text for every log-stage metric and sets the state gauges to their start values.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "eventpipe_log_consumed_total",
        "Input records consumed, by topic."
    );
    describe_counter!(
        "eventpipe_log_indexed_total",
        "Documents Elasticsearch acknowledged as created."
    );
    describe_counter!(
        "eventpipe_log_already_indexed_total",
        "Documents answered 409 (already indexed by an earlier attempt): replays after a restart or rebalance."
    );
    describe_counter!(
        "eventpipe_log_dead_lettered_total",
        "Records sent to the dead-letter topic, by error kind (decode errors, elasticsearch_rejected)."
    );
    describe_counter!(
        "eventpipe_log_bulk_retries_total",
        "Documents sent again after a retryable bulk failure (429, 5xx, unreachable)."
    );
    describe_histogram!(
        "eventpipe_log_end_to_end_seconds",
        Unit::Seconds,
        "Time from the info_in record's timestamp to Elasticsearch (or the dead-letter topic) acknowledging it."
    );
    describe_histogram!(
        "eventpipe_log_bulk_seconds",
        Unit::Seconds,
        "Duration of one bulk request, failed ones included."
    );
    describe_gauge!(
        "eventpipe_log_elasticsearch_up",
        "1 when the last request to Elasticsearch succeeded."
    );
    metrics::gauge!("eventpipe_log_elasticsearch_up").set(0.0);
}
