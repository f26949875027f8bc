//! The transaction manager of [`SignalConnection`]: Diesel's state machine, with hooks settled at
//! each transition. The states and transitions are documented on [`SignalTransactionManager`].

use std::marker::PhantomData;

use diesel::connection::{
    Connection, TransactionManager, TransactionManagerStatus, ValidTransactionManagerStatus,
};
use diesel::result::{DatabaseErrorKind, Error, QueryResult};

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use crate::connection::BeforeFn;
use crate::error::TransactionAborted;
use crate::hooks::{PreCommit, PreCommitHook};
use crate::registry;
use crate::signals::{self, Veto};
use crate::{Outcome, SignalConnection};

/// The [`TransactionManager`] of [`SignalConnection<C>`]: wraps `C`'s own manager and settles
/// hooks at every transition.
///
/// Users never name it; it is public because `Connection::TransactionManager` must be.
///
/// # States
///
/// The wrapper does not keep a transaction depth of its own: the inner connection's transaction
/// manager is the single source of truth, and the inner connection rewrites it behind any
/// manager's back (PostgreSQL reads libpq's status after every query, SQLite resets it after an
/// error in autocommit). So every transition re-reads the inner status, as `InnerState`:
///
/// | inner status | meaning |
/// |---|---|
/// | `Idle` | no transaction open |
/// | `Open { depth, aborted }` | `depth` levels open (1 = `BEGIN`, more = savepoints); `aborted` when the database has aborted the transaction (PostgreSQL after an error, MySQL after a deadlock) and a COMMIT would silently become a ROLLBACK |
/// | `Broken` | the manager is `InError` (lost connection, failed rollback): no transaction operation will run again, nothing will be committed |
///
/// Beside it the wrapper keeps one level of hooks per transaction level it saw
/// open. Before every operation a `sync` step makes the two agree: levels the inner
/// status no longer has ended behind the wrapper's back (raw `COMMIT`/`ROLLBACK` SQL, which
/// PostgreSQL reports to Diesel; SQLite and MySQL do not) and settle
/// as [`Outcome::Unknown`].
///
/// # Transitions
///
/// | operation | inner status before | SQL | hooks |
/// |---|---|---|---|
/// | begin | `Idle`/`Open(n)` | `BEGIN` / `SAVEPOINT` | open a level, enter it in the thread registry (local for a `transaction` closure, shared for a bare `begin_transaction`) |
/// | commit | `Open(n > 1)` | `RELEASE SAVEPOINT` | ok: the level's hooks join the enclosing level; error and the savepoint is gone: rollback hooks of the level run |
/// | commit | `Open(1)`, not aborted | `COMMIT` | ok: commit and complete hooks run (`Committed`); error: rollback hooks run (`RolledBack`), or nothing but complete hooks (`Unknown`) when the connection was lost during COMMIT |
/// | commit | `Open(1)`, aborted | `ROLLBACK` | rollback hooks run (`RolledBack`), [`TransactionAborted`](crate::TransactionAborted) is returned |
/// | commit / rollback | `Broken` | none | every level settles `RolledBack`: nothing can commit any more |
/// | rollback | `Open(n)` | `ROLLBACK [TO SAVEPOINT]` | the innermost level's rollback hooks run |
/// | `transaction` closure panics | `Open(n)` | rollback to the closure's level | its rollback hooks run, then the panic continues |
/// | connection dropped | any | (closing rolls back) | rollback hooks run; a test transaction's hooks are discarded |
///
/// Hooks always run after the SQL returned and after the level left the registry, so a hook
/// holds no database lock and a hook that registers hooks never lands in the level that is
/// ending.
///
/// # Example
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::connection::{Connection, TransactionManager};
/// use diesel::sqlite::SqliteConnection;
/// use diesel_transaction_signals::{SignalConnection, SignalTransactionManager};
///
/// // Pools and other generic code drive the manager directly; hooks still run.
/// type Manager = SignalTransactionManager<SqliteConnection>;
/// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
/// let (tx, rx) = std::sync::mpsc::channel();
/// Manager::begin_transaction(&mut conn).unwrap();
/// conn.on_commit(move || tx.send("committed").unwrap());
/// Manager::commit_transaction(&mut conn).unwrap();
/// assert_eq!(rx.try_recv(), Ok("committed"));
/// # }
/// ```
pub struct SignalTransactionManager<C>(PhantomData<fn() -> C>);

impl<C> std::fmt::Debug for SignalTransactionManager<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignalTransactionManager")
    }
}

/// The inner connection's transaction status, read fresh.
///
/// Eight bytes (Diesel's depth is a `NonZeroU32`), so it and `Option<InnerState>` travel in a
/// register rather than through memory on the commit path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InnerState {
    Idle,
    Open { depth: u32, aborted: bool },
    Broken,
}

const _: () = assert!(std::mem::size_of::<Option<InnerState>>() == 8);

impl InnerState {
    pub(crate) fn read<C: Connection>(conn: &mut C) -> Self {
        match C::TransactionManager::transaction_manager_status_mut(conn) {
            TransactionManagerStatus::InError => InnerState::Broken,
            TransactionManagerStatus::Valid(ValidTransactionManagerStatus {
                in_transaction: None,
                ..
            }) => InnerState::Idle,
            TransactionManagerStatus::Valid(ValidTransactionManagerStatus {
                in_transaction: Some(s),
                ..
            }) => InnerState::Open {
                depth: s.transaction_depth.get(),
                aborted: s.requires_rollback_maybe_up_to_top_level,
            },
        }
    }

    /// Levels open, counting a broken manager as none: nothing there will ever commit.
    pub(crate) fn depth(self) -> usize {
        match self {
            InnerState::Open { depth, .. } => depth as usize,
            InnerState::Idle | InnerState::Broken => 0,
        }
    }
}

/// Whether a COMMIT that failed with `err` may nevertheless have committed: the connection was
/// lost while COMMIT was in flight, so only the server knows. `connection_dead` asks the
/// backend, for errors that do not say (MySQL reports a lost connection as an unclassified
/// error).
fn commit_fate_unknown(
    err: &Error,
    broken_after: bool,
    connection_dead: impl FnOnce() -> bool,
) -> bool {
    let (commit_error, rollback_failed) = match err {
        Error::RollbackErrorOnCommit { commit_error, .. } => (&**commit_error, true),
        other => (other, false),
    };
    match commit_error {
        Error::DatabaseError(
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
            _,
        ) => true,
        Error::DatabaseError(DatabaseErrorKind::Unknown, _) => {
            (broken_after && !rollback_failed) || connection_dead()
        }
        // The database answered: a constraint, a serialization failure... nothing committed.
        Error::DatabaseError(..) => false,
        // Errors raised before anything was sent (a broken manager, no transaction).
        Error::BrokenTransactionManager | Error::NotInTransaction => false,
        _ => broken_after,
    }
}

impl<C: Connection + 'static> TransactionManager<SignalConnection<C>>
    for SignalTransactionManager<C>
{
    type TransactionStateData =
        <C::TransactionManager as TransactionManager<C>>::TransactionStateData;

    fn begin_transaction(conn: &mut SignalConnection<C>) -> QueryResult<()> {
        conn.sync();
        C::TransactionManager::begin_transaction(&mut conn.inner)?;
        let _ = conn.state.open_level(false);
        Ok(())
    }

    fn rollback_transaction(conn: &mut SignalConnection<C>) -> QueryResult<()> {
        conn.sync();
        if conn.ended_by_server() {
            let result = C::TransactionManager::rollback_transaction(&mut conn.inner);
            log::warn!(
                target: "diesel_transaction_signals",
                "connection {}: the MySQL server had already ended the transaction (an implicit \
                 commit before DDL or LOCK TABLES, or a rollback after an error): whether its \
                 work is in the database is unknown",
                conn.state.label
            );
            conn.state.finish_all(
                Outcome::Unknown,
                "the MySQL server ended the transaction on its own before the rollback",
            );
            return result;
        }
        let result = C::TransactionManager::rollback_transaction(&mut conn.inner);
        let after = InnerState::read(&mut conn.inner).depth();
        let why = if result.is_ok() {
            "rolled back"
        } else {
            "the rollback failed; the database discards the work when the connection closes"
        };
        conn.state.finish_above(after, Outcome::RolledBack, why);
        result
    }

    fn commit_transaction(conn: &mut SignalConnection<C>) -> QueryResult<()> {
        let before = conn.sync();
        commit_synced(conn, before)
    }

    fn transaction_manager_status_mut(
        conn: &mut SignalConnection<C>,
    ) -> &mut TransactionManagerStatus {
        C::TransactionManager::transaction_manager_status_mut(&mut conn.inner)
    }

    fn transaction<F, R, E>(conn: &mut SignalConnection<C>, callback: F) -> Result<R, E>
    where
        F: FnOnce(&mut SignalConnection<C>) -> Result<R, E>,
        E: From<Error>,
    {
        run_transaction(conn, C::TransactionManager::begin_transaction, callback)
    }

    fn is_broken_transaction_manager(conn: &mut SignalConnection<C>) -> bool {
        conn.sync();
        C::TransactionManager::is_broken_transaction_manager(&mut conn.inner)
    }
}

/// `commit_transaction` after [`SignalConnection::sync`] returned `before`.
#[inline(always)]
fn commit_synced<C: Connection + 'static>(
    conn: &mut SignalConnection<C>,
    before: Option<InnerState>,
) -> QueryResult<()> {
    let before = before.unwrap_or_else(|| InnerState::read(&mut conn.inner));
    // The fast path: a healthy level with nothing to run before COMMIT, which closes exactly
    // that level.
    let plain = match before {
        InnerState::Open { depth: 1, aborted } => {
            !aborted && !signals::PRE_COMMIT.is_active() && !conn.state.stack.has_before()
        }
        InnerState::Open { .. } => true,
        _ => false,
    };
    if plain {
        let result = C::TransactionManager::commit_transaction(&mut conn.inner);
        let after = InnerState::read(&mut conn.inner).depth();
        let open = conn.state.stack.depth();
        if result.is_ok() && after + 1 == open {
            conn.state.drain_inbox();
            if open > 1 {
                conn.state.release_level();
            } else if !conn.state.close_empty_innermost(Outcome::Committed) {
                conn.state.finish_level(Outcome::Committed, "committed");
            }
            return Ok(());
        }
        return commit_settled(conn, before, result);
    }
    commit_general(conn, before)
}

/// `commit_synced` beyond the fast path: the pre-commit phase, an aborted or broken
/// transaction.
#[inline(never)]
fn commit_general<C: Connection + 'static>(
    conn: &mut SignalConnection<C>,
    mut before: InnerState,
) -> QueryResult<()> {
    // The pre-commit phase has nothing to do without PRE_COMMIT receivers or
    // `before_commit` hooks: skip it (and its `sync`).
    if matches!(before, InnerState::Open { depth: 1, .. })
        && (signals::PRE_COMMIT.is_active() || conn.state.stack.has_before())
    {
        if let Err(e) = conn.pre_commit() {
            let _ = C::TransactionManager::rollback_transaction(&mut conn.inner);
            conn.state
                .finish_all(Outcome::RolledBack, "the commit was refused before COMMIT");
            return Err(e);
        }
        before = InnerState::read(&mut conn.inner);
    }
    match before {
        InnerState::Open {
            depth: 1,
            aborted: true,
        } => {
            // COMMIT would silently become ROLLBACK (PostgreSQL), or the server already
            // rolled back (MySQL deadlock): say so instead of reporting success.
            let rollback = C::TransactionManager::rollback_transaction(&mut conn.inner);
            conn.state.finish_all(
                Outcome::RolledBack,
                "the transaction was aborted by an earlier database error",
            );
            let aborted = TransactionAborted::into_error();
            return Err(match rollback {
                Ok(()) => aborted,
                Err(rollback_error) => Error::RollbackErrorOnCommit {
                    rollback_error: Box::new(rollback_error),
                    commit_error: Box::new(aborted),
                },
            });
        }
        InnerState::Broken => {
            let result = C::TransactionManager::commit_transaction(&mut conn.inner);
            conn.state.finish_all(
                Outcome::RolledBack,
                "the connection broke before COMMIT was sent",
            );
            return result;
        }
        _ => {}
    }
    let result = C::TransactionManager::commit_transaction(&mut conn.inner);
    commit_settled(conn, before, result)
}

/// Settles the levels a COMMIT (or RELEASE) that returned `result` closed.
#[inline(never)]
fn commit_settled<C: Connection + 'static>(
    conn: &mut SignalConnection<C>,
    before: InnerState,
    result: QueryResult<()>,
) -> QueryResult<()> {
    let after_state = InnerState::read(&mut conn.inner);
    let after = after_state.depth();
    match &result {
        Ok(()) => {
            while conn.state.stack.depth() > after {
                if conn.state.stack.depth() == 1 {
                    conn.state.finish_level(Outcome::Committed, "committed");
                } else {
                    conn.state.release_level();
                }
            }
        }
        Err(e) => {
            let top = before
                == InnerState::Open {
                    depth: 1,
                    aborted: false,
                };
            let broken = after_state == InnerState::Broken;
            let (outcome, why) = if top && commit_fate_unknown(e, broken, || conn.connection_dead())
            {
                (
                    Outcome::Unknown,
                    "the connection was lost while COMMIT was in flight",
                )
            } else {
                (Outcome::RolledBack, "the commit failed")
            };
            conn.state.finish_above(after, outcome, why);
        }
    }
    result
}

/// `Connection::transaction` with a custom begin (`BEGIN IMMEDIATE`, an isolation level), made
/// panic-safe: a panicking closure has its level rolled back (rollback hooks run) before the
/// panic continues, so the connection stays usable. Diesel's default leaves it open.
///
/// The level is *local* (see [`registry`](crate::registry)): it ends in this call, on this
/// thread, so `defer` inside it waits in the thread's buffer without a lock.
pub(crate) fn run_transaction<C, R, E, B, F>(
    conn: &mut SignalConnection<C>,
    begin: B,
    callback: F,
) -> Result<R, E>
where
    C: Connection + 'static,
    B: FnOnce(&mut C) -> QueryResult<()>,
    F: FnOnce(&mut SignalConnection<C>) -> Result<R, E>,
    E: From<Error>,
{
    conn.sync();
    begin(&mut conn.inner)?;
    let (serial, slot) = conn.state.open_level(true);
    let depth = conn.state.stack.depth();
    let mut guard = scopeguard::guard_on_unwind(conn, move |conn| {
        // A failure is logged in `rollback_to`; the panic is what the caller sees.
        let _ = conn.rollback_to(depth, "the transaction closure panicked");
    });
    let result = callback(&mut **guard);
    let conn = scopeguard::ScopeGuard::into_inner(guard);
    let inner = conn.sync();
    if conn.state.stack.depth() < depth {
        // The level is gone already: the closure ended it (raw manager calls), or the
        // connection broke inside it and every level settled as rolled back. If another
        // thread ended it, this thread still has its entry (and maybe hooks deferred to it):
        // drop the one, settle the others.
        registry::forget(conn.state.label.id, serial, slot);
        conn.state.drain_inbox();
        // Never report success for a broken connection.
        return match result {
            Ok(_) if InnerState::read(&mut conn.inner) == InnerState::Broken => {
                Err(Error::BrokenTransactionManager.into())
            }
            other => other,
        };
    }
    match result {
        Ok(value) => {
            let committed = commit_synced(conn, inner);
            match committed {
                Ok(()) => Ok(value),
                Err(commit_error) => {
                    // Diesel leaves a savepoint open when its RELEASE fails on a healthy
                    // transaction; roll it back so the nesting stays balanced.
                    // Logged in `rollback_to`; the commit error is the one to return.
                    let _ = conn.rollback_to(depth, "its commit failed");
                    Err(commit_error.into())
                }
            }
        }
        Err(user_error) => match conn.rollback_to(depth, "the closure returned an error") {
            Ok(()) | Err(Error::BrokenTransactionManager) => Err(user_error),
            Err(rollback_error) => Err(rollback_error.into()),
        },
    }
}

impl<C: Connection + 'static> SignalConnection<C> {
    /// The phase between the closure's end and COMMIT: `PRE_COMMIT` receivers, then
    /// `before_commit` hooks (and those they register) in registration order. An error or a
    /// veto refuses the commit; a panic in a hook rolls back and continues.
    fn pre_commit(&mut self) -> QueryResult<()> {
        if signals::PRE_COMMIT.is_active() {
            let event = self.state.event(None);
            signals::PRE_COMMIT
                .send_veto(&event)
                .map_err(Veto::into_error)?;
        }
        loop {
            self.sync();
            if self.state.stack.depth() != 1 {
                // A hook ended the transaction itself; COMMIT will report it.
                return Ok(());
            }
            let pending = self.state.stack.take_before();
            if pending.is_empty() {
                return Ok(());
            }
            let mut pending = pending.into_iter();
            while let Some(hook) = pending.next() {
                let location = hook.location();
                let result = match hook.into_pre_commit() {
                    Some(PreCommit::Before(hook)) => {
                        let f = hook
                            .downcast::<PreCommitHook<BeforeFn<C>>>()
                            .expect("before_commit hooks are stored with their connection's type")
                            .payload;
                        catch_unwind(AssertUnwindSafe(|| f(self)))
                    }
                    #[cfg(feature = "outbox")]
                    Some(PreCommit::Durable(row)) => Ok(self.write_durable(&row)),
                    None => continue,
                };
                let failed = match result {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(Err(e)),
                    Err(panic) => Some(Ok(panic)),
                };
                if let Some(failure) = failed {
                    for rest in pending {
                        log::debug!(
                            target: "diesel_transaction_signals",
                            "before_commit hook registered at {} discarded: an earlier one failed",
                            rest.location()
                        );
                    }
                    match failure {
                        Err(e) => {
                            log::debug!(
                                target: "diesel_transaction_signals",
                                "connection {}: before_commit hook registered at {location} refused the commit: {e}",
                                self.state.label
                            );
                            return Err(e);
                        }
                        Ok(panic) => {
                            let _ = self.rollback_to(1, "a before_commit hook panicked");
                            resume_unwind(panic);
                        }
                    }
                }
            }
        }
    }

    /// Whether a MySQL server ended the open transaction behind Diesel's back without Diesel
    /// knowing how: an implicit commit (DDL) or a rollback after an error Diesel does not flag.
    /// A deadlock, which Diesel flags, is a known rollback and not asked about. Asked only
    /// before a rollback, so the happy path pays nothing (see `mysql.rs`).
    fn ended_by_server(&mut self) -> bool {
        #[cfg(feature = "mysql")]
        if self.state.backend == "mysql" && self.state.stack.depth() > 0 {
            if matches!(
                InnerState::read(&mut self.inner),
                InnerState::Open { aborted: true, .. } | InnerState::Broken
            ) {
                return false;
            }
            let inner: &mut dyn std::any::Any = &mut self.inner;
            return crate::mysql::in_transaction(inner) == Some(false);
        }
        false
    }

    /// Writes a row `defer_durable!` handed over, inside the transaction.
    #[cfg(feature = "outbox")]
    fn write_durable(&mut self, row: &crate::outbox::NewRow) -> QueryResult<()> {
        let inner: &mut dyn std::any::Any = &mut self.inner;
        match crate::outbox::insert_erased(inner, row) {
            Some(result) => {
                result?;
                self.on_commit(crate::outbox::wake);
                Ok(())
            }
            None => Err(Error::QueryBuilderError(
                format!(
                    "defer_durable! needs a SignalConnection of SqliteConnection, PgConnection or \
                     MysqlConnection, not of {}",
                    std::any::type_name::<C>()
                )
                .into(),
            )),
        }
    }

    /// Whether the backend says the connection is gone; only MySQL needs asking.
    fn connection_dead(&mut self) -> bool {
        #[cfg(feature = "mysql")]
        if self.state.backend == "mysql" {
            let inner: &mut dyn std::any::Any = &mut self.inner;
            return crate::mysql::in_transaction(inner).is_none();
        }
        false
    }

    /// Rolls back until fewer than `depth` levels are open; returns the first error.
    pub(crate) fn rollback_to(&mut self, depth: usize, why: &str) -> QueryResult<()> {
        let mut first_error = Ok(());
        loop {
            self.sync();
            let open = self.state.stack.depth();
            if open < depth {
                break;
            }
            let result =
                <SignalTransactionManager<C> as TransactionManager<_>>::rollback_transaction(self);
            if let Err(e) = result {
                log::warn!(
                    target: "diesel_transaction_signals",
                    "connection {}: rollback after {why} failed: {e}",
                    self.state.label
                );
                if first_error.is_ok() {
                    first_error = Err(e);
                }
            }
            if self.state.stack.depth() >= open {
                // Nothing moved: give the levels up rather than loop.
                self.state.finish_above(depth - 1, Outcome::RolledBack, why);
                break;
            }
        }
        first_error
    }
}

impl<C> SignalConnection<C>
where
    C: Connection<TransactionManager = diesel::connection::AnsiTransactionManager> + 'static,
{
    /// `transaction` with a custom BEGIN statement (isolation level, `BEGIN IMMEDIATE`).
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub(crate) fn transaction_with_begin<T, E, F>(&mut self, begin_sql: &str, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Self) -> Result<T, E>,
        E: From<Error>,
    {
        run_transaction(
            self,
            |inner| {
                diesel::connection::AnsiTransactionManager::begin_transaction_sql(inner, begin_sql)
            },
            f,
        )
    }
}
