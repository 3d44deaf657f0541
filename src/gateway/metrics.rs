//! The gateway's metrics: their descriptions (so /metrics has HELP for each from the start) and
//! the periodic gauges of durable subscriptions (how many sleep, the largest lag).

use std::sync::Arc;
use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;

/// How often the subscription gauges are refreshed.
const SUBSCRIPTION_GAUGES_EVERY: Duration = Duration::from_secs(10);

pub fn describe() {
    describe_counter!(
        "eventpipe_gateway_requests_total",
        "HTTP requests by route pattern, method and status"
    );
    describe_histogram!(
        "eventpipe_gateway_request_seconds",
        Unit::Seconds,
        "Time to answer a request (a stream: until its response starts), by route"
    );
    describe_counter!(
        "eventpipe_gateway_events_accepted_total",
        "Events posted to the gateway and acknowledged by Kafka, by topic"
    );
    describe_counter!(
        "eventpipe_gateway_events_rejected_total",
        "Posted events refused (bad input, over budget, Kafka not acknowledging), by topic"
    );
    describe_counter!(
        "eventpipe_gateway_events_read_total",
        "Events the live reader read from Kafka, by topic"
    );
    describe_counter!(
        "eventpipe_gateway_frames_queued_total",
        "Live events queued for connections (one per connection an event reaches)"
    );
    describe_counter!(
        "eventpipe_gateway_frames_sent_total",
        "Frames handed to clients, by transport"
    );
    describe_histogram!(
        "eventpipe_gateway_delivery_latency_seconds",
        Unit::Seconds,
        "From an event's Kafka time to its frame leaving for the client, by transport"
    );
    describe_gauge!(
        "eventpipe_gateway_connections",
        "Open streaming connections, by transport"
    );
    describe_counter!(
        "eventpipe_gateway_connections_opened_total",
        "Streaming connections opened, by transport"
    );
    describe_counter!(
        "eventpipe_gateway_clients_dropped_total",
        "Streams the gateway ended, by reason (slow, stalled, gone, unavailable, client_message)"
    );
    describe_counter!(
        "eventpipe_gateway_catch_up_reads_total",
        "Catch-up reads for resuming clients, by source (kafka, store)"
    );
    describe_counter!(
        "eventpipe_gateway_catch_up_restarts_total",
        "Catch-ups repeated because live traffic outran them before the handover"
    );
    describe_counter!(
        "eventpipe_gateway_subscription_attaches_total",
        "Attachments to durable subscriptions"
    );
    describe_gauge!(
        "eventpipe_gateway_subscriptions",
        "Durable subscriptions, by state (active, sleeping)"
    );
    describe_gauge!(
        "eventpipe_gateway_subscription_lag_max_events",
        "The largest lag of any durable subscription: events on its partitions past its position"
    );
    describe_counter!(
        "eventpipe_gateway_tls_handshake_failures_total",
        "TLS handshakes that failed"
    );
}

/// Refreshes the subscription gauges until `shutdown`.
pub async fn subscription_gauges(gateway: Arc<Gateway>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SUBSCRIPTION_GAUGES_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match crate::gateway::subscriptions::summary(&gateway).await {
            Ok((active, sleeping, max_lag)) => {
                metrics::gauge!("eventpipe_gateway_subscriptions", "state" => "active")
                    .set(active as f64);
                metrics::gauge!("eventpipe_gateway_subscriptions", "state" => "sleeping")
                    .set(sleeping as f64);
                metrics::gauge!("eventpipe_gateway_subscription_lag_max_events")
                    .set(max_lag as f64);
            }
            Err(error) => tracing::debug!(%error, "subscription gauges"),
        }
    }
}
