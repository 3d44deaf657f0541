//! Who may call the gateway: the admin credential given at start-up, producer API keys bound to a
//! service, and consumers scoped to the filters they may read; `Principal` is what a request is.
//!
//! Credentials live in PostgreSQL (`credentials`, `schema`); every gateway instance holds a
//! snapshot of them in memory (`snapshot`) that its `Authenticator` refreshes when the change
//! counter moves, so a request costs no database round trip and a revocation reaches every
//! instance within a second. `routes` is the admin API and the browsers' tickets and sessions;
//! `cli` the same operations straight on PostgreSQL.

pub mod authenticator;
pub mod cli;
pub mod credentials;
pub mod routes;
pub mod schema;
pub mod secret;
pub mod snapshot;

pub use authenticator::{AuthError, AuthOptions, Authenticator, Proof};
pub use routes::{routes, AdminCaller, Caller};

use axum::http::HeaderMap;

use crate::filter::{Filter, FilterSet, Part};
use crate::gateway::http::ApiError;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// What identifies the credential in logs and listings: a key id, a user name, or `admin`
    /// (never a secret).
    pub id: String,
    pub kind: PrincipalKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrincipalKind {
    /// May do everything: send as any service, read everything, administer.
    Admin,
    /// May send events as `service` to `topics` (empty: any topic the gateway serves); reads
    /// nothing.
    Producer {
        service: String,
        topics: Vec<String>,
    },
    /// May read what `filters` select from `topics` (empty: any); sends nothing.
    Consumer {
        user: String,
        filters: FilterSet,
        topics: Vec<String>,
    },
}

impl Principal {
    pub fn admin() -> Principal {
        Principal {
            id: "admin".into(),
            kind: PrincipalKind::Admin,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.kind == PrincipalKind::Admin
    }

    /// The service this principal sends as (`None`: any, for the admin); an error if it may not
    /// send to `topic` at all.
    pub fn sender_for(&self, topic: &str) -> Result<Option<&str>, ApiError> {
        match &self.kind {
            PrincipalKind::Admin => Ok(None),
            PrincipalKind::Producer { service, topics } => {
                if topics.is_empty() || topics.iter().any(|t| t == topic) {
                    Ok(Some(service))
                } else {
                    Err(ApiError::forbidden(format!(
                        "credential {} may not send to topic {topic}",
                        self.id
                    )))
                }
            }
            PrincipalKind::Consumer { .. } => Err(ApiError::forbidden(format!(
                "credential {} is a consumer's: it reads events, it does not send them",
                self.id
            ))),
        }
    }

    /// Refuses (403, naming the first filter or topic not allowed) a subscription or history
    /// read asking for more than this principal may read.
    pub fn may_read(&self, filters: &FilterSet, topics: &[String]) -> Result<(), ApiError> {
        match &self.kind {
            PrincipalKind::Admin => Ok(()),
            PrincipalKind::Producer { .. } => Err(ApiError::forbidden(format!(
                "credential {} is a producer's: it sends events, it does not read them",
                self.id
            ))),
            PrincipalKind::Consumer {
                filters: allowed,
                topics: allowed_topics,
                ..
            } => {
                if let Some(filter) = filters.filters().iter().find(|f| !covers(allowed, f)) {
                    return Err(ApiError::forbidden(format!(
                        "filter {filter} is not within what credential {} may read ({allowed})",
                        self.id
                    )));
                }
                if !allowed_topics.is_empty() {
                    if topics.is_empty() {
                        return Err(ApiError::forbidden(format!(
                            "credential {} may read only topics {}: name them with topics=",
                            self.id,
                            allowed_topics.join(",")
                        )));
                    }
                    if let Some(topic) = topics.iter().find(|t| !allowed_topics.contains(t)) {
                        return Err(ApiError::forbidden(format!(
                            "topic {topic} is not among those credential {} may read ({})",
                            self.id,
                            allowed_topics.join(",")
                        )));
                    }
                }
                Ok(())
            }
        }
    }
}

/// Whether every event `requested` selects is selected by one filter of `allowed`.
pub fn covers(allowed: &FilterSet, requested: &Filter) -> bool {
    fn part_covers(allowed: &Part, requested: &Part) -> bool {
        matches!(allowed, Part::Any) || allowed == requested
    }
    allowed.filters().iter().any(|a| {
        part_covers(&a.service, &requested.service) && part_covers(&a.action, &requested.action)
    })
}

/// Which stored credential a principal stands for: what a ticket is issued for and what
/// `Authenticator::revoked` watches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CredentialRef {
    /// The admin token given at start-up.
    Admin,
    /// An API key, by id.
    Key(String),
    /// A user logged in with their password (Basic or a session), by name.
    User(String),
}

impl CredentialRef {
    /// The credential behind `principal`. A consumer principal is its user's own when its id is
    /// the user's name; a consumer key's id never is (`credentials::issue_key` sees to that).
    pub fn of(principal: &Principal) -> CredentialRef {
        match &principal.kind {
            PrincipalKind::Admin => CredentialRef::Admin,
            PrincipalKind::Consumer { user, .. } if *user == principal.id => {
                CredentialRef::User(user.clone())
            }
            _ => CredentialRef::Key(principal.id.clone()),
        }
    }
}

/// The events both `a` and `b` select, as filters (`None`: no event). `lk:*` and `*:create_user`
/// share exactly `lk:create_user`.
pub fn intersect(a: &FilterSet, b: &FilterSet) -> Option<FilterSet> {
    fn part(a: &Part, b: &Part) -> Option<Part> {
        match (a, b) {
            (Part::Any, other) | (other, Part::Any) => Some(other.clone()),
            (Part::Name(x), Part::Name(y)) => (x == y).then(|| a.clone()),
        }
    }
    let shared: Vec<String> = a
        .filters()
        .iter()
        .flat_map(|x| b.filters().iter().map(move |y| (x, y)))
        .filter_map(|(x, y)| {
            let filter = Filter {
                service: part(&x.service, &y.service)?,
                action: part(&x.action, &y.action)?,
            };
            Some(filter.to_string())
        })
        .collect();
    // FilterSet is built only by its parser (which also drops repeats); the texts are
    // Display of parsed filters, so they parse back.
    FilterSet::parse(&shared).ok()
}

/// The topics both lists allow, where empty means any (`None`: no topic at all).
pub fn intersect_topics(a: &[String], b: &[String]) -> Option<Vec<String>> {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => Some(b.to_vec()),
        (_, true) => Some(a.to_vec()),
        _ => {
            let shared: Vec<String> = a.iter().filter(|t| b.contains(t)).cloned().collect();
            (!shared.is_empty()).then_some(shared)
        }
    }
}

/// The credential a request carries: `Authorization: Bearer <key>` (or `X-Api-Key`), or a
/// browser's short-lived `ticket` query parameter.
pub fn presented_secret<'a>(headers: &'a HeaderMap, ticket: Option<&'a str>) -> Option<&'a str> {
    if let Some(value) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(token) = value.strip_prefix("Bearer ") {
            return Some(token.trim());
        }
    }
    if let Some(value) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(value.trim());
    }
    ticket
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consumer(filters: &[&str]) -> Principal {
        Principal {
            id: "k1".into(),
            kind: PrincipalKind::Consumer {
                user: "u".into(),
                filters: FilterSet::parse(filters).unwrap(),
                topics: Vec::new(),
            },
        }
    }

    #[test]
    fn a_consumer_reads_within_its_filters_and_is_refused_beyond_them() {
        let lk = consumer(&["lk:*", "*:update_user"]);
        for ok in ["lk:*", "lk:create_user", "*:update_user", "arm:update_user"] {
            assert!(
                lk.may_read(&FilterSet::parse(&[ok]).unwrap(), &[]).is_ok(),
                "{ok}"
            );
        }
        for refused in ["*:*", "arm:*", "*:create_user", "arm:create_user"] {
            let error = lk
                .may_read(&FilterSet::parse(&[refused]).unwrap(), &[])
                .unwrap_err();
            assert_eq!(error.status, 403);
            assert!(error.message.contains(refused), "{}", error.message);
        }
        let everything = consumer(&["*:*"]);
        assert!(everything.may_read(&FilterSet::everything(), &[]).is_ok());
    }

    #[test]
    fn intersections_select_exactly_what_both_sides_select() {
        let set = |filters: &[&str]| FilterSet::parse(filters).unwrap();
        let shown = |s: Option<FilterSet>| s.map(|s| s.to_string());
        assert_eq!(
            shown(intersect(&set(&["lk:*"]), &set(&["*:create_user"]))),
            Some("lk:create_user".into())
        );
        assert_eq!(
            shown(intersect(&set(&["*:*"]), &set(&["lk:*", "arm:x"]))),
            Some("lk:*,arm:x".into())
        );
        assert_eq!(
            shown(intersect(&set(&["lk:*", "*:x"]), &set(&["lk:x"]))),
            Some("lk:x".into())
        );
        assert_eq!(intersect(&set(&["lk:*"]), &set(&["arm:*"])), None);
        // Every event the intersection selects, both sides select.
        let (a, b) = (set(&["lk:*", "*:update_user"]), set(&["*:*"]));
        let both = intersect(&a, &b).unwrap();
        for f in both.filters() {
            assert!(covers(&a, f) && covers(&b, f), "{f}");
        }
    }

    #[test]
    fn topic_intersections_read_empty_as_any() {
        let list = |t: &[&str]| t.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        assert_eq!(intersect_topics(&[], &list(&["a"])), Some(list(&["a"])));
        assert_eq!(
            intersect_topics(&list(&["a", "b"]), &[]),
            Some(list(&["a", "b"]))
        );
        assert_eq!(
            intersect_topics(&list(&["a", "b"]), &list(&["b", "c"])),
            Some(list(&["b"]))
        );
        assert_eq!(intersect_topics(&list(&["a"]), &list(&["c"])), None);
        assert_eq!(intersect_topics(&[], &[]), Some(vec![]));
    }

    #[test]
    fn a_principal_names_the_credential_behind_it() {
        assert_eq!(CredentialRef::of(&Principal::admin()), CredentialRef::Admin);
        let mut user = consumer(&["lk:*"]);
        user.id = "u".into();
        assert_eq!(CredentialRef::of(&user), CredentialRef::User("u".into()));
        assert_eq!(
            CredentialRef::of(&consumer(&["lk:*"])),
            CredentialRef::Key("k1".into())
        );
    }

    #[test]
    fn producers_send_as_their_service_only_where_allowed() {
        let producer = Principal {
            id: "k2".into(),
            kind: PrincipalKind::Producer {
                service: "lk".into(),
                topics: vec!["task_in".into()],
            },
        };
        assert_eq!(producer.sender_for("task_in").unwrap(), Some("lk"));
        assert_eq!(producer.sender_for("info_in").unwrap_err().status, 403);
        assert_eq!(
            producer
                .may_read(&FilterSet::everything(), &[])
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(Principal::admin().sender_for("x").unwrap(), None);
    }
}
