//! A sign-up service with axum and a deadpool of `AsyncSignalConnection`s: `POST /users` creates
//! a user in a transaction and `defer!`s the welcome e-mail, which is sent only once that
//! transaction has committed. A duplicate e-mail (409) or a transaction cut short by the
//! server's timeout (504) sends nothing. `GET /sent` lists what the mailer sent.
//!
//! Run it on SQLite (a temporary file, nothing to set up):
//!
//! ```text
//! cargo run --example axum_signup --features async,sqlite,postgres,deadpool
//! curl -i localhost:3000/users -H 'content-type: application/json' -d '{"email":"ada@example.com"}'
//! curl localhost:3000/sent
//! ```
//!
//! `DATABASE_URL=postgres://…` runs it on PostgreSQL instead (any other value is a SQLite file
//! path), and `PORT` picks the port. tests/axum_signup.rs drives this file over HTTP.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DbError};
use diesel_async::pooled_connection::deadpool::{Object, Pool, PoolError};
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use diesel_transaction_signals::{defer, AsyncSignalConnection};
use serde::{Deserialize, Serialize};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

diesel::table! {
    users (id) {
        id -> Integer,
        email -> Text,
    }
}

/// The database: a pool of signal connections to PostgreSQL or SQLite. The signal connection
/// is a drop-in for the connection it wraps, so the pool is diesel-async's own.
#[derive(Clone)]
pub enum Db {
    Postgres(Pool<AsyncSignalConnection<AsyncPgConnection>>),
    Sqlite(Pool<AsyncSignalConnection<SyncConnectionWrapper<SqliteConnection>>>),
}

/// Runs `$body` with `$conn` bound to a connection from `$db`'s pool: the same Diesel code,
/// compiled once per backend. A pool error returns early through `?`.
macro_rules! with_conn {
    ($db:expr, |$conn:ident| $body:expr) => {
        match $db {
            Db::Postgres(pool) => {
                let mut $conn = pool.get().await?;
                $body
            }
            Db::Sqlite(pool) => {
                let mut $conn = pool.get().await?;
                $body
            }
        }
    };
}

impl Db {
    /// Connects to PostgreSQL if `url` is a `postgres://` URL, to the SQLite file at `url`
    /// otherwise, and creates the `users` table if it is missing.
    pub async fn connect(url: &str, max_size: usize) -> Result<Db, BoxError> {
        let db = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let manager = AsyncDieselConnectionManager::new(url);
            Db::Postgres(Pool::builder(manager).max_size(max_size).build()?)
        } else {
            let manager = AsyncDieselConnectionManager::new(url);
            Db::Sqlite(Pool::builder(manager).max_size(max_size).build()?)
        };
        let id = match db {
            Db::Postgres(_) => "SERIAL PRIMARY KEY",
            Db::Sqlite(_) => "INTEGER PRIMARY KEY AUTOINCREMENT",
        };
        let ddl = format!("CREATE TABLE IF NOT EXISTS users (id {id}, email TEXT NOT NULL UNIQUE)");
        with_conn!(&db, |conn| diesel::sql_query(ddl).execute(&mut conn).await)?;
        Ok(db)
    }
}

/// A stand-in for an e-mail service that remembers what it sent. Hooks run inline right after
/// COMMIT, before the request goes on: a real mailer would hand the mail to a queue or a task
/// here rather than talk SMTP.
#[derive(Clone, Default)]
pub struct Mailer {
    sent: Arc<Mutex<Vec<Mail>>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Mail {
    pub to: String,
    pub subject: String,
}

impl Mailer {
    pub fn send(&self, mail: Mail) {
        println!("mail to {}: {}", mail.to, mail.subject);
        self.sent.lock().unwrap().push(mail);
    }

    pub fn sent(&self) -> Vec<Mail> {
        self.sent.lock().unwrap().clone()
    }
}

#[derive(Clone)]
struct AppState {
    db: Db,
    mailer: Mailer,
    /// How long a sign-up transaction may take before it is abandoned (and rolled back).
    timeout: Duration,
}

/// The service: `POST /users`, `GET /sent`.
pub fn router(db: Db, mailer: Mailer, timeout: Duration) -> Router {
    Router::new()
        .route("/users", post(signup))
        .route("/sent", get(sent))
        .with_state(AppState {
            db,
            mailer,
            timeout,
        })
}

#[derive(Deserialize)]
struct Signup {
    email: String,
    /// Test hook, not something a real service would have: sleep this long inside the
    /// transaction, after the INSERT, so a test can make it outlive the server's timeout.
    #[serde(default)]
    delay_ms: u64,
}

#[derive(Serialize)]
struct User {
    id: i32,
    email: String,
}

async fn signup(
    State(app): State<AppState>,
    Json(Signup { email, delay_ms }): Json<Signup>,
) -> Result<(StatusCode, Json<User>), AppError> {
    let mailer = app.mailer;
    let id = with_conn!(&app.db, |conn| {
        // `(*conn)`: the signal connection's own `transaction`, rather than the generic one
        // diesel-async gives the pool object, which skips the connection's bookkeeping for a
        // transaction future that is dropped.
        let signup = (*conn).transaction(async |conn| {
            // Not sent now: after COMMIT, and never if the transaction rolls back, so it may
            // be deferred first: if the INSERT below fails (the address is taken) or the
            // timeout fires, no mail goes out. `defer!` needs no connection handle: it finds
            // the transaction open in this task, however deep in the call stack.
            defer!(mailer.send(Mail {
                to: email.clone(),
                subject: "Welcome!".into(),
            }));
            let id = diesel::insert_into(users::table)
                .values(users::email.eq(&email))
                .returning(users::id)
                .get_result::<i32>(conn)
                .await?;
            if delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            }
            QueryResult::Ok(id)
        });
        match tokio::time::timeout(app.timeout, signup).await {
            Ok(id) => id?,
            Err(_elapsed) => {
                // The timeout dropped the transaction future: it never commits and its mail is
                // never sent, but it is still open on the server, holding its locks. Close the
                // connection now (the server rolls back) rather than put it back in the pool,
                // which would discard it only when it next hands it out.
                drop(Object::take(conn));
                return Err(AppError::Timeout);
            }
        }
    });
    Ok((StatusCode::CREATED, Json(User { id, email })))
}

async fn sent(State(app): State<AppState>) -> Json<Vec<Mail>> {
    Json(app.mailer.sent())
}

enum AppError {
    Conflict,
    Timeout,
    Internal(BoxError),
}

impl From<DbError> for AppError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::DatabaseError(DatabaseErrorKind::UniqueViolation, _) => AppError::Conflict,
            e => AppError::Internal(e.into()),
        }
    }
}

impl From<PoolError> for AppError {
    fn from(e: PoolError) -> Self {
        AppError::Internal(e.into())
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match self {
            AppError::Conflict => {
                (StatusCode::CONFLICT, "e-mail already registered").into_response()
            }
            AppError::Timeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "took too long: nothing was saved",
            )
                .into_response(),
            AppError::Internal(e) => {
                eprintln!("internal error: {e}");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let tmp = tempfile::tempdir()?;
    // SQLite has one writer at a time: a pool of one connection serialises the sign-ups.
    let (url, max_size) = match std::env::var("DATABASE_URL") {
        Ok(url) if url.starts_with("postgres") => (url, 8),
        Ok(path) => (path, 1),
        Err(_) => (tmp.path().join("signup.db").display().to_string(), 1),
    };
    let db = Db::connect(&url, max_size).await?;
    let app = router(db, Mailer::default(), Duration::from_secs(5));

    let port: u16 = std::env::var("PORT").map_or(Ok(3000), |p| p.parse())?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    // Ctrl-C stops it cleanly (and removes the temporary database).
    let ctrl_c = async { tokio::signal::ctrl_c().await.unwrap_or(()) };
    axum::serve(listener, app)
        .with_graceful_shutdown(ctrl_c)
        .await?;
    Ok(())
}
