#!/usr/bin/env python3
"""Prints the markdown table of a scripts/outbox-bench run: graphile-worker and the outbox side
by side, medians over repetitions, with the ratio and whether ours is ahead.

usage: scripts/outbox_bench_summary.py RESULTS_DIR   (holds all.jsonl, machine.txt, load.txt)
"""
import collections
import json
import os
import statistics
import sys


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    return rows


def key(r):
    if r["test"] == "enqueue":
        # graphile-worker: the measurement's tag; ours: the mode (`compare` prints several)
        return (r["side"], "enqueue", r["cfg"] if r["side"] == "gw" else r["mode"])
    if r["test"] == "exec":
        return (r["side"], "exec", r["procs"])
    return (r["side"], "latency")


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs, fmt):
    """median (min-max) of the runs"""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    m = fmt(statistics.median(xs))
    return m if len(xs) < 2 else f"{m} ({fmt(min(xs))}–{fmt(max(xs))})"


def rate(v):
    return f"{v:,.0f}"


def ms(v):
    return f"{v:.2f}"


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    rows = load(os.path.join(out, "all.jsonl"))
    g = collections.defaultdict(list)
    for r in rows:
        g[key(r)].append(r)

    def vals(k, field, sub=None):
        return [(r.get(field) if sub is None else (r.get(field) or {}).get(sub))
                for r in sorted(g.get(k, []), key=lambda r: r["rep"])]

    table = []

    def verdict(ratio, better_when_higher=True):
        if ratio is None:
            return ""
        if better_when_higher:
            return "ahead" if ratio >= 1 else f"**behind by {(1 - ratio) * 100:.0f} %**"
        return "ahead" if ratio <= 1 else f"**behind: {ratio:.1f}x the time**"

    def enqueue_row(what, gw_cfg, ours_mode, plain_mode):
        gv = vals(("gw", "enqueue", gw_cfg), "jobs_per_s") if gw_cfg else []
        ov = vals(("ours", "enqueue", ours_mode), "jobs_per_s")
        pv = vals(("ours", "enqueue", plain_mode), "jobs_per_s") if plain_mode else []
        gm, om, pm = med(gv), med(ov), med(pv)
        vs_gw = f"{om / gm:.2f}x {verdict(om / gm)}" if gm and om else ""
        vs_plain = ""
        if pm and om:
            # paired: per repetition, ours' median jobs/s over its blocks / plain's (same blocks)
            ob = vals(("ours", "enqueue", ours_mode), "jobs_per_s_block_median")
            pb = vals(("ours", "enqueue", plain_mode), "jobs_per_s_block_median")
            paired = [o / p for o, p in zip(ob, pb) if o and p]
            vs_plain = f"{om / pm:.3f}"
            if paired:
                vs_plain += (f"; paired by block {statistics.median(paired):.3f}"
                             f" ({min(paired):.3f}–{max(paired):.3f})")
        table.append(f"| {what} | {spread(gv, rate) if gw_cfg else ''} | {spread(ov, rate)} "
                     f"| {spread(pv, rate) if plain_mode else ''} | {vs_gw} | {vs_plain} |")

    def drain_row(p):
        f = "jps_wall_minus_startup"
        gv, ov = vals(("gw", "exec", p), f), vals(("ours", "exec", p), f)
        gm, om = med(gv), med(ov)
        vs_gw = f"{om / gm:.2f}x {verdict(om / gm)}" if gm and om else ""
        table.append(f"| drain 20,000 queued no-op jobs, {p} process{'es' if p > 1 else ''} "
                     f"(wall − start-up), jobs/s | {spread(gv, rate)} | {spread(ov, rate)} "
                     f"| n/a | {vs_gw} | |")

    def lat_row(p):
        f = "commitack_to_start_ms"
        gv, ov = vals(("gw", "latency"), f, p), vals(("ours", "latency"), f, p)
        gm, om = med(gv), med(ov)
        vs_gw = (f"{gm / om:.2f}x {verdict(om / gm, better_when_higher=False)}"
                 if gm and om else "")  # gw/ours: > 1 when ours is faster
        table.append(f"| latency at 200 jobs/s (one job in autocommit each), commit "
                     f"acknowledged → handler start, {p}, ms | {spread(gv, ms)} "
                     f"| {spread(ov, ms)} | n/a | {vs_gw} | |")

    enqueue_row("one job in autocommit, one client (`add_job` / `conn.defer_durable`), jobs/s",
                "autocommit", "autocommit", "plain-autocommit")
    enqueue_row("one user row + one job in one user transaction (BEGIN, INSERT user, "
                "`add_job` / `conn.defer_durable`, COMMIT), jobs/s",
                "usertx1", "usertx1", "plain-usertx1")
    enqueue_row("1,000 jobs per transaction (`add_jobs` / 1,000 `defer_durable!` calls), jobs/s",
                "batch", "batch", "plain-batch")
    for p in (1, 2):
        drain_row(p)
    for p in ("p50", "p90", "p99", "max"):
        lat_row(p)
    enqueue_row("_(info)_ one job in autocommit, ours while a relay listens (every COMMIT "
                "notifies); limit: plain Diesel into a table whose trigger always notifies",
                None, "autocommit-listened", "plain-notify-autocommit")
    enqueue_row("_(info)_ one user row + one job, ours while a relay listens (every COMMIT "
                "notifies); limit: plain Diesel into a table whose trigger always notifies",
                None, "usertx1-listened", "plain-notify-usertx1")
    enqueue_row("_(info)_ one user row + one job, ours with `defer_durable!` (written at COMMIT)",
                None, "usertx1-macro", "plain-usertx1")
    enqueue_row("_(info)_ 1,000 jobs per transaction, ours with 1,000 `conn.defer_durable` "
                "(one statement each, id returned)", None, "batch-conn", "plain-batch")
    enqueue_row("_(info)_ 1,000 jobs per transaction, ours with one `enqueue_all`",
                None, "batch-all", "plain-batch")

    reps = max((r["rep"] for r in rows), default=0)
    print()
    print(f"### Outbox relay vs graphile-worker, same PostgreSQL, same run "
          f"({reps} repetition{'s' if reps != 1 else ''}; medians"
          f"{', (min–max) of the runs' if reps > 1 else ''})")
    print()
    print("| what | graphile-worker | ours (diesel-transaction-signals) "
          "| plain Diesel, no outbox (the limit) | ours / graphile-worker | ours / plain |")
    print("|---|---|---|---|---|---|")
    print("\n".join(table))
    print()

    def cfg(side, k, fields):
        rs = g.get((side,) + k, [])
        return ", ".join(f"{f}={rs[0].get(f)}" for f in fields) if rs else "—"

    print("Completion guarantees:")
    print("- **ours**: synchronous batched completion — a batch's succeeded rows are deleted in "
          "one statement before the worker claims more; at least once: a crash mid-batch runs "
          "that batch's finished jobs again once their lease expires.")
    print("- **graphile-worker** (kit preset, `completeJobBatchDelay: 0`, local queue 500): "
          "batched completion written asynchronously — a crash can run a job twice.")
    print()
    print("Configuration:")
    print(f"- ours, drain: {cfg('ours', ('exec', 1), ['concurrency', 'batch_size', 'pool'])} per "
          "process, pool without a test query on checkout; `worker --once` exits when no row "
          "is claimable or held by it")
    print(f"- ours, latency: relay in a second process, "
          f"{cfg('ours', ('latency',), ['concurrency', 'batch_size', 'pool'])}, woken by "
          "`listen()` (LISTEN dts_outbox); producer: one connection, one `conn.defer_durable` "
          "in autocommit per job (as the kit's one autocommit `add_job`), timer pacing; times "
          "from CLOCK_REALTIME in both processes")
    print("- plain Diesel limit: a `PgConnection` without the wrapper inserting the outbox row's "
          "columns into `bench_plain` (dts_outbox's columns, defaults and indexes, no NOTIFY "
          "trigger), the same user-row INSERT and transaction; run interleaved with ours in one "
          "process, blocks of 500 jobs (1,000 for the batch rows), the order rotating")
    print("- ours' enqueue rows: no relay listening, so the trigger sends no NOTIFY (`compare` "
          "counts each block's notifications against a sentinel: none); `-listened` rows: a "
          "connection of the bench process LISTENs and is registered in dts_outbox_listeners "
          "during those blocks, as a relay's listener is, so every COMMIT notifies; the "
          "`plain-notify` limit's trigger always notifies (a listener present in both)")
    print("- graphile-worker: the kit's preset (concurrency 24, pool 25, local queue 500, "
          "refetch 10 ms, completion batching), its bench/*.js unchanged")
    print()
    print("Load and health of the measurements:")
    for side in ("gw", "ours"):
        lat = g.get((side, "latency"), [])
        if lat:
            print(f"- {side} latency: missing {[r['missing'] for r in lat]}, achieved rate "
                  f"{[r['achieved_rate'] for r in lat]}, handler start before commit ack "
                  f"{[r['neg_ack_to_start'] for r in lat]}")
        for p in (1, 2):
            ex = g.get((side, "exec", p), [])
            if ex:
                print(f"- {side} drain {p}p: executed {[r['executed'] for r in ex]}, left "
                      f"{[r['jobs_left'] for r in ex]}, split {[r['per_proc'] for r in ex]}, "
                      f"start-up ms {[r['startup_ms'] for r in ex]}, wall ms "
                      f"{[r['wall_ms'] for r in ex]}")
    cpu = []
    for (side, *rest), rs in sorted(g.items(), key=lambda kv: str(kv[0])):
        busy = [r.get("machine_busy_pct_of_1core") for r in rs]
        pg = [r.get("postgres_pct_of_1core") for r in rs]
        la = [r.get("loadavg1", r.get("loadavg1_before")) for r in rs]
        cpu.append(f"{side} {'/'.join(map(str, rest))}: busy {busy} pg {pg} load1 {la}")
    print("- CPU (% of one core; 200 = both cores busy) and 1-min load average before each "
          "measurement: " + "; ".join(cpu))
    for name in ("load.txt", "machine.txt"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            print()
            print(f"{name}:")
            print("```")
            print(open(path).read().rstrip())
            print("```")


if __name__ == "__main__":
    main()
