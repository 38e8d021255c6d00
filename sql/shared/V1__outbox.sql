-- The outbox, the same in every source database (DESIGN.md "Outbox table").
-- Writers insert a row in the same transaction as their own change; cdc-relay reads the insert
-- from the WAL through the publication below and never queries this table.

CREATE TABLE IF NOT EXISTS outbox_events (
    id             uuid        PRIMARY KEY,
    aggregate_type text        NOT NULL CHECK (aggregate_type <> ''),
    aggregate_id   text        NOT NULL CHECK (aggregate_id <> ''),
    event_type     text        NOT NULL CHECK (event_type ~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$'),
    payload        jsonb       NOT NULL,
    traceparent    text,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Rows are pruned by age by the owning service (the WAL, not the table, is what the relay
-- reads), so the pruner needs this index and nothing else.
CREATE INDEX IF NOT EXISTS outbox_events_created_at ON outbox_events (created_at);

-- The relay may read the outbox (for operators' checks and re-drives) and nothing else.
GRANT SELECT ON outbox_events TO kafkify_relay;

-- Inserts only: the pruner's deletes must not reach Kafka.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'kafkify_outbox') THEN
        CREATE PUBLICATION kafkify_outbox FOR TABLE outbox_events WITH (publish = 'insert');
    END IF;
END
$$;
