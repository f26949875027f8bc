//! The listener of feature `outbox-listen`: a Diesel `PgConnection` (libpq, so the same URL
//! syntax and TLS options as the pool's connections) that runs `LISTEN dts_outbox` and rings
//! the in-process bell when a notification arrives.
//!
//! libpq delivers notifications only when the connection reads from its socket, and Diesel's
//! `PgConnection::notifications_iter` reads without blocking (`PQconsumeInput`, then
//! `PQnotifies`): the listener looks every tick, which costs one non-blocking `recv` when
//! nothing arrived. The tick adapts: [`TICK_MIN`] while notifications keep coming (within
//! [`ACTIVE`] of the last one: a stream of jobs is picked up within about a millisecond), then
//! doubling at each empty look up to [`TICK`] (an idle listener wakes 20 times a second). A
//! closed connection shows up there as an error.
//!
//! A failure to connect or to `LISTEN`, or a lost connection, is logged once as a warning; the
//! retries back off exponentially (from [`FIRST_RETRY`] up to [`MAX_RETRY`]) and are logged at
//! debug level only, and the recovery is one info line ("listener reconnected"). Meanwhile the
//! relay's workers keep polling every `poll_interval`.

use std::fmt;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};

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
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "cannot connect: {}", e.to_string().trim_end()),
            Failure::Listen(e) => write!(f, "LISTEN dts_outbox failed: {e}"),
        }
    }
}

fn connect(url: &str) -> Result<PgConnection, Failure> {
    let mut conn = PgConnection::establish(url).map_err(Failure::Connect)?;
    conn.batch_execute("LISTEN dts_outbox")
        .map_err(Failure::Listen)?;
    Ok(conn)
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
        let mut conn = match connect(url) {
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
                "outbox relay {relay}: listener ready (LISTEN dts_outbox)");
        }
        failures = 0;
        retry = FIRST_RETRY;
        // Anything committed before LISTEN took effect is found by the claim this rings in.
        wake();
        let mut tick = TICK_MIN;
        let mut last_notified = Instant::now();
        loop {
            if stopping() {
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
