DROP TABLE dts_outbox;
