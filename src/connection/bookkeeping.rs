//! The connection's level bookkeeping: the [`Ledger`] plus what ties it to the thread registry
//! (entering and exiting levels, hooks `defer`red from this thread or others), the signals and
//! the logs. The transaction manager drives it; the registration API feeds it hooks.

use std::sync::Arc;
use std::time::Instant;

use crate::hook::{settle_all, Hook, Settled};
use crate::id::{ConnectionId, Label};
use crate::ledger::{Ledger, Level, Step};
use crate::outcome::Outcome;
use crate::registry::{self, Inbox, Slot};
use crate::signals::{self, TransactionEvent};

/// What a [`SignalConnection`](super::SignalConnection) keeps beside its inner connection: the
/// [`Ledger`] of its transaction, and what ties the ledger to the thread registry, the signals
/// and the logs. Its `Drop` settles what a dropped connection leaves open.
pub(crate) struct Bookkeeping {
    pub(crate) ledger: Ledger<Slot>,
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) label: Label,
    /// The backend's short name, for signal events.
    pub(crate) backend: &'static str,
    /// When the outermost level opened.
    pub(crate) opened_at: Option<Instant>,
    /// The buffer swapped with the inbox's when `defer`red hooks are moved in (kept empty).
    deferred: Vec<(u64, Hook)>,
    /// Local levels that closed where their thread's registry could not see it (another
    /// thread, or out of order), with their fate (`None`: released into the enclosing level),
    /// for the hooks that thread may still hold for them. Cleared when a transaction begins.
    ended_elsewhere: Vec<(u64, Option<Outcome>)>,
    /// A statement ran in the open transaction that may have ended it on the server without
    /// the inner connection noticing (MySQL: raw SQL, which may be DDL): the server is asked
    /// before a rollback whose outcome depends on it.
    pub(crate) unverified: bool,
    /// A `load` failed inside the transaction and could not be looked into then (its cursor
    /// borrows the inner connection): the next operation checks whether the server ended the
    /// transaction.
    pub(crate) check_pending: bool,
    /// The backend is MySQL / MariaDB.
    pub(crate) mysql: bool,
}

impl Bookkeeping {
    pub(crate) fn new(backend: &'static str) -> Self {
        Bookkeeping {
            ledger: Ledger::default(),
            inbox: Arc::default(),
            label: Label {
                id: ConnectionId::next(),
                alias: None,
            },
            backend,
            opened_at: None,
            deferred: Vec::new(),
            ended_elsewhere: Vec::new(),
            unverified: false,
            check_pending: false,
            mysql: backend == "mysql",
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
        #[cfg(feature = "async")]
        if self.inbox.has_scoped() {
            self.take_scoped();
        }
        if self.inbox.has_pending() {
            self.drain_pending();
        }
    }

    /// Takes the hooks that `defer` left in the scope of an async `transaction` closure
    /// running in this task (see [`registry::task::Scope`]).
    #[cfg(feature = "async")]
    #[cold]
    fn take_scoped(&mut self) {
        let mut stranded = Vec::new();
        registry::task::take_scoped(self.label.id, &mut self.ledger, &mut stranded);
        for (serial, hook) in stranded {
            self.settle_stranded(serial, hook);
        }
    }

    /// Settles the hooks an async `transaction` level's scope still held when it ended
    /// ([`registry::task::end_scope`]): `defer`red to level `serial` after a nested closure
    /// ended it. `buffer` is left empty, with its capacity.
    #[cfg(feature = "async")]
    #[inline]
    pub(crate) fn place_scoped(&mut self, serial: u64, buffer: &mut Vec<Hook>) {
        if !buffer.is_empty() {
            self.place_scoped_slow(serial, buffer);
        }
    }

    #[cfg(feature = "async")]
    #[cold]
    fn place_scoped_slow(&mut self, serial: u64, buffer: &mut Vec<Hook>) {
        let mut stranded = Vec::new();
        registry::task::place(serial, buffer, &mut self.ledger, &mut stranded);
        for (serial, hook) in stranded {
            self.settle_stranded(serial, hook);
        }
    }

    #[cold]
    fn take_local(&mut self) {
        let mut stranded = Vec::new();
        registry::take_local(self.label.id, &mut self.ledger, &mut stranded);
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
            Some(None) if self.ledger.depth() > 0 => {
                match self.ledger.push_to(self.ledger.innermost_serial(), hook) {
                    Ok(()) => return,
                    Err(hook) => hook,
                }
            }
            _ => hook,
        };
        let (outcome, why) = match fate {
            Some(Some(outcome)) => (
                outcome,
                "its transaction level ended where the closure that deferred it could not see \
                 (another thread, a nested closure)",
            ),
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
            if let Err(hook) = self.ledger.push_to(serial, hook) {
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
    pub(crate) fn open_level(&mut self, local: bool) -> (u64, Slot) {
        self.before_open();
        let (id, inbox) = (self.label.id, &self.inbox);
        self.ledger
            .open(|serial| registry::enter(id, serial, (!local).then_some(inbox)))
    }

    /// Opens a level of an async connection, opened by the manager alone: registered in the
    /// task map under the current task (see [`registry`]). Returns its serial and slot.
    #[cfg(feature = "async")]
    pub(crate) fn open_task_level(&mut self) -> (u64, Slot) {
        self.before_open();
        let (id, inbox) = (self.label.id, &self.inbox);
        self.ledger
            .open(|serial| registry::task::enter(id, serial, inbox))
    }

    /// Opens a level of an async connection whose `transaction` closure runs in a task-local
    /// scope of its own ([`registry::task::Scope`]). Returns its serial and slot.
    #[cfg(feature = "async")]
    #[inline]
    pub(crate) fn open_scoped_level(&mut self) -> (u64, Slot) {
        self.before_open();
        self.ledger.open(|_| registry::task::enter_scoped())
    }

    /// What a new outermost transaction starts from (nothing to do for a savepoint).
    #[inline(always)]
    fn before_open(&mut self) {
        if self.ledger.depth() == 0 {
            // Read the clock only for signal receivers: `Instant::now` is the costliest step of
            // a hook-free transaction (a serialising `rdtscp`, ~40 ns in a VM).
            self.opened_at = signals::any_receivers().then(Instant::now);
            self.unverified = false;
            if !self.ended_elsewhere.is_empty() {
                self.ended_elsewhere.clear();
            }
        }
    }

    /// Notes that a statement whose SQL the wrapper cannot see (raw SQL, a boxed query) ran: on
    /// MySQL it may have committed the transaction implicitly.
    #[inline(always)]
    pub(crate) fn raw_statement(&mut self) {
        if self.mysql && self.ledger.depth() > 0 {
            self.unverified = true;
        }
    }

    /// Seals the outermost level before its COMMIT is sent: pre-commit work offered to it from
    /// now on (an `Instrumentation` callback, another thread) is refused, not lost. Returns its
    /// slot for [`registry::unseal`].
    #[inline(always)]
    pub(crate) fn seal(&mut self) -> Slot {
        let level = self.ledger.levels[0];
        registry::seal(self.label.id, level.serial, level.slot, &self.inbox);
        level.slot
    }

    /// The next round of the pre-commit phase: the queued pre-commit work, in registration
    /// order. With none queued, the ledger is sealed, what slipped in before the seal is taken,
    /// and `None` ends the phase (the ledger stays sealed until the transaction ends). Call
    /// with the outermost level alone open.
    pub(crate) fn next_pre_commit_round(&mut self) -> Option<Vec<Hook>> {
        let pending = self.ledger.take_pre_commit();
        if !pending.is_empty() {
            return Some(pending);
        }
        // Close the door, then take what slipped in before it closed.
        let slot = self.seal();
        self.drain_inbox();
        let pending = self.ledger.take_pre_commit();
        if pending.is_empty() {
            self.ledger.seal();
            return None;
        }
        registry::unseal(slot, &self.inbox);
        Some(pending)
    }

    /// A pre-commit hook registered at `location` failed (`Err`: it refused the commit; a
    /// panic otherwise): the rest of its round is discarded, each with a log line.
    pub(crate) fn pre_commit_failed(
        &mut self,
        location: &std::panic::Location<'static>,
        error: Option<&diesel::result::Error>,
        rest: impl Iterator<Item = Hook>,
    ) {
        for hook in rest {
            self.ledger.totals.discarded += 1;
            log::debug!(
                target: "diesel_transaction_signals",
                "before_commit hook registered at {} discarded: an earlier one failed",
                hook.location()
            );
        }
        if let Some(e) = error {
            log::debug!(
                target: "diesel_transaction_signals",
                "connection {}: before_commit hook registered at {location} refused the commit: {e}",
                self.label
            );
        }
    }

    /// Row E1: the server ended the transaction; the caller's levels stay open with `fate`.
    /// Returns whether there were levels (the driver then tells its inner connection that no
    /// transaction is open).
    #[cold]
    pub(crate) fn lose(&mut self, fate: Outcome, cause: &str) -> bool {
        if self.ledger.depth() == 0 {
            return false;
        }
        log::warn!(
            target: "diesel_transaction_signals",
            "connection {}: the database ended the transaction on its own ({cause}); its hooks \
             settle {fate}, and statements are refused until its outermost level ends",
            self.label
        );
        self.ledger.lose(fate);
        true
    }

    /// Carries out a ledger [`Step`] that the transition table chose.
    #[inline(always)]
    pub(crate) fn apply(&mut self, step: Step) {
        match step {
            Step::Keep | Step::Open => {}
            Step::Release => self.release_level(),
            Step::Close { keep, outcome, why } => {
                self.close(keep, outcome, why);
            }
        }
    }

    /// Releases the innermost level after its savepoint was released: its hooks join the
    /// enclosing level.
    #[inline]
    pub(crate) fn release_level(&mut self) {
        self.drain_inbox();
        if let Some(level) = self.ledger.release() {
            self.exit(level, None);
        }
    }

    /// Undoes `level`'s registry entry (see [`exit_level`]).
    #[inline(always)]
    fn exit(&mut self, level: Level<Slot>, fate: Option<Outcome>) {
        exit_level(
            self.label.id,
            &self.inbox,
            &mut self.ended_elsewhere,
            level,
            fate,
        );
    }

    /// Closes every level above the `keep` outermost ones and settles their hooks for
    /// `outcome`, all in registration order. Closing the outermost level sends the
    /// end-of-transaction signals (not for a test transaction).
    #[inline]
    pub(crate) fn close(&mut self, keep: usize, outcome: Outcome, why: &str) -> Settled {
        self.drain_inbox();
        if self.ledger.depth() == keep + 1 && self.close_empty_innermost(outcome) {
            return Settled::default();
        }
        self.close_with_hooks(keep, outcome, why)
    }

    /// The common end of a level: it holds no hook, so there is nothing to settle. Closes the
    /// innermost level if that is so and says whether it did. Call after `drain_inbox`.
    #[inline(always)]
    pub(crate) fn close_empty_innermost(&mut self, outcome: Outcome) -> bool {
        let Some((level, outermost, test)) = self.ledger.close_empty() else {
            return false;
        };
        self.exit(level, Some(outcome));
        log::trace!(
            target: "diesel_transaction_signals",
            "connection {}: level {} {outcome}",
            self.label,
            self.ledger.depth() + 1
        );
        if outermost && !test && signals::any_post_receivers() {
            self.send_post(outcome);
        }
        true
    }

    #[cold]
    fn send_post(&self, outcome: Outcome) {
        signals::send_post(&self.event(Some(outcome)));
    }

    /// `close` with hooks to settle, or several levels to close.
    #[inline(never)]
    fn close_with_hooks(&mut self, keep: usize, outcome: Outcome, why: &str) -> Settled {
        let depth = self.ledger.depth();
        let Bookkeeping {
            ledger,
            inbox,
            label,
            ended_elsewhere,
            ..
        } = self;
        let (settled, outermost, test) = {
            let Some(closed) = ledger.close(keep) else {
                return Settled::default();
            };
            let (outermost, test) = (closed.outermost, closed.test_transaction);
            for level in closed.levels.rev() {
                exit_level(label.id, inbox, ended_elsewhere, level, Some(outcome));
            }
            log::trace!(
                target: "diesel_transaction_signals",
                "connection {label}: levels {}..={depth} {outcome}",
                keep + 1
            );
            (
                settle_all(closed.hooks, outcome, Some(label), why),
                outermost,
                test,
            )
        };
        self.ledger.totals += settled;
        if outermost && !test && signals::any_post_receivers() {
            self.send_post(outcome);
        }
        settled
    }

    /// The signal event describing the current outermost transaction.
    pub(crate) fn event(&self, outcome: Option<Outcome>) -> TransactionEvent {
        TransactionEvent {
            connection: self.label.id,
            alias: self.label.alias.clone(),
            backend: self.backend,
            outcome,
            duration: self.opened_at.map(|t| t.elapsed()).unwrap_or_default(),
            hooks_ran: self.ledger.totals.ran,
            hooks_discarded: self.ledger.totals.discarded,
        }
    }

    /// Closes every open level and drops its hooks unrun: the end of a test transaction when
    /// the connection is dropped.
    fn discard_all(&mut self, why: &str) {
        self.drain_inbox();
        let Bookkeeping {
            ledger,
            inbox,
            label,
            ended_elsewhere,
            ..
        } = self;
        let Some(closed) = ledger.close(0) else {
            return;
        };
        for level in closed.levels.rev() {
            exit_level(
                label.id,
                inbox,
                ended_elsewhere,
                level,
                Some(Outcome::RolledBack),
            );
        }
        for hook in closed.hooks {
            log::debug!(
                target: "diesel_transaction_signals",
                "{} hook registered at {} discarded: {why} (connection {label})",
                hook.kind(),
                hook.location()
            );
        }
    }

    /// Adds a hook to the innermost level, or settles it at once outside a transaction.
    /// Call after `drain_inbox`.
    #[inline]
    pub(crate) fn register(&mut self, hook: Hook) {
        if self.ledger.depth() == 0 {
            self.settle_now(hook);
        } else {
            self.ledger.push(hook);
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
fn exit_level(
    id: ConnectionId,
    inbox: &Inbox,
    ended_elsewhere: &mut Vec<(u64, Option<Outcome>)>,
    level: Level<Slot>,
    fate: Option<Outcome>,
) {
    if !registry::exit(id, level.serial, level.slot, inbox) && level.slot.remembers_fate() {
        remember_ended(ended_elsewhere, level.serial, fate);
    }
}

#[cold]
fn remember_ended(ended: &mut Vec<(u64, Option<Outcome>)>, serial: u64, fate: Option<Outcome>) {
    ended.push((serial, fate));
}

impl Drop for Bookkeeping {
    fn drop(&mut self) {
        self.drain_inbox();
        let deferred = self.inbox.close();
        self.place(deferred.into_iter());
        if self.ledger.depth() == 0 {
            return;
        }
        if self.ledger.is_test_transaction() {
            self.discard_all("a test transaction never commits");
        } else {
            let (outcome, why) = match self.ledger.lost() {
                Some(fate) => (fate, "the server had ended the transaction on its own"),
                None => (
                    Outcome::RolledBack,
                    "the connection was dropped inside a transaction, which rolls it back",
                ),
            };
            self.close(0, outcome, why);
        }
    }
}
