-- diesel-transaction-signals: operating the outbox. A queue listed here is paused: relays claim
-- none of its jobs (in every process) until it is removed; jobs keep arriving.
-- Times are milliseconds since the Unix epoch, read from the database's clock.
CREATE TABLE dts_outbox_paused (
    queue TEXT PRIMARY KEY,
    paused_at BIGINT NOT NULL DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT
);
-- Dead letters by queue and age (listing, purging); the table's other index covers state = 0.
CREATE INDEX dts_outbox_dead ON dts_outbox (queue, run_at) WHERE state = 2;
