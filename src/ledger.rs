//! The ledger: the truth about one connection's transaction, with no I/O in it.
//!
//! A [`Ledger`] holds the open levels of one connection (the outermost transaction and each
//! savepoint), every pending hook in registration order, the pre-commit queue, and what the
//! wrapper has learnt that the inner connection's status does not say (the server ended the
//! transaction on its own). It decides, from facts a driver hands it, what SQL an operation
//! sends ([`Ledger::plan`]) and what settles when the operation returns ([`Ledger::step`]). A
//! driver (the sync [`SignalTransactionManager`](crate::SignalTransactionManager)) reads the
//! inner status, runs the inner call, feeds the ledger, then carries out the step: it exits the
//! closed levels from the thread registry and settles their hooks. The ledger never touches a
//! connection, a thread-local or a clock, so every row below is unit-tested without a database
//! (`mod tests` at the end of this file).
//!
//! # States
//!
//! The inner connection's status, read fresh before and after each inner call ([`Status`]):
//!
//! | status | meaning |
//! |---|---|
//! | `Idle` | no transaction open |
//! | `Open { depth, aborted }` | `depth` levels open (1 = `BEGIN`, more = savepoints); `aborted`: the database has aborted the transaction (PostgreSQL after an error, MySQL after a deadlock) and COMMIT would silently become ROLLBACK |
//! | `Broken` | the inner manager is `InError` (a lost connection, a failed rollback): nothing will commit any more |
//!
//! The ledger's own state: `levels` (each with the index of its first hook, its serial and the
//! driver's registry slot), `hooks` (one `Vec`, registration order; a level owns
//! `hooks[start..next level's start]`), and `lost`: `Some(fate)` once the server ended the
//! transaction behind the inner connection's back. While `lost` is set the levels stay open for
//! the caller, who still believes them open, but the inner status is `Idle`: the driver refuses
//! `begin`, refuses every statement unless the fate is `Committed` (after an implicit commit
//! the server runs statements in autocommit, and so does the wrapper), and each level the
//! caller ends settles with `fate` without SQL.
//!
//! # Transitions
//!
//! `open` is the number of levels in the ledger; the driver's `sync` makes it agree with the
//! inner depth before every operation (row S1).
//!
//! | row | operation | status before | plan (SQL) | inner call | status after | step |
//! |---|---|---|---|---|---|---|
//! | B1 | begin | `Idle` / `Open(n)` | forward: `BEGIN` / `SAVEPOINT` | ok | `Open(n+1)` | **open** a level |
//! | B2 | begin | any | forward | error | any | keep: nothing opened |
//! | B3 | begin | lost | refuse | | | keep; the driver returns `TransactionAborted` |
//! | R1 | commit | `Open(n > 1)` | forward: `RELEASE SAVEPOINT` | ok | `Open(n-1)` | **release** the innermost level: its hooks join the enclosing level |
//! | R2 | commit | `Open(n > 1)` | forward | error | `Open(n)` | keep: the savepoint is still open; the caller rolls it back |
//! | R3 | commit | `Open(n > 1)` | forward | error | `Open(m < n)` | **close** the levels above `m`, `RolledBack` |
//! | C1 | commit | `Open(1)` | forward: `COMMIT` | ok | `Idle` | **close** all, `Committed` |
//! | C2 | commit | `Open(1)` | forward | error, the server answered | any | **close** the levels above the depth after, `RolledBack` |
//! | C3 | commit | `Open(1)` | forward | error, the connection was lost in flight | any | **close** the levels above the depth after, `Unknown` |
//! | C4 | commit | `Open(1)`, aborted | `ROLLBACK` instead | any | any | **close** all, `RolledBack`; the driver returns `TransactionAborted` |
//! | C5 | commit / rollback | `Broken` | nothing | | | **close** all, `RolledBack`: nothing can commit any more |
//! | X1 | rollback | `Open(n)` | forward: `ROLLBACK [TO SAVEPOINT]` | any | `Open(m < n)` / `Idle` | **close** the levels above `m`, `RolledBack` |
//! | X2 | rollback | `Open(n)` | forward | error | `Open(n)` | **close** the innermost level, `RolledBack`: give it up rather than loop (the database discards the work when the connection closes) |
//! | L1 | commit | lost | nothing | | | **close** the innermost level with the fate; the driver returns `TransactionAborted` |
//! | L2 | rollback | lost | nothing | | | **close** the innermost level with the fate |
//! | S1 | any (`sync`) | `Open(m)` / `Idle` with `m <` open, not lost | | | | **close** the levels above `m`, `Unknown`: they ended behind the wrapper (raw `COMMIT` SQL on PostgreSQL, `into_inner()`) |
//! | E1 | the server ended the transaction (a statement's error or the server's answer) | | | | | **lose**: keep the levels for the caller, remember the fate: `RolledBack` (the server rolled back), `Committed` (an implicit commit seen as it happened), `Unknown` (either; or two different fates) |
//!
//! The outermost commit runs a **pre-commit phase** first (the driver's: `PRE_COMMIT`
//! receivers, then the pre-commit queue in rounds until it stays empty); then the ledger is
//! **sealed**: pre-commit work offered after that is refused with
//! [`DeferError::CommitInFlight`](crate::DeferError::CommitInFlight), never silently dropped.
//! A test transaction (`begin_test_transaction`) is closed like any other level; when the
//! connection is dropped with it open, its hooks are **discarded** (dropped unrun).
//!
//! One verb per transition: levels **open**, **release** (a savepoint's hooks join its parent),
//! **close** (settle with an outcome), are **lost** (the server ended them) or **discarded**
//! (a test transaction at drop). Hooks are **settled**: run or dropped.

use std::panic::Location;

use crate::hook::{Hook, Settled};
use crate::outcome::Outcome;
use crate::pre_commit::{DeferError, PreCommitFn};

/// The inner connection's transaction status, as the driver read it.
///
/// Eight bytes, so it and `Option<Status>` travel in a register on the commit path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Idle,
    Open { depth: u32, aborted: bool },
    Broken,
}

const _: () = assert!(std::mem::size_of::<Option<Status>>() == 8);

impl Status {
    /// Levels open, counting a broken manager as none: nothing there will ever commit.
    #[inline]
    pub(crate) fn depth(self) -> usize {
        match self {
            Status::Open { depth, .. } => depth as usize,
            Status::Idle | Status::Broken => 0,
        }
    }
}

/// A transaction operation, as the driver was asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Begin,
    Commit,
    Rollback,
}

/// What the driver sends to the inner connection for an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Forward the operation to the inner manager.
    Forward,
    /// COMMIT would silently become ROLLBACK: send ROLLBACK, and fail the commit (C4).
    RollbackInstead,
    /// Send nothing: the ledger settles on its own (C5, L1, L2).
    Nothing,
    /// Send nothing and fail: a `begin` inside a transaction the server ended (B3).
    Refuse,
}

/// The result of the inner call, as the driver classified it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    /// It succeeded (or nothing was sent).
    Ok,
    /// The database answered with an error: nothing was committed.
    Failed,
    /// The connection was lost while COMMIT was in flight: only the server knows.
    Lost,
}

/// What settles after an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing changes.
    Keep,
    /// Open a level.
    Open,
    /// Release the innermost level: its hooks join the enclosing one.
    Release,
    /// Close every level above the `keep` outermost ones and settle their hooks for `outcome`.
    Close {
        keep: usize,
        outcome: Outcome,
        why: &'static str,
    },
}

/// One open transaction level (the outermost transaction or a savepoint).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Level<S> {
    /// Index in [`Ledger::hooks`] of this level's first hook.
    pub(crate) start: usize,
    /// Unique (per connection) serial number, so `defer` can name a level without a reference.
    pub(crate) serial: u64,
    /// The driver's record of where the level sits in the thread registry.
    pub(crate) slot: S,
}

/// The levels and hooks one operation closed, for the driver to exit and settle (registration
/// order for the hooks, outermost first for the levels).
pub(crate) struct Closed<'a, S> {
    pub(crate) levels: std::vec::Drain<'a, Level<S>>,
    pub(crate) hooks: std::vec::Drain<'a, Hook>,
    /// The outermost level was among them: the transaction is over.
    pub(crate) outermost: bool,
    /// That outermost level was a test transaction's.
    pub(crate) test_transaction: bool,
}

/// The truth about one connection's transaction (see the module docs).
pub(crate) struct Ledger<S> {
    pub(crate) hooks: Vec<Hook>,
    pub(crate) levels: Vec<Level<S>>,
    next_serial: u64,
    /// Pre-commit work may be queued (cleared when the queue is taken).
    pre_commit_queued: bool,
    /// The pre-commit phase is over and COMMIT is in flight: no more pre-commit work.
    sealed: bool,
    /// The server ended the transaction: the fate of every level still open (row E1).
    lost: Option<Outcome>,
    /// The outermost open level was opened by `begin_test_transaction`.
    test_transaction: bool,
    /// Hooks settled so far in the current outermost transaction (all its levels).
    pub(crate) totals: Settled,
}

impl<S> Default for Ledger<S> {
    fn default() -> Self {
        Ledger {
            hooks: Vec::new(),
            levels: Vec::new(),
            next_serial: 0,
            pre_commit_queued: false,
            sealed: false,
            lost: None,
            test_transaction: false,
            totals: Settled::default(),
        }
    }
}

impl<S: Copy> Ledger<S> {
    /// Levels open, as the caller sees them.
    #[inline]
    pub(crate) fn depth(&self) -> usize {
        self.levels.len()
    }

    /// Levels the inner connection should have open: none once the server ended the
    /// transaction.
    #[inline]
    pub(crate) fn live_depth(&self) -> usize {
        if self.lost.is_some() {
            0
        } else {
            self.levels.len()
        }
    }

    /// The fate of the levels still open, once the server ended the transaction.
    #[inline]
    pub(crate) fn lost(&self) -> Option<Outcome> {
        self.lost
    }

    /// Whether statements must be refused: the server ended the transaction and did not commit
    /// it (a statement now would run in autocommit, outside the transaction the caller
    /// believes open). After an implicit commit (`Committed`) statements run, as the server
    /// runs them: in autocommit, committed at once, which is the fate the levels settle with.
    #[inline(always)]
    pub(crate) fn refuses_statements(&self) -> bool {
        matches!(self.lost, Some(Outcome::RolledBack | Outcome::Unknown))
    }

    /// Whether the open transaction is a test transaction.
    #[inline]
    pub(crate) fn is_test_transaction(&self) -> bool {
        self.test_transaction
    }

    /// Marks the outermost open level as a test transaction's.
    pub(crate) fn mark_test_transaction(&mut self) {
        debug_assert_eq!(self.levels.len(), 1);
        self.test_transaction = true;
    }

    /// The serial of the innermost open level (0 with none open).
    #[inline]
    pub(crate) fn innermost_serial(&self) -> u64 {
        self.levels.last().map_or(0, |l| l.serial)
    }

    /// Whether pre-commit work may be queued.
    #[inline]
    pub(crate) fn has_pre_commit(&self) -> bool {
        self.pre_commit_queued
    }

    /// What the driver sends for `op`, given the inner status `before` (after `sync`).
    #[inline]
    pub(crate) fn plan(&self, op: Op, before: Status) -> Plan {
        if self.lost.is_some() && !self.levels.is_empty() {
            return match op {
                Op::Begin => Plan::Refuse,
                Op::Commit | Op::Rollback => Plan::Nothing,
            };
        }
        match (op, before) {
            (Op::Commit | Op::Rollback, Status::Broken) => Plan::Nothing,
            (
                Op::Commit,
                Status::Open {
                    depth: 1,
                    aborted: true,
                },
            ) => Plan::RollbackInstead,
            _ => Plan::Forward,
        }
    }

    /// What settles once the inner call planned for `op` returned (see the table in the module
    /// docs). Pure: it changes nothing; [`apply`](Self::apply) carries it out.
    #[inline]
    pub(crate) fn step(
        &self,
        op: Op,
        plan: Plan,
        before: Status,
        call: Call,
        after: Status,
    ) -> Step {
        let open = self.levels.len();
        match plan {
            Plan::Refuse => return Step::Keep,
            Plan::Nothing => {
                if let Some(fate) = self.lost {
                    return Step::Close {
                        keep: open.saturating_sub(1),
                        outcome: fate,
                        why: match fate {
                            Outcome::Unknown => {
                                "the server ended the transaction on its own (an implicit commit or a rollback)"
                            }
                            Outcome::Committed => {
                                "the server had committed the transaction implicitly (DDL)"
                            }
                            Outcome::RolledBack => {
                                "the server had rolled the transaction back on its own"
                            }
                        },
                    };
                }
                return Step::Close {
                    keep: 0,
                    outcome: Outcome::RolledBack,
                    why: "the connection broke before the transaction could commit",
                };
            }
            Plan::RollbackInstead => {
                return Step::Close {
                    keep: 0,
                    outcome: Outcome::RolledBack,
                    why: "the transaction was aborted by an earlier database error",
                }
            }
            Plan::Forward => {}
        }
        let depth_after = after.depth();
        match op {
            Op::Begin if call == Call::Ok => Step::Open,
            Op::Begin => Step::Keep,
            Op::Commit => match call {
                Call::Ok if depth_after + 1 == open && open > 1 => Step::Release,
                Call::Ok => Step::Close {
                    keep: depth_after.min(open),
                    outcome: Outcome::Committed,
                    why: "committed",
                },
                _ if depth_after >= open => Step::Keep,
                Call::Lost if before.depth() == 1 => Step::Close {
                    keep: depth_after,
                    outcome: Outcome::Unknown,
                    why: "the connection was lost while COMMIT was in flight",
                },
                _ => Step::Close {
                    keep: depth_after,
                    outcome: Outcome::RolledBack,
                    why: "the commit failed",
                },
            },
            Op::Rollback => Step::Close {
                keep: if depth_after < open {
                    depth_after
                } else {
                    open.saturating_sub(1)
                },
                outcome: Outcome::RolledBack,
                why: if call == Call::Ok {
                    "rolled back"
                } else {
                    "the rollback failed; the database discards the work when the connection closes"
                },
            },
        }
    }

    /// What `sync` settles when the inner status is `inner` (row S1): the levels the inner
    /// connection no longer has ended behind the wrapper's back.
    #[inline]
    pub(crate) fn vanished(&self, inner: Status) -> Option<Step> {
        let live = self.live_depth();
        if live == 0 {
            return None;
        }
        match inner {
            Status::Open { depth, .. } if depth as usize >= live => None,
            Status::Broken => None,
            _ => Some(Step::Close {
                keep: inner.depth(),
                outcome: Outcome::Unknown,
                why: "its transaction ended outside the wrapper's control",
            }),
        }
    }

    /// Opens a level (`enter` records it in the registry and returns the slot). Returns its
    /// serial and slot.
    #[inline(always)]
    pub(crate) fn open(&mut self, enter: impl FnOnce(u64) -> S) -> (u64, S) {
        if self.levels.is_empty() {
            self.totals = Settled::default();
            self.sealed = false;
            self.lost = None;
        }
        self.next_serial += 1;
        let serial = self.next_serial;
        let slot = enter(serial);
        self.levels.push(Level {
            start: self.hooks.len(),
            serial,
            slot,
        });
        (serial, slot)
    }

    /// Releases the innermost level: its hooks now belong to the enclosing level. Returns it.
    #[inline]
    pub(crate) fn release(&mut self) -> Option<Level<S>> {
        self.levels.pop()
    }

    /// Closes every level above the `keep` outermost ones, taking their hooks.
    #[inline]
    pub(crate) fn close(&mut self, keep: usize) -> Option<Closed<'_, S>> {
        let start = self.levels.get(keep)?.start;
        let outermost = keep == 0;
        let test_transaction = outermost && std::mem::take(&mut self.test_transaction);
        if outermost {
            self.lost = None;
            self.sealed = false;
        }
        Some(Closed {
            levels: self.levels.drain(keep..),
            hooks: self.hooks.drain(start..),
            outermost,
            test_transaction,
        })
    }

    /// `close` of the innermost level when it holds no hook (the common end of a level, with
    /// nothing to settle). Returns the level and whether it was the outermost and a test
    /// transaction's; `None` (and nothing changed) when it holds hooks or no level is open.
    #[inline(always)]
    pub(crate) fn close_empty(&mut self) -> Option<(Level<S>, bool, bool)> {
        let level = *self.levels.last()?;
        if level.start != self.hooks.len() {
            return None;
        }
        self.levels.pop();
        let outermost = self.levels.is_empty();
        let test = outermost && std::mem::take(&mut self.test_transaction);
        if outermost {
            self.lost = None;
            self.sealed = false;
        }
        Some((level, outermost, test))
    }

    /// Row E1: the server ended the transaction; the open levels stay for the caller, with
    /// `fate`. Two different fates make it `Unknown`; `Unknown` stays.
    pub(crate) fn lose(&mut self, fate: Outcome) {
        if self.levels.is_empty() {
            return;
        }
        self.lost = Some(match self.lost {
            None => fate,
            Some(known) if known == fate => fate,
            Some(_) => Outcome::Unknown,
        });
    }

    /// Adds a hook that is not pre-commit work to the innermost level. A level must be open.
    #[inline]
    pub(crate) fn push(&mut self, hook: Hook) {
        debug_assert!(!self.levels.is_empty());
        self.hooks.push(hook);
    }

    /// Queues pre-commit work on the innermost level; refused once sealed.
    pub(crate) fn push_pre_commit(
        &mut self,
        f: PreCommitFn,
        location: &'static Location<'static>,
    ) -> Result<(), DeferError> {
        if self.levels.is_empty() {
            return Err(DeferError::NoTransaction);
        }
        if self.sealed {
            return Err(DeferError::CommitInFlight);
        }
        self.pre_commit_queued = true;
        self.hooks.push(Hook::pre_commit(f, location));
        Ok(())
    }

    /// Whether pre-commit work is refused: COMMIT is in flight.
    #[inline]
    pub(crate) fn is_sealed(&self) -> bool {
        self.sealed
    }

    /// Ends the pre-commit phase: later pre-commit work is refused until the transaction ends.
    pub(crate) fn seal(&mut self) {
        self.sealed = true;
    }

    /// Takes the queued pre-commit work, in registration order, leaving the other hooks in
    /// place. Only called with the outermost level alone open.
    pub(crate) fn take_pre_commit(&mut self) -> Vec<Hook> {
        if !std::mem::take(&mut self.pre_commit_queued) {
            return Vec::new();
        }
        debug_assert!(self.levels.len() == 1);
        let (work, rest) = std::mem::take(&mut self.hooks)
            .into_iter()
            .partition(Hook::is_pre_commit);
        self.hooks = rest;
        work
    }

    /// Moves every hook of `hooks` to the innermost level (a level must be open).
    #[inline]
    pub(crate) fn append(&mut self, hooks: &mut Vec<Hook>, has_pre_commit: bool) {
        debug_assert!(!self.levels.is_empty());
        self.pre_commit_queued |= has_pre_commit;
        self.hooks.append(hooks);
    }

    /// Adds a hook to the level with `serial`; gives it back if no such level is open, or if it
    /// is pre-commit work and the ledger is sealed.
    #[inline]
    pub(crate) fn push_to(&mut self, serial: u64, hook: Hook) -> Result<(), Hook> {
        let pre_commit = hook.is_pre_commit();
        if pre_commit && self.sealed {
            return Err(hook);
        }
        match self.levels.last() {
            Some(innermost) if innermost.serial == serial => {
                self.pre_commit_queued |= pre_commit;
                self.hooks.push(hook);
                Ok(())
            }
            _ => self.push_below(serial, hook),
        }
    }

    /// `push_to` a level below the innermost (only reachable through a `defer` from another
    /// thread's stale view), or to no level at all.
    #[cold]
    fn push_below(&mut self, serial: u64, hook: Hook) -> Result<(), Hook> {
        let Some(idx) = self.levels.iter().rposition(|l| l.serial == serial) else {
            return Err(hook);
        };
        self.pre_commit_queued |= hook.is_pre_commit();
        // Insert at the end of that level's range.
        let at = self.levels[idx + 1].start;
        self.hooks.insert(at, hook);
        for l in &mut self.levels[idx + 1..] {
            l.start += 1;
        }
        Ok(())
    }

    /// Takes the hooks registered in the levels from `depth` (1-based) up since index `start`,
    /// for `capture_hooks`.
    pub(crate) fn take_since(&mut self, depth: usize, start: usize) -> Vec<Hook> {
        let end = self.levels.get(depth).map_or(self.hooks.len(), |l| l.start);
        let start = start.min(end);
        let taken: Vec<Hook> = self.hooks.drain(start..end).collect();
        for l in &mut self.levels[depth..] {
            l.start -= taken.len();
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    //! Every row of the transition table, driven without a database: a tiny driver feeds the
    //! ledger the statuses a real inner manager would report, the way Diesel tests its
    //! `AnsiTransactionManager`.

    use super::*;
    use std::sync::{Arc, Mutex};

    type Log = Arc<Mutex<Vec<String>>>;

    fn here() -> &'static Location<'static> {
        Location::caller()
    }

    fn open(d: u32) -> Status {
        Status::Open {
            depth: d,
            aborted: false,
        }
    }

    /// A ledger with `n` levels open, each holding one commit hook and one rollback hook that
    /// write to `log`.
    fn ledger(n: usize, log: &Log) -> Ledger<()> {
        let mut l = Ledger::default();
        for i in 1..=n {
            l.open(|_| ());
            let (a, b) = (log.clone(), log.clone());
            l.push(Hook::commit(
                move || a.lock().unwrap().push(format!("commit {i}")),
                here(),
            ));
            l.push(Hook::rollback(
                move || b.lock().unwrap().push(format!("rollback {i}")),
                here(),
            ));
        }
        l
    }

    /// Carries out a step as the driver does, settling closed hooks.
    fn apply(l: &mut Ledger<()>, step: Step) {
        match step {
            Step::Keep => {}
            Step::Open => {
                l.open(|_| ());
            }
            Step::Release => {
                l.release();
            }
            Step::Close { keep, outcome, why } => {
                if let Some(closed) = l.close(keep) {
                    crate::hook::settle_all(closed.hooks, outcome, None, why);
                }
            }
        }
    }

    fn run(l: &mut Ledger<()>, op: Op, before: Status, call: Call, after: Status) -> (Plan, Step) {
        let plan = l.plan(op, before);
        let step = l.step(op, plan, before, call, after);
        apply(l, step);
        (plan, step)
    }

    fn took(log: &Log) -> Vec<String> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    #[test]
    fn b1_begin_opens_a_level() {
        let log = Log::default();
        let mut l = ledger(0, &log);
        assert_eq!(
            run(&mut l, Op::Begin, Status::Idle, Call::Ok, open(1)),
            (Plan::Forward, Step::Open)
        );
        assert_eq!(
            run(&mut l, Op::Begin, open(1), Call::Ok, open(2)),
            (Plan::Forward, Step::Open)
        );
        assert_eq!(l.depth(), 2);
    }

    #[test]
    fn b2_failed_begin_opens_nothing() {
        let log = Log::default();
        let mut l = ledger(1, &log);
        assert_eq!(
            run(&mut l, Op::Begin, open(1), Call::Failed, open(1)).1,
            Step::Keep
        );
        assert_eq!(l.depth(), 1);
    }

    #[test]
    fn b3_begin_after_the_server_ended_the_transaction_is_refused() {
        let log = Log::default();
        let mut l = ledger(1, &log);
        l.lose(Outcome::RolledBack);
        assert_eq!(
            run(&mut l, Op::Begin, Status::Idle, Call::Ok, Status::Idle),
            (Plan::Refuse, Step::Keep)
        );
        assert_eq!(l.depth(), 1);
    }

    #[test]
    fn r1_release_joins_the_enclosing_level() {
        let log = Log::default();
        let mut l = ledger(2, &log);
        assert_eq!(
            run(&mut l, Op::Commit, open(2), Call::Ok, open(1)).1,
            Step::Release
        );
        assert_eq!((l.depth(), l.hooks.len()), (1, 4));
        assert!(took(&log).is_empty());
        run(&mut l, Op::Commit, open(1), Call::Ok, Status::Idle);
        assert_eq!(took(&log), ["commit 1", "commit 2"]);
    }

    #[test]
    fn r2_failed_release_with_the_savepoint_open_keeps_it() {
        let log = Log::default();
        let mut l = ledger(2, &log);
        assert_eq!(
            run(&mut l, Op::Commit, open(2), Call::Failed, open(2)).1,
            Step::Keep
        );
        assert_eq!(l.depth(), 2);
        assert!(took(&log).is_empty());
    }

    #[test]
    fn r3_failed_release_with_the_savepoint_gone_rolls_it_back() {
        let log = Log::default();
        let mut l = ledger(2, &log);
        let (_, step) = run(&mut l, Op::Commit, open(2), Call::Failed, open(1));
        assert!(matches!(
            step,
            Step::Close {
                keep: 1,
                outcome: Outcome::RolledBack,
                ..
            }
        ));
        assert_eq!(took(&log), ["rollback 2"]);
        assert_eq!(l.depth(), 1);
    }

    #[test]
    fn c1_commit_runs_commit_hooks_in_order() {
        let log = Log::default();
        let mut l = ledger(1, &log);
        let (_, step) = run(&mut l, Op::Commit, open(1), Call::Ok, Status::Idle);
        assert!(matches!(
            step,
            Step::Close {
                keep: 0,
                outcome: Outcome::Committed,
                ..
            }
        ));
        assert_eq!(took(&log), ["commit 1"]);
        assert_eq!(l.depth(), 0);
    }

    #[test]
    fn c2_failed_commit_rolls_back() {
        let log = Log::default();
        let mut l = ledger(1, &log);
        let (_, step) = run(&mut l, Op::Commit, open(1), Call::Failed, Status::Idle);
        assert!(matches!(
            step,
            Step::Close {
                keep: 0,
                outcome: Outcome::RolledBack,
                ..
            }
        ));
        assert_eq!(took(&log), ["rollback 1"]);
    }

    #[test]
    fn c3_commit_lost_in_flight_is_unknown() {
        let log = Log::default();
        let mut l = ledger(1, &log);
        let (_, step) = run(&mut l, Op::Commit, open(1), Call::Lost, Status::Broken);
        assert!(matches!(
            step,
            Step::Close {
                keep: 0,
                outcome: Outcome::Unknown,
                ..
            }
        ));
        assert!(
            took(&log).is_empty(),
            "neither commit nor rollback hooks run"
        );
    }

    #[test]
    fn c4_commit_of_an_aborted_transaction_rolls_back_instead() {
        let log = Log::default();
        let mut l = ledger(1, &log);
        let aborted = Status::Open {
            depth: 1,
            aborted: true,
        };
        let (plan, step) = run(&mut l, Op::Commit, aborted, Call::Ok, Status::Idle);
        assert_eq!(plan, Plan::RollbackInstead);
        assert!(matches!(
            step,
            Step::Close {
                keep: 0,
                outcome: Outcome::RolledBack,
                ..
            }
        ));
        assert_eq!(took(&log), ["rollback 1"]);
    }

    #[test]
    fn c5_broken_manager_rolls_everything_back() {
        for op in [Op::Commit, Op::Rollback] {
            let log = Log::default();
            let mut l = ledger(2, &log);
            let (plan, step) = run(&mut l, op, Status::Broken, Call::Ok, Status::Broken);
            assert_eq!(plan, Plan::Nothing);
            assert!(matches!(
                step,
                Step::Close {
                    keep: 0,
                    outcome: Outcome::RolledBack,
                    ..
                }
            ));
            assert_eq!(took(&log), ["rollback 1", "rollback 2"]);
        }
    }

    #[test]
    fn x1_rollback_closes_the_innermost_level() {
        let log = Log::default();
        let mut l = ledger(2, &log);
        run(&mut l, Op::Rollback, open(2), Call::Ok, open(1));
        assert_eq!(took(&log), ["rollback 2"]);
        run(&mut l, Op::Rollback, open(1), Call::Ok, Status::Idle);
        assert_eq!(took(&log), ["rollback 1"]);
        assert_eq!(l.depth(), 0);
    }

    #[test]
    fn x2_failed_rollback_that_moved_nothing_gives_the_level_up() {
        let log = Log::default();
        let mut l = ledger(2, &log);
        let (_, step) = run(&mut l, Op::Rollback, open(2), Call::Failed, open(2));
        assert!(matches!(
            step,
            Step::Close {
                keep: 1,
                outcome: Outcome::RolledBack,
                ..
            }
        ));
        assert_eq!(took(&log), ["rollback 2"]);
    }

    #[test]
    fn l1_l2_levels_lost_to_the_server_settle_with_their_fate_without_sql() {
        let log = Log::default();
        let mut l = ledger(2, &log);
        l.lose(Outcome::RolledBack);
        assert_eq!(l.live_depth(), 0);
        let (plan, _) = run(&mut l, Op::Rollback, Status::Idle, Call::Ok, Status::Idle);
        assert_eq!(plan, Plan::Nothing);
        assert_eq!(took(&log), ["rollback 2"]);
        let (plan, step) = run(&mut l, Op::Commit, Status::Idle, Call::Ok, Status::Idle);
        assert_eq!(plan, Plan::Nothing);
        assert!(matches!(
            step,
            Step::Close {
                keep: 0,
                outcome: Outcome::RolledBack,
                ..
            }
        ));
        assert_eq!(took(&log), ["rollback 1"]);
        assert_eq!(l.lost(), None, "the fate is forgotten with the last level");
    }

    #[test]
    fn e1_an_unknown_fate_is_never_downgraded() {
        let log = Log::default();
        let mut l = ledger(1, &log);
        l.lose(Outcome::RolledBack);
        assert!(l.refuses_statements());
        l.lose(Outcome::Committed);
        assert_eq!(l.lost(), Some(Outcome::Unknown), "two fates: nobody knows");
        l.lose(Outcome::RolledBack);
        assert_eq!(l.lost(), Some(Outcome::Unknown));
        run(&mut l, Op::Commit, Status::Idle, Call::Ok, Status::Idle);
        assert!(
            took(&log).is_empty(),
            "Unknown runs neither commit nor rollback hooks"
        );
        let mut empty: Ledger<()> = Ledger::default();
        empty.lose(Outcome::RolledBack);
        assert_eq!(empty.lost(), None, "no level, nothing lost");
    }

    #[test]
    fn e1_an_implicit_commit_lets_statements_run_and_settles_committed() {
        let log = Log::default();
        let mut l = ledger(2, &log);
        l.lose(Outcome::Committed);
        assert!(!l.refuses_statements());
        assert_eq!(
            run(&mut l, Op::Begin, Status::Idle, Call::Ok, Status::Idle).0,
            Plan::Refuse
        );
        let (plan, _) = run(&mut l, Op::Rollback, Status::Idle, Call::Ok, Status::Idle);
        assert_eq!(plan, Plan::Nothing);
        assert_eq!(
            took(&log),
            ["commit 2"],
            "the work was committed, whatever the caller does"
        );
        run(&mut l, Op::Commit, Status::Idle, Call::Ok, Status::Idle);
        assert_eq!(took(&log), ["commit 1"]);
    }

    #[test]
    fn s1_levels_that_vanished_behind_the_wrapper_are_unknown() {
        let log = Log::default();
        let l = ledger(2, &log);
        assert_eq!(l.vanished(open(2)), None);
        assert_eq!(l.vanished(Status::Broken), None);
        assert!(matches!(
            l.vanished(open(1)),
            Some(Step::Close {
                keep: 1,
                outcome: Outcome::Unknown,
                ..
            })
        ));
        assert!(matches!(
            l.vanished(Status::Idle),
            Some(Step::Close {
                keep: 0,
                outcome: Outcome::Unknown,
                ..
            })
        ));
        let mut lost = ledger(1, &log);
        lost.lose(Outcome::RolledBack);
        assert_eq!(
            lost.vanished(Status::Idle),
            None,
            "lost levels are known, not vanished"
        );
    }

    #[test]
    fn sealed_ledger_refuses_pre_commit_work_until_the_transaction_ends() {
        let log = Log::default();
        let mut l = ledger(1, &log);
        assert!(l.push_pre_commit(Box::new(|_| Ok(())), here()).is_ok());
        assert_eq!(l.take_pre_commit().len(), 1);
        l.seal();
        assert_eq!(
            l.push_pre_commit(Box::new(|_| Ok(())), here()).unwrap_err(),
            DeferError::CommitInFlight
        );
        assert!(l
            .push_to(
                l.innermost_serial(),
                Hook::pre_commit(Box::new(|_| Ok(())), here())
            )
            .is_err());
        run(&mut l, Op::Commit, open(1), Call::Ok, Status::Idle);
        assert!(!l.is_sealed());
        assert_eq!(
            l.push_pre_commit(Box::new(|_| Ok(())), here()).unwrap_err(),
            DeferError::NoTransaction
        );
    }

    #[test]
    fn a_test_transaction_is_reported_when_its_level_closes() {
        let log = Log::default();
        let mut l = ledger(1, &log);
        l.mark_test_transaction();
        let closed = l.close(0).unwrap();
        assert!(closed.outermost && closed.test_transaction);
    }

    #[test]
    fn hooks_deferred_to_a_lower_level_keep_registration_order_per_level() {
        let log = Log::default();
        let mut l = ledger(2, &log);
        let first = l.levels[0].serial;
        let a = log.clone();
        l.push_to(
            first,
            Hook::commit(move || a.lock().unwrap().push("late 1".into()), here()),
        )
        .unwrap();
        assert!(l.push_to(999, Hook::commit(|| (), here())).is_err());
        run(&mut l, Op::Rollback, open(2), Call::Ok, open(1));
        assert_eq!(took(&log), ["rollback 2"]);
        run(&mut l, Op::Commit, open(1), Call::Ok, Status::Idle);
        assert_eq!(took(&log), ["commit 1", "late 1"]);
    }
}
