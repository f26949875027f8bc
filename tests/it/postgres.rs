//! PostgreSQL-only behaviour: serialization failures at COMMIT, lost connections, transactions
//! with an isolation level.

#![cfg(all(feature = "postgres", feature = "r2d2"))]
use crate::common;

use common::{items, Recorder};
use diesel::prelude::*;
use diesel::r2d2::R2D2Connection;
use diesel::result::{DatabaseErrorKind, Error};
use diesel_transaction_signals::SignalConnection;
use diesel_transaction_signals::TransactionAborted;

type Conn = SignalConnection<PgConnection>;

fn insert(conn: &mut Conn, tag: &str, v: i32) -> QueryResult<usize> {
    diesel::insert_into(items::table)
        .values((items::tag.eq(tag), items::v.eq(v)))
        .execute(conn)
}

fn count(conn: &mut impl LoadConnectionPg, tag: &str) -> i64 {
    conn.count(tag)
}

/// Counting rows from either kind of connection.
trait LoadConnectionPg {
    fn count(&mut self, tag: &str) -> i64;
}
impl LoadConnectionPg for PgConnection {
    fn count(&mut self, tag: &str) -> i64 {
        items::table
            .filter(items::tag.eq(tag))
            .count()
            .get_result(self)
            .unwrap()
    }
}
impl LoadConnectionPg for Conn {
    fn count(&mut self, tag: &str) -> i64 {
        items::table
            .filter(items::tag.eq(tag))
            .count()
            .get_result(self)
            .unwrap()
    }
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pid: i32,
}

/// Terminates `conn`'s server process and waits until it is gone.
fn terminate(conn: &mut Conn) {
    let Pid { pid } = diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result(conn)
        .unwrap();
    let mut admin = common::pg_plain();
    #[derive(QueryableByName)]
    struct Done {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        done: bool,
    }
    let Done { done } = diesel::sql_query("SELECT pg_terminate_backend($1, 10000) AS done")
        .bind::<diesel::sql_types::Integer, _>(pid)
        .get_result(&mut admin)
        .unwrap();
    assert!(done, "the backend did not terminate");
}

#[test]
fn serialization_failure_at_commit_runs_rollback_hooks_and_can_be_retried() {
    let mut t1 = common::pg();
    let mut t2 = common::pg();
    let tag = common::unique_tag("serial");
    let rec = Recorder::new();
    let r: QueryResult<()> = t1.build_transaction().serializable().run(|c| {
        // Write skew: both read the same predicate, then both write into it.
        let seen = count(c, &tag);
        insert(c, &tag, 1)?;
        c.on_commit(rec.hook("t1 commit"));
        c.on_rollback(rec.hook("t1 rollback"));
        c.on_complete(rec.outcome("t1"));
        t2.build_transaction().serializable().run(|c2| {
            let seen2 = count(c2, &tag);
            insert(c2, &tag, 2)?;
            c2.on_commit(rec.hook("t2 commit"));
            assert_eq!(seen, seen2);
            QueryResult::Ok(())
        })?;
        assert_eq!(rec.take(), ["t2 commit"]);
        Ok(())
    });
    match r {
        Err(Error::DatabaseError(DatabaseErrorKind::SerializationFailure, _)) => {}
        other => panic!("expected a serialization failure at COMMIT, got {other:?}"),
    }
    assert_eq!(rec.take(), ["t1 rollback", "t1:RolledBack"]);
    assert_eq!(t1.transaction_depth(), 0);
    // The caller retries; the connection is usable.
    t1.build_transaction()
        .serializable()
        .run(|c| {
            c.on_commit(rec.hook("retry commit"));
            insert(c, &tag, 1)
        })
        .unwrap();
    assert_eq!(rec.take(), ["retry commit"]);
    assert_eq!(count(&mut common::pg_plain(), &tag), 2);
}

#[test]
fn connection_lost_while_commit_is_in_flight_is_unknown_and_runs_no_commit_hook() {
    let logs = common::logger();
    let mut conn = common::pg();
    let id = format!("(connection {})", conn.id());
    let tag = common::unique_tag("lost-commit");
    let rec = Recorder::new();
    let r: QueryResult<()> = conn.transaction(|c| {
        insert(c, &tag, 1)?;
        c.on_commit(rec.hook("commit"));
        c.on_rollback(rec.hook("rollback"));
        c.on_complete(rec.outcome("complete"));
        terminate(c);
        Ok(()) // COMMIT is the first statement to meet the dead connection
    });
    let err = r.expect_err("COMMIT on a dead connection fails");
    assert!(
        matches!(
            err,
            Error::DatabaseError(
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
                _
            )
        ),
        "{err:?}"
    );
    assert_eq!(
        rec.take(),
        ["complete:Unknown"],
        "never a commit hook on a guess, nor a rollback hook"
    );
    let dropped = logs.matching(log::Level::Error, &["dropped unrun", &id]);
    assert_eq!(dropped.len(), 2, "both unrun hooks are logged: {dropped:?}");
    assert!(conn.is_broken(), "a pool discards the connection");
    assert_eq!(count(&mut common::pg_plain(), &tag), 0);
}

#[test]
fn connection_lost_before_commit_is_a_certain_rollback() {
    let mut conn = common::pg();
    let tag = common::unique_tag("lost-before");
    let rec = Recorder::new();
    let r: QueryResult<()> = conn.transaction(|c| {
        insert(c, &tag, 1)?;
        c.on_commit(rec.hook("commit"));
        c.on_rollback(rec.hook("rollback"));
        c.on_complete(rec.outcome("complete"));
        terminate(c);
        let lost = insert(c, &tag, 2);
        assert!(lost.is_err());
        Ok(()) // swallowed: the wrapper knows the connection broke before COMMIT
    });
    assert!(r.is_err());
    assert_eq!(rec.take(), ["rollback", "complete:RolledBack"]);
    assert!(conn.is_broken());
    assert_eq!(count(&mut common::pg_plain(), &tag), 0);
}

#[test]
fn connection_lost_and_error_propagated_runs_rollback_hooks_and_returns_the_users_error() {
    let mut conn = common::pg();
    let tag = common::unique_tag("lost-propagated");
    let rec = Recorder::new();
    let r: QueryResult<()> = conn.transaction(|c| {
        c.on_rollback(rec.hook("rollback"));
        c.transaction(|c| {
            c.on_rollback(rec.hook("savepoint rollback"));
            terminate(c);
            insert(c, &tag, 1).map(drop)
        })
    });
    assert!(
        matches!(r, Err(Error::DatabaseError(..))),
        "the user's error, not a rollback error: {r:?}"
    );
    // The broken connection settles both levels at once, in registration order.
    assert_eq!(rec.take(), ["rollback", "savepoint rollback"]);
    assert_eq!(conn.transaction_depth(), 0);
}

#[test]
fn build_transaction_runs_hooks_with_the_requested_characteristics() {
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        transaction_isolation: String,
    }
    let mut conn = common::pg();
    let rec = Recorder::new();
    conn.build_transaction()
        .repeatable_read()
        .read_only()
        .run(|c| {
            let s: Setting = diesel::sql_query("SHOW transaction_isolation").get_result(c)?;
            assert_eq!(s.transaction_isolation, "repeatable read");
            let write = insert(c, "read-only", 1);
            assert!(write.is_err(), "READ ONLY is in force");
            c.on_commit(rec.hook("commit"));
            c.on_rollback(rec.hook("rollback"));
            QueryResult::Ok(())
        })
        .expect_err("the failed write aborted the transaction");
    assert_eq!(rec.take(), ["rollback"]);
    conn.build_transaction()
        .serializable()
        .run(|c| {
            c.on_commit(rec.hook("commit"));
            // Characteristics apply to a whole transaction only.
            let nested: QueryResult<()> = c.build_transaction().serializable().run(|_| Ok(()));
            assert!(matches!(nested, Err(Error::AlreadyInTransaction)));
            // A plain nested transaction is a savepoint as usual.
            c.transaction(|c| {
                c.on_commit(rec.hook("savepoint commit"));
                QueryResult::Ok(())
            })
        })
        .unwrap();
    assert_eq!(rec.take(), ["commit", "savepoint commit"]);
}

#[test]
fn commit_hooks_run_after_locks_are_released() {
    let mut conn = common::pg();
    let tag = common::unique_tag("locks");
    insert(&mut conn, &tag, 1).unwrap();
    let rec = Recorder::new();
    let r = rec.clone();
    let hook_tag = tag.clone();
    conn.transaction(|c| {
        // Row lock held by this transaction until COMMIT.
        diesel::update(items::table.filter(items::tag.eq(&tag)))
            .set(items::v.eq(2))
            .execute(c)?;
        c.on_commit(move || {
            // Another connection writes the same row: it would wait for the lock, and fail
            // after lock_timeout, if the hook ran before COMMIT released it.
            let mut other = common::pg_plain();
            diesel::sql_query("SET lock_timeout = '5s'")
                .execute(&mut other)
                .unwrap();
            let n = diesel::update(items::table.filter(items::tag.eq(&hook_tag)))
                .set(items::v.eq(3))
                .execute(&mut other)
                .expect("the row lock was released before the hook ran");
            r.push(format!("updated {n}"));
        });
        QueryResult::Ok(())
    })
    .unwrap();
    assert_eq!(rec.take(), ["updated 1"]);
    let v: i32 = items::table
        .filter(items::tag.eq(&tag))
        .select(items::v)
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(v, 3);
}

#[test]
fn a_transaction_ended_by_raw_sql_settles_unknown() {
    use diesel::connection::{Connection, SimpleConnection, TransactionManager};
    type Manager = <Conn as Connection>::TransactionManager;
    let mut conn = common::pg();
    let tag = common::unique_tag("raw-commit");
    let rec = Recorder::new();
    Manager::begin_transaction(&mut conn).unwrap();
    insert(&mut conn, &tag, 1).unwrap();
    conn.on_commit(rec.hook("commit"));
    conn.on_rollback(rec.hook("rollback"));
    conn.on_complete(rec.outcome("complete"));
    conn.batch_execute("COMMIT").unwrap(); // behind the wrapper's back
                                           // The caller still believes the transaction open: nothing may run outside it now.
    assert_eq!(conn.transaction_depth(), 1);
    let refused = insert(&mut conn, &tag, 2).unwrap_err();
    assert!(TransactionAborted::is(&refused), "{refused}");
    assert!(rec.take().is_empty());
    let ended = Manager::commit_transaction(&mut conn).unwrap_err();
    assert!(TransactionAborted::is(&ended), "{ended}");
    assert_eq!(conn.transaction_depth(), 0);
    assert_eq!(rec.take(), ["complete:Unknown"], "never a hook on a guess");
    assert_eq!(
        count(&mut common::pg_plain(), &tag),
        1,
        "it did commit, and only the first row"
    );
    insert(&mut conn, &tag, 3).expect("the next statement runs again");
}
