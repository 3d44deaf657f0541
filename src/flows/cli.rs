//! `eventpipe flows pause|resume|list|show|inject`: pauses managed straight on PostgreSQL, obeyed
//! by every instance within a second; the id of a new pause alone on stdout.

use chrono::SecondsFormat;
use clap::{ArgGroup, Subcommand};

use super::store::{FlowError, FlowStore, Pause, PauseRequest};
use super::{PauseState, Scope};
use crate::config::Settings;
use crate::filter::FilterSet;

#[derive(Debug, Subcommand)]
pub enum FlowsCommand {
    /// Pause the flows the filters select: their events stay in Kafka, neither delivered nor
    /// lost, while every other flow keeps moving. Prints the pause's id.
    Pause {
        /// SERVICE:ACTION, either side `*` (repeatable or comma-separated).
        #[arg(long = "filter", value_name = "SERVICE:ACTION", required = true)]
        filters: Vec<String>,
        /// dispatch (the dispatcher's routes), gateway, subscription:NAME or all.
        #[arg(long, default_value = "dispatch")]
        scope: String,
        /// Why, shown in listings.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Resume a pause by id, or the active pauses with exactly these filters: the held events
    /// are delivered first, in their order, then the flow is live again.
    #[command(group(ArgGroup::new("which").required(true).args(["id", "filters"])))]
    Resume {
        id: Option<String>,
        #[arg(long = "filter", value_name = "SERVICE:ACTION")]
        filters: Vec<String>,
    },
    /// History injection: pause the flow, have every gateway stream the pause holds deliver the
    /// store's selection (marked replay), then what it held, then resume. Prints the pause's id
    /// and returns once the flow is resuming.
    Inject {
        /// The flow to pause: SERVICE:ACTION, either side `*` (repeatable or comma-separated).
        #[arg(long = "filter", value_name = "SERVICE:ACTION", required = true)]
        filters: Vec<String>,
        /// gateway or subscription:NAME.
        #[arg(long, required = true)]
        scope: String,
        /// What to read from the store (default: the --filter flow).
        #[arg(long = "store-filter", value_name = "SERVICE:ACTION")]
        store_filters: Vec<String>,
        /// The last N events of the selection.
        #[arg(long, value_name = "N")]
        last: Option<u64>,
        /// Kafka time at or after (as `eventpipe history` takes it: RFC 3339, a date, -1h).
        #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
        since: Option<String>,
        /// Kafka time before.
        #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
        until: Option<String>,
        /// How long the flow stays paused (at least 1s: every gateway has seen it).
        #[arg(long, default_value = "1s", value_name = "DURATION")]
        resume_after: String,
        /// Why, shown in listings.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// The active pauses (paused, resuming) with what they hold.
    List {
        /// Resumed ones too.
        #[arg(long)]
        all: bool,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One pause with its per-partition progress, as JSON.
    Show { id: String },
}

/// Who asked, as recorded with the pause.
fn caller() -> String {
    format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    )
}

fn row(pause: &Pause) -> String {
    let oldest = pause.oldest_held().map_or("-".to_string(), |t| {
        t.to_rfc3339_opts(SecondsFormat::Secs, true)
    });
    format!(
        "{:<12} {:<9} {:<28} {:<20} {:>8} {:<20} {:<20} {}",
        pause.id,
        pause.state.as_str(),
        pause.filters.to_string(),
        pause.scope.to_string(),
        pause.held_now(),
        oldest,
        pause.paused_at.to_rfc3339_opts(SecondsFormat::Secs, true),
        pause.reason
    )
}

pub async fn run(command: FlowsCommand, settings: &Settings) -> anyhow::Result<()> {
    let outcome = execute(command, settings).await;
    let (operation, error) = match &outcome {
        Ok(operation) => (*operation, None),
        Err((operation, error)) => (*operation, Some(error)),
    };
    super::metrics::request(
        operation,
        match error {
            None => "ok",
            Some(FlowError::BadFilter(_)) => "bad_filter",
            Some(FlowError::BadScope(_)) => "bad_scope",
            Some(FlowError::Conflict { .. }) => "conflicting_pause",
            Some(FlowError::BadInjection(_)) => "bad_parameter",
            Some(
                FlowError::NotFound(_) | FlowError::NoneMatching(_) | FlowError::NoSubscription(_),
            ) => "not_found",
            Some(_) => "failed",
        },
    );
    outcome
        .map(|_| ())
        .map_err(|(_, error)| anyhow::Error::new(error))
}

type Outcome = Result<&'static str, (&'static str, FlowError)>;

async fn execute(command: FlowsCommand, settings: &Settings) -> Outcome {
    let connect = || FlowStore::connect(settings.postgres_url.as_str(), 2);
    match command {
        FlowsCommand::Pause {
            filters,
            scope,
            reason,
        } => {
            let fail = |e| ("pause", e);
            let filters = FilterSet::parse(&filters).map_err(|e| fail(e.into()))?;
            let scope = scope
                .parse::<Scope>()
                .map_err(|e| fail(FlowError::BadScope(e)))?;
            let store = connect().await.map_err(fail)?;
            let pause = store
                .pause(PauseRequest {
                    filters,
                    scope,
                    reason,
                    by: caller(),
                    inject: None,
                })
                .await
                .map_err(fail)?;
            eprintln!(
                "paused {} (scope {}): every instance holds its events within a second",
                pause.filters, pause.scope
            );
            println!("{}", pause.id);
            Ok("pause")
        }
        FlowsCommand::Resume { id, filters } => {
            let fail = |e| ("resume", e);
            let store = connect().await.map_err(fail)?;
            let resumed = match id {
                Some(id) => vec![store.resume(&id, &caller()).await.map_err(fail)?],
                None => {
                    let filters = FilterSet::parse(&filters).map_err(|e| fail(e.into()))?;
                    store
                        .resume_matching(&filters, &caller())
                        .await
                        .map_err(fail)?
                }
            };
            for pause in resumed {
                match pause.state {
                    PauseState::Resumed => eprintln!("pause {} resumed", pause.id),
                    _ => eprintln!(
                        "pause {} resuming: its {} held events go first, then the flow is live",
                        pause.id,
                        pause.held_now()
                    ),
                }
            }
            Ok("resume")
        }
        FlowsCommand::Inject {
            filters,
            scope,
            store_filters,
            last,
            since,
            until,
            resume_after,
            reason,
        } => {
            let fail = |e| ("inject", e);
            let filters = FilterSet::parse(&filters).map_err(|e| fail(e.into()))?;
            let scope = scope
                .parse::<Scope>()
                .map_err(|e| fail(FlowError::BadScope(format!("--scope: {e}"))))?;
            let injection = super::store::Injection::parse(
                &filters,
                &store_filters,
                last,
                since.as_deref(),
                until.as_deref(),
                |flag| format!("--{flag}"),
            )
            .map_err(fail)?;
            let window = crate::store::settings::parse_duration(&resume_after).map_err(|why| {
                fail(FlowError::BadInjection(format!(
                    "--resume-after: {resume_after:?}: {why}"
                )))
            })?;
            let store = connect().await.map_err(fail)?;
            let request = PauseRequest {
                filters,
                scope,
                reason,
                by: caller(),
                inject: None,
            };
            let (pause, resume) = store
                .inject(request, injection, window)
                .await
                .map_err(fail)?;
            eprintln!(
                "paused {} (scope {}) with its history: the gateway's streams deliver it, then what the pause held",
                pause.filters, pause.scope
            );
            println!("{}", pause.id);
            let _ = resume.await;
            eprintln!("pause {} resuming", pause.id);
            Ok("inject")
        }
        FlowsCommand::List { all, json } => {
            let fail = |e| ("list", e);
            let store = connect().await.map_err(fail)?;
            let pauses = store.list(all).await.map_err(fail)?;
            if json {
                for pause in &pauses {
                    println!("{}", pause.view());
                }
            } else {
                println!(
                    "{:<12} {:<9} {:<28} {:<20} {:>8} {:<20} {:<20} REASON",
                    "ID", "STATUS", "FILTERS", "SCOPE", "HELD", "OLDEST HELD", "PAUSED AT"
                );
                for pause in &pauses {
                    println!("{}", row(pause));
                }
            }
            Ok("list")
        }
        FlowsCommand::Show { id } => {
            let fail = |e| ("get", e);
            let store = connect().await.map_err(fail)?;
            let pause = store.get(&id).await.map_err(fail)?;
            println!("{:#}", pause.view());
            Ok("get")
        }
    }
}
