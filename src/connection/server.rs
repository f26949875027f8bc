//! What the server did on its own: how the wrapper learns, at the moment it happens, that the
//! database ended the transaction without the inner connection noticing, and feeds that fact
//! to the ledger (row E1, "lose"), so that the caller's levels settle with the truth and no
//! statement runs outside the transaction the caller believes open.
//!
//! | backend | what ends a transaction on its own | how the wrapper learns it | fate |
//! |---|---|---|---|
//! | SQLite | `INSERT OR ROLLBACK`, a trigger's `RAISE(ROLLBACK, ..)`, some I/O and memory errors | after a statement fails inside a transaction: one probe (`ROLLBACK TO` a savepoint that never exists, which fails either way and makes Diesel re-read SQLite's autocommit state) | `RolledBack` |
//! | MySQL / MariaDB | a deadlock | Diesel flags it (`SerializationFailure`) on the failed statement | `RolledBack` |
//! | MySQL / MariaDB | a lock wait timeout with `innodb_rollback_on_timeout` | the error, then `@@in_transaction` | `RolledBack` |
//! | MySQL / MariaDB | an implicit commit (DDL, `LOCK TABLES`, ...) sent with `batch_execute` (migrations) | the statement's first keyword, then `@@in_transaction` | `Committed`: the statements after it run in autocommit, as the server runs them |
//! | MySQL / MariaDB | the same sent with `sql_query` (raw SQL whose text the wrapper does not see) | `RELEASE`/`ROLLBACK TO SAVEPOINT` failing with "SAVEPOINT ... does not exist", or `@@in_transaction` asked before a top-level `ROLLBACK` of a transaction in which raw SQL ran | `Unknown` |
//! | any | raw `COMMIT`/`ROLLBACK` sent with `batch_execute` | the inner status after it (PostgreSQL), or the probes above | `Unknown` |
//!
//! PostgreSQL never ends a transaction on its own after an error: it aborts it and refuses every
//! statement until the rollback, which Diesel reports as `aborted` and the ledger handles at
//! COMMIT (row C4).

use diesel::connection::Connection;
use diesel::result::{DatabaseErrorKind, Error};

use super::manager::{read_status, reset_status};
use super::SignalConnection;
use crate::error::TransactionAborted;
use crate::ledger::Status;
use crate::outcome::Outcome;

/// A savepoint name no level ever uses: `ROLLBACK TO` it always fails, without effect.
const SQLITE_PROBE: &str = "ROLLBACK TO dts_autocommit_probe";

impl<C: Connection + 'static> SignalConnection<C> {
    /// Moves `defer`red hooks into place and makes the ledger agree with the inner status:
    /// levels that ended behind the wrapper's back settle `Unknown` (row S1), a deadlock
    /// MySQL flagged is lost (row E1). Called at the start of every transaction operation.
    /// Returns the inner status it read (`None` when no level is open and it did not look).
    #[inline]
    pub(crate) fn sync(&mut self) -> Option<Status> {
        self.book.drain_inbox();
        if self.book.ledger.depth() == 0 {
            return None;
        }
        if self.book.check_pending {
            self.book.check_pending = false;
            self.statement_failed(None);
        }
        let inner = read_status(&mut self.inner);
        if self.book.ledger.lost().is_none() {
            if let Some(step) = self.book.ledger.vanished(inner) {
                self.levels_vanished(inner, step);
            } else if self.book.mysql && matches!(inner, Status::Open { aborted: true, .. }) {
                self.lose(Outcome::RolledBack, "a deadlock");
                return Some(read_status(&mut self.inner));
            }
        }
        Some(inner)
    }

    #[cold]
    fn levels_vanished(&mut self, inner: Status, step: crate::ledger::Step) {
        log::warn!(
            target: "diesel_transaction_signals",
            "connection {}: {} transaction level(s) ended without the wrapper \
             (raw COMMIT/ROLLBACK SQL, or a transaction driven through inner_mut())",
            self.book.label,
            self.book.ledger.depth() - inner.depth()
        );
        self.book.apply(step);
    }

    /// Row E1: the server ended the transaction. Diesel's status is set to "no transaction"
    /// (what the server has), the caller's levels stay open with `fate`, and statements are
    /// refused until the caller's outermost level ends.
    #[cold]
    pub(crate) fn lose(&mut self, fate: Outcome, cause: &str) {
        if self.book.lose(fate, cause) {
            reset_status(&mut self.inner);
        }
    }

    /// Refuses a statement while the caller's transaction is one the server ended, and runs
    /// the check a failed `load` left for the next statement.
    #[inline(always)]
    pub(crate) fn before_statement(&mut self) -> Result<(), Error> {
        if self.book.check_pending {
            self.book.check_pending = false;
            self.statement_failed(None);
        }
        if self.book.ledger.refuses_statements() {
            return Err(TransactionAborted::statement_error());
        }
        Ok(())
    }

    /// After a statement failed inside a transaction: did the server end the transaction?
    #[cold]
    pub(crate) fn statement_failed(&mut self, error: Option<&Error>) {
        if self.book.ledger.live_depth() == 0 {
            return;
        }
        match read_status(&mut self.inner) {
            Status::Open { aborted: true, .. } if self.book.mysql => {
                self.lose(Outcome::RolledBack, "a deadlock")
            }
            Status::Open { .. } if self.book.mysql => {
                // With innodb_rollback_on_timeout a lock wait timeout rolls the whole
                // transaction back; by default only the statement. Ask only then.
                let timeout = match error {
                    Some(Error::DatabaseError(_, info)) => {
                        info.message().starts_with("Lock wait timeout")
                    }
                    _ => false,
                };
                if timeout {
                    self.verify_still_open(Outcome::RolledBack, "a lock wait timeout");
                }
            }
            Status::Open { .. } if self.book.backend == "sqlite" => {
                // Fails either way; in autocommit Diesel then resets its status.
                let _ = self.inner.batch_execute(SQLITE_PROBE);
                if read_status(&mut self.inner) == Status::Idle {
                    self.lose(
                        Outcome::RolledBack,
                        "a statement's error rolled the whole transaction back",
                    );
                }
            }
            Status::Idle if self.book.backend == "sqlite" => self.lose(
                Outcome::RolledBack,
                "a statement's error rolled the whole transaction back",
            ),
            _ => {}
        }
    }

    /// After `batch_execute(sql)` succeeded inside a transaction: raw SQL may have ended it.
    #[cold]
    pub(crate) fn batch_ran(&mut self, sql: &str) {
        if self.book.ledger.live_depth() == 0 {
            return;
        }
        let ending = ends_transaction(sql, self.book.mysql);
        if self.book.mysql {
            match ending {
                // Raw COMMIT/ROLLBACK SQL: not the wrapper's to interpret.
                Some(Ending::Explicit) => self
                    .verify_still_open(Outcome::Unknown, "raw SQL ended it (COMMIT or ROLLBACK)"),
                // A statement that succeeded after an implicit commit: MySQL committed the
                // transaction before running it.
                Some(Ending::Implicit) => self.verify_still_open(
                    Outcome::Committed,
                    "an implicit commit before DDL or LOCK TABLES",
                ),
                None => {}
            }
            return;
        }
        if self.book.backend == "sqlite" && ending.is_some() {
            let _ = self.inner.batch_execute(SQLITE_PROBE);
        }
        let inner = read_status(&mut self.inner);
        if inner.depth() < self.book.ledger.live_depth() {
            self.lose(Outcome::Unknown, "raw SQL ended it (COMMIT or ROLLBACK)");
        }
    }

    /// MySQL: asks the server whether the transaction is still open (`@@in_transaction`,
    /// MariaDB; MySQL 8 cannot say, and nothing is assumed); if not, the transaction is lost
    /// with `fate`. Called only where the answer decides an outcome: after a statement that
    /// may commit implicitly, after a lock wait timeout, and before the top-level rollback of
    /// a transaction in which raw SQL (`sql_query`) ran.
    pub(crate) fn verify_still_open(&mut self, fate: Outcome, cause: &str) {
        self.book.unverified = false;
        #[cfg(feature = "mysql")]
        if self.book.mysql && self.book.ledger.live_depth() > 0 {
            let inner: &mut dyn std::any::Any = &mut self.inner;
            if crate::mysql::in_transaction(inner) == Some(false) {
                self.lose(fate, cause);
            }
        }
        #[cfg(not(feature = "mysql"))]
        let _ = (fate, cause);
    }

    /// Whether `err`, from `RELEASE` or `ROLLBACK TO SAVEPOINT`, says the savepoint is gone
    /// because the server ended the transaction; if so, the transaction is lost (`Unknown`:
    /// an implicit commit and a rollback look the same from here).
    pub(crate) fn savepoint_gone(&mut self, err: &Error) -> bool {
        if self.book.ledger.depth() < 2 && self.book.ledger.lost().is_none() {
            return false;
        }
        let message = match err {
            Error::DatabaseError(DatabaseErrorKind::Unknown, info) => info.message(),
            _ => return false,
        };
        let gone = (message.starts_with("SAVEPOINT") && message.ends_with("does not exist"))
            || message.starts_with("no such savepoint");
        if gone && self.book.ledger.lost().is_none() {
            let fate = if self.book.mysql {
                Outcome::Unknown
            } else {
                Outcome::RolledBack
            };
            self.lose(fate, "its savepoint no longer exists");
        }
        gone
    }
}

/// How a batch of raw SQL may end the open transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// `COMMIT`, `END` or `ROLLBACK` (not `ROLLBACK TO`): it ends it, one way or the other.
    Explicit,
    /// MySQL: a statement that commits implicitly before it runs (DDL, `LOCK TABLES`, ...).
    Implicit,
}

/// Whether a statement of `sql` starts with a keyword that may end the open transaction: an
/// explicit end anywhere, an implicit commit on MySQL (`mysql`). An explicit end wins.
pub(crate) fn ends_transaction(sql: &str, mysql: bool) -> Option<Ending> {
    const IMPLICIT_COMMIT: &[&str] = &[
        "ALTER",
        "ANALYZE",
        "BEGIN",
        "CACHE",
        "CHANGE",
        "CREATE",
        "DROP",
        "FLUSH",
        "GRANT",
        "INSTALL",
        "LOAD",
        "LOCK",
        "OPTIMIZE",
        "RENAME",
        "REPAIR",
        "RESET",
        "REVOKE",
        "SET",
        "START",
        "STOP",
        "TRUNCATE",
        "UNINSTALL",
        "UNLOCK",
        "XA",
    ];
    let mut found = None;
    for statement in sql.split(';') {
        let mut words = statement
            .split(|c: char| c.is_whitespace() || c == '(')
            .filter(|w| !w.is_empty());
        let ending = match words.next() {
            Some(w) if w.eq_ignore_ascii_case("ROLLBACK") => {
                (!words.next().is_some_and(|w| w.eq_ignore_ascii_case("TO")))
                    .then_some(Ending::Explicit)
            }
            Some(w) if w.eq_ignore_ascii_case("COMMIT") || w.eq_ignore_ascii_case("END") => {
                Some(Ending::Explicit)
            }
            Some(w) if mysql && IMPLICIT_COMMIT.iter().any(|k| w.eq_ignore_ascii_case(k)) => {
                Some(Ending::Implicit)
            }
            _ => None,
        };
        match ending {
            Some(Ending::Explicit) => return ending,
            Some(Ending::Implicit) => found = ending,
            None => {}
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::{ends_transaction, Ending};

    #[test]
    fn keywords_that_may_end_a_transaction() {
        let implicit = Some(Ending::Implicit);
        let explicit = Some(Ending::Explicit);
        assert_eq!(ends_transaction("CREATE TABLE t (id INT)", true), implicit);
        assert_eq!(ends_transaction("CREATE TABLE t (id INT)", false), None);
        assert_eq!(
            ends_transaction("insert into t values (1); commit", false),
            explicit
        );
        assert_eq!(ends_transaction("  rollback", true), explicit);
        assert_eq!(
            ends_transaction("CREATE TABLE t (id INT); ROLLBACK", true),
            explicit
        );
        assert_eq!(ends_transaction("ROLLBACK TO SAVEPOINT s", true), None);
        assert_eq!(ends_transaction("INSERT INTO t VALUES (1)", true), None);
        assert_eq!(ends_transaction("SELECT 1; UPDATE t SET v = 2", true), None);
    }
}
