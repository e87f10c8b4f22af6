"""Fault 6: workers whose clocks are ten minutes off make the same dedup decisions.

Two workers, one ten minutes ahead and one ten minutes behind, each on its own
queue: each message is claimed by one and its copy, sent while it runs, goes to
the other, so every lease one of them takes is judged by the other (both ways).
Their clocks are shifted inside Python (tests/clockskew/sitecustomize.py): Debian's
libfaketime 0.9.10 breaks Python's time.sleep, so it cannot run a worker. Leases
are computed and compared by the store's clock (PostgreSQL, Redis), so the copies of
a running message are rescheduled, never taken over. On SQLite the database
clock is the worker's own clock, so SQLite is not part of this test. Celery's own
ETA and countdown arithmetic uses the worker's clock and is out of scope.
"""

from __future__ import annotations

import datetime
import re

import pytest

from dedup_celery.backends.base import Status
from tests.scenario import effects, new_id, record, settle, starts, wait_until
from tests.services import REPO
from tests.testapp.tasks import status_effect, tx_effect

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

SKEW = 600


def skewed(seconds: int) -> dict[str, str]:
    return {
        "DEDUP_TEST_CLOCK_SKEW": str(seconds),
        "PYTHONPATH": f"{REPO / 'tests' / 'clockskew'}:{REPO}",
    }


def worker_clock_offset(worker) -> float:
    """Seconds between the worker's log clock and this process's clock at its start."""
    first = re.search(
        r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+: INFO/MainProcess\] Connected", worker.log_text()
    )
    logged = datetime.datetime.strptime(first.group(1), "%Y-%m-%d %H:%M:%S")
    return (logged - worker.started_at).total_seconds()


@pytest.fixture(scope="module")
def skewed_pairs(start_worker, stores):
    pairs = {}
    for kind, store_url in (("db", ""), ("redis", stores["redis_url"])):
        # Each worker has its own queue, so a test decides which one judges which
        # claim, and room for its two originals and the two copies it judges at once.
        ahead = start_worker(f"ahead-{kind}", concurrency=4, store_url=store_url, env=skewed(SKEW))
        behind = start_worker(
            f"behind-{kind}", concurrency=4, store_url=store_url, env=skewed(-SKEW)
        )
        pairs[kind] = (ahead, behind)
    return pairs


@pytest.mark.parametrize(
    ("mode", "kind"), [("status", "db"), ("transactional", "db"), ("status-redis", "redis")]
)
def test_workers_ten_minutes_apart_make_the_same_decisions(
    skewed_pairs, stores, mode, kind, report_scenario
):
    ahead, behind = skewed_pairs[kind]
    # The control: the fault is real, the workers' clocks are off by ten minutes.
    assert abs(worker_clock_offset(ahead) - SKEW) < 30
    assert abs(worker_clock_offset(behind) + SKEW) < 30
    task = tx_effect if mode == "transactional" else status_effect
    store = stores[kind]
    tag = f"skew-{mode}-{new_id()[:8]}"
    ids = {n: new_id() for n in range(4)}
    # Messages 0 and 1 are claimed by the worker ten minutes ahead and their copies
    # judged by the one ten minutes behind; 2 and 3 the other way round.
    first = {n: (ahead, behind) if n < 2 else (behind, ahead) for n in ids}
    for n, task_id in ids.items():
        task.apply_async(
            kwargs={"tag": tag, "n": n, "sleep": 3}, task_id=task_id, queue=first[n][0].queue
        )
    wait_until(lambda: len(starts(tag)) == len(ids), timeout=30, what="every original to start")
    if mode != "transactional":
        # The control: by the clock of the worker ten minutes ahead, every lease has
        # already run out; only the store's clock keeps its copies from taking over.
        ahead_now = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=SKEW)
        for task_id in ids.values():
            found = record(task, task_id, store)
            assert found.status == Status.PROCESSING
            assert found.expires_at < ahead_now
    for n, task_id in ids.items():  # copies while the originals run, to the other worker
        task.apply_async(
            kwargs={"tag": tag, "n": n, "sleep": 3}, task_id=task_id, queue=first[n][1].queue
        )

    def finished():
        found = [record(task, task_id, store) for task_id in ids.values()]
        return all(r is not None and r.status == Status.CONSUMED and r.skipped >= 1 for r in found)

    wait_until(finished, timeout=60, what="every message and its copy")
    settle(2)
    for n, task_id in ids.items():
        claimer, judge = first[n]
        # The crossing happened: the original ran to the end on one worker, and the
        # other met its claim while it ran.
        assert f"Task {task.name}[{task_id}] succeeded" in claimer.log_text()
        assert f"[{task_id}]: duplicate of a message in flight" in judge.log_text()
    assert effects(tag) == len(ids)
    assert len(starts(tag)) == len(ids)
    assert all(record(task, task_id, store).takeovers == 0 for task_id in ids.values())
    records = [record(task, task_id, store) for task_id in ids.values()]
    report_scenario(
        "clock ±10 min", mode, tag, messages=2 * len(ids), ns=tuple(ids), records=records
    )
