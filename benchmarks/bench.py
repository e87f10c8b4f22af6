"""dedup_celery's benchmarks, all in one run: ``make bench``.

It starts a throwaway PostgreSQL 15 (default durability: fsync and synchronous
commit on) and a redis-server on loopback, then measures:

1. end-to-end throughput and CPU per task against plain Celery, for two bodies,
   both connection handlings and prefork concurrency 4 and 2, with the peers,
   in interleaved rounds (:mod:`benchmarks.throughput`);
2. the floor: raw psycopg and redis-py on one kept connection (:mod:`benchmarks.floor`);
3. the statements each mode costs per message, first delivery and duplicate,
   read from PostgreSQL's own statement log (BEGIN and COMMIT included) and from
   Redis's command statistics;
4. claim + complete latency of both backends at 1, 4 and 16 clients;
5. rows and bytes per record, and purging 1 million expired records while
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
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import floor, throughput  # noqa: E402
from benchmarks.chart import write_chart  # noqa: E402
from benchmarks.latency import measure, start_redis  # noqa: E402
from harness.servers import PostgresServer  # noqa: E402

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


def statements(pg: PostgresServer, redis_port: int) -> dict:
    """Statements per message, from PostgreSQL's statement log and Redis's commandstats."""
    import redis as redis_py
    from celery.app.trace import build_tracer
    from django.db import connection
    from django.test import override_settings

    from benchmarks.benchapp.tasks import TASKS
    from dedup_celery import get_backend

    plain_row, status_row, tx_row = (TASKS["row"][v] for v in ("plain", "status", "transactional"))

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

    # Every session logs its statements while this part runs: Django's, and the
    # database backend's kept connection, which opens after this (see kept.py).
    with connection.cursor() as cursor:
        cursor.execute("ALTER DATABASE bench SET log_statement = 'all'")
        cursor.execute("SET log_statement = 'all'")
    get_backend().close()

    def logged(action) -> list[str]:
        before = pg.log.stat().st_size
        action()
        time.sleep(0.3)
        with open(pg.log, "rb") as fh:
            fh.seek(before)
            text = fh.read().decode(errors="replace")
        # Only this process talks to the server now. Simple queries log
        # "statement: ...", prepared ones "execute <name>: ...".
        found = re.findall(r"(?:statement|execute [^:]+): (.*)$", text, re.MULTILINE)
        return [s.split()[0].upper() for s in found if not s.upper().startswith("SET ")]

    result: dict[str, dict] = {}
    for name, task in (("plain", plain_row), ("status", status_row), ("transactional", tx_row)):
        run(task, str(uuid.uuid4()))  # the connections are open and the statements prepared
        task_id = str(uuid.uuid4())
        first = logged(lambda t=task, i=task_id: run(t, i))
        again = logged(lambda t=task, i=task_id: run(t, i))
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
        first_sql = logged(lambda: run(status_row, task_id))
        middle = evals()
        again_sql = logged(lambda: run(status_row, task_id))
        end = evals()
    with connection.cursor() as cursor:
        cursor.execute("ALTER DATABASE bench RESET log_statement")
        cursor.execute("SET log_statement = 'none'")
    get_backend().close()
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
        "--configs",
        default="",
        help="comma-separated throughput configurations, e.g. row-reuse-c4 (default: all)",
    )
    parser.add_argument(
        "--parts",
        default="throughput,floor,statements,latency,purge",
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
        results["redis"] = redis_persistence(redis_port)
        parts = set(args.parts.split(","))
        if "throughput" in parts:
            print("1. throughput (tasks/s) and CPU per task")
            throughput.fill_catalogue()
            configs = throughput.CONFIGS
            if args.configs:
                wanted = set(args.configs.split(","))
                configs = tuple(c for c in configs if "{}-{}-c{}".format(*c) in wanted)
            results["throughput"] = throughput.measure(
                args.messages, args.rounds, env, log_dir, postmaster_pid(pg), redis_process.pid,
                configs,
            )  # fmt: skip
        if "floor" in parts:
            print("2. the floor (raw psycopg and redis-py, one kept connection)")
            results["floor"] = floor.measure(pg.port, "bench", redis_port)
        if "statements" in parts:
            print("3. statements per message")
            results["statements"] = statements(pg, redis_port)
        if "latency" in parts:
            print("4. claim + complete latency")
            results["latency"] = latency(redis_port, args.latency_seconds)
        if "purge" in parts:
            print(f"5. purging {args.purge_records} expired records")
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


#: The floor operation each variant's added CPU is compared with.
FLOOR_OF = {
    "status": "claim_complete",
    "floor_status": "claim_complete",
    "transactional": "tx_claim",
    "floor_transactional": "tx_claim",
    "redis": "redis_claim_complete",
    "floor_redis": "redis_claim_complete",
}


def postmaster_pid(pg: PostgresServer) -> int:
    """The pid of *pg*'s postmaster (first line of postmaster.pid)."""
    return int((pg.data / "postmaster.pid").read_text().split()[0])


def redis_persistence(port: int) -> dict[str, str]:
    """The Redis server's persistence settings, as the report states them."""
    import redis as redis_py

    client = redis_py.Redis(port=port)
    return {name: client.config_get(name)[name] for name in ("appendonly", "appendfsync", "save")}


def report(results: dict) -> None:
    """Print the tables BENCHMARKS.md shows."""
    print(f"\nmachine: {results['machine']}")
    redis = results.get("redis")
    if redis:
        print(f"redis-server: appendonly {redis['appendonly']}, appendfsync {redis['appendfsync']}")
    floors = results.get("floor", {})
    for name, cost in floors.items():
        print(
            f"floor {name:<22} {cost['wall_ms']:.3f} ms wall, CPU {cost['cpu_ms']:.3f} ms "
            f"(client {cost['client_cpu_ms']:.3f}, server {cost['server_cpu_ms']:.3f})"
        )
    for key, data in results.get("throughput", {}).items():
        print(f"\nthroughput {key} (median of rounds; CPU ms per task, all processes):")
        plain_cpu = data["cpu_ms_per_task"]["plain"]["total"]
        for variant, rate in data["median_rate"].items():
            used = data["cpu_ms_per_task"][variant]
            added = used["total"] - plain_cpu
            floor_cost = floors.get(FLOOR_OF.get(variant, ""), {}).get("cpu_ms")
            multiple = f"  {added / floor_cost:4.1f}x floor" if floor_cost else ""
            print(
                f"  {variant:<17} {rate:7.1f}/s  ratio {data['median_ratio_to_plain'][variant]:.3f}"
                f"  CPU {used['total']:6.2f} (parent {used['worker_parent']:.2f}, children "
                f"{used['worker_children']:.2f}, pg {used['postgres']:.2f}, redis "
                f"{used['redis']:.2f})  +{added:5.2f}{multiple}"
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
