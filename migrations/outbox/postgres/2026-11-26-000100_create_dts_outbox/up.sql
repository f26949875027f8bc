-- diesel-transaction-signals: the transactional outbox (durable deferred work).
-- Times are milliseconds since the Unix epoch, read from the database's clock.
CREATE TABLE dts_outbox (
    id BIGSERIAL PRIMARY KEY,
    queue TEXT NOT NULL,
    payload TEXT NOT NULL,
    idempotency_key TEXT,
    state SMALLINT NOT NULL DEFAULT 0,          -- 0 pending, 2 dead (delivered rows are deleted)
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 10,
    run_at BIGINT NOT NULL DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT,
    locked_until BIGINT,
    locked_by TEXT,
    last_error TEXT,
    created_at BIGINT NOT NULL DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT
);
CREATE UNIQUE INDEX dts_outbox_idempotency ON dts_outbox (queue, idempotency_key);
CREATE INDEX dts_outbox_ready ON dts_outbox (run_at, id) WHERE state = 0;

-- Wake relays in other processes when jobs commit (delivered by PostgreSQL at COMMIT,
-- once per transaction).
CREATE FUNCTION dts_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('dts_outbox', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER dts_outbox_notify AFTER INSERT ON dts_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION dts_outbox_notify();
