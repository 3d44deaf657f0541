-- The product catalogue's photos: PostgreSQL is their truth (the gateway caches them in Redis).
-- The products themselves are a materialised table (`eventpipe materialise`): key, version,
-- state jsonb; the generator seeds it and creates it when missing.
CREATE TABLE IF NOT EXISTS product_photos (
    product_id   text PRIMARY KEY,
    content_type text NOT NULL,
    bytes        bytea NOT NULL,
    -- a strong validator of the bytes (hex SHA-256), sent as the ETag
    etag         text NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
