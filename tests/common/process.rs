//! Process-wide state that the tests of one binary share, set up once for all of them: the
//! hook-failure handler and the panic hook. Tests run in parallel threads of one process, so
//! no test may install, replace or clear either for itself; each takes what it needs from the
//! shared one (its own connection's failures, a filter for its own panics).

use std::any::Any;
use std::sync::{Arc, Mutex, Once, OnceLock};

use diesel_transaction_signals::{set_failure_handler, ConnectionId, FailureCause, HookFailure};

/// Every hook failure of the process, recorded by one handler installed on first use. Call it
/// before the failures happen; read them with [`failures_of`].
pub fn failures() -> &'static Mutex<Vec<HookFailure>> {
    static FAILURES: OnceLock<Arc<Mutex<Vec<HookFailure>>>> = OnceLock::new();
    FAILURES.get_or_init(|| {
        let all: Arc<Mutex<Vec<HookFailure>>> = Arc::default();
        let sink = all.clone();
        set_failure_handler(Some(Box::new(move |f: &HookFailure| {
            sink.lock().unwrap().push(f.clone())
        })));
        all
    })
}

/// The causes of the hook failures of connection `conn` recorded so far, in order.
pub fn failures_of(conn: ConnectionId) -> Vec<FailureCause> {
    failures()
        .lock()
        .unwrap()
        .iter()
        .filter(|f| f.connection() == Some(conn))
        .map(|f| f.cause().clone())
        .collect()
}

/// Recognises a panic by its payload.
pub type PanicFilter = fn(&(dyn Any + Send)) -> bool;

static QUIET: Mutex<Vec<PanicFilter>> = Mutex::new(Vec::new());

/// Keeps the panic hook quiet for the panics `quiet` recognises, and only for them: every other
/// panic is reported by the previous hook (libtest's capture still applies). The hook is
/// installed once per process; each call adds a filter (call it once per kind of panic).
pub fn quiet_panics(quiet: PanicFilter) {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let filters = QUIET.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if !filters.iter().any(|quiet| quiet(info.payload())) {
                default(info)
            }
        }));
    });
    QUIET.lock().unwrap_or_else(|e| e.into_inner()).push(quiet);
}
