//! What the async wrapper learns from the statements that pass through it, at no cost: a
//! statement's error inside a transaction is noted here by the future that ran it ([`Watched`]),
//! and the connection's next operation acts on it. On SQLite, also the inner connection's
//! transaction status as the driver last knew it ([`Watch::known`]), so that it is not read
//! across threads at every transaction.
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

use crate::ledger::{Op, Status};

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
    /// SQLite: the inner status as the driver last read it, moved on by the driver's own
    /// BEGIN, COMMIT and ROLLBACK that returned `Ok`; `None`: read it (see [`Watch::known`]).
    /// Not forgotten when a transaction ends, only by what could change the status unseen.
    known: Option<Status>,
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
            known: None,
        }
    }

    /// The inner status without reading it (SQLite), or `None`: read it, then
    /// [`remember`](Self::remember) it.
    ///
    /// Why: `SyncConnectionWrapper` keeps its status inside the connection that the blocking
    /// thread has just used for BEGIN or COMMIT; reading it on the runtime thread pulls that
    /// memory from the other core's cache twice per transaction, where diesel-async's own
    /// `transaction` never reads it. What the driver knows instead holds because Diesel's
    /// `SqliteConnection` (2.3) changes its status in two places only: its transaction manager
    /// (whose every call either goes through the driver, which moves the status on as
    /// `AnsiTransactionManager` does, or through a door that forgets it: `inner_mut`,
    /// `transaction_state`, `transaction_manager_status_mut`), and a failed `batch_execute` in
    /// autocommit. So the status is forgotten by every `batch_execute`,
    /// every failed statement, every call to the manager that did not return `Ok` (or did
    /// not return: it is taken while the call is in flight), and by those doors.
    /// PostgreSQL's and MySQL's status lives in the async connection itself: always read.
    #[inline]
    pub(crate) fn known(&self) -> Option<Status> {
        self.known
    }

    /// Keeps `read`, the inner status just read, while nothing changes it unseen (SQLite only;
    /// a broken or aborted status is read again each time).
    #[inline]
    pub(crate) fn remember(&mut self, read: Status) {
        if self.backend == Backend::Sqlite
            && !matches!(read, Status::Broken | Status::Open { aborted: true, .. })
        {
            self.known = Some(read);
        }
    }

    /// Something may have changed the inner status unseen: read it next time.
    #[inline]
    pub(crate) fn forget(&mut self) {
        self.known = None;
    }

    /// A BEGIN, COMMIT or ROLLBACK is about to be sent: the status is unknown until it returns
    /// (a future dropped meanwhile leaves it so). Returns what was known before.
    #[inline]
    pub(crate) fn sending(&mut self) -> Option<Status> {
        self.known.take()
    }

    /// The call sent for `op` returned (`ok`): the status known before it, moved on as
    /// Diesel's `AnsiTransactionManager` moves it (one level more or less); forgotten on an
    /// error.
    #[inline]
    pub(crate) fn returned(&mut self, before: Option<Status>, op: Op, ok: bool) {
        self.known = match (ok, op, before) {
            (false, ..) | (true, _, None) => None,
            (true, Op::Begin, Some(Status::Idle)) => Some(Status::Open {
                depth: 1,
                aborted: false,
            }),
            (true, Op::Begin, Some(Status::Open { depth, aborted })) => Some(Status::Open {
                depth: depth + 1,
                aborted,
            }),
            (true, Op::Commit | Op::Rollback, Some(Status::Open { depth: 1, .. })) => {
                Some(Status::Idle)
            }
            (true, Op::Commit | Op::Rollback, Some(Status::Open { depth, aborted })) => {
                Some(Status::Open {
                    depth: depth - 1,
                    aborted,
                })
            }
            (true, _, Some(Status::Idle | Status::Broken)) => None,
        };
    }

    /// Forgets what the statements told (not the [`known`](Self::known) status, which
    /// outlives transactions): the transaction ended.
    pub(crate) fn reset(&mut self) {
        self.aborted_at = None;
        self.deadlock = false;
        self.probe = false;
        self.lock_wait_timeout = false;
    }

    /// A statement failed with `err` at `self.depth` levels.
    #[cold]
    pub(crate) fn failed(&mut self, err: &Error) {
        self.forget();
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
