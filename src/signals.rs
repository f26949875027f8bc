//! Process-wide signals: receivers that hear about every outermost transaction of every
//! [`SignalConnection`](crate::SignalConnection) in the process.
//!
//! Hooks belong to one transaction; signals are for cross-cutting concerns that want to see all
//! of them: metrics, tracing, a cache that is invalidated after any write, an audit check that
//! vetoes a commit. They descend from the `pre_commit` / `post_commit` / `post_rollback` signals
//! of Django's `django-transaction-signals`.
//!
//! | signal | sent | receiver returns |
//! |---|---|---|
//! | [`PRE_COMMIT`] | inside the outermost transaction, just before the `before_commit` hooks and COMMIT | `Result<(), Veto>`: an `Err` rolls the transaction back |
//! | [`POST_COMMIT`] | after a successful COMMIT and the commit hooks | `()` |
//! | [`POST_ROLLBACK`] | after the outermost level rolled back (or its COMMIT failed) and the rollback hooks ran | `()` |
//! | [`POST_COMPLETE`] | after either of the above, or when the outcome is [`Unknown`](crate::Outcome::Unknown) | `()` |
//!
//! Signals are sent from the thread that ran the transaction, with no lock held: a receiver may
//! connect or disconnect receivers (the change applies from the next send). A receiver that
//! panics is caught and reported like a failing hook and does not stop the others. A signal
//! with no receivers costs one atomic load. Test transactions, which never end, send nothing.
//!
//! # Example
//!
//! ```
//! # #[cfg(feature = "sqlite")] {
//! use diesel::prelude::*;
//! use diesel_transaction_signals::signals::POST_COMMIT;
//! use diesel_transaction_signals::SignalConnection;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//!
//! let commits = Arc::new(AtomicUsize::new(0));
//! let counter = commits.clone();
//! let receiver = POST_COMMIT.connect_guard(move |event| {
//!     if event.alias() == Some("quickstart-doc") {
//!         counter.fetch_add(1, Ordering::SeqCst);
//!     }
//! });
//! let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:")?
//!     .with_alias("quickstart-doc");
//! conn.transaction(|_| QueryResult::Ok(()))?;
//! assert_eq!(commits.load(Ordering::SeqCst), 1);
//! drop(receiver); // disconnects
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::borrow::Cow;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe, Location};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::id::{ConnectionId, Label};
use crate::outcome::Outcome;
use crate::report::{panic_message, report, FailureCause, HookFailure, HookKind};

/// Sent inside every outermost transaction, before its `before_commit` hooks and COMMIT. A
/// receiver that returns `Err(Veto)` (or panics) rolls the transaction back; `transaction` then
/// returns the veto as an error (see [`Veto::from_error`]). All receivers run even after a veto.
///
/// ```
/// use diesel_transaction_signals::signals::{Veto, PRE_COMMIT};
///
/// let guard = PRE_COMMIT.connect_guard(|event| {
///     if event.alias() == Some("read-replica") {
///         return Err(Veto::new("writes to the replica are not allowed"));
///     }
///     Ok(())
/// });
/// # drop(guard);
/// ```
pub static PRE_COMMIT: Signal<Result<(), Veto>> = Signal::builtin("PRE_COMMIT");

/// Sent after every successful outermost COMMIT, once the commit hooks have run.
///
/// ```
/// use diesel_transaction_signals::signals::POST_COMMIT;
/// let id = POST_COMMIT.connect(|event| log::info!("committed in {:?}", event.duration()));
/// assert!(POST_COMMIT.disconnect(id));
/// ```
pub static POST_COMMIT: Signal<()> = Signal::builtin("POST_COMMIT");

/// Sent after every outermost rollback (including a failed or vetoed COMMIT, a panic, a dropped
/// connection), once the rollback hooks have run.
///
/// ```
/// use diesel_transaction_signals::signals::POST_ROLLBACK;
/// let id = POST_ROLLBACK.connect(|event| log::warn!("rolled back on {}", event.connection()));
/// assert!(POST_ROLLBACK.disconnect(id));
/// ```
pub static POST_ROLLBACK: Signal<()> = Signal::builtin("POST_ROLLBACK");

/// Sent at the end of every outermost transaction with its [`Outcome`], after `POST_COMMIT`
/// or `POST_ROLLBACK`; the only signal sent when the outcome is `Unknown`.
///
/// ```
/// use diesel_transaction_signals::signals::POST_COMPLETE;
/// let id = POST_COMPLETE.connect(|event| println!("{:?}", event.outcome()));
/// assert!(POST_COMPLETE.disconnect(id));
/// ```
pub static POST_COMPLETE: Signal<()> = Signal::builtin("POST_COMPLETE");

type Receiver<Out> = Arc<dyn Fn(&TransactionEvent) -> Out + Send + Sync + 'static>;

/// A connected receiver and where it was connected.
type Entry<Out> = (ReceiverId, &'static Location<'static>, Receiver<Out>);

/// A process-wide signal with receivers of type `Fn(&TransactionEvent) -> Out`.
///
/// The crate's signals are the statics of this module; `Signal::new` makes more (a library's
/// own signal, or an isolated one in a test).
///
/// ```
/// use diesel_transaction_signals::signals::Signal;
///
/// static AUDIT: Signal<()> = Signal::new("AUDIT");
/// let id = AUDIT.connect(|_event| {});
/// assert_eq!(AUDIT.receiver_count(), 1);
/// assert!(AUDIT.disconnect(id));
/// assert!(!AUDIT.disconnect(id), "a second disconnect finds nothing");
/// ```
pub struct Signal<Out: 'static> {
    name: &'static str,
    count: AtomicUsize,
    /// [`BUILTIN_RECEIVERS`] for the crate's own signals, which every transaction asks about.
    tally: Option<&'static AtomicUsize>,
    receivers: RwLock<Option<Arc<[Entry<Out>]>>>,
}

/// Identifies a connected receiver, for [`Signal::disconnect`].
///
/// ```
/// use diesel_transaction_signals::signals::POST_COMMIT;
/// let a = POST_COMMIT.connect(|_| {});
/// let b = POST_COMMIT.connect(|_| {});
/// assert_ne!(a, b);
/// POST_COMMIT.disconnect(a);
/// POST_COMMIT.disconnect(b);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReceiverId(u64);

impl<Out: 'static> fmt::Debug for Signal<Out> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signal")
            .field("name", &self.name)
            .field("receivers", &self.receiver_count())
            .finish()
    }
}

impl<Out: 'static> Signal<Out> {
    /// A signal with no receivers.
    ///
    /// ```
    /// use diesel_transaction_signals::signals::Signal;
    /// static MINE: Signal<()> = Signal::new("MINE");
    /// assert_eq!(MINE.receiver_count(), 0);
    /// ```
    pub const fn new(name: &'static str) -> Self {
        Signal {
            name,
            count: AtomicUsize::new(0),
            tally: None,
            receivers: RwLock::new(None),
        }
    }

    /// One of the crate's signals: its receivers also count in [`BUILTIN_RECEIVERS`].
    const fn builtin(name: &'static str) -> Self {
        Signal {
            name,
            count: AtomicUsize::new(0),
            tally: Some(&BUILTIN_RECEIVERS),
            receivers: RwLock::new(None),
        }
    }

    /// Connects `receiver`; it hears every send from now on, until disconnected.
    ///
    /// ```
    /// use diesel_transaction_signals::signals::POST_ROLLBACK;
    /// let id = POST_ROLLBACK.connect(|event| eprintln!("rollback: {event:?}"));
    /// POST_ROLLBACK.disconnect(id);
    /// ```
    #[track_caller]
    pub fn connect<F>(&self, receiver: F) -> ReceiverId
    where
        F: Fn(&TransactionEvent) -> Out + Send + Sync + 'static,
    {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = ReceiverId(NEXT.fetch_add(1, Ordering::Relaxed));
        let mut slot = self.receivers.write().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<Entry<Out>> = slot.as_deref().map(<[_]>::to_vec).unwrap_or_default();
        all.push((id, Location::caller(), Arc::new(receiver)));
        *slot = Some(all.into());
        self.count.fetch_add(1, Ordering::Release);
        if let Some(tally) = self.tally {
            tally.fetch_add(1, Ordering::Release);
        }
        id
    }

    /// Connects `receiver` until the returned guard is dropped.
    ///
    /// ```
    /// use diesel_transaction_signals::signals::POST_COMMIT;
    /// {
    ///     let _guard = POST_COMMIT.connect_guard(|_| {});
    ///     // connected here
    /// }
    /// // disconnected here
    /// ```
    #[track_caller]
    pub fn connect_guard<F>(&self, receiver: F) -> ReceiverGuard<'_, Out>
    where
        F: Fn(&TransactionEvent) -> Out + Send + Sync + 'static,
    {
        ReceiverGuard {
            signal: self,
            id: self.connect(receiver),
        }
    }

    /// Disconnects a receiver. Returns `false` if it was not connected (already disconnected).
    ///
    /// ```
    /// use diesel_transaction_signals::signals::POST_COMMIT;
    /// let id = POST_COMMIT.connect(|_| {});
    /// assert!(POST_COMMIT.disconnect(id));
    /// assert!(!POST_COMMIT.disconnect(id));
    /// ```
    pub fn disconnect(&self, id: ReceiverId) -> bool {
        let mut slot = self.receivers.write().unwrap_or_else(|e| e.into_inner());
        let Some(current) = slot.as_deref() else {
            return false;
        };
        if !current.iter().any(|(r, _, _)| *r == id) {
            return false;
        }
        let rest: Vec<_> = current
            .iter()
            .filter(|(r, _, _)| *r != id)
            .cloned()
            .collect();
        *slot = if rest.is_empty() {
            None
        } else {
            Some(rest.into())
        };
        self.count.fetch_sub(1, Ordering::Release);
        if let Some(tally) = self.tally {
            tally.fetch_sub(1, Ordering::Release);
        }
        true
    }

    /// How many receivers are connected.
    ///
    /// ```
    /// use diesel_transaction_signals::signals::Signal;
    /// static S: Signal<()> = Signal::new("S");
    /// let _g = S.connect_guard(|_| {});
    /// assert_eq!(S.receiver_count(), 1);
    /// ```
    pub fn receiver_count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Whether anyone listens: one atomic load, the whole cost of a send with no receivers.
    #[inline]
    pub(crate) fn is_active(&self) -> bool {
        self.count.load(Ordering::Relaxed) != 0
    }

    /// The receivers connected now, taken without holding the lock while they run.
    fn snapshot(&self) -> Option<Arc<[Entry<Out>]>> {
        self.receivers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Calls every receiver; a panic is caught and reported, and returned as the `Err` of its
    /// slot so callers that care (vetoes) can see it.
    fn call_all(&self, event: &TransactionEvent, mut each: impl FnMut(Result<Out, String>)) {
        let Some(receivers) = self.snapshot() else {
            return;
        };
        for (_, location, receiver) in receivers.iter() {
            match catch_unwind(AssertUnwindSafe(|| receiver(event))) {
                Ok(out) => each(Ok(out)),
                Err(payload) => {
                    let message = panic_message(&*payload);
                    report(HookFailure::new(
                        HookKind::Receiver,
                        location,
                        Some(&event.label()),
                        FailureCause::Panicked(format!("{} receiver: {message}", self.name)),
                    ));
                    each(Err(message));
                }
            }
        }
    }
}

impl Signal<()> {
    /// Sends `event` to every receiver.
    #[inline]
    pub(crate) fn send(&self, event: &TransactionEvent) {
        if self.is_active() {
            self.call_all(event, |_| {});
        }
    }
}

impl Signal<Result<(), Veto>> {
    /// Sends `event` to every receiver; returns the first veto (or panic, as a veto).
    #[inline]
    pub(crate) fn send_veto(&self, event: &TransactionEvent) -> Result<(), Veto> {
        if !self.is_active() {
            return Ok(());
        }
        let mut first = Ok(());
        self.call_all(event, |result| {
            let veto = match result {
                Ok(Ok(())) => return,
                Ok(Err(veto)) => veto,
                Err(panic) => Veto::new(format!("a {} receiver panicked: {panic}", self.name)),
            };
            if first.is_ok() {
                first = Err(veto);
            }
        });
        first
    }
}

/// Disconnects its receiver when dropped; see [`Signal::connect_guard`].
///
/// ```
/// use diesel_transaction_signals::signals::POST_COMMIT;
/// let guard = POST_COMMIT.connect_guard(|_| {});
/// let id = guard.id();
/// drop(guard);
/// assert!(!POST_COMMIT.disconnect(id), "already disconnected");
/// ```
#[must_use = "the receiver is disconnected when the guard is dropped"]
pub struct ReceiverGuard<'a, Out: 'static> {
    signal: &'a Signal<Out>,
    id: ReceiverId,
}

impl<Out: 'static> ReceiverGuard<'_, Out> {
    /// The receiver's id.
    ///
    /// ```
    /// use diesel_transaction_signals::signals::POST_COMMIT;
    /// let guard = POST_COMMIT.connect_guard(|_| {});
    /// println!("{:?}", guard.id());
    /// ```
    pub fn id(&self) -> ReceiverId {
        self.id
    }
}

impl<Out: 'static> fmt::Debug for ReceiverGuard<'_, Out> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverGuard")
            .field("signal", &self.signal.name)
            .field("id", &self.id)
            .finish()
    }
}

impl<Out: 'static> Drop for ReceiverGuard<'_, Out> {
    fn drop(&mut self) {
        self.signal.disconnect(self.id);
    }
}

/// What a signal receiver learns about a transaction.
///
/// ```
/// use diesel_transaction_signals::signals::{TransactionEvent, POST_COMPLETE};
///
/// fn describe(e: &TransactionEvent) -> String {
///     format!(
///         "{} {} on {} after {:?}: {} hooks ran, {} discarded",
///         e.backend(),
///         e.outcome().map_or("pending".into(), |o| o.to_string()),
///         e.alias().unwrap_or("default"),
///         e.duration(),
///         e.hooks_ran(),
///         e.hooks_discarded(),
///     )
/// }
/// let id = POST_COMPLETE.connect(|e| println!("{}", describe(e)));
/// POST_COMPLETE.disconnect(id);
/// ```
#[derive(Debug, Clone)]
pub struct TransactionEvent {
    pub(crate) connection: ConnectionId,
    pub(crate) alias: Option<Arc<str>>,
    pub(crate) backend: &'static str,
    pub(crate) outcome: Option<Outcome>,
    pub(crate) duration: Duration,
    pub(crate) hooks_ran: usize,
    pub(crate) hooks_discarded: usize,
}

impl TransactionEvent {
    /// The connection's process-unique id.
    ///
    /// ```
    /// # use diesel_transaction_signals::signals::TransactionEvent;
    /// fn id(e: &TransactionEvent) -> u64 { e.connection().get() }
    /// # let _ = id;
    /// ```
    pub fn connection(&self) -> ConnectionId {
        self.connection
    }

    /// The connection's alias (`"primary"`, `"replica"`), if it has one.
    ///
    /// ```
    /// # use diesel_transaction_signals::signals::TransactionEvent;
    /// fn db(e: &TransactionEvent) -> &str { e.alias().unwrap_or("default") }
    /// # let _ = db;
    /// ```
    pub fn alias(&self) -> Option<&str> {
        self.alias.as_deref()
    }

    /// The backend: `"sqlite"`, `"postgres"`, `"mysql"` (or the backend type's name).
    ///
    /// ```
    /// # use diesel_transaction_signals::signals::TransactionEvent;
    /// fn is_pg(e: &TransactionEvent) -> bool { e.backend() == "postgres" }
    /// # let _ = is_pg;
    /// ```
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// How the transaction ended; `None` for `PRE_COMMIT`, sent before it ends.
    ///
    /// ```
    /// # use diesel_transaction_signals::{signals::TransactionEvent, Outcome};
    /// fn committed(e: &TransactionEvent) -> bool { e.outcome() == Some(Outcome::Committed) }
    /// # let _ = committed;
    /// ```
    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
    }

    /// How long the transaction has been open: from BEGIN to the end (or to `PRE_COMMIT`).
    /// Zero for a transaction that began before any receiver was connected: the clock is only
    /// read at BEGIN when someone listens.
    ///
    /// ```
    /// # use diesel_transaction_signals::signals::TransactionEvent;
    /// fn slow(e: &TransactionEvent) -> bool { e.duration().as_secs() > 1 }
    /// # let _ = slow;
    /// ```
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// How many hooks of this transaction ran (including those of rolled-back savepoints'
    /// rollback hooks).
    ///
    /// ```
    /// # use diesel_transaction_signals::signals::TransactionEvent;
    /// fn ran(e: &TransactionEvent) -> usize { e.hooks_ran() }
    /// # let _ = ran;
    /// ```
    pub fn hooks_ran(&self) -> usize {
        self.hooks_ran
    }

    /// How many hooks of this transaction were discarded unrun (commit hooks of rolled-back
    /// work, rollback hooks of committed work, hooks dropped for an unknown outcome).
    ///
    /// ```
    /// # use diesel_transaction_signals::signals::TransactionEvent;
    /// fn discarded(e: &TransactionEvent) -> usize { e.hooks_discarded() }
    /// # let _ = discarded;
    /// ```
    pub fn hooks_discarded(&self) -> usize {
        self.hooks_discarded
    }

    fn label(&self) -> Label {
        Label {
            id: self.connection,
            alias: self.alias.clone(),
        }
    }
}

/// A `PRE_COMMIT` receiver's refusal: the transaction is rolled back and `transaction` returns
/// this, wrapped in `diesel::result::Error::QueryBuilderError` (Diesel's only error variant that
/// carries a foreign error); get it back with [`Veto::from_error`].
///
/// ```
/// use diesel_transaction_signals::signals::Veto;
///
/// let veto = Veto::new("audit row missing");
/// assert_eq!(veto.message(), "audit row missing");
/// let err = veto.clone().into_error();
/// assert_eq!(Veto::from_error(&err), Some(&veto));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Veto {
    message: Cow<'static, str>,
}

impl Veto {
    /// A veto with a message saying why.
    ///
    /// ```
    /// use diesel_transaction_signals::signals::Veto;
    /// let v = Veto::new(format!("{} rows over quota", 3));
    /// assert_eq!(v.to_string(), "commit vetoed: 3 rows over quota");
    /// ```
    pub fn new(message: impl Into<Cow<'static, str>>) -> Self {
        Veto {
            message: message.into(),
        }
    }

    /// Why the commit was refused.
    ///
    /// ```
    /// use diesel_transaction_signals::signals::Veto;
    /// assert_eq!(Veto::new("no").message(), "no");
    /// ```
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The Diesel error `transaction` returns for this veto.
    ///
    /// ```
    /// use diesel_transaction_signals::signals::Veto;
    /// let err = Veto::new("no").into_error();
    /// assert!(matches!(err, diesel::result::Error::QueryBuilderError(_)));
    /// ```
    pub fn into_error(self) -> diesel::result::Error {
        diesel::result::Error::QueryBuilderError(Box::new(self))
    }

    /// The veto inside `err`, if `err` is one.
    ///
    /// ```
    /// use diesel_transaction_signals::signals::Veto;
    /// assert_eq!(Veto::from_error(&diesel::result::Error::NotFound), None);
    /// ```
    pub fn from_error(err: &diesel::result::Error) -> Option<&Veto> {
        match err {
            diesel::result::Error::QueryBuilderError(e) => e.downcast_ref::<Veto>(),
            _ => None,
        }
    }
}

impl fmt::Display for Veto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "commit vetoed: {}", self.message)
    }
}

impl std::error::Error for Veto {}

/// Receivers connected to the crate's four signals, together: what a transaction with none
/// pays to learn it is one load.
static BUILTIN_RECEIVERS: AtomicUsize = AtomicUsize::new(0);

/// Whether any of the crate's signals has a receiver (an event will be built for this
/// transaction).
#[inline]
pub(crate) fn any_receivers() -> bool {
    BUILTIN_RECEIVERS.load(Ordering::Relaxed) != 0
}

/// Whether an end-of-transaction signal may have a receiver (a `PRE_COMMIT` receiver alone
/// also says yes: the sends then find nobody, which costs only while receivers exist).
#[inline]
pub(crate) fn any_post_receivers() -> bool {
    any_receivers()
}

/// Sends the end-of-transaction signals for `event`.
pub(crate) fn send_post(event: &TransactionEvent) {
    match event.outcome {
        Some(Outcome::Committed) => POST_COMMIT.send(event),
        Some(Outcome::RolledBack) => POST_ROLLBACK.send(event),
        _ => {}
    }
    POST_COMPLETE.send(event);
}

/// A short name for a Diesel backend type.
pub(crate) fn backend_name<B>() -> &'static str {
    let full = std::any::type_name::<B>();
    match full.rsplit("::").next() {
        Some("Sqlite") => "sqlite",
        Some("Pg") => "postgres",
        Some("Mysql") => "mysql",
        _ => full,
    }
}
