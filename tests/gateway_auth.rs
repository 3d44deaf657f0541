//! The gateway's credentials on the real PostgreSQL (a fresh database per test): who is refused
//! and why, what each credential may do, how fast a revocation reaches every instance.
//!
//! The credential routes are served on 127.0.0.1:0 with two probe routes standing in for the
//! gateway's reading and sending endpoints (they authenticate with `Caller` and ask the
//! principal, as the gateway's routes do), and exercised with reqwest; the CLI runs as the built
//! binary against the same database.

mod common;

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::routing::{get, post};
use axum::{Json, Router};
use eventpipe::filter::FilterSet;
use eventpipe::gateway::auth::{AuthOptions, Authenticator, Caller};
use eventpipe::gateway::http::ApiError;
use reqwest::Method;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const ADMIN_TOKEN: &str = "test-admin-token-7f3a9c1e5b2d8f40";
/// What "within a second" means in these tests; the refresher polls every 250 ms.
const REVOCATION_BOUND: Duration = Duration::from_secs(1);
/// How often a poll for a refusal looks again: fine enough to measure against the bound.
const PROBE_INTERVAL: Duration = Duration::from_millis(10);

/// The credential a request carries.
#[derive(Clone, Debug)]
enum Credential {
    None,
    Bearer(String),
    ApiKeyHeader(String),
    Basic(String, String),
    Cookie(String),
}

/// The credential routes and the probes, served, over a fresh database.
struct Gateway {
    base: String,
    auth: Authenticator,
    pool: PgPool,
    database_url: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[derive(serde::Deserialize)]
struct ReadQuery {
    filter: String,
}

/// Stand-ins for the gateway's endpoints: what a subscription and an ingress route ask.
fn probe_routes(auth: Authenticator) -> Router {
    Router::new()
        .route(
            "/probe/read",
            get(
                |Caller(principal): Caller, Query(query): Query<ReadQuery>| async move {
                    let filters = FilterSet::parse(&[query.filter])
                        .map_err(|e| ApiError::bad_request("bad_filter", e.to_string()))?;
                    principal.may_read(&filters, &[])?;
                    Ok::<_, ApiError>(Json(json!({"id": principal.id})))
                },
            ),
        )
        .route(
            "/probe/send/{topic}",
            post(
                |Caller(principal): Caller, Path(topic): Path<String>| async move {
                    let service = principal.sender_for(&topic)?;
                    Ok::<_, ApiError>(Json(json!({"id": principal.id, "service": service})))
                },
            ),
        )
        .with_state(auth)
}

async fn serve(auth: Authenticator, shutdown: CancellationToken) -> String {
    let app = eventpipe::gateway::auth::routes(auth.clone()).merge(probe_routes(auth));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .into_future(),
    );
    format!("http://{address}")
}

impl Gateway {
    async fn start() -> Gateway {
        Gateway::start_with(AuthOptions::default()).await
    }

    async fn start_with(options: AuthOptions) -> Gateway {
        let settings = common::settings();
        let (pool, database_url) = common::fresh_database_url(&settings).await;
        let shutdown = CancellationToken::new();
        let auth = Authenticator::start_with(
            pool.clone(),
            Some(ADMIN_TOKEN.into()),
            options,
            shutdown.clone(),
        )
        .await
        .expect("the authenticator starts on a fresh database");
        let base = serve(auth.clone(), shutdown.clone()).await;
        Gateway {
            base,
            auth,
            pool,
            database_url,
            http: reqwest::Client::new(),
            shutdown,
        }
    }

    /// Another gateway instance over the same database (not served: asked directly).
    async fn second_instance(&self) -> Authenticator {
        Authenticator::start(
            self.pool.clone(),
            Some(ADMIN_TOKEN.into()),
            self.shutdown.clone(),
        )
        .await
        .unwrap()
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        credential: &Credential,
        body: Option<Value>,
    ) -> (u16, Value, HeaderMap) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        request = match credential {
            Credential::None => request,
            Credential::Bearer(token) => request.bearer_auth(token),
            Credential::ApiKeyHeader(key) => request.header("x-api-key", key),
            Credential::Basic(name, password) => request.basic_auth(name, Some(password)),
            Credential::Cookie(cookie) => request.header(header::COOKIE, cookie),
        };
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the test gateway answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body, headers)
    }

    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let admin = Credential::Bearer(ADMIN_TOKEN.into());
        let (status, body, _) = self.call(method, path, &admin, body).await;
        (status, body)
    }

    async fn add_user(&self, name: &str, password: &str, filters: &[&str]) {
        let (status, body) = self
            .admin(
                Method::POST,
                "/v1/admin/users",
                Some(json!({"name": name, "password": password, "filters": filters})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }

    /// Issues a key through the admin API; returns (id, key).
    async fn issue_key(&self, request: Value) -> (String, String) {
        let (status, body) = self
            .admin(Method::POST, "/v1/admin/keys", Some(request))
            .await;
        assert_eq!(status, 201, "{body}");
        (
            body["id"].as_str().unwrap().to_string(),
            body["key"].as_str().unwrap().to_string(),
        )
    }

    /// A consumer key of `user` and a producer key of service lk: (id, key) each.
    async fn consumer_and_producer_keys(&self, user: &str) -> ((String, String), (String, String)) {
        let consumer = self
            .issue_key(json!({"kind": "consumer", "user": user}))
            .await;
        let producer = self
            .issue_key(json!({"kind": "producer", "service": "lk"}))
            .await;
        (consumer, producer)
    }

    /// A ticket for `credential`, which must be granted one.
    async fn ticket_for(&self, credential: &Credential) -> String {
        let (status, body) = self.ticket(credential).await;
        assert_eq!(status, 200, "{body}");
        body["ticket"].as_str().unwrap().to_string()
    }

    /// `GET /probe/read?filter=...` (plus `&ticket=`): status and message.
    async fn read(
        &self,
        filter: &str,
        credential: &Credential,
        ticket: Option<&str>,
    ) -> (u16, Value) {
        let mut path = format!("/probe/read?filter={}", encode(filter));
        if let Some(ticket) = ticket {
            path.push_str(&format!("&ticket={}", encode(ticket)));
        }
        let (status, body, _) = self.call(Method::GET, &path, credential, None).await;
        (status, body)
    }

    async fn ticket(&self, credential: &Credential) -> (u16, Value) {
        let (status, body, _) = self
            .call(Method::POST, "/v1/tickets", credential, None)
            .await;
        (status, body)
    }
}

/// The built binary against `database_url` (off the async threads: it blocks until it exits).
async fn eventpipe_cli(
    database_url: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
    let stdin = stdin.map(<[u8]>::to_vec);
    let url = database_url.to_string();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::run_eventpipe(
            &args,
            &[("POSTGRES_CONNECTION_STRING", url.as_str())],
            stdin.as_deref(),
        )
    })
    .await
    .unwrap()
}

fn encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn bearer_headers(key: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
    );
    headers
}

fn message(body: &Value) -> &str {
    body["message"].as_str().unwrap_or_default()
}

/// Polls `probe` until it returns `Ok`, and returns how long that took and the value; panics
/// naming `what` and the last thing seen once `deadline` passed.
async fn poll_until<T>(
    what: &str,
    deadline: Duration,
    mut probe: impl AsyncFnMut() -> Result<T, String>,
) -> (Duration, T) {
    let started = Instant::now();
    loop {
        match probe().await {
            Ok(value) => return (started.elapsed(), value),
            Err(seen) => assert!(
                started.elapsed() < deadline,
                "{what}: not after {deadline:?}; last seen {seen}"
            ),
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// Polls `probe` until it refuses with 401: how long that took, and the refusal.
async fn until_refused(
    what: &str,
    deadline: Duration,
    mut probe: impl AsyncFnMut() -> Result<(), ApiError>,
) -> (Duration, ApiError) {
    poll_until(what, deadline, async || match probe().await {
        Err(error) if error.status == 401 => Ok(error),
        seen => Err(format!("{seen:?}")),
    })
    .await
}

/// Polls `probe` (an HTTP answer) until its status is `wanted`; returns the body.
async fn until_status(
    what: &str,
    wanted: u16,
    deadline: Duration,
    mut probe: impl AsyncFnMut() -> (u16, Value),
) -> Value {
    let (_, body) = poll_until(what, deadline, async || match probe().await {
        (status, body) if status == wanted => Ok(body),
        (status, body) => Err(format!("{status} {body}")),
    })
    .await;
    body
}

#[tokio::test]
async fn strangers_are_refused_with_401_saying_why() {
    let gateway = Gateway::start_with(AuthOptions {
        ticket_ttl: Duration::from_secs(1),
        ..AuthOptions::default()
    })
    .await;
    gateway.add_user("alice", "alice-password", &["lk:*"]).await;
    let (id, key) = gateway
        .issue_key(json!({"kind": "consumer", "user": "alice"}))
        .await;
    let ok = gateway
        .read("lk:*", &Credential::Bearer(key.clone()), None)
        .await;
    assert_eq!(ok.0, 200, "{}", ok.1);

    // No credential at all.
    let (status, body) = gateway.read("lk:*", &Credential::None, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    assert!(message(&body).contains("no credential"), "{body}");

    // A made-up key, the right id with a made-up secret, and text that is no key at all.
    let made_up_secret = "A".repeat(43);
    let strangers = [
        (
            format!("ep_abcdefghijkl_{made_up_secret}"),
            "unknown API key abcdefghijkl",
        ),
        (format!("ep_{id}_{made_up_secret}"), "does not match"),
        ("hunter2-hunter2".to_string(), "invalid credential"),
        (format!("ep_{id}_short"), "malformed API key"),
    ];
    for (presented, reason) in &strangers {
        for credential in [
            Credential::Bearer(presented.clone()),
            Credential::ApiKeyHeader(presented.clone()),
        ] {
            let (status, body) = gateway.read("lk:*", &credential, None).await;
            assert_eq!(status, 401, "{credential:?}: {body}");
            assert!(message(&body).contains(reason), "{body}");
            assert!(
                !body.to_string().contains(&made_up_secret),
                "echoed: {body}"
            );
        }
    }

    // A wrong password, and a user who does not exist: the same answer.
    for (name, password) in [("alice", "not-her-password"), ("mallory", "alice-password")] {
        let basic = Credential::Basic(name.into(), password.into());
        let (status, body) = gateway.read("lk:*", &basic, None).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(message(&body), "wrong user name or password");
        assert!(!body.to_string().contains(password));
    }

    // A made-up ticket.
    let made_up_ticket = format!("ept_abcdefghijkl_{made_up_secret}");
    let (status, body) = gateway
        .read("lk:*", &Credential::None, Some(&made_up_ticket))
        .await;
    assert_eq!(status, 401, "{body}");
    assert!(message(&body).contains("unknown ticket"), "{body}");

    // A key that expires, and a ticket past its expiry: accepted until then, refused after.
    let (_, expiring) = gateway
        .issue_key(json!({"kind": "consumer", "user": "alice", "expires": "1s"}))
        .await;
    let ticket = gateway.ticket_for(&Credential::Bearer(key.clone())).await;
    let expired_key = until_status(
        "the 1 s key expires",
        401,
        Duration::from_secs(10),
        async || {
            gateway
                .read("lk:*", &Credential::Bearer(expiring.clone()), None)
                .await
        },
    )
    .await;
    assert!(
        message(&expired_key).contains("expired at"),
        "{expired_key}"
    );
    let expired_ticket = until_status(
        "the 1 s ticket expires",
        401,
        Duration::from_secs(10),
        async || gateway.read("lk:*", &Credential::None, Some(&ticket)).await,
    )
    .await;
    assert!(
        message(&expired_ticket).contains("ticket expired at"),
        "{expired_ticket}"
    );
    assert!(!expired_ticket.to_string().contains(&ticket));
    // The key the ticket was issued for still works: only the ticket expired.
    let still = gateway.read("lk:*", &Credential::Bearer(key), None).await;
    assert_eq!(still.0, 200, "{}", still.1);
}

#[tokio::test]
async fn each_credential_does_only_what_it_may_and_403_names_what_is_beyond() {
    let gateway = Gateway::start().await;
    gateway
        .add_user("alice", "alice-password", &["lk:*", "*:update_user"])
        .await;
    let (consumer_id, consumer) = gateway
        .issue_key(json!({"kind": "consumer", "user": "alice"}))
        .await;
    let (narrow_id, narrow) = gateway
        .issue_key(json!({"kind": "consumer", "user": "alice", "filters": ["lk:create_user", "arm:update_user"]}))
        .await;
    let (producer_id, producer) = gateway
        .issue_key(json!({"kind": "producer", "service": "lk", "topics": ["task_in"]}))
        .await;
    let consumer = Credential::Bearer(consumer);
    let narrow = Credential::Bearer(narrow);
    let producer = Credential::Bearer(producer);
    let alice = Credential::Basic("alice".into(), "alice-password".into());

    // A consumer key reads within its user's filters, and is refused beyond them by name.
    for within in ["lk:*", "lk:create_user", "arm:update_user"] {
        let (status, body) = gateway.read(within, &consumer, None).await;
        assert_eq!(
            (status, body["id"].as_str()),
            (200, Some(consumer_id.as_str())),
            "{within}"
        );
    }
    for beyond in ["*:*", "arm:create_user", "arm:*"] {
        let (status, body) = gateway.read(beyond, &consumer, None).await;
        assert_eq!(status, 403, "{beyond}: {body}");
        assert!(
            message(&body).contains(&format!("filter {beyond} ")),
            "{body}"
        );
    }
    // Narrowed by its own filters, within the user's.
    assert_eq!(gateway.read("lk:create_user", &narrow, None).await.0, 200);
    assert_eq!(gateway.read("arm:update_user", &narrow, None).await.0, 200);
    let (status, body) = gateway.read("lk:update_user", &narrow, None).await;
    assert_eq!(status, 403, "{body}");
    assert!(message(&body).contains("lk:update_user"), "{body}");
    assert!(message(&body).contains(&narrow_id), "{body}");

    // A consumer sends nothing; a producer reads nothing and sends as its service, to its topics.
    let send = async |credential: &Credential, topic: &str| {
        let (status, body, _) = gateway
            .call(
                Method::POST,
                &format!("/probe/send/{topic}"),
                credential,
                None,
            )
            .await;
        (status, body)
    };
    let (status, body) = send(&consumer, "task_in").await;
    assert_eq!(status, 403, "{body}");
    assert!(message(&body).contains("does not send"), "{body}");
    let (status, body) = gateway.read("lk:*", &producer, None).await;
    assert_eq!(status, 403, "{body}");
    assert!(message(&body).contains("does not read"), "{body}");
    let (status, body) = send(&producer, "task_in").await;
    assert_eq!(
        (status, body["service"].as_str()),
        (200, Some("lk")),
        "{body}"
    );
    assert_eq!(body["id"].as_str(), Some(producer_id.as_str()));
    let (status, body) = send(&producer, "info_in").await;
    assert_eq!(status, 403, "{body}");
    assert!(message(&body).contains("info_in"), "{body}");

    // The user by password reads the user's filters.
    let (status, body) = gateway.read("*:update_user", &alice, None).await;
    assert_eq!(
        (status, body["id"].as_str()),
        (200, Some("alice")),
        "{body}"
    );
    let (status, body) = gateway.read("*:*", &alice, None).await;
    assert_eq!(status, 403, "{body}");
    assert!(message(&body).contains("filter *:* "), "{body}");

    // Tickets: for consumers (authenticating as the credential they were issued for), not for
    // producers, and not in exchange for a ticket.
    let (status, body) = gateway.ticket(&producer).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = gateway.ticket(&consumer).await;
    assert_eq!(
        (status, body["expires_in"].as_u64()),
        (200, Some(60)),
        "{body}"
    );
    let ticket = body["ticket"].as_str().unwrap().to_string();
    let (status, body) = gateway.read("lk:*", &Credential::None, Some(&ticket)).await;
    assert_eq!(
        (status, body["id"].as_str()),
        (200, Some(consumer_id.as_str())),
        "{body}"
    );
    assert_eq!(
        gateway
            .read("arm:*", &Credential::None, Some(&ticket))
            .await
            .0,
        403
    );
    let (status, body, _) = gateway
        .call(
            Method::POST,
            &format!("/v1/tickets?ticket={}", encode(&ticket)),
            &Credential::None,
            None,
        )
        .await;
    assert_eq!(status, 403, "{body}");

    // The admin reads and sends anything.
    let admin = Credential::Bearer(ADMIN_TOKEN.into());
    assert_eq!(gateway.read("*:*", &admin, None).await.0, 200);
    assert_eq!(send(&admin, "anything").await.0, 200);
}

#[tokio::test]
async fn a_key_revoked_through_the_admin_api_stops_on_every_instance_within_a_second() {
    let gateway = Gateway::start().await;
    let other = gateway.second_instance().await;
    gateway.add_user("alice", "alice-password", &["lk:*"]).await;
    let ((id, key), (_, kept)) = gateway.consumer_and_producer_keys("alice").await;
    let headers = bearer_headers(&key);
    let instances = [gateway.auth.clone(), other.clone()];
    // Both instances know the key (the second may see it a refresh later).
    let mut principals = Vec::new();
    for auth in &instances {
        let started = Instant::now();
        let principal = loop {
            match auth.authenticate(&headers, None).await {
                Ok(principal) => break principal,
                Err(error) => assert!(started.elapsed() < Duration::from_secs(5), "{error}"),
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        };
        principals.push(principal);
    }
    // Open streams select on `revoked`; one for a key that stays must stay open.
    let streams: Vec<_> = instances
        .iter()
        .zip(&principals)
        .map(|(auth, principal)| {
            let revoked = auth.revoked(principal);
            tokio::spawn(async move {
                revoked.await;
                Instant::now()
            })
        })
        .collect();
    // The other instance may learn of the kept key a refresh later, as of the revoked one.
    let started = Instant::now();
    let kept_principal = loop {
        match other.authenticate(&bearer_headers(&kept), None).await {
            Ok(principal) => break principal,
            Err(error) => assert!(started.elapsed() < Duration::from_secs(5), "{error}"),
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    };
    let kept_stream = tokio::spawn(other.revoked(&kept_principal));

    assert!(
        streams.iter().all(|s| !s.is_finished()),
        "a stream ended early"
    );
    let revoked_at = Instant::now();
    let (status, body) = gateway
        .admin(Method::DELETE, &format!("/v1/admin/keys/{id}"), None)
        .await;
    assert_eq!(status, 204, "{body}");
    for (n, auth) in instances.iter().enumerate() {
        let (_, refusal) = until_refused("the revoked key", Duration::from_secs(5), async || {
            auth.authenticate(&headers, None).await.map(|_| ())
        })
        .await;
        let elapsed = revoked_at.elapsed();
        println!("instance {n}: revoked key refused {elapsed:?} after the DELETE");
        assert!(refusal.message.contains("revoked"), "{}", refusal.message);
        assert!(elapsed < REVOCATION_BOUND, "instance {n} took {elapsed:?}");
    }
    for (n, stream) in streams.into_iter().enumerate() {
        let ended = tokio::time::timeout(Duration::from_secs(5), stream)
            .await
            .expect("the stream of a revoked key ends")
            .unwrap();
        let elapsed = ended.duration_since(revoked_at);
        println!("instance {n}: the revoked key's stream ended {elapsed:?} after the DELETE");
        assert!(elapsed < REVOCATION_BOUND, "instance {n} took {elapsed:?}");
    }
    // The second instance has reloaded (it refused the key): the other stream saw that change
    // and stayed open.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(
        !kept_stream.is_finished(),
        "a stream of an unrevoked key ended"
    );
    assert!(other
        .authenticate(&bearer_headers(&kept), None)
        .await
        .is_ok());

    // The listing says revoked, and shows no secret.
    let (_, listing) = gateway.admin(Method::GET, "/v1/admin/keys", None).await;
    let revoked = listing["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id.as_str())
        .unwrap();
    assert_eq!(revoked["status"], "revoked");
    assert!(!listing.to_string().contains(&key));
    assert!(listing["keys"][0].get("key").is_none());
}

#[tokio::test]
async fn the_cli_manages_credentials_and_its_revocation_stops_a_key_within_a_second() {
    let gateway = Gateway::start().await;
    let run = async |args: &[&str], stdin: Option<&[u8]>| {
        eventpipe_cli(&gateway.database_url, args, stdin).await
    };
    let added = run(
        &[
            "users",
            "add",
            "bob",
            "--filter",
            "lk:*",
            "--password-stdin",
        ],
        Some(b"bob-password\n"),
    )
    .await;
    assert!(added.status.success(), "{}", common::stderr(&added));
    let generated = run(&["users", "add", "carol", "--filter", "*:*"], None).await;
    assert!(generated.status.success(), "{}", common::stderr(&generated));
    let carol_password = common::stdout(&generated).trim().to_string();
    assert!(carol_password.len() >= 24, "{carol_password:?}");
    let bad = run(&["users", "add", "dave", "--filter", "lk"], None).await;
    assert!(!bad.status.success());
    assert!(
        common::stderr(&bad).contains("filter \"lk\""),
        "{}",
        common::stderr(&bad)
    );

    let issued = run(
        &[
            "keys",
            "issue",
            "--consumer",
            "bob",
            "--description",
            "dashboards",
        ],
        None,
    )
    .await;
    assert!(issued.status.success(), "{}", common::stderr(&issued));
    let key = common::stdout(&issued).trim().to_string();
    assert!(key.starts_with("ep_"), "{key:?}");
    let id = key[3..].split_once('_').unwrap().0.to_string();

    // What the CLI made, the gateway accepts (after its next refresh).
    let bob = Credential::Basic("bob".into(), "bob-password".into());
    let carol = Credential::Basic("carol".into(), carol_password.clone());
    for credential in [Credential::Bearer(key.clone()), bob.clone(), carol] {
        until_status(
            "the CLI's credential is accepted",
            200,
            Duration::from_secs(5),
            async || gateway.read("lk:*", &credential, None).await,
        )
        .await;
    }
    let listed = run(&["keys", "list"], None).await;
    let listing = common::stdout(&listed);
    assert!(listing.contains(&id) && listing.contains("dashboards") && listing.contains("active"));
    assert!(!listing.contains(&key));
    let users = common::stdout(&run(&["users", "list", "--json"], None).await);
    assert!(
        users.contains("\"bob\"") && !users.contains("argon2"),
        "{users}"
    );

    // Revoke by the CLI: refused within a second of the command's end.
    let started = Instant::now();
    let revoked = run(&["keys", "revoke", &id], None).await;
    let command_took = started.elapsed();
    assert!(revoked.status.success(), "{}", common::stderr(&revoked));
    let headers = bearer_headers(&key);
    let (after_command, refusal) = until_refused(
        "the key revoked by the CLI",
        Duration::from_secs(5),
        async || gateway.auth.authenticate(&headers, None).await.map(|_| ()),
    )
    .await;
    println!(
        "CLI revocation: the command took {command_took:?}; the key was refused {after_command:?} after it returned"
    );
    assert!(refusal.message.contains("revoked"), "{}", refusal.message);
    assert!(after_command < REVOCATION_BOUND, "took {after_command:?}");

    // Removing the user by the CLI ends their password logins the same way.
    let started = Instant::now();
    let removed = run(&["users", "remove", "bob"], None).await;
    assert!(removed.status.success(), "{}", common::stderr(&removed));
    let command_took = started.elapsed();
    let started = Instant::now();
    until_status(
        "the removed user is refused",
        401,
        Duration::from_secs(5),
        async || gateway.read("lk:*", &bob, None).await,
    )
    .await;
    let after_command = started.elapsed();
    println!(
        "CLI user removal: the command took {command_took:?}; refused {after_command:?} after"
    );
    assert!(after_command < REVOCATION_BOUND, "took {after_command:?}");
    let again = run(&["users", "remove", "bob"], None).await;
    assert!(!again.status.success());
    assert!(common::stderr(&again).contains("no user bob"));
}

#[tokio::test]
async fn the_database_holds_no_secret_in_plain_text() {
    let gateway = Gateway::start().await;
    let chosen_password = "a-password-chosen-by-alice";
    gateway.add_user("alice", chosen_password, &["lk:*"]).await;
    let (status, body) = gateway
        .admin(
            Method::POST,
            "/v1/admin/users",
            Some(json!({"name": "bob", "filters": ["*:*"]})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let generated_password = body["password"].as_str().unwrap().to_string();
    let ((_, consumer), (_, producer)) = gateway.consumer_and_producer_keys("alice").await;
    let ticket = gateway
        .ticket_for(&Credential::Bearer(consumer.clone()))
        .await;
    let (status, _, headers) = gateway
        .call(
            Method::POST,
            "/v1/login",
            &Credential::Basic("alice".into(), chosen_password.into()),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let cookie = headers[header::SET_COOKIE].to_str().unwrap();
    let session = cookie
        .split(';')
        .next()
        .unwrap()
        .strip_prefix("ep_session=")
        .unwrap()
        .to_string();

    let mut stored = String::new();
    for table in [
        "gateway_users",
        "gateway_keys",
        "gateway_tickets",
        "gateway_auth_state",
    ] {
        let rows: Vec<String> = sqlx::query_scalar(&format!("SELECT t::text FROM {table} t"))
            .fetch_all(&gateway.pool)
            .await
            .unwrap();
        assert!(
            !rows.is_empty() || table == "gateway_auth_state",
            "{table} is empty"
        );
        stored.push_str(&rows.join("\n"));
    }
    let hex = |text: &str| text.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    for secret in [
        chosen_password,
        &generated_password,
        &consumer,
        &producer,
        &ticket,
        &session,
    ] {
        // The secret part alone (after the public id) must not be there either, in text or as
        // the hex a bytea would show.
        let secret_part = secret.splitn(3, '_').nth(2).unwrap_or(secret);
        for needle in [secret, secret_part] {
            assert!(
                !stored.contains(needle),
                "the database holds a secret in plain text"
            );
            assert!(
                !stored.contains(&hex(needle)),
                "the database holds a secret as bytes"
            );
        }
    }
    assert!(stored.contains("$argon2id$"), "passwords are argon2 hashes");
}

#[tokio::test]
async fn admin_routes_refuse_everyone_but_the_admin_and_say_what_is_wrong() {
    let gateway = Gateway::start().await;
    gateway.add_user("alice", "alice-password", &["lk:*"]).await;
    let ((_, consumer), (_, producer)) = gateway.consumer_and_producer_keys("alice").await;
    let ticket = gateway
        .ticket_for(&Credential::Bearer(consumer.clone()))
        .await;
    let routes = [
        (Method::GET, "/v1/admin/users".to_string(), None),
        (
            Method::POST,
            "/v1/admin/users".to_string(),
            Some(json!({"name": "eve", "password": "eve-password", "filters": ["*:*"]})),
        ),
        (Method::DELETE, "/v1/admin/users/alice".to_string(), None),
        (Method::GET, "/v1/admin/keys".to_string(), None),
        (
            Method::POST,
            "/v1/admin/keys".to_string(),
            Some(json!({"kind": "producer", "service": "eve"})),
        ),
        (Method::DELETE, "/v1/admin/keys/whatever".to_string(), None),
    ];
    let outsiders = [
        (Credential::None, 401),
        (Credential::Bearer("not-the-admin-token".into()), 401),
        (Credential::Bearer(consumer.clone()), 403),
        (Credential::ApiKeyHeader(producer.clone()), 403),
        (
            Credential::Basic("alice".into(), "alice-password".into()),
            403,
        ),
    ];
    for (method, path, body) in &routes {
        for (credential, refused) in &outsiders {
            let (status, answer, _) = gateway
                .call(method.clone(), path, credential, body.clone())
                .await;
            assert_eq!(
                status, *refused,
                "{method} {path} with {credential:?}: {answer}"
            );
        }
        let with_ticket = format!("{path}?ticket={}", encode(&ticket));
        let (status, answer, _) = gateway
            .call(
                method.clone(),
                &with_ticket,
                &Credential::None,
                body.clone(),
            )
            .await;
        assert_eq!(
            status, 403,
            "{method} {path} with a consumer's ticket: {answer}"
        );
    }
    // Nothing an outsider asked for happened.
    let (_, users) = gateway.admin(Method::GET, "/v1/admin/users", None).await;
    assert_eq!(users["users"].as_array().unwrap().len(), 1, "{users}");
    assert!(!users.to_string().contains("argon2"), "{users}");

    // The admin's mistakes: 400 with the reason, 404, 409.
    let cases = [
        (
            json!({"name": "x", "password": "long-enough", "filters": ["lk"]}),
            400,
            "bad_filter",
            "filter \"lk\"",
        ),
        (
            json!({"name": "", "password": "long-enough", "filters": ["*:*"]}),
            400,
            "bad_request",
            "empty",
        ),
        (
            json!({"name": "a:b", "password": "long-enough", "filters": ["*:*"]}),
            400,
            "bad_request",
            "':'",
        ),
        (
            json!({"name": "x", "password": "short", "filters": ["*:*"]}),
            400,
            "bad_request",
            "shorter",
        ),
        (
            json!({"name": "x", "password": "long-enough", "filters": []}),
            400,
            "bad_filter",
            "no filter",
        ),
        (
            json!({"name": "x", "filters": ["*:*"], "role": "root"}),
            400,
            "bad_request",
            "role",
        ),
        (
            json!({"name": "alice", "password": "long-enough", "filters": ["*:*"]}),
            409,
            "user_exists",
            "alice",
        ),
    ];
    for (body, status, code, reason) in cases {
        let (got, answer) = gateway
            .admin(Method::POST, "/v1/admin/users", Some(body.clone()))
            .await;
        assert_eq!(
            (got, answer["error"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
        assert!(message(&answer).contains(reason), "{body}: {answer}");
    }
    let key_cases = [
        (
            json!({"kind": "consumer", "user": "nobody"}),
            "no user nobody",
        ),
        (
            json!({"kind": "consumer", "user": "alice", "filters": ["arm:*"]}),
            "filter arm:*",
        ),
        (json!({"kind": "producer"}), "names the service"),
        (
            json!({"kind": "producer", "service": "lk", "filters": ["lk:*"]}),
            "reads nothing",
        ),
        (
            json!({"kind": "producer", "service": "lk", "expires": "3w"}),
            "expires",
        ),
        (
            json!({"kind": "producer", "service": "lk", "topics": ["bad topic"]}),
            "topic",
        ),
        (json!({"kind": "admin"}), "kind"),
    ];
    for (body, reason) in key_cases {
        let (status, answer) = gateway
            .admin(Method::POST, "/v1/admin/keys", Some(body.clone()))
            .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(message(&answer).contains(reason), "{body}: {answer}");
    }
    let (status, answer, _) = gateway
        .call(
            Method::POST,
            "/v1/admin/users",
            &Credential::Bearer(ADMIN_TOKEN.into()),
            None,
        )
        .await;
    assert_eq!(status, 400, "no body: {answer}");
    let (status, answer) = gateway
        .admin(Method::DELETE, "/v1/admin/keys/nokey", None)
        .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (404, Some("not_found")),
        "{answer}"
    );
    let (status, _) = gateway
        .admin(Method::DELETE, "/v1/admin/users/nobody", None)
        .await;
    assert_eq!(status, 404);
    // Removing a user takes their keys with them.
    let (status, _) = gateway
        .admin(Method::DELETE, "/v1/admin/users/alice", None)
        .await;
    assert_eq!(status, 204);
    until_refused(
        "the removed user's key",
        Duration::from_secs(5),
        async || {
            gateway
                .auth
                .authenticate(&bearer_headers(&consumer), None)
                .await
                .map(|_| ())
        },
    )
    .await;
}

#[tokio::test]
async fn a_login_cookie_authenticates_until_logout() {
    let gateway = Gateway::start().await;
    gateway.add_user("alice", "alice-password", &["lk:*"]).await;
    let (status, body, _) = gateway
        .call(Method::POST, "/v1/login", &Credential::None, None)
        .await;
    assert_eq!(status, 401, "{body}");
    let (status, _, _) = gateway
        .call(
            Method::POST,
            "/v1/login",
            &Credential::Basic("alice".into(), "wrong-password".into()),
            None,
        )
        .await;
    assert_eq!(status, 401);
    let (status, body, headers) = gateway
        .call(
            Method::POST,
            "/v1/login",
            &Credential::Basic("alice".into(), "alice-password".into()),
            None,
        )
        .await;
    assert_eq!(
        (status, body["user"].as_str()),
        (200, Some("alice")),
        "{body}"
    );
    let set_cookie = headers[header::SET_COOKIE].to_str().unwrap().to_string();
    for attribute in [
        "ep_session=eps_",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
        "Max-Age=43200",
    ] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    let cookie = Credential::Cookie(set_cookie.split(';').next().unwrap().to_string());
    let (status, body) = gateway.read("lk:*", &cookie, None).await;
    assert_eq!(
        (status, body["id"].as_str()),
        (200, Some("alice")),
        "{body}"
    );
    assert_eq!(gateway.read("arm:*", &cookie, None).await.0, 403);
    // A browser logged in asks for tickets for its EventSource.
    let (status, body) = gateway.ticket(&cookie).await;
    assert_eq!(status, 200, "{body}");

    let (status, _, headers) = gateway
        .call(Method::POST, "/v1/logout", &cookie, None)
        .await;
    assert_eq!(status, 204);
    assert!(headers[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let (status, body) = gateway.read("lk:*", &cookie, None).await;
    assert_eq!(status, 401, "{body}");
    assert!(message(&body).contains("session"), "{body}");
}
