DROP INDEX dts_outbox_dead;
DROP TABLE dts_outbox_paused;
