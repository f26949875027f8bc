//! The `dts-outbox` binary, run end to end against SQLite, PostgreSQL and MariaDB.
//!
//! Each test uses its own queue names (or a database of its own), so tests running in parallel
//! on the shared PostgreSQL and MariaDB databases never see each other's jobs; the commands
//! that touch every queue (`retry --all`, `purge` without `--queue`) run on a SQLite file of
//! their own.

#![cfg(feature = "cli")]
use crate::common;

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use diesel::prelude::*;
use diesel_transaction_signals::outbox::{DurableJob, JobId, Relay};
use serde_json::Value;

const PATIENCE: Duration = Duration::from_secs(30);

fn queue(name: &str) -> String {
    common::unique_tag(name).replace('-', "_")
}

/// What a run of the binary left: exit code, stdout, stderr.
#[derive(Debug)]
struct Run {
    code: i32,
    out: String,
    err: String,
}

impl Run {
    /// Succeeded, said nothing on stderr; returns stdout.
    fn ok(self) -> String {
        assert_eq!(self.code, 0, "{self:?}");
        assert!(self.err.is_empty(), "{self:?}");
        self.out
    }

    /// Failed with exit code 1 and one line on stderr containing `needle`.
    fn fails_with(self, needle: &str) {
        assert_eq!(self.code, 1, "{self:?}");
        assert!(self.out.is_empty(), "{self:?}");
        assert_eq!(self.err.lines().count(), 1, "one line: {self:?}");
        assert!(self.err.starts_with("dts-outbox: "), "{self:?}");
        assert!(self.err.contains(needle), "{needle:?} in {self:?}");
    }

    fn json(self) -> Value {
        serde_json::from_str(&self.ok()).unwrap()
    }
}

fn cli(url: &str, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_dts-outbox"))
        .arg("--database-url")
        .arg(url)
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8(out.stdout).unwrap(),
        err: String::from_utf8(out.stderr).unwrap(),
    }
}

/// A database name unique to this call, for a database of a test's own.
fn fresh_name() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "dts_cli_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `url` with its database name replaced.
fn with_database(url: &str, name: &str) -> String {
    let (base, _) = url.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

/// `$later`: the versions of the migrations after the first (PostgreSQL has one more).
macro_rules! cli_suite {
    ($backend:ident, $conn:ty, $url:expr, $empty_database:expr, $migrations:expr,
     $later:expr) => {
        mod $backend {
            use super::*;
            use diesel::r2d2::{ConnectionManager, Pool};
            use diesel_transaction_signals::SignalConnection;

            type Conn = SignalConnection<$conn>;

            fn connect(url: &str) -> Conn {
                let mut conn = Conn::establish(url).unwrap();
                if url.ends_with(".db") {
                    diesel::connection::SimpleConnection::batch_execute(
                        &mut conn,
                        "PRAGMA busy_timeout = 10000",
                    )
                    .unwrap();
                }
                conn
            }

            fn sql(url: &str, statement: &str) {
                diesel::sql_query(statement)
                    .execute(&mut connect(url))
                    .unwrap();
            }

            fn later(url: &str, q: &str, payload: &str) -> JobId {
                connect(url)
                    .enqueue(
                        DurableJob::new(q, &payload)
                            .unwrap()
                            .delay(Duration::from_secs(3600)),
                    )
                    .unwrap()
                    .unwrap()
            }

            fn dead(url: &str, q: &str, payload: &str, died_ms_ago: i64) -> JobId {
                let id = later(url, q, payload);
                sql(
                    url,
                    &format!(
                        "UPDATE dts_outbox SET state = 2, attempts = 2, max_attempts = 2, \
                         last_error = 'boom: {payload}', run_at = run_at - 3600000 - \
                         {died_ms_ago} WHERE id = {id}"
                    ),
                );
                id
            }

            #[test]
            fn every_subcommand_on_a_queue_with_tables_and_json() {
                let (url, _keep) = $url();
                let url = url.as_str();
                let q = queue("cli");
                let pending = later(url, &q, "pending");
                let fresh = dead(url, &q, "fresh", 0);
                let old = dead(url, &q, "old", 2 * 86_400_000);

                let table = cli(url, &["status", &q]).ok();
                let mut lines = table.lines();
                let header = lines.next().unwrap();
                assert!(
                    header.starts_with("QUEUE") && header.contains("DEAD"),
                    "{table}"
                );
                let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
                // QUEUE READY SCHEDULED RUNNING RETRYING DEAD OLDEST-READY PAUSED LEASES
                assert_eq!(row, [q.as_str(), "0", "1", "0", "0", "2", "-", "no", "-"]);
                let s = cli(url, &["--json", "status", &q]).json();
                assert_eq!(s[0]["queue"], q.as_str());
                assert_eq!(
                    (s[0]["scheduled"].as_u64(), s[0]["dead"].as_u64()),
                    (Some(1), Some(2))
                );
                assert_eq!(s[0]["paused"], false);
                assert!(s[0]["oldest_ready_age_ms"].is_null());
                let all = cli(url, &["--json", "status"]).json();
                assert!(all
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["queue"] == q.as_str()));

                let dead_table = cli(url, &["dead", "--queue", &q]).ok();
                assert!(dead_table.starts_with("ID"), "{dead_table}");
                assert!(dead_table.contains("boom: fresh") && dead_table.contains("2/2"));
                let dead = cli(url, &["--json", "dead", "--queue", &q]).json();
                let dead = dead.as_array().unwrap();
                assert_eq!(dead.len(), 2);
                assert_eq!(dead[0]["id"], fresh.get());
                assert_eq!(dead[0]["payload"], "\"fresh\"");
                assert_eq!(dead[0]["last_error"], "boom: fresh");
                assert_eq!(dead[0]["attempts"], 2);
                assert!(dead[0]["failed_at"].as_str().unwrap().ends_with('Z'));

                assert_eq!(
                    cli(
                        url,
                        &["--json", "purge", "--older-than", "1d", "--queue", &q]
                    )
                    .json()["purged"],
                    1
                );
                let _ = old;
                assert_eq!(
                    cli(url, &["purge", "--older-than", "1d", "--queue", &q]).ok(),
                    "purged 0 dead job(s) dead for longer than 1d00h\n"
                );

                assert_eq!(
                    cli(url, &["retry", &fresh.to_string()]).ok(),
                    "retried 1 dead job(s)\n"
                );
                cli(url, &["retry", &fresh.to_string()]).fails_with("not dead-lettered");
                assert_eq!(
                    cli(url, &["--json", "retry", "--queue", &q]).json()["retried"],
                    0
                );
                assert_eq!(
                    cli(url, &["reschedule", &fresh.to_string(), "--in", "2h"]).ok(),
                    format!("job {fresh} is due in 2h00m\n")
                );

                assert_eq!(cli(url, &["pause", &q]).ok(), format!("paused {q}\n"));
                assert_eq!(
                    cli(url, &["pause", &q]).ok(),
                    format!("{q} was already paused\n")
                );
                assert_eq!(
                    cli(url, &["--json", "status", &q]).json()[0]["paused"],
                    true
                );
                assert_eq!(cli(url, &["resume", &q]).ok(), format!("resumed {q}\n"));
                assert_eq!(
                    cli(url, &["resume", &q]).ok(),
                    format!("{q} was not paused\n")
                );

                let discarded = cli(
                    url,
                    &[
                        "--json",
                        "discard",
                        &pending.to_string(),
                        &fresh.to_string(),
                    ],
                )
                .json();
                assert_eq!(
                    discarded["discarded"],
                    serde_json::json!([pending.get(), fresh.get()])
                );
                cli(url, &["discard", &pending.to_string()]).fails_with("not in the outbox");

                // The queue is empty now: unknown to every command that names it.
                cli(url, &["status", &q]).fails_with("unknown queue");
                cli(url, &["dead", "--queue", &q]).fails_with("unknown queue");
                cli(url, &["retry", "--queue", &q]).fails_with("unknown queue");
                cli(url, &["resume", &q]).fails_with("unknown queue");
                cli(url, &["pause", &q]).fails_with("--force");
                assert_eq!(
                    cli(url, &["pause", "--force", &q]).ok(),
                    format!("paused {q}\n")
                );
                assert_eq!(cli(url, &["resume", &q]).ok(), format!("resumed {q}\n"));
                cli(url, &["status", "bad queue!"]).fails_with("invalid queue name");
            }

            /// A job a relay runs: the tool refuses to discard or reschedule it, and says so.
            #[test]
            fn a_running_job_is_refused_with_a_reason() {
                let (url, _keep) = $url();
                let q = queue("cli_running");
                let pool = Pool::builder()
                    .max_size(2)
                    .build(ConnectionManager::<Conn>::new(url.clone()))
                    .unwrap();
                let id = pool.get().unwrap().defer_durable(&q, &1).unwrap().unwrap();
                let (started_tx, started) = mpsc::channel();
                let started_tx = Mutex::new(started_tx);
                let (go, go_rx) = mpsc::channel::<()>();
                let go_rx = Mutex::new(go_rx);
                let relay = Relay::builder(pool.clone())
                    .name("cli-relay")
                    .handler(&q, move |job| {
                        started_tx.lock().unwrap().send(job.id())?;
                        go_rx.lock().unwrap().recv_timeout(PATIENCE)?;
                        Ok(())
                    })
                    .spawn()
                    .unwrap();
                assert_eq!(started.recv_timeout(PATIENCE).unwrap(), id);
                cli(&url, &["discard", &id.to_string()]).fails_with("leased by a relay");
                cli(&url, &["reschedule", &id.to_string()]).fails_with("leased by a relay");
                let s = cli(&url, &["--json", "status", &q]).json();
                assert_eq!(s[0]["running"], 1);
                assert_eq!(s[0]["leases"][0]["relay"], "cli-relay");
                let table = cli(&url, &["status", &q]).ok();
                assert!(table.contains("cli-relay/0/"), "{table}");
                go.send(()).unwrap();
                assert_eq!(relay.shutdown().delivered, 1);
            }

            /// A database without the outbox tables: a one-line reason, then `migrate` makes
            /// them and the same command works.
            #[test]
            fn a_missing_table_is_reported_and_migrate_creates_it() {
                let (url, _keep) = $url();
                let (empty, _drop) = $empty_database(&url);
                cli(&empty, &["status"]).fails_with("dts_outbox is missing");
                cli(&empty, &["dead"]).fails_with("dts-outbox migrate");
                let applied = cli(&empty, &["--json", "migrate"]).json();
                assert_eq!(
                    applied["applied"].as_array().unwrap().len(),
                    1 + $later.len()
                );
                assert_eq!(
                    cli(&empty, &["migrate"]).ok(),
                    "outbox tables are up to date\n"
                );
                let status = cli(&empty, &["status"]).ok();
                assert!(status.contains("(no queues"), "{status}");
            }

            /// A database made by an earlier version (the first outbox migration only), with a
            /// job in it: the tool names the missing table, `migrate` applies the pending
            /// migrations, and a relay of this version delivers the job.
            #[test]
            fn a_database_of_the_previous_version_upgrades_with_migrate() {
                use diesel_migrations::MigrationHarness;
                let (url, _keep) = $url();
                let (empty, _drop) = $empty_database(&url);
                let mut conn = connect(&empty);
                conn.run_next_migration($migrations).unwrap();
                let q = queue("upgrade");
                let id = conn.defer_durable(&q, &"from before").unwrap().unwrap();
                cli(&empty, &["status"]).fails_with("dts_outbox_paused is missing");
                assert_eq!(
                    cli(&empty, &["dead"]).ok(),
                    "ID  QUEUE  ATTEMPTS  CREATED  FAILED  LAST ERROR  PAYLOAD\n(no dead jobs)\n"
                );
                let applied = cli(&empty, &["--json", "migrate"]).json();
                assert_eq!(applied["applied"], serde_json::json!($later));
                assert_eq!(cli(&empty, &["--json", "status", &q]).json()[0]["ready"], 1);
                let (tx, rx) = mpsc::channel();
                let relay = Relay::builder(
                    Pool::builder()
                        .max_size(2)
                        .build(ConnectionManager::<Conn>::new(empty.clone()))
                        .unwrap(),
                )
                .handler(&q, move |job| {
                    Ok(tx.send((job.id(), job.payload::<String>()?))?)
                })
                .spawn()
                .unwrap();
                assert_eq!(
                    rx.recv_timeout(PATIENCE).unwrap(),
                    (id, "from before".to_owned())
                );
                relay.shutdown();
            }

            #[test]
            fn an_unreachable_server_is_one_line() {
                let (url, _keep) = $url();
                if url.contains("://") {
                    // A port nothing listens on (the test servers use free ephemeral ports).
                    let (scheme, rest) = url.split_once("://").unwrap();
                    let (_, path) = rest.split_once('/').unwrap();
                    let dead = format!("{scheme}://root@127.0.0.1:1/{path}");
                    cli(&dead, &["status"]).fails_with("cannot connect to the database");
                } else {
                    cli(&format!("{url}.missing"), &["status"]).fails_with("no SQLite database");
                }
            }
        }
    };
}

fn sqlite_url() -> (String, Box<dyn std::any::Any>) {
    let file = common::SqliteFile::new();
    (file.url.clone(), Box::new(file))
}

fn pg_url() -> (String, Box<dyn std::any::Any>) {
    let _ = common::pg(); // migrated, outbox included
    (common::pg_url(), Box::new(()))
}

fn mysql_url() -> (String, Box<dyn std::any::Any>) {
    let _ = common::mysql();
    (common::mysql_url(), Box::new(()))
}

/// Drops a database of a test's own at the end.
struct DropDatabase(Box<dyn Fn()>);

impl Drop for DropDatabase {
    fn drop(&mut self) {
        (self.0)()
    }
}

fn sqlite_empty(_: &str) -> (String, DropDatabase) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.db");
    SqliteConnection::establish(path.to_str().unwrap()).unwrap();
    (
        format!("sqlite://{}", path.display()),
        DropDatabase(Box::new(move || {
            let _keep = &dir;
        })),
    )
}

fn pg_empty(url: &str) -> (String, DropDatabase) {
    let name = fresh_name();
    let mut admin = PgConnection::establish(url).unwrap();
    diesel::sql_query(format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .unwrap();
    let url = url.to_owned();
    (
        with_database(&url, &name),
        DropDatabase(Box::new(move || {
            let mut admin = PgConnection::establish(&url).unwrap();
            let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut admin);
        })),
    )
}

fn mysql_empty(url: &str) -> (String, DropDatabase) {
    let name = fresh_name();
    let mut admin = MysqlConnection::establish(url).unwrap();
    diesel::sql_query(format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .unwrap();
    let url = url.to_owned();
    (
        with_database(&url, &name),
        DropDatabase(Box::new(move || {
            let mut admin = MysqlConnection::establish(&url).unwrap();
            let _ =
                diesel::sql_query(format!("DROP DATABASE IF EXISTS {name}")).execute(&mut admin);
        })),
    )
}

cli_suite!(
    sqlite,
    diesel::SqliteConnection,
    super::sqlite_url,
    super::sqlite_empty,
    diesel_transaction_signals::outbox::migrations::SQLITE,
    ["20261201000200"]
);
cli_suite!(
    postgres,
    diesel::PgConnection,
    super::pg_url,
    super::pg_empty,
    diesel_transaction_signals::outbox::migrations::POSTGRES,
    ["20261201000200", "20261202000300"]
);
cli_suite!(
    mysql,
    diesel::MysqlConnection,
    super::mysql_url,
    super::mysql_empty,
    diesel_transaction_signals::outbox::migrations::MYSQL,
    ["20261201000200"]
);

/// PostgreSQL at the previous version (the first two outbox migrations), a job in it: every
/// command works before the upgrade, `migrate` applies `dts_outbox_listeners`, and a relay that
/// listens registers there and delivers the job.
#[test]
fn postgres_a_database_of_the_previous_version_upgrades_to_listeners_with_migrate() {
    use diesel::r2d2::{ConnectionManager, Pool};
    use diesel_migrations::MigrationHarness;
    let (url, _keep) = pg_url();
    let (db, _drop) = pg_empty(&url);
    let mut conn =
        diesel_transaction_signals::SignalConnection::<PgConnection>::establish(&db).unwrap();
    for _ in 0..2 {
        conn.run_next_migration(diesel_transaction_signals::outbox::migrations::POSTGRES)
            .unwrap();
    }
    let q = queue("upgrade_listeners");
    let id = conn.defer_durable(&q, &"before").unwrap().unwrap();
    assert_eq!(cli(&db, &["--json", "status", &q]).json()[0]["ready"], 1);
    let applied = cli(&db, &["--json", "migrate"]).json();
    assert_eq!(applied["applied"], serde_json::json!(["20261202000300"]));
    assert_eq!(
        cli(&db, &["migrate"]).ok(),
        "outbox tables are up to date\n"
    );
    let (tx, rx) = mpsc::channel();
    let builder = Relay::builder(
        Pool::builder()
            .max_size(2)
            .build(ConnectionManager::<PgConnection>::new(db.clone()))
            .unwrap(),
    )
    .name("cli-upgrade")
    .handler(&q, move |job| {
        Ok(tx.send((job.id(), job.payload::<String>()?))?)
    });
    #[cfg(feature = "outbox-listen")]
    let builder = builder.listen(db.as_str());
    let relay = builder.spawn().unwrap();
    assert_eq!(
        rx.recv_timeout(PATIENCE).unwrap(),
        (id, "before".to_owned())
    );
    #[cfg(feature = "outbox-listen")]
    common::wait_until(PATIENCE, "the listener's registration", || {
        diesel::sql_query("SELECT 1 AS n FROM dts_outbox_listeners WHERE relay = 'cli-upgrade'")
            .execute(&mut conn)
            .unwrap()
            == 1
    });
    relay.shutdown();
}

/// The commands on every queue at once, on a SQLite file of their own, through DATABASE_URL.
#[test]
fn retry_all_and_purge_everything_through_database_url() {
    let file = common::SqliteFile::new();
    let mut conn = file.connect();
    for q in ["a", "b", "b"] {
        let id = conn.defer_durable(q, &1).unwrap().unwrap();
        diesel::sql_query(format!(
            "UPDATE dts_outbox SET state = 2, run_at = run_at - 86400000 WHERE id = {id}"
        ))
        .execute(&mut conn)
        .unwrap();
    }
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_dts-outbox"))
            .args(args)
            .env("DATABASE_URL", &file.url)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run(&["retry", "--all"]), "retried 3 dead job(s)\n");
    diesel::sql_query("UPDATE dts_outbox SET state = 2, run_at = run_at - 86400000")
        .execute(&mut conn)
        .unwrap();
    assert_eq!(
        run(&["--json", "purge", "--older-than", "12h"]),
        "{\"purged\":3}\n"
    );
    assert!(run(&["status"]).contains("(no queues"));
}

#[test]
fn bad_input_is_a_non_zero_exit_and_one_line() {
    cli("http://example.invalid/db", &["status"]).fails_with("unsupported database URL scheme");
    cli("", &["status"]).fails_with("no database");
    let missing = Command::new(env!("CARGO_BIN_EXE_dts-outbox"))
        .arg("status")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--database-url"));
    // Usage errors are clap's: exit code 2.
    for args in [
        &["purge"][..],
        &["purge", "--older-than", "7x"],
        &["retry"],
        &["retry", "1", "--all"],
        &["frobnicate"],
    ] {
        let run = cli("x.db", args);
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(run.err.contains("error:"), "{run:?}");
    }
    let help = cli("x.db", &["--help"]).ok();
    for cmd in [
        "status", "dead", "retry", "discard", "purge", "pause", "resume", "migrate",
    ] {
        assert!(help.contains(cmd), "{cmd} in {help}");
    }
}
