//! MySQL / MariaDB specifics: implicit commits before DDL, lost connections, deadlocks.

#![cfg(feature = "mysql")]
use crate::common;

use common::{items, Recorder};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error};
use diesel_transaction_signals::{SignalConnection, TransactionAborted};

type Conn = SignalConnection<MysqlConnection>;

use common::{mysql_insert as insert, mysql_rows as rows};

fn scratch_table(tag: &str) -> String {
    format!("scratch_{}", tag.replace('-', "_"))
}

#[test]
fn ddl_commits_implicitly_so_a_later_rollback_settles_as_unknown() {
    let logs = common::logger();
    let mut conn = common::mysql();
    let id = conn.id();
    let in_warning = format!("connection {id}:");
    let in_error = format!("(connection {id})");
    let tag = common::unique_tag("ddl-rollback");
    let table = scratch_table(&tag);
    let rec = Recorder::new();
    let r: QueryResult<()> = conn.transaction(|c| {
        insert(c, &tag, 1)?;
        c.on_commit(rec.hook("commit"));
        c.on_rollback(rec.hook("rollback"));
        c.on_complete(rec.outcome("complete"));
        // DDL: MySQL commits the transaction before it, and runs what follows in autocommit.
        diesel::sql_query(format!("CREATE TABLE {table} (id INT)")).execute(c)?;
        insert(c, &tag, 2)?;
        Err(Error::RollbackTransaction)
    });
    assert!(matches!(r, Err(Error::RollbackTransaction)));
    assert_eq!(rows(&tag), [1, 2], "the rollback undid nothing");
    // The wrapper cannot tell an implicit commit from a server-side rollback: never a hook
    // on a guess.
    assert_eq!(rec.take(), ["complete:Unknown"]);
    let warned = logs.matching(log::Level::Warn, &["ended the transaction", &in_warning]);
    assert_eq!(warned.len(), 1, "{warned:?}");
    let dropped = logs.matching(log::Level::Error, &["dropped unrun", &in_error]);
    assert_eq!(
        dropped.len(),
        2,
        "the commit and rollback hooks: {dropped:?}"
    );
    diesel::sql_query(format!("DROP TABLE {table}"))
        .execute(&mut conn)
        .unwrap();
    // The connection is usable and transactions work again.
    conn.transaction(|c| {
        c.on_commit(rec.hook("next"));
        insert(c, &tag, 3)
    })
    .unwrap();
    assert_eq!(rec.take(), ["next"]);
}

#[test]
fn ddl_in_a_savepoint_that_fails_settles_every_level_as_unknown() {
    let mut conn = common::mysql();
    let tag = common::unique_tag("ddl-savepoint");
    let table = scratch_table(&tag);
    let rec = Recorder::new();
    let _ = conn.transaction(|c| {
        insert(c, &tag, 1)?;
        c.on_commit(rec.hook("outer commit"));
        c.on_complete(rec.outcome("outer complete"));
        let inner: QueryResult<()> = c.transaction(|c| {
            c.on_commit(rec.hook("inner commit"));
            c.on_rollback(rec.hook("inner rollback"));
            diesel::sql_query(format!("CREATE TABLE {table} (id INT)")).execute(c)?;
            Err(Error::RollbackTransaction)
        });
        assert!(inner.is_err());
        QueryResult::Ok(())
    });
    assert_eq!(rows(&tag), [1], "committed implicitly");
    assert_eq!(rec.take(), ["outer complete:Unknown"]);
    diesel::sql_query(format!("DROP TABLE {table}"))
        .execute(&mut common::mysql_plain())
        .unwrap();
}

#[test]
fn ddl_then_commit_runs_commit_hooks_once() {
    let mut conn = common::mysql();
    let tag = common::unique_tag("ddl-commit");
    let table = scratch_table(&tag);
    let rec = Recorder::new();
    conn.transaction(|c| {
        insert(c, &tag, 1)?;
        c.on_commit(rec.hook("commit"));
        diesel::sql_query(format!("CREATE TABLE {table} (id INT)")).execute(c)?;
        diesel::sql_query(format!("DROP TABLE {table}")).execute(c)?;
        QueryResult::Ok(())
    })
    .unwrap();
    assert_eq!(rec.take(), ["commit"]);
    assert_eq!(rows(&tag), [1]);
}

#[derive(QueryableByName)]
struct ConnId {
    #[diesel(sql_type = diesel::sql_types::Unsigned<diesel::sql_types::BigInt>)]
    id: u64,
}

fn kill(conn: &mut Conn) {
    let ConnId { id } = diesel::sql_query("SELECT CONNECTION_ID() AS id")
        .get_result(conn)
        .unwrap();
    diesel::sql_query(format!("KILL CONNECTION {id}"))
        .execute(&mut common::mysql_plain())
        .unwrap();
}

#[test]
fn connection_lost_at_commit_is_unknown_and_runs_no_commit_hook() {
    let mut conn = common::mysql();
    let tag = common::unique_tag("my-lost");
    let rec = Recorder::new();
    let r: QueryResult<()> = conn.transaction(|c| {
        insert(c, &tag, 1)?;
        c.on_commit(rec.hook("commit"));
        c.on_rollback(rec.hook("rollback"));
        c.on_complete(rec.outcome("complete"));
        kill(c);
        Ok(())
    });
    assert!(r.is_err());
    assert_eq!(rec.take(), ["complete:Unknown"]);
    assert!(rows(&tag).is_empty());
}

#[test]
fn deadlock_victim_is_rolled_back_and_a_swallowed_deadlock_is_reported() {
    let mut a = common::mysql();
    let mut b = common::mysql();
    let tag = common::unique_tag("deadlock");
    insert(&mut a, &tag, 1).unwrap();
    insert(&mut a, &tag, 2).unwrap();
    let lock = |c: &mut Conn, v: i32| {
        diesel::update(
            items::table
                .filter(items::tag.eq(&tag))
                .filter(items::v.eq(v)),
        )
        .set(items::v.eq(v))
        .execute(c)
    };
    let rec = Recorder::new();
    let (to_b, from_a) = std::sync::mpsc::channel::<()>();
    let (to_a, from_b) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let rec_b = rec.clone();
        let b_side = s.spawn(move || {
            b.transaction(|c| {
                lock(c, 2)?;
                to_a.send(()).unwrap();
                from_a.recv().unwrap();
                c.on_commit(rec_b.hook("b commit"));
                lock(c, 1).map(drop)
            })
        });
        let r: QueryResult<()> = a.transaction(|c| {
            lock(c, 1)?;
            from_b.recv().unwrap();
            to_b.send(()).unwrap();
            c.on_commit(rec.hook("a commit"));
            c.on_rollback(rec.hook("a rollback"));
            // a waits for b's row while b waits for a's: InnoDB kills one of them. Swallow it.
            let _ = lock(c, 2);
            Ok(())
        });
        let rb = b_side.join().unwrap();
        // Exactly one of them lost; the other committed.
        match (&r, &rb) {
            (Err(e), Ok(())) => {
                assert!(TransactionAborted::is(e), "a swallowed the deadlock: {e:?}");
                assert!(rec.get().contains(&"a rollback".to_owned()));
                assert!(rec.get().contains(&"b commit".to_owned()));
            }
            (Ok(()), Err(Error::DatabaseError(DatabaseErrorKind::SerializationFailure, _))) => {
                assert_eq!(rec.get(), ["a commit"]);
            }
            other => panic!("unexpected: {other:?}"),
        }
    });
}
