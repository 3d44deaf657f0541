//! Flow control: pauses (a filter set with a scope) kept in PostgreSQL and obeyed by every
//! instance; held events stay in Kafka, and resume re-reads them in order (README "Flow control").

// A pause records only where holding began on each partition (`first_held`). On resume the
// partition's owner records where it stood (`resume_at`), moves back to `first_held` and routes,
// of `[first_held, resume_at)`, exactly what the pause held; from `resume_at` on it is live.
// `hold` is that rule, pure; `store` the tables; `watch` each instance's view; `gate` a stage's
// side; `cli` is `eventpipe flows`, and the gateway serves `/v1/admin/flows` (`gateway::flows`).

pub mod cli;
pub mod gate;
pub mod hold;
pub mod metrics;
pub mod store;
pub mod watch;

use std::fmt;
use std::str::FromStr;

pub use gate::FlowGate;
pub use store::{FlowError, FlowStore};

/// Which consumers a pause holds events from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The dispatcher's routes.
    Dispatch,
    /// Every subscription of the gateway.
    Gateway,
    /// One durable subscription of the gateway.
    Subscription(String),
    /// Everything: the dispatcher and the gateway.
    All,
}

impl Scope {
    /// Whether a consumer in `self` and one in `other` can be the same (two pauses whose
    /// scopes overlap and whose filters overlap would both hold some event: refused).
    pub fn overlaps(&self, other: &Scope) -> bool {
        use Scope::*;
        match (self, other) {
            (All, _) | (_, All) => true,
            (Dispatch, Dispatch) | (Gateway, Gateway) => true,
            (Gateway, Subscription(_)) | (Subscription(_), Gateway) => true,
            (Subscription(a), Subscription(b)) => a == b,
            (Dispatch, _) | (_, Dispatch) => false,
        }
    }

    /// Whether a pause of this scope applies to the dispatcher.
    pub fn covers_dispatch(&self) -> bool {
        matches!(self, Scope::Dispatch | Scope::All)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Dispatch => f.write_str("dispatch"),
            Scope::Gateway => f.write_str("gateway"),
            Scope::Subscription(name) => write!(f, "subscription:{name}"),
            Scope::All => f.write_str("all"),
        }
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(text: &str) -> Result<Scope, String> {
        match text {
            "dispatch" => Ok(Scope::Dispatch),
            "gateway" => Ok(Scope::Gateway),
            "all" => Ok(Scope::All),
            _ => match text.strip_prefix("subscription:") {
                Some(name)
                    if !name.is_empty()
                        && name.len() <= 200
                        && name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) =>
                {
                    Ok(Scope::Subscription(name.to_string()))
                }
                _ => Err(format!(
                    "scope {text:?}: expected dispatch, gateway, subscription:NAME or all"
                )),
            },
        }
    }
}

/// Where a pause stands: holding, releasing what it held, or done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PauseState {
    Paused,
    Resuming,
    Resumed,
}

impl PauseState {
    pub fn as_str(self) -> &'static str {
        match self {
            PauseState::Paused => "paused",
            PauseState::Resuming => "resuming",
            PauseState::Resumed => "resumed",
        }
    }

    pub fn parse(text: &str) -> Option<PauseState> {
        match text {
            "paused" => Some(PauseState::Paused),
            "resuming" => Some(PauseState::Resuming),
            "resumed" => Some(PauseState::Resumed),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_display_and_overlap() {
        for text in ["dispatch", "gateway", "all", "subscription:billing.live"] {
            assert_eq!(text.parse::<Scope>().unwrap().to_string(), text);
        }
        for bad in ["", "subscription:", "gateways", "subscription:a b"] {
            assert!(bad.parse::<Scope>().is_err(), "{bad}");
        }
        let sub = |n: &str| Scope::Subscription(n.into());
        assert!(Scope::All.overlaps(&Scope::Dispatch));
        assert!(Scope::Gateway.overlaps(&sub("a")));
        assert!(sub("a").overlaps(&sub("a")));
        assert!(!sub("a").overlaps(&sub("b")));
        assert!(!Scope::Dispatch.overlaps(&Scope::Gateway));
        assert!(!Scope::Dispatch.overlaps(&sub("a")));
        assert!(Scope::All.covers_dispatch() && !Scope::Gateway.covers_dispatch());
    }
}
