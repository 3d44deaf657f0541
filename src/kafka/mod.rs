//! Everything that talks to Kafka through librdkafka: client configuration and the logging
//! context (`client`), broker reachability checks, and admin operations on topics (`admin`).

pub mod admin;
pub mod client;
pub mod delivery;

pub use client::{ClientKind, KafkaError, PipelineContext};
