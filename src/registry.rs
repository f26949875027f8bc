//! The thread-local registry of open transaction levels, which lets [`defer`](crate::defer) find
//! the innermost transaction open on this thread without a connection handle.
//!
//! Each thread keeps a stack of [`Entry`]s: one per transaction level opened on it, innermost
//! last. An entry names its connection's [`Inbox`] (shared by `Arc`, so the connection stays
//! `Send`) and the level's serial number. `defer` pushes `(serial, hook)` into the inbox; the
//! connection moves inbox hooks into its own [`HookStack`](crate::hooks::HookStack) at its next
//! operation (registration, begin, commit, rollback, drop), before anything else, so the order
//! of registration is kept.
//!
//! Invariants:
//! - an entry is pushed when a level opens and removed when it closes, before its hooks run;
//! - a level that closes on another thread than the one that opened it (a connection moved
//!   between threads mid-transaction) is marked dead in its inbox, so the stale entry it left
//!   behind is skipped and removed by the next `defer` on that thread;
//! - a dropped connection closes its inbox; entries naming a closed inbox are skipped.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::hooks::Hook;
use crate::ConnectionId;

/// Hooks handed to a connection by `defer`, waiting for its next operation.
#[derive(Default)]
pub(crate) struct Inbox {
    pending: AtomicBool,
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

    /// Offers a hook for the level `serial`; gives it back if that level is known to be gone.
    fn offer(&self, serial: u64, hook: Hook) -> Result<(), Hook> {
        let mut st = self.lock();
        if st.closed || st.dead.contains(&serial) {
            return Err(hook);
        }
        st.hooks.push((serial, hook));
        self.pending.store(true, Ordering::Release);
        Ok(())
    }
}

struct Entry {
    conn: ConnectionId,
    serial: u64,
    inbox: Arc<Inbox>,
}

thread_local! {
    static OPEN: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
}

/// Records that `conn` opened level `serial` on this thread.
#[inline]
pub(crate) fn enter(conn: ConnectionId, serial: u64, inbox: &Arc<Inbox>) {
    // During thread teardown (a connection used from a thread-local destructor) the registry
    // is gone: `defer` on this thread then runs hooks at once, which is all it could do.
    let _ = OPEN.try_with(|open| {
        open.borrow_mut().push(Entry {
            conn,
            serial,
            inbox: Arc::clone(inbox),
        })
    });
}

/// Records that `conn`'s level `serial` closed.
#[inline]
pub(crate) fn leave(conn: ConnectionId, serial: u64, inbox: &Inbox) {
    let found = OPEN
        .try_with(|open| {
            let mut open = open.borrow_mut();
            match open
                .iter()
                .rposition(|e| e.conn == conn && e.serial == serial)
            {
                Some(i) if i + 1 == open.len() => {
                    open.pop();
                    true
                }
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
}

/// Hands `hook` to the innermost transaction open on this thread; gives it back when there is
/// none.
pub(crate) fn offer(hook: Hook) -> Result<ConnectionId, Hook> {
    let mut slot = Some(hook);
    let placed = OPEN.try_with(|open| {
        let mut hook = slot.take().expect("taken once");
        let mut open = open.borrow_mut();
        while let Some(top) = open.last() {
            match top.inbox.offer(top.serial, hook) {
                Ok(()) => return Ok(top.conn),
                Err(back) => {
                    hook = back;
                    open.pop();
                }
            }
        }
        Err(hook)
    });
    match placed {
        Ok(result) => result,
        Err(_) => Err(slot.take().expect("not taken when the registry is gone")),
    }
}

/// Whether a transaction opened through a [`SignalConnection`](crate::SignalConnection) is open
/// on this thread, i.e. whether [`defer`](crate::defer) would wait for a COMMIT rather than run
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
    OPEN.try_with(|open| {
        let mut open = open.borrow_mut();
        while let Some(top) = open.last() {
            let st = top.inbox.lock();
            if st.closed || st.dead.contains(&top.serial) {
                drop(st);
                open.pop();
            } else {
                return true;
            }
        }
        false
    })
    .unwrap_or(false)
}
