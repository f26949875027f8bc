//! Model-based property test: random programs of nested transactions run against a real
//! database and against a small reference model of the semantics (README "When hooks run",
//! `tests/it/semantics.rs`); the two must agree on
//!
//! - the event log: every hook that ran, in order, interleaved with the result of every nested
//!   `transaction` call (right after it returned) and of every swallowed statement error, so the
//!   log also pins *when* savepoint rollback hooks ran;
//! - the class of the outermost `transaction`'s result (`Ok`, the closure's own error, a panic,
//!   `TransactionAborted`, the database's COMMIT error, ...);
//! - the rows left in `items` for the case's tag.
//!
//! Each hook's log entry also says whether a transaction was still open on the thread when it
//! ran (`@tx`: a savepoint's hooks run inside the enclosing transaction, the outermost level's
//! after it closed). After each program the connection must be idle (depth 0, nothing left in
//! the thread registry), every hook closure freed, and the connection usable.
//!
//! The suite is written once ([`model_suite!`]) and instantiated per backend flavour; the only
//! difference the model knows is whether a swallowed statement error aborts the transaction
//! (PostgreSQL) or only fails the statement (SQLite, MySQL), and how (if at all) a COMMIT can be
//! made to fail with a deferred constraint.
//!
//! Programs panic with the payload [`ModelPanic`]; the process's panic hook stays quiet for that
//! payload only.

#![cfg(all(feature = "sqlite", feature = "postgres", feature = "mysql"))]
use crate::common;

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Arc, Once};

use diesel::result::{DatabaseErrorKind, Error, QueryResult};
use diesel_transaction_signals::{in_transaction, Outcome, TransactionAborted};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

// ---------------------------------------------------------------------------------------------
// Programs
// ---------------------------------------------------------------------------------------------

/// One operation inside a transaction closure. Numbers are assigned by [`Program::numbered`]:
/// every op has a program-unique `n` (hook labels, event names), every `Insert` a distinct `v`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `insert (tag, v)` into `items`, propagating an error with `?`.
    Insert(i32),
    /// `conn.on_commit(..)`, logs `c<n>`.
    OnCommit(u32),
    /// `conn.on_rollback(..)`, logs `r<n>`.
    OnRollback(u32),
    /// `conn.on_complete(..)`, logs `k<n>:<Outcome>`.
    OnComplete(u32),
    /// The free function `defer(..)`, logs `d<n>`.
    Defer(u32),
    /// Inserts `(tag, 0)` again (the outermost closure always inserts it first) and ignores the
    /// error; logs `e<n>=<class of the error>`.
    SwallowedError(u32),
    /// `conn.transaction(..)` (a savepoint) with these ops and this ending, its panic caught;
    /// the closure then goes on whatever the result. Logs `tx<n>=<class of the result>`.
    Nested(u32, Vec<Op>, Ending),
}

/// How a closure ends after its ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// `Ok(())`.
    Ok,
    /// `Err(Error::RollbackTransaction)`.
    Err,
    /// `panic_any(ModelPanic)`.
    Panic,
    /// Outermost level only: break a deferred constraint (PostgreSQL: two equal `(tag, v)` in
    /// `deferred_items`; SQLite: a child without parent), so COMMIT fails; then `Ok(())`.
    DeferredViolation,
}

/// The outermost transaction: `insert (tag, 0)`, then `ops`, then `ending`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program {
    pub ops: Vec<Op>,
    pub ending: Ending,
}

impl Program {
    /// Assigns the numbers, in program order: labels from 1, insert values from 1 (0 is the
    /// outermost closure's own first row).
    pub fn numbered(mut self) -> Self {
        fn walk(ops: &mut [Op], n: &mut u32, v: &mut i32) {
            for op in ops {
                *n += 1;
                match op {
                    Op::Insert(x) => {
                        *v += 1;
                        *x = *v;
                    }
                    Op::OnCommit(x)
                    | Op::OnRollback(x)
                    | Op::OnComplete(x)
                    | Op::Defer(x)
                    | Op::SwallowedError(x) => *x = *n,
                    Op::Nested(x, inner, _) => {
                        *x = *n;
                        walk(inner, n, v);
                    }
                }
            }
        }
        walk(&mut self.ops, &mut 0, &mut 0);
        self
    }
}

fn leaf() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Insert(0)),
        2 => Just(Op::OnCommit(0)),
        2 => Just(Op::OnRollback(0)),
        2 => Just(Op::OnComplete(0)),
        1 => Just(Op::Defer(0)),
        2 => Just(Op::SwallowedError(0)),
    ]
}

fn nested_ending() -> impl Strategy<Value = Ending> {
    prop_oneof![
        3 => Just(Ending::Ok),
        1 => Just(Ending::Err),
        1 => Just(Ending::Panic),
    ]
}

/// The ops of a closure that may open `depth` more levels below its own.
fn ops(depth: u32, len: std::ops::Range<usize>) -> BoxedStrategy<Vec<Op>> {
    let op = if depth == 0 {
        leaf().boxed()
    } else {
        let nested = (ops(depth - 1, 0..6), nested_ending())
            .prop_map(|(ops, ending)| Op::Nested(0, ops, ending));
        prop_oneof![3 => leaf(), 2 => nested].boxed()
    };
    vec(op, len).boxed()
}

/// Programs with at most 4 levels (the outermost transaction and 3 nested savepoints).
/// `DeferredViolation` only where the backend has deferred constraints.
pub fn programs(deferred_violation: bool) -> impl Strategy<Value = Program> {
    let ending = if deferred_violation {
        prop_oneof![
            3 => Just(Ending::Ok),
            1 => Just(Ending::Err),
            1 => Just(Ending::Panic),
            1 => Just(Ending::DeferredViolation),
        ]
        .boxed()
    } else {
        nested_ending().boxed()
    };
    (ops(3, 1..8), ending).prop_map(|(ops, ending)| Program { ops, ending }.numbered())
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

/// The class of a `transaction` result or of a statement error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Class {
    Ok,
    /// The closure's own `Err(Error::RollbackTransaction)`.
    UserRollback,
    /// The closure panicked with [`ModelPanic`] and the panic came through.
    Panicked,
    /// `TransactionAborted::is(&err)`.
    Aborted,
    UniqueViolation,
    ForeignKeyViolation,
    /// PostgreSQL's 25P02: the statement was refused because the transaction is aborted.
    InFailedTransaction,
    /// Anything else (never expected by the model), with the error's text.
    Other(String),
}

/// The payload of the panics programs make.
pub struct ModelPanic;

pub fn classify_error(e: &Error) -> Class {
    if TransactionAborted::is(e) {
        return Class::Aborted;
    }
    match e {
        Error::RollbackTransaction => Class::UserRollback,
        Error::DatabaseError(DatabaseErrorKind::UniqueViolation, _) => Class::UniqueViolation,
        Error::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, _) => {
            Class::ForeignKeyViolation
        }
        Error::DatabaseError(DatabaseErrorKind::Unknown, info)
            if info.message().contains("current transaction is aborted") =>
        {
            Class::InFailedTransaction
        }
        other => Class::Other(format!("{other:?}")),
    }
}

pub fn classify<T>(r: std::thread::Result<QueryResult<T>>) -> Class {
    match r {
        Ok(Ok(_)) => Class::Ok,
        Ok(Err(e)) => classify_error(&e),
        Err(payload) if payload.is::<ModelPanic>() => Class::Panicked,
        Err(payload) => resume_unwind(payload),
    }
}

/// `cases` cases (`PROPTEST_CASES` overrides it, for a longer soak run); shrunk failures are
/// saved next to this file, in `tests/it/model.proptest-regressions`.
pub fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(cases),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

/// What a run produced (or the model predicts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    pub result: Class,
    pub events: Vec<String>,
    /// The `v`s left in `items` for the tag, ascending.
    pub rows: Vec<i32>,
}

/// The event log of a run, shared by the hooks it registers.
///
/// A hook's entry is its label, with `@tx` appended when a transaction is still open on this
/// thread while it runs (a savepoint's hooks run inside the enclosing transaction; the
/// outermost level's run after it closed). Every hook holds a clone of `token`, so once all of
/// them have been settled (run or discarded) and freed, `token` is unique again.
#[derive(Clone, Default)]
pub struct Log {
    rec: common::Recorder,
    token: Arc<()>,
}

impl Log {
    fn mark(label: String) -> String {
        if in_transaction() {
            format!("{label}@tx")
        } else {
            label
        }
    }

    pub fn push(&self, event: String) {
        self.rec.push(event);
    }

    pub fn take(&self) -> Vec<String> {
        self.rec.take()
    }

    /// A hook for `on_commit`, `on_rollback` or `defer`.
    pub fn hook(&self, label: String) -> impl FnOnce() + Send + 'static {
        let Log { rec, token } = self.clone();
        move || {
            let _token = token;
            rec.push(Self::mark(label));
        }
    }

    /// A hook for `on_complete`.
    pub fn complete(&self, label: String) -> impl FnOnce(Outcome) + Send + 'static {
        let Log { rec, token } = self.clone();
        move |outcome| {
            let _token = token;
            rec.push(Self::mark(format!("{label}:{outcome:?}")));
        }
    }

    /// Hooks not freed yet.
    pub fn hooks_alive(&self) -> usize {
        Arc::strong_count(&self.token) - 1
    }
}

/// Makes the process's panic hook quiet for [`ModelPanic`] payloads, and only for them.
pub fn quiet_model_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        common::quiet_panics(|payload| payload.is::<ModelPanic>());
    });
}

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

/// What the model needs to know about a backend.
#[derive(Clone, Debug)]
pub struct Flavour {
    /// A failed statement aborts the whole transaction until the enclosing savepoint is rolled
    /// back (PostgreSQL); otherwise only the statement fails (SQLite, MySQL).
    pub swallowed_error_aborts: bool,
    /// What `transaction` returns when COMMIT fails on the deferred constraint; `None`: the
    /// backend has no deferred constraints (MySQL), `DeferredViolation` is not generated.
    pub commit_violation: Option<Class>,
}

#[derive(Debug)]
enum Hook {
    Commit(String),
    Rollback(String),
    Complete(String),
}

#[derive(Default)]
struct Level {
    /// This level's hooks (and those of its released savepoints), in registration order.
    hooks: Vec<Hook>,
    /// Rows inserted at this level (and in its released savepoints).
    rows: Vec<i32>,
}

/// The rules:
///
/// 1. Hooks belong to the innermost open level; a released savepoint hands its hooks and rows
///    to the enclosing level, order kept. Nothing runs at RELEASE.
/// 2. A level that rolls back (its closure returned `Err` or panicked, or its RELEASE failed)
///    settles its hooks at once, in registration order: `on_rollback` runs,
///    `on_complete(RolledBack)` runs, commit hooks are discarded. Its rows are gone; the
///    enclosing level goes on, healthy again. Hooks of a savepoint run while the enclosing
///    transaction is still open on the thread (logged with `@tx`); those of the outermost level
///    after it closed.
/// 3. The outermost COMMIT succeeding runs `on_commit`/`defer` and `on_complete(Committed)` in
///    registration order; any other end of the outermost level is rule 2, and its result is
///    the closure's error, the panic, the COMMIT's error, or `TransactionAborted`.
/// 4. Where a swallowed error aborts (PostgreSQL), until the level that saw it ends: every
///    statement fails with 25P02 (an `Insert` propagates it, a nested `transaction` cannot
///    create its savepoint and returns it without running its closure, a further swallowed
///    duplicate reports it), hook registration is unaffected, and ending the level with `Ok`
///    rolls it back: a savepoint's RELEASE fails with 25P02 (Diesel rolls back to the
///    savepoint), the outermost returns `TransactionAborted` instead of committing.
struct Model<'f> {
    flavour: &'f Flavour,
    levels: Vec<Level>,
    aborted: bool,
    events: Vec<String>,
}

impl Model<'_> {
    fn top(&mut self) -> &mut Level {
        self.levels.last_mut().expect("a level is open")
    }

    /// Settles the hooks of a level that has just closed.
    fn settle(&mut self, hooks: Vec<Hook>, committed: bool) {
        let outcome = if committed { "Committed" } else { "RolledBack" };
        let mark = if self.levels.is_empty() { "" } else { "@tx" };
        for hook in hooks {
            let label = match hook {
                Hook::Commit(l) if committed => l,
                Hook::Rollback(l) if !committed => l,
                Hook::Complete(l) => format!("{l}:{outcome}"),
                _ => continue,
            };
            self.events.push(format!("{label}{mark}"));
        }
    }

    /// Rule 2 for the innermost level.
    fn roll_back_top(&mut self) {
        let level = self.levels.pop().expect("a level is open");
        self.aborted = false;
        self.settle(level.hooks, false);
    }

    /// Runs `ops`; `Err` is the error the closure returns early with (`?`).
    fn body(&mut self, ops: &[Op]) -> Result<(), Class> {
        for op in ops {
            match op {
                Op::Insert(v) => {
                    if self.aborted {
                        return Err(Class::InFailedTransaction);
                    }
                    self.top().rows.push(*v);
                }
                Op::OnCommit(n) => self.top().hooks.push(Hook::Commit(format!("c{n}"))),
                Op::Defer(n) => self.top().hooks.push(Hook::Commit(format!("d{n}"))),
                Op::OnRollback(n) => self.top().hooks.push(Hook::Rollback(format!("r{n}"))),
                Op::OnComplete(n) => self.top().hooks.push(Hook::Complete(format!("k{n}"))),
                Op::SwallowedError(n) => {
                    let class = if self.aborted {
                        Class::InFailedTransaction
                    } else {
                        Class::UniqueViolation
                    };
                    self.events.push(format!("e{n}={class:?}"));
                    self.aborted |= self.flavour.swallowed_error_aborts;
                }
                Op::Nested(n, ops, ending) => {
                    let class = self.nested(ops, *ending);
                    self.events.push(format!("tx{n}={class:?}"));
                }
            }
        }
        Ok(())
    }

    fn nested(&mut self, ops: &[Op], ending: Ending) -> Class {
        if self.aborted {
            // SAVEPOINT is refused: no level, the closure never runs.
            return Class::InFailedTransaction;
        }
        self.levels.push(Level::default());
        let closed = self.body(ops).and_then(|()| match ending {
            Ending::Ok => Ok(()),
            Ending::Err => Err(Class::UserRollback),
            Ending::Panic => Err(Class::Panicked),
            Ending::DeferredViolation => unreachable!("only generated for the outermost level"),
        });
        match closed {
            Ok(()) if self.aborted => {
                self.roll_back_top();
                Class::InFailedTransaction
            }
            Ok(()) => {
                let level = self.levels.pop().expect("a level is open");
                let parent = self.top();
                parent.hooks.extend(level.hooks);
                parent.rows.extend(level.rows);
                Class::Ok
            }
            Err(class) => {
                self.roll_back_top();
                class
            }
        }
    }

    fn outermost(&mut self, program: &Program) -> (Class, Vec<i32>) {
        self.levels.push(Level {
            hooks: Vec::new(),
            rows: vec![0],
        });
        // `Ok(violates)`: the closure returned `Ok`, having broken a deferred constraint.
        let closed = match self.body(&program.ops) {
            Err(class) => Err(class),
            Ok(()) => match program.ending {
                Ending::Ok => Ok(false),
                Ending::Err => Err(Class::UserRollback),
                Ending::Panic => Err(Class::Panicked),
                // The violating insert itself is refused in an aborted transaction.
                Ending::DeferredViolation if self.aborted => Err(Class::InFailedTransaction),
                Ending::DeferredViolation => Ok(true),
            },
        };
        let class = match closed {
            Ok(_) if self.aborted => Class::Aborted,
            Ok(true) => self
                .flavour
                .commit_violation
                .clone()
                .expect("DeferredViolation is only generated where COMMIT can fail"),
            Ok(false) => {
                let level = self.levels.pop().expect("the outermost level is open");
                self.settle(level.hooks, true);
                let mut rows = level.rows;
                rows.sort_unstable();
                return (Class::Ok, rows);
            }
            Err(class) => class,
        };
        self.roll_back_top();
        (class, Vec::new())
    }
}

/// The scenario table: the situations of README "When hooks run" (and `tests/it/semantics.rs`)
/// written once as programs, run through both drivers (this file's sync suites and
/// `tests/it/async_model.rs`) and checked against the model, beside the generated ones.
pub fn scenarios(flavour: &Flavour) -> Vec<(&'static str, Program)> {
    use Ending::{Err as E, Ok as K, Panic as P};
    use Op::*;
    let n = 0;
    let mut table = vec![
        (
            "commit hooks run after the outermost COMMIT, in registration order across levels",
            vec![
                OnCommit(n),
                Nested(n, vec![OnCommit(n), Defer(n), Nested(n, vec![OnCommit(n), Insert(0)], K)], K),
                OnCommit(n),
            ],
            K,
        ),
        (
            "a savepoint that rolls back discards its commit hooks and runs its rollback hooks at once",
            vec![
                OnCommit(n),
                OnRollback(n),
                Insert(0),
                Nested(
                    n,
                    vec![
                        Insert(0),
                        OnCommit(n),
                        OnRollback(n),
                        OnComplete(n),
                        Nested(n, vec![Insert(0), OnRollback(n)], K),
                    ],
                    E,
                ),
                Insert(0),
            ],
            K,
        ),
        (
            "a rolled back transaction runs every rollback hook of every level, no commit hook",
            vec![
                OnCommit(n),
                OnRollback(n),
                Nested(n, vec![OnRollback(n), OnCommit(n), Defer(n)], K),
                OnComplete(n),
            ],
            E,
        ),
        (
            "a panicking savepoint closure is rolled back, then the panic continues",
            vec![Nested(n, vec![OnRollback(n), OnCommit(n)], P), OnCommit(n)],
            K,
        ),
        (
            "a panicking outermost closure rolls everything back",
            vec![OnCommit(n), OnRollback(n), Nested(n, vec![OnRollback(n)], K)],
            P,
        ),
        (
            "a swallowed statement error",
            vec![Insert(0), OnCommit(n), OnRollback(n), OnComplete(n), SwallowedError(n)],
            K,
        ),
        (
            "a swallowed statement error inside a savepoint whose closure returns Ok",
            vec![
                OnCommit(n),
                Nested(n, vec![OnRollback(n), SwallowedError(n)], K),
                Insert(0),
            ],
            K,
        ),
        (
            "a savepoint opened after a swallowed error",
            vec![SwallowedError(n), Nested(n, vec![OnCommit(n)], K), OnRollback(n)],
            K,
        ),
        (
            "defer in a released savepoint waits for the outermost level, which rolls back",
            vec![Nested(n, vec![Defer(n), OnComplete(n)], K)],
            E,
        ),
    ];
    if flavour.commit_violation.is_some() {
        table.push((
            "a COMMIT that fails on a deferred constraint runs the rollback hooks",
            vec![OnCommit(n), OnRollback(n), OnComplete(n), Insert(0)],
            Ending::DeferredViolation,
        ));
    }
    table
        .into_iter()
        .map(|(name, ops, ending)| (name, Program { ops, ending }.numbered()))
        .collect()
}

/// What the model predicts for `program` on `flavour`.
pub fn expected(program: &Program, flavour: &Flavour) -> Run {
    let mut model = Model {
        flavour,
        levels: Vec::new(),
        aborted: false,
        events: Vec::new(),
    };
    let (result, rows) = model.outermost(program);
    assert!(model.levels.is_empty());
    Run {
        result,
        events: model.events,
        rows,
    }
}

// ---------------------------------------------------------------------------------------------
// The suite, per backend
// ---------------------------------------------------------------------------------------------

/// Samples programs as the suite does (256, fixed seed) and asserts that the model's
/// predictions cover every result class of outermost and nested transactions and of swallowed
/// errors that `flavour` can produce, hooks settled inside and outside a transaction, and 4
/// levels of nesting.
pub fn coverage(flavour: &Flavour) {
    use proptest::strategy::ValueTree;
    use std::collections::BTreeSet;

    fn depth(ops: &[Op]) -> usize {
        let nested = ops.iter().filter_map(|op| match op {
            Op::Nested(_, ops, _) => Some(depth(ops)),
            _ => None,
        });
        1 + nested.max().unwrap_or(0)
    }

    let strategy = programs(flavour.commit_violation.is_some());
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut seen = BTreeSet::new();
    for _ in 0..256 {
        let program = strategy.new_tree(&mut runner).unwrap().current();
        seen.insert(format!("depth {}", depth(&program.ops)));
        let run = expected(&program, flavour);
        seen.insert(format!("outermost={:?}", run.result));
        for event in run.events {
            let (head, class) = event.split_once('=').unwrap_or((&event, ""));
            let kind = head.trim_start_matches(|c: char| c.is_ascii_alphabetic());
            let kind = &head[..head.len() - kind.len()];
            let at = if event.ends_with("@tx") { "@tx" } else { "" };
            let outcome = event.split_once(':').map_or("", |(_, o)| o);
            seen.insert(format!(
                "{kind}{class}{}{at}",
                outcome.trim_end_matches("@tx")
            ));
        }
    }
    let mut want = vec![
        "depth 4".to_owned(),
        "outermost=Ok".into(),
        "outermost=UserRollback".into(),
        "outermost=Panicked".into(),
        "c".into(),
        "d".into(),
        "r".into(),
        "r@tx".into(),
        "kCommitted".into(),
        "kRolledBack".into(),
        "kRolledBack@tx".into(),
        "txOk".into(),
        "txUserRollback".into(),
        "txPanicked".into(),
        "eUniqueViolation".into(),
    ];
    if let Some(class) = &flavour.commit_violation {
        want.push(format!("outermost={class:?}"));
    }
    if flavour.swallowed_error_aborts {
        want.extend([
            "outermost=Aborted".into(),
            "outermost=InFailedTransaction".into(),
            "txInFailedTransaction".into(),
            "eInFailedTransaction".into(),
        ]);
    }
    let missing: Vec<_> = want.iter().filter(|w| !seen.contains(*w)).collect();
    assert!(
        missing.is_empty(),
        "never generated: {missing:?}; seen: {seen:?}"
    );
}

/// Instantiates the suite for one backend, as module `$backend`:
///
/// - `connect`: a fresh, migrated connection (SQLite: a fresh in-memory database);
/// - `deferred_violation`: `Some((f, class))` where `f(conn, tag)` breaks a deferred constraint
///   so that COMMIT fails with `class`, or `None` where the backend has none (no
///   `DeferredViolation` is generated then);
/// - `swallowed_error_aborts`: see [`Flavour`];
/// - `cases`: proptest cases per run (`PROPTEST_CASES` overrides it).
///
macro_rules! model_suite {
    (
        $backend:ident,
        $conn:ty,
        connect = $connect:path,
        deferred_violation = $violation:expr,
        swallowed_error_aborts = $aborts:expr,
        cases = $cases:expr $(,)?
    ) => {
        pub mod $backend {
            use super::*;
            use crate::common::{self, items};
            use diesel::prelude::*;
            use diesel_transaction_signals::{defer, SignalConnection};

            type Conn = SignalConnection<$conn>;
            type Violation = Option<(fn(&mut Conn, &str) -> QueryResult<()>, Class)>;

            const VIOLATION: Violation = $violation;

            pub fn flavour() -> Flavour {
                Flavour {
                    swallowed_error_aborts: $aborts,
                    commit_violation: VIOLATION.map(|(_, class)| class),
                }
            }

            fn insert(conn: &mut Conn, tag: &str, v: i32) -> QueryResult<usize> {
                diesel::insert_into(items::table)
                    .values((items::tag.eq(tag), items::v.eq(v)))
                    .execute(conn)
            }

            fn end(conn: &mut Conn, tag: &str, ending: Ending) -> QueryResult<()> {
                match ending {
                    Ending::Ok => Ok(()),
                    Ending::Err => Err(Error::RollbackTransaction),
                    Ending::Panic => std::panic::panic_any(ModelPanic),
                    Ending::DeferredViolation => {
                        let (violate, _) = VIOLATION.expect("not generated for this backend");
                        violate(conn, tag)
                    }
                }
            }

            fn body(conn: &mut Conn, tag: &str, ops: &[Op], log: &Log) -> QueryResult<()> {
                for op in ops {
                    match op {
                        Op::Insert(v) => {
                            insert(conn, tag, *v)?;
                        }
                        Op::OnCommit(n) => conn.on_commit(log.hook(format!("c{n}"))),
                        Op::OnRollback(n) => conn.on_rollback(log.hook(format!("r{n}"))),
                        Op::OnComplete(n) => conn.on_complete(log.complete(format!("k{n}"))),
                        Op::Defer(n) => defer(log.hook(format!("d{n}"))),
                        Op::SwallowedError(n) => {
                            let class = classify(Ok(insert(conn, tag, 0)));
                            log.push(format!("e{n}={class:?}"));
                        }
                        Op::Nested(n, ops, ending) => {
                            let r = catch_unwind(AssertUnwindSafe(|| {
                                conn.transaction(|c| {
                                    body(c, tag, ops, log)?;
                                    end(c, tag, *ending)
                                })
                            }));
                            log.push(format!("tx{n}={:?}", classify(r)));
                        }
                    }
                }
                Ok(())
            }

            /// Runs `program` on a fresh connection (a fresh database on SQLite) under a fresh
            /// tag, and checks that the connection is left idle and usable.
            pub fn observe(program: &Program) -> Run {
                quiet_model_panics();
                let mut conn: Conn = $connect();
                let tag = common::unique_tag("model");
                let log = Log::default();
                let r = catch_unwind(AssertUnwindSafe(|| {
                    conn.transaction(|c| {
                        insert(c, &tag, 0)?;
                        body(c, &tag, &program.ops, &log)?;
                        end(c, &tag, program.ending)
                    })
                }));
                let result = classify(r);
                let events = log.take();
                assert_eq!(conn.transaction_depth(), 0, "a level was left open");
                assert!(!in_transaction(), "the thread registry kept a level");
                assert_eq!(
                    log.hooks_alive(),
                    0,
                    "hooks were kept after they were settled"
                );
                conn.transaction(|c| {
                    c.on_commit(log.hook("after".into()));
                    QueryResult::Ok(())
                })
                .expect("the connection is usable after the program");
                assert_eq!(log.take(), ["after"], "the connection is usable");
                let rows = items::table
                    .filter(items::tag.eq(&tag))
                    .select(items::v)
                    .order(items::v)
                    .load(&mut conn)
                    .expect("rows can be read");
                Run {
                    result,
                    events,
                    rows,
                }
            }

            /// Runs `program` on the database and on the model; they must agree.
            pub fn check(program: &Program) -> Result<(), TestCaseError> {
                let want = expected(program, &flavour());
                let got = observe(program);
                prop_assert_eq!(&got, &want, "program: {:#?}", program);
                Ok(())
            }

            /// The scenario table, through the sync driver.
            #[test]
            fn scenarios_agree_with_the_model() {
                for (name, program) in scenarios(&flavour()) {
                    if let Err(e) = check(&program) {
                        panic!("scenario \"{name}\": {e}");
                    }
                }
            }

            /// The generator keeps reaching every rule of the model on this flavour (checked on
            /// the model alone, so it costs no database time).
            #[test]
            fn generator_reaches_every_rule() {
                coverage(&flavour());
            }

            proptest! {
                #![proptest_config(config($cases))]

                #[test]
                fn programs_agree_with_the_model(program in programs(VIOLATION.is_some())) {
                    check(&program)?;
                }
            }
        }
    };
}

pub fn violate_sqlite_fk(
    conn: &mut diesel_transaction_signals::SignalConnection<diesel::SqliteConnection>,
    _tag: &str,
) -> QueryResult<()> {
    use diesel::prelude::*;
    diesel::insert_into(common::children::table)
        .values(common::children::parent_id.eq(-1))
        .execute(conn)
        .map(drop)
}

pub fn violate_pg_deferred_unique(
    conn: &mut diesel_transaction_signals::SignalConnection<diesel::PgConnection>,
    tag: &str,
) -> QueryResult<()> {
    use diesel::prelude::*;
    for _ in 0..2 {
        diesel::insert_into(common::deferred_items::table)
            .values((
                common::deferred_items::tag.eq(tag),
                common::deferred_items::v.eq(1),
            ))
            .execute(conn)?;
    }
    Ok(())
}

model_suite!(
    sqlite,
    diesel::SqliteConnection,
    connect = common::sqlite,
    deferred_violation = Some((crate::model::violate_sqlite_fk, Class::ForeignKeyViolation)),
    swallowed_error_aborts = false,
    cases = 256,
);

model_suite!(
    postgres,
    diesel::PgConnection,
    connect = common::pg,
    deferred_violation = Some((
        crate::model::violate_pg_deferred_unique,
        Class::UniqueViolation
    )),
    swallowed_error_aborts = true,
    cases = 64,
);

model_suite!(
    mysql,
    diesel::MysqlConnection,
    connect = common::mysql,
    deferred_violation = None,
    swallowed_error_aborts = false,
    cases = 64,
);
