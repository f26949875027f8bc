//! [`SignalConnection`]: the connection wrapper and its hook registration API. Its level
//! bookkeeping is in `bookkeeping.rs`, its transaction manager (the ledger's sync driver) in
//! `manager.rs`, what it learns of transactions the server ended in `server.rs`, and the
//! Diesel traits that make it a drop-in replacement in `forward.rs`.

mod bookkeeping;
mod forward;
pub(crate) mod manager;
pub(crate) mod server;

use std::fmt;
use std::panic::Location;
use std::sync::Arc;

use diesel::connection::Connection;
use diesel::result::{Error, QueryResult};

pub(crate) use bookkeeping::Bookkeeping;
pub use forward::SignalCursor;
pub use manager::SignalTransactionManager;

use crate::hook::Hook;
use crate::outcome::Outcome;
use crate::pre_commit::PreCommitConnection;
use crate::signals;
use crate::testing::CapturedHooks;

/// A Diesel connection that runs hooks when its transactions commit or roll back.
///
/// `SignalConnection<C>` wraps any connection `C` (`SqliteConnection`, `PgConnection`,
/// `MysqlConnection`) and implements every Diesel trait `C` does that a user's code, migrations
/// and pools need, so it replaces `C` wherever `C` is named. Its transaction manager tracks the
/// nesting of `transaction` calls (savepoints) and settles hooks when a level ends:
///
/// - [`on_commit`](Self::on_commit) hooks run once, after the outermost COMMIT succeeded;
/// - [`on_rollback`](Self::on_rollback) hooks run once, when the work they guarded is undone;
/// - [`on_complete`](Self::on_complete) hooks run once with the [`Outcome`].
///
/// A savepoint that rolls back takes its commit hooks with it and runs its rollback hooks at
/// once; the enclosing transaction goes on. A closure that panics has its level rolled back
/// before the panic continues. Hooks that panic or return `Err` are caught and reported
/// ([`set_failure_handler`](crate::set_failure_handler)).
///
/// [`inner`](Self::inner) and [`inner_mut`](Self::inner_mut) reach the wrapped connection for
/// backend-specific methods (SQLite functions, PostgreSQL `COPY TO`); transactions opened
/// through them bypass the hooks.
///
/// # Example
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::prelude::*;
/// use diesel_transaction_signals::SignalConnection;
/// use std::sync::mpsc;
///
/// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:")?;
/// let (tx, rx) = mpsc::channel();
/// conn.transaction(|conn| {
///     diesel::sql_query("CREATE TABLE users (id INTEGER PRIMARY KEY)").execute(conn)?;
///     let tx = tx.clone();
///     conn.on_commit(move || tx.send("send the welcome e-mail").unwrap());
///     assert!(rx.try_recv().is_err(), "nothing runs before COMMIT");
///     QueryResult::Ok(())
/// })?;
/// assert_eq!(rx.try_recv(), Ok("send the welcome e-mail"));
/// # }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SignalConnection<C> {
    // Declared first so it is dropped first: closing the connection rolls back an open
    // transaction, and only then do the rollback hooks in `book` run.
    pub(crate) inner: C,
    pub(crate) book: Bookkeeping,
}

impl<C: Connection + 'static> SignalConnection<C> {
    /// Wraps an established connection. Open no transaction on `inner` before wrapping it: the
    /// wrapper would not know about it.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// let raw = SqliteConnection::establish(":memory:").unwrap();
    /// let mut conn = SignalConnection::new(raw);
    /// assert_eq!(conn.transaction_depth(), 0);
    /// # }
    /// ```
    pub fn new(inner: C) -> Self {
        SignalConnection {
            inner,
            book: Bookkeeping::new(signals::backend_name::<C::Backend>()),
        }
    }

    /// Names this connection (`"primary"`, `"replica"`, `"audit"`), as Django's `using=`
    /// does; the alias appears in every signal event and every log line about it.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// let conn = SignalConnection::<SqliteConnection>::establish(":memory:")
    ///     .unwrap()
    ///     .with_alias("primary");
    /// assert_eq!(conn.alias(), Some("primary"));
    /// # }
    /// ```
    pub fn with_alias(mut self, alias: impl Into<Arc<str>>) -> Self {
        self.set_alias(alias);
        self
    }

    /// Sets or replaces the connection's alias; see [`with_alias`](Self::with_alias).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::prelude::*;
    /// # use diesel_transaction_signals::SignalConnection;
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// conn.set_alias("audit");
    /// assert_eq!(conn.alias(), Some("audit"));
    /// # }
    /// ```
    pub fn set_alias(&mut self, alias: impl Into<Arc<str>>) {
        self.book.label.alias = Some(alias.into());
    }

    /// The connection's alias, if it has one.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::prelude::*;
    /// # use diesel_transaction_signals::SignalConnection;
    /// let conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// assert_eq!(conn.alias(), None);
    /// # }
    /// ```
    pub fn alias(&self) -> Option<&str> {
        self.book.label.alias.as_deref()
    }

    /// Unwraps the connection.
    ///
    /// Called inside a transaction, the wrapper can no longer observe its outcome: `on_complete`
    /// hooks receive [`Outcome::Unknown`] and commit and rollback hooks are dropped unrun, with
    /// an error logged for each (inside a test transaction they are discarded quietly).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// let conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// let mut raw: SqliteConnection = conn.into_inner();
    /// diesel::sql_query("SELECT 1").execute(&mut raw).unwrap();
    /// # }
    /// ```
    pub fn into_inner(self) -> C {
        let SignalConnection { inner, mut book } = self;
        if !book.ledger.is_test_transaction() && book.ledger.depth() > 0 {
            book.close(
                0,
                Outcome::Unknown,
                "the connection was unwrapped with into_inner() inside a transaction",
            );
        }
        // A test transaction's hooks are discarded when `book` drops.
        drop(book);
        inner
    }

    /// The wrapped connection.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// let conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// let _raw: &SqliteConnection = conn.inner();
    /// # }
    /// ```
    pub fn inner(&self) -> &C {
        &self.inner
    }

    /// The wrapped connection, for backend-specific methods (registering SQLite functions,
    /// PostgreSQL `COPY TO`).
    ///
    /// **This bypasses the hooks**: a transaction opened through it (`inner_mut().transaction(..)`,
    /// raw `BEGIN`) is unknown to the wrapper, so `on_commit` inside it runs at once. Queries
    /// run through it inside a wrapper transaction are part of that transaction as usual.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// diesel::sql_query("SELECT 1").execute(conn.inner_mut()).unwrap();
    /// # }
    /// ```
    pub fn inner_mut(&mut self) -> &mut C {
        &mut self.inner
    }

    /// This connection's process-unique id.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::prelude::*;
    /// # use diesel_transaction_signals::SignalConnection;
    /// let conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// println!("connection {}", conn.id());
    /// # }
    /// ```
    pub fn id(&self) -> crate::ConnectionId {
        self.book.label.id
    }

    /// How many transaction levels are open: 0 outside a transaction, 1 inside the outermost,
    /// one more per savepoint.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// conn.transaction(|c| {
    ///     assert_eq!(c.transaction_depth(), 1);
    ///     c.transaction(|c| {
    ///         assert_eq!(c.transaction_depth(), 2);
    ///         QueryResult::Ok(())
    ///     })
    /// }).unwrap();
    /// assert_eq!(conn.transaction_depth(), 0);
    /// # }
    /// ```
    pub fn transaction_depth(&mut self) -> usize {
        self.sync();
        self.book.ledger.depth()
    }

    /// Returns the error a statement sent through this connection now would get, or `Ok`:
    /// [`TransactionAborted`](crate::TransactionAborted) while the open transaction is one the
    /// database ended on its own (a deadlock, a statement that rolled it all back) and the
    /// caller has not ended it yet. Code that sends statements through
    /// [`inner_mut`](Self::inner_mut) calls it first to keep the same promise: nothing runs
    /// outside the transaction the caller believes open.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::{SignalConnection, TransactionAborted};
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:")?;
    /// diesel::sql_query("CREATE TABLE t (id INTEGER PRIMARY KEY)").execute(&mut conn)?;
    /// diesel::sql_query("INSERT INTO t VALUES (1)").execute(&mut conn)?;
    /// let result = conn.transaction(|conn| {
    ///     // Fails, and SQLite rolls the whole transaction back.
    ///     let _ = diesel::sql_query("INSERT OR ROLLBACK INTO t VALUES (1)").execute(conn);
    ///     assert!(TransactionAborted::is(&conn.check_transaction().unwrap_err()));
    ///     QueryResult::Ok(())
    /// });
    /// assert!(TransactionAborted::is(&result.unwrap_err()));
    /// assert!(conn.check_transaction().is_ok());
    /// # }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn check_transaction(&mut self) -> QueryResult<()> {
        self.before_statement()
    }

    /// Registers `f` to run once, after the outermost transaction COMMITs successfully.
    ///
    /// - Outside a transaction it runs at once (autocommit has already committed).
    /// - Inside a savepoint that rolls back, or a transaction that rolls back or fails to
    ///   commit, it is discarded unrun and its captured values are dropped.
    /// - Commit hooks run in registration order across all levels, after COMMIT returned and
    ///   the transaction is closed.
    /// - A panic in `f` is caught and reported (see
    ///   [`set_failure_handler`](crate::set_failure_handler)); it does not stop the hooks after
    ///   it and does not turn the committed transaction into an error.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    /// use std::sync::{Arc, Mutex};
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// let log = Arc::new(Mutex::new(Vec::new()));
    /// let l = log.clone();
    /// let _ = conn.transaction(|conn| {
    ///     let l2 = l.clone();
    ///     conn.on_commit(move || l2.lock().unwrap().push("kept"));
    ///     // A nested transaction is a savepoint; rolling it back discards its hooks.
    ///     let _ = conn.transaction(|conn| {
    ///         let l3 = l.clone();
    ///         conn.on_commit(move || l3.lock().unwrap().push("discarded"));
    ///         Err::<(), _>(diesel::result::Error::RollbackTransaction)
    ///     });
    ///     QueryResult::Ok(())
    /// });
    /// assert_eq!(*log.lock().unwrap(), ["kept"]);
    /// # }
    /// ```
    #[track_caller]
    pub fn on_commit<F>(&mut self, f: F)
    where
        F: FnOnce() + Send + 'static,
    {
        let hook = Hook::commit(f, Location::caller());
        // Only deferred hooks need placing first (to keep registration order); a level that
        // ended behind the wrapper's back is settled by the next transaction operation.
        self.book.drain_inbox();
        self.book.register(hook);
    }

    /// Registers `f` to run once when the work it guards is undone: its savepoint or any
    /// enclosing level rolls back, the outermost COMMIT fails, or the database turned it into
    /// a rollback. It runs at that moment (a savepoint's rollback hooks run while the enclosing
    /// transaction goes on).
    ///
    /// Outside a transaction there is nothing to roll back: `f` is dropped unrun (a debug-level
    /// log line records it).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    /// use std::sync::mpsc;
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// let (tx, rx) = mpsc::channel();
    /// let result: QueryResult<()> = conn.transaction(|conn| {
    ///     conn.on_rollback(move || tx.send("release the reserved seat").unwrap());
    ///     Err(diesel::result::Error::RollbackTransaction)
    /// });
    /// assert!(result.is_err());
    /// assert_eq!(rx.try_recv(), Ok("release the reserved seat"));
    /// # }
    /// ```
    #[track_caller]
    pub fn on_rollback<F>(&mut self, f: F)
    where
        F: FnOnce() + Send + 'static,
    {
        let hook = Hook::rollback(f, Location::caller());
        // Only deferred hooks need placing first (to keep registration order); a level that
        // ended behind the wrapper's back is settled by the next transaction operation.
        self.book.drain_inbox();
        self.book.register(hook);
    }

    /// Registers `f` to run once when the fate of the work it guards is settled, with the
    /// [`Outcome`]: at the end of the outermost transaction, or `RolledBack` when an enclosing
    /// savepoint rolls back. Outside a transaction it runs at once with `Committed`.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::{Outcome, SignalConnection};
    /// use std::sync::mpsc;
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// let (tx, rx) = mpsc::channel();
    /// conn.transaction(|conn| {
    ///     conn.on_complete(move |outcome| tx.send(outcome).unwrap());
    ///     QueryResult::Ok(())
    /// }).unwrap();
    /// assert_eq!(rx.try_recv(), Ok(Outcome::Committed));
    /// # }
    /// ```
    #[track_caller]
    pub fn on_complete<F>(&mut self, f: F)
    where
        F: FnOnce(Outcome) + Send + 'static,
    {
        let hook = Hook::complete(f, Location::caller());
        // Only deferred hooks need placing first (to keep registration order); a level that
        // ended behind the wrapper's back is settled by the next transaction operation.
        self.book.drain_inbox();
        self.book.register(hook);
    }

    /// Registers `f` to run inside the outermost transaction, immediately before COMMIT, with
    /// the connection: it can run queries (write an audit row, check an invariant, flush a
    /// batch).
    ///
    /// - `before_commit` hooks run in registration order, after the
    ///   [`PRE_COMMIT`](crate::signals::PRE_COMMIT) receivers. Hooks they register (more
    ///   `before_commit`, `on_commit`, `on_rollback`, `defer!`) are honoured in the same commit.
    /// - An `Err` rolls the whole transaction back (rollback hooks run) and is returned from
    ///   `transaction`; a panic rolls it back and continues.
    /// - A savepoint that rolls back discards the `before_commit` hooks registered in it.
    /// - Outside a transaction `f` runs at once, and its result is returned.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:")?;
    /// diesel::sql_query("CREATE TABLE audit (note TEXT NOT NULL)").execute(&mut conn)?;
    /// conn.transaction(|conn| {
    ///     conn.before_commit(|conn| {
    ///         diesel::sql_query("INSERT INTO audit (note) VALUES ('batch flushed')")
    ///             .execute(conn)
    ///             .map(drop)
    ///     })?;
    ///     QueryResult::Ok(())
    /// })?;
    /// #[derive(QueryableByName)]
    /// struct Count { #[diesel(sql_type = diesel::sql_types::BigInt)] n: i64 }
    /// let c: Count = diesel::sql_query("SELECT COUNT(*) AS n FROM audit").get_result(&mut conn)?;
    /// assert_eq!(c.n, 1);
    /// # }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[track_caller]
    pub fn before_commit<F>(&mut self, f: F) -> QueryResult<()>
    where
        F: FnOnce(&mut SignalConnection<C>) -> QueryResult<()> + Send + 'static,
    {
        let location = Location::caller();
        self.sync();
        if self.book.ledger.depth() == 0 {
            return f(self);
        }
        self.book
            .ledger
            .push_pre_commit(
                Box::new(move |conn: &mut PreCommitConnection<'_>| {
                    let id = conn.id();
                    match conn.connection::<C>() {
                        Some(conn) => f(conn),
                        None => Err(Error::QueryBuilderError(
                            format!("before_commit hook of connection {id} ran on another connection type").into(),
                        )),
                    }
                }),
                location,
            )
            .map_err(Error::from)
    }

    /// Runs `f` and takes out the hooks it registered in the current transaction, so a test can
    /// inspect them and run them, as Django's `captureOnCommitCallbacks` does.
    ///
    /// A transaction opened with [`begin_test_transaction`](Connection::begin_test_transaction)
    /// never commits, so its hooks never run on their own; capture them instead. Hooks
    /// registered in savepoints that `f` released are captured; those of savepoints `f` rolled
    /// back have already been settled. Returns [`Error::NotInTransaction`] outside a
    /// transaction (hooks would run at once and there would be nothing to capture).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    /// use std::sync::mpsc;
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// conn.begin_test_transaction().unwrap();
    /// let (tx, rx) = mpsc::channel();
    /// let ((), hooks) = conn.capture_hooks(|conn| {
    ///     conn.on_commit(move || tx.send("welcome e-mail").unwrap());
    /// }).unwrap();
    /// assert_eq!(hooks.len(), 1);
    /// assert!(rx.try_recv().is_err());
    /// assert_eq!(hooks.run_as_committed(), 1);
    /// assert_eq!(rx.try_recv(), Ok("welcome e-mail"));
    /// # }
    /// ```
    pub fn capture_hooks<R>(
        &mut self,
        f: impl FnOnce(&mut Self) -> R,
    ) -> QueryResult<(R, CapturedHooks)> {
        self.sync();
        let depth = self.book.ledger.depth();
        if depth == 0 {
            return Err(Error::NotInTransaction);
        }
        let start = self.book.ledger.hooks.len();
        let value = f(self);
        self.sync();
        let hooks = if self.book.ledger.depth() < depth {
            // `f` closed the level it was called in; its hooks are settled already.
            Vec::new()
        } else {
            self.book.ledger.take_since(depth, start)
        };
        Ok((value, CapturedHooks::new(hooks, self.book.label.clone())))
    }
}

impl<C> fmt::Debug for SignalConnection<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignalConnection")
            .field("id", &self.book.label.id)
            .field("alias", &self.book.label.alias)
            .field("levels", &self.book.ledger.depth())
            .field("pending_hooks", &self.book.ledger.hooks.len())
            .finish_non_exhaustive()
    }
}

impl PreCommitConnection<'_> {
    /// The typed connection, if this is a `SignalConnection<C>`.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::{defer_before_commit, SignalConnection};
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:")?;
    /// let (tx, rx) = std::sync::mpsc::channel();
    /// conn.transaction(|_| {
    ///     defer_before_commit(move |c| {
    ///         tx.send(c.connection::<SqliteConnection>().is_some()).unwrap();
    ///         Ok(())
    ///     })?;
    ///     QueryResult::Ok(())
    /// })?;
    /// assert_eq!(rx.try_recv(), Ok(true));
    /// # }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn connection<C: Connection + 'static>(&mut self) -> Option<&mut SignalConnection<C>> {
        self.downcast::<SignalConnection<C>>()
    }
}
