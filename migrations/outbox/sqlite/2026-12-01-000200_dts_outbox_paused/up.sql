-- diesel-transaction-signals: operating the outbox. A queue listed here is paused: relays claim
-- none of its jobs (in every process) until it is removed; jobs keep arriving.
-- Times are milliseconds since the Unix epoch, read from the database's clock.
CREATE TABLE dts_outbox_paused (
    queue TEXT PRIMARY KEY,
    paused_at INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
);
