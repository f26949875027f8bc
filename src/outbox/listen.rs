//! The listener of feature `outbox-listen`: a Diesel `PgConnection` (libpq, so the same URL
//! syntax and TLS options as the pool's connections) that runs `LISTEN dts_outbox`, registers
//! itself in `dts_outbox_listeners`, and rings the in-process bell when a notification arrives.
//!
//! libpq delivers notifications only when the connection reads from its socket, and Diesel's
//! `PgConnection::notifications_iter` reads without blocking (`PQconsumeInput`, then
//! `PQnotifies`): the listener looks every tick, which costs one non-blocking `recv` when
//! nothing arrived. The tick adapts: [`TICK_MIN`] while notifications keep coming (within
//! [`ACTIVE`] of the last one: a stream of jobs is picked up within about a millisecond), then
//! doubling at each empty look up to [`TICK`] (an idle listener wakes 20 times a second). A
//! closed connection shows up there as an error.
//!
//! # Registration: NOTIFY only while some relay listens
//!
//! The outbox's statement trigger `dts_outbox_notify` sends `NOTIFY dts_outbox` at every
//! enqueuing COMMIT; since migration `2026-12-02-000300_dts_outbox_listeners` it is enabled
//! only while a listener is registered in `dts_outbox_listeners`, so a transaction that
//! enqueues while no relay listens pays no notification. (The trigger is enabled and disabled,
//! rather than asked to look: a condition in the trigger function, `IF EXISTS (SELECT 1 FROM
//! dts_outbox_listeners)`, measured slower than the NOTIFY it saves, and a disabled trigger
//! costs nothing measurable.)
//!
//! So after `LISTEN`, the listener calls `dts_outbox_listener_register(relay)`: under a lock
//! that serialises registrations, it deletes the rows of backends that no longer exist
//! (`pg_stat_activity`: no backend with that pid, or one started at another time; a row whose
//! backend's start this role may not read is kept: a stale row costs a NOTIFY, a deleted live
//! one would cost a relay its wake-ups), inserts its own (pid and `backend_start`), and
//! enables the trigger if it was disabled. Enabling it is an `ALTER TABLE`, which waits for
//! every transaction that has written to `dts_outbox` to end: a job inserted before the
//! registration committed is committed (or rolled back) by then, and a job inserted after it
//! notifies, whatever its transaction's isolation level or snapshot. Then the listener rings
//! the bell, so the relay looks for due jobs at once and finds the former. No job is left to
//! the poll by the registration. The price: while it waits, new writes to `dts_outbox` wait
//! behind it, at most `lock_timeout` (100 ms, set on the function); past that the
//! registration fails, and is retried like any listener failure (a long transaction that
//! enqueued and stays open delays the registration, not the jobs: the relay polls).
//!
//! When the relay stops cleanly the listener calls `dts_outbox_listener_unregister()`, which
//! deletes its row (and stale ones) and disables the trigger once no row is left; a reconnect
//! registers again. A listener that dies without stopping (process killed, connection lost)
//! leaves its row until the next registration or unregistration removes it; until then the
//! trigger stays enabled and enqueues notify as before (`SELECT
//! dts_outbox_listener_unregister()` from any session cleans up). The table is `UNLOGGED`: a
//! server crash empties it along with every listening connection (the trigger keeps its state
//! until the next unregistration).
//!
//! Rights: the listener's role needs `SELECT`, `INSERT` and `DELETE` on
//! `dts_outbox_listeners`; `dts_outbox_listeners_sync()`, which enables or disables the
//! trigger, runs with its owner's rights (the migration's role). Enqueuing roles need nothing
//! new. A registration that fails (the migration not applied, a missing right, the lock
//! timeout) is a listener failure like a failed `LISTEN`: reported, retried with backoff, the
//! relay polling meanwhile.
//!
//! A failure to connect, to `LISTEN` or to register, or a lost connection, is logged once as a
//! warning; the retries back off exponentially (from [`FIRST_RETRY`] up to [`MAX_RETRY`]) and
//! are logged at debug level only, and the recovery is one info line ("listener reconnected").
//! Meanwhile the relay's workers keep polling every `poll_interval`.

use std::fmt;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::sql_types::Text;
use diesel::{Connection, PgConnection, RunQueryDsl};

use super::{bell_generation, wait_for_bell, wake};

/// The longest wait between two looks at the listening connection (an idle listener).
pub(super) const TICK: Duration = Duration::from_millis(50);
/// The wait between looks while notifications keep coming.
pub(super) const TICK_MIN: Duration = Duration::from_millis(1);
/// How long after the last notification the listener keeps looking every [`TICK_MIN`]; then
/// the wait doubles at each empty look, up to [`TICK`].
pub(super) const ACTIVE: Duration = Duration::from_millis(200);
/// The first wait after a failed connection or `LISTEN`; it doubles at each further failure.
pub(super) const FIRST_RETRY: Duration = Duration::from_millis(100);
/// The longest wait between two attempts to connect.
pub(super) const MAX_RETRY: Duration = Duration::from_secs(30);

/// Why the listener has no connection.
enum Failure {
    Connect(diesel::ConnectionError),
    Listen(diesel::result::Error),
    Register(diesel::result::Error),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "cannot connect: {}", e.to_string().trim_end()),
            Failure::Listen(e) => write!(f, "LISTEN dts_outbox failed: {e}"),
            Failure::Register(e) => write!(
                f,
                "cannot register in dts_outbox_listeners: {e} (run the pending outbox \
                 migrations; the listener's role needs SELECT, INSERT and DELETE on that table)"
            ),
        }
    }
}

/// Registers this connection (`$1`: the relay's name): the migration's function removes the
/// rows of backends that are gone, inserts this backend's, and enables the NOTIFY trigger if it
/// was disabled (waiting for the transactions that wrote to `dts_outbox` to end, at most 100 ms).
const REGISTER: &str = "SELECT dts_outbox_listener_register($1)";

/// Removes this connection's registration (and stale ones); the trigger is disabled once none
/// is left.
const UNREGISTER: &str = "SELECT dts_outbox_listener_unregister()";

/// Connects, listens, then registers (in that order: once registered, every enqueuing
/// transaction that commits notifies, and this connection already hears it).
fn connect(url: &str, relay: &str) -> Result<PgConnection, Failure> {
    let mut conn = PgConnection::establish(url).map_err(Failure::Connect)?;
    conn.batch_execute("LISTEN dts_outbox")
        .map_err(Failure::Listen)?;
    register(&mut conn, relay).map_err(Failure::Register)?;
    Ok(conn)
}

/// Registers `conn`'s backend for relay `relay` (one statement, one transaction).
fn register(conn: &mut PgConnection, relay: &str) -> diesel::QueryResult<()> {
    diesel::sql_query(REGISTER)
        .bind::<Text, _>(relay)
        .execute(conn)?;
    Ok(())
}

/// Removes `conn`'s registration (the relay stops); a failure is logged at debug level: the
/// row then names a backend that is about to end, and the next registration (or unregistration)
/// removes it.
fn unregister(conn: &mut PgConnection, relay: &str) {
    if let Err(e) = diesel::sql_query(UNREGISTER).execute(conn) {
        log::debug!(target: "diesel_transaction_signals",
            "outbox relay {relay}: listener could not remove its registration ({e}); the next \
             listener to register removes it");
    }
}

/// Waits `d`, or less if `stopping()` turns true (the relay rings the bell when it stops).
fn pause(d: Duration, stopping: &impl Fn() -> bool) {
    let deadline = Instant::now() + d;
    loop {
        // Read the generation before the flag: a stop requested after this read also rings
        // the bell, so the wait below returns at once.
        let seen = bell_generation();
        if stopping() {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        wait_for_bell(seen, left);
    }
}

/// Runs the listener of relay `relay` until `stopping()`.
pub(super) fn run(url: &str, relay: &str, stopping: impl Fn() -> bool) {
    let mut retry = FIRST_RETRY;
    // Failed attempts since the last good connection; a warning was logged for the first.
    let mut failures: u32 = 0;
    let mut lost = false;
    while !stopping() {
        let mut conn = match connect(url, relay) {
            Ok(conn) => conn,
            Err(e) => {
                failures += 1;
                if failures == 1 && !lost {
                    log::warn!(target: "diesel_transaction_signals",
                        "outbox relay {relay}: listener {e}; the relay polls meanwhile, and the \
                         listener retries with backoff (up to {MAX_RETRY:?}) without logging \
                         each failure");
                } else {
                    log::debug!(target: "diesel_transaction_signals",
                        "outbox relay {relay}: listener attempt {failures} failed, next in \
                         {retry:?}: {e}");
                }
                pause(retry, &stopping);
                retry = (retry * 2).min(MAX_RETRY);
                continue;
            }
        };
        if failures > 0 || lost {
            log::info!(target: "diesel_transaction_signals",
                "outbox relay {relay}: listener reconnected after {failures} failed attempt(s)");
        } else {
            log::debug!(target: "diesel_transaction_signals",
                "outbox relay {relay}: listener ready (LISTEN dts_outbox, registered)");
        }
        failures = 0;
        retry = FIRST_RETRY;
        // The registration waited for every transaction that had written to dts_outbox: their
        // jobs (which sent no NOTIFY) are committed, and the claim this rings in finds them;
        // later inserts notify (see the module docs).
        wake();
        let mut tick = TICK_MIN;
        let mut last_notified = Instant::now();
        loop {
            if stopping() {
                unregister(&mut conn, relay);
                return;
            }
            let mut notified = false;
            let mut error = None;
            for next in conn.notifications_iter() {
                match next {
                    Ok(_) => notified = true,
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
            if notified {
                wake();
                tick = TICK_MIN;
                last_notified = Instant::now();
            } else if last_notified.elapsed() > ACTIVE {
                tick = (tick * 2).min(TICK);
            }
            if let Some(e) = error {
                log::warn!(target: "diesel_transaction_signals",
                    "outbox relay {relay}: listener connection lost ({}); the relay polls \
                     meanwhile, and the listener reconnects with backoff",
                    e.to_string().trim_end());
                lost = true;
                break;
            }
            pause(tick, &stopping);
        }
    }
}
