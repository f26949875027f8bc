//! What the wrapper costs (issue 5), measured against plain Diesel in the same run.
//!
//! Groups (one criterion group per comparison, `target/criterion/<group>/<variant>/`):
//!
//! | group | variants | what one iteration is |
//! |---|---|---|
//! | `sqlite_query_select1`, `pg_query_select1` | `plain`, `wrapper` | `SELECT 1`, loaded |
//! | `sqlite_query_insert`, `pg_query_insert` | `plain`, `wrapper` | a prepared single-row `INSERT` (autocommit) |
//! | `{sqlite,pg}_tx_empty` | `plain`, `wrapper` | `transaction(\|_\| Ok(()))` |
//! | `{sqlite,pg}_tx_empty_savepoint` | `plain`, `wrapper` | an empty transaction nested in one |
//! | `{sqlite,pg}_tx_insert` | `plain`, `wrapper` | a transaction with one `INSERT` |
//! | `{sqlite,pg}_tx_insert_savepoint` | `plain`, `wrapper` | the `INSERT` in a savepoint |
//! | `hooks_{commit,defer,rollback}_{0,1,10,100,10000}` | `vec`, `wrapper` (and, interleaved but not benchmarked, `vec_0`, `wrapper_0`: the same with no hook) | a SQLite transaction registering N hooks, which then run |
//! | `signals_post_commit` | `plain`, `no_receiver`, `one_receiver` | an empty SQLite transaction |
//! | `async_{sqlite,pg}_query_{select1,insert}`, `async_{sqlite,pg}_tx_{empty,insert}` (feature `async`) | `plain`, `wrapper` | as above, through diesel-async: `SyncConnectionWrapper<SqliteConnection>` or `AsyncPgConnection` (`plain`) and `AsyncSignalConnection` of it (`wrapper`) |
//! | `async_hooks_{commit,defer,rollback}_{100,10000}` (feature `async`) | `vec`, `wrapper` (and `vec_0`, `wrapper_0`) | a diesel-async SQLite transaction registering N hooks, which then run |
//!
//! SQLite is in memory; PostgreSQL is the server at `DTS_PG_URL` (over loopback), and its
//! groups are skipped, with a notice, when the variable is unset. Every variant has its own
//! connection, set up the same way (same schema, same statements); on PostgreSQL all of them
//! are sessions of the same database, each with its own `TEMPORARY` table.
//!
//! The `hooks_*` groups compare the wrapper with what a user would write by hand without it: a
//! `Vec<Box<dyn FnOnce()>>` filled inside `conn.transaction` on a plain `SqliteConnection`,
//! whose closures are called after `transaction` returns (`Ok` for commit hooks, `Err` for
//! rollback hooks). Every hook captures a `u64`, so its box allocates, and records that it ran;
//! each variant checks after every chunk that every hook ran exactly once.
//!
//! # Interleaving
//!
//! A ratio of two benchmarks measured one after the other on a shared 2-core machine (other
//! builds running, clock changes) can be off by more than the 1 % it is meant to resolve. So
//! every criterion sample of a group runs *all* the variants of the group, alternating chunks
//! of about 100 µs of each (the variant that goes first rotates), and times each variant's
//! chunks separately. Criterion is given the time of the variant the benchmark is named after,
//! so `new/estimates.json` holds the usual statistics; the times of all the variants in every
//! sample go to `<group>/paired.json`, from which `scripts/bench` takes the median of the
//! per-sample ratios: both variants were measured in the same windows, so load that comes and
//! goes cancels out. A benchmark therefore takes about (number of variants) x its measurement
//! time.
//!
//! # Async
//!
//! The `async_*` groups (feature `async`) drive diesel-async on one `current_thread` tokio
//! runtime: every chunk of every variant runs as one task (spawned on a `LocalSet`, timed
//! inside it), so `defer!` finds its transaction by task id, as in a service. The hand-written
//! side of `async_hooks_*` is a `Vec<Box<dyn FnOnce() + Send>>` filled inside the same plain
//! diesel-async transaction and run after `transaction(..).await` returns.
//! `SyncConnectionWrapper` runs each statement with `spawn_blocking` on the runtime's blocking
//! threads; `async_pg_*` run when `DTS_PG_URL` is set, like `pg_*`.
//!
//! Run with `scripts/bench` (prints the table of ratios) or
//! `cargo bench --features sqlite,postgres,async --bench overhead -- [criterion args]`.

use std::cell::{Cell, RefCell};
use std::env;
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::result::Error;
use diesel::sql_types::Integer;
use diesel_transaction_signals::signals::POST_COMMIT;
use diesel_transaction_signals::{defer, SignalConnection};

diesel::table! {
    bench_rows (id) {
        id -> Integer,
        v -> Integer,
    }
}

/// Runs the operation `n` times and returns the time those runs took (set-up excluded).
type Op = Box<dyn FnMut(u64) -> Duration>;

/// About how long one chunk of one variant runs before the next variant's turn.
const CHUNK_TARGET: Duration = Duration::from_micros(100);

/// Hook counts per transaction for the `hooks_*` groups.
const HOOK_COUNTS: [u64; 5] = [0, 1, 10, 100, 10_000];

// ---------------------------------------------------------------------------------------------
// Harness

/// An [`Op`] running `body` on `conn`, with a counter (1, 2, ...) for values to insert.
fn timed<C: 'static>(mut conn: C, mut body: impl FnMut(&mut C, i32) + 'static) -> Op {
    let mut counter: i32 = 0;
    Box::new(move |n| {
        let start = Instant::now();
        for _ in 0..n {
            counter = counter.wrapping_add(1);
            body(&mut conn, counter);
        }
        start.elapsed()
    })
}

/// A `plain` and a `wrapper` variant running the same body (instantiated for each type).
macro_rules! plain_vs_wrapper {
    ($plain:expr, $wrapper:expr, |$conn:ident, $i:ident| $body:expr) => {
        vec![
            (
                "plain",
                timed($plain, |$conn, $i| {
                    black_box($body);
                }),
            ),
            (
                "wrapper",
                timed($wrapper, |$conn, $i| {
                    black_box($body);
                }),
            ),
        ]
    };
}

/// One interleaved sample: the variant criterion was measuring, and every variant's total.
struct Sample {
    bench: usize,
    iters: u64,
    nanos: Vec<u128>,
}

/// Registers one criterion benchmark per variant; each of them runs all the variants
/// interleaved (see the module docs) and reports its own time. Writes `paired.json`.
fn compare(c: &mut Criterion, group: &str, variants: Vec<(&'static str, Op)>) {
    compare_with(c, group, variants, Vec::new());
}

/// [`compare`], with `references` interleaved too (their times are in `paired.json`) but not
/// benchmarked on their own.
fn compare_with(
    c: &mut Criterion,
    group: &str,
    variants: Vec<(&'static str, Op)>,
    references: Vec<(&'static str, Op)>,
) {
    let benched = variants.len();
    let all = variants.into_iter().chain(references);
    let (names, ops): (Vec<&'static str>, Vec<Op>) = all.unzip();
    let ops = RefCell::new(ops);
    let chunk: Cell<Option<u64>> = Cell::new(None);
    let samples: RefCell<Vec<Sample>> = RefCell::new(Vec::new());
    let mut g = c.benchmark_group(group);
    for (bench, name) in names.iter().enumerate().take(benched) {
        g.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                let mut ops = ops.borrow_mut();
                let k = match chunk.get() {
                    Some(k) => k,
                    None => {
                        let k = calibrate(&mut ops);
                        chunk.set(Some(k));
                        k
                    }
                };
                let totals = interleave(&mut ops, iters, k);
                if iters >= k {
                    samples.borrow_mut().push(Sample {
                        bench,
                        iters,
                        nanos: totals.iter().map(Duration::as_nanos).collect(),
                    });
                }
                totals[bench]
            })
        });
    }
    g.finish();
    let samples = samples.into_inner();
    // `--profile-time` runs the routine without measuring: keep the last real results.
    let profiling = env::args().any(|a| a.starts_with("--profile-time"));
    if !samples.is_empty() && !profiling {
        write_paired(group, &names, chunk.get().unwrap_or(1), &samples);
    }
}

/// Chunk length (iterations) so that one chunk of the slowest variant lasts ~`CHUNK_TARGET`.
fn calibrate(ops: &mut [Op]) -> u64 {
    let mut slowest = Duration::ZERO;
    for op in ops.iter_mut() {
        op(4); // warm the caches and prepared statements
        let probe = 8;
        slowest = slowest.max(op(probe) / probe as u32);
    }
    let per_op = slowest.as_nanos().max(1);
    (CHUNK_TARGET.as_nanos() / per_op).clamp(1, 4096) as u64
}

/// Runs `iters` iterations of every op, alternating chunks of `chunk`; returns each op's total.
fn interleave(ops: &mut [Op], iters: u64, chunk: u64) -> Vec<Duration> {
    let mut totals = vec![Duration::ZERO; ops.len()];
    let mut done = 0;
    let mut round = 0;
    while done < iters {
        let n = chunk.min(iters - done);
        for j in 0..ops.len() {
            let v = (j + round) % ops.len();
            totals[v] += ops[v](n);
        }
        done += n;
        round += 1;
    }
    totals
}

/// Where criterion writes (same rules as criterion, with the target dir found from the exe).
fn criterion_home() -> PathBuf {
    if let Some(home) = env::var_os("CRITERION_HOME") {
        return home.into();
    }
    if let Some(target) = env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    if let Ok(exe) = env::current_exe() {
        // target/release/deps/overhead-<hash>: the target dir is the one with CACHEDIR.TAG.
        if let Some(dir) = exe.ancestors().find(|d| d.join("CACHEDIR.TAG").is_file()) {
            return dir.join("criterion");
        }
    }
    PathBuf::from("target/criterion")
}

fn write_paired(group: &str, names: &[&str], chunk: u64, samples: &[Sample]) {
    let mut json = String::new();
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    let _ = write!(
        json,
        "{{\"group\":\"{group}\",\"variants\":[{}],\"chunk\":{chunk},\"samples\":[",
        quoted.join(",")
    );
    for (i, s) in samples.iter().enumerate() {
        let nanos: Vec<String> = s.nanos.iter().map(u128::to_string).collect();
        let _ = write!(
            json,
            "{}{{\"bench\":\"{}\",\"iters\":{},\"nanos\":[{}]}}",
            if i == 0 { "" } else { "," },
            names[s.bench],
            s.iters,
            nanos.join(",")
        );
    }
    json.push_str("]}\n");
    let dir = criterion_home().join(group);
    let written =
        std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(dir.join("paired.json"), json));
    if let Err(e) = written {
        eprintln!(
            "overhead: could not write {}/paired.json: {e}",
            dir.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Connections

fn sqlite_plain() -> SqliteConnection {
    let mut conn = SqliteConnection::establish(":memory:").expect("SQLite in memory");
    conn.batch_execute("CREATE TABLE bench_rows (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)")
        .expect("schema");
    conn
}

fn sqlite_wrapped() -> SignalConnection<SqliteConnection> {
    SignalConnection::new(sqlite_plain())
}

fn pg_plain(url: &str) -> PgConnection {
    let mut conn = PgConnection::establish(url)
        .unwrap_or_else(|e| panic!("DTS_PG_URL={url}: cannot connect: {e}"));
    conn.batch_execute(
        "CREATE TEMPORARY TABLE bench_rows (id SERIAL PRIMARY KEY, v INTEGER NOT NULL)",
    )
    .expect("schema");
    conn
}

fn pg_wrapped(url: &str) -> SignalConnection<PgConnection> {
    SignalConnection::new(pg_plain(url))
}

// ---------------------------------------------------------------------------------------------
// Queries and transactions

/// `SELECT 1` and a prepared single-row insert.
macro_rules! query_groups {
    ($c:expr, $prefix:literal, $plain:expr, $wrapper:expr) => {
        compare(
            $c,
            concat!($prefix, "_query_select1"),
            plain_vs_wrapper!($plain, $wrapper, |conn, _i| {
                diesel::select(diesel::dsl::sql::<Integer>("1"))
                    .get_result::<i32>(conn)
                    .unwrap()
            }),
        );
        compare(
            $c,
            concat!($prefix, "_query_insert"),
            plain_vs_wrapper!($plain, $wrapper, |conn, i| {
                diesel::insert_into(bench_rows::table)
                    .values(bench_rows::v.eq(i))
                    .execute(conn)
                    .unwrap()
            }),
        );
    };
}

/// Empty and one-insert transactions, at depth 1 and in one savepoint.
macro_rules! transaction_groups {
    ($c:expr, $prefix:literal, $plain:expr, $wrapper:expr) => {
        compare(
            $c,
            concat!($prefix, "_tx_empty"),
            plain_vs_wrapper!($plain, $wrapper, |conn, _i| {
                conn.transaction(|_| QueryResult::Ok(())).unwrap()
            }),
        );
        compare(
            $c,
            concat!($prefix, "_tx_empty_savepoint"),
            plain_vs_wrapper!($plain, $wrapper, |conn, _i| {
                conn.transaction(|conn| conn.transaction(|_| QueryResult::Ok(())))
                    .unwrap()
            }),
        );
        compare(
            $c,
            concat!($prefix, "_tx_insert"),
            plain_vs_wrapper!($plain, $wrapper, |conn, i| {
                conn.transaction(|conn| {
                    diesel::insert_into(bench_rows::table)
                        .values(bench_rows::v.eq(i))
                        .execute(conn)
                })
                .unwrap()
            }),
        );
        compare(
            $c,
            concat!($prefix, "_tx_insert_savepoint"),
            plain_vs_wrapper!($plain, $wrapper, |conn, i| {
                conn.transaction(|conn| {
                    conn.transaction(|conn| {
                        diesel::insert_into(bench_rows::table)
                            .values(bench_rows::v.eq(i))
                            .execute(conn)
                    })
                })
                .unwrap()
            }),
        );
    };
}

fn sqlite_benches(c: &mut Criterion) {
    query_groups!(c, "sqlite", sqlite_plain(), sqlite_wrapped());
    transaction_groups!(c, "sqlite", sqlite_plain(), sqlite_wrapped());
}

fn pg_benches(c: &mut Criterion, url: &str) {
    query_groups!(c, "pg", pg_plain(url), pg_wrapped(url));
    transaction_groups!(c, "pg", pg_plain(url), pg_wrapped(url));
}

// ---------------------------------------------------------------------------------------------
// Hooks

thread_local! {
    /// (hooks run, sum of their payloads) on this thread.
    static RAN: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// What every hook does: record that it ran, with its payload.
#[inline]
fn record(payload: u64) {
    RAN.with(|r| {
        let (count, sum) = r.get();
        r.set((count + 1, sum.wrapping_add(payload)));
    });
}

/// Wraps `op` (each run registering `hooks` hooks with payloads `0..hooks`) with a check, after
/// the timed part, that each hook ran once.
fn checked(mut op: Op, hooks: u64) -> Op {
    let sum_per_run = hooks * hooks.saturating_sub(1) / 2;
    Box::new(move |n| {
        let (count0, sum0) = RAN.with(Cell::get);
        let elapsed = op(n);
        let (count1, sum1) = RAN.with(Cell::get);
        assert_eq!(count1 - count0, n * hooks, "every hook runs once");
        assert_eq!(sum1.wrapping_sub(sum0), n.wrapping_mul(sum_per_run));
        elapsed
    })
}

/// The hand-written alternative a user would write without the wrapper.
type Pending = Vec<Box<dyn FnOnce()>>;

/// The hand-written commit hooks: a `Vec` filled in the transaction, run after it committed.
fn vec_commit(hooks: u64) -> Op {
    let op = timed(sqlite_plain(), move |conn, _| {
        let mut pending: Pending = Vec::new();
        conn.transaction(|_| {
            for k in 0..hooks {
                pending.push(Box::new(move || record(k)));
            }
            QueryResult::Ok(())
        })
        .unwrap();
        for hook in pending {
            hook();
        }
    });
    checked(op, hooks)
}

fn wrapper_on_commit(hooks: u64) -> Op {
    let op = timed(sqlite_wrapped(), move |conn, _| {
        conn.transaction(|conn| {
            for k in 0..hooks {
                conn.on_commit(move || record(k));
            }
            QueryResult::Ok(())
        })
        .unwrap();
    });
    checked(op, hooks)
}

fn wrapper_defer(hooks: u64) -> Op {
    let op = timed(sqlite_wrapped(), move |conn, _| {
        conn.transaction(|_| {
            for k in 0..hooks {
                defer!(record(k));
            }
            QueryResult::Ok(())
        })
        .unwrap();
    });
    checked(op, hooks)
}

/// The hand-written rollback hooks: run when `transaction` returned `Err`.
fn vec_rollback(hooks: u64) -> Op {
    let op = timed(sqlite_plain(), move |conn, _| {
        let mut pending: Pending = Vec::new();
        let result = conn.transaction(|_| {
            for k in 0..hooks {
                pending.push(Box::new(move || record(k)));
            }
            Err::<(), _>(Error::RollbackTransaction)
        });
        if result.is_err() {
            for hook in pending {
                hook();
            }
        }
    });
    checked(op, hooks)
}

fn wrapper_on_rollback(hooks: u64) -> Op {
    let op = timed(sqlite_wrapped(), move |conn, _| {
        let result = conn.transaction(|conn| {
            for k in 0..hooks {
                conn.on_rollback(move || record(k));
            }
            Err::<(), _>(Error::RollbackTransaction)
        });
        assert!(result.is_err());
    });
    checked(op, hooks)
}

/// `hooks_{kind}_{N}`: `vec` and `wrapper` benchmarked, and for N > 0 the same two with no
/// hook (`vec_0`, `wrapper_0`) interleaved as references, so that the per-hook cost
/// `(t(N) - t(0)) / N` of each side is taken within each sample.
fn hook_benches(c: &mut Criterion) {
    type Make = fn(u64) -> Op;
    let kinds: [(&str, Make, Make); 3] = [
        ("commit", vec_commit, wrapper_on_commit),
        ("defer", vec_commit, wrapper_defer),
        ("rollback", vec_rollback, wrapper_on_rollback),
    ];
    for hooks in HOOK_COUNTS {
        for (kind, vec, wrapper) in kinds {
            let references = if hooks == 0 {
                Vec::new()
            } else {
                vec![("vec_0", vec(0)), ("wrapper_0", wrapper(0))]
            };
            compare_with(
                c,
                &format!("hooks_{kind}_{hooks}"),
                vec![("vec", vec(hooks)), ("wrapper", wrapper(hooks))],
                references,
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Signals

fn signal_benches(c: &mut Criterion) {
    static RECEIVED: AtomicU64 = AtomicU64::new(0);
    let empty = |conn: &mut SignalConnection<SqliteConnection>| {
        conn.transaction(|_| QueryResult::Ok(())).unwrap();
    };
    let plain = timed(sqlite_plain(), |conn, _| {
        conn.transaction(|_| QueryResult::Ok(())).unwrap();
    });
    let no_receiver = timed(sqlite_wrapped(), move |conn, _| empty(conn));
    let mut conn = sqlite_wrapped();
    let one_receiver: Op = Box::new(move |n| {
        // Connected for this chunk only: the other variants run with no receiver.
        let guard = POST_COMMIT.connect_guard(|event| {
            black_box(event.duration());
            RECEIVED.fetch_add(1, Ordering::Relaxed);
        });
        let before = RECEIVED.load(Ordering::Relaxed);
        let start = Instant::now();
        for _ in 0..n {
            empty(&mut conn);
        }
        let elapsed = start.elapsed();
        drop(guard);
        assert_eq!(RECEIVED.load(Ordering::Relaxed) - before, n);
        elapsed
    });
    compare(
        c,
        "signals_post_commit",
        vec![
            ("plain", plain),
            ("no_receiver", no_receiver),
            ("one_receiver", one_receiver),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Async (feature `async`): diesel-async vs `AsyncSignalConnection`

#[cfg(feature = "async")]
mod async_groups {
    //! The same comparisons for diesel-async: `plain` is diesel-async's connection
    //! (`SyncConnectionWrapper<SqliteConnection>`, `AsyncPgConnection`), `wrapper` is
    //! `AsyncSignalConnection` of it. One `current_thread` runtime (`RT`) runs every variant:
    //! each chunk is a task on it (see [`timed_async`]); SQLite's statements run on its
    //! blocking threads (`spawn_blocking`), PostgreSQL's connection task on its thread.

    use std::hint::black_box;
    use std::sync::LazyLock;
    use std::time::Instant;

    use criterion::Criterion;
    use diesel::result::{Error, QueryResult};
    use diesel::sql_types::Integer;
    use diesel::sqlite::SqliteConnection;
    use diesel::{Connection, ExpressionMethods};
    use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
    use diesel_transaction_signals::{defer, AsyncSignalConnection};
    use tokio::runtime::Runtime;
    use tokio::task::LocalSet;

    use super::{bench_rows, checked, compare, compare_with, record, Op};

    type Sqlite = SyncConnectionWrapper<SqliteConnection>;

    /// Hook counts per transaction for the `async_hooks_*` groups.
    const HOOK_COUNTS: [u64; 2] = [100, 10_000];

    /// The runtime every async variant runs on.
    static RT: LazyLock<Runtime> = LazyLock::new(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    });

    /// [`timed`](super::timed) for an async body. The chunk of `n` runs as one tokio task (as a
    /// service's request would: `defer!` then finds its transaction by task id), spawned on a
    /// `LocalSet` driven by `RT.block_on`, and is timed inside the task: spawning and entering
    /// the runtime are not counted. The connection and body move into the task and back.
    fn timed_async<C, B>(conn: C, body: B) -> Op
    where
        C: 'static,
        B: AsyncFnMut(&mut C, i32) + 'static,
    {
        let mut state = Some((conn, body, 0_i32));
        Box::new(move |n| {
            let (mut conn, mut body, mut counter) = state.take().expect("not reentered");
            let local = LocalSet::new();
            let (elapsed, back) = local.block_on(&RT, async move {
                tokio::task::spawn_local(async move {
                    let start = Instant::now();
                    for _ in 0..n {
                        counter = counter.wrapping_add(1);
                        body(&mut conn, counter).await;
                    }
                    (start.elapsed(), (conn, body, counter))
                })
                .await
                .expect("the chunk's task")
            });
            state = Some(back);
            elapsed
        })
    }

    /// A `plain` and a `wrapper` variant running the same async body.
    macro_rules! plain_vs_wrapper_async {
        ($plain:expr, $wrapper:expr, |$conn:ident, $i:ident| $body:expr) => {
            vec![
                (
                    "plain",
                    timed_async($plain, async |$conn, $i| {
                        black_box($body);
                    }),
                ),
                (
                    "wrapper",
                    timed_async($wrapper, async |$conn, $i| {
                        black_box($body);
                    }),
                ),
            ]
        };
    }

    // -----------------------------------------------------------------------------------------
    // Connections

    fn sqlite_plain() -> Sqlite {
        // Made inside the runtime, so `spawn_blocking` uses its blocking pool.
        let _rt = RT.enter();
        let conn = SqliteConnection::establish(":memory:").expect("SQLite in memory");
        let mut conn = Sqlite::new(conn);
        RT.block_on(
            conn.batch_execute(
                "CREATE TABLE bench_rows (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)",
            ),
        )
        .expect("schema");
        conn
    }

    fn sqlite_wrapped() -> AsyncSignalConnection<Sqlite> {
        AsyncSignalConnection::new(sqlite_plain())
    }

    fn pg_plain(url: &str) -> AsyncPgConnection {
        RT.block_on(async {
            let mut conn = AsyncPgConnection::establish(url)
                .await
                .unwrap_or_else(|e| panic!("DTS_PG_URL={url}: cannot connect: {e}"));
            conn.batch_execute(
                "CREATE TEMPORARY TABLE bench_rows (id SERIAL PRIMARY KEY, v INTEGER NOT NULL)",
            )
            .await
            .expect("schema");
            conn
        })
    }

    fn pg_wrapped(url: &str) -> AsyncSignalConnection<AsyncPgConnection> {
        AsyncSignalConnection::new(pg_plain(url))
    }

    // -----------------------------------------------------------------------------------------
    // Queries and transactions

    /// `SELECT 1`, a prepared single-row insert, an empty transaction and a transaction with
    /// one insert.
    macro_rules! async_groups {
        ($c:expr, $prefix:literal, $plain:expr, $wrapper:expr) => {
            compare(
                $c,
                concat!($prefix, "_query_select1"),
                plain_vs_wrapper_async!($plain, $wrapper, |conn, _i| {
                    diesel::select(diesel::dsl::sql::<Integer>("1"))
                        .get_result::<i32>(conn)
                        .await
                        .unwrap()
                }),
            );
            compare(
                $c,
                concat!($prefix, "_query_insert"),
                plain_vs_wrapper_async!($plain, $wrapper, |conn, i| {
                    diesel::insert_into(bench_rows::table)
                        .values(bench_rows::v.eq(i))
                        .execute(conn)
                        .await
                        .unwrap()
                }),
            );
            compare(
                $c,
                concat!($prefix, "_tx_empty"),
                plain_vs_wrapper_async!($plain, $wrapper, |conn, _i| {
                    conn.transaction(async |_| QueryResult::Ok(()))
                        .await
                        .unwrap()
                }),
            );
            compare(
                $c,
                concat!($prefix, "_tx_insert"),
                plain_vs_wrapper_async!($plain, $wrapper, |conn, i| {
                    conn.transaction(async |conn| {
                        diesel::insert_into(bench_rows::table)
                            .values(bench_rows::v.eq(i))
                            .execute(conn)
                            .await
                    })
                    .await
                    .unwrap()
                }),
            );
        };
    }

    pub(super) fn sqlite_benches(c: &mut Criterion) {
        async_groups!(c, "async_sqlite", sqlite_plain(), sqlite_wrapped());
    }

    pub(super) fn pg_benches(c: &mut Criterion, url: &str) {
        async_groups!(c, "async_pg", pg_plain(url), pg_wrapped(url));
    }

    // -----------------------------------------------------------------------------------------
    // Hooks

    /// The hand-written alternative: boxed closures that may cross threads, as a task's must.
    type Pending = Vec<Box<dyn FnOnce() + Send>>;

    /// The hand-written commit hooks: a `Vec` filled in the transaction, run after it committed.
    fn vec_commit(hooks: u64) -> Op {
        let op = timed_async(sqlite_plain(), async move |conn, _| {
            let mut pending: Pending = Vec::new();
            conn.transaction(async |_| {
                for k in 0..hooks {
                    pending.push(Box::new(move || record(k)));
                }
                QueryResult::Ok(())
            })
            .await
            .unwrap();
            for hook in pending {
                hook();
            }
        });
        checked(op, hooks)
    }

    fn wrapper_on_commit(hooks: u64) -> Op {
        let op = timed_async(sqlite_wrapped(), async move |conn, _| {
            conn.transaction(async |conn| {
                for k in 0..hooks {
                    conn.on_commit(move || record(k));
                }
                QueryResult::Ok(())
            })
            .await
            .unwrap();
        });
        checked(op, hooks)
    }

    fn wrapper_defer(hooks: u64) -> Op {
        let op = timed_async(sqlite_wrapped(), async move |conn, _| {
            conn.transaction(async |_| {
                for k in 0..hooks {
                    defer!(record(k));
                }
                QueryResult::Ok(())
            })
            .await
            .unwrap();
        });
        checked(op, hooks)
    }

    /// The hand-written rollback hooks: run when `transaction` returned `Err`.
    fn vec_rollback(hooks: u64) -> Op {
        let op = timed_async(sqlite_plain(), async move |conn, _| {
            let mut pending: Pending = Vec::new();
            let result = conn
                .transaction(async |_| {
                    for k in 0..hooks {
                        pending.push(Box::new(move || record(k)));
                    }
                    Err::<(), _>(Error::RollbackTransaction)
                })
                .await;
            if result.is_err() {
                for hook in pending {
                    hook();
                }
            }
        });
        checked(op, hooks)
    }

    fn wrapper_on_rollback(hooks: u64) -> Op {
        let op = timed_async(sqlite_wrapped(), async move |conn, _| {
            let result = conn
                .transaction(async |conn| {
                    for k in 0..hooks {
                        conn.on_rollback(move || record(k));
                    }
                    Err::<(), _>(Error::RollbackTransaction)
                })
                .await;
            assert!(result.is_err());
        });
        checked(op, hooks)
    }

    /// `async_hooks_{kind}_{N}`: as `hooks_{kind}_{N}`, on diesel-async's SQLite connection.
    pub(super) fn hook_benches(c: &mut Criterion) {
        type Make = fn(u64) -> Op;
        let kinds: [(&str, Make, Make); 3] = [
            ("commit", vec_commit, wrapper_on_commit),
            ("defer", vec_commit, wrapper_defer),
            ("rollback", vec_rollback, wrapper_on_rollback),
        ];
        for hooks in HOOK_COUNTS {
            for (kind, vec, wrapper) in kinds {
                compare_with(
                    c,
                    &format!("async_hooks_{kind}_{hooks}"),
                    vec![("vec", vec(hooks)), ("wrapper", wrapper(hooks))],
                    vec![("vec_0", vec(0)), ("wrapper_0", wrapper(0))],
                );
            }
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
        .nresamples(10_000)
        .without_plots()
        .configure_from_args();
    sqlite_benches(&mut c);
    match env::var("DTS_PG_URL") {
        Ok(url) if !url.is_empty() => pg_benches(&mut c, &url),
        _ => println!(
            "overhead: DTS_PG_URL is not set: skipping the PostgreSQL groups (pg_*). \
             Set it to a database URL (e.g. postgres://postgres@127.0.0.1:5432/postgres) to run them."
        ),
    }
    hook_benches(&mut c);
    signal_benches(&mut c);
    #[cfg(feature = "async")]
    {
        async_groups::sqlite_benches(&mut c);
        match env::var("DTS_PG_URL") {
            Ok(url) if !url.is_empty() => async_groups::pg_benches(&mut c, &url),
            _ => println!(
                "overhead: DTS_PG_URL is not set: skipping the async PostgreSQL groups (async_pg_*)."
            ),
        }
        async_groups::hook_benches(&mut c);
    }
    c.final_summary();
}
