//! MySQL / MariaDB: what the wrapper does about statements that commit implicitly.
//!
//! MySQL commits the open transaction implicitly before DDL (`CREATE`, `ALTER`, `DROP`, ...),
//! `LOCK TABLES` and a few other statements, and the statements after them run in autocommit
//! mode: a later `ROLLBACK` undoes nothing, and savepoints are gone. Diesel does not notice.
//! The server also ends a transaction on its own after some errors: a deadlock (which Diesel
//! flags, so the wrapper knows it rolled back) or, with `innodb_rollback_on_timeout`, a lock
//! wait timeout (which it does not).
//!
//! Before settling a rollback, the wrapper asks the server (`@@in_transaction`, MariaDB) whether
//! the transaction is still open. If it is not and Diesel did not flag a rollback, the wrapper
//! cannot know whether the work was committed implicitly or rolled back: the levels settle as
//! [`Unknown`](crate::Outcome::Unknown) (no commit hook, no rollback hook, `on_complete` gets
//! `Unknown`, each dropped hook logged at error level) and a warning is logged. On MySQL 8,
//! which has no `@@in_transaction`, the check is skipped. A COMMIT after an implicit commit
//! succeeds and settles `Committed`, which is right: everything was committed.

use std::any::Any;

use diesel::prelude::*;
use diesel::MysqlConnection;

#[derive(QueryableByName)]
pub(crate) struct InTransaction {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(crate) open: i64,
}

/// Whether the server still has a transaction open on `conn`; `None` when `conn` is not a
/// `MysqlConnection` or the server cannot say.
pub(crate) fn in_transaction(conn: &mut dyn Any) -> Option<bool> {
    let conn = conn.downcast_mut::<MysqlConnection>()?;
    diesel::sql_query("SELECT CAST(@@in_transaction AS SIGNED) AS open")
        .get_result::<InTransaction>(conn)
        .ok()
        .map(|r| r.open != 0)
}
