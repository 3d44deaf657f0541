-- Aggregates written by `eventpipe aggregate` with STORAGE_TYPE=postgres: one row per
-- (name, function, window). Re-emitting a window (late events, replay after a crash) upserts
-- its row, so a window is never counted twice.
CREATE TABLE IF NOT EXISTS events_aggregated (
    name         TEXT             NOT NULL,
    function     TEXT             NOT NULL,
    window_start TIMESTAMPTZ      NOT NULL,
    window_end   TIMESTAMPTZ      NOT NULL,
    value        DOUBLE PRECISION NOT NULL,
    count        BIGINT           NOT NULL,
    emitted_at   TIMESTAMPTZ      NOT NULL,
    PRIMARY KEY (name, function, window_start)
);
