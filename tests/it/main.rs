//! The ordinary integration tests, gathered into one test binary (one link step instead of
//! one per file): each former `tests/<name>.rs` is the module `<name>` here, run as
//! `cargo test --all-features --test it <name>::`.
//!
//! Tests here share one process: nothing in them may install or clear process-wide state for
//! itself (the hook-failure handler, the panic hook, the logger: see `tests/common`), and what
//! they observe process-wide (signals, logs, failures) they filter by their own connection,
//! alias or relay. Tests that need a process of their own stay separate binaries:
//! `tests/alloc.rs` and `tests/memory.rs` (a counting `#[global_allocator]`),
//! `tests/outbox_processes.rs` (re-executes its own binary as child processes) and
//! `tests/outbox_listen_tls.rs` (its relays must be woken only by their own listener, and the
//! relays' in-process bell is rung by every outbox commit of the process).

#[path = "../common/mod.rs"]
mod common;

mod async_blocking;
mod async_driver;
mod async_model;
mod axum_signup;
mod defer_macro;
mod dropin;
mod faults;
mod model;
mod mysql;
mod outbox;
mod outbox_admin;
mod outbox_async_relay;
mod outbox_batch;
mod outbox_cli;
mod outbox_listeners;
mod pool;
mod pool_stress;
mod postgres;
mod semantics;
mod server_ended;
mod signals;
mod sqlite;
