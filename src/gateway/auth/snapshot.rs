//! The credentials as one gateway instance holds them in memory: every user and key read at one
//! version of the change counter, and how a credential resolves to a `Principal` or a refusal.

use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::PgPool;

use super::{intersect, intersect_topics, CredentialRef, Principal, PrincipalKind};
use crate::filter::FilterSet;
use crate::gateway::http::ApiError;

/// A user: what they may read, and the hash their password is checked against.
#[derive(Clone)]
pub struct UserEntry {
    pub password_hash: String,
    pub filters: FilterSet,
    pub topics: Vec<String>,
}

impl fmt::Debug for UserEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserEntry")
            .field("filters", &self.filters.to_string())
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

/// What a key allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyGrant {
    Producer {
        service: String,
        topics: Vec<String>,
    },
    /// Reads within `user`'s filters and topics, narrowed by its own where given.
    Consumer {
        user: String,
        filters: Option<FilterSet>,
        topics: Vec<String>,
    },
}

#[derive(Clone)]
pub struct KeyEntry {
    pub secret_sha256: Vec<u8>,
    pub grant: KeyGrant,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyEntry")
            .field("grant", &self.grant)
            .field("expires_at", &self.expires_at)
            .field("revoked_at", &self.revoked_at)
            .finish_non_exhaustive()
    }
}

/// Every user and key at `version` of `gateway_auth_state`.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub version: i64,
    users: HashMap<String, UserEntry>,
    keys: HashMap<String, KeyEntry>,
}

type UserColumns = (String, String, Vec<String>, Vec<String>);
type KeyColumns = (
    String,
    Vec<u8>,
    String,
    Option<String>,
    Option<String>,
    Vec<String>,
    Vec<String>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

fn shown(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl Snapshot {
    /// Reads the counter and every row in one repeatable-read transaction, so the version names
    /// exactly the rows read.
    pub async fn load(pool: &PgPool) -> Result<Snapshot, sqlx::Error> {
        let mut transaction = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *transaction)
            .await?;
        let version: i64 = sqlx::query_scalar("SELECT version FROM gateway_auth_state")
            .fetch_one(&mut *transaction)
            .await?;
        let users: Vec<UserColumns> =
            sqlx::query_as("SELECT name, password_hash, filters, topics FROM gateway_users")
                .fetch_all(&mut *transaction)
                .await?;
        let keys: Vec<KeyColumns> = sqlx::query_as(
            "SELECT id, secret_sha256, kind, service, user_name, filters, topics, expires_at,
                    revoked_at
             FROM gateway_keys",
        )
        .fetch_all(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(Snapshot::from_rows(version, users, keys))
    }

    /// The current counter alone: what the refresher polls.
    pub async fn current_version(pool: &PgPool) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT version FROM gateway_auth_state")
            .fetch_one(pool)
            .await
    }

    /// A row whose filters no longer parse (written by hand, or by a newer version) grants
    /// nothing: it is left out with a warning rather than failing every credential.
    fn from_rows(version: i64, users: Vec<UserColumns>, keys: Vec<KeyColumns>) -> Snapshot {
        let users = users
            .into_iter()
            .filter_map(
                |(name, password_hash, filters, topics)| match FilterSet::parse(&filters) {
                    Ok(filters) => Some((
                        name,
                        UserEntry {
                            password_hash,
                            filters,
                            topics,
                        },
                    )),
                    Err(error) => {
                        tracing::warn!(user = name, %error, "gateway user left out: bad filter");
                        None
                    }
                },
            )
            .collect();
        let keys = keys
            .into_iter()
            .filter_map(
                |(id, secret_sha256, kind, service, user, filters, topics, expires_at, revoked_at)| {
                    let grant = match (kind.as_str(), service, user) {
                        ("producer", Some(service), _) => KeyGrant::Producer { service, topics },
                        ("consumer", _, Some(user)) => {
                            let filters = match filters.is_empty() {
                                true => None,
                                false => match FilterSet::parse(&filters) {
                                    Ok(filters) => Some(filters),
                                    Err(error) => {
                                        tracing::warn!(key = id, %error, "gateway key left out: bad filter");
                                        return None;
                                    }
                                },
                            };
                            KeyGrant::Consumer {
                                user,
                                filters,
                                topics,
                            }
                        }
                        _ => {
                            tracing::warn!(key = id, kind, "gateway key left out: unknown kind");
                            return None;
                        }
                    };
                    let entry = KeyEntry {
                        secret_sha256,
                        grant,
                        expires_at,
                        revoked_at,
                    };
                    Some((id, entry))
                },
            )
            .collect();
        Snapshot {
            version,
            users,
            keys,
        }
    }

    pub fn user(&self, name: &str) -> Option<&UserEntry> {
        self.users.get(name)
    }

    pub fn key(&self, id: &str) -> Option<&KeyEntry> {
        self.keys.get(id)
    }

    /// A user logged in by password reads what the user may.
    pub fn user_principal(&self, name: &str) -> Result<Principal, ApiError> {
        let user = self
            .users
            .get(name)
            .ok_or_else(|| ApiError::unauthorized(format!("user {name} no longer exists")))?;
        Ok(Principal {
            id: name.to_string(),
            kind: PrincipalKind::Consumer {
                user: name.to_string(),
                filters: user.filters.clone(),
                topics: user.topics.clone(),
            },
        })
    }

    /// What key `id` may do at `now` (its secret already checked): 401 when it is unknown,
    /// revoked or expired, 403 when its user's rights no longer overlap its own.
    pub fn key_principal(&self, id: &str, now: DateTime<Utc>) -> Result<Principal, ApiError> {
        let key = self
            .keys
            .get(id)
            .ok_or_else(|| ApiError::unauthorized(format!("unknown API key {id}")))?;
        if let Some(at) = key.revoked_at {
            return Err(ApiError::unauthorized(format!(
                "API key {id} was revoked at {}",
                shown(at)
            )));
        }
        if let Some(at) = key.expires_at.filter(|at| *at <= now) {
            return Err(ApiError::unauthorized(format!(
                "API key {id} expired at {}",
                shown(at)
            )));
        }
        let kind = match &key.grant {
            KeyGrant::Producer { service, topics } => PrincipalKind::Producer {
                service: service.clone(),
                topics: topics.clone(),
            },
            KeyGrant::Consumer {
                user,
                filters,
                topics,
            } => {
                let owner = self.users.get(user).ok_or_else(|| {
                    ApiError::unauthorized(format!("API key {id}: user {user} no longer exists"))
                })?;
                let narrowed = match filters {
                    Some(own) => intersect(&owner.filters, own),
                    None => Some(owner.filters.clone()),
                };
                let topics = intersect_topics(&owner.topics, topics);
                let (Some(filters), Some(topics)) = (narrowed, topics) else {
                    return Err(ApiError::forbidden(format!(
                        "API key {id} may read nothing: its filters or topics no longer overlap \
                         those of user {user}"
                    )));
                };
                PrincipalKind::Consumer {
                    user: user.clone(),
                    filters,
                    topics,
                }
            }
        };
        Ok(Principal {
            id: id.to_string(),
            kind,
        })
    }

    /// What `credential` may do now; `admin_enabled` says whether this instance has an admin
    /// token (a ticket issued to the admin elsewhere is worth nothing without one).
    pub fn principal(
        &self,
        credential: &CredentialRef,
        admin_enabled: bool,
        now: DateTime<Utc>,
    ) -> Result<Principal, ApiError> {
        match credential {
            CredentialRef::Admin if admin_enabled => Ok(Principal::admin()),
            CredentialRef::Admin => Err(ApiError::unauthorized(
                "this gateway has no admin token: admin tickets are not accepted",
            )),
            CredentialRef::Key(id) => self.key_principal(id, now),
            CredentialRef::User(name) => self.user_principal(name),
        }
    }

    /// When `credential` stops working by itself (a key's expiry); `None`: not by time.
    pub fn expires_at(&self, credential: &CredentialRef) -> Option<DateTime<Utc>> {
        match credential {
            CredentialRef::Key(id) => self.keys.get(id).and_then(|key| key.expires_at),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn key(id: &str, kind: &str, owner: &str, filters: &[&str]) -> KeyColumns {
        let (service, user) = match kind {
            "producer" => (Some(owner.to_string()), None),
            _ => (None, Some(owner.to_string())),
        };
        (
            id.into(),
            vec![0; 32],
            kind.into(),
            service,
            user,
            texts(filters),
            vec![],
            None,
            None,
        )
    }

    fn snapshot(keys: Vec<KeyColumns>) -> Snapshot {
        let users = vec![
            ("u".into(), "$argon2id$x".into(), texts(&["lk:*"]), vec![]),
            ("bad".into(), "$argon2id$x".into(), texts(&["no"]), vec![]),
        ];
        Snapshot::from_rows(7, users, keys)
    }

    #[test]
    fn consumer_keys_read_their_users_filters_narrowed_by_their_own() {
        let now = Utc::now();
        let s = snapshot(vec![
            key("plain", "consumer", "u", &[]),
            key("narrow", "consumer", "u", &["*:create_user"]),
            key("disjoint", "consumer", "u", &["arm:*"]),
        ]);
        let filters = |id: &str| match s.key_principal(id, now).unwrap().kind {
            PrincipalKind::Consumer { filters, .. } => filters.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(filters("plain"), "lk:*");
        assert_eq!(filters("narrow"), "lk:create_user");
        assert_eq!(s.key_principal("disjoint", now).unwrap_err().status, 403);
    }

    #[test]
    fn refusals_say_unknown_revoked_or_expired() {
        let now = Utc::now();
        let mut revoked = key("rev", "producer", "lk", &[]);
        revoked.8 = Some(now);
        let mut expired = key("exp", "producer", "lk", &[]);
        expired.7 = Some(now - chrono::Duration::seconds(1));
        let mut later = key("later", "producer", "lk", &[]);
        later.7 = Some(now + chrono::Duration::hours(1));
        let s = snapshot(vec![revoked, expired, later]);
        let message = |id: &str| s.key_principal(id, now).unwrap_err().message;
        assert!(message("rev").contains("revoked"));
        assert!(message("exp").contains("expired"));
        assert!(message("nope").contains("unknown API key nope"));
        assert_eq!(
            s.key_principal("later", now).unwrap().kind,
            PrincipalKind::Producer {
                service: "lk".into(),
                topics: vec![]
            }
        );
        assert_eq!(
            s.expires_at(&CredentialRef::Key("later".into())),
            Some(now + chrono::Duration::hours(1))
        );
    }

    #[test]
    fn rows_that_no_longer_parse_grant_nothing() {
        let s = snapshot(vec![key("k", "consumer", "u", &["not a filter"])]);
        assert!(s.user("bad").is_none());
        assert!(s.key("k").is_none());
        assert!(s.user("u").is_some());
        assert!(!format!("{:?}", s.user("u").unwrap()).contains("argon2"));
        assert_eq!(
            s.principal(&CredentialRef::Admin, false, Utc::now())
                .unwrap_err()
                .status,
            401
        );
        assert!(s
            .principal(&CredentialRef::Admin, true, Utc::now())
            .unwrap()
            .is_admin());
    }
}
