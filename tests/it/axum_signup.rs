//! examples/axum_signup.rs end to end: the example's own router and pool, served on 127.0.0.1,
//! driven over real HTTP with reqwest, on PostgreSQL and SQLite. Every server has a pool of
//! one connection, so a connection left dirty by a failed or abandoned transaction would be
//! handed to the very next request.
#![cfg(all(
    feature = "async",
    feature = "sqlite",
    feature = "postgres",
    feature = "deadpool"
))]

use crate::common;

#[allow(dead_code)]
#[path = "../../examples/axum_signup.rs"]
mod app;

use std::collections::HashMap;
use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use reqwest::StatusCode;
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug)]
enum Backend {
    Postgres,
    Sqlite,
}

/// A running server: its base URL, and the database URL to check rows independently of it.
struct Server {
    base: String,
    http: reqwest::Client,
    db_url: String,
    backend: Backend,
    /// The server's pool (a handle on the same one).
    db: app::Db,
    _dir: Option<tempfile::TempDir>,
}

/// Generous enough for a loaded machine: only the timeout test wants it short.
const TIMEOUT: Duration = Duration::from_secs(30);

async fn start(backend: Backend, timeout: Duration) -> Server {
    start_with(backend, timeout, 1).await
}

async fn start_with(backend: Backend, timeout: Duration, pool_size: usize) -> Server {
    let (db_url, dir) = match backend {
        // Migrates the shared database once per process: `users` exists before the example's
        // CREATE TABLE IF NOT EXISTS, which would race with itself in parallel tests.
        Backend::Postgres => {
            drop(common::pg());
            (common::pg_url(), None)
        }
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let url = dir.path().join("signup.db").display().to_string();
            (url, Some(dir))
        }
    };
    let db = app::Db::connect(&db_url, pool_size).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = app::router(db.clone(), app::Mailer::default(), timeout);
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    Server {
        base,
        http,
        db_url,
        backend,
        db,
        _dir: dir,
    }
}

impl Server {
    async fn signup(&self, body: Value) -> (StatusCode, String) {
        let response = self
            .http
            .post(format!("{}/users", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    }

    /// How many welcome mails the server sent, by recipient.
    async fn sent(&self) -> HashMap<String, usize> {
        let mails: Vec<Value> = self
            .http
            .get(format!("{}/sent", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut by_recipient = HashMap::new();
        for mail in mails {
            assert_eq!(mail["subject"], "Welcome!");
            *by_recipient
                .entry(mail["to"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        by_recipient
    }

    /// Committed rows with this e-mail, read on a connection of the test's own.
    fn rows(&self, email: &str) -> i64 {
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        let query = diesel::sql_query("SELECT COUNT(*) AS n FROM users WHERE email = ");
        let count: Count = match self.backend {
            Backend::Postgres => query
                .sql("$1")
                .bind::<Text, _>(email)
                .get_result(&mut PgConnection::establish(&self.db_url).unwrap()),
            Backend::Sqlite => query
                .sql("?")
                .bind::<Text, _>(email)
                .get_result(&mut SqliteConnection::establish(&self.db_url).unwrap()),
        }
        .unwrap();
        count.n
    }
}

/// An address no other test or run uses (the PostgreSQL database is shared).
fn email(name: &str) -> String {
    format!("{}@example.com", common::unique_tag(name))
}

/// A sign-up commits the user and then sends exactly one mail; the mail is there when the
/// response arrives.
async fn signup_sends_one_mail(backend: Backend) {
    let server = start(backend, TIMEOUT).await;
    let ada = email("ada");
    let (status, body) = server.signup(json!({ "email": ada })).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let user: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(user["email"], ada.as_str());
    assert!(user["id"].as_i64().is_some(), "{body}");
    assert_eq!(server.rows(&ada), 1);
    assert_eq!(server.sent().await, HashMap::from([(ada, 1)]));
}

/// A second sign-up with the same address fails on the unique constraint: 409, no second mail,
/// and the connection is fine for the next request.
async fn duplicate_sends_nothing(backend: Backend) {
    let server = start(backend, TIMEOUT).await;
    let bob = email("bob");
    assert_eq!(
        server.signup(json!({ "email": bob })).await.0,
        StatusCode::CREATED
    );
    let (status, body) = server.signup(json!({ "email": bob })).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(server.rows(&bob), 1);
    let eve = email("eve");
    assert_eq!(
        server.signup(json!({ "email": eve })).await.0,
        StatusCode::CREATED,
        "the pool's only connection is clean after the failed transaction"
    );
    assert_eq!(server.sent().await, HashMap::from([(bob, 1), (eve, 1)]));
}

/// Many requests at once, each address twice: per address exactly one 201 and one 409, and
/// exactly one mail.
async fn concurrent_signups(backend: Backend) {
    let server = std::sync::Arc::new(start(backend, TIMEOUT).await);
    let emails: Vec<String> = (0..20).map(|i| email(&format!("many{i}"))).collect();
    let mut requests = tokio::task::JoinSet::new();
    for address in emails.iter().chain(&emails) {
        let (server, address) = (server.clone(), address.clone());
        requests.spawn(async move {
            let (status, _) = server.signup(json!({ "email": address })).await;
            (address, status)
        });
    }
    let mut statuses: HashMap<String, Vec<StatusCode>> = HashMap::new();
    while let Some(done) = requests.join_next().await {
        let (address, status) = done.unwrap();
        statuses.entry(address).or_default().push(status);
    }
    for address in &emails {
        let mut got = statuses.remove(address).unwrap();
        got.sort();
        assert_eq!(
            got,
            [StatusCode::CREATED, StatusCode::CONFLICT],
            "{address}"
        );
        assert_eq!(server.rows(address), 1, "{address}");
    }
    let expected: HashMap<String, usize> = emails.into_iter().map(|e| (e, 1)).collect();
    assert_eq!(server.sent().await, expected);
}

/// A transaction that outlives the server's timeout is abandoned: 504, no mail, no row; the
/// pool discards the connection it was on, and the very next request (same address, one
/// connection in the pool) succeeds on a clean one.
async fn timeout_sends_nothing(backend: Backend) {
    let server = start(backend, Duration::from_millis(500)).await;
    let slow = email("slow");
    let (status, body) = server
        .signup(json!({ "email": slow, "delay_ms": 60_000 }))
        .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(server.rows(&slow), 0, "the INSERT was not committed");
    assert_eq!(server.sent().await, HashMap::new());

    // The abandoned INSERT is gone (a dangling transaction would still hold the address:
    // PostgreSQL would make this one wait for it, SQLite would refuse to write).
    let (status, body) = server.signup(json!({ "email": slow })).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(server.rows(&slow), 1);
    assert_eq!(server.sent().await, HashMap::from([(slow.clone(), 1)]));

    // Twice in a row, then a duplicate: each leaves the single connection usable.
    let again = email("again");
    for _ in 0..2 {
        let (status, _) = server
            .signup(json!({ "email": again, "delay_ms": 60_000 }))
            .await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    }
    assert_eq!(
        server.signup(json!({ "email": slow })).await.0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        server.signup(json!({ "email": again })).await.0,
        StatusCode::CREATED
    );
    assert_eq!(server.rows(&again), 1);
    assert_eq!(server.sent().await, HashMap::from([(slow, 1), (again, 1)]));
}

/// With two connections in the pool, the one a timed-out transaction was on must not go back
/// to the pool still holding that transaction's locks: a retry of the same address, on the
/// other connection, would wait for them (PostgreSQL) or find the database locked (SQLite).
async fn timeout_releases_locks_at_once(backend: Backend) {
    let server = start_with(backend, Duration::from_secs(2), 2).await;
    // Two idle connections, handed out in this order.
    match &server.db {
        app::Db::Postgres(pool) => drop((pool.get().await.unwrap(), pool.get().await.unwrap())),
        app::Db::Sqlite(pool) => drop((pool.get().await.unwrap(), pool.get().await.unwrap())),
    }
    let slow = email("locked");
    let (status, _) = server
        .signup(json!({ "email": slow, "delay_ms": 60_000 }))
        .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    let (status, body) = server.signup(json!({ "email": slow })).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(server.rows(&slow), 1);
    assert_eq!(server.sent().await, HashMap::from([(slow, 1)]));
}

macro_rules! backends {
    ($($name:ident: $backend:expr;)*) => {$(
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn signup_sends_one_mail() { super::signup_sends_one_mail($backend).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn duplicate_sends_nothing() { super::duplicate_sends_nothing($backend).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_signups() { super::concurrent_signups($backend).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn timeout_sends_nothing() { super::timeout_sends_nothing($backend).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn timeout_releases_locks_at_once() {
                super::timeout_releases_locks_at_once($backend).await
            }
        }
    )*};
}

backends! {
    postgres: Backend::Postgres;
    sqlite: Backend::Sqlite;
}
