//! The forms of `defer!`.

#![cfg(feature = "sqlite")]
use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use common::Recorder;
use diesel::prelude::*;
use diesel_transaction_signals::{defer, FailureCause};

static SENT: Mutex<Vec<(i32, String)>> = Mutex::new(Vec::new());
static SUBJECT_CALLS: AtomicUsize = AtomicUsize::new(0);

fn send_mail(user_id: i32, subject: String) {
    SENT.lock().unwrap().push((user_id, subject));
}

fn subject() -> String {
    SUBJECT_CALLS.fetch_add(1, Ordering::SeqCst);
    "Welcome".to_owned()
}

mod mail {
    pub fn send(rec: super::Recorder, to: &str) {
        rec.push(format!("mail to {to}"));
    }
}

struct Mailer(Recorder);
impl Mailer {
    fn send(&self, to: String, n: u32) {
        self.0.push(format!("{to} x{n}"));
    }
}

struct User {
    id: i32,
}

#[test]
fn call_form_evaluates_arguments_now_and_calls_after_commit() {
    let mut conn = common::sqlite();
    let mut user = User { id: 7 };
    conn.transaction(|_| {
        defer!(send_mail(user.id, subject()));
        assert_eq!(
            SUBJECT_CALLS.load(Ordering::SeqCst),
            1,
            "arguments evaluated at once"
        );
        assert!(SENT.lock().unwrap().is_empty(), "the call waits for COMMIT");
        user.id = 8; // later changes do not reach the deferred call
        QueryResult::Ok(())
    })
    .unwrap();
    assert_eq!(*SENT.lock().unwrap(), [(7, "Welcome".to_owned())]);
    assert_eq!(SUBJECT_CALLS.load(Ordering::SeqCst), 1);
}

#[test]
fn path_method_and_closure_forms() {
    let mut conn = common::sqlite();
    let rec = Recorder::new();
    let mailer = Mailer(rec.clone());
    let r2 = rec.clone();
    let r3 = rec.clone();
    let hook = rec.hook("closure variable");
    conn.transaction(|_| {
        defer!(mail::send(rec.clone(), "ada@example.com"));
        defer!(mailer.send("bob@example.com".to_owned(), 2,));
        defer!(move || r2.push("move closure"));
        defer!(|| println!("a closure capturing nothing"));
        defer!(hook);
        defer!(move || {
            r3.push("block closure");
        });
        assert!(rec.get().is_empty());
        QueryResult::Ok(())
    })
    .unwrap();
    assert_eq!(
        rec.take(),
        [
            "mail to ada@example.com",
            "bob@example.com x2",
            "move closure",
            "closure variable",
            "block closure"
        ]
    );
}

#[test]
fn a_deferred_call_returning_err_is_reported_not_lost() {
    fn flaky(n: i32) -> Result<(), String> {
        if n > 0 {
            Err(format!("attempt {n} failed"))
        } else {
            Ok(())
        }
    }
    // The failure handler is process-wide: read this connection's failures from the shared one.
    let _ = common::failures();
    let mut conn = common::sqlite();
    let id = conn.id();
    conn.transaction(|_| {
        defer!(flaky(0));
        defer!(flaky(3));
        QueryResult::Ok(())
    })
    .unwrap();
    assert_eq!(
        common::failures_of(id),
        [FailureCause::Returned("attempt 3 failed".into())]
    );
}

#[test]
fn defer_without_a_transaction_runs_at_once() {
    let rec = Recorder::new();
    defer!(mail::send(rec.clone(), "now@example.com"));
    defer(rec.hook("function form"));
    assert_eq!(rec.take(), ["mail to now@example.com", "function form"]);
}
