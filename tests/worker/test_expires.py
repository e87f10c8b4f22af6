"""A late copy of a message with ``expires``, in a chord: a real worker, django-celery-results.

A copy of an in-flight message is rescheduled and may arrive after the
message's ``expires``. If the copy carried that ``expires``, the worker's main
process would revoke it before the task runs: it writes REVOKED over the
original's SUCCESS, counts the copy as a failed chord part (so the chord body
never runs), and puts the id in the worker's revoked set. Copies made by dedup
carry no broker ``expires``; the deadline travels in the ``dedup_expires``
header, and a copy past it ends with ``Ignore`` (no state write).

The plain control sends the same late copy itself, as Celery's own retry
would, and shows the damage.
"""

from __future__ import annotations

import datetime
import socket

import pytest
from celery import chord
from django_celery_results.models import TaskResult

from tests.scenario import effects, new_id, settle, starts, wait_until
from tests.testapp.models import Effect
from tests.testapp.tasks import chord_done, plain_chord_part, status_chord_part, tx_chord_part

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

TASKS = {"plain": plain_chord_part, "status": status_chord_part, "transactional": tx_chord_part}
EXPIRES = 4  # seconds; every copy arrives at 6 s (a dedup reschedule, or the control's own)


@pytest.fixture(scope="module")
def worker(start_worker):
    return start_worker("expires", result_backend="django-db", concurrency=4)


def state(task_id):
    found = TaskResult.objects.filter(task_id=task_id).first()
    return found.status if found else None


def revoked_ids(worker):
    from tests.celery_app import app

    nodes = app.control.inspect(destination=[f"{worker.name}@{socket.gethostname()}"], timeout=3)
    return {task_id for ids in (nodes.revoked() or {}).values() for task_id in ids}


@pytest.mark.parametrize("mode", list(TASKS))
def test_a_late_copy_in_a_chord_header_leaves_the_result_and_the_chord_alone(
    worker, mode, report_scenario
):
    task = TASKS[mode]
    tag = f"expires-{mode}-{new_id()[:8]}"
    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=EXPIRES)
    first_id = new_id()
    # Part 1 ends quickly and is copied; parts 2 and 3 end after the copy arrives.
    resend = {"resend_countdown": 6 if mode == "plain" else 0}
    header = [
        task.si(tag=tag, n=1, sleep=1, **resend).set(task_id=first_id),
        task.si(tag=tag, n=2, sleep=9),
        task.si(tag=tag, n=3, sleep=9),
    ]
    header = [sig.set(queue=worker.queue, expires=expires) for sig in header]
    chord(header)(chord_done.s(tag=tag).set(queue=worker.queue))
    wait_until(lambda: effects(tag) >= 3, timeout=30, what="the three parts")
    settle(4)
    body_runs = Effect.objects.filter(tag=tag, n=99).count()
    if mode == "plain":
        # Celery revoked the late copy: REVOKED over SUCCESS, and no chord body.
        assert state(first_id) == "REVOKED"
        assert body_runs == 0
        assert first_id in revoked_ids(worker)
        report_scenario("late copy, chord", mode, tag, messages=4, ns=(1, 2, 3))
        return
    assert state(first_id) == "SUCCESS"
    assert body_runs == 1
    assert len([run for run in starts(tag) if run.n == 1]) == 1
    assert first_id not in revoked_ids(worker)
    assert f"{task.name}[{first_id}]: copy skipped; it arrived after its message's expires" in (
        worker.log_text()
    )
    report_scenario("late copy, chord", mode, tag, messages=4, ns=(1, 2, 3))
