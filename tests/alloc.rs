//! Heap allocations of the wrapper, counted (issue 5: "the wrapper costs nothing measurable").
//!
//! A counting `#[global_allocator]` (wrapping `System`) counts, per thread, every allocation,
//! reallocation and free made through Rust's global allocator; each test reads the counters of
//! its own thread, so tests running in parallel threads do not disturb each other. (SQLite's
//! own `malloc`s do not go through Rust's allocator and are not counted: they are the same for
//! plain Diesel and the wrapper, which send the same SQL.)
//!
//! What is proved, on SQLite in memory, after warm-up transactions (buffers that grow once,
//! like the wrapper's level stack and this thread's registry, have their working size):
//!
//! - a transaction without hooks (empty; with a released savepoint; rolled back; with a
//!   rolled-back savepoint) allocates exactly what plain Diesel's `SqliteConnection` allocates
//!   for the same transaction (Diesel itself allocates: a `CString` per statement, and the
//!   `SAVEPOINT diesel_savepoint_N` strings), and a query allocates what plain Diesel's does;
//! - registering and running a hook costs exactly one allocation and one free, for
//!   `on_commit`, `on_rollback` on a rolled-back transaction, `on_complete` and `defer`: its
//!   box, which holds the closure and the registration site (a `&'static Location`, 8 bytes,
//!   kept in the box so that a hook is one 16-byte fat pointer); N hooks cost N. A closure that
//!   captures nothing costs that 8-byte box.
//!
//! Counts are asserted, never times. To see where an unexpected allocation comes from, run with
//! `DTS_ALLOC_TRACE=1 cargo test --all-features --test alloc -- --nocapture`: every allocation
//! made while a wrapper transaction is being measured is printed with a backtrace.

#![cfg(feature = "sqlite")]
use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::Cell;
use std::hint::black_box;
use std::io::Write;
use std::ops::{Add, Mul, Sub};
use std::panic::Location;

use diesel::prelude::*;
use diesel::result::Error;
use diesel::sql_types::Integer;
use diesel_transaction_signals::{defer, Outcome, SignalConnection};

// ---------------------------------------------------------------------------------------------
// The counting allocator

/// What one thread did with the global allocator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    /// `alloc` and `alloc_zeroed` calls.
    allocs: u64,
    /// `realloc` calls (a buffer that grew or shrank).
    reallocs: u64,
    /// `dealloc` calls.
    frees: u64,
    /// Bytes requested by `alloc`/`alloc_zeroed`, plus growth requested by `realloc`.
    bytes: u64,
}

impl Counts {
    const ZERO: Counts = Counts {
        allocs: 0,
        reallocs: 0,
        frees: 0,
        bytes: 0,
    };
}

impl Add for Counts {
    type Output = Counts;
    fn add(self, o: Counts) -> Counts {
        Counts {
            allocs: self.allocs + o.allocs,
            reallocs: self.reallocs + o.reallocs,
            frees: self.frees + o.frees,
            bytes: self.bytes + o.bytes,
        }
    }
}

impl Sub for Counts {
    type Output = Counts;
    fn sub(self, o: Counts) -> Counts {
        Counts {
            allocs: self.allocs - o.allocs,
            reallocs: self.reallocs - o.reallocs,
            frees: self.frees - o.frees,
            bytes: self.bytes - o.bytes,
        }
    }
}

impl Mul<u64> for Counts {
    type Output = Counts;
    fn mul(self, n: u64) -> Counts {
        Counts {
            allocs: self.allocs * n,
            reallocs: self.reallocs * n,
            frees: self.frees * n,
            bytes: self.bytes * n,
        }
    }
}

thread_local! {
    static COUNTS: Cell<Counts> = const { Cell::new(Counts::ZERO) };
    /// Print a backtrace for every allocation (set while a measured section runs with
    /// `DTS_ALLOC_TRACE`).
    static TRACE: Cell<bool> = const { Cell::new(false) };
    /// Inside the allocator's own tracing: neither count nor trace.
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

struct Counting;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Counts with `f` and traces when asked. Const-initialised thread-locals without destructors
/// never allocate, and `try_with` copes with the thread's teardown.
fn note(what: &str, size: usize, f: impl FnOnce(&mut Counts)) {
    if BUSY.try_with(Cell::get).unwrap_or(true) {
        return;
    }
    let _ = COUNTS.try_with(|c| {
        let mut counts = c.get();
        f(&mut counts);
        c.set(counts);
    });
    if TRACE.try_with(Cell::get).unwrap_or(false) {
        BUSY.set(true);
        // Straight to stderr (no test-harness capture, which would take a lock and allocate).
        let _ = writeln!(
            std::io::stderr().lock(),
            "alloc trace: {what} of {size} bytes at\n{}",
            Backtrace::force_capture()
        );
        BUSY.set(false);
    }
}

// SAFETY: every call is forwarded unchanged to `System`; the counting touches only
// const-initialised thread-locals, which neither allocate nor unwind.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note("alloc", layout.size(), |c| {
            c.allocs += 1;
            c.bytes += layout.size() as u64;
        });
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note("alloc_zeroed", layout.size(), |c| {
            c.allocs += 1;
            c.bytes += layout.size() as u64;
        });
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note("realloc", new_size, |c| {
            c.reallocs += 1;
            c.bytes += new_size.saturating_sub(layout.size()) as u64;
        });
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note("dealloc", layout.size(), |c| c.frees += 1);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// What `f` did with the allocator on this thread.
fn counted<R>(f: impl FnOnce() -> R) -> (R, Counts) {
    let before = COUNTS.with(Cell::get);
    let value = f();
    let after = COUNTS.with(Cell::get);
    (value, after - before)
}

// ---------------------------------------------------------------------------------------------
// Measuring

/// Warm-up runs before measuring: every buffer that grows once reaches its working size.
const WARM_UP: usize = 3;
/// Runs measured together, to show every run costs the same (nothing amortised or leaking).
const REPEAT: u64 = 50;

/// Counts of one run of `op` on `conn` in the steady state, checked against `REPEAT` runs.
/// With `trace`, and `DTS_ALLOC_TRACE` set, every counted allocation is printed.
fn steady<C>(conn: &mut C, trace: bool, mut op: impl FnMut(&mut C)) -> Counts {
    for _ in 0..WARM_UP {
        op(conn);
    }
    let tracing = trace && std::env::var_os("DTS_ALLOC_TRACE").is_some();
    TRACE.set(tracing);
    let ((), one) = counted(|| op(conn));
    TRACE.set(false);
    let ((), many) = counted(|| {
        for _ in 0..REPEAT {
            op(conn);
        }
    });
    assert_eq!(many, one * REPEAT, "every run allocates the same");
    one
}

fn plain() -> SqliteConnection {
    SqliteConnection::establish(":memory:").unwrap()
}

fn wrapped() -> SignalConnection<SqliteConnection> {
    SignalConnection::new(plain())
}

/// Runs `op` on a plain connection and on a wrapped one and asserts the wrapper allocates
/// exactly what plain Diesel does.
macro_rules! same_as_plain {
    ($what:literal, |$conn:ident| $op:expr) => {{
        let plain = steady(&mut plain(), false, |$conn| $op);
        let wrapper = steady(&mut wrapped(), true, |$conn| $op);
        println!("{}: plain Diesel {plain:?}, wrapper {wrapper:?}", $what);
        assert_eq!(
            wrapper, plain,
            "{}: the wrapper allocates beyond plain Diesel",
            $what
        );
    }};
}

/// One captured `u64`: the box of a closure capturing it allocates.
fn sink(x: u64) {
    black_box(x);
}

/// The allocation one hook with a closure of type `F` costs: one `alloc` of the closure's size
/// plus the registration site (`&'static Location`, kept in the same box so the hook is one fat
/// pointer), one free.
fn one_box<F>(_: &F) -> Counts {
    Counts {
        allocs: 1,
        reallocs: 0,
        frees: 1,
        bytes: (std::mem::size_of::<F>() + std::mem::size_of::<&'static Location<'static>>())
            as u64,
    }
}

// ---------------------------------------------------------------------------------------------
// Transactions without hooks

#[test]
fn empty_transaction_allocates_what_plain_diesel_does() {
    same_as_plain!("empty transaction", |conn| conn
        .transaction(|_| QueryResult::Ok(()))
        .unwrap());
}

#[test]
fn savepoint_allocates_what_plain_diesel_does() {
    same_as_plain!("transaction with a released savepoint", |conn| conn
        .transaction(|conn| conn.transaction(|_| QueryResult::Ok(())))
        .unwrap());
}

#[test]
fn rollback_allocates_what_plain_diesel_does() {
    same_as_plain!("rolled-back transaction", |conn| {
        let result = conn.transaction(|_| Err::<(), _>(Error::RollbackTransaction));
        assert!(result.is_err());
    });
    same_as_plain!("rolled-back savepoint in a committed transaction", |conn| {
        conn.transaction(|conn| {
            let inner = conn.transaction(|_| Err::<(), _>(Error::RollbackTransaction));
            assert!(inner.is_err());
            QueryResult::Ok(())
        })
        .unwrap()
    });
}

#[test]
fn query_allocates_what_plain_diesel_does() {
    same_as_plain!("SELECT 1", |conn| {
        let one: i32 = diesel::select(diesel::dsl::sql::<Integer>("1"))
            .get_result(conn)
            .unwrap();
        assert_eq!(one, 1);
    });
}

// ---------------------------------------------------------------------------------------------
// Hooks

/// The hook-free transaction and the same transaction with hooks, on one connection.
fn with_and_without(with: impl FnMut(&mut SignalConnection<SqliteConnection>)) -> (Counts, Counts) {
    let mut conn = wrapped();
    let without = steady(&mut conn, false, |conn| {
        conn.transaction(|_| QueryResult::Ok(())).unwrap()
    });
    let with = steady(&mut conn, true, with);
    (without, with)
}

#[test]
fn on_commit_costs_one_allocation() {
    let x = 7_u64;
    let hook = move || sink(x);
    let (without, with) = with_and_without(|conn| {
        conn.transaction(|conn| {
            conn.on_commit(hook);
            QueryResult::Ok(())
        })
        .unwrap()
    });
    println!("on_commit: without {without:?}, with one hook {with:?}");
    assert_eq!(with, without + one_box(&hook));
}

#[test]
fn on_rollback_costs_one_allocation() {
    let x = 7_u64;
    let hook = move || sink(x);
    let mut conn = wrapped();
    let rollback = |conn: &mut SignalConnection<SqliteConnection>| {
        let result = conn.transaction(|_| Err::<(), _>(Error::RollbackTransaction));
        assert!(result.is_err());
    };
    let without = steady(&mut conn, false, rollback);
    let with = steady(&mut conn, true, |conn| {
        let result = conn.transaction(|conn| {
            conn.on_rollback(hook);
            Err::<(), _>(Error::RollbackTransaction)
        });
        assert!(result.is_err());
    });
    println!("on_rollback: without {without:?}, with one hook {with:?}");
    assert_eq!(with, without + one_box(&hook));
}

#[test]
fn on_complete_costs_one_allocation() {
    let x = 7_u64;
    let hook = move |_: Outcome| sink(x);
    let (without, with) = with_and_without(|conn| {
        conn.transaction(|conn| {
            conn.on_complete(hook);
            QueryResult::Ok(())
        })
        .unwrap()
    });
    println!("on_complete: without {without:?}, with one hook {with:?}");
    assert_eq!(with, without + one_box(&hook));
}

/// Deferred hooks wait in this thread's buffer and move into the connection's stack in one
/// piece, and both keep their capacity, so once both have grown a `defer` allocates its hook's
/// box and nothing else. (A regression test: the inbox once handed its `Vec` over with
/// `mem::take` and grew a new one every transaction.)
#[test]
fn defer_costs_one_allocation() {
    let x = 7_u64;
    let hook = move || sink(x);
    let (without, with) = with_and_without(|conn| {
        conn.transaction(|_| {
            defer(hook);
            QueryResult::Ok(())
        })
        .unwrap()
    });
    println!("defer: without {without:?}, with one hook {with:?}");
    assert_eq!(with, without + one_box(&hook));
}

#[test]
fn hundred_hooks_cost_a_hundred_allocations() {
    const N: u64 = 100;
    let x = 7_u64;
    let hook = move || sink(x);
    let (without, with) = with_and_without(|conn| {
        conn.transaction(|conn| {
            for _ in 0..N {
                conn.on_commit(hook);
            }
            QueryResult::Ok(())
        })
        .unwrap()
    });
    println!("{N} x on_commit: without {without:?}, with {with:?}");
    assert_eq!(with, without + one_box(&hook) * N);
}

#[test]
fn hook_capturing_nothing_costs_only_its_registration_site() {
    let hook = || sink(0);
    assert_eq!(std::mem::size_of_val(&hook), 0);
    let (without, with) = with_and_without(|conn| {
        conn.transaction(|conn| {
            conn.on_commit(hook);
            QueryResult::Ok(())
        })
        .unwrap()
    });
    println!("zero-sized on_commit: without {without:?}, with {with:?}");
    assert_eq!(with, without + one_box(&hook));
    assert_eq!(one_box(&hook).bytes, 8);
}
