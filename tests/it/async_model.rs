//! The model-based property test of `tests/it/model.rs`, run through the async driver
//! (`AsyncSignalConnection`) on PostgreSQL and MariaDB: the same generated programs, the same
//! reference model, the same event log; only the way the program is run differs (`async`
//! closures, each case in its own tokio task on a multi-threaded runtime).
#![cfg(all(
    feature = "async",
    feature = "sqlite",
    feature = "postgres",
    feature = "mysql"
))]

use std::future::Future;
use std::pin::Pin;

use diesel::prelude::*;
use diesel::result::{Error, QueryResult};
use diesel_async::{AsyncConnection, AsyncMysqlConnection, AsyncPgConnection, RunQueryDsl};
use diesel_transaction_signals::{defer, in_transaction, AsyncSignalConnection};
use proptest::prelude::*;

use crate::common::{self, items};
use crate::model::{
    classify, config, expected, programs, quiet_model_panics, scenarios, Class, Ending, Flavour,
    Log, ModelPanic, Op, Program, Run,
};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Polls `fut`, catching a panic (as `catch_unwind` does for the sync model).
async fn catch<F: Future>(fut: F) -> std::thread::Result<F::Output> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    })
    .await
}

macro_rules! async_model_suite {
    ($backend:ident, $conn:ty, url = $url:expr, migrate = $migrate:expr,
     deferred_violation = $violation:expr, swallowed_error_aborts = $aborts:expr,
     cases = $cases:expr $(,)?) => {
        mod $backend {
            use super::*;

            type Conn = AsyncSignalConnection<$conn>;

            fn flavour() -> Flavour {
                Flavour {
                    swallowed_error_aborts: $aborts,
                    commit_violation: $violation,
                }
            }

            async fn insert(conn: &mut Conn, tag: &str, v: i32) -> QueryResult<usize> {
                diesel::insert_into(items::table)
                    .values((items::tag.eq(tag), items::v.eq(v)))
                    .execute(conn)
                    .await
            }

            async fn end(conn: &mut Conn, tag: &str, ending: Ending) -> QueryResult<()> {
                match ending {
                    Ending::Ok => Ok(()),
                    Ending::Err => Err(Error::RollbackTransaction),
                    Ending::Panic => std::panic::panic_any(ModelPanic),
                    Ending::DeferredViolation => {
                        // PostgreSQL: two equal (tag, v) in `deferred_items`, checked at COMMIT.
                        for _ in 0..2 {
                            diesel::insert_into(common::deferred_items::table)
                                .values((
                                    common::deferred_items::tag.eq(tag),
                                    common::deferred_items::v.eq(1),
                                ))
                                .execute(conn)
                                .await?;
                        }
                        Ok(())
                    }
                }
            }

            fn body<'a>(
                conn: &'a mut Conn,
                tag: &'a str,
                ops: &'a [Op],
                log: &'a Log,
            ) -> BoxFuture<'a, QueryResult<()>> {
                Box::pin(async move {
                    for op in ops {
                        match op {
                            Op::Insert(v) => {
                                insert(conn, tag, *v).await?;
                            }
                            Op::OnCommit(n) => conn.on_commit(log.hook(format!("c{n}"))),
                            Op::OnRollback(n) => conn.on_rollback(log.hook(format!("r{n}"))),
                            Op::OnComplete(n) => conn.on_complete(log.complete(format!("k{n}"))),
                            Op::Defer(n) => defer(log.hook(format!("d{n}"))),
                            Op::SwallowedError(n) => {
                                let class = classify(Ok(insert(conn, tag, 0).await));
                                log.push(format!("e{n}={class:?}"));
                            }
                            Op::Nested(n, ops, ending) => {
                                let r = catch(conn.transaction(async |c| {
                                    body(c, tag, ops, log).await?;
                                    end(c, tag, *ending).await
                                }))
                                .await;
                                log.push(format!("tx{n}={:?}", classify(r)));
                            }
                        }
                    }
                    Ok(())
                })
            }

            async fn observe(program: Program) -> Run {
                let mut conn = Conn::establish(&$url).await.expect("connect");
                let tag = common::unique_tag("async-model");
                let log = Log::default();
                let r = catch(conn.transaction(async |c| {
                    insert(c, &tag, 0).await?;
                    body(c, &tag, &program.ops, &log).await?;
                    end(c, &tag, program.ending).await
                }))
                .await;
                let result = classify(r);
                let events = log.take();
                assert_eq!(conn.transaction_depth(), 0, "a level was left open");
                assert!(!in_transaction(), "the task registry kept a level");
                assert_eq!(
                    log.hooks_alive(),
                    0,
                    "hooks were kept after they were settled"
                );
                conn.transaction(async |c| {
                    c.on_commit(log.hook("after".into()));
                    QueryResult::Ok(())
                })
                .await
                .expect("the connection is usable after the program");
                assert_eq!(log.take(), ["after"], "the connection is usable");
                let rows = items::table
                    .filter(items::tag.eq(&tag))
                    .select(items::v)
                    .order(items::v)
                    .load(&mut conn)
                    .await
                    .expect("rows can be read");
                Run {
                    result,
                    events,
                    rows,
                }
            }

            fn runtime() -> &'static tokio::runtime::Runtime {
                static RT: std::sync::OnceLock<tokio::runtime::Runtime> =
                    std::sync::OnceLock::new();
                RT.get_or_init(|| {
                    $migrate();
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .unwrap()
                })
            }

            fn check(program: &Program) -> Result<(), TestCaseError> {
                quiet_model_panics();
                let want = expected(program, &flavour());
                let owned = program.clone();
                // In a task of its own, so `defer` finds the transaction by task id.
                let rt = runtime();
                let got = rt
                    .block_on(rt.spawn(observe(owned)))
                    .expect("the case's task finished");
                prop_assert_eq!(&got, &want, "program: {:#?}", program);
                Ok(())
            }

            /// The scenario table of `model.rs`, through the async driver.
            #[test]
            fn scenarios_agree_with_the_model() {
                for (name, program) in scenarios(&flavour()) {
                    if let Err(e) = check(&program) {
                        panic!("scenario \"{name}\": {e}");
                    }
                }
            }

            proptest! {
                #![proptest_config(config($cases))]

                #[test]
                fn programs_agree_with_the_model(
                    program in programs($violation.is_some())
                ) {
                    check(&program)?;
                }
            }
        }
    };
}

async_model_suite!(
    postgres,
    AsyncPgConnection,
    url = common::pg_url(),
    migrate = || drop(common::pg()),
    deferred_violation = Some(Class::UniqueViolation),
    swallowed_error_aborts = true,
    cases = 64,
);

async_model_suite!(
    mysql,
    AsyncMysqlConnection,
    url = common::mysql_url(),
    migrate = || drop(common::mysql()),
    deferred_violation = None::<Class>,
    swallowed_error_aborts = false,
    cases = 64,
);
