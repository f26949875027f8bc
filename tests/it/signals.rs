//! Process-wide signals, `before_commit` and aliases, on SQLite and PostgreSQL.
//!
//! Signals are process-wide and tests run in parallel, so every receiver here only records
//! events of the connection alias its test chose.

#![cfg(all(feature = "sqlite", feature = "postgres"))]
use crate::common;

use std::sync::{Arc, Mutex};

use diesel_transaction_signals::signals::TransactionEvent;

/// Records `(signal, outcome, hooks ran, hooks discarded)` for events of one alias.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<String>>>);

impl Events {
    fn receiver(
        &self,
        name: &'static str,
        alias: &str,
    ) -> impl Fn(&TransactionEvent) + Send + Sync + 'static {
        let this = self.clone();
        let alias = alias.to_owned();
        move |e| {
            if e.alias() == Some(alias.as_str()) {
                this.0.lock().unwrap().push(format!(
                    "{name}:{:?}:{}:{}",
                    e.outcome(),
                    e.hooks_ran(),
                    e.hooks_discarded()
                ));
            }
        }
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

macro_rules! signal_suite {
    ($backend:ident, $conn:ty, $connect:expr, $name:expr, $swallow_aborts:expr) => {
        mod $backend {
            use super::*;
            use crate::common::{self, items, Recorder};
            use diesel::prelude::*;
            use diesel::result::Error;
            use diesel_transaction_signals::signals::{
                Veto, POST_COMMIT, POST_COMPLETE, POST_ROLLBACK, PRE_COMMIT,
            };
            use diesel_transaction_signals::{SignalConnection, TransactionAborted};
            use std::panic::{catch_unwind, AssertUnwindSafe};

            type Conn = SignalConnection<$conn>;

            fn connect(alias: &str) -> Conn {
                $connect().with_alias(alias.to_owned())
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

            /// Connects recorders for all four signals, for events of `alias`.
            fn listen(alias: &str) -> (Events, impl Drop) {
                let events = Events::default();
                let pre = {
                    let record = events.receiver("pre", alias);
                    PRE_COMMIT.connect_guard(move |e| {
                        record(e);
                        Ok(())
                    })
                };
                let guards = (
                    pre,
                    POST_COMMIT.connect_guard(events.receiver("commit", alias)),
                    POST_ROLLBACK.connect_guard(events.receiver("rollback", alias)),
                    POST_COMPLETE.connect_guard(events.receiver("complete", alias)),
                );
                struct Guards<T>(#[allow(dead_code)] T);
                impl<T> Drop for Guards<T> {
                    fn drop(&mut self) {}
                }
                (events, Guards(guards))
            }

            #[test]
            fn signals_fire_once_per_outermost_transaction_with_its_facts() {
                let alias = common::unique_tag("sig-facts");
                let (events, _guards) = listen(&alias);
                let mut conn = connect(&alias);
                let seen: Arc<Mutex<Vec<TransactionEvent>>> = Arc::default();
                let sink = seen.clone();
                let wanted = alias.clone();
                let _detail = POST_COMMIT.connect_guard(move |e| {
                    if e.alias() == Some(wanted.as_str()) {
                        sink.lock().unwrap().push(e.clone());
                    }
                });
                conn.transaction(|c| {
                    c.on_commit(|| {});
                    c.on_rollback(|| {});
                    c.transaction(|c| {
                        c.on_commit(|| {});
                        QueryResult::Ok(())
                    })?;
                    let _: QueryResult<()> = c.transaction(|c| {
                        c.on_rollback(|| {});
                        c.on_commit(|| {});
                        Err(Error::RollbackTransaction)
                    });
                    QueryResult::Ok(())
                })
                .unwrap();
                // Savepoint: 1 ran, 1 discarded. Outermost: 2 ran, 1 discarded.
                assert_eq!(
                    events.take(),
                    [
                        "pre:None:1:1",
                        "commit:Some(Committed):3:2",
                        "complete:Some(Committed):3:2"
                    ]
                );
                let detail = seen.lock().unwrap().pop().unwrap();
                assert_eq!(detail.connection(), conn.id());
                assert_eq!(detail.backend(), $name);
                assert!(detail.duration() > std::time::Duration::ZERO);

                let _: QueryResult<()> = conn.transaction(|_| Err(Error::RollbackTransaction));
                assert_eq!(
                    events.take(),
                    [
                        "rollback:Some(RolledBack):0:0",
                        "complete:Some(RolledBack):0:0"
                    ]
                );
                // Outside a transaction and inside a test transaction: nothing.
                conn.on_commit(|| {});
                conn.begin_test_transaction().unwrap();
                conn.transaction(|_| QueryResult::Ok(())).unwrap();
                drop(conn);
                assert!(events.take().is_empty());
            }

            #[test]
            fn pre_commit_veto_rolls_back_and_returns_the_veto() {
                let alias = common::unique_tag("sig-veto");
                let tag = alias.clone();
                let (events, _guards) = listen(&alias);
                let wanted = alias.clone();
                let _veto = PRE_COMMIT.connect_guard(move |e| {
                    if e.alias() == Some(wanted.as_str()) {
                        Err(Veto::new("quota exceeded"))
                    } else {
                        Ok(())
                    }
                });
                let after_veto = Recorder::new();
                let wanted = alias.clone();
                let r2 = after_veto.clone();
                let _later = PRE_COMMIT.connect_guard(move |e| {
                    if e.alias() == Some(wanted.as_str()) {
                        r2.push("later receiver ran");
                    }
                    Ok(())
                });
                let mut conn = connect(&alias);
                let rec = Recorder::new();
                let r: QueryResult<()> = conn.transaction(|c| {
                    insert(c, &tag, 1)?;
                    c.on_commit(rec.hook("commit"));
                    c.on_rollback(rec.hook("rollback"));
                    c.before_commit(|_| panic!("never reached: the veto comes first"))?;
                    Ok(())
                });
                let err = r.expect_err("vetoed");
                assert_eq!(
                    Veto::from_error(&err).map(Veto::message),
                    Some("quota exceeded")
                );
                assert_eq!(rec.take(), ["rollback"]);
                assert_eq!(
                    after_veto.take(),
                    ["later receiver ran"],
                    "a veto stops no receiver"
                );
                let got = events.take();
                assert_eq!(got[0], "pre:None:0:0");
                assert!(
                    got.contains(&"rollback:Some(RolledBack):1:2".to_owned()),
                    "{got:?}"
                );
                assert!(values(&mut conn, &tag).is_empty());
                assert_eq!(conn.transaction_depth(), 0);
            }

            #[test]
            fn a_panicking_receiver_is_reported_and_stops_no_other() {
                let logs = common::logger();
                let alias = common::unique_tag("sig-panic");
                let (events, _guards) = listen(&alias);
                let wanted = alias.clone();
                let _bad = POST_COMMIT.connect_guard(move |e| {
                    if e.alias() == Some(wanted.as_str()) {
                        panic!("receiver exploded");
                    }
                });
                let (_events2, _guards2) = listen(&alias);
                let mut conn = connect(&alias);
                conn.transaction(|_| QueryResult::Ok(())).unwrap();
                assert_eq!(
                    events.take().len(),
                    3,
                    "pre, commit and complete still heard"
                );
                let reports = logs.matching(log::Level::Error, &["receiver exploded", &alias]);
                assert_eq!(reports.len(), 1, "{reports:?}");

                // A panicking PRE_COMMIT receiver refuses the commit.
                let wanted = alias.clone();
                let _bad_pre = PRE_COMMIT.connect_guard(move |e| {
                    if e.alias() == Some(wanted.as_str()) {
                        panic!("pre receiver exploded");
                    }
                    Ok(())
                });
                let r: QueryResult<()> = conn.transaction(|_| Ok(()));
                let veto = Veto::from_error(r.as_ref().unwrap_err())
                    .expect("a veto")
                    .clone();
                assert!(veto.message().contains("pre receiver exploded"), "{veto:?}");
            }

            #[test]
            fn connecting_and_disconnecting_inside_a_receiver_neither_deadlocks_nor_skips() {
                let alias = common::unique_tag("sig-reentrant");
                let calls = Recorder::new();
                let wanted = alias.clone();
                let rec = calls.clone();
                let self_id: Arc<Mutex<Option<diesel_transaction_signals::signals::ReceiverId>>> =
                    Arc::default();
                let me = self_id.clone();
                let id = POST_COMMIT.connect(move |e| {
                    if e.alias() != Some(wanted.as_str()) {
                        return;
                    }
                    rec.push("first");
                    // Connect a new receiver and disconnect this one, mid-send.
                    let rec2 = rec.clone();
                    let wanted2 = wanted.clone();
                    POST_COMMIT.connect(move |e| {
                        if e.alias() == Some(wanted2.as_str()) {
                            rec2.push("added during a send");
                        }
                    });
                    if let Some(id) = me.lock().unwrap().take() {
                        assert!(POST_COMMIT.disconnect(id));
                    }
                });
                *self_id.lock().unwrap() = Some(id);
                let wanted = alias.clone();
                let rec = calls.clone();
                let _second = POST_COMMIT.connect_guard(move |e| {
                    if e.alias() == Some(wanted.as_str()) {
                        rec.push("second");
                    }
                });
                let mut conn = connect(&alias);
                conn.transaction(|_| QueryResult::Ok(())).unwrap();
                assert_eq!(
                    calls.take(),
                    ["first", "second"],
                    "the send in progress is unchanged"
                );
                conn.transaction(|_| QueryResult::Ok(())).unwrap();
                assert_eq!(calls.take(), ["second", "added during a send"]);
                assert!(
                    !POST_COMMIT.disconnect(id),
                    "already disconnected by itself"
                );
            }

            #[test]
            fn before_commit_runs_queries_before_commit_in_order_and_honours_new_hooks() {
                let alias = common::unique_tag("before");
                let tag = alias.clone();
                let (events, _guards) = listen(&alias);
                let mut conn = connect(&alias);
                let rec = Recorder::new();
                conn.transaction(|c| {
                    insert(c, &tag, 1)?;
                    let (r, t) = (rec.clone(), tag.clone());
                    c.before_commit(move |c| {
                        r.push("before 1");
                        // Sees the transaction's own uncommitted row, writes another.
                        assert_eq!(values(c, &t), [1]);
                        insert(c, &t, 2)?;
                        let r2 = r.clone();
                        c.before_commit(move |_| {
                            r2.push("registered by before 1");
                            Ok(())
                        })?;
                        c.on_commit(r.hook("on_commit from before 1"));
                        c.on_rollback(r.hook("never"));
                        Ok(())
                    })?;
                    c.transaction(|c| {
                        c.before_commit({
                            let r = rec.clone();
                            move |_| {
                                r.push("before from released savepoint");
                                Ok(())
                            }
                        })
                    })?;
                    let _: QueryResult<()> = c.transaction(|c| {
                        c.before_commit(|_| panic!("discarded with its savepoint"))?;
                        Err(Error::RollbackTransaction)
                    });
                    c.on_commit(rec.hook("on_commit"));
                    assert!(rec.get().is_empty(), "before_commit waits for the COMMIT");
                    QueryResult::Ok(())
                })
                .unwrap();
                assert_eq!(
                    rec.take(),
                    [
                        "before 1",
                        "before from released savepoint",
                        "registered by before 1",
                        "on_commit",
                        "on_commit from before 1"
                    ]
                );
                assert_eq!(values(&mut conn, &tag), [1, 2]);
                assert_eq!(events.take()[0], "pre:None:0:1", "PRE_COMMIT came first");
                // Outside a transaction: runs at once.
                let outside = common::unique_tag("before-outside");
                let t = outside.clone();
                conn.before_commit(move |c| insert(c, &t, 1).map(drop))
                    .unwrap();
                assert_eq!(values(&mut conn, &outside), [1]);
            }

            #[test]
            fn before_commit_error_or_panic_rolls_everything_back() {
                let alias = common::unique_tag("before-err");
                let tag = alias.clone();
                let mut conn = connect(&alias);
                let rec = Recorder::new();
                let r: QueryResult<()> = conn.transaction(|c| {
                    insert(c, &tag, 1)?;
                    c.on_commit(rec.hook("commit"));
                    c.on_rollback(rec.hook("rollback"));
                    c.before_commit(|_| Err(Error::NotFound))?;
                    c.before_commit(|_| panic!("not reached after a failure"))?;
                    Ok(())
                });
                assert!(matches!(r, Err(Error::NotFound)), "{r:?}");
                assert_eq!(rec.take(), ["rollback"]);
                assert!(values(&mut conn, &tag).is_empty());

                let caught = catch_unwind(AssertUnwindSafe(|| {
                    let _: QueryResult<()> = conn.transaction(|c| {
                        insert(c, &tag, 2)?;
                        c.on_rollback(rec.hook("rollback after panic"));
                        c.before_commit(|_| panic!("before_commit exploded"))
                    });
                }));
                assert!(caught.is_err(), "the panic continues");
                assert_eq!(rec.take(), ["rollback after panic"]);
                assert_eq!(conn.transaction_depth(), 0);
                assert!(values(&mut conn, &tag).is_empty());
            }

            #[test]
            fn before_commit_that_swallows_a_database_error() {
                let alias = common::unique_tag("before-swallow");
                let tag = alias.clone();
                let mut conn = connect(&alias);
                let rec = Recorder::new();
                let r: QueryResult<()> = conn.transaction(|c| {
                    insert(c, &tag, 1)?;
                    c.on_commit(rec.hook("commit"));
                    let t = tag.clone();
                    c.before_commit(move |c| {
                        let _ = insert(c, &t, 1); // duplicate, swallowed
                        Ok(())
                    })?;
                    Ok(())
                });
                if $swallow_aborts {
                    assert!(TransactionAborted::is(&r.unwrap_err()));
                    assert!(rec.take().is_empty());
                    assert!(values(&mut conn, &tag).is_empty());
                } else {
                    r.unwrap();
                    assert_eq!(rec.take(), ["commit"]);
                }
            }

            #[test]
            fn log_lines_name_the_alias() {
                let logs = common::logger();
                let alias = common::unique_tag("alias-log");
                let mut conn = connect(&alias);
                conn.transaction(|c| {
                    c.on_commit(|| panic!("aliased hook failed"));
                    QueryResult::Ok(())
                })
                .unwrap();
                let lines = logs.matching(log::Level::Error, &["aliased hook failed", &alias]);
                assert_eq!(lines.len(), 1, "{lines:?}");
            }
        }
    };
}

signal_suite!(
    sqlite,
    diesel::SqliteConnection,
    crate::common::sqlite,
    "sqlite",
    false
);
signal_suite!(
    postgres,
    diesel::PgConnection,
    crate::common::pg,
    "postgres",
    true
);

#[test]
fn unknown_outcome_sends_only_post_complete() {
    use diesel::prelude::*;
    use diesel_transaction_signals::signals::{POST_COMMIT, POST_COMPLETE, POST_ROLLBACK};
    let alias = common::unique_tag("sig-unknown");
    let events = Events::default();
    let _g = (
        POST_COMMIT.connect_guard(events.receiver("commit", &alias)),
        POST_ROLLBACK.connect_guard(events.receiver("rollback", &alias)),
        POST_COMPLETE.connect_guard(events.receiver("complete", &alias)),
    );
    let mut conn = common::pg().with_alias(alias.clone());
    #[derive(QueryableByName)]
    struct Pid {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
    }
    let r: QueryResult<()> = conn.transaction(|c| {
        c.on_commit(|| {});
        let Pid { pid } = diesel::sql_query("SELECT pg_backend_pid() AS pid").get_result(c)?;
        diesel::sql_query("SELECT pg_terminate_backend($1, 10000)")
            .bind::<diesel::sql_types::Integer, _>(pid)
            .execute(&mut common::pg_plain())?;
        Ok(())
    });
    assert!(r.is_err());
    assert_eq!(events.take(), ["complete:Some(Unknown):0:1"]);
}
