"""Results a store refuses (NaN, Infinity, NUL, lone surrogates), with a real worker.

A business-key task stores its result for later duplicates. PostgreSQL's jsonb
refuses NUL characters, lone surrogates, NaN and Infinity (SQLite's JSON check
the last two). Such a value is checked before it is written and stored as
"omitted" with the reason, as an oversize result is, so the message is consumed
once and a duplicate returns None. The plain control shows that nothing else
stops a producer's re-send with another task id from running the body again.
"""

from __future__ import annotations

import pytest

from dedup_celery.states import Status
from tests.scenario import effects, new_id, record, settle, starts, wait_until
from tests.testapp.tasks import ODD_RESULTS, plain_odd_result, status_odd_result, tx_odd_result

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

TASKS = {"plain": plain_odd_result, "status": status_odd_result, "transactional": tx_odd_result}


@pytest.fixture(scope="module")
def worker(start_worker):
    return start_worker("odd-results", concurrency=2)


@pytest.mark.parametrize("kind", list(ODD_RESULTS))
@pytest.mark.parametrize("mode", list(TASKS))
def test_a_result_the_store_refuses_is_omitted_and_the_message_consumed_once(
    worker, mode, kind, report_scenario
):
    task = TASKS[mode]
    tag = f"odd-{mode}-{kind}-{new_id()[:8]}"
    kwargs = {"tag": tag, "n": 1, "kind": kind}
    first = new_id()
    task.apply_async(kwargs=kwargs, task_id=first, queue=worker.queue)
    wait_until(lambda: effects(tag) == 1, timeout=30, what="the first run")
    key = f"odd:{tag}:1"
    if mode != "plain":
        wait_until(
            lambda: (found := record(task, key)) is not None and found.status == Status.CONSUMED,
            timeout=30,
            what="the record to be consumed",
        )
    # A producer re-sends the message with another task id: the same business key.
    second = new_id()
    task.apply_async(kwargs=kwargs, task_id=second, queue=worker.queue)
    if mode == "plain":
        wait_until(lambda: effects(tag) == 2, timeout=30, what="the control to run again")
        report_scenario(f"result {kind}", mode, tag, messages=2)
        return
    wait_until(lambda: record(task, key).skipped >= 1, timeout=30, what="the duplicate")
    settle()
    assert effects(tag) == 1
    assert len(starts(tag)) == 1
    found = record(task, key)
    assert (found.status, found.task_id) == (Status.CONSUMED, first)
    assert set(found.result) == {"omitted"}
    assert found.result["omitted"].startswith("the result holds")
    log = worker.log_text()
    assert f"{task.name}[{first}]: the result holds" in log
    assert f"{task.name}[{second}]: duplicate returns None instead of the original's result" in log
    report_scenario(f"result {kind}", mode, tag, messages=2, records=[found])
