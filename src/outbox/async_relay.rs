//! The async relay (features `outbox` and `async`): the thread relay's claims, leases,
//! retries, dead letters and shutdown, with `async` handlers run by tokio tasks on the
//! application's runtime, taking connections from a deadpool or bb8 pool of diesel-async
//! connections. The SQL is `backend.rs`'s (through `async_backend.rs`); the bookkeeping is
//! `stats.rs`'s and the jobs `job.rs`'s, as for the thread relay.

use std::collections::{BTreeMap, HashMap};
use std::error::Error;
use std::fmt;
use std::future::Future;
use std::ops::DerefMut;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::async_backend::AsyncOutboxConnection;
use super::backend::{sealed, ClaimedRow};
use super::job::{Backoff, Job};
use super::stats::{
    claim_failed, default_name, lease_owner, queues_json, QueueStats, RelayStats, Retry, Shared,
};
use super::{bell_generation, valid_queue, wait_for_bell_async, wake, OutboxError};
use crate::report::panic_message;

type BoxError = Box<dyn Error + Send + Sync + 'static>;
type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'static>>;
type Handler = Arc<dyn Fn(Job) -> HandlerFuture + Send + Sync + 'static>;

/// A pool an [`AsyncRelay`] takes its connections from: diesel-async's deadpool
/// (`pooled_connection::deadpool::Pool<C>`, feature `deadpool`) and bb8
/// (`pooled_connection::bb8::Pool<C>`, feature `bb8`) pools of an [`AsyncOutboxConnection`].
/// Sealed.
///
/// ```
/// # #[cfg(all(feature = "sqlite", feature = "deadpool", feature = "bb8"))] {
/// use diesel::SqliteConnection;
/// use diesel_async::pooled_connection::{bb8, deadpool};
/// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
/// use diesel_transaction_signals::outbox::AsyncRelayPool;
/// use diesel_transaction_signals::AsyncSignalConnection;
///
/// type Conn = AsyncSignalConnection<SyncConnectionWrapper<SqliteConnection>>;
/// fn takes<P: AsyncRelayPool>() {}
/// takes::<deadpool::Pool<Conn>>();
/// takes::<bb8::Pool<Conn>>();
/// # }
/// ```
pub trait AsyncRelayPool: sealed::Sealed + Clone + Send + Sync + 'static {
    /// The pooled connection type.
    type Connection: AsyncOutboxConnection;
    /// A checked-out connection.
    #[doc(hidden)]
    type Guard<'a>: DerefMut<Target = Self::Connection> + Send
    where
        Self: 'a;
    /// Checks a connection out.
    #[doc(hidden)]
    fn checkout(&self) -> impl Future<Output = Result<Self::Guard<'_>, String>> + Send;
}

#[cfg(feature = "deadpool")]
mod deadpool_pool {
    use super::*;
    use diesel_async::pooled_connection::deadpool::{Object, Pool};
    use diesel_async::pooled_connection::PoolableConnection;

    /// A connection diesel-async can pool and the relay can claim with.
    pub trait Pooled: AsyncOutboxConnection + PoolableConnection {}
    impl<C: AsyncOutboxConnection + PoolableConnection> Pooled for C {}

    impl<C> sealed::Sealed for Pool<C>
    where
        C: Pooled,
        for<'a> diesel::dsl::select<diesel::dsl::AsExprOf<i32, diesel::sql_types::Integer>>:
            diesel_async::methods::LoadQuery<'a, C, i32>,
        diesel::query_builder::SqlQuery: diesel::query_builder::QueryFragment<C::Backend>,
    {
    }

    impl<C> AsyncRelayPool for Pool<C>
    where
        C: Pooled,
        for<'a> diesel::dsl::select<diesel::dsl::AsExprOf<i32, diesel::sql_types::Integer>>:
            diesel_async::methods::LoadQuery<'a, C, i32>,
        diesel::query_builder::SqlQuery: diesel::query_builder::QueryFragment<C::Backend>,
    {
        type Connection = C;
        type Guard<'a> = Object<C>;

        async fn checkout(&self) -> Result<Object<C>, String> {
            self.get().await.map_err(|e| e.to_string())
        }
    }
}

#[cfg(feature = "bb8")]
mod bb8_pool {
    use super::*;
    use diesel_async::pooled_connection::bb8::{Pool, PooledConnection};
    use diesel_async::pooled_connection::PoolableConnection;

    /// A connection diesel-async can pool and the relay can claim with.
    pub trait Pooled: AsyncOutboxConnection + PoolableConnection {}
    impl<C: AsyncOutboxConnection + PoolableConnection> Pooled for C {}

    impl<C> sealed::Sealed for Pool<C>
    where
        C: Pooled,
        for<'a> diesel::dsl::select<diesel::dsl::AsExprOf<i32, diesel::sql_types::Integer>>:
            diesel_async::methods::LoadQuery<'a, C, i32>,
        diesel::query_builder::SqlQuery: diesel::query_builder::QueryFragment<C::Backend>,
    {
    }

    impl<C> AsyncRelayPool for Pool<C>
    where
        C: Pooled,
        for<'a> diesel::dsl::select<diesel::dsl::AsExprOf<i32, diesel::sql_types::Integer>>:
            diesel_async::methods::LoadQuery<'a, C, i32>,
        diesel::query_builder::SqlQuery: diesel::query_builder::QueryFragment<C::Backend>,
    {
        type Connection = C;
        type Guard<'a> = PooledConnection<'a, C>;

        async fn checkout(&self) -> Result<PooledConnection<'_, C>, String> {
            self.get().await.map_err(|e| e.to_string())
        }
    }
}

/// Entry point of the relay of `async` handlers: `AsyncRelay::builder(pool)`; see
/// [`AsyncRelayBuilder`].
///
/// ```
/// # #[cfg(all(feature = "sqlite", feature = "deadpool"))] {
/// use diesel::SqliteConnection;
/// use diesel_async::pooled_connection::deadpool::Pool;
/// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
/// use diesel_transaction_signals::outbox::{AsyncRelay, Job};
/// use diesel_transaction_signals::AsyncSignalConnection;
///
/// type Conn = AsyncSignalConnection<SyncConnectionWrapper<SqliteConnection>>;
/// fn build(pool: Pool<Conn>) {
///     let _builder = AsyncRelay::builder(pool)
///         .handler("emails", |job: Job| async move { job.payload::<String>().map(drop) });
/// }
/// # let _ = build;
/// # }
/// ```
#[derive(Debug)]
pub struct AsyncRelay;

impl AsyncRelay {
    /// Starts configuring a relay that takes connections from `pool`, with the thread
    /// relay's defaults: one worker, batches of 100, 30 s leases, a 1 s poll interval,
    /// [`Backoff::default`], an unknown-queue check every 30 s.
    ///
    /// ```
    /// # #[cfg(all(feature = "sqlite", feature = "deadpool"))] {
    /// # use diesel_async::pooled_connection::deadpool::Pool;
    /// # use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// # use diesel_transaction_signals::outbox::AsyncRelay;
    /// # fn f(pool: Pool<SyncConnectionWrapper<diesel::SqliteConnection>>) {
    /// let builder = AsyncRelay::builder(pool);
    /// # let _ = builder; }
    /// # }
    /// ```
    pub fn builder<P: AsyncRelayPool>(pool: P) -> AsyncRelayBuilder<P> {
        AsyncRelayBuilder {
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

/// Configures and starts an async relay: the options of [`RelayBuilder`](super::RelayBuilder)
/// with the same defaults and meaning, except that `concurrency(n)` starts `n` tokio tasks
/// (each claiming its own batches and awaiting one handler at a time) instead of threads.
///
/// ```
/// # #[cfg(all(feature = "sqlite", feature = "deadpool"))] {
/// use diesel::SqliteConnection;
/// use diesel_async::pooled_connection::deadpool::Pool;
/// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
/// use diesel_transaction_signals::outbox::{AsyncRelay, Backoff, Job};
/// use std::time::Duration;
///
/// async fn start(pool: Pool<SyncConnectionWrapper<SqliteConnection>>) {
///     let relay = AsyncRelay::builder(pool)
///         .name("mailer-1")
///         .handler("emails", |job: Job| async move {
///             println!("{}", job.payload_json());
///             Ok::<(), std::io::Error>(())
///         })
///         .concurrency(2)
///         .batch_size(50)
///         .lease(Duration::from_secs(60))
///         .backoff(Backoff::new(Duration::from_secs(2), Duration::from_secs(600)))
///         .spawn()
///         .expect("valid configuration, inside a tokio runtime");
///     relay.shutdown().await;
/// }
/// # let _ = start;
/// # }
/// ```
pub struct AsyncRelayBuilder<P: AsyncRelayPool> {
    pool: P,
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

impl<P: AsyncRelayPool> fmt::Debug for AsyncRelayBuilder<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut queues: Vec<&String> = self.handlers.keys().collect();
        queues.sort();
        f.debug_struct("AsyncRelayBuilder")
            .field("queues", &queues)
            .field("name", &self.name)
            .field("concurrency", &self.concurrency)
            .field("batch_size", &self.batch_size)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl<P: AsyncRelayPool> AsyncRelayBuilder<P> {
    /// Registers the async handler of `queue`'s jobs: `Ok` deletes the job; an `Err` (any
    /// error that converts into `Box<dyn Error + Send + Sync>`) or a panic is a failed
    /// attempt, retried with the backoff and dead-lettered after the job's `max_attempts`.
    ///
    /// ```
    /// # #[cfg(all(feature = "sqlite", feature = "deadpool"))] {
    /// # use diesel_async::pooled_connection::deadpool::Pool;
    /// # use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// # use diesel_transaction_signals::outbox::{AsyncRelay, Job};
    /// # fn f(pool: Pool<SyncConnectionWrapper<diesel::SqliteConnection>>) {
    /// let b = AsyncRelay::builder(pool).handler("emails", |job: Job| async move {
    ///     let to: String = job.payload()?;
    ///     println!("mail {to}");
    ///     Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// });
    /// # let _ = b; }
    /// # }
    /// ```
    pub fn handler<F, Fut, E>(mut self, queue: &str, handler: F) -> Self
    where
        F: Fn(Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let handler: Handler = Arc::new(move |job| {
            let run = handler(job);
            Box::pin(async move { run.await.map_err(Into::into) })
        });
        self.handlers.insert(queue.to_owned(), handler);
        self
    }

    super::options::relay_option_setters!(
        workers = "tasks",
        setup = "# #[cfg(all(feature = \"sqlite\", feature = \"deadpool\"))] {\n# use diesel_async::pooled_connection::deadpool::Pool;\n# use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;\n# use diesel_transaction_signals::outbox::AsyncRelay;\n# fn f(pool: Pool<SyncConnectionWrapper<diesel::SqliteConnection>>) {\n",
        builder = "AsyncRelay::builder(pool)"
    );

    /// Starts the worker tasks on the current tokio runtime (and the listener thread of
    /// [`listen`](Self::listen)). Idle workers wait with `tokio::time`, so the runtime needs
    /// its time driver (`enable_time` or `enable_all`, as `#[tokio::main]` sets up). Each
    /// worker holds its pooled connection while it runs a batch, as the thread relay's do:
    /// size the pool for `concurrency` plus the service's own use.
    ///
    /// Errors: [`OutboxError::NoHandlers`] without a handler, [`OutboxError::InvalidQueue`]
    /// for an invalid queue name, [`OutboxError::Spawn`] outside a tokio runtime or when the
    /// listener thread cannot be started (the tasks already started are stopped then).
    ///
    /// ```
    /// # #[cfg(all(feature = "sqlite", feature = "deadpool"))] {
    /// use diesel_async::pooled_connection::deadpool::Pool;
    /// use diesel_async::pooled_connection::AsyncDieselConnectionManager;
    /// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// use diesel_transaction_signals::outbox::{AsyncRelay, Job, OutboxError};
    ///
    /// type Conn = SyncConnectionWrapper<diesel::SqliteConnection>;
    /// let pool = Pool::builder(AsyncDieselConnectionManager::<Conn>::new(":memory:"))
    ///     .build()
    ///     .unwrap();
    /// assert!(matches!(AsyncRelay::builder(pool.clone()).spawn(), Err(OutboxError::NoHandlers)));
    /// let outside_a_runtime = AsyncRelay::builder(pool)
    ///     .handler("emails", |_: Job| async { Ok::<(), std::io::Error>(()) })
    ///     .spawn();
    /// assert!(matches!(outside_a_runtime, Err(OutboxError::Spawn(_))));
    /// # }
    /// ```
    pub fn spawn(self) -> Result<AsyncRelayHandle, OutboxError> {
        if self.handlers.is_empty() {
            return Err(OutboxError::NoHandlers);
        }
        if let Some(bad) = self.handlers.keys().find(|q| !valid_queue(q)) {
            return Err(OutboxError::InvalidQueue(bad.clone()));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            OutboxError::Spawn(std::io::Error::other(format!(
                "an AsyncRelay runs on the current tokio runtime: {e}"
            )))
        })?;
        let name = self.name.unwrap_or_else(default_name);
        let shared = Arc::new(Shared::new(self.handlers.keys()));
        let worker = Arc::new(Worker {
            queues_json: queues_json(self.handlers.keys()),
            pool: self.pool,
            handlers: self.handlers,
            name: name.clone(),
            nonce: fastrand::u64(..),
            batch_size: self.batch_size,
            lease_ms: self.lease.as_millis().min(i64::MAX as u128) as i64,
            poll_interval: self.poll_interval,
            backoff: self.backoff,
            unknown_check: self.unknown_check,
            shared: shared.clone(),
        });
        let tasks = (0..self.concurrency)
            .map(|n| runtime.spawn(worker.clone().run(n as u64)))
            .collect();
        #[allow(unused_mut)] // mutated with `outbox-listen` only
        let mut handle = AsyncRelayHandle {
            name,
            shared,
            tasks,
            listener: None,
        };
        #[cfg(feature = "outbox-listen")]
        if let Some(url) = self.listen {
            let s = handle.shared.clone();
            let relay = handle.name.clone();
            let stopping = move || s.stopping();
            match std::thread::Builder::new()
                .name(format!("{}-listen", handle.name))
                .spawn(move || super::listen::run(&url, &relay, stopping))
            {
                Ok(t) => handle.listener = Some(t),
                // Dropping the handle stops the tasks: they release what they claimed.
                Err(e) => return Err(OutboxError::Spawn(e)),
            }
        }
        log::info!(target: "diesel_transaction_signals", "outbox async relay {} started",
            handle.name);
        Ok(handle)
    }
}

/// A running async relay. [`shutdown`](Self::shutdown) stops it gracefully: each worker task
/// finishes the handler it is awaiting, releases the rest of its claimed batch for others, and
/// ends. Dropping the handle asks the tasks to stop the same way without waiting for them.
///
/// ```
/// # #[cfg(all(feature = "sqlite", feature = "deadpool"))] {
/// use diesel::SqliteConnection;
/// use diesel_async::pooled_connection::deadpool::Pool;
/// use diesel_async::pooled_connection::AsyncDieselConnectionManager;
/// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
/// use diesel_migrations::MigrationHarness;
/// use diesel_transaction_signals::outbox::{self, AsyncRelay, Job};
/// use diesel_transaction_signals::SignalConnection;
/// use diesel::Connection;
///
/// let dir = tempfile::tempdir().unwrap();
/// let url = dir.path().join("app.db").to_string_lossy().into_owned();
/// let mut conn = SignalConnection::<SqliteConnection>::establish(&url).unwrap();
/// conn.run_pending_migrations(outbox::migrations::SQLITE).unwrap();
///
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// type Conn = SyncConnectionWrapper<SqliteConnection>;
/// let pool = Pool::builder(AsyncDieselConnectionManager::<Conn>::new(&url)).build().unwrap();
/// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
/// let relay = AsyncRelay::builder(pool)
///     .handler("welcome_email", move |job: Job| {
///         let tx = tx.clone();
///         async move {
///             tx.send(job.payload::<i64>()?)?;
///             Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
///         }
///     })
///     .spawn()
///     .unwrap();
///
/// conn.transaction(|c| c.defer_durable("welcome_email", &42_i64)).unwrap();
/// assert_eq!(rx.recv().await, Some(42));
/// let stats = relay.shutdown().await;
/// assert_eq!(stats.delivered, 1);
/// # });
/// # }
/// ```
pub struct AsyncRelayHandle {
    name: String,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    listener: Option<std::thread::JoinHandle<()>>,
}

impl fmt::Debug for AsyncRelayHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncRelayHandle")
            .field("name", &self.name)
            .field("stats", &self.stats())
            .finish()
    }
}

impl AsyncRelayHandle {
    /// The relay's name.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::AsyncRelayHandle;
    /// fn name(r: &AsyncRelayHandle) -> &str { r.name() }
    /// # let _ = name;
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The relay's counters so far.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::AsyncRelayHandle;
    /// fn delivered(r: &AsyncRelayHandle) -> u64 { r.stats().delivered }
    /// # let _ = delivered;
    /// ```
    pub fn stats(&self) -> RelayStats {
        self.shared.stats()
    }

    /// The counters of each queue this relay handles, as
    /// [`RelayHandle::queue_stats`](super::RelayHandle::queue_stats).
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::AsyncRelayHandle;
    /// fn runs(r: &AsyncRelayHandle, queue: &str) -> u64 {
    ///     r.queue_stats().get(queue).map_or(0, |q| q.run)
    /// }
    /// # let _ = runs;
    /// ```
    pub fn queue_stats(&self) -> BTreeMap<String, QueueStats> {
        self.shared.queue_stats()
    }

    /// Asks the workers to stop without waiting: each finishes the handler it is awaiting and
    /// releases the rest of its batch. [`shutdown`](Self::shutdown) then waits for them.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::AsyncRelayHandle;
    /// fn stop_soon(r: &AsyncRelayHandle) { r.request_stop() }
    /// # let _ = stop_soon;
    /// ```
    pub fn request_stop(&self) {
        self.shared.stop();
        wake();
    }

    /// Stops gracefully: waits until every worker task has finished its handler and released
    /// its unstarted claimed rows (and the listener thread has ended); returns the final
    /// counters.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::AsyncRelayHandle;
    /// async fn stop(r: AsyncRelayHandle) -> u64 { r.shutdown().await.delivered }
    /// # let _ = stop;
    /// ```
    pub async fn shutdown(mut self) -> RelayStats {
        self.request_stop();
        for task in std::mem::take(&mut self.tasks) {
            if let Err(e) = task.await {
                log::error!(target: "diesel_transaction_signals",
                    "outbox async relay {}: a worker task ended abnormally: {e}", self.name);
            }
        }
        if let Some(listener) = self.listener.take() {
            // It notices the stop within its tick; join it off the runtime's threads.
            let _ = tokio::task::spawn_blocking(move || listener.join()).await;
        }
        self.stats()
    }
}

impl Drop for AsyncRelayHandle {
    fn drop(&mut self) {
        self.request_stop();
    }
}

/// A handler's future with its panics caught, as the thread relay's `catch_unwind`.
struct CatchUnwind(HandlerFuture);

impl Future for CatchUnwind {
    type Output = Result<(), String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match catch_unwind(AssertUnwindSafe(|| self.0.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
            Ok(Poll::Ready(Err(e))) => Poll::Ready(Err(e.to_string())),
            Err(panic) => Poll::Ready(Err(format!("handler panicked: {}", panic_message(&*panic)))),
        }
    }
}

struct Worker<P: AsyncRelayPool> {
    pool: P,
    handlers: HashMap<String, Handler>,
    name: String,
    /// Drawn at each `spawn()`: with the worker's index it makes its lease owner unique.
    nonce: u64,
    queues_json: String,
    batch_size: i64,
    lease_ms: i64,
    poll_interval: Duration,
    backoff: Backoff,
    unknown_check: Duration,
    shared: Arc<Shared>,
}

impl<P: AsyncRelayPool> Worker<P> {
    async fn run(self: Arc<Self>, n: u64) {
        let mut rng = fastrand::Rng::new();
        let owner = lease_owner(&self.name, n, self.nonce);
        let mut last_unknown_check: Option<Instant> = None;
        while !self.shared.stopping() {
            let seen = bell_generation();
            let mut conn = match self.pool.checkout().await {
                Ok(conn) => conn,
                Err(e) => {
                    log::warn!(target: "diesel_transaction_signals",
                        "outbox relay {}: no connection: {e}", self.name);
                    wait_for_bell_async(seen, self.poll_interval).await;
                    continue;
                }
            };
            let claimed = conn
                .outbox_claim(&owner, &self.queues_json, self.batch_size, self.lease_ms)
                .await;
            let mut rows = match claimed {
                Ok(rows) => rows,
                Err(e) => {
                    claim_failed(&self.name, &e);
                    drop(conn);
                    wait_for_bell_async(seen, self.poll_interval).await;
                    continue;
                }
            };
            if rows.is_empty() {
                if n == 0 && last_unknown_check.is_none_or(|t| t.elapsed() >= self.unknown_check) {
                    last_unknown_check = Some(Instant::now());
                    let found = conn.outbox_unknown_queues(&self.queues_json).await;
                    self.shared.unknown_queues(&self.name, found);
                }
                drop(conn);
                wait_for_bell_async(seen, self.poll_interval).await;
                continue;
            }
            // RETURNING gives no order: run the batch in due order, oldest first.
            rows.sort_unstable_by_key(|r| (r.run_at, r.id));
            self.run_batch(&mut *conn, &owner, rows, &mut rng).await;
        }
    }

    async fn run_batch(
        &self,
        conn: &mut P::Connection,
        owner: &str,
        rows: Vec<ClaimedRow>,
        rng: &mut fastrand::Rng,
    ) {
        let mut done = Vec::with_capacity(rows.len());
        let mut rows = rows.into_iter();
        while let Some(row) = rows.next() {
            if self.shared.stopping() {
                let rest: Vec<i64> = std::iter::once(row.id)
                    .chain(rows.by_ref().map(|r| r.id))
                    .collect();
                let released = conn.outbox_release(owner, &rest).await;
                self.shared.released(&self.name, rest.len(), released);
                break;
            }
            let job = Job::from_row(row);
            let Some(handler) = self.handlers.get(job.queue()) else {
                // The claim only takes queues with a handler; keep the row if one slips by.
                let _ = conn.outbox_release(owner, &[job.id().get()]).await;
                continue;
            };
            self.shared.started();
            let started = Instant::now();
            let outcome = match catch_unwind(AssertUnwindSafe(|| handler(job.clone()))) {
                Ok(future) => CatchUnwind(future).await,
                Err(panic) => Err(format!("handler panicked: {}", panic_message(&*panic))),
            };
            self.shared
                .ran(job.queue(), started.elapsed(), outcome.is_err());
            match outcome {
                Ok(()) => done.push((job.id().get(), job.queue().to_owned())),
                Err(error) => {
                    let retry = Retry::after(&self.backoff, &job, rng.f64());
                    let recorded = conn
                        .outbox_fail(owner, job.id().get(), &error, retry.delay_ms, retry.dead)
                        .await;
                    self.shared
                        .failed(&self.name, &job, &error, &retry, recorded);
                }
            }
        }
        if done.is_empty() {
            return;
        }
        let ids: Vec<i64> = done.iter().map(|(id, _)| *id).collect();
        let deleted = conn.outbox_complete(owner, &ids).await;
        self.shared.completed(&self.name, &done, deleted);
    }
}
