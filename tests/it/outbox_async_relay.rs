//! The async relay (`AsyncRelay`): async handlers on tokio tasks with deadpool and bb8 pools
//! of diesel-async connections, on SQLite, PostgreSQL and MariaDB. Jobs are enqueued with the
//! sync `SignalConnection`, as a service enqueuing in its own transactions would.
//!
//! Each test uses its own queue name, so relays of tests running in parallel on the shared
//! PostgreSQL and MariaDB databases never take each other's jobs.

#![cfg(all(
    feature = "outbox",
    feature = "async",
    feature = "deadpool",
    feature = "bb8",
    feature = "sqlite",
    feature = "postgres",
    feature = "mysql"
))]
use crate::common;

use std::sync::Arc;
use std::time::Duration;

use diesel::prelude::*;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::AsyncConnection;
use diesel_transaction_signals::outbox::{
    Admin, AsyncRelay, Backoff, DurableJob, Job, OutboxError,
};
use diesel_transaction_signals::{AsyncSignalConnection, SignalConnection};
use tokio::sync::mpsc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Long enough never to matter on a healthy machine; a wait that reaches it is a failure.
const PATIENCE: Duration = Duration::from_secs(30);

fn queue(name: &str) -> String {
    common::unique_tag(name).replace('-', "_")
}

/// The next message, or a failure after [`PATIENCE`].
async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {PATIENCE:?}"))
        .expect("the sender lives as long as the relay")
}

/// Polls `check` (a sync query) until it returns `Some`, yielding to the runtime in between.
async fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A pool manager configuration whose connections run `setup` (SQL) once established.
fn config<C: AsyncConnection + 'static>(setup: &'static str) -> ManagerConfig<C> {
    let mut config = ManagerConfig::<C>::default();
    config.custom_setup = Box::new(move |url| {
        let url = url.to_owned();
        Box::pin(async move {
            let mut conn = C::establish(&url).await?;
            if !setup.is_empty() {
                conn.batch_execute(setup)
                    .await
                    .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
            }
            Ok(conn)
        })
    });
    config
}

#[derive(QueryableByName, Debug, PartialEq)]
struct Row {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    state: i32,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    attempts: i32,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    locked_by: Option<String>,
}

macro_rules! async_relay_suite {
    ($backend:ident, $sync:ty, $inner:ty, $db:expr, $setup:expr) => {
        mod $backend {
            use super::*;
            use diesel_async::pooled_connection::{bb8, deadpool};

            type SyncConn = SignalConnection<$sync>;
            type Conn = AsyncSignalConnection<$inner>;

            struct Db {
                url: String,
                _keep: Box<dyn std::any::Any + Send>,
            }

            impl Db {
                fn new() -> Self {
                    let (url, keep) = $db();
                    Db { url, _keep: keep }
                }

                fn sync(&self) -> SyncConn {
                    let mut conn = SyncConn::establish(&self.url).unwrap();
                    if !$setup.is_empty() {
                        diesel::connection::SimpleConnection::batch_execute(&mut conn, $setup)
                            .unwrap();
                    }
                    conn
                }

                fn deadpool(&self) -> deadpool::Pool<Conn> {
                    let manager = AsyncDieselConnectionManager::<Conn>::new_with_config(
                        &self.url,
                        config($setup),
                    );
                    deadpool::Pool::builder(manager)
                        .max_size(4)
                        .build()
                        .unwrap()
                }

                fn rows(&self, queue: &str) -> Vec<Row> {
                    diesel::sql_query(format!(
                        "SELECT CAST(state AS INTEGER) AS state, attempts, locked_by \
                         FROM dts_outbox WHERE queue = '{queue}' ORDER BY id"
                    ))
                    .load(&mut self.sync())
                    .unwrap()
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn committed_jobs_are_delivered_on_deadpool_and_rolled_back_ones_never() {
                let db = Db::new();
                let q = queue("adeliver");
                let (tx, mut rx) = mpsc::unbounded_channel();
                let relay = AsyncRelay::builder(db.deadpool())
                    .handler(&q, move |job: Job| {
                        let tx = tx.clone();
                        async move {
                            // A handler that awaits: the relay's task waits with it.
                            tokio::task::yield_now().await;
                            tx.send((job.payload::<String>()?, job.attempt(), job.id()))?;
                            Ok::<_, BoxError>(())
                        }
                    })
                    // Only a wake-up after COMMIT can deliver within PATIENCE.
                    .poll_interval(Duration::from_secs(3600))
                    .spawn()
                    .unwrap();
                let mut conn = db.sync();
                let _: Result<(), OutboxError> = conn.transaction(|c| {
                    c.defer_durable(&q, "rolled back")?;
                    Err(OutboxError::NoTransaction) // any error: roll back
                });
                let id = conn
                    .transaction(|c| c.defer_durable(&q, "committed"))
                    .unwrap()
                    .expect("a new job");
                let (payload, attempt, got_id) = next(&mut rx, "delivery").await;
                assert_eq!((payload.as_str(), attempt, got_id), ("committed", 1, id));
                // Counted once the handler has returned: wait for the deletion.
                wait_for("the delivery to be counted", || {
                    (relay.stats().delivered == 1).then_some(())
                })
                .await;
                let per_queue = relay.queue_stats()[&q].clone();
                let stats = relay.shutdown().await;
                assert_eq!((stats.run, stats.delivered), (1, 1));
                assert_eq!((per_queue.run, per_queue.handler_time.count), (1, 1));
                assert!(rx.try_recv().is_err(), "the rolled-back job never runs");
                assert!(db.rows(&q).is_empty(), "delivered rows are deleted");
            }

            /// Durable jobs from async code: `defer_durable`, `enqueue_all` and the
            /// connection-less `defer_durable!` on an async connection are written inside the
            /// caller's transaction, and commit or roll back with it (savepoints included);
            /// an async relay delivers the committed ones.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn jobs_enqueued_from_async_code_commit_with_the_transaction() {
                use diesel_transaction_signals::defer_durable;
                let db = Db::new();
                let q = queue("aenqueue");
                let pool = db.deadpool();
                let mut conn = pool.get().await.unwrap();
                let rolled_back = (*conn)
                    .transaction(async |c| {
                        c.defer_durable(&q, "rolled back").await.unwrap();
                        defer_durable!(&q, "rolled back too").unwrap();
                        Err::<(), _>(diesel::result::Error::RollbackTransaction)
                    })
                    .await;
                assert!(rolled_back.is_err());
                assert!(
                    db.rows(&q).is_empty(),
                    "nothing of a rolled-back transaction"
                );
                let ids = (*conn)
                    .transaction(async |c| {
                        let id = c.defer_durable(&q, "one").await.unwrap();
                        let jobs = ["two", "three"]
                            .iter()
                            .map(|p| DurableJob::new(&q, p).unwrap())
                            .collect::<Vec<_>>();
                        assert_eq!(c.enqueue_all(jobs).await.unwrap(), 2);
                        for p in ["four", "five"] {
                            defer_durable!(&q, &p).unwrap();
                        }
                        let keyed = || DurableJob::new(&q, "six").unwrap().idempotency_key("six");
                        assert!(c.enqueue(keyed()).await.unwrap().is_some());
                        assert_eq!(c.enqueue(keyed()).await.unwrap(), None, "a no-op");
                        let inner = c
                            .transaction(async |c| {
                                c.defer_durable(&q, "savepoint").await.unwrap();
                                defer_durable!(&q, "savepoint too").unwrap();
                                Err::<(), _>(diesel::result::Error::RollbackTransaction)
                            })
                            .await;
                        assert!(inner.is_err());
                        QueryResult::Ok(id)
                    })
                    .await
                    .unwrap();
                assert!(ids.is_some());
                assert_eq!(db.rows(&q).len(), 6, "one, two, three, four, five, six");
                let (tx, mut rx) = mpsc::unbounded_channel();
                let relay = AsyncRelay::builder(pool.clone())
                    .handler(&q, move |job: Job| {
                        let tx = tx.clone();
                        async move {
                            tx.send(job.payload::<String>()?)?;
                            Ok::<_, BoxError>(())
                        }
                    })
                    .spawn()
                    .unwrap();
                let mut got = Vec::new();
                for _ in 0..6 {
                    got.push(next(&mut rx, "delivery").await);
                }
                got.sort();
                assert_eq!(got, ["five", "four", "one", "six", "three", "two"]);
                relay.shutdown().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn failures_retry_with_backoff_then_go_to_the_dead_letter_state() {
                let db = Db::new();
                let q = queue("aretry");
                let (tx, mut rx) = mpsc::unbounded_channel();
                let relay = AsyncRelay::builder(db.deadpool())
                    .handler(&q, move |job: Job| {
                        let tx = tx.clone();
                        async move {
                            tx.send(job.attempt()).unwrap();
                            match job.attempt() {
                                1 => Err("smtp unreachable"),
                                2 => panic!("handler bug"),
                                _ => Err("still failing"),
                            }
                        }
                    })
                    .backoff(Backoff::new(
                        Duration::from_millis(5),
                        Duration::from_millis(20),
                    ))
                    .poll_interval(Duration::from_millis(10))
                    .spawn()
                    .unwrap();
                let mut conn = db.sync();
                conn.enqueue(DurableJob::new(&q, &1).unwrap().max_attempts(3))
                    .unwrap();
                let mut attempts = Vec::new();
                for _ in 0..3 {
                    attempts.push(next(&mut rx, "attempt").await);
                }
                assert_eq!(attempts, [1, 2, 3]);
                let dead = wait_for("the job to be dead-lettered", || {
                    let dead = Admin::dead_letters(&mut conn, Some(&q), 10).unwrap();
                    (!dead.is_empty()).then_some(dead)
                })
                .await;
                assert_eq!(dead.len(), 1);
                assert_eq!(
                    (dead[0].attempts, dead[0].last_error.as_deref()),
                    (3, Some("still failing"))
                );
                let stats = relay.shutdown().await;
                assert_eq!(
                    (stats.failed, stats.retried, stats.dead, stats.delivered),
                    (3, 2, 1, 0)
                );
                assert!(rx.try_recv().is_err(), "a dead job is not retried");
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_paused_queue_is_not_claimed_until_resumed() {
                let db = Db::new();
                let paused = queue("apaused");
                let control = queue("acontrol");
                let mut conn = db.sync();
                assert!(Admin::pause(&mut conn, &paused).unwrap());
                let (tx, mut rx) = mpsc::unbounded_channel::<String>();
                let (t1, t2) = (tx.clone(), tx);
                let relay = AsyncRelay::builder(db.deadpool())
                    .handler(&paused, move |job: Job| {
                        let t = t1.clone();
                        async move {
                            t.send(format!("paused:{}", job.payload::<i32>()?))?;
                            Ok::<_, BoxError>(())
                        }
                    })
                    .handler(&control, move |job: Job| {
                        let t = t2.clone();
                        async move {
                            t.send(format!("control:{}", job.payload::<i32>()?))?;
                            Ok::<_, BoxError>(())
                        }
                    })
                    .poll_interval(Duration::from_millis(10))
                    .spawn()
                    .unwrap();
                // The paused job is older: a claim that takes the control job sees it too.
                let held = conn.defer_durable(&paused, &1).unwrap().unwrap();
                conn.defer_durable(&control, &1).unwrap();
                assert_eq!(next(&mut rx, "the control job").await, "control:1");
                let s = Admin::queue_status(&mut conn, &paused).unwrap();
                assert_eq!((s.paused, s.ready, s.running), (true, 1, 0), "{s:?}");
                assert_eq!(db.rows(&paused).len(), 1, "job {held} is kept");

                assert!(Admin::resume(&mut conn, &paused).unwrap());
                assert_eq!(next(&mut rx, "the resumed job").await, "paused:1");
                let stats = relay.shutdown().await;
                assert_eq!(stats.delivered, 2);
                assert!(rx.try_recv().is_err());
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn shutdown_waits_for_the_running_handler_and_releases_the_rest() {
                let db = Db::new();
                let q = queue("ashutdown");
                let mut conn = db.sync();
                conn.transaction(|c| {
                    for n in 0..3 {
                        c.defer_durable(&q, &n)?;
                    }
                    Ok::<_, OutboxError>(())
                })
                .unwrap();
                let (started_tx, mut started) = mpsc::unbounded_channel();
                let gate = Arc::new(tokio::sync::Semaphore::new(0));
                let held = gate.clone();
                let relay = AsyncRelay::builder(db.deadpool())
                    .handler(&q, move |job: Job| {
                        let (started_tx, gate) = (started_tx.clone(), held.clone());
                        async move {
                            started_tx.send(job.payload::<i32>()?)?;
                            // Bounded, so a failing test cannot leave the task waiting forever.
                            tokio::time::timeout(PATIENCE, gate.acquire())
                                .await??
                                .forget();
                            Ok::<_, BoxError>(())
                        }
                    })
                    .batch_size(10)
                    .spawn()
                    .unwrap();
                assert_eq!(next(&mut started, "the first job").await, 0);
                relay.request_stop();
                let stopping = tokio::spawn(relay.shutdown());
                // The handler holds until the gate opens: shutdown cannot have returned.
                tokio::task::yield_now().await;
                assert!(!stopping.is_finished(), "shutdown returned mid-handler");
                assert_eq!(gate.available_permits(), 0);
                gate.add_permits(1);
                let stats = stopping.await.unwrap();
                assert_eq!((stats.run, stats.delivered, stats.released), (1, 1, 2));
                assert!(started.try_recv().is_err(), "no job started after the stop");
                let left = db.rows(&q);
                assert_eq!(left.len(), 2);
                assert!(
                    left.iter()
                        .all(|r| r.attempts == 0 && r.state == 0 && r.locked_by.is_none()),
                    "{left:?}"
                );
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_bb8_pool_of_plain_connections_delivers_too() {
                let db = Db::new();
                let q = queue("abb8");
                let manager = AsyncDieselConnectionManager::<$inner>::new_with_config(
                    &db.url,
                    config($setup),
                );
                let pool = bb8::Pool::builder()
                    .max_size(2)
                    .build(manager)
                    .await
                    .unwrap();
                let (tx, mut rx) = mpsc::unbounded_channel();
                let relay = AsyncRelay::builder(pool)
                    .handler(&q, move |job: Job| {
                        let tx = tx.clone();
                        async move {
                            tx.send(job.payload::<i32>()?)?;
                            Ok::<_, BoxError>(())
                        }
                    })
                    .concurrency(2)
                    .poll_interval(Duration::from_secs(3600))
                    .spawn()
                    .unwrap();
                let mut conn = db.sync();
                conn.transaction(|c| {
                    for n in 0..5 {
                        c.defer_durable(&q, &n)?;
                    }
                    Ok::<_, OutboxError>(())
                })
                .unwrap();
                let mut got = Vec::new();
                for _ in 0..5 {
                    got.push(next(&mut rx, "delivery").await);
                }
                got.sort_unstable();
                assert_eq!(got, [0, 1, 2, 3, 4]);
                assert_eq!(relay.shutdown().await.delivered, 5);
                assert!(db.rows(&q).is_empty());
            }
        }
    };
}

fn sqlite_db() -> (String, Box<dyn std::any::Any + Send>) {
    let file = common::SqliteFile::new();
    (file.url.clone(), Box::new(file))
}

fn pg_db() -> (String, Box<dyn std::any::Any + Send>) {
    let _ = common::pg(); // migrated, outbox included
    (common::pg_url(), Box::new(()))
}

fn mysql_db() -> (String, Box<dyn std::any::Any + Send>) {
    let _ = common::mysql();
    (common::mysql_url(), Box::new(()))
}

async_relay_suite!(
    sqlite,
    diesel::SqliteConnection,
    diesel_async::sync_connection_wrapper::SyncConnectionWrapper<diesel::SqliteConnection>,
    crate::outbox_async_relay::sqlite_db,
    "PRAGMA busy_timeout = 10000"
);
async_relay_suite!(
    postgres,
    diesel::PgConnection,
    diesel_async::AsyncPgConnection,
    crate::outbox_async_relay::pg_db,
    ""
);
async_relay_suite!(
    mysql,
    diesel::MysqlConnection,
    diesel_async::AsyncMysqlConnection,
    crate::outbox_async_relay::mysql_db,
    ""
);

/// A relay that polls once an hour is woken by a job committed in another connection, which
/// does not ring this process's bell: a plain `PgConnection` inserting the row itself, whose
/// trigger sends `NOTIFY dts_outbox` (the relay's listener registered), heard by the relay's
/// listener. The listener removes its registration when the relay shuts down.
///
/// (Every outbox commit of this test process rings the bell too, so a parallel test can wake
/// the relay as well; `tests/outbox_listen_tls.rs` runs the thread relay's listener alone in
/// its process.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_listen_wakes_an_async_relay_for_a_job_committed_elsewhere() {
    let _ = common::pg();
    let url = common::pg_url();
    let q = queue("alisten");
    let manager = AsyncDieselConnectionManager::<diesel_async::AsyncPgConnection>::new(&url);
    let pool = diesel_async::pooled_connection::deadpool::Pool::builder(manager)
        .max_size(2)
        .build()
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let relay = AsyncRelay::builder(pool)
        .handler(&q, move |job: Job| {
            let tx = tx.clone();
            async move {
                tx.send(job.payload::<i32>()?)?;
                Ok::<_, BoxError>(())
            }
        })
        .poll_interval(Duration::from_secs(3600))
        .listen(url.as_str())
        .spawn()
        .unwrap();
    let mut other = common::pg_plain();
    // The listener thread registers in dts_outbox_listeners (from then on, enqueues notify)...
    let registered = |c: &mut diesel::PgConnection| -> i64 {
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        diesel::sql_query("SELECT count(*) AS n FROM dts_outbox_listeners WHERE relay = $1")
            .bind::<diesel::sql_types::Text, _>(relay.name())
            .get_result::<N>(c)
            .unwrap()
            .n
    };
    wait_for("the listener's registration", || {
        (registered(&mut other) == 1).then_some(())
    })
    .await;
    diesel::sql_query(
        "INSERT INTO dts_outbox (queue, payload, max_attempts, run_at) \
         VALUES ($1, '7', 3, (extract(epoch FROM now()) * 1000)::BIGINT)",
    )
    .bind::<diesel::sql_types::Text, _>(&q)
    .execute(&mut other)
    .unwrap();
    assert_eq!(next(&mut rx, "the job committed elsewhere").await, 7);
    let name = relay.name().to_owned();
    assert_eq!(relay.shutdown().await.delivered, 1);
    // ... and removes its registration when the relay shuts down.
    let left: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!(
        "(SELECT count(*) FROM dts_outbox_listeners WHERE relay = '{name}')"
    )))
    .get_result(&mut other)
    .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_checks_handlers_and_queue_names() {
    let manager = AsyncDieselConnectionManager::<
        diesel_async::sync_connection_wrapper::SyncConnectionWrapper<diesel::SqliteConnection>,
    >::new(":memory:");
    let pool = diesel_async::pooled_connection::deadpool::Pool::builder(manager)
        .build()
        .unwrap();
    assert!(matches!(
        AsyncRelay::builder(pool.clone()).spawn(),
        Err(OutboxError::NoHandlers)
    ));
    assert!(matches!(
        AsyncRelay::builder(pool)
            .handler("bad queue!", |_: Job| async { Ok::<(), String>(()) })
            .spawn(),
        Err(OutboxError::InvalidQueue(_))
    ));
}
