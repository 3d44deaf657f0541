-- Durable subscriptions: a name, what it selects, and where it stands. While no client is
-- attached it sleeps and its position stays; an attached session moves the position as it
-- writes frames and keeps `heartbeat_at` fresh. A newer attachment takes over (`session_id`).

CREATE TABLE gateway_subscriptions (
    name         text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9._-]{1,200}$'),
    -- the credential that created it (a key id, a user name, or admin): only it and the admin
    -- may attach, change or delete it
    owner        text NOT NULL,
    filters      text[] NOT NULL CHECK (cardinality(filters) > 0),
    -- empty: every topic the gateway serves
    topics       text[] NOT NULL DEFAULT '{}',
    -- the cursor id (per-partition next offsets) the next attachment resumes from
    position     text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    session_id   text,
    heartbeat_at timestamptz
);
