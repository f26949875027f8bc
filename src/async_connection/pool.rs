//! Pools of [`AsyncSignalConnection`] (features `deadpool`, `bb8`). diesel-async's own
//! `AsyncDieselConnectionManager<AsyncSignalConnection<C>>` works as it is: the wrapper reports
//! itself broken while a transaction is open (or one was abandoned), so deadpool discards such
//! a connection at its next checkout and bb8 when it is returned; its hooks settle as rolled
//! back then. [`manager_config`] adds what a pool cannot do on its own: the alias.

use std::sync::Arc;

use diesel_async::pooled_connection::{ManagerConfig, RecyclingMethod};
use diesel_async::{AsyncConnection, SimpleAsyncConnection};

use super::AsyncSignalConnection;

/// A pool manager configuration whose connections carry `alias` (in every signal event and
/// log line): set when a connection is created and again at every checkout, so a user who
/// renamed a connection while holding it does not hand the name to the next user. Checkouts
/// are verified with `SELECT 1`, as diesel-async's default (`RecyclingMethod::Verified`) does.
///
/// ```
/// # #[cfg(all(feature = "sqlite", feature = "deadpool"))] {
/// use diesel::SqliteConnection;
/// use diesel_async::pooled_connection::deadpool::Pool;
/// use diesel_async::pooled_connection::AsyncDieselConnectionManager;
/// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
/// use diesel_transaction_signals::{async_pool, AsyncSignalConnection};
///
/// type Conn = AsyncSignalConnection<SyncConnectionWrapper<SqliteConnection>>;
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// let manager = AsyncDieselConnectionManager::<Conn>::new_with_config(
///     ":memory:",
///     async_pool::manager_config("primary"),
/// );
/// let pool = Pool::builder(manager).max_size(2).build().unwrap();
/// let mut conn = pool.get().await.unwrap();
/// assert_eq!(conn.alias(), Some("primary"));
/// conn.set_alias("renamed");
/// drop(conn);
/// assert_eq!(pool.get().await.unwrap().alias(), Some("primary"), "reset at checkout");
/// # });
/// # }
/// ```
pub fn manager_config<C>(alias: impl Into<Arc<str>>) -> ManagerConfig<AsyncSignalConnection<C>>
where
    C: AsyncConnection + 'static,
{
    let alias: Arc<str> = alias.into();
    let mut config = ManagerConfig::<AsyncSignalConnection<C>>::default();
    let on_create = Arc::clone(&alias);
    config.custom_setup = Box::new(move |url| {
        let (alias, url) = (Arc::clone(&on_create), url.to_owned());
        Box::pin(async move {
            AsyncSignalConnection::<C>::establish(&url)
                .await
                .map(|conn| conn.with_alias(alias))
        })
    });
    config.recycling_method = RecyclingMethod::CustomFunction(Box::new(move |conn| {
        conn.set_alias(Arc::clone(&alias));
        Box::pin(conn.batch_execute("SELECT 1"))
    }));
    config
}
