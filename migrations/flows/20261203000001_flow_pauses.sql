-- Flow control: pauses (a filter set with a scope) and, per consumer and partition, where a pause
-- began holding and where its release stands. The held events themselves stay in Kafka.

CREATE TABLE flow_pauses (
    id                  text PRIMARY KEY,
    -- SERVICE:ACTION filters; an event matching any is held
    filters             text[] NOT NULL CHECK (cardinality(filters) > 0),
    -- dispatch, gateway, subscription:NAME or all
    scope               text NOT NULL,
    reason              text NOT NULL DEFAULT '',
    state               text NOT NULL CHECK (state IN ('paused', 'resuming', 'resumed')),
    paused_by           text NOT NULL,
    paused_at           timestamptz NOT NULL DEFAULT now(),
    resumed_by          text,
    resume_requested_at timestamptz,
    -- when the last partition was drained
    resumed_at          timestamptz
);
CREATE INDEX flow_pauses_active ON flow_pauses (state) WHERE state <> 'resumed';

-- One row per (pause, holder, partition) that held something: written before the holder's
-- committed offset may pass the first held record, so a crash or a rebalance keeps the hold.
CREATE TABLE flow_holds (
    pause_id        text NOT NULL REFERENCES flow_pauses (id) ON DELETE CASCADE,
    -- the consumer: a dispatcher's consumer group (later: a gateway subscription)
    holder          text NOT NULL,
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    first_held      bigint NOT NULL,
    first_held_time timestamptz,
    -- events held so far, counted once each: only offsets past last_held add to it
    held            bigint NOT NULL DEFAULT 0,
    last_held       bigint NOT NULL,
    -- the holder's position when it moved back to release (set once, on resume)
    resume_at       bigint,
    released        bigint NOT NULL DEFAULT 0,
    last_released   bigint,
    drained_at      timestamptz,
    PRIMARY KEY (pause_id, holder, topic, kafka_partition)
);
