//! `GET /v1/ws`: a subscription over WebSocket — JSON text frames (`event`, `position`, `notice`,
//! `disconnect`), pings at the keep-alive interval, and a close frame with the reason.
//!
//! The stream is one-way, but for acknowledgements: a durable subscription attached with
//! `ack=client` takes `{"type":"ack","id":"<event id>"}` messages and keeps the last one as its
//! position. Any other message gets a policy close; a client that stops reading is closed after
//! the write timeout; either way its cursor resumes it.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures::SinkExt;
use tokio::sync::{mpsc, watch};

use crate::gateway::auth::Principal;
use crate::gateway::cursor::Cursor;
use crate::gateway::http::ApiError;
use crate::gateway::session::{Outgoing, SessionRequest};
use crate::gateway::streams::{self, ConnectionGauge, FrameMeter, SessionTask, StreamQuery};
use crate::gateway::subscriptions::Attachment;
use crate::gateway::Gateway;

/// Largest message a client may send (it should send none).
const MAX_CLIENT_MESSAGE: usize = 4096;

/// The read buffer of a connection: clients send only pongs and a close. tungstenite's default
/// (128 KiB) is zero-filled on every read attempt — each time `serve` polls the socket after a
/// frame — and stays resident: ~110 KiB of an idle connection's ~143 KiB and the gateway's top
/// symbol (memset) under fan-out, per `scripts/bench gateway` (BENCHMARKS.md).
const READ_BUFFER: usize = MAX_CLIENT_MESSAGE + 16;

/// Close codes (4000–4999 are the application's).
const CLOSE_POLICY: u16 = 1008;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_SLOW: u16 = 4008;
const CLOSE_REVOKED: u16 = 4003;
const CLOSE_UNAVAILABLE: u16 = 1011;
const CLOSE_REPLACED: u16 = 4009;

pub async fn stream(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(pairs): Query<Vec<(String, String)>>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let query = StreamQuery::parse(&pairs)?;
    let (principal, request) = gateway.authorize_stream(&headers, &query).await?;
    Ok(open_with(&gateway, upgrade, request, principal, None, None))
}

/// The WebSocket response of a session; an attachment to a durable subscription tracks its
/// position.
pub fn open_with(
    gateway: &Arc<Gateway>,
    upgrade: WebSocketUpgrade,
    request: SessionRequest,
    principal: Principal,
    attachment: Option<Attachment>,
    client_acks: Option<watch::Sender<Option<String>>>,
) -> Response {
    let gateway = gateway.clone();
    upgrade
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| async move {
            let (session, mut frames) = streams::start(
                gateway.sessions.clone(),
                request,
                &gateway.auth,
                &principal,
                gateway.shutdown.clone(),
            );
            if let Some(attachment) = attachment {
                frames = attachment.track(frames);
            }
            serve(&gateway, socket, session, frames, client_acks).await;
        })
}

async fn serve(
    gateway: &Gateway,
    mut socket: WebSocket,
    mut session: SessionTask,
    mut frames: mpsc::Receiver<Outgoing>,
    client_acks: Option<watch::Sender<Option<String>>>,
) {
    let _gauge = ConnectionGauge::open("ws");
    let meter = FrameMeter::new("ws");
    let timeout = gateway.settings.write_timeout;
    let mut ping = tokio::time::interval(gateway.settings.keep_alive);
    ping.tick().await;
    let mut batch = Vec::with_capacity(streams::WRITE_BATCH);
    let mut session_over = false;
    loop {
        tokio::select! {
            // The session first: what it queues now is written in this same round.
            biased;
            () = &mut session, if !session_over => session_over = true,
            received = frames.recv_many(&mut batch, streams::WRITE_BATCH) => {
                if received == 0 {
                    return;
                }
                meter.count(&batch);
                // Every waiting frame is queued, then one flush writes them out together.
                let mut end = None;
                let written = streams::within(timeout, async {
                    for item in batch.drain(..) {
                        match item {
                            Outgoing::End { code, reason } => {
                                end = Some((code, reason));
                                break;
                            }
                            other => socket.feed(Message::Text(text(other).into())).await?,
                        }
                    }
                    socket.flush().await
                })
                .await;
                batch.clear();
                if !wrote(written) {
                    return;
                }
                if let Some((code, reason)) = end {
                    let _ = tokio::time::timeout(timeout, socket.send(Message::Text(end_json(code, &reason).into()))).await;
                    close(&mut socket, close_code(code), &reason, timeout).await;
                    return;
                }
            }
            _ = ping.tick() => {
                if !wrote(streams::within(timeout, socket.send(Message::Ping(Default::default()))).await) {
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(Message::Pong(_) | Message::Ping(_))) => continue,
                Some(Ok(Message::Text(text))) if client_acks.is_some() => {
                    match acknowledged(&text) {
                        Ok(id) => {
                            if let Some(acks) = &client_acks {
                                acks.send_replace(Some(id));
                            }
                        }
                        Err(why) => {
                            metrics::counter!("eventpipe_gateway_clients_dropped_total", "reason" => "client_message").increment(1);
                            close(&mut socket, CLOSE_POLICY, &why, timeout).await;
                            return;
                        }
                    }
                }
                Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                    metrics::counter!("eventpipe_gateway_clients_dropped_total", "reason" => "client_message").increment(1);
                    close(&mut socket, CLOSE_POLICY, "this stream takes no messages from clients", timeout).await;
                    return;
                }
            },
        }
    }
}

/// Whether a write went through; a client that accepted nothing for the write timeout is
/// counted as stalled.
fn wrote(outcome: Result<Result<(), axum::Error>, tokio::time::error::Elapsed>) -> bool {
    match outcome {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            metrics::counter!("eventpipe_gateway_clients_dropped_total", "reason" => "stalled")
                .increment(1);
            false
        }
    }
}

/// The id a client acknowledges: `{"type":"ack","id":"<an id this gateway sent>"}`.
fn acknowledged(text: &str) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct Ack {
        #[serde(rename = "type")]
        kind: String,
        id: String,
    }
    let ack: Ack = serde_json::from_str(text)
        .map_err(|_| "expected {\"type\":\"ack\",\"id\":\"<event id>\"}".to_string())?;
    if ack.kind != "ack" {
        return Err(format!("unknown message type {:?}: only ack", ack.kind));
    }
    Cursor::decode(&ack.id).map_err(|e| format!("ack: {e}"))?;
    Ok(ack.id)
}

fn close_code(code: &str) -> u16 {
    match code {
        "slow" | "stalled" => CLOSE_SLOW,
        "revoked" => CLOSE_REVOKED,
        "replaced" => CLOSE_REPLACED,
        "shutdown" => CLOSE_GOING_AWAY,
        _ => CLOSE_UNAVAILABLE,
    }
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str, timeout: std::time::Duration) {
    // A close reason is at most 123 bytes.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from(&reason[..end]),
    };
    let _ = tokio::time::timeout(timeout, socket.send(Message::Close(Some(frame)))).await;
}

fn end_json(code: &str, reason: &str) -> String {
    serde_json::json!({ "type": "disconnect", "code": code, "reason": reason }).to_string()
}

/// One frame's text; an event's JSON is spliced in as it is (built once for every connection).
fn text(item: Outgoing) -> String {
    match item {
        Outgoing::Event { event, id } => {
            let name = serde_json::to_string(event.event_name()).unwrap_or_default();
            let mut text = String::with_capacity(event.json.len() + id.len() + name.len() + 40);
            text.push_str("{\"type\":\"event\",\"id\":\"");
            text.push_str(&id);
            text.push_str("\",\"event\":");
            text.push_str(&name);
            text.push_str(",\"data\":");
            text.push_str(&event.json);
            text.push('}');
            text
        }
        Outgoing::Position { id } => {
            serde_json::json!({ "type": "position", "id": id }).to_string()
        }
        Outgoing::Notice { kind, message } => {
            serde_json::json!({ "type": "notice", "kind": kind, "message": message }).to_string()
        }
        Outgoing::End { code, reason } => end_json(code, &reason),
    }
}
