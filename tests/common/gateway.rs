//! Gateway test harness: a gateway process on fresh topics and a fresh database, and minimal SSE
//! and WebSocket clients that read frames as a browser would (id, event, data).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite;

use super::{unique, wait_until, StageProcess};

/// The admin credential every test gateway starts with.
pub const ADMIN: &str = "test-admin-token-0123456789";

/// How long a read may wait for a frame before the test fails (bounds a hang, never a pace).
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(20);

pub struct GatewayProcess {
    pub process: StageProcess,
    pub api: Api,
}

/// A gateway's HTTP API at `base` (`http://host:port`).
#[derive(Debug, Clone)]
pub struct Api {
    pub base: String,
}

impl std::ops::Deref for GatewayProcess {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl GatewayProcess {
    /// `eventpipe gateway` serving `topics`, credentials and subscriptions in `database_url`.
    pub async fn start(topics: &[String], database_url: &str, extra: &[&str]) -> GatewayProcess {
        GatewayProcess::start_on("127.0.0.1:0", topics, database_url, extra).await
    }

    /// [`GatewayProcess::start`] listening on `listen`: a gateway restarted where its clients
    /// (a browser's page, say) knew the last one.
    pub async fn start_on(
        listen: &str,
        topics: &[String],
        database_url: &str,
        extra: &[&str],
    ) -> GatewayProcess {
        let topics = topics.join(",");
        let mut args = vec![
            "gateway",
            "--listen",
            listen,
            "--topics",
            &topics,
            "--admin-token",
            ADMIN,
            "--postgres-url",
            database_url,
        ];
        args.extend_from_slice(extra);
        let process = StageProcess::start(&args, &[]);
        let (address, scheme): (SocketAddr, &str) = wait_until(
            Duration::from_secs(60),
            "the gateway to listen",
            async || {
                let log = process.log();
                log.lines()
                    .filter(|l| l.contains("gateway listening"))
                    .find_map(|line| {
                        let (_, rest) = line.split_once("address=")?;
                        let address = rest.split_whitespace().next()?.parse().ok()?;
                        let scheme = if line.contains("scheme=\"https\"") {
                            "https"
                        } else {
                            "http"
                        };
                        Some((address, scheme))
                    })
                    .ok_or_else(|| format!("not listening yet:\n{log}"))
            },
        )
        .await;
        GatewayProcess {
            process,
            api: Api {
                base: format!("{scheme}://{address}"),
            },
        }
    }
}

impl Api {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `host:port` the gateway listens on.
    pub fn address(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// Posts JSON lines as one batch with the admin credential; returns status and answer.
    pub async fn post_lines(&self, topic: &str, lines: &[String], token: &str) -> (u16, Value) {
        let response = reqwest::Client::new()
            .post(self.url(&format!("/v1/topics/{topic}/events")))
            .bearer_auth(token)
            .header("content-type", "application/x-ndjson")
            .body(lines.join("\n"))
            .send()
            .await
            .expect("the gateway answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A JSON call with a credential: status and answer.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        token: &str,
    ) -> (u16, Value) {
        let mut request = reqwest::Client::new().request(method, self.url(path));
        if !token.is_empty() {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the gateway answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A user reading `filters` and a consumer key of theirs; returns the key.
    pub async fn consumer_key(&self, user: &str, filters: &[&str]) -> (String, String) {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/v1/admin/users",
                Some(serde_json::json!({"name": user, "password": "a-long-password", "filters": filters})),
                ADMIN,
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/v1/admin/keys",
                Some(serde_json::json!({"kind": "consumer", "user": user})),
                ADMIN,
            )
            .await;
        assert_eq!(status, 201, "{body}");
        (
            body["id"].as_str().unwrap().to_string(),
            body["key"].as_str().unwrap().to_string(),
        )
    }

    pub async fn sse(&self, query: &str, last_event_id: Option<&str>, token: &str) -> SseClient {
        SseClient::connect(
            &self.url(&format!("/v1/stream?{query}")),
            last_event_id,
            token,
        )
        .await
    }

    pub async fn ws(&self, query: &str, token: &str) -> WsClient {
        WsClient::connect(
            &format!("{}/v1/ws?{query}", self.base.replace("http://", "ws://")),
            token,
        )
        .await
    }
}

/// One frame as a client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// `event` (an event), `position`, `notice`, `disconnect`.
    pub kind: String,
    /// The event's name (its action) for events.
    pub event: String,
    pub id: Option<String>,
    pub data: Value,
}

impl Frame {
    /// `(topic, partition, offset)` of an event frame.
    pub fn coordinates(&self) -> (String, i64, i64) {
        (
            self.data["topic"].as_str().unwrap_or_default().to_string(),
            self.data["partition"].as_i64().unwrap_or(-1),
            self.data["offset"].as_i64().unwrap_or(-1),
        )
    }
}

/// Reads Server-Sent Events from a response body, as EventSource parses them.
pub struct SseClient {
    pub status: u16,
    body: Option<futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>>,
    buffer: String,
    /// The last id seen (the browser's lastEventId).
    pub last_id: Option<String>,
    pub error_body: String,
}

impl SseClient {
    pub async fn connect(url: &str, last_event_id: Option<&str>, token: &str) -> SseClient {
        let mut request = reqwest::Client::new().get(url);
        if !token.is_empty() {
            request = request.bearer_auth(token);
        }
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.expect("the gateway answers");
        let status = response.status().as_u16();
        if status != 200 {
            return SseClient {
                status,
                body: None,
                buffer: String::new(),
                last_id: None,
                error_body: response.text().await.unwrap_or_default(),
            };
        }
        SseClient {
            status,
            body: Some(response.bytes_stream().boxed()),
            buffer: String::new(),
            last_id: last_event_id.map(String::from),
            error_body: String::new(),
        }
    }

    /// The next frame (comments skipped); `None` when the stream ends. Keep-alive comments do
    /// not count as a frame: the timeout bounds the wait for a real one.
    pub async fn next(&mut self) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + FRAME_TIMEOUT;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, String::new(), Vec::new());
                for line in block.lines() {
                    if line.starts_with(':') {
                        continue;
                    }
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "id" => id = Some(value.to_string()),
                        "event" => event = value.to_string(),
                        "data" => data.push(value.to_string()),
                        _ => {}
                    }
                }
                if id.is_none() && data.is_empty() {
                    continue; // a comment-only block (keep-alive) or a retry hint
                }
                if id.is_some() {
                    self.last_id = id.clone();
                }
                let data = data.join("\n");
                let kind = match (event.as_str(), data.is_empty()) {
                    (_, true) => "position",
                    ("notice", _) => "notice",
                    ("disconnect", _) => "disconnect",
                    _ => "event",
                };
                return Some(Frame {
                    kind: kind.to_string(),
                    event,
                    id,
                    data: serde_json::from_str(&data).unwrap_or(Value::Null),
                });
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.as_mut()?.next())
                .await
                .expect("a frame within the timeout")?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk.ok()?));
        }
    }
}

pub struct WsClient {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    pub last_id: Option<String>,
    /// The close frame's code and reason, once closed.
    pub closed: Option<(u16, String)>,
}

impl WsClient {
    pub async fn connect(url: &str, token: &str) -> WsClient {
        Self::try_connect(url, token)
            .await
            .expect("the WebSocket opens")
    }

    pub async fn try_connect(url: &str, token: &str) -> Result<WsClient, tungstenite::Error> {
        use tungstenite::client::IntoClientRequest;
        let mut request = url.into_client_request()?;
        if !token.is_empty() {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let (socket, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(WsClient {
            socket,
            last_id: None,
            closed: None,
        })
    }

    pub async fn send_text(&mut self, text: &str) {
        let _ = self.socket.send(tungstenite::Message::text(text)).await;
    }

    /// The next frame; `None` once the socket closed. Pings do not count as a frame.
    pub async fn next(&mut self) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + FRAME_TIMEOUT;
        loop {
            let message = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .expect("a frame within the timeout")?;
            match message.ok()? {
                tungstenite::Message::Text(text) => {
                    let value: Value = serde_json::from_str(&text).expect("frames are JSON");
                    let id = value["id"].as_str().map(String::from);
                    if id.is_some() {
                        self.last_id = id.clone();
                    }
                    return Some(Frame {
                        kind: value["type"].as_str().unwrap_or_default().to_string(),
                        event: value["event"].as_str().unwrap_or_default().to_string(),
                        id,
                        data: if value["type"] == "event" {
                            value["data"].clone()
                        } else {
                            value
                        },
                    });
                }
                tungstenite::Message::Close(frame) => {
                    self.closed = Some(
                        frame
                            .map(|f| (u16::from(f.code), f.reason.to_string()))
                            .unwrap_or((1005, String::new())),
                    );
                    return None;
                }
                _ => continue,
            }
        }
    }
}

/// A client of either transport.
pub enum Client {
    Sse(SseClient),
    Ws(Box<WsClient>),
}

impl Client {
    pub async fn next(&mut self) -> Option<Frame> {
        match self {
            Client::Sse(client) => client.next().await,
            Client::Ws(client) => client.next().await,
        }
    }

    pub fn last_id(&self) -> Option<String> {
        match self {
            Client::Sse(client) => client.last_id.clone(),
            Client::Ws(client) => client.last_id.clone(),
        }
    }

    /// Reads until the stream says where it starts (the first frame is always a position).
    pub async fn started(&mut self) -> String {
        let frame = self.next().await.expect("a first frame");
        assert_eq!(frame.kind, "position", "{frame:?}");
        frame.id.expect("the first frame has an id")
    }
}

/// Like `collect_events`, but a `slow` disconnect (the gateway dropping a client that read too
/// slowly, as it should under load) ends the read early, as a real client would before it
/// reconnects with its cursor: the frames so far, and whether it was dropped.
pub async fn collect_events_until_slow(client: &mut Client, expected: usize) -> (Vec<Frame>, bool) {
    let mut events = Vec::new();
    while events.len() < expected {
        let frame = client.next().await.unwrap_or_else(|| {
            panic!(
                "the stream ended after {} of {expected} events",
                events.len()
            )
        });
        match frame.kind.as_str() {
            "event" => events.push(frame),
            "disconnect" if frame.data["code"] == "slow" => return (events, true),
            "disconnect" => panic!(
                "disconnected after {} of {expected}: {frame:?}",
                events.len()
            ),
            _ => {}
        }
    }
    (events, false)
}

/// Reads event frames until `expected` many arrived; checks each arrives once and in offset
/// order per partition. Returns the event frames.
pub async fn collect_events(client: &mut Client, expected: usize) -> Vec<Frame> {
    let (events, slow) = collect_events_until_slow(client, expected).await;
    assert!(
        !slow,
        "dropped as slow after {} of {expected}",
        events.len()
    );
    let mut seen = HashSet::new();
    let mut last: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for frame in &events {
        let (topic, partition, offset) = frame.coordinates();
        assert!(
            seen.insert((topic.clone(), partition, offset)),
            "duplicate {topic}/{partition}/{offset}"
        );
        if let Some(previous) = last.insert((topic.clone(), partition), offset) {
            assert!(
                offset > previous,
                "{topic}/{partition}: {offset} after {previous}"
            );
        }
    }
    events
}

/// An envelope line as the services send it.
pub fn envelope(service: &str, action: &str, user: u64, n: u64) -> String {
    serde_json::json!({
        "service": service,
        "action": action,
        "payload": {"message": format!("event {n}"), "timestamp": "2026-12-01T09:00:00", "data": {"user_id": user, "n": n}}
    })
    .to_string()
}

/// Runs `eventpipe store` over `topics` into `database` until its events table holds `count`
/// rows; the stage keeps running while the returned process lives.
pub async fn store_until_it_holds(topics: &[String], database: &str, count: i64) -> StageProcess {
    let store = StageProcess::start(
        &[
            "store",
            "--topics",
            &topics.join(","),
            "--postgres-url",
            database,
            "--group-id",
            &unique("gw-store"),
        ],
        &[],
    );
    let pool = sqlx::PgPool::connect(database).await.unwrap();
    wait_until(Duration::from_secs(60), "the stored events", async || {
        let stored: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&pool)
            .await;
        match stored {
            Ok(n) if n == count => Ok(()),
            other => Err(format!("{other:?} of {count}")),
        }
    })
    .await;
    store
}

/// Waits until the subscription at `path` has no client attached.
pub async fn wait_until_sleeping(gateway: &Api, path: &str, key: &str) {
    wait_until(
        Duration::from_secs(30),
        "the subscription to sleep",
        async || {
            let (_, answer) = gateway.call(reqwest::Method::GET, path, None, key).await;
            match answer["state"].as_str() {
                Some("sleeping") => Ok(()),
                _ => Err(answer.to_string()),
            }
        },
    )
    .await;
}
