//! Fault injection on a real PostgreSQL 15: backends terminated during a statement, between
//! statements and while COMMIT is in flight; statement and idle-in-transaction timeouts; a
//! serialization failure through a pool; a private server stopped and restarted under a pool;
//! hooks that block.
//!
//! For every scenario the test asserts the outcome `on_complete` received, which hooks ran
//! (commit / rollback), the rows a separate, fresh connection sees afterwards, and the invariant
//! that the outcome is never `Committed` (and no commit hook runs) for rows that are absent.
//!
//! Synchronisation with the server is by polling `pg_stat_activity` with a short backoff and an
//! overall deadline, never by a fixed sleep.

#![cfg(all(feature = "postgres", feature = "r2d2"))]
use crate::common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::items;
use common::pg_server::PgServer;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool, R2D2Connection};
use diesel::result::{DatabaseErrorKind, Error};
use diesel::sql_types::{Integer, Nullable, Text};
use diesel_migrations::MigrationHarness;
use diesel_transaction_signals::pool::SignalCustomizer;
use diesel_transaction_signals::{Outcome, SignalConnection, TransactionAborted};

type Conn = SignalConnection<PgConnection>;

// ---------------------------------------------------------------------------------------------
// Support
// ---------------------------------------------------------------------------------------------

/// What the hooks of one transaction saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Seen {
    commit: u32,
    rollback: u32,
    outcomes: Vec<Outcome>,
}

/// One `on_commit`, one `on_rollback` and one `on_complete` hook, recording into a shared `Seen`.
#[derive(Clone, Default)]
struct Probe(Arc<Mutex<Seen>>);

impl Probe {
    fn install(&self, c: &mut Conn) {
        let p = self.clone();
        c.on_commit(move || p.0.lock().unwrap().commit += 1);
        let p = self.clone();
        c.on_rollback(move || p.0.lock().unwrap().rollback += 1);
        let p = self.clone();
        c.on_complete(move |o| p.0.lock().unwrap().outcomes.push(o));
    }

    fn seen(&self) -> Seen {
        self.0.lock().unwrap().clone()
    }
}

impl From<&Probe> for Seen {
    fn from(probe: &Probe) -> Seen {
        probe.seen()
    }
}

/// Asserts how a probe's transaction settled, given the rows a fresh connection sees for the
/// work the probe guarded: exactly one outcome, `expected`, the hooks that go with it
/// (Committed: commit only; RolledBack: rollback only; Unknown: neither), and above all never
/// `Committed` or a commit hook for rows that are absent.
#[track_caller]
fn assert_settled(what: &str, seen: impl Into<Seen>, expected: Outcome, rows_present: i64) {
    let seen: Seen = seen.into();
    assert!(
        rows_present > 0 || (!seen.outcomes.contains(&Outcome::Committed) && seen.commit == 0),
        "{what}: reported Committed / ran a commit hook, but its rows are absent: {seen:?}"
    );
    let (commit, rollback) = match expected {
        Outcome::Committed => (1, 0),
        Outcome::RolledBack => (0, 1),
        Outcome::Unknown => (0, 0),
    };
    assert_eq!(
        seen,
        Seen {
            commit,
            rollback,
            outcomes: vec![expected],
        },
        "{what}: hooks that ran (rows present: {rows_present})"
    );
}

fn insert(c: &mut Conn, tag: &str, v: i32) -> QueryResult<usize> {
    diesel::insert_into(items::table)
        .values((items::tag.eq(tag), items::v.eq(v)))
        .execute(c)
}

fn count_in(c: &mut Conn, tag: &str) -> QueryResult<i64> {
    items::table
        .filter(items::tag.eq(tag))
        .count()
        .get_result(c)
}

/// Rows with `tag`, seen from a separate, freshly established connection to `url`.
fn rows_at(url: &str, tag: &str) -> i64 {
    let mut fresh = PgConnection::establish(url).unwrap();
    items::table
        .filter(items::tag.eq(tag))
        .count()
        .get_result(&mut fresh)
        .unwrap()
}

/// The values of the rows with `tag` on `url`, sorted, from a fresh connection.
fn values_at(url: &str, tag: &str) -> Vec<i32> {
    let mut fresh = PgConnection::establish(url).unwrap();
    items::table
        .filter(items::tag.eq(tag))
        .select(items::v)
        .order(items::v)
        .load(&mut fresh)
        .unwrap()
}

fn rows(tag: &str) -> i64 {
    rows_at(&common::pg_url(), tag)
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

fn backend_pid(c: &mut Conn) -> i32 {
    diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Pid>(c)
        .unwrap()
        .pid
}

#[derive(QueryableByName, Debug, Clone)]
struct Activity {
    #[diesel(sql_type = Nullable<Text>)]
    state: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    query: Option<String>,
}

impl Activity {
    fn state(&self) -> &str {
        self.state.as_deref().unwrap_or("")
    }
    fn query(&self) -> &str {
        self.query.as_deref().unwrap_or("")
    }
}

/// `pid`'s row in `pg_stat_activity`, or `None` once the backend is gone.
fn activity(admin: &mut PgConnection, pid: i32) -> Option<Activity> {
    diesel::sql_query("SELECT state, query FROM pg_stat_activity WHERE pid = $1")
        .bind::<Integer, _>(pid)
        .get_result(admin)
        .optional()
        .unwrap()
}

/// Terminates backend `pid` and waits (up to 10 s, server side) until it has exited.
fn terminate_pid(admin: &mut PgConnection, pid: i32) {
    #[derive(QueryableByName)]
    struct Done {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        done: bool,
    }
    let Done { done } = diesel::sql_query("SELECT pg_terminate_backend($1, 10000) AS done")
        .bind::<Integer, _>(pid)
        .get_result(admin)
        .unwrap();
    assert!(done, "backend {pid} did not terminate");
}

/// Terminates `c`'s own backend from another connection (between two statements of `c`).
fn terminate_self(c: &mut Conn) {
    let pid = backend_pid(c);
    terminate_pid(&mut common::pg_plain(), pid);
}

/// Starts a thread that waits until backend `pid` is `active` running a statement for which
/// `running` holds (polling `pg_stat_activity`), then terminates it. Returns what it saw.
fn kill_when_running(
    pid: i32,
    what: &'static str,
    running: impl Fn(&str) -> bool + Send + 'static,
) -> thread::JoinHandle<Activity> {
    thread::spawn(move || {
        let mut admin = common::pg_plain();
        let seen = common::wait_for(Duration::from_secs(20), what, || {
            activity(&mut admin, pid).filter(|a| a.state() == "active" && running(a.query()))
        });
        terminate_pid(&mut admin, pid);
        seen
    })
}

fn connection_lost(e: &Error) -> bool {
    matches!(
        e,
        Error::DatabaseError(
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
            _
        )
    )
}

/// Prints what a scenario observed (shown with `--nocapture`).
fn note(what: &str, r: &QueryResult<()>, seen: impl Into<Seen>) {
    let r = match r {
        Ok(()) => "Ok(())".to_owned(),
        Err(e) => format!("Err({e:?}: {})", message(e)),
    };
    eprintln!("[{what}] transaction: {r}; hooks: {:?}", seen.into());
}

fn message(e: &Error) -> String {
    match e {
        Error::DatabaseError(_, info) => info.message().to_owned(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. pg_terminate_backend during a long statement, between statements, during COMMIT
// ---------------------------------------------------------------------------------------------

/// Runs a transaction that inserts a row, registers hooks and then blocks in `pg_sleep(30)`,
/// while another thread waits for that statement to be active and terminates the backend.
fn terminated_during_pg_sleep(propagate: bool) -> (Conn, QueryResult<()>, Probe, String) {
    let mut conn = common::pg();
    let pid = backend_pid(&mut conn);
    let tag = common::unique_tag(if propagate {
        "kill-sleep-propagated"
    } else {
        "kill-sleep-swallowed"
    });
    // The tag in a comment makes the statement unambiguous in pg_stat_activity.
    let sleep = format!("SELECT pg_sleep(30) /* {tag} */");
    let marker = tag.clone();
    let killer = kill_when_running(pid, "the pg_sleep statement to be active", move |q| {
        q.contains("pg_sleep") && q.contains(&marker)
    });
    let probe = Probe::default();
    let started = Instant::now();
    let r: QueryResult<()> = conn.transaction(|c| {
        insert(c, &tag, 1)?;
        probe.install(c);
        let slept = diesel::sql_query(&sleep).execute(c);
        let err = slept.expect_err("the sleeping statement was interrupted");
        assert!(connection_lost(&err), "{err:?}");
        if propagate {
            Err(err)
        } else {
            Ok(())
        }
    });
    let seen = killer.join().expect("the killer thread");
    assert!(seen.query().contains(&tag));
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the statement was cut short, not run to its end"
    );
    (conn, r, probe, tag)
}

#[test]
fn terminated_during_a_long_statement_error_propagated_rolls_back() {
    let (mut conn, r, probe, tag) = terminated_during_pg_sleep(true);
    note("pg_sleep killed, propagated", &r, &probe);
    let err = r.expect_err("the transaction failed");
    assert!(
        connection_lost(&err),
        "the user's error is returned: {err:?}"
    );
    assert_settled(
        "pg_sleep killed, propagated",
        &probe,
        Outcome::RolledBack,
        rows(&tag),
    );
    assert_eq!(rows(&tag), 0);
    assert_eq!(conn.transaction_depth(), 0);
    assert!(conn.is_broken(), "a pool discards the connection");
}

#[test]
fn terminated_during_a_long_statement_error_swallowed_rolls_back() {
    let (mut conn, r, probe, tag) = terminated_during_pg_sleep(false);
    note("pg_sleep killed, swallowed", &r, &probe);
    // The wrapper saw the connection break before COMMIT: a certain rollback, reported as an
    // error although the closure returned Ok.
    let err = r.expect_err("nothing was committed, so no Ok");
    assert!(
        matches!(err, Error::BrokenTransactionManager) || connection_lost(&err),
        "{err:?}"
    );
    assert_settled(
        "pg_sleep killed, swallowed",
        &probe,
        Outcome::RolledBack,
        rows(&tag),
    );
    assert_eq!(rows(&tag), 0);
    assert_eq!(conn.transaction_depth(), 0);
    assert!(conn.is_broken());
}

/// A COMMIT that is really in flight: a deferred constraint trigger makes COMMIT sleep, another
/// thread waits until `pg_stat_activity` shows the COMMIT active and terminates the backend.
#[test]
fn terminated_while_commit_is_in_flight_is_unknown_and_runs_no_commit_hook() {
    let logs = common::logger();
    let mut conn = common::pg();
    let id = format!("(connection {})", conn.id());
    let pid = backend_pid(&mut conn);
    // Session-private objects: nothing is added to the shared schema.
    conn.batch_execute(
        "CREATE FUNCTION pg_temp.dts_slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(30); RETURN NULL; END $$; \
         CREATE TEMP TABLE dts_slow_commit (x int); \
         CREATE CONSTRAINT TRIGGER dts_slow_commit AFTER INSERT ON dts_slow_commit \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW \
             EXECUTE FUNCTION pg_temp.dts_slow_commit();",
    )
    .unwrap();
    let tag = common::unique_tag("kill-commit");
    let killer = kill_when_running(pid, "COMMIT to be active", |q| {
        q.trim().eq_ignore_ascii_case("COMMIT")
    });
    let probe = Probe::default();
    let started = Instant::now();
    let r: QueryResult<()> = conn.transaction(|c| {
        insert(c, &tag, 1)?;
        c.batch_execute("INSERT INTO dts_slow_commit VALUES (1)")?;
        probe.install(c);
        Ok(())
    });
    killer.join().expect("the killer thread");
    assert!(started.elapsed() < Duration::from_secs(25));
    note("COMMIT in flight killed", &r, &probe);
    let err = r.expect_err("COMMIT was cut off");
    assert!(connection_lost(&err), "{err:?}");
    assert_eq!(rows(&tag), 0, "the server never wrote the commit record");
    assert_settled(
        "COMMIT in flight killed",
        &probe,
        Outcome::Unknown,
        rows(&tag),
    );
    let dropped = logs.matching(log::Level::Error, &["dropped unrun", &id]);
    assert_eq!(
        dropped.len(),
        2,
        "commit and rollback hook logged: {dropped:?}"
    );
    assert!(conn.is_broken());
}

/// Between statements, the next statement's error propagated out of the outermost closure.
#[test]
fn terminated_between_statements_error_propagated_from_the_outermost_level_rolls_back() {
    let mut conn = common::pg();
    let tag = common::unique_tag("kill-between-propagated");
    let probe = Probe::default();
    let r: QueryResult<()> = conn.transaction(|c| {
        insert(c, &tag, 1)?;
        probe.install(c);
        terminate_self(c);
        insert(c, &tag, 2)?;
        unreachable!("the second insert met a dead connection");
    });
    note("killed between statements", &r, &probe);
    let err = r.expect_err("the user's error");
    assert!(connection_lost(&err), "{err:?}");
    assert_settled(
        "killed between statements",
        &probe,
        Outcome::RolledBack,
        rows(&tag),
    );
    assert_eq!(rows(&tag), 0);
    assert!(conn.is_broken());
}

/// Between statements after a savepoint was released: the savepoint's hooks joined the
/// outermost level and roll back with it.
#[test]
fn terminated_between_statements_after_a_released_savepoint_rolls_back_both_levels() {
    let mut conn = common::pg();
    let tag = common::unique_tag("kill-after-release");
    let outer = Probe::default();
    let released = Probe::default();
    let r: QueryResult<()> = conn.transaction(|c| {
        insert(c, &tag, 1)?;
        outer.install(c);
        c.transaction(|c| {
            insert(c, &tag, 2)?;
            released.install(c);
            QueryResult::Ok(())
        })?;
        terminate_self(c);
        let lost = insert(c, &tag, 3);
        assert!(lost.is_err());
        Ok(()) // swallowed: the wrapper saw the broken connection before COMMIT
    });
    note("killed after a released savepoint", &r, &outer);
    assert!(r.is_err(), "{r:?}");
    assert_settled("outer", &outer, Outcome::RolledBack, rows(&tag));
    assert_settled(
        "released savepoint",
        &released,
        Outcome::RolledBack,
        rows(&tag),
    );
    assert_eq!(rows(&tag), 0);
    assert!(conn.is_broken());
}

/// The common "try a sub-step in a savepoint, carry on if it fails" pattern, when the
/// connection dies inside the sub-step. Nothing can commit any more; the hooks say so
/// (RolledBack), and so must `transaction`'s result: `Err(BrokenTransactionManager)`, as plain
/// Diesel returns. (A regression test: the wrapper once returned `Ok(())` here.)
#[test]
fn outer_closure_that_swallows_a_savepoint_error_after_the_connection_died_gets_an_error() {
    // Baseline: plain Diesel on the same scenario.
    {
        let _ = common::pg();
        let mut plain = PgConnection::establish(&common::pg_url()).unwrap();
        let tag = common::unique_tag("plain-swallow-savepoint");
        let r: QueryResult<()> = plain.transaction(|c| {
            diesel::insert_into(items::table)
                .values((items::tag.eq(&tag), items::v.eq(1)))
                .execute(c)?;
            let sp: QueryResult<()> = c.transaction(|c| {
                let Pid { pid } = diesel::sql_query("SELECT pg_backend_pid() AS pid")
                    .get_result(c)
                    .unwrap();
                terminate_pid(&mut common::pg_plain(), pid);
                diesel::insert_into(items::table)
                    .values((items::tag.eq(&tag), items::v.eq(2)))
                    .execute(c)
                    .map(drop)
            });
            assert!(sp.is_err());
            Ok(())
        });
        assert!(
            matches!(r, Err(Error::BrokenTransactionManager)),
            "plain Diesel: {r:?}"
        );
        assert_eq!(rows(&tag), 0);
    }
    // The savepoint's closure propagates the error (rollback path) or swallows it too
    // (RELEASE path); the outer closure swallows the savepoint's error either way.
    for inner_propagates in [true, false] {
        let mut conn = common::pg();
        let tag = common::unique_tag("swallow-savepoint");
        let outer = Probe::default();
        let inner = Probe::default();
        let r: QueryResult<()> = conn.transaction(|c| {
            insert(c, &tag, 1)?;
            outer.install(c);
            let sp: QueryResult<()> = c.transaction(|c| {
                inner.install(c);
                terminate_self(c);
                let lost = insert(c, &tag, 2).map(drop);
                if inner_propagates {
                    lost
                } else {
                    assert!(lost.is_err());
                    Ok(())
                }
            });
            assert!(sp.is_err(), "the savepoint failed: {sp:?}");
            Ok(()) // handled: the sub-step is optional
        });
        note(
            &format!("swallowed savepoint, inner_propagates={inner_propagates}"),
            &r,
            &outer,
        );
        assert_settled("outer", &outer, Outcome::RolledBack, rows(&tag));
        assert_settled("savepoint", &inner, Outcome::RolledBack, rows(&tag));
        assert_eq!(rows(&tag), 0);
        assert!(
            r.is_err(),
            "inner_propagates={inner_propagates}: transaction returned {r:?} although nothing \
             was committed (its hooks reported RolledBack)"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. statement_timeout
// ---------------------------------------------------------------------------------------------

fn is_statement_timeout(e: &Error) -> bool {
    // Diesel has no DatabaseErrorKind for QueryCanceled (SQLSTATE 57014): recognise the text.
    matches!(e, Error::DatabaseError(DatabaseErrorKind::Unknown, info)
        if info.message().contains("canceling statement due to statement timeout"))
}

#[derive(QueryableByName)]
struct StatementTimeout {
    #[diesel(sql_type = Text)]
    statement_timeout: String,
}

fn statement_timeout(c: &mut Conn) -> String {
    diesel::sql_query("SHOW statement_timeout")
        .get_result::<StatementTimeout>(c)
        .unwrap()
        .statement_timeout
}

/// `SET statement_timeout = '100ms'`, then `pg_sleep(5)`: the statement is cancelled
/// (QueryCanceled), which aborts the transaction.
fn timed_out_statement(c: &mut Conn, tag: &str, probe: &Probe) -> Error {
    insert(c, tag, 1).unwrap();
    probe.install(c);
    c.batch_execute("SET statement_timeout = '100ms'").unwrap();
    let started = Instant::now();
    let err = diesel::sql_query("SELECT pg_sleep(5)")
        .execute(c)
        .expect_err("cancelled by statement_timeout");
    assert!(is_statement_timeout(&err), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(4));
    err
}

#[test]
fn statement_timeout_swallowed_is_transaction_aborted_and_rolls_back() {
    let mut conn = common::pg();
    let before = statement_timeout(&mut conn);
    let tag = common::unique_tag("timeout-swallowed");
    let probe = Probe::default();
    let r: QueryResult<()> = conn.transaction(|c| {
        timed_out_statement(c, &tag, &probe);
        Ok(()) // swallowed: PostgreSQL would turn COMMIT into ROLLBACK
    });
    note("statement_timeout swallowed", &r, &probe);
    let err = r.expect_err("not Ok: nothing was committed");
    assert!(TransactionAborted::is(&err), "{err:?}");
    assert_settled("timeout swallowed", &probe, Outcome::RolledBack, rows(&tag));
    assert_eq!(rows(&tag), 0);
    // The connection is healthy, and the SET was undone with the transaction.
    assert!(!conn.is_broken());
    assert_eq!(statement_timeout(&mut conn), before);
    let again = Probe::default();
    conn.transaction(|c| {
        again.install(c);
        insert(c, &tag, 2)
    })
    .unwrap();
    assert_settled("next transaction", &again, Outcome::Committed, rows(&tag));
    assert_eq!(values_at(&common::pg_url(), &tag), [2]);
}

#[test]
fn statement_timeout_propagated_returns_the_users_error_and_rolls_back() {
    let mut conn = common::pg();
    let tag = common::unique_tag("timeout-propagated");
    let probe = Probe::default();
    let r: QueryResult<()> = conn.transaction(|c| Err(timed_out_statement(c, &tag, &probe)));
    note("statement_timeout propagated", &r, &probe);
    let err = r.expect_err("the user's error");
    assert!(
        is_statement_timeout(&err),
        "the statement's own error: {err:?}"
    );
    assert_settled(
        "timeout propagated",
        &probe,
        Outcome::RolledBack,
        rows(&tag),
    );
    assert_eq!(rows(&tag), 0);
    assert!(!conn.is_broken());
    assert_eq!(conn.transaction_depth(), 0);
}

/// The timed-out statement in a savepoint: only the savepoint rolls back, the outer transaction
/// commits with its hooks.
#[test]
fn statement_timeout_in_a_savepoint_rolls_back_only_the_savepoint() {
    let mut conn = common::pg();
    let outer_tag = common::unique_tag("timeout-outer");
    let inner_tag = common::unique_tag("timeout-savepoint");
    let outer = Probe::default();
    let inner = Probe::default();
    conn.transaction(|c| {
        insert(c, &outer_tag, 1)?;
        outer.install(c);
        let sp: QueryResult<()> =
            c.transaction(|c| Err(timed_out_statement(c, &inner_tag, &inner)));
        assert!(is_statement_timeout(&sp.unwrap_err()));
        assert_eq!(
            inner.seen().rollback,
            1,
            "the savepoint's hooks settle at once"
        );
        // The enclosing transaction is not aborted: it can go on.
        assert_eq!(count_in(c, &outer_tag)?, 1);
        QueryResult::Ok(())
    })
    .unwrap();
    assert_settled("savepoint", &inner, Outcome::RolledBack, rows(&inner_tag));
    assert_settled("outer", &outer, Outcome::Committed, rows(&outer_tag));
    assert_eq!(rows(&inner_tag), 0);
    assert_eq!(rows(&outer_tag), 1);
}

// ---------------------------------------------------------------------------------------------
// 3. idle_in_transaction_session_timeout
// ---------------------------------------------------------------------------------------------

/// Runs a transaction that stays idle until the server's idle-in-transaction timeout kills the
/// session (observed from another connection: the backend leaves `pg_stat_activity`), then
/// either returns Ok at once (COMMIT is the first to meet the dead connection) or first runs a
/// statement (the wrapper sees the broken connection before COMMIT).
fn idle_until_killed(statement_first: bool) -> (Conn, QueryResult<()>, Probe, String) {
    let mut conn = common::pg();
    let pid = backend_pid(&mut conn);
    let tag = common::unique_tag("idle-timeout");
    conn.batch_execute("SET idle_in_transaction_session_timeout = '200ms'")
        .unwrap();
    let probe = Probe::default();
    let mut admin = common::pg_plain();
    let r: QueryResult<()> = conn.transaction(|c| {
        insert(c, &tag, 1)?;
        probe.install(c);
        // This wait is the phenomenon: the server ends the idle session on its own.
        common::wait_until(
            Duration::from_secs(10),
            "the idle-in-transaction timeout to end the session",
            || activity(&mut admin, pid).is_none(),
        );
        if statement_first {
            let lost = insert(c, &tag, 2);
            let err = lost.expect_err("the session is gone");
            assert!(connection_lost(&err), "{err:?}");
        }
        Ok(())
    });
    (conn, r, probe, tag)
}

#[test]
fn idle_in_transaction_timeout_then_commit_is_unknown() {
    let (mut conn, r, probe, tag) = idle_until_killed(false);
    note("idle timeout, then COMMIT", &r, &probe);
    let err = r.expect_err("COMMIT met a dead connection");
    assert!(connection_lost(&err), "{err:?} ({})", message(&err));
    // What src/ documents: the connection was lost while COMMIT was in flight, so the wrapper
    // cannot know; Unknown, no commit hook, no rollback hook. (The server did roll back.)
    assert_settled(
        "idle timeout, then COMMIT",
        &probe,
        Outcome::Unknown,
        rows(&tag),
    );
    assert_eq!(rows(&tag), 0);
    assert!(conn.is_broken());
}

#[test]
fn idle_in_transaction_timeout_seen_before_commit_is_rolled_back() {
    let (mut conn, r, probe, tag) = idle_until_killed(true);
    note("idle timeout, seen before COMMIT", &r, &probe);
    assert!(r.is_err(), "{r:?}");
    assert_settled(
        "idle timeout, seen",
        &probe,
        Outcome::RolledBack,
        rows(&tag),
    );
    assert_eq!(rows(&tag), 0);
    assert!(conn.is_broken());
}

// ---------------------------------------------------------------------------------------------
// 4. Serialization failure at COMMIT, through a pool
// ---------------------------------------------------------------------------------------------

#[test]
fn serialization_failure_at_commit_through_a_pool_keeps_the_connection_and_retries() {
    let _ = common::pg();
    let pool = Pool::builder()
        .max_size(2)
        .test_on_check_out(true)
        .build(ConnectionManager::<Conn>::new(common::pg_url()))
        .unwrap();
    let tag = common::unique_tag("pool-serial");
    let mut a = pool.get().unwrap();
    let mut b = pool.get().unwrap();
    let ids = [a.id(), b.id()];
    let first = Probe::default();
    let second = Probe::default();
    let r: QueryResult<()> = a.build_transaction().serializable().run(|c| {
        // Write skew: both read the same predicate, then both write into it.
        let seen = count_in(c, &tag)?;
        insert(c, &tag, 1)?;
        first.install(c);
        b.build_transaction().serializable().run(|c2| {
            assert_eq!(count_in(c2, &tag)?, seen);
            insert(c2, &tag, 2)?;
            second.install(c2);
            QueryResult::Ok(())
        })?;
        Ok(())
    });
    assert!(
        matches!(
            r,
            Err(Error::DatabaseError(
                DatabaseErrorKind::SerializationFailure,
                _
            ))
        ),
        "{r:?}"
    );
    assert_eq!(values_at(&common::pg_url(), &tag), [2]);
    assert_settled("second (committed)", &second, Outcome::Committed, 1);
    assert_settled("first (failed at COMMIT)", &first, Outcome::RolledBack, 0);
    drop((a, b));
    // A failed COMMIT leaves the connection usable: the pool keeps both and hands them out.
    let mut again = [pool.get().unwrap(), pool.get().unwrap()];
    let mut again_ids = [again[0].id(), again[1].id()];
    again_ids.sort();
    let mut sorted = ids;
    sorted.sort();
    assert_eq!(again_ids, sorted, "no connection was discarded");
    let retry = Probe::default();
    again[0]
        .build_transaction()
        .serializable()
        .run(|c| {
            retry.install(c);
            insert(c, &tag, 1)
        })
        .unwrap();
    assert_eq!(values_at(&common::pg_url(), &tag), [1, 2]);
    assert_settled("retry", &retry, Outcome::Committed, 1);
}

// ---------------------------------------------------------------------------------------------
// 5. A private server stopped and restarted under a pool
// ---------------------------------------------------------------------------------------------

/// How the in-flight transaction of a round meets the stopped server.
#[derive(Debug, Clone, Copy)]
enum Round {
    /// `pg_ctl stop -m fast`; the closure then returns Ok: COMMIT is in flight when the
    /// connection is found dead.
    FastStopThenCommit,
    /// `pg_ctl stop -m immediate`; the closure then runs a statement, whose error it propagates.
    ImmediateStopThenStatement,
}

impl Round {
    fn mode(self) -> &'static str {
        match self {
            Round::FastStopThenCommit => "fast",
            Round::ImmediateStopThenStatement => "immediate",
        }
    }
}

type PgPool = Pool<ConnectionManager<Conn>>;

/// One transaction through the pool that must commit with its hooks.
fn pooled_commit(pool: &PgPool, tag: &str, v: i32) {
    let mut conn = pool.get().unwrap();
    let probe = Probe::default();
    conn.transaction(|c| {
        insert(c, tag, v)?;
        probe.install(c);
        QueryResult::Ok(())
    })
    .unwrap();
    assert_settled(&format!("pooled v={v}"), &probe, Outcome::Committed, 1);
}

/// What the worker reports for the in-flight transaction of a round.
struct InFlight {
    v: i32,
    result: QueryResult<()>,
    seen: Seen,
    down_get_failed: bool,
}

#[test]
fn private_server_stopped_and_restarted_under_a_pool() {
    let server = PgServer::start_new();
    let url = server.url("postgres", "");
    Conn::establish(&url)
        .unwrap()
        .run_pending_migrations(common::PG_MIGRATIONS)
        .unwrap();
    let pool: PgPool = Pool::builder()
        .max_size(3)
        .test_on_check_out(true)
        .connection_timeout(Duration::from_millis(500))
        .connection_customizer(Box::new(SignalCustomizer::new().alias("private")))
        .build(ConnectionManager::<Conn>::new(url.clone()))
        .unwrap();
    let tag = common::unique_tag("restart");
    let rounds = [Round::FastStopThenCommit, Round::ImmediateStopThenStatement];

    let (to_ctl, from_worker) = mpsc::channel::<&'static str>();
    let (to_worker, from_ctl) = mpsc::channel::<&'static str>();
    let worker = {
        let (pool, tag) = (pool.clone(), tag.clone());
        thread::spawn(move || {
            let mut reports = Vec::new();
            let mut v = 0;
            for round in rounds {
                for _ in 0..5 {
                    v += 1;
                    pooled_commit(&pool, &tag, v);
                }
                v += 1;
                let in_flight = v;
                let probe = Probe::default();
                let result = {
                    let mut conn = pool.get().unwrap();
                    Connection::transaction(&mut *conn, |c| {
                        insert(c, &tag, in_flight)?;
                        probe.install(c);
                        to_ctl.send("in transaction").unwrap();
                        let stopped = from_ctl.recv_timeout(Duration::from_secs(90));
                        assert_eq!(stopped, Ok("stopped"));
                        match round {
                            Round::FastStopThenCommit => Ok(()),
                            Round::ImmediateStopThenStatement => {
                                insert(c, &tag, in_flight + 1000)?;
                                unreachable!("the server is down");
                            }
                        }
                    })
                    // The pooled connection goes back here: broken, so the pool drops it.
                };
                // While the server is down the pool has nothing to hand out.
                let down_get_failed = pool.get().is_err();
                reports.push(InFlight {
                    v: in_flight,
                    result,
                    seen: probe.seen(),
                    down_get_failed,
                });
                to_ctl.send("settled").unwrap();
                // Recovery: the same pool, once the server is back.
                drop(common::wait_for(
                    Duration::from_secs(60),
                    "pool.get() to succeed after the restart",
                    || pool.get().ok(),
                ));
                for _ in 0..5 {
                    v += 1;
                    pooled_commit(&pool, &tag, v);
                }
            }
            (reports, v)
        })
    };

    let wait = |what: &str| {
        let got = from_worker.recv_timeout(Duration::from_secs(120));
        assert_eq!(
            got.ok(),
            Some(what),
            "worker did not report '{what}' in time"
        );
    };
    let mut outcome = Ok(());
    for round in rounds {
        let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait("in transaction");
            server.stop(round.mode());
            assert!(!server.is_running());
            to_worker.send("stopped").unwrap();
            wait("settled");
            server.start();
        }));
        if let Err(p) = step {
            outcome = Err(p);
            break;
        }
    }
    drop(to_worker);
    let joined = worker.join();
    if let Err(p) = outcome {
        // A worker panic is the more precise message.
        std::panic::resume_unwind(joined.err().unwrap_or(p));
    }
    let (reports, last_v) = joined.unwrap_or_else(|p| std::panic::resume_unwind(p));

    let present = values_at(&url, &tag);
    let in_flight: Vec<i32> = reports.iter().map(|r| r.v).collect();
    let expected: Vec<i32> = (1..=last_v).filter(|v| !in_flight.contains(v)).collect();
    assert_eq!(
        present, expected,
        "every transaction whose commit hook ran is in the database (also after the immediate \
         stop's crash recovery), and no in-flight one"
    );
    for (round, report) in rounds.iter().zip(&reports) {
        let rows_present = present.contains(&report.v) as i64;
        let what = format!("{round:?} in-flight v={}", report.v);
        note(&what, &report.result, report.seen.clone());
        let err = report.result.as_ref().expect_err(&what);
        assert!(connection_lost(err), "{what}: {err:?}");
        let expected = match round {
            // The wrapper learns of the loss from COMMIT itself: it cannot know.
            Round::FastStopThenCommit => Outcome::Unknown,
            // A statement met the dead connection first: a certain rollback.
            Round::ImmediateStopThenStatement => Outcome::RolledBack,
        };
        assert_settled(&what, report.seen.clone(), expected, rows_present);
        assert_eq!(rows_present, 0, "{what}");
        assert!(
            report.down_get_failed,
            "{what}: pool.get() failed while down"
        );
    }
    drop(pool);
    server.stop("fast");
}

// ---------------------------------------------------------------------------------------------
// 6. A blocking hook holds no transaction and no lock
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Observed {
    updated: QueryResult<usize>,
    activity: Option<Activity>,
    locks: i64,
}

#[test]
fn blocking_commit_hook_holds_no_transaction_and_no_lock() {
    let mut conn = common::pg();
    let pid = backend_pid(&mut conn);
    let tag = common::unique_tag("blocking-hook");
    insert(&mut conn, &tag, 1).unwrap();
    let (hook_running, wait_for_hook) = mpsc::channel::<()>();
    let (other_done, wait_for_other) = mpsc::channel::<Observed>();
    let other_tag = tag.clone();
    let other = thread::spawn(move || {
        wait_for_hook
            .recv_timeout(Duration::from_secs(60))
            .expect("the commit hook started");
        let mut other = common::pg_plain();
        other.batch_execute("SET lock_timeout = '2s'").unwrap();
        // Would wait for the row lock, and fail after lock_timeout, if the hook's connection
        // still held it.
        let updated = diesel::update(items::table.filter(items::tag.eq(&other_tag)))
            .set(items::v.eq(3))
            .execute(&mut other);
        let activity = activity(&mut other, pid);
        #[derive(QueryableByName)]
        struct Locks {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let locks = diesel::sql_query("SELECT count(*) AS n FROM pg_locks WHERE pid = $1")
            .bind::<Integer, _>(pid)
            .get_result::<Locks>(&mut other)
            .unwrap()
            .n;
        other_done
            .send(Observed {
                updated,
                activity,
                locks,
            })
            .unwrap();
    });
    let observed: Arc<Mutex<Option<Observed>>> = Arc::default();
    let probe = Probe::default();
    conn.transaction(|c| {
        // Row lock held by this transaction until COMMIT.
        diesel::update(items::table.filter(items::tag.eq(&tag)))
            .set(items::v.eq(2))
            .execute(c)?;
        probe.install(c);
        let observed = observed.clone();
        c.on_commit(move || {
            hook_running.send(()).unwrap();
            // Blocks until the other connection has updated the same row.
            let seen = wait_for_other
                .recv_timeout(Duration::from_secs(60))
                .expect("the other connection finished");
            *observed.lock().unwrap() = Some(seen);
        });
        QueryResult::Ok(())
    })
    .unwrap();
    other.join().unwrap();
    let observed = observed.lock().unwrap().take().expect("the hook ran");
    assert_eq!(
        observed.updated.as_ref().ok(),
        Some(&1),
        "the other connection updated the row while the hook was blocked: {observed:?}"
    );
    let state = observed.activity.as_ref().map(|a| a.state().to_owned());
    assert_eq!(
        state.as_deref(),
        Some("idle"),
        "the hook's connection is idle, not 'idle in transaction', while the hook runs"
    );
    assert_eq!(observed.locks, 0, "the hook's connection holds no lock");
    assert_settled("blocking hook", &probe, Outcome::Committed, rows(&tag));
    assert_eq!(values_at(&common::pg_url(), &tag), [3]);
}
