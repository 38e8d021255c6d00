-- Every event the worker consumed, once: the event id is the dedup key, so a redelivery after a
-- crash between the database commit and the offset commit changes nothing.
CREATE TABLE IF NOT EXISTS processed_events (
    event_id     uuid        PRIMARY KEY,
    topic        text        NOT NULL,
    partition    integer     NOT NULL,
    "offset"     bigint      NOT NULL,
    event_type   text        NOT NULL,
    event_key    text,
    payload      jsonb       NOT NULL,
    commit_ts    timestamptz,
    processed_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS processed_events_topic_partition_offset
    ON processed_events (topic, partition, "offset");
