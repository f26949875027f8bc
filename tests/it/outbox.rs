//! The transactional outbox and its relay, on SQLite, PostgreSQL and MariaDB.
//!
//! Each test uses its own queue name, so relays of tests running in parallel on the shared
//! PostgreSQL and MariaDB databases never take each other's jobs.

#![cfg(all(
    feature = "outbox",
    feature = "sqlite",
    feature = "postgres",
    feature = "mysql"
))]
use crate::common;

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::Duration;

use diesel_transaction_signals::outbox::{Backoff, DurableJob, Job, OutboxError, Relay};

/// Long enough never to matter on a healthy machine; a wait that reaches it is a failure.
const PATIENCE: Duration = Duration::from_secs(30);

fn queue(name: &str) -> String {
    common::unique_tag(name).replace('-', "_")
}

macro_rules! outbox_suite {
    ($backend:ident, $conn:ty, $pool_url:expr, $prepare:expr) => {
        mod $backend {
            use super::*;
            use diesel::prelude::*;
            use diesel::r2d2::{ConnectionManager, Pool};
            use diesel_transaction_signals::{defer_durable, SignalConnection};

            type Conn = SignalConnection<$conn>;

            struct Db {
                pool: Pool<ConnectionManager<Conn>>,
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
                let pool = Pool::builder()
                    .max_size(4)
                    .connection_customizer(Box::new(Prepare))
                    .build(ConnectionManager::<Conn>::new(url))
                    .unwrap();
                Db { pool, _keep: keep }
            }

            #[derive(QueryableByName, Debug, PartialEq)]
            struct Row {
                #[diesel(sql_type = diesel::sql_types::Integer)]
                state: i32,
                #[diesel(sql_type = diesel::sql_types::Integer)]
                attempts: i32,
                #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
                last_error: Option<String>,
            }

            fn rows(db: &Db, queue: &str) -> Vec<Row> {
                diesel::sql_query(format!(
                    "SELECT CAST(state AS INTEGER) AS state, attempts, last_error \
                     FROM dts_outbox WHERE queue = '{queue}' ORDER BY id"
                ))
                .load(&mut db.pool.get().unwrap())
                .unwrap()
            }

            #[test]
            fn committed_jobs_are_delivered_and_rolled_back_ones_never() {
                let db = db();
                let q = queue("deliver");
                let (tx, rx) = mpsc::channel();
                let relay = Relay::builder(db.pool.clone())
                    .handler(&q, move |job: &Job| {
                        tx.send((job.payload::<String>()?, job.attempt(), job.id()))?;
                        Ok(())
                    })
                    // Only a wake-up after COMMIT can deliver within PATIENCE.
                    .poll_interval(Duration::from_secs(3600))
                    .spawn()
                    .unwrap();
                let mut conn = db.pool.get().unwrap();
                let _: Result<(), OutboxError> = conn.transaction(|c| {
                    c.defer_durable(&q, "rolled back")?;
                    Err(OutboxError::NoTransaction) // any error: roll back
                });
                let id = conn
                    .transaction(|c| c.defer_durable(&q, "committed"))
                    .unwrap()
                    .expect("a new job");
                let (payload, attempt, got_id) = rx.recv_timeout(PATIENCE).unwrap();
                assert_eq!((payload.as_str(), attempt, got_id), ("committed", 1, id));
                let stats = relay.shutdown();
                assert_eq!(stats.delivered, 1);
                assert!(rx.try_recv().is_err(), "the rolled-back job never runs");
                assert!(rows(&db, &q).is_empty(), "delivered rows are deleted");
            }

            #[test]
            fn outside_a_transaction_a_job_is_its_own_committed_write() {
                let db = db();
                let q = queue("autocommit");
                let mut conn = db.pool.get().unwrap();
                conn.defer_durable(&q, &7).unwrap();
                assert_eq!(rows(&db, &q).len(), 1);
                let (tx, rx) = mpsc::channel();
                let relay = Relay::builder(db.pool.clone())
                    .handler(&q, move |job| Ok(tx.send(job.payload::<i32>()?)?))
                    .spawn()
                    .unwrap();
                assert_eq!(rx.recv_timeout(PATIENCE).unwrap(), 7);
                relay.shutdown();
            }

            #[test]
            fn enqueue_all_writes_every_job_in_the_transaction_and_skips_known_keys() {
                let db = db();
                let q = queue("all");
                let mut conn = db.pool.get().unwrap();
                let jobs = |range: std::ops::Range<i32>| {
                    range
                        .map(|n| {
                            let job = DurableJob::new(&q, &n).unwrap();
                            if n < 2 {
                                job.idempotency_key(format!("k{n}"))
                            } else {
                                job
                            }
                        })
                        .collect::<Vec<_>>()
                };
                let rolled_back: Result<(), OutboxError> = conn.transaction(|c| {
                    assert_eq!(c.enqueue_all(jobs(0..5))?, 5);
                    Err(OutboxError::NoTransaction) // any error: roll back
                });
                assert!(rolled_back.is_err());
                assert!(rows(&db, &q).is_empty(), "rolled back with the transaction");
                assert_eq!(conn.transaction(|c| c.enqueue_all(jobs(0..5))).unwrap(), 5);
                assert_eq!(
                    conn.enqueue_all(jobs(0..3)).unwrap(),
                    1,
                    "k0 and k1 are known"
                );
                assert_eq!(conn.enqueue_all(Vec::new()).unwrap(), 0);
                let (tx, rx) = mpsc::channel();
                let relay = Relay::builder(db.pool.clone())
                    .handler(&q, move |job| Ok(tx.send(job.payload::<i32>()?)?))
                    .spawn()
                    .unwrap();
                let mut got: Vec<i32> =
                    (0..6).map(|_| rx.recv_timeout(PATIENCE).unwrap()).collect();
                got.sort();
                assert_eq!(got, vec![0, 1, 2, 2, 3, 4]);
                assert_eq!(relay.shutdown().delivered, 6);
                assert!(rows(&db, &q).is_empty());
            }

            #[test]
            fn an_idempotency_key_makes_the_second_enqueue_a_no_op() {
                let db = db();
                let q = queue("idem");
                let mut conn = db.pool.get().unwrap();
                let job = || {
                    DurableJob::new(&q, &1)
                        .unwrap()
                        .idempotency_key("welcome-1")
                };
                let first = conn.transaction(|c| c.enqueue(job())).unwrap();
                assert!(first.is_some());
                let second = conn.transaction(|c| c.enqueue(job())).unwrap();
                assert_eq!(second, None);
                assert!(conn
                    .enqueue(DurableJob::new(&q, &2).unwrap())
                    .unwrap()
                    .is_some());
                assert_eq!(rows(&db, &q).len(), 2);
            }

            #[test]
            fn a_payload_that_cannot_serialize_is_an_error_at_enqueue_time() {
                let db = db();
                let q = queue("badpayload");
                let mut conn = db.pool.get().unwrap();
                // JSON object keys must be strings.
                let bad: HashMap<(i32, i32), i32> = HashMap::from([((1, 2), 3)]);
                let r = conn.transaction(|c| {
                    let err = c.defer_durable(&q, &bad).unwrap_err();
                    assert!(matches!(err, OutboxError::Serialize(_)), "{err}");
                    assert!(defer_durable!(&q, &bad).is_err());
                    c.defer_durable(&q, "fine")
                });
                assert!(r.unwrap().is_some());
                assert_eq!(rows(&db, &q).len(), 1, "only the good job was written");
                assert!(matches!(
                    DurableJob::new("bad queue!", &1),
                    Err(OutboxError::InvalidQueue(_))
                ));
            }

            #[test]
            fn failures_retry_with_backoff_then_go_to_the_dead_letter_state() {
                let db = db();
                let q = queue("retry");
                let (tx, rx) = mpsc::channel();
                let relay = Relay::builder(db.pool.clone())
                    .handler(&q, move |job| {
                        tx.send(job.attempt()).unwrap();
                        match job.attempt() {
                            1 => Err("smtp unreachable".into()),
                            2 => panic!("handler bug"),
                            _ => Err("still failing".into()),
                        }
                    })
                    .backoff(Backoff::new(
                        Duration::from_millis(5),
                        Duration::from_millis(20),
                    ))
                    .poll_interval(Duration::from_millis(10))
                    .spawn()
                    .unwrap();
                let mut conn = db.pool.get().unwrap();
                conn.enqueue(DurableJob::new(&q, &1).unwrap().max_attempts(3))
                    .unwrap();
                let attempts: Vec<u32> =
                    (0..3).map(|_| rx.recv_timeout(PATIENCE).unwrap()).collect();
                assert_eq!(attempts, [1, 2, 3]);
                // The third failure dead-letters it; wait for the row to say so.
                let r = common::wait_for(PATIENCE, "the row to be dead-lettered", || {
                    let r = rows(&db, &q);
                    r.first().is_some_and(|r| r.state == 2).then_some(r)
                });
                assert_eq!(
                    r,
                    [Row {
                        state: 2,
                        attempts: 3,
                        last_error: Some("still failing".into())
                    }]
                );
                let stats = relay.shutdown();
                assert_eq!((stats.retried, stats.dead, stats.delivered), (2, 1, 0));
                assert!(rx.try_recv().is_err(), "a dead job is not retried");
            }

            #[test]
            fn an_unknown_queue_is_reported_and_its_rows_kept() {
                let logs = common::logger();
                let db = db();
                let known = queue("known");
                let orphan = queue("orphan");
                let mut conn = db.pool.get().unwrap();
                conn.defer_durable(&orphan, &1).unwrap();
                let relay = Relay::builder(db.pool.clone())
                    .handler(&known, |_| Ok(()))
                    .unknown_queue_check(Duration::ZERO)
                    .poll_interval(Duration::from_millis(5))
                    .spawn()
                    .unwrap();
                // Every relay of the process reports rows it has no handler for, so look for
                // this relay's own report of this queue (quoted, as the log line prints it).
                let me = format!("outbox relay {}:", relay.name());
                let quoted = format!("{orphan:?}");
                common::wait_until(PATIENCE, "the relay's report of the orphan queue", || {
                    !logs
                        .matching(log::Level::Warn, &[&me, "has no handler", &quoted])
                        .is_empty()
                });
                assert!(relay.stats().unknown_queue_rows >= 1);
                relay.shutdown();
                assert_eq!(rows(&db, &orphan).len(), 1, "the row is kept");
            }

            #[test]
            fn graceful_shutdown_finishes_the_running_job_and_releases_the_rest() {
                let db = db();
                let q = queue("shutdown");
                let mut conn = db.pool.get().unwrap();
                conn.transaction(|c| {
                    for n in 0..3 {
                        c.defer_durable(&q, &n)?;
                    }
                    Ok::<_, OutboxError>(())
                })
                .unwrap();
                let (started_tx, started) = mpsc::channel();
                let (go, go_rx) = mpsc::channel::<()>();
                let go_rx = std::sync::Mutex::new(go_rx);
                let relay = Relay::builder(db.pool.clone())
                    .handler(&q, move |job| {
                        started_tx.send(job.payload::<i32>()?)?;
                        // Bounded, so a failing test cannot leave the worker (and the relay's
                        // drop, which joins it) waiting forever.
                        go_rx.lock().unwrap().recv_timeout(PATIENCE)?;
                        Ok(())
                    })
                    .batch_size(10)
                    .spawn()
                    .unwrap();
                assert_eq!(started.recv_timeout(PATIENCE).unwrap(), 0);
                relay.request_stop();
                go.send(()).unwrap();
                let stats = relay.shutdown();
                assert_eq!((stats.delivered, stats.released), (1, 2));
                let left = rows(&db, &q);
                assert_eq!(left.len(), 2);
                assert!(
                    left.iter().all(|r| r.attempts == 0 && r.state == 0),
                    "{left:?}"
                );
            }

            /// The workers of one relay each own their leases. Worker X's first attempt
            /// outlives its lease, worker Y claims the job again (attempt 2) and is still
            /// running it when X's attempt fails. When all workers of a relay recorded the same
            /// `locked_by`, X's failure matched Y's live lease, cleared it and made the job due
            /// at once, so a third attempt started while Y still ran the second.
            #[test]
            fn a_worker_past_its_lease_leaves_the_lease_of_a_sibling_worker_alone() {
                let logs = common::logger();
                let db = db();
                let q = queue("siblings");
                // Attempt 2 holds this lease while the test watches for a third attempt.
                let lease = Duration::from_secs(3);
                let window = Duration::from_secs(1);
                let (started_tx, started) = mpsc::channel::<u32>();
                let started_tx = std::sync::Mutex::new(started_tx);
                let (gate1, gate1_rx) = mpsc::channel::<()>();
                let (gate2, gate2_rx) = mpsc::channel::<()>();
                let gates = std::sync::Mutex::new((gate1_rx, gate2_rx));
                let relay = Relay::builder(db.pool.clone())
                    .handler(&q, move |job| {
                        started_tx.lock().unwrap().send(job.attempt())?;
                        // Bounded waits, so a failing test cannot hang the relay's drop.
                        match job.attempt() {
                            1 => {
                                let gate = gates.lock().unwrap().0.recv_timeout(PATIENCE);
                                gate?;
                                Err("attempt 1 failed after its lease expired".into())
                            }
                            2 => {
                                let gate = gates.lock().unwrap().1.recv_timeout(PATIENCE);
                                gate?;
                                Ok(())
                            }
                            _ => Ok(()),
                        }
                    })
                    .concurrency(2)
                    .lease(lease)
                    .poll_interval(Duration::from_millis(10))
                    .backoff(
                        Backoff::new(Duration::from_millis(1), Duration::from_millis(1))
                            .jitter(0.0),
                    )
                    .spawn()
                    .unwrap();
                let id = db
                    .pool
                    .get()
                    .unwrap()
                    .defer_durable(&q, &1)
                    .unwrap()
                    .expect("a new job");
                assert_eq!(started.recv_timeout(PATIENCE).unwrap(), 1);
                // The other worker claims it again once the lease has expired.
                assert_eq!(started.recv_timeout(PATIENCE).unwrap(), 2);
                gate1.send(()).unwrap();
                // Wait until attempt 1's failure has been dealt with (logged either way).
                let line = format!("job {id} ({q}) failed attempt 1");
                let me = format!("outbox relay {}:", relay.name());
                common::wait_until(PATIENCE, "attempt 1's failure to be logged", || {
                    !logs.matching(log::Level::Warn, &[&me, &line]).is_empty()
                });
                // Attempt 2's lease holds for `lease`; nothing may run the job meanwhile.
                let third = started.recv_timeout(window);
                assert!(
                    third.is_err(),
                    "attempt {third:?} started while attempt 2 still held its lease"
                );
                gate2.send(()).unwrap();
                common::wait_until(PATIENCE, "attempt 2 to complete", || {
                    rows(&db, &q).is_empty()
                });
                let stats = relay.shutdown();
                assert_eq!((stats.delivered, stats.retried, stats.dead), (1, 0, 0));
                assert!(started.try_recv().is_err(), "no attempt after the delivery");
            }

            #[test]
            fn defer_durable_without_a_handle_writes_at_commit() {
                let db = db();
                let q = queue("handleless");
                let mut conn = db.pool.get().unwrap();
                assert!(matches!(
                    defer_durable!(&q, &1),
                    Err(OutboxError::NoTransaction)
                ));
                conn.transaction(|_| defer_durable!(&q, &2)).unwrap();
                let _: Result<(), OutboxError> = conn.transaction(|_| {
                    defer_durable!(&q, &3)?;
                    Err(OutboxError::NoTransaction)
                });
                conn.transaction(|c| {
                    let r: QueryResult<()> = c.transaction(|_| {
                        defer_durable!(&q, &4).unwrap();
                        Err(diesel::result::Error::RollbackTransaction)
                    });
                    assert!(r.is_err());
                    defer_durable!(&q, &5)
                })
                .unwrap();
                let (tx, rx) = mpsc::channel();
                let relay = Relay::builder(db.pool.clone())
                    .handler(&q, move |job| Ok(tx.send(job.payload::<i32>()?)?))
                    .spawn()
                    .unwrap();
                let mut got: Vec<i32> =
                    (0..2).map(|_| rx.recv_timeout(PATIENCE).unwrap()).collect();
                relay.shutdown();
                got.sort_unstable();
                assert_eq!(got, [2, 5]);
                assert!(rx.try_recv().is_err());
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

outbox_suite!(
    sqlite,
    diesel::SqliteConnection,
    crate::outbox::sqlite_db,
    crate::outbox::busy_timeout
);
outbox_suite!(
    postgres,
    diesel::PgConnection,
    crate::outbox::pg_db,
    crate::outbox::nothing
);
outbox_suite!(
    mysql,
    diesel::MysqlConnection,
    crate::outbox::mysql_db,
    crate::outbox::nothing
);

/// MySQL/MariaDB: a relay's claim must not hold locks on rows of queues it does not serve,
/// or a relay of another queue claiming at the same time (`SKIP LOCKED`) skips them. The claim
/// of queue `x` is held open at its UPDATE (an instrumentation callback waits there) while
/// another connection locks the rows of queue `y`, which sort before `x`'s in the ready index
/// the claim scans: they must all be lockable. (Under REPEATABLE READ the scan kept them
/// locked until the claim's COMMIT, and the probe never saw them.)
#[test]
fn mysql_a_claim_leaves_the_rows_of_other_queues_unlocked() {
    use diesel::connection::{Connection, Instrumentation, InstrumentationEvent};
    use diesel::prelude::*;
    use diesel_transaction_signals::outbox::OutboxConnection;

    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        #[allow(dead_code)]
        id: i64,
    }

    let (x, y) = (queue("claim_x"), queue("claim_y"));
    // y's rows first: they come before x's in the ready index (run_at, id).
    let mut writer = diesel_transaction_signals::SignalConnection::new(common::mysql_plain());
    for (q, n) in [(&y, 3), (&x, 1)] {
        for i in 0..n {
            writer.enqueue(DurableJob::new(q, &i).unwrap()).unwrap();
        }
    }

    let (at_update_tx, at_update) = mpsc::channel::<()>();
    let (go, go_rx) = mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let mut claimer = common::mysql_plain();
    let hold = move |event: InstrumentationEvent<'_>| {
        if let InstrumentationEvent::StartQuery { query, .. } = event {
            if query
                .to_string()
                .starts_with("UPDATE dts_outbox SET locked_until")
            {
                let _ = at_update_tx.send(());
                let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(30));
            }
        }
    };
    let boxed: Box<dyn Instrumentation> = Box::new(hold);
    claimer.set_instrumentation(boxed);
    let queues = format!("[\"{x}\"]");
    let claim = std::thread::spawn(move || {
        claimer
            .outbox_claim("test-claimer", &queues, 10, 30_000)
            .map(|rows| rows.len())
    });
    at_update
        .recv_timeout(Duration::from_secs(30))
        .expect("the claim reached its UPDATE");

    let mut probe = common::mysql_plain();
    let seen = common::try_wait_for(Duration::from_secs(10), || {
        let rows = probe
            .transaction(|c| {
                diesel::sql_query(format!(
                    "SELECT id FROM dts_outbox WHERE queue = '{y}' FOR UPDATE SKIP LOCKED"
                ))
                .load::<Id>(c)
            })
            .unwrap();
        (rows.len() == 3).then_some(())
    });
    go.send(()).unwrap();
    assert_eq!(
        claim.join().unwrap().unwrap(),
        1,
        "the claim took x's one row"
    );
    assert!(
        seen.is_some(),
        "while x's claim was open, y's rows stayed locked by it"
    );
}
