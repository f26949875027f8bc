//! `defer_durable!` jobs of one transaction are written together, in one multi-row INSERT per
//! chunk just before COMMIT (issue 13), on SQLite, PostgreSQL and MariaDB. The statements are
//! counted with Diesel's `Instrumentation`.
//!
//! Each test uses its own queue name, so tests running in parallel on the shared PostgreSQL
//! and MariaDB databases never see each other's rows.

#![cfg(all(
    feature = "outbox",
    feature = "sqlite",
    feature = "postgres",
    feature = "mysql"
))]

use crate::common;
use std::sync::{Arc, Mutex};

use diesel::connection::{Instrumentation, InstrumentationEvent};
use diesel_transaction_signals::outbox::{DurableJob, OutboxError};

fn queue(name: &str) -> String {
    common::unique_tag(name).replace('-', "_")
}

/// Records the SQL of every statement a connection starts.
#[derive(Clone, Default)]
struct Statements(Arc<Mutex<Vec<String>>>);

impl Statements {
    fn instrumentation(&self) -> impl Instrumentation {
        let seen = self.0.clone();
        move |event: InstrumentationEvent<'_>| {
            if let InstrumentationEvent::StartQuery { query, .. } = event {
                let sql = query.to_string();
                // Keep the SQL, not the binds (thousands of them for a big batch).
                let sql = sql.split("-- binds").next().unwrap_or("").trim().to_owned();
                seen.lock().unwrap().push(sql);
            }
        }
    }

    /// The statements that wrote outbox rows since the last call.
    fn outbox_inserts(&self) -> usize {
        std::mem::take(&mut *self.0.lock().unwrap())
            .iter()
            .filter(|sql| sql.starts_with("INSERT INTO dts_outbox"))
            .count()
    }
}

macro_rules! batch_suite {
    ($backend:ident, $conn:ty, $connect:expr, $rows_per_insert:expr, $refused_key:expr) => {
        mod $backend {
            use super::*;
            use diesel::prelude::*;
            use diesel_transaction_signals::{defer_durable, SignalConnection};

            type Conn = SignalConnection<$conn>;

            fn connect() -> (Conn, Statements) {
                let mut conn: Conn = $connect();
                let statements = Statements::default();
                conn.set_instrumentation(statements.instrumentation());
                (conn, statements)
            }

            #[derive(QueryableByName, Debug, PartialEq)]
            struct Row {
                #[diesel(sql_type = diesel::sql_types::Text)]
                payload: String,
                #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
                idempotency_key: Option<String>,
            }

            /// The rows of `queue`, in id order.
            fn rows(conn: &mut Conn, queue: &str) -> Vec<Row> {
                diesel::sql_query(format!(
                    "SELECT payload, idempotency_key FROM dts_outbox WHERE queue = '{queue}' \
                     ORDER BY id"
                ))
                .load(conn)
                .unwrap()
            }

            fn payloads(conn: &mut Conn, queue: &str) -> Vec<String> {
                rows(conn, queue).into_iter().map(|r| r.payload).collect()
            }

            fn numbers(range: std::ops::Range<i32>) -> Vec<String> {
                range.map(|n| n.to_string()).collect()
            }

            #[test]
            fn a_thousand_defers_in_one_transaction_are_one_insert() {
                let (mut conn, statements) = connect();
                let q = queue("thousand");
                conn.transaction(|_| {
                    for n in 0..1000 {
                        defer_durable!(&q, &n)?;
                    }
                    Ok::<_, OutboxError>(())
                })
                .unwrap();
                assert_eq!(statements.outbox_inserts(), 1, "one statement for 1,000 jobs");
                assert_eq!(payloads(&mut conn, &q), numbers(0..1000), "all, in call order");
            }

            #[test]
            fn one_job_is_one_insert_and_nothing_is_written_before_commit() {
                let (mut conn, statements) = connect();
                let q = queue("one");
                conn.transaction(|c| {
                    defer_durable!(&q, &1)?;
                    assert_eq!(statements.outbox_inserts(), 0, "deferred to COMMIT");
                    assert!(payloads(c, &q).is_empty());
                    Ok::<_, OutboxError>(())
                })
                .unwrap();
                assert_eq!(statements.outbox_inserts(), 1);
                assert_eq!(payloads(&mut conn, &q), ["1"]);
            }

            #[test]
            fn jobs_of_a_rolled_back_savepoint_are_not_written() {
                let (mut conn, statements) = connect();
                let q = queue("savepoint");
                conn.transaction(|c| {
                    defer_durable!(&q, &1)?;
                    let undone: QueryResult<()> = c.transaction(|c| {
                        defer_durable!(&q, &2).unwrap();
                        c.transaction(|_| {
                            defer_durable!(&q, &3).unwrap();
                            QueryResult::Ok(())
                        })?;
                        Err(diesel::result::Error::RollbackTransaction)
                    });
                    assert!(undone.is_err());
                    c.transaction(|_| {
                        defer_durable!(&q, &4).unwrap();
                        QueryResult::Ok(())
                    })?;
                    defer_durable!(&q, &5)?;
                    Ok::<_, OutboxError>(())
                })
                .unwrap();
                assert_eq!(statements.outbox_inserts(), 1);
                assert_eq!(payloads(&mut conn, &q), ["1", "4", "5"]);

                // A transaction that rolls back writes nothing, and leaves nothing behind for
                // the next one.
                let _: Result<(), OutboxError> = conn.transaction(|_| {
                    defer_durable!(&q, &6)?;
                    Err(OutboxError::NoTransaction)
                });
                conn.transaction(|_| defer_durable!(&q, &7)).unwrap();
                assert_eq!(statements.outbox_inserts(), 1);
                assert_eq!(payloads(&mut conn, &q), ["1", "4", "5", "7"]);
            }

            #[test]
            fn duplicate_keys_in_the_batch_and_in_the_table_are_no_ops() {
                let (mut conn, statements) = connect();
                let q = queue("keys");
                let job = |key: &str, payload: &str| {
                    DurableJob::new(&q, payload).unwrap().idempotency_key(key)
                };
                // Already in the table.
                assert!(conn.enqueue(job("k0", "first k0")).unwrap().is_some());
                statements.outbox_inserts();
                conn.transaction(|_| {
                    defer_durable!(job("k0", "second k0"))?;
                    defer_durable!(job("k1", "first k1"))?;
                    defer_durable!(job("k1", "second k1"))?;
                    defer_durable!(&q, "no key")?;
                    defer_durable!(&q, "no key")?;
                    defer_durable!(job("k2", "first k2"))?;
                    Ok::<_, OutboxError>(())
                })
                .unwrap();
                assert_eq!(
                    rows(&mut conn, &q)
                        .into_iter()
                        .map(|r| (r.payload, r.idempotency_key))
                        .collect::<Vec<_>>(),
                    [
                        ("\"first k0\"".to_owned(), Some("k0".to_owned())),
                        ("\"first k1\"".to_owned(), Some("k1".to_owned())),
                        ("\"no key\"".to_owned(), None),
                        ("\"no key\"".to_owned(), None),
                        ("\"first k2\"".to_owned(), Some("k2".to_owned())),
                    ]
                );
                // MySQL writes a batch with a duplicate key again row by row (one statement
                // each): the other two write it in one statement.
                let inserts = statements.outbox_inserts();
                assert!(inserts == 1 || stringify!($backend) == "mysql", "{inserts}");

                // enqueue_all counts only the new rows.
                let written = conn
                    .transaction(|c| {
                        c.enqueue_all([
                            job("k2", "again"),
                            job("k3", "first k3"),
                            job("k3", "second k3"),
                        ])
                    })
                    .unwrap();
                assert_eq!(written, 1);
            }

            #[test]
            fn a_batch_larger_than_a_chunk_is_split_and_keeps_its_order() {
                let (mut conn, statements) = connect();
                let q = queue("chunks");
                let n = 14_000;
                conn.transaction(|_| {
                    for i in 0..n {
                        defer_durable!(&q, &i)?;
                    }
                    Ok::<_, OutboxError>(())
                })
                .unwrap();
                let per_insert: usize = $rows_per_insert;
                assert_eq!(statements.outbox_inserts(), (n as usize).div_ceil(per_insert));
                assert_eq!(payloads(&mut conn, &q), numbers(0..n));
                // enqueue_all is split the same way.
                let q2 = queue("chunks_all");
                let jobs = (0..n).map(|i| DurableJob::new(&q2, &i).unwrap());
                assert_eq!(conn.transaction(|c| c.enqueue_all(jobs)).unwrap(), n as usize);
                assert_eq!(statements.outbox_inserts(), (n as usize).div_ceil(per_insert));
                assert_eq!(payloads(&mut conn, &q2), numbers(0..n));
            }

            #[test]
            fn a_bad_payload_is_reported_at_the_call_and_queues_nothing() {
                let (mut conn, _statements) = connect();
                let q = queue("bad_payload");
                // JSON object keys must be strings: this map cannot be serialized.
                let bad: std::collections::BTreeMap<(i32, i32), i32> = [((1, 2), 3)].into();
                conn.transaction(|_| {
                    defer_durable!(&q, &1)?;
                    let err = defer_durable!(&q, &bad).unwrap_err();
                    assert!(matches!(err, OutboxError::Serialize(_)), "{err}");
                    let err = defer_durable!("not a queue!", &1).unwrap_err();
                    assert!(matches!(err, OutboxError::InvalidQueue(_)), "{err}");
                    defer_durable!(&q, &2)
                })
                .unwrap();
                assert_eq!(payloads(&mut conn, &q), ["1", "2"]);
            }

            #[test]
            fn a_refused_batch_rolls_the_transaction_back_with_the_database_error() {
                let (mut conn, _statements) = connect();
                let q = queue("refused");
                let refused_key: String = $refused_key(&mut conn);
                let result: QueryResult<()> = conn.transaction(|c| {
                    c.enqueue(DurableJob::new(&q, "written now").unwrap())?;
                    defer_durable!(&q, &1)?;
                    defer_durable!(DurableJob::new(&q, &2)?.idempotency_key(refused_key))?;
                    defer_durable!(&q, &3)?;
                    Ok(())
                });
                let Err(diesel::result::Error::DatabaseError(_, info)) = result else {
                    panic!("expected the database's error, got {result:?}");
                };
                assert!(
                    info.message()
                        .starts_with(&format!("defer_durable!: writing 3 durable jobs (queue {q}) before COMMIT failed: ")),
                    "{}",
                    info.message()
                );
                assert!(payloads(&mut conn, &q).is_empty(), "the whole transaction rolled back");
            }

            #[test]
            fn immediate_and_deferred_jobs_mix_in_one_transaction() {
                let (mut conn, statements) = connect();
                let q = queue("mixed");
                let id = conn
                    .transaction(|c| {
                        defer_durable!(&q, &"deferred 1")?;
                        let id = c.defer_durable(&q, &"now")?;
                        defer_durable!(&q, &"deferred 2")?;
                        Ok::<_, OutboxError>(id)
                    })
                    .unwrap();
                assert!(id.is_some());
                assert_eq!(statements.outbox_inserts(), 2);
                assert_eq!(
                    payloads(&mut conn, &q),
                    ["\"now\"", "\"deferred 1\"", "\"deferred 2\""],
                    "the immediate row first, the deferred ones at COMMIT"
                );
            }
        }
    };
}

fn sqlite_conn() -> diesel_transaction_signals::SignalConnection<diesel::SqliteConnection> {
    use diesel_migrations::MigrationHarness;
    let mut conn = common::sqlite();
    conn.run_pending_migrations(diesel_transaction_signals::outbox::migrations::SQLITE)
        .unwrap();
    conn
}

/// SQLite takes any key: a temporary trigger (this connection only) refuses this one.
fn sqlite_refused_key(
    conn: &mut diesel_transaction_signals::SignalConnection<diesel::SqliteConnection>,
) -> String {
    use diesel::connection::SimpleConnection;
    conn.batch_execute(
        "CREATE TEMP TRIGGER dts_refuse BEFORE INSERT ON main.dts_outbox \
         WHEN NEW.idempotency_key = 'refused' BEGIN SELECT RAISE(ABORT, 'key refused'); END",
    )
    .unwrap();
    "refused".into()
}

/// PostgreSQL's text cannot hold a NUL character.
fn pg_refused_key<C>(_: &mut C) -> String {
    "nul\0key".into()
}

/// The key column is VARCHAR(191), and MariaDB is strict.
fn mysql_refused_key<C>(_: &mut C) -> String {
    "k".repeat(300)
}

batch_suite!(
    sqlite,
    diesel::SqliteConnection,
    crate::outbox_batch::sqlite_conn,
    32_766 / 5,
    crate::outbox_batch::sqlite_refused_key
);
batch_suite!(
    postgres,
    diesel::PgConnection,
    common::pg,
    usize::MAX,
    crate::outbox_batch::pg_refused_key
);
batch_suite!(
    mysql,
    diesel::MysqlConnection,
    common::mysql,
    65_535 / 5,
    crate::outbox_batch::mysql_refused_key
);
