//! The outbox side of the side-by-side benchmark against graphile-worker (see
//! `scripts/outbox-bench`, which starts a throwaway PostgreSQL, runs both sides and prints the
//! table). Every measurement mirrors the graphile-worker kit in `shared/anchors/graphile-worker`
//! and prints one JSON line on stdout.
//!
//! ```text
//! cargo run --release --example outbox_bench --features outbox-listen -- SUBCOMMAND [--opt value]...
//!
//! capabilities                           the enqueue modes this build supports
//! setup    --url U                       create the outbox table (migrations), bench_users and
//!                                        bench_plain (dts_outbox's columns and indexes, no trigger)
//! enqueue  --url U --mode M [--count 20000] [--batch 1000]
//!          M = autocommit        one conn.defer_durable outside a transaction (one statement)
//!              usertx1           BEGIN, insert a bench_users row, conn.defer_durable, COMMIT
//!              usertx1-macro     the same with defer_durable! (written just before COMMIT)
//!              batch             --batch jobs per transaction, --batch defer_durable! calls
//!                                (one multi-row INSERT before COMMIT)
//!              batch-conn        --batch conn.defer_durable calls per transaction (one
//!                                statement each: the id is returned at each call)
//!              batch-all         --batch jobs per transaction, written with one enqueue_all
//!              tx1               BEGIN, conn.defer_durable, COMMIT (no user row)
//!              M-listened        mode M while a relay listens: a connection of this process
//!                                runs LISTEN dts_outbox and is registered in
//!                                dts_outbox_listeners (the NOTIFY trigger enabled), so every
//!                                enqueuing COMMIT sends the NOTIFY (without one registered,
//!                                the trigger is disabled and none is sent)
//!            the physical limit, plain Diesel (a PgConnection, no wrapper, no outbox): a row
//!            of dts_outbox's shape into bench_plain, the same statements otherwise:
//!              plain-autocommit  one INSERT outside a transaction
//!              plain-usertx1     BEGIN, insert a bench_users row, insert a bench_plain row, COMMIT
//!              plain-batch       BEGIN, one INSERT of --batch rows, COMMIT
//!              plain-notify-autocommit, plain-notify-usertx1
//!                                the same into bench_plain_notify, which has a trigger that
//!                                always sends dts_outbox's NOTIFY (the limit with the
//!                                cross-process wake-up: compare with M-listened)
//! compare  --url U --modes M1,M2,... [--count 20000] [--block 500] [--batch 1000]
//!          the enqueue modes interleaved in one process, --block jobs of each in turn (the
//!          order rotating), one line per mode: compares modes on a busy machine. With a
//!          M-listened or plain-notify- mode, a connection LISTENs throughout (registered only
//!          during M-listened blocks) and after each block counts the block's notifications
//!          (up to a NOTIFY on a sentinel channel sent after it): none for the other modes, or
//!          the run fails. With the server on this machine, each line also has the CPU time
//!          per job of this thread, of the server process it wrote through and of the
//!          listener's (`cpu_us_per_job`, from /proc/.../schedstat around the timed blocks):
//!          steadier than jobs/s on a busy machine
//! drain    --url U [--procs 1] [--count 20000] [--concurrency 2] [--batch-size 500]
//!          queue COUNT no-op jobs, then time PROCS `worker --once` processes draining them;
//!          `worker --once` on an empty queue is timed 3x first and its median subtracted
//! worker   --url U --once [--concurrency 2] [--batch-size 500] [--name N]
//!          a relay process; exits once no job is left that it could claim or has claimed
//! latency  --url U [--rate 200] [--secs 10] [--concurrency 1] [--batch-size 100]
//!          open-loop producer (this process, timer pacing, one conn.defer_durable outside a
//!          transaction per job, as the kit's one autocommit add_job), relay in a child process
//!          woken by LISTEN/NOTIFY; commit acknowledged -> handler start
//! ```
//!
//! Times compared across processes are read from `SystemTime` (CLOCK_REALTIME, one clock for
//! every process of the machine); `Instant` is opaque and per process.

#[cfg(feature = "outbox-listen")]
mod bench {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc, Mutex};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use diesel::connection::SimpleConnection;
    use diesel::prelude::*;
    use diesel::r2d2::{ConnectionManager, Pool};
    use diesel_migrations::MigrationHarness;
    use diesel_transaction_signals::outbox::{self, Job, Relay};
    use diesel_transaction_signals::{defer_durable, SignalConnection};
    use serde_json::{json, Value};

    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Res<T> = Result<T, Error>;
    type Conn = SignalConnection<PgConnection>;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Payload {
        id: i64,
    }

    struct Args {
        cmd: String,
        opts: HashMap<String, String>,
    }

    impl Args {
        fn parse() -> Res<Self> {
            let mut it = std::env::args().skip(1);
            let cmd = it
                .next()
                .ok_or("usage: outbox_bench SUBCOMMAND [--opt value]...")?;
            let mut opts = HashMap::new();
            let rest: Vec<String> = it.collect();
            let mut i = 0;
            while i < rest.len() {
                let k = rest[i]
                    .strip_prefix("--")
                    .ok_or_else(|| format!("unexpected argument {:?}", rest[i]))?
                    .to_owned();
                if k == "once" {
                    opts.insert(k, "1".into());
                    i += 1;
                    continue;
                }
                let v = rest
                    .get(i + 1)
                    .ok_or_else(|| format!("--{k} needs a value"))?;
                opts.insert(k, v.clone());
                i += 2;
            }
            Ok(Args { cmd, opts })
        }

        fn url(&self) -> Res<String> {
            self.opts
                .get("url")
                .cloned()
                .or_else(|| std::env::var("DATABASE_URL").ok())
                .ok_or_else(|| "--url (or DATABASE_URL) is needed".into())
        }

        fn str(&self, k: &str, default: &str) -> String {
            self.opts.get(k).cloned().unwrap_or_else(|| default.into())
        }

        fn num(&self, k: &str, default: u64) -> Res<u64> {
            match self.opts.get(k) {
                None => Ok(default),
                Some(v) => v.parse().map_err(|e| format!("--{k} {v}: {e}").into()),
            }
        }
    }

    /// Nanoseconds since the Unix epoch (CLOCK_REALTIME: comparable across processes).
    fn now_ns() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }

    fn round(v: f64, places: i32) -> f64 {
        let f = 10f64.powi(places);
        (v * f).round() / f
    }

    fn loadavg1() -> f64 {
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(-1.0)
    }

    /// CPU accounting as the kit's `bench/cpu.js`: machine busy jiffies, and jiffies of the
    /// `postgres` processes and of ours (utime + stime + reaped children).
    #[derive(Clone, Copy)]
    struct CpuSnap {
        total: u64,
        busy: u64,
        pg: u64,
        ours: u64,
    }

    fn cpu_snap() -> CpuSnap {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let c: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let total: u64 = c.iter().sum();
        let idle = c.get(3).copied().unwrap_or(0) + c.get(4).copied().unwrap_or(0);
        let (mut pg, mut ours) = (0, 0);
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let name = e.file_name();
                let Some(name) = name.to_str() else { continue };
                if !name.bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                let Ok(s) = std::fs::read_to_string(format!("/proc/{name}/stat")) else {
                    continue;
                };
                let (Some(a), Some(b)) = (s.find('('), s.rfind(')')) else {
                    continue;
                };
                let comm = &s[a + 1..b];
                let f: Vec<&str> = s[b + 2..].split(' ').collect();
                let j: u64 = (11..15)
                    .filter_map(|i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
                    .sum();
                if comm == "postgres" {
                    pg += j;
                } else if comm.starts_with("outbox_bench") {
                    ours += j;
                }
            }
        }
        CpuSnap {
            total,
            busy: total - idle,
            pg,
            ours,
        }
    }

    fn cpu_diff(a: CpuSnap, b: CpuSnap) -> Value {
        let t = (b.total - a.total).max(1) as f64;
        let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let pct = |x: u64| (100.0 * x as f64 / t * ncpu).round() as i64;
        // saturating: a process that exits between the snapshots takes its jiffies with it
        json!({
            "machine_busy_pct_of_1core": pct(b.busy.saturating_sub(a.busy)),
            "postgres_pct_of_1core": pct(b.pg.saturating_sub(a.pg)),
            "ours_pct_of_1core": pct(b.ours.saturating_sub(a.ours)),
        })
    }

    fn merge(mut a: Value, b: Value) -> Value {
        if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
            a.extend(b);
        }
        a
    }

    fn connect(url: &str) -> Res<Conn> {
        Ok(Conn::establish(url)?)
    }

    /// The user table of the `usertx1` modes (the same DDL as the kit's
    /// `bench/enqueue_usertx.js`), and `bench_plain`: `dts_outbox`'s columns, defaults and
    /// indexes (after all its migrations) without its NOTIFY trigger, for the plain-Diesel
    /// limit; `bench_plain_notify`: the same with a trigger that always notifies.
    const BENCH_TABLES: &str = "
        CREATE TABLE IF NOT EXISTS bench_users (id BIGSERIAL PRIMARY KEY, email TEXT NOT NULL,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now());
        CREATE TABLE IF NOT EXISTS bench_plain (
            id BIGSERIAL PRIMARY KEY,
            queue TEXT NOT NULL,
            payload TEXT NOT NULL,
            idempotency_key TEXT,
            state SMALLINT NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL DEFAULT 10,
            run_at BIGINT NOT NULL DEFAULT (date_part('epoch', clock_timestamp()) * 1000)::BIGINT,
            locked_until BIGINT,
            locked_by TEXT,
            last_error TEXT,
            created_at BIGINT NOT NULL DEFAULT (date_part('epoch', clock_timestamp()) * 1000)::BIGINT
        );
        CREATE UNIQUE INDEX IF NOT EXISTS bench_plain_idempotency
            ON bench_plain (queue, idempotency_key);
        CREATE INDEX IF NOT EXISTS bench_plain_ready ON bench_plain (run_at, id) WHERE state = 0;
        CREATE TABLE IF NOT EXISTS bench_plain_notify (LIKE bench_plain INCLUDING ALL);
        CREATE OR REPLACE FUNCTION bench_notify_always() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('dts_outbox', '');
            RETURN NULL;
        END;
        $$;
        DROP TRIGGER IF EXISTS bench_plain_notify ON bench_plain_notify;
        CREATE TRIGGER bench_plain_notify AFTER INSERT ON bench_plain_notify
            FOR EACH STATEMENT EXECUTE FUNCTION bench_notify_always();
    ";

    diesel::table! {
        bench_users (id) {
            id -> BigInt,
            email -> Text,
        }
    }

    // bench_plain_notify: bench_plain plus a trigger that always sends dts_outbox's NOTIFY (the
    // limit with the cross-process wake-up included).
    diesel::table! {
        bench_plain_notify (id) {
            id -> BigInt,
            queue -> Text,
            payload -> Text,
            idempotency_key -> Nullable<Text>,
            max_attempts -> Integer,
            run_at -> BigInt,
        }
    }

    diesel::table! {
        bench_plain (id) {
            id -> BigInt,
            queue -> Text,
            payload -> Text,
            idempotency_key -> Nullable<Text>,
            max_attempts -> Integer,
            run_at -> BigInt,
        }
    }

    fn setup(url: &str) -> Res<()> {
        let mut conn = connect(url)?;
        conn.run_pending_migrations(outbox::migrations::POSTGRES)?;
        conn.batch_execute(BENCH_TABLES)?;
        Ok(())
    }

    /// Empties the outbox and the bench tables, as the kit's `bench/reset.js` does for
    /// graphile-worker's tables.
    fn reset(url: &str) -> Res<()> {
        let mut conn = connect(url)?;
        conn.run_pending_migrations(outbox::migrations::POSTGRES)?;
        conn.batch_execute(BENCH_TABLES)?;
        conn.batch_execute(
            "TRUNCATE dts_outbox, bench_users, bench_plain, bench_plain_notify, \
             dts_outbox_listeners; SELECT dts_outbox_listeners_sync()",
        )?;
        conn.batch_execute(
            "VACUUM ANALYZE dts_outbox, bench_users, bench_plain, bench_plain_notify",
        )?;
        Ok(())
    }

    fn email(i: i64) -> String {
        format!("user{i}@example.com")
    }

    fn insert_user(
        conn: &mut impl Connection<Backend = diesel::pg::Pg>,
        i: i64,
    ) -> QueryResult<usize> {
        diesel::insert_into(bench_users::table)
            .values(bench_users::email.eq(email(i)))
            .execute(conn)
    }

    /// The row `defer_durable` writes, written by plain Diesel: the same columns and values
    /// (`run_at` is computed here instead of by the server: no delay).
    type PlainRow = (
        diesel::dsl::Eq<bench_plain::queue, &'static str>,
        diesel::dsl::Eq<bench_plain::payload, String>,
        diesel::dsl::Eq<bench_plain::idempotency_key, Option<String>>,
        diesel::dsl::Eq<bench_plain::max_attempts, i32>,
        diesel::dsl::Eq<bench_plain::run_at, i64>,
    );

    fn plain_row(i: i64) -> Res<PlainRow> {
        Ok((
            bench_plain::queue.eq("noop"),
            bench_plain::payload.eq(serde_json::to_string(&Payload { id: i })?),
            bench_plain::idempotency_key.eq(None),
            bench_plain::max_attempts.eq(10),
            bench_plain::run_at.eq((now_ns() / 1_000_000) as i64),
        ))
    }

    fn plain_count(conn: &mut PgConnection) -> QueryResult<i64> {
        bench_plain::table.count().get_result(conn)
    }

    fn plain_notify_count(conn: &mut PgConnection) -> QueryResult<i64> {
        bench_plain_notify::table.count().get_result(conn)
    }

    type PlainNotifyRow = (
        diesel::dsl::Eq<bench_plain_notify::queue, &'static str>,
        diesel::dsl::Eq<bench_plain_notify::payload, String>,
        diesel::dsl::Eq<bench_plain_notify::idempotency_key, Option<String>>,
        diesel::dsl::Eq<bench_plain_notify::max_attempts, i32>,
        diesel::dsl::Eq<bench_plain_notify::run_at, i64>,
    );

    fn plain_notify_row(i: i64) -> Res<PlainNotifyRow> {
        Ok((
            bench_plain_notify::queue.eq("noop"),
            bench_plain_notify::payload.eq(serde_json::to_string(&Payload { id: i })?),
            bench_plain_notify::idempotency_key.eq(None),
            bench_plain_notify::max_attempts.eq(10),
            bench_plain_notify::run_at.eq((now_ns() / 1_000_000) as i64),
        ))
    }

    /// A relay's pool: no `SELECT 1` on every checkout (r2d2's default `test_on_check_out`);
    /// a broken connection is still detected and replaced by the pool.
    fn relay_pool(url: &str, size: u32) -> Res<Pool<ConnectionManager<PgConnection>>> {
        Ok(Pool::builder()
            .max_size(size)
            .test_on_check_out(false)
            .build(ConnectionManager::<PgConnection>::new(url))?)
    }

    // ---- enqueue ---------------------------------------------------------------------------

    /// The connections a mode writes through: ours (the wrapper) and plain Diesel.
    struct Sides {
        ours: Conn,
        plain: PgConnection,
        /// The server processes of `ours` and `plain`, when the server runs on this machine.
        backends: Option<(i32, i32)>,
    }

    #[derive(QueryableByName)]
    struct BackendPid {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
    }

    fn backend_pid<C>(conn: &mut C) -> QueryResult<i32>
    where
        C: Connection<Backend = diesel::pg::Pg> + diesel::connection::LoadConnection,
    {
        diesel::sql_query("SELECT pg_backend_pid() AS pid")
            .get_result::<BackendPid>(conn)
            .map(|b| b.pid)
    }

    /// CPU time a process or thread has run, in ns (`/proc/.../schedstat`, user and system);
    /// `None` where there is none to read.
    fn cpu_ns(path: &str) -> Option<u64> {
        std::fs::read_to_string(path)
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// `pid`'s CPU time, if `pid` is a `postgres` process of this machine (a server elsewhere
    /// has no such process here: then nothing is measured).
    fn postgres_cpu_ns(pid: i32) -> Option<u64> {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        if comm.trim() != "postgres" {
            return None;
        }
        cpu_ns(&format!("/proc/{pid}/schedstat"))
    }

    impl Sides {
        fn open(url: &str) -> Res<Self> {
            let mut ours = connect(url)?;
            ours.batch_execute("SELECT 1")?;
            let mut plain = PgConnection::establish(url)?;
            plain.batch_execute("SELECT 1")?;
            let pids = (backend_pid(&mut ours)?, backend_pid(&mut plain)?);
            let local = postgres_cpu_ns(pids.0).is_some() && postgres_cpu_ns(pids.1).is_some();
            Ok(Sides {
                ours,
                plain,
                backends: local.then_some(pids),
            })
        }

        /// The CPU time so far of this thread, of the server process `mode` writes through,
        /// and of `listener`'s (ns); `None` unless the server runs on this machine.
        fn cpu(&self, mode: &str, listener: Option<i32>) -> Option<[u64; 3]> {
            let (ours, plain) = self.backends?;
            let server = if mode.starts_with("plain-") {
                plain
            } else {
                ours
            };
            Some([
                cpu_ns("/proc/thread-self/schedstat")?,
                postgres_cpu_ns(server)?,
                listener.and_then(postgres_cpu_ns).unwrap_or(0),
            ])
        }

        /// Runs `mode` for the jobs `from..to`: one transaction (or statement) per job, or per
        /// `batch` jobs for the batch modes.
        fn run(&mut self, mode: &str, from: i64, to: i64, batch: i64) -> Res<()> {
            let per_tx = |f: &mut dyn FnMut(i64, i64) -> Res<()>| -> Res<()> {
                let mut i = from;
                while i < to {
                    let end = (i + batch).min(to);
                    f(i, end)?;
                    i = end;
                }
                Ok(())
            };
            let conn = &mut self.ours;
            match mode {
                "autocommit" => {
                    for i in from..to {
                        conn.defer_durable("noop", &Payload { id: i })?;
                    }
                }
                "tx1" => {
                    for i in from..to {
                        conn.transaction::<_, Error, _>(|c| {
                            c.defer_durable("noop", &Payload { id: i })?;
                            Ok(())
                        })?;
                    }
                }
                "usertx1" => {
                    for i in from..to {
                        conn.transaction::<_, Error, _>(|c| {
                            insert_user(c, i)?;
                            c.defer_durable("noop", &Payload { id: i })?;
                            Ok(())
                        })?;
                    }
                }
                "usertx1-macro" => {
                    for i in from..to {
                        conn.transaction::<_, Error, _>(|c| {
                            insert_user(c, i)?;
                            defer_durable!("noop", &Payload { id: i })?;
                            Ok(())
                        })?;
                    }
                }
                "batch" => per_tx(&mut |i, end| {
                    conn.transaction::<_, Error, _>(|_| {
                        for id in i..end {
                            defer_durable!("noop", &Payload { id })?;
                        }
                        Ok(())
                    })
                })?,
                "batch-conn" => per_tx(&mut |i, end| {
                    conn.transaction::<_, Error, _>(|c| {
                        for id in i..end {
                            c.defer_durable("noop", &Payload { id })?;
                        }
                        Ok(())
                    })
                })?,
                "batch-all" => per_tx(&mut |i, end| {
                    conn.transaction::<_, Error, _>(|c| {
                        let jobs = (i..end)
                            .map(|id| outbox::DurableJob::new("noop", &Payload { id }))
                            .collect::<Result<Vec<_>, _>>()?;
                        c.enqueue_all(jobs)?;
                        Ok(())
                    })
                })?,
                "plain-autocommit" => {
                    for i in from..to {
                        diesel::insert_into(bench_plain::table)
                            .values(plain_row(i)?)
                            .execute(&mut self.plain)?;
                    }
                }
                "plain-usertx1" => {
                    for i in from..to {
                        self.plain.transaction::<_, Error, _>(|c| {
                            insert_user(c, i)?;
                            diesel::insert_into(bench_plain::table)
                                .values(plain_row(i)?)
                                .execute(c)?;
                            Ok(())
                        })?;
                    }
                }
                "plain-notify-autocommit" => {
                    for i in from..to {
                        diesel::insert_into(bench_plain_notify::table)
                            .values(plain_notify_row(i)?)
                            .execute(&mut self.plain)?;
                    }
                }
                "plain-notify-usertx1" => {
                    for i in from..to {
                        self.plain.transaction::<_, Error, _>(|c| {
                            insert_user(c, i)?;
                            diesel::insert_into(bench_plain_notify::table)
                                .values(plain_notify_row(i)?)
                                .execute(c)?;
                            Ok(())
                        })?;
                    }
                }
                "plain-batch" => {
                    let plain = &mut self.plain;
                    per_tx(&mut |i, end| {
                        plain.transaction::<_, Error, _>(|c| {
                            let rows = (i..end).map(plain_row).collect::<Res<Vec<_>>>()?;
                            diesel::insert_into(bench_plain::table)
                                .values(rows)
                                .execute(c)?;
                            Ok(())
                        })
                    })?
                }
                other => return Err(format!("unknown --mode {other}").into()),
            }
            Ok(())
        }
    }

    /// Whether every COMMIT of `mode` sends `NOTIFY dts_outbox`.
    fn notifies(mode: &str) -> bool {
        mode.ends_with("-listened") || mode.starts_with("plain-notify-")
    }

    /// What `mode` runs: `M-listened` runs `M` (while a listener is registered).
    fn base(mode: &str) -> &str {
        mode.strip_suffix("-listened").unwrap_or(mode)
    }

    /// A connection that LISTENs on `dts_outbox` (and on a sentinel channel), registered in
    /// `dts_outbox_listeners` as a relay's listener is, during the `-listened` blocks only.
    struct Listener {
        conn: PgConnection,
        pid: i32,
    }

    impl Listener {
        fn open(url: &str) -> Res<Self> {
            let mut conn = PgConnection::establish(url)?;
            conn.batch_execute("LISTEN dts_outbox; LISTEN bench_sentinel")?;
            let pid = backend_pid(&mut conn)?;
            Ok(Listener { conn, pid })
        }

        /// Registers as a relay's `listen()` connection does (src/outbox/listen.rs): the
        /// outbox's NOTIFY trigger is enabled from then on.
        fn register(&mut self) -> Res<()> {
            self.conn
                .batch_execute("SELECT dts_outbox_listener_register('outbox_bench')")?;
            Ok(())
        }

        /// The trigger is disabled again (no other listener is registered).
        fn unregister(&mut self) -> Res<()> {
            self.conn
                .batch_execute("SELECT dts_outbox_listener_unregister()")?;
            Ok(())
        }

        /// The `dts_outbox` notifications received before a sentinel NOTIFY that `other` sends
        /// now: notifications arrive in commit order, so these are all those of the
        /// transactions committed before it.
        fn count(&mut self, other: &mut PgConnection) -> Res<u64> {
            other.batch_execute("NOTIFY bench_sentinel")?;
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut n = 0;
            loop {
                for next in self.conn.notifications_iter() {
                    if next?.channel == "bench_sentinel" {
                        return Ok(n);
                    }
                    n += 1;
                }
                if Instant::now() > deadline {
                    return Err("the sentinel notification did not arrive within 30 s".into());
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// Rows in the table `mode` writes to.
    fn rows_written(conn: &mut PgConnection, mode: &str) -> QueryResult<i64> {
        if mode.starts_with("plain-notify-") {
            plain_notify_count(conn)
        } else if mode.starts_with("plain-") {
            plain_count(conn)
        } else {
            diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
                "(SELECT count(*) FROM dts_outbox)",
            ))
            .get_result(conn)
        }
    }

    fn enqueue_line(mode: &str, count: i64, batch: i64, ms: f64) -> Value {
        json!({
            "test": "enqueue", "mode": mode, "count": count,
            "batch": if mode.contains("batch") { batch } else { 1 },
            "ms": round(ms, 1), "jobs_per_s": (count as f64 * 1e3 / ms).round() as i64,
            "loadavg1": loadavg1(),
        })
    }

    fn enqueue(a: &Args) -> Res<()> {
        let url = a.url()?;
        let mode = a.str("mode", "usertx1");
        let count = a.num("count", 20_000)? as i64;
        let batch = a.num("batch", 1000)?.max(1) as i64;
        reset(&url)?;
        let mut sides = Sides::open(&url)?;
        let mut listener = notifies(&mode).then(|| Listener::open(&url)).transpose()?;
        if let (Some(l), true) = (listener.as_mut(), mode.ends_with("-listened")) {
            l.register()?;
        }
        let c0 = cpu_snap();
        let t0 = Instant::now();
        sides.run(base(&mode), 0, count, batch)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let cpu = cpu_diff(c0, cpu_snap());
        if let Some(l) = listener.as_mut() {
            l.unregister()?;
        }
        let n = rows_written(&mut sides.plain, &mode)?;
        if n != count {
            return Err(format!("expected {count} rows, found {n}").into());
        }
        println!("{}", merge(enqueue_line(&mode, count, batch, ms), cpu));
        Ok(())
    }

    /// `compare --modes a,b,... --count N [--block B] [--batch 1000]`: runs the modes
    /// interleaved in one process, B jobs of one mode after B jobs of the next (the order
    /// rotates at every block), so that every mode sees the same machine; prints one line per
    /// mode with its own time. The fair way to compare modes within a few per cent on a busy
    /// machine.
    fn compare(a: &Args) -> Res<()> {
        let url = a.url()?;
        let modes: Vec<String> = a.str("modes", "").split(',').map(str::to_owned).collect();
        let count = a.num("count", 20_000)? as i64;
        let batch = a.num("batch", 1000)?.max(1) as i64;
        let block = a.num("block", 500)?.max(1) as i64;
        let block = if modes.iter().any(|m| m.contains("batch")) {
            block.max(batch) / batch * batch
        } else {
            block
        };
        reset(&url)?;
        let mut sides = Sides::open(&url)?;
        // With a mode that notifies, a listener throughout (as a deployment whose relays
        // listen has), and each block's notifications counted, outside the timed part.
        let mut listener = modes
            .iter()
            .any(|m| notifies(m))
            .then(|| Listener::open(&url))
            .transpose()?;
        let mut notes = vec![0u64; modes.len()];
        // CPU time per mode (ns): this thread, the server process it writes through, the
        // listener's server process (the NOTIFY's delivery); measured around the timed part.
        let mut cpu_used: Vec<Option<[u64; 3]>> = vec![Some([0; 3]); modes.len()];
        let mut ms = vec![0.0; modes.len()];
        let mut blocks: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        let c0 = cpu_snap();
        let mut from = 0;
        let mut turn = 0;
        while from < count {
            let to = (from + block).min(count);
            for k in 0..modes.len() {
                let m = (k + turn) % modes.len();
                let listened = modes[m].ends_with("-listened");
                if let (Some(l), true) = (listener.as_mut(), listened) {
                    l.register()?;
                }
                let lpid = listener.as_ref().map(|l| l.pid);
                let before = sides.cpu(&modes[m], lpid);
                let t = Instant::now();
                sides.run(base(&modes[m]), from, to, batch)?;
                let took = t.elapsed().as_secs_f64() * 1e3;
                let after = sides.cpu(&modes[m], lpid);
                cpu_used[m] = match (cpu_used[m], before, after) {
                    (Some(sum), Some(b), Some(a)) => {
                        Some(std::array::from_fn(|i| sum[i] + a[i].saturating_sub(b[i])))
                    }
                    _ => None,
                };
                ms[m] += took;
                blocks[m].push((to - from) as f64 * 1e3 / took);
                if let Some(l) = listener.as_mut() {
                    if listened {
                        l.unregister()?;
                    }
                    let n = l.count(&mut sides.plain)?;
                    if notifies(&modes[m]) != (n > 0) {
                        return Err(format!(
                            "mode {}: {n} notifications in a block of {} jobs",
                            modes[m],
                            to - from
                        )
                        .into());
                    }
                    notes[m] += n;
                }
            }
            from = to;
            turn += 1;
        }
        let cpu = cpu_diff(c0, cpu_snap());
        for table in ["ours", "plain-", "plain-notify-"] {
            let kind = |m: &String| match table {
                "ours" => !m.starts_with("plain-"),
                "plain-" => m.starts_with("plain-") && !m.starts_with("plain-notify-"),
                _ => m.starts_with("plain-notify-"),
            };
            let want = modes.iter().filter(|m| kind(m)).count() as i64 * count;
            let n = rows_written(&mut sides.plain, table)?;
            if n != want {
                return Err(format!("{table}: expected {want} rows, found {n}").into());
            }
        }
        for ((((m, ms), mut rates), notes), used) in
            modes.iter().zip(ms).zip(blocks).zip(notes).zip(cpu_used)
        {
            rates.sort_by(f64::total_cmp);
            let median = rates[rates.len() / 2];
            // CPU time per job, µs: unlike jobs/s, barely moved by what else the machine runs
            let per_job = |ns: u64| round(ns as f64 / 1e3 / count as f64, 2);
            let line = merge(
                enqueue_line(m, count, batch, ms),
                json!({"interleaved": modes, "block": block,
                       "jobs_per_s_block_median": median.round() as i64,
                       "notifications": listener.as_ref().map(|_| notes),
                       "cpu_us_per_job": used.map(|[client, server, listen]| json!({
                           "client": per_job(client), "server": per_job(server),
                           "listener": per_job(listen),
                           "total": per_job(client + server + listen)}))}),
            );
            println!("{}", merge(line, cpu.clone()));
        }
        Ok(())
    }

    // ---- drain -----------------------------------------------------------------------------

    struct RelayOpts {
        concurrency: u64,
        batch_size: u64,
        pool: u64,
    }

    fn relay_opts(a: &Args, concurrency: u64, batch_size: u64) -> Res<RelayOpts> {
        let concurrency = a.num("concurrency", concurrency)?.max(1);
        Ok(RelayOpts {
            concurrency,
            batch_size: a.num("batch-size", batch_size)?.max(1),
            pool: a.num("pool", concurrency + 1)?.max(1),
        })
    }

    fn relay_args(o: &RelayOpts) -> Vec<String> {
        vec![
            "--concurrency".into(),
            o.concurrency.to_string(),
            "--batch-size".into(),
            o.batch_size.to_string(),
            "--pool".into(),
            o.pool.to_string(),
        ]
    }

    /// `worker --once`: a relay with a no-op handler that exits once nothing is left that it
    /// could claim or still holds; prints `NOOP_STATS {n, first, last}` (handler start times).
    fn worker(a: &Args) -> Res<()> {
        let url = a.url()?;
        let o = relay_opts(a, 2, 500)?;
        let name = a.str("name", &format!("bench-{}", std::process::id()));
        let pool = relay_pool(&url, o.pool as u32)?;
        let n = Arc::new(AtomicU64::new(0));
        let first = Arc::new(AtomicU64::new(u64::MAX));
        let last = Arc::new(AtomicU64::new(0));
        let (hn, hf, hl) = (n.clone(), first.clone(), last.clone());
        let relay = Relay::builder(pool.clone())
            .name(name.clone())
            .handler("noop", move |_job: &Job| {
                let t = now_ns();
                hf.fetch_min(t, Ordering::Relaxed);
                hl.fetch_max(t, Ordering::Relaxed);
                hn.fetch_add(1, Ordering::Relaxed);
                Ok(())
            })
            .concurrency(o.concurrency as usize)
            .batch_size(o.batch_size as usize)
            .spawn()?;
        // `--once`: done when no row is claimable and none is held by this relay (its rows are
        // deleted only after their batch completed). Checked only after the delivered count
        // stood still for 2 ms, so it costs a few queries per run.
        let mut conn = pool.get()?;
        let mut seen = u64::MAX;
        let mut still = 0;
        loop {
            std::thread::sleep(Duration::from_millis(1));
            let s = relay.stats();
            let d = s.delivered + s.retried + s.dead;
            if d != seen {
                seen = d;
                still = 0;
                continue;
            }
            still += 1;
            if still < 2 {
                continue;
            }
            still = 0;
            let left: Vec<Exists> = diesel::sql_query(
                "SELECT EXISTS (SELECT 1 FROM dts_outbox WHERE state = 0 AND (locked_until IS NULL \
                 OR locked_until < (date_part('epoch', now()) * 1000)::BIGINT OR locked_by = $1)) \
                 AS e",
            )
            .bind::<diesel::sql_types::Text, _>(&name)
            .load(&mut conn)?;
            if !left.first().is_some_and(|r| r.e) {
                break;
            }
        }
        drop(conn);
        let stats = relay.shutdown();
        let n = n.load(Ordering::Relaxed);
        eprintln!(
            "NOOP_STATS {}",
            json!({"n": n, "first": if n > 0 { first.load(Ordering::Relaxed) } else { 0 },
                   "last": last.load(Ordering::Relaxed), "delivered": stats.delivered,
                   "released": stats.released})
        );
        Ok(())
    }

    #[derive(QueryableByName)]
    struct Exists {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        e: bool,
    }

    fn run_worker(url: &str, o: &RelayOpts) -> Res<Child> {
        let exe = std::env::current_exe()?;
        Ok(Command::new(exe)
            .arg("worker")
            .arg("--once")
            .args(["--url", url])
            .args(relay_args(o))
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .spawn()?)
    }

    fn wait_worker(child: Child) -> Res<Value> {
        let out = child.wait_with_output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!("worker failed ({}): {err}", out.status).into());
        }
        match err.lines().find_map(|l| l.strip_prefix("NOOP_STATS ")) {
            Some(s) => Ok(serde_json::from_str(s)?),
            None => Ok(json!({"n": 0})),
        }
    }

    fn drain(a: &Args) -> Res<()> {
        let url = a.url()?;
        let procs = a.num("procs", 1)?.max(1);
        let count = a.num("count", 20_000)? as i64;
        let o = relay_opts(a, 2, 500)?;
        reset(&url)?;
        // startup + shutdown of a `worker --once` on an empty queue, median of 3
        let mut st = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            wait_worker(run_worker(&url, &o)?)?;
            st.push(t.elapsed().as_secs_f64() * 1e3);
        }
        st.sort_by(f64::total_cmp);
        let startup = st[1];
        {
            let mut conn = connect(&url)?;
            conn.transaction::<_, Error, _>(|_| {
                for id in 0..count {
                    defer_durable!("noop", &Payload { id })?;
                }
                Ok(())
            })?;
            conn.batch_execute("VACUUM ANALYZE dts_outbox")?;
        }
        let la = loadavg1();
        let c0 = cpu_snap();
        let t0 = Instant::now();
        let children = (0..procs)
            .map(|_| run_worker(&url, &o))
            .collect::<Res<Vec<_>>>()?;
        let stats = children
            .into_iter()
            .map(wait_worker)
            .collect::<Res<Vec<_>>>()?;
        let wall = t0.elapsed().as_secs_f64() * 1e3;
        let cpu = cpu_diff(c0, cpu_snap());
        let left: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
            "(SELECT count(*) FROM dts_outbox)",
        ))
        .get_result(&mut connect(&url)?)?;
        let get = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let n: u64 = stats.iter().map(|s| get(s, "n")).sum();
        let busy: Vec<&Value> = stats.iter().filter(|s| get(s, "n") > 0).collect();
        let first = busy.iter().map(|s| get(s, "first")).min().unwrap_or(0);
        let last = busy.iter().map(|s| get(s, "last")).max().unwrap_or(0);
        let span = (last.saturating_sub(first)) as f64 / 1e6;
        let out = json!({
            "test": "exec", "procs": procs, "count": count, "executed": n,
            "per_proc": stats.iter().map(|s| get(s, "n")).collect::<Vec<_>>(),
            "jobs_left": left, "concurrency": o.concurrency, "batch_size": o.batch_size,
            "pool": o.pool, "startup_ms": startup.round() as i64,
            "startup_runs_ms": st.iter().map(|v| v.round() as i64).collect::<Vec<_>>(),
            "wall_ms": wall.round() as i64,
            "jps_wall_minus_startup": (count as f64 * 1e3 / (wall - startup)).round() as i64,
            "jps_wall": (count as f64 * 1e3 / wall).round() as i64,
            "span_ms": span.round() as i64,
            "jps_first_to_last_task": if span > 0.0 {
                ((n.saturating_sub(1)) as f64 * 1e3 / span).round() as i64
            } else {
                0
            },
            "loadavg1_before": la,
        });
        println!("{}", merge(out, cpu));
        Ok(())
    }

    // ---- latency ---------------------------------------------------------------------------

    /// The relay process of the latency test: stamps handler start (CLOCK_REALTIME ns) per
    /// job id; talks to the parent over stdin/stdout (`ready`, `warm`, `done <json>`; `stop`).
    fn latency_worker(a: &Args) -> Res<()> {
        let url = a.url()?;
        let o = relay_opts(a, 1, 100)?;
        let n = a.num("n", 2000)? as usize;
        let starts: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        let warm = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(AtomicUsize::new(0));
        let out = Arc::new(Mutex::new(std::io::stdout()));
        let say = |out: &Mutex<std::io::Stdout>, line: &str| {
            let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(o, "{line}");
            let _ = o.flush();
        };
        let dump = |starts: &[AtomicU64]| -> String {
            let v: Vec<Value> = starts
                .iter()
                .map(|s| match s.load(Ordering::SeqCst) {
                    0 => Value::Null,
                    t => json!(t),
                })
                .collect();
            Value::Array(v).to_string()
        };
        let pool = relay_pool(&url, o.pool as u32)?;
        let (hs, hw, hn, ho) = (starts.clone(), warm.clone(), seen.clone(), out.clone());
        let relay = Relay::builder(pool)
            .handler("lat", move |job: &Job| {
                let t = now_ns();
                let Payload { id } = job.payload()?;
                if id < 0 {
                    if hw.fetch_add(1, Ordering::SeqCst) + 1 == 100 {
                        say(&ho, "warm");
                    }
                    return Ok(());
                }
                if let Some(slot) = hs.get(id as usize) {
                    if slot.swap(t, Ordering::SeqCst) == 0
                        && hn.fetch_add(1, Ordering::SeqCst) + 1 == hs.len()
                    {
                        say(&ho, &format!("done {}", dump(&hs)));
                    }
                }
                Ok(())
            })
            .concurrency(o.concurrency as usize)
            .batch_size(o.batch_size as usize)
            .listen(url.clone())
            .spawn()?;
        // The producer starts once the listener has registered (its COMMITs notify from then).
        let mut conn = PgConnection::establish(&url)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let registered: Exists = diesel::sql_query(
                "SELECT EXISTS (SELECT 1 FROM dts_outbox_listeners WHERE relay = $1) AS e",
            )
            .bind::<diesel::sql_types::Text, _>(relay.name())
            .get_result(&mut conn)?;
            if registered.e {
                break;
            }
            if Instant::now() > deadline {
                return Err("the relay's listener did not register within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(conn);
        say(&out, "ready");
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            if line?.trim() == "stop" {
                break;
            }
        }
        if seen.load(Ordering::SeqCst) < n {
            say(&out, &format!("done {}", dump(&starts)));
        }
        relay.shutdown();
        Ok(())
    }

    fn pct(sorted: &[f64], p: f64) -> f64 {
        let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[i.clamp(1, sorted.len()) - 1]
    }

    fn summ(mut a: Vec<f64>) -> Value {
        if a.is_empty() {
            return Value::Null;
        }
        a.sort_by(f64::total_cmp);
        let mean = a.iter().sum::<f64>() / a.len() as f64;
        json!({"p50": round(pct(&a, 50.0), 2), "p90": round(pct(&a, 90.0), 2),
               "p99": round(pct(&a, 99.0), 2), "max": round(a[a.len() - 1], 2),
               "min": round(a[0], 2), "mean": round(mean, 2)})
    }

    fn latency(a: &Args) -> Res<()> {
        let url = a.url()?;
        let rate = a.num("rate", 200)?.max(1);
        let secs = a.num("secs", 10)?.max(1);
        let o = relay_opts(a, 1, 100)?;
        let n = (rate * secs) as usize;
        reset(&url)?;
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("latency-worker")
            .args(["--url", &url, "--n", &n.to_string()])
            .args(relay_args(&o))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut to_child = child.stdin.take().ok_or("no stdin")?;
        let from_child = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(from_child).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let expect = |rx: &mpsc::Receiver<String>, what: &str, within: Duration| -> Res<String> {
            let deadline = Instant::now() + within;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let line = rx
                    .recv_timeout(left)
                    .map_err(|e| format!("waiting for {what} from the relay process: {e}"))?;
                if line == what || line.starts_with(&format!("{what} ")) {
                    return Ok(line);
                }
            }
        };
        expect(&rx, "ready", Duration::from_secs(30))?;
        let mut conn = connect(&url)?;
        conn.batch_execute("SELECT 1")?;
        // One job outside a transaction, as the kit's producer (one autocommit add_job).
        let add = |conn: &mut Conn, id: i64| -> Res<()> {
            conn.defer_durable("lat", &Payload { id })?;
            Ok(())
        };
        // warm-up as the kit (perfTest/latencyTest.js): 100 jobs, wait for them, settle 1 s
        for i in 1..=100 {
            add(&mut conn, -i)?;
        }
        expect(&rx, "warm", Duration::from_secs(30))?;
        std::thread::sleep(Duration::from_secs(1));
        let mut send = vec![0u64; n];
        let mut ack = vec![0u64; n];
        let c0 = cpu_snap();
        let t0 = Instant::now();
        let step = Duration::from_nanos(1_000_000_000 / rate);
        for i in 0..n {
            let due = t0 + step * i as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now); // timer pacing, no busy-spin (2-core box)
            }
            send[i] = now_ns();
            add(&mut conn, i as i64)?;
            ack[i] = now_ns();
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu = cpu_diff(c0, cpu_snap());
        let done = match expect(&rx, "done", Duration::from_secs(10)) {
            Ok(line) => line,
            Err(_) => {
                let _ = writeln!(to_child, "stop");
                let _ = to_child.flush();
                expect(&rx, "done", Duration::from_secs(10))?
            }
        };
        let _ = writeln!(to_child, "stop");
        let _ = to_child.flush();
        drop(to_child);
        child.wait()?;
        let starts: Vec<Option<u64>> = serde_json::from_str(&done["done ".len()..])?;
        let (mut s2s, mut a2s, mut s2a) = (Vec::new(), Vec::new(), Vec::new());
        let mut missing = 0;
        for i in 0..n {
            match starts.get(i).copied().flatten() {
                Some(st) => {
                    s2s.push((st as f64 - send[i] as f64) / 1e6);
                    a2s.push((st as f64 - ack[i] as f64) / 1e6);
                    s2a.push((ack[i] as f64 - send[i] as f64) / 1e6);
                }
                None => missing += 1,
            }
        }
        let neg = a2s.iter().filter(|v| **v < 0.0).count();
        let out = json!({
            "test": "latency", "rate": rate, "n": n, "missing": missing,
            "achieved_rate": round(n as f64 / elapsed, 1),
            "concurrency": o.concurrency, "batch_size": o.batch_size, "pool": o.pool,
            "send_to_start_ms": summ(s2s), "commitack_to_start_ms": summ(a2s),
            "add_job_rtt_ms": summ(s2a), "neg_ack_to_start": neg, "loadavg1": loadavg1(),
        });
        println!("{}", merge(out, cpu));
        Ok(())
    }

    /// `enqueue --mode` values this build supports.
    const CAPABILITIES: &[&str] = &[
        "tx1",
        "autocommit",
        "usertx1",
        "usertx1-macro",
        "batch",
        "batch-conn",
        "batch-all",
        "enqueue_all",
        "plain-autocommit",
        "plain-usertx1",
        "plain-batch",
        "plain-notify-autocommit",
        "plain-notify-usertx1",
        "autocommit-listened",
        "usertx1-listened",
    ];

    pub fn main() -> Res<()> {
        let a = Args::parse()?;
        match a.cmd.as_str() {
            // What this build can measure (scripts/outbox-bench runs what is listed).
            "capabilities" => {
                println!("{}", CAPABILITIES.join(" "));
                Ok(())
            }
            "setup" => setup(&a.url()?),
            "enqueue" => enqueue(&a),
            "compare" => compare(&a),
            "drain" => drain(&a),
            "worker" => worker(&a),
            "latency" => latency(&a),
            "latency-worker" => latency_worker(&a),
            other => Err(format!("unknown subcommand {other}").into()),
        }
    }
}

#[cfg(feature = "outbox-listen")]
fn main() {
    if let Err(e) = bench::main() {
        eprintln!("outbox_bench: {e}");
        std::process::exit(1);
    }
}

#[cfg(not(feature = "outbox-listen"))]
fn main() {
    eprintln!("outbox_bench needs the `outbox-listen` feature: cargo run --release --example outbox_bench --features outbox-listen -- ...");
    std::process::exit(2);
}
