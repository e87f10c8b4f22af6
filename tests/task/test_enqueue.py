"""``dedup_on_enqueue = "consumed"``: what is published, counted on the real Redis broker.

Nothing consumes the queues here, so a queue's length is the number of
messages the producer published. The control is the same task without the
option: every send of a consumed message reaches the queue.
"""

from __future__ import annotations

import logging
import uuid

import pytest
from celery import chain, group
from django.db import connection, transaction
from django.test import override_settings

from dedup_celery import DedupTask, signals
from dedup_celery.enqueue import republishing
from dedup_celery.exceptions import DedupKeyError
from dedup_celery.keys import digest
from dedup_celery.models import DedupRecord
from tests.celery_app import app
from tests.helpers import ELSEWHERE, captured, hold, run_as_worker

pytestmark = pytest.mark.django_db(transaction=True)


def _order_key(order, qty=1):
    return f"order:{order}"


@app.task(base=DedupTask, name="unit.enqueue.skipping", dedup_key=_order_key,
          dedup_on_enqueue="consumed")  # fmt: skip
def skipping(order, qty=1):
    return {"order": order, "qty": qty}


@app.task(base=DedupTask, name="unit.enqueue.control", dedup_key=_order_key)
def control(order, qty=1):
    return {"order": order, "qty": qty}


@app.task(base=DedupTask, name="unit.enqueue.by_id", dedup_on_enqueue="consumed")
def by_id(value):
    return value


@app.task(name="unit.enqueue.after")
def after(value):
    return value


def _id():
    return str(uuid.uuid4())


def _consume(task, order, qty=None):
    """Run the original through Celery's tracer as a worker would: its record is CONSUMED.

    Sent as ``(order,)``, or ``(order,), {"qty": qty}``: the fingerprint is of the
    arguments as sent, so later sends must match that form to be answered.
    """
    original = _id()
    kwargs = {} if qty is None else {"qty": qty}
    trace = run_as_worker(task, original, [order], kwargs)
    assert trace.retval == {"order": order, "qty": qty or 1}
    return original


def test_sends_of_a_consumed_message_are_not_published_and_answer_with_the_original(queue, caplog):
    order = _id()
    original = _consume(skipping, order)
    with (
        captured(signals.publish_skipped) as seen,
        caplog.at_level(logging.INFO, logger="dedup_celery.enqueue"),
    ):
        results = [skipping.apply_async((order,), queue=queue) for _ in range(3)]
        results.append(skipping.delay(order))
    assert queue.length() == 0
    assert {r.id for r in results} == {original}
    assert results[0].get(timeout=5) == {"order": order, "qty": 1}
    assert [s["reason"] for s in seen] == ["consumed"] * 4
    assert seen[0]["record"].task_id == original
    lines = [r.getMessage() for r in caplog.records if "not published" in r.getMessage()]
    assert len(lines) == 4
    assert original in lines[0]


def test_control_without_the_option_every_send_of_a_consumed_message_is_published(queue):
    order = _id()
    original = _consume(control, order)
    results = [control.apply_async((order,), queue=queue) for _ in range(3)]
    assert queue.length() == 3
    assert original not in {r.id for r in results}


def test_a_message_not_yet_consumed_is_published(queue):
    order, running = _id(), _id()
    skipping.apply_async((order,), queue=queue)  # no record at all
    hold(skipping, f"order:{order}", task_id=running, identity=ELSEWHERE, lease=60)
    skipping.apply_async((order,), queue=queue)  # PROCESSING: the worker decides
    assert queue.length() == 2


def test_an_expired_consumed_record_does_not_answer(queue):
    order = _id()
    _consume(skipping, order)
    DedupRecord.objects.filter(key_digest=digest(f"order:{order}")).update(
        expires_at="2000-01-01T00:00:00Z"
    )
    skipping.apply_async((order,), queue=queue)
    assert queue.length() == 1


def test_other_arguments_are_published_so_that_the_worker_reports_the_mismatch(queue):
    order = _id()
    _consume(skipping, order, qty=1)
    skipping.apply_async((order,), {"qty": 2}, queue=queue)
    assert queue.length() == 1
    skipping.apply_async((order,), {"qty": 1}, queue=queue)  # the same: answered
    # One call written other ways: positionally, by name, or with the default left out.
    skipping.apply_async((order, 1), queue=queue)
    skipping.apply_async((), {"order": order}, queue=queue)
    skipping.apply_async((order,), queue=queue)
    assert queue.length() == 1


def test_a_task_id_key_is_looked_up_only_for_a_given_task_id(queue):
    task_id = _id()
    run_as_worker(by_id, task_id, [5], {})
    assert by_id.apply_async((5,), task_id=task_id, queue=queue).id == task_id
    assert queue.length() == 0
    by_id.apply_async((5,), queue=queue)  # a new id: nothing to look up
    assert queue.length() == 1


SENDS = {
    "retry": lambda o, q: skipping.apply_async((o,), queue=q, retries=1),
    "replacement": lambda o, q: skipping.apply_async((o,), queue=q, replaced_task_nesting=1),
    "link": lambda o, q: skipping.apply_async((o,), queue=q, link=after.s()),
    "link_error": lambda o, q: skipping.apply_async((o,), queue=q, link_error=after.s()),
    "chain": lambda o, q: chain(skipping.s(o).set(queue=q), after.s().set(queue=q)).apply_async(),
    "group": lambda o, q: group(
        skipping.s(o).set(queue=q), skipping.s(o).set(queue=q)
    ).apply_async(),
    # What the worker sends after a task: a chain's last task carries chain=[], and a
    # link callback only the parent_id and root_id of the task before it.
    "chain_last": lambda o, q: skipping.apply_async((o,), queue=q, chain=[]),
    "link_callback": lambda o, q: skipping.apply_async(
        (o,), queue=q, parent_id=_id(), root_id=_id(), priority=0
    ),
}
#: Messages each send publishes to the queue (a chain publishes its first task only).
PUBLISHED = {
    "retry": 1,
    "replacement": 1,
    "link": 1,
    "link_error": 1,
    "chain": 1,
    "group": 2,
    "chain_last": 1,
    "link_callback": 1,
}


@pytest.mark.parametrize("kind", list(SENDS))
def test_copies_celery_makes_and_canvas_members_are_always_published(queue, kind):
    order = _id()
    _consume(skipping, order)
    SENDS[kind](order, queue)
    assert queue.length() == PUBLISHED[kind]


def test_the_packages_own_reschedules_are_always_published(queue):
    order = _id()
    _consume(skipping, order)
    with republishing():
        skipping.apply_async((order,), queue=queue)
    assert queue.length() == 1


def test_a_failed_lookup_publishes_as_usual_with_a_warning(queue, caplog):
    order = _id()
    settings = {"BACKEND": "redis", "OPTIONS": {"url": "redis://127.0.0.1:1/0"}}
    with (
        override_settings(DEDUP_CELERY=settings),
        caplog.at_level(logging.WARNING, logger="dedup_celery.enqueue"),
    ):
        skipping.apply_async((order,), queue=queue)
    assert queue.length() == 1
    assert "the lookup before publishing failed" in caplog.text


def test_a_failed_lookup_inside_the_callers_transaction_leaves_it_usable(queue):
    order = _id()
    _consume(skipping, order)
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE dedup_celery_deduprecord RENAME TO dedup_gone")
        skipping.apply_async((order,), queue=queue)  # the lookup fails: published
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")  # the caller's transaction still works
            assert cursor.fetchone() == (1,)
        transaction.set_rollback(True)  # and the rename is undone
    assert queue.length() == 1
    assert DedupRecord.objects.filter(key_digest=digest(f"order:{order}")).exists()


def test_a_key_function_that_fails_in_the_producer_says_why():
    @app.task(base=DedupTask, name=f"unit.enqueue.broken.{uuid.uuid4().hex}",
              dedup_key=lambda order: 1 / 0, dedup_on_enqueue="consumed")  # fmt: skip
    def broken(order):
        return order

    with pytest.raises(DedupKeyError, match="also computed in the producer"):
        broken.apply_async((1,), task_id=_id())


def test_a_wrong_value_of_the_option_is_named():
    from dedup_celery.options import option_errors

    class Wrong(DedupTask):
        name = "unit.enqueue.wrong"
        dedup_on_enqueue = "always"

    assert (
        'dedup_on_enqueue is \'always\'; it must be False, "consumed" or "queued"'
        in option_errors(Wrong())
    )

    class Transactional(DedupTask):
        name = "unit.enqueue.transactional"
        dedup_on_enqueue = "queued"
        dedup_transactional = True
        dedup_queue_ttl = 0

    (needs_status, ttl) = option_errors(Transactional())
    assert needs_status.startswith('dedup_on_enqueue="queued" needs status mode')
    assert ttl.startswith("dedup_queue_ttl is 0; it must be None or seconds")


def test_on_commit_sends_return_none_as_celery_does_and_only_skip_the_publish(queue):
    order = _id()
    _consume(skipping, order)
    _consume(control, order)
    with captured(signals.publish_skipped) as seen, transaction.atomic():
        assert skipping.apply_async_on_commit((order,), queue=queue) is None
        assert control.apply_async_on_commit((order,), queue=queue) is None  # the control
        assert seen == []  # nothing happens before the commit
    assert len(seen) == 1
    assert queue.length() == 1  # the control's message only


def _key_of_config(config):
    return f"config:{config}"


@app.task(base=DedupTask, name="unit.enqueue.configured", dedup_key=_key_of_config,
          dedup_on_enqueue="consumed")  # fmt: skip
def configured(config):
    return config


def test_the_producer_keys_the_arguments_as_the_worker_will_see_them(queue):
    # A key built from str() of a tuple: the worker sees a list, so must the producer.
    marker = _id()
    run_as_worker(configured, _id(), [[marker, 1]], {})
    configured.apply_async(((marker, 1),), queue=queue)
    assert queue.length() == 0


def test_a_backend_that_cannot_be_built_publishes_as_usual(queue):
    with override_settings(DEDUP_CELERY={"BACKEND": "no.such.Backend"}):
        skipping.apply_async((_id(),), queue=queue)
    assert queue.length() == 1
