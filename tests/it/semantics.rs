//! The semantics of hooks, written once and run on SQLite and on PostgreSQL.
//!
//! Numbers in test names refer to the list in the core issue (README "When hooks run").

#![cfg_attr(
    not(any(feature = "sqlite", feature = "postgres", feature = "mysql")),
    allow(unused)
)]

use crate::common;

use common::{failures, failures_of};

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use diesel_transaction_signals::FailureCause;

macro_rules! semantic_suite {
    (
        $backend:ident, $conn:ty, $connect:expr, swallowed_error_aborts: $swallow_aborts:expr
        $(, commit_fails_with: $violate_at_commit:path => $commit_error_kind:pat)? $(,)?
    ) => {
        mod $backend {
            use super::*;
            use crate::common::{self, items, Recorder};
            use diesel::connection::TransactionManager;
            use diesel::prelude::*;
            use diesel::result::{DatabaseErrorKind, Error};
            use diesel_transaction_signals::{
                defer, in_transaction, SignalConnection, TransactionAborted,
            };

            type Conn = SignalConnection<$conn>;
            type Manager = <Conn as Connection>::TransactionManager;

            fn connect() -> Conn {
                $connect()
            }

            fn insert(conn: &mut Conn, tag: &str, v: i32) -> QueryResult<usize> {
                diesel::insert_into(items::table)
                    .values((items::tag.eq(tag), items::v.eq(v)))
                    .execute(conn)
            }

            fn values(conn: &mut Conn, tag: &str) -> Vec<i32> {
                items::table
                    .filter(items::tag.eq(tag))
                    .select(items::v)
                    .order(items::v)
                    .load(conn)
                    .unwrap()
            }

            // 1. Outside a transaction.
            #[test]
            fn s01_outside_a_transaction_commit_hooks_run_at_once_rollback_hooks_never() {
                let logs = common::logger();
                let mut conn = connect();
                let rec = Recorder::new();
                conn.on_commit(rec.hook("on_commit"));
                assert_eq!(rec.take(), ["on_commit"]);
                defer(rec.hook("defer"));
                assert_eq!(rec.take(), ["defer"]);
                conn.on_complete(rec.outcome("complete"));
                assert_eq!(rec.take(), ["complete:Committed"]);
                let guard = Arc::new(());
                let held = guard.clone();
                conn.on_rollback(move || drop(held));
                assert!(rec.take().is_empty());
                assert_eq!(
                    Arc::strong_count(&guard),
                    1,
                    "the rollback hook was dropped"
                );
                assert!(
                    !logs
                        .matching(
                            log::Level::Debug,
                            &[
                                "on_rollback hook",
                                "never runs",
                                &format!("(connection {})", conn.id()),
                            ]
                        )
                        .is_empty(),
                    "dropping it is recorded"
                );
            }

            // 2. Commit hooks run after the outermost COMMIT, never at RELEASE, in
            // registration order across levels.
            #[test]
            fn s02_commit_hooks_run_after_outermost_commit_in_registration_order() {
                let mut conn = connect();
                let tag = common::unique_tag("s02");
                let rec = Recorder::new();
                conn.transaction(|c| {
                    c.on_commit(rec.hook("a"));
                    insert(c, &tag, 1)?;
                    c.transaction(|c| {
                        c.on_commit(rec.hook("b"));
                        defer(rec.hook("c"));
                        c.transaction(|c| {
                            c.on_commit(rec.hook("d"));
                            insert(c, &tag, 2)
                        })?;
                        assert!(rec.get().is_empty(), "nothing runs at RELEASE SAVEPOINT");
                        QueryResult::Ok(())
                    })?;
                    assert!(rec.get().is_empty(), "nothing runs at RELEASE SAVEPOINT");
                    c.on_commit(rec.hook("e"));
                    QueryResult::Ok(())
                })
                .unwrap();
                assert_eq!(rec.take(), ["a", "b", "c", "d", "e"]);
                assert_eq!(values(&mut conn, &tag), [1, 2]);
            }

            // 3. A savepoint that rolls back discards its commit hooks (and its nested
            // levels'), runs their rollback hooks at that moment; the outer goes on.
            #[test]
            fn s03_savepoint_rollback_discards_its_commit_hooks_and_runs_its_rollback_hooks() {
                let mut conn = connect();
                let tag = common::unique_tag("s03");
                let rec = Recorder::new();
                let freed = Arc::new(());
                conn.transaction(|c| {
                    c.on_commit(rec.hook("outer commit"));
                    c.on_rollback(rec.hook("outer rollback"));
                    insert(c, &tag, 1)?;
                    let held = freed.clone();
                    let r: QueryResult<()> = c.transaction(|c| {
                        insert(c, &tag, 2)?;
                        c.on_commit(move || drop(held));
                        c.on_rollback(rec.hook("sp rollback"));
                        c.on_complete(rec.outcome("sp complete"));
                        c.transaction(|c| {
                            insert(c, &tag, 3)?;
                            c.on_commit(rec.hook("nested commit"));
                            c.on_rollback(rec.hook("nested rollback"));
                            QueryResult::Ok(())
                        })?;
                        Err(Error::RollbackTransaction)
                    });
                    assert_eq!(r, Err(Error::RollbackTransaction));
                    assert_eq!(
                        rec.take(),
                        ["sp rollback", "sp complete:RolledBack", "nested rollback"],
                        "rollback hooks of the savepoint ran at once"
                    );
                    assert_eq!(Arc::strong_count(&freed), 1, "discarded hook freed at once");
                    assert_eq!(c.transaction_depth(), 1);
                    insert(c, &tag, 4)?;
                    QueryResult::Ok(())
                })
                .unwrap();
                assert_eq!(rec.take(), ["outer commit"]);
                assert_eq!(values(&mut conn, &tag), [1, 4]);
            }

            // 4. An outermost rollback runs every live rollback hook once and no commit hook.
            #[test]
            fn s04_outer_rollback_runs_every_live_rollback_hook_once() {
                let mut conn = connect();
                let tag = common::unique_tag("s04");
                let rec = Recorder::new();
                let r: QueryResult<()> = conn.transaction(|c| {
                    insert(c, &tag, 1)?;
                    c.on_rollback(rec.hook("r1"));
                    c.on_commit(rec.hook("c1"));
                    c.transaction(|c| {
                        c.on_rollback(rec.hook("r2"));
                        c.on_commit(rec.hook("c2"));
                        c.on_complete(rec.outcome("k2"));
                        insert(c, &tag, 2)
                    })?;
                    let _: QueryResult<()> = c.transaction(|c| {
                        c.on_rollback(rec.hook("r3"));
                        Err(Error::RollbackTransaction)
                    });
                    assert_eq!(rec.take(), ["r3"]);
                    Err(Error::RollbackTransaction)
                });
                assert_eq!(r, Err(Error::RollbackTransaction));
                assert_eq!(rec.take(), ["r1", "r2", "k2:RolledBack"]);
                assert!(values(&mut conn, &tag).is_empty());
                // Nothing is left to run later.
                conn.transaction(|_| QueryResult::Ok(())).unwrap();
                assert!(rec.take().is_empty());
            }

            $(
            // 5. COMMIT fails: no commit hook, rollback hooks run, the database's error is
            // returned as it is, and the connection is usable afterwards.
            #[test]
            fn s05_failed_commit_runs_rollback_hooks_and_returns_the_database_error() {
                let mut conn = connect();
                let tag = common::unique_tag("s05");
                let rec = Recorder::new();
                let r: QueryResult<()> = conn.transaction(|c| {
                    insert(c, &tag, 1)?;
                    c.on_commit(rec.hook("commit"));
                    c.on_rollback(rec.hook("rollback"));
                    c.on_complete(rec.outcome("complete"));
                    $violate_at_commit(c, &tag);
                    Ok(())
                });
                match r {
                    Err(Error::DatabaseError($commit_error_kind, _)) => {}
                    other => panic!("expected the database's commit error, got {other:?}"),
                }
                assert_eq!(rec.take(), ["rollback", "complete:RolledBack"]);
                assert!(values(&mut conn, &tag).is_empty());
                assert_eq!(conn.transaction_depth(), 0);
                // Usable afterwards.
                conn.transaction(|c| {
                    c.on_commit(rec.hook("next"));
                    insert(c, &tag, 2)
                })
                .unwrap();
                assert_eq!(rec.take(), ["next"]);
                assert_eq!(values(&mut conn, &tag), [2]);
            }
            )?

            // 6. A swallowed database error: PostgreSQL aborts the transaction and would turn
            // COMMIT into ROLLBACK; SQLite only fails the statement and commits the rest.
            #[test]
            fn s06_swallowed_error_is_detected_where_the_database_aborts() {
                let mut conn = connect();
                let tag = common::unique_tag("s06");
                let rec = Recorder::new();
                let r: QueryResult<()> = conn.transaction(|c| {
                    insert(c, &tag, 1)?;
                    c.on_commit(rec.hook("commit"));
                    c.on_rollback(rec.hook("rollback"));
                    c.on_complete(rec.outcome("complete"));
                    let dup = insert(c, &tag, 1);
                    assert!(
                        matches!(
                            dup,
                            Err(Error::DatabaseError(DatabaseErrorKind::UniqueViolation, _))
                        ),
                        "{dup:?}"
                    );
                    Ok(()) // the error is swallowed
                });
                if $swallow_aborts {
                    let err = r.expect_err("an aborted transaction must not report success");
                    assert!(TransactionAborted::is(&err), "{err:?}");
                    assert_eq!(rec.take(), ["rollback", "complete:RolledBack"]);
                    assert!(values(&mut conn, &tag).is_empty());
                } else {
                    r.unwrap();
                    assert_eq!(rec.take(), ["commit", "complete:Committed"]);
                    assert_eq!(values(&mut conn, &tag), [1]);
                }
                assert_eq!(conn.transaction_depth(), 0);
                conn.transaction(|c| insert(c, &tag, 2)).unwrap();
                assert!(values(&mut conn, &tag).contains(&2));
            }

            // 6b. A swallowed error inside a savepoint: the savepoint is rolled back, the
            // outer transaction still commits.
            #[test]
            fn s06b_swallowed_error_inside_a_savepoint_rolls_back_only_the_savepoint() {
                let mut conn = connect();
                let tag = common::unique_tag("s06b");
                let rec = Recorder::new();
                conn.transaction(|c| {
                    insert(c, &tag, 1)?;
                    c.on_commit(rec.hook("outer commit"));
                    let r: QueryResult<()> = c.transaction(|c| {
                        c.on_commit(rec.hook("sp commit"));
                        c.on_rollback(rec.hook("sp rollback"));
                        let _ = insert(c, &tag, 1); // duplicate, swallowed
                        Ok(())
                    });
                    if $swallow_aborts {
                        assert!(r.is_err(), "the savepoint could not be released");
                        assert_eq!(rec.take(), ["sp rollback"]);
                    } else {
                        r.unwrap();
                    }
                    QueryResult::Ok(())
                })
                .unwrap();
                if $swallow_aborts {
                    assert_eq!(rec.take(), ["outer commit"]);
                } else {
                    assert_eq!(rec.take(), ["outer commit", "sp commit"]);
                }
                assert_eq!(values(&mut conn, &tag), [1]);
            }

            // 8. The closure panics: rolled back, rollback hooks run, commit hooks discarded,
            // the panic continues, the connection is usable.
            #[test]
            fn s08_panicking_closure_rolls_back_and_leaves_the_connection_usable() {
                let mut conn = connect();
                let tag = common::unique_tag("s08");
                let rec = Recorder::new();
                let caught = catch_unwind(AssertUnwindSafe(|| {
                    let _: QueryResult<()> = conn.transaction(|c| {
                        insert(c, &tag, 1)?;
                        c.on_commit(rec.hook("commit"));
                        c.on_rollback(rec.hook("rollback"));
                        c.on_complete(rec.outcome("complete"));
                        panic!("boom");
                    });
                }));
                let payload = caught.expect_err("the panic continues");
                assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom"));
                assert_eq!(rec.take(), ["rollback", "complete:RolledBack"]);
                assert_eq!(conn.transaction_depth(), 0);
                assert!(!in_transaction());
                assert!(values(&mut conn, &tag).is_empty());
                conn.transaction(|c| {
                    c.on_commit(rec.hook("after"));
                    insert(c, &tag, 2)
                })
                .unwrap();
                assert_eq!(rec.take(), ["after"]);
                assert_eq!(values(&mut conn, &tag), [2]);
            }

            #[test]
            fn s08b_panic_in_a_savepoint_rolls_back_only_the_savepoint() {
                let mut conn = connect();
                let tag = common::unique_tag("s08b");
                let rec = Recorder::new();
                conn.transaction(|c| {
                    insert(c, &tag, 1)?;
                    c.on_commit(rec.hook("outer"));
                    let caught = catch_unwind(AssertUnwindSafe(|| {
                        let _: QueryResult<()> = c.transaction(|c| {
                            insert(c, &tag, 2)?;
                            c.on_commit(rec.hook("inner commit"));
                            c.on_rollback(rec.hook("inner rollback"));
                            panic!("inner boom");
                        });
                    }));
                    assert!(caught.is_err());
                    assert_eq!(rec.take(), ["inner rollback"]);
                    assert_eq!(c.transaction_depth(), 1);
                    insert(c, &tag, 3)
                })
                .unwrap();
                assert_eq!(rec.take(), ["outer"]);
                assert_eq!(values(&mut conn, &tag), [1, 3]);
            }

            // 9. A hook that fails does not stop the others nor fail the commit.
            #[test]
            fn s09_failing_hooks_are_caught_reported_and_do_not_stop_the_others() {
                let logs = common::logger();
                let _ = failures();
                let mut conn = connect();
                let id = conn.id();
                let rec = Recorder::new();
                conn.transaction(|c| {
                    c.on_commit(rec.hook("first"));
                    c.on_commit(|| panic!("hook exploded"));
                    fn send() -> Result<(), String> {
                        Err("smtp unreachable".into())
                    }
                    defer!(send());
                    c.on_complete(|_| panic!("complete exploded"));
                    c.on_commit(rec.hook("last"));
                    QueryResult::Ok(())
                })
                .expect("a failing hook never turns a commit into an error");
                assert_eq!(rec.take(), ["first", "last"]);
                assert_eq!(
                    failures_of(id),
                    [
                        FailureCause::Panicked("hook exploded".into()),
                        FailureCause::Returned("smtp unreachable".into()),
                        FailureCause::Panicked("complete exploded".into()),
                    ]
                );
                let id_text = format!("(connection {id})");
                assert_eq!(
                    logs.matching(log::Level::Error, &["hook exploded", &id_text])
                        .len(),
                    1
                );
                // Rollback hooks too.
                let _: QueryResult<()> = conn.transaction(|c| {
                    c.on_rollback(|| panic!("rollback hook exploded"));
                    c.on_rollback(rec.hook("second rollback hook"));
                    Err(Error::RollbackTransaction)
                });
                assert_eq!(rec.take(), ["second rollback hook"]);
                assert_eq!(failures_of(id).len(), 4);
            }

            // 10. Hooks never cross connections or threads.
            #[test]
            fn s10_hooks_stay_with_their_connection_and_defer_goes_to_the_innermost() {
                let mut a = connect();
                let mut b = connect();
                let rec = Recorder::new();
                a.transaction(|a| {
                    a.on_commit(rec.hook("a1"));
                    b.transaction(|b| {
                        b.on_commit(rec.hook("b1"));
                        defer(rec.hook("deferred in b"));
                        QueryResult::Ok(())
                    })?;
                    assert_eq!(
                        rec.take(),
                        ["b1", "deferred in b"],
                        "b's commit runs b's hooks only"
                    );
                    defer(rec.hook("deferred in a"));
                    QueryResult::Ok(())
                })
                .unwrap();
                assert_eq!(rec.take(), ["a1", "deferred in a"]);

                // A rollback of b does not touch a's hooks, and the other way round.
                a.transaction(|a| {
                    a.on_commit(rec.hook("a2"));
                    let _: QueryResult<()> = b.transaction(|b| {
                        b.on_commit(rec.hook("b2"));
                        defer(rec.hook("deferred in b2"));
                        Err(Error::RollbackTransaction)
                    });
                    QueryResult::Ok(())
                })
                .unwrap();
                assert_eq!(rec.take(), ["a2"]);
            }

            #[test]
            fn s10b_on_commit_from_a_scoped_thread_attaches_to_the_connections_transaction() {
                let mut conn = connect();
                let rec = Recorder::new();
                conn.transaction(|c| {
                    std::thread::scope(|s| {
                        s.spawn(|| {
                            c.on_commit(rec.hook("from scoped thread"));
                            // That thread has no transaction of its own: defer runs at once.
                            defer(rec.hook("defer on scoped thread"));
                        })
                        .join()
                        .unwrap();
                    });
                    assert_eq!(rec.take(), ["defer on scoped thread"]);
                    QueryResult::Ok(())
                })
                .unwrap();
                assert_eq!(rec.take(), ["from scoped thread"]);
            }

            #[test]
            fn s10c_nested_transaction_on_a_scoped_thread_registers_there() {
                let mut conn = connect();
                let rec = Recorder::new();
                conn.transaction(|c| {
                    std::thread::scope(|s| {
                        s.spawn(|| {
                            c.transaction(|_| {
                                defer(rec.hook("deferred in savepoint on scoped thread"));
                                QueryResult::Ok(())
                            })
                            .unwrap();
                        })
                        .join()
                        .unwrap();
                    });
                    assert!(rec.get().is_empty());
                    QueryResult::Ok(())
                })
                .unwrap();
                assert_eq!(rec.take(), ["deferred in savepoint on scoped thread"]);
            }

            #[test]
            fn s10d_defers_to_nested_connections_wait_apart_in_order() {
                let mut a = connect();
                let mut b = connect();
                let rec = Recorder::new();
                a.transaction(|a| {
                    defer(rec.hook("a1"));
                    b.transaction(|_| {
                        // a1 still waits on this thread, for a; b1 is b's.
                        defer(rec.hook("b1"));
                        QueryResult::Ok(())
                    })?;
                    assert_eq!(rec.take(), ["b1"], "b's commit runs b's deferred hook only");
                    let _: QueryResult<()> = b.transaction(|_| {
                        defer(rec.hook("b2 rolled back"));
                        Err(Error::RollbackTransaction)
                    });
                    defer(rec.hook("a2"));
                    a.on_commit(rec.hook("a3"));
                    assert!(rec.get().is_empty());
                    QueryResult::Ok(())
                })
                .unwrap();
                assert_eq!(rec.take(), ["a1", "a2", "a3"]);
            }

            /// Ends `c`'s innermost level with a raw manager call on a scoped thread.
            fn commit_from_another_thread(c: &mut Conn) {
                std::thread::scope(|s| {
                    s.spawn(move || Manager::commit_transaction(c).unwrap())
                        .join()
                        .unwrap();
                });
            }

            #[test]
            fn s10e_a_level_ended_on_another_thread_settles_the_hooks_deferred_here_with_its_fate() {
                let mut conn = connect();
                let rec = Recorder::new();
                // Raw manager calls from a scoped thread end the closure's level behind it.
                let result = conn.transaction(|c| {
                    defer(rec.hook("deferred before"));
                    commit_from_another_thread(c);
                    defer(rec.hook("deferred after"));
                    QueryResult::Ok(())
                });
                assert!(result.is_ok());
                assert_eq!(rec.take(), ["deferred before", "deferred after"]);
                assert!(!in_transaction(), "the thread's registry forgot the level");
                defer(rec.hook("outside"));
                assert_eq!(rec.take(), ["outside"]);

                // A savepoint released on another thread: its deferred hooks join the
                // enclosing level, which then rolls back.
                let _: QueryResult<()> = conn.transaction(|c| {
                    c.transaction(|c| {
                        defer(rec.hook("commit hook of the released savepoint"));
                        commit_from_another_thread(c);
                        QueryResult::Ok(())
                    })?;
                    assert!(in_transaction(), "the outer level is still this thread's");
                    defer(rec.hook("outer commit hook"));
                    Err(Error::RollbackTransaction)
                });
                assert!(rec.get().is_empty(), "nothing commits: {:?}", rec.get());
                conn.transaction(|c| {
                    c.transaction(|c| {
                        defer(rec.hook("released elsewhere, then committed"));
                        commit_from_another_thread(c);
                        QueryResult::Ok(())
                    })
                })
                .unwrap();
                assert_eq!(rec.take(), ["released elsewhere, then committed"]);
                assert!(!in_transaction());
            }

            #[test]
            fn s10f_a_connection_moved_to_another_thread_mid_transaction_keeps_its_hooks() {
                let mut conn = connect();
                let rec = Recorder::new();
                // A bare begin: the level may end on another thread (a shared level).
                Manager::begin_transaction(&mut conn).unwrap();
                defer(rec.hook("deferred on the first thread"));
                assert!(in_transaction());
                let there = rec.clone();
                let conn = std::thread::spawn(move || {
                    let mut conn = conn;
                    assert!(!in_transaction(), "the level was opened on the other thread");
                    conn.on_commit(there.hook("registered on the second thread"));
                    Manager::commit_transaction(&mut conn).unwrap();
                    conn
                })
                .join()
                .unwrap();
                assert_eq!(
                    rec.take(),
                    ["deferred on the first thread", "registered on the second thread"]
                );
                assert!(!in_transaction(), "this thread's entry for the level is stale");
                defer(rec.hook("after"));
                assert_eq!(rec.take(), ["after"], "defer runs at once again");
                drop(conn);
            }

            #[test]
            fn s10g_a_level_ended_out_of_order_settles_the_hooks_deferred_to_it_with_its_fate() {
                let mut a = connect();
                let mut b = connect();
                let rec = Recorder::new();
                let result = a.transaction(|a| {
                    defer(rec.hook("a before"));
                    b.transaction(|_| {
                        // A raw manager call ends a's level while b's is the innermost.
                        Manager::commit_transaction(a).unwrap();
                        defer(rec.hook("b inner"));
                        QueryResult::Ok(())
                    })?;
                    // b's end uncovers a's level, which has already committed.
                    defer(rec.hook("a after"));
                    QueryResult::Ok(())
                });
                assert!(result.is_ok());
                assert_eq!(rec.take(), ["a before", "b inner", "a after"]);
                assert!(!in_transaction(), "the thread's registry forgot both levels");
                defer(rec.hook("outside"));
                assert_eq!(rec.take(), ["outside"]);
            }

            // 11. At most once, freed after; hooks registered by running hooks.
            #[test]
            fn s11_hooks_run_once_are_freed_and_may_register_hooks() {
                let mut conn = connect();
                let rec = Recorder::new();
                let token = Arc::new(());
                let held = token.clone();
                let inner_rec = rec.clone();
                conn.transaction(|c| {
                    c.on_commit(move || {
                        let _keep = held;
                        inner_rec.push("outer hook");
                        // No transaction is open while hooks run: this runs at once.
                        defer(inner_rec.hook("registered by a hook"));
                        inner_rec.push("outer hook end");
                    });
                    QueryResult::Ok(())
                })
                .unwrap();
                assert_eq!(
                    rec.take(),
                    ["outer hook", "registered by a hook", "outer hook end"]
                );
                assert_eq!(Arc::strong_count(&token), 1, "captured values are freed");
                conn.transaction(|_| QueryResult::Ok(())).unwrap();
                assert!(rec.take().is_empty(), "nothing runs twice");
            }

            #[test]
            fn s11b_a_hook_that_opens_a_transaction_registers_into_it() {
                let mut conn = connect();
                let other = connect();
                let rec = Recorder::new();
                let r2 = rec.clone();
                let other = Mutex::new(other);
                let other = Arc::new(other);
                let o = other.clone();
                conn.transaction(|c| {
                    c.on_commit(move || {
                        let mut other = o.lock().unwrap();
                        other
                            .transaction(|_| {
                                defer(r2.hook("deferred inside the hook's transaction"));
                                assert!(r2.get().is_empty(), "waits for that transaction");
                                QueryResult::Ok(())
                            })
                            .unwrap();
                    });
                    QueryResult::Ok(())
                })
                .unwrap();
                assert_eq!(rec.take(), ["deferred inside the hook's transaction"]);
            }

            // 12. A connection dropped inside a transaction runs its rollback hooks; the
            // registry keeps nothing of it.
            #[test]
            fn s12_dropping_a_connection_inside_a_transaction_runs_rollback_hooks() {
                let mut conn = connect();
                let rec = Recorder::new();
                Manager::begin_transaction(&mut conn).unwrap();
                Manager::begin_transaction(&mut conn).unwrap();
                conn.on_commit(rec.hook("commit"));
                conn.on_rollback(rec.hook("rollback"));
                defer(rec.hook("deferred"));
                conn.on_complete(rec.outcome("complete"));
                assert!(in_transaction());
                drop(conn);
                assert_eq!(rec.take(), ["rollback", "complete:RolledBack"]);
                assert!(!in_transaction(), "the registry forgot the connection");
                defer(rec.hook("after drop"));
                assert_eq!(rec.take(), ["after drop"], "defer runs at once again");
            }

            // 13. A test transaction never commits; its hooks can be captured and run.
            #[test]
            fn s13_test_transaction_hooks_never_run_on_their_own_and_can_be_captured() {
                let rec = Recorder::new();
                let tag = common::unique_tag("s13");
                {
                    let mut conn = connect();
                    conn.begin_test_transaction().unwrap();
                    conn.on_commit(rec.hook("commit"));
                    conn.on_rollback(rec.hook("rollback"));
                    let ((), captured) = conn
                        .capture_hooks(|c| {
                            insert(c, &tag, 1).unwrap();
                            c.on_commit(rec.hook("captured commit"));
                            c.transaction(|c| {
                                c.on_commit(rec.hook("captured from savepoint"));
                                QueryResult::Ok(())
                            })
                            .unwrap();
                            let _: QueryResult<()> = c.transaction(|c| {
                                c.on_commit(rec.hook("discarded with savepoint"));
                                c.on_rollback(rec.hook("savepoint rollback"));
                                Err(Error::RollbackTransaction)
                            });
                        })
                        .unwrap();
                    assert_eq!(rec.take(), ["savepoint rollback"]);
                    assert_eq!(captured.len(), 2);
                    assert_eq!(captured.run_as_committed(), 2);
                    assert_eq!(rec.take(), ["captured commit", "captured from savepoint"]);
                    assert_eq!(values(&mut conn, &tag), [1]);
                }
                assert!(
                    rec.take().is_empty(),
                    "the test transaction's own hooks never ran"
                );
                let mut conn = connect();
                assert!(matches!(
                    conn.capture_hooks(|_| ()),
                    Err(Error::NotInTransaction)
                ));
            }

            // `into_inner` inside a transaction: the wrapper can no longer see the outcome.
            #[test]
            fn into_inner_inside_a_transaction_settles_unknown_and_logs_what_it_drops() {
                let logs = common::logger();
                let mut conn = connect();
                let label = format!("(connection {})", conn.id());
                let rec = Recorder::new();
                Manager::begin_transaction(&mut conn).unwrap();
                conn.on_commit(rec.hook("commit"));
                conn.on_rollback(rec.hook("rollback"));
                conn.on_complete(rec.outcome("complete"));
                let inner = conn.into_inner();
                assert_eq!(rec.take(), ["complete:Unknown"]);
                assert_eq!(
                    logs.matching(log::Level::Error, &["dropped unrun", &label]).len(),
                    2
                );
                assert!(!in_transaction(), "the registry forgot the level");
                drop(inner);
            }

            // Manager calls (as pools make them) settle hooks as `transaction` does.
            #[test]
            fn manager_calls_settle_hooks_like_transaction() {
                let mut conn = connect();
                let rec = Recorder::new();
                Manager::begin_transaction(&mut conn).unwrap();
                conn.on_commit(rec.hook("c1"));
                Manager::begin_transaction(&mut conn).unwrap();
                conn.on_commit(rec.hook("c2"));
                conn.on_rollback(rec.hook("r2"));
                Manager::rollback_transaction(&mut conn).unwrap();
                assert_eq!(rec.take(), ["r2"]);
                Manager::commit_transaction(&mut conn).unwrap();
                assert_eq!(rec.take(), ["c1"]);
                assert!(matches!(
                    Manager::commit_transaction(&mut conn),
                    Err(Error::NotInTransaction)
                ));
            }

            #[test]
            fn on_complete_reports_each_outcome() {
                let mut conn = connect();
                let rec = Recorder::new();
                conn.transaction(|c| {
                    c.on_complete(rec.outcome("commit"));
                    QueryResult::Ok(())
                })
                .unwrap();
                let _: QueryResult<()> = conn.transaction(|c| {
                    c.on_complete(rec.outcome("rollback"));
                    Err(Error::RollbackTransaction)
                });
                assert_eq!(rec.take(), ["commit:Committed", "rollback:RolledBack"]);
            }
        }
    };
}

#[cfg(feature = "sqlite")]
fn violate_sqlite_fk(
    conn: &mut diesel_transaction_signals::SignalConnection<diesel::SqliteConnection>,
    _tag: &str,
) {
    use diesel::prelude::*;
    diesel::insert_into(common::children::table)
        .values(common::children::parent_id.eq(-1))
        .execute(conn)
        .expect("a deferred foreign key is only checked at COMMIT");
}

#[cfg(feature = "postgres")]
fn violate_pg_deferred_unique(
    conn: &mut diesel_transaction_signals::SignalConnection<diesel::PgConnection>,
    tag: &str,
) {
    use diesel::prelude::*;
    for _ in 0..2 {
        diesel::insert_into(common::deferred_items::table)
            .values((
                common::deferred_items::tag.eq(tag),
                common::deferred_items::v.eq(1),
            ))
            .execute(conn)
            .expect("a deferred unique constraint is only checked at COMMIT");
    }
}

#[cfg(feature = "sqlite")]
semantic_suite!(
    sqlite,
    diesel::SqliteConnection,
    crate::common::sqlite,
    swallowed_error_aborts: false,
    commit_fails_with: crate::semantics::violate_sqlite_fk => DatabaseErrorKind::ForeignKeyViolation,
);

#[cfg(feature = "postgres")]
semantic_suite!(
    postgres,
    diesel::PgConnection,
    crate::common::pg,
    swallowed_error_aborts: true,
    commit_fails_with: crate::semantics::violate_pg_deferred_unique => DatabaseErrorKind::UniqueViolation,
);

// MySQL has no deferred constraints: nothing makes its COMMIT fail but a lost connection
// (tests/it/mysql.rs). A failed statement does not abort the transaction.
#[cfg(feature = "mysql")]
semantic_suite!(
    mysql,
    diesel::MysqlConnection,
    crate::common::mysql,
    swallowed_error_aborts: false,
);
