//! Durable deferred work: a transactional outbox that survives a crash between COMMIT and the
//! hook.
//!
//! Every `on_commit` in every ecosystem (Django, Rails, Spring, this crate's
//! [`defer!`](crate::defer!)) is **at most once**: if the process dies after COMMIT and before
//! the hook runs, the work is lost. The outbox makes deferred work **at least once** and still
//! never for rolled-back data:
//!
//! 1. [`SignalConnection::defer_durable`] writes a job row into the `dts_outbox` table *inside*
//!    the current transaction, so it commits or rolls back with the user's data. The payload is
//!    serialized to JSON at once: a payload that fails to serialize is an error then, inside
//!    the transaction, not a lost job later.
//! 2. After COMMIT an on-commit hook wakes the in-process [`Relay`] at once; on PostgreSQL a
//!    trigger sends `NOTIFY dts_outbox` in the same transaction, which wakes relays in other
//!    processes (feature `outbox-listen`); the trigger is enabled only while some relay's
//!    listener is registered in `dts_outbox_listeners`: with no relay listening, enqueuing
//!    sends no notification.
//! 3. The [`Relay`] claims batches of due rows with a lease (`FOR UPDATE SKIP LOCKED` on
//!    PostgreSQL and MySQL/MariaDB), runs the handler registered for the row's queue, deletes
//!    the rows that succeeded, and retries failures with exponential backoff and jitter until
//!    `max_attempts`, when the row moves to the dead-letter state with its last error.
//!
//! | | [`defer!`](crate::defer!) / `on_commit` | [`defer_durable`](SignalConnection::defer_durable) |
//! |---|---|---|
//! | runs for rolled-back work | never | never |
//! | crash between COMMIT and the hook | lost | delivered after restart (or by another relay) |
//! | delivery | at most once: once, in this process, right after COMMIT, unless the process dies first | at least once: a crash or an expired lease after the handler ran but before its row was deleted runs it again; handlers see a stable [`JobId`] and the attempt number for idempotency |
//! | cost | a boxed closure | a row insert in the transaction, a claim and a delete (batched) |
//!
//! Tables: run [`migrations`] with your `MigrationHarness`, or apply the SQL in
//! [`sql`] with another migration tool.
//!
//! # Example
//!
//! ```
//! # #[cfg(feature = "sqlite")] {
//! use diesel::prelude::*;
//! use diesel::r2d2::{ConnectionManager, Pool};
//! use diesel_migrations::MigrationHarness;
//! use diesel_transaction_signals::outbox::{self, Job, Relay};
//! use diesel_transaction_signals::SignalConnection;
//! use std::sync::mpsc;
//!
//! # let dir = tempfile::tempdir().unwrap();
//! # let url = dir.path().join("app.db").to_string_lossy().into_owned();
//! type Conn = SignalConnection<SqliteConnection>;
//! let pool = Pool::builder().max_size(2).build(ConnectionManager::<Conn>::new(&url))?;
//! pool.get()?.run_pending_migrations(outbox::migrations::SQLITE)?;
//!
//! let (tx, delivered) = mpsc::channel();
//! let relay = Relay::builder(pool.clone())
//!     .handler("welcome_email", move |job: &Job| {
//!         let user_id: i64 = job.payload()?;
//!         tx.send(user_id)?;
//!         Ok(())
//!     })
//!     .spawn()?;
//!
//! let mut conn = pool.get()?;
//! conn.transaction(|conn| {
//!     // ... insert the user ...
//!     conn.defer_durable("welcome_email", &42_i64)?;
//!     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
//! })?;
//! assert_eq!(delivered.recv_timeout(std::time::Duration::from_secs(10))?, 42);
//! relay.shutdown();
//! # }
//! # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
//! ```

mod admin;
#[cfg(feature = "async")]
mod async_backend;
#[cfg(feature = "async")]
mod async_enqueue;
#[cfg(feature = "async")]
mod async_relay;
mod backend;
mod job;
#[cfg(feature = "outbox-listen")]
mod listen;
mod options;
mod relay;
mod stats;

use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use serde::Serialize;

pub use admin::{Admin, DeadLetter, Lease, QueueStatus};
#[cfg(feature = "async")]
pub use async_backend::AsyncOutboxConnection;
#[cfg(feature = "async")]
pub use async_relay::{AsyncRelay, AsyncRelayBuilder, AsyncRelayHandle, AsyncRelayPool};
pub(crate) use backend::NewRow;
pub use backend::OutboxConnection;
pub use job::{Backoff, Job, JobId};
pub use relay::{Relay, RelayBuilder, RelayHandle};
pub use stats::{HandlerTimes, QueueStats, RelayStats};

use crate::{ConnectionId, DeferError, PreCommitConnection, SignalConnection};

/// The outbox migrations, embedded, for `MigrationHarness::run_pending_migrations`.
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::prelude::*;
/// use diesel_migrations::MigrationHarness;
/// use diesel_transaction_signals::outbox::migrations;
///
/// let mut conn = SqliteConnection::establish(":memory:").unwrap();
/// conn.run_pending_migrations(migrations::SQLITE).unwrap();
/// # }
/// ```
pub mod migrations {
    use diesel_migrations::{embed_migrations, EmbeddedMigrations};

    /// For PostgreSQL (adds the `NOTIFY` trigger that wakes relays in other processes).
    ///
    /// Each set holds the table's creation and, since the operations of
    /// [`Admin`](super::Admin), `dts_outbox_paused` (paused queues; relays read it at every
    /// claim, so run the pending migrations before relays of this version start). PostgreSQL
    /// has a third: `dts_outbox_listeners`, the relays whose `listen()` connection is
    /// listening; the NOTIFY trigger is enabled only while one is registered (see
    /// [`sql::POSTGRES_LISTENERS_UP`](super::sql::POSTGRES_LISTENERS_UP)).
    pub const POSTGRES: EmbeddedMigrations = embed_migrations!("migrations/outbox/postgres");
    /// For SQLite.
    pub const SQLITE: EmbeddedMigrations = embed_migrations!("migrations/outbox/sqlite");
    /// For MySQL / MariaDB.
    pub const MYSQL: EmbeddedMigrations = embed_migrations!("migrations/outbox/mysql");
}

/// The outbox tables as plain SQL, for other migration tools.
///
/// ```
/// use diesel_transaction_signals::outbox::sql;
/// assert!(sql::POSTGRES_UP.contains("CREATE TABLE dts_outbox"));
/// ```
pub mod sql {
    /// Creates the table (and trigger) on PostgreSQL.
    pub const POSTGRES_UP: &str =
        include_str!("../../migrations/outbox/postgres/2026-11-26-000100_create_dts_outbox/up.sql");
    /// Drops them on PostgreSQL.
    pub const POSTGRES_DOWN: &str = include_str!(
        "../../migrations/outbox/postgres/2026-11-26-000100_create_dts_outbox/down.sql"
    );
    /// Creates the table on SQLite.
    pub const SQLITE_UP: &str =
        include_str!("../../migrations/outbox/sqlite/2026-11-26-000100_create_dts_outbox/up.sql");
    /// Drops it on SQLite.
    pub const SQLITE_DOWN: &str =
        include_str!("../../migrations/outbox/sqlite/2026-11-26-000100_create_dts_outbox/down.sql");
    /// Creates the table on MySQL / MariaDB.
    pub const MYSQL_UP: &str =
        include_str!("../../migrations/outbox/mysql/2026-11-26-000100_create_dts_outbox/up.sql");
    /// Drops it on MySQL / MariaDB.
    pub const MYSQL_DOWN: &str =
        include_str!("../../migrations/outbox/mysql/2026-11-26-000100_create_dts_outbox/down.sql");

    /// The second migration, on PostgreSQL: the paused-queues table `dts_outbox_paused` (read
    /// by every claim) and an index of dead letters. Apply it after [`POSTGRES_UP`].
    ///
    /// ```
    /// use diesel_transaction_signals::outbox::sql;
    /// assert!(sql::POSTGRES_PAUSED_UP.contains("CREATE TABLE dts_outbox_paused"));
    /// ```
    pub const POSTGRES_PAUSED_UP: &str =
        include_str!("../../migrations/outbox/postgres/2026-12-01-000200_dts_outbox_paused/up.sql");
    /// Undoes [`POSTGRES_PAUSED_UP`].
    pub const POSTGRES_PAUSED_DOWN: &str = include_str!(
        "../../migrations/outbox/postgres/2026-12-01-000200_dts_outbox_paused/down.sql"
    );
    /// The third migration, on PostgreSQL only: `dts_outbox_listeners`, the relays listening
    /// for `NOTIFY dts_outbox` (an `UNLOGGED` table their `listen()` connection registers in
    /// through the functions `dts_outbox_listener_register(relay)` and
    /// `dts_outbox_listener_unregister()`), and the NOTIFY trigger enabled only while one is
    /// registered (`dts_outbox_listeners_sync()`, with its owner's rights): a transaction that
    /// enqueues while no relay listens sends no notification. It also reads the columns'
    /// default clock as `float8` (`date_part`), as the crate's statements do. Run it as the
    /// owner of `dts_outbox`, after [`POSTGRES_PAUSED_UP`], before relays of this version
    /// listen (their listener retries until it can register). Relays of earlier versions that
    /// listen do not register: while no relay of this version listens, they are woken by their
    /// poll only.
    ///
    /// ```
    /// use diesel_transaction_signals::outbox::sql;
    /// assert!(sql::POSTGRES_LISTENERS_UP.contains("CREATE UNLOGGED TABLE dts_outbox_listeners"));
    /// ```
    pub const POSTGRES_LISTENERS_UP: &str = include_str!(
        "../../migrations/outbox/postgres/2026-12-02-000300_dts_outbox_listeners/up.sql"
    );
    /// Undoes [`POSTGRES_LISTENERS_UP`]: the trigger is enabled again, and notifies at every
    /// enqueuing COMMIT.
    ///
    /// ```
    /// use diesel_transaction_signals::outbox::sql;
    /// assert!(sql::POSTGRES_LISTENERS_DOWN.contains("DROP TABLE dts_outbox_listeners"));
    /// ```
    pub const POSTGRES_LISTENERS_DOWN: &str = include_str!(
        "../../migrations/outbox/postgres/2026-12-02-000300_dts_outbox_listeners/down.sql"
    );
    /// The second migration, on SQLite: `dts_outbox_paused`. Apply it after [`SQLITE_UP`].
    pub const SQLITE_PAUSED_UP: &str =
        include_str!("../../migrations/outbox/sqlite/2026-12-01-000200_dts_outbox_paused/up.sql");
    /// Undoes [`SQLITE_PAUSED_UP`].
    pub const SQLITE_PAUSED_DOWN: &str =
        include_str!("../../migrations/outbox/sqlite/2026-12-01-000200_dts_outbox_paused/down.sql");
    /// The second migration, on MySQL / MariaDB: `dts_outbox_paused`. Apply it after
    /// [`MYSQL_UP`].
    pub const MYSQL_PAUSED_UP: &str =
        include_str!("../../migrations/outbox/mysql/2026-12-01-000200_dts_outbox_paused/up.sql");
    /// Undoes [`MYSQL_PAUSED_UP`].
    pub const MYSQL_PAUSED_DOWN: &str =
        include_str!("../../migrations/outbox/mysql/2026-12-01-000200_dts_outbox_paused/down.sql");
}

/// Why a durable job could not be enqueued, or a [`Relay`] could not start.
///
/// ```
/// use diesel_transaction_signals::outbox::{DurableJob, OutboxError};
///
/// let err = DurableJob::new("bad queue name!", &1).unwrap_err();
/// assert!(matches!(err, OutboxError::InvalidQueue(_)));
/// ```
///
/// Each variant says what failed:
///
/// ```
/// use diesel_transaction_signals::outbox::OutboxError;
///
/// assert_eq!(
///     OutboxError::NoHandlers.to_string(),
///     "a relay needs at least one handler: call RelayBuilder::handler before spawn"
/// );
/// let spawn = OutboxError::Spawn(std::io::Error::other("out of threads"));
/// assert_eq!(spawn.to_string(), "the relay could not start a thread: out of threads");
/// assert!(std::error::Error::source(&spawn).is_some());
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum OutboxError {
    /// The payload could not be serialized to JSON.
    Serialize(serde_json::Error),
    /// The database refused the row, or an [`Admin`] operation's statement.
    Database(diesel::result::Error),
    /// Queue names are 1 to 191 characters of `A-Z a-z 0-9 _ - . :`.
    InvalidQueue(String),
    /// `defer_durable!` without a connection needs a transaction open on this thread.
    NoTransaction,
    /// `defer_durable!` was called while the transaction's COMMIT was in flight (from an
    /// `Instrumentation` callback, or another thread): the row could not be written inside it,
    /// and was not written at all.
    CommitInFlight,
    /// [`RelayBuilder::spawn`] without any [`RelayBuilder::handler`].
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::r2d2::{ConnectionManager, Pool};
    /// use diesel_transaction_signals::outbox::{OutboxError, Relay};
    ///
    /// let pool = Pool::builder()
    ///     .build(ConnectionManager::<diesel::SqliteConnection>::new(":memory:"))
    ///     .unwrap();
    /// assert!(matches!(Relay::builder(pool).spawn(), Err(OutboxError::NoHandlers)));
    /// # }
    /// ```
    NoHandlers,
    /// [`RelayBuilder::spawn`] could not start one of the relay's threads (a worker, or the
    /// listener of `listen`); the threads it had started are stopped again.
    ///
    /// ```
    /// use diesel_transaction_signals::outbox::OutboxError;
    ///
    /// fn out_of_threads(e: &OutboxError) -> bool {
    ///     matches!(e, OutboxError::Spawn(io) if io.kind() == std::io::ErrorKind::WouldBlock)
    /// }
    /// # let _ = out_of_threads;
    /// ```
    Spawn(std::io::Error),
    /// An [`Admin`] operation named a queue that has no jobs and is not paused.
    ///
    /// The operations on one job say what stopped them, so a caller can tell "try later" from
    /// "nothing to do":
    ///
    /// ```
    /// use diesel_transaction_signals::outbox::{Admin, JobId, OutboxError};
    ///
    /// fn retry_later(e: &OutboxError) -> bool {
    ///     matches!(e, OutboxError::JobRunning(_))
    /// }
    /// fn nothing_to_do(e: &OutboxError) -> bool {
    ///     matches!(e, OutboxError::JobNotFound(_) | OutboxError::JobNotDead(_)
    ///         | OutboxError::JobDead(_) | OutboxError::UnknownQueue(_))
    /// }
    /// let running = OutboxError::JobRunning(JobId::new(7));
    /// assert!(retry_later(&running) && !nothing_to_do(&running));
    /// assert_eq!(
    ///     OutboxError::UnknownQueue("emails".into()).to_string(),
    ///     "unknown queue \"emails\": it has no jobs and is not paused"
    /// );
    /// # let _ = Admin;
    /// ```
    UnknownQueue(String),
    /// An [`Admin`] operation named a job that is not in the outbox (delivered, discarded, or
    /// never there).
    JobNotFound(JobId),
    /// An [`Admin`] operation named a job a relay holds a live lease on (it is running, or
    /// claimed in a batch about to run): nothing was changed. Try again once it finished.
    JobRunning(JobId),
    /// [`Admin::retry`] named a job that is pending, not dead-lettered.
    JobNotDead(JobId),
    /// [`Admin::reschedule`] named a dead-lettered job: [`Admin::retry`] it instead.
    JobDead(JobId),
    /// The outbox table named here is missing: run the outbox [`migrations`] (or
    /// `dts-outbox migrate`).
    ///
    /// ```
    /// use diesel_transaction_signals::outbox::OutboxError;
    /// let e = OutboxError::NotMigrated("dts_outbox_paused".into());
    /// assert_eq!(
    ///     e.to_string(),
    ///     "table dts_outbox_paused is missing: run the outbox migrations (dts-outbox migrate)"
    /// );
    /// ```
    NotMigrated(String),
}

impl fmt::Display for OutboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutboxError::Serialize(e) => write!(f, "durable job payload cannot be serialized: {e}"),
            OutboxError::Database(e) => write!(f, "outbox database statement failed: {e}"),
            OutboxError::InvalidQueue(q) => write!(
                f,
                "invalid queue name {q:?}: use 1 to 191 characters of A-Z a-z 0-9 _ - . :"
            ),
            OutboxError::NoTransaction => f.write_str(
                "defer_durable! without a connection needs a transaction open on this thread",
            ),
            OutboxError::CommitInFlight => f.write_str(
                "defer_durable! came while the transaction's COMMIT was in flight: no row was written",
            ),
            OutboxError::NoHandlers => f.write_str(
                "a relay needs at least one handler: call RelayBuilder::handler before spawn",
            ),
            OutboxError::Spawn(e) => write!(f, "the relay could not start a thread: {e}"),
            OutboxError::UnknownQueue(q) => {
                write!(f, "unknown queue {q:?}: it has no jobs and is not paused")
            }
            OutboxError::JobNotFound(id) => write!(f, "job {id} is not in the outbox"),
            OutboxError::JobRunning(id) => write!(
                f,
                "job {id} is leased by a relay (running): nothing was changed, try again once it finished"
            ),
            OutboxError::JobNotDead(id) => {
                write!(f, "job {id} is pending, not dead-lettered: nothing to retry")
            }
            OutboxError::JobDead(id) => {
                write!(f, "job {id} is dead-lettered: retry it instead of rescheduling")
            }
            OutboxError::NotMigrated(table) => write!(
                f,
                "table {table} is missing: run the outbox migrations (dts-outbox migrate)"
            ),
        }
    }
}

impl std::error::Error for OutboxError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OutboxError::Serialize(e) => Some(e),
            OutboxError::Database(e) => Some(e),
            OutboxError::Spawn(e) => Some(e),
            _ => None,
        }
    }
}

impl From<diesel::result::Error> for OutboxError {
    fn from(e: diesel::result::Error) -> Self {
        OutboxError::Database(e)
    }
}

impl From<OutboxError> for diesel::result::Error {
    /// Lets `?` carry an outbox error out of a `transaction` closure whose error type is
    /// Diesel's: database errors stay themselves, the others travel as `QueryBuilderError`.
    fn from(e: OutboxError) -> Self {
        match e {
            OutboxError::Database(e) => e,
            other => diesel::result::Error::QueryBuilderError(Box::new(other)),
        }
    }
}

pub(crate) fn valid_queue(queue: &str) -> bool {
    !queue.is_empty()
        && queue.len() <= 191
        && queue
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// A job to enqueue, with its options; see [`SignalConnection::enqueue`].
///
/// ```
/// use diesel_transaction_signals::outbox::DurableJob;
/// use std::time::Duration;
///
/// let job = DurableJob::new("invoices", &serde_json::json!({"order": 7}))?
///     .idempotency_key("invoice-order-7")
///     .max_attempts(5)
///     .delay(Duration::from_secs(60));
/// # let _ = job;
/// # Ok::<(), diesel_transaction_signals::outbox::OutboxError>(())
/// ```
#[derive(Debug, Clone)]
pub struct DurableJob {
    row: NewRow,
}

impl DurableJob {
    /// A job for `queue` with `payload` serialized to JSON now.
    ///
    /// ```
    /// use diesel_transaction_signals::outbox::DurableJob;
    /// let job = DurableJob::new("emails", &("ada@example.com", 42)).unwrap();
    /// # let _ = job;
    /// ```
    pub fn new<P: Serialize + ?Sized>(queue: &str, payload: &P) -> Result<Self, OutboxError> {
        if !valid_queue(queue) {
            return Err(OutboxError::InvalidQueue(queue.to_owned()));
        }
        let payload = serde_json::to_string(payload).map_err(OutboxError::Serialize)?;
        Ok(DurableJob {
            row: NewRow {
                queue: queue.to_owned(),
                payload,
                idempotency_key: None,
                max_attempts: 10,
                delay_ms: 0,
            },
        })
    }

    /// A key unique per queue: enqueueing a second job with the same key is a no-op.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::DurableJob;
    /// let job = DurableJob::new("emails", &1).unwrap().idempotency_key("welcome-1");
    /// # let _ = job;
    /// ```
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.row.idempotency_key = Some(key.into());
        self
    }

    /// How many attempts before the job moves to the dead-letter state (default 10, at
    /// least 1).
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::DurableJob;
    /// let job = DurableJob::new("emails", &1).unwrap().max_attempts(3);
    /// # let _ = job;
    /// ```
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.row.max_attempts = attempts.clamp(1, i32::MAX as u32) as i32;
        self
    }

    /// Run no earlier than `delay` after the job was enqueued: on PostgreSQL measured from the
    /// enqueueing transaction's start (`now()`), on SQLite and MySQL from the INSERT statement
    /// (for `defer_durable!` without a handle, just before COMMIT).
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::DurableJob;
    /// let job = DurableJob::new("reminders", &1).unwrap().delay(std::time::Duration::from_secs(3600));
    /// # let _ = job;
    /// ```
    pub fn delay(mut self, delay: Duration) -> Self {
        self.row.delay_ms = delay.as_millis().min(i64::MAX as u128) as i64;
        self
    }
}

impl<C: OutboxConnection> SignalConnection<C> {
    /// Enqueues a durable job: writes a row to `dts_outbox` in the current transaction, so it
    /// commits or rolls back with the rest; outside a transaction it is its own committed write.
    /// Returns the job's id, or `None` when an idempotency key made it a no-op. The payload is
    /// serialized now; a serialization error is returned here.
    ///
    /// One statement, one round trip, per call: the id is known when it returns. To enqueue
    /// many jobs in a loop, [`defer_durable!("queue", &payload)`](crate::defer_durable!) defers
    /// them instead, and writes all those of the transaction in one statement just before
    /// COMMIT.
    ///
    /// After COMMIT the in-process relays wake at once.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_migrations::MigrationHarness;
    /// use diesel_transaction_signals::{outbox, SignalConnection};
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
    /// let id = conn.transaction(|conn| conn.defer_durable("emails", &"ada@example.com")).unwrap();
    /// assert!(id.is_some());
    /// # }
    /// ```
    pub fn defer_durable<P: Serialize + ?Sized>(
        &mut self,
        queue: &str,
        payload: &P,
    ) -> Result<Option<JobId>, OutboxError> {
        self.enqueue(DurableJob::new(queue, payload)?)
    }

    /// Enqueues a [`DurableJob`] built with options (idempotency key, attempts, delay); see
    /// [`defer_durable`](Self::defer_durable).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_migrations::MigrationHarness;
    /// use diesel_transaction_signals::outbox::{self, DurableJob};
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
    /// let job = || DurableJob::new("emails", &1).unwrap().idempotency_key("welcome-1");
    /// assert!(conn.enqueue(job()).unwrap().is_some());
    /// assert_eq!(conn.enqueue(job()).unwrap(), None, "the same key again is a no-op");
    /// # }
    /// ```
    pub fn enqueue(&mut self, job: DurableJob) -> Result<Option<JobId>, OutboxError> {
        let id = self.outbox_insert(&job.row)?;
        self.wake_after_commit();
        Ok(id.map(JobId))
    }

    /// Enqueues many [`DurableJob`]s at once and returns how many rows were written (a job
    /// whose idempotency key is already present, or repeated among `jobs`, is a no-op). One
    /// statement on PostgreSQL; on SQLite one per 6,553 jobs and on MySQL one per 13,107 jobs
    /// or 4 MiB of payload (a piece with a duplicate key is written again row by row there,
    /// to count the new rows), so call it inside a transaction to make it all or nothing.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_migrations::MigrationHarness;
    /// use diesel_transaction_signals::outbox::{self, DurableJob};
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
    /// let jobs = (0..3).map(|n| DurableJob::new("emails", &n)).collect::<Result<Vec<_>, _>>()?;
    /// let written = conn.transaction(|conn| conn.enqueue_all(jobs))?;
    /// assert_eq!(written, 3);
    /// # }
    /// # Ok::<(), diesel_transaction_signals::outbox::OutboxError>(())
    /// ```
    pub fn enqueue_all<I>(&mut self, jobs: I) -> Result<usize, OutboxError>
    where
        I: IntoIterator<Item = DurableJob>,
    {
        let rows: Vec<NewRow> = jobs.into_iter().map(|job| job.row).collect();
        if rows.is_empty() {
            return Ok(0);
        }
        let written = self.outbox_insert_many(&rows)?;
        self.wake_after_commit();
        Ok(written)
    }

    fn wake_after_commit(&mut self) {
        if self.transaction_depth() == 0 {
            wake();
        } else {
            self.on_commit(wake);
        }
    }
}

/// Enqueues a durable job ([`SignalConnection::defer_durable`]).
///
/// - `defer_durable!(conn, "queue", &payload)` on a connection: the row is written now and its
///   id returned, as [`SignalConnection::defer_durable`] does;
/// - `defer_durable!("queue", &payload)` without one, into the innermost transaction open on
///   this thread (as [`defer!`](crate::defer!) does): the payload is serialized now, the row is
///   written just before that transaction's COMMIT. Outside a transaction this returns
///   [`OutboxError::NoTransaction`];
/// - `defer_durable!(job)` with a [`DurableJob`] (idempotency key, attempts, delay): the same,
///   written just before COMMIT.
///
/// Evaluates to `Result<Option<JobId>, OutboxError>` (the connection-less forms return
/// `Result<(), OutboxError>`: the id is known only at COMMIT).
///
/// # Many jobs in one transaction: one statement
///
/// The jobs of the connection-less forms are written together: all those of one transaction
/// in one multi-row `INSERT` just before COMMIT (PostgreSQL: one statement for any number;
/// SQLite: one per 6,553 jobs; MySQL: one per 13,107 jobs or 4 MiB of payload), still inside
/// the transaction, so they commit or roll back with it. When each outcome is known:
///
/// - a payload that cannot be serialized, or an invalid queue name: at the call, as
///   `Err(OutboxError::Serialize | InvalidQueue)`; nothing is queued, the transaction goes on;
/// - a job deferred inside a savepoint (a nested `transaction`) that rolls back: discarded
///   with it, never written;
/// - an idempotency key already in the table, or repeated in the same transaction: the later
///   job is a no-op (the first one written wins), as with [`SignalConnection::enqueue`];
///   it is not an error (a debug-level log line counts the no-ops);
/// - the database refusing the rows (a constraint, a lost connection, a serialization
///   failure): at COMMIT, which does not happen. The transaction rolls back and `transaction`
///   returns the database error with its kind unchanged and its message naming the write
///   ("defer_durable!: writing 1000 durable jobs (queue emails) before COMMIT failed: ...").
///
/// The rows are written after the other pre-commit work registered in the same round of the
/// pre-commit phase ([`before_commit`](SignalConnection::before_commit)): a `before_commit`
/// hook that reads `dts_outbox` does not see them yet. Use `conn.defer_durable` (or
/// [`SignalConnection::enqueue`]) when the id is needed at once; it costs one round trip per
/// job.
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::prelude::*;
/// use diesel_migrations::MigrationHarness;
/// use diesel_transaction_signals::outbox::{self, DurableJob};
/// use diesel_transaction_signals::{defer_durable, SignalConnection};
///
/// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
/// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
/// conn.transaction(|conn| {
///     defer_durable!(conn, "emails", &"ada@example.com")?;
///     defer_durable!("emails", &"bob@example.com")?; // no handle needed
///     for n in 0..1000 {
///         defer_durable!("numbers", &n)?; // all 1,000 in one INSERT at COMMIT
///     }
///     defer_durable!(DurableJob::new("emails", &"eve@example.com")?.idempotency_key("eve"))?;
///     Ok::<_, outbox::OutboxError>(())
/// }).unwrap();
/// assert!(defer_durable!("emails", &"no transaction").is_err());
/// # }
/// ```
#[macro_export]
macro_rules! defer_durable {
    ($conn:expr, $queue:expr, $payload:expr $(,)?) => {
        $conn.defer_durable($queue, $payload)
    };
    ($queue:expr, $payload:expr $(,)?) => {
        $crate::outbox::defer_durable_here($crate::outbox::DurableJob::new($queue, $payload))
    };
    ($job:expr $(,)?) => {
        $crate::outbox::defer_durable_here(::core::result::Result::<
            $crate::outbox::DurableJob,
            $crate::outbox::OutboxError,
        >::Ok($job))
    };
}

/// `defer_durable!` without a connection: the row is written just before COMMIT, through the
/// crate's public pre-commit extension point
/// ([`defer_before_commit`](crate::defer_before_commit)), together with the other durable
/// jobs of the same transaction in one multi-row INSERT (see `stage`).
#[doc(hidden)]
#[track_caller]
pub fn defer_durable_here(job: Result<DurableJob, OutboxError>) -> Result<(), OutboxError> {
    let row = job?.row;
    crate::defer_before_commit(move |conn: &mut PreCommitConnection<'_>| stage(conn, row)).map_err(
        |e| match e {
            DeferError::NoTransaction => OutboxError::NoTransaction,
            _ => OutboxError::CommitInFlight,
        },
    )
}

/// The durable jobs staged for one transaction's COMMIT, written by one flush.
///
/// How jobs of one transaction end up in one statement: each `defer_durable!` registers its
/// own pre-commit work (so a savepoint that rolls back discards its jobs, as it discards any
/// pre-commit work, and nothing about a job is decided before the pre-commit phase). When
/// that work runs, in the pre-commit phase of the connection that commits, it only adds the
/// row to this connection's open `Batch`; the first row of a batch also registers the flush
/// (`before_commit` on the same connection), which the pre-commit phase runs in its next round,
/// after the work of the current one. The flush closes the batch and writes its rows in
/// order; a job staged after that (from pre-commit work of a later round) opens the next batch.
/// If the transaction rolls back before the flush, the batch is dropped with it.
pub(crate) struct Batch {
    rows: Vec<NewRow>,
    closed: bool,
}

type SharedBatch = Arc<Mutex<Batch>>;

thread_local! {
    /// The open batch of each connection committing on this thread (usually none or one).
    static OPEN_BATCHES: RefCell<Vec<(ConnectionId, Weak<Mutex<Batch>>)>> =
        const { RefCell::new(Vec::new()) };
}

/// Adds `row` to the open batch of the connection about to commit, opening one (and
/// registering its flush) if there is none.
fn stage(conn: &mut PreCommitConnection<'_>, row: NewRow) -> diesel::QueryResult<()> {
    let id = conn.id();
    let mut row = Some(row);
    OPEN_BATCHES.with(|open| {
        let mut open = open.borrow_mut();
        open.retain(|(_, b)| b.strong_count() > 0);
        if let Some(batch) = open
            .iter()
            .find(|(c, _)| *c == id)
            .and_then(|(_, b)| b.upgrade())
        {
            let mut batch = batch.lock().unwrap_or_else(|e| e.into_inner());
            if !batch.closed {
                batch.rows.push(row.take().expect("staged once"));
            }
        }
    });
    let Some(row) = row else { return Ok(()) };
    let batch: SharedBatch = Arc::new(Mutex::new(Batch {
        rows: vec![row],
        closed: false,
    }));
    let weak = Arc::downgrade(&batch);
    register_flush(conn, batch)?;
    OPEN_BATCHES.with(|open| {
        let mut open = open.borrow_mut();
        open.retain(|(c, b)| *c != id && b.strong_count() > 0);
        open.push((id, weak));
    });
    Ok(())
}

/// Registers the flush of `batch` on the connection, whatever its type.
fn register_flush(
    conn: &mut PreCommitConnection<'_>,
    batch: SharedBatch,
) -> diesel::QueryResult<()> {
    #[cfg(feature = "postgres")]
    if let Some(c) = conn.connection::<diesel::PgConnection>() {
        return c.before_commit(move |c| c.flush_batch(&batch));
    }
    #[cfg(feature = "sqlite")]
    if let Some(c) = conn.connection::<diesel::SqliteConnection>() {
        return c.before_commit(move |c| c.flush_batch(&batch));
    }
    #[cfg(feature = "mysql")]
    if let Some(c) = conn.connection::<diesel::MysqlConnection>() {
        return c.before_commit(move |c| c.flush_batch(&batch));
    }
    #[cfg(feature = "async")]
    let batch = match register_flush_async(conn, batch) {
        Ok(()) => return Ok(()),
        Err(batch) => batch,
    };
    let _ = batch;
    Err(diesel::result::Error::QueryBuilderError(
        format!(
            "defer_durable! needs a SignalConnection of SqliteConnection, PgConnection or \
             MysqlConnection; connection {} is a {} one",
            conn.id(),
            conn.backend()
        )
        .into(),
    ))
}

/// `register_flush` on an async connection: its pre-commit phase registers the flush as async
/// `before_commit` work. Gives `batch` back when `conn` is not an async connection.
#[cfg(feature = "async")]
fn register_flush_async(
    conn: &mut PreCommitConnection<'_>,
    batch: SharedBatch,
) -> Result<(), SharedBatch> {
    macro_rules! try_async {
        ($conn:ty) => {
            let flush = batch.clone();
            if conn.run_async::<$conn, _>(move |c| {
                Box::pin(async move {
                    c.before_commit(move |c| {
                        Box::pin(async move { c.flush_batch_async(&flush).await })
                    })
                })
            }) {
                return Ok(());
            }
        };
    }
    #[cfg(feature = "postgres")]
    try_async!(diesel_async::AsyncPgConnection);
    #[cfg(feature = "mysql")]
    try_async!(diesel_async::AsyncMysqlConnection);
    #[cfg(feature = "sqlite")]
    try_async!(
        diesel_async::sync_connection_wrapper::SyncConnectionWrapper<diesel::SqliteConnection>
    );
    Err(batch)
}

impl<C: OutboxConnection> SignalConnection<C> {
    /// Closes `batch` and writes its rows (one multi-row INSERT, or one per chunk), then rings
    /// the relays' bell once the transaction commits. A database error keeps its kind (so a
    /// caller can still retry a serialization failure) and its message says which write failed.
    fn flush_batch(&mut self, batch: &Mutex<Batch>) -> diesel::QueryResult<()> {
        let rows = {
            let mut batch = batch.lock().unwrap_or_else(|e| e.into_inner());
            batch.closed = true;
            std::mem::take(&mut batch.rows)
        };
        if rows.is_empty() {
            return Ok(());
        }
        let written = self
            .outbox_insert_many(&rows)
            .map_err(|e| batch_error(e, &rows))?;
        log_no_ops(written, rows.len());
        self.wake_after_commit();
        Ok(())
    }
}

/// Logs how many of a batch's jobs were no-ops (an idempotency key already present).
fn log_no_ops(written: usize, staged: usize) {
    if written < staged {
        log::debug!(
            target: "diesel_transaction_signals",
            "defer_durable!: {} of {} durable jobs were no-ops (idempotency key already present)",
            staged - written,
            staged
        );
    }
}

/// A database error from writing a batch of `defer_durable!` jobs: the same kind, the message
/// prefixed with what was being written.
pub(crate) fn batch_error(e: diesel::result::Error, rows: &[NewRow]) -> diesel::result::Error {
    match e {
        diesel::result::Error::DatabaseError(kind, info) => {
            let mut queues: Vec<&str> = rows.iter().map(|r| r.queue.as_str()).collect();
            queues.sort_unstable();
            queues.dedup();
            let message = format!(
                "defer_durable!: writing {} durable job{} (queue{} {}) before COMMIT failed: {}",
                rows.len(),
                if rows.len() == 1 { "" } else { "s" },
                if queues.len() == 1 { "" } else { "s" },
                queues.join(", "),
                info.message()
            );
            diesel::result::Error::DatabaseError(kind, Box::new(BatchErrorInfo { message, info }))
        }
        other => other,
    }
}

struct BatchErrorInfo {
    message: String,
    info: Box<dyn diesel::result::DatabaseErrorInformation + Send + Sync>,
}

impl diesel::result::DatabaseErrorInformation for BatchErrorInfo {
    fn message(&self) -> &str {
        &self.message
    }
    fn details(&self) -> Option<&str> {
        self.info.details()
    }
    fn hint(&self) -> Option<&str> {
        self.info.hint()
    }
    fn table_name(&self) -> Option<&str> {
        self.info.table_name()
    }
    fn column_name(&self) -> Option<&str> {
        self.info.column_name()
    }
    fn constraint_name(&self) -> Option<&str> {
        self.info.constraint_name()
    }
    fn statement_position(&self) -> Option<i32> {
        self.info.statement_position()
    }
}

/// The in-process wake-up: relays wait on it when idle; commits of durable jobs ring it.
struct Bell {
    generation: AtomicU64,
    waiting: AtomicUsize,
    lock: Mutex<()>,
    cond: Condvar,
}

static BELL: Bell = Bell {
    generation: AtomicU64::new(0),
    waiting: AtomicUsize::new(0),
    lock: Mutex::new(()),
    cond: Condvar::new(),
};

/// Wakes every idle relay of this process (called after a COMMIT that wrote durable jobs).
///
/// ```
/// diesel_transaction_signals::outbox::wake(); // harmless when nothing waits
/// ```
pub fn wake() {
    // SeqCst pairs with `wait_for_bell`: either the waiter sees the new generation, or the
    // waker sees the waiter and notifies it.
    BELL.generation.fetch_add(1, Ordering::SeqCst);
    if BELL.waiting.load(Ordering::SeqCst) > 0 {
        let _guard = BELL.lock.lock().unwrap_or_else(|e| e.into_inner());
        BELL.cond.notify_all();
    }
    #[cfg(feature = "async")]
    ASYNC_BELL.notify_waiters();
}

/// The bell's side for tasks: idle [`AsyncRelay`] workers wait on it without blocking a
/// runtime thread.
#[cfg(feature = "async")]
static ASYNC_BELL: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// [`wait_for_bell`] for tokio tasks: returns when the bell rang after `seen`, or after
/// `timeout`.
#[cfg(feature = "async")]
pub(crate) async fn wait_for_bell_async(seen: u64, timeout: Duration) {
    let notified = std::pin::pin!(ASYNC_BELL.notified());
    let mut notified = notified;
    // Registered before the generation is read: a `wake` after the read notifies it.
    notified.as_mut().enable();
    if bell_generation() != seen {
        return;
    }
    let _ = tokio::time::timeout(timeout, notified).await;
}

/// The bell's generation now; pass it to [`wait_for_bell`].
pub(crate) fn bell_generation() -> u64 {
    BELL.generation.load(Ordering::SeqCst)
}

/// Waits until the bell rang after `seen`, or `timeout` passed.
pub(crate) fn wait_for_bell(seen: u64, timeout: Duration) {
    BELL.waiting.fetch_add(1, Ordering::SeqCst);
    let guard = BELL.lock.lock().unwrap_or_else(|e| e.into_inner());
    let _ = BELL.cond.wait_timeout_while(guard, timeout, |_| {
        BELL.generation.load(Ordering::SeqCst) == seen
    });
    BELL.waiting.fetch_sub(1, Ordering::SeqCst);
}
