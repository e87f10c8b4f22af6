"""A duplicate's traces outside the package, run through Celery's tracer as a worker runs it.

The worker-level test (tests/worker/test_visible_duplicates.py) sees the event
and the result row from a real worker; these pin what that test cannot stage:
a meta set before dedup ran, an event that cannot be sent, events turned off.
"""

from __future__ import annotations

import json
import logging
import uuid

import pytest
from django_celery_results.models import TaskResult

from dedup_celery import DedupTask
from dedup_celery.delivery import visibility
from tests.celery_app import app
from tests.helpers import ELSEWHERE, hold, run_as_worker


@app.task(base=DedupTask, name="unit.announced", bind=True, dedup_key=lambda n: f"n:{n}")
def announced(self, n):
    return {"n": n, "task_id": self.request.id}


@pytest.fixture
def sent(monkeypatch):
    """The events ``announced`` sends, as (type, fields); the worker sends task events."""
    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(visibility, "_worker_task_events", True)
    monkeypatch.setattr(announced, "send_event", lambda kind, **f: calls.append((kind, f)))
    return calls


def _run(task_id, n, **headers):
    return run_as_worker(announced, task_id, [n], {}, headers=headers or None)


@pytest.mark.django_db(transaction=True)
def test_the_meta_is_merged_into_and_the_event_sent_with_retry_off(sent):
    n, original, duplicate = uuid.uuid4().hex, str(uuid.uuid4()), str(uuid.uuid4())
    first = _run(original, n)
    assert first.retval == {"n": n, "task_id": original}
    assert sent == []
    again = _run(duplicate, n, meta={"tenant": "acme"})
    assert again.retval == first.retval
    ((kind, fields),) = sent
    assert kind == "task-deduplicated"
    assert fields["retry"] is False
    assert (fields["dedup_original_id"], fields["dedup_verdict"]) == (original, "consumed")
    meta = json.loads(TaskResult.objects.get(task_id=duplicate).meta)
    # The meta someone set before is kept: merged into, never replaced.
    assert meta["tenant"] == "acme"
    assert (meta["dedup_original_id"], meta["dedup_verdict"]) == (original, "consumed")


@pytest.mark.django_db(transaction=True)
def test_an_event_that_cannot_be_sent_changes_nothing_but_a_warning(monkeypatch, caplog):
    def broker_down(kind, **fields):
        raise ConnectionError("the broker is down")

    monkeypatch.setattr(visibility, "_worker_task_events", True)
    monkeypatch.setattr(announced, "send_event", broker_down)
    n, original, duplicate = uuid.uuid4().hex, str(uuid.uuid4()), str(uuid.uuid4())
    expected = _run(original, n).retval
    with caplog.at_level(logging.WARNING, logger="dedup_celery.task"):
        trace = _run(duplicate, n)
    assert trace.retval == expected
    assert "could not send the task-deduplicated event (the broker is down)" in caplog.text
    assert "dedup_original_id" in TaskResult.objects.get(task_id=duplicate).meta


@pytest.mark.django_db(transaction=True)
def test_no_event_without_task_events_or_for_a_task_that_sends_none(sent, monkeypatch):
    n = uuid.uuid4().hex
    _run(str(uuid.uuid4()), n)
    monkeypatch.setattr(visibility, "_worker_task_events", False)
    _run(str(uuid.uuid4()), n)
    monkeypatch.setattr(visibility, "_worker_task_events", True)
    monkeypatch.setattr(announced, "send_events", False)
    _run(str(uuid.uuid4()), n)
    assert sent == []
    monkeypatch.setattr(announced, "send_events", True)
    _run(str(uuid.uuid4()), n)
    assert len(sent) == 1


@pytest.mark.django_db(transaction=True)
def test_a_copy_rescheduled_behind_another_task_id_says_in_flight(sent, celery_broker):
    n = uuid.uuid4().hex
    holder = hold(announced, f"n:{n}", task_id=str(uuid.uuid4()), identity=ELSEWHERE)
    trace = run_as_worker(announced, str(uuid.uuid4()), [n], {}, queue="q-unit-announce")
    assert trace.info.state == "IGNORED"
    ((kind, fields),) = sent
    assert kind == "task-deduplicated"
    assert (fields["dedup_original_id"], fields["dedup_verdict"]) == (holder.task_id, "in_flight")
    with app.connection_for_read() as connection:
        connection.SimpleQueue("q-unit-announce").clear()


@pytest.mark.django_db(transaction=True)
def test_a_rescheduled_copy_carries_its_message_meta_as_it_came(sent, celery_broker):
    # The holder's body may still fail; the copy then runs the body itself, and its row
    # must not say it was a duplicate.
    n = uuid.uuid4().hex
    hold(announced, f"n:{n}", task_id=str(uuid.uuid4()), identity=ELSEWHERE)
    copy_id = str(uuid.uuid4())
    headers = {"meta": {"tenant": "acme"}}
    run_as_worker(announced, copy_id, [n], {}, queue="q-unit-announce-meta", headers=headers)
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue("q-unit-announce-meta")
        message = queue.get(timeout=5)
        message.ack()
        queue.close()
    assert message.headers["id"] == copy_id
    assert message.headers["meta"] == {"tenant": "acme"}
    assert headers["meta"] == {"tenant": "acme"}
