//! Placeholder until the credential store lands: the admin token only.
//! (Replaced by the PostgreSQL-backed authenticator of branch gateway-auth.)

use std::future::Future;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use super::{presented_secret, Principal};
use crate::gateway::http::ApiError;

#[derive(Debug, thiserror::Error)]
#[error("authentication: {0}")]
pub struct AuthError(String);

#[derive(Clone)]
pub struct Authenticator {
    admin_sha256: Option<[u8; 32]>,
}

impl Authenticator {
    pub async fn start(
        _pool: PgPool,
        admin_token: Option<String>,
        _shutdown: CancellationToken,
    ) -> Result<Authenticator, AuthError> {
        Ok(Authenticator {
            admin_sha256: admin_token.map(|t| Sha256::digest(t.as_bytes()).into()),
        })
    }

    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        ticket: Option<&str>,
    ) -> Result<Principal, ApiError> {
        let secret = presented_secret(headers, ticket).ok_or_else(|| {
            ApiError::unauthorized("no credential: send Authorization: Bearer <key>")
        })?;
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        match &self.admin_sha256 {
            Some(admin) if bool::from(admin.ct_eq(&digest)) => Ok(Principal::admin()),
            _ => Err(ApiError::unauthorized("unknown credential")),
        }
    }

    pub fn revoked(&self, _principal: &Principal) -> impl Future<Output = ()> + Send + 'static {
        std::future::pending()
    }
}

/// Placeholder: the admin API arrives with the credential store.
pub fn routes(_auth: Authenticator) -> axum::Router {
    axum::Router::new()
}
