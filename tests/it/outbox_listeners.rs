//! PostgreSQL: the outbox's trigger sends `NOTIFY dts_outbox` only while a relay's listener is
//! registered in `dts_outbox_listeners` (migration `2026-12-02-000300_dts_outbox_listeners`:
//! the registration enables the trigger, the last unregistration disables it).
//!
//! Whether a transaction notified is observed without timing: a plain `PgConnection` that
//! `LISTEN`s on `dts_outbox` and on a sentinel channel, without registering; after the
//! enqueuing transactions commit, another connection sends `NOTIFY` on the sentinel channel.
//! PostgreSQL delivers notifications in commit order, so the `dts_outbox` notifications that
//! arrive before the sentinel are exactly those the enqueuing transactions sent.
//!
//! Each test has a database of its own: the relays of parallel tests register in the shared
//! database, and their enqueues notify there.

#![cfg(feature = "outbox-listen")]
use crate::common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::sql_types::{BigInt, Integer, Text};
use diesel_migrations::MigrationHarness;
use diesel_transaction_signals::outbox::{self, Relay};
use diesel_transaction_signals::{defer_durable, SignalConnection};

/// Long enough never to matter on a healthy machine; a wait that reaches it is a failure.
const PATIENCE: Duration = Duration::from_secs(30);

/// A database of a test's own on the test server, dropped at the end.
struct Db {
    name: String,
    url: String,
}

impl Db {
    /// An empty database (no outbox migration applied).
    fn empty(tag: &str) -> Db {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "dts_lsn_{tag}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = common::pg_plain();
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .unwrap();
        let url = with_database(&common::pg_url(), &name);
        Db { name, url }
    }

    /// A database with every outbox migration applied.
    fn migrated(tag: &str) -> Db {
        let db = Db::empty(tag);
        db.plain()
            .run_pending_migrations(outbox::migrations::POSTGRES)
            .unwrap();
        db
    }

    fn plain(&self) -> PgConnection {
        PgConnection::establish(&self.url).unwrap()
    }

    fn conn(&self) -> SignalConnection<PgConnection> {
        SignalConnection::<PgConnection>::establish(&self.url).unwrap()
    }

    fn pool(&self) -> Pool<ConnectionManager<PgConnection>> {
        Pool::builder()
            .max_size(2)
            .build(ConnectionManager::<PgConnection>::new(&self.url))
            .unwrap()
    }

    /// The registered listeners: (pid, relay).
    fn listeners(&self) -> BTreeSet<(i32, String)> {
        diesel::sql_query("SELECT pid, relay FROM dts_outbox_listeners")
            .load::<Listener>(&mut self.plain())
            .unwrap()
            .into_iter()
            .map(|l| (l.pid, l.relay))
            .collect()
    }

    /// Whether the NOTIFY trigger is enabled.
    fn notify_enabled(&self) -> bool {
        #[derive(QueryableByName)]
        struct Enabled {
            #[diesel(sql_type = diesel::sql_types::Bool)]
            e: bool,
        }
        diesel::sql_query(
            "SELECT tgenabled <> 'D' AS e FROM pg_trigger \
             WHERE tgrelid = 'dts_outbox'::regclass AND tgname = 'dts_outbox_notify'",
        )
        .get_result::<Enabled>(&mut self.plain())
        .unwrap()
        .e
    }

    /// Waits until relay `relay` has a registration; returns its pid.
    fn wait_registered(&self, relay: &str) -> i32 {
        let mut conn = self.plain();
        common::wait_for(PATIENCE, "the listener's registration", || {
            diesel::sql_query("SELECT pid, relay FROM dts_outbox_listeners WHERE relay = $1")
                .bind::<Text, _>(relay)
                .get_result::<Listener>(&mut conn)
                .optional()
                .unwrap()
                .map(|l| l.pid)
        })
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let mut admin = common::pg_plain();
        let _ = diesel::sql_query(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin);
    }
}

/// `url` with its database name replaced.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (base, _) = base.rsplit_once('/').unwrap();
    if query.is_empty() {
        format!("{base}/{name}")
    } else {
        format!("{base}/{name}?{query}")
    }
}

/// `url` connecting as `user` (the test server trusts every local role).
fn as_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let rest = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}@{rest}")
}

#[derive(QueryableByName)]
struct Listener {
    #[diesel(sql_type = Integer)]
    pid: i32,
    #[diesel(sql_type = Text)]
    relay: String,
}

#[derive(QueryableByName)]
struct Backend {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

fn backend_pid(conn: &mut PgConnection) -> i32 {
    diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Backend>(conn)
        .unwrap()
        .pid
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// A connection that hears `dts_outbox` without registering, and a sentinel channel.
struct Watch {
    conn: PgConnection,
    other: PgConnection,
}

impl Watch {
    fn new(db: &Db) -> Watch {
        let mut conn = db.plain();
        conn.batch_execute("LISTEN dts_outbox; LISTEN dts_sentinel")
            .unwrap();
        Watch {
            conn,
            other: db.plain(),
        }
    }

    /// The `dts_outbox` notifications of the transactions committed so far that this watch
    /// had not counted yet: those that arrive before a sentinel sent now.
    fn notifications(&mut self) -> usize {
        self.other.batch_execute("NOTIFY dts_sentinel").unwrap();
        let mut outbox = 0;
        common::wait_for(PATIENCE, "the sentinel notification", || {
            for n in self.conn.notifications_iter() {
                let n = n.unwrap();
                match n.channel.as_str() {
                    "dts_sentinel" => return Some(()),
                    "dts_outbox" => outbox += 1,
                    other => panic!("a notification on {other}"),
                }
            }
            None
        });
        outbox
    }
}

/// Three enqueuing transactions: `conn.defer_durable` in a transaction, `defer_durable!`
/// (written just before COMMIT) and `enqueue_all` in autocommit.
fn enqueue_three(conn: &mut SignalConnection<PgConnection>, queue: &str) {
    conn.transaction(|c| c.defer_durable(queue, &1).map(drop))
        .unwrap();
    conn.transaction(|_| defer_durable!(queue, &2)).unwrap();
    conn.enqueue_all([outbox::DurableJob::new(queue, &3).unwrap()])
        .unwrap();
}

#[test]
fn outbox_notifies_only_while_a_relay_listener_is_registered() {
    let db = Db::migrated("notify");
    let queue = "lsn_notify";
    let mut watch = Watch::new(&db);
    let mut conn = db.conn();

    assert!(
        !db.notify_enabled(),
        "nobody listens: the trigger is disabled"
    );
    enqueue_three(&mut conn, queue);
    assert_eq!(
        watch.notifications(),
        0,
        "no listener registered: no NOTIFY (a LISTEN alone is not a registration)"
    );

    let (tx, rx) = mpsc::channel();
    let relay = Relay::builder(db.pool())
        .name("lsn-notify")
        .handler(queue, move |job| Ok(tx.send(job.payload::<i32>()?)?))
        .listen(db.url.as_str())
        .spawn()
        .unwrap();
    let pid = db.wait_registered("lsn-notify");
    assert_eq!(
        db.listeners(),
        BTreeSet::from([(pid, "lsn-notify".to_owned())])
    );
    assert!(db.notify_enabled());
    // The relay's first look (rung after the registration) delivers the three jobs.
    let mut got: Vec<i32> = (0..3).map(|_| rx.recv_timeout(PATIENCE).unwrap()).collect();
    got.sort_unstable();
    assert_eq!(got, [1, 2, 3]);

    enqueue_three(&mut conn, queue);
    assert_eq!(
        watch.notifications(),
        3,
        "a relay listening: one NOTIFY per enqueuing transaction"
    );
    for _ in 0..3 {
        rx.recv_timeout(PATIENCE).unwrap();
    }

    assert_eq!(relay.shutdown().delivered, 6);
    assert!(
        db.listeners().is_empty(),
        "a clean stop removes the registration"
    );
    assert!(
        !db.notify_enabled(),
        "and the last one disables the trigger"
    );
    enqueue_three(&mut conn, queue);
    assert_eq!(
        watch.notifications(),
        0,
        "the relay stopped: no NOTIFY again"
    );
}

#[test]
fn outbox_a_registering_listener_removes_the_registrations_of_backends_that_are_gone() {
    let db = Db::migrated("stale");
    let mut sql = db.plain();
    let register = "INSERT INTO dts_outbox_listeners (pid, backend_start, relay) \
                    SELECT pid, backend_start, $1 FROM pg_stat_activity WHERE pid = $2";

    // A listener whose connection ended without unregistering (a killed process).
    let mut gone = db.plain();
    let gone_pid = backend_pid(&mut gone);
    diesel::sql_query(register)
        .bind::<Text, _>("gone")
        .bind::<Integer, _>(gone_pid)
        .execute(&mut sql)
        .unwrap();
    drop(gone);
    common::wait_until(PATIENCE, "the closed backend to exit", || {
        diesel::sql_query("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = $1")
            .bind::<Integer, _>(gone_pid)
            .get_result::<Count>(&mut sql)
            .unwrap()
            .n
            == 0
    });
    // A pid no backend has.
    diesel::sql_query(
        "INSERT INTO dts_outbox_listeners (pid, backend_start, relay) \
         VALUES (2147483647, now(), 'never')",
    )
    .execute(&mut sql)
    .unwrap();
    // A live backend's pid with another start time: the pid was reused since.
    let mut reused = db.plain();
    let reused_pid = backend_pid(&mut reused);
    diesel::sql_query(
        "INSERT INTO dts_outbox_listeners (pid, backend_start, relay) \
         VALUES ($1, '2000-01-01', 'reused')",
    )
    .bind::<Integer, _>(reused_pid)
    .execute(&mut sql)
    .unwrap();
    // A live registration (another process's listener): kept.
    let mut live = db.plain();
    let live_pid = backend_pid(&mut live);
    diesel::sql_query(register)
        .bind::<Text, _>("live")
        .bind::<Integer, _>(live_pid)
        .execute(&mut sql)
        .unwrap();
    assert_eq!(db.listeners().len(), 4);

    let relay = Relay::builder(db.pool())
        .name("lsn-stale")
        .handler("lsn_stale", |_| Ok(()))
        .poll_interval(Duration::from_secs(3600))
        .listen(db.url.as_str())
        .spawn()
        .unwrap();
    let pid = db.wait_registered("lsn-stale");
    assert_eq!(
        db.listeners(),
        BTreeSet::from([(live_pid, "live".to_owned()), (pid, "lsn-stale".to_owned())])
    );
    relay.shutdown();
    assert_eq!(
        db.listeners(),
        BTreeSet::from([(live_pid, "live".to_owned())])
    );
    drop((reused, live));
}

/// The listener's role may not write `dts_outbox_listeners`: the failure is logged once, the
/// listener retries with backoff while the relay polls, and registers once it may (enabling
/// the trigger, which needs the table's owner: the migration's function does it), removing
/// stale rows but not another role's live one (whose `backend_start` it cannot read). An
/// enqueuing role with no right on that table enqueues, and notifies while the trigger is
/// enabled.
#[test]
fn outbox_a_listener_that_may_not_register_is_reported_once_and_the_relay_polls() {
    let _ = common::logger();
    let db = Db::migrated("rights");
    let role = format!("dts_lsn_role_{}", std::process::id());
    let mut sql = db.plain();
    sql.batch_execute(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON dts_outbox, dts_outbox_paused TO {role}; \
         GRANT USAGE ON SEQUENCE dts_outbox_id_seq TO {role}"
    ))
    .unwrap();
    let role_url = as_user(&db.url, &role);
    let queue = "lsn_rights";
    let name = "lsn-rights";
    let (tx, rx) = mpsc::channel();
    let relay = Relay::builder(db.pool())
        .name(name)
        .handler(queue, move |job| Ok(tx.send(job.payload::<i32>()?)?))
        .poll_interval(Duration::from_millis(100))
        .listen(role_url.as_str())
        .spawn()
        .unwrap();
    let me = format!("outbox relay {name}:");
    let lines = |level, needle: &str| common::logger().matching(level, &[&me, needle]);
    common::wait_until(PATIENCE, "two failed attempts", || {
        !lines(log::Level::Debug, "listener attempt 2 failed").is_empty()
    });
    let warnings = lines(log::Level::Warn, "listener");
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains("cannot register in dts_outbox_listeners")
            && warnings[0].contains("permission denied"),
        "{}",
        warnings[0]
    );
    assert!(db.listeners().is_empty());

    // The role enqueues (its trigger reads the table) and the relay delivers by polling.
    let mut enqueuer = SignalConnection::<PgConnection>::establish(&role_url).unwrap();
    enqueuer
        .transaction(|c| c.defer_durable(queue, &5).map(drop))
        .unwrap();
    assert_eq!(rx.recv_timeout(PATIENCE), Ok(5), "delivered by polling");

    // Another role's live registration (this role cannot read its backend's start: kept), and
    // one of a pid no backend has (removed).
    let sql_pid = backend_pid(&mut sql);
    diesel::sql_query(
        "INSERT INTO dts_outbox_listeners (pid, backend_start, relay) \
         SELECT pid, backend_start, 'other-role' FROM pg_stat_activity \
         WHERE pid = pg_backend_pid() \
         UNION ALL SELECT 2147483647, now(), 'never'",
    )
    .execute(&mut sql)
    .unwrap();
    sql.batch_execute(&format!(
        "GRANT SELECT, INSERT, DELETE ON dts_outbox_listeners TO {role}"
    ))
    .unwrap();
    common::wait_until(PATIENCE, "the listener to register", || {
        !lines(log::Level::Info, "listener reconnected").is_empty()
    });
    let pid = db.wait_registered(name);
    assert_eq!(
        db.listeners(),
        BTreeSet::from([(sql_pid, "other-role".to_owned()), (pid, name.to_owned())])
    );
    assert!(db.notify_enabled());
    let mut watch = Watch::new(&db);
    enqueuer
        .transaction(|c| c.defer_durable(queue, &6).map(drop))
        .unwrap();
    assert_eq!(watch.notifications(), 1, "the role's enqueue notifies");
    assert_eq!(rx.recv_timeout(PATIENCE), Ok(6));
    assert_eq!(relay.shutdown().delivered, 2);
    assert_eq!(
        db.listeners(),
        BTreeSet::from([(sql_pid, "other-role".to_owned())])
    );
    assert!(
        db.notify_enabled(),
        "another registration is left: the trigger stays enabled"
    );
    assert_eq!(lines(log::Level::Warn, "listener").len(), 1, "one warning");
    drop((enqueuer, sql, watch));
    drop(db);
    let _ = common::pg_plain().batch_execute(&format!("DROP ROLE IF EXISTS {role}"));
}

/// A database at the previous schema (the first two outbox migrations): its trigger notifies
/// at every enqueuing COMMIT. The pending migration makes it notify only while a listener is
/// registered, reads the clock as float8 in the column defaults, and reverts cleanly.
#[test]
fn outbox_a_database_at_the_previous_schema_upgrades_and_reverts() {
    let db = Db::empty("upgrade");
    let mut migrator = db.plain();
    migrator
        .run_next_migration(outbox::migrations::POSTGRES)
        .unwrap();
    migrator
        .run_next_migration(outbox::migrations::POSTGRES)
        .unwrap();
    let queue = "lsn_upgrade";
    let mut watch = Watch::new(&db);
    let mut conn = db.conn();
    enqueue_three(&mut conn, queue);
    assert_eq!(
        watch.notifications(),
        3,
        "the previous trigger always notifies"
    );

    let applied = migrator
        .run_pending_migrations(outbox::migrations::POSTGRES)
        .unwrap();
    assert_eq!(
        applied.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
        ["20261202000300"]
    );
    let default_of = |conn: &mut PgConnection, table: &str, column: &str| -> String {
        #[derive(QueryableByName)]
        struct Default {
            #[diesel(sql_type = Text)]
            d: String,
        }
        diesel::sql_query(
            "SELECT column_default AS d FROM information_schema.columns \
             WHERE table_name = $1 AND column_name = $2",
        )
        .bind::<Text, _>(table)
        .bind::<Text, _>(column)
        .get_result::<Default>(conn)
        .unwrap()
        .d
    };
    for (table, column) in [
        ("dts_outbox", "run_at"),
        ("dts_outbox", "created_at"),
        ("dts_outbox_paused", "paused_at"),
    ] {
        let d = default_of(&mut migrator, table, column);
        assert!(d.contains("date_part"), "{table}.{column}: {d}");
    }
    assert!(!db.notify_enabled());
    enqueue_three(&mut conn, queue);
    assert_eq!(watch.notifications(), 0, "upgraded: no listener, no NOTIFY");

    // The jobs from before and after the upgrade are delivered by a relay of this version.
    let (tx, rx) = mpsc::channel();
    let relay = Relay::builder(db.pool())
        .name("lsn-upgrade")
        .handler(queue, move |job| Ok(tx.send(job.payload::<i32>()?)?))
        .listen(db.url.as_str())
        .spawn()
        .unwrap();
    db.wait_registered("lsn-upgrade");
    let mut got: Vec<i32> = (0..6).map(|_| rx.recv_timeout(PATIENCE).unwrap()).collect();
    got.sort_unstable();
    assert_eq!(got, [1, 1, 2, 2, 3, 3]);
    relay.shutdown();

    migrator
        .revert_last_migration(outbox::migrations::POSTGRES)
        .unwrap();
    let d = default_of(&mut migrator, "dts_outbox", "created_at");
    assert!(d.contains("EXTRACT"), "reverted: {d}");
    assert!(db.notify_enabled());
    enqueue_three(&mut conn, queue);
    assert_eq!(
        watch.notifications(),
        3,
        "reverted: the trigger always notifies"
    );
    let applied = migrator
        .run_pending_migrations(outbox::migrations::POSTGRES)
        .unwrap();
    assert_eq!(applied.len(), 1, "and upgrades again");
}

/// A registration enables the trigger with `ALTER TABLE`, which waits for every transaction
/// that has written to `dts_outbox`: a REPEATABLE READ transaction whose snapshot predates the
/// registration, and whose INSERT comes after it, notifies (the trigger's state is not read
/// in the transaction's snapshot).
#[test]
fn outbox_a_transaction_whose_snapshot_predates_the_registration_notifies() {
    let db = Db::migrated("snapshot");
    let queue = "lsn_snapshot";
    let mut watch = Watch::new(&db);
    let mut early = db.plain();
    early
        .batch_execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM dts_outbox_paused",
        )
        .unwrap();
    let relay = Relay::builder(db.pool())
        .name("lsn-snapshot")
        .handler(queue, |_| Ok(()))
        .poll_interval(Duration::from_secs(3600))
        .listen(db.url.as_str())
        .spawn()
        .unwrap();
    db.wait_registered("lsn-snapshot");
    diesel::sql_query("INSERT INTO dts_outbox (queue, payload) VALUES ('lsn_snapshot', '1')")
        .execute(&mut early)
        .unwrap();
    early.batch_execute("COMMIT").unwrap();
    assert_eq!(
        watch.notifications(),
        1,
        "the snapshot predates the registration, the INSERT does not: it notifies"
    );
    relay.shutdown();
}

/// An enqueuing transaction left open holds the registration (whose `ALTER TABLE` waits for
/// it) past the function's `lock_timeout` (100 ms): one warning, the relay polls, and once
/// the transaction commits the listener registers, and its job is delivered.
#[test]
fn outbox_a_registration_held_up_by_an_open_enqueue_times_out_and_retries() {
    let _ = common::logger();
    let db = Db::migrated("locked");
    let queue = "lsn_locked";
    let name = "lsn-locked";
    let mut open = db.plain();
    open.batch_execute("BEGIN; INSERT INTO dts_outbox (queue, payload) VALUES ('lsn_locked', '7')")
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let relay = Relay::builder(db.pool())
        .name(name)
        .handler(queue, move |job| Ok(tx.send(job.payload::<i32>()?)?))
        .poll_interval(Duration::from_secs(3600))
        .listen(db.url.as_str())
        .spawn()
        .unwrap();
    let me = format!("outbox relay {name}:");
    let lines = |level, needle: &str| common::logger().matching(level, &[&me, needle]);
    common::wait_until(PATIENCE, "a registration that timed out", || {
        !lines(log::Level::Warn, "listener").is_empty()
    });
    let warnings = lines(log::Level::Warn, "listener");
    assert!(
        warnings[0].contains("cannot register") && warnings[0].contains("lock timeout"),
        "{}",
        warnings[0]
    );
    assert!(db.listeners().is_empty() && !db.notify_enabled());
    open.batch_execute("COMMIT").unwrap();
    common::wait_until(PATIENCE, "the registration", || {
        !lines(log::Level::Info, "listener reconnected").is_empty()
    });
    db.wait_registered(name);
    assert!(db.notify_enabled());
    assert_eq!(rx.recv_timeout(PATIENCE), Ok(7));
    relay.shutdown();
    assert_eq!(lines(log::Level::Warn, "listener").len(), 1);
}
