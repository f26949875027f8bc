//! SQLite: `BEGIN IMMEDIATE` / `BEGIN EXCLUSIVE` transactions that go through the hooks.

use diesel::result::Error;
use diesel::sqlite::SqliteConnection;

use crate::SignalConnection;

impl SignalConnection<SqliteConnection> {
    /// Runs a transaction opened with `BEGIN IMMEDIATE`, like
    /// [`SqliteConnection::immediate_transaction`], with hooks settled as for `transaction`.
    /// Returns `AlreadyInTransaction` inside a transaction.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// let (tx, rx) = std::sync::mpsc::channel();
    /// conn.immediate_transaction(|conn| {
    ///     conn.on_commit(move || tx.send(()).unwrap());
    ///     QueryResult::Ok(())
    /// }).unwrap();
    /// assert!(rx.try_recv().is_ok());
    /// # }
    /// ```
    pub fn immediate_transaction<T, E, F>(&mut self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Self) -> Result<T, E>,
        E: From<Error>,
    {
        self.transaction_with_begin("BEGIN IMMEDIATE", f)
    }

    /// Runs a transaction opened with `BEGIN EXCLUSIVE`, like
    /// [`SqliteConnection::exclusive_transaction`], with hooks settled as for `transaction`.
    /// Returns `AlreadyInTransaction` inside a transaction.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// let r: QueryResult<()> = conn.exclusive_transaction(|conn| {
    ///     conn.on_commit(|| unreachable!("rolled back"));
    ///     Err(diesel::result::Error::RollbackTransaction)
    /// });
    /// assert!(r.is_err());
    /// # }
    /// ```
    pub fn exclusive_transaction<T, E, F>(&mut self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Self) -> Result<T, E>,
        E: From<Error>,
    {
        self.transaction_with_begin("BEGIN EXCLUSIVE", f)
    }
}
