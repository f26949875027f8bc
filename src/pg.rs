//! PostgreSQL: transactions with an isolation level, read-only and deferrable modes that go
//! through the hooks, `COPY FROM`, and custom-type metadata.

use diesel::pg::{CopyFromQuery, GetPgMetadataCache, PgConnection, PgMetadataCache};
use diesel::prelude::ExecuteCopyFromDsl;
use diesel::result::Error;

use crate::SignalConnection;

impl SignalConnection<PgConnection> {
    /// Starts building a transaction with an isolation level or access mode, the counterpart of
    /// [`PgConnection::build_transaction`] (which would bypass the hooks).
    ///
    /// ```
    /// # #[cfg(feature = "postgres")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// # let database_url = std::env::var("DTS_PG_URL").expect("scripts/test sets DTS_PG_URL");
    /// let mut conn = SignalConnection::<PgConnection>::establish(&database_url)?;
    /// conn.build_transaction().serializable().read_only().run(|conn| {
    ///     conn.on_commit(|| println!("consistent snapshot read"));
    ///     QueryResult::Ok(())
    /// })?;
    /// # }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn build_transaction(&mut self) -> TransactionBuilder<'_> {
        TransactionBuilder {
            conn: self,
            isolation: None,
            read_only: None,
            deferrable: None,
        }
    }
}

/// Builds a PostgreSQL transaction with explicit characteristics; see
/// [`SignalConnection::build_transaction`].
///
/// # Example
///
/// ```
/// # #[cfg(feature = "postgres")] {
/// use diesel_transaction_signals::pg::TransactionBuilder;
/// fn strict(b: TransactionBuilder<'_>) -> TransactionBuilder<'_> {
///     b.serializable().deferrable().read_only()
/// }
/// # let _ = strict;
/// # }
/// ```
#[must_use = "a transaction builder does nothing until `run` is called"]
pub struct TransactionBuilder<'a> {
    conn: &'a mut SignalConnection<PgConnection>,
    isolation: Option<&'static str>,
    read_only: Option<bool>,
    deferrable: Option<bool>,
}

impl std::fmt::Debug for TransactionBuilder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionBuilder")
            .field("sql", &self.begin_sql())
            .finish()
    }
}

impl<'a> TransactionBuilder<'a> {
    /// `READ ONLY`.
    ///
    /// ```
    /// # #[cfg(feature = "postgres")] { fn f(b: diesel_transaction_signals::pg::TransactionBuilder<'_>) { let _ = b.read_only(); } }
    /// ```
    pub fn read_only(mut self) -> Self {
        self.read_only = Some(true);
        self
    }

    /// `READ WRITE`.
    ///
    /// ```
    /// # #[cfg(feature = "postgres")] { fn f(b: diesel_transaction_signals::pg::TransactionBuilder<'_>) { let _ = b.read_write(); } }
    /// ```
    pub fn read_write(mut self) -> Self {
        self.read_only = Some(false);
        self
    }

    /// `DEFERRABLE` (with `SERIALIZABLE` and `READ ONLY`: waits for a safe snapshot).
    ///
    /// ```
    /// # #[cfg(feature = "postgres")] { fn f(b: diesel_transaction_signals::pg::TransactionBuilder<'_>) { let _ = b.deferrable(); } }
    /// ```
    pub fn deferrable(mut self) -> Self {
        self.deferrable = Some(true);
        self
    }

    /// `NOT DEFERRABLE`.
    ///
    /// ```
    /// # #[cfg(feature = "postgres")] { fn f(b: diesel_transaction_signals::pg::TransactionBuilder<'_>) { let _ = b.not_deferrable(); } }
    /// ```
    pub fn not_deferrable(mut self) -> Self {
        self.deferrable = Some(false);
        self
    }

    /// `ISOLATION LEVEL READ COMMITTED`.
    ///
    /// ```
    /// # #[cfg(feature = "postgres")] { fn f(b: diesel_transaction_signals::pg::TransactionBuilder<'_>) { let _ = b.read_committed(); } }
    /// ```
    pub fn read_committed(mut self) -> Self {
        self.isolation = Some("READ COMMITTED");
        self
    }

    /// `ISOLATION LEVEL REPEATABLE READ`.
    ///
    /// ```
    /// # #[cfg(feature = "postgres")] { fn f(b: diesel_transaction_signals::pg::TransactionBuilder<'_>) { let _ = b.repeatable_read(); } }
    /// ```
    pub fn repeatable_read(mut self) -> Self {
        self.isolation = Some("REPEATABLE READ");
        self
    }

    /// `ISOLATION LEVEL SERIALIZABLE`. A serialization failure, also at COMMIT, is returned as
    /// `DatabaseErrorKind::SerializationFailure` with the rollback hooks run: retry the whole
    /// transaction.
    ///
    /// ```
    /// # #[cfg(feature = "postgres")] { fn f(b: diesel_transaction_signals::pg::TransactionBuilder<'_>) { let _ = b.serializable(); } }
    /// ```
    pub fn serializable(mut self) -> Self {
        self.isolation = Some("SERIALIZABLE");
        self
    }

    fn begin_sql(&self) -> String {
        let mut modes = Vec::with_capacity(3);
        if let Some(level) = self.isolation {
            modes.push(format!("ISOLATION LEVEL {level}"));
        }
        match self.read_only {
            Some(true) => modes.push("READ ONLY".into()),
            Some(false) => modes.push("READ WRITE".into()),
            None => {}
        }
        match self.deferrable {
            Some(true) => modes.push("DEFERRABLE".into()),
            Some(false) => modes.push("NOT DEFERRABLE".into()),
            None => {}
        }
        if modes.is_empty() {
            "BEGIN TRANSACTION".into()
        } else {
            format!("BEGIN TRANSACTION {}", modes.join(", "))
        }
    }

    /// Runs `f` in the transaction, as `Connection::transaction` does. Returns
    /// `AlreadyInTransaction` inside a transaction (the characteristics apply to a whole
    /// transaction only).
    ///
    /// ```
    /// # #[cfg(feature = "postgres")] {
    /// # use diesel::QueryResult;
    /// fn f(b: diesel_transaction_signals::pg::TransactionBuilder<'_>) -> QueryResult<i32> {
    ///     b.repeatable_read().run(|_conn| Ok(42))
    /// }
    /// # let _ = f;
    /// # }
    /// ```
    pub fn run<T, E, F>(self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut SignalConnection<PgConnection>) -> Result<T, E>,
        E: From<Error>,
    {
        let sql = self.begin_sql();
        self.conn.transaction_with_begin(&sql, f)
    }
}

impl GetPgMetadataCache for SignalConnection<PgConnection> {
    fn get_metadata_cache(&mut self) -> &mut PgMetadataCache {
        self.inner.get_metadata_cache()
    }
}

impl<T, A> ExecuteCopyFromDsl<SignalConnection<PgConnection>> for CopyFromQuery<T, A>
where
    CopyFromQuery<T, A>: ExecuteCopyFromDsl<PgConnection>,
{
    type Error = <CopyFromQuery<T, A> as ExecuteCopyFromDsl<PgConnection>>::Error;

    fn execute(
        self,
        conn: &mut SignalConnection<PgConnection>,
    ) -> Result<usize, <Self as ExecuteCopyFromDsl<SignalConnection<PgConnection>>>::Error> {
        ExecuteCopyFromDsl::<PgConnection>::execute(self, &mut conn.inner)
    }
}
