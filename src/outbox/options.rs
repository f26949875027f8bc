//! The options both relay builders share ([`RelayBuilder`](super::RelayBuilder) and
//! [`AsyncRelayBuilder`](super::AsyncRelayBuilder)): one set of setters, with one meaning and
//! one default, written once. A builder that uses [`relay_option_setters!`] has the fields
//! `name`, `concurrency`, `batch_size`, `lease`, `poll_interval`, `backoff`, `unknown_check`
//! and (feature `outbox-listen`) `listen`.

/// The option setters of a relay builder. `workers` says what `concurrency(n)` starts;
/// `setup` is the doctests' hidden preamble (it opens a `fn f(pool: ...)` and a `cfg` block),
/// `builder` the expression that makes a builder from `pool`.
macro_rules! relay_option_setters {
    (workers = $workers:literal, setup = $setup:literal, builder = $builder:literal) => {
        /// The relay's name, for log lines, thread names and lease owners (default:
        /// `relay-<pid>-<counter>`).
        ///
        /// Each worker records its leases in `locked_by` as `<name>/<worker>/<nonce>`, with a
        /// random nonce drawn at each `spawn()`: a worker completes, fails or releases only rows
        /// leased to itself, never a sibling's or another relay's (even one with the same name).
        ///
        #[doc = concat!("```\n", $setup, "let b = ", $builder, ".name(\"billing-relay\");\n# let _ = b; }\n# }\n```")]
        pub fn name(mut self, name: impl Into<String>) -> Self {
            self.name = Some(name.into());
            self
        }

        #[doc = concat!("Worker ", $workers, " (at least 1; default 1), each claiming its own batches with its own connection.")]
        ///
        #[doc = concat!("```\n", $setup, "let b = ", $builder, ".concurrency(4);\n# let _ = b; }\n# }\n```")]
        pub fn concurrency(mut self, workers: usize) -> Self {
            self.concurrency = workers.max(1);
            self
        }

        /// Rows claimed per round trip (at least 1, at most 100,000; default 100).
        ///
        #[doc = concat!("```\n", $setup, "let b = ", $builder, ".batch_size(500);\n# let _ = b; }\n# }\n```")]
        pub fn batch_size(mut self, rows: usize) -> Self {
            self.batch_size = rows.clamp(1, 100_000) as i64;
            self
        }

        /// How long a claimed row stays reserved for this relay (default 30 s): a row whose
        /// lease passed while its handler still runs may be claimed by another worker, so
        /// choose it above the longest handler.
        ///
        #[doc = concat!("```\n", $setup, "let b = ", $builder, ".lease(std::time::Duration::from_secs(120));\n# let _ = b; }\n# }\n```")]
        pub fn lease(mut self, lease: std::time::Duration) -> Self {
            self.lease = lease.max(std::time::Duration::from_millis(1));
            self
        }

        /// The longest an idle worker waits before looking for due rows again (default 1 s);
        /// commits of durable jobs in this process, and notifications heard by
        /// [`listen`](Self::listen), wake it sooner.
        ///
        #[doc = concat!("```\n", $setup, "let b = ", $builder, ".poll_interval(std::time::Duration::from_millis(200));\n# let _ = b; }\n# }\n```")]
        pub fn poll_interval(mut self, interval: std::time::Duration) -> Self {
            self.poll_interval = interval.max(std::time::Duration::from_millis(1));
            self
        }

        /// Retry delays for failed attempts (default: [`Backoff::default`](super::Backoff)).
        ///
        #[doc = concat!("```\n", $setup, "use diesel_transaction_signals::outbox::Backoff;\nuse std::time::Duration;\nlet b = ", $builder, ".backoff(Backoff::new(Duration::from_millis(100), Duration::from_secs(60)));\n# let _ = b; }\n# }\n```")]
        pub fn backoff(mut self, backoff: super::Backoff) -> Self {
            self.backoff = backoff;
            self
        }

        /// How often an idle relay checks for rows in queues it has no handler for (default
        /// 30 s); each such queue is logged once per check, so a job enqueued to a misspelt
        /// queue does not wait unnoticed.
        ///
        #[doc = concat!("```\n", $setup, "let b = ", $builder, ".unknown_queue_check(std::time::Duration::from_secs(300));\n# let _ = b; }\n# }\n```")]
        pub fn unknown_queue_check(mut self, every: std::time::Duration) -> Self {
            self.unknown_check = every;
            self
        }

        /// Also wake when another process commits jobs: `LISTEN dts_outbox` on a dedicated
        /// Diesel `PgConnection` to `database_url`, on a thread of its own, so the URL takes
        /// what the pool's URL takes (libpq's URI or `key=value` syntax, `sslmode` and the other
        /// TLS options).
        ///
        /// After `LISTEN` the listener registers its connection in `dts_outbox_listeners`
        /// (PostgreSQL migration `2026-12-02-000300_dts_outbox_listeners`), which enables the
        /// outbox's NOTIFY trigger, then wakes the workers to look for due jobs at once; when
        /// the relay stops cleanly it removes its registration, and the last one to go disables
        /// the trigger. So with no relay listening, enqueuing costs no notification, and a relay
        /// running only in the processes that enqueue (woken in-process) needs no `listen`.
        /// Enabling the trigger waits for the transactions that have written to `dts_outbox`
        /// (at most 100 ms, then the registration is retried), so no job is left to the poll
        /// by the registration: those committed before it are found by the first look, and
        /// later ones notify. The listener's role needs `SELECT`, `INSERT` and `DELETE` on
        /// `dts_outbox_listeners`.
        ///
        /// The listener looks for notifications every millisecond while they keep coming,
        /// backing off to every 50 ms after 200 ms of silence. If it cannot connect, `LISTEN`
        /// or register, or loses its connection, it logs one warning, retries with exponential
        /// backoff (100 ms doubling up to 30 s, logged at debug level only) and logs one info
        /// line "listener reconnected" when it is back; meanwhile the workers keep polling
        /// every [`poll_interval`](Self::poll_interval), so choose that with the outage in
        /// mind. A listener thread that cannot be started makes [`spawn`](Self::spawn) return
        /// [`OutboxError::Spawn`](super::OutboxError::Spawn). Connecting blocks shutdown until
        /// it ends: add `connect_timeout` to the URL if the server may be unreachable.
        ///
        #[doc = concat!("```\n", $setup, "let b = ", $builder, ".listen(\"postgres://app@db/app?sslmode=require\");\n# let _ = b; }\n# }\n```")]
        #[cfg(feature = "outbox-listen")]
        pub fn listen(mut self, database_url: impl Into<String>) -> Self {
            self.listen = Some(database_url.into());
            self
        }
    };
}

pub(super) use relay_option_setters;
