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
import uuid

import pytest
from celery.exceptions import Ignore
from django.db import DatabaseError, connection, transaction

from dedup_celery import (
    DedupError,
    DedupKeyError,
    DedupTask,
    DuplicateInFlightError,
    OuterTransactionError,
    get_backend,
    signals,
)
from dedup_celery.backends.base import Claim, Verdict
from dedup_celery.identity import current_identity
from dedup_celery.keys import digest
from dedup_celery.models import DedupRecord
from tests.celery_app import app
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
    raise ValueError("the body failed")


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
    import time

    time.sleep(0.4)
    # Another delivery takes the expired lease over while this body still runs.
    rival = Claim(
        scope=self.name,
        key=self.request.id,
        key_digest=digest(self.request.id),
        owner=uuid.uuid4().hex,
        task_id=self.request.id,
        task_name=self.name,
        attempt=0,
        identity=current_identity(),
        lease_seconds=60,
        record_ttl=60,
    )
    assert get_backend().claim(rival).verdict is Verdict.TAKEN_OVER
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
    [(object(), "not JSON-serializable"), ("x" * 70_000, "over RESULT_MAX_BYTES")],
)
def test_unstorable_result_makes_duplicates_return_none_with_a_warning(payload, reason, caplog):
    first = by_order.apply(args=(f"A-{reason}",), kwargs={"payload": payload})
    assert first.get() is payload
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
    claim = Claim(
        scope=by_id.name,
        key=task_id,
        key_digest=digest(task_id),
        owner=uuid.uuid4().hex,
        task_id=task_id,
        task_name=by_id.name,
        attempt=0,
        identity=current_identity(),
        lease_seconds=60,
        record_ttl=60,
    )
    get_backend().claim(claim)
    with pytest.raises(DuplicateInFlightError, match="still running"):
        by_id.apply(args=(1,), task_id=task_id).get()
    assert BODY_RUNS == []


def test_a_failing_body_releases_its_record_and_sends_message_released():
    seen = []

    def receiver(sender, **kwargs):
        seen.append(kwargs)

    signals.message_released.connect(receiver)
    try:
        task_id = str(uuid.uuid4())
        with pytest.raises(ValueError, match="the body failed"):
            failing.apply(args=("fail",), task_id=task_id).get()
    finally:
        signals.message_released.disconnect(receiver)
    assert rec(failing, task_id) is None
    assert seen[0]["reason"] == "failed"
    assert seen[0]["task_id"] == task_id


def test_a_body_that_raises_ignore_counts_as_consumed():
    task_id = str(uuid.uuid4())
    assert failing.apply(args=("ignore",), task_id=task_id).state == "IGNORED"
    assert rec(failing, task_id).status == DedupRecord.Status.CONSUMED


def test_signals_report_claims_and_skipped_duplicates():
    events = []

    def on(name):
        def receiver(sender, **kwargs):
            events.append((name, sender, kwargs["task_id"], kwargs["key_digest"]))

        return receiver

    receivers = {
        s: on(n)
        for n, s in [("claimed", signals.message_claimed), ("skipped", signals.duplicate_skipped)]
    }
    for signal, receiver in receivers.items():
        signal.connect(receiver)
    try:
        task_id = str(uuid.uuid4())
        by_id.apply(args=(1,), task_id=task_id)
        by_id.apply(args=(1,), task_id=task_id)
    finally:
        for signal, receiver in receivers.items():
            signal.disconnect(receiver)
    assert events == [
        ("claimed", by_id, task_id, digest(task_id)),
        ("skipped", by_id, task_id, digest(task_id)),
    ]


def test_a_body_that_lost_its_lease_logs_an_error_and_sends_lease_lost(caplog):
    seen = []

    def receiver(sender, **kwargs):
        seen.append(kwargs)

    signals.lease_lost.connect(receiver)
    try:
        task_id = str(uuid.uuid4())
        with caplog.at_level(logging.ERROR, logger="dedup_celery"):
            assert slow_lease.apply(task_id=task_id).get() == "done"
    finally:
        signals.lease_lost.disconnect(receiver)
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
