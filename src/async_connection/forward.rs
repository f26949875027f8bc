//! The diesel-async traits that make [`AsyncSignalConnection`] a drop-in for the connection it
//! wraps. Statements go through the wrapper's [`Watched`] futures, transactions through its
//! driver; everything else is forwarded. No `Deref`: diesel-async's blanket impls for
//! `DerefMut` connections would bypass the wrapper's transaction manager.

use std::future::Future;

use diesel::connection::{CacheSize, Instrumentation};
use diesel::query_builder::{AsQuery, QueryFragment, QueryId};
use diesel::result::{ConnectionResult, Error, QueryResult};
use diesel_async::{
    AsyncConnection, AsyncConnectionCore, SimpleAsyncConnection, TransactionManager,
};

use super::driver::AsyncSignalTransactionManager;
use super::watch::Watched;
use super::AsyncSignalConnection;

/// An async closure whose future can be named, so a bound can ask it to be `Send`: a copy of
/// diesel-async's own `AsyncFunc` (which sits in a private module), implemented for every
/// `async` closure. It appears in the bounds of `transaction`; users never implement it.
///
/// ```
/// use diesel_transaction_signals::AsyncFunc;
/// fn takes<F: for<'r> AsyncFunc<&'r mut i32, i32, Fut: Send>>(_: F) {}
/// takes(async |x: &mut i32| *x + 1);
/// ```
pub trait AsyncFunc<T, R>:
    AsyncFnOnce(T) -> R + FnOnce(T) -> <Self as AsyncFunc<T, R>>::Fut
{
    /// The future the closure returns.
    type Fut: Future<Output = R>;
}

impl<F, T, Fut, R> AsyncFunc<T, R> for F
where
    F: AsyncFnOnce(T) -> R + FnOnce(T) -> Fut,
    Fut: Future<Output = R>,
{
    type Fut = Fut;
}

impl<C: AsyncConnection + 'static> SimpleAsyncConnection for AsyncSignalConnection<C> {
    async fn batch_execute(&mut self, query: &str) -> QueryResult<()> {
        self.look().await;
        self.before_statement()?;
        // Raw SQL may BEGIN, COMMIT or fail in autocommit: the driver reads the status again.
        self.watch.forget();
        let result = self.inner.batch_execute(query).await;
        match &result {
            Err(e) => self.watch.failed(e),
            Ok(()) => self.batch_ran(query).await,
        }
        result
    }
}

impl<C: AsyncConnection + 'static> AsyncConnectionCore for AsyncSignalConnection<C> {
    type ExecuteFuture<'conn, 'query> = Watched<'conn, C::ExecuteFuture<'conn, 'query>>;
    type LoadFuture<'conn, 'query> = Watched<'conn, C::LoadFuture<'conn, 'query>>;
    type Stream<'conn, 'query> = C::Stream<'conn, 'query>;
    type Row<'conn, 'query> = C::Row<'conn, 'query>;
    type Backend = C::Backend;

    fn load<'conn, 'query, T>(&'conn mut self, source: T) -> Self::LoadFuture<'conn, 'query>
    where
        T: AsQuery + 'query,
        T::Query: QueryFragment<Self::Backend> + QueryId + 'query,
    {
        if let Err(e) = self.before_statement() {
            return Watched::refused(e);
        }
        Watched::running(
            <C as AsyncConnectionCore>::load(&mut self.inner, source),
            &mut self.watch,
        )
    }

    fn execute_returning_count<'conn, 'query, T>(
        &'conn mut self,
        source: T,
    ) -> Self::ExecuteFuture<'conn, 'query>
    where
        T: QueryFragment<Self::Backend> + QueryId + 'query,
    {
        if let Err(e) = self.before_statement() {
            return Watched::refused(e);
        }
        Watched::running(
            <C as AsyncConnectionCore>::execute_returning_count(&mut self.inner, source),
            &mut self.watch,
        )
    }
}

impl<C: AsyncConnection + 'static> AsyncConnection for AsyncSignalConnection<C> {
    type TransactionManager = AsyncSignalTransactionManager<C>;

    async fn establish(database_url: &str) -> ConnectionResult<Self> {
        C::establish(database_url)
            .await
            .map(AsyncSignalConnection::new)
    }

    fn transaction<'a, 'conn, R, E, F>(
        &'conn mut self,
        callback: F,
    ) -> impl Future<Output = Result<R, E>> + Send + 'conn
    where
        for<'r> F: AsyncFnOnce(&'r mut Self) -> Result<R, E>
            + AsyncFunc<&'r mut Self, Result<R, E>, Fut: Send>
            + Send
            + 'a,
        E: From<Error> + Send + 'a,
        R: Send + 'a,
        'a: 'conn,
    {
        self.run_transaction(callback)
    }

    async fn begin_test_transaction(&mut self) -> QueryResult<()> {
        match Self::TransactionManager::transaction_manager_status_mut(self) {
            diesel::connection::TransactionManagerStatus::Valid(valid) => {
                assert_eq!(None, valid.transaction_depth())
            }
            diesel::connection::TransactionManagerStatus::InError => {
                panic!("Transaction manager in error")
            }
        }
        self.begin_level().await?;
        Self::TransactionManager::transaction_manager_status_mut(self).set_test_transaction_flag();
        self.book.ledger.mark_test_transaction();
        Ok(())
    }

    fn transaction_state(
        &mut self,
    ) -> &mut <Self::TransactionManager as TransactionManager<Self>>::TransactionStateData {
        // The caller may change the status: the driver reads it again next time.
        self.watch.forget();
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

impl<C, Changes, Output> diesel_async::UpdateAndFetchResults<Changes, Output>
    for AsyncSignalConnection<C>
where
    C: AsyncConnection + diesel_async::UpdateAndFetchResults<Changes, Output> + 'static,
    Changes: diesel::prelude::Identifiable + diesel::associations::HasTable,
    Output: Send + 'static,
{
    fn update_and_fetch<'conn, 'changes>(
        &'conn mut self,
        changeset: Changes,
    ) -> std::pin::Pin<Box<dyn Future<Output = QueryResult<Output>> + Send + 'changes>>
    where
        Changes: 'changes,
        'conn: 'changes,
        Self: 'changes,
    {
        if let Err(e) = self.before_statement() {
            return Box::pin(std::future::ready(Err(e)));
        }
        // It runs more than one statement, its errors unwatched: read the status again.
        self.watch.forget();
        self.inner.update_and_fetch(changeset)
    }
}

#[cfg(any(feature = "deadpool", feature = "bb8"))]
impl<C> diesel_async::pooled_connection::PoolableConnection for AsyncSignalConnection<C>
where
    C: diesel_async::pooled_connection::PoolableConnection + 'static,
{
    fn is_broken(&mut self) -> bool {
        self.is_broken_now() || self.inner.is_broken()
    }
}
