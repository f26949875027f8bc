//! The `listen` connection of a relay connects the way the pool does (a Diesel `PgConnection`,
//! i.e. libpq: same URL syntax, same TLS options), against a PostgreSQL started by each test
//! with `ssl = on`, a self-signed certificate made with `openssl` at test time, and a
//! `pg_hba.conf` that accepts TCP connections only over TLS (`hostssl`).
//!
//! - A relay that polls once a minute and listens over `sslmode=require` is woken within a few
//!   seconds by a job that another process (`psql`, over TLS) inserts: the migrations' trigger
//!   sends the `NOTIFY`.
//! - A listener whose URL says `sslmode=disable` is refused by that server: reported by one
//!   warning (later attempts back off and log at debug level), while the relay still delivers
//!   by polling.
//! - A listener that loses its connection (server restarted) logs one warning, one "listener
//!   reconnected" line once the server is back, registers again (its registration from before
//!   the restart, now naming a backend that is gone, removed), and is woken by NOTIFY again.
//! - A listener that cannot register in `dts_outbox_listeners` (the migration that adds it not
//!   applied yet) logs one warning and retries; a job committed meanwhile is delivered at once
//!   when it registers, by the look its registration rings in (poll interval 60 s).
//!   (Registering enables the NOTIFY trigger; the last listener to stop disables it.)
//!
//! Waiting is polling (of the server, of the captured log, of a channel) against a deadline.

#![cfg(feature = "outbox-listen")]
mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::pg_server::PgServer;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel_migrations::MigrationHarness;
use diesel_transaction_signals::outbox::{self, Relay};

/// Long enough never to matter on a healthy machine; a wait that reaches it is a failure.
const PATIENCE: Duration = Duration::from_secs(30);
/// Far below the relays' 60 s poll interval: only a NOTIFY can deliver this fast.
const PROMPT: Duration = Duration::from_secs(5);

/// The in-process bell is one per process: a listener's wake-up (after registering) wakes the
/// relays of every test of this binary. The tests take turns, so that only a test's own
/// listener can wake its relay.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// A TLS-only server with the outbox tables (migrated over TLS).
fn tls_server() -> PgServer {
    let server = PgServer::builder()
        .tls()
        .hba(PgServer::HBA_TLS_ONLY)
        .start();
    let mut conn = PgConnection::establish(&server.url("postgres", "sslmode=require"))
        .expect("a TLS connection to the test server");
    conn.run_pending_migrations(outbox::migrations::POSTGRES)
        .unwrap();
    server
}

fn pool(server: &PgServer, app: &str) -> Pool<ConnectionManager<PgConnection>> {
    Pool::builder()
        .max_size(1)
        .build(ConnectionManager::<PgConnection>::new(server.url(
            "postgres",
            &format!("sslmode=require&application_name={app}"),
        )))
        .unwrap()
}

/// Inserts a job from another process: `psql` over TCP and TLS, as a plain INSERT (the
/// migrations' statement trigger sends `NOTIFY dts_outbox` at its COMMIT).
fn insert_from_another_process(server: &PgServer, queue: &str, payload: i64) {
    let out = std::process::Command::new(format!("{}/psql", common::pg_server::PG_BIN))
        .arg("-X")
        .arg(server.url(
            "postgres",
            "sslmode=require&application_name=dts-psql-writer",
        ))
        .args(["-qAt", "-v", "ON_ERROR_STOP=1", "-c"])
        .arg(format!(
            "INSERT INTO dts_outbox (queue, payload) VALUES ('{queue}', '{payload}')"
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until the relay's listener (`application_name = listen_app`) has run `LISTEN` over
/// TLS and registered in `dts_outbox_listeners` (enqueues notify from then on), and then
/// until the pool's only connection (`pool_app`) is idle after a claim that started after
/// that registration: the claim the listener's "registered" wake-up causes is over, and the
/// worker waits its 60 s poll interval.
fn wait_listening_and_idle(server: &PgServer, listen_app: &str, pool_app: &str) {
    common::wait_for(PATIENCE, "a registered listener over TLS", || {
        let ssl = server.psql(
            "postgres",
            &format!(
                "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 JOIN dts_outbox_listeners l USING (pid) \
                 WHERE a.application_name = '{listen_app}' AND a.state = 'idle'"
            ),
        );
        match ssl.as_str() {
            "" => None,
            "t" => Some(()),
            other => panic!("the listener's connection is not TLS: ssl = {other:?}"),
        }
    });
    common::wait_until(PATIENCE, "the worker idle after the registration", || {
        let n = server.psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_activity p, pg_stat_activity l \
                 WHERE p.application_name = '{pool_app}' AND p.state = 'idle' \
                 AND l.application_name = '{listen_app}' AND l.state = 'idle' \
                 AND l.pid IN (SELECT pid FROM dts_outbox_listeners) \
                 AND p.query_start > l.state_change"
            ),
        );
        n == "1"
    });
}

fn lines(relay: &str, level: log::Level, needle: &str) -> Vec<String> {
    let me = format!("outbox relay {relay}:");
    common::logger().matching(level, &[&me, needle])
}

#[test]
fn a_listener_over_tls_is_woken_by_another_process_insert() {
    let _turn = one_at_a_time();
    let _ = common::logger();
    let server = tls_server();
    let queue = "tls_wake";
    let (tx, rx) = mpsc::channel();
    let relay = Relay::builder(pool(&server, "dts-tls-pool"))
        .handler(queue, move |job| Ok(tx.send(job.payload::<i64>()?)?))
        .poll_interval(Duration::from_secs(60))
        .unknown_queue_check(Duration::from_secs(3600))
        .listen(server.url(
            "postgres",
            "sslmode=require&application_name=dts-tls-listen",
        ))
        .spawn()
        .unwrap();
    let name = relay.name().to_owned();
    wait_listening_and_idle(&server, "dts-tls-listen", "dts-tls-pool");

    let inserted = Instant::now();
    insert_from_another_process(&server, queue, 7);
    assert_eq!(
        rx.recv_timeout(PROMPT),
        Ok(7),
        "not woken by the NOTIFY (poll interval 60 s)"
    );
    let latency = inserted.elapsed();
    assert!(
        lines(&name, log::Level::Warn, "listener").is_empty(),
        "no listener warning"
    );
    assert_eq!(relay.shutdown().delivered, 1);
    eprintln!("listen over TLS: delivered {latency:?} after another process's INSERT");
}

#[test]
fn a_listener_refused_by_the_server_is_reported_once_and_the_relay_polls() {
    let _turn = one_at_a_time();
    let _ = common::logger();
    let server = tls_server();
    let queue = "tls_refused";
    let (tx, rx) = mpsc::channel();
    let relay = Relay::builder(pool(&server, "dts-refused-pool"))
        .handler(queue, move |job| Ok(tx.send(job.payload::<i64>()?)?))
        .poll_interval(Duration::from_millis(100))
        .listen(server.url("postgres", "sslmode=disable"))
        .spawn()
        .unwrap();
    let name = relay.name().to_owned();
    // Attempts 1-4: 100 + 200 + 400 ms of backoff between them.
    common::wait_until(PATIENCE, "four failed attempts", || {
        lines(&name, log::Level::Debug, "listener attempt 4 failed").len() == 1
    });
    insert_from_another_process(&server, queue, 8);
    assert_eq!(rx.recv_timeout(PATIENCE), Ok(8), "delivered by polling");
    let warnings = lines(&name, log::Level::Warn, "listener");
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains("cannot connect") && warnings[0].contains("pg_hba.conf"),
        "the server's refusal is in the warning: {}",
        warnings[0]
    );
    assert!(lines(&name, log::Level::Info, "reconnected").is_empty());
    assert_eq!(relay.shutdown().delivered, 1);
    // The warning was logged once although the listener kept trying.
    assert_eq!(lines(&name, log::Level::Warn, "listener").len(), 1);
}

#[test]
fn a_listener_that_loses_its_server_says_so_once_and_reconnects() {
    let _turn = one_at_a_time();
    let _ = common::logger();
    let server = tls_server();
    let queue = "tls_reconnect";
    let (tx, rx) = mpsc::channel();
    let relay = Relay::builder(pool(&server, "dts-reconnect-pool"))
        .handler(queue, move |job| Ok(tx.send(job.payload::<i64>()?)?))
        .poll_interval(Duration::from_secs(60))
        .unknown_queue_check(Duration::from_secs(3600))
        .listen(server.url(
            "postgres",
            "sslmode=require&application_name=dts-reconnect-listen",
        ))
        .spawn()
        .unwrap();
    let name = relay.name().to_owned();
    wait_listening_and_idle(&server, "dts-reconnect-listen", "dts-reconnect-pool");

    server.stop("fast");
    common::wait_until(PATIENCE, "failed reconnections", || {
        lines(&name, log::Level::Debug, "listener attempt 2 failed").len() == 1
    });
    server.start();
    common::wait_until(PATIENCE, "the reconnection", || {
        !lines(&name, log::Level::Info, "listener reconnected").is_empty()
    });
    wait_listening_and_idle(&server, "dts-reconnect-listen", "dts-reconnect-pool");
    // A clean restart keeps the UNLOGGED table's rows: the registration from before it named a
    // backend that is gone, and registering again removed it.
    assert_eq!(
        server.psql("postgres", "SELECT count(*) FROM dts_outbox_listeners"),
        "1"
    );
    insert_from_another_process(&server, queue, 9);
    assert_eq!(
        rx.recv_timeout(PROMPT),
        Ok(9),
        "not woken by the NOTIFY after reconnecting (poll interval 60 s)"
    );
    assert_eq!(relay.shutdown().delivered, 1);
    let warnings = lines(&name, log::Level::Warn, "listener");
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(warnings[0].contains("connection lost"), "{}", warnings[0]);
    assert_eq!(
        lines(&name, log::Level::Info, "listener reconnected").len(),
        1
    );
}

#[test]
fn a_job_committed_before_the_listener_could_register_is_found_when_it_registers() {
    let _turn = one_at_a_time();
    let _ = common::logger();
    // The previous schema: the first two outbox migrations, no dts_outbox_listeners.
    let server = PgServer::builder()
        .tls()
        .hba(PgServer::HBA_TLS_ONLY)
        .start();
    let mut conn = PgConnection::establish(&server.url("postgres", "sslmode=require")).unwrap();
    for _ in 0..2 {
        conn.run_next_migration(outbox::migrations::POSTGRES)
            .unwrap();
    }
    let queue = "tls_late_register";
    let (tx, rx) = mpsc::channel();
    let relay = Relay::builder(pool(&server, "dts-late-pool"))
        .handler(queue, move |job| Ok(tx.send(job.payload::<i64>()?)?))
        .poll_interval(Duration::from_secs(60))
        .listen(server.url(
            "postgres",
            "sslmode=require&application_name=dts-late-listen",
        ))
        .spawn()
        .unwrap();
    let name = relay.name().to_owned();
    common::wait_until(PATIENCE, "a failed registration", || {
        !lines(
            &name,
            log::Level::Warn,
            "cannot register in dts_outbox_listeners",
        )
        .is_empty()
    });
    // The worker's first look is over (its empty claim, then worker 0's check for unknown
    // queues): it waits its 60 s poll interval now.
    common::wait_until(PATIENCE, "the worker idle after its first look", || {
        server.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dts-late-pool' \
             AND state = 'idle' AND query LIKE 'SELECT queue, COUNT(*)%'",
        ) == "1"
    });
    // Its trigger notifies, but no listener hears it: the listener is not connected between
    // its attempts, and an attempt drops its connection when the registration fails.
    insert_from_another_process(&server, queue, 11);

    conn.run_pending_migrations(outbox::migrations::POSTGRES)
        .unwrap();
    common::wait_until(PATIENCE, "the registration", || {
        !lines(&name, log::Level::Info, "listener reconnected").is_empty()
    });
    let registered = Instant::now();
    assert_eq!(
        rx.recv_timeout(PROMPT),
        Ok(11),
        "not found by the look rung after the registration (poll interval 60 s)"
    );
    let latency = registered.elapsed();
    let warnings = lines(&name, log::Level::Warn, "listener");
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains("dts_outbox_listener_register(text) does not exist"),
        "{}",
        warnings[0]
    );
    assert_eq!(relay.shutdown().delivered, 1);
    assert_eq!(
        server.psql("postgres", "SELECT count(*) FROM dts_outbox_listeners"),
        "0",
        "a clean stop removes the registration"
    );
    eprintln!("late registration: delivered {latency:?} after the listener registered");
}
