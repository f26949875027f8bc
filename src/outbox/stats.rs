//! A relay's counters ([`RelayStats`], [`QueueStats`], [`HandlerTimes`]) and the bookkeeping
//! both relays (threads and tokio tasks) do around their SQL: counting, logging, the lease
//! owner's name and the retry decision.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::job::{Backoff, Job};

/// Counters of a relay, for monitoring and tests; per queue, with handler times, in
/// [`RelayHandle::queue_stats`](super::RelayHandle::queue_stats).
///
/// ```
/// # use diesel_transaction_signals::outbox::RelayStats;
/// fn healthy(s: &RelayStats) -> bool { s.dead == 0 && s.unknown_queue_rows == 0 }
/// # let _ = healthy;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Handler runs (attempts) started, whatever their outcome.
    pub run: u64,
    /// Handler runs that returned `Err` or panicked (each is then retried, dead-lettered, or
    /// left to the worker that took the row over after the lease expired).
    pub failed: u64,
    /// Jobs whose handler succeeded and whose row was deleted.
    pub delivered: u64,
    /// Failed attempts (handler `Err` or panic) that will be retried.
    pub retried: u64,
    /// Jobs moved to the dead-letter state.
    pub dead: u64,
    /// Rows seen at the last check in queues this relay has no handler for (kept, reported).
    pub unknown_queue_rows: u64,
    /// Claimed rows released at shutdown without running.
    pub released: u64,
}

/// The counters of one queue of a relay ([`RelayHandle::queue_stats`](super::RelayHandle::queue_stats)): what a service exports
/// as metrics, labelled by queue.
///
/// ```
/// # use diesel_transaction_signals::outbox::QueueStats;
/// fn error_ratio(q: &QueueStats) -> f64 { q.failed as f64 / q.run.max(1) as f64 }
/// # let _ = error_ratio;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Handler runs (attempts) started.
    pub run: u64,
    /// Jobs whose handler succeeded and whose row this relay deleted.
    pub delivered: u64,
    /// Handler runs that returned `Err` or panicked.
    pub failed: u64,
    /// Failed attempts scheduled for a retry.
    pub retried: u64,
    /// Jobs moved to the dead-letter state.
    pub dead: u64,
    /// How long the handler took, successful or not.
    pub handler_time: HandlerTimes,
}

/// Handler durations of one queue: count, sum, maximum, and a fixed histogram whose bucket `i`
/// counts the runs that took at most [`HandlerTimes::BOUNDS`]`[i]` and more than the bound
/// before it (not cumulative); the last bucket counts the runs above the last bound.
///
/// ```
/// use diesel_transaction_signals::outbox::HandlerTimes;
/// use std::time::Duration;
///
/// fn mean(t: &HandlerTimes) -> Option<Duration> {
///     (t.count > 0).then(|| t.sum / t.count as u32)
/// }
/// // Prometheus-style cumulative buckets:
/// fn cumulative(t: &HandlerTimes) -> Vec<(Option<Duration>, u64)> {
///     let mut total = 0;
///     t.buckets.iter().enumerate().map(|(i, n)| {
///         total += n;
///         (HandlerTimes::BOUNDS.get(i).copied(), total) // None: +Inf
///     }).collect()
/// }
/// assert_eq!(HandlerTimes::default().buckets.len(), HandlerTimes::BOUNDS.len() + 1);
/// # let _ = (mean, cumulative);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandlerTimes {
    /// Runs measured.
    pub count: u64,
    /// Their total duration.
    pub sum: Duration,
    /// The longest one.
    pub max: Duration,
    /// Runs per duration bucket (see [`HandlerTimes::BOUNDS`]).
    pub buckets: [u64; 8],
}

impl HandlerTimes {
    /// The buckets' upper bounds: 1 ms, 5 ms, 25 ms, 100 ms, 500 ms, 2.5 s, 10 s (and above).
    ///
    /// ```
    /// use diesel_transaction_signals::outbox::HandlerTimes;
    /// use std::time::Duration;
    /// assert_eq!(HandlerTimes::BOUNDS[0], Duration::from_millis(1));
    /// assert_eq!(HandlerTimes::BOUNDS[6], Duration::from_secs(10));
    /// ```
    pub const BOUNDS: [Duration; 7] = [
        Duration::from_millis(1),
        Duration::from_millis(5),
        Duration::from_millis(25),
        Duration::from_millis(100),
        Duration::from_millis(500),
        Duration::from_millis(2500),
        Duration::from_secs(10),
    ];
}

#[derive(Default)]
struct QueueCounters {
    run: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    time_count: AtomicU64,
    time_sum_ns: AtomicU64,
    time_max_ns: AtomicU64,
    buckets: [AtomicU64; 8],
}

impl QueueCounters {
    fn timed(&self, took: Duration) {
        let ns = took.as_nanos().min(u64::MAX as u128) as u64;
        self.time_count.fetch_add(1, Ordering::Relaxed);
        self.time_sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.time_max_ns.fetch_max(ns, Ordering::Relaxed);
        let bucket = HandlerTimes::BOUNDS
            .iter()
            .position(|b| took <= *b)
            .unwrap_or(HandlerTimes::BOUNDS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> QueueStats {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        QueueStats {
            run: load(&self.run),
            delivered: load(&self.delivered),
            failed: load(&self.failed),
            retried: load(&self.retried),
            dead: load(&self.dead),
            handler_time: HandlerTimes {
                count: load(&self.time_count),
                sum: Duration::from_nanos(load(&self.time_sum_ns)),
                max: Duration::from_nanos(load(&self.time_max_ns)),
                buckets: std::array::from_fn(|i| load(&self.buckets[i])),
            },
        }
    }
}

#[derive(Default)]
struct Counters {
    run: AtomicU64,
    failed: AtomicU64,
    delivered: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    unknown: AtomicU64,
    released: AtomicU64,
}

/// What a relay's workers share: the stop flag and the counters.
pub(super) struct Shared {
    stop: AtomicBool,
    counters: Counters,
    /// One entry per handled queue, made at spawn (so counting takes no lock).
    queues: HashMap<String, QueueCounters>,
}

/// What to do with a failed attempt: retry after `delay`, or dead-letter the row.
pub(super) struct Retry {
    pub(super) dead: bool,
    pub(super) delay: Duration,
    /// The `run_at` offset to record: the delay, or 0 for a dead row (whose `run_at` then
    /// records when it died, which `Admin::purge_dead` ages it by).
    pub(super) delay_ms: i64,
}

impl Retry {
    /// The decision after failed attempt `job.attempt()` (`random` in `0.0..1.0` for jitter).
    pub(super) fn after(backoff: &Backoff, job: &Job, random: f64) -> Self {
        let dead = job.attempt() >= job.max_attempts();
        let delay = backoff.jittered(job.attempt(), random);
        let delay_ms = if dead {
            0
        } else {
            delay.as_millis().min(i64::MAX as u128) as i64
        };
        Retry {
            dead,
            delay,
            delay_ms,
        }
    }
}

impl Shared {
    pub(super) fn new<'q>(queues: impl IntoIterator<Item = &'q String>) -> Self {
        Shared {
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            queues: queues
                .into_iter()
                .map(|q| (q.clone(), QueueCounters::default()))
                .collect(),
        }
    }

    pub(super) fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sets the stop flag (the caller rings the bell).
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub(super) fn stats(&self) -> RelayStats {
        let c = &self.counters;
        RelayStats {
            run: c.run.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            dead: c.dead.load(Ordering::Relaxed),
            unknown_queue_rows: c.unknown.load(Ordering::Relaxed),
            released: c.released.load(Ordering::Relaxed),
        }
    }

    pub(super) fn queue_stats(&self) -> BTreeMap<String, QueueStats> {
        self.queues
            .iter()
            .map(|(q, c)| (q.clone(), c.snapshot()))
            .collect()
    }

    /// A handler run is starting.
    pub(super) fn started(&self) {
        self.counters.run.fetch_add(1, Ordering::Relaxed);
    }

    /// A handler run of `queue` took `took` and failed or not.
    pub(super) fn ran(&self, queue: &str, took: Duration, failed: bool) {
        let counters = self.queues.get(queue);
        if let Some(c) = counters {
            c.run.fetch_add(1, Ordering::Relaxed);
            c.timed(took);
        }
        if failed {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = counters {
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Counts and logs the release of `n` claimed rows at shutdown.
    pub(super) fn released(&self, relay: &str, n: usize, result: diesel::QueryResult<()>) {
        match result {
            Ok(()) => {
                self.counters
                    .released
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => log::warn!(target: "diesel_transaction_signals",
                "outbox relay {relay}: releasing {n} claimed rows at shutdown failed ({e}); \
                 they run again when their lease expires"),
        }
    }

    /// Counts and logs the deletion of the succeeded jobs `done` (id, queue).
    pub(super) fn completed(
        &self,
        relay: &str,
        done: &[(i64, String)],
        result: diesel::QueryResult<usize>,
    ) {
        match result {
            Ok(deleted) => {
                self.counters
                    .delivered
                    .fetch_add(deleted as u64, Ordering::Relaxed);
                // Per queue: exact when every row was deleted or the batch is one queue's; a
                // mixed batch some of whose rows another worker took over counts in the totals
                // only (which rows were deleted is not known).
                if deleted == done.len() {
                    for (_, queue) in done {
                        if let Some(c) = self.queues.get(queue) {
                            c.delivered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                } else if done.iter().all(|(_, q)| *q == done[0].1) {
                    if let Some(c) = self.queues.get(&done[0].1) {
                        c.delivered.fetch_add(deleted as u64, Ordering::Relaxed);
                    }
                }
                if deleted < done.len() {
                    log::warn!(target: "diesel_transaction_signals",
                        "outbox relay {relay}: {} of {} succeeded jobs were no longer leased to \
                         this worker (their lease expired and another worker took them, or they \
                         are gone); that worker's attempt decides",
                        done.len() - deleted, done.len());
                }
            }
            Err(e) => log::error!(target: "diesel_transaction_signals",
                "outbox relay {relay}: deleting {} delivered jobs failed ({e}); they will be \
                 delivered again when their lease expires", done.len()),
        }
    }

    /// Counts and logs the recording of a failed attempt (`result` of `outbox_fail`).
    pub(super) fn failed(
        &self,
        relay: &str,
        job: &Job,
        error: &str,
        retry: &Retry,
        result: diesel::QueryResult<bool>,
    ) {
        let (id, queue, attempt) = (job.id(), job.queue(), job.attempt());
        match result {
            Ok(true) => {}
            Ok(false) => {
                log::warn!(target: "diesel_transaction_signals",
                    "outbox relay {relay}: job {id} ({queue}) failed attempt {attempt} after its \
                     lease expired and another worker took it; that worker's attempt decides: \
                     {error}");
                return;
            }
            Err(e) => {
                log::error!(target: "diesel_transaction_signals",
                    "outbox relay {relay}: recording the failure of job {id} failed ({e}); it \
                     runs again when its lease expires");
                return;
            }
        }
        let counters = self.queues.get(queue);
        let max = job.max_attempts();
        if retry.dead {
            self.counters.dead.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = counters {
                c.dead.fetch_add(1, Ordering::Relaxed);
            }
            log::error!(target: "diesel_transaction_signals",
                "outbox relay {relay}: job {id} ({queue}) failed attempt {attempt}/{max} and is \
                 dead-lettered: {error}");
        } else {
            self.counters.retried.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = counters {
                c.retried.fetch_add(1, Ordering::Relaxed);
            }
            let delay = retry.delay;
            log::warn!(target: "diesel_transaction_signals",
                "outbox relay {relay}: job {id} ({queue}) failed attempt {attempt}/{max}, \
                 retrying in {delay:?}: {error}");
        }
    }

    /// Records and logs what the unknown-queue check found.
    pub(super) fn unknown_queues(
        &self,
        relay: &str,
        result: diesel::QueryResult<Vec<(String, i64)>>,
    ) {
        match result {
            Ok(found) => {
                let total: i64 = found.iter().map(|(_, n)| n).sum();
                self.counters
                    .unknown
                    .store(total.max(0) as u64, Ordering::Relaxed);
                for (queue, n) in found {
                    log::warn!(target: "diesel_transaction_signals",
                        "outbox relay {relay}: {n} pending job(s) in queue {queue:?}, which has \
                         no handler here; they are kept");
                }
            }
            Err(e) => log::debug!(target: "diesel_transaction_signals",
                "outbox relay {relay}: unknown-queue check failed: {e}"),
        }
    }
}

/// Logs a failed claim, with the fix when the paused-queues table is missing.
pub(super) fn claim_failed(relay: &str, e: &diesel::result::Error) {
    // A database upgraded to this version without its migrations: say how to fix.
    let hint = if e.to_string().contains("dts_outbox_paused") {
        " (run the pending outbox migrations, e.g. `dts-outbox migrate`: claims \
         read the paused queues in dts_outbox_paused)"
    } else {
        ""
    };
    log::warn!(target: "diesel_transaction_signals",
        "outbox relay {relay}: claim failed: {e}{hint}");
}

/// The name of a relay spawned without one: `relay-<pid>-<counter>`.
pub(super) fn default_name() -> String {
    static RELAYS: AtomicU64 = AtomicU64::new(1);
    format!(
        "relay-{}-{}",
        std::process::id(),
        RELAYS.fetch_add(1, Ordering::Relaxed)
    )
}

/// The queues as the JSON array the claim binds, sorted.
pub(super) fn queues_json<'q>(queues: impl IntoIterator<Item = &'q String>) -> String {
    let mut queues: Vec<&String> = queues.into_iter().collect();
    queues.sort();
    serde_json::to_string(&queues).expect("strings serialize")
}

/// The lease owner a worker records in `locked_by`: `<name>/<worker>/<nonce>`, the name cut
/// (at a character boundary) so the whole fits MySQL's `VARCHAR(191)`.
pub(super) fn lease_owner(name: &str, worker: u64, nonce: u64) -> String {
    let suffix = format!("/{worker}/{nonce:016x}");
    let mut cut = name.len().min(191 - suffix.len());
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &name[..cut])
}

#[cfg(test)]
mod tests {
    use super::lease_owner;

    #[test]
    fn lease_owners_differ_per_worker_and_spawn_and_fit_191_bytes() {
        assert_eq!(lease_owner("mailer", 1, 0xab), "mailer/1/00000000000000ab");
        assert_ne!(lease_owner("r", 0, 1), lease_owner("r", 1, 1));
        assert_ne!(lease_owner("r", 0, 1), lease_owner("r", 0, 2));
        let long = "é".repeat(200);
        let owner = lease_owner(&long, 7, u64::MAX);
        assert!(owner.len() <= 191, "{}", owner.len());
        assert!(owner.ends_with("/7/ffffffffffffffff"));
    }
}
