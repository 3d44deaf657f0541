//! Flow control's metrics: per pause, the events it holds and the age of the oldest (set by
//! every instance that watches the pauses); requests to the admin API and CLI by outcome.

use std::collections::HashMap;

use chrono::Utc;

use super::store::Pause;

pub const HELD: &str = "eventpipe_flows_pause_held_events";
pub const OLDEST_HELD: &str = "eventpipe_flows_pause_oldest_held_seconds";
pub const AGE: &str = "eventpipe_flows_pause_age_seconds";
pub const ACTIVE: &str = "eventpipe_flows_active_pauses";
pub const REQUESTS: &str = "eventpipe_flows_requests_total";
pub const OBEYED: &str = "eventpipe_flows_obeyed_pauses";

pub fn describe() {
    metrics::describe_gauge!(
        HELD,
        "Events a pause holds now (held, not yet released), over every holder and partition"
    );
    metrics::describe_gauge!(
        OLDEST_HELD,
        "Age of the oldest event a pause holds (its Kafka time), 0 when it holds none"
    );
    metrics::describe_gauge!(AGE, "How long a pause has been active");
    metrics::describe_gauge!(ACTIVE, "Pauses paused or resuming");
    metrics::describe_gauge!(
        OBEYED,
        "Active pauses in this stage's scope that its records are checked against now"
    );
    metrics::describe_counter!(
        REQUESTS,
        "Flow control requests (pause, resume, list, get) by outcome"
    );
}

/// Counts one request to the admin API or the CLI.
pub fn request(operation: &'static str, outcome: &'static str) {
    metrics::counter!(REQUESTS, "operation" => operation, "outcome" => outcome).increment(1);
}

/// Sets the gauges from the active pauses; a pause gone since (resumed) drops to 0.
pub fn record(pauses: &[Pause], shown: &mut HashMap<String, String>) {
    let now = Utc::now();
    let mut current = HashMap::new();
    for pause in pauses {
        let labels = [
            ("pause", pause.id.clone()),
            ("scope", pause.scope.to_string()),
        ];
        metrics::gauge!(HELD, &labels).set(pause.held_now() as f64);
        let oldest = pause
            .oldest_held()
            .filter(|_| pause.held_now() > 0)
            .map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0);
        metrics::gauge!(OLDEST_HELD, &labels).set(oldest);
        let age = (now - pause.paused_at).num_milliseconds().max(0) as f64 / 1000.0;
        metrics::gauge!(AGE, &labels).set(age);
        current.insert(pause.id.clone(), pause.scope.to_string());
    }
    for (gone, scope) in shown.iter().filter(|(id, _)| !current.contains_key(*id)) {
        let labels = [("pause", gone.clone()), ("scope", scope.clone())];
        for name in [HELD, OLDEST_HELD, AGE] {
            metrics::gauge!(name, &labels).set(0.0);
        }
    }
    metrics::gauge!(ACTIVE).set(pauses.len() as f64);
    *shown = current;
}
