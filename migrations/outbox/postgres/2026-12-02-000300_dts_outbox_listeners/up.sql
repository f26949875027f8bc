-- diesel-transaction-signals: NOTIFY only when some relay listens.
--
-- A relay's `listen()` connection registers here (its backend pid) after `LISTEN dts_outbox`,
-- and removes its row when it stops cleanly; registering also removes the rows of backends
-- that no longer exist. The trigger sends `NOTIFY dts_outbox` only while a row exists, so an
-- enqueuing transaction pays for the notification (a queue entry and a database-wide lock at
-- COMMIT) only when a relay in some process can hear it.
--
-- UNLOGGED on purpose: after a server crash every listening connection is gone, and the table
-- is emptied with them. (A clean restart keeps its rows: stale ones cost a NOTIFY per
-- enqueuing transaction until the next listener registers and removes them.)
CREATE UNLOGGED TABLE dts_outbox_listeners (
    pid INTEGER PRIMARY KEY,                -- pg_backend_pid() of the listening connection
    backend_start TIMESTAMPTZ NOT NULL,     -- with pid, names that connection (pids are reused)
    relay TEXT NOT NULL,                    -- the relay's name, for operators
    registered_at BIGINT NOT NULL DEFAULT (date_part('epoch', clock_timestamp()) * 1000)::BIGINT
);
-- Every enqueuing transaction's trigger reads it, with the enqueuing role's rights.
GRANT SELECT ON dts_outbox_listeners TO PUBLIC;

CREATE OR REPLACE FUNCTION dts_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM dts_outbox_listeners) THEN
        PERFORM pg_notify('dts_outbox', '');
    END IF;
    RETURN NULL;
END;
$$;

-- The clock as float8 (`date_part`), as the crate's statements now read it: since PostgreSQL
-- 14 `extract` returns numeric, several times slower. Both round to the millisecond; they can
-- differ by 1 ms only at an exact half millisecond (float8 rounds half to even). A catalog
-- change, no table rewrite.
ALTER TABLE dts_outbox
    ALTER COLUMN run_at SET DEFAULT (date_part('epoch', clock_timestamp()) * 1000)::BIGINT,
    ALTER COLUMN created_at SET DEFAULT (date_part('epoch', clock_timestamp()) * 1000)::BIGINT;
ALTER TABLE dts_outbox_paused
    ALTER COLUMN paused_at SET DEFAULT (date_part('epoch', clock_timestamp()) * 1000)::BIGINT;
