"""A worker whose dedup configuration has check errors does not start: a real worker.

A worker that started with a settings typo would fail (and ack) every message of
its DedupTasks. It exits at ``worker_init`` instead, before its consumer takes
anything, and prints the check messages; the messages wait in the broker, and a
worker with a good configuration then runs each once.
"""

from __future__ import annotations

import pytest

from tests.scenario import effects, new_id, record, settle, starts, wait_until
from tests.testapp.tasks import status_effect

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


@pytest.mark.parametrize(
    ("dedup", "check_id", "names"),
    [
        ({"RETRY_COUNTDOWNN": 1}, "dedup_celery.E002", "unknown key 'RETRY_COUNTDOWNN'"),
        ({"MAX_TAKEOVERS": 0}, "dedup_celery.E003", "['MAX_TAKEOVERS'] is 0"),
        ({"BACKEND": "no.such.Backend"}, "dedup_celery.E004", "no.such.Backend"),
    ],
)
def test_a_worker_with_dedup_check_errors_refuses_to_start_and_loses_nothing(
    start_worker, celery_broker, dedup, check_id, names, report_scenario
):
    queue = f"q-startup-{new_id()[:8]}"
    tag = f"startup-{check_id[-4:]}-{new_id()[:8]}"
    ids = [new_id() for _ in range(5)]
    for n, task_id in enumerate(ids, 1):
        status_effect.apply_async(kwargs={"tag": tag, "n": n}, task_id=task_id, queue=queue)
    with pytest.raises(RuntimeError, match="exited at start") as exited:
        start_worker(f"startup-broken-{check_id[-4:]}", dedup=dedup, queue=queue)
    log = str(exited.value)
    assert "dedup_celery: this worker does not start" in log
    assert check_id in log
    assert names in log
    settle(1)
    assert starts(tag) == [], "a body ran on the worker that refused to start"
    # The messages waited in the broker: a worker with a good configuration runs each once.
    good = start_worker(f"startup-good-{check_id[-4:]}", queue=queue)
    wait_until(lambda: effects(tag) == 5, timeout=60, what="the five messages")
    # These workers run with Celery's default connection handling: it says so at start.
    assert "dedup_celery.W010: Celery " in good.log_path.read_text()
    settle()
    assert len(starts(tag)) == 5
    records = [record(status_effect, task_id) for task_id in ids]
    report_scenario(
        f"worker config {check_id[-4:]}", "status", tag, messages=5, ns=range(1, 6), records=records
    )
