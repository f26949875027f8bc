//! r2d2 pools: a pooled connection never carries hooks into its next use.

mod common;

use common::Recorder;
use diesel::connection::{Connection, TransactionManager};
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel_transaction_signals::SignalConnection;

type Conn = SignalConnection<PgConnection>;

fn pool() -> Pool<ConnectionManager<Conn>> {
    let _ = common::pg(); // migrated
    Pool::builder()
        .max_size(1)
        .build(ConnectionManager::<Conn>::new(common::pg_url()))
        .unwrap()
}

#[test]
fn pooled_transaction_runs_hooks() {
    let pool = pool();
    let rec = Recorder::new();
    let mut conn = pool.get().unwrap();
    conn.transaction(|c| {
        c.on_commit(rec.hook("commit"));
        QueryResult::Ok(())
    })
    .unwrap();
    assert_eq!(rec.take(), ["commit"]);
}

#[test]
fn connection_returned_inside_a_transaction_is_discarded_with_its_rollback_hooks() {
    let pool = pool();
    let rec = Recorder::new();
    let first_id;
    {
        let mut conn = pool.get().unwrap();
        first_id = conn.id();
        // Left open, as a buggy handler would.
        <<diesel::r2d2::PooledConnection<ConnectionManager<Conn>> as Connection>::TransactionManager
            as TransactionManager<_>>::begin_transaction(&mut conn)
            .unwrap();
        conn.on_commit(rec.hook("commit"));
        conn.on_rollback(rec.hook("rollback"));
    }
    assert_eq!(
        rec.take(),
        ["rollback"],
        "the pool dropped it, which rolled it back"
    );
    let mut conn = pool.get().unwrap();
    assert_ne!(
        conn.id(),
        first_id,
        "a fresh connection replaced the broken one"
    );
    assert_eq!(conn.transaction_depth(), 0);
    conn.transaction(|_| QueryResult::Ok(())).unwrap();
    assert!(rec.take().is_empty(), "no hook crossed into the next use");
}

#[test]
fn connection_returned_after_a_panic_carries_nothing_into_its_next_use() {
    let pool = pool();
    let rec = Recorder::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut conn = pool.get().unwrap();
        let _: QueryResult<()> = conn.transaction(|c| {
            c.on_commit(rec.hook("commit"));
            c.on_rollback(rec.hook("rollback"));
            panic!("handler bug");
        });
    }));
    assert!(r.is_err());
    assert_eq!(rec.take(), ["rollback"]);
    let mut conn = pool.get().unwrap();
    assert_eq!(conn.transaction_depth(), 0);
    conn.transaction(|_| QueryResult::Ok(())).unwrap();
    assert!(rec.take().is_empty());
}
