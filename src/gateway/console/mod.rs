//! The console (`GET /console`): the page where a person sees the pipeline — stages, topics,
//! subscriptions, connections, a live tail — and manages subscriptions, users and keys.
//!
//! The page is static HTML, JavaScript and CSS compiled into the binary and served under the
//! pages' strict policy; everything it shows comes from `GET /v1/admin/overview` (admin only),
//! built from memory: `stages` scrapes the stages' metrics, `topics` scans Kafka while someone
//! looks. The admin logs in once with the admin token (`POST /v1/login`, bearer) and the page
//! then holds only an HttpOnly session cookie, which also authenticates its EventSource.

pub mod stages;
pub mod topics;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRef, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::KafkaSettings;
use crate::filter::FilterSet;
use crate::gateway::auth::{AdminCaller, Authenticator};
use crate::gateway::fanout::QueueFill;
use crate::gateway::http::ApiError;
use crate::gateway::pages::{self, Asset, CSS, HTML, JAVASCRIPT};
use crate::gateway::subscriptions::{self, SubscriptionView};
use crate::gateway::Gateway;
pub use stages::{StageTarget, DEFAULT_STAGES};

/// The page and its assets, beside each other so the page links them relatively.
const ASSETS: &[Asset] = &[
    Asset {
        path: "/console",
        content_type: HTML,
        body: include_str!("console.html"),
    },
    Asset {
        path: "/console.js",
        content_type: JAVASCRIPT,
        body: include_str!("console.js"),
    },
    Asset {
        path: "/console.css",
        content_type: CSS,
        body: include_str!("console.css"),
    },
];

/// What the console reads from, kept by the gateway.
pub struct Console {
    pub stages: Arc<stages::Stages>,
    pub topics: Arc<topics::Topics>,
}

impl Console {
    /// Starts scraping `targets` and (while someone looks) scanning topics, until `shutdown`.
    pub fn start(
        targets: &[StageTarget],
        kafka: &KafkaSettings,
        shutdown: &CancellationToken,
    ) -> Console {
        let stages = stages::Stages::new(targets);
        let topics = topics::Topics::new(kafka);
        tokio::spawn(stages.clone().run(shutdown.clone()));
        tokio::spawn(topics.clone().run(shutdown.clone()));
        Console { stages, topics }
    }
}

impl FromRef<Arc<Gateway>> for Authenticator {
    fn from_ref(gateway: &Arc<Gateway>) -> Authenticator {
        gateway.auth.clone()
    }
}

/// The page, its assets and the overview.
pub fn routes(gateway: Arc<Gateway>) -> Router {
    pages::routes_of(ASSETS)
        .route("/v1/admin/overview", get(overview))
        .with_state(gateway)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OverviewQuery {
    /// Leave out the stages' rate history (the charts) when false.
    #[serde(default = "yes")]
    history: bool,
}

fn yes() -> bool {
    true
}

/// A live connection's queue.
#[derive(Debug, Serialize)]
struct QueueView {
    filters: String,
    topics: Vec<String>,
    queued: usize,
    capacity: usize,
}

impl From<&QueueFill> for QueueView {
    fn from(fill: &QueueFill) -> QueueView {
        QueueView {
            filters: fill.filters.to_string(),
            topics: fill.topics.clone(),
            queued: fill.queued,
            capacity: fill.capacity,
        }
    }
}

/// A durable subscription with the queue of its live connection on this instance.
#[derive(Debug, Serialize)]
struct SubscriptionRow {
    #[serde(flatten)]
    subscription: SubscriptionView,
    /// The fullest queue among this instance's connections reading exactly its selection:
    /// `None` when none does here (it sleeps, or its client is attached to another instance).
    queue: Option<QueueView>,
}

#[derive(Debug, Serialize)]
struct Overview {
    generated_at: DateTime<Utc>,
    /// The topics this gateway serves.
    served_topics: Vec<String>,
    stages: Vec<stages::StageView>,
    topics: topics::TopicsView,
    subscriptions: Vec<SubscriptionRow>,
    /// Why the subscriptions could not be read (PostgreSQL down), if so.
    subscriptions_error: Option<String>,
    connections: usize,
    /// The fullest queues first.
    queues: Vec<QueueView>,
    /// Streams this gateway ended since it started, by reason (`slow`, `stalled`, `revoked`,
    /// ...): the consumers that dropped.
    dropped: BTreeMap<String, f64>,
}

/// Queues shown at most (the fullest ones).
const QUEUES_SHOWN: usize = 50;

async fn overview(
    _: AdminCaller,
    State(gateway): State<Arc<Gateway>>,
    query: Result<Query<OverviewQuery>, QueryRejection>,
) -> Result<Json<Overview>, ApiError> {
    let Query(query) = query.map_err(|rejection| {
        ApiError::bad_request(
            "bad_query",
            format!(
                "{} (the only parameter is history=true|false)",
                rejection.body_text()
            ),
        )
    })?;
    let console = &gateway.console;
    let mut stages = console.stages.views();
    if !query.history {
        stages.iter_mut().for_each(|s| s.history.clear());
    }
    let mut fills = gateway.sessions.hub.queues();
    fills.sort_by_key(|fill| std::cmp::Reverse(fill.queued));
    let (subscriptions, subscriptions_error) = match subscriptions::all(&gateway).await {
        Ok(views) => (
            views
                .into_iter()
                .map(|subscription| {
                    let queue = matching_queue(&subscription, &fills);
                    SubscriptionRow {
                        subscription,
                        queue,
                    }
                })
                .collect(),
            None,
        ),
        Err(error) => {
            tracing::warn!(%error, "console: reading the subscriptions");
            (
                Vec::new(),
                Some("the subscription store (PostgreSQL) is unavailable".to_string()),
            )
        }
    };
    Ok(Json(Overview {
        generated_at: Utc::now(),
        served_topics: gateway.settings.topics.clone(),
        stages,
        topics: console.topics.view(),
        subscriptions,
        subscriptions_error,
        connections: fills.len(),
        queues: fills
            .iter()
            .take(QUEUES_SHOWN)
            .map(QueueView::from)
            .collect(),
        dropped: stages::by_label(
            &stages::local_samples(),
            "eventpipe_gateway_clients_dropped_total",
            "reason",
        ),
    }))
}

/// The fullest of `fills` (sorted fullest first) reading exactly what `subscription` selects.
fn matching_queue(subscription: &SubscriptionView, fills: &[QueueFill]) -> Option<QueueView> {
    if subscription.state != "active" {
        return None;
    }
    let filters = FilterSet::parse(&subscription.filters).ok()?;
    let mut topics = subscription.topics.clone();
    topics.sort();
    fills
        .iter()
        .find(|fill| {
            let mut theirs = fill.topics.clone();
            theirs.sort();
            fill.filters == filters && theirs == topics
        })
        .map(QueueView::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_links_is_served_without_inline_code() {
        let page = ASSETS[0].body;
        for linked in ["console.css", "console.js"] {
            assert!(page.contains(&format!("\"{linked}\"")), "{linked}");
            let path = format!("/{linked}");
            assert!(ASSETS.iter().any(|asset| asset.path == path), "{path}");
        }
        pages::assert_no_inline_code(page);
    }

    #[test]
    fn a_subscription_is_matched_to_a_connection_reading_exactly_its_selection() {
        let view = |state: &'static str, filters: &[&str], topics: &[&str]| SubscriptionView {
            name: "s".into(),
            owner: "admin".into(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
            topics: topics.iter().map(|s| s.to_string()).collect(),
            state,
            position: String::new(),
            lag: 0,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        };
        let fill = |filters: &[&str], topics: &[&str], queued| QueueFill {
            filters: FilterSet::parse(filters).unwrap(),
            topics: topics.iter().map(|s| s.to_string()).collect(),
            queued,
            capacity: 10,
        };
        let fills = [
            fill(&["lk:*"], &[], 7),
            fill(&["lk:*"], &["a", "b"], 3),
            fill(&["arm:*"], &["a"], 1),
        ];
        let queued = |v: &SubscriptionView| matching_queue(v, &fills).map(|q| q.queued);
        assert_eq!(queued(&view("active", &["lk:*"], &["b", "a"])), Some(3));
        assert_eq!(queued(&view("active", &["lk:*"], &[])), Some(7));
        assert_eq!(queued(&view("active", &["lk:create_user"], &[])), None);
        assert_eq!(queued(&view("sleeping", &["lk:*"], &[])), None);
    }
}
