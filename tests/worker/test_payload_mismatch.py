"""Same key, other arguments, with a real prefork worker and a real Redis broker.

Each test sends one message, waits for it, then a storm of copies under their
own task ids at once: half with the original's arguments, half with others.
The control is a task with ``dedup_payload_mismatch = "ignore"``, which is
how every DedupTask behaved before the fingerprint: the copies with other
arguments are answered with the original's result, and nothing anywhere says
that their arguments were never used.
"""

from __future__ import annotations

import re

import pytest

from tests.scenario import effect_ns, new_id, record
from tests.testapp.tasks import priced_order, strict_order, unchecked_order

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

BROKER_DB = 13
SAME, OTHER = 5, 5


@pytest.fixture(scope="module")
def worker(start_worker):
    return start_worker("mismatch", broker_db=BROKER_DB, result_backend="django-db")


def _storm(task, order_no):
    """The original, then SAME copies with its arguments and OTHER with other ones, at once."""
    from tests.celery_app import app

    broker = f"{app.conf.broker_url.rsplit('/', 1)[0]}/{BROKER_DB}"
    with app.connection_for_write(broker) as connection:

        def send(qty):
            return task.apply_async((order_no, qty), queue="q-mismatch", connection=connection)

        original = send(1)
        expected = original.get(timeout=30)
        copies = [send(1) for _ in range(SAME)] + [send(qty) for qty in range(2, 2 + OTHER)]
    return original, expected, copies


def _mismatch_lines(worker, task_id):
    return [
        line
        for line in worker.log_text().splitlines()
        if "payload mismatch" in line and f"task id {task_id}," in line
    ]


def test_warn_copies_with_other_arguments_are_answered_and_each_is_reported(worker):
    order_no = new_id()
    original, expected, copies = _storm(priced_order, order_no)
    assert [c.get(timeout=30) for c in copies] == [expected] * (SAME + OTHER)
    assert effect_ns(f"priced:{order_no}") == [1]  # one effect
    stored = record(priced_order, f"priced:{order_no}")
    assert (stored.skipped, stored.payload_mismatches) == (SAME + OTHER, OTHER)
    lines = _mismatch_lines(worker, original.id)
    assert len(lines) == OTHER
    reported = {re.search(r"\[([0-9a-f-]{36})\]: payload mismatch", line)[1] for line in lines}
    assert reported == {c.id for c in copies[SAME:]}


def test_raise_copies_with_other_arguments_fail_and_the_rest_are_answered(worker):
    order_no = new_id()
    original, expected, copies = _storm(strict_order, order_no)
    for copy in copies[:SAME]:
        assert copy.get(timeout=30) == expected
    for copy in copies[SAME:]:
        copy.get(timeout=30, propagate=False)
        assert copy.state == "FAILURE"
        assert type(copy.result).__name__ == "PayloadMismatchError"
        assert original.id in str(copy.result)
    assert original.state == "SUCCESS"
    assert effect_ns(f"strict:{order_no}") == [1]
    assert record(strict_order, f"priced:{order_no}").payload_mismatches == OTHER


def test_control_without_the_check_other_arguments_are_answered_without_a_trace(worker):
    order_no = new_id()
    original, expected, copies = _storm(unchecked_order, order_no)
    assert expected == {"order_no": order_no, "qty": 1}
    answers = [c.get(timeout=30) for c in copies]
    # The damage: a caller that asked for qty 2..6 is told qty 1 was done, silently.
    assert answers[SAME:] == [expected] * OTHER
    assert effect_ns(f"unchecked:{order_no}") == [1]
    assert record(unchecked_order, f"priced:{order_no}").payload_mismatches == 0
    assert _mismatch_lines(worker, original.id) == []
