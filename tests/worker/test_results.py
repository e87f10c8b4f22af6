"""What duplicates return, with a real worker and django-celery-results as result backend."""

from __future__ import annotations

import datetime

import pytest
from django_celery_results.models import TaskResult

from tests.scenario import new_id, record, wait_until
from tests.testapp.tasks import id_result, order_result

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

BROKER_DB = 2


@pytest.fixture(scope="module")
def worker(start_worker):
    return start_worker("results", broker_db=BROKER_DB, result_backend="django-db")


@pytest.fixture
def publish(redis_url):
    from tests.celery_app import app

    def send(task, task_id, **kwargs):
        with app.connection_for_write(f"{redis_url}/{BROKER_DB}") as connection:
            return task.apply_async(
                kwargs=kwargs, task_id=task_id, queue="q-results", connection=connection
            )

    return send


def test_a_business_key_duplicate_returns_the_original_result(worker, publish):
    order_no = new_id()
    original = publish(order_result, new_id(), order_no=order_no, note="first")
    assert original.get(timeout=30) == {
        "order_no": order_no,
        "note": "first",
        "task_id": original.id,
    }
    duplicate = publish(order_result, new_id(), order_no=order_no, note="second")
    assert duplicate.get(timeout=30) == original.get()
    found = record(order_result, f"order:{order_no}")
    assert found.task_id == original.id
    assert found.skipped == 1


def test_a_same_id_duplicate_leaves_the_original_success_untouched(worker, publish):
    task_id = new_id()
    first = publish(id_result, task_id, value=1)
    assert first.get(timeout=30) == {"value": 1, "task_id": task_id}
    stored = TaskResult.objects.get(task_id=task_id)
    assert stored.status == "SUCCESS"
    publish(id_result, task_id, value=1)
    wait_until(lambda: record(id_result, task_id).skipped == 1, what="the duplicate to be skipped")
    again = TaskResult.objects.get(task_id=task_id)
    assert again.status == "SUCCESS"
    assert again.result == stored.result
    assert again.date_done == stored.date_done
    assert isinstance(again.date_done, datetime.datetime)
