//! Hooks: what they are, how a failing one is reported, and the per-connection stack that holds
//! them while their transaction is open.
//!
//! A [`HookStack`] keeps every pending hook of one connection in a single `Vec`, in registration
//! order, and a stack of [`Level`]s, one per open transaction level (the outermost transaction and
//! each savepoint). A level owns the hooks from its `start` index to the start of the next level.
//! So releasing a savepoint is free (its hooks simply become part of the enclosing level, keeping
//! the global registration order), rolling one back drains the tail of the `Vec`, and the
//! outermost end drains everything.

use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe, Location};
use std::sync::{Arc, RwLock};

use crate::ConnectionId;

/// Who a log line or report is about: a connection's id and, if it has one, its alias.
#[derive(Debug, Clone)]
pub(crate) struct Label {
    pub(crate) id: ConnectionId,
    pub(crate) alias: Option<Arc<str>>,
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.alias {
            Some(alias) => write!(f, "{} ({alias})", self.id),
            None => write!(f, "{}", self.id),
        }
    }
}

/// How a transaction ended, as seen by an [`on_complete`](crate::SignalConnection::on_complete)
/// hook.
///
/// # Example
///
/// ```
/// use diesel_transaction_signals::Outcome;
///
/// fn describe(outcome: Outcome) -> &'static str {
///     match outcome {
///         Outcome::Committed => "the work is in the database",
///         Outcome::RolledBack => "the work was undone",
///         Outcome::Unknown => "the connection broke during COMMIT: check the database",
///     }
/// }
/// assert_eq!(describe(Outcome::Committed), "the work is in the database");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The outermost COMMIT succeeded: the work is durable.
    Committed,
    /// The work was undone: a rollback, a failed COMMIT, a COMMIT that PostgreSQL turned into a
    /// rollback, a panic, or a connection that broke before COMMIT was sent.
    RolledBack,
    /// The connection broke while COMMIT was in flight, or the transaction ended behind the
    /// wrapper's back (`into_inner()` mid-transaction, raw `COMMIT`/`ROLLBACK` SQL on PostgreSQL):
    /// it may or may not have committed. Neither
    /// commit nor rollback hooks run; `on_complete` hooks receive this value. Spring reports the
    /// same case as `STATUS_UNKNOWN`.
    Unknown,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Committed => "committed",
            Outcome::RolledBack => "rolled back",
            Outcome::Unknown => "unknown",
        })
    }
}

/// Which registration a hook came from.
///
/// # Example
///
/// ```
/// use diesel_transaction_signals::HookKind;
///
/// assert_eq!(HookKind::Commit.to_string(), "on_commit");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HookKind {
    /// Registered with `on_commit`, [`defer`](fn@crate::defer) or [`defer!`](crate::defer!).
    Commit,
    /// Registered with `on_rollback`.
    Rollback,
    /// Registered with `on_complete`.
    Complete,
    /// Registered with `before_commit`.
    BeforeCommit,
    /// A [signal](crate::signals) receiver.
    Receiver,
}

impl fmt::Display for HookKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HookKind::Commit => "on_commit",
            HookKind::Rollback => "on_rollback",
            HookKind::Complete => "on_complete",
            HookKind::BeforeCommit => "before_commit",
            HookKind::Receiver => "signal receiver",
        })
    }
}

/// Why a hook failed.
///
/// # Example
///
/// ```
/// use diesel_transaction_signals::FailureCause;
///
/// let cause = FailureCause::Panicked("boom".into());
/// assert_eq!(cause.message(), "boom");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureCause {
    /// The hook panicked; the panic was caught. Holds the panic message.
    Panicked(String),
    /// The hook returned `Err`; holds the error's `Display` text.
    Returned(String),
}

impl FailureCause {
    /// The panic message or the error text.
    ///
    /// ```
    /// use diesel_transaction_signals::FailureCause;
    /// assert_eq!(FailureCause::Returned("smtp down".into()).message(), "smtp down");
    /// ```
    pub fn message(&self) -> &str {
        match self {
            FailureCause::Panicked(m) | FailureCause::Returned(m) => m,
        }
    }
}

/// A report of a hook that panicked or returned an error.
///
/// A failing hook never stops the hooks after it and never turns a committed transaction into
/// an error: the failure is caught, logged at error level (target
/// `diesel_transaction_signals`) and passed to the handler set with
/// [`set_failure_handler`], if any.
///
/// # Example
///
/// ```
/// use diesel_transaction_signals::{FailureCause, HookFailure};
///
/// fn alert(failure: &HookFailure) -> String {
///     format!("{} hook from {} failed: {}", failure.kind(), failure.location(), failure.cause().message())
/// }
/// # let _ = alert;
/// ```
#[derive(Debug, Clone)]
pub struct HookFailure {
    kind: HookKind,
    location: &'static Location<'static>,
    connection: Option<ConnectionId>,
    alias: Option<Arc<str>>,
    cause: FailureCause,
}

impl HookFailure {
    pub(crate) fn new(
        kind: HookKind,
        location: &'static Location<'static>,
        conn: Option<&Label>,
        cause: FailureCause,
    ) -> Self {
        HookFailure {
            kind,
            location,
            connection: conn.map(|l| l.id),
            alias: conn.and_then(|l| l.alias.clone()),
            cause,
        }
    }

    /// Which kind of hook failed.
    ///
    /// ```
    /// # use diesel_transaction_signals::HookFailure;
    /// fn is_commit(f: &HookFailure) -> bool { f.kind() == diesel_transaction_signals::HookKind::Commit }
    /// # let _ = is_commit;
    /// ```
    pub fn kind(&self) -> HookKind {
        self.kind
    }

    /// Where the hook was registered (`file:line:column`).
    ///
    /// ```
    /// # use diesel_transaction_signals::HookFailure;
    /// fn file(f: &HookFailure) -> &str { f.location().file() }
    /// # let _ = file;
    /// ```
    pub fn location(&self) -> &'static Location<'static> {
        self.location
    }

    /// The connection whose transaction the hook belonged to; `None` for a hook that ran at once
    /// because no transaction was open.
    ///
    /// ```
    /// # use diesel_transaction_signals::HookFailure;
    /// fn conn(f: &HookFailure) -> String { f.connection().map_or("none".into(), |c| c.to_string()) }
    /// # let _ = conn;
    /// ```
    pub fn connection(&self) -> Option<ConnectionId> {
        self.connection
    }

    /// The alias of that connection, if it has one.
    ///
    /// ```
    /// # use diesel_transaction_signals::HookFailure;
    /// fn database(f: &HookFailure) -> &str { f.alias().unwrap_or("default") }
    /// # let _ = database;
    /// ```
    pub fn alias(&self) -> Option<&str> {
        self.alias.as_deref()
    }

    /// The panic message or returned error.
    ///
    /// ```
    /// # use diesel_transaction_signals::HookFailure;
    /// fn msg(f: &HookFailure) -> &str { f.cause().message() }
    /// # let _ = msg;
    /// ```
    pub fn cause(&self) -> &FailureCause {
        &self.cause
    }
}

impl fmt::Display for HookFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = match self.cause {
            FailureCause::Panicked(_) => "panicked",
            FailureCause::Returned(_) => "returned an error",
        };
        write!(
            f,
            "{} hook registered at {} {}",
            self.kind, self.location, verb
        )?;
        match (self.connection, &self.alias) {
            (Some(c), Some(a)) => write!(f, " (connection {c} ({a}))")?,
            (Some(c), None) => write!(f, " (connection {c})")?,
            _ => {}
        }
        write!(f, ": {}", self.cause.message())
    }
}

impl std::error::Error for HookFailure {}

type FailureHandler = Arc<dyn Fn(&HookFailure) + Send + Sync + 'static>;

static FAILURE_HANDLER: RwLock<Option<FailureHandler>> = RwLock::new(None);

/// Sets the process-wide handler called with every [`HookFailure`] (after it is logged), or
/// removes it with `None`. Returns the previous handler.
///
/// The handler runs on the thread that ran the hook. A handler that panics is caught too and
/// only logged.
///
/// # Example
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use diesel_transaction_signals::{set_failure_handler, HookFailure};
///
/// let seen: Arc<Mutex<Vec<String>>> = Arc::default();
/// let sink = seen.clone();
/// set_failure_handler(Some(Box::new(move |f: &HookFailure| {
///     sink.lock().unwrap().push(f.cause().message().to_owned())
/// })));
/// diesel_transaction_signals::defer(|| panic!("mail server down")); // no transaction: runs now
/// assert_eq!(seen.lock().unwrap().as_slice(), ["mail server down"]);
/// set_failure_handler(None);
/// ```
#[allow(clippy::type_complexity)]
pub fn set_failure_handler(
    handler: Option<Box<dyn Fn(&HookFailure) + Send + Sync + 'static>>,
) -> Option<Box<dyn Fn(&HookFailure) + Send + Sync + 'static>> {
    let new: Option<FailureHandler> = handler.map(Arc::from);
    let old = std::mem::replace(
        &mut *FAILURE_HANDLER.write().unwrap_or_else(|e| e.into_inner()),
        new,
    );
    old.map(|h| Box::new(move |f: &HookFailure| h(f)) as Box<_>)
}

pub(crate) fn report(failure: HookFailure) {
    log::error!(target: "diesel_transaction_signals", "{failure}");
    let handler = FAILURE_HANDLER
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some(handler) = handler {
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| handler(&failure))) {
            log::error!(
                target: "diesel_transaction_signals",
                "the hook failure handler panicked: {}",
                panic_message(&*p)
            );
        }
    }
}

pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string panic payload>".to_owned()
    }
}

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

/// What the pre-commit phase runs: a `before_commit` hook (type-erased: the stack does not know
/// the connection type; `manager` downcasts it to `PreCommitHook<BeforeFn<C>>`) or a durable
/// row.
pub(crate) enum PreCommit {
    Before(Box<dyn Any + Send + 'static>),
    #[cfg(feature = "outbox")]
    Durable(crate::outbox::NewRow),
}

/// The hook running (or being dropped) now, for the report if it panics.
type Running = Option<(HookKind, &'static Location<'static>)>;

/// A hook's closure boxed with where it was registered. Object-safe so that a [`Hook`] is one
/// fat pointer.
trait Erased: Send + 'static {
    fn kind(&self) -> HookKind;
    fn location(&self) -> &'static Location<'static>;
    /// Runs the hook if it applies to `outcome` and returns its failure, if any; otherwise
    /// drops it and returns `None`. Either way it first names itself in `running`.
    fn settle(self: Box<Self>, outcome: Outcome, running: &mut Running) -> Option<Option<String>>;
    /// A pre-commit hook's payload; `None` (and the hook dropped) for any other.
    fn into_pre_commit(self: Box<Self>) -> Option<PreCommit> {
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
        *running = Some((self.kind(), self.location));
        let applies = match K {
            COMMIT => outcome == Outcome::Committed,
            ROLLBACK => outcome == Outcome::RolledBack,
            _ => true,
        };
        if applies {
            let Run { f, .. } = *self;
            Some(f(outcome))
        } else {
            drop(self);
            None
        }
    }
}

/// A hook that runs in the pre-commit phase: a `before_commit` closure of a
/// `SignalConnection<C>` (`T = BeforeFn<C>`) or a row handed over by `defer_durable!`
/// (`T = NewRow`).
pub(crate) struct PreCommitHook<T> {
    location: &'static Location<'static>,
    pub(crate) payload: T,
}

/// What a pre-commit payload becomes when the pre-commit phase takes it.
trait PreCommitPayload: Sized + Send + 'static {
    fn into_pre_commit(hook: Box<PreCommitHook<Self>>) -> PreCommit;
}

impl<C: 'static> PreCommitPayload for crate::connection::BeforeFn<C> {
    fn into_pre_commit(hook: Box<PreCommitHook<Self>>) -> PreCommit {
        // Type-erased: the stack does not know `C`; `manager` downcasts it back.
        PreCommit::Before(hook)
    }
}

#[cfg(feature = "outbox")]
impl PreCommitPayload for crate::outbox::NewRow {
    fn into_pre_commit(hook: Box<PreCommitHook<Self>>) -> PreCommit {
        PreCommit::Durable(hook.payload)
    }
}

impl<T: PreCommitPayload> Erased for PreCommitHook<T> {
    fn kind(&self) -> HookKind {
        HookKind::BeforeCommit
    }

    fn location(&self) -> &'static Location<'static> {
        self.location
    }

    fn settle(self: Box<Self>, _: Outcome, running: &mut Running) -> Option<Option<String>> {
        // Only reached when the pre-commit phase never ran (the transaction did not commit).
        *running = Some((HookKind::BeforeCommit, self.location));
        None
    }

    fn into_pre_commit(self: Box<Self>) -> Option<PreCommit> {
        Some(T::into_pre_commit(self))
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

    pub(crate) fn before<C: 'static>(
        f: crate::connection::BeforeFn<C>,
        location: &'static Location<'static>,
    ) -> Self {
        Hook(Box::new(PreCommitHook {
            location,
            payload: f,
        }))
    }

    #[cfg(feature = "outbox")]
    pub(crate) fn durable(
        row: crate::outbox::NewRow,
        location: &'static Location<'static>,
    ) -> Self {
        Hook(Box::new(PreCommitHook {
            location,
            payload: row,
        }))
    }

    pub(crate) fn kind(&self) -> HookKind {
        self.0.kind()
    }

    /// Splits a pre-commit hook into what the pre-commit phase runs.
    pub(crate) fn into_pre_commit(self) -> Option<PreCommit> {
        self.0.into_pre_commit()
    }

    pub(crate) fn location(&self) -> &'static Location<'static> {
        self.0.location()
    }

    /// Runs in the pre-commit phase (`before_commit`, `defer_durable!`).
    pub(crate) fn is_pre_commit(&self) -> bool {
        self.0.is_pre_commit()
    }
}

const _: () = assert!(std::mem::size_of::<Hook>() == 16);

/// Settles `hooks` for `outcome`: runs those that apply (a hook that panics or returns `Err` is
/// caught and reported), drops the others, and logs what was dropped unrun: at debug level where
/// that is the normal fate (commit hooks of rolled-back work), at error level where nobody can
/// know (`Unknown`).
///
/// One `catch_unwind` covers the whole run rather than one per hook: after a panic the loop
/// reports it against the hook that was running and resumes with the next one.
pub(crate) fn settle_all(
    mut hooks: impl Iterator<Item = Hook>,
    outcome: Outcome,
    conn: Option<&Label>,
    why: &str,
) -> Settled {
    let mut settled = Settled::default();
    // The hook running now, so a panic can be reported against it; `None` outside hook code
    // (a panic there, in a logger, is not ours to swallow).
    let mut running: Running = None;
    loop {
        let run = catch_unwind(AssertUnwindSafe(|| {
            for Hook(hook) in &mut hooks {
                let result = hook.settle(outcome, &mut running);
                let Some((kind, location)) = running.take() else {
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
                let Some((kind, location)) = running.take() else {
                    resume_unwind(payload);
                };
                settled.ran += 1;
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

/// Counts of hooks settled at the end of a level.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settled {
    pub(crate) ran: usize,
    pub(crate) discarded: usize,
}

/// One open transaction level (the outermost transaction or a savepoint).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Level {
    /// Index in [`HookStack::hooks`] of this level's first hook.
    pub(crate) start: usize,
    /// Unique (per connection) serial number, so `defer!` can name a level without a reference.
    pub(crate) serial: u64,
    /// Its place in the thread registry, to undo when it closes.
    pub(crate) slot: crate::registry::Slot,
}

/// The pending hooks and open levels of one connection.
#[derive(Default)]
pub(crate) struct HookStack {
    pub(crate) hooks: Vec<Hook>,
    pub(crate) levels: Vec<Level>,
    next_serial: u64,
    /// A `before_commit` hook may be pending (cleared when they are taken).
    has_before: bool,
}

impl HookStack {
    /// Opens a level (`enter` registers it with its serial) and returns its serial and slot.
    #[inline(always)]
    pub(crate) fn open(
        &mut self,
        enter: impl FnOnce(u64) -> crate::registry::Slot,
    ) -> (u64, crate::registry::Slot) {
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

    /// Whether the innermost open level holds no hook (true with no level open).
    #[inline]
    pub(crate) fn innermost_is_empty(&self) -> bool {
        self.levels
            .last()
            .is_none_or(|l| l.start == self.hooks.len())
    }

    /// Whether a pre-commit hook (`before_commit`, a durable row) may be pending.
    #[inline]
    pub(crate) fn has_before(&self) -> bool {
        self.has_before
    }

    /// The serial of the innermost open level (0 with none open).
    #[inline]
    pub(crate) fn innermost_serial(&self) -> u64 {
        self.levels.last().map_or(0, |l| l.serial)
    }

    #[inline]
    pub(crate) fn depth(&self) -> usize {
        self.levels.len()
    }

    /// Adds a hook that is not a pre-commit one to the innermost level. Must only be called with
    /// a level open.
    #[inline]
    pub(crate) fn push(&mut self, hook: Hook) {
        debug_assert!(!self.levels.is_empty());
        self.hooks.push(hook);
    }

    /// Adds a pre-commit hook (`before_commit`) to the innermost level.
    pub(crate) fn push_pre_commit(&mut self, hook: Hook) {
        debug_assert!(hook.is_pre_commit());
        self.has_before = true;
        self.push(hook);
    }

    /// Takes every pending `before_commit` hook, in registration order, leaving the others in
    /// place. Only called with the outermost level alone open.
    pub(crate) fn take_before(&mut self) -> Vec<Hook> {
        if !std::mem::take(&mut self.has_before) {
            return Vec::new();
        }
        debug_assert!(self.levels.len() == 1);
        let (before, rest) = std::mem::take(&mut self.hooks)
            .into_iter()
            .partition(Hook::is_pre_commit);
        self.hooks = rest;
        before
    }

    /// Moves every hook of `hooks` to the innermost level (a level must be open).
    #[inline]
    pub(crate) fn append(&mut self, hooks: &mut Vec<Hook>, has_before: bool) {
        debug_assert!(!self.levels.is_empty());
        self.has_before |= has_before;
        self.hooks.append(hooks);
    }

    /// Adds a hook to the level with `serial`; returns it back if no such level is open.
    #[inline]
    pub(crate) fn push_to(&mut self, serial: u64, hook: Hook) -> Result<(), Hook> {
        match self.levels.last() {
            Some(innermost) if innermost.serial == serial => {
                self.has_before |= hook.is_pre_commit();
                self.hooks.push(hook);
                Ok(())
            }
            _ => self.push_below(serial, hook),
        }
    }

    /// `push_to` a level below the innermost (only reachable through a `defer!` from another
    /// thread's stale view), or to no level at all.
    #[cold]
    fn push_below(&mut self, serial: u64, hook: Hook) -> Result<(), Hook> {
        let Some(idx) = self.levels.iter().rposition(|l| l.serial == serial) else {
            return Err(hook);
        };
        self.has_before |= hook.is_pre_commit();
        // Insert at the end of that level's range.
        let at = self.levels[idx + 1].start;
        self.hooks.insert(at, hook);
        for l in &mut self.levels[idx + 1..] {
            l.start += 1;
        }
        Ok(())
    }

    /// Closes the innermost level after a successful savepoint RELEASE: its hooks now belong to
    /// the enclosing level. Returns the closed level.
    #[inline]
    pub(crate) fn release(&mut self) -> Option<Level> {
        self.levels.pop()
    }

    /// Closes the innermost level, taking its hooks. Returns the level and its hooks.
    #[inline]
    pub(crate) fn close(&mut self) -> Option<(Level, std::vec::Drain<'_, Hook>)> {
        let level = self.levels.pop()?;
        Some((level, self.hooks.drain(level.start..)))
    }

    /// Closes every level above the `keep` outermost ones, taking their hooks (registration
    /// order) and the closed levels (outermost first).
    #[allow(clippy::type_complexity)]
    pub(crate) fn close_above(
        &mut self,
        keep: usize,
    ) -> Option<(std::vec::Drain<'_, Level>, std::vec::Drain<'_, Hook>)> {
        let start = self.levels.get(keep)?.start;
        Some((self.levels.drain(keep..), self.hooks.drain(start..)))
    }
}
