//! The store's metrics described once at start-up (help text and units), so /metrics is
//! self-describing and every dashboard series exists from the start.

/// Registers help text for every store metric and sets the state gauge to its start value.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "eventpipe_store_rows_total",
        "Rows written, by outcome: stored (new) or already_stored (a re-delivery, not stored twice)."
    );
    describe_counter!(
        "eventpipe_store_raw_rows_total",
        "Records stored raw with the reason: not UTF-8, not JSON, oversized, bad Avro."
    );
    describe_counter!(
        "eventpipe_store_refused_rows_total",
        "Rows PostgreSQL refused as values (stored raw with its reason instead)."
    );
    describe_counter!(
        "eventpipe_store_replays_skipped_total",
        "Records a replay re-published (eventpipe.replay.id): history, not stored again."
    );
    describe_counter!(
        "eventpipe_store_batches_total",
        "Transactions committed, each holding one batch."
    );
    describe_counter!(
        "eventpipe_store_retries_total",
        "Batch writes retried after PostgreSQL failed (unreachable, restarting, timed out)."
    );
    describe_counter!(
        "eventpipe_store_partitions_dropped_total",
        "Daily partitions dropped by retention."
    );
    describe_histogram!(
        "eventpipe_store_batch_seconds",
        Unit::Seconds,
        "Duration of one batch write, failed attempts included."
    );
    describe_histogram!(
        "eventpipe_store_end_to_end_seconds",
        Unit::Seconds,
        "Time from a record's Kafka timestamp to its row committing."
    );
    describe_gauge!(
        "eventpipe_store_postgres_up",
        "1 when the last write to PostgreSQL succeeded."
    );
    metrics::gauge!("eventpipe_store_postgres_up").set(0.0);
    for outcome in ["stored", "already_stored"] {
        metrics::counter!("eventpipe_store_rows_total", "outcome" => outcome).absolute(0);
    }
    // Series that only failures move exist from the start: the first one shows in rate().
    for counter in [
        "eventpipe_store_raw_rows_total",
        "eventpipe_store_refused_rows_total",
        "eventpipe_store_replays_skipped_total",
        "eventpipe_store_retries_total",
        "eventpipe_store_partitions_dropped_total",
    ] {
        metrics::counter!(counter).absolute(0);
    }
}
