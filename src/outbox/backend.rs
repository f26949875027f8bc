//! The outbox's SQL, per backend.
//!
//! Times are milliseconds since the Unix epoch read from the database's clock, so relays on
//! several machines agree on leases. Id lists are formatted as integer literals (safe: they are
//! `i64`s); everything else is bound.
//!
//! Each backend module builds every relay statement once, in a function returning the query
//! object (a `cached_statement!` node on PostgreSQL, a boxed `sql_query` on SQLite and MySQL);
//! the sync [`OutboxConnection`] impls here run them with Diesel's `RunQueryDsl`, and
//! `async_backend.rs` runs the very same objects with diesel-async's.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Nullable, Text};

use crate::SignalConnection;

/// A job row to insert.
#[derive(Debug, Clone)]
#[doc(hidden)]
pub struct NewRow {
    pub(crate) queue: String,
    pub(crate) payload: String,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) max_attempts: i32,
    pub(crate) delay_ms: i64,
}

/// A row claimed by a relay.
#[derive(Debug, Clone, QueryableByName)]
#[doc(hidden)]
pub struct ClaimedRow {
    #[diesel(sql_type = BigInt)]
    pub(crate) id: i64,
    #[diesel(sql_type = Text)]
    pub(crate) queue: String,
    #[diesel(sql_type = Text)]
    pub(crate) payload: String,
    #[diesel(sql_type = Integer)]
    pub(crate) attempts: i32,
    #[diesel(sql_type = Integer)]
    pub(crate) max_attempts: i32,
    #[diesel(sql_type = Nullable<Text>)]
    pub(crate) idempotency_key: Option<String>,
    #[diesel(sql_type = BigInt)]
    pub(crate) run_at: i64,
}

#[derive(QueryableByName)]
pub(super) struct Id {
    #[diesel(sql_type = BigInt)]
    pub(super) id: i64,
}

#[derive(QueryableByName)]
pub(super) struct QueueCount {
    #[diesel(sql_type = Text)]
    queue: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

pub(super) mod sealed {
    pub trait Sealed {}
}

/// A connection the outbox can write to and a [`Relay`](super::Relay) can claim from:
/// `SqliteConnection`, `PgConnection`, `MysqlConnection` (with their features) and
/// [`SignalConnection`] of any of them. Sealed: the SQL is the crate's.
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel_transaction_signals::outbox::OutboxConnection;
/// fn takes<C: OutboxConnection>() {}
/// takes::<diesel::SqliteConnection>();
/// takes::<diesel_transaction_signals::SignalConnection<diesel::SqliteConnection>>();
/// # }
/// ```
pub trait OutboxConnection: Connection + sealed::Sealed + Send + 'static {
    #[doc(hidden)]
    fn outbox_insert(&mut self, row: &NewRow) -> QueryResult<Option<i64>>;
    /// Writes many rows, in order; returns how many were written (an idempotency key already
    /// present, or repeated among `rows`, is a no-op). Multi-row statements: one on
    /// PostgreSQL (arrays bound as parameters), one per `chunks` piece on SQLite and MySQL.
    #[doc(hidden)]
    fn outbox_insert_many(&mut self, rows: &[NewRow]) -> QueryResult<usize> {
        let mut written = 0;
        for row in rows {
            written += usize::from(self.outbox_insert(row)?.is_some());
        }
        Ok(written)
    }
    /// Leases up to `limit` due rows of the queues in `queues_json` that are not paused
    /// (`dts_outbox_paused`, checked in the same statement: a pause takes effect at the next
    /// claim).
    #[doc(hidden)]
    fn outbox_claim(
        &mut self,
        owner: &str,
        queues_json: &str,
        limit: i64,
        lease_ms: i64,
    ) -> QueryResult<Vec<ClaimedRow>>;
    /// The concrete connection, for the operations of [`Admin`](super::Admin).
    #[doc(hidden)]
    fn outbox_admin(&mut self) -> QueryResult<AdminDb<'_>>;
    /// Deletes the rows of `ids` still leased to `owner` (a worker's lease owner); returns how
    /// many it deleted. A row whose lease expired and which another worker claimed since is
    /// left to that worker.
    #[doc(hidden)]
    fn outbox_complete(&mut self, owner: &str, ids: &[i64]) -> QueryResult<usize>;
    #[doc(hidden)]
    /// Records a failed attempt; returns `false` when the row is no longer leased to `owner`
    /// (its lease expired and another worker took it: nothing is changed then).
    fn outbox_fail(
        &mut self,
        owner: &str,
        id: i64,
        error: &str,
        delay_ms: i64,
        dead: bool,
    ) -> QueryResult<bool>;
    #[doc(hidden)]
    fn outbox_release(&mut self, owner: &str, ids: &[i64]) -> QueryResult<()>;
    #[doc(hidden)]
    fn outbox_unknown_queues(&mut self, queues_json: &str) -> QueryResult<Vec<(String, i64)>>;
}

/// The concrete connection under an [`OutboxConnection`], for the SQL of
/// [`Admin`](super::Admin).
#[doc(hidden)]
#[allow(missing_debug_implementations)]
pub enum AdminDb<'a> {
    #[cfg(feature = "postgres")]
    Pg(&'a mut diesel::PgConnection),
    #[cfg(feature = "sqlite")]
    Sqlite(&'a mut diesel::SqliteConnection),
    #[cfg(feature = "mysql")]
    Mysql(&'a mut diesel::MysqlConnection),
    #[doc(hidden)]
    _Never(
        std::convert::Infallible,
        std::marker::PhantomData<&'a mut ()>,
    ),
}

/// Runs a query node on a sync connection: `run_sync!(load q, conn)` (or `execute`,
/// `get_result`). The insert paths below are written once, with the runner as a parameter;
/// `async_backend.rs` passes `run_async!`, which awaits diesel-async's method instead.
#[allow(unused_macros)]
macro_rules! run_sync {
    ($method:ident $q:expr, $conn:expr) => {
        diesel::RunQueryDsl::$method($q, $conn)
    };
}

/// The claim's pause check, the same SQL on every backend.
#[allow(unused_macros)]
macro_rules! not_paused {
    () => {
        "AND NOT EXISTS (SELECT 1 FROM dts_outbox_paused p WHERE p.queue = dts_outbox.queue) "
    };
}

/// `DELETE` of delivered rows still leased to the owner bound as `?` (SQLite and MySQL;
/// PostgreSQL binds an array instead).
#[cfg(any(feature = "sqlite", feature = "mysql"))]
fn delete_sql(ids: &[i64]) -> String {
    format!(
        "DELETE FROM dts_outbox WHERE id IN ({}) AND locked_by = ?",
        id_list(ids)
    )
}

#[cfg(any(feature = "sqlite", feature = "mysql"))]
pub(crate) fn id_list(ids: &[i64]) -> String {
    let mut s = String::with_capacity(ids.len() * 8);
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&id.to_string());
    }
    s
}

/// Splits `rows` into runs of at most `max_rows` rows and (past the first row of a run)
/// `max_bytes` bytes of payload and key: one multi-row INSERT each, within the backend's
/// bind-parameter limit (5 per row) and packet size.
#[cfg_attr(not(any(feature = "sqlite", feature = "mysql")), allow(dead_code))]
pub(crate) fn chunks(rows: &[NewRow], max_rows: usize, max_bytes: usize) -> Vec<&[NewRow]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, row) in rows.iter().enumerate() {
        let size = row.queue.len()
            + row.payload.len()
            + row.idempotency_key.as_ref().map_or(0, String::len);
        if i > start && (i - start == max_rows || bytes + size > max_bytes) {
            out.push(&rows[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < rows.len() {
        out.push(&rows[start..]);
    }
    out
}

/// `INSERT INTO dts_outbox (...) VALUES (?, ?, ?, ?, <now> + ?), ... <tail>` for the backends
/// with `?` placeholders: the SQL text depends on the row count, so it is not kept as a
/// prepared statement (one per batch size would fill the connection's cache).
#[cfg(any(feature = "sqlite", feature = "mysql"))]
pub(in crate::outbox) struct MultiInsert<'a> {
    rows: &'a [NewRow],
    now_ms: &'static str,
    tail: &'static str,
}

#[cfg(any(feature = "sqlite", feature = "mysql"))]
impl diesel::query_builder::QueryId for MultiInsert<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

#[cfg(any(feature = "sqlite", feature = "mysql"))]
macro_rules! multi_insert_for {
    ($backend:ty, $conn:ty) => {
        impl diesel::query_builder::QueryFragment<$backend> for MultiInsert<'_> {
            fn walk_ast<'b>(
                &'b self,
                mut out: diesel::query_builder::AstPass<'_, 'b, $backend>,
            ) -> QueryResult<()> {
                out.unsafe_to_cache_prepared();
                out.push_sql(
                    "INSERT INTO dts_outbox (queue, payload, idempotency_key, max_attempts, \
                     run_at) VALUES ",
                );
                for (i, row) in self.rows.iter().enumerate() {
                    out.push_sql(if i == 0 { "(" } else { ", (" });
                    out.push_bind_param::<Text, _>(&row.queue)?;
                    out.push_sql(", ");
                    out.push_bind_param::<Text, _>(&row.payload)?;
                    out.push_sql(", ");
                    out.push_bind_param::<Nullable<Text>, _>(&row.idempotency_key)?;
                    out.push_sql(", ");
                    out.push_bind_param::<Integer, _>(&row.max_attempts)?;
                    out.push_sql(", ");
                    out.push_sql(self.now_ms);
                    out.push_sql(" + ");
                    out.push_bind_param::<BigInt, _>(&row.delay_ms)?;
                    out.push_sql(")");
                }
                out.push_sql(self.tail);
                Ok(())
            }
        }
        impl RunQueryDsl<$conn> for MultiInsert<'_> {}
    };
}

impl<C: OutboxConnection> sealed::Sealed for SignalConnection<C> {}

impl<C: OutboxConnection> OutboxConnection for SignalConnection<C> {
    fn outbox_insert(&mut self, row: &NewRow) -> QueryResult<Option<i64>> {
        self.check_transaction()?;
        self.inner_mut().outbox_insert(row)
    }
    fn outbox_insert_many(&mut self, rows: &[NewRow]) -> QueryResult<usize> {
        self.check_transaction()?;
        self.inner_mut().outbox_insert_many(rows)
    }
    fn outbox_claim(
        &mut self,
        owner: &str,
        queues_json: &str,
        limit: i64,
        lease_ms: i64,
    ) -> QueryResult<Vec<ClaimedRow>> {
        self.inner_mut()
            .outbox_claim(owner, queues_json, limit, lease_ms)
    }
    fn outbox_admin(&mut self) -> QueryResult<AdminDb<'_>> {
        self.check_transaction()?;
        self.inner_mut().outbox_admin()
    }
    fn outbox_complete(&mut self, owner: &str, ids: &[i64]) -> QueryResult<usize> {
        self.inner_mut().outbox_complete(owner, ids)
    }
    fn outbox_fail(
        &mut self,
        owner: &str,
        id: i64,
        error: &str,
        delay_ms: i64,
        dead: bool,
    ) -> QueryResult<bool> {
        self.inner_mut()
            .outbox_fail(owner, id, error, delay_ms, dead)
    }
    fn outbox_release(&mut self, owner: &str, ids: &[i64]) -> QueryResult<()> {
        self.inner_mut().outbox_release(owner, ids)
    }
    fn outbox_unknown_queues(&mut self, queues_json: &str) -> QueryResult<Vec<(String, i64)>> {
        self.inner_mut().outbox_unknown_queues(queues_json)
    }
}

/// The relay statements of the backends with `?` placeholders (SQLite, MySQL) that are the
/// same SQL on both, with the module's `NOW_MS` and `Db` backend: `complete`, `fail` and
/// `release`, each a function returning the boxed query.
#[allow(unused_macros)]
macro_rules! question_mark_queries {
    () => {
        /// `DELETE` of delivered rows still leased to `owner`.
        pub(in crate::outbox) fn complete<'a>(owner: &'a str, ids: &[i64]) -> Stmt<'a> {
            diesel::sql_query(delete_sql(ids))
                .into_boxed()
                .bind::<Text, _>(owner)
        }

        /// Records a failed attempt of a row still leased to `owner`.
        pub(in crate::outbox) fn fail<'a>(
            owner: &'a str,
            id: i64,
            error: &'a str,
            delay_ms: i64,
            dead: bool,
        ) -> Stmt<'a> {
            diesel::sql_query(format!(
                "UPDATE dts_outbox SET locked_until = NULL, locked_by = NULL, last_error = ?, \
                 run_at = {NOW_MS} + ?, state = ? WHERE id = ? AND locked_by = ?"
            ))
            .into_boxed()
            .bind::<Text, _>(error)
            .bind::<BigInt, _>(delay_ms)
            .bind::<Integer, _>(if dead { 2 } else { 0 })
            .bind::<BigInt, _>(id)
            .bind::<Text, _>(owner)
        }

        /// Gives claimed rows back unrun (the attempt they were claimed for is not counted).
        pub(in crate::outbox) fn release<'a>(owner: &'a str, ids: &[i64]) -> Stmt<'a> {
            diesel::sql_query(format!(
                "UPDATE dts_outbox SET locked_until = NULL, locked_by = NULL, \
                 attempts = attempts - 1 WHERE id IN ({}) AND locked_by = ?",
                id_list(ids)
            ))
            .into_boxed()
            .bind::<Text, _>(owner)
        }
    };
}

/// The sync `outbox_complete`, `outbox_fail`, `outbox_release` and `outbox_unknown_queues` of a
/// backend module, running its query functions.
#[allow(unused_macros)]
macro_rules! sync_relay_statements {
    () => {
        fn outbox_complete(&mut self, owner: &str, ids: &[i64]) -> QueryResult<usize> {
            if ids.is_empty() {
                return Ok(0);
            }
            complete(owner, ids).execute(self)
        }

        fn outbox_fail(
            &mut self,
            owner: &str,
            id: i64,
            error: &str,
            delay_ms: i64,
            dead: bool,
        ) -> QueryResult<bool> {
            fail(owner, id, error, delay_ms, dead)
                .execute(self)
                .map(|n| n == 1)
        }

        fn outbox_release(&mut self, owner: &str, ids: &[i64]) -> QueryResult<()> {
            if ids.is_empty() {
                return Ok(());
            }
            release(owner, ids).execute(self).map(drop)
        }

        fn outbox_unknown_queues(&mut self, queues_json: &str) -> QueryResult<Vec<(String, i64)>> {
            unknown_queues(queues_json).load(self).map(counts)
        }
    };
}

pub(super) fn counts(rows: Vec<QueueCount>) -> Vec<(String, i64)> {
    rows.into_iter().map(|r| (r.queue, r.n)).collect()
}

#[cfg(feature = "postgres")]
pub(super) mod pg {
    use super::*;
    use diesel::pg::Pg;
    use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
    use diesel::sql_types::{Array, Untyped};
    use diesel::PgConnection;

    /// `now()` in ms since the epoch, as SQL text (a macro, to build `&'static str`s).
    /// `date_part` (float8), not `extract`: since PostgreSQL 14 `extract` returns numeric,
    /// several times slower to compute; both round to the millisecond (they differ by 1 ms only
    /// at an exact half millisecond, where float8 rounds half to even; float8's error stays
    /// below a microsecond until the 2240s). PostgreSQL 13's `extract` was this very
    /// `date_part`.
    macro_rules! now_ms {
        () => {
            "(date_part('epoch', now()) * 1000)::BIGINT"
        };
    }

    /// The hot statements as query nodes whose SQL text never varies: unlike `sql_query`
    /// (which Diesel never caches), Diesel keeps them as named prepared statements per
    /// connection, so PostgreSQL parses them once per connection instead of at every call.
    /// `$name { fields } => [sql, bind, sql, bind, ..., sql]` in SQL order.
    macro_rules! cached_statement {
        ($name:ident { $($field:ident: $fty:ty),* $(,)? }
         => [$first:expr $(, ($bty:ty, $bind:ident), $sql:expr)* $(,)?]) => {
            pub(in crate::outbox) struct $name<'a> {
                $(pub(in crate::outbox) $field: $fty,)*
            }
            impl QueryId for $name<'_> {
                type QueryId = $name<'static>;
                const HAS_STATIC_QUERY_ID: bool = true;
            }
            impl QueryFragment<Pg> for $name<'_> {
                fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
                    out.push_sql($first);
                    $(
                        out.push_bind_param::<$bty, _>(&self.$bind)?;
                        out.push_sql($sql);
                    )*
                    Ok(())
                }
            }
            impl Query for $name<'_> {
                type SqlType = Untyped;
            }
            impl RunQueryDsl<PgConnection> for $name<'_> {}
        };
    }

    cached_statement!(Insert { queue: &'a str, payload: &'a str, key: Option<&'a str>,
                               max_attempts: i32, delay_ms: i64 } => [
        "INSERT INTO dts_outbox (queue, payload, idempotency_key, max_attempts, run_at) VALUES (",
        (Text, queue), ", ", (Text, payload), ", ", (Nullable<Text>, key), ", ",
        (Integer, max_attempts), concat!(", ", now_ms!(), " + "), (BigInt, delay_ms),
        ") ON CONFLICT (queue, idempotency_key) DO NOTHING RETURNING id",
    ]);

    // A row without an idempotency key can never conflict (NULLs are distinct in the unique
    // index): a plain INSERT, without ON CONFLICT's speculative insertion.
    cached_statement!(InsertNoKey { queue: &'a str, payload: &'a str, max_attempts: i32,
                                    delay_ms: i64 } => [
        "INSERT INTO dts_outbox (queue, payload, max_attempts, run_at) VALUES (",
        (Text, queue), ", ", (Text, payload), ", ",
        (Integer, max_attempts), concat!(", ", now_ms!(), " + "), (BigInt, delay_ms),
        ") RETURNING id",
    ]);

    // The same without RETURNING, for a batch of one (the id is not wanted there).
    cached_statement!(InsertOneNoKey { queue: &'a str, payload: &'a str, max_attempts: i32,
                                       delay_ms: i64 } => [
        "INSERT INTO dts_outbox (queue, payload, max_attempts, run_at) VALUES (",
        (Text, queue), ", ", (Text, payload), ", ",
        (Integer, max_attempts), concat!(", ", now_ms!(), " + "), (BigInt, delay_ms),
        ")",
    ]);

    cached_statement!(InsertManyNoKey { queues: Vec<&'a str>, payloads: Vec<&'a str>,
                                        max_attempts: Vec<i32>, delays_ms: Vec<i64> } => [
        concat!(
            "INSERT INTO dts_outbox (queue, payload, max_attempts, run_at) ",
            "SELECT q, p, m, ", now_ms!(), " + d FROM unnest("
        ),
        (Array<Text>, queues), ", ", (Array<Text>, payloads), ", ",
        (Array<Integer>, max_attempts), ", ", (Array<BigInt>, delays_ms),
        ") WITH ORDINALITY AS t (q, p, m, d, n) ORDER BY n",
    ]);

    cached_statement!(InsertMany { queues: Vec<&'a str>, payloads: Vec<&'a str>,
                                   keys: Vec<Option<&'a str>>, max_attempts: Vec<i32>,
                                   delays_ms: Vec<i64> } => [
        concat!(
            "INSERT INTO dts_outbox (queue, payload, idempotency_key, max_attempts, run_at) ",
            "SELECT q, p, k, m, ", now_ms!(), " + d FROM unnest("
        ),
        (Array<Text>, queues), ", ", (Array<Text>, payloads), ", ",
        (Array<Nullable<Text>>, keys), ", ", (Array<Integer>, max_attempts), ", ",
        (Array<BigInt>, delays_ms),
        ") WITH ORDINALITY AS t (q, p, k, m, d, n) ORDER BY n \
         ON CONFLICT (queue, idempotency_key) DO NOTHING",
    ]);

    // `id = ANY(ARRAY(subquery))`: the outer UPDATE finds the claimed rows by primary key
    // instead of hashing a sequential scan of the whole table against them.
    cached_statement!(Claim { lease_ms: i64, owner: &'a str, queues_json: &'a str,
                              limit: i64 } => [
        concat!("UPDATE dts_outbox SET locked_until = ", now_ms!(), " + "),
        (BigInt, lease_ms), ", locked_by = ", (Text, owner),
        concat!(
            ", attempts = attempts + 1 WHERE id = ANY(ARRAY(SELECT id FROM dts_outbox ",
            "WHERE state = 0 AND run_at <= ", now_ms!(),
            " AND (locked_until IS NULL OR locked_until < ", now_ms!(), ") ",
            not_paused!(),
            "AND queue = ANY(ARRAY(SELECT jsonb_array_elements_text("
        ),
        (Text, queues_json), "::jsonb))) ORDER BY run_at, id LIMIT ", (BigInt, limit),
        " FOR UPDATE SKIP LOCKED)) \
         RETURNING id, queue, payload, attempts, max_attempts, idempotency_key, run_at",
    ]);

    cached_statement!(Complete { ids: &'a [i64], owner: &'a str } => [
        "DELETE FROM dts_outbox WHERE id = ANY(", (Array<BigInt>, ids), ") AND locked_by = ",
        (Text, owner), "",
    ]);

    cached_statement!(Fail { error: &'a str, delay_ms: i64, state: i32, id: i64,
                             owner: &'a str } => [
        "UPDATE dts_outbox SET locked_until = NULL, locked_by = NULL, last_error = ",
        (Text, error), concat!(", run_at = ", now_ms!(), " + "), (BigInt, delay_ms),
        ", state = ", (Integer, state), " WHERE id = ", (BigInt, id), " AND locked_by = ",
        (Text, owner), "",
    ]);

    cached_statement!(Release { ids: &'a [i64], owner: &'a str } => [
        "UPDATE dts_outbox SET locked_until = NULL, locked_by = NULL, \
         attempts = attempts - 1 WHERE id = ANY(", (Array<BigInt>, ids), ") AND locked_by = ",
        (Text, owner), "",
    ]);

    cached_statement!(UnknownQueues { queues_json: &'a str } => [
        "SELECT queue, COUNT(*)::BIGINT AS n FROM dts_outbox WHERE state = 0 \
         AND queue NOT IN (SELECT jsonb_array_elements_text(", (Text, queues_json),
        "::jsonb)) GROUP BY queue",
    ]);

    /// Leases up to `limit` due rows of the queues in `queues_json` to `owner`.
    pub(in crate::outbox) fn claim<'a>(
        owner: &'a str,
        queues_json: &'a str,
        limit: i64,
        lease_ms: i64,
    ) -> Claim<'a> {
        Claim {
            lease_ms,
            owner,
            queues_json,
            limit,
        }
    }

    /// `DELETE` of delivered rows still leased to `owner`.
    pub(in crate::outbox) fn complete<'a>(owner: &'a str, ids: &'a [i64]) -> Complete<'a> {
        Complete { ids, owner }
    }

    /// Records a failed attempt of a row still leased to `owner`.
    pub(in crate::outbox) fn fail<'a>(
        owner: &'a str,
        id: i64,
        error: &'a str,
        delay_ms: i64,
        dead: bool,
    ) -> Fail<'a> {
        Fail {
            error,
            delay_ms,
            state: if dead { 2 } else { 0 },
            id,
            owner,
        }
    }

    /// Gives claimed rows back unrun (the attempt they were claimed for is not counted).
    pub(in crate::outbox) fn release<'a>(owner: &'a str, ids: &'a [i64]) -> Release<'a> {
        Release { ids, owner }
    }

    /// Counts the pending rows of queues not in `queues_json`.
    pub(in crate::outbox) fn unknown_queues(queues_json: &str) -> UnknownQueues<'_> {
        UnknownQueues { queues_json }
    }

    /// The INSERT of one job (its id, or `None` for an idempotency key already present), with
    /// the runner `$run` (`run_sync` / `run_async`).
    macro_rules! pg_insert_one {
        ($conn:expr, $row:expr, $run:ident) => {{
            let row: &NewRow = $row;
            if row.idempotency_key.is_none() {
                // Without a key the row cannot conflict: no ON CONFLICT clause then.
                let id: Id = $run!(get_result InsertNoKey {
                    queue: &row.queue,
                    payload: &row.payload,
                    max_attempts: row.max_attempts,
                    delay_ms: row.delay_ms,
                }, $conn)?;
                Ok(Some(id.id))
            } else {
                let ids: Vec<Id> = $run!(load Insert {
                    queue: &row.queue,
                    payload: &row.payload,
                    key: row.idempotency_key.as_deref(),
                    max_attempts: row.max_attempts,
                    delay_ms: row.delay_ms,
                }, $conn)?;
                Ok(ids.as_slice().first().map(|r| r.id))
            }
        }};
    }
    pub(in crate::outbox) use pg_insert_one;

    /// The INSERT of many jobs in one statement (arrays bound as parameters); returns the rows
    /// written.
    macro_rules! pg_insert_many {
        ($conn:expr, $rows:expr, $run:ident) => {{
            let rows: &[NewRow] = $rows;
            if rows.is_empty() {
                Ok(0)
            } else if let [row] = rows {
                if row.idempotency_key.is_none() {
                    $run!(execute InsertOneNoKey {
                        queue: &row.queue,
                        payload: &row.payload,
                        max_attempts: row.max_attempts,
                        delay_ms: row.delay_ms,
                    }, $conn)
                } else {
                    let one: QueryResult<Option<i64>> = pg_insert_one!($conn, row, $run);
                    one.map(|id| usize::from(id.is_some()))
                }
            } else if rows.iter().all(|r| r.idempotency_key.is_none()) {
                $run!(execute InsertManyNoKey {
                    queues: rows.iter().map(|r| r.queue.as_str()).collect(),
                    payloads: rows.iter().map(|r| r.payload.as_str()).collect(),
                    max_attempts: rows.iter().map(|r| r.max_attempts).collect(),
                    delays_ms: rows.iter().map(|r| r.delay_ms).collect(),
                }, $conn)
            } else {
                $run!(execute InsertMany {
                    queues: rows.iter().map(|r| r.queue.as_str()).collect(),
                    payloads: rows.iter().map(|r| r.payload.as_str()).collect(),
                    keys: rows.iter().map(|r| r.idempotency_key.as_deref()).collect(),
                    max_attempts: rows.iter().map(|r| r.max_attempts).collect(),
                    delays_ms: rows.iter().map(|r| r.delay_ms).collect(),
                }, $conn)
            }
        }};
    }
    pub(in crate::outbox) use pg_insert_many;

    impl sealed::Sealed for PgConnection {}

    impl OutboxConnection for PgConnection {
        sync_relay_statements!();

        fn outbox_insert(&mut self, row: &NewRow) -> QueryResult<Option<i64>> {
            pg_insert_one!(self, row, run_sync)
        }

        fn outbox_insert_many(&mut self, rows: &[NewRow]) -> QueryResult<usize> {
            pg_insert_many!(self, rows, run_sync)
        }

        fn outbox_claim(
            &mut self,
            owner: &str,
            queues_json: &str,
            limit: i64,
            lease_ms: i64,
        ) -> QueryResult<Vec<ClaimedRow>> {
            claim(owner, queues_json, limit, lease_ms).load(self)
        }

        fn outbox_admin(&mut self) -> QueryResult<AdminDb<'_>> {
            Ok(AdminDb::Pg(self))
        }
    }
}

#[cfg(feature = "sqlite")]
pub(super) mod sqlite {
    use super::*;
    use diesel::query_builder::{BoxedSqlQuery, SqlQuery};
    use diesel::sqlite::Sqlite;
    use diesel::SqliteConnection;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";

    /// Rows per multi-row INSERT: 5 parameters a row within SQLite's 32,766 (since 3.32)...
    const SQLITE_ROWS_NEW: usize = 32_766 / 5;
    /// ... or 999 (older SQLite, found out at the first statement refused for it).
    const SQLITE_ROWS_OLD: usize = 999 / 5;
    static SQLITE_ROWS: AtomicUsize = AtomicUsize::new(SQLITE_ROWS_NEW);

    multi_insert_for!(diesel::sqlite::Sqlite, SqliteConnection);

    static INSERT_UNKEYED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "INSERT INTO dts_outbox (queue, payload, idempotency_key, max_attempts, run_at) \
             VALUES (?, ?, ?, ?, {NOW_MS} + ?) RETURNING id"
        )
    });
    static INSERT_KEYED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "{} ON CONFLICT (queue, idempotency_key) DO NOTHING RETURNING id",
            INSERT_UNKEYED.trim_end_matches(" RETURNING id")
        )
    });

    /// A relay statement of this backend.
    pub(in crate::outbox) type Stmt<'a> = BoxedSqlQuery<'a, Sqlite, SqlQuery>;

    /// Leases up to `limit` due rows of the queues in `queues_json` to `owner`. SQLite
    /// serialises writers: the UPDATE itself is the claim.
    pub(in crate::outbox) fn claim<'a>(
        owner: &'a str,
        queues_json: &'a str,
        limit: i64,
        lease_ms: i64,
    ) -> Stmt<'a> {
        diesel::sql_query(format!(
            "UPDATE dts_outbox SET locked_until = {NOW_MS} + ?, locked_by = ?, \
             attempts = attempts + 1 \
             WHERE id IN (SELECT id FROM dts_outbox \
               WHERE state = 0 AND run_at <= {NOW_MS} \
               AND (locked_until IS NULL OR locked_until < {NOW_MS}) \
               AND queue IN (SELECT value FROM json_each(?)) {} \
               ORDER BY run_at, id LIMIT ?) \
             RETURNING id, queue, payload, attempts, max_attempts, idempotency_key, run_at",
            not_paused!()
        ))
        .into_boxed()
        .bind::<BigInt, _>(lease_ms)
        .bind::<Text, _>(owner)
        .bind::<Text, _>(queues_json)
        .bind::<BigInt, _>(limit)
    }

    question_mark_queries!();

    /// Counts the pending rows of queues not in `queues_json`.
    pub(in crate::outbox) fn unknown_queues(queues_json: &str) -> Stmt<'_> {
        diesel::sql_query(
            "SELECT queue, COUNT(*) AS n FROM dts_outbox WHERE state = 0 \
             AND queue NOT IN (SELECT value FROM json_each(?)) GROUP BY queue",
        )
        .into_boxed()
        .bind::<Text, _>(queues_json)
    }

    impl sealed::Sealed for SqliteConnection {}

    impl OutboxConnection for SqliteConnection {
        sync_relay_statements!();

        fn outbox_insert(&mut self, row: &NewRow) -> QueryResult<Option<i64>> {
            // Without a key the row cannot conflict: no ON CONFLICT clause then.
            let sql = if row.idempotency_key.is_some() {
                INSERT_KEYED.as_str()
            } else {
                INSERT_UNKEYED.as_str()
            };
            let ids: Vec<Id> = diesel::sql_query(sql)
                .bind::<Text, _>(&row.queue)
                .bind::<Text, _>(&row.payload)
                .bind::<Nullable<Text>, _>(&row.idempotency_key)
                .bind::<Integer, _>(row.max_attempts)
                .bind::<BigInt, _>(row.delay_ms)
                .load(self)?;
            Ok(ids.first().map(|r| r.id))
        }

        fn outbox_insert_many(&mut self, rows: &[NewRow]) -> QueryResult<usize> {
            let mut written = 0;
            let mut per_statement = SQLITE_ROWS.load(Ordering::Relaxed);
            let mut rest = rows;
            while !rest.is_empty() {
                let chunk = &rest[..rest.len().min(per_statement)];
                let keyed = chunk.iter().any(|r| r.idempotency_key.is_some());
                let inserted = MultiInsert {
                    rows: chunk,
                    now_ms: NOW_MS,
                    tail: if keyed {
                        " ON CONFLICT (queue, idempotency_key) DO NOTHING"
                    } else {
                        ""
                    },
                }
                .execute(self);
                match inserted {
                    // An SQLite older than 3.32 allows 999 parameters per statement.
                    Err(diesel::result::Error::DatabaseError(_, ref info))
                        if per_statement > SQLITE_ROWS_OLD
                            && info.message().contains("too many SQL variables") =>
                    {
                        per_statement = SQLITE_ROWS_OLD;
                        SQLITE_ROWS.store(SQLITE_ROWS_OLD, Ordering::Relaxed);
                        continue;
                    }
                    other => written += other?,
                }
                rest = &rest[chunk.len()..];
            }
            Ok(written)
        }

        fn outbox_claim(
            &mut self,
            owner: &str,
            queues_json: &str,
            limit: i64,
            lease_ms: i64,
        ) -> QueryResult<Vec<ClaimedRow>> {
            claim(owner, queues_json, limit, lease_ms).load(self)
        }

        fn outbox_admin(&mut self) -> QueryResult<AdminDb<'_>> {
            Ok(AdminDb::Sqlite(self))
        }
    }
}

#[cfg(feature = "mysql")]
pub(super) mod mysql {
    use super::*;
    use diesel::mysql::Mysql;
    use diesel::query_builder::{BoxedSqlQuery, SqlQuery};
    use diesel::MysqlConnection;

    const NOW_MS: &str = "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)";

    /// Rows per multi-row INSERT: 5 parameters a row within MySQL's 65,535, and at most
    /// 4 MiB of payload (MariaDB's default `max_allowed_packet` is 16 MiB, MySQL's 64 MiB).
    pub(in crate::outbox) const MYSQL_ROWS: usize = 65_535 / 5;
    pub(in crate::outbox) const MYSQL_BYTES: usize = 4 << 20;

    multi_insert_for!(diesel::mysql::Mysql, MysqlConnection);

    /// A relay statement of this backend.
    pub(in crate::outbox) type Stmt<'a> = BoxedSqlQuery<'a, Mysql, SqlQuery>;

    // No UPDATE .. RETURNING: a claim is `claim_lock` (SELECT .. FOR UPDATE SKIP LOCKED), then
    // `claim_update` and `claim_read` of the ids it locked, in one transaction.

    /// Locks up to `limit` due rows of the queues in `queues_json`; loads [`Id`]s.
    pub(in crate::outbox) fn claim_lock(queues_json: &str, limit: i64) -> Stmt<'_> {
        diesel::sql_query(format!(
            "SELECT id FROM dts_outbox WHERE state = 0 AND run_at <= {NOW_MS} \
             AND (locked_until IS NULL OR locked_until < {NOW_MS}) \
             AND JSON_CONTAINS(?, JSON_QUOTE(queue)) {} \
             ORDER BY run_at, id LIMIT ? FOR UPDATE SKIP LOCKED",
            not_paused!()
        ))
        .into_boxed()
        .bind::<Text, _>(queues_json)
        .bind::<BigInt, _>(limit)
    }

    /// Leases the locked rows `ids` to `owner`.
    pub(in crate::outbox) fn claim_update<'a>(
        owner: &'a str,
        ids: &[Id],
        lease_ms: i64,
    ) -> Stmt<'a> {
        let list = id_list(&ids.iter().map(|r| r.id).collect::<Vec<_>>());
        diesel::sql_query(format!(
            "UPDATE dts_outbox SET locked_until = {NOW_MS} + ?, locked_by = ?, \
             attempts = attempts + 1 WHERE id IN ({list})"
        ))
        .into_boxed()
        .bind::<BigInt, _>(lease_ms)
        .bind::<Text, _>(owner)
    }

    /// Sets READ COMMITTED for the claim's transaction (the next one only). Under MySQL's
    /// default REPEATABLE READ, `SELECT .. FOR UPDATE` keeps a lock on every row it scanned in
    /// the ready index, other queues' rows included, for the whole claim, and `SKIP LOCKED`
    /// claims elsewhere then skip them: relays of different queues would starve each other.
    /// Under READ COMMITTED the rows that do not match are unlocked as soon as they are read.
    pub(in crate::outbox) fn claim_isolation() -> Stmt<'static> {
        diesel::sql_query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED").into_boxed()
    }

    /// Reads the rows `ids` just leased, as [`ClaimedRow`]s.
    pub(in crate::outbox) fn claim_read<'a>(ids: &[Id]) -> Stmt<'a> {
        let list = id_list(&ids.iter().map(|r| r.id).collect::<Vec<_>>());
        diesel::sql_query(format!(
            "SELECT id, queue, payload, attempts, max_attempts, idempotency_key, run_at \
             FROM dts_outbox WHERE id IN ({list}) ORDER BY run_at, id"
        ))
        .into_boxed()
    }

    question_mark_queries!();

    /// Counts the pending rows of queues not in `queues_json`.
    pub(in crate::outbox) fn unknown_queues(queues_json: &str) -> Stmt<'_> {
        diesel::sql_query(
            "SELECT queue, CAST(COUNT(*) AS SIGNED) AS n FROM dts_outbox WHERE state = 0 \
             AND NOT JSON_CONTAINS(?, JSON_QUOTE(queue)) GROUP BY queue",
        )
        .into_boxed()
        .bind::<Text, _>(queues_json)
    }

    /// The INSERT of one job, then its id (`LAST_INSERT_ID()`); `None` for an idempotency key
    /// already present. A duplicate key fails the statement alone on MySQL (the transaction
    /// goes on), so the unique index itself is the idempotency check.
    macro_rules! mysql_insert_one {
        ($conn:expr, $row:expr, $run:ident) => {{
            let row: &NewRow = $row;
            let inserted: QueryResult<usize> = $run!(execute insert_one(row), $conn);
            match inserted {
                Err(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::UniqueViolation,
                    _,
                )) if row.idempotency_key.is_some() => Ok(None),
                Err(e) => Err(e),
                Ok(_) => {
                    let id: QueryResult<Id> = $run!(get_result last_insert_id(), $conn);
                    id.map(|id| Some(id.id))
                }
            }
        }};
    }
    pub(in crate::outbox) use mysql_insert_one;

    /// The INSERT of many jobs, one multi-row statement per `chunks` piece; returns the rows
    /// written. A duplicate key fails the whole statement alone (the transaction goes on):
    /// then that piece again row by row, each duplicate a no-op. `ON DUPLICATE KEY UPDATE`
    /// would not tell how many rows are new (Diesel connects with CLIENT_FOUND_ROWS), `INSERT
    /// IGNORE` would also truncate over-long keys.
    macro_rules! mysql_insert_many {
        ($conn:expr, $rows:expr, $run:ident) => {{
            let rows: &[NewRow] = $rows;
            let mut written = 0;
            let mut failed = None;
            for chunk in chunks(rows, MYSQL_ROWS, MYSQL_BYTES) {
                let inserted: QueryResult<usize> = $run!(execute multi_insert(chunk), $conn);
                match inserted {
                    Err(diesel::result::Error::DatabaseError(
                        diesel::result::DatabaseErrorKind::UniqueViolation,
                        _,
                    )) if chunk.iter().any(|r| r.idempotency_key.is_some()) => {
                        for row in chunk {
                            let one: QueryResult<Option<i64>> =
                                mysql_insert_one!($conn, row, $run);
                            match one {
                                Ok(id) => written += usize::from(id.is_some()),
                                Err(e) => {
                                    failed = Some(e);
                                    break;
                                }
                            }
                        }
                    }
                    Ok(n) => written += n,
                    Err(e) => failed = Some(e),
                }
                if failed.is_some() {
                    break;
                }
            }
            match failed {
                Some(e) => Err(e),
                None => Ok(written),
            }
        }};
    }
    pub(in crate::outbox) use mysql_insert_many;

    /// The single-row INSERT of `row`.
    pub(in crate::outbox) fn insert_one(row: &NewRow) -> Stmt<'_> {
        diesel::sql_query(format!(
            "INSERT INTO dts_outbox (queue, payload, idempotency_key, max_attempts, run_at) \
             VALUES (?, ?, ?, ?, {NOW_MS} + ?)"
        ))
        .into_boxed()
        .bind::<Text, _>(&row.queue)
        .bind::<Text, _>(&row.payload)
        .bind::<Nullable<Text>, _>(&row.idempotency_key)
        .bind::<Integer, _>(row.max_attempts)
        .bind::<BigInt, _>(row.delay_ms)
    }

    /// The id the last INSERT on this connection generated.
    pub(in crate::outbox) fn last_insert_id() -> Stmt<'static> {
        diesel::sql_query("SELECT CAST(LAST_INSERT_ID() AS SIGNED) AS id").into_boxed()
    }

    /// The multi-row INSERT of `rows` (one `chunks` piece).
    pub(in crate::outbox) fn multi_insert(rows: &[NewRow]) -> MultiInsert<'_> {
        MultiInsert {
            rows,
            now_ms: NOW_MS,
            tail: "",
        }
    }

    impl sealed::Sealed for MysqlConnection {}

    impl OutboxConnection for MysqlConnection {
        sync_relay_statements!();

        fn outbox_insert(&mut self, row: &NewRow) -> QueryResult<Option<i64>> {
            mysql_insert_one!(self, row, run_sync)
        }

        fn outbox_insert_many(&mut self, rows: &[NewRow]) -> QueryResult<usize> {
            mysql_insert_many!(self, rows, run_sync)
        }

        fn outbox_claim(
            &mut self,
            owner: &str,
            queues_json: &str,
            limit: i64,
            lease_ms: i64,
        ) -> QueryResult<Vec<ClaimedRow>> {
            let claim = |conn: &mut MysqlConnection| {
                let ids: Vec<Id> = claim_lock(queues_json, limit).load(conn)?;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                claim_update(owner, &ids, lease_ms).execute(conn)?;
                claim_read(&ids).load(conn)
            };
            claim_isolation().execute(self)?;
            self.transaction(claim)
        }

        fn outbox_admin(&mut self) -> QueryResult<AdminDb<'_>> {
            Ok(AdminDb::Mysql(self))
        }
    }
}
