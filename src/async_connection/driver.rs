//! The async driver of the [`Ledger`](crate::ledger::Ledger): [`AsyncSignalTransactionManager`]
//! does what the sync manager does, with diesel-async's I/O: read the inner status, ask the
//! ledger what to send, send it, hand the ledger the result and the status after, carry out
//! what it settled. The states and transitions are documented once, in `src/ledger.rs`.
//!
//! What async adds, each at one place here:
//! - **cancellation**: a `transaction` future dropped inside its closure, or in the pre-commit
//!   phase after it, leaves an abandoned mark in the connection's inbox (its task-local
//!   `Scope`, `registry::task`); the connection's next operation rolls the level back (its
//!   rollback hooks run then, once) and statements are refused until it has.
//!   A future dropped while the outermost COMMIT is in flight settles its hooks `Unknown`
//!   (the in-flight guard in [`commit_level`](AsyncSignalConnection::commit_level));
//! - **what diesel-async does not notice** (`watch.rs`): PostgreSQL's aborted transaction,
//!   MySQL's deadlock, SQLite's whole-transaction rollback;
//! - **what the driver knows without asking** (`watch.rs` too): SQLite's inner status, moved on
//!   by the driver's own BEGIN, COMMIT and ROLLBACK and forgotten by anything else that could
//!   change it, so the common path never reads it across threads (`Watch::known`);
//! - `on_commit_async` futures, awaited after the commit hooks.
//!
//! The futures of paths taken only after a failure or a cancellation (`look`, the rollbacks
//! after a panic, a failed or refused commit, the liveness check after an unclassified COMMIT
//! error) are boxed where they are awaited: inline, they would size the state of every
//! `transaction` future (768 bytes instead of 656 for an empty SQLite one), and the common
//! path pays for the state it touches at every poll in cache misses.

use std::any::Any;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::task::Poll;

use diesel::connection::{TransactionManagerStatus, ValidTransactionManagerStatus};
use diesel::result::{DatabaseErrorKind, Error, QueryResult};
use diesel_async::{AsyncConnection, TransactionManager};

use super::forward::AsyncFunc;
use super::watch::Backend;
use super::{AsyncSignalConnection, AsyncWork};
use crate::connection::manager::{classify_commit_error, commit_result, status_of};
use crate::connection::server::{ends_transaction, Ending};
use crate::error::TransactionAborted;
use crate::ledger::{Call, Op, Plan, Status};
use crate::outcome::Outcome;
use crate::pre_commit::PreCommitConnection;
use crate::registry::{self, task};
use crate::report::{panic_message, report, FailureCause, HookFailure, HookKind};
use crate::signals::{self, Veto};

/// A savepoint name no level ever uses: `ROLLBACK TO` it always fails, without effect, and
/// makes SQLite's connection re-read its autocommit state.
const SQLITE_PROBE: &str = "ROLLBACK TO dts_autocommit_probe";

/// The `TransactionManager` of [`AsyncSignalConnection<C>`]: wraps `C`'s own manager and settles
/// hooks at every transition, as [`SignalTransactionManager`](crate::SignalTransactionManager)
/// does for sync connections. Pools and diesel-async's default `transaction` (a pool object's)
/// drive it directly; hooks still run.
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::{Connection, SqliteConnection};
/// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
/// use diesel_async::TransactionManager;
/// use diesel_transaction_signals::{AsyncSignalConnection, AsyncSignalTransactionManager};
///
/// type Manager = AsyncSignalTransactionManager<SyncConnectionWrapper<SqliteConnection>>;
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// let raw: SyncConnectionWrapper<SqliteConnection> = SyncConnectionWrapper::new(SqliteConnection::establish(":memory:").unwrap());
/// let mut conn = AsyncSignalConnection::new(raw);
/// let (tx, rx) = std::sync::mpsc::channel();
/// Manager::begin_transaction(&mut conn).await.unwrap();
/// conn.on_commit(move || tx.send("committed").unwrap());
/// Manager::commit_transaction(&mut conn).await.unwrap();
/// assert_eq!(rx.try_recv(), Ok("committed"));
/// # });
/// # }
/// ```
pub struct AsyncSignalTransactionManager<C>(PhantomData<fn() -> C>);

impl<C> std::fmt::Debug for AsyncSignalTransactionManager<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AsyncSignalTransactionManager")
    }
}

impl<C> TransactionManager<AsyncSignalConnection<C>> for AsyncSignalTransactionManager<C>
where
    C: AsyncConnection + 'static,
{
    type TransactionStateData =
        <C::TransactionManager as TransactionManager<C>>::TransactionStateData;

    fn begin_transaction(
        conn: &mut AsyncSignalConnection<C>,
    ) -> impl Future<Output = QueryResult<()>> + Send {
        conn.begin_level()
    }

    fn rollback_transaction(
        conn: &mut AsyncSignalConnection<C>,
    ) -> impl Future<Output = QueryResult<()>> + Send {
        conn.rollback_level()
    }

    fn commit_transaction(
        conn: &mut AsyncSignalConnection<C>,
    ) -> impl Future<Output = QueryResult<()>> + Send {
        conn.commit_level()
    }

    fn transaction_manager_status_mut(
        conn: &mut AsyncSignalConnection<C>,
    ) -> &mut TransactionManagerStatus {
        // The caller may change it: the driver reads it again next time.
        conn.watch.forget();
        C::TransactionManager::transaction_manager_status_mut(&mut conn.inner)
    }

    fn is_broken_transaction_manager(conn: &mut AsyncSignalConnection<C>) -> bool {
        conn.is_broken_now()
    }
}

/// Polls `fut`, catching a panic.
async fn catch_panic<F: Future>(fut: F) -> Result<F::Output, Box<dyn Any + Send>> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(
        |cx| match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        },
    )
    .await
}

impl<C: AsyncConnection + 'static> AsyncSignalConnection<C> {
    /// The inner status, with what the watch knows (PostgreSQL's aborted transaction). On
    /// SQLite, read only when the watch does not know it (see `Watch::known`).
    fn status(&mut self) -> Status {
        let inner = match self.watch.known() {
            Some(known) => known,
            None => {
                let read = status_of(C::TransactionManager::transaction_manager_status_mut(
                    &mut self.inner,
                ));
                self.watch.remember(read);
                read
            }
        };
        match inner {
            Status::Open { depth, aborted } => Status::Open {
                depth,
                aborted: aborted || self.watch.aborted_at.is_some(),
            },
            other => other,
        }
    }

    /// Moves `defer`red hooks into place and makes the ledger agree with the inner status
    /// (row S1; a MySQL deadlock the watch saw: row E1). Returns the status it read (`None`
    /// when no level is open).
    pub(crate) fn sync(&mut self) -> Option<Status> {
        self.book.drain_inbox();
        if self.book.ledger.depth() == 0 {
            return None;
        }
        if self.watch.deadlock {
            self.watch.deadlock = false;
            self.lose(Outcome::RolledBack, "a deadlock");
        }
        let inner = self.status();
        if self.book.ledger.lost().is_none() {
            if let Some(step) = self.book.ledger.vanished(inner) {
                log::warn!(
                    target: "diesel_transaction_signals",
                    "connection {}: transaction level(s) ended without the wrapper \
                     (raw COMMIT/ROLLBACK SQL, or a transaction driven through inner_mut())",
                    self.book.label
                );
                self.book.apply(step);
            }
        }
        Some(inner)
    }

    /// Row E1: the server ended the transaction; the caller's levels stay open with `fate`,
    /// and diesel-async's status says what the server has: no transaction.
    #[cold]
    fn lose(&mut self, fate: Outcome, cause: &str) {
        if self.book.lose(fate, cause) {
            *C::TransactionManager::transaction_manager_status_mut(&mut self.inner) =
                TransactionManagerStatus::Valid(ValidTransactionManagerStatus::default());
            self.watch.forget();
        }
    }

    /// Refuses a statement that must not run now, and tells the watch where it runs.
    #[inline]
    pub(crate) fn before_statement(&mut self) -> Result<(), Error> {
        if self.watch.deadlock {
            self.sync();
        }
        if self.book.inbox.abandoned().is_some() {
            return Err(TransactionAborted::abandoned_error());
        }
        if self.book.ledger.refuses_statements() {
            return Err(TransactionAborted::statement_error());
        }
        self.watch.depth = self.book.ledger.live_depth();
        Ok(())
    }

    /// Notes the failure of a statement the wrapper ran on the inner connection itself (the
    /// outbox's inserts), as the statement futures do for the others.
    #[cfg(feature = "outbox")]
    pub(crate) fn noted<T>(&mut self, result: QueryResult<T>) -> QueryResult<T> {
        if let Err(e) = &result {
            self.watch.failed(e);
        }
        result
    }

    /// What needs I/O before the next operation: the rollback of an abandoned level, a probe
    /// after a failed statement.
    pub(crate) async fn look(&mut self) {
        if let Some(depth) = self.book.inbox.abandoned() {
            self.book.inbox.clear_abandoned();
            if self.book.ledger.depth() >= depth {
                log::warn!(
                    target: "diesel_transaction_signals",
                    "connection {}: a transaction future was dropped before its COMMIT was \
                     sent; rolling back level {depth} and above before the connection is used \
                     again",
                    self.book.label
                );
                let _ = self
                    .rollback_to(depth, "its transaction future was dropped before it ended")
                    .await;
            }
        }
        if self.watch.probe {
            self.watch.probe = false;
            if self.book.ledger.live_depth() > 0 {
                self.probe().await;
            }
        }
    }

    /// After a failed statement: did the server end the transaction?
    #[cold]
    async fn probe(&mut self) {
        match self.watch.backend {
            Backend::Sqlite => {
                // Fails either way; in autocommit Diesel then resets its status.
                self.watch.forget();
                let _ = self.inner.batch_execute(SQLITE_PROBE).await;
                if self.status().depth() < self.book.ledger.live_depth() {
                    self.lose(
                        Outcome::RolledBack,
                        "a statement's error rolled the whole transaction back",
                    );
                }
            }
            Backend::Mysql => {
                let timeout = std::mem::take(&mut self.watch.lock_wait_timeout);
                if self.server_in_transaction().await == Some(false) {
                    let cause = if timeout {
                        "a lock wait timeout"
                    } else {
                        "the connection was lost"
                    };
                    self.lose(Outcome::RolledBack, cause);
                }
            }
            Backend::Postgres | Backend::Other => {}
        }
    }

    /// MySQL / MariaDB: whether the server still has a transaction open (`@@in_transaction`);
    /// `None` when it cannot say.
    async fn server_in_transaction(&mut self) -> Option<bool> {
        #[cfg(feature = "mysql")]
        {
            let inner: &mut dyn Any = &mut self.inner;
            if let Some(conn) = inner.downcast_mut::<diesel_async::AsyncMysqlConnection>() {
                use diesel_async::RunQueryDsl;
                return diesel::sql_query("SELECT CAST(@@in_transaction AS SIGNED) AS open")
                    .get_result::<crate::mysql::InTransaction>(conn)
                    .await
                    .ok()
                    .map(|r| r.open != 0);
            }
        }
        None
    }

    /// After `batch_execute(sql)` succeeded inside a transaction: raw SQL may have ended it.
    pub(crate) async fn batch_ran(&mut self, sql: &str) {
        if self.book.ledger.live_depth() == 0 {
            return;
        }
        let mysql = self.watch.backend == Backend::Mysql;
        let Some(ending) = ends_transaction(sql, mysql) else {
            return;
        };
        match self.watch.backend {
            Backend::Mysql => {
                if self.server_in_transaction().await == Some(false) {
                    match ending {
                        Ending::Explicit => {
                            self.lose(Outcome::Unknown, "raw SQL ended it (COMMIT or ROLLBACK)")
                        }
                        Ending::Implicit => self.lose(
                            Outcome::Committed,
                            "an implicit commit before DDL or LOCK TABLES",
                        ),
                    }
                }
            }
            Backend::Sqlite => {
                self.watch.forget();
                let _ = self.inner.batch_execute(SQLITE_PROBE).await;
                if self.status().depth() < self.book.ledger.live_depth() {
                    self.lose(Outcome::Unknown, "raw SQL ended it (COMMIT or ROLLBACK)");
                }
            }
            // diesel-async's PostgreSQL connection does not read the server's transaction
            // status: a raw COMMIT or ROLLBACK is taken at its word.
            Backend::Postgres | Backend::Other => {
                self.lose(Outcome::Unknown, "raw SQL ended it (COMMIT or ROLLBACK)")
            }
        }
    }

    /// Whether a pool must discard the connection: its manager is broken, a transaction is
    /// open (not a test transaction's), or an abandoned level awaits its rollback.
    pub(crate) fn is_broken_now(&mut self) -> bool {
        self.sync();
        self.book.inbox.abandoned().is_some()
            || C::TransactionManager::is_broken_transaction_manager(&mut self.inner)
            || (self.book.ledger.depth() > 0 && !self.book.ledger.is_test_transaction())
    }

    /// Whether [`look`](Self::look) has anything to do: one load and one flag.
    #[inline]
    fn needs_look(&self) -> bool {
        self.watch.probe || self.book.inbox.abandoned().is_some()
    }

    /// Begins a level (rows B1-B3), opened by the manager alone: it goes in the task map.
    pub(crate) async fn begin_level(&mut self) -> QueryResult<()> {
        self.begin(false).await
    }

    /// Begins a level (rows B1-B3); `scoped`: for a `transaction` closure that runs in a
    /// task-local scope of its own (see `registry::task::Scope`), not in the task map.
    async fn begin(&mut self, scoped: bool) -> QueryResult<()> {
        if self.needs_look() {
            Box::pin(self.look()).await;
        }
        let before = self.sync().unwrap_or(Status::Idle);
        if self.book.ledger.plan(Op::Begin, before) == Plan::Refuse {
            return Err(TransactionAborted::statement_error());
        }
        let known = self.watch.sending();
        let result = C::TransactionManager::begin_transaction(&mut self.inner).await;
        self.watch.returned(known, Op::Begin, result.is_ok());
        result?;
        if before.depth() == 0 {
            self.watch.reset();
        }
        if scoped {
            self.book.open_scoped_level();
        } else {
            self.book.open_task_level();
        }
        Ok(())
    }

    /// Rolls back the innermost level (rows X1, X2, L2, C5).
    pub(crate) async fn rollback_level(&mut self) -> QueryResult<()> {
        if self.needs_look() {
            Box::pin(self.look()).await;
        }
        self.rollback_once().await
    }

    async fn rollback_once(&mut self) -> QueryResult<()> {
        let before = match self.sync() {
            Some(status) => status,
            None => self.status(),
        };
        let plan = self.book.ledger.plan(Op::Rollback, before);
        let result = match plan {
            Plan::Forward => {
                let known = self.watch.sending();
                let result = C::TransactionManager::rollback_transaction(&mut self.inner).await;
                self.watch.returned(known, Op::Rollback, result.is_ok());
                result
            }
            _ => Ok(()),
        };
        if result.is_ok() && plan == Plan::Forward {
            self.watch.rolled_back_to(before.depth());
        }
        let call = if result.is_ok() {
            Call::Ok
        } else {
            Call::Failed
        };
        let after = self.status();
        let step = self
            .book
            .ledger
            .step(Op::Rollback, plan, before, call, after);
        self.book.apply(step);
        if self.book.ledger.depth() == 0 {
            self.watch.reset();
        }
        result
    }

    /// Rolls back until fewer than `depth` levels are open; returns the first error.
    pub(crate) async fn rollback_to(&mut self, depth: usize, why: &str) -> QueryResult<()> {
        let mut first_error = Ok(());
        loop {
            self.sync();
            let open = self.book.ledger.depth();
            if open < depth {
                break;
            }
            if let Err(e) = self.rollback_once().await {
                log::warn!(
                    target: "diesel_transaction_signals",
                    "connection {}: rollback after {why} failed: {e}",
                    self.book.label
                );
                if first_error.is_ok() {
                    first_error = Err(e);
                }
            }
            if self.book.ledger.depth() >= open {
                // Nothing moved: give the levels up rather than loop.
                self.book.close(depth - 1, Outcome::RolledBack, why);
                break;
            }
        }
        first_error
    }

    /// Commits the innermost level (rows R1-R3, C1-C5, L1), then awaits the `on_commit_async`
    /// futures of a transaction that committed.
    pub(crate) async fn commit_level(&mut self) -> QueryResult<()> {
        if self.needs_look() {
            Box::pin(self.look()).await;
        }
        let before = match self.sync() {
            Some(status) => status,
            None => self.status(),
        };
        self.commit_from(before, false).await
    }

    /// `commit_level` once looked and synced, from the inner status `before`; `scoped`: the
    /// level's scope is running, and is disarmed as a RELEASE is sent.
    async fn commit_from(&mut self, mut before: Status, scoped: bool) -> QueryResult<()> {
        let lost = self.book.ledger.lost();
        if self.book.ledger.depth() > 1 && lost.is_none() && self.watch.aborted_at.is_some() {
            // PostgreSQL refuses RELEASE in an aborted transaction, and diesel-async would count
            // the savepoint closed while the server keeps it. Refuse here (row R2): the caller
            // rolls the savepoint back, which clears a failure that happened inside it.
            return Err(TransactionAborted::release_refused_error());
        }
        if before
            == (Status::Open {
                depth: 1,
                aborted: false,
            })
            && lost.is_none()
            && (signals::PRE_COMMIT.is_active() || self.book.ledger.has_pre_commit())
        {
            if let Err(e) = self.pre_commit().await {
                let _ = Box::pin(self.rollback_to(1, "the commit was refused before COMMIT")).await;
                return Err(e);
            }
            before = self.sync().unwrap_or(Status::Idle);
        }
        let plan = self.book.ledger.plan(Op::Commit, before);
        let outermost = before.depth() == 1 && plan == Plan::Forward;
        let slot = outermost.then(|| self.book.seal());
        let lost = self.book.ledger.lost().is_some();
        let release = scoped && plan == Plan::Forward && before.depth() > 1;
        if release {
            task::arm(false);
        }
        let result = {
            // Dropped while COMMIT is in flight: only the server knows (the inner manager
            // marks itself broken, so a pool discards the connection).
            let in_flight = scopeguard::guard((&mut self.book, outermost), |(book, armed)| {
                if armed {
                    book.close(
                        0,
                        Outcome::Unknown,
                        "the transaction future was dropped while COMMIT was in flight",
                    );
                }
            });
            let known = self.watch.sending();
            let result = match plan {
                Plan::Forward => {
                    let result = C::TransactionManager::commit_transaction(&mut self.inner).await;
                    self.watch.returned(known, Op::Commit, result.is_ok());
                    result
                }
                Plan::RollbackInstead => {
                    let result = C::TransactionManager::rollback_transaction(&mut self.inner).await;
                    self.watch.returned(known, Op::Rollback, result.is_ok());
                    result
                }
                Plan::Nothing if lost => Ok(()),
                Plan::Nothing | Plan::Refuse => {
                    C::TransactionManager::commit_transaction(&mut self.inner).await
                }
            };
            // An error without a class (PostgreSQL's FATAL "terminating connection" read as
            // COMMIT's answer, MySQL's lost connection) says nothing of the connection: ask it,
            // still under the guard, with a statement that changes nothing.
            let dead = match &result {
                Err(Error::DatabaseError(DatabaseErrorKind::Unknown, _)) => matches!(
                    Box::pin(self.inner.batch_execute("SELECT 1")).await,
                    Err(Error::DatabaseError(
                        DatabaseErrorKind::ClosedConnection
                            | DatabaseErrorKind::UnableToSendCommand,
                        _
                    ))
                ),
                _ => false,
            };
            let (book, _) = scopeguard::ScopeGuard::into_inner(in_flight);
            if let Some(slot) = slot {
                registry::unseal(slot, &book.inbox);
            }
            (result, dead)
        };
        let (result, dead) = result;
        let result = self.commit_settled(plan, before, result, dead);
        if self.book.ledger.depth() == 0 {
            self.watch.reset();
            if self.awaits_after_commit {
                self.run_after_commit().await;
            }
        }
        result
    }

    /// Settles what a COMMIT (or RELEASE) planned as `plan` that returned `result` closed, and
    /// says what `commit_transaction` returns.
    fn commit_settled(
        &mut self,
        plan: Plan,
        before: Status,
        result: QueryResult<()>,
        dead: bool,
    ) -> QueryResult<()> {
        let after = self.status();
        let call = match &result {
            Ok(()) => Call::Ok,
            Err(e) => classify_commit_error(e, after == Status::Broken, || dead),
        };
        let lost = self.book.ledger.lost();
        let step = self.book.ledger.step(Op::Commit, plan, before, call, after);
        self.book.apply(step);
        commit_result(plan, lost, result)
    }

    /// The phase between the closure's end and COMMIT: `PRE_COMMIT` receivers, then the
    /// pre-commit work in registration order (async `before_commit` work awaited with the
    /// connection), until the queue stays empty. An error or a veto refuses the commit; a
    /// panic rolls back and continues.
    async fn pre_commit(&mut self) -> QueryResult<()> {
        if signals::PRE_COMMIT.is_active() {
            let event = self.book.event(None);
            signals::PRE_COMMIT
                .send_veto(&event)
                .map_err(Veto::into_error)?;
        }
        loop {
            self.sync();
            if self.book.ledger.depth() != 1 || self.book.ledger.lost().is_some() {
                return Ok(());
            }
            let Some(pending) = self.book.next_pre_commit_round() else {
                return Ok(());
            };
            let mut pending = pending.into_iter();
            while let Some(hook) = pending.next() {
                let location = hook.location();
                let Some(f) = hook.into_pre_commit() else {
                    continue;
                };
                let mut work: Option<AsyncWork<C>> = None;
                let (id, backend) = (self.book.label.id, self.book.backend);
                let result = catch_unwind(AssertUnwindSafe(|| {
                    f(&mut PreCommitConnection {
                        conn: &mut work,
                        id,
                        backend,
                    })
                }));
                let result = match (result, work) {
                    (Ok(Ok(())), Some(work)) => catch_panic(work(self)).await,
                    (other, _) => other,
                };
                self.book.ledger.totals.ran += 1;
                let failure = match result {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => Err(e),
                    Err(panic) => Ok(panic),
                };
                self.book
                    .pre_commit_failed(location, failure.as_ref().err(), pending);
                match failure {
                    Err(e) => return Err(e),
                    Ok(panic) => {
                        let _ =
                            Box::pin(self.rollback_to(1, "a before_commit hook panicked")).await;
                        resume_unwind(panic);
                    }
                }
            }
        }
    }

    /// Awaits the `on_commit_async` futures of the transaction that just committed, in order.
    /// If this future is dropped first, the rest are spawned (see `on_commit_async`).
    async fn run_after_commit(&mut self) {
        self.awaits_after_commit = false;
        let queue = {
            let mut queue = self.after_commit.lock().unwrap_or_else(|e| e.into_inner());
            if queue.is_empty() {
                return;
            }
            std::mem::take(&mut *queue)
        };
        let label = self.book.label.clone();
        let spawn_label = label.clone();
        // `(the one being awaited, the rest)`: if this future is dropped, both go on in one
        // spawned task, in order; the one being awaited resumes where it was.
        let mut pending = scopeguard::guard(
            (None::<AfterCommitItem>, queue.into_iter()),
            move |(current, rest)| {
                let left: Vec<AfterCommitItem> = current.into_iter().chain(rest).collect();
                if !left.is_empty() {
                    finish_elsewhere(left, spawn_label);
                }
            },
        );
        loop {
            let Some(next) = pending.1.next() else {
                return;
            };
            let (current, _) = &mut *pending;
            let (fut, location) = current.insert(next);
            let location = *location;
            let result = catch_panic(fut.as_mut()).await;
            pending.0 = None;
            settle_async(result, location, &label);
        }
    }

    /// `transaction`: begin, the closure, commit or roll back. A closure that panics has its
    /// level rolled back before the panic continues; a future dropped before COMMIT is sent
    /// leaves its level abandoned (rolled back at the connection's next operation).
    pub(crate) async fn run_transaction<'a, R, E, F>(&mut self, callback: F) -> Result<R, E>
    where
        for<'r> F: AsyncFnOnce(&'r mut Self) -> Result<R, E>
            + AsyncFunc<&'r mut Self, Result<R, E>, Fut: Send>
            + Send
            + 'a,
        E: From<Error> + Send,
        R: Send,
    {
        self.begin(true).await?;
        let depth = self.book.ledger.depth();
        let serial = self.book.ledger.innermost_serial();
        // The level's closure and its end run in a task-local scope: `defer` in it needs no
        // lock, and if this future is dropped before COMMIT is sent, the scope marks the level
        // abandoned (see `registry::task::Scope`).
        let scope = task::Scope::new(
            self.book.label.id,
            serial,
            depth,
            &self.book.inbox,
            self.scope_spare.pop(),
        );
        let (result, scope) = {
            let level = task::scoped(scope, self.run_level(callback, depth));
            let mut level = std::pin::pin!(level);
            let result = level.as_mut().await;
            (result, level.as_mut().take_value())
        };
        let (spare, mut left) = task::end_scope(scope);
        self.book.place_scoped(serial, &mut left);
        self.scope_spare.extend(spare);
        match result {
            Ok(result) => result,
            Err(panic) => resume_unwind(panic),
        }
    }

    /// The body of [`run_transaction`](Self::run_transaction), in the level's scope: the
    /// closure, then COMMIT or ROLLBACK of the level at `depth`. A panic of the closure is
    /// returned, once the level is rolled back.
    async fn run_level<'a, R, E, F>(
        &mut self,
        callback: F,
        depth: usize,
    ) -> Result<Result<R, E>, Box<dyn Any + Send>>
    where
        for<'r> F: AsyncFnOnce(&'r mut Self) -> Result<R, E>
            + AsyncFunc<&'r mut Self, Result<R, E>, Fut: Send>
            + Send
            + 'a,
        E: From<Error> + Send,
        R: Send,
    {
        let result = match catch_panic(callback(self)).await {
            Ok(result) => result,
            Err(panic) => {
                // As in sync: the level is rolled back (its rollback hooks run) before the
                // panic continues, so the connection stays usable.
                let _ = Box::pin(self.rollback_to(depth, "the transaction closure panicked")).await;
                return Err(panic);
            }
        };
        if self.needs_look() {
            Box::pin(self.look()).await;
        }
        // What the closure `defer`red and no operation of the connection took yet joins the
        // level here (`sync` takes it from the scope), before anything ends the level.
        let before = self.sync();
        if self.book.ledger.depth() < depth {
            // The closure ended the level itself (raw manager calls), or the connection broke
            // inside it and every level settled as rolled back.
            return Ok(match result {
                Ok(_) if self.status() == Status::Broken => {
                    Err(Error::BrokenTransactionManager.into())
                }
                other => other,
            });
        }
        Ok(match result {
            Ok(value) => {
                let before = before.unwrap_or_else(|| self.status());
                match self.commit_from(before, true).await {
                    Ok(()) => Ok(value),
                    Err(commit_error) => {
                        if depth > 1 && self.book.ledger.depth() >= depth {
                            // A failed RELEASE: the rollback below answers for the level.
                            task::arm(true);
                        }
                        let _ = Box::pin(self.rollback_to(depth, "its commit failed")).await;
                        Err(commit_error.into())
                    }
                }
            }
            Err(user_error) => match self
                .rollback_to(depth, "the closure returned an error")
                .await
            {
                Ok(()) | Err(Error::BrokenTransactionManager) => Err(user_error),
                Err(rollback_error) => Err(rollback_error.into()),
            },
        })
    }

    /// Rolls back the transaction levels left open by a `transaction` future that was dropped
    /// before its COMMIT was sent (their rollback hooks run now), if there are any. The connection's
    /// next transaction operation and `batch_execute` do this on their own; statements are
    /// refused until it is done.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::{Connection, QueryResult, SqliteConnection};
    /// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// use diesel_async::AsyncConnection;
    /// use diesel_transaction_signals::AsyncSignalConnection;
    ///
    /// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
    /// let raw: SyncConnectionWrapper<SqliteConnection> = SyncConnectionWrapper::new(SqliteConnection::establish(":memory:").unwrap());
    /// let mut conn = AsyncSignalConnection::new(raw);
    /// let (tx, rx) = std::sync::mpsc::channel();
    /// let (entered, inside) = tokio::sync::oneshot::channel::<()>();
    /// let abandoned = tokio::select! {
    ///     _ = conn.transaction(async |c| {
    ///         c.on_rollback(move || tx.send("rolled back").unwrap());
    ///         entered.send(()).unwrap();
    ///         std::future::pending::<QueryResult<()>>().await // never finishes
    ///     }) => false,
    ///     _ = inside => true, // the caller gives up: the transaction future is dropped
    /// };
    /// assert!(abandoned);
    /// conn.roll_back_abandoned().await.unwrap();
    /// assert_eq!(rx.try_recv(), Ok("rolled back"));
    /// assert_eq!(conn.transaction_depth(), 0);
    /// # });
    /// # }
    /// ```
    pub async fn roll_back_abandoned(&mut self) -> QueryResult<()> {
        match self.book.inbox.abandoned() {
            Some(depth) => {
                self.book.inbox.clear_abandoned();
                self.rollback_to(depth, "its transaction future was dropped before it ended")
                    .await
            }
            None => Ok(()),
        }
    }
}

/// An `on_commit_async` future and where it was registered.
type AfterCommitItem = (
    super::BoxFuture<'static, Option<String>>,
    &'static std::panic::Location<'static>,
);

/// The caller's future was dropped after COMMIT while `on_commit_async` futures were pending:
/// they go on in one task of the current runtime, in order (or are dropped with a warning
/// outside a runtime); a log line names each.
#[cold]
fn finish_elsewhere(left: Vec<AfterCommitItem>, label: crate::id::Label) {
    let runtime = tokio::runtime::Handle::try_current();
    for (_, location) in &left {
        match &runtime {
            Ok(_) => log::info!(
                target: "diesel_transaction_signals",
                "on_commit_async future registered at {location} spawned: the caller's \
                 transaction future was dropped after COMMIT (connection {label})"
            ),
            Err(_) => log::warn!(
                target: "diesel_transaction_signals",
                "on_commit_async future registered at {location} dropped unrun: the caller's \
                 future was dropped after COMMIT outside a tokio runtime (connection {label})"
            ),
        }
    }
    if let Ok(runtime) = runtime {
        runtime.spawn(async move {
            for (fut, location) in left {
                settle_async(catch_panic(fut).await, location, &label);
            }
        });
    }
}

/// Reports the result of an `on_commit_async` future.
fn settle_async(
    result: Result<Option<String>, Box<dyn Any + Send>>,
    location: &'static std::panic::Location<'static>,
    label: &crate::id::Label,
) {
    let cause = match result {
        Ok(None) => return,
        Ok(Some(message)) => FailureCause::Returned(message),
        Err(panic) => FailureCause::Panicked(panic_message(&*panic)),
    };
    report(HookFailure::new(
        HookKind::Commit,
        location,
        Some(label),
        cause,
    ));
}
