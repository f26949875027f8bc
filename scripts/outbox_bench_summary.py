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
        return (r["side"], "enqueue", r["cfg"])
    if r["test"] == "exec":
        return (r["side"], "exec", r["procs"])
    return (r["side"], "latency")


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_rate(v):
    return "—" if v is None else f"{v:,.0f} jobs/s"


def fmt_ms(v):
    return "—" if v is None else f"{v:.2f} ms"


def runs(xs, fmt):
    xs = [x for x in xs if x is not None]
    return "" if len(xs) < 2 else " (" + ", ".join(fmt(x) for x in xs) + ")"


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    rows = load(os.path.join(out, "all.jsonl"))
    g = collections.defaultdict(list)
    for r in rows:
        g[key(r)].append(r)

    def vals(k, field, sub=None):
        return [(r[field] if sub is None else (r[field] or {}).get(sub)) for r in g.get(k, [])]

    table = []

    def rate_row(what, gw_k, gw_f, ours_k, ours_f, target=True):
        gv, ov = vals(gw_k, gw_f) if gw_k else [], vals(ours_k, ours_f)
        gm, om = med(gv), med(ov)
        ratio = f"{om / gm:.2f}x" if gm and om else "—"
        verdict = ""
        if target and gm and om:
            verdict = "ahead" if om > gm else f"**behind by {(1 - om / gm) * 100:.0f} %**"
        table.append(
            f"| {what} | {fmt_rate(gm) if gw_k else ''}{runs(gv, lambda x: f'{x:,.0f}')} "
            f"| {fmt_rate(om)}{runs(ov, lambda x: f'{x:,.0f}')} | {ratio} | {verdict} |"
        )

    def lat_row(what, field, p, target=True):
        gv, ov = vals(("gw", "latency"), field, p), vals(("ours", "latency"), field, p)
        gm, om = med(gv), med(ov)
        ratio = f"{gm / om:.2f}x" if gm and om and om > 0 else "—"
        verdict = ""
        if target and gm is not None and om is not None:
            verdict = "ahead" if om < gm else f"**behind by {(om / gm - 1) * 100:.0f} %**"
        table.append(
            f"| {what} | {fmt_ms(gm)}{runs(gv, lambda x: f'{x:.2f}')} "
            f"| {fmt_ms(om)}{runs(ov, lambda x: f'{x:.2f}')} | {ratio} | {verdict} |"
        )

    rate_row("enqueue, one job per transaction (BEGIN, insert, COMMIT), one client",
             ("gw", "enqueue", "raw1"), "jobs_per_s", ("ours", "enqueue", "tx1"), "jobs_per_s")
    if g.get(("ours", "enqueue", "batch-all")):
        rate_row("enqueue in batches of 1,000 per transaction (ours: `enqueue_all`, one statement)",
                 ("gw", "enqueue", "batch"), "jobs_per_s",
                 ("ours", "enqueue", "batch-all"), "jobs_per_s")
        rate_row("enqueue in batches of 1,000 per transaction (ours: 1,000 × `defer_durable`)",
                 ("gw", "enqueue", "batch"), "jobs_per_s", ("ours", "enqueue", "batch"),
                 "jobs_per_s")
    else:
        rate_row("enqueue in batches of 1,000 per transaction (ours: 1,000 × `defer_durable`)",
                 ("gw", "enqueue", "batch"), "jobs_per_s", ("ours", "enqueue", "batch"),
                 "jobs_per_s")
    for p in (1, 2):
        rate_row(f"drain 20,000 queued no-op jobs, {p} process{'es' if p > 1 else ''} "
                 "(wall − start-up)", ("gw", "exec", p), "jps_wall_minus_startup",
                 ("ours", "exec", p), "jps_wall_minus_startup")
    for p in ("p50", "p90", "p99", "max"):
        lat_row(f"latency at 200 jobs/s, commit acknowledged → handler start, {p}",
                "commitack_to_start_ms", p)
    rate_row("_(info)_ enqueue, one job outside a transaction (one statement, as `add_job`)",
             None, None, ("ours", "enqueue", "autocommit"), "jobs_per_s", target=False)
    for p in (1, 2):
        rate_row(f"_(info)_ drain, {p} process{'es' if p > 1 else ''}, first → last handler start",
                 ("gw", "exec", p), "jps_first_to_last_task", ("ours", "exec", p),
                 "jps_first_to_last_task", target=False)
    for p in ("p50", "p99"):
        lat_row(f"_(info)_ latency, job sent → handler start, {p}", "send_to_start_ms", p,
                target=False)
        lat_row(f"_(info)_ latency, enqueue round trip (send → commit acknowledged), {p}",
                "add_job_rtt_ms", p, target=False)

    reps = max((r["rep"] for r in rows), default=0)
    print()
    print(f"### Outbox relay vs graphile-worker, same PostgreSQL, same run "
          f"({reps} repetition{'s' if reps != 1 else ''}; medians"
          f"{', runs in brackets' if reps > 1 else ''})")
    print()
    print("| what | graphile-worker | ours (diesel-transaction-signals) "
          "| ratio (>1: ours ahead) | |")
    print("|---|---|---|---|---|")
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
          "`listen()` (LISTEN dts_outbox); producer: one connection, BEGIN/defer_durable/COMMIT "
          "per job, timer pacing; times from CLOCK_REALTIME in both processes")
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
