//! What the async wrapper learns from the statements that pass through it, at no cost: a
//! statement's error inside a transaction is noted here by the future that ran it ([`Watched`]),
//! and the connection's next operation acts on it.
//!
//! diesel-async's connections do not notice everything the sync ones do
//! (`../../shared`-verified facts, summarised in `docs/ARCHITECTURE.md`):
//!
//! | backend | what diesel-async misses | what the wrapper does |
//! |---|---|---|
//! | PostgreSQL | a failed statement aborts the transaction; COMMIT then returns `Ok` although the server rolled back | notes the depth of the first failure: COMMIT becomes `ROLLBACK` and returns [`TransactionAborted`](crate::TransactionAborted) (row C4); `RELEASE` of a savepoint above it is refused (the caller rolls the savepoint back, which clears the failure when it happened inside it) |
//! | MySQL / MariaDB | a deadlock rolls the whole transaction back | the error's text (`Deadlock found`): the transaction is lost, `RolledBack` (row E1) |
//! | SQLite | `INSERT OR ROLLBACK`, `RAISE(ROLLBACK)` end the transaction | one probe at the connection's next transaction operation |

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use diesel::result::{DatabaseErrorKind, Error, QueryResult};

/// Which backend's rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Postgres,
    Mysql,
    Sqlite,
    Other,
}

impl Backend {
    pub(crate) fn from_name(name: &str) -> Self {
        match name {
            "postgres" => Backend::Postgres,
            "mysql" => Backend::Mysql,
            "sqlite" => Backend::Sqlite,
            _ => Backend::Other,
        }
    }
}

/// What the statements told the wrapper since the transaction began.
#[derive(Debug)]
pub(crate) struct Watch {
    pub(crate) backend: Backend,
    /// Levels the ledger has open for the inner connection (`live_depth`), copied in before
    /// each statement so a failure knows where it happened.
    pub(crate) depth: usize,
    /// PostgreSQL: the depth at which the first statement failed since the transaction (or the
    /// savepoint that was rolled back) began: the transaction is aborted from there up.
    pub(crate) aborted_at: Option<usize>,
    /// MySQL: a deadlock ended the transaction on the server.
    pub(crate) deadlock: bool,
    /// A statement failed where the server may have ended the transaction and only a probe
    /// can tell (SQLite; MySQL's lock wait timeout): asked at the next transaction operation.
    pub(crate) probe: bool,
    /// The message of that failure (MySQL: whether it was a lock wait timeout).
    pub(crate) lock_wait_timeout: bool,
}

impl Watch {
    pub(crate) fn new(backend: Backend) -> Self {
        Watch {
            backend,
            depth: 0,
            aborted_at: None,
            deadlock: false,
            probe: false,
            lock_wait_timeout: false,
        }
    }

    /// Forgets everything: the transaction ended.
    pub(crate) fn reset(&mut self) {
        self.aborted_at = None;
        self.deadlock = false;
        self.probe = false;
        self.lock_wait_timeout = false;
    }

    /// A statement failed with `err` at `self.depth` levels.
    #[cold]
    pub(crate) fn failed(&mut self, err: &Error) {
        if self.depth == 0 {
            return;
        }
        let Error::DatabaseError(kind, info) = err else {
            // Raised before anything reached the server (a query builder or serialization
            // error): the transaction is as it was.
            return;
        };
        match self.backend {
            Backend::Postgres => {
                // Any error the server answered aborts the transaction; a connection lost
                // mid-transaction will never commit either.
                let _ = kind;
                self.aborted_at = Some(self.aborted_at.map_or(self.depth, |d| d.min(self.depth)));
            }
            Backend::Mysql => {
                let message = info.message();
                if message.starts_with("Deadlock found") {
                    self.deadlock = true;
                } else if message.starts_with("Lock wait timeout") {
                    self.probe = true;
                    self.lock_wait_timeout = true;
                } else if matches!(
                    kind,
                    DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand
                ) {
                    self.probe = true;
                }
            }
            Backend::Sqlite => self.probe = true,
            Backend::Other => {}
        }
    }

    /// A `ROLLBACK TO SAVEPOINT` closed the level at `depth`: a failure inside it is undone.
    pub(crate) fn rolled_back_to(&mut self, depth: usize) {
        if self.aborted_at.is_some_and(|d| d >= depth) {
            self.aborted_at = None;
        }
    }
}

pin_project_lite::pin_project! {
    /// A statement's future, refused before it started or watched while it runs: its error,
    /// if any, is noted in the connection's [`Watch`]. No allocation: it wraps the inner
    /// connection's own future.
    #[must_use = "futures do nothing unless polled"]
    pub struct Watched<'a, F> {
        #[pin]
        fut: Option<F>,
        watch: Option<&'a mut Watch>,
        refused: Option<Error>,
    }
}

impl<'a, F> Watched<'a, F> {
    pub(crate) fn running(fut: F, watch: &'a mut Watch) -> Self {
        Watched {
            fut: Some(fut),
            watch: Some(watch),
            refused: None,
        }
    }

    pub(crate) fn refused(err: Error) -> Self {
        Watched {
            fut: None,
            watch: None,
            refused: Some(err),
        }
    }
}

impl<F> std::fmt::Debug for Watched<'_, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watched")
    }
}

impl<T, F> Future for Watched<'_, F>
where
    F: Future<Output = QueryResult<T>>,
{
    type Output = QueryResult<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.fut.as_pin_mut() {
            Some(fut) => match fut.poll(cx) {
                Poll::Ready(Err(e)) => {
                    if let Some(watch) = this.watch.as_mut() {
                        watch.failed(&e);
                    }
                    Poll::Ready(Err(e))
                }
                other => other,
            },
            None => Poll::Ready(Err(this
                .refused
                .take()
                .expect("a refused statement is polled once"))),
        }
    }
}
