-- diesel-transaction-signals: the transactional outbox (durable deferred work).
-- Times are milliseconds since the Unix epoch, read from the database's clock.
CREATE TABLE dts_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    payload TEXT NOT NULL,
    idempotency_key TEXT,
    state INTEGER NOT NULL DEFAULT 0,           -- 0 pending, 2 dead (delivered rows are deleted)
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 10,
    run_at INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    locked_until INTEGER,
    locked_by TEXT,
    last_error TEXT,
    created_at INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
);
CREATE UNIQUE INDEX dts_outbox_idempotency ON dts_outbox (queue, idempotency_key);
CREATE INDEX dts_outbox_ready ON dts_outbox (state, run_at, id);
