//! The relay: claims due jobs with a lease, runs their handlers, deletes what succeeded,
//! retries what failed, and moves what keeps failing to the dead-letter state.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use diesel::r2d2::{ConnectionManager, Pool, R2D2Connection};
use serde::de::DeserializeOwned;

use super::backend::{ClaimedRow, OutboxConnection};
use super::{bell_generation, valid_queue, wait_for_bell, wake, OutboxError};
use crate::report::panic_message;

/// The stable id of a durable job (its row id), for idempotent handlers.
///
/// ```
/// # use diesel_transaction_signals::outbox::Job;
/// fn dedupe_key(job: &Job) -> String { format!("job-{}", job.id()) }
/// # let _ = dedupe_key;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub(crate) i64);

impl JobId {
    /// The id of the row `id`, e.g. one read from [`DeadLetter::id`](super::DeadLetter) or
    /// typed by an operator, for the operations of [`Admin`](super::Admin).
    ///
    /// ```
    /// use diesel_transaction_signals::outbox::JobId;
    /// assert_eq!(JobId::new(42).get(), 42);
    /// assert_eq!(JobId::from(42), JobId::new(42));
    /// ```
    pub fn new(id: i64) -> Self {
        JobId(id)
    }

    /// The row id.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Job;
    /// fn raw(job: &Job) -> i64 { job.id().get() }
    /// # let _ = raw;
    /// ```
    pub fn get(self) -> i64 {
        self.0
    }
}

impl From<i64> for JobId {
    fn from(id: i64) -> Self {
        JobId(id)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A job handed to a handler.
///
/// ```
/// use diesel_transaction_signals::outbox::Job;
///
/// #[derive(serde::Deserialize)]
/// struct Welcome { user_id: i64 }
///
/// fn handle(job: &Job) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
///     let Welcome { user_id } = job.payload()?;
///     println!("attempt {} of job {} for user {user_id}", job.attempt(), job.id());
///     Ok(())
/// }
/// # let _ = handle;
/// ```
#[derive(Debug, Clone)]
pub struct Job {
    id: JobId,
    queue: String,
    payload: String,
    attempt: u32,
    max_attempts: u32,
    idempotency_key: Option<String>,
}

impl Job {
    /// The job's stable id.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Job;
    /// fn id(job: &Job) -> i64 { job.id().get() }
    /// # let _ = id;
    /// ```
    pub fn id(&self) -> JobId {
        self.id
    }

    /// The queue it was enqueued on.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Job;
    /// fn queue(job: &Job) -> &str { job.queue() }
    /// # let _ = queue;
    /// ```
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// This attempt's number: 1 for the first delivery.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Job;
    /// fn retried(job: &Job) -> bool { job.attempt() > 1 }
    /// # let _ = retried;
    /// ```
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How many attempts the job gets before it is dead-lettered.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Job;
    /// fn last_chance(job: &Job) -> bool { job.attempt() == job.max_attempts() }
    /// # let _ = last_chance;
    /// ```
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The idempotency key it was enqueued with, if any.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Job;
    /// fn key(job: &Job) -> Option<&str> { job.idempotency_key() }
    /// # let _ = key;
    /// ```
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }

    /// The payload as stored (JSON text).
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Job;
    /// fn raw(job: &Job) -> &str { job.payload_json() }
    /// # let _ = raw;
    /// ```
    pub fn payload_json(&self) -> &str {
        &self.payload
    }

    /// The payload, deserialized.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Job;
    /// fn user(job: &Job) -> Result<i64, serde_json::Error> { job.payload() }
    /// # let _ = user;
    /// ```
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.payload)
    }

    fn from_row(row: ClaimedRow) -> Self {
        Job {
            id: JobId(row.id),
            queue: row.queue,
            payload: row.payload,
            attempt: row.attempts.max(1) as u32,
            max_attempts: row.max_attempts.max(1) as u32,
            idempotency_key: row.idempotency_key,
        }
    }
}

/// What a handler returns: `Ok` deletes the job; `Err` (or a panic) counts as a failed attempt.
pub type HandlerResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

type Handler = Arc<dyn Fn(&Job) -> HandlerResult + Send + Sync + 'static>;

/// Retry delays: `base * 2^(attempt - 1)`, capped at `max`, each multiplied by a random factor
/// in `1 ± jitter` so that failing jobs do not retry in lockstep.
///
/// ```
/// use diesel_transaction_signals::outbox::Backoff;
/// use std::time::Duration;
///
/// let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(60)).jitter(0.0);
/// assert_eq!(b.delay(1), Duration::from_millis(100));
/// assert_eq!(b.delay(4), Duration::from_millis(800));
/// assert_eq!(b.delay(40), Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: f64,
}

impl Default for Backoff {
    /// 1 s doubling up to 1 h, ±20 % jitter.
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(3600),
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// Doubling from `base`, capped at `max`, ±20 % jitter.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Backoff;
    /// let b = Backoff::new(std::time::Duration::from_secs(1), std::time::Duration::from_secs(30));
    /// # let _ = b;
    /// ```
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            ..Backoff::default()
        }
    }

    /// The jitter fraction, clamped to `0.0..=1.0`.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Backoff;
    /// let b = Backoff::default().jitter(0.5);
    /// # let _ = b;
    /// ```
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction.clamp(0.0, 1.0);
        self
    }

    /// The delay before retrying after failed attempt number `attempt` (1-based), without
    /// jitter.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Backoff;
    /// assert!(Backoff::default().delay(2) > Backoff::default().delay(1));
    /// ```
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(62);
        self.base
            .checked_mul(1u32.checked_shl(exp.min(31)).unwrap_or(u32::MAX))
            .map_or(self.max, |d| d.min(self.max))
    }

    fn jittered(&self, attempt: u32, random: f64) -> Duration {
        let factor = 1.0 + self.jitter * (2.0 * random - 1.0);
        self.delay(attempt).mul_f64(factor.max(0.0))
    }
}

/// Counters of a relay, for monitoring and tests; per queue, with handler times, in
/// [`RelayHandle::queue_stats`].
///
/// ```
/// # use diesel_transaction_signals::outbox::RelayStats;
/// fn healthy(s: &RelayStats) -> bool { s.dead == 0 && s.unknown_queue_rows == 0 }
/// # let _ = healthy;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Handler runs (attempts) started, whatever their outcome.
    pub run: u64,
    /// Handler runs that returned `Err` or panicked (each is then retried, dead-lettered, or
    /// left to the worker that took the row over after the lease expired).
    pub failed: u64,
    /// Jobs whose handler succeeded and whose row was deleted.
    pub delivered: u64,
    /// Failed attempts (handler `Err` or panic) that will be retried.
    pub retried: u64,
    /// Jobs moved to the dead-letter state.
    pub dead: u64,
    /// Rows seen at the last check in queues this relay has no handler for (kept, reported).
    pub unknown_queue_rows: u64,
    /// Claimed rows released at shutdown without running.
    pub released: u64,
}

/// The counters of one queue of a relay ([`RelayHandle::queue_stats`]): what a service exports
/// as metrics, labelled by queue.
///
/// ```
/// # use diesel_transaction_signals::outbox::QueueStats;
/// fn error_ratio(q: &QueueStats) -> f64 { q.failed as f64 / q.run.max(1) as f64 }
/// # let _ = error_ratio;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Handler runs (attempts) started.
    pub run: u64,
    /// Jobs whose handler succeeded and whose row this relay deleted.
    pub delivered: u64,
    /// Handler runs that returned `Err` or panicked.
    pub failed: u64,
    /// Failed attempts scheduled for a retry.
    pub retried: u64,
    /// Jobs moved to the dead-letter state.
    pub dead: u64,
    /// How long the handler took, successful or not.
    pub handler_time: HandlerTimes,
}

/// Handler durations of one queue: count, sum, maximum, and a fixed histogram whose bucket `i`
/// counts the runs that took at most [`HandlerTimes::BOUNDS`]`[i]` and more than the bound
/// before it (not cumulative); the last bucket counts the runs above the last bound.
///
/// ```
/// use diesel_transaction_signals::outbox::HandlerTimes;
/// use std::time::Duration;
///
/// fn mean(t: &HandlerTimes) -> Option<Duration> {
///     (t.count > 0).then(|| t.sum / t.count as u32)
/// }
/// // Prometheus-style cumulative buckets:
/// fn cumulative(t: &HandlerTimes) -> Vec<(Option<Duration>, u64)> {
///     let mut total = 0;
///     t.buckets.iter().enumerate().map(|(i, n)| {
///         total += n;
///         (HandlerTimes::BOUNDS.get(i).copied(), total) // None: +Inf
///     }).collect()
/// }
/// assert_eq!(HandlerTimes::default().buckets.len(), HandlerTimes::BOUNDS.len() + 1);
/// # let _ = (mean, cumulative);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandlerTimes {
    /// Runs measured.
    pub count: u64,
    /// Their total duration.
    pub sum: Duration,
    /// The longest one.
    pub max: Duration,
    /// Runs per duration bucket (see [`HandlerTimes::BOUNDS`]).
    pub buckets: [u64; 8],
}

impl HandlerTimes {
    /// The buckets' upper bounds: 1 ms, 5 ms, 25 ms, 100 ms, 500 ms, 2.5 s, 10 s (and above).
    ///
    /// ```
    /// use diesel_transaction_signals::outbox::HandlerTimes;
    /// use std::time::Duration;
    /// assert_eq!(HandlerTimes::BOUNDS[0], Duration::from_millis(1));
    /// assert_eq!(HandlerTimes::BOUNDS[6], Duration::from_secs(10));
    /// ```
    pub const BOUNDS: [Duration; 7] = [
        Duration::from_millis(1),
        Duration::from_millis(5),
        Duration::from_millis(25),
        Duration::from_millis(100),
        Duration::from_millis(500),
        Duration::from_millis(2500),
        Duration::from_secs(10),
    ];
}

#[derive(Default)]
struct QueueCounters {
    run: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    time_count: AtomicU64,
    time_sum_ns: AtomicU64,
    time_max_ns: AtomicU64,
    buckets: [AtomicU64; 8],
}

impl QueueCounters {
    fn timed(&self, took: Duration) {
        let ns = took.as_nanos().min(u64::MAX as u128) as u64;
        self.time_count.fetch_add(1, Ordering::Relaxed);
        self.time_sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.time_max_ns.fetch_max(ns, Ordering::Relaxed);
        let bucket = HandlerTimes::BOUNDS
            .iter()
            .position(|b| took <= *b)
            .unwrap_or(HandlerTimes::BOUNDS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> QueueStats {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        QueueStats {
            run: load(&self.run),
            delivered: load(&self.delivered),
            failed: load(&self.failed),
            retried: load(&self.retried),
            dead: load(&self.dead),
            handler_time: HandlerTimes {
                count: load(&self.time_count),
                sum: Duration::from_nanos(load(&self.time_sum_ns)),
                max: Duration::from_nanos(load(&self.time_max_ns)),
                buckets: std::array::from_fn(|i| load(&self.buckets[i])),
            },
        }
    }
}

#[derive(Default)]
struct Counters {
    run: AtomicU64,
    failed: AtomicU64,
    delivered: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    unknown: AtomicU64,
    released: AtomicU64,
}

struct Shared {
    stop: AtomicBool,
    counters: Counters,
    /// One entry per handled queue, made at spawn (so counting takes no lock).
    queues: HashMap<String, QueueCounters>,
}

/// Entry point: `Relay::builder(pool)`; see [`RelayBuilder`].
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::r2d2::{ConnectionManager, Pool};
/// use diesel_transaction_signals::outbox::Relay;
/// fn build(pool: Pool<ConnectionManager<diesel::SqliteConnection>>) {
///     let _builder = Relay::builder(pool).handler("emails", |_job| Ok(()));
/// }
/// # let _ = build;
/// # }
/// ```
#[derive(Debug)]
pub struct Relay;

impl Relay {
    /// Starts configuring a relay that takes connections from `pool`.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::r2d2::{ConnectionManager, Pool};
    /// # use diesel_transaction_signals::outbox::Relay;
    /// # fn f(pool: Pool<ConnectionManager<diesel::SqliteConnection>>) {
    /// let builder = Relay::builder(pool);
    /// # let _ = builder; }
    /// # }
    /// ```
    pub fn builder<C>(pool: Pool<ConnectionManager<C>>) -> RelayBuilder<C>
    where
        C: OutboxConnection + R2D2Connection,
    {
        RelayBuilder {
            pool,
            handlers: HashMap::new(),
            name: None,
            concurrency: 1,
            batch_size: 100,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            backoff: Backoff::default(),
            unknown_check: Duration::from_secs(30),
            #[cfg(feature = "outbox-listen")]
            listen: None,
        }
    }
}

/// Configures and starts a relay.
///
/// - `handler(queue, f)`: the function for a queue's jobs (at least one is needed). Rows of
///   queues without a handler are kept and reported, never dropped.
/// - `concurrency(n)`: worker threads (default 1), each claiming its own batches.
/// - `batch_size(n)`: rows claimed per round trip (default 100); the rows that succeeded are
///   deleted in one statement after the batch.
/// - `lease(d)`: how long a claimed batch is reserved (default 30 s). The rows of a batch share
///   one lease, taken at the claim: if running the whole batch takes longer, another relay may
///   claim its remaining rows and run them too (at least once). Size `batch_size` so a batch
///   finishes well within the lease.
/// - `poll_interval(d)`: the longest an idle relay waits before looking again (default 1 s);
///   commits in this process wake it at once.
/// - `backoff(b)`: retry delays ([`Backoff`]).
/// - `listen(url)` (feature `outbox-listen`, PostgreSQL): also wake on `NOTIFY dts_outbox`
///   from other processes, through a `PgConnection` to `url` (same URL syntax and TLS options
///   as the pool).
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::r2d2::{ConnectionManager, Pool};
/// use diesel_transaction_signals::outbox::{Backoff, Relay};
/// use std::time::Duration;
///
/// fn start(pool: Pool<ConnectionManager<diesel::SqliteConnection>>) {
///     let relay = Relay::builder(pool)
///         .name("mailer-1")
///         .handler("emails", |job| { println!("{}", job.payload_json()); Ok(()) })
///         .concurrency(2)
///         .batch_size(50)
///         .lease(Duration::from_secs(60))
///         .backoff(Backoff::new(Duration::from_secs(2), Duration::from_secs(600)))
///         .spawn()
///         .expect("valid configuration");
///     relay.shutdown();
/// }
/// # let _ = start;
/// # }
/// ```
pub struct RelayBuilder<C>
where
    C: OutboxConnection + R2D2Connection,
{
    pool: Pool<ConnectionManager<C>>,
    handlers: HashMap<String, Handler>,
    name: Option<String>,
    concurrency: usize,
    batch_size: i64,
    lease: Duration,
    poll_interval: Duration,
    backoff: Backoff,
    unknown_check: Duration,
    #[cfg(feature = "outbox-listen")]
    listen: Option<String>,
}

impl<C> fmt::Debug for RelayBuilder<C>
where
    C: OutboxConnection + R2D2Connection,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut queues: Vec<&String> = self.handlers.keys().collect();
        queues.sort();
        f.debug_struct("RelayBuilder")
            .field("queues", &queues)
            .field("name", &self.name)
            .field("concurrency", &self.concurrency)
            .field("batch_size", &self.batch_size)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl<C> RelayBuilder<C>
where
    C: OutboxConnection + R2D2Connection,
{
    /// Registers the handler of `queue`'s jobs.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::r2d2::{ConnectionManager, Pool};
    /// # use diesel_transaction_signals::outbox::Relay;
    /// # fn f(pool: Pool<ConnectionManager<diesel::SqliteConnection>>) {
    /// let b = Relay::builder(pool).handler("emails", |job| {
    ///     let to: String = job.payload()?;
    ///     println!("mail {to}");
    ///     Ok(())
    /// });
    /// # let _ = b; }
    /// # }
    /// ```
    pub fn handler<F>(mut self, queue: &str, handler: F) -> Self
    where
        F: Fn(&Job) -> HandlerResult + Send + Sync + 'static,
    {
        self.handlers.insert(queue.to_owned(), Arc::new(handler));
        self
    }

    /// The relay's name, for log lines and thread names (default: `relay-<pid>-<counter>`).
    ///
    /// Each worker records its leases in `locked_by` as `<name>/<worker>/<nonce>`, with a
    /// random nonce drawn at each `spawn()`: a worker completes, fails or releases only rows
    /// leased to itself, never a sibling's or another relay's (even one with the same name).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::r2d2::{ConnectionManager, Pool};
    /// # use diesel_transaction_signals::outbox::Relay;
    /// # fn f(pool: Pool<ConnectionManager<diesel::SqliteConnection>>) {
    /// let b = Relay::builder(pool).name("billing-relay");
    /// # let _ = b; }
    /// # }
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Worker threads (at least 1).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::r2d2::{ConnectionManager, Pool};
    /// # use diesel_transaction_signals::outbox::Relay;
    /// # fn f(pool: Pool<ConnectionManager<diesel::SqliteConnection>>) {
    /// let b = Relay::builder(pool).concurrency(4);
    /// # let _ = b; }
    /// # }
    /// ```
    pub fn concurrency(mut self, workers: usize) -> Self {
        self.concurrency = workers.max(1);
        self
    }

    /// Rows claimed per round trip (at least 1).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::r2d2::{ConnectionManager, Pool};
    /// # use diesel_transaction_signals::outbox::Relay;
    /// # fn f(pool: Pool<ConnectionManager<diesel::SqliteConnection>>) {
    /// let b = Relay::builder(pool).batch_size(500);
    /// # let _ = b; }
    /// # }
    /// ```
    pub fn batch_size(mut self, rows: usize) -> Self {
        self.batch_size = rows.clamp(1, 100_000) as i64;
        self
    }

    /// How long a claimed row stays reserved for this relay.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::r2d2::{ConnectionManager, Pool};
    /// # use diesel_transaction_signals::outbox::Relay;
    /// # fn f(pool: Pool<ConnectionManager<diesel::SqliteConnection>>) {
    /// let b = Relay::builder(pool).lease(std::time::Duration::from_secs(120));
    /// # let _ = b; }
    /// # }
    /// ```
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(1));
        self
    }

    /// The longest an idle worker waits before looking for due rows again.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::r2d2::{ConnectionManager, Pool};
    /// # use diesel_transaction_signals::outbox::Relay;
    /// # fn f(pool: Pool<ConnectionManager<diesel::SqliteConnection>>) {
    /// let b = Relay::builder(pool).poll_interval(std::time::Duration::from_millis(200));
    /// # let _ = b; }
    /// # }
    /// ```
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Retry delays for failed attempts.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::r2d2::{ConnectionManager, Pool};
    /// # use diesel_transaction_signals::outbox::{Backoff, Relay};
    /// # fn f(pool: Pool<ConnectionManager<diesel::SqliteConnection>>) {
    /// let b = Relay::builder(pool).backoff(Backoff::default().jitter(0.5));
    /// # let _ = b; }
    /// # }
    /// ```
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How often an idle relay checks for rows in queues it has no handler for (default 30 s).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::r2d2::{ConnectionManager, Pool};
    /// # use diesel_transaction_signals::outbox::Relay;
    /// # fn f(pool: Pool<ConnectionManager<diesel::SqliteConnection>>) {
    /// let b = Relay::builder(pool).unknown_queue_check(std::time::Duration::from_secs(5));
    /// # let _ = b; }
    /// # }
    /// ```
    pub fn unknown_queue_check(mut self, every: Duration) -> Self {
        self.unknown_check = every;
        self
    }

    /// Also wake when another process commits jobs: `LISTEN dts_outbox` on a dedicated
    /// Diesel `PgConnection` to `database_url`, so the URL takes what the pool's URL takes
    /// (libpq's URI or `key=value` syntax, `sslmode` and the other TLS options).
    ///
    /// The listener thread checks for notifications every 50 ms. If it cannot connect or
    /// `LISTEN`, or loses its connection, it logs one warning, retries with exponential backoff
    /// (100 ms doubling up to 30 s, logged at debug level only) and logs one info line
    /// "listener reconnected" when it is back; meanwhile the workers keep polling every
    /// [`poll_interval`](Self::poll_interval), so choose that with the outage in mind. A
    /// listener thread that cannot be started makes [`spawn`](Self::spawn) return
    /// [`OutboxError::Spawn`]. Connecting blocks shutdown until it ends: add
    /// `connect_timeout` to the URL if the server may be unreachable.
    ///
    /// ```
    /// # #[cfg(feature = "outbox-listen")] {
    /// # use diesel::r2d2::{ConnectionManager, Pool};
    /// # use diesel_transaction_signals::outbox::Relay;
    /// # fn f(pool: Pool<ConnectionManager<diesel::PgConnection>>) {
    /// let b = Relay::builder(pool).listen("postgres://localhost/app");
    /// # let _ = b; }
    /// # }
    /// ```
    #[cfg(feature = "outbox-listen")]
    pub fn listen(mut self, database_url: impl Into<String>) -> Self {
        self.listen = Some(database_url.into());
        self
    }

    /// Starts the worker threads (and the listener thread of [`listen`](Self::listen)).
    ///
    /// Errors: [`OutboxError::NoHandlers`] without a handler, [`OutboxError::InvalidQueue`] for
    /// an invalid queue name, [`OutboxError::Spawn`] when a thread cannot be started (the
    /// listener's included; the threads already started are stopped and joined first).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::r2d2::{ConnectionManager, Pool};
    /// # use diesel_transaction_signals::outbox::{OutboxError, Relay};
    /// let pool = Pool::builder()
    ///     .build(ConnectionManager::<diesel::SqliteConnection>::new(":memory:"))
    ///     .unwrap();
    /// assert!(matches!(Relay::builder(pool).spawn(), Err(OutboxError::NoHandlers)));
    /// # }
    /// ```
    pub fn spawn(self) -> Result<RelayHandle, OutboxError> {
        if self.handlers.is_empty() {
            return Err(OutboxError::NoHandlers);
        }
        if let Some(bad) = self.handlers.keys().find(|q| !valid_queue(q)) {
            return Err(OutboxError::InvalidQueue(bad.clone()));
        }
        static RELAYS: AtomicU64 = AtomicU64::new(1);
        let name = self.name.unwrap_or_else(|| {
            format!(
                "relay-{}-{}",
                std::process::id(),
                RELAYS.fetch_add(1, Ordering::Relaxed)
            )
        });
        let mut queues: Vec<&String> = self.handlers.keys().collect();
        queues.sort();
        let queues_json = serde_json::to_string(&queues).expect("strings serialize");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            queues: self
                .handlers
                .keys()
                .map(|q| (q.clone(), QueueCounters::default()))
                .collect(),
        });
        let worker = Arc::new(Worker {
            pool: self.pool,
            handlers: self.handlers,
            name: name.clone(),
            nonce: fastrand::u64(..),
            queues_json,
            batch_size: self.batch_size,
            lease_ms: self.lease.as_millis().min(i64::MAX as u128) as i64,
            poll_interval: self.poll_interval,
            backoff: self.backoff,
            unknown_check: self.unknown_check,
            shared: shared.clone(),
        });
        let mut threads = Vec::with_capacity(self.concurrency + 1);
        let mut started = Ok(());
        for n in 0..self.concurrency {
            let w = worker.clone();
            started = std::thread::Builder::new()
                .name(format!("{name}-{n}"))
                .spawn(move || w.run(n as u64))
                .map(|t| threads.push(t));
            if started.is_err() {
                break;
            }
        }
        #[cfg(feature = "outbox-listen")]
        if let (Ok(()), Some(url)) = (&started, self.listen) {
            let s = shared.clone();
            let relay = name.clone();
            let stopping = move || s.stop.load(Ordering::SeqCst);
            started = std::thread::Builder::new()
                .name(format!("{name}-listen"))
                .spawn(move || super::listen::run(&url, &relay, stopping))
                .map(|t| threads.push(t));
        }
        if let Err(e) = started {
            // Stop what did start: its workers release what they claimed.
            shared.stop.store(true, Ordering::SeqCst);
            wake();
            for t in threads {
                let _ = t.join();
            }
            return Err(OutboxError::Spawn(e));
        }
        log::info!(target: "diesel_transaction_signals", "outbox relay {name} started");
        Ok(RelayHandle {
            name,
            shared,
            threads,
        })
    }
}

/// A running relay. [`shutdown`](Self::shutdown) (or dropping it) stops it gracefully: each
/// worker finishes the job it is running, releases the rest of its claimed batch for others,
/// and the threads are joined.
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// # use diesel::r2d2::{ConnectionManager, Pool};
/// # use diesel_transaction_signals::outbox::Relay;
/// # use diesel_migrations::MigrationHarness;
/// # let pool = Pool::builder().max_size(1).build(ConnectionManager::<diesel::SqliteConnection>::new(":memory:")).unwrap();
/// # pool.get().unwrap().run_pending_migrations(diesel_transaction_signals::outbox::migrations::SQLITE).unwrap();
/// let relay = Relay::builder(pool).handler("emails", |_| Ok(())).spawn().unwrap();
/// assert_eq!(relay.stats().delivered, 0);
/// relay.shutdown();
/// # }
/// ```
pub struct RelayHandle {
    name: String,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayHandle")
            .field("name", &self.name)
            .field("stats", &self.stats())
            .finish()
    }
}

impl RelayHandle {
    /// The relay's name.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::RelayHandle;
    /// fn name(r: &RelayHandle) -> &str { r.name() }
    /// # let _ = name;
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The relay's counters so far.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::RelayHandle;
    /// fn delivered(r: &RelayHandle) -> u64 { r.stats().delivered }
    /// # let _ = delivered;
    /// ```
    pub fn stats(&self) -> RelayStats {
        let c = &self.shared.counters;
        RelayStats {
            run: c.run.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            dead: c.dead.load(Ordering::Relaxed),
            unknown_queue_rows: c.unknown.load(Ordering::Relaxed),
            released: c.released.load(Ordering::Relaxed),
        }
    }

    /// The counters of each queue this relay handles (every queue it has a handler for, even
    /// before its first job): jobs run, delivered, failed, retried, dead-lettered, and how long
    /// the handler took.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::r2d2::{ConnectionManager, Pool};
    /// # use diesel_transaction_signals::outbox::Relay;
    /// # use diesel_migrations::MigrationHarness;
    /// # let pool = Pool::builder().max_size(1).build(ConnectionManager::<diesel::SqliteConnection>::new(":memory:")).unwrap();
    /// # pool.get().unwrap().run_pending_migrations(diesel_transaction_signals::outbox::migrations::SQLITE).unwrap();
    /// let relay = Relay::builder(pool).handler("emails", |_| Ok(())).spawn().unwrap();
    /// for (queue, q) in relay.queue_stats() {
    ///     println!("outbox_jobs_run_total{{queue={queue:?}}} {}", q.run);
    ///     println!("outbox_handler_seconds_sum{{queue={queue:?}}} {}", q.handler_time.sum.as_secs_f64());
    /// }
    /// assert_eq!(relay.queue_stats()["emails"].run, 0);
    /// relay.shutdown();
    /// # }
    /// ```
    pub fn queue_stats(&self) -> BTreeMap<String, QueueStats> {
        self.shared
            .queues
            .iter()
            .map(|(q, c)| (q.clone(), c.snapshot()))
            .collect()
    }

    /// Asks the workers to stop without waiting: each finishes the job it is running and
    /// releases the rest of its batch. [`shutdown`](Self::shutdown) then waits for them.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::RelayHandle;
    /// fn stop_soon(r: &RelayHandle) { r.request_stop() }
    /// # let _ = stop_soon;
    /// ```
    pub fn request_stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        wake();
    }

    /// Stops gracefully and returns the final counters.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::RelayHandle;
    /// fn stop(r: RelayHandle) -> u64 { r.shutdown().delivered }
    /// # let _ = stop;
    /// ```
    pub fn shutdown(mut self) -> RelayStats {
        self.stop();
        self.stats()
    }

    fn stop(&mut self) {
        self.request_stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Worker<C>
where
    C: OutboxConnection + R2D2Connection,
{
    pool: Pool<ConnectionManager<C>>,
    handlers: HashMap<String, Handler>,
    name: String,
    /// Drawn at each `spawn()`: with the worker's index it makes its lease owner unique, even
    /// among relays given the same name.
    nonce: u64,
    queues_json: String,
    batch_size: i64,
    lease_ms: i64,
    poll_interval: Duration,
    backoff: Backoff,
    unknown_check: Duration,
    shared: Arc<Shared>,
}

impl<C> Worker<C>
where
    C: OutboxConnection + R2D2Connection,
{
    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }

    fn run(&self, n: u64) {
        let mut rng = fastrand::Rng::new();
        let owner = lease_owner(&self.name, n, self.nonce);
        let mut last_unknown_check: Option<Instant> = None;
        while !self.stopping() {
            let seen = bell_generation();
            let mut conn = match self.pool.get() {
                Ok(conn) => conn,
                Err(e) => {
                    log::warn!(target: "diesel_transaction_signals",
                        "outbox relay {}: no connection: {e}", self.name);
                    wait_for_bell(seen, self.poll_interval);
                    continue;
                }
            };
            let mut rows = match conn.outbox_claim(
                &owner,
                &self.queues_json,
                self.batch_size,
                self.lease_ms,
            ) {
                Ok(rows) => rows,
                Err(e) => {
                    // A database upgraded to this version without its migrations: say how to fix.
                    let hint = if e.to_string().contains("dts_outbox_paused") {
                        " (run the pending outbox migrations, e.g. `dts-outbox migrate`: claims \
                         read the paused queues in dts_outbox_paused)"
                    } else {
                        ""
                    };
                    log::warn!(target: "diesel_transaction_signals",
                        "outbox relay {}: claim failed: {e}{hint}", self.name);
                    drop(conn);
                    wait_for_bell(seen, self.poll_interval);
                    continue;
                }
            };
            if rows.is_empty() {
                if n == 0 && last_unknown_check.is_none_or(|t| t.elapsed() >= self.unknown_check) {
                    last_unknown_check = Some(Instant::now());
                    self.report_unknown_queues(&mut conn);
                }
                drop(conn);
                wait_for_bell(seen, self.poll_interval);
                continue;
            }
            // RETURNING gives no order: run the batch in due order, oldest first.
            rows.sort_unstable_by_key(|r| (r.run_at, r.id));
            self.run_batch(&mut conn, &owner, rows, &mut rng);
        }
    }

    fn run_batch(&self, conn: &mut C, owner: &str, rows: Vec<ClaimedRow>, rng: &mut fastrand::Rng) {
        let mut done = Vec::with_capacity(rows.len());
        let mut rows = rows.into_iter();
        while let Some(row) = rows.next() {
            if self.stopping() {
                let rest: Vec<i64> = std::iter::once(row.id)
                    .chain(rows.by_ref().map(|r| r.id))
                    .collect();
                match conn.outbox_release(owner, &rest) {
                    Ok(()) => {
                        self.shared
                            .counters
                            .released
                            .fetch_add(rest.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => log::warn!(target: "diesel_transaction_signals",
                        "outbox relay {}: releasing {} claimed rows at shutdown failed ({e}); \
                         they run again when their lease expires", self.name, rest.len()),
                }
                break;
            }
            let job = Job::from_row(row);
            let Some(handler) = self.handlers.get(job.queue()) else {
                // The claim only takes queues with a handler; keep the row if one slips by.
                let _ = conn.outbox_release(owner, &[job.id.0]);
                continue;
            };
            let counters = self.shared.queues.get(job.queue());
            self.shared.counters.run.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let outcome = match catch_unwind(AssertUnwindSafe(|| handler(&job))) {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(panic) => Err(format!("handler panicked: {}", panic_message(&*panic))),
            };
            if let Some(c) = counters {
                c.run.fetch_add(1, Ordering::Relaxed);
                c.timed(started.elapsed());
            }
            match outcome {
                Ok(()) => done.push((job.id.0, job.queue)),
                Err(error) => {
                    self.shared.counters.failed.fetch_add(1, Ordering::Relaxed);
                    if let Some(c) = counters {
                        c.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    self.fail(conn, owner, &job, &error, rng)
                }
            }
        }
        if done.is_empty() {
            return;
        }
        let ids: Vec<i64> = done.iter().map(|(id, _)| *id).collect();
        match conn.outbox_complete(owner, &ids) {
            Ok(deleted) => {
                self.shared
                    .counters
                    .delivered
                    .fetch_add(deleted as u64, Ordering::Relaxed);
                // Per queue: exact when every row was deleted or the batch is one queue's; a
                // mixed batch some of whose rows another worker took over counts in the totals
                // only (which rows were deleted is not known).
                if deleted == done.len() {
                    for (_, queue) in &done {
                        if let Some(c) = self.shared.queues.get(queue) {
                            c.delivered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                } else if done.iter().all(|(_, q)| *q == done[0].1) {
                    if let Some(c) = self.shared.queues.get(&done[0].1) {
                        c.delivered.fetch_add(deleted as u64, Ordering::Relaxed);
                    }
                }
                if deleted < done.len() {
                    log::warn!(target: "diesel_transaction_signals",
                        "outbox relay {}: {} of {} succeeded jobs were no longer leased to this \
                         worker (their lease expired and another worker took them, or they are \
                         gone); that worker's attempt decides", self.name,
                        done.len() - deleted, done.len());
                }
            }
            Err(e) => log::error!(target: "diesel_transaction_signals",
                "outbox relay {}: deleting {} delivered jobs failed ({e}); they will be \
                 delivered again when their lease expires", self.name, done.len()),
        }
    }

    fn fail(&self, conn: &mut C, owner: &str, job: &Job, error: &str, rng: &mut fastrand::Rng) {
        let dead = job.attempt >= job.max_attempts;
        let delay = self.backoff.jittered(job.attempt, rng.f64());
        // A dead row's `run_at` records when it died (`Admin::purge_dead` ages it by that).
        let delay_ms = if dead {
            0
        } else {
            delay.as_millis().min(i64::MAX as u128) as i64
        };
        match conn.outbox_fail(owner, job.id.0, error, delay_ms, dead) {
            Ok(true) => {}
            Ok(false) => {
                log::warn!(target: "diesel_transaction_signals",
                    "outbox relay {}: job {} ({}) failed attempt {} after its lease expired and \
                     another worker took it; that worker's attempt decides: {error}",
                    self.name, job.id, job.queue, job.attempt);
                return;
            }
            Err(e) => {
                log::error!(target: "diesel_transaction_signals",
                    "outbox relay {}: recording the failure of job {} failed ({e}); it runs again \
                     when its lease expires", self.name, job.id);
                return;
            }
        }
        let counters = self.shared.queues.get(job.queue());
        if dead {
            self.shared.counters.dead.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = counters {
                c.dead.fetch_add(1, Ordering::Relaxed);
            }
            log::error!(target: "diesel_transaction_signals",
                "outbox relay {}: job {} ({}) failed attempt {}/{} and is dead-lettered: {error}",
                self.name, job.id, job.queue, job.attempt, job.max_attempts);
        } else {
            self.shared.counters.retried.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = counters {
                c.retried.fetch_add(1, Ordering::Relaxed);
            }
            log::warn!(target: "diesel_transaction_signals",
                "outbox relay {}: job {} ({}) failed attempt {}/{}, retrying in {delay:?}: {error}",
                self.name, job.id, job.queue, job.attempt, job.max_attempts);
        }
    }

    fn report_unknown_queues(&self, conn: &mut C) {
        match conn.outbox_unknown_queues(&self.queues_json) {
            Ok(found) => {
                let total: i64 = found.iter().map(|(_, n)| n).sum();
                self.shared
                    .counters
                    .unknown
                    .store(total.max(0) as u64, Ordering::Relaxed);
                for (queue, n) in found {
                    log::warn!(target: "diesel_transaction_signals",
                        "outbox relay {}: {n} pending job(s) in queue {queue:?}, which has no \
                         handler here; they are kept", self.name);
                }
            }
            Err(e) => log::debug!(target: "diesel_transaction_signals",
                "outbox relay {}: unknown-queue check failed: {e}", self.name),
        }
    }
}

/// The lease owner a worker records in `locked_by`: `<name>/<worker>/<nonce>`, the name cut
/// (at a character boundary) so the whole fits MySQL's `VARCHAR(191)`.
fn lease_owner(name: &str, worker: u64, nonce: u64) -> String {
    let suffix = format!("/{worker}/{nonce:016x}");
    let mut cut = name.len().min(191 - suffix.len());
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &name[..cut])
}

#[cfg(test)]
mod tests {
    use super::lease_owner;

    #[test]
    fn lease_owners_differ_per_worker_and_spawn_and_fit_191_bytes() {
        assert_eq!(lease_owner("mailer", 1, 0xab), "mailer/1/00000000000000ab");
        assert_ne!(lease_owner("r", 0, 1), lease_owner("r", 1, 1));
        assert_ne!(lease_owner("r", 0, 1), lease_owner("r", 0, 2));
        let long = "é".repeat(200);
        let owner = lease_owner(&long, 7, u64::MAX);
        assert!(owner.len() <= 191, "{}", owner.len());
        assert!(owner.ends_with("/7/ffffffffffffffff"));
    }
}
