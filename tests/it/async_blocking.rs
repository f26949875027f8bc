//! Async services that keep sync Diesel on blocking threads use `SignalConnection` as it is:
//! `defer!` inside deadpool-diesel's `interact` (a `spawn_blocking` closure) or a plain
//! `spawn_blocking` closure waits for the COMMIT of the sync transaction open there, on
//! SQLite and PostgreSQL.
#![cfg(all(feature = "sqlite", feature = "postgres"))]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use crate::common::{self, items, unique_tag, Recorder, SqliteFile};
use deadpool_diesel::{InteractError, Manager, Pool, Runtime};
use diesel::prelude::*;
use diesel::result::Error;
use diesel_transaction_signals::{defer, SignalConnection};

/// A database for one test: the shared PostgreSQL one, or a fresh SQLite file.
struct Db {
    url: String,
    _file: Option<SqliteFile>,
}

macro_rules! backend {
    ($name:ident, $inner:ty, $db:expr, $pool_size:expr) => {
        mod $name {
            use super::*;

            type Conn = SignalConnection<$inner>;

            fn db() -> Db {
                $db
            }

            /// SQLite has one writer at a time and deadpool-diesel sets no busy timeout: one
            /// connection serialises the writers there.
            fn pool(db: &Db) -> Pool<Manager<Conn>> {
                Pool::builder(Manager::new(&db.url, Runtime::Tokio1))
                    .max_size($pool_size)
                    .build()
                    .unwrap()
            }

            fn insert(conn: &mut Conn, tag: &str, v: i32) -> QueryResult<usize> {
                diesel::insert_into(items::table)
                    .values((items::tag.eq(tag), items::v.eq(v)))
                    .execute(conn)
            }

            /// Rows with `tag` that other connections see (committed), read on a new one.
            fn committed(url: &str, tag: &str) -> i64 {
                items::table
                    .filter(items::tag.eq(tag))
                    .count()
                    .get_result(&mut <$inner>::establish(url).unwrap())
                    .unwrap()
            }

            /// Inside `interact`: the deferred call waits for COMMIT (nothing ran when the
            /// closure returned its result to `transaction`), then runs once, on the blocking
            /// thread, when the row is already visible to other connections.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn defer_in_interact_waits_for_commit() {
                let db = db();
                let pool = pool(&db);
                let (tag, url, rec) = (unique_tag("interact"), db.url.clone(), Recorder::new());
                let r = rec.clone();
                let (seen_inside, hook_thread, closure_thread) = pool
                    .get()
                    .await
                    .unwrap()
                    .interact(move |conn| {
                        let hook_thread = Arc::new(Mutex::new(None));
                        let seen = conn.transaction(|conn| {
                            insert(conn, &tag, 1)?;
                            let (hr, h, t) = (r.clone(), hook_thread.clone(), tag.clone());
                            defer!(move || {
                                *h.lock().unwrap() = Some(std::thread::current().id());
                                hr.push(format!("mail; committed rows: {}", committed(&url, &t)));
                            });
                            insert(conn, &tag, 2)?;
                            QueryResult::Ok(r.get())
                        });
                        let hook_thread = hook_thread.lock().unwrap().take();
                        (seen, hook_thread, std::thread::current().id())
                    })
                    .await
                    .unwrap();
                assert_eq!(
                    seen_inside.unwrap(),
                    Vec::<String>::new(),
                    "not before COMMIT"
                );
                assert_eq!(rec.take(), ["mail; committed rows: 2"]);
                assert_eq!(hook_thread, Some(closure_thread), "on the blocking thread");
            }

            /// A transaction that rolls back, by an `Err` or by a failed statement after the
            /// `defer!`, never runs the deferred call.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn defer_in_interact_never_runs_on_rollback() {
                let db = db();
                let pool = pool(&db);
                let (tag, rec) = (unique_tag("interact-rollback"), Recorder::new());
                let (r, t) = (rec.clone(), tag.clone());
                let results = pool
                    .get()
                    .await
                    .unwrap()
                    .interact(move |conn| {
                        let refused = conn.transaction(|conn| {
                            insert(conn, &t, 1)?;
                            defer(r.hook("refused"));
                            Err::<(), _>(Error::RollbackTransaction)
                        });
                        let duplicate = conn.transaction(|conn| {
                            insert(conn, &t, 1)?;
                            defer(r.hook("duplicate"));
                            insert(conn, &t, 1)?; // the unique constraint
                            QueryResult::Ok(())
                        });
                        (refused, duplicate, r.get())
                    })
                    .await
                    .unwrap();
                assert!(matches!(results.0, Err(Error::RollbackTransaction)));
                assert!(
                    matches!(results.1, Err(Error::DatabaseError(_, _))),
                    "{:?}",
                    results.1
                );
                assert!(results.2.is_empty(), "{:?}", results.2);
                assert!(rec.take().is_empty());
                assert_eq!(committed(&db.url, &tag), 0);
            }

            /// Outside a transaction `defer!` runs at once, in `interact` as anywhere.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn defer_in_interact_outside_a_transaction_runs_at_once() {
                let db = db();
                let pool = pool(&db);
                let rec = Recorder::new();
                let r = rec.clone();
                let seen = pool
                    .get()
                    .await
                    .unwrap()
                    .interact(move |_conn| {
                        defer(r.hook("now"));
                        r.get()
                    })
                    .await
                    .unwrap();
                assert_eq!(seen, ["now"]);
            }

            /// A panic inside the transaction on a blocking thread: the deferred call never
            /// runs, the poisoned connection is discarded (its rollback hook runs then), and the
            /// same blocking thread (the runtime has one) is clean for the next closures:
            /// `defer!` outside a transaction runs at once, inside one waits for its COMMIT.
            #[test]
            fn panic_in_interact_leaves_the_blocking_thread_clean() {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .max_blocking_threads(1)
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let db = db();
                    let pool = pool(&db);
                    let (tag, rec) = (unique_tag("interact-panic"), Recorder::new());
                    let (r, t) = (rec.clone(), tag.clone());
                    let first = pool.get().await.unwrap();
                    let panicked = first
                        .interact(move |conn| {
                            conn.transaction(|conn| {
                                insert(conn, &t, 1)?;
                                conn.on_rollback(r.hook("rolled back"));
                                defer(r.hook("never"));
                                if r.get().is_empty() {
                                    panic!("boom (expected by the test)");
                                }
                                QueryResult::Ok(())
                            })
                        })
                        .await;
                    assert!(matches!(panicked, Err(InteractError::Panic(_))));
                    let panic_thread = first.interact(|_| std::thread::current().id()).await;
                    assert!(panic_thread.is_err(), "the connection's mutex is poisoned");
                    drop(first);

                    let (r, t) = (rec.clone(), tag.clone());
                    let second = pool.get().await.unwrap();
                    assert_eq!(
                        rec.take(),
                        ["rolled back"],
                        "the poisoned connection is gone"
                    );
                    let (at_once, inside, thread) = second
                        .interact(move |conn| {
                            defer(r.hook("at once"));
                            let at_once = r.take();
                            let inside = conn.transaction(|conn| {
                                insert(conn, &t, 2)?;
                                defer(r.hook("after commit"));
                                QueryResult::Ok(r.get())
                            });
                            (at_once, inside, std::thread::current().id())
                        })
                        .await
                        .unwrap();
                    assert_eq!(at_once, ["at once"]);
                    assert_eq!(inside.unwrap(), Vec::<String>::new());
                    assert_eq!(rec.take(), ["after commit"]);
                    assert_eq!(committed(&db.url, &tag), 1);
                    let again = second
                        .interact(|_| std::thread::current().id())
                        .await
                        .unwrap();
                    assert_eq!(thread, again, "one blocking thread");
                });
            }

            /// Many tasks, each running transactions through `interact` at once: every committed
            /// transaction's deferred call runs exactly once, no rolled-back one's does.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_interacts() {
                let db = db();
                let pool = pool(&db);
                let tag = unique_tag("interact-many");
                let sent = Arc::new(Mutex::new(Vec::new()));
                let mut tasks = tokio::task::JoinSet::new();
                for task in 0..8 {
                    let (pool, tag, sent) = (pool.clone(), tag.clone(), sent.clone());
                    tasks.spawn(async move {
                        for n in 0..6 {
                            let (tag, sent) = (tag.clone(), sent.clone());
                            let label = format!("{task}-{n}");
                            pool.get()
                                .await
                                .unwrap()
                                .interact(move |conn| {
                                    let result = conn.transaction(|conn| {
                                        insert(conn, &tag, task * 10 + n)?;
                                        let (s, l) = (sent.clone(), label.clone());
                                        defer!(move || s.lock().unwrap().push(l));
                                        assert!(!sent.lock().unwrap().contains(&label));
                                        if n % 3 == 2 {
                                            return Err(Error::RollbackTransaction);
                                        }
                                        Ok(())
                                    });
                                    assert_eq!(result.is_ok(), n % 3 != 2);
                                })
                                .await
                                .unwrap();
                        }
                    });
                }
                while let Some(done) = tasks.join_next().await {
                    done.unwrap();
                }
                let sent = std::mem::take(&mut *sent.lock().unwrap());
                let expected: BTreeSet<String> = (0..8)
                    .flat_map(|t| {
                        (0..6)
                            .filter(|n| n % 3 != 2)
                            .map(move |n| format!("{t}-{n}"))
                    })
                    .collect();
                assert_eq!(sent.len(), expected.len(), "each exactly once: {sent:?}");
                assert_eq!(sent.into_iter().collect::<BTreeSet<_>>(), expected);
                assert_eq!(committed(&db.url, &tag), expected.len() as i64);
            }

            /// A plain `spawn_blocking` inside an async transaction (an `AsyncSignalConnection`
            /// on another connection): the blocking closure's `defer!` belongs to the sync
            /// transaction open on its thread, which commits on its own, and not to the async
            /// one, which later rolls back; outside a sync transaction it runs at once, since a
            /// blocking task does not inherit its caller's async transaction.
            #[cfg(feature = "async")]
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn spawn_blocking_inside_an_async_transaction() {
                use diesel_async::AsyncConnection as _;
                let db = db();
                let (tag, rec) = (unique_tag("spawn-blocking"), Recorder::new());
                let mut outer =
                    diesel_transaction_signals::AsyncSignalConnection::new(
                        diesel_async::sync_connection_wrapper::SyncConnectionWrapper::<
                            SqliteConnection,
                        >::establish(":memory:")
                        .await
                        .unwrap(),
                    );
                let (url, r, t) = (db.url.clone(), rec.clone(), tag.clone());
                let result = outer
                    .transaction(async |_| {
                        defer(r.hook("async transaction committed"));
                        let r = r.clone();
                        let seen = tokio::task::spawn_blocking(move || {
                            defer(r.hook("not inherited: at once"));
                            let mut conn = Conn::establish(&url).unwrap();
                            conn.transaction(|conn| {
                                insert(conn, &t, 1)?;
                                defer(r.hook("sync transaction committed"));
                                QueryResult::Ok(())
                            })
                            .unwrap();
                            r.get()
                        })
                        .await
                        .unwrap();
                        assert_eq!(
                            seen,
                            ["not inherited: at once", "sync transaction committed"]
                        );
                        Err::<(), _>(Error::RollbackTransaction)
                    })
                    .await;
                assert!(result.is_err());
                assert_eq!(
                    rec.take(),
                    ["not inherited: at once", "sync transaction committed"]
                );
                assert_eq!(committed(&db.url, &tag), 1);
            }
        }
    };
}

backend!(
    sqlite,
    SqliteConnection,
    {
        let file = SqliteFile::new();
        Db {
            url: file.url.clone(),
            _file: Some(file),
        }
    },
    1
);

backend!(
    postgres,
    PgConnection,
    {
        drop(common::pg()); // migrated once per process
        Db {
            url: common::pg_url(),
            _file: None,
        }
    },
    4
);
