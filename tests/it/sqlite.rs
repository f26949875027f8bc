//! SQLite-only behaviour: `BEGIN IMMEDIATE` / `BEGIN EXCLUSIVE` through the hooks, and a
//! deferred foreign key that fails at COMMIT seen from a second connection.

#![cfg(feature = "sqlite")]
use crate::common;

use common::{items, Recorder, SqliteFile};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error};

#[test]
fn immediate_and_exclusive_transactions_settle_hooks() {
    let mut conn = common::sqlite();
    let rec = Recorder::new();
    conn.immediate_transaction(|c| {
        c.on_commit(rec.hook("immediate commit"));
        c.transaction(|c| {
            c.on_commit(rec.hook("savepoint commit"));
            QueryResult::Ok(())
        })
    })
    .unwrap();
    assert_eq!(rec.take(), ["immediate commit", "savepoint commit"]);
    let r: QueryResult<()> = conn.exclusive_transaction(|c| {
        c.on_commit(rec.hook("exclusive commit"));
        c.on_rollback(rec.hook("exclusive rollback"));
        Err(Error::RollbackTransaction)
    });
    assert!(r.is_err());
    assert_eq!(rec.take(), ["exclusive rollback"]);
    conn.transaction(|c| {
        let nested: QueryResult<()> = c.immediate_transaction(|_| Ok(()));
        assert!(matches!(nested, Err(Error::AlreadyInTransaction)));
        QueryResult::Ok(())
    })
    .unwrap();
}

#[test]
fn immediate_transaction_takes_the_write_lock_at_begin() {
    let db = SqliteFile::new();
    let mut a = db.connect();
    let mut b = db.connect();
    diesel::sql_query("PRAGMA busy_timeout = 0")
        .execute(&mut b)
        .unwrap();
    a.immediate_transaction(|_| {
        // b cannot write, or even begin immediately, while a holds the reserved lock.
        let r: QueryResult<()> = b.immediate_transaction(|_| Ok(()));
        assert!(r.is_err(), "{r:?}");
        QueryResult::Ok(())
    })
    .unwrap();
    b.immediate_transaction(|_| QueryResult::Ok(())).unwrap();
}

#[test]
fn failed_commit_is_invisible_to_another_connection() {
    let db = SqliteFile::new();
    let mut conn = db.connect();
    let rec = Recorder::new();
    let r: QueryResult<()> = conn.transaction(|c| {
        diesel::insert_into(items::table)
            .values((items::tag.eq("fk"), items::v.eq(1)))
            .execute(c)?;
        diesel::insert_into(common::children::table)
            .values(common::children::parent_id.eq(404))
            .execute(c)?;
        c.on_commit(rec.hook("commit"));
        c.on_rollback(rec.hook("rollback"));
        Ok(())
    });
    assert!(
        matches!(
            r,
            Err(Error::DatabaseError(
                DatabaseErrorKind::ForeignKeyViolation,
                _
            ))
        ),
        "{r:?}"
    );
    assert_eq!(rec.take(), ["rollback"]);
    let mut other = db.connect();
    let n: i64 = items::table.count().get_result(&mut other).unwrap();
    assert_eq!(n, 0);
}
