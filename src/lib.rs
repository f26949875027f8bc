//! Run code only once a Diesel transaction has really committed, or when its work is undone.
//!
//! Diesel has no way to run code when a transaction commits or rolls back. This crate adds it,
//! in the tradition of Django's `transaction.on_commit`, Rails' `after_commit`/`after_rollback`
//! and Spring's `TransactionSynchronization`: enqueue a job, send an e-mail, invalidate a cache
//! or publish an event only for data that is in the database, never for work that was rolled
//! back.
//!
//! # The pieces
//!
//! - [`SignalConnection<C>`] wraps any Diesel connection and replaces it everywhere (queries,
//!   `transaction`, migrations, r2d2 pools). Its transaction manager knows the nesting of
//!   `transaction` calls and settles hooks when a level ends.
//! - [`on_commit`](SignalConnection::on_commit), [`on_rollback`](SignalConnection::on_rollback)
//!   and [`on_complete`](SignalConnection::on_complete) register hooks on a connection.
//! - [`defer`](fn@defer) and [`defer!`] register a commit hook on the innermost transaction open on this
//!   thread, without a connection handle, as Django's `defer()` did.
//! - [`SignalConnection::capture_hooks`] takes hooks out of a test transaction, which never
//!   commits, so a test can run them.
//! - [`defer_before_commit`] is the extension point for work that must run inside the
//!   outermost transaction just before COMMIT, without a connection handle; the `outbox`
//!   feature's durable jobs are built on it.
//!
//! # Example
//!
//! ```
//! # #[cfg(feature = "sqlite")] {
//! use diesel::prelude::*;
//! use diesel_transaction_signals::{defer, SignalConnection};
//! use std::sync::mpsc;
//!
//! let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:")?;
//! diesel::sql_query("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL)")
//!     .execute(&mut conn)?;
//!
//! let (mailer, outbox) = mpsc::channel::<String>();
//! let sign_up = |conn: &mut SignalConnection<SqliteConnection>, email: &str| {
//!     conn.transaction(|conn| {
//!         diesel::sql_query("INSERT INTO users (email) VALUES (?)")
//!             .bind::<diesel::sql_types::Text, _>(email)
//!             .execute(conn)?;
//!         let mailer = mailer.clone();
//!         let email = email.to_owned();
//!         // Runs after COMMIT, and only if the COMMIT succeeds.
//!         defer!(move || mailer.send(email).unwrap());
//!         QueryResult::Ok(())
//!     })
//! };
//! sign_up(&mut conn, "ada@example.com")?;
//! assert_eq!(outbox.try_recv().as_deref(), Ok("ada@example.com"));
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # When hooks run
//!
//! | situation | `on_commit` / `defer` | `on_rollback` | `on_complete` |
//! |---|---|---|---|
//! | no transaction open | at once | dropped (never runs) | at once, `Committed` |
//! | savepoint released | kept for the outer COMMIT | kept | kept |
//! | savepoint rolled back | discarded | run at once | run at once, `RolledBack` |
//! | outermost COMMIT succeeded | run, registration order | discarded | `Committed` |
//! | rollback, failed COMMIT, aborted transaction, panic, connection dropped | discarded | run | `RolledBack` |
//! | the database ended the transaction on its own (a deadlock, `INSERT OR ROLLBACK`), even in a swallowed error | discarded | run as the caller ends each level | `RolledBack`; `transaction` returns [`TransactionAborted`], statements are refused meanwhile |
//! | connection lost during COMMIT | dropped, error logged | dropped, error logged | `Unknown` |
//! | `begin_test_transaction` rolled back through the manager | discarded | run | `RolledBack`, no signal |
//! | connection dropped inside a `begin_test_transaction` | discarded | discarded | discarded |
//!
//! Every hook runs at most once and is dropped after; hooks run after the database returned
//! and the transaction is closed, so they hold no lock. A hook that panics or returns `Err` is
//! caught, logged at error level and passed to [`set_failure_handler`]'s handler; the hooks
//! after it still run. Logging goes through the [`log`] crate, target
//! `diesel_transaction_signals`.
//!
//! # Compared with the alternatives
//!
//! Collecting closures in a `Vec` and running them after `transaction` returns works for one
//! level of one function, but loses the nesting: a savepoint that rolls back inside a helper
//! cannot take its closures back, a panic leaves them behind, and a library cannot reach the
//! caller's `Vec`. Diesel's `Instrumentation` sees `BEGIN`/`COMMIT` *before* they run, so it
//! cannot tell a COMMIT that failed, or one PostgreSQL turned into a rollback.
//!
//! # Features
//!
//! `sqlite`, `postgres`, `mysql` enable the matching Diesel backend; `r2d2` enables pool
//! support; `outbox` the durable jobs ([`outbox`], needs `r2d2`); `outbox-listen` wakes relays
//! in other processes with PostgreSQL `LISTEN`/`NOTIFY`. No backend is on by default.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

// Layers, bottom up (docs/ARCHITECTURE.md): leaf types (id, outcome, report, pre_commit,
// error), hook, ledger, registry and signals, connection (with its manager), testing, pool and
// the backend extras, outbox on top. No module imports one above it.
#[cfg(feature = "async")]
mod async_connection;
mod connection;
mod error;
mod hook;
mod id;
mod ledger;
#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "outbox")]
pub mod outbox;
mod outcome;
#[cfg(feature = "r2d2")]
pub mod pool;
mod pre_commit;
mod registry;
mod report;
pub mod signals;
mod testing;

#[cfg(feature = "postgres")]
pub mod pg;
#[cfg(feature = "sqlite")]
mod sqlite;

/// Pools of [`AsyncSignalConnection`]: the alias on every checkout.
#[cfg(any(feature = "deadpool", feature = "bb8"))]
pub use async_connection::pool as async_pool;
#[cfg(feature = "async")]
pub use async_connection::{
    AsyncFunc, AsyncSignalConnection, AsyncSignalTransactionManager, BoxFuture, Watched,
};
pub use connection::{SignalConnection, SignalCursor, SignalTransactionManager};
pub use error::{ConnectionReplaced, TransactionAborted};
pub use hook::HookOutput;
pub use id::ConnectionId;
pub use outcome::Outcome;
pub use pre_commit::{DeferError, PreCommitConnection};
pub use registry::in_transaction;
pub use report::{set_failure_handler, FailureCause, HookFailure, HookKind};
pub use testing::CapturedHooks;

use std::panic::Location;

/// Registers `f` to run once after the innermost transaction open on this thread commits, or
/// at once when no transaction is open, without a connection handle.
///
/// The transaction is found through a thread-local registry of the transactions that
/// [`SignalConnection`]s opened on this thread; with two connections in nested transactions,
/// the innermost wins. On another thread (a spawned or scoped thread) `f` runs at once unless
/// that thread opened a transaction itself: use [`SignalConnection::on_commit`] through the
/// connection there.
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::prelude::*;
/// use diesel_transaction_signals::{defer, SignalConnection};
/// use std::sync::mpsc;
///
/// fn notify_later(tx: mpsc::Sender<&'static str>) {
///     // Library code: no connection in sight.
///     defer(move || tx.send("cache invalidated").unwrap());
/// }
///
/// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
/// let (tx, rx) = mpsc::channel();
/// conn.transaction(|_| {
///     notify_later(tx);
///     QueryResult::Ok(())
/// }).unwrap();
/// assert_eq!(rx.try_recv(), Ok("cache invalidated"));
/// # }
/// ```
#[track_caller]
pub fn defer<F>(f: F)
where
    F: FnOnce() + Send + 'static,
{
    defer_hook(hook::Hook::commit(f, Location::caller()));
}

/// `defer!`'s call form: the call may return a `Result`, whose `Err` is reported.
#[doc(hidden)]
#[track_caller]
pub fn __defer_output<F, R>(f: F)
where
    F: FnOnce() -> R + Send + 'static,
    R: HookOutput,
{
    defer_hook(hook::Hook::commit(f, Location::caller()));
}

#[inline]
fn defer_hook(hook: hook::Hook) {
    if let Err(hook) = registry::offer(hook) {
        hook::settle_all(
            std::iter::once(hook),
            Outcome::Committed,
            None,
            "no transaction open",
        );
    }
}

/// Registers `f` to run inside the innermost transaction open on this thread, just before its
/// outermost COMMIT, without a connection handle: the extension point for work that must
/// commit with the transaction or not at all (an outbox row, an audit record, a flush).
///
/// `f` gets the connection as a [`PreCommitConnection`]: get the typed
/// [`SignalConnection`] back with [`PreCommitConnection::connection`] and run queries on it.
/// It runs after the [`PRE_COMMIT`](signals::PRE_COMMIT) receivers, in registration order with
/// the `before_commit` hooks of that connection, exactly as
/// [`SignalConnection::before_commit`] does: an `Err` rolls the whole transaction back (rollback
/// hooks run) and is returned from `transaction`; a panic rolls it back and continues; a
/// savepoint that rolls back discards the work registered in it.
///
/// Returns [`DeferError::NoTransaction`] when no transaction is open on this thread (there is
/// nothing to commit with), and [`DeferError::CommitInFlight`] when the transaction's COMMIT is
/// already in flight (a call from an `Instrumentation` callback or from another thread for a
/// connection that moved): `f` was not registered and is dropped. Never `Ok` for work that
/// cannot run.
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::prelude::*;
/// use diesel_transaction_signals::{defer_before_commit, DeferError, SignalConnection};
///
/// // Library code: records an audit row in whatever transaction is open, without a handle.
/// fn audit(note: &'static str) -> Result<(), DeferError> {
///     defer_before_commit(move |conn| {
///         let conn = conn.connection::<SqliteConnection>().expect("SQLite in this example");
///         diesel::sql_query("INSERT INTO audit (note) VALUES (?)")
///             .bind::<diesel::sql_types::Text, _>(note)
///             .execute(conn)
///             .map(drop)
///     })
/// }
///
/// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:")?;
/// diesel::sql_query("CREATE TABLE audit (note TEXT NOT NULL)").execute(&mut conn)?;
/// conn.transaction(|_| {
///     audit("signed up")?;
///     QueryResult::Ok(())
/// })?;
/// assert_eq!(audit("outside"), Err(DeferError::NoTransaction));
/// # }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[track_caller]
pub fn defer_before_commit<F>(f: F) -> Result<(), DeferError>
where
    F: for<'a> FnOnce(&mut PreCommitConnection<'a>) -> diesel::QueryResult<()> + Send + 'static,
{
    let work = hook::Hook::pre_commit(Box::new(f), Location::caller());
    registry::offer_pre_commit(work)
        .map(drop)
        .map_err(|(_, why)| why)
}

/// Defers a call until the innermost transaction on this thread commits (see [`defer()`]).
///
/// - `defer!(send_mail(user.id, subject()))`: the arguments are evaluated **now**, like a call,
///   and the call is made after COMMIT. The function may be a path (`mail::send(..)`) or a
///   method on a local variable (`mailer.send(..)`, which moves `mailer`).
/// - `defer!(|| ...)` / `defer!(move || ...)`: a closure, run after COMMIT.
/// - `defer!(f)`: any other expression that is a closure.
///
/// In the call form the function may return `()` or a `Result`: an `Err` is reported as a
/// [`HookFailure`] (logged, and passed to [`set_failure_handler`]'s handler), never dropped.
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::prelude::*;
/// use diesel_transaction_signals::{defer, SignalConnection};
/// use std::sync::{Mutex, MutexGuard};
///
/// static SENT: Mutex<Vec<(i32, String)>> = Mutex::new(Vec::new());
/// fn send_mail(user_id: i32, subject: String) { SENT.lock().unwrap().push((user_id, subject)); }
///
/// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
/// let mut subject = String::from("Welcome");
/// conn.transaction(|_| {
///     defer!(send_mail(7, subject.clone()));  // evaluated now: "Welcome"
///     subject.push_str(", again");             // does not change the deferred call
///     QueryResult::Ok(())
/// }).unwrap();
/// assert_eq!(*SENT.lock().unwrap(), [(7, "Welcome".to_string())]);
/// # }
/// ```
#[macro_export]
macro_rules! defer {
    (move || $($body:tt)*) => {
        $crate::defer(move || $($body)*)
    };
    (move |$($rest:tt)*) => {
        $crate::defer(move |$($rest)*)
    };
    (|| $($body:tt)*) => {
        $crate::defer(|| $($body)*)
    };
    ($($f:ident)::+ ( $($arg:expr),* $(,)? )) => {
        $crate::__defer_call!(
            [$($f)::+] [] [$($arg,)*]
            [__dts_a0 __dts_a1 __dts_a2 __dts_a3 __dts_a4 __dts_a5 __dts_a6 __dts_a7
             __dts_a8 __dts_a9 __dts_a10 __dts_a11 __dts_a12 __dts_a13 __dts_a14 __dts_a15]
        )
    };
    ($recv:ident . $method:ident ( $($arg:expr),* $(,)? )) => {{
        let __dts_recv = $recv;
        $crate::__defer_call!(
            [__dts_recv.$method] [] [$($arg,)*]
            [__dts_a0 __dts_a1 __dts_a2 __dts_a3 __dts_a4 __dts_a5 __dts_a6 __dts_a7
             __dts_a8 __dts_a9 __dts_a10 __dts_a11 __dts_a12 __dts_a13 __dts_a14 __dts_a15]
        )
    }};
    ($f:expr $(,)?) => {
        $crate::defer($f)
    };
}

/// Binds each argument of a `defer!` call to a fresh local, then defers the call.
#[doc(hidden)]
#[macro_export]
macro_rules! __defer_call {
    ([$($f:tt)*] [$(($name:ident $val:expr))*] [] [$($pool:ident)*]) => {{
        $(let $name = $val;)*
        $crate::__defer_output(move || $($f)*($($name),*))
    }};
    ([$($f:tt)*] [$($bound:tt)*] [$head:expr, $($rest:expr,)*] [$next:ident $($pool:ident)*]) => {
        $crate::__defer_call!([$($f)*] [$($bound)* ($next $head)] [$($rest,)*] [$($pool)*])
    };
}
