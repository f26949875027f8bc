//! The relay's SQL on diesel-async connections (features `outbox` and `async`): the query
//! objects of `backend.rs`, run with diesel-async's `RunQueryDsl` instead of Diesel's.

use std::future::Future;

use diesel::result::QueryResult;
use diesel_async::{AsyncConnection, RunQueryDsl};

use super::backend::{counts, sealed, ClaimedRow, NewRow};
use crate::AsyncSignalConnection;

/// An async connection an [`AsyncRelay`](super::AsyncRelay) can claim from:
/// `AsyncPgConnection`, `AsyncMysqlConnection`, `SyncConnectionWrapper<SqliteConnection>`
/// (with their features) and [`AsyncSignalConnection`] of any of them. Sealed: the SQL is the
/// crate's, the same statements as [`OutboxConnection`](super::OutboxConnection)'s.
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::SqliteConnection;
/// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
/// use diesel_transaction_signals::outbox::AsyncOutboxConnection;
/// use diesel_transaction_signals::AsyncSignalConnection;
///
/// fn takes<C: AsyncOutboxConnection>() {}
/// takes::<SyncConnectionWrapper<SqliteConnection>>();
/// takes::<AsyncSignalConnection<SyncConnectionWrapper<SqliteConnection>>>();
/// # }
/// ```
pub trait AsyncOutboxConnection: AsyncConnection + sealed::Sealed + Send + 'static {
    /// See `OutboxConnection::outbox_insert`.
    #[doc(hidden)]
    fn outbox_insert<'a>(
        &'a mut self,
        row: &'a NewRow,
    ) -> impl Future<Output = QueryResult<Option<i64>>> + Send + 'a;
    /// See `OutboxConnection::outbox_insert_many`.
    #[doc(hidden)]
    fn outbox_insert_many<'a>(
        &'a mut self,
        rows: &'a [NewRow],
    ) -> impl Future<Output = QueryResult<usize>> + Send + 'a;
    /// See `OutboxConnection::outbox_claim`.
    #[doc(hidden)]
    fn outbox_claim<'a>(
        &'a mut self,
        owner: &'a str,
        queues_json: &'a str,
        limit: i64,
        lease_ms: i64,
    ) -> impl Future<Output = QueryResult<Vec<ClaimedRow>>> + Send + 'a;
    /// See `OutboxConnection::outbox_complete`.
    #[doc(hidden)]
    fn outbox_complete<'a>(
        &'a mut self,
        owner: &'a str,
        ids: &'a [i64],
    ) -> impl Future<Output = QueryResult<usize>> + Send + 'a;
    /// See `OutboxConnection::outbox_fail`.
    #[doc(hidden)]
    fn outbox_fail<'a>(
        &'a mut self,
        owner: &'a str,
        id: i64,
        error: &'a str,
        delay_ms: i64,
        dead: bool,
    ) -> impl Future<Output = QueryResult<bool>> + Send + 'a;
    /// See `OutboxConnection::outbox_release`.
    #[doc(hidden)]
    fn outbox_release<'a>(
        &'a mut self,
        owner: &'a str,
        ids: &'a [i64],
    ) -> impl Future<Output = QueryResult<()>> + Send + 'a;
    /// See `OutboxConnection::outbox_unknown_queues`.
    #[doc(hidden)]
    fn outbox_unknown_queues<'a>(
        &'a mut self,
        queues_json: &'a str,
    ) -> impl Future<Output = QueryResult<Vec<(String, i64)>>> + Send + 'a;
}

/// Runs a query node on a diesel-async connection: the `run_sync!` of `backend.rs`, awaited.
#[allow(unused_macros)]
macro_rules! run_async {
    ($method:ident $q:expr, $conn:expr) => {
        diesel_async::RunQueryDsl::$method($q, $conn).await
    };
}

/// `outbox_complete`, `outbox_fail`, `outbox_release` and `outbox_unknown_queues` of the
/// backend module `$m`, awaited.
macro_rules! async_relay_statements {
    ($m:path) => {
        fn outbox_complete<'a>(
            &'a mut self,
            owner: &'a str,
            ids: &'a [i64],
        ) -> impl Future<Output = QueryResult<usize>> + Send + 'a {
            use $m as m;
            async move {
                if ids.is_empty() {
                    return Ok(0);
                }
                m::complete(owner, ids).execute(self).await
            }
        }

        fn outbox_fail<'a>(
            &'a mut self,
            owner: &'a str,
            id: i64,
            error: &'a str,
            delay_ms: i64,
            dead: bool,
        ) -> impl Future<Output = QueryResult<bool>> + Send + 'a {
            use $m as m;
            async move {
                m::fail(owner, id, error, delay_ms, dead)
                    .execute(self)
                    .await
                    .map(|n| n == 1)
            }
        }

        fn outbox_release<'a>(
            &'a mut self,
            owner: &'a str,
            ids: &'a [i64],
        ) -> impl Future<Output = QueryResult<()>> + Send + 'a {
            use $m as m;
            async move {
                if ids.is_empty() {
                    return Ok(());
                }
                m::release(owner, ids).execute(self).await.map(drop)
            }
        }

        fn outbox_unknown_queues<'a>(
            &'a mut self,
            queues_json: &'a str,
        ) -> impl Future<Output = QueryResult<Vec<(String, i64)>>> + Send + 'a {
            use $m as m;
            async move { m::unknown_queues(queues_json).load(self).await.map(counts) }
        }
    };
}

#[cfg(feature = "postgres")]
mod pg {
    use super::*;
    use crate::outbox::backend::pg;
    use diesel_async::AsyncPgConnection;

    impl sealed::Sealed for AsyncPgConnection {}

    impl AsyncOutboxConnection for AsyncPgConnection {
        async fn outbox_insert<'a>(&'a mut self, row: &'a NewRow) -> QueryResult<Option<i64>> {
            use crate::outbox::backend::pg::{pg_insert_one, Insert, InsertNoKey};
            use crate::outbox::backend::Id;
            pg_insert_one!(self, row, run_async)
        }

        async fn outbox_insert_many<'a>(&'a mut self, rows: &'a [NewRow]) -> QueryResult<usize> {
            use crate::outbox::backend::pg::{
                pg_insert_many, pg_insert_one, Insert, InsertMany, InsertManyNoKey, InsertNoKey,
                InsertOneNoKey,
            };
            use crate::outbox::backend::Id;
            pg_insert_many!(self, rows, run_async)
        }

        fn outbox_claim<'a>(
            &'a mut self,
            owner: &'a str,
            queues_json: &'a str,
            limit: i64,
            lease_ms: i64,
        ) -> impl Future<Output = QueryResult<Vec<ClaimedRow>>> + Send + 'a {
            pg::claim(owner, queues_json, limit, lease_ms).load(self)
        }

        async_relay_statements!(crate::outbox::backend::pg);
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use crate::outbox::backend::sqlite;
    use diesel::SqliteConnection;
    use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;

    impl sealed::Sealed for SyncConnectionWrapper<SqliteConnection> {}

    /// SQLite's inserts run the sync connection's own code on the wrapper's blocking thread.
    impl AsyncOutboxConnection for SyncConnectionWrapper<SqliteConnection> {
        async fn outbox_insert<'a>(&'a mut self, row: &'a NewRow) -> QueryResult<Option<i64>> {
            use crate::outbox::OutboxConnection;
            let row = row.clone();
            self.spawn_blocking(move |c| c.outbox_insert(&row)).await
        }

        async fn outbox_insert_many<'a>(&'a mut self, rows: &'a [NewRow]) -> QueryResult<usize> {
            use crate::outbox::OutboxConnection;
            let rows = rows.to_vec();
            self.spawn_blocking(move |c| c.outbox_insert_many(&rows))
                .await
        }

        fn outbox_claim<'a>(
            &'a mut self,
            owner: &'a str,
            queues_json: &'a str,
            limit: i64,
            lease_ms: i64,
        ) -> impl Future<Output = QueryResult<Vec<ClaimedRow>>> + Send + 'a {
            sqlite::claim(owner, queues_json, limit, lease_ms).load(self)
        }

        async_relay_statements!(crate::outbox::backend::sqlite);
    }
}

#[cfg(feature = "mysql")]
mod mysql {
    use super::*;
    use crate::outbox::backend::{mysql, Id};
    use diesel_async::{AsyncMysqlConnection, TransactionManager};

    type Tm = <AsyncMysqlConnection as AsyncConnection>::TransactionManager;

    impl sealed::Sealed for AsyncMysqlConnection {}

    /// The three statements of a MySQL claim (see `backend::mysql`), inside a transaction.
    async fn claim_in_transaction(
        conn: &mut AsyncMysqlConnection,
        owner: &str,
        queues_json: &str,
        limit: i64,
        lease_ms: i64,
    ) -> QueryResult<Vec<ClaimedRow>> {
        let ids: Vec<Id> = mysql::claim_lock(queues_json, limit).load(conn).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        mysql::claim_update(owner, &ids, lease_ms)
            .execute(conn)
            .await?;
        mysql::claim_read(&ids).load(conn).await
    }

    impl AsyncOutboxConnection for AsyncMysqlConnection {
        async fn outbox_insert<'a>(&'a mut self, row: &'a NewRow) -> QueryResult<Option<i64>> {
            use crate::outbox::backend::mysql::{insert_one, last_insert_id, mysql_insert_one};
            mysql_insert_one!(self, row, run_async)
        }

        async fn outbox_insert_many<'a>(&'a mut self, rows: &'a [NewRow]) -> QueryResult<usize> {
            use crate::outbox::backend::chunks;
            use crate::outbox::backend::mysql::{
                insert_one, last_insert_id, multi_insert, mysql_insert_many, mysql_insert_one,
                MYSQL_BYTES, MYSQL_ROWS,
            };
            mysql_insert_many!(self, rows, run_async)
        }

        async fn outbox_claim<'a>(
            &'a mut self,
            owner: &'a str,
            queues_json: &'a str,
            limit: i64,
            lease_ms: i64,
        ) -> QueryResult<Vec<ClaimedRow>> {
            mysql::claim_isolation().execute(self).await?;
            Tm::begin_transaction(self).await?;
            match claim_in_transaction(self, owner, queues_json, limit, lease_ms).await {
                Ok(rows) => {
                    Tm::commit_transaction(self).await?;
                    Ok(rows)
                }
                Err(e) => {
                    // The claim's error is the one to report; a failed rollback leaves the
                    // connection broken for the pool to discard.
                    let _ = Tm::rollback_transaction(self).await;
                    Err(e)
                }
            }
        }

        async_relay_statements!(crate::outbox::backend::mysql);
    }
}

impl<C: AsyncOutboxConnection> sealed::Sealed for AsyncSignalConnection<C> {}

/// The relay's statements never run inside a user's transaction: they go to the wrapped
/// connection directly, as `SignalConnection`'s do (through `inner_mut`, so the driver reads
/// the inner status again afterwards: a claim may run its own transaction).
impl<C: AsyncOutboxConnection> AsyncOutboxConnection for AsyncSignalConnection<C> {
    /// Inserts run in the caller's transaction: refused like any statement in a transaction
    /// the server ended, and their failure is noted like any statement's.
    async fn outbox_insert<'a>(&'a mut self, row: &'a NewRow) -> QueryResult<Option<i64>> {
        self.before_statement()?;
        let result = self.inner.outbox_insert(row).await;
        self.noted(result)
    }

    async fn outbox_insert_many<'a>(&'a mut self, rows: &'a [NewRow]) -> QueryResult<usize> {
        self.before_statement()?;
        let result = self.inner.outbox_insert_many(rows).await;
        self.noted(result)
    }

    fn outbox_claim<'a>(
        &'a mut self,
        owner: &'a str,
        queues_json: &'a str,
        limit: i64,
        lease_ms: i64,
    ) -> impl Future<Output = QueryResult<Vec<ClaimedRow>>> + Send + 'a {
        self.inner_mut()
            .outbox_claim(owner, queues_json, limit, lease_ms)
    }

    fn outbox_complete<'a>(
        &'a mut self,
        owner: &'a str,
        ids: &'a [i64],
    ) -> impl Future<Output = QueryResult<usize>> + Send + 'a {
        self.inner_mut().outbox_complete(owner, ids)
    }

    fn outbox_fail<'a>(
        &'a mut self,
        owner: &'a str,
        id: i64,
        error: &'a str,
        delay_ms: i64,
        dead: bool,
    ) -> impl Future<Output = QueryResult<bool>> + Send + 'a {
        self.inner_mut()
            .outbox_fail(owner, id, error, delay_ms, dead)
    }

    fn outbox_release<'a>(
        &'a mut self,
        owner: &'a str,
        ids: &'a [i64],
    ) -> impl Future<Output = QueryResult<()>> + Send + 'a {
        self.inner_mut().outbox_release(owner, ids)
    }

    fn outbox_unknown_queues<'a>(
        &'a mut self,
        queues_json: &'a str,
    ) -> impl Future<Output = QueryResult<Vec<(String, i64)>>> + Send + 'a {
        self.inner_mut().outbox_unknown_queues(queues_json)
    }
}
