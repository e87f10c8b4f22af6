"""Delivery scenarios (a) to (f) with a real prefork worker, a real Redis broker and real SIGKILL.

Every scenario runs three ways: the plain control task, a status-mode DedupTask and
a transactional DedupTask, all with the same body and the same delivery settings
(``acks_late``, ``reject_on_worker_lost``, no result backend). The control must
show the fault (a duplicate, or a kill that happened); only then is "the
DedupTask ran it once" evidence.
"""

from __future__ import annotations

import pytest

from dedup_celery.models import DedupRecord
from tests.scenario import (
    effects,
    killed,
    new_id,
    overlapping,
    record,
    runs,
    settle,
    starts,
    wait_until,
)
from tests.testapp.tasks import LEASE, plain_effect, status_effect, tx_effect

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

TASKS = {"plain": plain_effect, "status": status_effect, "transactional": tx_effect}
MODES = list(TASKS)


@pytest.fixture(scope="module")
def worker(start_worker):
    return start_worker("scenarios")


@pytest.fixture
def tag(request):
    return f"{request.node.originalname}-{new_id()[:8]}"


def send(worker, task, task_id, **kwargs):
    task.apply_async(kwargs=kwargs, task_id=task_id, queue=worker.queue)


def consumed(task, task_id):
    found = record(task, task_id)
    return found is not None and found.status == DedupRecord.Status.CONSUMED


def skipped(task, task_id, count):
    found = record(task, task_id)
    return found is not None and found.skipped >= count


@pytest.mark.parametrize("mode", MODES)
def test_a_same_message_sent_again_after_it_was_consumed(worker, mode, tag, report_scenario):
    task, task_id = TASKS[mode], new_id()
    send(worker, task, task_id, tag=tag, n=1)
    wait_until(lambda: effects(tag) == 1, what="the first effect")
    if mode != "plain":
        wait_until(lambda: consumed(task, task_id), what="the record to be consumed")
    send(worker, task, task_id, tag=tag, n=1)
    if mode == "plain":
        wait_until(lambda: effects(tag) == 2, what="the control to duplicate")
    else:
        wait_until(lambda: skipped(task, task_id, 1), what="the duplicate to be skipped")
    settle()
    expected = 2 if mode == "plain" else 1
    assert effects(tag) == expected
    assert len(starts(tag)) == expected
    report_scenario(
        {
            "scenario": "a",
            "task": mode,
            "messages": 2,
            "body runs": len(starts(tag)),
            "effects": effects(tag),
            "duplicates": 0 if mode == "plain" else record(task, task_id).skipped,
            "lost": 0,
        }
    )


@pytest.mark.parametrize("mode", MODES)
def test_b_four_copies_in_flight_at_once(worker, mode, tag, report_scenario):
    task, task_id = TASKS[mode], new_id()
    for _ in range(4):
        send(worker, task, task_id, tag=tag, n=1, sleep=2.0)
    if mode == "plain":
        wait_until(lambda: effects(tag) == 4, what="the control to run four times")
        settle()
        assert effects(tag) == 4
        assert overlapping(runs(tag)), "the control copies did not overlap: no concurrency"
        duplicates = 0
    else:
        wait_until(lambda: skipped(task, task_id, 3), what="three copies to be skipped")
        settle()
        assert effects(tag) == 1
        assert len(starts(tag)) == 1
        assert not overlapping(runs(tag))
        found = record(task, task_id)
        assert found.skipped == 3
        reschedules = worker.log_text().count(f"[{task_id}]: duplicate of a message in flight")
        assert reschedules >= 3, "the copies were not in flight together"
        duplicates = found.skipped
    report_scenario(
        {
            "scenario": "b",
            "task": mode,
            "messages": 4,
            "body runs": len(starts(tag)),
            "effects": effects(tag),
            "duplicates": duplicates,
            "lost": 0,
        }
    )


@pytest.mark.parametrize("mode", MODES)
def test_c_child_killed_in_task_postrun_before_the_ack(worker, mode, tag, report_scenario):
    task, task_id = TASKS[mode], new_id()
    send(worker, task, task_id, tag=tag, n=1, kill="postrun")
    if mode == "plain":
        wait_until(lambda: effects(tag) == 2, what="the control to run again after the kill")
    else:
        wait_until(lambda: skipped(task, task_id, 1), what="the redelivery to be skipped")
    settle()
    assert killed(tag, 1, "postrun"), "the child was not killed"
    expected = 2 if mode == "plain" else 1
    assert effects(tag) == expected
    assert len(starts(tag)) == expected
    report_scenario(
        {
            "scenario": "c",
            "task": mode,
            "messages": 1,
            "body runs": len(starts(tag)),
            "effects": effects(tag),
            "duplicates": 0 if mode == "plain" else 1,
            "lost": 0,
        }
    )


@pytest.mark.parametrize("mode", MODES)
def test_d_child_killed_mid_body(worker, mode, tag, report_scenario):
    task, task_id = TASKS[mode], new_id()
    # Transactional and plain bodies die after writing the effect; the status-mode
    # body dies before it (after the effect it would be scenario f).
    point = "before_effect" if mode == "status" else "after_effect"
    send(worker, task, task_id, tag=tag, n=1, kill=point)
    expected = 2 if mode == "plain" else 1
    wait_until(lambda: effects(tag) == expected, timeout=LEASE * 5, what="the redelivery")
    if mode != "plain":
        wait_until(lambda: consumed(task, task_id), what="the record to be consumed")
    settle()
    assert killed(tag, 1, point)
    assert effects(tag) == expected
    body_runs = starts(tag)
    assert len(body_runs) == 2
    if mode == "status":
        # The redelivery waited for the dead owner's lease, then took over.
        assert record(task, task_id).takeovers == 1
        assert body_runs[1].at - body_runs[0].at >= LEASE - 0.5
    report_scenario(
        {
            "scenario": "d",
            "task": mode,
            "messages": 1,
            "body runs": len(body_runs),
            "effects": effects(tag),
            "duplicates": 0,
            "lost": 0,
        }
    )


@pytest.mark.parametrize("mode", ["plain", "status"])
def test_f_child_killed_after_the_body_before_consumed_is_the_window(
    worker, mode, tag, report_scenario
):
    """Status mode's documented window: the effect happens twice. This test pins it."""
    task, task_id = TASKS[mode], new_id()
    send(worker, task, task_id, tag=tag, n=1, kill="after_effect")
    wait_until(lambda: effects(tag) == 2, timeout=LEASE * 5, what="the second run")
    if mode == "status":
        wait_until(lambda: consumed(task, task_id), what="the record to be consumed")
        assert record(task, task_id).takeovers == 1
    settle()
    assert killed(tag, 1, "after_effect")
    assert effects(tag) == 2
    report_scenario(
        {
            "scenario": "f",
            "task": mode,
            "messages": 1,
            "body runs": len(starts(tag)),
            "effects": effects(tag),
            "duplicates": 0,
            "lost": 0,
        }
    )


def test_reschedules_keep_request_retries_and_the_retry_budget(worker, tag):
    """A rescheduled copy still has its whole max_retries budget when it finally runs."""
    from pathlib import Path

    from tests.testapp.tasks import retry_budget, run_log

    first, second = new_id(), new_id()
    retry_budget.apply_async(
        kwargs={"tag": tag, "mode": "slowfail"}, task_id=first, queue=worker.queue
    )
    wait_until(lambda: Path(run_log(tag)).exists(), what="the first copy to start")
    retry_budget.apply_async(
        kwargs={"tag": tag, "mode": "retry"}, task_id=second, queue=worker.queue
    )

    def done():
        found = record(retry_budget, f"budget:{tag}")
        return found is not None and found.status == DedupRecord.Status.CONSUMED

    wait_until(done, timeout=40, what="the second copy to succeed")
    lines = [line.split()[1:] for line in Path(run_log(tag)).read_text().splitlines()]
    assert lines == [["slowfail", first, "0"], ["retry", second, "0"], ["retry", second, "1"]]
    assert f"[{second}]: duplicate of a message in flight" in worker.log_text()
    assert record(retry_budget, f"budget:{tag}").task_id == second
