"""``self.replace()`` with a real worker: the replacement runs once, and what follows it runs.

Celery gives the replacement the replaced task's id and raises ``Ignore`` in the
replaced body; the replacement carries ``replaced_task_nesting``, and so do its
redeliveries and the chain members after it. Dedup keys a message at nesting n
as ``<key>#r<n>``, so the replacement is a new message and a copy of either is
skipped. The plain control shows Celery's own behaviour: every step once, and a
re-sent copy running again.

In transactional mode Celery publishes the replacement before the replaced
body's COMMIT, so the replacement may start before that COMMIT, and would run
even if the COMMIT then failed: its key is its own, so it never waits for the
replaced message's lock.
"""

from __future__ import annotations

import pytest
from celery import chain

from dedup_celery.keys import nested_key
from dedup_celery.states import Status
from tests.scenario import effects, new_id, record, settle, starts, wait_until
from tests.testapp.models import Effect
from tests.testapp.tasks import plain_replace, status_effect, status_replace, tx_replace

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

TASKS = {"plain": plain_replace, "status": status_replace, "transactional": tx_replace}
STEPS = 4
AFTER = 99  # the n of the chain member after the replaced task


@pytest.fixture(scope="module")
def worker(start_worker):
    return start_worker("replace", concurrency=2)


@pytest.fixture
def tag(request):
    return f"{request.node.originalname}-{new_id()[:8]}"


def per_step(tag):
    found = dict.fromkeys([*range(1, STEPS + 1), AFTER], 0)
    for n in Effect.objects.filter(tag=tag).values_list("n", flat=True):
        found[n] = found.get(n, 0) + 1
    return found


@pytest.mark.parametrize("mode", list(TASKS))
def test_a_task_that_replaces_itself_runs_every_step_once_and_the_chain_goes_on(
    worker, mode, tag, report_scenario
):
    task = TASKS[mode]
    task_id = new_id()
    first = task.si(tag=tag, n=1, steps=STEPS).set(task_id=task_id, queue=worker.queue)
    after = status_effect.si(tag=tag, n=AFTER).set(queue=worker.queue)
    chain(first, after).apply_async()
    wait_until(lambda: effects(tag) >= STEPS + 1, timeout=60, what="every step and the chain")
    settle()
    assert per_step(tag) == dict.fromkeys([*range(1, STEPS + 1), AFTER], 1)
    # Every step ran under the one task id, each replacement one nesting deeper.
    step_runs = [run for run in starts(tag) if run.n != AFTER]
    assert [run.n for run in step_runs] == list(range(1, STEPS + 1))
    assert {run.task_id for run in step_runs} == {task_id}
    records = None
    if mode != "plain":
        records = [record(task, nested_key(task_id, level)) for level in range(STEPS)]
        assert [r.status for r in records] == [Status.CONSUMED] * STEPS
    report_scenario("replace x3 + chain", mode, tag, messages=1, ns=range(1, STEPS + 1),
                    records=records)  # fmt: skip


@pytest.mark.parametrize("mode", list(TASKS))
def test_copies_of_a_replaced_and_of_a_replacement_message_are_skipped(
    worker, mode, tag, report_scenario
):
    task = TASKS[mode]
    task_id = new_id()
    task.apply_async(kwargs={"tag": tag, "n": 1, "steps": 2}, task_id=task_id, queue=worker.queue)
    wait_until(lambda: effects(tag) >= 2, timeout=60, what="both steps")
    settle()
    # A producer re-sends the replaced message, and a copy of the replacement
    # (same id, nesting 1) arrives too.
    task.apply_async(kwargs={"tag": tag, "n": 1, "steps": 2}, task_id=task_id, queue=worker.queue)
    task.apply_async(
        kwargs={"tag": tag, "n": 2, "steps": 2},
        task_id=task_id,
        queue=worker.queue,
        replaced_task_nesting=1,
    )
    if mode == "plain":
        wait_until(lambda: effects(tag) >= 4, timeout=60, what="the control to run both again")
        settle()
        assert per_step(tag)[1] >= 2
        assert per_step(tag)[2] >= 2
        report_scenario("replace, copies", mode, tag, messages=3, ns=(1, 2))
        return

    def skipped():
        found = [record(task, nested_key(task_id, level)) for level in (0, 1)]
        return all(r is not None and r.skipped >= 1 for r in found)

    wait_until(skipped, timeout=60, what="both copies to be skipped")
    settle()
    assert (per_step(tag)[1], per_step(tag)[2]) == (1, 1)
    assert len(starts(tag)) == 2
    records = [record(task, nested_key(task_id, level)) for level in (0, 1)]
    assert [r.skipped for r in records] == [1, 1]
    report_scenario("replace, copies", mode, tag, messages=3, ns=(1, 2), records=records)
