//! Capturing hooks in tests, where a test transaction never commits.

use crate::hook::{settle_all, Hook};
use crate::id::Label;
use crate::outcome::Outcome;
use crate::report::HookKind;

/// Hooks taken out of a transaction by
/// [`SignalConnection::capture_hooks`](crate::SignalConnection::capture_hooks), for a test to
/// inspect and run as if the transaction had committed or rolled back.
///
/// Dropped without being run, the hooks are discarded (a debug-level log line each).
///
/// # Example
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::prelude::*;
/// use diesel_transaction_signals::{HookKind, SignalConnection};
///
/// let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
/// conn.begin_test_transaction().unwrap();
/// let ((), hooks) = conn.capture_hooks(|conn| {
///     conn.on_commit(|| println!("committed"));
///     conn.on_rollback(|| println!("rolled back"));
/// }).unwrap();
/// assert_eq!(hooks.count(HookKind::Commit), 1);
/// assert_eq!(hooks.run_as_rolled_back(), 1);
/// # }
/// ```
#[must_use = "captured hooks do nothing unless run"]
pub struct CapturedHooks {
    hooks: Vec<Hook>,
    conn: Label,
}

impl CapturedHooks {
    pub(crate) fn new(hooks: Vec<Hook>, conn: Label) -> Self {
        CapturedHooks { hooks, conn }
    }

    /// How many hooks were captured, of all kinds.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::prelude::*;
    /// # use diesel_transaction_signals::SignalConnection;
    /// # let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// # conn.begin_test_transaction().unwrap();
    /// let ((), hooks) = conn.capture_hooks(|_| ()).unwrap();
    /// assert_eq!(hooks.len(), 0);
    /// # }
    /// ```
    pub fn len(&self) -> usize {
        self.hooks.len()
    }

    /// Whether nothing was captured.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::prelude::*;
    /// # use diesel_transaction_signals::SignalConnection;
    /// # let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// # conn.begin_test_transaction().unwrap();
    /// let ((), hooks) = conn.capture_hooks(|_| ()).unwrap();
    /// assert!(hooks.is_empty());
    /// # }
    /// ```
    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty()
    }

    /// How many captured hooks are of `kind`.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::prelude::*;
    /// # use diesel_transaction_signals::{HookKind, SignalConnection};
    /// # let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// # conn.begin_test_transaction().unwrap();
    /// let ((), hooks) = conn.capture_hooks(|c| c.on_complete(|_| ())).unwrap();
    /// assert_eq!(hooks.count(HookKind::Complete), 1);
    /// # }
    /// ```
    pub fn count(&self, kind: HookKind) -> usize {
        self.hooks.iter().filter(|h| h.kind() == kind).count()
    }

    /// Runs the hooks as a COMMIT would: commit hooks and complete hooks (with
    /// [`Outcome::Committed`]) in registration order, failures caught and reported. Rollback
    /// hooks are dropped. Returns how many hooks ran.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::prelude::*;
    /// # use diesel_transaction_signals::SignalConnection;
    /// # let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// # conn.begin_test_transaction().unwrap();
    /// let ((), hooks) = conn.capture_hooks(|c| c.on_commit(|| ())).unwrap();
    /// assert_eq!(hooks.run_as_committed(), 1);
    /// # }
    /// ```
    pub fn run_as_committed(mut self) -> usize {
        self.run(Outcome::Committed)
    }

    /// Runs the hooks as a rollback would: rollback hooks and complete hooks (with
    /// [`Outcome::RolledBack`]). Commit hooks are dropped. Returns how many hooks ran.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # use diesel::prelude::*;
    /// # use diesel_transaction_signals::SignalConnection;
    /// # let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    /// # conn.begin_test_transaction().unwrap();
    /// let ((), hooks) = conn.capture_hooks(|c| c.on_commit(|| ())).unwrap();
    /// assert_eq!(hooks.run_as_rolled_back(), 0);
    /// # }
    /// ```
    pub fn run_as_rolled_back(mut self) -> usize {
        self.run(Outcome::RolledBack)
    }

    fn run(&mut self, outcome: Outcome) -> usize {
        let hooks = std::mem::take(&mut self.hooks);
        settle_all(
            hooks.into_iter(),
            outcome,
            Some(&self.conn),
            "captured hooks were run for another outcome",
        )
        .ran
    }
}

impl std::fmt::Debug for CapturedHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapturedHooks")
            .field("commit", &self.count(HookKind::Commit))
            .field("rollback", &self.count(HookKind::Rollback))
            .field("complete", &self.count(HookKind::Complete))
            .finish()
    }
}

impl Drop for CapturedHooks {
    fn drop(&mut self) {
        for hook in self.hooks.drain(..) {
            log::debug!(
                target: "diesel_transaction_signals",
                "captured {} hook registered at {} dropped unrun",
                hook.kind(),
                hook.location()
            );
        }
    }
}
