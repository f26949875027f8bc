-- diesel-transaction-signals: NOTIFY only while some relay listens.
--
-- The statement trigger dts_outbox_notify sends `NOTIFY dts_outbox` at every enqueuing COMMIT:
-- a queue entry and a database-wide lock at COMMIT, of use only to a relay in another process
-- that LISTENs. From now on the trigger is enabled only while such a relay is registered in
-- dts_outbox_listeners, and disabled otherwise. (A disabled trigger costs an INSERT nothing
-- measurable; a condition inside the trigger function, `IF EXISTS (SELECT 1 FROM
-- dts_outbox_listeners)`, measured slower than the NOTIFY it would save.)
--
-- A relay's listen() connection calls dts_outbox_listener_register(relay) after LISTEN, and
-- dts_outbox_listener_unregister() when it stops; both first remove the rows of backends that
-- no longer exist, then dts_outbox_listeners_sync() makes the trigger match the table: enabled
-- while a row exists, disabled when none does. Enabling or disabling it is an ALTER TABLE: it
-- waits for the transactions that have written to dts_outbox to end (so a job inserted before
-- the registration committed is visible to the relay's first look after it, and a job
-- inserted after it notifies, whatever the transaction's isolation level), and holds up new
-- writers meanwhile, at most lock_timeout (100 ms): then the call fails and is retried.
--
-- UNLOGGED on purpose: after a server crash every listening connection is gone, and the table
-- is emptied with them. (A clean restart keeps its rows: until the next registration removes
-- the stale ones, the trigger stays as it was. `SELECT dts_outbox_listener_unregister()` from
-- any session removes them and syncs the trigger.)
CREATE UNLOGGED TABLE dts_outbox_listeners (
    pid INTEGER PRIMARY KEY,                -- pg_backend_pid() of the listening connection
    backend_start TIMESTAMPTZ NOT NULL,     -- with pid, names that connection (pids are reused)
    relay TEXT NOT NULL,                    -- the relay's name, for operators
    registered_at BIGINT NOT NULL DEFAULT (date_part('epoch', clock_timestamp()) * 1000)::BIGINT
);

-- Enables dts_outbox_notify while dts_outbox_listeners has a row, disables it otherwise;
-- returns whether a row exists. It runs with its owner's rights (ALTER TABLE needs the table's
-- owner), its search_path pinned below; anyone may call it: it only makes the trigger match
-- the table.
CREATE FUNCTION dts_outbox_listeners_sync() RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET lock_timeout = '100ms' AS $$
DECLARE
    listened boolean;
    enabled boolean;
BEGIN
    -- One registration or removal at a time: each sees the rows of those before it.
    LOCK TABLE dts_outbox_listeners IN SHARE ROW EXCLUSIVE MODE;
    listened := EXISTS (SELECT 1 FROM dts_outbox_listeners);
    SELECT tgenabled <> 'D' INTO enabled FROM pg_trigger
        WHERE tgrelid = 'dts_outbox'::regclass AND tgname = 'dts_outbox_notify';
    IF listened AND NOT enabled THEN
        ALTER TABLE dts_outbox ENABLE TRIGGER dts_outbox_notify;
    ELSIF enabled AND NOT listened THEN
        ALTER TABLE dts_outbox DISABLE TRIGGER dts_outbox_notify;
    END IF;
    RETURN listened;
END;
$$;
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION dts_outbox_listeners_sync() SET search_path = %I, pg_temp',
                   current_schema());
END;
$$;

-- Registers the calling connection (after its LISTEN dts_outbox) for relay `relay_name`,
-- removing the rows of backends that no longer exist: no backend with that pid, or one that
-- started at another time (the pid was reused). A row whose backend's start the caller may
-- not read (another role's, without pg_read_all_stats) is kept: a stale row costs a NOTIFY, a
-- removed live one would cost a relay its wake-ups. Runs with the caller's rights: INSERT,
-- DELETE and SELECT on dts_outbox_listeners.
CREATE FUNCTION dts_outbox_listener_register(relay_name TEXT) RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE dts_outbox_listeners IN SHARE ROW EXCLUSIVE MODE;
    DELETE FROM dts_outbox_listeners l WHERE NOT EXISTS (
        SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.pid
        AND (a.backend_start IS NULL OR a.backend_start = l.backend_start));
    INSERT INTO dts_outbox_listeners (pid, backend_start, relay)
    VALUES (pg_backend_pid(),
            (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()),
            relay_name);
    PERFORM dts_outbox_listeners_sync();
END;
$$;

-- Removes the calling connection's registration and those of backends that no longer exist;
-- the trigger is disabled once no registration is left.
CREATE FUNCTION dts_outbox_listener_unregister() RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE dts_outbox_listeners IN SHARE ROW EXCLUSIVE MODE;
    DELETE FROM dts_outbox_listeners l WHERE l.pid = pg_backend_pid() OR NOT EXISTS (
        SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.pid
        AND (a.backend_start IS NULL OR a.backend_start = l.backend_start));
    PERFORM dts_outbox_listeners_sync();
END;
$$;

-- The trigger as the first migration made it (recreated if it was dropped by hand, as this
-- crate's README once suggested for relays that never listen), disabled: nobody listens yet.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = 'dts_outbox'::regclass AND tgname = 'dts_outbox_notify') THEN
        CREATE TRIGGER dts_outbox_notify AFTER INSERT ON dts_outbox
            FOR EACH STATEMENT EXECUTE FUNCTION dts_outbox_notify();
    END IF;
END;
$$;
ALTER TABLE dts_outbox DISABLE TRIGGER dts_outbox_notify;

-- The clock as float8 (`date_part`), as the crate's statements now read it: since PostgreSQL
-- 14 `extract` returns numeric, several times slower. Both round to the millisecond; they can
-- differ by 1 ms only at an exact half millisecond (float8 rounds half to even). A catalog
-- change, no table rewrite.
ALTER TABLE dts_outbox
    ALTER COLUMN run_at SET DEFAULT (date_part('epoch', clock_timestamp()) * 1000)::BIGINT,
    ALTER COLUMN created_at SET DEFAULT (date_part('epoch', clock_timestamp()) * 1000)::BIGINT;
ALTER TABLE dts_outbox_paused
    ALTER COLUMN paused_at SET DEFAULT (date_part('epoch', clock_timestamp()) * 1000)::BIGINT;
