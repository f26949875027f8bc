//! The thread-local registry of open transaction levels, which lets [`defer`](fn@crate::defer) find
//! the innermost transaction open on this thread without a connection handle.
//!
//! Every level opened on a thread is registered there, in one of two ways:
//!
//! - **local** (`transaction`, `build_transaction`, `immediate_transaction`...: a closure that
//!   runs on this thread): the thread's `LOCAL_TOP` cell names it, and the level it hid is kept
//!   in the level's [`Slot`] to be restored when it closes, so entering and leaving is a swap of
//!   one cell. Hooks deferred to it wait in this thread's [`LocalBuffer`], with no lock and no
//!   atomic operation. The level ends inside that closure call, on this thread, and every
//!   operation of the connection on this thread first moves the buffer's hooks for it into its
//!   [`Ledger`], so none is left behind;
//! - **shared** (a bare `TransactionManager::begin_transaction`, `begin_test_transaction`: the
//!   connection may be moved to another thread before the level ends): an [`Entry`] in the
//!   thread's list holds the connection's [`Inbox`] (by `Arc`, so the connection stays `Send`),
//!   and hooks deferred to it wait there, behind a lock, for the connection's next operation on
//!   whatever thread.
//!
//! The innermost level is the local top, unless a shared entry was entered above it (an entry
//! remembers the local top it was entered over). Either way the connection places waiting hooks
//! at its next operation (registration, begin, commit, rollback, drop) before anything else, so
//! the order of registration is kept.
//!
//! Invariants:
//! - a level is registered when it opens and unregistered when it closes, before its hooks run;
//! - a shared level that closes on another thread than the one that opened it (a connection
//!   moved between threads mid-transaction) is marked dead in its inbox, so the stale entry it
//!   left behind is skipped and removed by the next `defer` on that thread;
//! - a local level that closes where its thread cannot see it (raw manager calls from another
//!   thread inside the closure, or out of order) is remembered by its connection with its fate;
//!   when the closure returns, its thread restores its local top ([`exit`]) and settles the
//!   hooks it holds for the level with that fate;
//! - a dropped connection closes its inbox; entries naming a closed inbox are skipped;
//! - pre-commit work is refused, never buffered, for a level whose COMMIT is in flight
//!   ([`seal`]); the ledger refuses it too, so work that slipped into the buffer just before the
//!   seal is taken and run before COMMIT is sent.
//!
//! Async connections (feature `async`) register their levels by **task** instead
//! ([`Slot::Task`]): a future migrates between threads at every `.await`, so a thread is the
//! wrong key. The task map ([`task`] below) keys entries by tokio's task id, or by the thread
//! for code running outside any task (`block_on`, a `#[tokio::main]` body), and holds the
//! connection's [`Inbox`] exactly as a shared entry does. Invariants:
//! - `defer` asks this thread's levels first (a sync transaction open on this thread is, while
//!   its closure runs, the innermost), then the current task's;
//! - a task never sees another task's levels: a spawned task does not inherit its parent's
//!   transaction, and code inside a task never falls back to its thread's entries;
//! - an entry leaves the map when its level closes, from whatever thread or task closes it.
//!
//! The task map is the general path, behind two locks (the map's, the inbox's). The common
//! case takes neither: an async connection's `transaction` runs its closure, and the level's
//! end (the pre-commit phase, COMMIT or ROLLBACK, `on_commit_async` futures), in a
//! **[`task::Scope`]**, a tokio task-local that travels with the task across `.await`s and
//! threads. While the scope's level is the task's innermost, `defer` puts hooks in the scope's
//! buffer as a sync closure's thread does, and the level is not in the map at all: it goes
//! there only when a level opens above it in the same task, so that the map can find it once
//! that one closes (invariants at [`task::Scope`]). A level opened in the task inside the
//! closure by the manager alone (a savepoint of raw manager calls, a pool object's
//! `transaction`) hides the scope until it closes; `defer` then takes the map.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::hook::Hook;
use crate::id::ConnectionId;
use crate::ledger::Ledger;
use crate::outcome::Outcome;
use crate::pre_commit::DeferError;

/// Hooks handed to a connection by `defer`, waiting for its next operation.
#[derive(Default)]
pub(crate) struct Inbox {
    pending: AtomicBool,
    /// The serial of the shared level whose COMMIT is in flight (0: none): pre-commit work
    /// offered to it is refused.
    sealed: AtomicU64,
    /// Async connections: the depth of the outermost level whose `transaction` future was
    /// dropped before it ended (0: none), for the connection's next operation to roll back.
    #[cfg(feature = "async")]
    abandoned: std::sync::atomic::AtomicUsize,
    /// Async connections: how many of its [`task::Scope`]s hold hooks (a scope counts from the
    /// first hook put in its empty buffer until the buffer is emptied).
    #[cfg(feature = "async")]
    scoped: std::sync::atomic::AtomicUsize,
    /// Async connections: how many of its levels are in the task map (a closed level looks
    /// there only if some are).
    #[cfg(feature = "async")]
    mapped: std::sync::atomic::AtomicUsize,
    state: Mutex<InboxState>,
}

#[derive(Default)]
struct InboxState {
    hooks: Vec<(u64, Hook)>,
    /// Serials of levels that closed on a thread other than the one that opened them.
    dead: Vec<u64>,
    closed: bool,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether hooks may be waiting: one atomic load.
    #[inline]
    pub(crate) fn has_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Whether hooks wait in a `transaction` level's scope (async connections): one load.
    #[cfg(feature = "async")]
    #[inline]
    pub(crate) fn has_scoped(&self) -> bool {
        self.scoped.load(Ordering::Acquire) != 0
    }

    /// Notes that a scope's empty buffer got a hook.
    #[cfg(feature = "async")]
    #[inline]
    fn note_scoped(&self) {
        self.scoped.fetch_add(1, Ordering::AcqRel);
    }

    /// Notes that a scope's buffer was emptied.
    #[cfg(feature = "async")]
    #[inline]
    fn took_scoped(&self) {
        self.scoped.fetch_sub(1, Ordering::AcqRel);
    }

    /// Swaps the waiting hooks, if any, into `into` (empty), which leaves `into`'s buffer here
    /// for the next `defer`s: once both buffers have grown, deferring allocates nothing but the
    /// hook's box.
    pub(crate) fn take_into(&self, into: &mut Vec<(u64, Hook)>) -> bool {
        let mut st = self.lock();
        if !self.pending.load(Ordering::Acquire) {
            return false;
        }
        self.pending.store(false, Ordering::Release);
        std::mem::swap(&mut st.hooks, into);
        true
    }

    /// Records that the `transaction` future that owned level `depth` was dropped before the
    /// level ended (a cancelled or panicking future).
    #[cfg(feature = "async")]
    pub(crate) fn abandon(&self, depth: usize) {
        let _ = self
            .abandoned
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |known| {
                Some(if known == 0 { depth } else { known.min(depth) })
            });
    }

    /// The outermost abandoned level, if a `transaction` future was dropped inside it.
    #[cfg(feature = "async")]
    #[inline]
    pub(crate) fn abandoned(&self) -> Option<usize> {
        match self.abandoned.load(Ordering::Acquire) {
            0 => None,
            depth => Some(depth),
        }
    }

    /// Forgets the abandoned level once it is rolled back.
    #[cfg(feature = "async")]
    pub(crate) fn clear_abandoned(&self) {
        self.abandoned.store(0, Ordering::Release);
    }

    /// Whether the connection that owns this inbox still exists.
    #[cfg(feature = "async")]
    pub(crate) fn is_open(&self) -> bool {
        !self.lock().closed
    }

    /// Marks the connection gone: later `defer`s skip entries naming this inbox.
    pub(crate) fn close(&self) -> Vec<(u64, Hook)> {
        let mut st = self.lock();
        st.closed = true;
        self.pending.store(false, Ordering::Release);
        std::mem::take(&mut st.hooks)
    }

    fn mark_dead(&self, serial: u64) {
        self.lock().dead.push(serial);
    }

    /// Offers a hook for the level `serial`; gives it back if that level is known to be gone,
    /// or (with the reason) if it is pre-commit work and the level's COMMIT is in flight.
    fn offer(&self, serial: u64, hook: Hook) -> Result<(), (Hook, Option<DeferError>)> {
        let mut st = self.lock();
        if st.closed || st.dead.contains(&serial) {
            return Err((hook, None));
        }
        if hook.is_pre_commit() && self.sealed.load(Ordering::Acquire) == serial {
            return Err((hook, Some(DeferError::CommitInFlight)));
        }
        st.hooks.push((serial, hook));
        self.pending.store(true, Ordering::Release);
        Ok(())
    }
}

/// A local level as this thread's registry knows it: its connection and serial.
pub(crate) type LocalLevel = (ConnectionId, u64);

/// Where a level sits in the registry of the thread that opened it; the connection keeps it
/// with the level, to undo it when the level closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// A local level, now or once the innermost local level of its thread; `below` is the one
    /// it hid, restored when it closes.
    Local { below: Option<LocalLevel> },
    /// A shared level: an [`Entry`] in its thread's list.
    Shared,
    /// An async connection's level: an entry in the task map.
    #[cfg(feature = "async")]
    Task(task::Entered),
}

impl Slot {
    /// Whether a level entered so may have hooks waiting for it where its connection cannot
    /// reach them (a thread's buffer, a task's scope) after it closed unseen there: its fate
    /// is remembered for them.
    #[inline]
    pub(crate) fn remembers_fate(self) -> bool {
        match self {
            Slot::Local { .. } => true,
            Slot::Shared => false,
            #[cfg(feature = "async")]
            Slot::Task(entered) => entered == task::Entered::Scoped,
        }
    }
}

/// A shared level (see the module docs).
struct Entry {
    conn: ConnectionId,
    serial: u64,
    inbox: Arc<Inbox>,
    /// The innermost local level when this one was entered: while it still is, this entry is
    /// the innermost level of the thread.
    below: Option<LocalLevel>,
}

impl Entry {
    /// Whether `defer` may still hand hooks to this level.
    fn alive(&self) -> bool {
        let st = self.inbox.lock();
        !st.closed && !st.dead.contains(&self.serial)
    }
}

struct Registry {
    open: Vec<Entry>,
    local: LocalBuffer,
}

/// Hooks deferred to local levels, in registration order, until their connection's next
/// operation on this thread. Stored as runs of
/// hooks for one level, so the usual drain (one run, for the connection's innermost level) is a
/// single move of the whole buffer.
struct LocalBuffer {
    /// `(connection, level serial, end)`: `hooks[previous run's end..end]` belong to that level.
    runs: Vec<(ConnectionId, u64, usize)>,
    hooks: Vec<Hook>,
    /// Pre-commit work (`defer_before_commit`) is among `hooks`.
    has_pre_commit: bool,
}

impl LocalBuffer {
    #[inline]
    fn push(&mut self, conn: ConnectionId, serial: u64, hook: Hook, pre_commit: bool) {
        self.has_pre_commit |= pre_commit;
        self.hooks.push(hook);
        let end = self.hooks.len();
        match self.runs.last_mut() {
            Some((c, s, e)) if *c == conn && *s == serial => *e = end,
            _ => self.runs.push((conn, serial, end)),
        }
    }

    /// Whether no hook waits here.
    #[inline]
    fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Moves `conn`'s hooks into `ledger` (those whose level is gone into `stranded`).
    fn take(
        &mut self,
        conn: ConnectionId,
        ledger: &mut Ledger<Slot>,
        stranded: &mut Vec<(u64, Hook)>,
    ) {
        match self.runs[..] {
            // Nothing waits (a closure that deferred nothing): the buffers keep their capacity.
            [] => return,
            [(c, serial, _)]
                if c == conn && serial == ledger.innermost_serial() && !ledger.is_sealed() =>
            {
                // The common case: every waiting hook is for this connection's innermost level.
                // The buffer keeps its capacity for the next `defer`s.
                ledger.append(&mut self.hooks, self.has_pre_commit);
                self.runs.clear();
            }
            _ => {
                // Several levels or connections: place this connection's hooks one by one and
                // keep the others, in order.
                let runs = std::mem::take(&mut self.runs);
                let mut hooks = std::mem::take(&mut self.hooks).into_iter();
                let mut start = 0;
                for (c, serial, end) in runs {
                    for hook in hooks.by_ref().take(end - start) {
                        if c != conn {
                            self.hooks.push(hook);
                        } else if let Err(hook) = ledger.push_to(serial, hook) {
                            stranded.push((serial, hook));
                        }
                    }
                    if c != conn {
                        self.runs.push((c, serial, self.hooks.len()));
                    }
                    start = end;
                }
            }
        }
        if self.runs.is_empty() {
            self.has_pre_commit = false;
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Unreachable while the closures that own the local levels are still on this thread's
        // stack; kept so a hook could never vanish without a trace.
        if !self.local.hooks.is_empty() {
            crate::hook::settle_all(
                self.local.hooks.drain(..),
                Outcome::Unknown,
                None,
                "its thread exited before its transaction ended",
            );
        }
    }
}

thread_local! {
    static REGISTRY: RefCell<Registry> = const {
        RefCell::new(Registry {
            open: Vec::new(),
            local: LocalBuffer {
                runs: Vec::new(),
                hooks: Vec::new(),
                has_pre_commit: false,
            },
        })
    };
    /// Whether this thread's buffer may hold deferred hooks: the one load every connection
    /// operation pays for local `defer`s (no destructor, so no liveness check either).
    static LOCAL_WAITING: Cell<bool> = const { Cell::new(false) };
    /// The innermost local level open on this thread. The levels below it are chained through
    /// their connections' [`Slot`]s, so opening and closing a local level is a swap of this cell
    /// and nothing else.
    static LOCAL_TOP: Cell<Option<LocalLevel>> = const { Cell::new(None) };
    /// The local level of this thread whose COMMIT is in flight: pre-commit work offered to it
    /// is refused.
    static SEALED_LOCAL: Cell<Option<LocalLevel>> = const { Cell::new(None) };
}

/// Whether hooks deferred on this thread may be waiting for their connection.
#[inline]
pub(crate) fn local_waiting() -> bool {
    LOCAL_WAITING.with(Cell::get)
}

/// Records that `conn` opened level `serial` on this thread: a local level when `inbox` is
/// `None`, a shared one otherwise. Returns what [`exit`] needs to undo it.
#[inline(always)]
pub(crate) fn enter(conn: ConnectionId, serial: u64, inbox: Option<&Arc<Inbox>>) -> Slot {
    match inbox {
        None => Slot::Local {
            below: LOCAL_TOP.with(|top| top.replace(Some((conn, serial)))),
        },
        Some(inbox) => enter_shared(conn, serial, inbox),
    }
}

#[cold]
fn enter_shared(conn: ConnectionId, serial: u64, inbox: &Arc<Inbox>) -> Slot {
    // During thread teardown (a connection used from a thread-local destructor) the list is
    // gone: `defer` on this thread then runs hooks at once, which is all it could do.
    let _ = REGISTRY.try_with(|reg| {
        reg.borrow_mut().open.push(Entry {
            conn,
            serial,
            inbox: Arc::clone(inbox),
            below: LOCAL_TOP.get(),
        })
    });
    Slot::Shared
}

/// Records that `conn`'s level `serial`, entered as `slot`, closed. Returns whether this thread
/// had it as its innermost level (or, for a shared level, anywhere in its list).
#[inline(always)]
pub(crate) fn exit(conn: ConnectionId, serial: u64, slot: Slot, inbox: &Inbox) -> bool {
    match slot {
        Slot::Local { below } => {
            let top = LOCAL_TOP.get();
            if top == Some((conn, serial)) {
                LOCAL_TOP.with(|cell| cell.set(below));
                true
            } else {
                // Closed on another thread, or out of order (raw manager calls): the closure
                // that opened it restores its thread's top when it returns (`exit` again).
                false
            }
        }
        Slot::Shared => exit_shared(conn, serial, inbox),
        #[cfg(feature = "async")]
        Slot::Task(entered) => task::exit(entered, conn, serial, inbox),
    }
}

#[cold]
fn exit_shared(conn: ConnectionId, serial: u64, inbox: &Inbox) -> bool {
    let found = REGISTRY
        .try_with(|reg| {
            let open = &mut reg.borrow_mut().open;
            match open
                .iter()
                .rposition(|e| e.conn == conn && e.serial == serial)
            {
                Some(i) => {
                    open.remove(i);
                    true
                }
                None => false,
            }
        })
        .unwrap_or(false);
    if !found {
        // Opened on another thread: the entry there is stale from now on.
        inbox.mark_dead(serial);
    }
    found
}

/// Moves the hooks deferred on this thread to `conn`'s local levels into `ledger`, in
/// registration order; those whose level has ended (or that are pre-commit work refused by a
/// sealed ledger) go to `stranded`, with its serial.
pub(crate) fn take_local(
    conn: ConnectionId,
    ledger: &mut Ledger<Slot>,
    stranded: &mut Vec<(u64, Hook)>,
) {
    let _ = REGISTRY.try_with(|reg| {
        let local = &mut reg.borrow_mut().local;
        local.take(conn, ledger, stranded);
        LOCAL_WAITING.set(!local.is_empty());
    });
}

/// Marks `conn`'s level `serial` (entered as `slot`) as committing: until [`unseal`], pre-commit
/// work offered to it is refused with [`DeferError::CommitInFlight`].
#[inline(always)]
pub(crate) fn seal(conn: ConnectionId, serial: u64, slot: Slot, inbox: &Inbox) {
    match slot {
        Slot::Local { .. } => SEALED_LOCAL.with(|cell| cell.set(Some((conn, serial)))),
        Slot::Shared => inbox.sealed.store(serial, Ordering::Release),
        #[cfg(feature = "async")]
        Slot::Task(_) => inbox.sealed.store(serial, Ordering::Release),
    }
}

/// Undoes [`seal`] once the COMMIT returned.
#[inline(always)]
pub(crate) fn unseal(slot: Slot, inbox: &Inbox) {
    match slot {
        Slot::Local { .. } => SEALED_LOCAL.with(|cell| cell.set(None)),
        Slot::Shared => inbox.sealed.store(0, Ordering::Release),
        #[cfg(feature = "async")]
        Slot::Task(_) => inbox.sealed.store(0, Ordering::Release),
    }
}

/// Hands a commit, rollback or complete `hook` to the innermost transaction open on this
/// thread; gives it back when there is none. The hot path of `defer`: a local level takes it
/// without a lock.
#[inline]
pub(crate) fn offer(hook: Hook) -> Result<ConnectionId, Hook> {
    let mut slot = Some(hook);
    let placed = REGISTRY.try_with(|reg| {
        let reg = &mut *reg.borrow_mut();
        let top = LOCAL_TOP.get();
        match (top, reg.open.last()) {
            // The common case, a local level above any shared one: no lock.
            (Some((conn, serial)), last) if last.is_none_or(|e| e.below != top) => {
                if let Some(hook) = slot.take() {
                    reg.local.push(conn, serial, hook, false);
                    LOCAL_WAITING.set(true);
                }
                Some(conn)
            }
            // Nothing open on this thread: the `transaction` closure of an async connection
            // running in this task takes it without a lock, if its level is the innermost.
            #[cfg(feature = "async")]
            (None, None) => task::offer_scoped(&mut slot),
            _ => None,
        }
    });
    match (placed, slot) {
        (Ok(Some(conn)), None) => Ok(conn),
        (_, Some(hook)) => offer_shared(hook, false).map_err(|(hook, _)| hook),
        (_, None) => unreachable!("a hook is taken only when placed"),
    }
}

/// Hands pre-commit work to the innermost transaction open on this thread; gives it back,
/// with the reason, when there is none or when that transaction's COMMIT is in flight.
pub(crate) fn offer_pre_commit(work: Hook) -> Result<ConnectionId, (Hook, DeferError)> {
    offer_shared(work, true)
}

/// `offer` when a shared level is the innermost (or there is none), and every offer of
/// pre-commit work: skips and drops stale shared entries on the way down.
#[cold]
fn offer_shared(hook: Hook, pre_commit: bool) -> Result<ConnectionId, (Hook, DeferError)> {
    let mut slot = Some(hook);
    let placed = REGISTRY.try_with(|reg| {
        let mut hook = slot.take().expect("taken once");
        let reg = &mut *reg.borrow_mut();
        loop {
            let top = LOCAL_TOP.get();
            match (top, reg.open.last()) {
                (_, Some(e)) if top.is_none() || e.below == top => {
                    match e.inbox.offer(e.serial, hook) {
                        Ok(()) => return Ok(e.conn),
                        Err((back, Some(why))) => return Err((back, why)),
                        Err((back, None)) => {
                            hook = back;
                            reg.open.pop();
                        }
                    }
                }
                (Some((conn, serial)), _) => {
                    if pre_commit && SEALED_LOCAL.get() == top {
                        return Err((hook, DeferError::CommitInFlight));
                    }
                    reg.local.push(conn, serial, hook, pre_commit);
                    LOCAL_WAITING.set(true);
                    return Ok(conn);
                }
                #[cfg(feature = "async")]
                (None, _) => return task::offer(hook),
                #[cfg(not(feature = "async"))]
                (None, _) => return Err((hook, DeferError::NoTransaction)),
            }
        }
    });
    match placed {
        Ok(result) => result,
        Err(_) => Err((
            slot.take().expect("not taken when the registry is gone"),
            DeferError::NoTransaction,
        )),
    }
}

/// Whether a transaction opened through a [`SignalConnection`](crate::SignalConnection) is open
/// on this thread, i.e. whether [`defer`](fn@crate::defer) would wait for a COMMIT rather than run
/// at once.
///
/// # Example
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::prelude::*;
/// use diesel_transaction_signals::{in_transaction, SignalConnection};
///
/// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
/// assert!(!in_transaction());
/// conn.transaction(|_| {
///     assert!(in_transaction());
///     QueryResult::Ok(())
/// }).unwrap();
/// assert!(!in_transaction());
/// # }
/// ```
pub fn in_transaction() -> bool {
    #[cfg(feature = "async")]
    if task::in_transaction() {
        return true;
    }
    LOCAL_TOP.get().is_some()
        || REGISTRY
            .try_with(|reg| {
                let open = &mut reg.borrow_mut().open;
                while let Some(top) = open.last() {
                    if top.alive() {
                        return true;
                    }
                    open.pop();
                }
                false
            })
            .unwrap_or(false)
}

/// The task map: levels of async connections, by task (see the module docs).
#[cfg(feature = "async")]
pub(crate) mod task {
    use std::cell::RefCell;
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard};

    use super::{Inbox, Slot};
    use crate::hook::{settle_all, Hook};
    use crate::id::ConnectionId;
    use crate::ledger::Ledger;
    use crate::outcome::Outcome;
    use crate::pre_commit::DeferError;

    /// Whose levels an entry belongs to: a tokio task, or a thread running outside any task.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub(crate) enum Key {
        Task(tokio::task::Id),
        Thread(std::thread::ThreadId),
    }

    impl Key {
        /// The current task, or this thread when no task is running here.
        pub(crate) fn current() -> Key {
            match tokio::task::try_id() {
                Some(id) => Key::Task(id),
                None => Key::Thread(std::thread::current().id()),
            }
        }
    }

    struct Entry {
        key: Key,
        conn: ConnectionId,
        serial: u64,
        inbox: Arc<Inbox>,
    }

    /// Levels open in the map, so `defer` outside any async transaction skips the lock.
    static OPEN: AtomicUsize = AtomicUsize::new(0);
    /// The open async levels of the process that are in the map, in the order they were put
    /// there: one flat list, which keeps its capacity, so entering and exiting a level
    /// allocates nothing once it has grown. A task's levels are found by scanning from the end
    /// (the mapped levels of the process: a few per concurrent transaction).
    static MAP: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

    fn map() -> MutexGuard<'static, Vec<Entry>> {
        MAP.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `conn`'s level `serial` in the map under `key`.
    fn push(map: &mut Vec<Entry>, key: Key, conn: ConnectionId, serial: u64, inbox: &Arc<Inbox>) {
        map.push(Entry {
            key,
            conn,
            serial,
            inbox: Arc::clone(inbox),
        });
        inbox.mapped.fetch_add(1, Ordering::Release);
        OPEN.fetch_add(1, Ordering::Release);
    }

    /// Takes the entry at `i` out of the map.
    fn remove(map: &mut Vec<Entry>, i: usize) {
        let entry = map.remove(i);
        entry.inbox.mapped.fetch_sub(1, Ordering::Release);
        OPEN.fetch_sub(1, Ordering::Release);
    }

    /// How an async level was entered, kept in its [`Slot`] to undo it when it closes.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Entered {
        /// The level of a `transaction` closure's [`Scope`]: found through the scope while it
        /// is the task's innermost, and put in the map only once a level opens above it in the
        /// task (the map must find it when that one closes).
        Scoped,
        /// In the map from the start (a level opened by the manager alone), under `key`;
        /// `hid` is the [`Scope`] running in the task when it opened, if any.
        Mapped {
            key: Key,
            hid: Option<(ConnectionId, u64)>,
        },
    }

    /// Puts the level of the scope running in this task in the map, if it is open and not
    /// there yet: a level is opening above it, and `defer` may have to find it through the map
    /// once that one closes.
    fn map_scope(scope: &mut Scope, map: &mut Vec<Entry>) {
        if scope.open && !scope.in_map {
            scope.in_map = true;
            push(map, Key::current(), scope.conn, scope.serial, &scope.inbox);
        }
    }

    /// Records that `conn` opened level `serial` in the current task, outside a `transaction`
    /// closure's scope of its own (a pool object's `transaction`, raw manager calls): it goes
    /// in the map, and hides the scope running in this task, if any, until it closes.
    pub(crate) fn enter(conn: ConnectionId, serial: u64, inbox: &Arc<Inbox>) -> Slot {
        let key = Key::current();
        let mut map = map();
        let hid = SCOPE
            .try_with(|scope| {
                let mut scope = scope.borrow_mut();
                map_scope(&mut scope, &mut map);
                scope.hidden += 1;
                (scope.conn, scope.serial)
            })
            .ok();
        push(&mut map, key, conn, serial, inbox);
        Slot::Task(Entered::Mapped { key, hid })
    }

    /// Records that a level opened whose `transaction` closure will run in a [`Scope`] of its
    /// own: no map entry, unless the enclosing scope's level has to go there.
    #[inline]
    pub(crate) fn enter_scoped() -> Slot {
        let _ = SCOPE.try_with(|scope| {
            let mut scope = scope.borrow_mut();
            if scope.open && !scope.in_map {
                map_scope(&mut scope, &mut map());
            }
        });
        Slot::Task(Entered::Scoped)
    }

    /// Records that `conn`'s level `serial`, entered as `entered`, closed. Returns whether the
    /// task could see it close: always for a mapped level (the map is reachable from every
    /// thread), for a scoped one only inside its own scope.
    #[inline]
    pub(crate) fn exit(entered: Entered, conn: ConnectionId, serial: u64, inbox: &Inbox) -> bool {
        match entered {
            Entered::Scoped => {
                // Closed in its own scope (the usual case), the scope stops taking hooks; closed
                // elsewhere (raw manager calls in a nested closure, the rollback of an abandoned
                // level), the connection remembers its fate for what the scope may still take.
                let own = SCOPE
                    .try_with(|scope| {
                        let mut scope = scope.borrow_mut();
                        let own = (scope.conn, scope.serial) == (conn, serial);
                        if own {
                            scope.open = false;
                        }
                        own
                    })
                    .unwrap_or(false);
                if inbox.mapped.load(Ordering::Acquire) != 0 {
                    let mut map = map();
                    if let Some(i) = map
                        .iter()
                        .rposition(|e| e.conn == conn && e.serial == serial)
                    {
                        remove(&mut map, i);
                    }
                }
                own
            }
            Entered::Mapped { key, hid } => {
                {
                    let mut map = map();
                    if let Some(i) = map
                        .iter()
                        .rposition(|e| e.key == key && e.conn == conn && e.serial == serial)
                    {
                        remove(&mut map, i);
                    }
                }
                // Closed inside the closure whose level it hid (anywhere else, that closure's
                // scope stays on the task map's path until it ends: slower, never wrong, as its
                // level went in the map when this one opened).
                let _ = SCOPE.try_with(|scope| {
                    let mut scope = scope.borrow_mut();
                    let this = (scope.conn, scope.serial);
                    if hid == Some(this) {
                        scope.hidden -= 1;
                    } else if this == (conn, serial) {
                        // The closure's own level, ended by the closure itself (raw manager
                        // calls).
                        scope.open = false;
                    }
                });
                true
            }
        }
    }

    tokio::task_local! {
        /// The [`Scope`] of the async `transaction` running in this task.
        static SCOPE: RefCell<Box<Scope>>;
    }

    /// The state of an async connection's `transaction` level, carried by its task across
    /// `.await`s and threads: a tokio task-local, set around the closure and the level's end
    /// (COMMIT or ROLLBACK, the pre-commit phase, `on_commit_async` futures). While the level
    /// is the task's innermost, `defer` puts hooks in its buffer with no lock and no atomic
    /// operation, as a sync closure's thread does. Invariants:
    /// - hooks go to the buffer only while `open` and `hidden == 0`; pre-commit work then goes
    ///   to the connection's inbox, for the level's serial (so a sealed level refuses it); every
    ///   other `defer` takes the task map's path;
    /// - the level is in the map only from the moment a level opens above it in the task
    ///   (`in_map`): the map's path finds it when that one has closed, or when the closure
    ///   ended a nested level itself;
    /// - the connection takes the buffer's hooks into its ledger at its next operation in this
    ///   task while the scope runs (the inbox counts the scopes whose buffer holds hooks, so
    ///   one load says whether to look), and so when the closure returns: registration order
    ///   is kept, and a scope hidden behind another one keeps its hooks until it runs again;
    /// - dropped while `armed` (until a RELEASE is sent; a dropped COMMIT closes the level as
    ///   `Unknown` in the connection's in-flight guard) with the level still open (a cancelled
    ///   `transaction` future), it marks the level abandoned, and the rollback of the abandoned
    ///   level settles its hooks; dropped with hooks in its buffer (armed or not), it hands them
    ///   to the connection's inbox, for their level or its fate. (The inbox cannot be closed
    ///   then: the dropped future borrowed the connection. Were it refused, the hooks would be
    ///   settled `Unknown` with a log line, never dropped unseen.)
    pub(crate) struct Scope {
        conn: ConnectionId,
        serial: u64,
        inbox: Arc<Inbox>,
        /// The depth of the level, marked abandoned if the scope is dropped while `armed`.
        depth: usize,
        /// A drop now leaves work to roll back: cleared as a RELEASE is sent.
        armed: bool,
        /// The level is still open.
        open: bool,
        /// The level is in the task map.
        in_map: bool,
        /// Levels opened in this task by the manager alone, inside the scope, and not closed
        /// there yet.
        hidden: u32,
        /// Hooks `defer`red to the level, in registration order.
        buffer: Vec<Hook>,
    }

    impl Scope {
        /// The scope of `conn`'s level `serial` (at `depth`), in the connection's `spare` box
        /// when it has one (an ended scope, its buffer empty with its capacity, its inbox
        /// handle kept): once the connection has one, a transaction allocates nothing and
        /// moves two words in and out of the task-local at each poll.
        pub(crate) fn new(
            conn: ConnectionId,
            serial: u64,
            depth: usize,
            inbox: &Arc<Inbox>,
            spare: Option<Box<Scope>>,
        ) -> Box<Scope> {
            match spare {
                Some(mut scope) => {
                    debug_assert!(scope.buffer.is_empty() && !scope.armed);
                    if !Arc::ptr_eq(&scope.inbox, inbox) {
                        scope.inbox = Arc::clone(inbox);
                    }
                    scope.conn = conn;
                    scope.serial = serial;
                    scope.depth = depth;
                    scope.armed = true;
                    scope.open = true;
                    scope.in_map = false;
                    scope.hidden = 0;
                    scope
                }
                None => Box::new(Scope {
                    conn,
                    serial,
                    inbox: Arc::clone(inbox),
                    depth,
                    armed: true,
                    open: true,
                    in_map: false,
                    hidden: 0,
                    buffer: Vec::new(),
                }),
            }
        }
    }

    impl Drop for Scope {
        fn drop(&mut self) {
            if self.armed && self.open {
                // The future was dropped before the level ended: the least that is safe
                // without the connection (which the dropped future borrowed) is a mark in the
                // inbox, and the waiting hooks handed to it; the rollback needs I/O and happens
                // at the connection's next operation.
                self.inbox.abandon(self.depth);
            }
            if self.buffer.is_empty() {
                return;
            }
            // Dropped with hooks waiting (cancelled, or while a RELEASE was in flight): the
            // connection places them at its next operation, with their level or its fate.
            self.inbox.took_scoped();
            for hook in std::mem::take(&mut self.buffer) {
                if let Err((hook, _)) = self.inbox.offer(self.serial, hook) {
                    settle_all(
                        std::iter::once(hook),
                        Outcome::Unknown,
                        None,
                        "its connection was dropped with the transaction future",
                    );
                }
            }
        }
    }

    /// Runs `fut`, a `transaction` level's future, in `scope`; once it is done, the future
    /// gives the scope back (`take_value`) for [`end_scope`].
    pub(crate) fn scoped<F: Future>(
        scope: Box<Scope>,
        fut: F,
    ) -> tokio::task::futures::TaskLocalFuture<RefCell<Box<Scope>>, F> {
        SCOPE.scope(RefCell::new(scope), fut)
    }

    /// Disarms the scope running in this task as a RELEASE is about to be sent (a drop from now
    /// on leaves the level as diesel-async's manager leaves it), or arms it again when the
    /// RELEASE failed and left the level open.
    pub(crate) fn arm(armed: bool) {
        let _ = SCOPE.try_with(|scope| scope.borrow_mut().armed = armed);
    }

    /// Ends `scope`, given back by its finished future: returns it, disarmed and empty, as the
    /// connection's spare, and what its buffer still held (nothing, unless hooks were
    /// `defer`red to a level that a nested closure ended), for the connection to settle.
    pub(crate) fn end_scope(scope: Option<RefCell<Box<Scope>>>) -> (Option<Box<Scope>>, Vec<Hook>) {
        let Some(scope) = scope else {
            return (None, Vec::new());
        };
        let mut scope = scope.into_inner();
        scope.armed = false;
        scope.open = false;
        let left = if scope.buffer.is_empty() {
            Vec::new()
        } else {
            scope.inbox.took_scoped();
            std::mem::take(&mut scope.buffer)
        };
        (Some(scope), left)
    }

    /// `defer`'s lock-free path: puts the hook in `slot` into the buffer of the scope running
    /// in this task, if its level is the task's innermost. Returns its connection then.
    #[inline]
    pub(crate) fn offer_scoped(slot: &mut Option<Hook>) -> Option<ConnectionId> {
        SCOPE
            .try_with(|scope| {
                let scope = &mut *scope.borrow_mut();
                if !scope.open || scope.hidden != 0 {
                    return None;
                }
                let hook = slot.take()?;
                if scope.buffer.is_empty() {
                    scope.inbox.note_scoped();
                }
                scope.buffer.push(hook);
                Some(scope.conn)
            })
            .ok()
            .flatten()
    }

    /// Moves the hooks that the scope running in this task holds for `conn` into `ledger`
    /// (those whose level has ended into `stranded`, with its serial).
    pub(crate) fn take_scoped(
        conn: ConnectionId,
        ledger: &mut Ledger<Slot>,
        stranded: &mut Vec<(u64, Hook)>,
    ) {
        let _ = SCOPE.try_with(|scope| {
            let scope = &mut *scope.borrow_mut();
            if scope.conn != conn || scope.buffer.is_empty() {
                return;
            }
            place(scope.serial, &mut scope.buffer, ledger, stranded);
            scope.inbox.took_scoped();
        });
    }

    /// Moves `buffer`'s hooks, `defer`red to level `serial`, into `ledger` (into `stranded`
    /// when that level has ended), leaving `buffer` empty with its capacity.
    #[inline]
    pub(crate) fn place(
        serial: u64,
        buffer: &mut Vec<Hook>,
        ledger: &mut Ledger<Slot>,
        stranded: &mut Vec<(u64, Hook)>,
    ) {
        if buffer.is_empty() {
            return;
        }
        if serial == ledger.innermost_serial() {
            // The common case: the hooks join the innermost level in one move.
            ledger.append(buffer, false);
            return;
        }
        for hook in buffer.drain(..) {
            if let Err(hook) = ledger.push_to(serial, hook) {
                stranded.push((serial, hook));
            }
        }
    }

    /// Hands `hook` to the innermost level open in the current task; gives it back when
    /// there is none. The path of pre-commit work, and of hooks when that level is not the
    /// scope's.
    #[cold]
    pub(crate) fn offer(hook: Hook) -> Result<ConnectionId, (Hook, DeferError)> {
        let mut hook = hook;
        let target = SCOPE
            .try_with(|scope| {
                let scope = scope.borrow();
                (scope.open && scope.hidden == 0)
                    .then(|| (scope.conn, scope.serial, Arc::clone(&scope.inbox)))
            })
            .ok()
            .flatten();
        if let Some((conn, serial, inbox)) = target {
            match inbox.offer(serial, hook) {
                Ok(()) => return Ok(conn),
                Err((back, Some(why))) => return Err((back, why)),
                Err((back, None)) => hook = back,
            }
        }
        if OPEN.load(Ordering::Acquire) == 0 {
            return Err((hook, DeferError::NoTransaction));
        }
        let key = Key::current();
        let mut map = map();
        while let Some(i) = map.iter().rposition(|e| e.key == key) {
            let top = &map[i];
            match top.inbox.offer(top.serial, hook) {
                Ok(()) => return Ok(top.conn),
                Err((back, Some(why))) => return Err((back, why)),
                Err((back, None)) => {
                    // Its connection is gone: a stale entry.
                    hook = back;
                    remove(&mut map, i);
                }
            }
        }
        Err((hook, DeferError::NoTransaction))
    }

    /// Whether a level of an async connection is open in the current task.
    pub(crate) fn in_transaction() -> bool {
        if SCOPE.try_with(|scope| scope.borrow().open) == Ok(true) {
            return true;
        }
        if OPEN.load(Ordering::Acquire) == 0 {
            return false;
        }
        let key = Key::current();
        map().iter().any(|e| e.key == key && e.inbox.is_open())
    }
}
