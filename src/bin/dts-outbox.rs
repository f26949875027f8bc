//! `dts-outbox`: operate the transactional outbox of diesel-transaction-signals from a shell.
//!
//! ```text
//! dts-outbox --database-url postgres://app@db/app status
//! DATABASE_URL=mysql://app@db/app dts-outbox dead --queue emails
//! dts-outbox --database-url app.db retry --queue emails      # SQLite: a path or sqlite://path
//! dts-outbox purge --older-than 7d
//! dts-outbox --json status                                   # for scripts
//! ```
//!
//! Exit status: 0 on success, 1 when an operation failed (unknown queue, job running, database
//! error, missing outbox table: one line on stderr says why), 2 on a usage error.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::{MysqlConnection, PgConnection, SqliteConnection};
use diesel_migrations::MigrationHarness;
use diesel_transaction_signals::outbox::{
    self, Admin, DeadLetter, JobId, OutboxConnection, OutboxError, QueueStatus,
};
use serde_json::{json, Value};

/// Operate the transactional outbox (dts_outbox) of diesel-transaction-signals.
#[derive(Parser, Debug)]
#[command(name = "dts-outbox", version)]
struct Cli {
    /// postgres://..., mysql://..., or a SQLite file (a path or sqlite://path).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Jobs per queue by state, the age of the oldest ready job, paused queues, relays holding leases.
    Status {
        /// Only this queue (an unknown queue is an error).
        queue: Option<String>,
    },
    /// List dead-lettered jobs.
    Dead {
        /// Only this queue's.
        #[arg(long)]
        queue: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Retry dead jobs: attempts reset, due now. One job by id, a whole --queue, or --all.
    Retry {
        /// The job's id.
        #[arg(conflicts_with_all = ["queue", "all"], required_unless_present_any = ["queue", "all"])]
        id: Option<i64>,
        /// Every dead job of this queue.
        #[arg(long, conflicts_with = "all")]
        queue: Option<String>,
        /// Every dead job of every queue.
        #[arg(long)]
        all: bool,
    },
    /// Delete jobs (dead, or pending and not running) by id.
    Discard {
        /// The jobs' ids.
        #[arg(required = true)]
        ids: Vec<i64>,
    },
    /// Delete dead jobs that died longer ago than --older-than.
    Purge {
        /// e.g. 7d, 12h, 30m, 45s, 1h30m.
        #[arg(long, value_parser = parse_duration)]
        older_than: Duration,
        /// Only this queue's.
        #[arg(long)]
        queue: Option<String>,
    },
    /// Move a pending job that is not running to a later time (or now).
    Reschedule {
        /// The job's id.
        id: i64,
        /// From now, e.g. 10m (default: now).
        #[arg(long = "in", value_parser = parse_duration, default_value = "0s")]
        delay: Duration,
    },
    /// Pause a queue: relays in every process stop claiming its jobs until resumed.
    Pause {
        /// The queue.
        queue: String,
        /// Pause it even if it has no jobs yet.
        #[arg(long)]
        force: bool,
    },
    /// Resume a paused queue.
    Resume {
        /// The queue.
        queue: String,
    },
    /// Create or upgrade the outbox tables (runs the pending outbox migrations).
    Migrate,
}

/// `7d`, `12h`, `30m`, `45s`, `250ms`, `1w`, or several together: `1h30m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}: use e.g. 7d, 12h, 30m, 45s or 1h30m");
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let secs = match &rest[..unit_len] {
            "ms" => {
                total += Duration::from_millis(n);
                rest = &rest[unit_len..];
                continue;
            }
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 604_800,
            _ => return Err(bad()),
        };
        total += Duration::from_secs(n.checked_mul(secs).ok_or_else(bad)?);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// A connection of the backend the URL names.
enum Db {
    Pg(PgConnection),
    Mysql(MysqlConnection),
    Sqlite(SqliteConnection),
}

fn connect(url: &str, create: bool) -> Result<Db, String> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    let cannot = |e: ConnectionError| format!("cannot connect to the database: {e}");
    match scheme.as_deref() {
        Some("postgres" | "postgresql") => PgConnection::establish(url).map(Db::Pg).map_err(cannot),
        Some("mysql") => MysqlConnection::establish(url)
            .map(Db::Mysql)
            .map_err(cannot),
        Some("sqlite") | None => {
            let path = url.strip_prefix("sqlite://").unwrap_or(url);
            let path = path.strip_prefix("sqlite:").unwrap_or(path);
            if path.is_empty() {
                return Err("empty database URL".into());
            }
            let file = path.strip_prefix("file:").unwrap_or(path);
            let file = file.split('?').next().unwrap_or(file);
            if !create && file != ":memory:" && !std::path::Path::new(file).exists() {
                return Err(format!(
                    "no SQLite database at {file:?} (use postgres://, mysql://, or the path of \
                     an existing SQLite file; `migrate` creates one)"
                ));
            }
            let mut conn = SqliteConnection::establish(path).map_err(cannot)?;
            conn.batch_execute("PRAGMA busy_timeout = 10000")
                .map_err(|e| e.to_string())?;
            Ok(Db::Sqlite(conn))
        }
        Some(other) => Err(format!(
            "unsupported database URL scheme {other:?}: use postgres://, mysql://, or a SQLite \
             path (sqlite://path)"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(reason) => {
            eprintln!("dts-outbox: {}", reason.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<String, String> {
    let Some(url) = cli.database_url.as_deref().filter(|u| !u.trim().is_empty()) else {
        return Err("no database: pass --database-url or set DATABASE_URL".into());
    };
    let migrate = matches!(cli.command, Command::Migrate);
    match connect(url, migrate)? {
        Db::Pg(mut c) if migrate => migrate_with(&mut c, outbox::migrations::POSTGRES, cli.json),
        Db::Mysql(mut c) if migrate => migrate_with(&mut c, outbox::migrations::MYSQL, cli.json),
        Db::Sqlite(mut c) if migrate => migrate_with(&mut c, outbox::migrations::SQLITE, cli.json),
        Db::Pg(mut c) => operate(&mut c, cli.command, cli.json),
        Db::Mysql(mut c) => operate(&mut c, cli.command, cli.json),
        Db::Sqlite(mut c) => operate(&mut c, cli.command, cli.json),
    }
}

fn migrate_with<C, DB>(
    conn: &mut C,
    migrations: diesel_migrations::EmbeddedMigrations,
    json: bool,
) -> Result<String, String>
where
    DB: diesel::backend::Backend,
    C: MigrationHarness<DB>,
{
    let applied: Vec<String> = conn
        .run_pending_migrations(migrations)
        .map_err(|e| format!("migration failed: {e}"))?
        .into_iter()
        .map(|v| v.to_string())
        .collect();
    Ok(if json {
        format!("{}\n", json!({ "applied": applied }))
    } else if applied.is_empty() {
        "outbox tables are up to date\n".into()
    } else {
        format!("applied {}\n", applied.join(", "))
    })
}

fn reason(e: OutboxError) -> String {
    match e {
        OutboxError::Database(e) => format!("database error: {e}"),
        OutboxError::UnknownQueue(q) => {
            format!("unknown queue {q:?} (it has no jobs and is not paused)")
        }
        other => other.to_string(),
    }
}

fn operate<C: OutboxConnection>(conn: &mut C, cmd: Command, json: bool) -> Result<String, String> {
    let out = match cmd {
        Command::Status { queue } => {
            let all = match queue {
                Some(q) => vec![Admin::queue_status(conn, &q).map_err(reason)?],
                None => Admin::status(conn).map_err(reason)?,
            };
            if json {
                Value::Array(all.iter().map(status_json).collect()).to_string() + "\n"
            } else {
                status_table(&all)
            }
        }
        Command::Dead { queue, limit } => {
            let dead = Admin::dead_letters(conn, queue.as_deref(), limit).map_err(reason)?;
            if json {
                Value::Array(dead.iter().map(dead_json).collect()).to_string() + "\n"
            } else {
                dead_table(&dead)
            }
        }
        Command::Retry { id, queue, all } => {
            let n = match (id, queue) {
                (Some(id), _) => Admin::retry(conn, JobId::new(id)).map(|()| 1),
                (None, Some(q)) => Admin::retry_queue(conn, &q),
                (None, None) if all => Admin::retry_all(conn),
                (None, None) => return Err("retry needs a job id, --queue or --all".into()),
            }
            .map_err(reason)?;
            if json {
                format!("{}\n", json!({ "retried": n }))
            } else {
                format!("retried {n} dead job(s)\n")
            }
        }
        Command::Discard { ids } => {
            let mut failures = Vec::new();
            let mut discarded = Vec::new();
            for id in ids {
                match Admin::discard(conn, JobId::new(id)) {
                    Ok(()) => discarded.push(id),
                    Err(e) => failures.push(reason(e)),
                }
            }
            if !failures.is_empty() {
                return Err(if discarded.is_empty() {
                    failures.join("; ")
                } else {
                    format!(
                        "{} (discarded {})",
                        failures.join("; "),
                        discarded
                            .iter()
                            .map(i64::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                });
            }
            if json {
                format!("{}\n", json!({ "discarded": discarded }))
            } else {
                format!("discarded {} job(s)\n", discarded.len())
            }
        }
        Command::Purge { older_than, queue } => {
            let n = Admin::purge_dead(conn, older_than, queue.as_deref()).map_err(reason)?;
            if json {
                format!("{}\n", json!({ "purged": n }))
            } else {
                format!(
                    "purged {n} dead job(s) dead for longer than {}\n",
                    human(older_than)
                )
            }
        }
        Command::Reschedule { id, delay } => {
            Admin::reschedule(conn, JobId::new(id), delay).map_err(reason)?;
            if json {
                format!(
                    "{}\n",
                    json!({ "rescheduled": id, "in_ms": delay.as_millis() as u64 })
                )
            } else {
                format!("job {id} is due in {}\n", human(delay))
            }
        }
        Command::Pause { queue, force } => {
            if !force {
                Admin::queue_status(conn, &queue).map_err(|e| match e {
                    OutboxError::UnknownQueue(q) => format!(
                        "unknown queue {q:?} (it has no jobs): pass --force to pause it anyway"
                    ),
                    e => reason(e),
                })?;
            }
            let newly = Admin::pause(conn, &queue).map_err(reason)?;
            if json {
                format!(
                    "{}\n",
                    json!({ "queue": queue, "paused": true, "changed": newly })
                )
            } else if newly {
                format!("paused {queue}\n")
            } else {
                format!("{queue} was already paused\n")
            }
        }
        Command::Resume { queue } => {
            let resumed = Admin::resume(conn, &queue).map_err(reason)?;
            if !resumed {
                // Not paused: fine for a known queue, a typo otherwise.
                Admin::queue_status(conn, &queue).map_err(reason)?;
            }
            if json {
                format!(
                    "{}\n",
                    json!({ "queue": queue, "paused": false, "changed": resumed })
                )
            } else if resumed {
                format!("resumed {queue}\n")
            } else {
                format!("{queue} was not paused\n")
            }
        }
        Command::Migrate => unreachable!("handled before"),
    };
    Ok(out)
}

fn status_json(s: &QueueStatus) -> Value {
    json!({
        "queue": s.queue,
        "ready": s.ready,
        "scheduled": s.scheduled,
        "running": s.running,
        "retrying": s.retrying,
        "dead": s.dead,
        "oldest_ready_age_ms": s.oldest_ready_age.map(|d| d.as_millis() as u64),
        "paused": s.paused,
        "leases": s.leases.iter().map(|l| json!({
            "owner": l.owner, "relay": l.relay(), "jobs": l.jobs
        })).collect::<Vec<_>>(),
    })
}

fn dead_json(d: &DeadLetter) -> Value {
    json!({
        "id": d.id.get(),
        "queue": d.queue,
        "attempts": d.attempts,
        "max_attempts": d.max_attempts,
        "last_error": d.last_error,
        "payload": d.payload,
        "idempotency_key": d.idempotency_key,
        "created_at": rfc3339(d.created_at),
        "failed_at": rfc3339(d.failed_at),
    })
}

fn status_table(all: &[QueueStatus]) -> String {
    let mut rows = vec![[
        "QUEUE",
        "READY",
        "SCHEDULED",
        "RUNNING",
        "RETRYING",
        "DEAD",
        "OLDEST READY",
        "PAUSED",
        "LEASES",
    ]
    .map(String::from)
    .to_vec()];
    for s in all {
        let leases = s
            .leases
            .iter()
            .map(|l| format!("{}:{}", l.owner, l.jobs))
            .collect::<Vec<_>>()
            .join(" ");
        rows.push(vec![
            s.queue.clone(),
            s.ready.to_string(),
            s.scheduled.to_string(),
            s.running.to_string(),
            s.retrying.to_string(),
            s.dead.to_string(),
            s.oldest_ready_age.map_or("-".into(), human),
            if s.paused { "yes" } else { "no" }.into(),
            if leases.is_empty() {
                "-".into()
            } else {
                leases
            },
        ]);
    }
    let mut out = table(&rows);
    if all.is_empty() {
        out.push_str("(no queues: the outbox is empty)\n");
    }
    out
}

fn dead_table(dead: &[DeadLetter]) -> String {
    let mut rows = vec![[
        "ID",
        "QUEUE",
        "ATTEMPTS",
        "CREATED",
        "FAILED",
        "LAST ERROR",
        "PAYLOAD",
    ]
    .map(String::from)
    .to_vec()];
    for d in dead {
        rows.push(vec![
            d.id.to_string(),
            d.queue.clone(),
            format!("{}/{}", d.attempts, d.max_attempts),
            rfc3339(d.created_at),
            rfc3339(d.failed_at),
            clip(d.last_error.as_deref().unwrap_or("-"), 50),
            clip(&d.payload, 40),
        ]);
    }
    let mut out = table(&rows);
    if dead.is_empty() {
        out.push_str("(no dead jobs)\n");
    }
    out
}

/// Left-aligned columns, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let width: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == cols {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = width[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One line, at most `max` characters.
fn clip(s: &str, max: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        one_line
    } else {
        one_line.chars().take(max - 1).collect::<String>() + "…"
    }
}

/// `1d2h`, `5m03s`, `12s`, `250ms`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// UTC, to the millisecond: `2026-12-01T19:13:55.123Z`.
fn rfc3339(t: SystemTime) -> String {
    let ms = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "7", "d", "7x", "-1d", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn times_format_as_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_796_152_435_123);
        assert_eq!(rfc3339(t), "2026-12-01T19:13:55.123Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_millis(250)), "250ms");
        assert_eq!(human(Duration::from_secs(125)), "2m05s");
        assert_eq!(human(Duration::from_secs(7 * 86_400)), "7d00h");
    }
}
