// Added to the temporary copy of the graphile-worker kit by scripts/outbox-bench (the kit in
// shared/anchors/graphile-worker is not modified).
//
// usage: node bench/enqueue_usertx.js COUNT
// One user row plus one job in one user transaction, one client (node-postgres), COUNT times:
//   BEGIN; INSERT INTO bench_users (email) VALUES ($1); SELECT graphile_worker.add_job($1, $2::json); COMMIT
// The same work as the outbox side's `enqueue --mode usertx1` (BEGIN; insert the user row;
// defer_durable; COMMIT). Prints one JSON line as bench/enqueue.js does.
const { Client } = require("pg");
const cpu = require("./cpu.js");
const COUNT = Number(process.argv[2] || 20000);
(async () => {
  const c = new Client({ connectionString: process.env.DATABASE_URL });
  await c.connect();
  await c.query(
    "create table if not exists bench_users (id bigserial primary key, email text not null, " +
      "created_at timestamptz not null default now())"
  );
  await c.query("truncate bench_users");
  await c.query("vacuum analyze bench_users");
  await c.query("select 1");
  const c0 = cpu.snap();
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < COUNT; i++) {
    await c.query("begin");
    await c.query("insert into bench_users (email) values ($1)", [`user${i}@example.com`]);
    await c.query("select graphile_worker.add_job($1::text, $2::json)", ["noop", JSON.stringify({ id: i })]);
    await c.query("commit");
  }
  const t1 = process.hrtime.bigint();
  const cu = cpu.diff(c0, cpu.snap());
  await c.end();
  const ms = Number(t1 - t0) / 1e6;
  console.log(JSON.stringify({ test: "enqueue", mode: "usertx1", count: COUNT, batch: 1, ms: +ms.toFixed(1), jobs_per_s: +((COUNT * 1000) / ms).toFixed(0), ...cu, loadavg1: require("os").loadavg()[0] }));
})().catch((e) => { console.error(e); process.exit(1); });
