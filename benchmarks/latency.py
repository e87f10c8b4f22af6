"""Claim + complete latency of the db (PostgreSQL) and redis backends, at 1, 4 and 16 clients.

Run with ``make bench-latency``. It starts a throwaway PostgreSQL (default
durability: fsync on) and redis-server on loopback, then has each client thread
claim and complete fresh keys in a loop, timing each claim+complete pair.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.servers import PostgresServer, RedisServer  # noqa: E402


def start_redis() -> tuple[subprocess.Popen, int]:
    """Start a throwaway redis-server (no persistence) on a free loopback port."""
    server = RedisServer(persistent=False).start()
    assert server.process is not None
    return server.process, server.port


def measure(backend, clients: int, seconds: float) -> list[float]:
    """Return the claim+complete durations that *clients* threads achieved in *seconds*."""
    from django.db import connections

    from dedup_celery.backends.base import Claim
    from dedup_celery.identity import current_identity
    from dedup_celery.keys import digest

    samples: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    barrier = threading.Barrier(clients)

    def client() -> None:
        mine = []
        barrier.wait()
        while time.monotonic() < stop:
            key = uuid.uuid4().hex
            claim = Claim(
                scope="bench",
                key=key,
                key_digest=digest(key),
                owner=uuid.uuid4().hex,
                task_id=key,
                task_name="bench",
                attempt=0,
                identity=current_identity(),
                lease_seconds=600,
                record_ttl=3600,
            )
            started = time.perf_counter()
            backend.claim(claim)
            backend.complete(claim, None)
            mine.append(time.perf_counter() - started)
        connections.close_all()
        with lock:
            samples.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return samples


def main() -> None:
    """Start the services, measure each backend at each level, print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per backend and level")
    args = parser.parse_args()

    pg = PostgresServer(durable=True)
    pg.init()
    pg.start()
    redis_process, redis_port = start_redis()
    try:
        os.environ["DEDUP_BENCH_PG_PORT"] = str(pg.port)
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
        import django

        django.setup()
        from django.core.management import call_command

        from dedup_celery.backends.db import DatabaseBackend
        from dedup_celery.backends.redis import RedisBackend

        call_command("migrate", "dedup_celery", verbosity=0)
        backends = {
            "db (PostgreSQL 15, fsync on)": DatabaseBackend(),
            "redis": RedisBackend(url=f"redis://127.0.0.1:{redis_port}/0"),
        }
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, {platform.platform()}"
        )
        print(f"{'backend':<30} {'clients':>7} {'pairs/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
        for name, backend in backends.items():
            for clients in (1, 4, 16):
                measure(backend, clients, 0.5)  # warm up connections and caches
                samples = measure(backend, clients, args.seconds)
                quantiles = statistics.quantiles(samples, n=100)
                print(
                    f"{name:<30} {clients:>7} {len(samples) / args.seconds:>9.0f} "
                    f"{quantiles[49] * 1000:>8.2f} {quantiles[98] * 1000:>8.2f}"
                )
    finally:
        redis_process.terminate()
        redis_process.wait(10)
        pg.destroy()


if __name__ == "__main__":
    main()
