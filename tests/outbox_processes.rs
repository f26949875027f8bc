//! Process-level proofs of the transactional outbox on PostgreSQL.
//!
//! The children are this test binary itself, re-executed with `--exact child_process --ignored`
//! and an environment variable naming their role (`child_process` returns at once without it).
//! A child talks to the parent with marker lines on stdout (`@@dts@@ ...`); the parent talks to
//! a relay child on its stdin: `go` starts the relay, end of file shuts it down gracefully.
//! Relay children append one line per handler call (job id, attempt, payload, relay) to their
//! own file, before the relay deletes the row, so the parent can count every delivery.
//!
//! - A writer process is SIGKILLed right after its COMMITs (no relay in it): a relay in another
//!   process then delivers every committed job exactly once and none of the rolled-back ones.
//! - Four relay processes drain 20,000 jobs: every job delivered, no duplicates (lease 60 s).
//! - A handler that outlives a short lease: the duplicate deliveries are counted and explained.
//! - A relay process SIGKILLed mid-batch: its claimed jobs are delivered by another relay after
//!   the lease expires (the at-least-once case), and nothing else is duplicated.
//! - `listen` (feature `outbox-listen`): a relay process that polls once an hour is woken by
//!   another process's COMMIT.
//!
//! Waiting is always polling (of the database or of a child's messages) against a deadline.

#![cfg(all(feature = "outbox", feature = "postgres"))]
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::child::{say, Children, Kid};
use common::items;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::sql_types::{BigInt, Integer, Nullable, Text};
use diesel_transaction_signals::outbox::{Backoff, Job, OutboxError, Relay};

/// Long enough never to matter on a healthy machine; a wait that reaches it is a failure.
const PATIENCE: Duration = Duration::from_secs(30);

/// The children: this binary's `child_process` test, their role in `DTS_OUTBOX_CHILD`.
const CHILDREN: Children = Children::new("child_process", "DTS_OUTBOX_CHILD");

fn queue_name(tag: &str) -> String {
    tag.replace('-', "_")
}

// ---------------------------------------------------------------------------------------------
// Children
// ---------------------------------------------------------------------------------------------

/// The entry point of every child process; does nothing in a normal test run.
#[test]
#[ignore = "helper: the tests of this file run it in child processes"]
fn child_process() {
    let Some(role) = CHILDREN.role() else {
        return;
    };
    match role.as_str() {
        "writer" => child_writer(),
        "relay" => child_relay(),
        other => panic!("unknown child role {other:?}"),
    }
}

fn var(name: &str) -> String {
    CHILDREN.var(name)
}

fn var_num<T: std::str::FromStr>(name: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    CHILDREN.var_num(name)
}

#[derive(QueryableByName)]
struct BackendPid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

/// Commits (and rolls back) transactions that each insert an item and enqueue a job for it,
/// reporting each outcome after `transaction` returns, until the parent kills it.
fn child_writer() {
    let tag = var("TAG");
    let queue = var("QUEUE");
    let mut conn = common::pg();
    let BackendPid { pid } = diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result(&mut conn)
        .unwrap();
    say(format!("backend {pid}"));
    // Only a safety net should the parent never kill it (a dead parent also ends it: printing
    // to a closed pipe panics).
    let give_up = Instant::now() + 4 * PATIENCE;
    for v in 0.. {
        assert!(
            Instant::now() < give_up,
            "the parent never killed the writer"
        );
        let roll_back = v % 3 == 2;
        let outcome = conn.transaction(|c| {
            diesel::insert_into(items::table)
                .values((items::tag.eq(&tag), items::v.eq(v)))
                .execute(c)?;
            c.defer_durable(&queue, &v)?;
            if roll_back {
                Err(diesel::result::Error::RollbackTransaction)
            } else {
                Ok(())
            }
        });
        match (roll_back, outcome) {
            (false, Ok(())) => say(format!("committed {v}")),
            (true, Err(diesel::result::Error::RollbackTransaction)) => {
                say(format!("rolled_back {v}"))
            }
            (_, other) => panic!("transaction {v}: unexpected {other:?}"),
        }
    }
}

/// One line per handler call, written before the handler returns (so before the row is
/// deleted): `job_id attempt payload relay`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Record {
    id: i64,
    attempt: u32,
    n: i64,
    relay: String,
}

/// How a relay child's handler behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handling {
    /// Record and succeed.
    Fast,
    /// Attempt 1 of the job with payload 0 outlives the lease: it waits until another relay
    /// has claimed the job again (attempts >= 2) or deleted it, then succeeds.
    SlowFirst,
    /// Attempt 1 of every job hangs (up to a safety net), for the parent to kill the process
    /// mid-batch.
    Hang,
}

impl Handling {
    fn parse(s: &str) -> Self {
        match s {
            "fast" => Handling::Fast,
            "slow-first" => Handling::SlowFirst,
            "hang" => Handling::Hang,
            other => panic!("unknown handling {other:?}"),
        }
    }
}

#[derive(QueryableByName)]
struct Attempts {
    #[diesel(sql_type = Integer)]
    attempts: i32,
}

/// Runs a relay on the queue once the parent says `go`, until its stdin closes; then shuts it
/// down gracefully and reports its counters.
fn child_relay() {
    let url = common::pg_url();
    let queue = var("QUEUE");
    let name = var("NAME");
    let out = PathBuf::from(var("OUT"));
    let handling = Handling::parse(&var("HANDLING"));
    let concurrency: usize = var_num("CONCURRENCY");
    let pool = Pool::builder()
        .max_size(concurrency as u32 + 1)
        .build(ConnectionManager::<PgConnection>::new(&url))
        .unwrap();
    let file = Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out)
            .unwrap(),
    );
    // The slow handler watches its job's row on a connection of its own.
    let watcher = (handling == Handling::SlowFirst)
        .then(|| Mutex::new(PgConnection::establish(&url).unwrap()));
    say("ready");

    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    if stdin.read_line(&mut line).unwrap() == 0 || line.trim() != "go" {
        return;
    }

    let me = name.clone();
    let handler = move |job: &Job| {
        let n: i64 = job.payload()?;
        let record = format!("{} {} {n} {me}\n", job.id(), job.attempt());
        file.lock().unwrap().write_all(record.as_bytes())?;
        let wait = match handling {
            Handling::Fast => false,
            Handling::SlowFirst => job.attempt() == 1 && n == 0,
            Handling::Hang => job.attempt() == 1,
        };
        if wait {
            say(format!("waiting {}", job.id()));
            let deadline = Instant::now() + 2 * PATIENCE;
            let Some(watcher) = &watcher else {
                // Hang: a stuck handler, until the parent kills the process.
                while Instant::now() < deadline {
                    std::thread::park_timeout(deadline - Instant::now());
                }
                return Err("the parent never killed this relay".into());
            };
            let claimed_again = common::try_wait_for(deadline, || {
                let row: QueryResult<Option<Attempts>> =
                    diesel::sql_query("SELECT attempts FROM dts_outbox WHERE id = $1")
                        .bind::<BigInt, _>(job.id().get())
                        .get_result(&mut *watcher.lock().unwrap())
                        .optional();
                match row {
                    Ok(row) => row.is_none_or(|r| r.attempts >= 2).then_some(Ok(())),
                    Err(e) => Some(Err(e)),
                }
            });
            match claimed_again {
                Some(r) => r?,
                None => return Err("nobody claimed the job again".into()),
            }
        }
        Ok(())
    };
    let builder = Relay::builder(pool)
        .name(&name)
        .handler(&queue, handler)
        .concurrency(concurrency)
        .batch_size(var_num("BATCH"))
        .lease(Duration::from_millis(var_num("LEASE_MS")))
        .poll_interval(Duration::from_millis(var_num("POLL_MS")));
    #[cfg(feature = "outbox-listen")]
    let builder = match CHILDREN.try_var("LISTEN") {
        Some(listen_url) => builder.listen(listen_url),
        None => builder,
    };
    let relay = builder.spawn().unwrap();
    say("started");

    loop {
        line.clear();
        if stdin.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
    }
    let stopping = Instant::now();
    let stats = relay.shutdown();
    say(format!(
        "stats {} {} {} {} {}",
        stats.delivered,
        stats.retried,
        stats.dead,
        stats.released,
        stopping.elapsed().as_millis()
    ));
}

// ---------------------------------------------------------------------------------------------
// The parent's side
// ---------------------------------------------------------------------------------------------

/// A relay child's configuration.
struct RelaySpec<'a> {
    name: &'a str,
    queue: &'a str,
    out: &'a Path,
    handling: &'a str,
    concurrency: usize,
    batch: usize,
    lease: Duration,
    poll: Duration,
    /// `listen(url)` with this `application_name`, so the parent can see the LISTEN.
    listen_as: Option<String>,
}

impl RelaySpec<'_> {
    fn spawn(&self) -> Kid {
        let mut env = vec![
            ("QUEUE", self.queue.to_owned()),
            ("NAME", self.name.to_owned()),
            ("OUT", self.out.to_str().unwrap().to_owned()),
            ("HANDLING", self.handling.to_owned()),
            ("CONCURRENCY", self.concurrency.to_string()),
            ("BATCH", self.batch.to_string()),
            ("LEASE_MS", self.lease.as_millis().to_string()),
            ("POLL_MS", self.poll.as_millis().to_string()),
        ];
        if let Some(app) = &self.listen_as {
            env.push(("LISTEN", url_with_application_name(app)));
        }
        CHILDREN.spawn(self.name, "relay", &env)
    }
}

fn url_with_application_name(app: &str) -> String {
    with_application_name(&common::pg_url(), app)
}

fn with_application_name(url: &str, app: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={app}")
}

/// Its counters, from the `stats` message a relay child prints when it has shut down.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct ChildStats {
    delivered: u64,
    retried: u64,
    dead: u64,
    released: u64,
    shutdown_ms: u64,
}

fn child_stats(messages: &[String]) -> ChildStats {
    let line = messages
        .iter()
        .find_map(|m| m.strip_prefix("stats "))
        .unwrap_or_else(|| panic!("no stats message in {messages:?}"));
    let f: Vec<u64> = line.split(' ').map(|x| x.parse().unwrap()).collect();
    ChildStats {
        delivered: f[0],
        retried: f[1],
        dead: f[2],
        released: f[3],
        shutdown_ms: f[4],
    }
}

fn read_records(path: &Path) -> Vec<Record> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 4, "torn record line {l:?}");
            Record {
                id: f[0].parse().unwrap(),
                attempt: f[1].parse().unwrap(),
                n: f[2].parse().unwrap(),
                relay: f[3].to_owned(),
            }
        })
        .collect()
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn count(conn: &mut PgConnection, sql: &str, bind: &str) -> i64 {
    diesel::sql_query(sql)
        .bind::<Text, _>(bind)
        .get_result::<Count>(conn)
        .unwrap()
        .n
}

/// Listeners registered in `dts_outbox_listeners` (after their `LISTEN`: enqueues notify from
/// then on) whose connection has `application_name = $1`.
#[cfg(feature = "outbox-listen")]
const REGISTERED_AS: &str = "SELECT count(*) AS n FROM dts_outbox_listeners l \
     JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1";

fn queue_len(conn: &mut PgConnection, queue: &str) -> i64 {
    count(
        conn,
        "SELECT count(*) AS n FROM dts_outbox WHERE queue = $1",
        queue,
    )
}

/// Waits until no row of `queue` is left, failing early if a relay child died.
fn wait_drained(conn: &mut PgConnection, queue: &str, kids: &mut [Kid], deadline: Instant) {
    common::wait_until(deadline, "the queue to drain", || {
        for k in kids.iter_mut() {
            k.assert_running();
        }
        queue_len(conn, queue) == 0
    });
}

#[derive(QueryableByName, Debug, Clone, PartialEq, Eq)]
struct OutboxRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    payload: String,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Nullable<Text>)]
    locked_by: Option<String>,
}

fn outbox_rows(conn: &mut PgConnection, queue: &str) -> Vec<OutboxRow> {
    diesel::sql_query(
        "SELECT id, payload, attempts, locked_by FROM dts_outbox WHERE queue = $1 ORDER BY id",
    )
    .bind::<Text, _>(queue)
    .load(conn)
    .unwrap()
}

/// Deliveries grouped by job id.
fn by_job(records: &[Record]) -> BTreeMap<i64, Vec<Record>> {
    let mut map: BTreeMap<i64, Vec<Record>> = BTreeMap::new();
    for r in records {
        map.entry(r.id).or_default().push(r.clone());
    }
    for v in map.values_mut() {
        v.sort_by_key(|r| r.attempt);
    }
    map
}

// ---------------------------------------------------------------------------------------------
// 1. A writer killed right after COMMIT
// ---------------------------------------------------------------------------------------------

/// Committed transactions the writer reports before the parent kills it.
const COMMITS_BEFORE_KILL: usize = 60;

#[test]
fn jobs_committed_by_a_killed_process_are_delivered_once_by_another_process() {
    let started = Instant::now();
    let deadline = started + 2 * PATIENCE;
    let mut db = common::pg_plain();
    let tag = common::unique_tag("crash");
    let queue = queue_name(&tag);

    // The writer commits item + job pairs (and rolls back every third) with no relay at all:
    // after COMMIT only the in-process wake-up runs, which has nobody to wake.
    let mut writer = CHILDREN.spawn(
        "writer",
        "writer",
        &[("TAG", tag.clone()), ("QUEUE", queue.clone())],
    );
    let backend: i32 = writer.expect("backend ", deadline).parse().unwrap();
    let mut reported_committed = BTreeSet::new();
    let mut reported_rolled_back = BTreeSet::new();
    while reported_committed.len() < COMMITS_BEFORE_KILL {
        let m = writer.recv(deadline);
        if let Some(v) = m.strip_prefix("committed ") {
            reported_committed.insert(v.parse::<i32>().unwrap());
        } else if let Some(v) = m.strip_prefix("rolled_back ") {
            reported_rolled_back.insert(v.parse::<i32>().unwrap());
        } else {
            panic!("writer: unexpected {m:?}");
        }
    }
    // Right after the COMMIT of the 60th reported transaction returned (the writer may be a
    // transaction or two further on by now: one may be in flight and is ended by the kill).
    let status = writer.kill();
    assert_eq!(status.signal(), Some(9), "SIGKILLed: {status}");
    let killed_at = started.elapsed();

    // Once the server has ended the writer's session, whatever was in flight is settled
    // (rolled back, or committed if COMMIT had reached the server).
    common::wait_until(deadline, "the writer's session to end", || {
        let alive = diesel::sql_query("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = $1")
            .bind::<Integer, _>(backend)
            .get_result::<Count>(&mut db)
            .unwrap()
            .n;
        alive == 0
    });

    let committed: BTreeSet<i32> = items::table
        .filter(items::tag.eq(&tag))
        .select(items::v)
        .load::<i32>(&mut db)
        .unwrap()
        .into_iter()
        .collect();
    assert!(
        reported_committed.is_subset(&committed),
        "a reported commit lost its row"
    );
    assert!(
        reported_rolled_back.is_disjoint(&committed) && committed.iter().all(|v| v % 3 != 2),
        "a rolled-back row exists: {committed:?}"
    );
    // Before any relay runs: exactly one untouched job per committed item, none for the rest.
    let pending = outbox_rows(&mut db, &queue);
    let pending_payloads: Vec<i32> = pending.iter().map(|r| r.payload.parse().unwrap()).collect();
    assert_eq!(
        pending_payloads.iter().copied().collect::<BTreeSet<_>>(),
        committed,
        "the jobs committed exactly with their items"
    );
    assert_eq!(pending_payloads.len(), committed.len(), "one job per item");
    assert!(
        pending
            .iter()
            .all(|r| r.attempts == 0 && r.locked_by.is_none()),
        "no relay touched a job before the crash: {pending:?}"
    );

    // A relay in another process delivers them.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("relay.log");
    let mut relay = RelaySpec {
        name: "recovery",
        queue: &queue,
        out: &out,
        handling: "fast",
        concurrency: 1,
        batch: 16,
        lease: Duration::from_secs(60),
        poll: Duration::from_millis(100),
        listen_as: None,
    }
    .spawn();
    relay.expect("ready", deadline);
    relay.send("go");
    wait_drained(&mut db, &queue, std::slice::from_mut(&mut relay), deadline);
    let stats = child_stats(&relay.finish(deadline));

    let records = read_records(&out);
    let delivered: Vec<i32> = records.iter().map(|r| r.n as i32).collect();
    assert_eq!(
        delivered.iter().copied().collect::<BTreeSet<_>>(),
        committed,
        "delivered == committed"
    );
    assert_eq!(delivered.len(), committed.len(), "each delivered once");
    assert!(records.iter().all(|r| r.attempt == 1), "{records:?}");
    assert!(delivered.iter().all(|v| !reported_rolled_back.contains(v)));
    let ids: BTreeSet<i64> = records.iter().map(|r| r.id).collect();
    assert_eq!(
        ids,
        pending.iter().map(|r| r.id).collect(),
        "the very rows the writer committed"
    );
    assert_eq!(
        (stats.delivered, stats.retried, stats.dead),
        (committed.len() as u64, 0, 0)
    );
    eprintln!(
        "crash: writer killed after {killed_at:?} with {} committed ({} reported) and {} rolled \
         back reported; recovery relay delivered {} once each, 0 duplicates; total {:?}",
        committed.len(),
        reported_committed.len(),
        reported_rolled_back.len(),
        records.len(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Four relay processes, 20,000 jobs
// ---------------------------------------------------------------------------------------------

const JOBS: i64 = 20_000;
const PER_TRANSACTION: i64 = 1_000;
const RELAYS: usize = 4;

#[test]
fn four_relay_processes_deliver_20000_jobs_once_each() {
    let started = Instant::now();
    let deadline = started + 2 * PATIENCE;
    let tag = common::unique_tag("procs");
    let queue = queue_name(&tag);
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..RELAYS).map(|i| format!("relay{i}")).collect();
    let outs: Vec<PathBuf> = names
        .iter()
        .map(|n| dir.path().join(format!("{n}.log")))
        .collect();

    // The relays start (and connect) while the jobs are enqueued; they claim only after `go`.
    let mut kids: Vec<Kid> = names
        .iter()
        .zip(&outs)
        .map(|(name, out)| {
            RelaySpec {
                name,
                queue: &queue,
                out,
                handling: "fast",
                concurrency: 2,
                batch: 100,
                lease: Duration::from_secs(60),
                poll: Duration::from_millis(100),
                listen_as: cfg!(feature = "outbox-listen").then(|| format!("{tag}-{name}")),
            }
            .spawn()
        })
        .collect();

    let mut conn = common::pg();
    let mut expected: HashMap<i64, i64> = HashMap::with_capacity(JOBS as usize);
    for first in (0..JOBS).step_by(PER_TRANSACTION as usize) {
        conn.transaction(|c| {
            for n in first..first + PER_TRANSACTION {
                let id = c.defer_durable(&queue, &n)?.expect("a new job");
                expected.insert(id.get(), n);
            }
            Ok::<_, OutboxError>(())
        })
        .unwrap();
    }
    let enqueued = started.elapsed();
    let mut db = common::pg_plain();
    assert_eq!(queue_len(&mut db, &queue), JOBS);

    for k in &mut kids {
        k.expect("ready", deadline);
    }
    let go = Instant::now();
    for k in &mut kids {
        k.send("go");
    }
    wait_drained(&mut db, &queue, &mut kids, deadline);
    let drained = go.elapsed();
    for k in &mut kids {
        k.close_stdin(); // all shut down at once
    }
    let stats: Vec<ChildStats> = kids
        .iter_mut()
        .map(|k| child_stats(&k.finish(deadline)))
        .collect();

    let records: Vec<Record> = outs.iter().flat_map(|o| read_records(o)).collect();
    let jobs = by_job(&records);
    let missing: Vec<&i64> = expected
        .keys()
        .filter(|id| !jobs.contains_key(id))
        .collect();
    assert!(missing.is_empty(), "{} jobs never delivered", missing.len());
    let strangers: Vec<&i64> = jobs
        .keys()
        .filter(|id| !expected.contains_key(id))
        .collect();
    assert!(
        strangers.is_empty(),
        "deliveries of unknown jobs {strangers:?}"
    );
    for (id, rs) in &jobs {
        assert!(
            rs.iter().all(|r| r.n == expected[id]),
            "payload mismatch {rs:?}"
        );
    }
    // A duplicate would be one job delivered twice: by an expired lease (a later attempt) or
    // by two relays claiming the same row at once (the same attempt twice).
    let duplicates: Vec<&Vec<Record>> = jobs.values().filter(|rs| rs.len() > 1).collect();
    let same_attempt = duplicates
        .iter()
        .filter(|rs| rs.windows(2).any(|w| w[0].attempt == w[1].attempt))
        .count();
    let per_relay: Vec<(String, usize)> = names
        .iter()
        .map(|n| (n.clone(), records.iter().filter(|r| &r.relay == n).count()))
        .collect();
    eprintln!(
        "4 processes: {JOBS} jobs enqueued in {enqueued:?} ({} per transaction), delivered in \
         {drained:?}, total {:?}; deliveries {} ({} duplicate jobs, {same_attempt} of them \
         claimed twice in one attempt); per relay {per_relay:?}; shutdowns {:?} ms",
        PER_TRANSACTION,
        started.elapsed(),
        records.len(),
        duplicates.len(),
        stats.iter().map(|s| s.shutdown_ms).collect::<Vec<_>>()
    );
    assert!(
        duplicates.is_empty(),
        "no lease can expire (60 s, fast handlers), yet {} jobs ran more than once, e.g. {:?}",
        duplicates.len(),
        &duplicates[..duplicates.len().min(5)]
    );
    assert!(records.iter().all(|r| r.attempt == 1));
    let total = stats.iter().fold(ChildStats::default(), |a, s| ChildStats {
        delivered: a.delivered + s.delivered,
        retried: a.retried + s.retried,
        dead: a.dead + s.dead,
        released: a.released + s.released,
        shutdown_ms: a.shutdown_ms.max(s.shutdown_ms),
    });
    assert_eq!(
        (total.delivered, total.retried, total.dead, total.released),
        (JOBS as u64, 0, 0, 0)
    );
}

// ---------------------------------------------------------------------------------------------
// 3. A handler that outlives a short lease
// ---------------------------------------------------------------------------------------------

#[test]
fn a_handler_outliving_its_lease_duplicates_its_batch_and_the_duplicates_are_explained() {
    let started = Instant::now();
    let deadline = started + 2 * PATIENCE;
    let tag = common::unique_tag("lease");
    let queue = queue_name(&tag);
    let dir = tempfile::tempdir().unwrap();
    let (out_a, out_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let mut conn = common::pg();
    let ids: Vec<i64> = conn
        .transaction(|c| {
            (0..4i64)
                .map(|n| Ok(c.defer_durable(&queue, &n)?.expect("a new job").get()))
                .collect::<Result<Vec<_>, OutboxError>>()
        })
        .unwrap();

    // Relay A claims all four in one batch with a 300 ms lease; job 0's first attempt waits
    // until relay B has claimed it again, i.e. it outlives the lease.
    let mut a = RelaySpec {
        name: "A",
        queue: &queue,
        out: &out_a,
        handling: "slow-first",
        concurrency: 1,
        batch: 10,
        lease: Duration::from_millis(300),
        poll: Duration::from_millis(20),
        listen_as: None,
    }
    .spawn();
    a.expect("ready", deadline);
    a.send("go");
    assert_eq!(a.until("waiting ", deadline), ids[0].to_string());
    // Only now B exists: it claims when A's leases expire, with a long lease of its own, so
    // nobody claims a third time.
    let mut b = RelaySpec {
        name: "B",
        queue: &queue,
        out: &out_b,
        handling: "fast",
        concurrency: 1,
        batch: 10,
        lease: Duration::from_secs(60),
        poll: Duration::from_millis(20),
        listen_as: None,
    }
    .spawn();
    b.expect("ready", deadline);
    b.send("go");
    let mut db = common::pg_plain();
    let mut kids = [a, b];
    wait_drained(&mut db, &queue, &mut kids, deadline);
    // B may have delivered and deleted everything while A is still working through the rest
    // of its stale batch: stopping A now would make it release (skip) those. Let it finish.
    common::wait_until(deadline, "A to finish its batch", || {
        kids[0].assert_running();
        let text = std::fs::read_to_string(&out_a).unwrap_or_default();
        text.matches('\n').count() == 4
    });
    let [mut a, mut b] = kids;
    let (stats_a, stats_b) = (
        child_stats(&a.finish(deadline)),
        child_stats(&b.finish(deadline)),
    );

    let records: Vec<Record> = read_records(&out_a)
        .into_iter()
        .chain(read_records(&out_b))
        .collect();
    let jobs = by_job(&records);
    // Every job ran twice: attempt 1 on A (its claim), attempt 2 on B (the claim after A's
    // 300 ms lease expired). Job 0 because its own handler outlived the lease; jobs 1-3
    // although their handlers took no time, because one lease covers A's whole batch: B
    // claimed all four at once, and A, its handler for job 0 done, still ran 1-3 on the
    // expired lease (the relay does not check its lease before each job). Had A run them
    // before job 0, they would have been claimed again all the same: a batch's rows are
    // deleted together at its end.
    let explained: BTreeMap<i64, Vec<(String, u32)>> = jobs
        .iter()
        .map(|(id, rs)| {
            (
                *id,
                rs.iter().map(|r| (r.relay.clone(), r.attempt)).collect(),
            )
        })
        .collect();
    let want: BTreeMap<i64, Vec<(String, u32)>> = ids
        .iter()
        .map(|id| (*id, vec![("A".to_owned(), 1), ("B".to_owned(), 2)]))
        .collect();
    assert_eq!(explained, want);
    let duplicates = records.len() - jobs.len();
    assert_eq!(duplicates, 4);
    // Only B counts them as delivered: A's DELETE takes only rows still leased to A's worker,
    // and B's claim had taken all four over (B deleted them, or A's DELETE found them B's).
    assert_eq!((stats_a.delivered, stats_b.delivered), (0, 4));
    assert_eq!((stats_a.retried, stats_b.retried), (0, 0));
    assert_eq!((stats_a.released, stats_b.released), (0, 0));
    let order_a: Vec<i64> = read_records(&out_a).iter().map(|r| r.n).collect();
    assert_eq!(order_a, [0, 1, 2, 3], "A runs its batch in due order");
    eprintln!(
        "lease expiry: 4 jobs, {} deliveries, {duplicates} duplicates: job 0 (its handler \
         outlived the 300 ms lease) and jobs 1-3 (run after it by A on the expired lease, and by \
         B, which had claimed the whole batch again); {:?}",
        records.len(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// 4. A relay process killed mid-batch
// ---------------------------------------------------------------------------------------------

#[test]
fn jobs_claimed_by_a_killed_relay_process_are_delivered_after_the_lease_expires() {
    let started = Instant::now();
    let deadline = started + 2 * PATIENCE;
    let tag = common::unique_tag("relaykill");
    let queue = queue_name(&tag);
    let dir = tempfile::tempdir().unwrap();
    let (out_a, out_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let mut conn = common::pg();
    let ids: Vec<i64> = conn
        .transaction(|c| {
            (0..10i64)
                .map(|n| Ok(c.defer_durable(&queue, &n)?.expect("a new job").get()))
                .collect::<Result<Vec<_>, OutboxError>>()
        })
        .unwrap();

    // A claims 5 of the 10 (lease 500 ms) and hangs in the first handler; it is killed there.
    let mut a = RelaySpec {
        name: "A",
        queue: &queue,
        out: &out_a,
        handling: "hang",
        concurrency: 1,
        batch: 5,
        lease: Duration::from_millis(500),
        poll: Duration::from_millis(20),
        listen_as: None,
    }
    .spawn();
    a.expect("ready", deadline);
    a.send("go");
    // The relay runs a claimed batch oldest first (`RETURNING` alone gives no order).
    let running: i64 = a.until("waiting ", deadline).parse().unwrap();
    assert_eq!(
        running, ids[0],
        "A claimed the 5 oldest and runs the oldest first"
    );
    let status = a.kill();
    assert_eq!(status.signal(), Some(9));
    let mut db = common::pg_plain();
    let leased: Vec<i64> = outbox_rows(&mut db, &queue)
        .into_iter()
        .filter(|r| {
            r.locked_by
                .as_deref()
                .is_some_and(|o| o.starts_with("A/0/"))
        })
        .map(|r| r.id)
        .collect();
    assert_eq!(leased, ids[..5], "A's claim outlives A");

    let mut b = RelaySpec {
        name: "B",
        queue: &queue,
        out: &out_b,
        handling: "fast",
        concurrency: 1,
        batch: 100,
        lease: Duration::from_secs(60),
        poll: Duration::from_millis(20),
        listen_as: None,
    }
    .spawn();
    b.expect("ready", deadline);
    b.send("go");
    wait_drained(&mut db, &queue, std::slice::from_mut(&mut b), deadline);
    let stats_b = child_stats(&b.finish(deadline));

    let records_a = read_records(&out_a);
    let records_b = read_records(&out_b);
    assert_eq!(
        records_a
            .iter()
            .map(|r| (r.id, r.attempt))
            .collect::<Vec<_>>(),
        [(running, 1)],
        "A got as far as the first handler call"
    );
    // B delivers all ten once: the five A held (their second attempt) and the five it never
    // touched (their first). The only duplicate is the job A's handler was running.
    let mut got: Vec<(i64, u32)> = records_b.iter().map(|r| (r.id, r.attempt)).collect();
    got.sort_unstable();
    let want: Vec<(i64, u32)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, if i < 5 { 2 } else { 1 }))
        .collect();
    assert_eq!(got, want);
    assert_eq!((stats_b.delivered, stats_b.retried), (10, 0));
    eprintln!(
        "relay killed mid-batch: 10 jobs, A ran 1 before SIGKILL, B delivered 10 (5 as attempt 2 \
         after A's 500 ms lease expired); 1 duplicate (the job A was running); {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// 5. LISTEN/NOTIFY across processes
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "outbox-listen")]
#[test]
fn listen_wakes_a_relay_process_that_polls_once_an_hour() {
    let started = Instant::now();
    let deadline = started + 2 * PATIENCE;
    let tag = common::unique_tag("listen");
    let queue = queue_name(&tag);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("relay.log");
    let app = format!("dts-{tag}");
    let mut relay = RelaySpec {
        name: "listener",
        queue: &queue,
        out: &out,
        handling: "fast",
        concurrency: 1,
        batch: 10,
        lease: Duration::from_secs(60),
        poll: Duration::from_secs(3600),
        listen_as: Some(app.clone()),
    }
    .spawn();
    relay.expect("ready", deadline);
    relay.send("go");
    relay.expect("started", deadline);
    let mut db = common::pg_plain();
    common::wait_until(deadline, "the relay's registered listener", || {
        count(&mut db, REGISTERED_AS, &app) == 1
    });
    // The relay's worker now waits up to an hour; only the NOTIFY of this COMMIT (or the
    // wake-up its listener rings once registered) can make it claim.
    let mut conn = common::pg();
    let committed = Instant::now();
    let id = conn
        .transaction(|c| c.defer_durable(&queue, &7i64))
        .unwrap()
        .expect("a new job");
    common::wait_until(deadline, "the delivery", || queue_len(&mut db, &queue) == 0);
    let latency = committed.elapsed();
    let records = read_records(&out);
    assert_eq!(
        records.iter().map(|r| (r.id, r.n)).collect::<Vec<_>>(),
        [(id.get(), 7)]
    );
    // Not a graceful shutdown: it would wait for the listener's hour (see the test below).
    let status = relay.kill();
    assert_eq!(status.signal(), Some(9));
    eprintln!(
        "listen: delivered {latency:?} after another process's COMMIT (poll interval 1 h); {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Regression tests for bugs these tests found
// ---------------------------------------------------------------------------------------------

/// `RelayHandle::shutdown` joins the `listen` thread; it once looked at the stop flag only
/// between `timeout_iter(poll_interval)` waits, so shutdown took up to `poll_interval` (1 h in
/// the listen test above) unless some `NOTIFY dts_outbox` happened to arrive. Hence a database
/// of its own, where no other test's COMMIT notifies.
#[cfg(feature = "outbox-listen")]
#[test]
fn shutdown_with_listen_is_prompt_whatever_the_poll_interval() {
    let url = quiet_database("dts_quiet_listen");
    let queue = queue_name(&common::unique_tag("listenstop"));
    let app = format!("dts-{queue}");
    let pool = Pool::builder()
        .max_size(2)
        .build(ConnectionManager::<PgConnection>::new(&url))
        .unwrap();
    let relay = Relay::builder(pool)
        .handler(&queue, |_| Ok(()))
        .poll_interval(Duration::from_secs(10))
        .listen(with_application_name(&url, &app))
        .spawn()
        .unwrap();
    let mut db = PgConnection::establish(&url).unwrap();
    common::wait_until(PATIENCE, "the relay's registered listener", || {
        count(&mut db, REGISTERED_AS, &app) == 1
    });
    let stopping = Instant::now();
    relay.shutdown();
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "shutdown took {took:?} (poll interval 10 s)"
    );
}

/// A database `name` of its own on the test server, with the outbox tables; returns its URL.
#[cfg(feature = "outbox-listen")]
fn quiet_database(name: &str) -> String {
    use diesel_migrations::MigrationHarness;
    let mut admin = common::pg_plain();
    let sql = "SELECT count(*) AS n FROM pg_database WHERE datname = $1";
    if count(&mut admin, sql, name) == 0 {
        // A concurrent run may create it first: then this fails, and that is fine.
        let _ = diesel::sql_query(format!("CREATE DATABASE {name}")).execute(&mut admin);
    }
    let url = common::pg_url();
    let (base, query) = url.split_once('?').unwrap_or((&url, ""));
    let at = base.rfind('/').expect("a database in DTS_PG_URL");
    let url = format!(
        "{}/{name}{}{query}",
        &base[..at],
        if query.is_empty() { "" } else { "?" }
    );
    let mut conn = PgConnection::establish(&url).unwrap();
    diesel::sql_query("SELECT pg_advisory_lock(4243)")
        .execute(&mut conn)
        .unwrap();
    conn.run_pending_migrations(diesel_transaction_signals::outbox::migrations::POSTGRES)
        .unwrap();
    url
}

/// A relay whose lease expired once recorded its handler's failure with
/// `UPDATE dts_outbox SET locked_until = NULL, locked_by = NULL, ... WHERE id = $4`, without
/// `AND locked_by = <this relay>`, cancelling the live lease of the relay that had claimed the
/// job since (so a third relay could run it concurrently).
#[test]
fn a_stale_failure_leaves_the_live_lease_of_another_relay_alone() {
    let _ = common::pg();
    let queue = queue_name(&common::unique_tag("stalefail"));
    let pool = Pool::builder()
        .max_size(4)
        .build(ConnectionManager::<PgConnection>::new(common::pg_url()))
        .unwrap();
    let (a_started, a_started_rx) = mpsc::channel();
    let (a_go, a_go_rx) = mpsc::channel::<()>();
    let a_go_rx = Mutex::new(a_go_rx);
    let a = Relay::builder(pool.clone())
        .name("stale-A")
        .handler(&queue, move |job| {
            a_started.send(job.attempt())?;
            a_go_rx.lock().unwrap().recv_timeout(PATIENCE)?;
            Err("stale failure".into())
        })
        .lease(Duration::from_millis(200))
        .backoff(Backoff::new(
            Duration::from_millis(1),
            Duration::from_millis(1),
        ))
        .spawn()
        .unwrap();
    let mut conn = common::pg();
    let id = conn
        .transaction(|c| c.defer_durable(&queue, &1i64))
        .unwrap()
        .expect("a new job")
        .get();
    assert_eq!(a_started_rx.recv_timeout(PATIENCE).unwrap(), 1);

    let (b_started, b_started_rx) = mpsc::channel();
    let (b_go, b_go_rx) = mpsc::channel::<()>();
    let b_go_rx = Mutex::new(b_go_rx);
    let b = Relay::builder(pool.clone())
        .name("live-B")
        .handler(&queue, move |job| {
            b_started.send(job.attempt())?;
            b_go_rx.lock().unwrap().recv_timeout(PATIENCE)?;
            Ok(())
        })
        .lease(Duration::from_secs(60))
        .poll_interval(Duration::from_millis(20))
        .spawn()
        .unwrap();
    assert_eq!(
        b_started_rx.recv_timeout(PATIENCE).unwrap(),
        2,
        "B claimed after A's lease expired"
    );
    // A's handler now fails; shutdown returns once A has dealt with it: B owns the job now, so
    // A's stale failure changes nothing and is not counted as a retry.
    a.request_stop();
    a_go.send(()).unwrap();
    let stats_a = a.shutdown();
    assert_eq!((stats_a.retried, stats_a.dead), (0, 0));
    let mut db = common::pg_plain();
    let row = outbox_rows(&mut db, &queue);
    b_go.send(()).unwrap();
    b.shutdown();
    assert_eq!(
        row.iter().map(|r| (r.id, r.attempts)).collect::<Vec<_>>(),
        [(id, 2)],
    );
    assert!(
        row[0]
            .locked_by
            .as_deref()
            .is_some_and(|o| o.starts_with("live-B/0/")),
        "B's lease (60 s) must survive A's stale failure: {row:?}"
    );
}
