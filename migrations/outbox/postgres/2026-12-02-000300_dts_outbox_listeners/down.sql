ALTER TABLE dts_outbox_paused
    ALTER COLUMN paused_at SET DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT;
ALTER TABLE dts_outbox
    ALTER COLUMN run_at SET DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT,
    ALTER COLUMN created_at SET DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT;
-- The trigger notifies at every enqueuing COMMIT again.
ALTER TABLE dts_outbox ENABLE TRIGGER dts_outbox_notify;
DROP FUNCTION dts_outbox_listener_unregister();
DROP FUNCTION dts_outbox_listener_register(TEXT);
DROP FUNCTION dts_outbox_listeners_sync();
DROP TABLE dts_outbox_listeners;
