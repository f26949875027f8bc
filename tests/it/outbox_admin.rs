//! Operating the outbox (`outbox::Admin`, per-queue relay stats) on SQLite, PostgreSQL and
//! MariaDB, with relays running: a retry never runs a job twice at once, a discard never
//! deletes a job a relay is running, a pause holds in every relay from the next claim on.
//!
//! Each test uses its own queue names, so tests running in parallel on the shared PostgreSQL
//! and MariaDB databases never see each other's jobs; the operations that touch every queue
//! (`retry_all`, `purge_dead` without a queue) run on SQLite only, in a file of their own.
//! Waits are channels, gates and polling with a deadline; no sleep decides an outcome.

#![cfg(all(
    feature = "outbox",
    feature = "sqlite",
    feature = "postgres",
    feature = "mysql"
))]
use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use diesel_transaction_signals::outbox::{
    Admin, Backoff, DurableJob, HandlerTimes, JobId, OutboxError, Relay,
};

/// Long enough never to matter on a healthy machine; a wait that reaches it is a failure.
const PATIENCE: Duration = Duration::from_secs(30);

fn queue(name: &str) -> String {
    common::unique_tag(name).replace('-', "_")
}

/// Polls `cond` until it holds; fails the test after `PATIENCE`.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5)); // a polling interval, not a synchronisation
    }
}

/// A handler's gate: each run reports its start, then waits until the test opens the gate.
#[derive(Clone)]
struct Gate {
    started: Arc<Mutex<mpsc::Sender<(i64, u32)>>>,
    go: Arc<Mutex<mpsc::Receiver<()>>>,
    active: Arc<AtomicUsize>,
    most_active: Arc<AtomicUsize>,
    runs: Arc<AtomicUsize>,
}

impl Gate {
    fn new() -> (Gate, mpsc::Receiver<(i64, u32)>, mpsc::Sender<()>) {
        let (started_tx, started) = mpsc::channel();
        let (go, go_rx) = mpsc::channel();
        let gate = Gate {
            started: Arc::new(Mutex::new(started_tx)),
            go: Arc::new(Mutex::new(go_rx)),
            active: Arc::default(),
            most_active: Arc::default(),
            runs: Arc::default(),
        };
        (gate, started, go)
    }

    fn run(&self, job: &diesel_transaction_signals::outbox::Job) -> Result<(), String> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_active.fetch_max(now, Ordering::SeqCst);
        let _ = self
            .started
            .lock()
            .unwrap()
            .send((job.id().get(), job.attempt()));
        // Bounded, so a failing test cannot leave the relay's drop waiting forever.
        let opened = self.go.lock().unwrap().recv_timeout(PATIENCE);
        self.active.fetch_sub(1, Ordering::SeqCst);
        opened.map_err(|e| e.to_string())
    }
}

macro_rules! admin_suite {
    ($backend:ident, $conn:ty, $pool_url:expr, $prepare:expr) => {
        mod $backend {
            use super::*;
            use diesel::prelude::*;
            use diesel::r2d2::{ConnectionManager, Pool};
            use diesel_transaction_signals::SignalConnection;

            type Conn = SignalConnection<$conn>;

            struct Db {
                pool: Pool<ConnectionManager<Conn>>,
                url: String,
                _keep: Box<dyn std::any::Any>,
            }

            #[derive(Debug)]
            struct Prepare;
            impl diesel::r2d2::CustomizeConnection<Conn, diesel::r2d2::Error> for Prepare {
                fn on_acquire(&self, conn: &mut Conn) -> Result<(), diesel::r2d2::Error> {
                    $prepare(conn);
                    Ok(())
                }
            }

            fn db() -> Db {
                let (url, keep): (String, Box<dyn std::any::Any>) = $pool_url();
                Db {
                    pool: pool(&url),
                    url,
                    _keep: keep,
                }
            }

            /// Another pool on the same database: what a second process would have.
            fn pool(url: &str) -> Pool<ConnectionManager<Conn>> {
                Pool::builder()
                    .max_size(4)
                    .connection_customizer(Box::new(Prepare))
                    .build(ConnectionManager::<Conn>::new(url))
                    .unwrap()
            }

            fn sql(db: &Db, statement: &str) {
                diesel::sql_query(statement)
                    .execute(&mut db.pool.get().unwrap())
                    .unwrap();
            }

            /// A job due in an hour, so no relay takes it before the test shapes it.
            fn later(db: &Db, q: &str, payload: i32) -> JobId {
                db.pool
                    .get()
                    .unwrap()
                    .enqueue(
                        DurableJob::new(q, &payload)
                            .unwrap()
                            .delay(Duration::from_secs(3600)),
                    )
                    .unwrap()
                    .unwrap()
            }

            /// A dead letter, as a relay leaves one after its last failed attempt.
            fn dead(db: &Db, q: &str, payload: i32) -> JobId {
                let id = later(db, q, payload);
                sql(
                    db,
                    &format!(
                        "UPDATE dts_outbox SET state = 2, attempts = 3, max_attempts = 3, \
                         last_error = 'boom {payload}' WHERE id = {id}"
                    ),
                );
                id
            }

            fn exists(db: &Db, id: JobId) -> bool {
                #[derive(QueryableByName)]
                struct Id {
                    #[diesel(sql_type = diesel::sql_types::BigInt)]
                    #[allow(dead_code)]
                    id: i64,
                }
                let found: Vec<Id> = diesel::sql_query(format!(
                    "SELECT id FROM dts_outbox WHERE id = {id}"
                ))
                .load(&mut db.pool.get().unwrap())
                .unwrap();
                !found.is_empty()
            }

            #[test]
            fn status_counts_every_state_the_lag_and_the_leases() {
                let db = db();
                let q = queue("status");
                let (gate, started, go) = Gate::new();
                let mut conn = db.pool.get().unwrap();
                let running = conn.defer_durable(&q, &0).unwrap().unwrap();
                let g = gate.clone();
                let relay = Relay::builder(db.pool.clone())
                    .name("status-relay")
                    .handler(&q, move |job| Ok(g.run(job)?))
                    .batch_size(1)
                    .spawn()
                    .unwrap();
                assert_eq!(started.recv_timeout(PATIENCE).unwrap(), (running.get(), 1));
                // The only worker is busy: what arrives now stays where it is put.
                let ready = conn.defer_durable(&q, &1).unwrap().unwrap();
                later(&db, &q, 2);
                let retrying = later(&db, &q, 3);
                sql(&db, &format!("UPDATE dts_outbox SET attempts = 1 WHERE id = {retrying}"));
                dead(&db, &q, 4);
                sql(
                    &db,
                    &format!("UPDATE dts_outbox SET run_at = run_at - 60000 WHERE id = {ready}"),
                );

                let s = Admin::queue_status(&mut *conn, &q).unwrap();
                assert_eq!(
                    (s.ready, s.scheduled, s.running, s.retrying, s.dead, s.paused),
                    (1, 1, 1, 1, 1, false),
                    "{s:?}"
                );
                let lag = s.oldest_ready_age.expect("a job is ready");
                assert!(lag >= Duration::from_secs(59), "{lag:?}");
                assert_eq!(s.leases.len(), 1, "{s:?}");
                assert_eq!((s.leases[0].relay(), s.leases[0].jobs), ("status-relay", 1));
                assert!(s.leases[0].owner.starts_with("status-relay/0/"));
                let all = Admin::status(&mut *conn).unwrap();
                assert_eq!(all.iter().filter(|x| x.queue == q).count(), 1);
                assert!(all.windows(2).all(|w| w[0].queue < w[1].queue), "sorted");

                go.send(()).unwrap();
                assert_eq!(started.recv_timeout(PATIENCE).unwrap(), (ready.get(), 1));
                go.send(()).unwrap();
                wait_until("both due jobs are delivered", || {
                    let s = Admin::queue_status(&mut *conn, &q).unwrap();
                    s.ready == 0 && s.running == 0
                });
                let s = Admin::queue_status(&mut *conn, &q).unwrap();
                assert_eq!((s.scheduled, s.retrying, s.dead), (1, 1, 1));
                assert_eq!(s.oldest_ready_age, None);
                assert!(s.leases.is_empty());
                relay.shutdown();
            }

            #[test]
            fn a_retry_never_runs_a_job_twice_at_once() {
                let db = db();
                let q = queue("retry_once");
                let id = dead(&db, &q, 1);
                let (gate, started, go) = Gate::new();
                let g = gate.clone();
                let relay = Relay::builder(db.pool.clone())
                    .handler(&q, move |job| Ok(g.run(job)?))
                    .poll_interval(Duration::from_millis(10))
                    .concurrency(2)
                    .spawn()
                    .unwrap();
                let mut conn = db.pool.get().unwrap();
                let listed = Admin::dead_letters(&mut *conn, Some(&q), 10).unwrap();
                assert_eq!(listed.len(), 1);
                assert_eq!(
                    (listed[0].id, listed[0].attempts, listed[0].max_attempts),
                    (id, 3, 3)
                );
                assert_eq!(listed[0].last_error.as_deref(), Some("boom 1"));
                assert_eq!(listed[0].payload, "1");

                Admin::retry(&mut *conn, id).unwrap();
                assert_eq!(
                    started.recv_timeout(PATIENCE).unwrap(),
                    (id.get(), 1),
                    "attempts start again from zero"
                );
                // While it runs: every way to retry it is refused or finds nothing to do.
                assert!(matches!(
                    Admin::retry(&mut *conn, id),
                    Err(OutboxError::JobRunning(j)) if j == id
                ));
                assert_eq!(Admin::retry_queue(&mut *conn, &q).unwrap(), 0);
                assert!(matches!(
                    Admin::reschedule(&mut *conn, id, Duration::ZERO),
                    Err(OutboxError::JobRunning(_))
                ));
                assert!(Admin::dead_letters(&mut *conn, Some(&q), 10)
                    .unwrap()
                    .is_empty());
                go.send(()).unwrap();
                wait_until("the retried job is delivered", || !exists(&db, id));
                let stats = relay.shutdown();
                assert_eq!(stats.delivered, 1);
                assert_eq!(gate.runs.load(Ordering::SeqCst), 1, "ran once");
                assert_eq!(gate.most_active.load(Ordering::SeqCst), 1);
                assert!(matches!(
                    Admin::retry(&mut *conn, id),
                    Err(OutboxError::JobNotFound(_))
                ));
                assert!(started.try_recv().is_err());
            }

            #[test]
            fn a_discard_never_deletes_a_job_a_relay_is_running() {
                let db = db();
                let q = queue("discard");
                let mut conn = db.pool.get().unwrap();
                let running = conn.defer_durable(&q, &1).unwrap().unwrap();
                let (gate, started, go) = Gate::new();
                let g = gate.clone();
                let relay = Relay::builder(db.pool.clone())
                    .handler(&q, move |job| Ok(g.run(job)?))
                    .batch_size(1)
                    .spawn()
                    .unwrap();
                assert_eq!(started.recv_timeout(PATIENCE).unwrap(), (running.get(), 1));
                let err = Admin::discard(&mut *conn, running).unwrap_err();
                assert!(matches!(err, OutboxError::JobRunning(j) if j == running), "{err}");
                assert!(exists(&db, running), "still there");

                // Pending and not running, or dead: discarded.
                let pending = later(&db, &q, 2);
                let dead_one = dead(&db, &q, 3);
                Admin::discard(&mut *conn, pending).unwrap();
                Admin::discard(&mut *conn, dead_one).unwrap();
                assert!(!exists(&db, pending) && !exists(&db, dead_one));
                assert!(matches!(
                    Admin::discard(&mut *conn, pending),
                    Err(OutboxError::JobNotFound(_))
                ));

                go.send(()).unwrap();
                wait_until("the running job is delivered", || !exists(&db, running));
                let stats = relay.shutdown();
                assert_eq!(stats.delivered, 1, "the relay, not the discard, removed it");
                assert_eq!(gate.runs.load(Ordering::SeqCst), 1);
            }

            /// Two relays on two pools (two processes, as far as the database can tell), each
            /// handling a paused queue and a control queue, one row claimed at a time. Claims
            /// take due rows oldest first, so once the control job (enqueued after the paused
            /// one) has run, a claim has passed over the paused job.
            #[test]
            fn a_pause_holds_in_every_relay_until_resumed_and_jobs_keep_arriving() {
                let db = db();
                let paused = queue("paused");
                let control = queue("control");
                let mut conn = db.pool.get().unwrap();
                assert!(Admin::pause(&mut *conn, &paused).unwrap());
                assert!(!Admin::pause(&mut *conn, &paused).unwrap(), "already paused");
                assert!(Admin::paused(&mut *conn).unwrap().contains(&paused));

                let (tx, delivered) = mpsc::channel::<String>();
                let relays: Vec<_> = (0..2)
                    .map(|n| {
                        let (t1, t2) = (tx.clone(), tx.clone());
                        Relay::builder(pool(&db.url))
                            .name(format!("pause-{n}"))
                            .handler(&paused, move |job| {
                                Ok(t1.send(format!("paused:{}", job.payload::<i32>()?))?)
                            })
                            .handler(&control, move |job| {
                                Ok(t2.send(format!("control:{}", job.payload::<i32>()?))?)
                            })
                            .batch_size(1)
                            .poll_interval(Duration::from_millis(10))
                            .spawn()
                            .unwrap()
                    })
                    .collect();
                let held = conn.defer_durable(&paused, &1).unwrap().unwrap();
                conn.defer_durable(&control, &1).unwrap();
                assert_eq!(delivered.recv_timeout(PATIENCE).unwrap(), "control:1");
                let s = Admin::queue_status(&mut *conn, &paused).unwrap();
                assert_eq!((s.paused, s.ready, s.running), (true, 1, 0), "{s:?}");
                assert!(exists(&db, held));
                // Again, with the paused job older still.
                conn.defer_durable(&paused, &2).unwrap();
                conn.defer_durable(&control, &2).unwrap();
                assert_eq!(delivered.recv_timeout(PATIENCE).unwrap(), "control:2");
                let s = Admin::queue_status(&mut *conn, &paused).unwrap();
                assert_eq!((s.ready, s.running), (2, 0), "{s:?}");

                assert!(Admin::resume(&mut *conn, &paused).unwrap());
                assert!(!Admin::resume(&mut *conn, &paused).unwrap());
                let mut got: Vec<String> = (0..2)
                    .map(|_| delivered.recv_timeout(PATIENCE).unwrap())
                    .collect();
                got.sort();
                assert_eq!(got, ["paused:1", "paused:2"]);
                let total: u64 = relays.into_iter().map(|r| r.shutdown().delivered).sum();
                assert_eq!(total, 4);
                assert!(matches!(
                    Admin::queue_status(&mut *conn, &paused),
                    Err(OutboxError::UnknownQueue(_))
                ));
            }

            #[test]
            fn dead_letters_from_a_relay_are_listed_purged_and_retried_with_stats() {
                let db = db();
                let q = queue("deadletters");
                let failing = Relay::builder(db.pool.clone())
                    .handler(&q, |job| Err(format!("refused {}", job.payload::<i32>()?).into()))
                    .poll_interval(Duration::from_millis(10))
                    .spawn()
                    .unwrap();
                let mut conn = db.pool.get().unwrap();
                for n in 0..3 {
                    conn.enqueue(DurableJob::new(&q, &n).unwrap().max_attempts(1))
                        .unwrap();
                }
                wait_until("three jobs are dead", || {
                    Admin::queue_status(&mut *conn, &q).unwrap().dead == 3
                });
                // The counters move just after the row: wait for them too.
                wait_until("the relay counted them", || failing.queue_stats()[&q].dead == 3);
                let stats = failing.queue_stats()[&q].clone();
                let totals = failing.shutdown();
                assert_eq!((totals.run, totals.failed, totals.dead), (3, 3, 3));
                assert_eq!(
                    (stats.run, stats.failed, stats.dead, stats.retried, stats.delivered),
                    (3, 3, 3, 0, 0)
                );
                assert_eq!(stats.handler_time.count, 3);
                assert_eq!(stats.handler_time.buckets.iter().sum::<u64>(), 3);
                assert!(stats.handler_time.max <= stats.handler_time.sum);

                let dead = Admin::dead_letters(&mut *conn, Some(&q), 10).unwrap();
                assert_eq!(dead.len(), 3);
                assert_eq!(dead[0].last_error.as_deref(), Some("refused 0"));
                assert_eq!(Admin::dead_letters(&mut *conn, Some(&q), 2).unwrap().len(), 2);
                // Dead-lettered now, so not older than an hour; one aged by hand is.
                let hour = Duration::from_secs(3600);
                assert_eq!(Admin::purge_dead(&mut *conn, hour, Some(&q)).unwrap(), 0);
                sql(
                    &db,
                    &format!(
                        "UPDATE dts_outbox SET run_at = run_at - 7200000 WHERE id = {}",
                        dead[0].id
                    ),
                );
                assert_eq!(Admin::purge_dead(&mut *conn, hour, Some(&q)).unwrap(), 1);
                assert!(matches!(
                    Admin::purge_dead(&mut *conn, hour, Some("no_such_queue_here")),
                    Err(OutboxError::UnknownQueue(_))
                ));

                assert_eq!(Admin::retry_queue(&mut *conn, &q).unwrap(), 2);
                let (tx, rx) = mpsc::channel();
                let relay = Relay::builder(db.pool.clone())
                    .handler(&q, move |job| Ok(tx.send((job.payload::<i32>()?, job.attempt()))?))
                    .spawn()
                    .unwrap();
                let mut got: Vec<(i32, u32)> =
                    (0..2).map(|_| rx.recv_timeout(PATIENCE).unwrap()).collect();
                got.sort();
                assert_eq!(got, [(1, 1), (2, 1)]);
                wait_until("the retried jobs are deleted", || {
                    matches!(
                        Admin::queue_status(&mut *conn, &q),
                        Err(OutboxError::UnknownQueue(_))
                    )
                });
                wait_until("the relay counted them", || relay.queue_stats()[&q].delivered == 2);
                let q_stats = relay.queue_stats()[&q].clone();
                relay.shutdown();
                assert_eq!((q_stats.run, q_stats.delivered, q_stats.failed), (2, 2, 0));
            }

            #[test]
            fn retries_and_failures_are_counted_per_queue() {
                let db = db();
                let flaky = queue("flaky");
                let fine = queue("fine");
                let relay = Relay::builder(db.pool.clone())
                    .handler(&flaky, |job| {
                        if job.attempt() == 1 {
                            Err("first attempt fails".into())
                        } else {
                            Ok(())
                        }
                    })
                    .handler(&fine, |_| Ok(()))
                    .backoff(Backoff::new(Duration::from_millis(1), Duration::from_millis(1)))
                    .poll_interval(Duration::from_millis(10))
                    .spawn()
                    .unwrap();
                assert_eq!(relay.queue_stats()[&fine], Default::default());
                let mut conn = db.pool.get().unwrap();
                conn.defer_durable(&flaky, &1).unwrap();
                conn.defer_durable(&fine, &1).unwrap();
                wait_until("both are delivered", || {
                    let s = relay.queue_stats();
                    s[&flaky].delivered == 1 && s[&fine].delivered == 1
                });
                let s = relay.queue_stats();
                assert_eq!(
                    (s[&flaky].run, s[&flaky].failed, s[&flaky].retried, s[&flaky].dead),
                    (2, 1, 1, 0)
                );
                assert_eq!((s[&fine].run, s[&fine].failed), (1, 0));
                assert_eq!(s[&flaky].handler_time.count, 2);
                assert_eq!(s.len(), 2);
                let total = relay.shutdown();
                assert_eq!(
                    (total.run, total.failed, total.retried, total.delivered),
                    (3, 1, 1, 2)
                );
                assert_eq!(HandlerTimes::BOUNDS.len() + 1, s[&fine].handler_time.buckets.len());
            }

            #[test]
            fn reschedule_moves_a_waiting_job_and_errors_are_typed() {
                let db = db();
                let q = queue("reschedule");
                let id = later(&db, &q, 7);
                let (tx, rx) = mpsc::channel();
                let relay = Relay::builder(db.pool.clone())
                    .handler(&q, move |job| Ok(tx.send(job.payload::<i32>()?)?))
                    .poll_interval(Duration::from_millis(10))
                    .spawn()
                    .unwrap();
                let mut conn = db.pool.get().unwrap();
                assert_eq!(Admin::queue_status(&mut *conn, &q).unwrap().scheduled, 1);
                Admin::reschedule(&mut *conn, id, Duration::ZERO).unwrap();
                assert_eq!(rx.recv_timeout(PATIENCE).unwrap(), 7);
                relay.shutdown();

                let dead_one = dead(&db, &q, 8);
                assert!(matches!(
                    Admin::reschedule(&mut *conn, dead_one, Duration::ZERO),
                    Err(OutboxError::JobDead(j)) if j == dead_one
                ));
                let pending = later(&db, &q, 9);
                assert!(matches!(
                    Admin::retry(&mut *conn, pending),
                    Err(OutboxError::JobNotDead(_))
                ));
                assert!(matches!(
                    Admin::reschedule(&mut *conn, JobId::new(i64::MAX), Duration::ZERO),
                    Err(OutboxError::JobNotFound(_))
                ));
                assert!(matches!(
                    Admin::retry_queue(&mut *conn, "bad queue!"),
                    Err(OutboxError::InvalidQueue(_))
                ));
                assert!(matches!(
                    Admin::dead_letters(&mut *conn, Some("no_such_queue_here"), 10),
                    Err(OutboxError::UnknownQueue(_))
                ));
                Admin::discard(&mut *conn, dead_one).unwrap();
                Admin::discard(&mut *conn, pending).unwrap();
            }

            /// Admin takes plain connections as well as `SignalConnection`s.
            #[test]
            fn a_plain_connection_works_too() {
                let db = db();
                let q = queue("plain");
                let id = dead(&db, &q, 1);
                let mut plain = <$conn as diesel::Connection>::establish(&db.url).unwrap();
                $prepare(&mut plain);
                let s = Admin::queue_status(&mut plain, &q).unwrap();
                assert_eq!(s.dead, 1);
                Admin::discard(&mut plain, id).unwrap();
            }
        }
    };
}

fn sqlite_db() -> (String, Box<dyn std::any::Any>) {
    let file = common::SqliteFile::new();
    (file.url.clone(), Box::new(file))
}

fn pg_db() -> (String, Box<dyn std::any::Any>) {
    let _ = common::pg(); // migrated, outbox included
    (common::pg_url(), Box::new(()))
}

fn mysql_db() -> (String, Box<dyn std::any::Any>) {
    let _ = common::mysql();
    (common::mysql_url(), Box::new(()))
}

fn busy_timeout<C: diesel::connection::SimpleConnection>(conn: &mut C) {
    conn.batch_execute("PRAGMA busy_timeout = 10000").unwrap();
}

fn nothing<C>(_: &mut C) {}

admin_suite!(
    sqlite,
    diesel::SqliteConnection,
    super::sqlite_db,
    super::busy_timeout
);
admin_suite!(postgres, diesel::PgConnection, super::pg_db, super::nothing);
admin_suite!(
    mysql,
    diesel::MysqlConnection,
    super::mysql_db,
    super::nothing
);

/// The operations on every queue at once, on a database of their own.
#[test]
fn sqlite_retry_all_and_purge_everything_and_a_missing_table() {
    use diesel::prelude::*;
    use diesel_migrations::MigrationHarness;

    let file = common::SqliteFile::new();
    let mut conn = file.connect();
    for (q, n) in [("a", 1), ("b", 2), ("b", 3)] {
        let id = conn.defer_durable(q, &n).unwrap().unwrap();
        diesel::sql_query(format!(
            "UPDATE dts_outbox SET state = 2, run_at = run_at - 86400000 WHERE id = {id}"
        ))
        .execute(&mut conn)
        .unwrap();
    }
    assert_eq!(Admin::retry_all(&mut conn).unwrap(), 3);
    assert_eq!(Admin::retry_all(&mut conn).unwrap(), 0);
    diesel::sql_query("UPDATE dts_outbox SET state = 2, run_at = run_at - 86400000")
        .execute(&mut conn)
        .unwrap();
    assert_eq!(
        Admin::purge_dead(&mut conn, Duration::from_secs(3600), None).unwrap(),
        3
    );
    assert!(Admin::status(&mut conn).unwrap().is_empty());

    // Before the migrations: typed, naming the table.
    let mut fresh = SqliteConnection::establish(":memory:").unwrap();
    let err = Admin::status(&mut fresh).unwrap_err();
    assert!(
        matches!(&err, OutboxError::NotMigrated(t) if t == "dts_outbox"),
        "{err}"
    );
    // Only the first migration (a database not upgraded yet): the pause table is missing.
    diesel::connection::SimpleConnection::batch_execute(
        &mut fresh,
        diesel_transaction_signals::outbox::sql::SQLITE_UP,
    )
    .unwrap();
    let err = Admin::pause(&mut fresh, "q").unwrap_err();
    assert!(
        matches!(&err, OutboxError::NotMigrated(t) if t == "dts_outbox_paused"),
        "{err}"
    );
    // The upgrade path: the pending migration adds it.
    let mut upgraded = SqliteConnection::establish(":memory:").unwrap();
    diesel::connection::SimpleConnection::batch_execute(
        &mut upgraded,
        diesel_transaction_signals::outbox::sql::SQLITE_UP,
    )
    .unwrap();
    diesel::connection::SimpleConnection::batch_execute(
        &mut upgraded,
        diesel_transaction_signals::outbox::sql::SQLITE_PAUSED_UP,
    )
    .unwrap();
    assert!(Admin::pause(&mut upgraded, "q").unwrap());
    let mut harness = SqliteConnection::establish(":memory:").unwrap();
    let applied = harness
        .run_pending_migrations(diesel_transaction_signals::outbox::migrations::SQLITE)
        .unwrap();
    assert_eq!(applied.len(), 2);
}
