//! N empty transactions in a loop, on a plain connection or the wrapper: the program behind the
//! README's instruction counts (`valgrind --tool=callgrind`) and system-call counts
//! (`strace -c`), which need the same work without criterion around it.
//!
//! ```text
//! cargo build --release --example tx_loop --features sqlite,postgres,async
//! valgrind --tool=callgrind target/release/examples/tx_loop sqlite-wrapper 3000
//! DTS_PG_URL=postgres://... strace -f -c target/release/examples/tx_loop async-pg-plain 20000
//! ```
//!
//! Modes: `sqlite-plain`, `sqlite-wrapper` (sync, in memory), `async-pg-plain`,
//! `async-pg-wrapper` (diesel-async over `DTS_PG_URL`), `async-sqlite-plain`,
//! `async-sqlite-wrapper` (`SyncConnectionWrapper<SqliteConnection>` in memory); the async modes
//! on one `current_thread` runtime, the loop in one task as in `benches/overhead.rs`.
//! Per-transaction figures: run with two counts (say 1,000 and 3,000) and divide the difference
//! by 2,000, which cancels the set-up.
//!
//! `tx_loop async-future-sizes` prints the size of an empty `transaction` future (SQLite), plain
//! and wrapped: the state every poll of the transaction works in.

use diesel::prelude::*;
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use diesel_transaction_signals::{AsyncSignalConnection, SignalConnection};

fn main() {
    let mut args = std::env::args().skip(1);
    if std::env::args().nth(1).as_deref() == Some("async-future-sizes") {
        future_sizes();
        return;
    }
    let (Some(mode), Some(n)) = (args.next(), args.next()) else {
        eprintln!(
            "usage: tx_loop sqlite-plain|sqlite-wrapper|async-pg-plain|async-pg-wrapper|\
             async-sqlite-plain|async-sqlite-wrapper N, or tx_loop async-future-sizes"
        );
        std::process::exit(2);
    };
    let n: u32 = n.parse().expect("N: a number of transactions");
    match mode.as_str() {
        "sqlite-plain" => {
            let mut c = SqliteConnection::establish(":memory:").unwrap();
            for _ in 0..n {
                c.transaction(|_| QueryResult::Ok(())).unwrap();
            }
        }
        "sqlite-wrapper" => {
            let mut c = SignalConnection::<SqliteConnection>::establish(":memory:").unwrap();
            for _ in 0..n {
                c.transaction(|_| QueryResult::Ok(())).unwrap();
            }
        }
        "async-pg-plain" | "async-pg-wrapper" => {
            let url = std::env::var("DTS_PG_URL").expect("DTS_PG_URL");
            async_loop(mode.ends_with("wrapper"), n, async move || {
                AsyncPgConnection::establish(&url).await.unwrap()
            });
        }
        "async-sqlite-plain" | "async-sqlite-wrapper" => {
            async_loop(mode.ends_with("wrapper"), n, async || {
                SyncConnectionWrapper::<SqliteConnection>::new(
                    SqliteConnection::establish(":memory:").unwrap(),
                )
            });
        }
        other => {
            eprintln!("tx_loop: unknown mode {other}");
            std::process::exit(2);
        }
    }
}

/// N empty transactions on the connection `connect` makes (wrapped when `wrap`), in one task
/// on a `current_thread` runtime, as `benches/overhead.rs` runs them.
fn async_loop<C, F>(wrap: bool, n: u32, connect: F)
where
    C: AsyncConnection + 'static,
    F: AsyncFnOnce() -> C + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let conn = connect().await;
        tokio::task::spawn_local(async move {
            if wrap {
                let mut c = AsyncSignalConnection::new(conn);
                for _ in 0..n {
                    c.transaction(async |_| QueryResult::Ok(())).await.unwrap();
                }
            } else {
                let mut c = conn;
                for _ in 0..n {
                    c.transaction(async |_| QueryResult::Ok(())).await.unwrap();
                }
            }
        })
        .await
        .unwrap();
    });
}

/// The size of an empty `transaction` future on `SyncConnectionWrapper<SqliteConnection>`,
/// plain and wrapped (made, never polled).
fn future_sizes() {
    let sqlite = || SyncConnectionWrapper::new(SqliteConnection::establish(":memory:").unwrap());
    let mut plain: SyncConnectionWrapper<SqliteConnection> = sqlite();
    let mut wrapper = AsyncSignalConnection::new(sqlite());
    println!(
        "empty transaction future: plain {} bytes, wrapper {} bytes",
        std::mem::size_of_val(&plain.transaction(async |_| QueryResult::Ok(()))),
        std::mem::size_of_val(&wrapper.transaction(async |_| QueryResult::Ok(()))),
    );
}
