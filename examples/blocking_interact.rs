//! An async service that keeps sync Diesel on blocking threads (deadpool-diesel's `interact`,
//! which runs the closure with `spawn_blocking`) uses `SignalConnection` as it is: `defer!`
//! inside the closure waits for that transaction's COMMIT, like anywhere else on a thread.
//!
//! Run with `cargo run --example blocking_interact --features sqlite` (SQLite in a temporary
//! file, nothing to set up).

use std::time::Duration;

use deadpool_diesel::{Manager, Pool, Runtime};
use diesel::prelude::*;
use diesel_transaction_signals::{defer, SignalConnection};
use tokio::sync::mpsc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A pool of `SignalConnection`s, exactly as of plain connections.
type DbPool = Pool<Manager<SignalConnection<SqliteConnection>>>;

diesel::table! {
    users (id) {
        id -> Integer,
        email -> Text,
    }
}

/// A sign-up: the INSERT and the welcome mail's hand-off, on a blocking thread. The deferred
/// call runs there too, right after COMMIT, so it only queues the mail; an async task sends it.
async fn sign_up(
    pool: &DbPool,
    email: &str,
    outbox: mpsc::UnboundedSender<String>,
) -> Result<(), BoxError> {
    let email = email.to_owned();
    let conn = pool.get().await?;
    conn.interact(move |conn| {
        conn.transaction(|conn| {
            diesel::insert_into(users::table)
                .values(users::email.eq(&email))
                .execute(conn)?;
            defer!(outbox.send(email.clone()));
            QueryResult::Ok(())
        })
    })
    .await
    .map_err(|e| format!("interact: {e}"))??;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let url = dir.path().join("app.db").display().to_string();
    let pool: DbPool = Pool::builder(Manager::new(url, Runtime::Tokio1))
        .max_size(1)
        .build()?;
    pool.get()
        .await?
        .interact(|conn| {
            diesel::sql_query(
                "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE)",
            )
            .execute(conn)
        })
        .await
        .map_err(|e| format!("interact: {e}"))??;

    // The mailer: an async task fed by the hooks.
    let (outbox, mut queued) = mpsc::unbounded_channel::<String>();
    let mailer = tokio::spawn(async move {
        let mut sent = Vec::new();
        while let Some(to) = queued.recv().await {
            tokio::time::sleep(Duration::from_millis(10)).await; // talking to SMTP
            println!("welcome mail sent to {to}");
            sent.push(to);
        }
        sent
    });

    sign_up(&pool, "ada@example.com", outbox.clone()).await?;
    // A duplicate: the transaction rolls back, so its mail is never queued.
    let duplicate = sign_up(&pool, "ada@example.com", outbox.clone()).await;
    println!("second sign-up of ada: {}", duplicate.unwrap_err());
    sign_up(&pool, "bob@example.com", outbox).await?;

    let sent = mailer.await?; // the channel closes when the last sender is gone
    assert_eq!(sent, ["ada@example.com", "bob@example.com"]);
    Ok(())
}
