//! r2d2 pool support: a customizer that labels pooled connections and reports those that leave
//! the pool with hooks pending.
//!
//! A pool of `SignalConnection<C>` needs nothing special to be correct: a connection checked in
//! with a transaction still open counts as broken ([`R2D2Connection::is_broken`]), so the pool
//! drops it, which rolls the transaction back and runs its rollback hooks; no hook ever crosses
//! into the connection's next use. [`SignalCustomizer`] adds the alias and the report.
//!
//! [`R2D2Connection::is_broken`]: diesel::r2d2::R2D2Connection::is_broken

use std::fmt;
use std::sync::Arc;

use diesel::connection::Connection;
use diesel::r2d2::{CustomizeConnection, Error};

use crate::SignalConnection;

/// An r2d2 [`CustomizeConnection`] for pools of [`SignalConnection<C>`]:
///
/// - on acquire, sets the connection's [alias](SignalConnection::set_alias), then runs the
///   customizer you already had for `C` (SQLite pragmas, `SET` statements) on the inner
///   connection;
/// - on release (a connection leaving the pool for good: broken or expired), logs a warning if
///   it still had a transaction open with hooks pending, rolls that transaction back so its
///   rollback hooks run, and hands the inner connection to your customizer's `on_release`.
///
/// # Example
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::prelude::*;
/// use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool};
/// use diesel_transaction_signals::pool::SignalCustomizer;
/// use diesel_transaction_signals::SignalConnection;
///
/// #[derive(Debug)]
/// struct ForeignKeys; // the customizer the application already had
/// impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for ForeignKeys {
///     fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
///         diesel::sql_query("PRAGMA foreign_keys = ON")
///             .execute(conn)
///             .map(drop)
///             .map_err(diesel::r2d2::Error::QueryError)
///     }
/// }
///
/// let pool = Pool::builder()
///     .max_size(2)
///     .connection_customizer(Box::new(
///         SignalCustomizer::new().alias("primary").wrap(ForeignKeys),
///     ))
///     .build(ConnectionManager::<SignalConnection<SqliteConnection>>::new(":memory:"))?;
/// let conn = pool.get()?;
/// assert_eq!(conn.alias(), Some("primary"));
/// # }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SignalCustomizer<C> {
    alias: Option<Arc<str>>,
    inner: Option<Box<dyn CustomizeConnection<C, Error>>>,
}

impl<C> SignalCustomizer<C> {
    /// A customizer that sets no alias and wraps nothing.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel_transaction_signals::pool::SignalCustomizer;
    /// let c = SignalCustomizer::<diesel::SqliteConnection>::new();
    /// # let _ = c;
    /// # }
    /// ```
    pub fn new() -> Self {
        SignalCustomizer {
            alias: None,
            inner: None,
        }
    }

    /// Gives every connection of the pool this alias.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel_transaction_signals::pool::SignalCustomizer;
    /// let c = SignalCustomizer::<diesel::SqliteConnection>::new().alias("replica");
    /// # let _ = c;
    /// # }
    /// ```
    pub fn alias(mut self, alias: impl Into<Arc<str>>) -> Self {
        self.alias = Some(alias.into());
        self
    }

    /// Runs `inner`, a customizer for the wrapped connection type, after this one's work on
    /// acquire and with the inner connection on release.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::r2d2::NopConnectionCustomizer;
    /// use diesel_transaction_signals::pool::SignalCustomizer;
    /// let c = SignalCustomizer::<diesel::SqliteConnection>::new().wrap(NopConnectionCustomizer);
    /// # let _ = c;
    /// # }
    /// ```
    pub fn wrap(mut self, inner: impl CustomizeConnection<C, Error>) -> Self {
        self.inner = Some(Box::new(inner));
        self
    }
}

impl<C> Default for SignalCustomizer<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> fmt::Debug for SignalCustomizer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignalCustomizer")
            .field("alias", &self.alias)
            .field("inner", &self.inner)
            .finish()
    }
}

impl<C> CustomizeConnection<SignalConnection<C>, Error> for SignalCustomizer<C>
where
    C: Connection + 'static,
{
    fn on_acquire(&self, conn: &mut SignalConnection<C>) -> Result<(), Error> {
        if let Some(alias) = &self.alias {
            conn.set_alias(Arc::clone(alias));
        }
        match &self.inner {
            Some(inner) => inner.on_acquire(conn.inner_mut()),
            None => Ok(()),
        }
    }

    fn on_release(&self, mut conn: SignalConnection<C>) {
        conn.sync();
        let levels = conn.book.ledger.depth();
        if levels > 0 && !conn.book.ledger.is_test_transaction() {
            log::warn!(
                target: "diesel_transaction_signals",
                "connection {} removed from the pool inside a transaction ({levels} level(s), \
                 {} hook(s) pending): rolling back, its rollback hooks run now",
                conn.book.label,
                conn.book.ledger.hooks.len(),
            );
            let _ = conn.rollback_to(1, "the connection was removed from the pool");
        }
        match &self.inner {
            Some(inner) => inner.on_release(conn.into_inner()),
            None => drop(conn),
        }
    }
}
