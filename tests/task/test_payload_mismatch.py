"""Same key, other arguments, run through Celery's tracer as a worker runs a task.

The worker-level test (tests/worker/test_payload_mismatch.py) shows the same
with a real prefork worker and broker; these pin each rule: what counts as a
mismatch, what each ``PAYLOAD_MISMATCH`` does, and what is exempt.
"""

from __future__ import annotations

import hashlib
import logging
import uuid

import pytest
from django.test import override_settings

from dedup_celery import DedupTask, signals
from dedup_celery.delivery.mismatch import REPORTED_HEADER
from dedup_celery.exceptions import PayloadMismatchError
from dedup_celery.keys import digest
from dedup_celery.models import DedupRecord
from dedup_celery.payload import call_fingerprint, canonical
from tests.celery_app import app
from tests.helpers import ELSEWHERE, captured, hold, run_as_worker
from tests.task.test_reschedule import assert_queue_empty, read_queue

RUNS: list[tuple[str, tuple]] = []


def _order_key(order, qty=None, at=None):
    return f"order:{order}"


@app.task(base=DedupTask, name="unit.mismatch.warned", bind=True, dedup_key=_order_key)
def warned(self, order, qty=None, at=None):
    RUNS.append((self.request.id, (order, qty)))
    return {"order": order, "qty": qty, "task_id": self.request.id}


@app.task(
    base=DedupTask,
    name="unit.mismatch.raised",
    bind=True,
    dedup_key=_order_key,
    dedup_payload_mismatch="raise",
)
def raised(self, order, qty=None, at=None):
    RUNS.append((self.request.id, (order, qty)))
    return {"order": order, "qty": qty}


@app.task(
    base=DedupTask,
    name="unit.mismatch.picked",
    bind=True,
    dedup_key=_order_key,
    dedup_payload=lambda order, qty=None, at=None: {"order": order, "qty": qty},
)
def picked(self, order, qty=None, at=None):
    RUNS.append((self.request.id, (order, qty)))
    return qty


@app.task(base=DedupTask, name="unit.mismatch.by_id", bind=True)
def by_id(self, value):
    RUNS.append((self.request.id, (value,)))
    return value


@pytest.fixture(autouse=True)
def _clear_runs():
    RUNS.clear()


def _id():
    return str(uuid.uuid4())


def _stored(task, key):
    return DedupRecord.objects.get(scope=task.name, key_digest=digest(key))


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if "payload mismatch" in r.getMessage()]


@pytest.mark.django_db(transaction=True)
def test_warn_a_business_key_copy_with_other_arguments_is_reported_once_and_answered(caplog):
    order, first, second = _id(), _id(), _id()
    original = run_as_worker(warned, first, [order], {"qty": "two-secret"}).retval
    with (
        captured(signals.payload_mismatch) as seen,
        caplog.at_level(logging.WARNING, logger="dedup_celery.task"),
    ):
        trace = run_as_worker(warned, second, [order], {"qty": "five-secret"})
    assert trace.retval == original  # handled as any duplicate: the original's result
    assert [(first, (order, "two-secret"))] == RUNS
    (message,) = _warnings(caplog)
    assert first in message
    assert second in message
    assert "secret" not in message
    assert order not in message
    assert "payload_mismatches=1" in message
    (sent,) = seen
    assert sent["sender"].name == warned.name
    assert (sent["task_id"], sent["original_task_id"]) == (second, first)
    assert sent["verdict"] == "consumed"
    assert sent["payload_digest"] == call_fingerprint(warned, (order,), {"qty": "five-secret"})
    assert sent["record"].payload_digest == call_fingerprint(warned, (order, "two-secret"), {})
    stored = _stored(warned, f"order:{order}")
    assert (stored.payload_mismatches, stored.skipped) == (1, 1)


@pytest.mark.django_db(transaction=True)
def test_equal_arguments_in_another_order_or_form_are_no_mismatch(caplog):
    order = _id()
    run_as_worker(warned, _id(), [order], {"qty": 2, "at": {"b": 1, "a": [1, 2]}})
    with (
        captured(signals.payload_mismatch) as seen,
        caplog.at_level(logging.WARNING, logger="dedup_celery.task"),
    ):
        run_as_worker(warned, _id(), [order], {"at": {"a": (1, 2), "b": 1}, "qty": 2})
    assert seen == []
    assert _warnings(caplog) == []
    assert _stored(warned, f"order:{order}").payload_mismatches == 0


@pytest.mark.django_db(transaction=True)
def test_raise_fails_a_copy_under_its_own_task_id_and_leaves_the_original_alone():
    order, first, second = _id(), _id(), _id()
    assert run_as_worker(raised, first, [order], {"qty": 2}).retval == {"order": order, "qty": 2}
    trace = run_as_worker(raised, second, [order], {"qty": 5})
    assert trace.info.state == "FAILURE"
    assert isinstance(trace.info.retval, PayloadMismatchError)
    assert first in str(trace.info.retval)
    assert "PAYLOAD_MISMATCH is 'raise'" in str(trace.info.retval)
    assert app.AsyncResult(first).state == "SUCCESS"
    # The same arguments are a plain duplicate even under "raise".
    assert run_as_worker(raised, _id(), [order], {"qty": 2}).retval == {"order": order, "qty": 2}
    assert [r[0] for r in RUNS] == [first]
    assert _stored(raised, f"order:{order}").payload_mismatches == 1


@pytest.mark.django_db(transaction=True)
def test_raise_on_the_originals_own_task_id_only_ignores_the_copy(caplog):
    # A producer re-sent the task id with other arguments: failing it would write
    # FAILURE over the original's SUCCESS, so it is reported and ignored.
    order, task_id = _id(), _id()
    run_as_worker(raised, task_id, [order], {"qty": 2})
    with (
        captured(signals.payload_mismatch) as seen,
        caplog.at_level(logging.WARNING, logger="dedup_celery.task"),
    ):
        trace = run_as_worker(raised, task_id, [order], {"qty": 9})
    assert trace.info.state == "IGNORED"
    assert len(seen) == 1
    assert len(_warnings(caplog)) == 1
    assert app.AsyncResult(task_id).state == "SUCCESS"
    assert app.AsyncResult(task_id).result == {"order": order, "qty": 2}


@pytest.mark.django_db(transaction=True)
def test_a_task_id_key_resent_with_other_arguments_is_a_mismatch(caplog):
    task_id = _id()
    run_as_worker(by_id, task_id, [1], {})
    with captured(signals.payload_mismatch) as seen:
        assert run_as_worker(by_id, task_id, [2], {}).info.state == "IGNORED"
    assert [s["verdict"] for s in seen] == ["consumed"]
    assert _stored(by_id, task_id).payload_mismatches == 1


@pytest.mark.django_db(transaction=True)
def test_a_copy_of_another_attempt_of_the_same_task_id_is_exempt():
    # retry(args=...) sends the same task id with new arguments at a higher attempt;
    # a late copy of the attempt before it meets the retry's record.
    task_id = _id()
    run_as_worker(by_id, task_id, ["retried"], {}, retries=1)
    with captured(signals.payload_mismatch) as seen:
        assert run_as_worker(by_id, task_id, ["first"], {}, retries=0).info.state == "IGNORED"
    assert seen == []
    assert _stored(by_id, task_id).payload_mismatches == 0


@pytest.mark.django_db(transaction=True)
def test_a_replacement_has_a_key_of_its_own_so_other_arguments_are_no_mismatch():
    task_id = _id()
    run_as_worker(by_id, task_id, [1], {})
    with captured(signals.payload_mismatch) as seen:
        trace = run_as_worker(by_id, task_id, [2], {}, headers={"replaced_task_nesting": 1})
    assert trace.retval == 2
    assert seen == []


@pytest.mark.django_db(transaction=True)
def test_a_record_without_a_fingerprint_never_counts():
    # Written by a release before the fingerprint existed, or under "ignore".
    order = _id()
    hold(warned, f"order:{order}", task_id=_id(), identity=ELSEWHERE, lease=60)
    DedupRecord.objects.filter(key_digest=digest(f"order:{order}")).update(
        status="consumed", payload_digest=None
    )
    with captured(signals.payload_mismatch) as seen:
        run_as_worker(warned, _id(), [order], {"qty": 5})
    assert seen == []
    assert _stored(warned, f"order:{order}").payload_mismatches == 0


@pytest.mark.django_db(transaction=True)
def test_ignore_computes_no_fingerprint_and_reports_nothing():
    order = _id()
    with override_settings(DEDUP_CELERY={"PAYLOAD_MISMATCH": "ignore"}):
        run_as_worker(warned, _id(), [order], {"qty": 2})
        with captured(signals.payload_mismatch) as seen:
            run_as_worker(warned, _id(), [order], {"qty": 5})
    assert seen == []
    stored = _stored(warned, f"order:{order}")
    assert (stored.payload_digest, stored.payload_mismatches) == (None, 0)


@pytest.mark.django_db(transaction=True)
def test_the_setting_raise_applies_to_a_task_without_its_own_option():
    order = _id()
    with override_settings(DEDUP_CELERY={"PAYLOAD_MISMATCH": "raise"}):
        run_as_worker(warned, _id(), [order], {"qty": 2})
        trace = run_as_worker(warned, _id(), [order], {"qty": 5})
    assert isinstance(trace.info.retval, PayloadMismatchError)


@pytest.mark.django_db(transaction=True)
def test_dedup_payload_picks_what_counts():
    order = _id()
    run_as_worker(picked, _id(), [order], {"qty": 2, "at": "12:00"})
    with captured(signals.payload_mismatch) as seen:
        run_as_worker(picked, _id(), [order], {"qty": 2, "at": "12:05"})  # left out: no mismatch
        assert seen == []
        run_as_worker(picked, _id(), [order], {"qty": 3, "at": "12:00"})
    assert len(seen) == 1
    stored = _stored(picked, f"order:{order}")
    # The digest of what dedup_payload returned, not of the arguments.
    assert (
        stored.payload_digest == hashlib.sha256(canonical({"order": order, "qty": 2})).hexdigest()
    )
    assert stored.payload_mismatches == 1


@pytest.mark.parametrize(
    ("payload", "cause"),
    [
        (lambda order, **kw: 1 / 0, "raised ZeroDivisionError"),
        (lambda order, **kw: object(), "returned a object that JSON cannot hold"),
    ],
)
@pytest.mark.django_db(transaction=True)
def test_a_dedup_payload_that_fails_only_leaves_the_delivery_without_a_fingerprint(
    payload, cause, caplog
):
    # A broken callable must not change what happens to the message: a redelivery of a
    # consumed message still ends as a duplicate, and nothing is written over its state.
    name = f"unit.mismatch.broken.{uuid.uuid4().hex}"

    @app.task(base=DedupTask, name=name, dedup_payload=payload)
    def broken(order):
        RUNS.append(("broken", (order,)))
        return order

    task_id = _id()
    with caplog.at_level(logging.WARNING, logger="dedup_celery.task"):
        assert run_as_worker(broken, task_id, [1], {}).retval == 1
        assert run_as_worker(broken, task_id, [1], {}).info.state == "IGNORED"
    assert RUNS == [("broken", (1,))]
    lines = [r.getMessage() for r in caplog.records if "no payload fingerprint" in r.getMessage()]
    assert len(lines) == 2
    assert cause in lines[0]
    assert app.AsyncResult(task_id).state == "SUCCESS"
    assert _stored(broken, task_id).payload_digest is None


@pytest.mark.django_db(transaction=True)
def test_one_call_written_two_ways_is_one_payload():
    # charge(42) and charge(order=42, qty=None) are the same call of the body.
    order = _id()
    run_as_worker(warned, _id(), [order], {})
    with captured(signals.payload_mismatch) as seen:
        run_as_worker(warned, _id(), [], {"order": order})
        run_as_worker(warned, _id(), [order, None], {"at": None})
    assert seen == []
    run_as_worker(warned, _id(), [order], {"qty": 0})
    assert _stored(warned, f"order:{order}").payload_mismatches == 1


@pytest.mark.django_db(transaction=True)
def test_an_in_flight_copy_is_reported_once_then_rescheduled_with_a_header(celery_broker, caplog):
    order, holder = _id(), _id()
    key = f"order:{order}"
    hold(warned, key, task_id=holder, identity=ELSEWHERE, lease=60,
         payload_digest=call_fingerprint(warned, (order, 2), {}))  # fmt: skip
    copy = _id()
    with (
        captured(signals.payload_mismatch) as seen,
        caplog.at_level(logging.WARNING, logger="dedup_celery.task"),
    ):
        trace = run_as_worker(warned, copy, [order], {"qty": 5})
        assert trace.info.state == "IGNORED"
        with app.connection_for_read() as connection:
            headers = read_queue(connection, "q-unit-reschedule").headers
        assert headers[REPORTED_HEADER] == holder  # reported against this message
        # Its next visit, still in flight, is rescheduled without a second report.
        trace = run_as_worker(warned, copy, [order], {"qty": 5}, headers=headers)
        assert trace.info.state == "IGNORED"
        with app.connection_for_read() as connection:
            read_queue(connection, "q-unit-reschedule")
    assert [s["verdict"] for s in seen] == ["in_flight"]
    assert len(_warnings(caplog)) == 1
    stored = _stored(warned, key)
    assert (stored.payload_mismatches, stored.rescheduled) == (1, 2)


@pytest.mark.django_db(transaction=True)
def test_raise_fails_an_in_flight_copy_at_once_instead_of_rescheduling_it(celery_broker):
    order = _id()
    hold(raised, f"order:{order}", task_id=_id(), identity=ELSEWHERE, lease=60,
         payload_digest=call_fingerprint(raised, (order, 2), {}))  # fmt: skip
    with captured(signals.duplicate_skipped, signals.duplicate_rescheduled) as seen:
        trace = run_as_worker(raised, _id(), [order], {"qty": 5})
    assert isinstance(trace.info.retval, PayloadMismatchError)
    assert [s.get("reason") for s in seen] == ["payload_mismatch"]
    assert_queue_empty("q-unit-reschedule")


@pytest.mark.django_db(transaction=True)
def test_raise_ignores_an_in_flight_copy_under_the_originals_own_task_id(celery_broker):
    # Failing it would write FAILURE under the task id the running original will
    # write its SUCCESS under.
    order, task_id = _id(), _id()
    hold(raised, f"order:{order}", task_id=task_id, identity=ELSEWHERE, lease=60,
         payload_digest=call_fingerprint(raised, (order, 2), {}))  # fmt: skip
    with captured(signals.payload_mismatch) as seen:
        trace = run_as_worker(raised, task_id, [order], {"qty": 5})
    assert trace.info.state == "IGNORED"
    assert [s["verdict"] for s in seen] == ["in_flight"]
    assert app.AsyncResult(task_id).state == "PENDING"  # nothing written under its id


def test_a_wrong_option_or_setting_is_named_with_what_it_must_be():
    from dedup_celery.conf import validate
    from dedup_celery.options import option_errors

    class Wrong(DedupTask):
        name = "unit.mismatch.wrong"
        dedup_payload = "qty"
        dedup_payload_mismatch = "loud"

    problems = option_errors(Wrong())
    assert "dedup_payload is 'qty'; it must be None or a callable" in problems
    assert any(
        p.startswith("dedup_payload_mismatch is 'loud'; it must be None (follow PAYLOAD_MISMATCH)")
        and "'warn', 'raise', 'ignore'" in p
        for p in problems
    )
    (error,) = validate({"PAYLOAD_MISMATCH": "loud"})
    assert error.id == "dedup_celery.E003"
    assert "PAYLOAD_MISMATCH" in error.msg
    assert "'warn', 'raise', 'ignore'" in error.msg
    assert validate({"PAYLOAD_MISMATCH": "raise"}) == []


_calls = iter(range(10**9))


def _next_call(order, **kwargs):
    return next(_calls)


@app.task(base=DedupTask, name="unit.mismatch.ever_changing", dedup_key=_order_key,
          dedup_payload_mismatch="raise", dedup_payload=_next_call)  # fmt: skip
def ever_changing(order, qty=None, at=None):
    return order


@pytest.mark.django_db(transaction=True)
def test_the_testing_helper_reports_a_refused_copy_as_a_failure_not_a_skip():
    from dedup_celery.testing import deliver

    done = deliver(ever_changing, [_id()], same_id=False)  # each copy fingerprints anew
    assert done.outcomes == ["ran", "failure"]
    assert done[1].state == "FAILURE"
    assert isinstance(done[1].result.exception, PayloadMismatchError)
