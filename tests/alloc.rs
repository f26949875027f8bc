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
//! With feature `async`, the same for `AsyncSignalConnection` against plain diesel-async, on
//! `SyncConnectionWrapper<SqliteConnection>` and (with `DTS_PG_URL`) `AsyncPgConnection`: see
//! the `async_driver` module below for what is counted there and how.
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

// ---------------------------------------------------------------------------------------------
// Async (feature `async`): `AsyncSignalConnection` against plain diesel-async

/// The same facts for `AsyncSignalConnection`, against plain diesel-async.
///
/// Every run is one `block_on` of a `current_thread` tokio runtime on the test's thread, so the
/// wrapper's own work (its driver, the task map, the hooks) happens on the thread whose
/// counters are read, and so does diesel-async's: the futures, and for PostgreSQL the
/// connection task (`tokio-postgres`'s, spawned on that runtime). What
/// `SyncConnectionWrapper` hands to `spawn_blocking` (the SQLite statements themselves) runs on
/// the runtime's blocking thread and is not counted, for plain and wrapped alike: both send
/// the same statements. `defer` inside `transaction`'s closure takes the closure's task-local
/// scope, in `block_on` as in a spawned task (the same code path).
///
/// Proved, after warm-up: a transaction without hooks (empty; with a released savepoint;
/// rolled back; with a rolled-back savepoint; with a query) and a query allocate exactly what
/// plain diesel-async allocates, on `SyncConnectionWrapper<SqliteConnection>` and (when
/// `DTS_PG_URL` is set, as `scripts/test` does) on `AsyncPgConnection`; a hook
/// (`on_commit`, `on_rollback`, `on_complete`, `defer`) costs one allocation, its box, and N
/// hooks cost N. "Exactly": the same allocations, reallocations and bytes in every one of
/// `REPEAT` runs; frees are not compared (see [`Runs`](async_driver::Runs)), and PostgreSQL
/// queries are compared by the number of allocations most runs make
/// ([`Runs::allocs_mode`](async_driver::Runs::allocs_mode)), since `tokio-postgres`'s buffers
/// vary from run to run.
#[cfg(feature = "async")]
mod async_driver {
    use std::cell::Cell;

    use diesel::result::{Error, QueryResult};
    use diesel::sql_types::Integer;
    use diesel::sqlite::SqliteConnection;
    use diesel::Connection;
    use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    use diesel_async::{AsyncConnection, RunQueryDsl};
    use diesel_transaction_signals::{defer, AsyncSignalConnection, Outcome};
    use tokio::runtime::Runtime;

    use super::{one_box, sink, Counts, COUNTS, REPEAT, TRACE};

    type Sqlite = SyncConnectionWrapper<SqliteConnection>;

    /// Warm-up runs: more than in sync, so the blocking pool has spawned the threads it keeps
    /// (a `spawn_blocking` that finds none idle spawns one, which allocates on the caller).
    const WARM_UP: usize = 20;

    /// A `current_thread` runtime with one blocking thread. With tokio's default pool, a
    /// `spawn_blocking` that comes before the worker that ran the previous one is idle again
    /// now and then starts another worker (seen as 4 more allocations and a realloc on the
    /// caller in some runs, plain and wrapped alike); with one, the task waits in the queue.
    fn runtime() -> Runtime {
        tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    /// The allocations of each of `REPEAT` runs of an async `op` in the steady state. Every run
    /// is its own `rt.block_on` on this thread, and only what happens inside the future is
    /// counted. (One `block_on` around many runs would now and then exhaust tokio's coop budget
    /// when `spawn_blocking` results are ready at once; the forced yield defers the waker in a
    /// list that allocates, for plain and wrapped alike.) With `trace`, and `DTS_ALLOC_TRACE`
    /// set, every allocation of the first measured run is printed.
    fn steady<C>(rt: &Runtime, conn: &mut C, trace: bool, mut op: impl AsyncFnMut(&mut C)) -> Runs {
        for _ in 0..WARM_UP {
            rt.block_on(op(conn));
        }
        let tracing = trace && std::env::var_os("DTS_ALLOC_TRACE").is_some();
        let mut runs = Vec::with_capacity(REPEAT as usize);
        for run in 0..REPEAT {
            let counts = rt.block_on(async {
                TRACE.set(tracing && run == 0);
                let before = COUNTS.with(Cell::get);
                op(conn).await;
                let counts = COUNTS.with(Cell::get) - before;
                TRACE.set(false);
                counts
            });
            runs.push(counts);
        }
        Runs(runs)
    }

    /// Per-run counts. Frees are left out of every comparison: with `SyncConnectionWrapper` a
    /// `spawn_blocking` task's memory is freed by whichever of the caller and the blocking
    /// thread lets go of it last (a race, for plain and wrapped alike), and on PostgreSQL some
    /// buffers are freed a run later; what is compared is what each run allocates.
    #[derive(Debug)]
    struct Runs(Vec<Counts>);

    impl Runs {
        /// What every run allocates, asserting they all allocate the same (frees zeroed).
        fn exact(&self) -> Counts {
            let first = Counts {
                frees: 0,
                ..self.0[0]
            };
            for run in &self.0 {
                assert_eq!(
                    Counts { frees: 0, ..*run },
                    first,
                    "every run allocates the same: {self:?}"
                );
            }
            first
        }

        /// The number of allocations most runs make (more than half of them must agree), for
        /// PostgreSQL queries: `tokio-postgres`'s read and write buffers grow (`realloc`) in a
        /// pattern that depends on how the server's reply arrives, and a reply that arrives in
        /// one piece now and then saves an allocation or two. Allocations, reallocations and
        /// bytes of every run are printed.
        fn allocs_mode(&self) -> Counts {
            let mut allocs: Vec<u64> = self.0.iter().map(|c| c.allocs).collect();
            allocs.sort_unstable();
            let (mut best, mut best_n, mut i) = (0, 0, 0);
            while i < allocs.len() {
                let n = allocs[i..].iter().take_while(|&&a| a == allocs[i]).count();
                if n > best_n {
                    (best, best_n) = (allocs[i], n);
                }
                i += n;
            }
            assert!(
                2 * best_n > allocs.len(),
                "no allocation count is made by most runs: {self:?}"
            );
            Counts {
                allocs: best,
                ..Counts::ZERO
            }
        }
    }

    /// [`one_box`] without its free (frees are not compared, see [`Runs`]).
    fn hook_box<F>(hook: &F) -> Counts {
        Counts {
            frees: 0,
            ..one_box(hook)
        }
    }

    /// diesel-async's SQLite connection, on `rt`'s blocking pool.
    fn sqlite(rt: &Runtime) -> Option<Sqlite> {
        let _in = rt.enter();
        Some(Sqlite::new(
            SqliteConnection::establish(":memory:").expect("SQLite in memory"),
        ))
    }

    /// diesel-async's PostgreSQL connection to `DTS_PG_URL`, its connection task on `rt`;
    /// `None` (the test passes with a notice) when the variable is unset.
    #[cfg(feature = "postgres")]
    fn pg(rt: &Runtime) -> Option<diesel_async::AsyncPgConnection> {
        let Some(url) = std::env::var("DTS_PG_URL").ok().filter(|u| !u.is_empty()) else {
            println!("DTS_PG_URL is not set: skipping the PostgreSQL case");
            return None;
        };
        Some(
            rt.block_on(diesel_async::AsyncPgConnection::establish(&url))
                .unwrap_or_else(|e| panic!("DTS_PG_URL={url}: cannot connect: {e}")),
        )
    }

    /// Runs `op` on a plain diesel-async connection and on a wrapped one (each made by
    /// `$connect`) and asserts the wrapper allocates exactly what diesel-async does.
    macro_rules! same_as_diesel_async {
        ($connect:expr, $what:literal, |$conn:ident| $op:expr) => {
            same_as_diesel_async!($connect, exact, $what, |$conn| $op)
        };
        ($connect:expr, $rule:ident, $what:literal, |$conn:ident| $op:expr) => {{
            let rt = runtime();
            let (Some(mut plain), Some(inner)) = ($connect(&rt), $connect(&rt)) else {
                return;
            };
            let mut wrapped = AsyncSignalConnection::new(inner);
            let plain = steady(&rt, &mut plain, false, async |$conn| {
                $op;
            });
            let wrapper = steady(&rt, &mut wrapped, true, async |$conn| {
                $op;
            });
            let (plain, wrapper) = (plain.$rule(), wrapper.$rule());
            println!("{}: diesel-async {plain:?}, wrapper {wrapper:?}", $what);
            assert_eq!(
                wrapper, plain,
                "{}: the wrapper allocates beyond diesel-async",
                $what
            );
        }};
    }

    /// The hook-free empty transaction and `with` (the same transaction with hooks), on one
    /// wrapped connection.
    fn with_and_without<C: AsyncConnection + 'static>(
        rt: &Runtime,
        inner: C,
        with: impl AsyncFnMut(&mut AsyncSignalConnection<C>),
    ) -> (Counts, Counts) {
        let mut conn = AsyncSignalConnection::new(inner);
        let without = steady(rt, &mut conn, false, async |conn| {
            conn.transaction(async |_| QueryResult::Ok(()))
                .await
                .unwrap()
        });
        let with = steady(rt, &mut conn, true, with);
        (without.exact(), with.exact())
    }

    /// The tests, for one backend (`$connect`: `fn(&Runtime) -> Option<connection>`;
    /// `$query`: how the query cases compare, see [`Runs`]).
    macro_rules! async_alloc_tests {
        ($backend:ident, $connect:path, $query:ident) => {
            mod $backend {
                use super::*;

                #[test]
                fn empty_transaction_allocates_what_diesel_async_does() {
                    same_as_diesel_async!($connect, "empty transaction", |conn| conn
                        .transaction(async |_| QueryResult::Ok(()))
                        .await
                        .unwrap());
                }

                #[test]
                fn savepoint_allocates_what_diesel_async_does() {
                    same_as_diesel_async!(
                        $connect,
                        "transaction with a released savepoint",
                        |conn| conn
                            .transaction(async |conn| {
                                conn.transaction(async |_| QueryResult::Ok(())).await
                            })
                            .await
                            .unwrap()
                    );
                }

                #[test]
                fn rollback_allocates_what_diesel_async_does() {
                    same_as_diesel_async!($connect, "rolled-back transaction", |conn| {
                        let result = conn
                            .transaction(async |_| Err::<(), _>(Error::RollbackTransaction))
                            .await;
                        assert!(result.is_err());
                    });
                    same_as_diesel_async!(
                        $connect,
                        "rolled-back savepoint in a committed transaction",
                        |conn| conn
                            .transaction(async |conn| {
                                let inner = conn
                                    .transaction(async |_| Err::<(), _>(Error::RollbackTransaction))
                                    .await;
                                assert!(inner.is_err());
                                QueryResult::Ok(())
                            })
                            .await
                            .unwrap()
                    );
                }

                #[test]
                fn query_allocates_what_diesel_async_does() {
                    same_as_diesel_async!($connect, $query, "SELECT 1", |conn| {
                        let one: i32 = diesel::select(diesel::dsl::sql::<Integer>("1"))
                            .get_result(conn)
                            .await
                            .unwrap();
                        assert_eq!(one, 1);
                    });
                    same_as_diesel_async!($connect, $query, "transaction with SELECT 1", |conn| {
                        conn.transaction(async |conn| {
                            diesel::select(diesel::dsl::sql::<Integer>("1"))
                                .get_result::<i32>(conn)
                                .await
                        })
                        .await
                        .unwrap()
                    });
                }

                #[test]
                fn on_commit_costs_one_allocation() {
                    let rt = runtime();
                    let Some(inner) = $connect(&rt) else { return };
                    let x = 7_u64;
                    let hook = move || sink(x);
                    let (without, with) = with_and_without(&rt, inner, async |conn| {
                        conn.transaction(async |conn| {
                            conn.on_commit(hook);
                            QueryResult::Ok(())
                        })
                        .await
                        .unwrap()
                    });
                    println!("on_commit: without {without:?}, with one hook {with:?}");
                    assert_eq!(with, without + hook_box(&hook));
                }

                #[test]
                fn on_rollback_costs_one_allocation() {
                    let rt = runtime();
                    let Some(inner) = $connect(&rt) else { return };
                    let x = 7_u64;
                    let hook = move || sink(x);
                    let mut conn = AsyncSignalConnection::new(inner);
                    let without = steady(&rt, &mut conn, false, async |conn| {
                        let result = conn
                            .transaction(async |_| Err::<(), _>(Error::RollbackTransaction))
                            .await;
                        assert!(result.is_err());
                    })
                    .exact();
                    let with = steady(&rt, &mut conn, true, async |conn| {
                        let result = conn
                            .transaction(async |conn| {
                                conn.on_rollback(hook);
                                Err::<(), _>(Error::RollbackTransaction)
                            })
                            .await;
                        assert!(result.is_err());
                    })
                    .exact();
                    println!("on_rollback: without {without:?}, with one hook {with:?}");
                    assert_eq!(with, without + hook_box(&hook));
                }

                #[test]
                fn on_complete_costs_one_allocation() {
                    let rt = runtime();
                    let Some(inner) = $connect(&rt) else { return };
                    let x = 7_u64;
                    let hook = move |_: Outcome| sink(x);
                    let (without, with) = with_and_without(&rt, inner, async |conn| {
                        conn.transaction(async |conn| {
                            conn.on_complete(hook);
                            QueryResult::Ok(())
                        })
                        .await
                        .unwrap()
                    });
                    println!("on_complete: without {without:?}, with one hook {with:?}");
                    assert_eq!(with, without + hook_box(&hook));
                }

                /// `defer` puts the hook in the closure's scope, whose buffer the connection
                /// lends and gets back with its capacity, also across a transaction that
                /// deferred nothing: each `defer` costs its box alone.
                #[test]
                fn defer_costs_one_allocation() {
                    let rt = runtime();
                    let Some(inner) = $connect(&rt) else { return };
                    let x = 7_u64;
                    let hook = move || sink(x);
                    let (without, with) = with_and_without(&rt, inner, async |conn| {
                        conn.transaction(async |_| {
                            defer(hook);
                            QueryResult::Ok(())
                        })
                        .await
                        .unwrap();
                        conn.transaction(async |_| QueryResult::Ok(()))
                            .await
                            .unwrap()
                    });
                    println!(
                        "defer, then a transaction without: without {without:?}, with {with:?}"
                    );
                    assert_eq!(with, without * 2 + hook_box(&hook));
                }

                #[test]
                fn hundred_hooks_cost_a_hundred_allocations() {
                    const N: u64 = 100;
                    let rt = runtime();
                    let Some(inner) = $connect(&rt) else { return };
                    let x = 7_u64;
                    let hook = move || sink(x);
                    let (without, with) = with_and_without(&rt, inner, async |conn| {
                        conn.transaction(async |conn| {
                            for _ in 0..N {
                                conn.on_commit(hook);
                            }
                            QueryResult::Ok(())
                        })
                        .await
                        .unwrap()
                    });
                    println!("{N} x on_commit: without {without:?}, with {with:?}");
                    assert_eq!(with, without + hook_box(&hook) * N);
                }

                #[test]
                fn hundred_defers_cost_a_hundred_allocations() {
                    const N: u64 = 100;
                    let rt = runtime();
                    let Some(inner) = $connect(&rt) else { return };
                    let x = 7_u64;
                    let hook = move || sink(x);
                    let (without, with) = with_and_without(&rt, inner, async |conn| {
                        conn.transaction(async |_| {
                            for _ in 0..N {
                                defer(hook);
                            }
                            QueryResult::Ok(())
                        })
                        .await
                        .unwrap()
                    });
                    println!("{N} x defer: without {without:?}, with {with:?}");
                    assert_eq!(with, without + hook_box(&hook) * N);
                }
            }
        };
    }

    async_alloc_tests!(sqlite_wrapper, sqlite, exact);
    #[cfg(feature = "postgres")]
    async_alloc_tests!(postgres, pg, allocs_mode);
}
