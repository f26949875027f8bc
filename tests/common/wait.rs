//! Waiting for a condition: poll it with a short backoff against a deadline, and fail naming
//! what was awaited. Never a fixed sleep as synchronisation: the pause between two probes is a
//! backoff, the condition is checked again after it.
//!
//! ```ignore
//! common::wait_until(Duration::from_secs(30), "the queue to drain", || queue_len() == 0);
//! let pid = common::wait_for(deadline, "the listener's backend", || listener_pid());
//! ```

use std::time::{Duration, Instant};

/// The first pause between two probes; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const MAX_PAUSE: Duration = Duration::from_millis(50);

/// When to give up: an [`Instant`], or a [`Duration`] from now (the call's start).
pub trait Deadline {
    fn instant(self) -> Instant;
}

impl Deadline for Instant {
    fn instant(self) -> Instant {
        self
    }
}

impl Deadline for Duration {
    fn instant(self) -> Instant {
        Instant::now() + self
    }
}

/// Polls `probe` until it returns `Some` and returns that value, or `None` once `deadline` has
/// passed (for callers that must not panic, e.g. a relay's handler). `probe` runs at least once,
/// and once more after the deadline has passed.
pub fn try_wait_for<T>(deadline: impl Deadline, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = deadline.instant();
    let mut pause = FIRST_PAUSE;
    loop {
        let late = Instant::now() >= deadline;
        if let Some(v) = probe() {
            return Some(v);
        }
        if late {
            return None;
        }
        std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Polls `probe` until it returns `Some` and returns that value; panics naming `what` once
/// `deadline` has passed.
#[track_caller]
pub fn wait_for<T>(deadline: impl Deadline, what: &str, probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    match try_wait_for(deadline, probe) {
        Some(v) => v,
        None => panic!("timed out after {:?} waiting for {what}", started.elapsed()),
    }
}

/// Polls `cond` until it holds; panics naming `what` once `deadline` has passed.
#[track_caller]
pub fn wait_until(deadline: impl Deadline, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(deadline, what, || cond().then_some(()))
}
