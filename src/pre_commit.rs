//! The extension point for work that must run inside the outermost transaction, just before
//! COMMIT: [`PreCommitConnection`] (the connection such work is handed, its type erased) and
//! [`DeferError`] (why such work could not be deferred).
//!
//! [`SignalConnection::before_commit`](crate::SignalConnection::before_commit) registers it
//! through a connection handle; [`defer_before_commit`](crate::defer_before_commit) registers it
//! without one, on the innermost transaction open on this thread (the way
//! [`defer`](fn@crate::defer) does for commit hooks). The durable jobs of the `outbox` feature
//! are built on this point and on the other public APIs only.

use std::any::Any;
use std::fmt;

use diesel::result::QueryResult;

use crate::id::ConnectionId;

/// The connection handed to work deferred with
/// [`defer_before_commit`](crate::defer_before_commit): the
/// [`SignalConnection`](crate::SignalConnection) whose transaction is about to commit, with its
/// type erased because the code that deferred the work did not know it.
///
/// Get the typed connection back with [`connection`](Self::connection) (or [`downcast`](Self::downcast)
/// for any other `'static` type), then run queries: they run inside the transaction, before
/// COMMIT.
///
/// # Example
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::prelude::*;
/// use diesel_transaction_signals::{defer_before_commit, PreCommitConnection, SignalConnection};
///
/// fn audit(conn: &mut PreCommitConnection<'_>) -> QueryResult<()> {
///     let conn = conn
///         .connection::<SqliteConnection>()
///         .expect("this example only runs on SQLite");
///     diesel::sql_query("INSERT INTO audit (note) VALUES ('flushed')").execute(conn)?;
///     Ok(())
/// }
///
/// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:")?;
/// diesel::sql_query("CREATE TABLE audit (note TEXT NOT NULL)").execute(&mut conn)?;
/// conn.transaction(|_| {
///     // Library code with no connection handle:
///     defer_before_commit(audit).expect("a transaction is open");
///     QueryResult::Ok(())
/// })?;
/// # }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct PreCommitConnection<'a> {
    pub(crate) conn: &'a mut dyn Any,
    pub(crate) id: ConnectionId,
    pub(crate) backend: &'static str,
}

impl PreCommitConnection<'_> {
    /// The id of the connection whose transaction is about to commit.
    ///
    /// ```
    /// # use diesel_transaction_signals::PreCommitConnection;
    /// fn who(conn: &PreCommitConnection<'_>) -> String { conn.id().to_string() }
    /// # let _ = who;
    /// ```
    pub fn id(&self) -> ConnectionId {
        self.id
    }

    /// The backend's short name: `"sqlite"`, `"postgres"`, `"mysql"` or `"other"`.
    ///
    /// ```
    /// # use diesel_transaction_signals::PreCommitConnection;
    /// fn is_pg(conn: &PreCommitConnection<'_>) -> bool { conn.backend() == "postgres" }
    /// # let _ = is_pg;
    /// ```
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// The connection as a `T`, if it is one. `T` is the wrapper type itself
    /// (`SignalConnection<PgConnection>`); [`connection`](Self::connection) names it for you.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::SqliteConnection;
    /// use diesel_transaction_signals::{PreCommitConnection, SignalConnection};
    /// fn sqlite<'c>(c: &'c mut PreCommitConnection<'_>) -> Option<&'c mut SignalConnection<SqliteConnection>> {
    ///     c.downcast::<SignalConnection<SqliteConnection>>()
    /// }
    /// # let _ = sqlite;
    /// # }
    /// ```
    pub fn downcast<T: Any>(&mut self) -> Option<&mut T> {
        self.conn.downcast_mut::<T>()
    }
}

impl fmt::Debug for PreCommitConnection<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreCommitConnection")
            .field("id", &self.id)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// Work that runs just before COMMIT, as stored in a transaction level.
pub(crate) type PreCommitFn =
    Box<dyn for<'a> FnOnce(&mut PreCommitConnection<'a>) -> QueryResult<()> + Send + 'static>;

/// Why work could not be deferred to run before COMMIT: it was not registered and will not run.
///
/// # Example
///
/// ```
/// use diesel_transaction_signals::{defer_before_commit, DeferError};
///
/// // No transaction is open on this thread: nothing would ever commit.
/// let err = defer_before_commit(|_| Ok(())).unwrap_err();
/// assert_eq!(err, DeferError::NoTransaction);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeferError {
    /// No transaction is open on this thread (or on the connection).
    NoTransaction,
    /// The transaction's pre-commit phase is over and its COMMIT is in flight (the call came
    /// from an `Instrumentation` callback, a `POST_*` receiver, or another thread): work
    /// deferred now could never run inside it.
    CommitInFlight,
}

impl fmt::Display for DeferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeferError::NoTransaction => {
                "no transaction is open: work that must run before COMMIT cannot be deferred"
            }
            DeferError::CommitInFlight => {
                "the transaction's COMMIT is already in flight: work that must run before COMMIT \
                 can no longer be deferred to it"
            }
        })
    }
}

impl std::error::Error for DeferError {}

impl From<DeferError> for diesel::result::Error {
    /// Lets `?` carry a [`DeferError`] out of a `transaction` closure, as a
    /// `QueryBuilderError`.
    ///
    /// ```
    /// use diesel_transaction_signals::DeferError;
    /// let e: diesel::result::Error = DeferError::NoTransaction.into();
    /// assert!(matches!(e, diesel::result::Error::QueryBuilderError(_)));
    /// ```
    fn from(e: DeferError) -> Self {
        diesel::result::Error::QueryBuilderError(Box::new(e))
    }
}
