CREATE OR REPLACE FUNCTION dts_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('dts_outbox', '');
    RETURN NULL;
END;
$$;
DROP TABLE dts_outbox_listeners;
