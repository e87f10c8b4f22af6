"""Scenario (e): a countdown longer than the Redis broker's visibility timeout.

kombu restores the unacked ETA message every visibility timeout, so the worker
ends up holding several copies of it, which all run when the countdown ends.
"""

from __future__ import annotations

import pytest

from tests.scenario import TASKS, effects, new_id, record, settle, starts, store_kind, wait_until

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True, databases="__all__")]

BROKER_DB = 1
COUNTDOWN = 7


@pytest.fixture(scope="module")
def workers(start_worker, stores):
    return {
        "db": start_worker("visibility", broker_db=BROKER_DB, visibility_timeout=2),
        "redis": start_worker(
            "visibility-redis",
            broker_db=BROKER_DB,
            visibility_timeout=2,
            store_url=stores["redis_url"],
        ),
        "mariadb": start_worker(
            "visibility-mariadb",
            broker_db=BROKER_DB,
            visibility_timeout=2,
            dedup={"DATABASE": "mysql"},
            env={"DEDUP_TEST_EFFECT_DATABASE": "mysql"},
        ),
    }


@pytest.mark.parametrize("mode", list(TASKS))
def test_e_countdown_longer_than_the_visibility_timeout(
    workers, stores, mode, redis_url, report_scenario
):
    from tests.celery_app import app

    kind = store_kind(mode)
    worker, store = workers[kind], stores[kind]
    task, task_id, tag = TASKS[mode], new_id(), f"e-{mode}-{new_id()[:8]}"
    with app.connection_for_write(f"{redis_url}/{BROKER_DB}") as connection:
        task.apply_async(
            kwargs={"tag": tag, "n": 1},
            task_id=task_id,
            queue=worker.queue,
            countdown=COUNTDOWN,
            connection=connection,
        )
    if mode == "plain":
        wait_until(lambda: effects(tag) >= 2, timeout=COUNTDOWN * 4, what="the control to repeat")
        settle(3)
    else:
        wait_until(
            lambda: (
                effects(tag) == 1
                and record(task, task_id, store) is not None
                and record(task, task_id, store).skipped >= 1
            ),
            timeout=COUNTDOWN * 4,
            what="the effect and a skipped redelivered copy",
        )
        settle(3)
        assert effects(tag) == 1
        assert len(starts(tag)) == 1
    records = None if mode == "plain" else [record(task, task_id, store)]
    report_scenario("e", mode, tag, messages=1, records=records)


@pytest.mark.parametrize("mode", ["plain", "status", "status-redis", "status-mariadb"])
def test_stale_copies_do_not_run_after_the_original_failed_for_good(
    workers, stores, mode, redis_url, report_scenario
):
    """Fault 9: visibility-timeout copies rescheduled while the original ran meet its FAILED
    record (same task id, same attempt) and are skipped instead of running the body again."""
    from tests.celery_app import app

    kind = store_kind(mode)
    worker, store = workers[kind], stores[kind]
    task, task_id, tag = TASKS[mode], new_id(), f"stale-{mode}-{new_id()[:8]}"
    with app.connection_for_write(f"{redis_url}/{BROKER_DB}") as connection:
        task.apply_async(
            kwargs={"tag": tag, "n": 1, "sleep": 2, "fail": True},
            task_id=task_id,
            queue=worker.queue,
            countdown=COUNTDOWN,
            connection=connection,
        )
    if mode == "plain":
        wait_until(lambda: len(starts(tag)) >= 2, timeout=COUNTDOWN * 4, what="the control")
        settle(3)
    else:
        wait_until(
            lambda: (found := record(task, task_id, store)) is not None and found.skipped >= 1,
            timeout=COUNTDOWN * 5,
            what="a stale copy to be skipped",
        )
        settle(4)
        found = record(task, task_id, store)
        assert found.status == "failed"
        assert len(starts(tag)) == 1
        assert f"[{task_id}]: stale copy skipped" in worker.log_text()
    records = None if mode == "plain" else [record(task, task_id, store)]
    report_scenario("stale copies", mode, tag, messages=1, records=records, effect_expected=False)
