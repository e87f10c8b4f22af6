"""Counting helpers for the worker-level scenario tests."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from dedup_celery.backends.base import Record
from dedup_celery.backends.db import DatabaseBackend
from dedup_celery.keys import digest
from tests.services import wait_for
from tests.testapp.models import Effect
from tests.testapp.tasks import plain_effect, run_log, status_effect, tx_effect

#: The ways every scenario runs: the plain control, then the DedupTask in each mode
#: (status-redis is status mode on a worker whose store is Redis; the -mariadb ones
#: keep the message table, and the transactional body's effects, on MariaDB).
TASKS = {
    "plain": plain_effect,
    "status": status_effect,
    "transactional": tx_effect,
    "status-redis": status_effect,
    "status-mariadb": status_effect,
    "transactional-mariadb": tx_effect,
}
MODES = list(TASKS)
#: Where the effects of a transactional body on the MariaDB worker go.
EFFECT_DATABASES = ("default", "mysql")


def store_kind(mode: str) -> str:
    """The store a mode's worker keeps its records in: ``db``, ``redis`` or ``mariadb``."""
    return next((kind for kind in ("redis", "mariadb") if mode.endswith(kind)), "db")


def effect_ns(tag: str, ns=None) -> list[int]:
    """The ``n`` of every effect under *tag*, on every database the test may read."""
    from django.test.testcases import DatabaseOperationForbidden

    found: list[int] = []
    for alias in EFFECT_DATABASES:
        rows = Effect.objects.using(alias).filter(tag=tag)
        if ns is not None:
            rows = rows.filter(n__in=list(ns))
        try:
            found += rows.values_list("n", flat=True)
        except DatabaseOperationForbidden:
            continue  # a test that runs no MariaDB mode does not open that database
    return found


@dataclass
class Run:
    kind: str
    n: int
    task_id: str
    retries: int
    pid: int
    at: float


def runs(tag: str) -> list[Run]:
    path = Path(run_log(tag))
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        kind, n, task_id, retries, pid, at = line.split()
        found.append(Run(kind, int(n), task_id, int(retries or 0), int(pid), float(at)))
    return found


def starts(tag: str) -> list[Run]:
    return [r for r in runs(tag) if r.kind == "start"]


def effects(tag: str) -> int:
    return len(effect_ns(tag))


def record(task, key: str, store=None) -> Record | None:
    """The task's record for *key*, read through a backend (the db one by default)."""
    scope = task.dedup_scope or task.name
    return (store or DatabaseBackend()).get(scope, digest(key))


def _kill_marker(tag: str, n: int, point: str) -> str:
    # Written by tests/testapp/tasks.py just before the child kills itself.
    return os.path.join(os.environ["DEDUP_TEST_TMP"], f"{tag}-{n}.killed-{point}")


def killed(tag: str, n: int, point: str) -> bool:
    return os.path.exists(_kill_marker(tag, n, point))


def killed_at(tag: str, n: int, point: str) -> float:
    """When the child killed itself at *point* (the marker's time)."""
    return os.path.getmtime(_kill_marker(tag, n, point))


def overlapping(found: list[Run]) -> bool:
    """True if two body runs were in progress at the same moment."""
    begins = sorted(r.at for r in found if r.kind == "start")
    ends = sorted(r.at for r in found if r.kind == "end")
    return len(begins) > 1 and len(ends) >= 1 and begins[1] < ends[0]


def settle(seconds: float = 2.0) -> None:
    """Give stray copies time to show up before counts are asserted exactly."""
    time.sleep(seconds)


def new_id() -> str:
    return str(uuid.uuid4())


def wait_until(predicate, timeout: float = 60, what: str = "condition"):
    return wait_for(predicate, timeout, interval=0.2, what=what)
