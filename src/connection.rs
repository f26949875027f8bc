//! [`SignalConnection`]: the connection wrapper, its hook registration API and the Diesel
//! traits that make it a drop-in replacement for the connection it wraps.

use std::fmt;
use std::panic::Location;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use diesel::connection::{
    CacheSize, Connection, ConnectionSealed, Instrumentation, LoadConnection, SimpleConnection,
    TransactionManager, TransactionManagerStatus, WithMetadataLookup,
};
use diesel::expression::QueryMetadata;
use diesel::migration::MigrationConnection;
use diesel::query_builder::{Query, QueryFragment, QueryId};
use diesel::result::{ConnectionResult, Error, QueryResult};
use diesel::sql_types::TypeMetadata;

use crate::hooks::{settle_all, Hook, HookStack, Label, Level, Settled};
use crate::manager::{InnerState, SignalTransactionManager};
use crate::registry::{self, Inbox};
use crate::signals::{self, TransactionEvent};
use crate::Outcome;

/// A process-unique, stable identifier of a [`SignalConnection`], shown in log lines and
/// failure reports.
///
/// # Example
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::prelude::*;
/// use diesel_transaction_signals::SignalConnection;
///
/// let a = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
/// let b = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
/// assert_ne!(a.id(), b.id());
/// assert!(a.id().to_string().starts_with('#'));
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnectionId(u64);

impl ConnectionId {
    fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ConnectionId(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The number behind the id.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::prelude::*;
    /// # use diesel_transaction_signals::SignalConnection;
    /// let conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// assert!(conn.id().get() > 0);
    /// # }
    /// ```
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A Diesel connection that runs hooks when its transactions commit or roll back.
///
/// `SignalConnection<C>` wraps any connection `C` (`SqliteConnection`, `PgConnection`,
/// `MysqlConnection`) and implements every Diesel trait `C` does that a user's code, migrations
/// and pools need, so it replaces `C` wherever `C` is named. Its transaction manager tracks the
/// nesting of `transaction` calls (savepoints) and settles hooks when a level ends:
///
/// - [`on_commit`](Self::on_commit) hooks run once, after the outermost COMMIT succeeded;
/// - [`on_rollback`](Self::on_rollback) hooks run once, when the work they guarded is undone;
/// - [`on_complete`](Self::on_complete) hooks run once with the [`Outcome`].
///
/// A savepoint that rolls back takes its commit hooks with it and runs its rollback hooks at
/// once; the enclosing transaction goes on. A closure that panics has its level rolled back
/// before the panic continues. Hooks that panic or return `Err` are caught and reported
/// ([`set_failure_handler`](crate::set_failure_handler)).
///
/// [`inner`](Self::inner) and [`inner_mut`](Self::inner_mut) reach the wrapped connection for
/// backend-specific methods (SQLite functions, PostgreSQL `COPY TO`); transactions opened
/// through them bypass the hooks.
///
/// # Example
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::prelude::*;
/// use diesel_transaction_signals::SignalConnection;
/// use std::sync::mpsc;
///
/// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:")?;
/// let (tx, rx) = mpsc::channel();
/// conn.transaction(|conn| {
///     diesel::sql_query("CREATE TABLE users (id INTEGER PRIMARY KEY)").execute(conn)?;
///     let tx = tx.clone();
///     conn.on_commit(move || tx.send("send the welcome e-mail").unwrap());
///     assert!(rx.try_recv().is_err(), "nothing runs before COMMIT");
///     QueryResult::Ok(())
/// })?;
/// assert_eq!(rx.try_recv(), Ok("send the welcome e-mail"));
/// # }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SignalConnection<C> {
    // Declared first so it is dropped first: closing the connection rolls back an open
    // transaction, and only then do the rollback hooks in `state` run.
    pub(crate) inner: C,
    pub(crate) state: State,
}

/// The wrapper's own state. Its `Drop` settles what a dropped connection leaves open.
pub(crate) struct State {
    pub(crate) stack: HookStack,
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) label: Label,
    /// The outermost open level was opened by `begin_test_transaction`.
    pub(crate) test_transaction: bool,
    /// The backend's short name, for signal events.
    pub(crate) backend: &'static str,
    /// When the outermost level opened.
    pub(crate) opened_at: Option<Instant>,
    /// Hooks settled so far in the current outermost transaction (all its levels).
    pub(crate) totals: Settled,
    /// The buffer swapped with the inbox's when `defer`red hooks are moved in (kept empty).
    deferred: Vec<(u64, Hook)>,
    /// Local levels that closed where their thread's registry could not see it (another
    /// thread, or out of order), with their fate (`None`: released into the enclosing level),
    /// for the hooks that thread may still hold for them. Cleared when a transaction begins.
    ended_elsewhere: Vec<(u64, Option<Outcome>)>,
}

impl State {
    fn new(backend: &'static str) -> Self {
        State {
            stack: HookStack::default(),
            inbox: Arc::default(),
            label: Label {
                id: ConnectionId::next(),
                alias: None,
            },
            test_transaction: false,
            backend,
            opened_at: None,
            totals: Settled::default(),
            deferred: Vec::new(),
            ended_elsewhere: Vec::new(),
        }
    }

    /// Moves hooks that `defer` left for this connection (in this thread's buffer, or in the
    /// shared inbox) into their levels.
    #[inline]
    pub(crate) fn drain_inbox(&mut self) {
        // Two loads when nothing waits: a thread-local flag and the inbox's atomic flag.
        if registry::local_waiting() {
            self.take_local();
        }
        if self.inbox.has_pending() {
            self.drain_pending();
        }
    }

    #[cold]
    fn take_local(&mut self) {
        let mut stranded = Vec::new();
        registry::take_local(self.label.id, &mut self.stack, &mut stranded);
        for (serial, hook) in stranded {
            self.settle_stranded(serial, hook);
        }
    }

    /// Settles a hook this thread deferred to a local level that has ended elsewhere (another
    /// thread, or out of order): with that level's fate when the connection saw it end,
    /// else as `Unknown`.
    #[cold]
    fn settle_stranded(&mut self, serial: u64, hook: Hook) {
        let fate = self
            .ended_elsewhere
            .iter()
            .find(|(s, _)| *s == serial)
            .map(|(_, fate)| *fate);
        // Released into the enclosing level: the hook goes on waiting there.
        let hook = match fate {
            Some(None) if self.stack.depth() > 0 => {
                match self.stack.push_to(self.stack.innermost_serial(), hook) {
                    Ok(()) => return,
                    Err(hook) => hook,
                }
            }
            _ => hook,
        };
        let (outcome, why) = match fate {
            Some(Some(outcome)) => (outcome, "its transaction level ended on another thread"),
            _ => (
                Outcome::Unknown,
                "it was deferred to a transaction level that ended where its thread could not see",
            ),
        };
        settle_all(std::iter::once(hook), outcome, Some(&self.label), why);
    }

    #[cold]
    fn drain_pending(&mut self) {
        let mut deferred = std::mem::take(&mut self.deferred);
        if self.inbox.take_into(&mut deferred) {
            self.place(deferred.drain(..));
        }
        self.deferred = deferred;
    }

    fn place(&mut self, deferred: impl Iterator<Item = (u64, Hook)>) {
        for (serial, hook) in deferred {
            if let Err(hook) = self.stack.push_to(serial, hook) {
                settle_all(
                    std::iter::once(hook),
                    Outcome::Unknown,
                    Some(&self.label),
                    "it was deferred to a transaction level that had already ended \
                     (was the connection moved to another thread mid-transaction?)",
                );
            }
        }
    }

    /// Opens a level: `local` when it was opened by a closure running on this thread (see
    /// [`registry`]). Returns its serial and registry slot.
    #[inline(always)]
    pub(crate) fn open_level(&mut self, local: bool) -> (u64, registry::Slot) {
        if self.stack.depth() == 0 {
            // Read the clock only for signal receivers: `Instant::now` is the costliest step of
            // a hook-free transaction (a serialising `rdtscp`, ~40 ns in a VM).
            self.opened_at = signals::any_receivers().then(Instant::now);
            self.totals = Settled::default();
            if !self.ended_elsewhere.is_empty() {
                self.ended_elsewhere.clear();
            }
        }
        let (id, inbox) = (self.label.id, &self.inbox);
        self.stack
            .open(|serial| registry::enter(id, serial, (!local).then_some(inbox)))
    }

    /// Undoes `level`'s registry entry (see [`leave_level`]).
    #[inline(always)]
    fn leave(&mut self, level: Level, fate: Option<Outcome>) {
        leave_level(
            self.label.id,
            &self.inbox,
            &mut self.ended_elsewhere,
            level,
            fate,
        );
    }

    /// Closes the innermost level after its savepoint was released.
    #[inline]
    pub(crate) fn release_level(&mut self) {
        self.drain_inbox();
        if let Some(level) = self.stack.release() {
            self.leave(level, None);
        }
    }

    /// Closes the innermost level and settles its hooks for `outcome`.
    #[inline]
    pub(crate) fn finish_level(&mut self, outcome: Outcome, why: &str) -> Settled {
        let keep = self.stack.depth().saturating_sub(1);
        self.finish_above(keep, outcome, why)
    }

    /// Closes every level above the `keep` outermost ones and settles their hooks for
    /// `outcome`, all in registration order. Closing the outermost level sends the
    /// end-of-transaction signals.
    #[inline]
    pub(crate) fn finish_above(&mut self, keep: usize, outcome: Outcome, why: &str) -> Settled {
        self.drain_inbox();
        if self.stack.depth() == keep + 1 && self.close_empty_innermost(outcome) {
            return Settled::default();
        }
        self.settle_above(keep, outcome, why)
    }

    /// The common end of a level: it holds no hook, so there is nothing to settle. Closes the
    /// innermost level if that is so and says whether it did. Call after `drain_inbox`.
    #[inline(always)]
    pub(crate) fn close_empty_innermost(&mut self, outcome: Outcome) -> bool {
        if !self.stack.innermost_is_empty() {
            return false;
        }
        let Some(level) = self.stack.release() else {
            return false;
        };
        self.leave(level, Some(outcome));
        let depth = self.stack.depth();
        log::trace!(
            target: "diesel_transaction_signals",
            "connection {}: level {} {outcome}",
            self.label,
            depth + 1
        );
        if depth == 0 {
            self.test_transaction = false;
            if signals::any_post_receivers() {
                self.send_post(outcome);
            }
        }
        true
    }

    #[cold]
    fn send_post(&self, outcome: Outcome) {
        signals::send_post(&self.event(Some(outcome)));
    }

    /// `finish_above` with hooks to settle, or several levels to close.
    #[inline(never)]
    fn settle_above(&mut self, keep: usize, outcome: Outcome, why: &str) -> Settled {
        let depth = self.stack.depth();
        if depth <= keep {
            return Settled::default();
        }
        if keep == 0 {
            self.test_transaction = false;
        }
        let State {
            stack,
            inbox,
            label,
            ended_elsewhere,
            ..
        } = self;
        let Some((levels, hooks)) = stack.close_above(keep) else {
            return Settled::default();
        };
        for level in levels.rev() {
            leave_level(label.id, inbox, ended_elsewhere, level, Some(outcome));
        }
        log::trace!(
            target: "diesel_transaction_signals",
            "connection {label}: levels {}..={depth} {outcome}",
            keep + 1
        );
        let settled = settle_all(hooks, outcome, Some(label), why);
        self.totals.ran += settled.ran;
        self.totals.discarded += settled.discarded;
        if keep == 0 && signals::any_post_receivers() {
            self.send_post(outcome);
        }
        settled
    }

    pub(crate) fn finish_all(&mut self, outcome: Outcome, why: &str) {
        self.finish_above(0, outcome, why);
    }

    /// The signal event describing the current outermost transaction.
    pub(crate) fn event(&self, outcome: Option<Outcome>) -> TransactionEvent {
        TransactionEvent {
            connection: self.label.id,
            alias: self.label.alias.clone(),
            backend: self.backend,
            outcome,
            duration: self.opened_at.map(|t| t.elapsed()).unwrap_or_default(),
            hooks_ran: self.totals.ran,
            hooks_discarded: self.totals.discarded,
        }
    }

    /// Drops every open level without running anything (the end of a test transaction).
    fn discard_all(&mut self, why: &str) {
        self.drain_inbox();
        while let Some((level, hooks)) = self.stack.close() {
            leave_level(
                self.label.id,
                &self.inbox,
                &mut self.ended_elsewhere,
                level,
                Some(Outcome::RolledBack),
            );
            for hook in hooks {
                log::debug!(
                    target: "diesel_transaction_signals",
                    "{} hook registered at {} discarded: {why}",
                    hook.kind(),
                    hook.location()
                );
            }
        }
        self.test_transaction = false;
    }

    /// Adds a hook to the innermost level, or settles it at once outside a transaction.
    /// Call after `drain_inbox`.
    #[inline]
    fn register(&mut self, hook: Hook) {
        if self.stack.depth() == 0 {
            self.settle_now(hook);
        } else {
            self.stack.push(hook);
        }
    }

    #[cold]
    fn settle_now(&self, hook: Hook) {
        settle_all(
            std::iter::once(hook),
            Outcome::Committed,
            Some(&self.label),
            "no transaction was open: on_rollback outside a transaction never runs",
        );
    }
}

/// Undoes `level`'s registry entry. A local level that its thread's registry did not see close
/// (another thread, out of order) is remembered in `ended_elsewhere` with its `fate`, for the
/// hooks that thread may still hold for it.
#[inline(always)]
fn leave_level(
    id: ConnectionId,
    inbox: &Inbox,
    ended_elsewhere: &mut Vec<(u64, Option<Outcome>)>,
    level: Level,
    fate: Option<Outcome>,
) {
    if !registry::leave(id, level.serial, level.slot, inbox)
        && matches!(level.slot, registry::Slot::Local { .. })
    {
        remember_ended(ended_elsewhere, level.serial, fate);
    }
}

#[cold]
fn remember_ended(ended: &mut Vec<(u64, Option<Outcome>)>, serial: u64, fate: Option<Outcome>) {
    ended.push((serial, fate));
}

impl Drop for State {
    fn drop(&mut self) {
        self.drain_inbox();
        let deferred = self.inbox.close();
        self.place(deferred.into_iter());
        if self.stack.depth() == 0 {
            return;
        }
        if self.test_transaction {
            self.discard_all("a test transaction never commits");
        } else {
            self.finish_all(
                Outcome::RolledBack,
                "the connection was dropped inside a transaction, which rolls it back",
            );
        }
    }
}

impl<C: Connection + 'static> SignalConnection<C> {
    /// Wraps an established connection. Open no transaction on `inner` before wrapping it: the
    /// wrapper would not know about it.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// let raw = SqliteConnection::establish(":memory:").unwrap();
    /// let mut conn = SignalConnection::new(raw);
    /// assert_eq!(conn.transaction_depth(), 0);
    /// # }
    /// ```
    pub fn new(inner: C) -> Self {
        SignalConnection {
            inner,
            state: State::new(signals::backend_name::<C::Backend>()),
        }
    }

    /// Names this connection (`"primary"`, `"replica"`, `"audit"`), as Django's `using=`
    /// does; the alias appears in every signal event and every log line about it.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// let conn = SignalConnection::<SqliteConnection>::establish(":memory:")
    ///     .unwrap()
    ///     .with_alias("primary");
    /// assert_eq!(conn.alias(), Some("primary"));
    /// # }
    /// ```
    pub fn with_alias(mut self, alias: impl Into<Arc<str>>) -> Self {
        self.set_alias(alias);
        self
    }

    /// Sets or replaces the connection's alias; see [`with_alias`](Self::with_alias).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::prelude::*;
    /// # use diesel_transaction_signals::SignalConnection;
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// conn.set_alias("audit");
    /// assert_eq!(conn.alias(), Some("audit"));
    /// # }
    /// ```
    pub fn set_alias(&mut self, alias: impl Into<Arc<str>>) {
        self.state.label.alias = Some(alias.into());
    }

    /// The connection's alias, if it has one.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::prelude::*;
    /// # use diesel_transaction_signals::SignalConnection;
    /// let conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// assert_eq!(conn.alias(), None);
    /// # }
    /// ```
    pub fn alias(&self) -> Option<&str> {
        self.state.label.alias.as_deref()
    }

    /// Unwraps the connection.
    ///
    /// Called inside a transaction, the wrapper can no longer observe its outcome: `on_complete`
    /// hooks receive [`Outcome::Unknown`] and commit and rollback hooks are dropped unrun, with
    /// an error logged for each (inside a test transaction they are discarded quietly).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// let conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// let mut raw: SqliteConnection = conn.into_inner();
    /// diesel::sql_query("SELECT 1").execute(&mut raw).unwrap();
    /// # }
    /// ```
    pub fn into_inner(self) -> C {
        let SignalConnection { inner, mut state } = self;
        if state.test_transaction {
            state.discard_all("the connection was unwrapped inside a test transaction");
        } else {
            state.finish_all(
                Outcome::Unknown,
                "the connection was unwrapped with into_inner() inside a transaction",
            );
        }
        inner
    }

    /// The wrapped connection.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// let conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// let _raw: &SqliteConnection = conn.inner();
    /// # }
    /// ```
    pub fn inner(&self) -> &C {
        &self.inner
    }

    /// The wrapped connection, for backend-specific methods (registering SQLite functions,
    /// PostgreSQL `COPY TO`).
    ///
    /// **This bypasses the hooks**: a transaction opened through it (`inner_mut().transaction(..)`,
    /// raw `BEGIN`) is unknown to the wrapper, so `on_commit` inside it runs at once. Queries
    /// run through it inside a wrapper transaction are part of that transaction as usual.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// diesel::sql_query("SELECT 1").execute(conn.inner_mut()).unwrap();
    /// # }
    /// ```
    pub fn inner_mut(&mut self) -> &mut C {
        &mut self.inner
    }

    /// This connection's process-unique id.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::prelude::*;
    /// # use diesel_transaction_signals::SignalConnection;
    /// let conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// println!("connection {}", conn.id());
    /// # }
    /// ```
    pub fn id(&self) -> crate::ConnectionId {
        self.state.label.id
    }

    /// How many transaction levels are open: 0 outside a transaction, 1 inside the outermost,
    /// one more per savepoint.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// conn.transaction(|c| {
    ///     assert_eq!(c.transaction_depth(), 1);
    ///     c.transaction(|c| {
    ///         assert_eq!(c.transaction_depth(), 2);
    ///         QueryResult::Ok(())
    ///     })
    /// }).unwrap();
    /// assert_eq!(conn.transaction_depth(), 0);
    /// # }
    /// ```
    pub fn transaction_depth(&mut self) -> usize {
        self.sync();
        self.state.stack.depth()
    }

    /// Registers `f` to run once, after the outermost transaction COMMITs successfully.
    ///
    /// - Outside a transaction it runs at once (autocommit has already committed).
    /// - Inside a savepoint that rolls back, or a transaction that rolls back or fails to
    ///   commit, it is discarded unrun and its captured values are dropped.
    /// - Commit hooks run in registration order across all levels, after COMMIT returned and
    ///   the transaction is closed.
    /// - A panic in `f` is caught and reported (see
    ///   [`set_failure_handler`](crate::set_failure_handler)); it does not stop the hooks after
    ///   it and does not turn the committed transaction into an error.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    /// use std::sync::{Arc, Mutex};
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// let log = Arc::new(Mutex::new(Vec::new()));
    /// let l = log.clone();
    /// let _ = conn.transaction(|conn| {
    ///     let l2 = l.clone();
    ///     conn.on_commit(move || l2.lock().unwrap().push("kept"));
    ///     // A nested transaction is a savepoint; rolling it back discards its hooks.
    ///     let _ = conn.transaction(|conn| {
    ///         let l3 = l.clone();
    ///         conn.on_commit(move || l3.lock().unwrap().push("discarded"));
    ///         Err::<(), _>(diesel::result::Error::RollbackTransaction)
    ///     });
    ///     QueryResult::Ok(())
    /// });
    /// assert_eq!(*log.lock().unwrap(), ["kept"]);
    /// # }
    /// ```
    #[track_caller]
    pub fn on_commit<F>(&mut self, f: F)
    where
        F: FnOnce() + Send + 'static,
    {
        let hook = Hook::commit(f, Location::caller());
        // Only deferred hooks need placing first (to keep registration order); a level that
        // ended behind the wrapper's back is settled by the next transaction operation.
        self.state.drain_inbox();
        self.state.register(hook);
    }

    /// Registers `f` to run once when the work it guards is undone: its savepoint or any
    /// enclosing level rolls back, the outermost COMMIT fails, or the database turned it into
    /// a rollback. It runs at that moment (a savepoint's rollback hooks run while the enclosing
    /// transaction goes on).
    ///
    /// Outside a transaction there is nothing to roll back: `f` is dropped unrun (a debug-level
    /// log line records it).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    /// use std::sync::mpsc;
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// let (tx, rx) = mpsc::channel();
    /// let result: QueryResult<()> = conn.transaction(|conn| {
    ///     conn.on_rollback(move || tx.send("release the reserved seat").unwrap());
    ///     Err(diesel::result::Error::RollbackTransaction)
    /// });
    /// assert!(result.is_err());
    /// assert_eq!(rx.try_recv(), Ok("release the reserved seat"));
    /// # }
    /// ```
    #[track_caller]
    pub fn on_rollback<F>(&mut self, f: F)
    where
        F: FnOnce() + Send + 'static,
    {
        let hook = Hook::rollback(f, Location::caller());
        // Only deferred hooks need placing first (to keep registration order); a level that
        // ended behind the wrapper's back is settled by the next transaction operation.
        self.state.drain_inbox();
        self.state.register(hook);
    }

    /// Registers `f` to run once when the fate of the work it guards is settled, with the
    /// [`Outcome`]: at the end of the outermost transaction, or `RolledBack` when an enclosing
    /// savepoint rolls back. Outside a transaction it runs at once with `Committed`.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::{Outcome, SignalConnection};
    /// use std::sync::mpsc;
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// let (tx, rx) = mpsc::channel();
    /// conn.transaction(|conn| {
    ///     conn.on_complete(move |outcome| tx.send(outcome).unwrap());
    ///     QueryResult::Ok(())
    /// }).unwrap();
    /// assert_eq!(rx.try_recv(), Ok(Outcome::Committed));
    /// # }
    /// ```
    #[track_caller]
    pub fn on_complete<F>(&mut self, f: F)
    where
        F: FnOnce(Outcome) + Send + 'static,
    {
        let hook = Hook::complete(f, Location::caller());
        // Only deferred hooks need placing first (to keep registration order); a level that
        // ended behind the wrapper's back is settled by the next transaction operation.
        self.state.drain_inbox();
        self.state.register(hook);
    }

    /// Registers `f` to run inside the outermost transaction, immediately before COMMIT, with
    /// the connection: it can run queries (write an audit row, check an invariant, flush a
    /// batch).
    ///
    /// - `before_commit` hooks run in registration order, after the
    ///   [`PRE_COMMIT`](crate::signals::PRE_COMMIT) receivers. Hooks they register (more
    ///   `before_commit`, `on_commit`, `on_rollback`, `defer!`) are honoured in the same commit.
    /// - An `Err` rolls the whole transaction back (rollback hooks run) and is returned from
    ///   `transaction`; a panic rolls it back and continues.
    /// - A savepoint that rolls back discards the `before_commit` hooks registered in it.
    /// - Outside a transaction `f` runs at once, and its result is returned.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:")?;
    /// diesel::sql_query("CREATE TABLE audit (note TEXT NOT NULL)").execute(&mut conn)?;
    /// conn.transaction(|conn| {
    ///     conn.before_commit(|conn| {
    ///         diesel::sql_query("INSERT INTO audit (note) VALUES ('batch flushed')")
    ///             .execute(conn)
    ///             .map(drop)
    ///     })?;
    ///     QueryResult::Ok(())
    /// })?;
    /// #[derive(QueryableByName)]
    /// struct Count { #[diesel(sql_type = diesel::sql_types::BigInt)] n: i64 }
    /// let c: Count = diesel::sql_query("SELECT COUNT(*) AS n FROM audit").get_result(&mut conn)?;
    /// assert_eq!(c.n, 1);
    /// # }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[track_caller]
    pub fn before_commit<F>(&mut self, f: F) -> QueryResult<()>
    where
        F: FnOnce(&mut SignalConnection<C>) -> QueryResult<()> + Send + 'static,
    {
        let location = Location::caller();
        self.sync();
        if self.state.stack.depth() == 0 {
            return f(self);
        }
        self.state
            .stack
            .push_pre_commit(Hook::before::<C>(Box::new(f), location));
        Ok(())
    }

    /// Runs `f` and takes out the hooks it registered in the current transaction, so a test can
    /// inspect them and run them, as Django's `captureOnCommitCallbacks` does.
    ///
    /// A transaction opened with [`begin_test_transaction`](Connection::begin_test_transaction)
    /// never commits, so its hooks never run on their own; capture them instead. Hooks
    /// registered in savepoints that `f` released are captured; those of savepoints `f` rolled
    /// back have already been settled. Returns [`Error::NotInTransaction`] outside a
    /// transaction (hooks would run at once and there would be nothing to capture).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::prelude::*;
    /// use diesel_transaction_signals::SignalConnection;
    /// use std::sync::mpsc;
    ///
    /// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// conn.begin_test_transaction().unwrap();
    /// let (tx, rx) = mpsc::channel();
    /// let ((), hooks) = conn.capture_hooks(|conn| {
    ///     conn.on_commit(move || tx.send("welcome e-mail").unwrap());
    /// }).unwrap();
    /// assert_eq!(hooks.len(), 1);
    /// assert!(rx.try_recv().is_err());
    /// assert_eq!(hooks.run_as_committed(), 1);
    /// assert_eq!(rx.try_recv(), Ok("welcome e-mail"));
    /// # }
    /// ```
    pub fn capture_hooks<R>(
        &mut self,
        f: impl FnOnce(&mut Self) -> R,
    ) -> QueryResult<(R, crate::CapturedHooks)> {
        self.sync();
        let depth = self.state.stack.depth();
        if depth == 0 {
            return Err(Error::NotInTransaction);
        }
        let start = self.state.stack.hooks.len();
        let value = f(self);
        self.sync();
        let stack = &mut self.state.stack;
        let hooks = if stack.depth() < depth {
            // `f` closed the level it was called in; its hooks are settled already.
            Vec::new()
        } else {
            let end = stack
                .levels
                .get(depth)
                .map_or(stack.hooks.len(), |l| l.start);
            let start = start.min(end);
            let taken: Vec<Hook> = stack.hooks.drain(start..end).collect();
            for l in &mut stack.levels[depth..] {
                l.start -= taken.len();
            }
            taken
        };
        Ok((
            value,
            crate::CapturedHooks::new(hooks, self.state.label.clone()),
        ))
    }

    /// Moves `defer`red hooks into place and settles levels that ended behind the wrapper's
    /// back. Called at the start of every operation. Returns the inner status it read (`None`
    /// when the wrapper had no level open and did not need to look).
    #[inline]
    pub(crate) fn sync(&mut self) -> Option<InnerState> {
        self.state.drain_inbox();
        let open = self.state.stack.depth();
        if open == 0 {
            return None;
        }
        let inner = InnerState::read(&mut self.inner);
        match inner {
            InnerState::Open { depth, .. } if depth as usize >= open => {}
            InnerState::Broken => {}
            _ => self.levels_vanished(open, inner),
        }
        Some(inner)
    }

    #[cold]
    fn levels_vanished(&mut self, open: usize, inner: InnerState) {
        log::warn!(
            target: "diesel_transaction_signals",
            "connection {}: {} transaction level(s) ended without the wrapper \
             (raw COMMIT/ROLLBACK SQL, or a transaction driven through inner_mut())",
            self.state.label,
            open - inner.depth()
        );
        self.state.finish_above(
            inner.depth(),
            Outcome::Unknown,
            "its transaction ended outside the wrapper's control",
        );
    }
}

/// A `before_commit` hook, as stored (type-erased) in the hook stack.
pub(crate) type BeforeFn<C> =
    Box<dyn FnOnce(&mut SignalConnection<C>) -> QueryResult<()> + Send + 'static>;

impl<C> fmt::Debug for SignalConnection<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignalConnection")
            .field("id", &self.state.label.id)
            .field("alias", &self.state.label.alias)
            .field("levels", &self.state.stack.depth())
            .field("pending_hooks", &self.state.stack.hooks.len())
            .finish_non_exhaustive()
    }
}

impl<C: SimpleConnection> SimpleConnection for SignalConnection<C> {
    fn batch_execute(&mut self, query: &str) -> QueryResult<()> {
        self.inner.batch_execute(query)
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
        self.state.test_transaction = true;
        Ok(())
    }

    fn execute_returning_count<T>(&mut self, source: &T) -> QueryResult<usize>
    where
        T: QueryFragment<Self::Backend> + QueryId,
    {
        self.inner.execute_returning_count(source)
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
        = C::Cursor<'conn, 'query>
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
        self.inner.load(source)
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
        self.inner.is_broken() || (self.state.stack.depth() > 0 && !self.state.test_transaction)
    }
}
