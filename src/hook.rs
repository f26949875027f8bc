//! A hook: one registered closure and where it was registered, in one box, and how a run of
//! hooks is settled for an [`Outcome`] (run the ones that apply, drop the others, count both).

use std::fmt;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe, Location};

use crate::id::Label;
use crate::outcome::Outcome;
use crate::pre_commit::PreCommitFn;
use crate::report::{panic_message, report, FailureCause, HookFailure, HookKind};

/// What a call deferred with [`defer!`](crate::defer!) may return: `()`, or a `Result` whose
/// `Err` is reported as a [`HookFailure`] instead of being silently dropped.
///
/// # Example
///
/// ```
/// use diesel_transaction_signals::defer;
///
/// fn send_mail(to: &str) -> Result<(), String> {
///     Err(format!("no route to {to}"))
/// }
/// // No transaction is open, so this runs at once; the `Err` is logged and sent to the
/// // failure handler, not lost.
/// defer!(send_mail("ada@example.com"));
/// ```
pub trait HookOutput: sealed::Sealed {
    /// `None` for success, else the failure's text.
    #[doc(hidden)]
    fn into_failure(self) -> Option<String>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for () {}
    impl<T, E: std::fmt::Display> Sealed for Result<T, E> {}
}

impl HookOutput for () {
    #[inline]
    fn into_failure(self) -> Option<String> {
        None
    }
}

impl<T, E: fmt::Display> HookOutput for Result<T, E> {
    #[inline]
    fn into_failure(self) -> Option<String> {
        self.err().map(|e| e.to_string())
    }
}

/// The hook being settled now, for the report if it panics: its kind, where it was registered,
/// and whether its closure is running (`true`) or it is being dropped unrun (`false`).
type Running = Option<(HookKind, &'static Location<'static>, bool)>;

/// A hook's closure boxed with where it was registered. Object-safe so that a [`Hook`] is one
/// fat pointer.
trait Erased: Send + 'static {
    fn kind(&self) -> HookKind;
    fn location(&self) -> &'static Location<'static>;
    /// Runs the hook if it applies to `outcome` and returns its failure, if any; otherwise
    /// drops it and returns `None`. Either way it first names itself in `running`.
    fn settle(self: Box<Self>, outcome: Outcome, running: &mut Running) -> Option<Option<String>>;
    /// A pre-commit hook's work; `None` (and the hook dropped) for any other.
    fn into_pre_commit(self: Box<Self>) -> Option<PreCommitFn> {
        None
    }
    fn is_pre_commit(&self) -> bool {
        false
    }
}

const COMMIT: u8 = 0;
const ROLLBACK: u8 = 1;
const COMPLETE: u8 = 2;

/// An `on_commit` (`K = COMMIT`), `on_rollback` or `on_complete` hook.
struct Run<F, const K: u8> {
    location: &'static Location<'static>,
    f: F,
}

impl<F, const K: u8> Erased for Run<F, K>
where
    F: FnOnce(Outcome) -> Option<String> + Send + 'static,
{
    fn kind(&self) -> HookKind {
        match K {
            COMMIT => HookKind::Commit,
            ROLLBACK => HookKind::Rollback,
            _ => HookKind::Complete,
        }
    }

    fn location(&self) -> &'static Location<'static> {
        self.location
    }

    #[inline]
    fn settle(self: Box<Self>, outcome: Outcome, running: &mut Running) -> Option<Option<String>> {
        let applies = match K {
            COMMIT => outcome == Outcome::Committed,
            ROLLBACK => outcome == Outcome::RolledBack,
            _ => true,
        };
        *running = Some((self.kind(), self.location, applies));
        if applies {
            let Run { f, .. } = *self;
            Some(f(outcome))
        } else {
            drop(self);
            None
        }
    }
}

/// Work that runs in the pre-commit phase (`before_commit`, `defer_before_commit`).
struct PreCommitHook {
    location: &'static Location<'static>,
    f: PreCommitFn,
}

impl Erased for PreCommitHook {
    fn kind(&self) -> HookKind {
        HookKind::BeforeCommit
    }

    fn location(&self) -> &'static Location<'static> {
        self.location
    }

    fn settle(self: Box<Self>, _: Outcome, running: &mut Running) -> Option<Option<String>> {
        // Only reached when the pre-commit phase never ran (the transaction did not commit).
        *running = Some((HookKind::BeforeCommit, self.location, false));
        drop(self);
        None
    }

    fn into_pre_commit(self: Box<Self>) -> Option<PreCommitFn> {
        Some(self.f)
    }

    fn is_pre_commit(&self) -> bool {
        true
    }
}

/// One registered hook: its closure and where it was registered, in one box. Sixteen bytes, so
/// it moves in registers; the box holds the closure's captures plus the location (one
/// allocation per hook).
pub(crate) struct Hook(Box<dyn Erased>);

impl Hook {
    #[inline]
    pub(crate) fn commit<F, R>(f: F, location: &'static Location<'static>) -> Self
    where
        F: FnOnce() -> R + Send + 'static,
        R: HookOutput,
    {
        Hook(Box::new(Run::<_, COMMIT> {
            location,
            f: move |_: Outcome| f().into_failure(),
        }))
    }

    #[inline]
    pub(crate) fn rollback<F, R>(f: F, location: &'static Location<'static>) -> Self
    where
        F: FnOnce() -> R + Send + 'static,
        R: HookOutput,
    {
        Hook(Box::new(Run::<_, ROLLBACK> {
            location,
            f: move |_: Outcome| f().into_failure(),
        }))
    }

    #[inline]
    pub(crate) fn complete<F, R>(f: F, location: &'static Location<'static>) -> Self
    where
        F: FnOnce(Outcome) -> R + Send + 'static,
        R: HookOutput,
    {
        Hook(Box::new(Run::<_, COMPLETE> {
            location,
            f: move |o: Outcome| f(o).into_failure(),
        }))
    }

    /// Work for the pre-commit phase.
    pub(crate) fn pre_commit(f: PreCommitFn, location: &'static Location<'static>) -> Self {
        Hook(Box::new(PreCommitHook { location, f }))
    }

    pub(crate) fn kind(&self) -> HookKind {
        self.0.kind()
    }

    /// A pre-commit hook's work (any other hook is dropped).
    pub(crate) fn into_pre_commit(self) -> Option<PreCommitFn> {
        self.0.into_pre_commit()
    }

    pub(crate) fn location(&self) -> &'static Location<'static> {
        self.0.location()
    }

    /// Runs in the pre-commit phase (`before_commit`, `defer_before_commit`).
    pub(crate) fn is_pre_commit(&self) -> bool {
        self.0.is_pre_commit()
    }
}

impl fmt::Debug for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} hook registered at {}", self.kind(), self.location())
    }
}

const _: () = assert!(std::mem::size_of::<Hook>() == 16);

/// Settles `hooks` for `outcome`: runs those that apply (a hook that panics or returns `Err` is
/// caught and reported), drops the others, and logs what was dropped unrun: at debug level where
/// that is the normal fate (commit hooks of rolled-back work), at error level where nobody can
/// know (`Unknown`).
///
/// Counts: a hook whose closure ran (even if it failed) counts as run; a hook dropped unrun
/// counts as discarded, even if its captures panicked while being dropped (that panic is
/// reported too).
///
/// One `catch_unwind` covers the whole run rather than one per hook: after a panic the loop
/// reports it against the hook that was being settled and resumes with the next one.
pub(crate) fn settle_all(
    mut hooks: impl Iterator<Item = Hook>,
    outcome: Outcome,
    conn: Option<&Label>,
    why: &str,
) -> Settled {
    let mut settled = Settled::default();
    // The hook being settled now, so a panic can be reported against it; `None` outside hook
    // code (a panic there, in a logger, is not ours to swallow).
    let mut running: Running = None;
    loop {
        let run = catch_unwind(AssertUnwindSafe(|| {
            for Hook(hook) in &mut hooks {
                let result = hook.settle(outcome, &mut running);
                let Some((kind, location, _)) = running.take() else {
                    unreachable!("a hook names itself when settled");
                };
                match result {
                    Some(None) => settled.ran += 1,
                    Some(Some(err)) => {
                        settled.ran += 1;
                        report(HookFailure::new(
                            kind,
                            location,
                            conn,
                            FailureCause::Returned(err),
                        ));
                    }
                    None => {
                        settled.discarded += 1;
                        discarded(kind, location, outcome, conn, why);
                    }
                }
            }
        }));
        match run {
            Ok(()) => return settled,
            Err(payload) => {
                let Some((kind, location, ran)) = running.take() else {
                    resume_unwind(payload);
                };
                if ran {
                    settled.ran += 1;
                } else {
                    settled.discarded += 1;
                }
                let cause = FailureCause::Panicked(panic_message(&*payload));
                drop(payload);
                report(HookFailure::new(kind, location, conn, cause));
            }
        }
    }
}

/// Logs a hook dropped unrun because it does not apply to `outcome`.
#[cold]
fn discarded(
    kind: HookKind,
    location: &'static Location<'static>,
    outcome: Outcome,
    conn: Option<&Label>,
    why: &str,
) {
    if outcome == Outcome::Unknown {
        log::error!(
            target: "diesel_transaction_signals",
            "{kind} hook registered at {location} dropped unrun: {why}; the outcome of the transaction is unknown{}",
            conn.map(|c| format!(" (connection {c})")).unwrap_or_default()
        );
    } else {
        log::debug!(
            target: "diesel_transaction_signals",
            "{kind} hook registered at {location} discarded: {why}{}",
            conn.map(|c| format!(" (connection {c})")).unwrap_or_default()
        );
    }
}

/// Counts of hooks settled: how many ran (their closure was called) and how many were dropped
/// unrun.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settled {
    pub(crate) ran: usize,
    pub(crate) discarded: usize,
}

impl std::ops::AddAssign for Settled {
    fn add_assign(&mut self, other: Settled) {
        self.ran += other.ran;
        self.discarded += other.discarded;
    }
}
