//! The drop-in claim: `SignalConnection<C>` behaves exactly like `C`.
//!
//! One suite, written once, runs every scenario against `C` and against
//! `SignalConnection<C>`, for `C = SqliteConnection` and `C = PgConnection`. Each scenario is a
//! generic function over the connection type that records what it observes as a transcript
//! (`Vec<String>`); every test asserts that both transcripts are identical **and** that the
//! transcript says what the scenario should observe (rows inserted, errors returned, events
//! emitted), so two equally broken runs cannot pass.
//!
//! The suite body is instantiated once per backend by `shared_suite!` (the functions are
//! generic over `C` and only fix the backend); backend-only scenarios are generic functions over
//! a small extension trait (`PgExtras`, `SqliteExtras`) whose impls for `C` and
//! `SignalConnection<C>` are also written once, by a macro, for the inherent methods the two
//! types share by name (`build_transaction`, `immediate_transaction`, ...).
//!
//! Isolation: every run gets a fresh database. SQLite: a file in a temporary directory.
//! PostgreSQL: a fresh schema per run (`search_path` set in the connection URL, so pools and
//! second connections land in it too), dropped afterwards.
#![cfg(all(feature = "sqlite", feature = "postgres", feature = "r2d2"))]

use crate::common;

use std::fmt::Debug;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use diesel::backend::Backend;
use diesel::connection::{
    CacheSize, DefaultLoadingMode, Instrumentation, InstrumentationEvent, LoadConnection,
    SimpleConnection, TransactionManager, WithMetadataLookup,
};
use diesel::pg::{
    GetPgMetadataCache, Pg, PgConnection, PgMetadataCacheKey, PgMetadataLookup,
    PgRowByRowLoadingMode, PgValue,
};
use diesel::prelude::*;
use diesel::query_dsl::UpdateAndFetchResults;
use diesel::r2d2::{ConnectionManager, Pool, R2D2Connection, TestCustomizer};
use diesel::result::Error;
use diesel::sqlite::{Sqlite, SqliteConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness};
use diesel_transaction_signals::SignalConnection;

use common::items;

type Transcript = Vec<String>;

// ---------------------------------------------------------------------------------------------
// Models

#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Identifiable, AsChangeset)]
#[diesel(table_name = items)]
struct Item {
    id: i32,
    tag: String,
    v: i32,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = items)]
struct NewItem {
    tag: String,
    v: i32,
}

/// `COPY FROM` needs an insertable without `DEFAULT` handling.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = items, treat_none_as_default_value = false)]
struct CopyItem {
    tag: String,
    v: i32,
}

impl CopyItem {
    fn new(tag: &str, v: i32) -> Self {
        CopyItem {
            tag: tag.to_owned(),
            v,
        }
    }
}

impl NewItem {
    fn new(tag: &str, v: i32) -> Self {
        NewItem {
            tag: tag.to_owned(),
            v,
        }
    }
}

#[derive(Debug, QueryableByName)]
#[diesel(table_name = items)]
#[allow(dead_code)] // read through `Debug`, in transcripts
struct ItemByName {
    id: i32,
    tag: String,
    v: i32,
}

#[derive(Debug, QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

// ---------------------------------------------------------------------------------------------
// Connection capabilities the generic scenarios rely on: only Diesel traits.

/// A connection that runs DSL queries on backend `DB`.
trait Db<DB: Backend>: Connection<Backend = DB> + LoadConnection {}
impl<DB: Backend, C: Connection<Backend = DB> + LoadConnection> Db<DB> for C {}

/// Everything a test connection type offers: queries, migrations, r2d2.
trait TestConn<DB: Backend>: Db<DB> + MigrationHarness<DB> + R2D2Connection + Send + 'static {}
impl<DB, C> TestConn<DB> for C
where
    DB: Backend,
    C: Db<DB> + MigrationHarness<DB> + R2D2Connection + Send + 'static,
{
}

// ---------------------------------------------------------------------------------------------
// Fresh databases

/// A fresh, empty database for one run of one scenario.
struct Env {
    url: String,
    pg_schema: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Env {
    /// A SQLite database in a file of its own (so second connections see it).
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("dropin.db").to_str().unwrap().to_owned();
        Env {
            url,
            pg_schema: None,
            _dir: Some(dir),
        }
    }

    /// A fresh PostgreSQL schema; every connection made from `url` has it as its only
    /// `search_path` entry.
    fn pg(name: &str) -> Self {
        let schema = common::unique_tag(&format!("dropin_{name}"))
            .replace('-', "_")
            .to_lowercase();
        let base = common::pg_url();
        let mut admin = PgConnection::establish(&base).expect("PostgreSQL (DTS_PG_URL) reachable");
        admin
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
        Env {
            url,
            pg_schema: Some(schema),
            _dir: None,
        }
    }

    fn connect<C: Connection>(&self) -> C {
        C::establish(&self.url).unwrap_or_else(|e| panic!("connect to {}: {e}", self.url))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(schema) = &self.pg_schema {
            if let Ok(mut admin) = PgConnection::establish(&common::pg_url()) {
                let dropped =
                    admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
                if !std::thread::panicking() {
                    dropped.unwrap();
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transcript helpers

/// A result as a transcript entry. Database errors show their kind and message.
fn res<T: Debug, E: Debug>(r: Result<T, E>) -> String {
    match r {
        Ok(v) => format!("Ok({v:?})"),
        Err(e) => {
            let text = format!("{e:?}");
            // `DatabaseError(Kind, "message")` -> `Err(Kind: "message")`
            match text
                .strip_prefix("DatabaseError(")
                .and_then(|rest| rest.strip_suffix(')'))
            {
                Some(rest) => format!("Err({})", rest.replacen(", ", ": ", 1)),
                None => format!("Err({text})"),
            }
        }
    }
}

/// Like [`res`], for a closure that reports in a `String` of its own (shown unquoted).
fn said<E: Debug>(r: Result<String, E>) -> String {
    struct Raw(String);
    impl Debug for Raw {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    res(r.map(Raw))
}

/// The transaction depth Diesel's own transaction manager status reports.
fn depth<C: Connection>(conn: &mut C) -> String {
    match C::TransactionManager::transaction_manager_status_mut(conn).transaction_depth() {
        Ok(d) => format!("depth={}", d.map_or(0, NonZeroU32::get)),
        Err(e) => format!("depth error {e:?}"),
    }
}

/// Asserts `C` and `SignalConnection<C>` observed the same thing, and that what they observed
/// is what the scenario expects: line by line, each line starts with the expected text.
fn check(scenario: &str, plain: Transcript, signal: Transcript, expected: &[&str]) {
    assert_eq!(
        plain, signal,
        "{scenario}: the plain connection (left) and SignalConnection (right) differ"
    );
    assert_eq!(
        plain.len(),
        expected.len(),
        "{scenario}: unexpected transcript length: {plain:#?}"
    );
    for (line, want) in plain.iter().zip(expected) {
        assert!(
            line.starts_with(want),
            "{scenario}: expected a line starting with\n  {want:?}\ngot\n  {line:?}\n\
             full transcript: {plain:#?}"
        );
    }
}

/// Records instrumentation events as strings.
#[derive(Clone, Default)]
struct EventLog(Arc<Mutex<Vec<String>>>);

impl EventLog {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl Instrumentation for EventLog {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        let line = match event {
            InstrumentationEvent::StartEstablishConnection { .. } => "StartEstablish".to_owned(),
            InstrumentationEvent::FinishEstablishConnection { .. } => "FinishEstablish".to_owned(),
            InstrumentationEvent::StartQuery { query, .. } => format!("StartQuery {query}"),
            InstrumentationEvent::CacheQuery { sql, .. } => format!("CacheQuery {sql}"),
            InstrumentationEvent::FinishQuery { query, error, .. } => {
                format!("FinishQuery {query} error={}", error.is_some())
            }
            InstrumentationEvent::BeginTransaction { depth, .. } => {
                format!("BeginTransaction depth={depth}")
            }
            InstrumentationEvent::CommitTransaction { depth, .. } => {
                format!("CommitTransaction depth={depth}")
            }
            InstrumentationEvent::RollbackTransaction { depth, .. } => {
                format!("RollbackTransaction depth={depth}")
            }
            _ => "Other".to_owned(),
        };
        self.0.lock().unwrap().push(line);
    }
}

// ---------------------------------------------------------------------------------------------
// The shared suite, written once and instantiated per backend. Every function is generic over
// the connection type `C`; the tests call each with `C` and with `SignalConnection<C>`.
//
// The invoking module defines `B` (the backend), `migrations()`, `Plain`, `Signal` and `env()`.

macro_rules! shared_suite {
    () => {
        /// A connection to `env`'s database with the test schema migrated, through `C`.
        pub fn migrated<C: TestConn<B>>(env: &Env) -> C {
            let mut conn: C = env.connect();
            conn.run_pending_migrations(migrations())
                .expect("migrations");
            conn
        }

        pub fn insert<C: Db<B>>(conn: &mut C, tag: &str, v: i32) -> QueryResult<usize> {
            diesel::insert_into(items::table)
                .values((items::tag.eq(tag), items::v.eq(v)))
                .execute(conn)
        }

        /// The rows of `items`, as `tag=v`, in insertion order.
        pub fn tags<C: Db<B>>(conn: &mut C) -> String {
            match items::table
                .order(items::id)
                .select((items::tag, items::v))
                .load::<(String, i32)>(conn)
            {
                Ok(rows) => {
                    let rows: Vec<String> = rows.iter().map(|(t, v)| format!("{t}={v}")).collect();
                    format!("[{}]", rows.join(","))
                }
                Err(e) => format!("Err({e})"),
            }
        }

        /// Scenario 1: `LoadConnection` and execution: inserts, DSL loads, `sql_query`,
        /// `load_iter`.
        pub fn queries<C: TestConn<B>>(env: &Env) -> Transcript {
            let conn = &mut migrated::<C>(env);
            let mut t = Transcript::new();
            let batch = vec![
                NewItem::new("a", 1),
                NewItem::new("b", 2),
                NewItem::new("c", 3),
            ];
            let n = diesel::insert_into(items::table)
                .values(&batch)
                .execute(conn);
            t.push(format!("insert batch: {}", res(n)));
            let n = diesel::insert_into(items::table)
                .values(&NewItem::new("d", 4))
                .execute(conn);
            t.push(format!("insert one: {}", res(n)));
            t.push(format!("insert duplicate: {}", res(insert(conn, "a", 1))));
            let all = items::table.order(items::id).load::<Item>(conn);
            t.push(format!("load: {}", res(all)));
            let b = items::table
                .filter(items::tag.eq("b"))
                .select(Item::as_select())
                .get_result(conn);
            t.push(format!("get_result: {}", res(b)));
            let top = items::table.order(items::v.desc()).first::<Item>(conn);
            t.push(format!("first: {}", res(top)));
            let missing = items::table
                .filter(items::tag.eq("zzz"))
                .first::<Item>(conn);
            t.push(format!("first missing: {}", res(missing)));
            let count = items::table.count().get_result::<i64>(conn);
            t.push(format!("count: {}", res(count)));
            let updated = diesel::update(items::table.filter(items::tag.eq("a")))
                .set(items::v.eq(10))
                .execute(conn);
            t.push(format!("update: {}", res(updated)));
            let deleted = diesel::delete(items::table.filter(items::tag.eq("d"))).execute(conn);
            t.push(format!("delete: {}", res(deleted)));
            let by_name = diesel::sql_query("SELECT id, tag, v FROM items WHERE v >= 2 ORDER BY v")
                .load::<ItemByName>(conn);
            t.push(format!("sql_query: {}", res(by_name)));
            let bad = diesel::sql_query("SELECT id FROM no_such_table").execute(conn);
            t.push(format!("sql_query error: {}", res(bad)));
            let iter = items::table
                .order(items::id)
                .load_iter::<Item, DefaultLoadingMode>(conn)
                .and_then(|rows| rows.collect::<QueryResult<Vec<_>>>());
            t.push(format!("load_iter: {}", res(iter)));
            t
        }

        /// Scenario 2: `SimpleConnection::batch_execute`.
        pub fn batch_execute<C: TestConn<B>>(env: &Env) -> Transcript {
            fn extra<C: Db<B>>(conn: &mut C) -> String {
                res(diesel::sql_query("SELECT COUNT(*) AS n FROM extra")
                    .get_result::<Count>(conn)
                    .map(|c| c.n))
            }
            let conn = &mut migrated::<C>(env);
            let mut t = Transcript::new();
            let created = conn.batch_execute(
                "CREATE TABLE extra (x INTEGER NOT NULL); \
                 INSERT INTO extra (x) VALUES (1); INSERT INTO extra (x) VALUES (2);",
            );
            t.push(format!("create+insert: {}", res(created)));
            t.push(format!("rows: {}", extra(conn)));
            let null = conn.batch_execute("INSERT INTO extra (x) VALUES (NULL)");
            t.push(format!("not null: {}", res(null)));
            let syntax = conn.batch_execute("SELEC 1");
            t.push(format!("syntax: {}", res(syntax)));
            let rolled_back: QueryResult<()> = conn.transaction(|c| {
                c.batch_execute(
                    "INSERT INTO extra (x) VALUES (3); INSERT INTO extra (x) VALUES (4);",
                )?;
                Err(Error::RollbackTransaction)
            });
            t.push(format!("in rolled back transaction: {}", res(rolled_back)));
            t.push(format!("rows: {}", extra(conn)));
            let committed =
                conn.transaction(|c| c.batch_execute("INSERT INTO extra (x) VALUES (5)"));
            t.push(format!("in committed transaction: {}", res(committed)));
            t.push(format!("rows: {}", extra(conn)));
            t.push(depth(conn));
            t
        }

        /// Scenario 3: Migrations through `MigrationHarness` on an empty database.
        pub fn migrations_harness<C: TestConn<B>>(env: &Env) -> Transcript {
            fn versions<V: std::fmt::Display>(v: Vec<V>) -> Vec<String> {
                v.iter().map(ToString::to_string).collect()
            }
            let conn = &mut env.connect::<C>();
            let mut t = Transcript::new();
            let pending = conn.has_pending_migration(migrations());
            t.push(format!("pending: {}", res(pending)));
            let applied = conn.run_pending_migrations(migrations()).map(versions);
            t.push(format!("run: {}", res(applied)));
            let listed = conn.applied_migrations().map(versions);
            t.push(format!("applied: {}", res(listed)));
            let pending = conn.has_pending_migration(migrations());
            t.push(format!("pending: {}", res(pending)));
            t.push(format!("insert: {}", res(insert(conn, "migrated", 1))));
            t.push(format!("rows: {}", tags(conn)));
            let again = conn.run_pending_migrations(migrations()).map(versions);
            t.push(format!("run again: {}", res(again)));
            let reverted = conn
                .revert_last_migration(migrations())
                .map(|v| v.to_string());
            t.push(format!("revert: {}", res(reverted)));
            let listed = conn.applied_migrations().map(versions);
            t.push(format!("applied: {}", res(listed)));
            let gone = items::table.count().get_result::<i64>(conn);
            t.push(format!(
                "items after revert: {}",
                res(gone.map_err(|_| "no table"))
            ));
            let applied = conn.run_pending_migrations(migrations()).map(versions);
            t.push(format!("run: {}", res(applied)));
            t.push(format!("rows: {}", tags(conn)));
            t.push(depth(conn));
            t
        }

        /// Scenario 4: `save_changes` through `UpdateAndFetchResults`.
        pub fn save_changes<C>(env: &Env) -> Transcript
        where
            C: TestConn<B> + for<'a> UpdateAndFetchResults<&'a Item, Item>,
        {
            let conn = &mut migrated::<C>(env);
            let mut t = Transcript::new();
            insert(conn, "a", 1).unwrap();
            insert(conn, "b", 2).unwrap();
            let mut a: Item = items::table
                .filter(items::tag.eq("a"))
                .select(Item::as_select())
                .first(conn)
                .unwrap();
            a.tag = "a2".into();
            a.v = 42;
            let saved: QueryResult<Item> = (&a).save_changes(conn);
            t.push(format!("saved: {}", res(saved)));
            t.push(format!("rows: {}", tags(conn)));
            let in_tx: QueryResult<Item> = conn.transaction(|c| {
                let mut b: Item = items::table.filter(items::tag.eq("b")).first(c)?;
                b.v = 7;
                let saved: Item = (&b).save_changes(c)?;
                assert_eq!(saved.v, 7);
                Err(Error::RollbackTransaction)
            });
            t.push(format!("saved in rolled back transaction: {}", res(in_tx)));
            t.push(format!("rows: {}", tags(conn)));
            let ghost = Item {
                id: 999,
                tag: "ghost".into(),
                v: 0,
            };
            let missing: QueryResult<Item> = (&ghost).save_changes(conn);
            t.push(format!("saved missing row: {}", res(missing)));
            t
        }

        /// Scenario 5: Transactions: commit, rollback, savepoints, `test_transaction`,
        /// `begin_test_transaction`.
        pub fn transactions<C: TestConn<B>>(env: &Env) -> Transcript {
            let mut t = Transcript::new();
            {
                let conn = &mut migrated::<C>(env);
                t.push(depth(conn));
                let r = conn.transaction(|c| {
                    insert(c, "commit", 1)?;
                    Ok::<_, Error>(depth(c))
                });
                t.push(format!("commit: {}", res(r)));
                let r: QueryResult<()> = conn.transaction(|c| {
                    insert(c, "rollback", 1)?;
                    Err(Error::RollbackTransaction)
                });
                t.push(format!("rollback: {}", res(r)));
                t.push(format!("rows: {}", tags(conn)));

                let r = conn.transaction(|c| {
                    insert(c, "outer", 1)?;
                    let mut seen = String::new();
                    let rolled_back: QueryResult<()> = c.transaction(|c| {
                        insert(c, "savepoint-rolled-back", 1)?;
                        seen = depth(c);
                        Err(Error::RollbackTransaction)
                    });
                    let duplicate = c.transaction(|c| insert(c, "outer", 1));
                    let released = c.transaction(|c| {
                        insert(c, "savepoint-released", 1)?;
                        c.transaction(|c| {
                            insert(c, "savepoint-nested", 1)?;
                            Ok::<_, Error>(depth(c))
                        })
                    });
                    Ok::<_, Error>(format!(
                        "inner {seen} {}; released {}; back at {}; duplicate {}",
                        res(rolled_back),
                        res(released),
                        depth(c),
                        res(duplicate),
                    ))
                });
                t.push(format!("nested: {}", said(r)));
                t.push(format!("rows: {}", tags(conn)));

                let r = conn.transaction(|c| {
                    insert(c, "doomed", 1)?;
                    insert(c, "doomed", 1)?;
                    Ok::<_, Error>(())
                });
                t.push(format!("error from the closure: {}", res(r)));
                t.push(format!("rows: {}", tags(conn)));

                let inside = conn.test_transaction(|c| {
                    insert(c, "test-transaction", 1)?;
                    Ok::<_, Error>(format!("{} {}", depth(c), tags(c)))
                });
                t.push(format!("test_transaction inside: {inside}"));
                t.push(format!("rows: {}", tags(conn)));
                t.push(depth(conn));
            }
            {
                let mut conn: C = env.connect();
                let begun = conn.begin_test_transaction();
                t.push(format!(
                    "begin_test_transaction: {} {}",
                    res(begun),
                    depth(&mut conn)
                ));
                insert(&mut conn, "test", 1).unwrap();
                let nested = conn.transaction(|c| {
                    insert(c, "test-savepoint", 1)?;
                    Ok::<_, Error>(depth(c))
                });
                t.push(format!("savepoint in test transaction: {}", res(nested)));
                t.push(format!("inside: {} {}", tags(&mut conn), depth(&mut conn)));
                // Dropped here: the test transaction is never committed.
            }
            let mut observer: C = env.connect();
            t.push(format!(
                "after drop, second connection: {}",
                tags(&mut observer)
            ));
            t
        }

        /// Scenario 6: Instrumentation and the prepared statement cache.
        pub fn instrumentation<C: TestConn<B>>(env: &Env) -> Transcript {
            let conn = &mut migrated::<C>(env);
            let log = EventLog::default();
            conn.set_instrumentation(log.clone());
            let mut t = Transcript::new();
            let r = conn.transaction(|c| insert(c, "instrumented", 1));
            t.push(format!("-- commit: {}", res(r)));
            t.extend(log.take());
            let r: QueryResult<()> = conn.transaction(|c| {
                c.transaction(|_| Ok::<_, Error>(()))?;
                Err(Error::RollbackTransaction)
            });
            t.push(format!("-- savepoint, rollback: {}", res(r)));
            t.extend(log.take());
            // `instrumentation()` reaches the instrumentation that was set.
            conn.instrumentation()
                .on_connection_event(InstrumentationEvent::begin_transaction(
                    NonZeroU32::new(9).unwrap(),
                ));
            t.push("-- instrumentation()".to_owned());
            t.extend(log.take());
            let twice: Vec<_> = (0..2)
                .map(|_| res(items::table.count().get_result::<i64>(conn)))
                .collect();
            t.push(format!("-- same query twice, cache on: {twice:?}"));
            t.extend(log.take());
            conn.set_prepared_statement_cache_size(CacheSize::Disabled);
            let twice: Vec<_> = (0..2)
                .map(|_| {
                    res(items::table
                        .filter(items::v.gt(0))
                        .select(items::tag)
                        .load::<String>(conn))
                })
                .collect();
            t.push(format!("-- new query twice, cache disabled: {twice:?}"));
            t.extend(log.take());
            // A closure replaces the struct.
            let starts = Arc::new(Mutex::new(0));
            let counter = starts.clone();
            conn.set_instrumentation(move |event: InstrumentationEvent<'_>| {
                if matches!(event, InstrumentationEvent::StartQuery { .. }) {
                    *counter.lock().unwrap() += 1;
                }
            });
            let r = conn.transaction(|c| insert(c, "closure", 1));
            t.push(format!(
                "-- closure: {}, {} queries started, {} events to the replaced instrumentation",
                res(r),
                starts.lock().unwrap(),
                log.take().len()
            ));
            t
        }

        /// Scenario 7: r2d2: a pool of `C`, transactions through pooled connections, a
        /// connection returned inside a transaction, `TestCustomizer`.
        pub fn r2d2_pool<C: TestConn<B>>(env: &Env) -> Transcript {
            let mut t = Transcript::new();
            drop(migrated::<C>(env));
            let pool = Pool::builder()
                .max_size(2)
                .build(ConnectionManager::<C>::new(&env.url))
                .expect("pool");
            let state = pool.state();
            t.push(format!(
                "built: {} connections, {} idle",
                state.connections, state.idle_connections
            ));
            {
                let mut pooled = pool.get().expect("checkout");
                t.push(format!(
                    "checked out: {} idle",
                    pool.state().idle_connections
                ));
                // `PooledConnection` is a `Connection` whose manager drives `C`'s.
                let r = pooled.transaction(|c| {
                    insert(c, "pooled", 1)?;
                    Ok::<_, Error>(depth(c))
                });
                t.push(format!("transaction on the pooled connection: {}", res(r)));
                let r: QueryResult<()> = pooled.transaction(|c| {
                    insert(c, "pooled-rolled-back", 1)?;
                    Err(Error::RollbackTransaction)
                });
                t.push(format!("rollback on the pooled connection: {}", res(r)));
                // ... and `C` itself, through `DerefMut`.
                let inner: &mut C = &mut pooled;
                let r = inner.transaction(|c| insert(c, "deref", 1));
                t.push(format!("transaction on &mut C: {}", res(r)));
                t.push(format!("rows: {}", tags(&mut pooled)));
            }
            {
                let mut leaked = pool.get().expect("checkout");
                C::TransactionManager::begin_transaction(&mut *leaked).unwrap();
                insert(&mut *leaked, "leaked", 1).unwrap();
                t.push(format!("leaking: {}", depth(&mut *leaked)));
                // Returned inside a transaction: the pool sees it broken and closes it.
            }
            {
                let mut pooled = pool.get().expect("checkout");
                t.push(format!(
                    "next checkout: {} {}",
                    depth(&mut pooled),
                    tags(&mut pooled)
                ));
            }
            drop(pool);

            let pool = Pool::builder()
                .max_size(2)
                .connection_customizer(Box::new(TestCustomizer))
                .build(ConnectionManager::<C>::new(&env.url))
                .expect("pool");
            {
                let mut pooled = pool.get().expect("checkout");
                t.push(format!("test pool checkout: {}", depth(&mut pooled)));
                insert(&mut pooled, "test-pool", 1).unwrap();
                let r = pooled.transaction(|c| {
                    insert(c, "test-pool-savepoint", 1)?;
                    Ok::<_, Error>(depth(c))
                });
                t.push(format!("savepoint in the test pool: {}", res(r)));
                t.push(format!("inside: {}", tags(&mut pooled)));
                let mut outside: C = env.connect();
                t.push(format!("outside meanwhile: {}", tags(&mut outside)));
            }
            drop(pool);
            let mut outside: C = env.connect();
            t.push(format!("outside after the pool: {}", tags(&mut outside)));
            t
        }
    };
}

// ---------------------------------------------------------------------------------------------
// SQLite

/// What the SQLite scenarios need beyond Diesel's traits: the inherent methods
/// `SqliteConnection` and `SignalConnection<SqliteConnection>` share by name, and the raw
/// `SqliteConnection` for registering functions.
trait SqliteExtras: TestConn<Sqlite> {
    fn immediate<T>(&mut self, f: impl FnOnce(&mut Self) -> QueryResult<T>) -> QueryResult<T>;
    fn exclusive<T>(&mut self, f: impl FnOnce(&mut Self) -> QueryResult<T>) -> QueryResult<T>;
    /// The `SqliteConnection` that SQL functions and collations are registered on. Their
    /// registration is `SqliteConnection`-only API: the wrapper reaches it through
    /// `inner_mut()`, and the registered function then serves every query the wrapper runs.
    fn raw(&mut self) -> &mut SqliteConnection;
}

macro_rules! sqlite_extras {
    ($($conn:ty => |$this:ident| $raw:expr;)*) => {$(
        impl SqliteExtras for $conn {
            fn immediate<T>(
                &mut self,
                f: impl FnOnce(&mut Self) -> QueryResult<T>,
            ) -> QueryResult<T> {
                self.immediate_transaction(f)
            }
            fn exclusive<T>(
                &mut self,
                f: impl FnOnce(&mut Self) -> QueryResult<T>,
            ) -> QueryResult<T> {
                self.exclusive_transaction(f)
            }
            fn raw(&mut self) -> &mut SqliteConnection {
                let $this = self;
                $raw
            }
        }
    )*};
}

sqlite_extras! {
    SqliteConnection => |conn| conn;
    SignalConnection<SqliteConnection> => |conn| conn.inner_mut();
}

diesel::define_sql_function! {
    /// Registered per connection; see `SqliteExtras::raw`.
    fn dropin_add(a: diesel::sql_types::Integer, b: diesel::sql_types::Integer)
        -> diesel::sql_types::Integer;
}

mod sqlite_suite {
    use super::*;

    pub type B = Sqlite;
    pub type Plain = SqliteConnection;
    pub type Signal = SignalConnection<SqliteConnection>;

    pub fn migrations() -> EmbeddedMigrations {
        common::SQLITE_MIGRATIONS
    }

    pub fn env(_scenario: &str) -> Env {
        Env::sqlite()
    }

    shared_suite!();

    /// Scenario 9a: `immediate_transaction` / `exclusive_transaction`, with their locks
    /// observed from a second connection (no busy timeout: a lock conflict fails at once).
    pub fn begin_modes<C: SqliteExtras>(env: &Env) -> Transcript {
        let conn = &mut migrated::<C>(env);
        let mut observer = SqliteConnection::establish(&env.url).unwrap();
        let mut t = Transcript::new();
        let r = conn.immediate(|c| {
            insert(c, "immediate", 1)?;
            let write = insert(&mut observer, "observer", 1);
            let read = tags(&mut observer);
            Ok(format!(
                "{}; observer write {}; observer read {read}",
                depth(c),
                res(write)
            ))
        });
        t.push(format!("immediate: {}", said(r)));
        let r = conn.exclusive(|c| {
            insert(c, "exclusive", 1)?;
            let read = items::table.count().get_result::<i64>(&mut observer);
            Ok(format!("{}; observer read {}", depth(c), res(read)))
        });
        t.push(format!("exclusive: {}", said(r)));
        let r: QueryResult<()> = conn.exclusive(|c| {
            insert(c, "exclusive-rolled-back", 1)?;
            Err(Error::RollbackTransaction)
        });
        t.push(format!("exclusive rollback: {}", res(r)));
        let r = conn.immediate(|c| {
            let nested = c.transaction(|c| {
                insert(c, "immediate-savepoint", 1)?;
                Ok::<_, Error>(depth(c))
            });
            let again = c.immediate(|_| Ok(()));
            Ok(format!(
                "savepoint {}; immediate inside {}",
                res(nested),
                res(again)
            ))
        });
        t.push(format!("immediate nested: {}", said(r)));
        t.push(format!("rows: {} {}", tags(conn), depth(conn)));
        t.push(format!(
            "observer write after: {}",
            res(insert(&mut observer, "observer", 2))
        ));
        t
    }

    /// Scenario 9b: a custom SQL function and collation registered on the raw connection and
    /// used through `C`, and `WithMetadataLookup`.
    pub fn sql_functions<C>(env: &Env) -> Transcript
    where
        C: SqliteExtras + WithMetadataLookup,
    {
        let conn = &mut migrated::<C>(env);
        let mut t = Transcript::new();
        let before = diesel::select(dropin_add(1, 2)).get_result::<i32>(conn);
        t.push(format!("unregistered: {}", res(before)));
        let registered = dropin_add_utils::register_impl(conn.raw(), |a: i32, b: i32| a + b);
        t.push(format!("register: {}", res(registered)));
        let collation = conn.raw().register_collation("DROPIN_NOCASE", |a, b| {
            a.to_lowercase().cmp(&b.to_lowercase())
        });
        t.push(format!("register collation: {}", res(collation)));
        let sum = diesel::select(dropin_add(2, 3)).get_result::<i32>(conn);
        t.push(format!("select: {}", res(sum)));
        for (tag, v) in [("x", 1), ("z", 2), ("y", 3)] {
            insert(conn, tag, v).unwrap();
        }
        let shifted = conn.transaction(|c| {
            items::table
                .order(items::id)
                .select(dropin_add(items::v, 100))
                .load::<i32>(c)
        });
        t.push(format!("in a transaction: {}", res(shifted)));
        let found = diesel::sql_query(
            "SELECT id, tag, v FROM items WHERE tag = 'Y' COLLATE DROPIN_NOCASE ORDER BY id",
        )
        .load::<ItemByName>(conn);
        t.push(format!("collation: {}", res(found)));
        let () = *conn.metadata_lookup();
        t.push("metadata_lookup: ()".to_owned());
        t
    }

    /// A COMMIT that fails: a deferred foreign key violated at COMMIT.
    pub fn commit_failure<C: SqliteExtras>(env: &Env) -> Transcript {
        use common::{children, parents};
        let conn = &mut migrated::<C>(env);
        diesel::sql_query("PRAGMA foreign_keys = ON")
            .execute(conn)
            .unwrap();
        let mut t = Transcript::new();
        let orphan = |c: &mut C| {
            diesel::insert_into(children::table)
                .values(children::parent_id.eq(7))
                .execute(c)
        };
        let r = conn.transaction(orphan);
        t.push(format!("transaction: {}", res(r)));
        t.push(depth(conn));
        let r = conn.immediate(orphan);
        t.push(format!("immediate: {}", res(r)));
        t.push(depth(conn));
        let r = conn.transaction(|c| {
            let n = orphan(c)?;
            diesel::insert_into(parents::table)
                .values(parents::id.eq(7))
                .execute(c)?;
            Ok::<_, Error>(n)
        });
        t.push(format!("with the parent: {}", res(r)));
        let rows = children::table
            .select(children::parent_id)
            .load::<i32>(conn);
        t.push(format!("children: {}", res(rows)));
        t
    }
}

// --- MultiConnection

/// A `#[derive(MultiConnection)]` over both: its bind collection goes through the variants'
/// `MultiConnectionHelper::to_any` / `from_any`, its transactions through their managers.
///
/// The variant names its type through an alias: the derive pastes variant types into
/// expression position, so `SignalConnection<SqliteConnection>` written inline does not parse
/// ("proc-macro derive produced unparsable tokens"; a limitation of Diesel's derive).
#[derive(diesel::MultiConnection)]
enum AnyConnection {
    Sqlite(SqliteConnection),
    SqliteSignal(SignalSqlite),
}

type SignalSqlite = SignalConnection<SqliteConnection>;

fn multi_connection_scenario(mut conn: AnyConnection) -> Transcript {
    let conn = &mut conn;
    let mut t = Transcript::new();
    let migrated = conn
        .run_pending_migrations(common::SQLITE_MIGRATIONS)
        .map(|v| v.len());
    t.push(format!("migrations: {}", res(migrated)));
    let r = conn.transaction(|c| {
        diesel::insert_into(items::table)
            .values(&NewItem::new("multi", 1))
            .execute(c)
    });
    t.push(format!("commit: {}", res(r)));
    let r: QueryResult<()> = conn.transaction(|c| {
        diesel::insert_into(items::table)
            .values(&NewItem::new("multi-rolled-back", 1))
            .execute(c)?;
        Err(Error::RollbackTransaction)
    });
    t.push(format!("rollback: {}", res(r)));
    let r = conn.transaction(|c| {
        c.transaction(|c| {
            diesel::insert_into(items::table)
                .values(&NewItem::new("multi-savepoint", 2))
                .execute(c)
        })
    });
    t.push(format!("savepoint: {}", res(r)));
    let rows = items::table
        .order(items::id)
        .select(Item::as_select())
        .load(conn);
    t.push(format!("load: {}", res(rows)));
    let by_name =
        diesel::sql_query("SELECT id, tag, v FROM items WHERE v = 2").load::<ItemByName>(conn);
    t.push(format!("sql_query: {}", res(by_name)));
    let found = items::table
        .filter(items::tag.eq("multi"))
        .select(items::v)
        .first::<i32>(conn);
    t.push(format!("first: {}", res(found)));
    t
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/// A custom enum type, created per run inside the run's schema.
#[derive(diesel::sql_types::SqlType, diesel::query_builder::QueryId)]
#[diesel(postgres_type(name = "dropin_mood"))]
pub struct MoodType;

#[derive(Debug, Clone, Copy, PartialEq, Eq, diesel::AsExpression, diesel::FromSqlRow)]
#[diesel(sql_type = MoodType)]
enum Mood {
    Happy,
    Sad,
}

impl diesel::serialize::ToSql<MoodType, Pg> for Mood {
    fn to_sql<'b>(
        &'b self,
        out: &mut diesel::serialize::Output<'b, '_, Pg>,
    ) -> diesel::serialize::Result {
        use std::io::Write;
        out.write_all(match self {
            Mood::Happy => b"happy",
            Mood::Sad => b"sad",
        })?;
        Ok(diesel::serialize::IsNull::No)
    }
}

impl diesel::deserialize::FromSql<MoodType, Pg> for Mood {
    fn from_sql(bytes: PgValue<'_>) -> diesel::deserialize::Result<Self> {
        match bytes.as_bytes() {
            b"happy" => Ok(Mood::Happy),
            b"sad" => Ok(Mood::Sad),
            other => Err(format!("unknown mood {:?}", String::from_utf8_lossy(other)).into()),
        }
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use super::MoodType;

    moods (id) {
        id -> Integer,
        mood -> MoodType,
    }
}

#[derive(Insertable)]
#[diesel(table_name = moods)]
struct NewMood {
    mood: Mood,
}

#[derive(Debug, QueryableByName)]
#[allow(dead_code)] // read through `Debug`, in transcripts
struct MoodByName {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    id: i32,
    #[diesel(sql_type = MoodType)]
    mood: Mood,
}

#[derive(QueryableByName)]
struct PgTypeOid {
    #[diesel(sql_type = diesel::sql_types::Oid)]
    oid: u32,
}

#[derive(QueryableByName)]
struct TransactionIsolation {
    #[diesel(sql_type = diesel::sql_types::Text)]
    transaction_isolation: String,
}

#[derive(QueryableByName)]
struct TransactionReadOnly {
    #[diesel(sql_type = diesel::sql_types::Text)]
    transaction_read_only: String,
}

#[derive(QueryableByName)]
struct TransactionDeferrable {
    #[diesel(sql_type = diesel::sql_types::Text)]
    transaction_deferrable: String,
}

/// `SHOW transaction_isolation`, `SHOW transaction_read_only`, `SHOW transaction_deferrable`.
fn show_transaction<C: Db<Pg>>(conn: &mut C) -> String {
    let isolation = diesel::sql_query("SHOW transaction_isolation")
        .get_result::<TransactionIsolation>(conn)
        .map(|r| r.transaction_isolation);
    let read_only = diesel::sql_query("SHOW transaction_read_only")
        .get_result::<TransactionReadOnly>(conn)
        .map(|r| r.transaction_read_only);
    let deferrable = diesel::sql_query("SHOW transaction_deferrable")
        .get_result::<TransactionDeferrable>(conn)
        .map(|r| r.transaction_deferrable);
    format!(
        "isolation={} read_only={} deferrable={}",
        res(isolation),
        res(read_only),
        res(deferrable)
    )
}

/// What the PostgreSQL scenarios need beyond the shared traits: the inherent
/// `build_transaction` both types have, and `COPY FROM` (`ExecuteCopyFromDsl<C>`, whose
/// query type cannot be named in a bound).
trait PgExtras: TestConn<Pg> + GetPgMetadataCache + LoadConnection<PgRowByRowLoadingMode> {
    fn copy_items(&mut self, rows: Vec<CopyItem>) -> QueryResult<usize>;
    fn serializable_read_only<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> QueryResult<T>,
    ) -> QueryResult<T>;
    fn repeatable_read_deferrable<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> QueryResult<T>,
    ) -> QueryResult<T>;
}

macro_rules! pg_extras {
    ($($conn:ty),*) => {$(
        impl PgExtras for $conn {
            fn copy_items(&mut self, rows: Vec<CopyItem>) -> QueryResult<usize> {
                diesel::copy_from(items::table)
                    .from_insertable(rows)
                    .execute(self)
            }
            fn serializable_read_only<T>(
                &mut self,
                f: impl FnOnce(&mut Self) -> QueryResult<T>,
            ) -> QueryResult<T> {
                self.build_transaction().serializable().read_only().run(f)
            }
            fn repeatable_read_deferrable<T>(
                &mut self,
                f: impl FnOnce(&mut Self) -> QueryResult<T>,
            ) -> QueryResult<T> {
                self.build_transaction()
                    .repeatable_read()
                    .read_write()
                    .deferrable()
                    .run(f)
            }
        }
    )*};
}

pg_extras!(PgConnection, SignalConnection<PgConnection>);

mod pg_suite {
    use super::*;

    pub type B = Pg;
    pub type Plain = PgConnection;
    pub type Signal = SignalConnection<PgConnection>;

    pub fn migrations() -> EmbeddedMigrations {
        common::PG_MIGRATIONS
    }

    pub fn env(scenario: &str) -> Env {
        Env::pg(scenario)
    }

    shared_suite!();

    /// Scenario 1 (PostgreSQL only): `RETURNING`, both loading modes through `load_iter`.
    pub fn loading_modes<C: PgExtras>(env: &Env) -> Transcript {
        let conn = &mut migrated::<C>(env);
        let mut t = Transcript::new();
        let batch = vec![
            NewItem::new("a", 1),
            NewItem::new("b", 2),
            NewItem::new("c", 3),
        ];
        let returned = diesel::insert_into(items::table)
            .values(&batch)
            .returning(Item::as_returning())
            .get_results(conn);
        t.push(format!("insert returning: {}", res(returned)));
        let default = items::table
            .order(items::id)
            .select(items::tag)
            .load_iter::<String, DefaultLoadingMode>(conn)
            .and_then(|rows| rows.collect::<QueryResult<Vec<_>>>());
        t.push(format!("default mode: {}", res(default)));
        let row_by_row = items::table
            .order(items::id)
            .load_iter::<Item, PgRowByRowLoadingMode>(conn)
            .and_then(|rows| rows.collect::<QueryResult<Vec<_>>>());
        t.push(format!("row by row: {}", res(row_by_row)));
        let in_tx = conn.transaction(|c| {
            insert(c, "d", 4)?;
            let rows = diesel::sql_query("SELECT id, tag, v FROM items WHERE v > $1 ORDER BY id")
                .bind::<diesel::sql_types::Integer, _>(2)
                .load_iter::<ItemByName, PgRowByRowLoadingMode>(c)?
                .map(|r| r.map(|r| r.tag))
                .collect::<QueryResult<Vec<_>>>()?;
            Ok::<_, Error>(rows)
        });
        t.push(format!(
            "row by row sql_query in a transaction: {}",
            res(in_tx)
        ));
        let error = diesel::sql_query("SELECT 1/0 AS n")
            .load_iter::<Count, PgRowByRowLoadingMode>(conn)
            .and_then(|rows| {
                rows.map(|r| r.map(|c| c.n))
                    .collect::<QueryResult<Vec<_>>>()
            });
        t.push(format!("row by row error: {}", res(error)));
        t.push(format!("afterwards: {} {}", tags(conn), depth(conn)));
        t
    }

    /// Scenario 8a: A custom enum type: `GetPgMetadataCache` / `PgMetadataLookup` on `C`.
    pub fn custom_type<C: PgExtras>(env: &Env) -> Transcript {
        let conn = &mut migrated::<C>(env);
        let mut t = Transcript::new();
        let created = conn.batch_execute(
            "CREATE TYPE dropin_mood AS ENUM ('happy', 'sad'); \
             CREATE TABLE moods (id SERIAL PRIMARY KEY, mood dropin_mood NOT NULL);",
        );
        t.push(format!("create type: {}", res(created)));
        let key = PgMetadataCacheKey::new(None, "dropin_mood".into());
        let cached = conn.get_metadata_cache().lookup_type(&key).is_some();
        t.push(format!("cached before use: {cached}"));
        let inserted = diesel::insert_into(moods::table)
            .values(&vec![
                NewMood { mood: Mood::Happy },
                NewMood { mood: Mood::Sad },
                NewMood { mood: Mood::Happy },
            ])
            .execute(conn);
        t.push(format!("insert: {}", res(inserted)));
        let cached = conn.get_metadata_cache().lookup_type(&key).is_some();
        t.push(format!("cached after use: {cached}"));
        let all = moods::table.order(moods::id).load::<(i32, Mood)>(conn);
        t.push(format!("load: {}", res(all)));
        let sad = moods::table
            .filter(moods::mood.eq(Mood::Sad))
            .select(moods::id)
            .load::<i32>(conn);
        t.push(format!("filter: {}", res(sad)));
        let by_name =
            diesel::sql_query("SELECT id, mood FROM moods WHERE mood = 'happy' ORDER BY id")
                .load::<MoodByName>(conn);
        t.push(format!("sql_query: {}", res(by_name)));
        let r: QueryResult<()> = conn.transaction(|c| {
            diesel::insert_into(moods::table)
                .values(NewMood { mood: Mood::Sad })
                .execute(c)?;
            Err(Error::RollbackTransaction)
        });
        t.push(format!("rolled back insert: {}", res(r)));
        let counted = moods::table.count().get_result::<i64>(conn);
        t.push(format!("count: {}", res(counted)));
        // `PgMetadataLookup` (implemented for `C` through `GetPgMetadataCache`) finds the type
        // the catalog has.
        let looked_up = PgMetadataLookup::lookup_type(conn, "dropin_mood", None)
            .oid()
            .map_err(|e| e.to_string());
        let catalog = diesel::sql_query(
            "SELECT oid FROM pg_type WHERE typname = 'dropin_mood' AND pg_type_is_visible(oid)",
        )
        .get_result::<PgTypeOid>(conn)
        .map(|r| r.oid)
        .map_err(|e| e.to_string());
        t.push(format!(
            "lookup_type matches pg_type: {}",
            looked_up.is_ok() && looked_up == catalog
        ));
        t
    }

    /// Scenario 8b: `COPY FROM` through `ExecuteCopyFromDsl<C>`.
    pub fn copy_from<C: PgExtras>(env: &Env) -> Transcript {
        let conn = &mut migrated::<C>(env);
        let mut t = Transcript::new();
        let copied = conn.copy_items(vec![
            CopyItem::new("copy-a", 1),
            CopyItem::new("copy-b", 2),
            CopyItem::new("copy-c", 3),
        ]);
        t.push(format!("copy: {}", res(copied)));
        t.push(format!("rows: {}", tags(conn)));
        let r: QueryResult<()> = conn.transaction(|c| {
            c.copy_items(vec![CopyItem::new("copy-rolled-back", 1)])?;
            Err(Error::RollbackTransaction)
        });
        t.push(format!("copy in rolled back transaction: {}", res(r)));
        let r = conn.transaction(|c| c.copy_items(vec![CopyItem::new("copy-committed", 1)]));
        t.push(format!("copy in committed transaction: {}", res(r)));
        let duplicate =
            conn.copy_items(vec![CopyItem::new("copy-x", 9), CopyItem::new("copy-a", 1)]);
        t.push(format!("copy duplicate: {}", res(duplicate)));
        t.push(format!("rows: {} {}", tags(conn), depth(conn)));
        t
    }

    /// Scenario 8c: `build_transaction()` with isolation level and access mode.
    pub fn build_transaction<C: PgExtras>(env: &Env) -> Transcript {
        let conn = &mut migrated::<C>(env);
        let mut t = Transcript::new();
        t.push(format!("outside: {}", show_transaction(conn)));
        let r = conn.serializable_read_only(|c| {
            let inside = show_transaction(c);
            let d = depth(c);
            let write = c.transaction(|c| insert(c, "read-only", 1));
            let after = show_transaction(c);
            Ok(format!(
                "{inside}; {d}; write {}; after {after}",
                res(write)
            ))
        });
        t.push(format!("serializable read only: {}", said(r)));
        t.push(format!("outside: {}", show_transaction(conn)));
        let r = conn.repeatable_read_deferrable(|c| {
            insert(c, "read-write", 1)?;
            Ok(show_transaction(c))
        });
        t.push(format!(
            "repeatable read, read write, deferrable: {}",
            said(r)
        ));
        let r = conn.transaction(|c| {
            let nested = c.serializable_read_only(|_| Ok(()));
            Ok::<_, Error>(res(nested))
        });
        t.push(format!("inside a transaction: {}", said(r)));
        let r: QueryResult<()> = conn.serializable_read_only(|_| Err(Error::RollbackTransaction));
        t.push(format!("rollback: {}", res(r)));
        t.push(format!("rows: {} {}", tags(conn), depth(conn)));
        t
    }

    /// A COMMIT that fails: a deferred unique constraint checked at COMMIT.
    pub fn commit_failure<C: PgExtras>(env: &Env) -> Transcript {
        use common::deferred_items;
        let conn = &mut migrated::<C>(env);
        let mut t = Transcript::new();
        let twice = |c: &mut C| {
            for _ in 0..2 {
                diesel::insert_into(deferred_items::table)
                    .values((deferred_items::tag.eq("dup"), deferred_items::v.eq(1)))
                    .execute(c)?;
            }
            Ok::<_, Error>("inserted twice")
        };
        let r = conn.transaction(twice);
        t.push(format!("transaction: {}", res(r)));
        t.push(depth(conn));
        let r = conn.repeatable_read_deferrable(twice);
        t.push(format!("build_transaction: {}", res(r)));
        t.push(depth(conn));
        let rows = deferred_items::table.count().get_result::<i64>(conn);
        t.push(format!("rows: {}", res(rows)));
        t.push(format!("usable: {}", res(insert(conn, "after", 1))));
        t
    }
}

// ---------------------------------------------------------------------------------------------
// Tests: each runs one scenario with `C` and with `SignalConnection<C>` and checks both.

macro_rules! dropin_test {
    ($name:ident: $suite:ident :: $scenario:ident, $expected:expr) => {
        #[test]
        fn $name() {
            let plain = $suite::$scenario::<$suite::Plain>(&$suite::env(stringify!($name)));
            let signal = $suite::$scenario::<$suite::Signal>(&$suite::env(stringify!($name)));
            check(stringify!($name), plain, signal, $expected);
        }
    };
}

const QUERIES: &[&str] = &[
    "insert batch: Ok(3)",
    "insert one: Ok(1)",
    "insert duplicate: Err(UniqueViolation: ",
    r#"load: Ok([Item { id: 1, tag: "a", v: 1 }, Item { id: 2, tag: "b", v: 2 }, Item { id: 3, tag: "c", v: 3 }, Item { id: 4, tag: "d", v: 4 }])"#,
    r#"get_result: Ok(Item { id: 2, tag: "b", v: 2 })"#,
    r#"first: Ok(Item { id: 4, tag: "d", v: 4 })"#,
    "first missing: Err(NotFound)",
    "count: Ok(4)",
    "update: Ok(1)",
    "delete: Ok(1)",
    r#"sql_query: Ok([ItemByName { id: 2, tag: "b", v: 2 }, ItemByName { id: 3, tag: "c", v: 3 }, ItemByName { id: 1, tag: "a", v: 10 }])"#,
    "sql_query error: Err(Unknown: ",
    r#"load_iter: Ok([Item { id: 1, tag: "a", v: 10 }, Item { id: 2, tag: "b", v: 2 }, Item { id: 3, tag: "c", v: 3 }])"#,
];
dropin_test!(sqlite_queries: sqlite_suite::queries, QUERIES);
dropin_test!(pg_queries: pg_suite::queries, QUERIES);

const BATCH_EXECUTE: &[&str] = &[
    "create+insert: Ok(())",
    "rows: Ok(2)",
    "not null: Err(NotNullViolation: ",
    "syntax: Err(Unknown: ",
    "in rolled back transaction: Err(RollbackTransaction)",
    "rows: Ok(2)",
    "in committed transaction: Ok(())",
    "rows: Ok(3)",
    "depth=0",
];
dropin_test!(sqlite_batch_execute: sqlite_suite::batch_execute, BATCH_EXECUTE);
dropin_test!(pg_batch_execute: pg_suite::batch_execute, BATCH_EXECUTE);

const MIGRATIONS: &[&str] = &[
    "pending: Ok(true)",
    r#"run: Ok(["20261126000001"])"#,
    r#"applied: Ok(["20261126000001"])"#,
    "pending: Ok(false)",
    "insert: Ok(1)",
    "rows: [migrated=1]",
    "run again: Ok([])",
    r#"revert: Ok("20261126000001")"#,
    "applied: Ok([])",
    r#"items after revert: Err("no table")"#,
    r#"run: Ok(["20261126000001"])"#,
    "rows: []",
    "depth=0",
];
dropin_test!(sqlite_migrations: sqlite_suite::migrations_harness, MIGRATIONS);
dropin_test!(pg_migrations: pg_suite::migrations_harness, MIGRATIONS);

const SAVE_CHANGES: &[&str] = &[
    r#"saved: Ok(Item { id: 1, tag: "a2", v: 42 })"#,
    "rows: [a2=42,b=2]",
    "saved in rolled back transaction: Err(RollbackTransaction)",
    "rows: [a2=42,b=2]",
    "saved missing row: Err(NotFound)",
];
dropin_test!(sqlite_save_changes: sqlite_suite::save_changes, SAVE_CHANGES);
dropin_test!(pg_save_changes: pg_suite::save_changes, SAVE_CHANGES);

const TRANSACTIONS: &[&str] = &[
    "depth=0",
    r#"commit: Ok("depth=1")"#,
    "rollback: Err(RollbackTransaction)",
    "rows: [commit=1]",
    r#"nested: Ok(inner depth=2 Err(RollbackTransaction); released Ok("depth=3"); back at depth=1; duplicate Err(UniqueViolation: "#,
    "rows: [commit=1,outer=1,savepoint-released=1,savepoint-nested=1]",
    "error from the closure: Err(UniqueViolation: ",
    "rows: [commit=1,outer=1,savepoint-released=1,savepoint-nested=1]",
    "test_transaction inside: depth=1 [commit=1,outer=1,savepoint-released=1,savepoint-nested=1,test-transaction=1]",
    "rows: [commit=1,outer=1,savepoint-released=1,savepoint-nested=1]",
    "depth=0",
    "begin_test_transaction: Ok(()) depth=1",
    r#"savepoint in test transaction: Ok("depth=2")"#,
    "inside: [commit=1,outer=1,savepoint-released=1,savepoint-nested=1,test=1,test-savepoint=1] depth=1",
    "after drop, second connection: [commit=1,outer=1,savepoint-released=1,savepoint-nested=1]",
];
dropin_test!(sqlite_transactions: sqlite_suite::transactions, TRANSACTIONS);
dropin_test!(pg_transactions: pg_suite::transactions, TRANSACTIONS);

const R2D2: &[&str] = &[
    "built: 2 connections, 2 idle",
    "checked out: 1 idle",
    r#"transaction on the pooled connection: Ok("depth=1")"#,
    "rollback on the pooled connection: Err(RollbackTransaction)",
    "transaction on &mut C: Ok(1)",
    "rows: [pooled=1,deref=1]",
    "leaking: depth=1",
    "next checkout: depth=0 [pooled=1,deref=1]",
    "test pool checkout: depth=1",
    r#"savepoint in the test pool: Ok("depth=2")"#,
    "inside: [pooled=1,deref=1,test-pool=1,test-pool-savepoint=1]",
    "outside meanwhile: [pooled=1,deref=1]",
    "outside after the pool: [pooled=1,deref=1]",
];
dropin_test!(sqlite_r2d2: sqlite_suite::r2d2_pool, R2D2);
dropin_test!(pg_r2d2: pg_suite::r2d2_pool, R2D2);

const INSTRUMENTATION: &[&str] = &[
    "-- commit: Ok(1)",
    "BeginTransaction depth=1",
    "StartQuery BEGIN",
    "FinishQuery BEGIN error=false",
    "StartQuery INSERT INTO ",
    "CacheQuery INSERT INTO ",
    "FinishQuery INSERT INTO ",
    "CommitTransaction depth=1",
    "StartQuery COMMIT",
    "FinishQuery COMMIT error=false",
    "-- savepoint, rollback: Err(RollbackTransaction)",
    "BeginTransaction depth=1",
    "StartQuery BEGIN",
    "FinishQuery BEGIN error=false",
    "BeginTransaction depth=2",
    "StartQuery SAVEPOINT diesel_savepoint_1",
    "FinishQuery SAVEPOINT diesel_savepoint_1 error=false",
    "CommitTransaction depth=2",
    "StartQuery RELEASE SAVEPOINT diesel_savepoint_1",
    "FinishQuery RELEASE SAVEPOINT diesel_savepoint_1 error=false",
    "RollbackTransaction depth=1",
    "StartQuery ROLLBACK",
    "FinishQuery ROLLBACK error=false",
    "-- instrumentation()",
    "BeginTransaction depth=9",
    r#"-- same query twice, cache on: ["Ok(1)", "Ok(1)"]"#,
    "StartQuery SELECT COUNT(*) FROM ",
    "CacheQuery SELECT COUNT(*) FROM ",
    "FinishQuery SELECT COUNT(*) FROM ",
    "StartQuery SELECT COUNT(*) FROM ",
    "FinishQuery SELECT COUNT(*) FROM ",
    // No CacheQuery below: the cache is off.
    r#"-- new query twice, cache disabled: ["Ok([\"instrumented\"])", "Ok([\"instrumented\"])"]"#,
    "StartQuery SELECT ",
    "FinishQuery SELECT ",
    "StartQuery SELECT ",
    "FinishQuery SELECT ",
    "-- closure: Ok(1), 3 queries started, 0 events to the replaced instrumentation",
];
dropin_test!(sqlite_instrumentation: sqlite_suite::instrumentation, INSTRUMENTATION);
dropin_test!(pg_instrumentation: pg_suite::instrumentation, INSTRUMENTATION);

dropin_test!(
    sqlite_begin_modes: sqlite_suite::begin_modes,
    &[
        r#"immediate: Ok(depth=1; observer write Err(Unknown: "database is locked"); observer read [])"#,
        r#"exclusive: Ok(depth=1; observer read Err(Unknown: "database is locked"))"#,
        "exclusive rollback: Err(RollbackTransaction)",
        r#"immediate nested: Ok(savepoint Ok("depth=2"); immediate inside Err(AlreadyInTransaction))"#,
        "rows: [immediate=1,exclusive=1,immediate-savepoint=1] depth=0",
        "observer write after: Ok(1)",
    ]
);

dropin_test!(
    sqlite_sql_functions: sqlite_suite::sql_functions,
    &[
        r#"unregistered: Err(Unknown: "no such function: dropin_add")"#,
        "register: Ok(())",
        "register collation: Ok(())",
        "select: Ok(5)",
        "in a transaction: Ok([101, 102, 103])",
        r#"collation: Ok([ItemByName { id: 3, tag: "y", v: 3 }])"#,
        "metadata_lookup: ()",
    ]
);

dropin_test!(
    sqlite_commit_failure: sqlite_suite::commit_failure,
    &[
        "transaction: Err(ForeignKeyViolation: ",
        "depth=0",
        "immediate: Err(ForeignKeyViolation: ",
        "depth=0",
        "with the parent: Ok(1)",
        "children: Ok([7])",
    ]
);

dropin_test!(
    pg_loading_modes: pg_suite::loading_modes,
    &[
        r#"insert returning: Ok([Item { id: 1, tag: "a", v: 1 }, Item { id: 2, tag: "b", v: 2 }, Item { id: 3, tag: "c", v: 3 }])"#,
        r#"default mode: Ok(["a", "b", "c"])"#,
        r#"row by row: Ok([Item { id: 1, tag: "a", v: 1 }, Item { id: 2, tag: "b", v: 2 }, Item { id: 3, tag: "c", v: 3 }])"#,
        r#"row by row sql_query in a transaction: Ok(["c", "d"])"#,
        r#"row by row error: Err(Unknown: "division by zero")"#,
        "afterwards: [a=1,b=2,c=3,d=4] depth=0",
    ]
);

dropin_test!(
    pg_custom_type: pg_suite::custom_type,
    &[
        "create type: Ok(())",
        "cached before use: false",
        "insert: Ok(3)",
        "cached after use: true",
        "load: Ok([(1, Happy), (2, Sad), (3, Happy)])",
        "filter: Ok([2])",
        "sql_query: Ok([MoodByName { id: 1, mood: Happy }, MoodByName { id: 3, mood: Happy }])",
        "rolled back insert: Err(RollbackTransaction)",
        "count: Ok(3)",
        "lookup_type matches pg_type: true",
    ]
);

dropin_test!(
    pg_copy_from: pg_suite::copy_from,
    &[
        "copy: Ok(3)",
        "rows: [copy-a=1,copy-b=2,copy-c=3]",
        "copy in rolled back transaction: Err(RollbackTransaction)",
        "copy in committed transaction: Ok(1)",
        "copy duplicate: Err(UniqueViolation: ",
        "rows: [copy-a=1,copy-b=2,copy-c=3,copy-committed=1] depth=0",
    ]
);

dropin_test!(
    pg_build_transaction: pg_suite::build_transaction,
    &[
        r#"outside: isolation=Ok("read committed") read_only=Ok("off") deferrable=Ok("off")"#,
        r#"serializable read only: Ok(isolation=Ok("serializable") read_only=Ok("on") deferrable=Ok("off"); depth=1; write Err(ReadOnlyTransaction: "cannot execute INSERT in a read-only transaction"); after isolation=Ok("serializable") read_only=Ok("on") deferrable=Ok("off"))"#,
        r#"outside: isolation=Ok("read committed") read_only=Ok("off") deferrable=Ok("off")"#,
        r#"repeatable read, read write, deferrable: Ok(isolation=Ok("repeatable read") read_only=Ok("off") deferrable=Ok("on"))"#,
        "inside a transaction: Ok(Err(AlreadyInTransaction))",
        "rollback: Err(RollbackTransaction)",
        "rows: [read-write=1] depth=0",
    ]
);

dropin_test!(
    pg_commit_failure: pg_suite::commit_failure,
    &[
        "transaction: Err(UniqueViolation: ",
        "depth=0",
        "build_transaction: Err(UniqueViolation: ",
        "depth=0",
        "rows: Ok(0)",
        "usable: Ok(1)",
    ]
);

/// The same scenario through `#[derive(MultiConnection)]`, one variant per connection type;
/// then the wrapper's hooks, driven through the derived connection's transaction manager.
#[test]
fn sqlite_multi_connection() {
    let plain = multi_connection_scenario(AnyConnection::Sqlite(
        SqliteConnection::establish(":memory:").unwrap(),
    ));
    let signal = multi_connection_scenario(AnyConnection::SqliteSignal(
        SignalConnection::establish(":memory:").unwrap(),
    ));
    check(
        "sqlite_multi_connection",
        plain,
        signal,
        &[
            "migrations: Ok(1)",
            "commit: Ok(1)",
            "rollback: Err(RollbackTransaction)",
            "savepoint: Ok(1)",
            r#"load: Ok([Item { id: 1, tag: "multi", v: 1 }, Item { id: 2, tag: "multi-savepoint", v: 2 }])"#,
            r#"sql_query: Ok([ItemByName { id: 2, tag: "multi-savepoint", v: 2 }])"#,
            "first: Ok(1)",
        ],
    );

    let recorder = common::Recorder::new();
    let mut conn = AnyConnection::SqliteSignal(SignalConnection::establish(":memory:").unwrap());
    let hooks = |conn: &mut AnyConnection, label: &str| {
        let AnyConnection::SqliteSignal(signal) = conn else {
            unreachable!("the SignalConnection variant")
        };
        signal.on_commit(recorder.hook(format!("{label}: committed")));
        signal.on_rollback(recorder.hook(format!("{label}: rolled back")));
    };
    conn.transaction(|c| {
        hooks(c, "outer");
        let _: QueryResult<()> = c.transaction(|c| {
            hooks(c, "savepoint");
            Err(Error::RollbackTransaction)
        });
        assert_eq!(recorder.take(), ["savepoint: rolled back"]);
        QueryResult::Ok(())
    })
    .unwrap();
    assert_eq!(recorder.take(), ["outer: committed"]);
    let _: QueryResult<()> = conn.transaction(|c| {
        hooks(c, "failed");
        Err(Error::RollbackTransaction)
    });
    assert_eq!(recorder.take(), ["failed: rolled back"]);
}
