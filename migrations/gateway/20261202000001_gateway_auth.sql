-- The gateway's credentials: users (password, what they may read), API keys (producer keys bound
-- to a service, consumer keys under a user), browser tickets and sessions, and one change counter
-- that every gateway instance polls to notice a change without reading the tables.

CREATE TABLE gateway_users (
    name          text PRIMARY KEY CHECK (name <> ''),
    -- argon2id PHC string; the password itself is never stored.
    password_hash text NOT NULL,
    -- SERVICE:ACTION filters the user may read; at least one.
    filters       text[] NOT NULL CHECK (cardinality(filters) > 0),
    -- topics the user may read; empty: any.
    topics        text[] NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE gateway_keys (
    -- the public part of ep_<id>_<secret>
    id            text PRIMARY KEY,
    -- SHA-256 of the secret part: 32 random bytes need no slow hash.
    secret_sha256 bytea NOT NULL CHECK (length(secret_sha256) = 32),
    kind          text NOT NULL CHECK (kind IN ('producer', 'consumer')),
    -- producer keys: the sender they send as
    service       text,
    -- consumer keys: the user whose filters bound what they read (gone with the user)
    user_name     text REFERENCES gateway_users (name) ON DELETE CASCADE,
    -- consumer keys: narrower filters than the user's; empty: the user's
    filters       text[] NOT NULL DEFAULT '{}',
    -- producer: topics it may send to; consumer: narrower topics than the user's; empty: any
    topics        text[] NOT NULL DEFAULT '{}',
    description   text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    CHECK (
        (kind = 'producer' AND service IS NOT NULL AND user_name IS NULL AND cardinality(filters) = 0)
        OR (kind = 'consumer' AND user_name IS NOT NULL AND service IS NULL)
    )
);
CREATE INDEX gateway_keys_user_name ON gateway_keys (user_name);

-- Short-lived browser tickets (?ticket=, an EventSource cannot send headers) and sessions (the
-- ep_session cookie), each for one credential: a key, a user, or the admin token (neither).
CREATE TABLE gateway_tickets (
    id            text PRIMARY KEY,
    secret_sha256 bytea NOT NULL CHECK (length(secret_sha256) = 32),
    kind          text NOT NULL CHECK (kind IN ('ticket', 'session')),
    key_id        text REFERENCES gateway_keys (id) ON DELETE CASCADE,
    user_name     text REFERENCES gateway_users (name) ON DELETE CASCADE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    CHECK (key_id IS NULL OR user_name IS NULL)
);
CREATE INDEX gateway_tickets_expires_at ON gateway_tickets (expires_at);

-- One row: bumped by every change of users or keys (and by a live session's end), so an
-- instance polls one integer instead of reloading the tables.
CREATE TABLE gateway_auth_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   bigint NOT NULL
);
INSERT INTO gateway_auth_state (singleton, version) VALUES (true, 1);

CREATE FUNCTION gateway_auth_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE gateway_auth_state SET version = version + 1;
    RETURN NULL;
END
$$;

-- Per statement: a bulk change (or a user's cascade to their keys) is one bump.
CREATE TRIGGER gateway_users_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON gateway_users
    FOR EACH STATEMENT EXECUTE FUNCTION gateway_auth_changed();
CREATE TRIGGER gateway_keys_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON gateway_keys
    FOR EACH STATEMENT EXECUTE FUNCTION gateway_auth_changed();

-- A logout (a live session deleted) must reach the instances that cached the session; purging
-- expired tickets and sessions must not make every instance reload.
CREATE FUNCTION gateway_sessions_ended() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM ended WHERE kind = 'session' AND expires_at > now()) THEN
        UPDATE gateway_auth_state SET version = version + 1;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER gateway_sessions_ended
    AFTER DELETE ON gateway_tickets
    REFERENCING OLD TABLE AS ended
    FOR EACH STATEMENT EXECUTE FUNCTION gateway_sessions_ended();
