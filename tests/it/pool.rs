//! r2d2 pools: a pooled connection never carries hooks into its next use.

#![cfg(all(feature = "postgres", feature = "r2d2"))]
use crate::common;

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

mod customizer {
    use super::*;
    use diesel::r2d2::CustomizeConnection;
    use diesel_transaction_signals::pool::SignalCustomizer;

    #[derive(Debug)]
    struct AppName;
    impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for AppName {
        fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
            diesel::sql_query("SET application_name = 'dts-pool-test'")
                .execute(conn)
                .map(drop)
                .map_err(diesel::r2d2::Error::QueryError)
        }
    }

    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        application_name: String,
    }

    #[test]
    fn sets_the_alias_and_runs_the_inner_customizer() {
        let _ = common::pg();
        let pool = Pool::builder()
            .max_size(1)
            .connection_customizer(Box::new(
                SignalCustomizer::new().alias("primary").wrap(AppName),
            ))
            .build(ConnectionManager::<Conn>::new(common::pg_url()))
            .unwrap();
        let mut conn = pool.get().unwrap();
        assert_eq!(conn.alias(), Some("primary"));
        let s: Setting = diesel::sql_query("SHOW application_name")
            .get_result(&mut *conn)
            .unwrap();
        assert_eq!(s.application_name, "dts-pool-test");
    }

    #[test]
    fn reports_a_connection_removed_with_hooks_pending() {
        let logs = common::logger();
        let _ = common::pg();
        let alias = common::unique_tag("released");
        let pool = Pool::builder()
            .max_size(1)
            .connection_customizer(Box::new(SignalCustomizer::new().alias(alias.clone())))
            .build(ConnectionManager::<Conn>::new(common::pg_url()))
            .unwrap();
        let rec = Recorder::new();
        {
            let mut conn = pool.get().unwrap();
            <Conn as Connection>::TransactionManager::begin_transaction(&mut *conn).unwrap();
            conn.on_commit(rec.hook("commit"));
            conn.on_rollback(rec.hook("rollback"));
        }
        assert_eq!(rec.take(), ["rollback"]);
        let lines = logs.matching(log::Level::Warn, &["removed from the pool", &alias]);
        assert_eq!(lines.len(), 1, "{lines:?}");
    }

    #[test]
    fn the_same_connection_checked_out_again_carries_no_hooks() {
        let _ = common::pg();
        let pool = Pool::builder()
            .max_size(1)
            .build(ConnectionManager::<Conn>::new(common::pg_url()))
            .unwrap();
        let rec = Recorder::new();
        let id;
        {
            let mut conn = pool.get().unwrap();
            id = conn.id();
            // The wrapper's own `transaction` (through the pooled connection's deref) rolls
            // back on panic, so the connection goes back to the pool clean.
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _: QueryResult<()> = Connection::transaction(&mut *conn, |c| {
                    c.on_commit(rec.hook("commit before panic"));
                    c.on_rollback(rec.hook("rollback"));
                    panic!("handler bug");
                });
            }));
            assert!(caught.is_err());
            let _: QueryResult<()> = conn.transaction(|c| {
                c.on_commit(rec.hook("commit of rolled back"));
                Err(diesel::result::Error::RollbackTransaction)
            });
        }
        assert_eq!(rec.take(), ["rollback"]);
        let mut conn = pool.get().unwrap();
        assert_eq!(conn.id(), id, "the same connection, checked out again");
        conn.transaction(|c| {
            c.on_commit(rec.hook("next use"));
            QueryResult::Ok(())
        })
        .unwrap();
        assert_eq!(rec.take(), ["next use"], "nothing of the previous use ran");
    }
}
