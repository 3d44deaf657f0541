//! eventpipe: a Kafka-native stream processing pipeline (dispatch, log, aggregate, store).
//! Module map, one line each — start reading at `cli` for the commands and `settings` for how settings resolve.

pub mod aggregate; // `eventpipe aggregate`: windows by name × function × interval, to Kafka or PostgreSQL
pub mod catalogue; // the product catalogue: seeded products and photos, the generator of their changes
pub mod cli; // command-line edge: subcommands, global flags, error-to-exit-code mapping
pub mod codec; // record formats per topic: json or Avro (Confluent framing) via the schema registry
pub mod config; // global settings (Kafka, URLs, formats, telemetry) and the config file
pub mod dispatch; // `eventpipe dispatch`: route envelopes by action, at least once, with dead letters
pub mod envelope; // the services' JSON envelope and its validation
pub mod filter; // the SERVICE:ACTION filter language (store, gateway, flows): parser and matcher
pub mod flows; // flow control: pauses by filter and scope, held in Kafka, released in order on resume
pub mod gateway; // `eventpipe gateway`: HTTP ingress, SSE/WebSocket subscriptions, auth, admin, console
pub mod generate; // synthetic traffic: service envelopes and aggregator events
pub mod kafka; // librdkafka client configuration, logging context, broker checks, bounded delivery
pub mod log; // `eventpipe log`: info_in to Elasticsearch documents for Kibana
pub mod materialise; // `eventpipe materialise`: a topic's latest state per key in a PostgreSQL table, newer versions only
pub mod postgres; // PostgreSQL pools with a command's migrations applied
pub mod produce; // `eventpipe produce`: JSON lines to Kafka with headers and keys
pub mod settings; // one setting's resolution: flag > environment > config file > default, checked
pub mod shutdown; // SIGINT/SIGTERM into a CancellationToken, drain deadline
pub mod stage; // the stage runtime: one consume → handle → acknowledge → commit → dead-letter loop
pub mod store; // `eventpipe store`: every event kept in PostgreSQL, history and replay
pub mod tail; // `eventpipe tail`: print a topic's records as JSON lines, no consumer group
pub mod telemetry; // tracing subscriber and the /metrics, /health, /ready endpoint
pub mod topics; // topic definitions under topics/, the plan that applies them, admin operations
