"""DedupTask's own behaviour, run in this process (eagerly, or through Celery's tracer).

Eager calls prove nothing about redelivery; the worker tests do that. These tests
cover the API: options, keys, errors, results, signals and the transactional block.
"""

from __future__ import annotations

import datetime
import decimal
import logging
import os
import subprocess
import sys
import time
import uuid

import pytest
from celery.exceptions import Ignore, Reject
from django.db import DatabaseError, connection, transaction

from dedup_celery import (
    DedupError,
    DedupKeyError,
    DedupTask,
    DuplicateInFlightError,
    OuterTransactionError,
    PoisonMessageError,
    get_backend,
    signals,
)
from dedup_celery.backends.base import OwnerIdentity, Verdict
from dedup_celery.identity import current_identity, process_start_ticks
from dedup_celery.keys import digest
from dedup_celery.models import DedupRecord
from tests.celery_app import app
from tests.helpers import ELSEWHERE, captured, claim_for, hold
from tests.services import REPO
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)

BODY_RUNS: list[tuple] = []


@app.task(base=DedupTask, name="unit.by_id", bind=True)
def by_id(self, value):
    BODY_RUNS.append(("by_id", self.request.id, getattr(self.request, "dedup_owner", None)))
    return value


@app.task(
    base=DedupTask,
    name="unit.by_order",
    bind=True,
    dedup_key=lambda order_no, *args, **kwargs: f"order:{order_no}",
)
def by_order(self, order_no, payload=None):
    BODY_RUNS.append(("by_order", self.request.id))
    return payload


def _bad_key(order_no):
    if order_no == "raise":
        raise LookupError("no such order")
    return {"int": 5, "empty": "", "none": None}.get(order_no, order_no)


@app.task(base=DedupTask, name="unit.bad_key", dedup_key=_bad_key)
def bad_key(order_no):
    BODY_RUNS.append(("bad_key", order_no))


@app.task(base=DedupTask, name="unit.failing", bind=True)
def failing(self, mode):
    BODY_RUNS.append(("failing", mode))
    if mode == "ignore":
        raise Ignore()
    if mode == "requeue":
        raise Reject("try again", requeue=True)
    raise ValueError("the body failed")


def _rival_claim(task):
    """Another delivery (elsewhere) tries the running message's key."""
    return get_backend().claim(claim_for(task, task.request.id, identity=ELSEWHERE)).verdict


@app.task(
    base=DedupTask,
    name="unit.heartbeat",
    bind=True,
    dedup_processing_timeout=0.5,
    dedup_heartbeat_interval=0.1,
)
def heartbeat_task(self):
    time.sleep(1.2)
    verdict = _rival_claim(self)
    return "in flight meanwhile" if verdict is Verdict.IN_FLIGHT else verdict.value


@app.task(
    base=DedupTask,
    name="unit.no_heartbeat",
    bind=True,
    dedup_processing_timeout=0.5,
    dedup_heartbeat_interval=None,
)
def no_heartbeat_task(self):
    time.sleep(1.2)
    verdict = _rival_claim(self)
    return "taken over meanwhile" if verdict is Verdict.TAKEN_OVER else verdict.value


@app.task(base=DedupTask, name="unit.tx", bind=True, dedup_transactional=True)
def tx(self, tag, mode="ok"):
    Effect.objects.create(tag=tag, n=1, task_id=self.request.id, pid=os.getpid())
    if mode == "fail":
        raise ValueError("the body failed after its effect")
    if mode == "swallow":
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT no_such_column FROM testapp_effect")
        except DatabaseError:
            pass
    if mode == "ignore":
        raise Ignore()
    return tag


@app.task(base=DedupTask, name="unit.slow_lease", bind=True, dedup_processing_timeout=0.2)
def slow_lease(self):
    time.sleep(0.4)
    # Another delivery takes the expired lease over while this body still runs.
    assert get_backend().claim(claim_for(self, self.request.id)).verdict is Verdict.TAKEN_OVER
    return "done"


@pytest.fixture(autouse=True)
def _clear_runs():
    BODY_RUNS.clear()


def rec(task, key):
    return DedupRecord.objects.filter(scope=task.name, key_digest=digest(key)).first()


def test_import_needs_no_settings_and_no_app_registry():
    code = (
        "import django.apps, dedup_celery\n"
        "from dedup_celery import DedupTask\n"
        "from celery import shared_task\n"
        "@shared_task(base=DedupTask)\n"
        "def charge(order_no): pass\n"
        "assert not django.apps.apps.ready\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_safe_delivery_defaults_are_on():
    assert DedupTask.acks_late is True
    assert DedupTask.reject_on_worker_lost is True
    assert by_id.acks_late is True
    assert by_id.reject_on_worker_lost is True


def test_task_id_is_the_default_key_and_a_redelivery_is_ignored():
    task_id = str(uuid.uuid4())
    assert by_id.apply(args=(1,), task_id=task_id).get() == 1
    found = rec(by_id, task_id)
    assert found.status == DedupRecord.Status.CONSUMED
    assert found.task_id == task_id
    again = by_id.apply(args=(1,), task_id=task_id)
    assert again.state == "IGNORED"
    assert [r[0] for r in BODY_RUNS] == ["by_id"]
    assert rec(by_id, task_id).skipped == 1


def test_the_owner_token_is_in_the_request():
    task_id = str(uuid.uuid4())
    by_id.apply(args=(1,), task_id=task_id).get()
    owner = BODY_RUNS[0][2]
    assert rec(by_id, task_id).owner.hex == owner


def test_dedup_key_is_called_unbound_even_for_bind_true_tasks():
    by_order.apply(args=("A-1",), kwargs={"payload": 1}).get()
    assert rec(by_order, "order:A-1") is not None


def test_business_key_duplicate_returns_the_original_result_exactly():
    payload = {
        "when": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
        "amount": decimal.Decimal("12.50"),
        "items": [1, "two"],
    }
    first = by_order.apply(args=("A-2",), kwargs={"payload": payload})
    second = by_order.apply(args=("A-2",), kwargs={"payload": {"other": True}})
    assert second.state == "SUCCESS"
    assert second.get() == first.get() == payload
    assert [r[0] for r in BODY_RUNS] == ["by_order"]
    assert rec(by_order, "order:A-2").skipped == 1


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (object(), "not JSON-serializable"),
        ("x" * 70_000, "over RESULT_MAX_BYTES"),
        ({"n": [1, float("nan")]}, "holds NaN or Infinity"),
        ({"n": float("-inf")}, "holds NaN or Infinity"),
        ({"note": "a\x00b"}, "holds a NUL character"),
        ({"a\x00": 1}, "holds a NUL character"),
        (["\udc80"], "holds a lone surrogate"),
    ],
)
def test_unstorable_result_makes_duplicates_return_none_with_a_warning(payload, reason, caplog):
    first = by_order.apply(args=(f"A-{reason}",), kwargs={"payload": payload})
    assert first.get() is payload
    assert rec(by_order, f"order:A-{reason}").status == DedupRecord.Status.CONSUMED
    assert reason in caplog.text
    caplog.clear()
    second = by_order.apply(args=(f"A-{reason}",))
    assert second.get() is None
    assert "instead of the original's result" in caplog.text
    assert reason in caplog.text


@pytest.mark.parametrize(
    ("order_no", "message"),
    [
        ("raise", "raised LookupError: no such order"),
        ("int", "returned a int"),
        ("empty", "returned an empty string"),
    ],
)
def test_a_bad_dedup_key_fails_the_task_naming_it_and_the_cause(order_no, message):
    with pytest.raises(DedupKeyError, match=r"unit\.bad_key") as info:
        bad_key.apply(args=(order_no,)).get()
    assert message in str(info.value)
    assert BODY_RUNS == []
    assert not DedupRecord.objects.exists()


def test_a_dedup_key_of_none_runs_without_dedup():
    bad_key.apply(args=("none",)).get()
    bad_key.apply(args=("none",)).get()
    assert BODY_RUNS == [("bad_key", "none"), ("bad_key", "none")]
    assert not DedupRecord.objects.exists()


def test_a_direct_call_is_a_plain_function_call():
    assert by_id(5) == 5
    assert not DedupRecord.objects.exists()


def test_eager_duplicate_of_a_message_in_flight_raises_instead_of_rescheduling():
    task_id = str(uuid.uuid4())
    hold(by_id, task_id, identity=ELSEWHERE)
    with pytest.raises(DuplicateInFlightError, match="still running"):
        by_id.apply(args=(1,), task_id=task_id).get()
    assert BODY_RUNS == []


def test_a_live_owner_on_this_machine_is_never_taken_over():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = current_identity()
        alive = OwnerIdentity(
            me.hostname, sleeper.pid, process_start_ticks(sleeper.pid), me.boot_id, me.pid_namespace
        )
        task_id = str(uuid.uuid4())
        hold(by_id, task_id, identity=alive)
        with pytest.raises(DuplicateInFlightError):
            by_id.apply(args=(1,), task_id=task_id).get()
        assert BODY_RUNS == []
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("how", ["exited", "pid reused"])
def test_a_dead_owners_lease_ends_at_once(how):
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    me = current_identity()
    if how == "exited":
        dead = OwnerIdentity(me.hostname, int(done.stdout), 12345, me.boot_id, me.pid_namespace)
    else:
        # A live pid with another start time is another process that reused the pid.
        dead = OwnerIdentity(me.hostname, os.getppid(), 1, me.boot_id, me.pid_namespace)
    task_id = str(uuid.uuid4())
    hold(by_id, task_id, identity=dead, lease=600)
    assert by_id.apply(args=(3,), task_id=task_id).get() == 3
    found = rec(by_id, task_id)
    assert (found.status, found.takeovers) == (DedupRecord.Status.CONSUMED, 1)


def test_an_owner_that_is_this_idle_process_is_taken_over():
    """An earlier attempt in this very process is over, since it runs one task at a time."""
    task_id = str(uuid.uuid4())
    hold(by_id, task_id, identity=current_identity(), lease=600)
    assert by_id.apply(args=(4,), task_id=task_id).get() == 4
    assert rec(by_id, task_id).takeovers == 1


def test_a_failing_body_leaves_a_failed_record_and_a_stale_copy_is_skipped():
    task_id = str(uuid.uuid4())
    with (
        captured(signals.message_released) as seen,
        pytest.raises(ValueError, match="the body failed"),
    ):
        failing.apply(args=("fail",), task_id=task_id).get()
    found = rec(failing, task_id)
    assert (found.status, found.attempt) == (DedupRecord.Status.FAILED, 0)
    assert seen[0]["reason"] == "failed"
    assert seen[0]["task_id"] == task_id
    # A copy of the same delivery (same id, same attempt) arriving later is stale.
    assert failing.apply(args=("fail",), task_id=task_id).state == "IGNORED"
    assert rec(failing, task_id).skipped == 1
    assert BODY_RUNS == [("failing", "fail")]
    # A retry (a higher attempt) runs again.
    with pytest.raises(ValueError, match="the body failed"):
        failing.apply(args=("fail",), task_id=task_id, retries=1).get()
    assert rec(failing, task_id).attempt == 1


def test_a_body_that_requeues_its_message_deletes_the_record():
    task_id = str(uuid.uuid4())
    assert failing.apply(args=("requeue",), task_id=task_id).state == "REJECTED"
    assert rec(failing, task_id) is None


def test_a_heartbeat_keeps_a_slow_body_s_lease(settings):
    task_id = str(uuid.uuid4())
    assert heartbeat_task.apply(task_id=task_id).get() == "in flight meanwhile"
    found = rec(heartbeat_task, task_id)
    assert found.status == DedupRecord.Status.CONSUMED
    assert found.takeovers == 0
    assert found.heartbeat_at is not None


def test_without_a_heartbeat_a_slow_body_loses_its_lease(caplog):
    task_id = str(uuid.uuid4())
    assert no_heartbeat_task.apply(task_id=task_id).get() == "taken over meanwhile"
    assert "lease lost" in caplog.text


def test_a_poisoned_message_fails_every_delivery_visibly(settings, caplog):
    settings.DEDUP_CELERY = {**settings.DEDUP_CELERY, "MAX_TAKEOVERS": 1}
    task_id = str(uuid.uuid4())
    hold(by_id, task_id, identity=ELSEWHERE, lease=0.1)
    time.sleep(0.2)
    hold(by_id, task_id, identity=ELSEWHERE, lease=0.1)  # takeover 1: the cap
    time.sleep(0.2)
    with captured(signals.message_poisoned) as seen:
        with pytest.raises(PoisonMessageError, match="POISONED"):
            by_id.apply(args=(1,), task_id=task_id).get()
        with pytest.raises(PoisonMessageError):
            by_id.apply(args=(1,), task_id=task_id).get()
    assert len(seen) == 1
    assert "POISON MESSAGE" in caplog.text
    assert rec(by_id, task_id).status == DedupRecord.Status.POISONED
    assert BODY_RUNS == []


def test_a_body_that_raises_ignore_counts_as_consumed():
    task_id = str(uuid.uuid4())
    assert failing.apply(args=("ignore",), task_id=task_id).state == "IGNORED"
    assert rec(failing, task_id).status == DedupRecord.Status.CONSUMED


def test_signals_report_claims_and_skipped_duplicates(caplog):
    task_id = str(uuid.uuid4())
    with (
        captured(signals.message_claimed, signals.duplicate_skipped) as seen,
        caplog.at_level(logging.INFO, logger="dedup_celery.task"),
    ):
        by_id.apply(args=(1,), task_id=task_id)
        by_id.apply(args=(1,), task_id=task_id)
    # Every duplicate leaves a trace: the log line and the record's counter too.
    assert f"{by_id.name}[{task_id}]: duplicate skipped" in caplog.text
    assert digest(task_id) in caplog.text
    assert rec(by_id, task_id).skipped == 1
    events = [(e["signal"], e["sender"], e["task_id"], e["key_digest"]) for e in seen]
    assert events == [
        (signals.message_claimed, by_id, task_id, digest(task_id)),
        (signals.duplicate_skipped, by_id, task_id, digest(task_id)),
    ]
    # A first claim's record is built only for a receiver: this one gets all of it.
    claimed = seen[0]["record"]
    assert (claimed.status, claimed.task_id, claimed.skipped) == ("processing", task_id, 0)
    assert claimed.created_at == rec(by_id, task_id).created_at


def test_a_body_that_lost_its_lease_logs_an_error_and_sends_lease_lost(caplog):
    task_id = str(uuid.uuid4())
    with (
        captured(signals.lease_lost) as seen,
        caplog.at_level(logging.ERROR, logger="dedup_celery"),
    ):
        assert slow_lease.apply(task_id=task_id).get() == "done"
    assert "lease lost" in caplog.text
    assert digest(task_id) in caplog.text
    assert len(seen) == 1
    assert seen[0]["current_owner"] == rec(slow_lease, task_id).owner.hex
    assert seen[0]["owner"] != seen[0]["current_owner"]
    assert rec(slow_lease, task_id).status == DedupRecord.Status.PROCESSING


def test_transactional_success_commits_the_record_and_the_effect_together():
    task_id = str(uuid.uuid4())
    assert tx.apply(args=("t1",), task_id=task_id).get() == "t1"
    assert Effect.objects.filter(tag="t1").count() == 1
    assert rec(tx, task_id).status == DedupRecord.Status.CONSUMED
    assert tx.apply(args=("t1",), task_id=task_id).state == "IGNORED"
    assert Effect.objects.filter(tag="t1").count() == 1


def test_transactional_failure_leaves_neither_record_nor_effect():
    task_id = str(uuid.uuid4())
    with pytest.raises(ValueError, match="after its effect"):
        tx.apply(args=("t2", "fail"), task_id=task_id).get()
    assert not Effect.objects.filter(tag="t2").exists()
    assert rec(tx, task_id) is None


def test_transactional_body_raising_ignore_commits():
    task_id = str(uuid.uuid4())
    assert tx.apply(args=("t3", "ignore"), task_id=task_id).state == "IGNORED"
    assert Effect.objects.filter(tag="t3").count() == 1
    assert rec(tx, task_id).status == DedupRecord.Status.CONSUMED


def test_transactional_body_that_swallows_a_database_error_is_not_silently_rolled_back():
    task_id = str(uuid.uuid4())
    with pytest.raises(DedupError, match="nothing was committed"):
        tx.apply(args=("t4", "swallow"), task_id=task_id).get()
    assert not Effect.objects.filter(tag="t4").exists()
    assert rec(tx, task_id) is None


def test_transactional_task_inside_an_outer_atomic_block_is_an_error():
    with pytest.raises(OuterTransactionError, match="savepoint"), transaction.atomic():
        tx.apply(args=("t5",)).get()
    assert not Effect.objects.filter(tag="t5").exists()


@pytest.fixture
def bypassed():
    """A task with dedup_bypass=True, registered only for the test (the project stays clean)."""

    def body(self, value):
        BODY_RUNS.append(("bypassed", self.request.id))
        return value

    task = app.task(
        base=DedupTask, name="unit.bypassed", bind=True, dedup_bypass=True, shared=False
    )(body)
    yield task
    app.tasks.unregister("unit.bypassed")


def test_a_bypassed_task_runs_as_a_plain_task_loudly(bypassed, caplog):
    task_id = str(uuid.uuid4())
    with caplog.at_level(logging.WARNING, logger="dedup_celery"):
        assert bypassed.apply(args=(1,), task_id=task_id).get() == 1
        assert bypassed.apply(args=(1,), task_id=task_id).get() == 1
    assert [r[0] for r in BODY_RUNS] == ["bypassed", "bypassed"]
    assert rec(bypassed, task_id) is None
    assert [r.getMessage() for r in caplog.records].count(
        f"unit.bypassed[{task_id}]: dedup is bypassed (DEDUP_CELERY['BYPASS'] or dedup_bypass): "
        "the body runs without a claim, and a duplicate of this message would run it again"
    ) == 2


@pytest.mark.parametrize("bypass", [True, ["unit.by_id"]])
def test_the_bypass_setting_covers_every_task_or_the_named_ones(settings, bypass):
    settings.DEDUP_CELERY = {"BYPASS": bypass}
    task_id = str(uuid.uuid4())
    by_id.apply(args=(1,), task_id=task_id)
    by_id.apply(args=(1,), task_id=task_id)
    assert [r[0] for r in BODY_RUNS] == ["by_id", "by_id"]
    assert rec(by_id, task_id) is None


def test_the_bypass_setting_spares_the_tasks_it_does_not_name(settings):
    settings.DEDUP_CELERY = {"BYPASS": ["unit.other"]}
    task_id = str(uuid.uuid4())
    by_id.apply(args=(1,), task_id=task_id)
    assert by_id.apply(args=(1,), task_id=task_id).state == "IGNORED"
    assert [r[0] for r in BODY_RUNS] == ["by_id"]
