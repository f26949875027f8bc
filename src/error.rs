//! The errors the wrapper returns on its own: [`TransactionAborted`] (the database aborted or
//! ended the transaction, so it cannot commit and statements are refused) and
//! [`ConnectionReplaced`] (a `transaction` closure swapped its connection out).

use std::fmt;

use diesel::result::{DatabaseErrorInformation, DatabaseErrorKind, Error};

const MESSAGE: &str = "the transaction was not committed: an earlier statement failed and \
aborted it, and the error was not propagated out of the transaction closure; it was rolled back";

const HINT: &str = "propagate the error with `?`, or run the statement that may fail in a nested \
`transaction` (a savepoint) so that only it is rolled back";

/// Details of a COMMIT that could not commit: a statement failed inside the transaction, the
/// database aborted it, and the closure swallowed the error and returned `Ok`.
///
/// PostgreSQL then turns `COMMIT` into a silent `ROLLBACK` and Diesel reports success; MySQL
/// has already rolled back after a deadlock. [`SignalConnection`](crate::SignalConnection)
/// detects the aborted state before COMMIT, rolls back, runs the rollback hooks and returns
/// this as `Error::DatabaseError(DatabaseErrorKind::Unknown, _)` from `transaction`, never
/// `Ok`. Recognise it with [`TransactionAborted::is`].
///
/// # Example
///
/// ```
/// use diesel::result::Error;
/// use diesel_transaction_signals::TransactionAborted;
///
/// fn should_retry(err: &Error) -> bool {
///     TransactionAborted::is(err)
/// }
/// assert!(!should_retry(&Error::NotFound));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransactionAborted;

impl TransactionAborted {
    /// Whether `err` is (or, inside `RollbackErrorOnCommit`, contains) this error, whichever
    /// of its three forms: a COMMIT of an aborted transaction, a COMMIT of a transaction the
    /// database ended on its own, or a statement (or nested `transaction`) refused in such a
    /// transaction.
    ///
    /// ```
    /// use diesel_transaction_signals::TransactionAborted;
    /// assert!(!TransactionAborted::is(&diesel::result::Error::RollbackTransaction));
    /// ```
    pub fn is(err: &Error) -> bool {
        match err {
            Error::DatabaseError(DatabaseErrorKind::Unknown, info) => {
                let m = info.message();
                m == MESSAGE || m == Lost::ENDED || m == Lost::REFUSED || m == Lost::ABANDONED
            }
            Error::RollbackErrorOnCommit { commit_error, .. } => Self::is(commit_error),
            _ => false,
        }
    }

    pub(crate) fn into_error() -> Error {
        Error::DatabaseError(DatabaseErrorKind::Unknown, Box::new(TransactionAborted))
    }

    /// The COMMIT (or RELEASE) of a transaction the database ended on its own.
    pub(crate) fn lost_error() -> Error {
        Info {
            message: Lost::ENDED,
            hint: Lost::HINT,
        }
        .into_error()
    }

    /// A statement refused because an abandoned `transaction` future left its transaction open
    /// (async connections).
    #[cfg(feature = "async")]
    pub(crate) fn abandoned_error() -> Error {
        Info {
            message: Lost::ABANDONED,
            hint: "call roll_back_abandoned().await, or begin the next transaction",
        }
        .into_error()
    }

    /// PostgreSQL's answer to `RELEASE SAVEPOINT` in an aborted transaction, given without
    /// sending it (async connections: diesel-async would count the savepoint released while
    /// the server keeps it). The same text as the server's, so callers see one error either way.
    #[cfg(feature = "async")]
    pub(crate) fn release_refused_error() -> Error {
        Info {
            message: "current transaction is aborted, commands ignored until end of transaction \
block (RELEASE SAVEPOINT not sent: a statement failed inside the savepoint)",
            hint: "roll the savepoint back (return the error from its closure)",
        }
        .into_error()
    }

    /// A statement or `begin` refused in a transaction the database ended on its own.
    pub(crate) fn statement_error() -> Error {
        Info {
            message: Lost::REFUSED,
            hint: Lost::HINT,
        }
        .into_error()
    }
}

/// The messages of the [`TransactionAborted`] forms for a transaction the database ended on
/// its own.
struct Lost;

impl Lost {
    const ENDED: &'static str = "the transaction was not committed: the database ended it on its \
own (a deadlock, a statement that rolled the whole transaction back, or an implicit commit) \
while it was open; its hooks settled with what the database did";
    const REFUSED: &'static str = "statement refused: the database ended the transaction on its \
own (a deadlock, a statement that rolled the whole transaction back, or a raw COMMIT/ROLLBACK), \
and running it now would run it outside the transaction the caller believes open; end the \
transaction (return the error) first";
    const ABANDONED: &'static str = "statement refused: a `transaction` future on this \
connection was dropped before its COMMIT was sent (a timeout, a cancelled request), and its \
transaction is still open on the server; running the statement now would run it inside that transaction. It \
is rolled back (rollback hooks run) by the connection's next transaction operation or \
`batch_execute`, or by `AsyncSignalConnection::roll_back_abandoned`";
    const HINT: &'static str =
        "propagate the database error that ended the transaction, and retry the whole transaction";
}

/// Error information the wrapper raises itself: a message and a hint, nothing else.
#[derive(Debug)]
struct Info {
    message: &'static str,
    hint: &'static str,
}

impl Info {
    fn into_error(self) -> Error {
        Error::DatabaseError(DatabaseErrorKind::Unknown, Box::new(self))
    }
}

impl DatabaseErrorInformation for Info {
    fn message(&self) -> &str {
        self.message
    }
    fn details(&self) -> Option<&str> {
        None
    }
    fn hint(&self) -> Option<&str> {
        Some(self.hint)
    }
    fn table_name(&self) -> Option<&str> {
        None
    }
    fn column_name(&self) -> Option<&str> {
        None
    }
    fn constraint_name(&self) -> Option<&str> {
        None
    }
    fn statement_position(&self) -> Option<i32> {
        None
    }
}

/// Details of a `transaction` whose closure replaced the connection it was given
/// (`std::mem::replace(conn, other)`, `std::mem::swap`): the transaction it began belongs to a
/// connection that is no longer there, so its outcome cannot be reported as the closure's.
///
/// The closure's result becomes `Error::DatabaseError(DatabaseErrorKind::Unknown, _)` with this
/// information; the transaction's hooks settle with the connection that began it (rolled back
/// when it is dropped), and no registry entry outlives it. Recognise it with
/// [`ConnectionReplaced::is`].
///
/// # Example
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::prelude::*;
/// use diesel_transaction_signals::{ConnectionReplaced, SignalConnection};
///
/// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
/// let other = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
/// let result = conn.transaction(|c| {
///     drop(std::mem::replace(c, other)); // the connection that began the transaction is gone
///     QueryResult::Ok(())
/// });
/// assert!(ConnectionReplaced::is(&result.unwrap_err()));
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectionReplaced;

const REPLACED: &str = "the transaction closure replaced its connection: the transaction it \
began belongs to the connection that was swapped out, and settles with it";

impl ConnectionReplaced {
    /// Whether `err` is this error.
    ///
    /// ```
    /// use diesel_transaction_signals::ConnectionReplaced;
    /// assert!(!ConnectionReplaced::is(&diesel::result::Error::NotFound));
    /// ```
    pub fn is(err: &Error) -> bool {
        matches!(err, Error::DatabaseError(DatabaseErrorKind::Unknown, info) if info.message() == REPLACED)
    }

    pub(crate) fn into_error() -> Error {
        Info {
            message: REPLACED,
            hint: "do not move the connection out of a transaction closure",
        }
        .into_error()
    }
}

impl fmt::Display for ConnectionReplaced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REPLACED)
    }
}

impl std::error::Error for ConnectionReplaced {}

impl DatabaseErrorInformation for TransactionAborted {
    fn message(&self) -> &str {
        MESSAGE
    }
    fn details(&self) -> Option<&str> {
        None
    }
    fn hint(&self) -> Option<&str> {
        Some(HINT)
    }
    fn table_name(&self) -> Option<&str> {
        None
    }
    fn column_name(&self) -> Option<&str> {
        None
    }
    fn constraint_name(&self) -> Option<&str> {
        None
    }
    fn statement_position(&self) -> Option<i32> {
        None
    }
}

impl fmt::Display for TransactionAborted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MESSAGE)
    }
}

impl std::error::Error for TransactionAborted {}
