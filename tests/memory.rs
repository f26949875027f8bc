//! Memory stays flat: 1,000,000 transactions with hooks on ONE in-memory SQLite
//! `SignalConnection`, with live heap bytes measured by a counting global allocator.
//!
//! Each transaction registers one `on_commit`, one `on_rollback` and one `defer` (each capturing
//! its transaction number, so every hook is a real heap allocation); every 10th opens a savepoint
//! with its own three hooks, released or rolled back alternately; every 7th transaction rolls
//! back. The reading after the first 10,000 transactions is the baseline (every buffer the
//! wrapper keeps has reached its working size by then); every later reading, up to the last one
//! after 1,000,000, must stay within `baseline + SLACK`. A leak of even one byte per transaction
//! would exceed the slack by a factor of ~15.
//!
//! Cost: no SQL statement runs inside the transactions, only BEGIN / SAVEPOINT / RELEASE /
//! ROLLBACK / COMMIT on an in-memory database, so the test measures the wrapper. Its own binary
//! and its only test, so no other test allocates while it measures.

#![cfg(feature = "sqlite")]
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use diesel::prelude::*;
use diesel::result::Error;
use diesel_transaction_signals::{defer, SignalConnection};

/// Counts the bytes currently allocated through Rust's global allocator in this process.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to `System` unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_add(new_size as isize - layout.size() as isize, Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_bytes() -> isize {
    LIVE.load(Relaxed)
}

const TOTAL: u64 = 1_000_000;
const BASELINE_AT: u64 = 10_000;
const CHECK_EVERY: u64 = 50_000;
/// Allowed growth over the baseline: allocator-independent noise (a `Vec` doubling once more)
/// fits many times over; a per-transaction leak of one byte does not (~990 KB).
const SLACK: isize = 64 * 1024;

// What the hooks did: counts and sums of the transaction numbers they captured.
static COMMIT_RAN: AtomicU64 = AtomicU64::new(0);
static COMMIT_SUM: AtomicU64 = AtomicU64::new(0);
static ROLLBACK_RAN: AtomicU64 = AtomicU64::new(0);
static ROLLBACK_SUM: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Default, PartialEq, Eq)]
struct Expected {
    commit_ran: u64,
    commit_sum: u64,
    rollback_ran: u64,
    rollback_sum: u64,
}

impl Expected {
    fn commits(&mut self, n: u64, i: u64) {
        self.commit_ran += n;
        self.commit_sum += n * i;
    }
    fn rollbacks(&mut self, n: u64, i: u64) {
        self.rollback_ran += n;
        self.rollback_sum += n * i;
    }
    fn actual() -> Self {
        Expected {
            commit_ran: COMMIT_RAN.load(Relaxed),
            commit_sum: COMMIT_SUM.load(Relaxed),
            rollback_ran: ROLLBACK_RAN.load(Relaxed),
            rollback_sum: ROLLBACK_SUM.load(Relaxed),
        }
    }
}

/// Three hooks on the innermost level: on_commit and defer (commit hooks) and on_rollback.
fn register(c: &mut SignalConnection<SqliteConnection>, i: u64) {
    c.on_commit(move || {
        COMMIT_RAN.fetch_add(1, Relaxed);
        COMMIT_SUM.fetch_add(i, Relaxed);
    });
    c.on_rollback(move || {
        ROLLBACK_RAN.fetch_add(1, Relaxed);
        ROLLBACK_SUM.fetch_add(i, Relaxed);
    });
    defer(move || {
        COMMIT_RAN.fetch_add(1, Relaxed);
        COMMIT_SUM.fetch_add(i, Relaxed);
    });
}

/// Transaction `i`, and what its hooks must do.
fn one_transaction(conn: &mut SignalConnection<SqliteConnection>, i: u64, expected: &mut Expected) {
    let outer_rolls_back = i % 7 == 3;
    let savepoint = i % 10 == 0;
    let savepoint_rolls_back = i % 20 == 10;
    let r: QueryResult<()> = conn.transaction(|c| {
        register(c, i);
        if savepoint {
            let sp: QueryResult<()> = c.transaction(|c| {
                register(c, i);
                if savepoint_rolls_back {
                    Err(Error::RollbackTransaction)
                } else {
                    Ok(())
                }
            });
            assert_eq!(sp.is_err(), savepoint_rolls_back);
        }
        if outer_rolls_back {
            Err(Error::RollbackTransaction)
        } else {
            Ok(())
        }
    });
    assert_eq!(r.is_err(), outer_rolls_back);
    // A rolled-back savepoint settles its 3 hooks at once (1 rollback hook); a released one's
    // join the outer level and share its fate.
    let (mut commits, mut rollbacks) = (2, 1);
    if savepoint && !savepoint_rolls_back {
        commits += 2;
        rollbacks += 1;
    }
    if savepoint_rolls_back {
        expected.rollbacks(1, i);
    }
    if outer_rolls_back {
        expected.rollbacks(rollbacks, i);
    } else {
        expected.commits(commits, i);
    }
}

#[test]
fn a_million_transactions_with_hooks_keep_the_heap_flat() {
    let started = Instant::now();
    let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    let mut expected = Expected::default();
    let mut baseline = None;
    let mut readings = Vec::with_capacity((TOTAL / CHECK_EVERY) as usize + 1);
    for i in 1..=TOTAL {
        one_transaction(&mut conn, i, &mut expected);
        if i == BASELINE_AT {
            baseline = Some(live_bytes());
        } else if i % CHECK_EVERY == 0 {
            readings.push((i, live_bytes())); // capacity reserved: no allocation here
        }
    }
    let elapsed = started.elapsed();
    let baseline = baseline.unwrap();
    assert_eq!(conn.transaction_depth(), 0);
    assert_eq!(
        Expected::actual(),
        expected,
        "every hook settled exactly as its transaction did"
    );
    let worst = readings.iter().map(|&(_, b)| b).max().unwrap();
    eprintln!(
        "{TOTAL} transactions in {elapsed:.1?}; live heap: baseline {baseline} B after \
         {BASELINE_AT}, worst {worst} B, final {} B; readings {readings:?}",
        readings.last().unwrap().1
    );
    for &(i, bytes) in &readings {
        assert!(
            bytes <= baseline + SLACK,
            "live heap after {i} transactions is {bytes} B, more than baseline {baseline} B + \
             {SLACK} B: hooks or levels are kept after their transaction ended"
        );
    }
    assert_eq!(readings.last().unwrap().0, TOTAL);
}
