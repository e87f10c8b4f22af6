"""dedup_celery's benchmarks, all in one run: ``make bench``.

It starts a throwaway PostgreSQL 15 (default durability: fsync and synchronous
commit on) and a redis-server on loopback, then measures:

1. end-to-end throughput of a task that writes one row, for plain Celery and
   DedupTask (status mode, transactional mode, redis backend), in interleaved
   rounds, with Celery's default Django connection handling and with
   ``CELERY_DB_REUSE_MAX``; the report gives each variant's median ratio to plain;
2. the statements each mode costs per message, first delivery and duplicate,
   read from PostgreSQL's own statement log (BEGIN and COMMIT included) and from
   Redis's command statistics;
3. claim + complete latency of both backends at 1, 4 and 16 clients;
4. rows and bytes per record, and purging 1 million expired records while
   claims go on, with the slowest claim during the purge.

Results are printed as tables, the throughput chart of docs/BENCHMARKS.md is
redrawn (docs/benchmarks-throughput.svg), and the raw numbers go to
artifacts/bench/results.json (git-ignored): BENCHMARKS.md and its chart are the record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.chart import write_chart  # noqa: E402
from benchmarks.latency import measure, start_redis  # noqa: E402
from harness.servers import PostgresServer, wait_for  # noqa: E402

VARIANTS = ("plain", "status", "transactional", "redis")
RESULTS = REPO / "artifacts" / "bench" / "results.json"
CHART = REPO / "docs" / "benchmarks-throughput.svg"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


class Worker:
    """A benchmark worker process (prefork, two children)."""

    def __init__(self, name: str, queue: str, env: dict[str, str], log_dir: Path) -> None:
        self.log_path = log_dir / f"worker-{name}.log"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "benchmarks.celery_app",
                "worker",
                "-P",
                "prefork",
                "-c",
                "2",
                "-Q",
                queue,
                "-n",
                f"{name}@%h",
                "-l",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=REPO,
            env=env,
            stdout=open(self.log_path, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def throughput(messages: int, rounds: int, env: dict[str, str], log_dir: Path) -> dict:
    """Interleaved rounds of every variant; messages per second from row timestamps."""
    from django.db.models import Max, Min

    from benchmarks.benchapp.models import Row
    from benchmarks.benchapp.tasks import plain_row, status_row, tx_row

    results: dict[str, dict] = {}
    for connections_mode in ("default", "reuse"):
        extra = {"DEDUP_BENCH_DB_REUSE_MAX": "1000000"} if connections_mode == "reuse" else {}
        db_worker = Worker(f"db-{connections_mode}", "bench-db", {**env, **extra}, log_dir)
        redis_worker = Worker(
            f"redis-{connections_mode}",
            "bench-redis",
            {**env, **extra, "DEDUP_BENCH_STORE_URL": env["DEDUP_BENCH_BROKER_URL"][:-1] + "1"},
            log_dir,
        )
        tasks = {
            "plain": (plain_row, "bench-db"),
            "status": (status_row, "bench-db"),
            "transactional": (tx_row, "bench-db"),
            "redis": (status_row, "bench-redis"),
        }
        rates: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        try:
            warm = f"warm-{connections_mode}"
            for variant, (task, queue) in tasks.items():
                for n in range(50):
                    task.apply_async(args=(f"{warm}-{variant}", 0, n), queue=queue)
            for variant in VARIANTS:
                wait_for(
                    lambda v=variant, w=warm: Row.objects.filter(variant=f"{w}-{v}").count() == 50,
                    120,
                    0.2,
                    "the warm-up",
                )
            for round_no in range(rounds):
                for variant in VARIANTS:
                    task, queue = tasks[variant]
                    label = f"{connections_mode}-{variant}"
                    for n in range(messages):
                        task.apply_async(args=(label, round_no, n), queue=queue)
                    rows = Row.objects.filter(variant=label, run=round_no)
                    wait_for(
                        lambda rows=rows: rows.count() >= messages,
                        600,
                        0.2,
                        f"{label} round {round_no}",
                    )
                    span = rows.aggregate(first=Min("at"), last=Max("at"))
                    seconds = (span["last"] - span["first"]).total_seconds()
                    rates[variant].append((messages - 1) / seconds)
                    print(
                        f"  {label:<22} round {round_no + 1}: {rates[variant][-1]:7.1f} tasks/s",
                        flush=True,
                    )
        finally:
            db_worker.stop()
            redis_worker.stop()
        ratios = {
            variant: statistics.median(
                rate / plain for rate, plain in zip(rates[variant], rates["plain"], strict=True)
            )
            for variant in VARIANTS
        }
        results[connections_mode] = {
            "rates": rates,
            "median_rate": {v: statistics.median(r) for v, r in rates.items()},
            "median_ratio_to_plain": ratios,
        }
    return results


def statements(pg: PostgresServer, redis_port: int) -> dict:
    """Statements per message, from PostgreSQL's statement log and Redis's commandstats."""
    import redis as redis_py
    from celery.app.trace import build_tracer
    from django.db import connection
    from django.test import override_settings

    from benchmarks.benchapp.tasks import plain_row, status_row, tx_row

    def run(task, task_id):
        tracer = build_tracer(task.name, task, app=task.app, eager=False, propagate=False)
        request = {
            "id": task_id,
            "retries": 0,
            "hostname": "bench@localhost",
            "is_eager": False,
            "delivery_info": {"exchange": "", "routing_key": "bench-count"},
        }
        tracer(task_id, ["count", 0, 0], {}, request)

    def logged(tag: str, action) -> list[str]:
        with connection.cursor() as cursor:
            cursor.execute("SET log_statement = 'all'")
            cursor.execute(f"SET application_name = '{tag}'")
        before = pg.log.stat().st_size
        action()
        time.sleep(0.3)
        with open(pg.log, "rb") as fh:
            fh.seek(before)
            text = fh.read().decode(errors="replace")
        with connection.cursor() as cursor:
            cursor.execute("SET log_statement = 'none'")
        # Simple queries log "statement: ...", prepared ones "execute <name>: ...".
        found = re.findall(
            rf"^{re.escape(tag)} .*?(?:statement|execute [^:]+): (.*)$", text, re.MULTILINE
        )
        return [s.split()[0].upper() for s in found if not s.upper().startswith("SET ")]

    result: dict[str, dict] = {}
    for name, task in (("plain", plain_row), ("status", status_row), ("transactional", tx_row)):
        task_id = str(uuid.uuid4())
        first = logged(f"count-{name}-first", lambda t=task, i=task_id: run(t, i))
        again = logged(f"count-{name}-again", lambda t=task, i=task_id: run(t, i))
        result[name] = {"first": first, "duplicate": again}
    client = redis_py.Redis(port=redis_port, db=1)

    def evals() -> int:
        stats = client.info("commandstats")
        # A script's first EVALSHA on a fresh server fails with NOSCRIPT (redis-py then
        # loads it and calls again); only the calls that ran count.
        return sum(
            v["calls"] - v.get("failed_calls", 0)
            for k, v in stats.items()
            if k.startswith("cmdstat_eval")
        )

    with override_settings(
        DEDUP_CELERY={"BACKEND": "redis", "OPTIONS": {"url": f"redis://127.0.0.1:{redis_port}/1"}}
    ):
        task_id = str(uuid.uuid4())
        start = evals()
        first_sql = logged("count-redis-first", lambda: run(status_row, task_id))
        middle = evals()
        again_sql = logged("count-redis-again", lambda: run(status_row, task_id))
        end = evals()
    result["redis"] = {
        "first": first_sql,
        "duplicate": again_sql,
        "redis_scripts_first": middle - start,
        "redis_scripts_duplicate": end - middle,
    }
    return result


def purge(million: int, batch_size: int, pause: float) -> dict:
    """Bytes per record, and purging *million* expired records while claims go on."""
    from django.db import connection, connections

    from dedup_celery.backends.db import DatabaseBackend
    from dedup_celery.models import DedupRecord
    from harness.claims import make_claim

    table = DedupRecord._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {table}")
        cursor.execute(
            f"""INSERT INTO {table} (scope, key, key_digest, status, owner, task_id, task_name,
                attempt, hostname, pid, process_start, boot_id, pid_namespace, created_at,
                updated_at, expires_at, consumed_at, skipped, rescheduled, takeovers,
                purge_after)
            SELECT 'bench.scope', 'order:' || i, encode(sha256(i::text::bytea), 'hex'),
                'consumed', md5(i::text)::uuid, md5(i::text || 't')::uuid::text,
                'benchmarks.benchapp.tasks.status_row', 0, 'bench-host', 4242, 123456,
                'boot', 'pid:[1]', now() - interval '8 days', now() - interval '8 days',
                now() - interval '1 day', now() - interval '8 days', 0, 0, 0,
                CASE WHEN i %% 2 = 0 THEN now() - interval '1 day' END
            FROM generate_series(1, %s) AS i""",
            [million],
        )
        cursor.execute("ANALYZE " + table)
        cursor.execute(f"SELECT pg_total_relation_size('{table}'), pg_relation_size('{table}')")
        total_bytes, heap_bytes = cursor.fetchone()
    backend = DatabaseBackend()
    latencies: list[float] = []
    stop = threading.Event()

    def claimer() -> None:
        while not stop.is_set():
            claim = make_claim(uuid.uuid4().hex, scope="bench.live", lease=600, ttl=3600)
            started = time.perf_counter()
            backend.claim(claim)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.005)
        connections.close_all()

    thread = threading.Thread(target=claimer)
    thread.start()
    # The same claims for a while without a purge: the machine's own noise.
    time.sleep(15)
    baseline = list(latencies)
    before = len(latencies)
    started = time.monotonic()
    purged = backend.purge_expired(batch_size=batch_size, pause=pause)
    seconds = time.monotonic() - started
    during = latencies[before:]
    stop.set()
    thread.join()
    return {
        "records": million,
        "bytes_per_record": total_bytes / million,
        "heap_bytes_per_record": heap_bytes / million,
        "purged": purged,
        "batch_size": batch_size,
        "pause": pause,
        "purge_seconds": seconds,
        "claims_during_purge": len(during),
        "claim_max_ms": max(during) * 1000,
        "claim_p99_ms": statistics.quantiles(during, n=100)[98] * 1000,
        "claim_p50_ms": statistics.median(during) * 1000,
        "claims_without_purge": len(baseline),
        "claim_max_ms_without_purge": max(baseline) * 1000,
        "claim_p99_ms_without_purge": statistics.quantiles(baseline, n=100)[98] * 1000,
    }


def latency(redis_port: int, seconds: float) -> dict:
    """Claim + complete latency of both backends at 1, 4 and 16 client threads."""
    from dedup_celery.backends.db import DatabaseBackend
    from dedup_celery.backends.redis import RedisBackend

    found = {}
    for name, backend in (
        ("db", DatabaseBackend()),
        ("redis", RedisBackend(url=f"redis://127.0.0.1:{redis_port}/2")),
    ):
        for clients in (1, 4, 16):
            measure(backend, clients, 0.5)
            samples = measure(backend, clients, seconds)
            q = statistics.quantiles(samples, n=100)
            found[f"{name}-{clients}"] = {
                "pairs_per_second": len(samples) / seconds,
                "p50_ms": q[49] * 1000,
                "p99_ms": q[98] * 1000,
            }
    return found


def main() -> None:
    """Start the servers, run every part, print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000, help="tasks per round and variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--purge-records", type=int, default=1_000_000)
    parser.add_argument("--purge-batch", type=int, default=1000)
    parser.add_argument("--purge-pause", type=float, default=0.02)
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument(
        "--parts",
        default="throughput,statements,latency,purge",
        help="comma-separated parts to run (default: all)",
    )
    args = parser.parse_args()

    log_dir = REPO / "artifacts" / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    pg = PostgresServer(durable=True)
    pg.init()
    pg.start()
    redis_process, redis_port = start_redis()
    try:
        for sql in (
            "CREATE DATABASE bench",
            # The statement count reads the server log by application name.
            "ALTER SYSTEM SET log_line_prefix = '%a '",
            "SELECT pg_reload_conf()",
        ):
            subprocess.run(
                ["psql", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "-q", "-c", sql],
                check=True,
                capture_output=True,
            )
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "benchmarks.settings",
            "PYTHONPATH": str(REPO),
            "DEDUP_BENCH_PG_PORT": str(pg.port),
            "DEDUP_BENCH_PG_NAME": "bench",
            "DEDUP_BENCH_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        }
        os.environ.update(env)
        import django

        django.setup()
        from django.core.management import call_command

        from benchmarks.celery_app import app

        app.conf.broker_url = env["DEDUP_BENCH_BROKER_URL"]
        call_command("migrate", verbosity=0)
        results: dict = {"machine": machine(), "postgresql": "15, fsync on"}
        print(f"machine: {results['machine']}")
        parts = set(args.parts.split(","))
        if "throughput" in parts:
            print("1. throughput (tasks/s, one row per task)")
            results["throughput"] = throughput(args.messages, args.rounds, env, log_dir)
        if "statements" in parts:
            print("2. statements per message")
            results["statements"] = statements(pg, redis_port)
        if "latency" in parts:
            print("3. claim + complete latency")
            results["latency"] = latency(redis_port, args.latency_seconds)
        if "purge" in parts:
            print(f"4. purging {args.purge_records} expired records")
            results["purge"] = purge(args.purge_records, args.purge_batch, args.purge_pause)
    finally:
        redis_process.terminate()
        redis_process.wait(10)
        pg.destroy()
    if args.parts == parser.get_default("parts"):
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2, default=str))
        write_chart(results, CHART)
    report(results)


def report(results: dict) -> None:
    """Print the tables BENCHMARKS.md shows."""
    print(f"\nmachine: {results['machine']}")
    for mode, data in results.get("throughput", {}).items():
        print(f"\nthroughput, {mode} Django connections (median of rounds):")
        for variant in VARIANTS:
            print(
                f"  {variant:<14} {data['median_rate'][variant]:8.1f} tasks/s   "
                f"ratio to plain {data['median_ratio_to_plain'][variant]:.3f}"
            )
    print("\nstatements per message (PostgreSQL log; the body's INSERT included):")
    for name, data in results.get("statements", {}).items():
        extra = ""
        if "redis_scripts_first" in data:
            extra = (
                f"  + Redis scripts: {data['redis_scripts_first']} first, "
                f"{data['redis_scripts_duplicate']} duplicate"
            )
        print(f"  {name:<14} first: {' '.join(data['first'])}")
        print(f"  {'':<14} duplicate: {' '.join(data['duplicate']) or '(none)'}{extra}")
    print("\nclaim + complete latency:")
    for key, data in results.get("latency", {}).items():
        print(
            f"  {key:<10} {data['pairs_per_second']:8.0f}/s  p50 {data['p50_ms']:.2f} ms  "
            f"p99 {data['p99_ms']:.2f} ms"
        )
    if "purge" not in results:
        return
    p = results["purge"]
    print(
        f"\npurge: {p['purged']} of {p['records']} records in {p['purge_seconds']:.1f} s; "
        f"{p['bytes_per_record']:.0f} bytes per record with indexes "
        f"({p['heap_bytes_per_record']:.0f} heap); {p['claims_during_purge']} claims during it, "
        f"p50 {p['claim_p50_ms']:.1f} ms, p99 {p['claim_p99_ms']:.1f} ms, "
        f"max {p['claim_max_ms']:.1f} ms; without a purge, {p['claims_without_purge']} claims: "
        f"p99 {p['claim_p99_ms_without_purge']:.1f} ms, "
        f"max {p['claim_max_ms_without_purge']:.1f} ms"
    )


if __name__ == "__main__":
    main()
