//! Durable jobs from async code (features `outbox` and `async`): `defer_durable`, `enqueue`
//! and `enqueue_all` on [`AsyncSignalConnection`], and the async side of `defer_durable!`'s
//! batch. The rows are the same as the sync connection's, written by the same statements
//! (`backend.rs`, run by `async_backend.rs`), inside the caller's transaction.

use std::future::Future;
use std::sync::Mutex;

use serde::Serialize;

use super::async_backend::AsyncOutboxConnection;
use super::backend::NewRow;
use super::{batch_error, log_no_ops, wake, Batch, DurableJob, JobId, OutboxError};
use crate::AsyncSignalConnection;

impl<C: AsyncOutboxConnection> AsyncSignalConnection<C> {
    /// Enqueues a durable job in the current transaction, as
    /// [`SignalConnection::defer_durable`](crate::SignalConnection::defer_durable) does: the
    /// row commits or rolls back with the rest; outside a transaction it is its own committed
    /// write. Returns the job's id, or `None` when an idempotency key made it a no-op. The
    /// payload is serialized at the call.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::{Connection, QueryResult, SqliteConnection};
    /// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// use diesel_async::AsyncConnection;
    /// use diesel_migrations::MigrationHarness;
    /// use diesel_transaction_signals::{outbox, AsyncSignalConnection, SignalConnection};
    ///
    /// let dir = tempfile::tempdir().unwrap();
    /// let url = dir.path().join("jobs.db").to_string_lossy().into_owned();
    /// SignalConnection::<SqliteConnection>::establish(&url).unwrap()
    ///     .run_pending_migrations(outbox::migrations::SQLITE).unwrap();
    /// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
    /// let mut conn =
    ///     AsyncSignalConnection::<SyncConnectionWrapper<SqliteConnection>>::establish(&url)
    ///         .await
    ///         .unwrap();
    /// let id = conn
    ///     .transaction(async |c| {
    ///         c.defer_durable("emails", &"ada@example.com")
    ///             .await
    ///             .map_err(|e| diesel::result::Error::QueryBuilderError(e.into()))
    ///     })
    ///     .await
    ///     .unwrap();
    /// assert!(id.is_some());
    /// # });
    /// # }
    /// ```
    pub fn defer_durable<P: Serialize + ?Sized>(
        &mut self,
        queue: &str,
        payload: &P,
    ) -> impl Future<Output = Result<Option<JobId>, OutboxError>> + Send + '_ {
        let job = DurableJob::new(queue, payload);
        async move { self.enqueue(job?).await }
    }

    /// Enqueues a [`DurableJob`] built with options; see
    /// [`defer_durable`](Self::defer_durable).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::{Connection, SqliteConnection};
    /// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// use diesel_async::AsyncConnection;
    /// use diesel_migrations::MigrationHarness;
    /// use diesel_transaction_signals::outbox::{self, DurableJob};
    /// use diesel_transaction_signals::{AsyncSignalConnection, SignalConnection};
    ///
    /// let dir = tempfile::tempdir().unwrap();
    /// let url = dir.path().join("jobs.db").to_string_lossy().into_owned();
    /// SignalConnection::<SqliteConnection>::establish(&url).unwrap()
    ///     .run_pending_migrations(outbox::migrations::SQLITE).unwrap();
    /// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
    /// let mut conn =
    ///     AsyncSignalConnection::<SyncConnectionWrapper<SqliteConnection>>::establish(&url)
    ///         .await
    ///         .unwrap();
    /// let job = || DurableJob::new("emails", &1).unwrap().idempotency_key("welcome-1");
    /// assert!(conn.enqueue(job()).await.unwrap().is_some());
    /// assert_eq!(conn.enqueue(job()).await.unwrap(), None, "the same key again is a no-op");
    /// # });
    /// # }
    /// ```
    pub async fn enqueue(&mut self, job: DurableJob) -> Result<Option<JobId>, OutboxError> {
        let id = self.outbox_insert(&job.row).await?;
        self.wake_after_commit();
        Ok(id.map(JobId))
    }

    /// Enqueues many [`DurableJob`]s in multi-row statements and returns how many rows were
    /// written (a job whose idempotency key is already present is a no-op), as
    /// [`SignalConnection::enqueue_all`](crate::SignalConnection::enqueue_all) does.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::{Connection, SqliteConnection};
    /// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// use diesel_async::AsyncConnection;
    /// use diesel_migrations::MigrationHarness;
    /// use diesel_transaction_signals::outbox::{self, DurableJob};
    /// use diesel_transaction_signals::{AsyncSignalConnection, SignalConnection};
    ///
    /// let dir = tempfile::tempdir().unwrap();
    /// let url = dir.path().join("jobs.db").to_string_lossy().into_owned();
    /// SignalConnection::<SqliteConnection>::establish(&url).unwrap()
    ///     .run_pending_migrations(outbox::migrations::SQLITE).unwrap();
    /// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
    /// let mut conn =
    ///     AsyncSignalConnection::<SyncConnectionWrapper<SqliteConnection>>::establish(&url)
    ///         .await
    ///         .unwrap();
    /// let jobs = (0..3).map(|n| DurableJob::new("emails", &n).unwrap()).collect::<Vec<_>>();
    /// assert_eq!(conn.enqueue_all(jobs).await.unwrap(), 3);
    /// # });
    /// # }
    /// ```
    pub async fn enqueue_all<I>(&mut self, jobs: I) -> Result<usize, OutboxError>
    where
        I: IntoIterator<Item = DurableJob>,
    {
        let rows: Vec<NewRow> = jobs.into_iter().map(|job| job.row).collect();
        if rows.is_empty() {
            return Ok(0);
        }
        let written = self.outbox_insert_many(&rows).await?;
        self.wake_after_commit();
        Ok(written)
    }

    /// Rings the relays' bell now, or once the open transaction commits.
    fn wake_after_commit(&mut self) {
        if self.transaction_depth() == 0 {
            wake();
        } else {
            self.on_commit(wake);
        }
    }

    /// `defer_durable!`'s flush on an async connection: closes `batch` and writes its rows.
    pub(super) async fn flush_batch_async(
        &mut self,
        batch: &Mutex<Batch>,
    ) -> diesel::QueryResult<()> {
        let rows = {
            let mut batch = batch.lock().unwrap_or_else(|e| e.into_inner());
            batch.closed = true;
            std::mem::take(&mut batch.rows)
        };
        if rows.is_empty() {
            return Ok(());
        }
        let written = self
            .outbox_insert_many(&rows)
            .await
            .map_err(|e| batch_error(e, &rows))?;
        log_no_ops(written, rows.len());
        self.wake_after_commit();
        Ok(())
    }
}
