//! `eventpipe gateway`: the one authenticated entry point — events in over HTTP, live and durable
//! subscriptions out over SSE and WebSocket, history over HTTP, and the admin API.

pub mod auth;
pub mod cursor;
pub mod event;
pub mod fanout;
pub mod http;
pub mod settings;
