"""Any task id Celery accepts runs once, on every store: long ones, NUL, lone surrogates.

The message table keeps the task id in a 255-character column, and PostgreSQL's
text types refuse NUL. A task id that did not fit made every claim fail, and
the failure was taken for an outage: the message was rescheduled forever and
never ran. The plain control shows that Celery itself delivers such ids, and
that the re-sent copy runs its body again without dedup.
"""

from __future__ import annotations

import pytest

from dedup_celery.keys import storable
from dedup_celery.states import Status
from tests.scenario import (
    MODES,
    TASKS,
    effects,
    new_id,
    record,
    settle,
    starts,
    store_kind,
    wait_until,
)

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True, databases="__all__")]

#: Task ids a producer may pass to ``apply_async(task_id=...)``.
ODD_IDS = {
    "300 characters": lambda: "long-" + new_id() + "x" * 260,
    "NUL": lambda: "nul\x00" + new_id(),
    "lone surrogate": lambda: "surrogate\ud800" + new_id(),
}


@pytest.fixture(scope="module")
def workers(start_worker, stores):
    return {
        "db": start_worker("task-ids", concurrency=2),
        "redis": start_worker("task-ids-redis", concurrency=2, store_url=stores["redis_url"]),
        "mariadb": start_worker(
            "task-ids-mariadb",
            concurrency=2,
            dedup={"DATABASE": "mysql"},
            env={"DEDUP_TEST_EFFECT_DATABASE": "mysql"},
        ),
    }


@pytest.mark.parametrize("kind", list(ODD_IDS))
@pytest.mark.parametrize("mode", MODES)
def test_an_odd_task_id_runs_once_and_its_redelivery_is_skipped(
    workers, stores, mode, kind, report_scenario
):
    task = TASKS[mode]
    worker, store = workers[store_kind(mode)], stores[store_kind(mode)]
    tag = f"ids-{mode}-{kind.replace(' ', '')}-{new_id()[:8]}"
    task_id = ODD_IDS[kind]()
    # The producer sends the message twice with the same id (a re-send).
    for _ in range(2):
        task.apply_async(kwargs={"tag": tag, "n": 1}, task_id=task_id, queue=worker.queue)
    if mode == "plain":
        wait_until(lambda: effects(tag) == 2, timeout=30, what="the control's two runs")
        report_scenario(f"task id: {kind}", mode, tag, messages=2)
        return
    wait_until(lambda: effects(tag) == 1, timeout=30, what="the one run")
    wait_until(
        lambda: (found := record(task, task_id, store)) is not None and found.skipped >= 1,
        timeout=30,
        what="the re-sent copy to be skipped",
    )
    settle()
    assert effects(tag) == 1
    assert len(starts(tag)) == 1
    found = record(task, task_id, store)
    assert found.status == Status.CONSUMED
    # What the store holds is the id itself when it fits, else a storable stand-in.
    assert found.task_id == storable(task_id)
    report_scenario(f"task id: {kind}", mode, tag, messages=2, records=[found])
