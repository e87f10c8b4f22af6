"""The physical floor on this machine, measured with raw psycopg 3 and redis-py in the same run.

Each operation runs in a loop on one kept connection, prepared, with
PostgreSQL's default durability (every commit flushed). Its cost is the wall
time per operation, and the CPU per operation of the client (this thread) plus
the server (the connection's backend process, read from /proc), so the
floor is comparable with the CPU per task the throughput part reports.

* ``round_trip``: ``SELECT 1``.
* ``durable_insert``: one autocommit INSERT, as the plain one-row task does.
* ``claim_complete``: the least status mode can do: an ``INSERT … ON CONFLICT
  DO NOTHING`` of a key, then an UPDATE of it, each its own durable commit.
* ``tx_claim``: the least transactional mode can add: an INSERT of a key
  inside the body's own transaction (measured as BEGIN, claim, row, COMMIT
  minus BEGIN, row, COMMIT).
* ``redis_claim_complete``: ``SET NX`` then ``SET`` of a key on Redis.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from benchmarks.throughput import TICKS


def backend_cpu(pid: int) -> float:
    """CPU seconds the server process *pid* has used."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _loop(operation, pid: int, count: int) -> dict[str, float]:
    """Costs per call of *operation*, whose server side is the process *pid*."""
    for _ in range(min(200, count)):  # warm: prepared, catalogue loaded
        operation()
    server0, client0, wall0 = backend_cpu(pid), time.thread_time(), time.perf_counter()
    for _ in range(count):
        operation()
    wall = time.perf_counter() - wall0
    client = time.thread_time() - client0
    server = backend_cpu(pid) - server0
    return {
        "wall_ms": wall / count * 1000,
        "client_cpu_ms": client / count * 1000,
        "server_cpu_ms": server / count * 1000,
        "cpu_ms": (client + server) / count * 1000,
    }


def measure(port: int, dbname: str, redis_port: int, count: int = 3000) -> dict[str, dict]:
    """Measure every floor operation; return its costs per operation."""
    import psycopg
    import redis as redis_py

    conn = psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", dbname=dbname, autocommit=True
    )
    conn.prepare_threshold = 0
    conn.execute("DROP TABLE IF EXISTS floor_row, floor_claim")
    conn.execute("CREATE TABLE floor_row (id bigserial PRIMARY KEY, n int, at timestamptz)")
    conn.execute("CREATE TABLE floor_claim (k text PRIMARY KEY, status text, expires timestamptz)")
    found: dict[str, dict] = {}
    pid = conn.info.backend_pid
    found["round_trip"] = _loop(lambda: conn.execute("SELECT 1"), pid, count)
    found["durable_insert"] = _loop(
        lambda: conn.execute("INSERT INTO floor_row (n, at) VALUES (%s, now())", [1]), pid, count
    )

    def claim_complete() -> None:
        key = uuid.uuid4().hex
        conn.execute(
            "INSERT INTO floor_claim VALUES (%s, 'p', now() + interval '1 hour') "
            "ON CONFLICT DO NOTHING",
            [key],
        )
        conn.execute("UPDATE floor_claim SET status = 'c' WHERE k = %s", [key])

    found["claim_complete"] = _loop(claim_complete, pid, count)

    def body_in_transaction(claim: bool):
        def run() -> None:
            with conn.transaction():
                if claim:
                    conn.execute(
                        "INSERT INTO floor_claim VALUES (%s, 'c', now() + interval '1 hour') "
                        "ON CONFLICT DO NOTHING",
                        [uuid.uuid4().hex],
                    )
                conn.execute("INSERT INTO floor_row (n, at) VALUES (%s, now())", [1])

        return run

    with_claim = _loop(body_in_transaction(True), pid, count)
    without = _loop(body_in_transaction(False), pid, count)
    found["tx_body"] = without
    found["tx_claim"] = {k: with_claim[k] - without[k] for k in with_claim}
    conn.close()

    client = redis_py.Redis(port=redis_port, db=6)
    redis_pid = int(client.info("server")["process_id"])

    def redis_pair() -> None:
        key = uuid.uuid4().hex
        client.set(key, "p", nx=True, px=3_600_000)
        client.set(key, "c", px=3_600_000)

    found["redis_claim_complete"] = _loop(redis_pair, redis_pid, count)
    client.flushdb()
    return found
