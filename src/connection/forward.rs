//! The Diesel traits that make [`SignalConnection`] a drop-in replacement for the connection it
//! wraps: each forwards to the inner connection. Statements pass through
//! [`SignalConnection::before_statement`] (refused while the caller's transaction is one the
//! server ended) and report failures inside a transaction to the server-side checks.

use diesel::connection::{
    CacheSize, Connection, ConnectionSealed, Instrumentation, LoadConnection, SimpleConnection,
    TransactionManager, TransactionManagerStatus, WithMetadataLookup,
};
use diesel::expression::QueryMetadata;
use diesel::migration::MigrationConnection;
use diesel::query_builder::{Query, QueryFragment, QueryId};
use diesel::result::{ConnectionResult, QueryResult};
use diesel::sql_types::TypeMetadata;

use super::manager::SignalTransactionManager;
use super::SignalConnection;

impl<C: Connection + 'static> SimpleConnection for SignalConnection<C> {
    fn batch_execute(&mut self, query: &str) -> QueryResult<()> {
        self.before_statement()?;
        let result = self.inner.batch_execute(query);
        if self.book.ledger.depth() > 0 {
            match &result {
                Ok(()) => self.batch_ran(query),
                Err(e) => self.statement_failed(Some(e)),
            }
        }
        result
    }
}

impl<C: Connection + 'static> ConnectionSealed for SignalConnection<C> {}

impl<C: Connection + 'static> Connection for SignalConnection<C> {
    type Backend = C::Backend;
    type TransactionManager = SignalTransactionManager<C>;

    fn establish(database_url: &str) -> ConnectionResult<Self> {
        C::establish(database_url).map(Self::new)
    }

    /// As Diesel's, and marks the level so that its hooks are discarded, not run, when the
    /// connection is dropped: a test transaction never commits. Use
    /// [`capture_hooks`](SignalConnection::capture_hooks) to run them.
    fn begin_test_transaction(&mut self) -> QueryResult<()> {
        match Self::TransactionManager::transaction_manager_status_mut(self) {
            TransactionManagerStatus::Valid(valid_status) => {
                assert_eq!(None, valid_status.transaction_depth())
            }
            TransactionManagerStatus::InError => panic!("Transaction manager in error"),
        };
        Self::TransactionManager::begin_transaction(self)?;
        Self::TransactionManager::transaction_manager_status_mut(self).set_test_transaction_flag();
        self.book.ledger.mark_test_transaction();
        Ok(())
    }

    fn execute_returning_count<T>(&mut self, source: &T) -> QueryResult<usize>
    where
        T: QueryFragment<Self::Backend> + QueryId,
    {
        self.before_statement()?;
        if !T::HAS_STATIC_QUERY_ID {
            self.book.raw_statement();
        }
        let result = self.inner.execute_returning_count(source);
        if let Err(e) = &result {
            if self.book.ledger.depth() > 0 {
                self.statement_failed(Some(e));
            }
        }
        result
    }

    fn transaction_state(
        &mut self,
    ) -> &mut <Self::TransactionManager as TransactionManager<Self>>::TransactionStateData {
        self.inner.transaction_state()
    }

    fn instrumentation(&mut self) -> &mut dyn Instrumentation {
        self.inner.instrumentation()
    }

    fn set_instrumentation(&mut self, instrumentation: impl Instrumentation) {
        self.inner.set_instrumentation(instrumentation)
    }

    fn set_prepared_statement_cache_size(&mut self, size: CacheSize) {
        self.inner.set_prepared_statement_cache_size(size)
    }
}

impl<B, C> LoadConnection<B> for SignalConnection<C>
where
    C: LoadConnection<B> + 'static,
{
    type Cursor<'conn, 'query>
        = SignalCursor<'conn, C::Cursor<'conn, 'query>>
    where
        Self: 'conn;
    type Row<'conn, 'query>
        = C::Row<'conn, 'query>
    where
        Self: 'conn;

    fn load<'conn, 'query, T>(
        &'conn mut self,
        source: T,
    ) -> QueryResult<Self::Cursor<'conn, 'query>>
    where
        T: Query + QueryFragment<Self::Backend> + QueryId + 'query,
        Self::Backend: QueryMetadata<T::SqlType>,
    {
        self.before_statement()?;
        if !T::HAS_STATIC_QUERY_ID {
            self.book.raw_statement();
        }
        // The cursor borrows `inner`, so the wrapper cannot look at the connection while it
        // lives: a failure (at `load`, or while reading rows, where SQLite runs the statement)
        // leaves a check for the next statement or transaction operation.
        let failed = &mut self.book.check_pending;
        match self.inner.load(source) {
            Ok(inner) => Ok(SignalCursor { inner, failed }),
            Err(e) => {
                *failed = true;
                Err(e)
            }
        }
    }
}

/// The rows of a query loaded through a [`SignalConnection`]: the inner connection's cursor,
/// which it forwards as it is, noting a failed row so that the wrapper can check, before the
/// next statement, whether the database ended the transaction (SQLite runs a statement while
/// its rows are read). Use it as Diesel's own cursors: as an opaque `Iterator`.
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::connection::LoadConnection;
/// use diesel::prelude::*;
/// use diesel::row::Row;
/// use diesel_transaction_signals::SignalConnection;
///
/// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
/// let cursor = conn.load(diesel::sql_query("SELECT 1 UNION ALL SELECT 2")).unwrap();
/// assert_eq!(cursor.map(|row| row.unwrap().field_count()).sum::<usize>(), 2);
/// # }
/// ```
pub struct SignalCursor<'conn, I> {
    inner: I,
    failed: &'conn mut bool,
}

impl<I, R> Iterator for SignalCursor<'_, I>
where
    I: Iterator<Item = QueryResult<R>>,
{
    type Item = QueryResult<R>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let row = self.inner.next();
        if let Some(Err(_)) = &row {
            *self.failed = true;
        }
        row
    }

    #[inline]
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl<I> std::fmt::Debug for SignalCursor<'_, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignalCursor")
    }
}

impl<C: WithMetadataLookup + 'static> WithMetadataLookup for SignalConnection<C> {
    fn metadata_lookup(&mut self) -> &mut <Self::Backend as TypeMetadata>::MetadataLookup {
        self.inner.metadata_lookup()
    }
}

impl<C: diesel::connection::MultiConnectionHelper + 'static>
    diesel::connection::MultiConnectionHelper for SignalConnection<C>
{
    fn to_any<'a>(
        lookup: &mut <Self::Backend as TypeMetadata>::MetadataLookup,
    ) -> &mut (dyn std::any::Any + 'a) {
        C::to_any(lookup)
    }

    fn from_any(
        lookup: &mut dyn std::any::Any,
    ) -> Option<&mut <Self::Backend as TypeMetadata>::MetadataLookup> {
        C::from_any(lookup)
    }
}

impl<C: MigrationConnection + 'static> MigrationConnection for SignalConnection<C> {
    fn setup(&mut self) -> QueryResult<usize> {
        self.inner.setup()
    }
}

impl<Changes, Output, C> diesel::query_dsl::UpdateAndFetchResults<Changes, Output>
    for SignalConnection<C>
where
    C: diesel::query_dsl::UpdateAndFetchResults<Changes, Output> + 'static,
{
    fn update_and_fetch(&mut self, changeset: Changes) -> QueryResult<Output> {
        self.inner.update_and_fetch(changeset)
    }
}

#[cfg(feature = "r2d2")]
impl<C: diesel::r2d2::R2D2Connection + 'static> diesel::r2d2::R2D2Connection
    for SignalConnection<C>
{
    fn ping(&mut self) -> QueryResult<()> {
        self.inner.ping()
    }

    /// Broken when the inner connection is, or when a transaction (other than a test
    /// transaction) is still open: the pool then discards it, which rolls the transaction back
    /// and runs its rollback hooks, so no hook crosses into the connection's next use.
    fn is_broken(&mut self) -> bool {
        self.sync();
        self.inner.is_broken()
            || (self.book.ledger.depth() > 0 && !self.book.ledger.is_test_transaction())
    }
}
