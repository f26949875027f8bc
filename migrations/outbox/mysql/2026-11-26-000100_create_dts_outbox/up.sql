-- diesel-transaction-signals: the transactional outbox (durable deferred work).
-- Times are milliseconds since the Unix epoch, read from the database's clock.
CREATE TABLE dts_outbox (
    id BIGINT AUTO_INCREMENT PRIMARY KEY,
    queue VARCHAR(191) NOT NULL,
    payload LONGTEXT NOT NULL,
    idempotency_key VARCHAR(191),
    state SMALLINT NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 10,
    run_at BIGINT NOT NULL DEFAULT (CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)),
    locked_until BIGINT,
    locked_by VARCHAR(191),
    last_error TEXT,
    created_at BIGINT NOT NULL DEFAULT (CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)),
    UNIQUE KEY dts_outbox_idempotency (queue, idempotency_key),
    KEY dts_outbox_ready (state, run_at, id)
) ENGINE = InnoDB;
