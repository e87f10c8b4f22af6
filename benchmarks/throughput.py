"""End-to-end throughput against plain Celery, with CPU per task of every process involved.

A configuration is a body (one row, or three indexed reads and one row), a
connection handling (Celery's default: every Django connection closed around
each task; or ``CELERY_DB_REUSE_MAX`` set) and a prefork concurrency. For each,
every variant runs in interleaved rounds (plain, plain in ``atomic``, status,
transactional, redis store, the peers; then again), and each variant's ratio is
the median of its per-round ratios to the plain task of the same round.

The rate comes from the rows' own database timestamps (first to last), so
publishing is not counted. CPU is read from /proc for the worker's parent and
its children, every PostgreSQL process (exited backends through the
postmaster's reaped-children time) and redis-server, from before the round's
first publish until its last row is there.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.servers import wait_for

REPO = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")

#: The variants every configuration runs, then the floor (connections reused) and
#: the peers (one-row body only).
VARIANTS = ("plain", "plain_atomic", "status", "transactional", "redis")
FLOORS = ("floor_status", "floor_transactional", "floor_redis")
PEERS = ("celery_dedup", "celery_once", "celery_singleton")
#: (body, connection handling, concurrency), grouped so the workers start once per handling/c.
CONFIGS = (
    ("row", "reuse", 4),
    ("read", "reuse", 4),
    ("row", "default", 4),
    ("row", "reuse", 2),
    ("read", "reuse", 2),
    ("row", "default", 2),
)
QUEUES = {"db": "bench-db", "redis": "bench-redis", "peers": "bench-peers"}


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def cpu(pid: int, *, reaped: bool = False) -> float:
    """CPU seconds of *pid* (user + system), with its reaped children's if *reaped*."""
    fields = proc_stat(pid)
    if fields is None:
        return 0.0
    # After the name: state ppid pgrp ... utime is field 14 of the line (index 11 here).
    used = int(fields[11]) + int(fields[12])
    if reaped:
        used += int(fields[13]) + int(fields[14])
    return used / TICKS


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is *pid*."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = proc_stat(int(entry))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry))
    return found


@dataclass
class Processes:
    """The processes whose CPU a round counts."""

    postmaster: int
    redis: int
    workers: list[Worker]

    def snapshot(self) -> dict[str, float]:
        """CPU seconds so far, by role."""
        parents = sum(cpu(w.process.pid) for w in self.workers)
        kids = 0.0
        for w in self.workers:
            kids += sum(cpu(child) for child in children_of(w.process.pid))
            # Children that exited (none should in a round) count through the parent.
            fields = proc_stat(w.process.pid)
            if fields is not None:
                kids += (int(fields[13]) + int(fields[14])) / TICKS
        pg = cpu(self.postmaster, reaped=True)
        pg += sum(cpu(child) for child in children_of(self.postmaster))
        return {
            "worker_parent": parents,
            "worker_children": kids,
            "postgres": pg,
            "redis": cpu(self.redis),
        }


class Worker:
    """A benchmark worker process (prefork, *concurrency* children)."""

    def __init__(
        self, name: str, queue: str, concurrency: int, env: dict[str, str], log_dir: Path
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"worker-{name}.log"
        # fmt: off
        command = [
            sys.executable, "-m", "celery", "-A", "benchmarks.celery_app", "worker",
            "-P", "prefork", "-c", str(concurrency), "-Q", queue, "-n", f"{name}@%h",
            "-l", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]
        # fmt: on
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=open(self.log_path, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        """Stop the worker (warm shutdown, then kill if it hangs)."""
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def task_for(body: str, variant: str):
    """The task and queue of one variant."""
    from benchmarks.benchapp import tasks

    if variant in PEERS:
        return tasks.PEERS[variant], QUEUES["peers"]
    queue = QUEUES["redis"] if variant == "redis" else QUEUES["db"]
    return tasks.TASKS[body][variant], queue


def variants_for(body: str, mode: str) -> tuple[str, ...]:
    """The variants of a configuration (the floor with reused connections, peers with one row)."""
    from benchmarks.benchapp import tasks

    floors = FLOORS if mode == "reuse" else ()
    peers = tuple(p for p in PEERS if p in tasks.PEERS) if body == "row" else ()
    return VARIANTS + floors + peers


def run_round(label: str, body: str, variant: str, run: int, messages: int, procs: Processes):
    """Publish *messages* of one variant, wait for their rows; return (rate, CPU by role)."""
    from django.db.models import Max, Min

    from benchmarks.benchapp.models import Row

    task, queue = task_for(body, variant)
    before = procs.snapshot()
    for n in range(messages):
        task.apply_async(args=(label, run, n), queue=queue)
    rows = Row.objects.filter(variant=label, run=run)
    wait_for(lambda: rows.count() >= messages, 900, 0.2, f"{label} round {run}")
    after = procs.snapshot()
    span = rows.aggregate(first=Min("at"), last=Max("at"))
    seconds = (span["last"] - span["first"]).total_seconds()
    used = {role: (after[role] - before[role]) / messages for role in after}
    used["total"] = sum(used.values())
    return (messages - 1) / seconds, used


def measure(
    messages: int,
    rounds: int,
    env: dict[str, str],
    log_dir: Path,
    postmaster: int,
    redis_pid: int,
    configs=CONFIGS,
) -> dict:
    """Run every configuration; return rates, CPU per task and ratios, per configuration."""
    from benchmarks.benchapp.models import Row

    results: dict[str, dict] = {}
    started: tuple[str, int] | None = None
    workers: list[Worker] = []
    try:
        for body, mode, concurrency in configs:
            if started != (mode, concurrency):
                for worker in workers:
                    worker.stop()
                workers = start_workers(mode, concurrency, env, log_dir)
                started = (mode, concurrency)
            procs = Processes(postmaster, redis_pid, workers)
            key = f"{body}-{mode}-c{concurrency}"
            names = variants_for(body, mode)
            print(f"  {key}: {', '.join(names)}", flush=True)
            warm = f"warm-{key}"
            for variant in names:
                task, queue = task_for(body, variant)
                for n in range(50):
                    task.apply_async(args=(f"{warm}-{variant}", 0, n), queue=queue)
            for variant in names:
                wait_for(
                    lambda v=variant, w=warm: Row.objects.filter(variant=f"{w}-{v}").count() == 50,
                    300,
                    0.2,
                    f"the warm-up of {key}",
                )
            rates: dict[str, list[float]] = {v: [] for v in names}
            cpus: dict[str, list[dict[str, float]]] = {v: [] for v in names}
            for run in range(rounds):
                for variant in names:
                    label = f"{key}-{variant}"[:40]
                    rate, used = run_round(label, body, variant, run, messages, procs)
                    rates[variant].append(rate)
                    cpus[variant].append(used)
                    print(
                        f"    round {run + 1} {variant:<17} {rate:7.1f} tasks/s  "
                        f"CPU {used['total'] * 1000:6.2f} ms/task",
                        flush=True,
                    )
            results[key] = summarise(body, mode, concurrency, rates, cpus)
    finally:
        for worker in workers:
            worker.stop()
    return results


def start_workers(mode: str, concurrency: int, env: dict[str, str], log_dir: Path):
    """The db, redis-store and peers workers of one connection handling and concurrency."""
    extra = {"DEDUP_BENCH_DB_REUSE_MAX": "1000000"} if mode == "reuse" else {}
    tag = f"{mode}-c{concurrency}"
    store = {"DEDUP_BENCH_STORE_URL": env["DEDUP_BENCH_BROKER_URL"][:-1] + "1"}
    return [
        Worker(f"db-{tag}", QUEUES["db"], concurrency, {**env, **extra}, log_dir),
        Worker(f"redis-{tag}", QUEUES["redis"], concurrency, {**env, **extra, **store}, log_dir),
        Worker(
            f"peers-{tag}",
            QUEUES["peers"],
            concurrency,
            {**env, **extra, "DEDUP_BENCH_RESULTS": "1"},
            log_dir,
        ),
    ]


def summarise(body, mode, concurrency, rates, cpus) -> dict:
    """Medians of rates, ratios and CPU per task, for one configuration."""
    plain = rates["plain"]
    ratios = {
        v: statistics.median(r / p for r, p in zip(rs, plain, strict=True))
        for v, rs in rates.items()
    }
    cpu_per_task = {
        v: {role: statistics.median(c[role] for c in cs) for role in cs[0]}
        for v, cs in cpus.items()
    }
    return {
        "body": body,
        "connections": mode,
        "concurrency": concurrency,
        "rates": rates,
        "median_rate": {v: statistics.median(r) for v, r in rates.items()},
        "median_ratio_to_plain": ratios,
        "cpu_ms_per_task": {
            v: {role: seconds * 1000 for role, seconds in used.items()}
            for v, used in cpu_per_task.items()
        },
    }


def fill_catalogue() -> None:
    """The items the realistic body reads."""
    from benchmarks.benchapp.models import Item
    from benchmarks.benchapp.tasks import CATALOGUE

    if Item.objects.count() < CATALOGUE:
        Item.objects.all().delete()
        Item.objects.bulk_create(
            [Item(sku=f"sku-{i}", stock=100) for i in range(CATALOGUE)], batch_size=2000
        )
