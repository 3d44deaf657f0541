//! Everything that talks to Kafka through librdkafka: client configuration and the logging
//! context (`client`), broker reachability checks, and delivery (`delivery`). Admin operations
//! on topics are `topics::admin`'s.

pub mod acks;
pub mod client;
pub mod delivery;

pub use client::{ClientKind, KafkaError, PipelineContext};
