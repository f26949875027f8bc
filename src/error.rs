//! The error returned when a COMMIT could not commit because the database had already aborted
//! the transaction.

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
    /// Whether `err` is (or, inside `RollbackErrorOnCommit`, contains) this error.
    ///
    /// ```
    /// use diesel_transaction_signals::TransactionAborted;
    /// assert!(!TransactionAborted::is(&diesel::result::Error::RollbackTransaction));
    /// ```
    pub fn is(err: &Error) -> bool {
        match err {
            Error::DatabaseError(DatabaseErrorKind::Unknown, info) => info.message() == MESSAGE,
            Error::RollbackErrorOnCommit { commit_error, .. } => Self::is(commit_error),
            _ => false,
        }
    }

    pub(crate) fn into_error() -> Error {
        Error::DatabaseError(DatabaseErrorKind::Unknown, Box::new(TransactionAborted))
    }
}

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
