-- Tasks served by api-grpc and completed from task.completed.
CREATE TABLE IF NOT EXISTS tasks (
    id              uuid        PRIMARY KEY,
    task_type       text        NOT NULL CHECK (length(task_type) BETWEEN 1 AND 100),
    input           jsonb       NOT NULL,
    status          text        NOT NULL DEFAULT 'PENDING'
                                CHECK (status IN ('PENDING', 'COMPLETED', 'FAILED')),
    result          jsonb,
    error           text,
    idempotency_key text        UNIQUE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz
);

CREATE INDEX IF NOT EXISTS tasks_created_at_id ON tasks (created_at, id);
