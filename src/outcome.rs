//! How a transaction level ended: the one fact every hook is settled by.

use std::fmt;

/// How a transaction ended, as seen by an [`on_complete`](crate::SignalConnection::on_complete)
/// hook.
///
/// # Example
///
/// ```
/// use diesel_transaction_signals::Outcome;
///
/// fn describe(outcome: Outcome) -> &'static str {
///     match outcome {
///         Outcome::Committed => "the work is in the database",
///         Outcome::RolledBack => "the work was undone",
///         Outcome::Unknown => "the connection broke during COMMIT: check the database",
///     }
/// }
/// assert_eq!(describe(Outcome::Committed), "the work is in the database");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The outermost COMMIT succeeded: the work is durable.
    Committed,
    /// The work was undone: a rollback, a failed COMMIT, a COMMIT that PostgreSQL turned into a
    /// rollback, a panic, or a connection that broke before COMMIT was sent.
    RolledBack,
    /// The connection broke while COMMIT was in flight, or the transaction ended behind the
    /// wrapper's back (`into_inner()` mid-transaction, raw `COMMIT`/`ROLLBACK` SQL on PostgreSQL):
    /// it may or may not have committed. Neither
    /// commit nor rollback hooks run; `on_complete` hooks receive this value. Spring reports the
    /// same case as `STATUS_UNKNOWN`.
    Unknown,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Committed => "committed",
            Outcome::RolledBack => "rolled back",
            Outcome::Unknown => "unknown",
        })
    }
}
