//! [`AsyncSignalConnection`]: the async connection wrapper (feature `async`) and its hook
//! registration API. It is the ledger's second driver: `driver.rs` runs the same transitions
//! as the sync manager with diesel-async's I/O, `watch.rs` notes what statements tell, and
//! `forward.rs` makes it a drop-in for diesel-async's traits.

mod driver;
mod forward;
#[cfg(any(feature = "deadpool", feature = "bb8"))]
pub mod pool;
mod watch;

use std::fmt;
use std::future::Future;
use std::panic::Location;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use diesel::result::QueryResult;
use diesel_async::AsyncConnection;

pub use driver::AsyncSignalTransactionManager;
pub use forward::AsyncFunc;
pub use watch::Watched;

use crate::connection::Bookkeeping;
use crate::hook::{Hook, HookOutput};
use crate::outcome::Outcome;
use crate::pre_commit::PreCommitConnection;
use crate::signals;
use crate::testing::CapturedHooks;
use watch::{Backend, Watch};

/// A boxed future, as `before_commit` work returns it.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Work registered with [`AsyncSignalConnection::before_commit`], as stored.
type AsyncWork<C> = Box<
    dyn for<'a> FnOnce(&'a mut AsyncSignalConnection<C>) -> BoxFuture<'a, QueryResult<()>>
        + Send
        + 'static,
>;

/// Futures registered with `on_commit_async` whose transaction committed, in order.
type AfterCommit = Arc<
    Mutex<
        Vec<(
            BoxFuture<'static, Option<String>>,
            &'static Location<'static>,
        )>,
    >,
>;

/// An async Diesel connection (diesel-async) that runs hooks when its transactions commit or
/// roll back: [`SignalConnection`](crate::SignalConnection)'s promises for async services.
///
/// It wraps `AsyncPgConnection`, `AsyncMysqlConnection` or
/// `SyncConnectionWrapper<SqliteConnection>` and implements diesel-async's
/// `AsyncConnection`, `AsyncConnectionCore`, `SimpleAsyncConnection` and (with a pool feature)
/// `PoolableConnection`, so it replaces the wrapped type wherever it is named. Hooks have the
/// same names and meaning as on `SignalConnection`:
///
/// - [`on_commit`](Self::on_commit) runs once, right after the outermost COMMIT succeeded,
///   before `transaction(..).await` returns; [`on_commit_async`](Self::on_commit_async) awaits
///   a future there, in registration order;
/// - [`on_rollback`](Self::on_rollback) runs once when the work it guarded is undone;
/// - [`on_complete`](Self::on_complete) runs once with the [`Outcome`];
/// - [`defer!`](crate::defer!) and [`defer()`](crate::defer()) find the innermost transaction
///   open **in the current tokio task** (across `.await` points and worker threads); a spawned
///   task does not inherit it.
///
/// A `transaction` future dropped inside its closure or while its `before_commit` work runs (a
/// timeout, a client that hung up) never runs a commit hook: the connection rolls the work
/// back at its next operation, and its rollback hooks run then, once; a pool discards it
/// instead (it reports itself broken while a transaction is open). Dropped while COMMIT is in flight, its hooks settle
/// [`Outcome::Unknown`].
///
/// Through a pool object, call this type's own `transaction` (`(*conn).transaction(..)`): the
/// pool object's `transaction` is diesel-async's generic one, which calls only the transaction
/// manager, so hooks work there but a dropped future cannot be seen until the pool discards
/// the connection at its next checkout.
///
/// # Example
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::prelude::*;
/// use diesel::sqlite::SqliteConnection;
/// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
/// use diesel_async::{AsyncConnection, RunQueryDsl};
/// use diesel_transaction_signals::AsyncSignalConnection;
/// use std::sync::mpsc;
///
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// let mut conn =
///     AsyncSignalConnection::<SyncConnectionWrapper<SqliteConnection>>::establish(":memory:")
///         .await?;
/// let (tx, rx) = mpsc::channel();
/// conn.transaction(async |conn| {
///     diesel::sql_query("CREATE TABLE users (id INTEGER PRIMARY KEY)").execute(conn).await?;
///     conn.on_commit(move || tx.send("send the welcome e-mail").unwrap());
///     QueryResult::Ok(())
/// })
/// .await?;
/// assert_eq!(rx.try_recv(), Ok("send the welcome e-mail"));
/// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
/// # }).unwrap();
/// # }
/// ```
pub struct AsyncSignalConnection<C> {
    // Declared first so it is dropped first: closing the connection rolls back an open
    // transaction, and only then do the rollback hooks in `book` run.
    pub(crate) inner: C,
    pub(crate) book: Bookkeeping,
    pub(crate) watch: Watch,
    pub(crate) after_commit: AfterCommit,
    /// `on_commit_async` was called since the last outermost COMMIT: only then is the queue
    /// looked at after one.
    pub(crate) awaits_after_commit: bool,
    /// The scopes `transaction` levels borrow and give back (their boxes, their buffers'
    /// capacity, their inbox handles), one per nesting level reached, so a transaction
    /// allocates nothing and `defer` in the steady state nothing but the hook's box. A scope
    /// dropped with its future is not given back (the next level at that depth boxes anew).
    // Boxed on purpose: the box is what moves in and out of the task-local at every poll.
    #[allow(clippy::vec_box)]
    pub(crate) scope_spare: Vec<Box<crate::registry::task::Scope>>,
}

impl<C: AsyncConnection + 'static> AsyncSignalConnection<C> {
    /// Wraps an established connection. Open no transaction on `inner` before wrapping it: the
    /// wrapper would not know about it.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::{Connection, SqliteConnection};
    /// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// use diesel_transaction_signals::AsyncSignalConnection;
    ///
    /// let raw: SyncConnectionWrapper<SqliteConnection> = SyncConnectionWrapper::new(SqliteConnection::establish(":memory:").unwrap());
    /// let conn = AsyncSignalConnection::new(raw);
    /// assert_eq!(conn.transaction_depth(), 0);
    /// # }
    /// ```
    pub fn new(inner: C) -> Self {
        let book = Bookkeeping::new(signals::backend_name::<C::Backend>());
        let watch = Watch::new(Backend::from_name(book.backend));
        AsyncSignalConnection {
            inner,
            book,
            watch,
            after_commit: AfterCommit::default(),
            awaits_after_commit: false,
            scope_spare: Default::default(),
        }
    }

    /// Names this connection (`"primary"`, `"replica"`); the alias appears in every signal
    /// event and log line about it.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::{Connection, SqliteConnection};
    /// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// use diesel_transaction_signals::AsyncSignalConnection;
    ///
    /// let raw: SyncConnectionWrapper<SqliteConnection> = SyncConnectionWrapper::new(SqliteConnection::establish(":memory:").unwrap());
    /// let conn = AsyncSignalConnection::new(raw).with_alias("primary");
    /// assert_eq!(conn.alias(), Some("primary"));
    /// # }
    /// ```
    pub fn with_alias(mut self, alias: impl Into<Arc<str>>) -> Self {
        self.set_alias(alias);
        self
    }

    /// Sets or replaces the alias; see [`with_alias`](Self::with_alias).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::{Connection, SqliteConnection};
    /// # use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// # use diesel_transaction_signals::AsyncSignalConnection;
    /// # let raw: SyncConnectionWrapper<SqliteConnection> = SyncConnectionWrapper::new(SqliteConnection::establish(":memory:").unwrap());
    /// let mut conn = AsyncSignalConnection::new(raw);
    /// conn.set_alias("replica");
    /// assert_eq!(conn.alias(), Some("replica"));
    /// # }
    /// ```
    pub fn set_alias(&mut self, alias: impl Into<Arc<str>>) {
        self.book.label.alias = Some(alias.into());
    }

    /// The alias, if one was set.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::{Connection, SqliteConnection};
    /// # use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// # use diesel_transaction_signals::AsyncSignalConnection;
    /// # let raw: SyncConnectionWrapper<SqliteConnection> = SyncConnectionWrapper::new(SqliteConnection::establish(":memory:").unwrap());
    /// assert_eq!(AsyncSignalConnection::new(raw).alias(), None);
    /// # }
    /// ```
    pub fn alias(&self) -> Option<&str> {
        self.book.label.alias.as_deref()
    }

    /// The process-unique id of this connection, as signal events and logs name it.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::{Connection, SqliteConnection};
    /// # use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// # use diesel_transaction_signals::AsyncSignalConnection;
    /// type Sqlite = SyncConnectionWrapper<SqliteConnection>;
    /// let a = AsyncSignalConnection::new(Sqlite::new(SqliteConnection::establish(":memory:").unwrap()));
    /// let b = AsyncSignalConnection::new(Sqlite::new(SqliteConnection::establish(":memory:").unwrap()));
    /// assert_ne!(a.id(), b.id());
    /// # }
    /// ```
    pub fn id(&self) -> crate::ConnectionId {
        self.book.label.id
    }

    /// The wrapped connection. Statements sent through it bypass the wrapper: it cannot note
    /// their failures.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::{Connection, SqliteConnection};
    /// # use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// # use diesel_transaction_signals::AsyncSignalConnection;
    /// # let raw: SyncConnectionWrapper<SqliteConnection> = SyncConnectionWrapper::new(SqliteConnection::establish(":memory:").unwrap());
    /// let conn = AsyncSignalConnection::new(raw);
    /// let _inner: &SyncConnectionWrapper<SqliteConnection> = conn.inner();
    /// # }
    /// ```
    pub fn inner(&self) -> &C {
        &self.inner
    }

    /// The wrapped connection, mutably; transactions opened through it bypass the hooks.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::{Connection, SqliteConnection};
    /// # use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// # use diesel_transaction_signals::AsyncSignalConnection;
    /// # let raw: SyncConnectionWrapper<SqliteConnection> = SyncConnectionWrapper::new(SqliteConnection::establish(":memory:").unwrap());
    /// let mut conn = AsyncSignalConnection::new(raw);
    /// let _inner: &mut SyncConnectionWrapper<SqliteConnection> = conn.inner_mut();
    /// # }
    /// ```
    pub fn inner_mut(&mut self) -> &mut C {
        // Anything may be done with it: the driver reads the inner status again next time.
        self.watch.forget();
        &mut self.inner
    }

    /// Unwraps the connection. Hooks of a transaction still open settle as the connection's
    /// drop would settle them: rolled back.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::{Connection, SqliteConnection};
    /// # use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// # use diesel_transaction_signals::AsyncSignalConnection;
    /// # let raw: SyncConnectionWrapper<SqliteConnection> = SyncConnectionWrapper::new(SqliteConnection::establish(":memory:").unwrap());
    /// let conn = AsyncSignalConnection::new(raw);
    /// let _raw: SyncConnectionWrapper<SqliteConnection> = conn.into_inner();
    /// # }
    /// ```
    pub fn into_inner(self) -> C {
        let AsyncSignalConnection { inner, book, .. } = self;
        drop(book);
        inner
    }

    /// Transaction levels open, as the caller sees them (1 = a transaction, more = savepoints).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::{Connection, QueryResult, SqliteConnection};
    /// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// use diesel_async::AsyncConnection;
    /// use diesel_transaction_signals::AsyncSignalConnection;
    ///
    /// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
    /// let raw: SyncConnectionWrapper<SqliteConnection> = SyncConnectionWrapper::new(SqliteConnection::establish(":memory:").unwrap());
    /// let mut conn = AsyncSignalConnection::new(raw);
    /// conn.transaction(async |c| {
    ///     assert_eq!(c.transaction_depth(), 1);
    ///     QueryResult::Ok(())
    /// }).await.unwrap();
    /// assert_eq!(conn.transaction_depth(), 0);
    /// # });
    /// # }
    /// ```
    pub fn transaction_depth(&self) -> usize {
        self.book.ledger.depth()
    }

    /// Runs `f` once, right after the outermost transaction commits (before
    /// `transaction(..).await` returns). Outside a transaction it runs at once. `f` may return
    /// `()` or a `Result`, whose `Err` is reported.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::{Connection, QueryResult, SqliteConnection};
    /// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// use diesel_async::AsyncConnection;
    /// use diesel_transaction_signals::AsyncSignalConnection;
    /// use std::sync::mpsc;
    ///
    /// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
    /// let raw: SyncConnectionWrapper<SqliteConnection> = SyncConnectionWrapper::new(SqliteConnection::establish(":memory:").unwrap());
    /// let mut conn = AsyncSignalConnection::new(raw);
    /// let (tx, rx) = mpsc::channel();
    /// let _ = conn.transaction(async |c| {
    ///     c.on_commit(move || tx.send(()).unwrap());
    ///     Err::<(), _>(diesel::result::Error::RollbackTransaction)
    /// }).await;
    /// assert!(rx.try_recv().is_err(), "rolled back: the hook never runs");
    /// # });
    /// # }
    /// ```
    #[track_caller]
    pub fn on_commit<F, R>(&mut self, f: F)
    where
        F: FnOnce() -> R + Send + 'static,
        R: HookOutput,
    {
        self.register(Hook::commit(f, Location::caller()));
    }

    /// Runs `f` once when the work it guards is undone: the level it was registered in (or an
    /// enclosing one) rolls back. Outside a transaction it never runs.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::{Connection, QueryResult, SqliteConnection};
    /// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// use diesel_async::AsyncConnection;
    /// use diesel_transaction_signals::AsyncSignalConnection;
    /// use std::sync::mpsc;
    ///
    /// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
    /// let raw: SyncConnectionWrapper<SqliteConnection> = SyncConnectionWrapper::new(SqliteConnection::establish(":memory:").unwrap());
    /// let mut conn = AsyncSignalConnection::new(raw);
    /// let (tx, rx) = mpsc::channel();
    /// let _ = conn.transaction(async |c| {
    ///     c.on_rollback(move || tx.send("undone").unwrap());
    ///     Err::<(), _>(diesel::result::Error::RollbackTransaction)
    /// }).await;
    /// assert_eq!(rx.try_recv(), Ok("undone"));
    /// # });
    /// # }
    /// ```
    #[track_caller]
    pub fn on_rollback<F, R>(&mut self, f: F)
    where
        F: FnOnce() -> R + Send + 'static,
        R: HookOutput,
    {
        self.register(Hook::rollback(f, Location::caller()));
    }

    /// Runs `f` once with the outcome of the work it was registered in: `Committed`,
    /// `RolledBack`, or `Unknown` (the connection was lost while COMMIT was in flight).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::{Connection, QueryResult, SqliteConnection};
    /// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// use diesel_async::AsyncConnection;
    /// use diesel_transaction_signals::{AsyncSignalConnection, Outcome};
    /// use std::sync::mpsc;
    ///
    /// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
    /// let raw: SyncConnectionWrapper<SqliteConnection> = SyncConnectionWrapper::new(SqliteConnection::establish(":memory:").unwrap());
    /// let mut conn = AsyncSignalConnection::new(raw);
    /// let (tx, rx) = mpsc::channel();
    /// conn.transaction(async |c| {
    ///     c.on_complete(move |outcome| tx.send(outcome).unwrap());
    ///     QueryResult::Ok(())
    /// }).await.unwrap();
    /// assert_eq!(rx.try_recv(), Ok(Outcome::Committed));
    /// # });
    /// # }
    /// ```
    #[track_caller]
    pub fn on_complete<F, R>(&mut self, f: F)
    where
        F: FnOnce(Outcome) -> R + Send + 'static,
        R: HookOutput,
    {
        self.register(Hook::complete(f, Location::caller()));
    }

    /// Awaits `fut` after the outermost COMMIT succeeded, in registration order with the other
    /// `on_commit_async` futures, before `transaction(..).await` returns: for work the caller
    /// must see done when the transaction returns (invalidating a remote cache so the caller
    /// reads its own write). The plain `on_commit` hooks run first, right after COMMIT.
    ///
    /// If the transaction rolls back, `fut` is dropped unpolled. If the caller's future is
    /// dropped after COMMIT while these futures are pending, the ones not yet finished are
    /// spawned onto the current tokio runtime (a log line says so) so that committed work still
    /// gets its follow-up; without a runtime they are dropped with a warning. A panic or an
    /// `Err` output is reported like a sync hook's. Long work belongs in a spawned task: the
    /// caller waits for these futures.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::{Connection, QueryResult, SqliteConnection};
    /// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// use diesel_async::AsyncConnection;
    /// use diesel_transaction_signals::AsyncSignalConnection;
    /// use std::sync::{Arc, Mutex};
    ///
    /// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
    /// let raw: SyncConnectionWrapper<SqliteConnection> = SyncConnectionWrapper::new(SqliteConnection::establish(":memory:").unwrap());
    /// let mut conn = AsyncSignalConnection::new(raw);
    /// let cache = Arc::new(Mutex::new(vec!["stale"]));
    /// let c2 = Arc::clone(&cache);
    /// conn.transaction(async |c| {
    ///     c.on_commit_async(async move { c2.lock().unwrap().clear() });
    ///     QueryResult::Ok(())
    /// }).await.unwrap();
    /// assert!(cache.lock().unwrap().is_empty(), "done before transaction returned");
    /// # });
    /// # }
    /// ```
    #[track_caller]
    pub fn on_commit_async<F, R>(&mut self, fut: F)
    where
        F: Future<Output = R> + Send + 'static,
        R: HookOutput,
    {
        let location = Location::caller();
        self.awaits_after_commit = true;
        let queue = Arc::clone(&self.after_commit);
        let fut: BoxFuture<'static, Option<String>> =
            Box::pin(async move { fut.await.into_failure() });
        self.register(Hook::commit(
            move || {
                queue
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((fut, location))
            },
            location,
        ));
    }

    /// Registers async work to run inside the outermost transaction just before its COMMIT,
    /// with the connection: it may run queries. An `Err` refuses the commit: the transaction
    /// rolls back (rollback hooks run) and `transaction` returns the error. Work registered in
    /// a savepoint that rolls back is discarded. Returns an error outside a transaction.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::{Connection, QueryResult, SqliteConnection};
    /// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// use diesel_async::{AsyncConnection, RunQueryDsl};
    /// use diesel_transaction_signals::AsyncSignalConnection;
    ///
    /// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
    /// let raw: SyncConnectionWrapper<SqliteConnection> = SyncConnectionWrapper::new(SqliteConnection::establish(":memory:").unwrap());
    /// let mut conn = AsyncSignalConnection::new(raw);
    /// diesel::sql_query("CREATE TABLE audit (note TEXT)").execute(&mut conn).await.unwrap();
    /// conn.transaction(async |c| {
    ///     c.before_commit(|c| Box::pin(async move {
    ///         diesel::sql_query("INSERT INTO audit VALUES ('flushed')").execute(c).await?;
    ///         Ok(())
    ///     }))?;
    ///     QueryResult::Ok(())
    /// }).await.unwrap();
    /// # });
    /// # }
    /// ```
    #[track_caller]
    pub fn before_commit<F>(&mut self, f: F) -> QueryResult<()>
    where
        F: for<'a> FnOnce(&'a mut AsyncSignalConnection<C>) -> BoxFuture<'a, QueryResult<()>>
            + Send
            + 'static,
    {
        let work: AsyncWork<C> = Box::new(f);
        let location = Location::caller();
        self.book.drain_inbox();
        // Stored as pre-commit work of the ledger, so savepoints discard it like any other;
        // the driver's pre-commit phase hands it a slot to put the async work in, then awaits
        // it with the connection.
        let trampoline =
            move |pc: &mut PreCommitConnection<'_>| match pc.downcast::<Option<AsyncWork<C>>>() {
                Some(slot) => {
                    *slot = Some(work);
                    Ok(())
                }
                None => Err(diesel::result::Error::QueryBuilderError(
                    "async before_commit work reached a sync connection".into(),
                )),
            };
        self.book
            .ledger
            .push_pre_commit(Box::new(trampoline), location)
            .map_err(|e| diesel::result::Error::QueryBuilderError(Box::new(e)))
    }

    /// Runs `f` and takes the hooks it registered (directly or with `defer`) in the open
    /// transaction, unrun: for tests inside `begin_test_transaction`, which never commits, as
    /// [`SignalConnection::capture_hooks`](crate::SignalConnection::capture_hooks) does. Returns
    /// `Error::NotInTransaction` outside a transaction.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::{Connection, SqliteConnection};
    /// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// use diesel_async::AsyncConnection;
    /// use diesel_transaction_signals::AsyncSignalConnection;
    /// use std::sync::mpsc;
    ///
    /// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
    /// let raw: SyncConnectionWrapper<SqliteConnection> = SyncConnectionWrapper::new(SqliteConnection::establish(":memory:").unwrap());
    /// let mut conn = AsyncSignalConnection::new(raw);
    /// conn.begin_test_transaction().await.unwrap();
    /// let (tx, rx) = mpsc::channel();
    /// let ((), hooks) = conn
    ///     .capture_hooks(async |c| c.on_commit(move || tx.send("welcome e-mail").unwrap()))
    ///     .await
    ///     .unwrap();
    /// assert_eq!(hooks.len(), 1);
    /// assert!(rx.try_recv().is_err());
    /// hooks.run_as_committed();
    /// assert_eq!(rx.try_recv(), Ok("welcome e-mail"));
    /// # });
    /// # }
    /// ```
    pub async fn capture_hooks<R, F>(&mut self, f: F) -> QueryResult<(R, CapturedHooks)>
    where
        for<'r> F: AsyncFnOnce(&'r mut Self) -> R + AsyncFunc<&'r mut Self, R, Fut: Send> + Send,
        R: Send,
    {
        self.sync();
        let depth = self.book.ledger.depth();
        if depth == 0 {
            return Err(diesel::result::Error::NotInTransaction);
        }
        let start = self.book.ledger.hooks.len();
        let value = f(&mut *self).await;
        self.sync();
        let hooks = if self.book.ledger.depth() < depth {
            Vec::new()
        } else {
            self.book.ledger.take_since(depth, start)
        };
        Ok((value, CapturedHooks::new(hooks, self.book.label.clone())))
    }

    fn register(&mut self, hook: Hook) {
        self.book.drain_inbox();
        self.book.register(hook);
    }
}

impl PreCommitConnection<'_> {
    /// Hands async work to the pre-commit phase of an [`AsyncSignalConnection<C>`]: if this is
    /// that phase, `f` is awaited with the connection as soon as the current pre-commit work
    /// returns (inside the transaction, before COMMIT; its `Err` refuses the commit), and this
    /// returns `true`. On any other connection it returns `false` and drops `f`. This is how
    /// work deferred without a connection handle (`defer_before_commit`) runs queries on an
    /// async connection.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::{Connection, QueryResult, SqliteConnection};
    /// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// use diesel_async::{AsyncConnection, RunQueryDsl};
    /// use diesel_transaction_signals::{defer_before_commit, AsyncSignalConnection};
    ///
    /// type Raw = SyncConnectionWrapper<SqliteConnection>;
    /// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
    /// let mut conn = AsyncSignalConnection::<Raw>::establish(":memory:").await.unwrap();
    /// diesel::sql_query("CREATE TABLE audit (note TEXT)").execute(&mut conn).await.unwrap();
    /// conn.transaction(async |_| {
    ///     defer_before_commit(|pc| {
    ///         assert!(pc.run_async::<Raw, _>(|c| Box::pin(async move {
    ///             diesel::sql_query("INSERT INTO audit VALUES ('flushed')").execute(c).await?;
    ///             Ok(())
    ///         })));
    ///         Ok(())
    ///     })
    ///     .unwrap();
    ///     QueryResult::Ok(())
    /// })
    /// .await
    /// .unwrap();
    /// # });
    /// # }
    /// ```
    pub fn run_async<C, F>(&mut self, f: F) -> bool
    where
        C: AsyncConnection + 'static,
        F: for<'a> FnOnce(&'a mut AsyncSignalConnection<C>) -> BoxFuture<'a, QueryResult<()>>
            + Send
            + 'static,
    {
        match self.downcast::<Option<AsyncWork<C>>>() {
            Some(slot) => {
                *slot = Some(Box::new(f));
                true
            }
            None => false,
        }
    }
}

impl<C> fmt::Debug for AsyncSignalConnection<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncSignalConnection")
            .field("id", &self.book.label.id)
            .field("alias", &self.book.label.alias)
            .field("backend", &self.book.backend)
            .field("depth", &self.book.ledger.depth())
            .finish_non_exhaustive()
    }
}
