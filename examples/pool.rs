//! A pool of signal connections, a process-wide signal, and hooks from several threads.
//!
//! Run with `cargo run --example pool --features sqlite,r2d2` (embedded SQLite in a temporary
//! file, nothing to set up).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use diesel_transaction_signals::pool::SignalCustomizer;
use diesel_transaction_signals::signals::{Veto, POST_COMMIT, POST_ROLLBACK, PRE_COMMIT};
use diesel_transaction_signals::{defer, SignalConnection};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

diesel::table! {
    users (id) {
        id -> Integer,
        email -> Text,
    }
}

type Conn = SignalConnection<SqliteConnection>;

/// The customizer the application already had for plain SQLite connections.
#[derive(Debug)]
struct Pragmas;

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for Pragmas {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        diesel::sql_query("PRAGMA busy_timeout = 5000")
            .execute(conn)
            .map(drop)
            .map_err(diesel::r2d2::Error::QueryError)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let dir = std::env::temp_dir().join(format!("dts-pool-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let url = dir.join("app.db").to_string_lossy().into_owned();

    let pool = Pool::builder()
        .max_size(4)
        .connection_customizer(Box::new(
            SignalCustomizer::new().alias("primary").wrap(Pragmas),
        ))
        .build(ConnectionManager::<Conn>::new(&url))?;
    pool.get()?.run_pending_migrations(MIGRATIONS)?;

    // Cross-cutting receivers: metrics for every transaction of every pooled connection.
    let commits = Arc::new(AtomicUsize::new(0));
    let rollbacks = Arc::new(AtomicUsize::new(0));
    let c = commits.clone();
    let _commits = POST_COMMIT.connect_guard(move |event| {
        if event.alias() == Some("primary") {
            c.fetch_add(1, Ordering::SeqCst);
        }
    });
    let r = rollbacks.clone();
    let _rollbacks = POST_ROLLBACK.connect_guard(move |_| {
        r.fetch_add(1, Ordering::SeqCst);
    });
    // A policy that can veto a commit: connections without an alias may not write (every
    // connection of this pool has one, so nothing is refused here).
    let _policy = PRE_COMMIT.connect_guard(|event| match event.alias() {
        Some(_) => Ok(()),
        None => Err(Veto::new("every pooled connection must have an alias")),
    });

    let sent = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|s| {
        for worker in 0..4 {
            let (pool, sent) = (&pool, &sent);
            s.spawn(move || {
                for n in 0..5 {
                    let mut conn = pool.get().expect("a pooled connection");
                    let email = format!("user{worker}-{n}@example.com");
                    let result: QueryResult<()> = conn.transaction(|conn| {
                        diesel::insert_into(users::table)
                            .values(users::email.eq(&email))
                            .execute(conn)?;
                        let sent = sent.clone();
                        defer!(move || {
                            sent.fetch_add(1, Ordering::SeqCst);
                        });
                        if n == 4 {
                            // The last sign-up of each worker is abandoned: no e-mail for it.
                            return Err(diesel::result::Error::RollbackTransaction);
                        }
                        Ok(())
                    });
                    if let Err(e) = result {
                        println!("worker {worker}: sign-up {n} rolled back ({e})");
                    }
                }
            });
        }
    });

    let users: i64 = users::table.count().get_result(&mut pool.get()?)?;
    println!("users in the database:   {users}");
    println!("welcome e-mails sent:    {}", sent.load(Ordering::SeqCst));
    println!(
        "POST_COMMIT (primary):   {}",
        commits.load(Ordering::SeqCst)
    );
    println!(
        "POST_ROLLBACK:           {}",
        rollbacks.load(Ordering::SeqCst)
    );
    assert_eq!(users, 16);
    assert_eq!(sent.load(Ordering::SeqCst), 16);
    assert_eq!(rollbacks.load(Ordering::SeqCst), 4);
    assert_eq!(commits.load(Ordering::SeqCst), 16);
    drop(pool);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
