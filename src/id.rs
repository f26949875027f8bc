//! Who a hook, a log line or an event is about: a connection's id and its alias.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A process-unique, stable identifier of a [`SignalConnection`](crate::SignalConnection) (or
/// an async one), shown in log lines and failure reports.
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
    pub(crate) fn next() -> Self {
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
