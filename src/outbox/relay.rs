//! The relay: claims due jobs with a lease, runs their handlers, deletes what succeeded,
//! retries what failed, and moves what keeps failing to the dead-letter state.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use diesel::r2d2::{ConnectionManager, Pool, R2D2Connection};

use super::backend::{ClaimedRow, OutboxConnection};
use super::job::{Backoff, Job};
use super::stats::{
    claim_failed, default_name, lease_owner, queues_json, QueueStats, RelayStats, Retry, Shared,
};
use super::{bell_generation, valid_queue, wait_for_bell, wake, OutboxError};
use crate::report::panic_message;

/// What a handler returns: `Ok` deletes the job; `Err` (or a panic) counts as a failed attempt.
pub type HandlerResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

type Handler = Arc<dyn Fn(&Job) -> HandlerResult + Send + Sync + 'static>;

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
///   as the pool), registered in `dts_outbox_listeners` while it listens: the NOTIFY trigger
///   is enabled only while some relay is registered.
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

    super::options::relay_option_setters!(
        workers = "threads",
        setup = "# #[cfg(feature = \"sqlite\")] {\n# use diesel::r2d2::{ConnectionManager, Pool};\n# use diesel_transaction_signals::outbox::Relay;\n# fn f(pool: Pool<ConnectionManager<diesel::SqliteConnection>>) {\n",
        builder = "Relay::builder(pool)"
    );

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
        let name = self.name.unwrap_or_else(default_name);
        let queues_json = queues_json(self.handlers.keys());
        let shared = Arc::new(Shared::new(self.handlers.keys()));
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
            let stopping = move || s.stopping();
            started = std::thread::Builder::new()
                .name(format!("{name}-listen"))
                .spawn(move || super::listen::run(&url, &relay, stopping))
                .map(|t| threads.push(t));
        }
        if let Err(e) = started {
            // Stop what did start: its workers release what they claimed.
            shared.stop();
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
        self.shared.stats()
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
        self.shared.queue_stats()
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
        self.shared.stop();
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
        self.shared.stopping()
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
                    claim_failed(&self.name, &e);
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
                let released = conn.outbox_release(owner, &rest);
                self.shared.released(&self.name, rest.len(), released);
                break;
            }
            let job = Job::from_row(row);
            let Some(handler) = self.handlers.get(job.queue()) else {
                // The claim only takes queues with a handler; keep the row if one slips by.
                let _ = conn.outbox_release(owner, &[job.id().get()]);
                continue;
            };
            self.shared.started();
            let started = Instant::now();
            let outcome = match catch_unwind(AssertUnwindSafe(|| handler(&job))) {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(panic) => Err(format!("handler panicked: {}", panic_message(&*panic))),
            };
            self.shared
                .ran(job.queue(), started.elapsed(), outcome.is_err());
            match outcome {
                Ok(()) => done.push((job.id().get(), job.queue().to_owned())),
                Err(error) => self.fail(conn, owner, &job, &error, rng),
            }
        }
        if done.is_empty() {
            return;
        }
        let ids: Vec<i64> = done.iter().map(|(id, _)| *id).collect();
        let deleted = conn.outbox_complete(owner, &ids);
        self.shared.completed(&self.name, &done, deleted);
    }

    fn fail(&self, conn: &mut C, owner: &str, job: &Job, error: &str, rng: &mut fastrand::Rng) {
        let retry = Retry::after(&self.backoff, job, rng.f64());
        let recorded = conn.outbox_fail(owner, job.id().get(), error, retry.delay_ms, retry.dead);
        self.shared.failed(&self.name, job, error, &retry, recorded);
    }

    fn report_unknown_queues(&self, conn: &mut C) {
        let found = conn.outbox_unknown_queues(&self.queues_json);
        self.shared.unknown_queues(&self.name, found);
    }
}
