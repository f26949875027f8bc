//! Shared test support: real databases (SQLite in memory or in a temp file, the PostgreSQL
//! server `scripts/test` starts), the test schema, and a logger that captures what the crate
//! logs; in submodules, a private PostgreSQL server per test ([`pg_server`]), polling against a
//! deadline ([`wait`]), child processes of a test binary ([`child`]) and the process-wide
//! hook-failure handler and panic hook the tests of one binary share ([`process`]).
//!
//! Used by `tests/it` (the ordinary tests, one binary) and the binaries that need a process of
//! their own, each with `mod common;` (or `#[path = "../common/mod.rs"] mod common;`).
#![allow(dead_code, unused_imports)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use diesel::prelude::*;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use diesel_transaction_signals::SignalConnection;

pub mod child;
pub mod pg_server;
pub mod process;
pub mod wait;

pub use process::{failures, failures_of, quiet_panics};
pub use wait::{try_wait_for, wait_for, wait_until};

#[cfg(feature = "sqlite")]
pub const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
#[cfg(feature = "postgres")]
pub const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
#[cfg(feature = "mysql")]
pub const MYSQL_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/mysql");

diesel::table! {
    items (id) {
        id -> Integer,
        tag -> Text,
        v -> Integer,
    }
}

diesel::table! {
    deferred_items (id) {
        id -> Integer,
        tag -> Text,
        v -> Integer,
    }
}

diesel::table! {
    parents (id) {
        id -> Integer,
    }
}

diesel::table! {
    children (id) {
        id -> Integer,
        parent_id -> Integer,
    }
}

/// A tag unique to this call in this process, to scope rows on the shared PostgreSQL database.
pub fn unique_tag(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(feature = "postgres")]
/// The PostgreSQL server's URL. A missing server fails the test: a suite that silently skips a
/// backend is a failing suite.
pub fn pg_url() -> String {
    std::env::var("DTS_PG_URL").expect(
        "DTS_PG_URL is not set: run the suite with scripts/test, which starts a throwaway \
         PostgreSQL 15 and sets it",
    )
}

#[cfg(feature = "sqlite")]
/// A migrated in-memory SQLite database with foreign keys enforced.
pub fn sqlite() -> SignalConnection<SqliteConnection> {
    let mut conn = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
    prepare_sqlite(&mut conn);
    conn
}

#[cfg(feature = "sqlite")]
pub fn prepare_sqlite(conn: &mut SignalConnection<SqliteConnection>) {
    diesel::sql_query("PRAGMA foreign_keys = ON")
        .execute(conn)
        .unwrap();
    conn.run_pending_migrations(SQLITE_MIGRATIONS).unwrap();
}

#[cfg(feature = "sqlite")]
/// A migrated SQLite database in a temp file, for tests that need two connections.
pub struct SqliteFile {
    pub dir: tempfile::TempDir,
    pub url: String,
}

#[cfg(feature = "sqlite")]
impl SqliteFile {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("test.db").to_str().unwrap().to_owned();
        let file = SqliteFile { dir, url };
        let mut conn = file.connect();
        conn.run_pending_migrations(SQLITE_MIGRATIONS).unwrap();
        #[cfg(feature = "outbox")]
        conn.run_pending_migrations(diesel_transaction_signals::outbox::migrations::SQLITE)
            .unwrap();
        file
    }

    pub fn connect(&self) -> SignalConnection<SqliteConnection> {
        let mut conn = SignalConnection::<SqliteConnection>::establish(&self.url).unwrap();
        diesel::sql_query("PRAGMA foreign_keys = ON")
            .execute(&mut conn)
            .unwrap();
        diesel::sql_query("PRAGMA busy_timeout = 10000")
            .execute(&mut conn)
            .unwrap();
        conn
    }
}

#[cfg(feature = "postgres")]
/// A connection to the test PostgreSQL database, migrated once per process.
pub fn pg() -> SignalConnection<PgConnection> {
    static MIGRATED: OnceLock<()> = OnceLock::new();
    let mut conn = SignalConnection::<PgConnection>::establish(&pg_url()).unwrap();
    MIGRATED.get_or_init(|| {
        // Test binaries may run concurrently (nextest): serialise the migrations.
        diesel::sql_query("SELECT pg_advisory_lock(4242)")
            .execute(&mut conn)
            .unwrap();
        conn.run_pending_migrations(PG_MIGRATIONS).unwrap();
        #[cfg(feature = "outbox")]
        conn.run_pending_migrations(diesel_transaction_signals::outbox::migrations::POSTGRES)
            .unwrap();
        diesel::sql_query("SELECT pg_advisory_unlock(4242)")
            .execute(&mut conn)
            .unwrap();
    });
    conn
}

#[cfg(feature = "mysql")]
/// The MariaDB/MySQL server's URL; missing fails the test, as for PostgreSQL.
pub fn mysql_url() -> String {
    std::env::var("DTS_MYSQL_URL").expect(
        "DTS_MYSQL_URL is not set: run the suite with scripts/test, which starts a throwaway \
         MariaDB and sets it",
    )
}

#[cfg(feature = "mysql")]
/// A connection to the test MariaDB database, migrated once per process.
pub fn mysql() -> SignalConnection<MysqlConnection> {
    static MIGRATED: OnceLock<()> = OnceLock::new();
    let mut conn = SignalConnection::<MysqlConnection>::establish(&mysql_url()).unwrap();
    MIGRATED.get_or_init(|| {
        // Test binaries may run concurrently: serialise the migrations.
        diesel::sql_query("SELECT GET_LOCK('dts_migrations', 60)")
            .execute(&mut conn)
            .unwrap();
        conn.run_pending_migrations(MYSQL_MIGRATIONS).unwrap();
        #[cfg(feature = "outbox")]
        conn.run_pending_migrations(diesel_transaction_signals::outbox::migrations::MYSQL)
            .unwrap();
        diesel::sql_query("SELECT RELEASE_LOCK('dts_migrations')")
            .execute(&mut conn)
            .unwrap();
    });
    conn
}

#[cfg(feature = "mysql")]
/// A plain (unwrapped) MariaDB connection, for observing from outside.
pub fn mysql_plain() -> MysqlConnection {
    let _ = mysql();
    MysqlConnection::establish(&mysql_url()).unwrap()
}

#[cfg(feature = "mysql")]
/// Inserts an `items` row with `tag` and `v` through `conn`.
pub fn mysql_insert(
    conn: &mut SignalConnection<MysqlConnection>,
    tag: &str,
    v: i32,
) -> QueryResult<usize> {
    diesel::insert_into(items::table)
        .values((items::tag.eq(tag), items::v.eq(v)))
        .execute(conn)
}

#[cfg(feature = "mysql")]
/// The `v` of the `items` rows with `tag` in the database, in order, read on a fresh connection.
pub fn mysql_rows(tag: &str) -> Vec<i32> {
    items::table
        .filter(items::tag.eq(tag))
        .select(items::v)
        .order(items::v)
        .load(&mut mysql_plain())
        .unwrap()
}

#[cfg(feature = "postgres")]
/// A plain (unwrapped) PostgreSQL connection, for observing from outside.
pub fn pg_plain() -> PgConnection {
    let _ = pg();
    PgConnection::establish(&pg_url()).unwrap()
}

/// A recorder for hooks: each hook pushes a label; tests compare the sequence.
#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<String>>>);

impl Recorder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A closure that records `label` when called.
    pub fn hook(&self, label: impl Into<String>) -> impl FnOnce() + Send + 'static {
        let this = self.clone();
        let label = label.into();
        move || this.0.lock().unwrap().push(label)
    }

    /// An `on_complete` closure that records `label:Outcome`.
    pub fn outcome(
        &self,
        label: &'static str,
    ) -> impl FnOnce(diesel_transaction_signals::Outcome) + Send + 'static {
        let this = self.clone();
        move |o| this.push(format!("{label}:{o:?}"))
    }

    pub fn push(&self, label: impl Into<String>) {
        self.0.lock().unwrap().push(label.into());
    }

    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    pub fn get(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// Captures every record the crate logs, so tests can assert that nothing is dropped silently.
pub struct CaptureLogger {
    records: Mutex<Vec<(log::Level, String)>>,
}

impl log::Log for CaptureLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        if record.target().starts_with("diesel_transaction_signals") {
            self.records
                .lock()
                .unwrap()
                .push((record.level(), record.args().to_string()));
        }
    }
    fn flush(&self) {}
}

pub fn logger() -> &'static CaptureLogger {
    static LOGGER: OnceLock<&'static CaptureLogger> = OnceLock::new();
    LOGGER.get_or_init(|| {
        let logger: &'static CaptureLogger = Box::leak(Box::new(CaptureLogger {
            records: Mutex::new(Vec::new()),
        }));
        log::set_logger(logger).expect("no other logger in tests");
        log::set_max_level(log::LevelFilter::Trace);
        logger
    })
}

impl CaptureLogger {
    /// Records at `level` whose text contains every one of `needles`.
    pub fn matching(&self, level: log::Level, needles: &[&str]) -> Vec<String> {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter(|(l, m)| *l == level && needles.iter().all(|n| m.contains(n)))
            .map(|(_, m)| m.clone())
            .collect()
    }
}
