-- Resources served by api-rest. `version` drives optimistic concurrency (ETag / If-Match).
CREATE TABLE IF NOT EXISTS resources (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description text        NOT NULL DEFAULT '',
    attributes  jsonb       NOT NULL DEFAULT '{}'::jsonb,
    version     bigint      NOT NULL DEFAULT 1 CHECK (version > 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Keyset pagination: (sort column, id) so the order is total and stable.
CREATE INDEX IF NOT EXISTS resources_name_id ON resources (name, id);
CREATE INDEX IF NOT EXISTS resources_updated_at_id ON resources (updated_at, id);

-- A retried POST with the same Idempotency-Key returns the first result instead of creating
-- a second resource and a second event.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key          text        PRIMARY KEY,
    request_hash bytea       NOT NULL,
    resource_id  uuid        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
