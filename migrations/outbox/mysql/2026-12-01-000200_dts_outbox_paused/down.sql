DROP TABLE dts_outbox_paused;
