//! Who may call the gateway: the admin credential given at start-up, producer API keys bound to a
//! service, and consumers scoped to the filters they may read; `Principal` is what a request is.

pub mod authenticator;

pub use authenticator::{routes, AuthError, Authenticator};

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
