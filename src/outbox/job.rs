//! What a handler is given ([`Job`], [`JobId`]) and when a failed attempt runs again
//! ([`Backoff`]): the pure pieces the thread relay and the async relay share.

use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::backend::ClaimedRow;

/// The stable id of a durable job (its row id), for idempotent handlers.
///
/// ```
/// # use diesel_transaction_signals::outbox::Job;
/// fn dedupe_key(job: &Job) -> String { format!("job-{}", job.id()) }
/// # let _ = dedupe_key;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub(crate) i64);

impl JobId {
    /// The id of the row `id`, e.g. one read from [`DeadLetter::id`](super::DeadLetter) or
    /// typed by an operator, for the operations of [`Admin`](super::Admin).
    ///
    /// ```
    /// use diesel_transaction_signals::outbox::JobId;
    /// assert_eq!(JobId::new(42).get(), 42);
    /// assert_eq!(JobId::from(42), JobId::new(42));
    /// ```
    pub fn new(id: i64) -> Self {
        JobId(id)
    }

    /// The row id.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Job;
    /// fn raw(job: &Job) -> i64 { job.id().get() }
    /// # let _ = raw;
    /// ```
    pub fn get(self) -> i64 {
        self.0
    }
}

impl From<i64> for JobId {
    fn from(id: i64) -> Self {
        JobId(id)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A job handed to a handler.
///
/// ```
/// use diesel_transaction_signals::outbox::Job;
///
/// #[derive(serde::Deserialize)]
/// struct Welcome { user_id: i64 }
///
/// fn handle(job: &Job) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
///     let Welcome { user_id } = job.payload()?;
///     println!("attempt {} of job {} for user {user_id}", job.attempt(), job.id());
///     Ok(())
/// }
/// # let _ = handle;
/// ```
#[derive(Debug, Clone)]
pub struct Job {
    id: JobId,
    queue: String,
    payload: String,
    attempt: u32,
    max_attempts: u32,
    idempotency_key: Option<String>,
}

impl Job {
    /// The job's stable id.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Job;
    /// fn id(job: &Job) -> i64 { job.id().get() }
    /// # let _ = id;
    /// ```
    pub fn id(&self) -> JobId {
        self.id
    }

    /// The queue it was enqueued on.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Job;
    /// fn queue(job: &Job) -> &str { job.queue() }
    /// # let _ = queue;
    /// ```
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// This attempt's number: 1 for the first delivery.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Job;
    /// fn retried(job: &Job) -> bool { job.attempt() > 1 }
    /// # let _ = retried;
    /// ```
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How many attempts the job gets before it is dead-lettered.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Job;
    /// fn last_chance(job: &Job) -> bool { job.attempt() == job.max_attempts() }
    /// # let _ = last_chance;
    /// ```
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The idempotency key it was enqueued with, if any.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Job;
    /// fn key(job: &Job) -> Option<&str> { job.idempotency_key() }
    /// # let _ = key;
    /// ```
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }

    /// The payload as stored (JSON text).
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Job;
    /// fn raw(job: &Job) -> &str { job.payload_json() }
    /// # let _ = raw;
    /// ```
    pub fn payload_json(&self) -> &str {
        &self.payload
    }

    /// The payload, deserialized.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Job;
    /// fn user(job: &Job) -> Result<i64, serde_json::Error> { job.payload() }
    /// # let _ = user;
    /// ```
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.payload)
    }

    pub(super) fn from_row(row: ClaimedRow) -> Self {
        Job {
            id: JobId(row.id),
            queue: row.queue,
            payload: row.payload,
            attempt: row.attempts.max(1) as u32,
            max_attempts: row.max_attempts.max(1) as u32,
            idempotency_key: row.idempotency_key,
        }
    }
}

/// Retry delays: `base * 2^(attempt - 1)`, capped at `max`, each multiplied by a random factor
/// in `1 ± jitter` so that failing jobs do not retry in lockstep.
///
/// ```
/// use diesel_transaction_signals::outbox::Backoff;
/// use std::time::Duration;
///
/// let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(60)).jitter(0.0);
/// assert_eq!(b.delay(1), Duration::from_millis(100));
/// assert_eq!(b.delay(4), Duration::from_millis(800));
/// assert_eq!(b.delay(40), Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: f64,
}

impl Default for Backoff {
    /// 1 s doubling up to 1 h, ±20 % jitter.
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(3600),
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// Doubling from `base`, capped at `max`, ±20 % jitter.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Backoff;
    /// let b = Backoff::new(std::time::Duration::from_secs(1), std::time::Duration::from_secs(30));
    /// # let _ = b;
    /// ```
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            ..Backoff::default()
        }
    }

    /// The jitter fraction, clamped to `0.0..=1.0`.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Backoff;
    /// let b = Backoff::default().jitter(0.5);
    /// # let _ = b;
    /// ```
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction.clamp(0.0, 1.0);
        self
    }

    /// The delay before retrying after failed attempt number `attempt` (1-based), without
    /// jitter.
    ///
    /// ```
    /// # use diesel_transaction_signals::outbox::Backoff;
    /// assert!(Backoff::default().delay(2) > Backoff::default().delay(1));
    /// ```
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(62);
        self.base
            .checked_mul(1u32.checked_shl(exp.min(31)).unwrap_or(u32::MAX))
            .map_or(self.max, |d| d.min(self.max))
    }

    pub(super) fn jittered(&self, attempt: u32, random: f64) -> Duration {
        let factor = 1.0 + self.jitter * (2.0 * random - 1.0);
        self.delay(attempt).mul_f64(factor.max(0.0))
    }
}
