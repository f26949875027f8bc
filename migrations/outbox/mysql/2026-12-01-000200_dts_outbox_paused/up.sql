-- diesel-transaction-signals: operating the outbox. A queue listed here is paused: relays claim
-- none of its jobs (in every process) until it is removed; jobs keep arriving.
-- Times are milliseconds since the Unix epoch, read from the database's clock.
CREATE TABLE dts_outbox_paused (
    queue VARCHAR(191) PRIMARY KEY,
    paused_at BIGINT NOT NULL DEFAULT (CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED))
) ENGINE = InnoDB;
