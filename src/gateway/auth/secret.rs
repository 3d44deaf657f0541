//! The secrets the gateway hands out and how they are kept: `ep_<id>_<secret>` API keys, browser
//! tickets and session tokens (SHA-256 at rest), user passwords (argon2 PHC strings).
//!
//! Every issued token is `<prefix>_<id>_<secret>`: the id is public (it names the row to look
//! up, in listings and logs), the secret is 32 random bytes in base64url without padding. Such a
//! secret cannot be guessed, so one SHA-256 suffices at rest and a stolen table yields nothing;
//! passwords, which people choose, get argon2 instead.

use std::fmt;

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Random bytes in every issued secret.
pub const SECRET_BYTES: usize = 32;
/// Characters of a token's public id.
pub const ID_CHARS: usize = 12;
/// The id's alphabet: no `_` (it separates the parts) and no case (ids are read aloud, typed).
const ID_ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Text that must not be logged or shown: `Debug` prints a placeholder; read it with `expose`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Read from JSON as a plain string (a password in a request body).
impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// What an issued token is for; each has its own prefix so a token says what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// A long-lived API key: `ep_<id>_<secret>`.
    ApiKey,
    /// A browser's short-lived ticket for a URL: `ept_<id>_<secret>`.
    Ticket,
    /// A browser session behind an HttpOnly cookie: `eps_<id>_<secret>`.
    Session,
}

impl TokenKind {
    pub fn prefix(self) -> &'static str {
        match self {
            TokenKind::ApiKey => "ep_",
            TokenKind::Ticket => "ept_",
            TokenKind::Session => "eps_",
        }
    }

    /// What the kind is called in messages.
    pub fn noun(self) -> &'static str {
        match self {
            TokenKind::ApiKey => "API key",
            TokenKind::Ticket => "ticket",
            TokenKind::Session => "session",
        }
    }

    /// The kind a presented text claims to be by its prefix.
    pub fn of(text: &str) -> Option<TokenKind> {
        [TokenKind::ApiKey, TokenKind::Ticket, TokenKind::Session]
            .into_iter()
            .find(|kind| text.starts_with(kind.prefix()))
    }
}

/// A token freshly made: the text to give out once, and what is kept of it.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub id: String,
    pub text: Secret,
    pub secret_sha256: [u8; 32],
}

/// A presented token split into its parts (only the id may be shown).
#[derive(Clone, PartialEq, Eq)]
pub struct PresentedToken<'a> {
    pub kind: TokenKind,
    pub id: &'a str,
    secret: &'a str,
}

impl fmt::Debug for PresentedToken<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PresentedToken")
            .field("kind", &self.kind)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl PresentedToken<'_> {
    /// Whether this token's secret is the one whose SHA-256 was stored, in constant time.
    pub fn matches(&self, stored_sha256: &[u8]) -> bool {
        sha256(self.secret.as_bytes()).ct_eq(stored_sha256).into()
    }
}

/// Why a presented text is not a token; never carries the text itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not an eventpipe token (expected ep_<id>_<secret>)")]
    UnknownPrefix,
    #[error("malformed {}: expected {}<id>_<secret>", .0.noun(), .0.prefix())]
    Malformed(TokenKind),
}

/// A new random token of `kind`.
pub fn issue(kind: TokenKind) -> IssuedToken {
    let id = random_id();
    let secret = URL_SAFE_NO_PAD.encode(rand::random::<[u8; SECRET_BYTES]>());
    IssuedToken {
        text: Secret::new(format!("{}{id}_{secret}", kind.prefix())),
        secret_sha256: sha256(secret.as_bytes()),
        id,
    }
}

/// A fresh public id ([`ID_CHARS`] of `[0-9a-z]`, about 62 bits).
pub fn random_id() -> String {
    (0..ID_CHARS)
        .map(|_| {
            let at = rand::random_range(0..ID_ALPHABET.len());
            char::from(ID_ALPHABET[at])
        })
        .collect()
}

/// Splits a presented text into kind, id and secret; refuses anything not shaped like a token
/// we issue, so a malformed one never reaches a lookup.
pub fn parse(text: &str) -> Result<PresentedToken<'_>, TokenError> {
    let kind = TokenKind::of(text).ok_or(TokenError::UnknownPrefix)?;
    let rest = &text[kind.prefix().len()..];
    let (id, secret) = rest.split_once('_').ok_or(TokenError::Malformed(kind))?;
    let id_ok = id.len() == ID_CHARS && id.bytes().all(|b| ID_ALPHABET.contains(&b));
    let secret_ok = URL_SAFE_NO_PAD
        .decode(secret)
        .is_ok_and(|bytes| bytes.len() == SECRET_BYTES);
    if !(id_ok && secret_ok) {
        return Err(TokenError::Malformed(kind));
    }
    Ok(PresentedToken { kind, id, secret })
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Whether two digests are equal, in constant time.
pub fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// What a verified `name:password` pair is remembered by: a digest, so the cache holds no
/// password. The separator keeps `ab`+`c` and `a`+`bc` apart (names cannot hold a NUL).
pub fn login_digest(name: &str, password: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(name.as_bytes());
    hasher.update([0u8]);
    hasher.update(password.as_bytes());
    hasher.finalize().into()
}

#[derive(Debug, thiserror::Error)]
#[error("hashing the password: {0}")]
pub struct PasswordHashError(String);

/// The argon2id PHC string of `password`, with a fresh salt. Slow by design: call it off the
/// async threads (`spawn_blocking`).
pub fn hash_password(password: &Secret) -> Result<String, PasswordHashError> {
    Argon2::default()
        .hash_password(password.expose().as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|e| PasswordHashError(e.to_string()))
}

/// Whether `password` is the one `phc` was made from; a malformed stored hash verifies nothing.
/// Slow by design, like [`hash_password`].
pub fn verify_password(password: &str, phc: &str) -> bool {
    Argon2::default()
        .verify_password(password.as_bytes(), phc)
        .is_ok()
}

/// A password for a user who was given none: 24 random bytes, base64url.
pub fn generate_password() -> Secret {
    Secret::new(URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>()))
}

/// `name` and `password` of an `Authorization: Basic` value; `None` when it is not one.
pub fn basic_credentials(authorization: &str) -> Option<(String, Secret)> {
    let (scheme, encoded) = authorization.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (name, password) = text.split_once(':')?;
    Some((name.to_string(), Secret::new(password)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The secret part of an issued token's text.
    fn secret_of(issued: &IssuedToken) -> &str {
        let text = issued.text.expose();
        let rest = &text[TokenKind::of(text).unwrap().prefix().len()..];
        rest.split_once('_').unwrap().1
    }

    #[test]
    fn issued_tokens_parse_back_and_match_only_their_own_digest() {
        for kind in [TokenKind::ApiKey, TokenKind::Ticket, TokenKind::Session] {
            let issued = issue(kind);
            let text = issued.text.expose();
            assert!(text.starts_with(kind.prefix()), "{text}");
            let presented = parse(text).unwrap();
            assert_eq!(presented.kind, kind);
            assert_eq!(presented.id, issued.id);
            assert!(presented.matches(&issued.secret_sha256));
            assert!(!presented.matches(&issue(kind).secret_sha256));
            assert!(
                !presented.matches(&[0u8; 3]),
                "a digest of the wrong length"
            );
        }
    }

    #[test]
    fn the_secret_is_32_random_bytes_and_ids_differ() {
        let issued = issue(TokenKind::ApiKey);
        let secret = secret_of(&issued);
        // base64url without padding: ceil(32 * 4 / 3) characters, no '='.
        assert_eq!(secret.len(), 43);
        assert!(!secret.contains('='));
        assert_ne!(issue(TokenKind::ApiKey).id, issue(TokenKind::ApiKey).id);
    }

    #[test]
    fn malformed_tokens_are_refused_without_echoing_them() {
        let good = issue(TokenKind::ApiKey);
        let secret = secret_of(&good);
        let head = format!("ep_{}", good.id);
        let cases = [
            "".to_string(),
            "ep_".to_string(),
            "ep_abc".to_string(),
            format!("ep_SHORT_{secret}"),
            format!("{head}_{}", &secret[..20]),
            format!("{head}_{secret}!"),
            format!("ep_ABCDEFGHIJKL_{secret}"),
        ];
        for case in &cases {
            let error = parse(case).unwrap_err();
            assert!(!error.to_string().contains(secret), "{case}: {error}");
        }
        assert_eq!(parse("hunter2").unwrap_err(), TokenError::UnknownPrefix);
        // A secret containing '_' (base64url may) still splits at the id's end.
        let id = "abcdefghijkl";
        let with_underscore = format!("ep_{id}_{}", URL_SAFE_NO_PAD.encode([0xffu8; 32]));
        assert!(with_underscore[15..].contains('_'));
        assert_eq!(parse(&with_underscore).unwrap().id, id);
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let issued = issue(TokenKind::ApiKey);
        let shown = format!("{issued:?}");
        assert!(!shown.contains(issued.text.expose()), "{shown}");
        let presented = parse(issued.text.expose()).unwrap();
        let shown = format!("{presented:?}");
        let secret = secret_of(&issued);
        assert!(!shown.contains(secret), "{shown}");
    }

    #[test]
    fn basic_credentials_split_at_the_first_colon() {
        let header = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:pa:ss")
        );
        let (name, password) = basic_credentials(&header).unwrap();
        assert_eq!(name, "alice");
        assert_eq!(password.expose(), "pa:ss");
        assert!(basic_credentials("Bearer abc").is_none());
        assert!(basic_credentials("Basic !!!").is_none());
        let no_colon = format!(
            "basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice")
        );
        assert!(basic_credentials(&no_colon).is_none());
    }

    #[test]
    fn login_digests_separate_name_from_password() {
        assert_ne!(login_digest("ab", "c"), login_digest("a", "bc"));
        assert_eq!(login_digest("a", "b"), login_digest("a", "b"));
    }

    #[test]
    fn passwords_verify_against_their_argon2_hash_only() {
        let password = Secret::new("correct horse");
        let phc = hash_password(&password).unwrap();
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        assert!(!phc.contains("correct horse"));
        assert!(verify_password("correct horse", &phc));
        assert!(!verify_password("wrong horse", &phc));
        assert!(!verify_password("correct horse", "not a phc string"));
    }
}
