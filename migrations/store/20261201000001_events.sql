-- The event store written by `eventpipe store`: one row per Kafka record of the stored topics,
-- idempotent on the record's coordinates, partitioned by day of Kafka time so retention drops
-- whole partitions (the stage creates them ahead and drops expired ones; see src/store/schema.rs).
--
-- `seq` is the store's global sequence. Writers take `events_write_order` (an advisory lock)
-- before drawing from it, so rows become visible in seq order: a reader paging by
-- `seq > last seen` never skips a row committed after its page (no gap at the live edge).
CREATE SEQUENCE IF NOT EXISTS events_seq AS bigint;

CREATE TABLE IF NOT EXISTS events (
    seq             bigint      NOT NULL DEFAULT nextval('events_seq'),
    topic           text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    -- The record's Kafka timestamp (1970-01-01 when the record has none): the partition key.
    kafka_time      timestamptz NOT NULL,
    -- payload.timestamp read as UTC; null when absent or unreadable.
    event_time      timestamptz,
    -- From the service/action headers, else the envelope; '' when neither names them.
    service         text        NOT NULL,
    action          text        NOT NULL,
    key             bytea,
    -- [[name, value], ...] in order; a value that is not UTF-8 is {"hex": "..."}.
    headers         jsonb,
    -- The value as JSON: the record itself for JSON topics, the decoded record for Avro ones.
    value           jsonb,
    -- The record's bytes when they are not stored as `value` alone: Avro frames (replayed
    -- byte for byte), and anything that is not a readable value (with `reason`).
    raw             bytea,
    -- json | avro | raw
    format          text        NOT NULL,
    schema_id       integer,
    -- Why a raw record is not JSON (not UTF-8, malformed, oversized, bad Avro, refused by jsonb).
    reason          text,
    stored_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (topic, kafka_partition, kafka_offset, kafka_time)
) PARTITION BY RANGE (kafka_time);

-- The filter language's access paths: by sequence, by sender, by type; time by BRIN (rows
-- arrive roughly in time order, so block ranges summarise well).
CREATE INDEX IF NOT EXISTS events_seq_idx ON events (seq);
CREATE INDEX IF NOT EXISTS events_service_seq_idx ON events (service, seq);
CREATE INDEX IF NOT EXISTS events_action_seq_idx ON events (action, seq);
CREATE INDEX IF NOT EXISTS events_kafka_time_brin ON events USING brin (kafka_time);
CREATE INDEX IF NOT EXISTS events_event_time_brin ON events USING brin (event_time);
