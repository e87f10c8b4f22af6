"""Duplicates that show outside the package, seen as an operator's tools see them.

A real prefork worker started with ``-E``, a real Redis broker, a real events
receiver (the one Flower builds on: ``app.events.Receiver`` feeding Celery's
event ``State``), and django-celery-results as the result backend. The
control is Celery's own view of the same duplicate: its ``task-succeeded``
event and its result are those of a real run, so without the package's traces
nobody could tell the two apart.
"""

from __future__ import annotations

import ast
import json
import threading
import uuid

import pytest
from django_celery_results.models import TaskResult

from dedup_celery.keys import digest
from tests.scenario import new_id, record, wait_until
from tests.testapp.tasks import id_result, order_result

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

BROKER_DB = 12


@pytest.fixture(scope="module")
def worker(start_worker):
    return start_worker("seen", broker_db=BROKER_DB, result_backend="django-db", args=("-E",))


@pytest.fixture(scope="module")
def quiet_worker(start_worker):
    """The same worker without task events: it must send none of its own either."""
    return start_worker("unseen", broker_db=BROKER_DB, result_backend="django-db")


@pytest.fixture(scope="module")
def broker_url(redis_url):
    return f"{redis_url}/{BROKER_DB}"


@pytest.fixture(scope="module")
def events(broker_url):
    """Every event on the broker from now on, as a list that grows while the tests run."""
    from tests.celery_app import app

    seen: list[dict] = []
    probe = f"probe-{uuid.uuid4()}"
    connection = app.connection_for_read(broker_url)
    receiver = app.events.Receiver(connection, handlers={"*": seen.append})
    listener = threading.Thread(
        target=receiver.capture, kwargs={"limit": None, "wakeup": False}, daemon=True
    )
    listener.start()

    def probed():
        # The receiver subscribes inside capture(): send until it hears one.
        with (
            app.connection_for_write(broker_url) as sending,
            app.events.Dispatcher(sending, hostname="probe@test") as dispatcher,
        ):
            dispatcher.send("worker-probe", probe=probe)
        return any(event.get("probe") == probe for event in seen)

    wait_until(probed, timeout=30, what="the events receiver to listen")
    yield seen
    receiver.should_stop = True
    listener.join(10)
    connection.release()


@pytest.fixture
def publish(broker_url):
    from tests.celery_app import app

    def send(task, task_id, queue, **kwargs):
        with app.connection_for_write(broker_url) as connection:
            return task.apply_async(
                kwargs=kwargs, task_id=task_id, queue=queue, connection=connection
            )

    return send


def of(events, task_id, kind=None):
    return [e for e in events if e.get("uuid") == task_id and kind in (None, e["type"])]


def test_a_business_key_duplicate_shows_in_its_event_its_result_row_and_the_record(
    worker, events, publish
):
    from tests.celery_app import app

    order_no = new_id()
    original = publish(order_result, new_id(), "q-seen", order_no=order_no, note="first")
    expected = original.get(timeout=30)
    duplicate = publish(order_result, new_id(), "q-seen", order_no=order_no, note="second")
    assert duplicate.get(timeout=30) == expected
    wait_until(lambda: of(events, duplicate.id, "task-succeeded"), what="the duplicate's events")
    wait_until(lambda: of(events, duplicate.id, "task-deduplicated"), what="task-deduplicated")

    # The control: Celery's own events tell a real run and the duplicate apart in nothing.
    (real,) = of(events, original.id, "task-succeeded")
    (copy,) = of(events, duplicate.id, "task-succeeded")
    assert ast.literal_eval(copy["result"]) == ast.literal_eval(real["result"]) == expected
    assert of(events, original.id, "task-deduplicated") == []

    (seen,) = of(events, duplicate.id, "task-deduplicated")
    assert seen["dedup_original_id"] == original.id
    assert seen["dedup_verdict"] == "consumed"
    assert seen["dedup_scope"] == order_result.name
    assert seen["dedup_key_digest"] == digest(f"order:{order_no}")
    assert seen["hostname"].startswith("seen@")
    # Only namespaced fields of its own: nothing that would overwrite the task's state.
    assert not {"result", "state", "exception", "runtime"} & set(seen)

    # What Flower shows: Celery's event state, fed every event in arrival order.
    state = app.events.State()
    for event in list(events):
        state.event(event)
    shown = state.tasks[duplicate.id]
    assert shown.state == "SUCCESS"
    assert shown.result == copy["result"]  # the dedup fields were merged, nothing overwritten
    assert shown.dedup_original_id == original.id
    assert shown.dedup_verdict == "consumed"
    assert not hasattr(state.tasks[original.id], "dedup_original_id")

    # django-celery-results: the duplicate's own row carries the verdict, merged into its meta.
    row = TaskResult.objects.get(task_id=duplicate.id)
    assert row.status == "SUCCESS"
    meta = json.loads(row.meta)
    assert meta["dedup_original_id"] == original.id
    assert meta["dedup_verdict"] == "consumed"
    assert "children" in meta  # the backend's own key is still there: merged, not replaced
    original_row = TaskResult.objects.get(task_id=original.id)
    assert "dedup_original_id" not in (original_row.meta or "")

    # The record links to both runs.
    found = record(order_result, f"order:{order_no}")
    assert (found.task_id, found.last_duplicate_task_id) == (original.id, duplicate.id)


def test_a_same_id_redelivery_adds_nothing_to_the_originals_row_or_events(worker, events, publish):
    task_id = new_id()
    assert publish(id_result, task_id, "q-seen", value=1).get(timeout=30)["value"] == 1
    before = TaskResult.objects.get(task_id=task_id)
    publish(id_result, task_id, "q-seen", value=1)
    wait_until(lambda: record(id_result, task_id).skipped == 1, what="the copy to be skipped")
    wait_until(lambda: len(of(events, task_id, "task-received")) == 2, what="the copy's events")
    assert of(events, task_id, "task-deduplicated") == []
    after = TaskResult.objects.get(task_id=task_id)
    assert (after.meta, after.date_done) == (before.meta, before.date_done)
    assert record(id_result, task_id).last_duplicate_task_id == task_id


def test_without_task_events_the_worker_sends_none_but_the_row_still_shows_it(
    quiet_worker, events, publish
):
    order_no = new_id()
    original = publish(order_result, new_id(), "q-unseen", order_no=order_no)
    original.get(timeout=30)
    duplicate = publish(order_result, new_id(), "q-unseen", order_no=order_no)
    duplicate.get(timeout=30)
    row = TaskResult.objects.get(task_id=duplicate.id)
    assert "dedup_original_id" in row.meta
    assert of(events, duplicate.id) == []
