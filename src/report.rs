//! Failure reporting: what kind of hook failed, why, and the process-wide handler told about it.
//! A failing hook never stops the hooks after it; it is caught, logged and reported here.

use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe, Location};
use std::sync::{Arc, RwLock};

use crate::id::{ConnectionId, Label};

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
