//! Sign-up with a welcome e-mail that is only sent for users really in the database.
//!
//! Run with `cargo run --example quickstart --features sqlite` (embedded SQLite, nothing to set
//! up). It prints the SQL that ends each transaction and what the hooks did, in order.

use diesel::connection::InstrumentationEvent;
use diesel::prelude::*;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use diesel_transaction_signals::{defer, Outcome, SignalConnection};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

diesel::table! {
    users (id) {
        id -> Integer,
        email -> Text,
    }
}

type Conn = SignalConnection<SqliteConnection>;

/// Stands in for a mail queue: in a real application this would enqueue a job.
fn send_welcome_email(user_id: i32, email: String) {
    println!("    hook: welcome e-mail sent to {email} (user {user_id})");
}

/// Creates a user and defers the welcome e-mail until the sign-up has committed.
fn sign_up(conn: &mut Conn, email: &str) -> QueryResult<i32> {
    conn.transaction(|conn| {
        let who = email.to_owned();
        conn.on_rollback(move || println!("    hook: sign-up of {who} undone, nothing sent"));
        let id: i32 = diesel::insert_into(users::table)
            .values(users::email.eq(email))
            .returning(users::id)
            .get_result(conn)?;
        // No connection handle needed: `defer!` finds the transaction open on this thread.
        // The arguments are evaluated now; the call is made after COMMIT.
        defer!(send_welcome_email(id, email.to_owned()));
        Ok(id)
    })
}

/// Prints the statements that open and end transactions, as the database runs them.
fn trace_transactions(event: InstrumentationEvent<'_>) {
    if let InstrumentationEvent::FinishQuery { query, error, .. } = event {
        let sql = query.to_string();
        let keyword = sql.split_whitespace().next().unwrap_or("").to_uppercase();
        if ["BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE"].contains(&keyword.as_str()) {
            match error {
                None => println!("    sql:  {sql}"),
                Some(e) => println!("    sql:  {sql}  -> failed: {e}"),
            }
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut conn = Conn::establish(":memory:")?;
    conn.run_pending_migrations(MIGRATIONS)?;
    conn.set_instrumentation(trace_transactions as fn(InstrumentationEvent<'_>));

    println!("1. A sign-up that commits: the e-mail goes out after COMMIT.");
    let ada = sign_up(&mut conn, "ada@example.com")?;
    println!("    -> user {ada} created");

    println!("2. A sign-up that fails (duplicate e-mail): no e-mail, the rollback hook runs.");
    match sign_up(&mut conn, "ada@example.com") {
        Ok(_) => unreachable!("the e-mail address is unique"),
        Err(e) => println!("    -> sign-up failed: {e}"),
    }

    println!("3. A batch with a savepoint that rolls back: only its own work and hooks go.");
    conn.transaction(|conn| {
        sign_up(conn, "grace@example.com")?; // a savepoint inside the batch
        if let Err(e) = sign_up(conn, "ada@example.com") {
            println!("    -> second sign-up in the batch failed: {e}");
        }
        conn.on_complete(|outcome| println!("    hook: batch finished: {outcome}"));
        println!("    (still inside the batch: no e-mail has been sent yet)");
        QueryResult::Ok(())
    })?;

    println!("4. A panic inside a transaction: rolled back, rollback hooks run, panic goes on.");
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .unwrap_or("?");
        println!("    panic: {message}");
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _: QueryResult<()> = conn.transaction(|conn| {
            sign_up(conn, "linus@example.com")?;
            conn.on_complete(|outcome| {
                assert_eq!(outcome, Outcome::RolledBack);
                println!("    hook: outcome {outcome}");
            });
            panic!("simulated bug after the insert");
        });
    }));
    std::panic::set_hook(default_hook);
    println!("    -> panic caught by the caller: {}", result.is_err());

    let emails: Vec<String> = users::table
        .select(users::email)
        .order(users::id)
        .load(&mut conn)?;
    println!("Users in the database: {emails:?}");
    assert_eq!(emails, ["ada@example.com", "grace@example.com"]);
    Ok(())
}
