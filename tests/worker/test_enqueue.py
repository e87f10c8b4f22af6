"""``dedup_on_enqueue = "consumed"`` with a real prefork worker and a real Redis broker.

The original runs; then the same order is sent again and again. The worker's
own log counts the messages it received. The control is the same task without
the option, on the same worker: every copy reaches the queue and takes a
worker slot before the consume side skips it.
"""

from __future__ import annotations

import pytest

from tests.scenario import effect_ns, new_id, record, wait_until
from tests.testapp.tasks import enqueued_order, priced_order, queued_order, slow_enqueued_order

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

BROKER_DB = 14
COPIES = 10


@pytest.fixture(scope="module")
def worker(start_worker):
    return start_worker("enqueue", broker_db=BROKER_DB, result_backend="django-db")


def _sends(task, order_no):
    from tests.celery_app import app

    broker = f"{app.conf.broker_url.rsplit('/', 1)[0]}/{BROKER_DB}"
    with app.connection_for_write(broker) as connection:

        def send():
            return task.apply_async((order_no, 1), queue="q-enqueue", connection=connection)

        original = send()
        expected = original.get(timeout=30)
        copies = [send() for _ in range(COPIES)]
    return original, expected, copies


def _received_ids(worker, task):
    lines = [line for line in worker.log_text().splitlines() if f"Task {task.name}[" in line]
    return {
        line.split(f"Task {task.name}[", 1)[1].split("]", 1)[0]
        for line in lines
        if "received" in line
    }


@pytest.mark.parametrize("task", [enqueued_order, priced_order], ids=["option", "control"])
def test_copies_of_a_consumed_message_reach_the_queue_only_without_the_option(worker, task):
    order_no = new_id()
    original, expected, copies = _sends(task, order_no)
    answers = [copy.get(timeout=30) for copy in copies]
    assert answers == [expected] * COPIES  # the caller cannot tell the difference
    tag = "enqueued" if task is enqueued_order else "priced"
    assert effect_ns(f"{tag}:{order_no}") == [1]
    sent_ids = {original.id} | {copy.id for copy in copies}
    stored = record(task, f"priced:{order_no}")
    if task is enqueued_order:
        assert {copy.id for copy in copies} == {original.id}
        wait_until(lambda: original.id in _received_ids(worker, task), what="the original")
        assert _received_ids(worker, task) & sent_ids == {original.id}  # 1 message, not 11
        assert stored.skipped == 0
    else:
        wait_until(lambda: _received_ids(worker, task) & sent_ids == sent_ids, what="every copy")
        assert stored.skipped == COPIES  # each copy took a worker slot to be skipped


@pytest.mark.parametrize(
    "task", [queued_order, slow_enqueued_order], ids=["queued", "control-consumed"]
)
def test_sends_at_once_reach_the_worker_once_only_with_queued(worker, task):
    from tests.celery_app import app

    order_no = new_id()
    broker = f"{app.conf.broker_url.rsplit('/', 1)[0]}/{BROKER_DB}"
    with app.connection_for_write(broker) as connection:
        sends = [
            task.apply_async((order_no, 1), queue="q-enqueue", connection=connection)
            for _ in range(COPIES)
        ]
    answers = [send.get(timeout=60) for send in sends]
    assert answers == [{"order_no": order_no, "qty": 1}] * COPIES
    tag = "queued" if task is queued_order else "slow"
    assert effect_ns(f"{tag}:{order_no}") == [1]
    ids = {send.id for send in sends}
    if task is queued_order:
        assert len(ids) == 1
        wait_until(lambda: ids <= _received_ids(worker, task), what="the one message")
        assert _received_ids(worker, task) & ids == ids  # 1 message published, not 10
    else:
        # The first copy runs for a second: every send meanwhile is published.
        assert len(ids) == COPIES
        wait_until(lambda: ids <= _received_ids(worker, task), what="every copy")
