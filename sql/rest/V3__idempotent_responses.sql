-- A replayed POST returns exactly what the first one returned, even if the resource changed
-- or was deleted since.
ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS status smallint;
ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS response jsonb;

-- Keys expire; the pruner deletes by age.
CREATE INDEX IF NOT EXISTS idempotency_keys_created_at ON idempotency_keys (created_at);
