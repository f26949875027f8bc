DROP TABLE dts_outbox;
DROP FUNCTION dts_outbox_notify();
