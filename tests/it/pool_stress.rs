//! 8 threads x 1,000 transactions through one pool on PostgreSQL: random commits, savepoint
//! rollbacks, outer rollbacks and panics. The set of ids whose commit hook ran must equal the
//! set of rows, every hook must run exactly once, and no rollback hook may run for a committed
//! row. The process's panic hook stays quiet for the thousands of panics (and only for them).

#![cfg(all(feature = "postgres", feature = "r2d2"))]
use crate::common;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use common::items;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::result::Error;
use diesel_transaction_signals::pool::SignalCustomizer;
use diesel_transaction_signals::SignalConnection;

type Conn = SignalConnection<PgConnection>;

const THREADS: i32 = 8;
const PER_THREAD: i32 = 1_000;
const SAVEPOINT_OFFSET: i32 = 10_000_000;

#[derive(Default)]
struct Ledger {
    commit: HashMap<i32, u32>,
    rollback: HashMap<i32, u32>,
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn concurrent_transactions_commit_hooks_match_committed_rows_exactly() {
    common::quiet_panics(|payload| payload.downcast_ref::<&str>() == Some(&"stress panic"));
    let _ = common::pg();
    let tag = common::unique_tag("stress");
    let pool = Pool::builder()
        .max_size(THREADS as u32)
        .connection_customizer(Box::new(SignalCustomizer::new().alias("stress")))
        .build(ConnectionManager::<Conn>::new(common::pg_url()))
        .unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let attempted: Arc<Mutex<HashMap<i32, u8>>> = Arc::default();

    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (pool, ledger, attempted, tag) = (&pool, &ledger, &attempted, &tag);
            s.spawn(move || {
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
                for k in 0..PER_THREAD {
                    let id = t * PER_THREAD + k;
                    let action = (xorshift(&mut rng) % 4) as u8;
                    attempted.lock().unwrap().insert(id, action);
                    let mut conn = pool.get().unwrap();
                    let hooks = |c: &mut Conn, id: i32| {
                        let l = ledger.clone();
                        c.on_commit(move || *l.lock().unwrap().commit.entry(id).or_default() += 1);
                        let l = ledger.clone();
                        c.on_rollback(move || {
                            *l.lock().unwrap().rollback.entry(id).or_default() += 1
                        });
                    };
                    let insert = |c: &mut Conn, v: i32| {
                        diesel::insert_into(items::table)
                            .values((items::tag.eq(tag), items::v.eq(v)))
                            .execute(c)
                            .map(drop)
                    };
                    let run = catch_unwind(AssertUnwindSafe(|| {
                        conn.transaction(|c| {
                            insert(c, id)?;
                            hooks(c, id);
                            match action {
                                0 => Ok(()),
                                1 => {
                                    let inner = id + SAVEPOINT_OFFSET;
                                    let r: QueryResult<()> = c.transaction(|c| {
                                        insert(c, inner)?;
                                        hooks(c, inner);
                                        Err(Error::RollbackTransaction)
                                    });
                                    assert!(r.is_err());
                                    Ok(())
                                }
                                2 => Err(Error::RollbackTransaction),
                                _ => panic!("stress panic"),
                            }
                        })
                    }));
                    match (action, run) {
                        (0 | 1, Ok(Ok(()))) => {}
                        (2, Ok(Err(Error::RollbackTransaction))) => {}
                        (3, Err(_)) => {}
                        (a, r) => panic!("action {a}: unexpected {:?}", r.map(|r| r.is_ok())),
                    }
                }
            });
        }
    });

    let rows: Vec<i32> = items::table
        .filter(items::tag.eq(&tag))
        .select(items::v)
        .load(&mut common::pg_plain())
        .unwrap();
    let ledger = ledger.lock().unwrap();
    let attempted = attempted.lock().unwrap();
    let mut rows_sorted = rows.clone();
    rows_sorted.sort_unstable();
    let mut committed: Vec<i32> = ledger.commit.keys().copied().collect();
    committed.sort_unstable();
    assert_eq!(
        committed, rows_sorted,
        "commit hooks ran for exactly the committed rows"
    );
    assert!(
        ledger.commit.values().all(|&n| n == 1),
        "each commit hook ran once"
    );
    assert!(
        ledger.rollback.values().all(|&n| n == 1),
        "each rollback hook ran once"
    );
    for id in &rows {
        assert!(
            !ledger.rollback.contains_key(id),
            "rollback hook ran for committed row {id}"
        );
    }
    // Every attempt is accounted for: committed ones by a commit hook, the rest by a rollback
    // hook (savepoint rows included).
    let mut expected_rows = 0;
    for (&id, &action) in attempted.iter() {
        match action {
            0 | 1 => {
                expected_rows += 1;
                assert_eq!(ledger.commit.get(&id), Some(&1), "id {id}");
            }
            _ => assert_eq!(
                ledger.rollback.get(&id),
                Some(&1),
                "id {id} (action {action})"
            ),
        }
        if action == 1 {
            let inner = id + SAVEPOINT_OFFSET;
            assert_eq!(ledger.rollback.get(&inner), Some(&1), "savepoint {inner}");
            assert!(!ledger.commit.contains_key(&inner));
        }
    }
    assert_eq!(rows.len(), expected_rows);
    assert_eq!(attempted.len(), (THREADS * PER_THREAD) as usize);
}
