//! The sync driver of the [`Ledger`](crate::ledger::Ledger): [`SignalTransactionManager`] reads
//! the inner connection's status, runs the inner operation, feeds the ledger, and carries out
//! what it settled. The states and transitions are documented once, in `src/ledger.rs`.

use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use diesel::connection::{
    Connection, TransactionManager, TransactionManagerStatus, ValidTransactionManagerStatus,
};
use diesel::result::{DatabaseErrorKind, Error, QueryResult};

use super::SignalConnection;
use crate::error::{ConnectionReplaced, TransactionAborted};
use crate::ledger::{Call, Op, Plan, Status};
use crate::outcome::Outcome;
use crate::pre_commit::PreCommitConnection;
use crate::registry;
use crate::signals::{self, Veto};

/// The [`TransactionManager`] of [`SignalConnection<C>`]: wraps `C`'s own manager and settles
/// hooks at every transition.
///
/// Users never name it; it is public because `Connection::TransactionManager` must be. It is a
/// thin driver of the crate's transaction ledger: before each operation it makes the ledger
/// agree with the inner connection's status, asks the ledger what to send, sends it through
/// `C`'s own manager, and hands the ledger the result and the status after; the ledger says
/// which levels open, release or close and with which outcome. The full state table lives in
/// one place, the ledger's documentation (`src/ledger.rs`, summarised in
/// `docs/ARCHITECTURE.md`):
///
/// | operation | inner status before | SQL | hooks |
/// |---|---|---|---|
/// | begin | `Idle`/`Open(n)` | `BEGIN` / `SAVEPOINT` | open a level |
/// | commit | `Open(n > 1)` | `RELEASE SAVEPOINT` | ok: the level's hooks join the enclosing level; error and the savepoint is gone: its rollback hooks run |
/// | commit | `Open(1)` | none yet | pre-commit phase (`PRE_COMMIT`, `before_commit`); a veto or `Err`: `ROLLBACK`, rollback hooks run, the error is returned |
/// | commit | `Open(1)`, not aborted | `COMMIT` | ok: commit hooks run (`Committed`); error: rollback hooks (`RolledBack`), or none (`Unknown`) when the connection was lost in flight |
/// | commit | `Open(1)`, aborted | `ROLLBACK` | rollback hooks run, [`TransactionAborted`] is returned; the pre-commit phase is skipped |
/// | commit / rollback | `Broken` | none | every level `RolledBack` |
/// | rollback | `Open(n)` | `ROLLBACK [TO SAVEPOINT]` | the innermost level's rollback hooks run |
/// | any | the server ended the transaction on its own | none | each level the caller ends settles with the fate the wrapper learnt (`RolledBack`, or `Unknown` after a possible implicit commit); a commit returns [`TransactionAborted`]; statements and `begin` are refused with it meanwhile |
/// | `transaction` closure panics | `Open(n)` | rollback to the closure's level | its rollback hooks run, then the panic continues |
/// | connection dropped | any | (closing rolls back) | rollback hooks run; a test transaction's hooks are discarded |
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

/// Reads the inner connection's transaction status.
#[inline]
pub(crate) fn read_status<C: Connection>(conn: &mut C) -> Status {
    status_of(C::TransactionManager::transaction_manager_status_mut(conn))
}

/// The ledger's view of a Diesel transaction manager status (sync or async).
#[inline]
pub(crate) fn status_of(status: &TransactionManagerStatus) -> Status {
    match status {
        TransactionManagerStatus::InError => Status::Broken,
        TransactionManagerStatus::Valid(ValidTransactionManagerStatus {
            in_transaction: None,
            ..
        }) => Status::Idle,
        TransactionManagerStatus::Valid(ValidTransactionManagerStatus {
            in_transaction: Some(s),
            ..
        }) => Status::Open {
            depth: s.transaction_depth.get(),
            aborted: s.requires_rollback_maybe_up_to_top_level,
        },
    }
}

/// Tells the inner manager that no transaction is open: the server ended it.
pub(crate) fn reset_status<C: Connection>(conn: &mut C) {
    *C::TransactionManager::transaction_manager_status_mut(conn) =
        TransactionManagerStatus::Valid(ValidTransactionManagerStatus::default());
}

/// Classifies the error of a COMMIT (or RELEASE) for the ledger: whether the connection may
/// have been lost while it was in flight, so that only the server knows whether it committed.
/// `connection_dead` asks the backend, for errors that do not say (MySQL reports a lost
/// connection as an unclassified error).
pub(crate) fn classify_commit_error(
    err: &Error,
    broken_after: bool,
    connection_dead: impl FnOnce() -> bool,
) -> Call {
    let (commit_error, rollback_failed) = match err {
        Error::RollbackErrorOnCommit { commit_error, .. } => (&**commit_error, true),
        other => (other, false),
    };
    let lost = match commit_error {
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
    };
    if lost {
        Call::Lost
    } else {
        Call::Failed
    }
}

impl<C: Connection + 'static> TransactionManager<SignalConnection<C>>
    for SignalTransactionManager<C>
{
    type TransactionStateData =
        <C::TransactionManager as TransactionManager<C>>::TransactionStateData;

    fn begin_transaction(conn: &mut SignalConnection<C>) -> QueryResult<()> {
        begin(conn, C::TransactionManager::begin_transaction, false).map(drop)
    }

    fn rollback_transaction(conn: &mut SignalConnection<C>) -> QueryResult<()> {
        let before = conn.sync();
        rollback_synced(conn, before)
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

/// Begins a level with `begin_inner` (rows B1-B3). `local`: opened by a closure on this thread.
#[inline(always)]
fn begin<C: Connection + 'static>(
    conn: &mut SignalConnection<C>,
    begin_inner: impl FnOnce(&mut C) -> QueryResult<()>,
    local: bool,
) -> QueryResult<(u64, registry::Slot)> {
    let before = conn.sync().unwrap_or(Status::Idle);
    if conn.book.ledger.plan(Op::Begin, before) == Plan::Refuse {
        return Err(TransactionAborted::statement_error());
    }
    begin_inner(&mut conn.inner)?;
    Ok(conn.book.open_level(local))
}

/// `rollback_transaction` after [`SignalConnection::sync`] returned `before`.
fn rollback_synced<C: Connection + 'static>(
    conn: &mut SignalConnection<C>,
    before: Option<Status>,
) -> QueryResult<()> {
    let before = before.unwrap_or_else(|| read_status(&mut conn.inner));
    if conn.book.unverified && before.depth() == 1 {
        // Raw SQL (`sql_query`) may have ended the transaction on the server (MySQL DDL):
        // ask, because the answer decides between RolledBack and Unknown.
        conn.verify_still_open(
            Outcome::Unknown,
            "an implicit commit or a rollback the server did not report",
        );
    }
    let plan = conn.book.ledger.plan(Op::Rollback, before);
    let mut result = match plan {
        Plan::Forward => C::TransactionManager::rollback_transaction(&mut conn.inner),
        _ => Ok(()),
    };
    let mut plan = plan;
    if let Err(e) = &result {
        if conn.savepoint_gone(e) {
            // The server ended the transaction before this ROLLBACK TO SAVEPOINT.
            plan = Plan::Nothing;
            result = Ok(());
        }
    }
    let call = if result.is_ok() {
        Call::Ok
    } else {
        Call::Failed
    };
    let after = read_status(&mut conn.inner);
    let step = conn
        .book
        .ledger
        .step(Op::Rollback, plan, before, call, after);
    conn.book.apply(step);
    result
}

/// `commit_transaction` after [`SignalConnection::sync`] returned `before`.
#[inline(always)]
fn commit_synced<C: Connection + 'static>(
    conn: &mut SignalConnection<C>,
    before: Option<Status>,
) -> QueryResult<()> {
    let before = before.unwrap_or_else(|| read_status(&mut conn.inner));
    // The fast path: a healthy level with nothing to run before COMMIT (rows R1 and C1).
    let plain = match before {
        Status::Open { depth: 1, aborted } => {
            !aborted
                && !signals::PRE_COMMIT.is_active()
                && !conn.book.ledger.has_pre_commit()
                && conn.book.ledger.lost().is_none()
        }
        Status::Open { .. } => conn.book.ledger.lost().is_none(),
        _ => false,
    };
    if plain {
        let open = conn.book.ledger.depth();
        let outermost = (open == 1).then(|| conn.book.seal());
        let result = C::TransactionManager::commit_transaction(&mut conn.inner);
        if let Some(slot) = outermost {
            registry::unseal(slot, &conn.book.inbox);
        }
        let after = read_status(&mut conn.inner).depth();
        if result.is_ok() && after + 1 == open {
            conn.book.drain_inbox();
            if open > 1 {
                conn.book.release_level();
            } else if !conn.book.close_empty_innermost(Outcome::Committed) {
                conn.book.close(0, Outcome::Committed, "committed");
            }
            return Ok(());
        }
        return commit_settled(conn, Plan::Forward, before, result);
    }
    commit_general(conn, before)
}

/// `commit_synced` beyond the fast path: the pre-commit phase, an aborted, broken or lost
/// transaction.
#[inline(never)]
fn commit_general<C: Connection + 'static>(
    conn: &mut SignalConnection<C>,
    mut before: Status,
) -> QueryResult<()> {
    // The pre-commit phase runs only for a transaction that can still commit: an aborted one
    // (a swallowed PostgreSQL error) or one the server ended returns TransactionAborted
    // without running PRE_COMMIT receivers or pre-commit work.
    if before
        == (Status::Open {
            depth: 1,
            aborted: false,
        })
        && conn.book.ledger.lost().is_none()
        && (signals::PRE_COMMIT.is_active() || conn.book.ledger.has_pre_commit())
    {
        if let Err(e) = conn.pre_commit() {
            let _ = conn.rollback_to(1, "the commit was refused before COMMIT");
            return Err(e);
        }
        before = conn.sync().unwrap_or(Status::Idle);
    }
    let plan = conn.book.ledger.plan(Op::Commit, before);
    let slot = (before.depth() == 1 && plan == Plan::Forward).then(|| conn.book.seal());
    let result = match plan {
        Plan::Forward => C::TransactionManager::commit_transaction(&mut conn.inner),
        Plan::RollbackInstead => C::TransactionManager::rollback_transaction(&mut conn.inner),
        // Lost: nothing to send; broken: Diesel's own error says why nothing committed.
        Plan::Nothing if conn.book.ledger.lost().is_some() => Ok(()),
        Plan::Nothing | Plan::Refuse => C::TransactionManager::commit_transaction(&mut conn.inner),
    };
    if let Some(slot) = slot {
        registry::unseal(slot, &conn.book.inbox);
    }
    commit_settled(conn, plan, before, result)
}

/// Settles what a COMMIT (or RELEASE) planned as `plan` that returned `result` closed, and says
/// what `commit_transaction` returns.
#[inline(never)]
fn commit_settled<C: Connection + 'static>(
    conn: &mut SignalConnection<C>,
    mut plan: Plan,
    before: Status,
    result: QueryResult<()>,
) -> QueryResult<()> {
    if let Err(e) = &result {
        if plan == Plan::Forward && before.depth() > 1 && conn.savepoint_gone(e) {
            // RELEASE failed because the server had ended the transaction (MySQL DDL).
            plan = Plan::Nothing;
        }
    }
    let after = read_status(&mut conn.inner);
    let call = match &result {
        Ok(()) => Call::Ok,
        Err(e) => {
            let broken = after == Status::Broken;
            classify_commit_error(e, broken, || conn.connection_dead())
        }
    };
    let lost = conn.book.ledger.lost();
    let step = conn.book.ledger.step(Op::Commit, plan, before, call, after);
    conn.book.apply(step);
    commit_result(plan, lost, result)
}

/// What `commit_transaction` returns for a commit planned as `plan` whose inner call returned
/// `result`, in a transaction the server had ended with fate `lost` (if it had): both drivers.
pub(crate) fn commit_result(
    plan: Plan,
    lost: Option<Outcome>,
    result: QueryResult<()>,
) -> QueryResult<()> {
    match plan {
        Plan::RollbackInstead => {
            let aborted = TransactionAborted::into_error();
            Err(match result {
                Ok(()) => aborted,
                Err(rollback_error) => Error::RollbackErrorOnCommit {
                    rollback_error: Box::new(rollback_error),
                    commit_error: Box::new(aborted),
                },
            })
        }
        Plan::Nothing if lost == Some(Outcome::Committed) => result,
        Plan::Nothing if lost.is_some() || result.is_ok() => Err(TransactionAborted::lost_error()),
        _ => result,
    }
}

/// `Connection::transaction` with a custom begin (`BEGIN IMMEDIATE`, an isolation level), made
/// panic-safe: a panicking closure has its level rolled back (rollback hooks run) before the
/// panic continues, so the connection stays usable. Diesel's default leaves it open.
///
/// The level is *local* (see [`registry`](crate::registry)): it ends in this call, on this
/// thread, so `defer` inside it waits in the thread's buffer without a lock.
///
/// If the closure replaced the connection (`std::mem::replace`/`swap` on its `&mut`), the
/// transaction it began is no longer reachable here: its registry entry is removed, its hooks
/// settle with that connection (when it is dropped, or its transaction ends), and the closure's
/// result becomes [`ConnectionReplaced`].
pub(crate) fn run_transaction<C, R, E, B, F>(
    conn: &mut SignalConnection<C>,
    begin_inner: B,
    callback: F,
) -> Result<R, E>
where
    C: Connection + 'static,
    B: FnOnce(&mut C) -> QueryResult<()>,
    F: FnOnce(&mut SignalConnection<C>) -> Result<R, E>,
    E: From<Error>,
{
    let (serial, slot) = begin(conn, begin_inner, true)?;
    let id = conn.book.label.id;
    let depth = conn.book.ledger.depth();
    let mut guard = scopeguard::guard_on_unwind(conn, move |conn| {
        if conn.book.label.id == id {
            // A failure is logged in `rollback_to`; the panic is what the caller sees.
            let _ = conn.rollback_to(depth, "the transaction closure panicked");
        } else {
            registry::exit(id, serial, slot, &conn.book.inbox);
        }
    });
    let result = callback(&mut **guard);
    let conn = scopeguard::ScopeGuard::into_inner(guard);
    if conn.book.label.id != id {
        return Err(connection_replaced(conn, id, serial, slot).into());
    }
    let inner = conn.sync();
    if conn.book.ledger.depth() < depth {
        // The level is gone already: the closure ended it (raw manager calls), or the
        // connection broke inside it and every level settled as rolled back. If another
        // thread ended it, this thread still has its entry (and maybe hooks deferred to it):
        // exit the one, settle the others.
        registry::exit(id, serial, slot, &conn.book.inbox);
        conn.book.drain_inbox();
        // Never report success for a broken connection.
        return match result {
            Ok(_) if read_status(&mut conn.inner) == Status::Broken => {
                Err(Error::BrokenTransactionManager.into())
            }
            other => other,
        };
    }
    match result {
        Ok(value) => match commit_synced(conn, inner) {
            Ok(()) => Ok(value),
            Err(commit_error) => {
                // Diesel leaves a savepoint open when its RELEASE fails on a healthy
                // transaction; roll it back so the nesting stays balanced.
                // Logged in `rollback_to`; the commit error is the one to return.
                let _ = conn.rollback_to(depth, "its commit failed");
                Err(commit_error.into())
            }
        },
        Err(user_error) => match conn.rollback_to(depth, "the closure returned an error") {
            Ok(()) | Err(Error::BrokenTransactionManager) => Err(user_error),
            Err(rollback_error) => Err(rollback_error.into()),
        },
    }
}

/// The closure of `run_transaction` replaced its connection: the level it began belongs to a
/// connection that is no longer here.
#[cold]
fn connection_replaced<C: Connection + 'static>(
    conn: &mut SignalConnection<C>,
    id: crate::ConnectionId,
    serial: u64,
    slot: registry::Slot,
) -> Error {
    // The old connection's registry entry must not outlive this call: a later `defer` on this
    // thread would wait for a transaction nobody will end. If the old connection was dropped,
    // its drop has exited it already; exiting twice is a no-op.
    registry::exit(id, serial, slot, &conn.book.inbox);
    log::error!(
        target: "diesel_transaction_signals",
        "connection {id}: replaced by connection {} inside its transaction closure; the \
         transaction it began settles with the connection that began it (rolled back when it \
         is dropped)",
        conn.book.label
    );
    ConnectionReplaced::into_error()
}

impl<C: Connection + 'static> SignalConnection<C> {
    /// The phase between the closure's end and COMMIT: `PRE_COMMIT` receivers, then
    /// pre-commit work (and the work it registers) in registration order, until the queue stays
    /// empty. An error or a veto refuses the commit; a panic in a hook rolls back and
    /// continues.
    fn pre_commit(&mut self) -> QueryResult<()> {
        if signals::PRE_COMMIT.is_active() {
            let event = self.book.event(None);
            signals::PRE_COMMIT
                .send_veto(&event)
                .map_err(Veto::into_error)?;
        }
        loop {
            self.sync();
            if self.book.ledger.depth() != 1 || self.book.ledger.lost().is_some() {
                // A hook ended the transaction itself; COMMIT will report it.
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
                let (id, backend) = (self.book.label.id, self.book.backend);
                let result = catch_unwind(AssertUnwindSafe(|| {
                    f(&mut PreCommitConnection {
                        conn: self,
                        id,
                        backend,
                    })
                }));
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
                        let _ = self.rollback_to(1, "a before_commit hook panicked");
                        resume_unwind(panic);
                    }
                }
            }
        }
    }

    /// Whether the backend says the connection is gone; only MySQL needs asking.
    fn connection_dead(&mut self) -> bool {
        #[cfg(feature = "mysql")]
        if self.book.backend == "mysql" {
            let inner: &mut dyn std::any::Any = &mut self.inner;
            return crate::mysql::in_transaction(inner).is_none();
        }
        false
    }

    /// Rolls back until fewer than `depth` levels are open; returns the first error.
    pub(crate) fn rollback_to(&mut self, depth: usize, why: &str) -> QueryResult<()> {
        let mut first_error = Ok(());
        loop {
            let before = self.sync();
            let open = self.book.ledger.depth();
            if open < depth {
                break;
            }
            if let Err(e) = rollback_synced(self, before) {
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
