//! Operating the outbox: what is queued, dead letters, retries, pauses ([`Admin`]).
//!
//! Every operation is one conditional statement, so it is safe while relays run: a row a relay
//! holds a live lease on (`locked_until` in the future) is never retried, rescheduled or
//! deleted; the statement's condition decides, in the database, at the moment it runs. When
//! an operation on one job does nothing, a second read says why, as a typed error.

#![cfg_attr(
    not(any(feature = "postgres", feature = "sqlite", feature = "mysql")),
    allow(unused)
)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Nullable, Text};

use super::backend::{AdminDb, OutboxConnection};
use super::job::JobId;
use super::{valid_queue, wake, OutboxError};

/// The SQL that differs between backends.
struct Dialect {
    /// Milliseconds since the epoch, from the database's clock.
    now: &'static str,
    /// The type of `CAST(x AS ...)` to a 64-bit integer.
    int: &'static str,
    /// `$n` placeholders (PostgreSQL) rather than `?`.
    dollar: bool,
    /// An INSERT that does nothing on a duplicate key: the verb and the clause after VALUES.
    insert_ignore: (&'static str, &'static str),
}

impl Dialect {
    /// The `n`th placeholder (1-based).
    fn p(&self, n: usize) -> String {
        if self.dollar {
            format!("${n}")
        } else {
            "?".to_owned()
        }
    }
}

#[cfg(feature = "postgres")]
const PG: Dialect = Dialect {
    // float8, as the relay's statements (`backend.rs`' `now_ms!`)
    now: "(date_part('epoch', now()) * 1000)::BIGINT",
    int: "BIGINT",
    dollar: true,
    insert_ignore: ("INSERT", " ON CONFLICT (queue) DO NOTHING"),
};
#[cfg(feature = "sqlite")]
const SQLITE: Dialect = Dialect {
    now: "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
    int: "INTEGER",
    dollar: false,
    insert_ignore: ("INSERT", " ON CONFLICT (queue) DO NOTHING"),
};
#[cfg(feature = "mysql")]
const MYSQL: Dialect = Dialect {
    now: "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)",
    int: "SIGNED",
    dollar: false,
    insert_ignore: ("INSERT IGNORE", ""),
};

/// Runs `$body` with `$c` the concrete connection and `$d` its [`Dialect`]; evaluates to a
/// `QueryResult` (the body's `?` returns from the body, not from the caller).
macro_rules! with_db {
    ($conn:expr, |$c:ident, $d:ident| $body:expr) => {
        match $conn.outbox_admin() {
            Err(e) => Err(e),
            #[cfg(feature = "postgres")]
            Ok(AdminDb::Pg($c)) => {
                let $d = &PG;
                // A closure, so that `?` in the body stays in the body.
                body(|| -> QueryResult<_> { $body })
            }
            #[cfg(feature = "sqlite")]
            Ok(AdminDb::Sqlite($c)) => {
                let $d = &SQLITE;
                // A closure, so that `?` in the body stays in the body.
                body(|| -> QueryResult<_> { $body })
            }
            #[cfg(feature = "mysql")]
            Ok(AdminDb::Mysql($c)) => {
                let $d = &MYSQL;
                // A closure, so that `?` in the body stays in the body.
                body(|| -> QueryResult<_> { $body })
            }
            Ok(AdminDb::_Never(never, _)) => match never {},
        }
    };
}

/// Runs a [`with_db!`] body.
fn body<T>(f: impl FnOnce() -> QueryResult<T>) -> QueryResult<T> {
    f()
}

/// A database error, or [`OutboxError::NotMigrated`] when the outbox's tables are missing.
fn db_err(e: diesel::result::Error) -> OutboxError {
    if let diesel::result::Error::DatabaseError(_, info) = &e {
        let m = info.message();
        let missing = m.contains("no such table")
            || m.contains("does not exist")
            || m.contains("doesn't exist");
        for table in ["dts_outbox_paused", "dts_outbox"] {
            if missing && m.contains(table) {
                return OutboxError::NotMigrated(table.to_owned());
            }
        }
    }
    OutboxError::Database(e)
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

fn time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

fn check_queue(queue: &str) -> Result<(), OutboxError> {
    if valid_queue(queue) {
        Ok(())
    } else {
        Err(OutboxError::InvalidQueue(queue.to_owned()))
    }
}

#[derive(QueryableByName)]
struct StatusRow {
    #[diesel(sql_type = Text)]
    queue: String,
    #[diesel(sql_type = BigInt)]
    ready: i64,
    #[diesel(sql_type = BigInt)]
    scheduled: i64,
    #[diesel(sql_type = BigInt)]
    running: i64,
    #[diesel(sql_type = BigInt)]
    retrying: i64,
    #[diesel(sql_type = BigInt)]
    dead: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    oldest_ready: Option<i64>,
    #[diesel(sql_type = BigInt)]
    now: i64,
}

#[derive(QueryableByName)]
struct LeaseRow {
    #[diesel(sql_type = Text)]
    queue: String,
    #[diesel(sql_type = Text)]
    owner: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct PausedRow {
    #[diesel(sql_type = Text)]
    queue: String,
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct JobStateRow {
    #[diesel(sql_type = BigInt)]
    state: i64,
    #[diesel(sql_type = BigInt)]
    leased: i64,
}

#[derive(QueryableByName)]
struct DeadRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    queue: String,
    #[diesel(sql_type = Text)]
    payload: String,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Integer)]
    max_attempts: i32,
    #[diesel(sql_type = Nullable<Text>)]
    idempotency_key: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    last_error: Option<String>,
    #[diesel(sql_type = BigInt)]
    created_at: i64,
    #[diesel(sql_type = BigInt)]
    run_at: i64,
}

/// One queue's state in the database, from [`Admin::status`].
///
/// The counts are disjoint: a pending job is `running` while a relay holds a live lease on it,
/// otherwise `ready` when due, otherwise `retrying` (waiting out the backoff after a failed
/// attempt) or `scheduled` (enqueued with a delay, or rescheduled, and never run).
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::prelude::*;
/// use diesel_migrations::MigrationHarness;
/// use diesel_transaction_signals::outbox::{self, Admin};
/// use std::time::Duration;
///
/// let mut conn = SqliteConnection::establish(":memory:").unwrap();
/// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
/// let mut signals = diesel_transaction_signals::SignalConnection::new(conn);
/// signals.defer_durable("emails", &1).unwrap();
/// signals.enqueue(outbox::DurableJob::new("emails", &2)?.delay(Duration::from_secs(3600)))?;
///
/// let emails = Admin::queue_status(&mut signals, "emails")?;
/// assert_eq!((emails.ready, emails.scheduled, emails.running, emails.dead), (1, 1, 0, 0));
/// assert!(emails.oldest_ready_age.is_some()); // alert when this grows
/// assert!(!emails.paused && emails.leases.is_empty());
/// # }
/// # Ok::<(), diesel_transaction_signals::outbox::OutboxError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStatus {
    /// The queue's name.
    pub queue: String,
    /// Due now, waiting for a relay (including due retries and rows whose lease expired).
    pub ready: u64,
    /// Not due yet, never attempted (enqueued with a delay, or rescheduled).
    pub scheduled: u64,
    /// Leased by a relay now (running, or claimed in a batch about to run).
    pub running: u64,
    /// Not due yet after a failed attempt (waiting out the backoff).
    pub retrying: u64,
    /// Dead-lettered: out of attempts, kept until retried, discarded or purged.
    pub dead: u64,
    /// How long the oldest ready job has been due: the lag to alert on. `None` when nothing is
    /// ready.
    pub oldest_ready_age: Option<Duration>,
    /// Paused with [`Admin::pause`]: relays claim none of its jobs.
    pub paused: bool,
    /// The workers holding live leases on the queue's jobs.
    pub leases: Vec<Lease>,
}

/// A relay worker holding leases, in [`QueueStatus::leases`].
///
/// ```
/// # use diesel_transaction_signals::outbox::Lease;
/// fn describe(l: &Lease) -> String { format!("{} holds {} job(s)", l.relay(), l.jobs) }
/// # let _ = describe;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    /// The lease owner as recorded in `locked_by`: `<relay name>/<worker>/<nonce>`.
    pub owner: String,
    /// How many of the queue's jobs it holds.
    pub jobs: u64,
}

impl Lease {
    /// The relay's name ([`RelayBuilder::name`](super::RelayBuilder::name)): the owner
    /// without its `/<worker>/<nonce>` suffix.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Lease;
    /// fn relay_name(l: &Lease) -> &str { l.relay() }
    /// # let _ = relay_name;
    /// ```
    pub fn relay(&self) -> &str {
        let mut parts = self.owner.rsplitn(3, '/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(_), Some(_), Some(name)) => name,
            _ => &self.owner,
        }
    }
}

/// A dead-lettered job, from [`Admin::dead_letters`].
///
/// ```
/// # use diesel_transaction_signals::outbox::DeadLetter;
/// fn line(d: &DeadLetter) -> String {
///     format!("{} #{} after {} attempts: {}", d.queue, d.id, d.attempts,
///             d.last_error.as_deref().unwrap_or("-"))
/// }
/// # let _ = line;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The job's id (for [`Admin::retry`] and [`Admin::discard`]).
    pub id: JobId,
    /// Its queue.
    pub queue: String,
    /// The payload as stored (JSON text).
    pub payload: String,
    /// Attempts made.
    pub attempts: u32,
    /// Attempts it was allowed.
    pub max_attempts: u32,
    /// Its idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// When it was enqueued (the database's clock).
    pub created_at: SystemTime,
    /// When it was dead-lettered (the database's clock; for rows dead-lettered before this
    /// version, plus the backoff delay its last failure computed).
    pub failed_at: SystemTime,
}

/// Operations on the outbox for operators and services: state per queue, dead letters,
/// retries, pauses. Each is a function taking any [`OutboxConnection`] (a plain
/// `PgConnection`, `MysqlConnection` or `SqliteConnection`, or a
/// [`SignalConnection`](crate::SignalConnection) of one, pooled or not), so a service can call
/// it from an HTTP handler and the `dts-outbox` tool (feature `cli`) calls it from a shell.
///
/// Safe while relays run: a job a relay holds a live lease on is never retried, rescheduled or
/// deleted ([`OutboxError::JobRunning`]); a pause takes effect at the next claim of every relay
/// in every process. A job whose lease expired counts as not running: its relay lost it, and
/// any relay may claim it again.
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::prelude::*;
/// use diesel_migrations::MigrationHarness;
/// use diesel_transaction_signals::outbox::{self, Admin, OutboxError};
///
/// let mut conn = SqliteConnection::establish(":memory:").unwrap();
/// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
/// // (A relay that failed it max_attempts times would do this.)
/// diesel::sql_query("INSERT INTO dts_outbox (queue, payload, state, attempts, last_error) \
///                    VALUES ('emails', '1', 2, 10, 'smtp down')").execute(&mut conn).unwrap();
///
/// for status in Admin::status(&mut conn)? {
///     println!("{}: {} ready, {} dead", status.queue, status.ready, status.dead);
/// }
/// let dead = Admin::dead_letters(&mut conn, Some("emails"), 100)?;
/// assert_eq!(dead[0].last_error.as_deref(), Some("smtp down"));
/// Admin::retry(&mut conn, dead[0].id)?; // attempts reset, due now
/// assert!(matches!(Admin::retry(&mut conn, dead[0].id), Err(OutboxError::JobNotDead(_))));
/// # }
/// # Ok::<(), diesel_transaction_signals::outbox::OutboxError>(())
/// ```
#[derive(Debug)]
pub struct Admin;

impl Admin {
    /// The state of every queue that has jobs or is paused, by name.
    ///
    /// Errors: [`OutboxError::NotMigrated`] when the outbox's tables are missing.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_migrations::MigrationHarness;
    /// use diesel_transaction_signals::outbox::{self, Admin, OutboxError};
    ///
    /// let mut conn = SqliteConnection::establish(":memory:").unwrap();
    /// assert!(matches!(Admin::status(&mut conn), Err(OutboxError::NotMigrated(_))));
    /// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
    /// Admin::pause(&mut conn, "emails")?;
    /// let all = Admin::status(&mut conn)?;
    /// assert_eq!((all[0].queue.as_str(), all[0].paused, all[0].ready), ("emails", true, 0));
    /// # }
    /// # Ok::<(), diesel_transaction_signals::outbox::OutboxError>(())
    /// ```
    pub fn status<C: OutboxConnection>(conn: &mut C) -> Result<Vec<QueueStatus>, OutboxError> {
        Self::status_of(conn, None)
    }

    /// The state of one queue.
    ///
    /// Errors: [`OutboxError::UnknownQueue`] when it has no jobs and is not paused.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_migrations::MigrationHarness;
    /// use diesel_transaction_signals::outbox::{self, Admin, OutboxError};
    ///
    /// let mut conn = SqliteConnection::establish(":memory:").unwrap();
    /// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
    /// let err = Admin::queue_status(&mut conn, "nope").unwrap_err();
    /// assert!(matches!(err, OutboxError::UnknownQueue(q) if q == "nope"));
    /// # }
    /// ```
    pub fn queue_status<C: OutboxConnection>(
        conn: &mut C,
        queue: &str,
    ) -> Result<QueueStatus, OutboxError> {
        check_queue(queue)?;
        Self::status_of(conn, Some(queue))?
            .pop()
            .ok_or_else(|| OutboxError::UnknownQueue(queue.to_owned()))
    }

    fn status_of<C: OutboxConnection>(
        conn: &mut C,
        queue: Option<&str>,
    ) -> Result<Vec<QueueStatus>, OutboxError> {
        let (rows, leases, paused): (Vec<StatusRow>, Vec<LeaseRow>, Vec<PausedRow>) =
            with_db!(conn, |c, d| {
                let now = d.now;
                let leased = format!("(locked_until IS NOT NULL AND locked_until >= {now})");
                let free = format!("(locked_until IS NULL OR locked_until < {now})");
                let filter = format!("({} IS NULL OR queue = {})", d.p(1), d.p(2));
                let rows: Vec<StatusRow> = diesel::sql_query(format!(
                    "SELECT queue, \
                 COUNT(CASE WHEN state = 0 AND run_at <= {now} AND {free} THEN 1 END) AS ready, \
                 COUNT(CASE WHEN state = 0 AND run_at > {now} AND attempts = 0 AND {free} \
                   THEN 1 END) AS scheduled, \
                 COUNT(CASE WHEN state = 0 AND {leased} THEN 1 END) AS running, \
                 COUNT(CASE WHEN state = 0 AND run_at > {now} AND attempts > 0 AND {free} \
                   THEN 1 END) AS retrying, \
                 COUNT(CASE WHEN state = 2 THEN 1 END) AS dead, \
                 MIN(CASE WHEN state = 0 AND run_at <= {now} AND {free} THEN run_at END) \
                   AS oldest_ready, \
                 CAST(MAX({now}) AS {int}) AS now \
                 FROM dts_outbox WHERE {filter} GROUP BY queue ORDER BY queue",
                    int = d.int
                ))
                .bind::<Nullable<Text>, _>(queue)
                .bind::<Nullable<Text>, _>(queue)
                .load(c)?;
                let leases: Vec<LeaseRow> = diesel::sql_query(format!(
                "SELECT queue, locked_by AS owner, CAST(COUNT(*) AS {int}) AS n FROM dts_outbox \
                 WHERE state = 0 AND locked_by IS NOT NULL AND {leased} AND {filter} \
                 GROUP BY queue, locked_by ORDER BY queue, locked_by",
                int = d.int
            ))
                .bind::<Nullable<Text>, _>(queue)
                .bind::<Nullable<Text>, _>(queue)
                .load(c)?;
                let paused: Vec<PausedRow> = diesel::sql_query(format!(
                    "SELECT queue FROM dts_outbox_paused WHERE {filter} ORDER BY queue"
                ))
                .bind::<Nullable<Text>, _>(queue)
                .bind::<Nullable<Text>, _>(queue)
                .load(c)?;
                Ok((rows, leases, paused))
            })
            .map_err(db_err)?;
        let mut out: Vec<QueueStatus> = rows
            .into_iter()
            .map(|r| QueueStatus {
                paused: paused.iter().any(|p| p.queue == r.queue),
                leases: leases
                    .iter()
                    .filter(|l| l.queue == r.queue)
                    .map(|l| Lease {
                        owner: l.owner.clone(),
                        jobs: l.n.max(0) as u64,
                    })
                    .collect(),
                oldest_ready_age: r
                    .oldest_ready
                    .map(|t| Duration::from_millis((r.now - t).max(0) as u64)),
                queue: r.queue,
                ready: r.ready.max(0) as u64,
                scheduled: r.scheduled.max(0) as u64,
                running: r.running.max(0) as u64,
                retrying: r.retrying.max(0) as u64,
                dead: r.dead.max(0) as u64,
            })
            .collect();
        for p in paused {
            if !out.iter().any(|s| s.queue == p.queue) {
                out.push(QueueStatus {
                    queue: p.queue,
                    ready: 0,
                    scheduled: 0,
                    running: 0,
                    retrying: 0,
                    dead: 0,
                    oldest_ready_age: None,
                    paused: true,
                    leases: Vec::new(),
                });
            }
        }
        out.sort_by(|a, b| a.queue.cmp(&b.queue));
        Ok(out)
    }

    /// Dead-lettered jobs, oldest first (by id), of `queue` or of every queue, at most `limit`.
    ///
    /// Errors: [`OutboxError::UnknownQueue`] for a queue that has no jobs and is not paused.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_migrations::MigrationHarness;
    /// use diesel_transaction_signals::outbox::{self, Admin};
    ///
    /// let mut conn = SqliteConnection::establish(":memory:").unwrap();
    /// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
    /// assert!(Admin::dead_letters(&mut conn, None, 50)?.is_empty());
    /// # }
    /// # Ok::<(), diesel_transaction_signals::outbox::OutboxError>(())
    /// ```
    pub fn dead_letters<C: OutboxConnection>(
        conn: &mut C,
        queue: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, OutboxError> {
        if let Some(q) = queue {
            Self::known(conn, q)?;
        }
        let limit = limit.min(i64::MAX as usize) as i64;
        let rows: Vec<DeadRow> = with_db!(conn, |c, d| {
            diesel::sql_query(format!(
                "SELECT id, queue, payload, attempts, max_attempts, idempotency_key, last_error, \
                 created_at, run_at FROM dts_outbox WHERE state = 2 \
                 AND ({} IS NULL OR queue = {}) ORDER BY id LIMIT {}",
                d.p(1),
                d.p(2),
                d.p(3)
            ))
            .bind::<Nullable<Text>, _>(queue)
            .bind::<Nullable<Text>, _>(queue)
            .bind::<BigInt, _>(limit)
            .load(c)
        })
        .map_err(db_err)?;
        Ok(rows
            .into_iter()
            .map(|r| DeadLetter {
                id: JobId::new(r.id),
                queue: r.queue,
                payload: r.payload,
                attempts: r.attempts.max(0) as u32,
                max_attempts: r.max_attempts.max(0) as u32,
                idempotency_key: r.idempotency_key,
                last_error: r.last_error,
                created_at: time(r.created_at),
                failed_at: time(r.run_at),
            })
            .collect())
    }

    /// Gives a dead-lettered job another round: its attempts start again from zero and it is
    /// due now. The last error is kept until the next attempt replaces it.
    ///
    /// Errors: [`OutboxError::JobNotFound`] (no such job: delivered, discarded or never there),
    /// [`OutboxError::JobNotDead`] (it is pending, or already retried), or
    /// [`OutboxError::JobRunning`] (a relay runs it now: it is pending, not dead; a retry
    /// never makes a job run twice at once).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_migrations::MigrationHarness;
    /// use diesel_transaction_signals::outbox::{self, Admin, JobId, OutboxError};
    ///
    /// let mut conn = SqliteConnection::establish(":memory:").unwrap();
    /// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
    /// let err = Admin::retry(&mut conn, JobId::new(7)).unwrap_err();
    /// assert!(matches!(err, OutboxError::JobNotFound(id) if id.get() == 7));
    /// # }
    /// ```
    pub fn retry<C: OutboxConnection>(conn: &mut C, id: JobId) -> Result<(), OutboxError> {
        let n = Self::revive(conn, Some(id.get()), None)?;
        if n == 1 {
            return Ok(());
        }
        Err(match Self::job_state(conn, id)? {
            None => OutboxError::JobNotFound(id),
            Some((_, true)) => OutboxError::JobRunning(id),
            Some(_) => OutboxError::JobNotDead(id),
        })
    }

    /// [`retry`](Self::retry) every dead job of `queue`; returns how many.
    ///
    /// Errors: [`OutboxError::UnknownQueue`] for a queue that has no jobs and is not paused.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_migrations::MigrationHarness;
    /// use diesel_transaction_signals::outbox::{self, Admin, OutboxError};
    ///
    /// let mut conn = SqliteConnection::establish(":memory:").unwrap();
    /// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
    /// assert!(matches!(Admin::retry_queue(&mut conn, "emails"), Err(OutboxError::UnknownQueue(_))));
    /// # }
    /// ```
    pub fn retry_queue<C: OutboxConnection>(
        conn: &mut C,
        queue: &str,
    ) -> Result<usize, OutboxError> {
        Self::known(conn, queue)?;
        Self::revive(conn, None, Some(queue))
    }

    /// [`retry`](Self::retry) every dead job of every queue; returns how many.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_migrations::MigrationHarness;
    /// use diesel_transaction_signals::outbox::{self, Admin};
    ///
    /// let mut conn = SqliteConnection::establish(":memory:").unwrap();
    /// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
    /// assert_eq!(Admin::retry_all(&mut conn)?, 0);
    /// # }
    /// # Ok::<(), diesel_transaction_signals::outbox::OutboxError>(())
    /// ```
    pub fn retry_all<C: OutboxConnection>(conn: &mut C) -> Result<usize, OutboxError> {
        Self::revive(conn, None, None)
    }

    /// Dead rows (one id, one queue, or all) back to pending, due now, attempts reset; wakes
    /// the relays.
    fn revive<C: OutboxConnection>(
        conn: &mut C,
        id: Option<i64>,
        queue: Option<&str>,
    ) -> Result<usize, OutboxError> {
        let n: usize = with_db!(conn, |c, d| {
            let n = diesel::sql_query(format!(
                "UPDATE dts_outbox SET state = 0, attempts = 0, run_at = {}, \
                 locked_until = NULL, locked_by = NULL WHERE state = 2 \
                 AND ({} IS NULL OR id = {}) AND ({} IS NULL OR queue = {})",
                d.now,
                d.p(1),
                d.p(2),
                d.p(3),
                d.p(4)
            ))
            .bind::<Nullable<BigInt>, _>(id)
            .bind::<Nullable<BigInt>, _>(id)
            .bind::<Nullable<Text>, _>(queue)
            .bind::<Nullable<Text>, _>(queue)
            .execute(&mut *c)?;
            if n > 0 && d.dollar {
                // PostgreSQL: wake relays in other processes (at COMMIT, if in a transaction).
                // Unconditional, unlike the trigger's: an operator's action is rare, a NOTIFY
                // nobody hears costs only this transaction, and it works on every schema.
                diesel::sql_query("SELECT pg_notify('dts_outbox', '')").execute(c)?;
            }
            Ok(n)
        })
        .map_err(db_err)?;
        if n > 0 {
            wake();
        }
        Ok(n)
    }

    /// Deletes a job that no relay is running: a dead letter, or a pending job (cancelled).
    ///
    /// Errors: [`OutboxError::JobNotFound`], or [`OutboxError::JobRunning`] when a relay holds
    /// a live lease on it (nothing is deleted: a job a relay runs is never deleted under it;
    /// try again once it finished, or failed).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_migrations::MigrationHarness;
    /// use diesel_transaction_signals::outbox::{self, Admin, OutboxError};
    ///
    /// let mut conn = diesel_transaction_signals::SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
    /// let id = conn.defer_durable("emails", &1)?.unwrap();
    /// Admin::discard(&mut conn, id)?;
    /// assert!(matches!(Admin::discard(&mut conn, id), Err(OutboxError::JobNotFound(_))));
    /// # }
    /// # Ok::<(), diesel_transaction_signals::outbox::OutboxError>(())
    /// ```
    pub fn discard<C: OutboxConnection>(conn: &mut C, id: JobId) -> Result<(), OutboxError> {
        let n: usize = with_db!(conn, |c, d| {
            diesel::sql_query(format!(
                "DELETE FROM dts_outbox WHERE id = {} AND (state = 2 OR locked_until IS NULL \
                 OR locked_until < {})",
                d.p(1),
                d.now
            ))
            .bind::<BigInt, _>(id.get())
            .execute(c)
        })
        .map_err(db_err)?;
        if n == 1 {
            return Ok(());
        }
        Err(match Self::job_state(conn, id)? {
            None => OutboxError::JobNotFound(id),
            Some(_) => OutboxError::JobRunning(id),
        })
    }

    /// Deletes the dead jobs (of `queue`, or of every queue) dead-lettered more than
    /// `older_than` ago; returns how many.
    ///
    /// Errors: [`OutboxError::UnknownQueue`] for a queue that has no jobs and is not paused.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_migrations::MigrationHarness;
    /// use diesel_transaction_signals::outbox::{self, Admin};
    /// use std::time::Duration;
    ///
    /// let mut conn = SqliteConnection::establish(":memory:").unwrap();
    /// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
    /// let week = Duration::from_secs(7 * 24 * 3600);
    /// assert_eq!(Admin::purge_dead(&mut conn, week, None)?, 0);
    /// # }
    /// # Ok::<(), diesel_transaction_signals::outbox::OutboxError>(())
    /// ```
    pub fn purge_dead<C: OutboxConnection>(
        conn: &mut C,
        older_than: Duration,
        queue: Option<&str>,
    ) -> Result<usize, OutboxError> {
        if let Some(q) = queue {
            Self::known(conn, q)?;
        }
        with_db!(conn, |c, d| {
            diesel::sql_query(format!(
                "DELETE FROM dts_outbox WHERE state = 2 AND run_at < {} - {} \
                 AND ({} IS NULL OR queue = {})",
                d.now,
                d.p(1),
                d.p(2),
                d.p(3)
            ))
            .bind::<BigInt, _>(ms(older_than))
            .bind::<Nullable<Text>, _>(queue)
            .bind::<Nullable<Text>, _>(queue)
            .execute(c)
        })
        .map_err(db_err)
    }

    /// Moves a pending job that no relay is running to `delay` from now (zero: due now); its
    /// attempts are kept.
    ///
    /// Errors: [`OutboxError::JobNotFound`], [`OutboxError::JobRunning`] (a relay holds a live
    /// lease on it), [`OutboxError::JobDead`] (use [`retry`](Self::retry)).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_migrations::MigrationHarness;
    /// use diesel_transaction_signals::outbox::{self, Admin};
    /// use std::time::Duration;
    ///
    /// let mut conn = diesel_transaction_signals::SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
    /// let id = conn.defer_durable("emails", &1)?.unwrap();
    /// Admin::reschedule(&mut conn, id, Duration::from_secs(600))?;
    /// assert_eq!(Admin::queue_status(&mut conn, "emails")?.scheduled, 1);
    /// # }
    /// # Ok::<(), diesel_transaction_signals::outbox::OutboxError>(())
    /// ```
    pub fn reschedule<C: OutboxConnection>(
        conn: &mut C,
        id: JobId,
        delay: Duration,
    ) -> Result<(), OutboxError> {
        let n: usize = with_db!(conn, |c, d| {
            diesel::sql_query(format!(
                "UPDATE dts_outbox SET run_at = {now} + {} WHERE id = {} AND state = 0 \
                 AND (locked_until IS NULL OR locked_until < {now})",
                d.p(1),
                d.p(2),
                now = d.now
            ))
            .bind::<BigInt, _>(ms(delay))
            .bind::<BigInt, _>(id.get())
            .execute(c)
        })
        .map_err(db_err)?;
        if n == 1 {
            if delay.is_zero() {
                wake();
            }
            return Ok(());
        }
        Err(match Self::job_state(conn, id)? {
            None => OutboxError::JobNotFound(id),
            Some((2, _)) => OutboxError::JobDead(id),
            Some(_) => OutboxError::JobRunning(id),
        })
    }

    /// Pauses `queue`: from their next claim on, relays in every process claim none of its
    /// jobs, until [`resume`](Self::resume). Jobs keep being enqueued; a job a relay is running
    /// already finishes. Returns `false` when it was paused already. Any valid queue name can
    /// be paused, one without jobs yet too.
    ///
    /// Errors: [`OutboxError::InvalidQueue`].
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_migrations::MigrationHarness;
    /// use diesel_transaction_signals::outbox::{self, Admin};
    ///
    /// let mut conn = SqliteConnection::establish(":memory:").unwrap();
    /// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
    /// assert!(Admin::pause(&mut conn, "emails")?);
    /// assert!(!Admin::pause(&mut conn, "emails")?, "already paused");
    /// assert_eq!(Admin::paused(&mut conn)?, ["emails"]);
    /// assert!(Admin::resume(&mut conn, "emails")?);
    /// assert!(Admin::paused(&mut conn)?.is_empty());
    /// # }
    /// # Ok::<(), diesel_transaction_signals::outbox::OutboxError>(())
    /// ```
    pub fn pause<C: OutboxConnection>(conn: &mut C, queue: &str) -> Result<bool, OutboxError> {
        check_queue(queue)?;
        with_db!(conn, |c, d| {
            // The primary key decides when two operators pause at once.
            let (verb, on_conflict) = d.insert_ignore;
            diesel::sql_query(format!(
                "{verb} INTO dts_outbox_paused (queue) VALUES ({}){on_conflict}",
                d.p(1)
            ))
            .bind::<Text, _>(queue)
            .execute(c)
            .map(|n| n == 1)
        })
        .map_err(db_err)
    }

    /// Resumes a paused queue: relays claim its jobs again (and are woken). Returns `false`
    /// when it was not paused.
    ///
    /// Errors: [`OutboxError::InvalidQueue`].
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_migrations::MigrationHarness;
    /// use diesel_transaction_signals::outbox::{self, Admin};
    ///
    /// let mut conn = SqliteConnection::establish(":memory:").unwrap();
    /// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
    /// assert!(!Admin::resume(&mut conn, "emails")?);
    /// # }
    /// # Ok::<(), diesel_transaction_signals::outbox::OutboxError>(())
    /// ```
    pub fn resume<C: OutboxConnection>(conn: &mut C, queue: &str) -> Result<bool, OutboxError> {
        check_queue(queue)?;
        let n: usize = with_db!(conn, |c, d| {
            let n = diesel::sql_query(format!(
                "DELETE FROM dts_outbox_paused WHERE queue = {}",
                d.p(1)
            ))
            .bind::<Text, _>(queue)
            .execute(&mut *c)?;
            if n > 0 && d.dollar {
                diesel::sql_query("SELECT pg_notify('dts_outbox', '')").execute(c)?;
            }
            Ok(n)
        })
        .map_err(db_err)?;
        if n > 0 {
            wake();
        }
        Ok(n > 0)
    }

    /// The paused queues, by name.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_migrations::MigrationHarness;
    /// use diesel_transaction_signals::outbox::{self, Admin};
    ///
    /// let mut conn = SqliteConnection::establish(":memory:").unwrap();
    /// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
    /// assert!(Admin::paused(&mut conn)?.is_empty());
    /// # }
    /// # Ok::<(), diesel_transaction_signals::outbox::OutboxError>(())
    /// ```
    pub fn paused<C: OutboxConnection>(conn: &mut C) -> Result<Vec<String>, OutboxError> {
        let rows: Vec<PausedRow> = with_db!(conn, |c, _d| {
            diesel::sql_query("SELECT queue FROM dts_outbox_paused ORDER BY queue").load(c)
        })
        .map_err(db_err)?;
        Ok(rows.into_iter().map(|r| r.queue).collect())
    }

    /// `Ok` when `queue` has jobs or is paused, else [`OutboxError::UnknownQueue`].
    fn known<C: OutboxConnection>(conn: &mut C, queue: &str) -> Result<(), OutboxError> {
        check_queue(queue)?;
        let found: Vec<N> = with_db!(conn, |c, d| {
            diesel::sql_query(format!(
                "SELECT CAST(1 AS {}) AS n FROM dts_outbox WHERE queue = {} \
                 UNION ALL SELECT CAST(1 AS {}) AS n FROM dts_outbox_paused WHERE queue = {} \
                 LIMIT 1",
                d.int,
                d.p(1),
                d.int,
                d.p(2)
            ))
            .bind::<Text, _>(queue)
            .bind::<Text, _>(queue)
            .load(c)
        })
        .map_err(db_err)?;
        if found.iter().any(|r| r.n == 1) {
            Ok(())
        } else {
            Err(OutboxError::UnknownQueue(queue.to_owned()))
        }
    }

    /// The job's state and whether a relay holds a live lease on it; `None` when it is gone.
    fn job_state<C: OutboxConnection>(
        conn: &mut C,
        id: JobId,
    ) -> Result<Option<(i64, bool)>, OutboxError> {
        let rows: Vec<JobStateRow> = with_db!(conn, |c, d| {
            diesel::sql_query(format!(
                "SELECT CAST(state AS {int}) AS state, CAST(CASE WHEN locked_until IS NOT NULL \
                 AND locked_until >= {now} THEN 1 ELSE 0 END AS {int}) AS leased \
                 FROM dts_outbox WHERE id = {}",
                d.p(1),
                int = d.int,
                now = d.now
            ))
            .bind::<BigInt, _>(id.get())
            .load(c)
        })
        .map_err(db_err)?;
        Ok(rows.first().map(|r| (r.state, r.leased == 1)))
    }
}
