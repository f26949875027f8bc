ALTER TABLE dts_outbox_paused
    ALTER COLUMN paused_at SET DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT;
ALTER TABLE dts_outbox
    ALTER COLUMN run_at SET DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT,
    ALTER COLUMN created_at SET DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT;
CREATE OR REPLACE FUNCTION dts_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('dts_outbox', '');
    RETURN NULL;
END;
$$;
DROP TABLE dts_outbox_listeners;
