"""Delivery scenarios (a) to (f) with a real prefork worker, a real Redis broker and real SIGKILL.

Every scenario runs as the plain control task, a status-mode DedupTask on the
database backend, a transactional DedupTask, and a status-mode DedupTask on the
Redis backend, all with the same body and the same delivery settings
(``acks_late``, ``reject_on_worker_lost``, no result backend). The control must
show the fault (a duplicate, or a kill that happened); only then is "the
DedupTask ran it once" evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from dedup_celery.backends.base import Status
from tests.scenario import (
    MODES,
    TASKS,
    effects,
    killed,
    killed_at,
    new_id,
    overlapping,
    record,
    runs,
    settle,
    starts,
    store_kind,
    wait_until,
)

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True, databases="__all__")]


@pytest.fixture(scope="module")
def workers(start_worker, stores):
    return {
        "db": start_worker("scenarios"),
        "redis": start_worker("scenarios-redis", store_url=stores["redis_url"]),
        "mariadb": start_worker(
            "scenarios-mariadb",
            dedup={"DATABASE": "mysql"},
            env={"DEDUP_TEST_EFFECT_DATABASE": "mysql"},
        ),
    }


@dataclass
class Case:
    """One way of running a scenario: the task, the worker that runs it, its store."""

    mode: str
    task: Any
    worker: Any
    store: Any

    @property
    def dedup(self) -> bool:
        return self.mode != "plain"

    def send(self, task_id, **kwargs):
        self.task.apply_async(kwargs=kwargs, task_id=task_id, queue=self.worker.queue)

    def record(self, key):
        return record(self.task, key, self.store)

    def consumed(self, key):
        found = self.record(key)
        return found is not None and found.status == Status.CONSUMED

    def records(self, key):
        """The record of *key* for a dedup task; None for the plain control, which has none."""
        return [self.record(key)] if self.dedup else None

    def skipped(self, key, count):
        found = self.record(key)
        return found is not None and found.skipped >= count


@pytest.fixture
def make_case(workers, stores):
    def make(mode):
        kind = store_kind(mode)
        return Case(mode, TASKS[mode], workers[kind], stores[kind])

    return make


@pytest.fixture(params=MODES)
def case(request, make_case):
    return make_case(request.param)


@pytest.fixture
def tag(request):
    return f"{request.node.originalname}-{new_id()[:8]}"


def test_a_same_message_sent_again_after_it_was_consumed(case, tag, report_scenario):
    task_id = new_id()
    case.send(task_id, tag=tag, n=1)
    wait_until(lambda: effects(tag) == 1, what="the first effect")
    if case.dedup:
        wait_until(lambda: case.consumed(task_id), what="the record to be consumed")
    case.send(task_id, tag=tag, n=1)
    if not case.dedup:
        wait_until(lambda: effects(tag) == 2, what="the control to duplicate")
    else:
        wait_until(lambda: case.skipped(task_id, 1), what="the duplicate to be skipped")
    settle()
    expected = 2 if not case.dedup else 1
    assert effects(tag) == expected
    assert len(starts(tag)) == expected
    report_scenario("a", case.mode, tag, messages=2, records=case.records(task_id))


def test_b_four_copies_in_flight_at_once(case, tag, report_scenario):
    task_id = new_id()
    for _ in range(4):
        case.send(task_id, tag=tag, n=1, sleep=2.0)
    if not case.dedup:
        wait_until(lambda: effects(tag) == 4, what="the control to run four times")
        settle()
        assert effects(tag) == 4
        assert overlapping(runs(tag)), "the control copies did not overlap: no concurrency"
    else:
        wait_until(lambda: case.skipped(task_id, 3), what="three copies to be skipped")
        settle()
        assert effects(tag) == 1
        assert len(starts(tag)) == 1
        found = case.record(task_id)
        assert found.skipped == 3
        if case.mode == "transactional-mariadb":
            # MariaDB has no advisory lock: the copies wait on the row lock until
            # the first copy commits (its body sleeps 2 s), then find it consumed.
            waited = (found.last_duplicate_at - found.created_at).total_seconds()
            assert waited >= 1.5, "the copies were not in flight together"
        else:
            log = case.worker.log_text()
            reschedules = log.count(f"[{task_id}]: duplicate of a message in flight")
            assert reschedules >= 3, "the copies were not in flight together"
    report_scenario("b", case.mode, tag, messages=4, records=case.records(task_id))


def test_c_child_killed_in_task_postrun_before_the_ack(case, tag, report_scenario):
    task_id = new_id()
    case.send(task_id, tag=tag, n=1, kill="postrun")
    if not case.dedup:
        wait_until(lambda: effects(tag) == 2, what="the control to run again after the kill")
    else:
        wait_until(lambda: case.skipped(task_id, 1), what="the redelivery to be skipped")
    settle()
    assert killed(tag, 1, "postrun"), "the child was not killed"
    expected = 2 if not case.dedup else 1
    assert effects(tag) == expected
    assert len(starts(tag)) == expected
    report_scenario("c", case.mode, tag, messages=1, records=case.records(task_id))


def test_d_child_killed_mid_body(case, tag, report_scenario):
    task_id = new_id()
    # Transactional and plain bodies die after writing the effect; the status-mode
    # body dies before it (after the effect it would be scenario f).
    point = "before_effect" if case.mode.startswith("status") else "after_effect"
    case.send(task_id, tag=tag, n=1, kill=point)
    expected = 2 if not case.dedup else 1
    wait_until(lambda: effects(tag) == expected, timeout=30, what="the redelivery")
    if case.dedup:
        wait_until(lambda: case.consumed(task_id), what="the record to be consumed")
    settle()
    assert killed(tag, 1, point)
    assert effects(tag) == expected
    body_runs = starts(tag)
    assert len(body_runs) == 2
    if case.mode.startswith("status"):
        # Fast recovery: the worker's main process ended the dead child's lease
        # (LEASE is minutes long) and the redelivery took the record over at once.
        assert case.record(task_id).takeovers == 1
        assert body_runs[1].at - body_runs[0].at < 10
        log = case.worker.log_text()
        assert f"[{task_id}]: worker child" in log
        # The main process ended the lease, and the redelivery then took the
        # record over (logged by the delivery itself), minutes before the lease
        # would have run out.
        assert f"[{task_id}]: took over the expired record" in log
    report_scenario("d", case.mode, tag, messages=1, records=case.records(task_id))


@pytest.mark.parametrize("mode", ["plain", "status", "status-redis", "status-mariadb"])
def test_f_child_killed_after_the_body_before_consumed_is_the_window(
    make_case, mode, tag, report_scenario
):
    """Status mode's documented window: the effect happens twice. This test pins it."""
    case = make_case(mode)
    task_id = new_id()
    case.send(task_id, tag=tag, n=1, kill="after_effect")
    wait_until(lambda: effects(tag) == 2, timeout=30, what="the second run")
    if case.mode.startswith("status"):
        wait_until(lambda: case.consumed(task_id), what="the record to be consumed")
        assert case.record(task_id).takeovers == 1
    settle()
    assert killed(tag, 1, "after_effect")
    assert effects(tag) == 2
    body_runs = starts(tag)
    assert body_runs[1].at - body_runs[0].at < 10, "the redelivery waited for the lease"
    report_scenario("f", case.mode, tag, messages=1, records=case.records(task_id))


def test_reschedules_keep_request_retries_and_the_retry_budget(workers, tag):
    """A rescheduled copy still has its whole max_retries budget when it finally runs."""
    from pathlib import Path

    from tests.testapp.tasks import retry_budget, run_log

    worker = workers["db"]
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
        return found is not None and found.status == Status.CONSUMED

    wait_until(done, timeout=40, what="the second copy to succeed")
    lines = [line.split()[1:] for line in Path(run_log(tag)).read_text().splitlines()]
    assert lines == [["slowfail", first, "0"], ["retry", second, "0"], ["retry", second, "1"]]
    assert f"[{second}]: duplicate of a message in flight" in worker.log_text()
    assert record(retry_budget, f"budget:{tag}").task_id == second


@pytest.mark.parametrize(
    ("mode", "point"),
    # A plain task has no claim: its control dies in task_prerun only.
    [(mode, point) for mode in MODES for point in ("prerun", "claimed") if mode != "plain"]
    + [("plain", "prerun")],
)
def test_child_killed_before_the_claim_or_right_after_it(
    make_case, mode, point, tag, report_scenario
):
    """Fault 1 of the fault suite: the first two kill points. Both end in one effect, fast."""
    case = make_case(mode)
    task_id = new_id()
    case.send(task_id, tag=tag, n=1, kill=point)
    wait_until(lambda: effects(tag) >= 1, timeout=30, what="the redelivery")
    if case.dedup:
        wait_until(lambda: case.consumed(task_id), what="the record to be consumed")
    settle()
    assert killed(tag, 1, point), "the child was not killed"
    assert effects(tag) == 1
    assert len(starts(tag)) == 1  # the first delivery died before the body
    # Fast: the redelivery ran within seconds of the kill, not after the lease
    # (LEASE is minutes) that a claim of the dead child would otherwise hold.
    assert starts(tag)[0].at - killed_at(tag, 1, point) < 10
    if case.dedup and point == "claimed" and case.mode.startswith("status"):
        assert case.record(task_id).takeovers == 1
    report_scenario(f"kill {point}", case.mode, tag, messages=1, records=case.records(task_id))
