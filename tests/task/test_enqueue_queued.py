"""``dedup_on_enqueue = "queued"``: at most one queued or running copy per key.

Counted on the real Redis broker (nothing consumes these queues, so a queue's
length is what the producer published); deliveries run through Celery's tracer
as a worker runs them. The control is the same task with ``"consumed"``: while
nothing is consumed yet, every send reaches the queue.
"""

from __future__ import annotations

import logging
import time
import uuid

import pytest
from celery import Celery
from django.db import transaction

from dedup_celery import DedupTask, enqueue, signals
from dedup_celery.keys import digest
from dedup_celery.models import DedupRecord
from dedup_celery.states import Status
from tests.celery_app import app
from tests.helpers import captured, run_as_worker
from tests.task.test_reschedule import read_queue

pytestmark = pytest.mark.django_db(transaction=True)

RUNS: list[str] = []


def _order_key(order, qty=1):
    return f"order:{order}"


@app.task(base=DedupTask, name="unit.queued.once", bind=True, dedup_key=_order_key,
          dedup_on_enqueue="queued")  # fmt: skip
def once(self, order, qty=1):
    RUNS.append(self.request.id)
    return {"order": order, "qty": qty}


# On an app of its own: the test project's checks rightly warn (W012) about a TTL this short.
short_app = Celery("unit-queued-short", set_as_current=False)


@short_app.task(base=DedupTask, name="unit.queued.short", shared=False, dedup_key=_order_key,
                dedup_on_enqueue="queued", dedup_queue_ttl=0.3)  # fmt: skip
def short(order, qty=1):
    return {"order": order, "qty": qty}


@pytest.fixture(autouse=True)
def _short_app_broker(celery_broker):
    short_app.conf.broker_url = celery_broker.conf.broker_url


@app.task(base=DedupTask, name="unit.queued.consumed_only", dedup_key=_order_key,
          dedup_on_enqueue="consumed")  # fmt: skip
def consumed_only(order, qty=1):
    return {"order": order, "qty": qty}


@pytest.fixture(autouse=True)
def _clear_runs():
    RUNS.clear()


def _id():
    return str(uuid.uuid4())


def _record(task, order):
    return DedupRecord.objects.get(scope=task.name, key_digest=digest(f"order:{order}"))


def test_sends_while_a_copy_is_queued_are_answered_with_it_and_never_published(queue):
    order = _id()
    with captured(signals.publish_skipped) as seen:
        results = [once.apply_async((order,), queue=queue) for _ in range(5)]
    assert queue.length() == 1
    assert len({r.id for r in results}) == 1
    marker = _record(once, order)
    assert (marker.status, marker.task_id) == (Status.QUEUED, results[0].id)
    assert marker.rescheduled == 4  # each answered send is counted on the record
    assert [s["reason"] for s in seen] == ["queued"] * 4


def test_control_consumed_only_publishes_every_send_of_a_message_not_yet_consumed(queue):
    order = _id()
    results = [consumed_only.apply_async((order,), queue=queue) for _ in range(5)]
    assert queue.length() == 5
    assert len({r.id for r in results}) == 5


def test_the_queued_task_id_claims_the_marker_and_later_sends_meet_the_consumed_record(queue):
    order = _id()
    first = once.apply_async((order,), queue=queue)
    copy = _id()
    other = run_as_worker(once, copy, [order], {})  # a copy under another id: rescheduled
    assert other.info.state == "IGNORED"
    with app.connection_for_read() as connection:
        assert read_queue(connection, "q-unit-reschedule").headers["id"] == copy
    assert RUNS == []
    assert run_as_worker(once, first.id, [order], {}).retval == {"order": order, "qty": 1}
    assert [first.id] == RUNS
    assert _record(once, order).status == Status.CONSUMED
    again = once.apply_async((order,), queue=queue)
    assert again.id == first.id
    assert again.get(timeout=5) == {"order": order, "qty": 1}
    assert queue.length() == 1  # the first send only


def test_a_marker_whose_ttl_ended_lets_the_next_send_publish(queue):
    order = _id()
    short.apply_async((order,), queue=queue)
    time.sleep(0.6)  # the message was lost in the broker, say: the key is blocked until here
    later = short.apply_async((order,), queue=queue)
    assert queue.length() == 2
    assert _record(short, order).task_id == later.id


def test_the_marker_lasts_the_queue_ttl_plus_the_countdown(queue):
    order = _id()
    short.apply_async((order,), queue=queue, countdown=30)
    marker = _record(short, order)
    lasts = (marker.expires_at - marker.updated_at).total_seconds()
    assert 30 <= lasts <= 31


def test_a_publish_that_fails_removes_its_marker_and_raises(queue):
    order = _id()

    published = []

    def recorded_publish(*args, **kwargs):
        published.append(args)
        raise ConnectionError("the broker is down")

    real = getattr(once, "_get_current_object", lambda: once)()  # as apply_async's self
    with pytest.raises(ConnectionError):
        enqueue.send(real, recorded_publish, (order,), {}, None, {"queue": queue})
    assert len(published) == 1  # the marker was written, then the publish was tried
    assert not DedupRecord.objects.filter(key_digest=digest(f"order:{order}")).exists()
    assert once.apply_async((order,), queue=queue).id  # the next send is not blocked
    assert queue.length() == 1


def test_other_arguments_are_published_so_that_the_worker_reports_the_mismatch(queue):
    order = _id()
    once.apply_async((order,), queue=queue)
    once.apply_async((order,), {"qty": 2}, queue=queue)
    assert queue.length() == 2


def test_inside_a_transaction_on_the_message_tables_database_it_looks_up_only(queue, caplog):
    # The marker would commit with the caller, and the worker's claim would wait for it.
    order = _id()
    with transaction.atomic():
        once.apply_async((order,), queue=queue)
        once.apply_async((order,), queue=queue)
    assert queue.length() == 2
    assert not DedupRecord.objects.filter(key_digest=digest(f"order:{order}")).exists()


def test_a_store_that_fails_publishes_as_usual(queue, caplog, settings):
    settings.DEDUP_CELERY = {"BACKEND": "redis", "OPTIONS": {"url": "redis://127.0.0.1:1/0"}}
    with caplog.at_level(logging.WARNING, logger="dedup_celery.enqueue"):
        once.apply_async((_id(),), queue=queue)
    assert queue.length() == 1
    assert "the lookup before publishing failed" in caplog.text


def test_a_marker_that_raised_after_it_landed_is_published_under_its_own_task_id(
    queue, monkeypatch
):
    from dedup_celery.backends import get_backend
    from dedup_celery.exceptions import StorageError

    backend = get_backend()
    written = backend.queue

    def lost_reply(claim):
        written(claim)
        raise StorageError("the connection dropped after the write")

    monkeypatch.setattr(backend, "queue", lost_reply)
    order = _id()
    sent = once.apply_async((order,), queue=queue)
    assert queue.length() == 1
    marker = _record(once, order)
    assert marker.task_id == sent.id  # so the published message claims its own marker
    assert run_as_worker(once, sent.id, [order], {}).retval == {"order": order, "qty": 1}


def test_the_marker_never_outlives_the_sends_expires(queue):
    order = _id()
    once.apply_async((order,), queue=queue, expires=20)
    marker = _record(once, order)
    assert 19 <= (marker.expires_at - marker.updated_at).total_seconds() <= 20.5
    gone = _id()
    once.apply_async((gone,), queue=queue, countdown=30, expires=10)  # expires before it runs
    assert not DedupRecord.objects.filter(key_digest=digest(f"order:{gone}")).exists()
    assert queue.length() == 2


def test_with_autocommit_off_the_marker_is_not_written_in_the_callers_transaction(queue):
    order = _id()
    transaction.set_autocommit(False)
    try:
        once.apply_async((order,), queue=queue)
        assert not DedupRecord.objects.filter(key_digest=digest(f"order:{order}")).exists()
    finally:
        transaction.rollback()
        transaction.set_autocommit(True)
    assert queue.length() == 1
