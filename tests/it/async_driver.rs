//! `AsyncSignalConnection` on real databases: SQLite (`SyncConnectionWrapper`), PostgreSQL
//! (`AsyncPgConnection`) and MariaDB (`AsyncMysqlConnection`). Each scenario is written once,
//! generic over the backend, and instantiated for all three by `scenarios!` at the end.
#![cfg(all(
    feature = "async",
    feature = "sqlite",
    feature = "postgres",
    feature = "mysql",
    feature = "deadpool",
    feature = "bb8"
))]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{self, unique_tag, Recorder};
use diesel::result::{Error, QueryResult};
use diesel::sqlite::SqliteConnection;
use diesel::QueryableByName;
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, AsyncMysqlConnection, AsyncPgConnection, RunQueryDsl};
use diesel_transaction_signals::{defer, AsyncSignalConnection, Outcome, TransactionAborted};

type Sqlite = SyncConnectionWrapper<SqliteConnection>;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// What a scenario needs from a backend: a connection with the test table, raw statements and a
/// row count, all on concrete types (raw SQL without binds, so the text is the same everywhere).
trait Backend: AsyncConnection + Sized + 'static {
    /// A database URL: the shared server's, or a fresh SQLite file.
    fn url() -> String;
    fn connect_to(url: &str) -> impl Future<Output = AsyncSignalConnection<Self>> + Send;
    fn connect() -> impl Future<Output = AsyncSignalConnection<Self>> + Send {
        let url = Self::url();
        async move { Self::connect_to(&url).await }
    }
    fn exec<'a>(
        c: &'a mut AsyncSignalConnection<Self>,
        sql: &'a str,
    ) -> impl Future<Output = QueryResult<usize>> + Send + 'a;
    fn count<'a>(
        c: &'a mut AsyncSignalConnection<Self>,
        tag: &'a str,
    ) -> impl Future<Output = i64> + Send + 'a;
    /// A statement that fails on the server without ending the transaction on its own
    /// (PostgreSQL then aborts the transaction).
    const FAILING: &'static str = "INSERT INTO no_such_table VALUES (1)";
}

macro_rules! backend {
    ($ty:ty, $url:expr, $create:expr) => {
        impl Backend for $ty {
            fn url() -> String {
                $url
            }
            fn connect_to(url: &str) -> impl Future<Output = AsyncSignalConnection<Self>> + Send {
                let url = url.to_owned();
                async move {
                    let mut c = AsyncSignalConnection::<$ty>::establish(&url)
                        .await
                        .expect("connect");
                    // PostgreSQL's CREATE TABLE IF NOT EXISTS races with itself (a unique
                    // violation in its catalog): one at a time in this process.
                    static CREATE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
                    let _one_at_a_time = CREATE.lock().await;
                    diesel::sql_query($create).execute(&mut c).await.unwrap();
                    c
                }
            }
            fn exec<'a>(
                c: &'a mut AsyncSignalConnection<Self>,
                sql: &'a str,
            ) -> impl Future<Output = QueryResult<usize>> + Send + 'a {
                async move { diesel::sql_query(sql).execute(c).await }
            }
            fn count<'a>(
                c: &'a mut AsyncSignalConnection<Self>,
                tag: &'a str,
            ) -> impl Future<Output = i64> + Send + 'a {
                async move {
                    diesel::sql_query(format!(
                        "SELECT COUNT(*) AS n FROM async_rows WHERE tag = '{tag}'"
                    ))
                    .get_result::<Count>(c)
                    .await
                    .unwrap()
                    .n
                }
            }
        }
    };
}

/// SQLite: a fresh file per call (tests run in parallel, and SQLite has one writer per file);
/// a pool's connections share the file of its URL.
fn sqlite_url() -> String {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    let name = unique_tag("async");
    dir.path()
        .join(format!("{name}.db"))
        .to_string_lossy()
        .into_owned()
}

backend!(
    Sqlite,
    sqlite_url(),
    "CREATE TABLE IF NOT EXISTS async_rows (tag TEXT NOT NULL, n INTEGER NOT NULL)"
);
backend!(
    AsyncPgConnection,
    common::pg_url(),
    "CREATE TABLE IF NOT EXISTS async_rows (tag TEXT NOT NULL, n INTEGER NOT NULL)"
);
backend!(
    AsyncMysqlConnection,
    common::mysql_url(),
    "CREATE TABLE IF NOT EXISTS async_rows (tag VARCHAR(100) NOT NULL, n INTEGER NOT NULL) ENGINE=InnoDB"
);

fn insert(tag: &str, n: i32) -> String {
    format!("INSERT INTO async_rows (tag, n) VALUES ('{tag}', {n})")
}

/// Commit hooks run after COMMIT, in order, before `transaction` returns; nothing runs before.
async fn commit_runs_commit_hooks<B: Backend>() {
    let mut c = B::connect().await;
    let tag = unique_tag("commit");
    let rec = Recorder::new();
    let r = rec.clone();
    c.transaction(async |c| {
        B::exec(c, &insert(&tag, 1)).await?;
        c.on_commit(r.hook("first"));
        c.on_rollback(r.hook("rollback"));
        c.on_complete(r.outcome("complete"));
        tokio::task::yield_now().await;
        c.on_commit(r.hook("second"));
        assert!(r.get().is_empty(), "nothing runs before COMMIT");
        QueryResult::Ok(())
    })
    .await
    .unwrap();
    assert_eq!(rec.take(), ["first", "complete:Committed", "second"]);
    assert_eq!(B::count(&mut c, &tag).await, 1);
    assert_eq!(c.transaction_depth(), 0);
}

/// An `Err` from the closure rolls back: rollback hooks run, commit hooks never do.
async fn error_rolls_back<B: Backend>() {
    let mut c = B::connect().await;
    let tag = unique_tag("rollback");
    let rec = Recorder::new();
    let r = rec.clone();
    let result = c
        .transaction(async |c| {
            B::exec(c, &insert(&tag, 1)).await?;
            c.on_commit(r.hook("commit"));
            c.on_rollback(r.hook("rollback"));
            Err::<(), _>(Error::RollbackTransaction)
        })
        .await;
    assert!(matches!(result, Err(Error::RollbackTransaction)));
    assert_eq!(rec.take(), ["rollback"]);
    assert_eq!(B::count(&mut c, &tag).await, 0);
}

/// A savepoint that rolls back takes its commit hooks with it and runs its rollback hooks at
/// once; the enclosing transaction commits with its own.
async fn savepoint_rollback_keeps_the_outer_level<B: Backend>() {
    let mut c = B::connect().await;
    let tag = unique_tag("savepoint");
    let rec = Recorder::new();
    let r = rec.clone();
    c.transaction(async |c| {
        B::exec(c, &insert(&tag, 1)).await?;
        c.on_commit(r.hook("outer-commit"));
        let inner = c
            .transaction(async |c| {
                B::exec(c, &insert(&tag, 2)).await?;
                c.on_commit(r.hook("inner-commit"));
                c.on_rollback(r.hook("inner-rollback"));
                Err::<(), _>(Error::RollbackTransaction)
            })
            .await;
        assert!(inner.is_err());
        assert_eq!(
            r.get(),
            ["inner-rollback"],
            "at once, at the savepoint's rollback"
        );
        c.transaction(async |c| {
            c.on_commit(r.hook("released-commit"));
            QueryResult::Ok(())
        })
        .await?;
        QueryResult::Ok(())
    })
    .await
    .unwrap();
    assert_eq!(
        rec.take(),
        ["inner-rollback", "outer-commit", "released-commit"]
    );
    assert_eq!(B::count(&mut c, &tag).await, 1);
}

/// `defer!` inside an async transaction waits for its COMMIT, across `.await` points and
/// worker threads; a task spawned inside does not inherit the transaction.
async fn defer_follows_the_task<B: Backend>() {
    let mut c = B::connect().await;
    let tag = unique_tag("defer");
    let rec = Recorder::new();
    let r = rec.clone();
    let handle = tokio::spawn(async move {
        c.transaction(async |c| {
            defer(r.hook("before-await"));
            for _ in 0..20 {
                // Yields so the task may resume on another worker thread.
                tokio::task::yield_now().await;
                B::exec(c, &insert(&tag, 1)).await?;
            }
            let after = r.hook("after-await");
            defer!(move || after());
            let spawned = r.clone();
            tokio::spawn(async move {
                // Not this task's transaction: runs at once.
                defer(spawned.hook("spawned-runs-at-once"));
            })
            .await
            .unwrap();
            assert_eq!(r.get(), ["spawned-runs-at-once"]);
            QueryResult::Ok(())
        })
        .await
        .unwrap();
        let n = B::count(&mut c, &tag).await;
        (c, n)
    });
    let (_c, n) = handle.await.unwrap();
    assert_eq!(n, 20);
    assert_eq!(
        rec.take(),
        ["spawned-runs-at-once", "before-await", "after-await"]
    );
}

/// Two tasks with transactions open at once: each `defer!` lands in its own task's.
async fn defer_never_crosses_tasks<B: Backend>() {
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let rec = Recorder::new();
    let mut tasks = Vec::new();
    for (name, commit) in [("a", true), ("b", false)] {
        let (barrier, r) = (Arc::clone(&barrier), rec.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = B::connect().await;
            let _ = c
                .transaction(async |_| {
                    barrier.wait().await; // both transactions are open now
                    defer(r.hook(format!("{name}-deferred")));
                    barrier.wait().await;
                    if commit {
                        QueryResult::Ok(())
                    } else {
                        Err(Error::RollbackTransaction)
                    }
                })
                .await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(rec.take(), ["a-deferred"]);
}

/// `defer!` lands in the task's innermost level whichever way it was opened: the closure's
/// own, a savepoint of `transaction`, a level opened with raw manager calls (on this connection
/// or another) inside the closure; it keeps its place in registration order among `on_commit`
/// hooks; after the closure ended its own level, it finds none and runs at once.
async fn defer_takes_the_innermost_level<B: Backend>() {
    use diesel_async::TransactionManager;
    type Manager<B> = <AsyncSignalConnection<B> as AsyncConnection>::TransactionManager;
    let mut c = B::connect().await;
    let mut other = B::connect().await;
    let rec = Recorder::new();
    let r = rec.clone();
    c.transaction(async |c| {
        defer(r.hook("a"));
        c.on_commit(r.hook("b"));
        defer(r.hook("c"));
        let inner = c
            .transaction(async |_| {
                defer(r.hook("savepoint-rolled-back"));
                Err::<(), _>(Error::RollbackTransaction)
            })
            .await;
        assert!(inner.is_err());
        // A raw level on this connection hides the closure's level until it ends.
        Manager::<B>::begin_transaction(c).await?;
        defer(r.hook("raw-savepoint-rolled-back"));
        Manager::<B>::rollback_transaction(c).await?;
        // Another connection's level, opened in this task, is the innermost while it is open.
        Manager::<B>::begin_transaction(&mut other).await?;
        defer(r.hook("other-committed"));
        Manager::<B>::commit_transaction(&mut other).await?;
        assert_eq!(r.get(), ["other-committed"]);
        defer(r.hook("d"));
        QueryResult::Ok(())
    })
    .await
    .unwrap();
    assert_eq!(rec.take(), ["other-committed", "a", "b", "c", "d"]);

    // The closure commits its own level with raw calls: a later `defer` finds no transaction.
    let r = rec.clone();
    c.transaction(async |c| {
        defer(r.hook("committed-by-the-closure"));
        Manager::<B>::commit_transaction(c).await?;
        assert_eq!(r.get(), ["committed-by-the-closure"]);
        defer(r.hook("no-transaction-runs-at-once"));
        assert_eq!(
            r.get(),
            ["committed-by-the-closure", "no-transaction-runs-at-once"]
        );
        QueryResult::Ok(())
    })
    .await
    .unwrap();
    assert_eq!(c.transaction_depth(), 0);
    rec.take();
}

/// `defer!` and `in_transaction()` follow the task's innermost level through every phase of
/// an async transaction: in `before_commit` work (the committing level), in a rolled-back
/// savepoint's rollback hook and after a nested closure ended its own level (the enclosing
/// level), after a raw level that hid the closure closed inside a nested closure (the closure's
/// level again).
async fn defer_follows_the_level_through_every_phase<B: Backend>() {
    use diesel_async::TransactionManager;
    use diesel_transaction_signals::in_transaction;
    type Manager<B> = <AsyncSignalConnection<B> as AsyncConnection>::TransactionManager;
    let mut c = B::connect().await;
    let mut other = B::connect().await;
    let rec = Recorder::new();
    let r = rec.clone();
    assert!(!in_transaction());
    c.transaction(async |c| {
        assert!(in_transaction());
        c.on_commit(r.hook("first"));
        let r2 = r.clone();
        c.before_commit(move |_| {
            Box::pin(async move {
                assert!(in_transaction(), "before_commit work runs inside the level");
                defer(r2.hook("deferred-in-before-commit"));
                Ok(())
            })
        })?;
        let r3 = r.clone();
        let inner = c
            .transaction(async |c| {
                c.on_rollback(move || defer(r3.hook("deferred-by-a-rollback-hook")));
                Err::<(), _>(Error::RollbackTransaction)
            })
            .await;
        assert!(inner.is_err());
        c.transaction(async |c| {
            Manager::<B>::commit_transaction(c).await?;
            assert!(in_transaction(), "the enclosing level is still open");
            defer(r.hook("deferred-after-the-nested-level-ended"));
            QueryResult::Ok(())
        })
        .await?;
        // A raw level of another connection hides this closure's level, and closes inside a
        // nested closure: this closure's level is the innermost again afterwards.
        Manager::<B>::begin_transaction(&mut other).await?;
        c.transaction(async |_| {
            Manager::<B>::commit_transaction(&mut other).await?;
            QueryResult::Ok(())
        })
        .await?;
        defer(r.hook("deferred-after-the-hiding-level-closed"));
        assert!(r.get().is_empty(), "nothing ran before COMMIT");
        QueryResult::Ok(())
    })
    .await
    .unwrap();
    assert!(!in_transaction());
    assert_eq!(
        rec.take(),
        [
            "first",
            "deferred-by-a-rollback-hook",
            "deferred-after-the-nested-level-ended",
            "deferred-after-the-hiding-level-closed",
            "deferred-in-before-commit",
        ]
    );
}

/// Hooks `defer`red in a closure wait in its scope while a nested closure of another
/// connection runs, even when that closure operates on the first connection: they still join
/// the level before its COMMIT and run after it.
async fn deferred_hooks_survive_another_connections_closure<B: Backend>() {
    let mut c = B::connect().await;
    let mut other = B::connect().await;
    let rec = Recorder::new();
    let r = rec.clone();
    c.transaction(async |c| {
        defer(r.hook("deferred"));
        other
            .transaction(async |_| {
                c.on_commit(r.hook("registered-inside-the-other-closure"));
                c.transaction(async |_| {
                    defer(r.hook("deferred-in-a-savepoint-inside-it"));
                    QueryResult::Ok(())
                })
                .await
            })
            .await?;
        QueryResult::Ok(())
    })
    .await
    .unwrap();
    let mut ran = rec.take();
    ran.sort();
    assert_eq!(
        ran,
        [
            "deferred",
            "deferred-in-a-savepoint-inside-it",
            "registered-inside-the-other-closure"
        ]
    );
}

/// A closure's level committed by raw manager calls made inside a nested closure of another
/// connection (so the closure's own scope did not see it end): a hook `defer`red in the
/// closure afterwards still settles with that level's fate, `Committed`, and runs, as soon as
/// the connection next looks.
async fn defer_after_the_level_ended_out_of_sight_takes_its_fate<B: Backend>() {
    use diesel_async::TransactionManager;
    type Manager<B> = <AsyncSignalConnection<B> as AsyncConnection>::TransactionManager;
    let mut c = B::connect().await;
    let mut other = B::connect().await;
    let tag = unique_tag("ended-out-of-sight");
    let rec = Recorder::new();
    let r = rec.clone();
    c.transaction(async |c| {
        B::exec(c, &insert(&tag, 1)).await?;
        other
            .transaction(async |_| {
                Manager::<B>::commit_transaction(c).await?;
                QueryResult::Ok(())
            })
            .await?;
        defer(r.hook("deferred-after-the-commit"));
        QueryResult::Ok(())
    })
    .await
    .unwrap();
    assert_eq!(rec.take(), ["deferred-after-the-commit"]);
    assert_eq!(c.transaction_depth(), 0);
    assert_eq!(B::count(&mut c, &tag).await, 1, "the raw COMMIT committed");
}

/// A raw `COMMIT` sent with `batch_execute` inside the closure ends the transaction behind the
/// wrapper: the next statement is refused, the closure's result is `TransactionAborted`, and
/// the hooks settle `Unknown` (no commit hook on a guess), as with `SignalConnection`. The
/// connection's next transaction is an ordinary one.
async fn raw_commit_sql_ends_the_transaction<B: Backend>() {
    use diesel_async::SimpleAsyncConnection;
    let mut c = B::connect().await;
    ordinary_transaction::<B>(&mut c).await;
    let tag = unique_tag("raw-commit");
    let rec = Recorder::new();
    let r = rec.clone();
    let result = c
        .transaction(async |c| {
            B::exec(c, &insert(&tag, 1)).await?;
            c.on_commit(r.hook("commit"));
            c.on_rollback(r.hook("rollback"));
            c.on_complete(r.outcome("complete"));
            c.batch_execute("COMMIT").await?; // behind the wrapper's back
            let refused = B::exec(c, &insert(&tag, 2)).await.unwrap_err();
            assert!(TransactionAborted::is(&refused), "{refused}");
            QueryResult::Ok(())
        })
        .await;
    assert!(
        matches!(&result, Err(e) if TransactionAborted::is(e)),
        "{result:?}"
    );
    assert_eq!(rec.take(), ["complete:Unknown"], "never a hook on a guess");
    assert_eq!(B::count(&mut c, &tag).await, 1, "the raw COMMIT committed");
    assert_eq!(c.transaction_depth(), 0);
    ordinary_transaction::<B>(&mut c).await;
}

/// The inner connection's own manager, reached through `inner_mut()`, commits the closure's
/// transaction: the wrapper sees the level gone when the closure returns (its hooks settle
/// `Unknown`, and it sends no COMMIT of its own); the next transaction is an ordinary one.
async fn inner_mut_manager_calls_are_seen<B: Backend>() {
    use diesel_async::TransactionManager;
    let mut c = B::connect().await;
    ordinary_transaction::<B>(&mut c).await;
    let tag = unique_tag("inner-mut-commit");
    let rec = Recorder::new();
    let r = rec.clone();
    c.transaction(async |c| {
        B::exec(c, &insert(&tag, 1)).await?;
        c.on_commit(r.hook("commit"));
        c.on_complete(r.outcome("complete"));
        <B as AsyncConnection>::TransactionManager::commit_transaction(c.inner_mut()).await?;
        QueryResult::Ok(())
    })
    .await
    .unwrap();
    assert_eq!(rec.take(), ["complete:Unknown"], "never a hook on a guess");
    assert_eq!(
        B::count(&mut c, &tag).await,
        1,
        "the inner manager committed"
    );
    assert_eq!(c.transaction_depth(), 0);
    ordinary_transaction::<B>(&mut c).await;
}

/// A transaction on `c` that must behave as any: its row commits, its commit hook runs. (Run
/// first, it also lets the wrapper learn the connection's status, as in a service's
/// steady state, where SQLite's is not read again.)
async fn ordinary_transaction<B: Backend>(c: &mut AsyncSignalConnection<B>) {
    let tag = unique_tag("ordinary");
    let rec = Recorder::new();
    let r = rec.clone();
    c.transaction(async |c| {
        B::exec(c, &insert(&tag, 1)).await?;
        c.on_commit(r.hook("commit"));
        QueryResult::Ok(())
    })
    .await
    .unwrap();
    assert_eq!(rec.take(), ["commit"]);
    assert_eq!(B::count(c, &tag).await, 1);
    assert_eq!(c.transaction_depth(), 0);
}

/// A `transaction` future dropped while its `before_commit` work is awaited: nothing was
/// committed, so no commit hook runs; the connection's next operation rolls the level back and
/// runs the rollback hooks, once.
async fn cancelled_before_commit<B: Backend>() {
    let mut c = B::connect().await;
    let tag = unique_tag("cancel-before-commit");
    let rec = Recorder::new();
    let r = rec.clone();
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
    {
        let fut = c.transaction(async |c| {
            B::exec(c, &insert(&tag, 1)).await?;
            c.on_commit(r.hook("commit"));
            c.on_rollback(r.hook("rollback"));
            c.before_commit(move |_| {
                Box::pin(async move {
                    entered_tx.send(()).unwrap();
                    std::future::pending::<QueryResult<()>>().await
                })
            })?;
            QueryResult::Ok(())
        });
        tokio::select! {
            _ = fut => panic!("the before_commit work never finishes"),
            _ = async { entered_rx.await.unwrap() } => {}
        }
    }
    assert!(
        rec.get().is_empty(),
        "nothing settles before the next operation"
    );
    c.roll_back_abandoned().await.unwrap();
    assert_eq!(rec.take(), ["rollback"]);
    assert_eq!(c.transaction_depth(), 0);
    assert_eq!(B::count(&mut c, &tag).await, 0, "the work was rolled back");
    c.transaction(async |_| QueryResult::Ok(())).await.unwrap();
    assert!(rec.take().is_empty(), "settled once");
}

/// Pre-commit work offered while the outermost COMMIT is in flight (from an `Instrumentation`
/// callback) is refused, as in sync: it could never run inside that transaction, and is never
/// accepted and lost.
async fn pre_commit_work_offered_while_commit_is_in_flight_is_refused<B: Backend>() {
    use diesel::connection::InstrumentationEvent;
    use diesel_transaction_signals::{defer_before_commit, DeferError};
    use std::sync::Mutex;
    let mut c = B::connect().await;
    let seen: Arc<Mutex<Vec<Result<(), DeferError>>>> = Arc::default();
    let s = seen.clone();
    c.set_instrumentation(move |event: InstrumentationEvent<'_>| {
        if let InstrumentationEvent::CommitTransaction { depth, .. } = event {
            if depth.get() == 1 {
                s.lock().unwrap().push(defer_before_commit(|_| Ok(())));
            }
        }
    });
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    c.transaction(async |_| {
        defer_before_commit(move |_| {
            r.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        QueryResult::Ok(())
    })
    .await
    .unwrap();
    assert_eq!(
        AtomicUsize::load(&ran, Ordering::SeqCst),
        1,
        "offered in time, it ran"
    );
    // `SyncConnectionWrapper` runs SQLite's COMMIT, and the callback with it, on a blocking
    // thread, outside the task: no transaction is open there.
    let why = if std::any::TypeId::of::<B>() == std::any::TypeId::of::<Sqlite>() {
        DeferError::NoTransaction
    } else {
        DeferError::CommitInFlight
    };
    assert_eq!(*seen.lock().unwrap(), [Err(why)]);
}

/// A `transaction` future dropped inside its closure after `defer!`s: the deferred commit
/// hooks never run, and the hooks registered after them on the connection are settled with the
/// abandoned level's rollback, once.
async fn cancelled_after_defer<B: Backend>() {
    let mut c = B::connect().await;
    let rec = Recorder::new();
    let r = rec.clone();
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
    {
        let fut = c.transaction(async |c| {
            defer(r.hook("deferred-commit"));
            c.on_complete(r.outcome("complete"));
            defer(r.hook("deferred-commit-2"));
            entered_tx.send(()).unwrap();
            std::future::pending::<QueryResult<()>>().await
        });
        tokio::select! {
            _ = fut => panic!("the closure never returns"),
            _ = async { entered_rx.await.unwrap() } => {}
        }
    }
    c.transaction(async |_| QueryResult::Ok(())).await.unwrap();
    assert_eq!(rec.take(), ["complete:RolledBack"]);
    c.transaction(async |_| QueryResult::Ok(())).await.unwrap();
    assert!(
        rec.take().is_empty(),
        "the deferred hooks are gone for good"
    );
}

/// `on_commit_async` futures are awaited in order after COMMIT, before `transaction` returns;
/// a rolled back transaction drops them unpolled.
async fn commit_async_hooks_are_awaited<B: Backend>() {
    let mut c = B::connect().await;
    let rec = Recorder::new();
    let r = rec.clone();
    c.transaction(async |c| {
        c.on_commit(r.hook("sync"));
        let r1 = r.clone();
        c.on_commit_async(async move {
            tokio::task::yield_now().await;
            r1.push("async-1");
        });
        let r2 = r.clone();
        c.on_commit_async(async move { r2.push("async-2") });
        QueryResult::Ok(())
    })
    .await
    .unwrap();
    assert_eq!(rec.take(), ["sync", "async-1", "async-2"]);
    let r = rec.clone();
    let _ = c
        .transaction(async |c| {
            c.on_commit_async(async move { r.push("never") });
            Err::<(), _>(Error::RollbackTransaction)
        })
        .await;
    assert!(rec.take().is_empty());
}

/// Async `before_commit` work runs inside the transaction with the connection; its `Err`
/// rolls the transaction back and is returned.
async fn before_commit_runs_inside<B: Backend>() {
    let mut c = B::connect().await;
    let tag = unique_tag("before");
    let rec = Recorder::new();
    let r = rec.clone();
    let t = tag.clone();
    c.transaction(async |c| {
        c.on_commit(r.hook("commit"));
        c.before_commit(move |c| {
            Box::pin(async move {
                B::exec(c, &insert(&t, 7)).await?;
                Ok(())
            })
        })?;
        QueryResult::Ok(())
    })
    .await
    .unwrap();
    assert_eq!(B::count(&mut c, &tag).await, 1, "written before COMMIT");
    assert_eq!(rec.take(), ["commit"]);

    let tag2 = unique_tag("before-refused");
    let r = rec.clone();
    let t = tag2.clone();
    let result = c
        .transaction(async |c| {
            B::exec(c, &insert(&t, 1)).await?;
            c.on_commit(r.hook("commit"));
            c.on_rollback(r.hook("rollback"));
            c.before_commit(|_| Box::pin(async { Err(Error::NotFound) }))?;
            QueryResult::Ok(())
        })
        .await;
    assert!(matches!(result, Err(Error::NotFound)));
    assert_eq!(rec.take(), ["rollback"]);
    assert_eq!(B::count(&mut c, &tag2).await, 0);
}

/// A transaction future dropped inside its closure (a timeout): no commit hook ever runs; the
/// connection's next operation rolls the work back and runs the rollback hooks once; statements
/// in between are refused rather than run inside the dangling transaction.
async fn cancelled_inside_the_closure<B: Backend>() {
    let mut c = B::connect().await;
    let tag = unique_tag("cancel");
    let rec = Recorder::new();
    let r = rec.clone();
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
    let timed_out = {
        let fut = c.transaction(async |c| {
            B::exec(c, &insert(&tag, 1)).await?;
            c.on_commit(r.hook("commit"));
            c.on_rollback(r.hook("rollback"));
            entered_tx.send(()).unwrap();
            std::future::pending::<QueryResult<()>>().await
        });
        tokio::select! {
            result = fut => Some(result),
            _ = async { entered_rx.await.unwrap() } => None,
        }
    };
    assert!(timed_out.is_none(), "the transaction future was dropped");
    assert!(
        rec.get().is_empty(),
        "nothing settles before the next operation"
    );
    let refused = B::exec(&mut c, "SELECT 1").await;
    assert!(
        matches!(&refused, Err(e) if TransactionAborted::is(e)),
        "{refused:?}"
    );
    // The next transaction rolls the abandoned one back first.
    c.transaction(async |_| QueryResult::Ok(())).await.unwrap();
    assert_eq!(rec.take(), ["rollback"]);
    assert_eq!(B::count(&mut c, &tag).await, 0, "the work was rolled back");
    assert_eq!(c.transaction_depth(), 0);
}

/// A panic inside the closure: as in sync, the level is rolled back (its rollback hooks run)
/// before the panic continues, and the connection stays usable.
async fn panic_inside_the_closure<B: Backend>() {
    let mut c = B::connect().await;
    let tag = unique_tag("panic");
    let rec = Recorder::new();
    let r = rec.clone();
    let result = {
        let fut = c.transaction(async |c| {
            B::exec(c, &insert(&tag, 1)).await?;
            c.on_commit(r.hook("commit"));
            c.on_rollback(r.hook("rollback"));
            if r.get().is_empty() {
                panic!("boom");
            }
            QueryResult::Ok(())
        });
        futures_catch(fut).await
    };
    assert!(result.is_err(), "the closure panicked");
    assert_eq!(
        rec.take(),
        ["rollback"],
        "before the panic reached the caller"
    );
    assert_eq!(c.transaction_depth(), 0);
    assert_eq!(B::count(&mut c, &tag).await, 0);
}

/// Polls `fut` to completion, catching a panic (`AssertUnwindSafe` inside a future).
async fn futures_catch<F: Future>(fut: F) -> Result<F::Output, ()> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(_) => std::task::Poll::Ready(Err(())),
        }
    })
    .await
}

/// A statement's error swallowed inside the closure: on PostgreSQL the transaction is aborted
/// and diesel-async's COMMIT would return `Ok`; the wrapper returns `TransactionAborted`, runs
/// the rollback hooks and no commit hook. On SQLite and MariaDB a failed statement leaves the
/// transaction usable, and it commits.
async fn swallowed_statement_error<B: Backend>(aborts: bool) {
    let mut c = B::connect().await;
    let tag = unique_tag("swallowed");
    let rec = Recorder::new();
    let r = rec.clone();
    let result = c
        .transaction(async |c| {
            B::exec(c, &insert(&tag, 1)).await?;
            c.on_commit(r.hook("commit"));
            c.on_rollback(r.hook("rollback"));
            assert!(B::exec(c, B::FAILING).await.is_err());
            QueryResult::Ok(())
        })
        .await;
    if aborts {
        assert!(
            matches!(&result, Err(e) if TransactionAborted::is(e)),
            "{result:?}"
        );
        assert_eq!(rec.take(), ["rollback"]);
        assert_eq!(B::count(&mut c, &tag).await, 0);
    } else {
        result.unwrap();
        assert_eq!(rec.take(), ["commit"]);
        assert_eq!(B::count(&mut c, &tag).await, 1);
    }
}

/// PostgreSQL: an error inside a savepoint that is rolled back leaves the outer transaction
/// healthy, and it commits.
async fn savepoint_clears_an_aborted_transaction<B: Backend>() {
    let mut c = B::connect().await;
    let tag = unique_tag("sp-clear");
    let rec = Recorder::new();
    let r = rec.clone();
    c.transaction(async |c| {
        B::exec(c, &insert(&tag, 1)).await?;
        c.on_commit(r.hook("commit"));
        let inner = c
            .transaction(async |c| {
                c.on_rollback(r.hook("inner-rollback"));
                B::exec(c, B::FAILING).await?;
                QueryResult::Ok(())
            })
            .await;
        assert!(inner.is_err());
        // A savepoint whose closure swallowed the error: RELEASE is refused, the savepoint is
        // rolled back, the outer transaction is still healthy.
        let inner = c
            .transaction(async |c| {
                let _ = B::exec(c, B::FAILING).await;
                QueryResult::Ok(())
            })
            .await;
        assert!(inner.is_err(), "an aborted savepoint does not release");
        B::exec(c, &insert(&tag, 2)).await?;
        QueryResult::Ok(())
    })
    .await
    .unwrap();
    assert_eq!(rec.take(), ["inner-rollback", "commit"]);
    assert_eq!(B::count(&mut c, &tag).await, 2);
}

/// `begin_test_transaction`: hooks never run, and the level is not a reason for a pool to
/// discard the connection.
async fn test_transaction_runs_no_hooks<B: Backend>() {
    let mut c = B::connect().await;
    let rec = Recorder::new();
    c.begin_test_transaction().await.unwrap();
    let r = rec.clone();
    c.transaction(async |c| {
        c.on_commit(r.hook("inner-commit"));
        QueryResult::Ok(())
    })
    .await
    .unwrap();
    assert!(rec.get().is_empty(), "the test transaction never commits");
    drop(c);
    assert!(rec.get().is_empty(), "its hooks are discarded, not run");
}

/// The pool: a connection whose transaction future was dropped is discarded, never handed
/// out with the transaction open (pool of size 1, so a dirty connection would show at once).
async fn deadpool_never_hands_out_an_open_transaction<B>()
where
    B: Backend + diesel_async::pooled_connection::PoolableConnection + Send,
    diesel::dsl::select<diesel::dsl::AsExprOf<i32, diesel::sql_types::Integer>>:
        for<'a> diesel_async::methods::LoadQuery<'a, AsyncSignalConnection<B>, i32>,
    diesel::query_builder::SqlQuery: diesel_async::methods::ExecuteDsl<AsyncSignalConnection<B>>,
    <B as diesel_async::AsyncConnectionCore>::Backend: diesel::backend::DieselReserveSpecialization,
{
    use diesel_async::pooled_connection::deadpool::{Object, Pool};
    use diesel_async::pooled_connection::AsyncDieselConnectionManager;
    let url = B::url();
    drop(B::connect_to(&url).await); // the table exists
    let manager = AsyncDieselConnectionManager::<AsyncSignalConnection<B>>::new(url);
    let pool = Pool::builder(manager).max_size(1).build().unwrap();
    let tag = unique_tag("pool");
    let rec = Recorder::new();
    let first_id;
    {
        let mut conn = pool.get().await.unwrap();
        first_id = conn.id();
        let r = rec.clone();
        let t = tag.clone();
        let timed_out = tokio::time::timeout(
            Duration::from_millis(200),
            conn.transaction(async |c: &mut Object<AsyncSignalConnection<B>>| {
                B::exec(&mut **c, &insert(&t, 1)).await?;
                c.on_commit(r.hook("commit"));
                c.on_rollback(r.hook("rollback"));
                std::future::pending::<QueryResult<()>>().await
            }),
        )
        .await;
        assert!(timed_out.is_err());
    }
    let mut conn = pool.get().await.unwrap();
    assert_ne!(conn.id(), first_id, "the dirty connection was discarded");
    assert_eq!(conn.transaction_depth(), 0);
    assert_eq!(
        rec.take(),
        ["rollback"],
        "its rollback hooks ran once, at discard"
    );
    assert_eq!(B::count(&mut conn, &tag).await, 0);
    // A committed transaction through the pool object's own `transaction` runs its hooks,
    // including `defer!` (the manager registers the level for this task).
    let r = rec.clone();
    conn.transaction(async |c: &mut Object<AsyncSignalConnection<B>>| {
        B::exec(&mut **c, &insert(&tag, 2)).await?;
        defer(r.hook("deferred"));
        QueryResult::Ok(())
    })
    .await
    .unwrap();
    assert_eq!(rec.take(), ["deferred"]);
    assert_eq!(B::count(&mut conn, &tag).await, 1);
}

/// bb8 checks a connection when it is returned: one left with its transaction open (here, a
/// transaction future dropped by a timeout) is dropped then, and its rollback hooks run at
/// once; the alias of `async_pool::manager_config` is on every checkout.
async fn bb8_never_hands_out_an_open_transaction<B>()
where
    B: Backend + diesel_async::pooled_connection::PoolableConnection + Send,
    diesel::dsl::select<diesel::dsl::AsExprOf<i32, diesel::sql_types::Integer>>:
        for<'a> diesel_async::methods::LoadQuery<'a, AsyncSignalConnection<B>, i32>,
    diesel::query_builder::SqlQuery: diesel_async::methods::ExecuteDsl<AsyncSignalConnection<B>>,
    <B as diesel_async::AsyncConnectionCore>::Backend: diesel::backend::DieselReserveSpecialization,
{
    use diesel_async::pooled_connection::bb8::Pool;
    use diesel_async::pooled_connection::AsyncDieselConnectionManager;
    use diesel_transaction_signals::async_pool;
    let url = B::url();
    drop(B::connect_to(&url).await);
    let manager = AsyncDieselConnectionManager::<AsyncSignalConnection<B>>::new_with_config(
        url,
        async_pool::manager_config("bb8-primary"),
    );
    let pool = Pool::builder().max_size(1).build(manager).await.unwrap();
    let tag = unique_tag("bb8");
    let rec = Recorder::new();
    let first_id;
    {
        let mut conn = pool.get().await.unwrap();
        assert_eq!(conn.alias(), Some("bb8-primary"));
        conn.set_alias("renamed-by-a-user");
        first_id = conn.id();
        let r = rec.clone();
        let t = tag.clone();
        let timed_out = tokio::time::timeout(
            Duration::from_millis(200),
            (*conn).transaction(async |c| {
                B::exec(c, &insert(&t, 1)).await?;
                c.on_commit(r.hook("commit"));
                c.on_rollback(r.hook("rollback"));
                std::future::pending::<QueryResult<()>>().await
            }),
        )
        .await;
        assert!(timed_out.is_err());
    }
    assert_eq!(
        rec.take(),
        ["rollback"],
        "dropped on return, hooks settled once"
    );
    let mut conn = pool.get().await.unwrap();
    assert_ne!(conn.id(), first_id);
    assert_eq!(conn.alias(), Some("bb8-primary"));
    assert_eq!(B::count(&mut conn, &tag).await, 0);
    // A clean connection is kept, and its alias is reset at the next checkout.
    let id = conn.id();
    conn.set_alias("renamed-again");
    drop(conn);
    let conn = pool.get().await.unwrap();
    assert_eq!(conn.id(), id, "a clean connection is reused");
    assert_eq!(conn.alias(), Some("bb8-primary"));
}

macro_rules! scenarios {
    ($($backend:ident: $ty:ty, aborts = $aborts:expr;)*) => {$(
        mod $backend {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn commit_runs_commit_hooks() { super::commit_runs_commit_hooks::<$ty>().await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn error_rolls_back() { super::error_rolls_back::<$ty>().await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn savepoint_rollback_keeps_the_outer_level() {
                super::savepoint_rollback_keeps_the_outer_level::<$ty>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn defer_follows_the_task() { super::defer_follows_the_task::<$ty>().await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn defer_never_crosses_tasks() { super::defer_never_crosses_tasks::<$ty>().await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn defer_takes_the_innermost_level() {
                super::defer_takes_the_innermost_level::<$ty>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn defer_follows_the_level_through_every_phase() {
                super::defer_follows_the_level_through_every_phase::<$ty>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn deferred_hooks_survive_another_connections_closure() {
                super::deferred_hooks_survive_another_connections_closure::<$ty>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn defer_after_the_level_ended_out_of_sight_takes_its_fate() {
                super::defer_after_the_level_ended_out_of_sight_takes_its_fate::<$ty>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn raw_commit_sql_ends_the_transaction() {
                super::raw_commit_sql_ends_the_transaction::<$ty>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn inner_mut_manager_calls_are_seen() {
                super::inner_mut_manager_calls_are_seen::<$ty>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cancelled_before_commit() { super::cancelled_before_commit::<$ty>().await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pre_commit_work_offered_while_commit_is_in_flight_is_refused() {
                super::pre_commit_work_offered_while_commit_is_in_flight_is_refused::<$ty>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cancelled_after_defer() { super::cancelled_after_defer::<$ty>().await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn commit_async_hooks_are_awaited() {
                super::commit_async_hooks_are_awaited::<$ty>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn before_commit_runs_inside() { super::before_commit_runs_inside::<$ty>().await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cancelled_inside_the_closure() {
                super::cancelled_inside_the_closure::<$ty>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn panic_inside_the_closure() { super::panic_inside_the_closure::<$ty>().await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn swallowed_statement_error() {
                super::swallowed_statement_error::<$ty>($aborts).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn test_transaction_runs_no_hooks() {
                super::test_transaction_runs_no_hooks::<$ty>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn deadpool_never_hands_out_an_open_transaction() {
                super::deadpool_never_hands_out_an_open_transaction::<$ty>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn bb8_never_hands_out_an_open_transaction() {
                super::bb8_never_hands_out_an_open_transaction::<$ty>().await
            }
            /// `#[tokio::test]`'s default runtime runs the body outside any task: `defer!`
            /// falls back to the thread, and a spawned task on the same thread does not see it.
            #[tokio::test]
            async fn defer_in_a_current_thread_body() {
                let mut c = <$ty as Backend>::connect().await;
                let rec = Recorder::new();
                let r = rec.clone();
                c.transaction(async |_| {
                    defer(r.hook("body"));
                    let s = r.clone();
                    tokio::spawn(async move { defer(s.hook("spawned")) }).await.unwrap();
                    assert_eq!(r.get(), ["spawned"]);
                    QueryResult::Ok(())
                })
                .await
                .unwrap();
                assert_eq!(rec.take(), ["spawned", "body"]);
            }
        }
    )*};
}

scenarios! {
    sqlite: Sqlite, aborts = false;
    postgres: AsyncPgConnection, aborts = true;
    mysql: AsyncMysqlConnection, aborts = false;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_savepoint_clears_an_aborted_transaction() {
    savepoint_clears_an_aborted_transaction::<AsyncPgConnection>().await
}

/// SQLite's `INSERT OR ROLLBACK` ends the whole transaction on the server: the wrapper learns
/// it at the next transaction operation; the commit returns `TransactionAborted`, the rollback
/// hooks run and no commit hook does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_insert_or_rollback_ends_the_transaction() {
    let mut c = Sqlite::connect().await;
    let tag = unique_tag("or-rollback");
    Sqlite::exec(
        &mut c,
        "CREATE TABLE IF NOT EXISTS async_unique (k INTEGER PRIMARY KEY)",
    )
    .await
    .unwrap();
    Sqlite::exec(&mut c, "INSERT OR IGNORE INTO async_unique VALUES (1)")
        .await
        .unwrap();
    let rec = Recorder::new();
    let r = rec.clone();
    let result = c
        .transaction(async |c| {
            Sqlite::exec(c, &insert(&tag, 1)).await?;
            c.on_commit(r.hook("commit"));
            c.on_rollback(r.hook("rollback"));
            let _ = Sqlite::exec(c, "INSERT OR ROLLBACK INTO async_unique VALUES (1)").await;
            QueryResult::Ok(())
        })
        .await;
    assert!(
        matches!(&result, Err(e) if TransactionAborted::is(e)),
        "{result:?}"
    );
    assert_eq!(rec.take(), ["rollback"]);
    assert_eq!(Sqlite::count(&mut c, &tag).await, 0);
}

/// The process-wide signals fire for async connections too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_fire_for_async_connections() {
    use diesel_transaction_signals::signals::POST_COMMIT;
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    let mut c = Sqlite::connect().await.with_alias("async-signals");
    let id = c.id();
    let receiver = POST_COMMIT.connect(move |event| {
        if event.connection() == id {
            assert_eq!(event.outcome(), Some(Outcome::Committed));
            assert_eq!(event.alias(), Some("async-signals"));
            SEEN.fetch_add(1, Ordering::SeqCst);
        }
    });
    c.transaction(async |_| QueryResult::Ok(())).await.unwrap();
    POST_COMMIT.disconnect(receiver);
    assert_eq!(AtomicUsize::load(&SEEN, Ordering::SeqCst), 1);
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pid: i32,
}

/// PostgreSQL: the server ends the connection mid-transaction (`pg_terminate_backend`); the
/// closure swallows the error. Nothing committed: the rollback hooks run, no commit hook, the
/// commit returns an error and the connection reports itself broken to pools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connection_lost_mid_transaction() {
    let mut c = AsyncPgConnection::connect().await;
    let mut killer = AsyncPgConnection::connect().await;
    let tag = unique_tag("lost");
    let rec = Recorder::new();
    let r = rec.clone();
    let result = c
        .transaction(async |c| {
            AsyncPgConnection::exec(c, &insert(&tag, 1)).await?;
            c.on_commit(r.hook("commit"));
            c.on_rollback(r.hook("rollback"));
            let pid = diesel::sql_query("SELECT pg_backend_pid() AS pid")
                .get_result::<Pid>(c)
                .await?
                .pid;
            diesel::sql_query(format!("SELECT pg_terminate_backend({pid})"))
                .execute(&mut killer)
                .await?;
            let lost = AsyncPgConnection::exec(c, "SELECT 1").await;
            assert!(lost.is_err(), "the server closed the connection");
            QueryResult::Ok(())
        })
        .await;
    assert!(result.is_err(), "{result:?}");
    assert_eq!(rec.take(), ["rollback"]);
    assert!(diesel_async::pooled_connection::PoolableConnection::is_broken(&mut c));
    assert_eq!(AsyncPgConnection::count(&mut killer, &tag).await, 0);
}

/// MariaDB: the deadlock victim's transaction is rolled back by the server. The wrapper learns
/// it from the error: the victim's later statements are refused, its commit returns
/// `TransactionAborted`, its rollback hooks run; the other transaction commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_deadlock_victim_settles_rolled_back() {
    let tag = unique_tag("deadlock");
    let mut setup = AsyncMysqlConnection::connect().await;
    AsyncMysqlConnection::exec(
        &mut setup,
        "CREATE TABLE IF NOT EXISTS async_locks (k VARCHAR(100) PRIMARY KEY, v INT NOT NULL) ENGINE=InnoDB",
    )
    .await
    .unwrap();
    for side in ["a", "b"] {
        AsyncMysqlConnection::exec(
            &mut setup,
            &format!("INSERT INTO async_locks (k, v) VALUES ('{tag}-{side}', 0)"),
        )
        .await
        .unwrap();
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let rec = Recorder::new();
    let mut tasks = Vec::new();
    for (mine, theirs) in [("a", "b"), ("b", "a")] {
        let (barrier, r, tag) = (Arc::clone(&barrier), rec.clone(), tag.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = AsyncMysqlConnection::connect().await;
            let mut victim = false;
            let result = c
                .transaction(async |c| {
                    c.on_commit(r.hook(format!("{mine}-commit")));
                    c.on_rollback(r.hook(format!("{mine}-rollback")));
                    let lock =
                        |k: &str| format!("UPDATE async_locks SET v = v + 1 WHERE k = '{tag}-{k}'");
                    AsyncMysqlConnection::exec(c, &lock(mine)).await?;
                    barrier.wait().await;
                    if let Err(e) = AsyncMysqlConnection::exec(c, &lock(theirs)).await {
                        assert!(e.to_string().starts_with("Deadlock found"), "{e}");
                        victim = true;
                        let refused = AsyncMysqlConnection::exec(c, "SELECT 1").await;
                        assert!(
                            matches!(&refused, Err(e) if TransactionAborted::is(e)),
                            "{refused:?}"
                        );
                    }
                    QueryResult::Ok(())
                })
                .await;
            (mine, victim, result.map_err(|e| TransactionAborted::is(&e)))
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    let victims: Vec<_> = outcomes.iter().filter(|(_, v, _)| *v).collect();
    assert_eq!(victims.len(), 1, "{outcomes:?}");
    let (victim, _, result) = victims[0];
    assert_eq!(
        *result,
        Err(true),
        "the victim's commit returns TransactionAborted"
    );
    let winner = if *victim == "a" { "b" } else { "a" };
    let mut seen = rec.take();
    seen.sort();
    let mut expected = vec![format!("{victim}-rollback"), format!("{winner}-commit")];
    expected.sort();
    assert_eq!(seen, expected);
}

/// `capture_hooks` in a test transaction: the hooks are taken unrun, and run on demand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_hooks_in_a_test_transaction() {
    let mut c = Sqlite::connect().await;
    c.begin_test_transaction().await.unwrap();
    let rec = Recorder::new();
    let r = rec.clone();
    let (n, hooks) = c
        .capture_hooks(async |c| {
            c.on_commit(r.hook("commit"));
            defer(r.hook("deferred"));
            c.transaction(async |c| {
                c.on_commit(r.hook("released"));
                QueryResult::Ok(())
            })
            .await
            .unwrap();
            7
        })
        .await
        .unwrap();
    assert_eq!(n, 7);
    assert_eq!(hooks.len(), 3);
    assert!(rec.get().is_empty());
    hooks.run_as_committed();
    assert_eq!(rec.take(), ["commit", "deferred", "released"]);
    let mut plain = Sqlite::connect().await;
    assert!(matches!(
        plain.capture_hooks(async |_| ()).await,
        Err(Error::NotInTransaction)
    ));
}

/// Migrations run through diesel-async's harness on the wrapper; on MariaDB, whose DDL commits
/// implicitly, the wrapper follows the server (statements after the implicit commit run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_through_the_async_harness() {
    use diesel_async::AsyncMigrationHarness;
    use diesel_migrations::MigrationHarness;

    let sqlite = AsyncSignalConnection::<Sqlite>::establish(&sqlite_url())
        .await
        .unwrap();
    let mut harness = AsyncMigrationHarness::new(sqlite);
    let applied = harness
        .run_pending_migrations(common::SQLITE_MIGRATIONS)
        .unwrap();
    assert!(!applied.is_empty());
    let mut sqlite = harness.into_inner();
    assert_eq!(sqlite.transaction_depth(), 0);
    Sqlite::exec(
        &mut sqlite,
        "INSERT INTO items (tag, v) VALUES ('migrated', 1)",
    )
    .await
    .unwrap();

    let db = unique_tag("async_mig").replace('-', "_");
    let mut admin = AsyncMysqlConnection::connect().await;
    AsyncMysqlConnection::exec(&mut admin, &format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let url = common::mysql_url();
    let url = format!("{}/{db}", &url[..url.rfind('/').unwrap()]);
    let mysql = AsyncSignalConnection::<AsyncMysqlConnection>::establish(&url)
        .await
        .unwrap();
    let mut harness = AsyncMigrationHarness::new(mysql);
    let applied = harness
        .run_pending_migrations(common::MYSQL_MIGRATIONS)
        .unwrap();
    assert!(!applied.is_empty());
    let mut mysql = harness.into_inner();
    assert_eq!(mysql.transaction_depth(), 0);
    AsyncMysqlConnection::exec(
        &mut mysql,
        "INSERT INTO items (tag, v) VALUES ('migrated', 1)",
    )
    .await
    .unwrap();
    AsyncMysqlConnection::exec(&mut admin, &format!("DROP DATABASE {db}"))
        .await
        .unwrap();
}

/// Diesel's instrumentation sees the same events through the wrapper as through the plain
/// connection: the wrapper sends no query of its own on the common path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instrumentation_events_are_the_plain_connections() {
    use diesel::connection::{Instrumentation, InstrumentationEvent};
    use std::sync::Mutex;

    fn recorder() -> (Arc<Mutex<Vec<String>>>, impl Instrumentation) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&events);
        (events, move |event: InstrumentationEvent<'_>| {
            let text = match event {
                InstrumentationEvent::StartQuery { query, .. } => format!("start {query}"),
                InstrumentationEvent::FinishQuery { query, error, .. } => {
                    format!("finish {query} {}", error.is_some())
                }
                InstrumentationEvent::BeginTransaction { depth, .. } => format!("begin {depth}"),
                InstrumentationEvent::CommitTransaction { depth, .. } => format!("commit {depth}"),
                InstrumentationEvent::RollbackTransaction { depth, .. } => {
                    format!("rollback {depth}")
                }
                _ => return,
            };
            sink.lock().unwrap().push(text);
        })
    }

    async fn work<C>(c: &mut C)
    where
        C: AsyncConnection<Backend = diesel::sqlite::Sqlite> + 'static,
    {
        c.transaction(async |c| {
            diesel::sql_query("CREATE TABLE IF NOT EXISTS inst (v INTEGER)")
                .execute(c)
                .await?;
            let _ = c
                .transaction(async |c| {
                    diesel::sql_query("INSERT INTO inst VALUES (1)")
                        .execute(c)
                        .await?;
                    Err::<(), _>(Error::RollbackTransaction)
                })
                .await;
            diesel::sql_query("INSERT INTO inst VALUES (2)")
                .execute(c)
                .await?;
            QueryResult::Ok(())
        })
        .await
        .unwrap();
    }

    let mut plain = Sqlite::establish(":memory:").await.unwrap();
    let (plain_events, inst) = recorder();
    plain.set_instrumentation(inst);
    work(&mut plain).await;

    let mut wrapped = AsyncSignalConnection::<Sqlite>::establish(":memory:")
        .await
        .unwrap();
    let (wrapped_events, inst) = recorder();
    wrapped.set_instrumentation(inst);
    work(&mut wrapped).await;

    let plain_events = plain_events.lock().unwrap().clone();
    assert!(plain_events.len() >= 8, "{plain_events:?}");
    assert_eq!(*wrapped_events.lock().unwrap(), plain_events);
}

/// A `PRE_COMMIT` veto refuses an async commit as it does a sync one: rolled back, the veto
/// returned, rollback hooks run; `POST_ROLLBACK` fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_commit_veto_rolls_an_async_transaction_back() {
    use diesel_transaction_signals::signals::{Veto, POST_ROLLBACK, PRE_COMMIT};
    let mut c = Sqlite::connect().await.with_alias("async-veto");
    let id = c.id();
    let _veto = PRE_COMMIT.connect_guard(move |e| {
        if e.connection() == id {
            Err(Veto::new("read-only for this test"))
        } else {
            Ok(())
        }
    });
    let rolled_back = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&rolled_back);
    let _post = POST_ROLLBACK.connect_guard(move |e| {
        if e.connection() == id {
            seen.fetch_add(1, Ordering::SeqCst);
        }
    });
    let tag = unique_tag("veto");
    let rec = Recorder::new();
    let r = rec.clone();
    let result = c
        .transaction(async |c| {
            Sqlite::exec(c, &insert(&tag, 1)).await?;
            c.on_commit(r.hook("commit"));
            c.on_rollback(r.hook("rollback"));
            QueryResult::Ok(())
        })
        .await;
    let err = result.unwrap_err();
    assert_eq!(
        Veto::from_error(&err).map(|v| v.message().to_owned()),
        Some("read-only for this test".to_owned())
    );
    assert_eq!(rec.take(), ["rollback"]);
    assert_eq!(AtomicUsize::load(&rolled_back, Ordering::SeqCst), 1);
    assert_eq!(Sqlite::count(&mut c, &tag).await, 0);
}

/// The caller's future dropped after COMMIT while `on_commit_async` futures are pending: the one
/// being awaited and the rest go on in a spawned task, in order, each with an info line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_async_hooks_survive_a_dropped_caller() {
    use tokio::sync::oneshot;
    let logs = common::logger();
    let mut c = Sqlite::connect()
        .await
        .with_alias("async-dropped-after-commit");
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let rec = Recorder::new();
    let (r1, r2) = (rec.clone(), rec.clone());
    {
        let fut = c.transaction(async |c| {
            c.on_commit_async(async move {
                started_tx.send(()).unwrap();
                release_rx.await.unwrap();
                r1.push("first");
            });
            c.on_commit_async(async move {
                r2.push("second");
                done_tx.send(()).unwrap();
            });
            QueryResult::Ok(())
        });
        tokio::select! {
            _ = fut => panic!("the first future is still pending"),
            started = started_rx => started.unwrap(),
        }
    }
    assert!(rec.get().is_empty());
    assert_eq!(c.transaction_depth(), 0, "committed before the futures ran");
    release_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), done_rx)
        .await
        .expect("the spawned futures finished")
        .unwrap();
    assert_eq!(rec.take(), ["first", "second"]);
    let lines = logs.matching(
        log::Level::Info,
        &["on_commit_async", "spawned", "(async-dropped-after-commit)"],
    );
    assert_eq!(lines.len(), 2, "{lines:?}");
}

/// The transaction future dropped while COMMIT is in flight: only the server knows whether it
/// committed, so the hooks settle `Unknown` (no commit hook, no rollback hook, `on_complete`
/// gets `Unknown`), as in sync. SQLite's COMMIT runs on a blocking thread; a reader holding a
/// shared lock on the file keeps it waiting there (busy timeout) until the test has stopped
/// polling the future.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_while_commit_is_in_flight_settles_unknown() {
    use diesel::connection::{InstrumentationEvent, SimpleConnection};
    use diesel_async::SimpleAsyncConnection;
    use std::sync::Mutex;

    let url = sqlite_url();
    let mut c = Sqlite::connect_to(&url).await;
    c.batch_execute("PRAGMA busy_timeout = 30000")
        .await
        .unwrap();
    let mut reader = <SqliteConnection as diesel::Connection>::establish(&url).unwrap();
    reader
        .batch_execute("BEGIN; SELECT COUNT(*) FROM async_rows;")
        .unwrap();
    let (at_commit_tx, at_commit_rx) = tokio::sync::oneshot::channel::<()>();
    let at_commit = Mutex::new(Some(at_commit_tx));
    c.set_instrumentation(move |event: InstrumentationEvent<'_>| {
        if let InstrumentationEvent::CommitTransaction { .. } = event {
            if let Some(tx) = at_commit.lock().unwrap().take() {
                let _ = tx.send(());
            }
        }
    });
    let tag = unique_tag("in-flight");
    let rec = Recorder::new();
    let r = rec.clone();
    {
        let fut = c.transaction(async |c| {
            Sqlite::exec(c, &insert(&tag, 1)).await?;
            c.on_commit(r.hook("commit"));
            c.on_rollback(r.hook("rollback"));
            c.on_complete(r.outcome("complete"));
            QueryResult::Ok(())
        });
        let mut fut = std::pin::pin!(fut);
        tokio::select! {
            _ = &mut fut => panic!("COMMIT waits for the reader's lock"),
            at = at_commit_rx => at.unwrap(),
        }
        // The future is not polled any more: let COMMIT go on, then drop the future (its drop
        // waits for the blocking thread).
        reader.batch_execute("COMMIT").unwrap();
    }
    assert_eq!(rec.take(), ["complete:Unknown"]);
    assert_eq!(c.transaction_depth(), 0);
}

/// PostgreSQL: the connection is lost while COMMIT is in flight (the server ends the backend
/// from a `PRE_COMMIT` receiver, the last moment before COMMIT is sent). Only the server knows
/// whether it committed: the hooks settle `Unknown`, as in sync; `transaction` returns an error
/// and the connection reports itself broken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connection_lost_during_commit_settles_unknown() {
    use diesel_transaction_signals::signals::PRE_COMMIT;
    use std::sync::atomic::AtomicI32;
    let mut c = AsyncPgConnection::connect().await;
    let id = c.id();
    let pid = Arc::new(AtomicI32::new(0));
    let target = Arc::clone(&pid);
    let _kill = PRE_COMMIT.connect_guard(move |e| {
        if e.connection() == id {
            let mut killer =
                <diesel::PgConnection as diesel::Connection>::establish(&common::pg_url()).unwrap();
            diesel::RunQueryDsl::execute(
                diesel::sql_query(format!(
                    "SELECT pg_terminate_backend({})",
                    AtomicI32::load(&target, Ordering::SeqCst)
                )),
                &mut killer,
            )
            .unwrap();
        }
        Ok(())
    });
    let tag = unique_tag("lost-commit");
    let rec = Recorder::new();
    let r = rec.clone();
    let result = c
        .transaction(async |c| {
            AsyncPgConnection::exec(c, &insert(&tag, 1)).await?;
            let p = diesel::sql_query("SELECT pg_backend_pid() AS pid")
                .get_result::<Pid>(c)
                .await?
                .pid;
            pid.store(p, Ordering::SeqCst);
            c.on_commit(r.hook("commit"));
            c.on_rollback(r.hook("rollback"));
            c.on_complete(r.outcome("complete"));
            QueryResult::Ok(())
        })
        .await;
    assert!(result.is_err(), "{result:?}");
    assert_eq!(rec.take(), ["complete:Unknown"]);
    assert!(diesel_async::pooled_connection::PoolableConnection::is_broken(&mut c));
}

/// The caller's future dropped after COMMIT outside any tokio runtime, while `on_commit_async`
/// futures are pending: nothing can run them, so each is dropped with a warning naming it.
#[test]
fn commit_async_hooks_dropped_outside_a_runtime_are_logged() {
    use tokio::sync::oneshot;
    let logs = common::logger();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut c = rt
        .block_on(Sqlite::connect())
        .with_alias("async-no-runtime");
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let rec = Recorder::new();
    let (r1, r2) = (rec.clone(), rec.clone());
    let mut fut = Box::pin(c.transaction(async |c| {
        c.on_commit_async(async move {
            started_tx.send(()).unwrap();
            std::future::pending::<()>().await;
            r1.push("first");
        });
        c.on_commit_async(async move { r2.push("second") });
        QueryResult::Ok(())
    }));
    rt.block_on(async {
        tokio::select! {
            _ = &mut fut => panic!("the first future never finishes"),
            started = started_rx => started.unwrap(),
        }
    });
    drop(fut); // outside the runtime's context
    assert!(rec.get().is_empty());
    let lines = logs.matching(
        log::Level::Warn,
        &["on_commit_async", "dropped unrun", "(async-no-runtime)"],
    );
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(c.transaction_depth(), 0, "committed");
}
