"""Rescheduling, run through Celery's own tracer as a worker runs a task (not eagerly).

The rescheduled copy is published to the real Redis broker and read back from
the queue, so these tests see exactly what a worker would receive.
"""

from __future__ import annotations

import datetime
import logging
import uuid

import pytest
from celery import Celery
from django.test import override_settings

from dedup_celery import DedupTask, signals
from dedup_celery.delivery.outcomes import EXPIRES_HEADER, STORE_RESCHEDULES_HEADER
from dedup_celery.exceptions import StorageError
from dedup_celery.keys import digest
from dedup_celery.models import DedupRecord
from tests.celery_app import app
from tests.helpers import ELSEWHERE, captured, hold, run_as_worker

RUNS: list[str] = []


@app.task(base=DedupTask, name="unit.reschedulable", bind=True, dedup_retry_countdown=3)
def reschedulable(self, value, *, flag=None):
    RUNS.append(self.request.id)
    return value


def read_queue(connection, queue):
    simple = connection.SimpleQueue(queue)
    try:
        message = simple.get(timeout=5)
        message.ack()
        return message
    finally:
        simple.close()


def assert_queue_empty(queue, timeout=1.0):
    """Fail if a message is (or arrives within *timeout*) in *queue* of the test broker."""
    with app.connection_for_read() as connection:
        simple = connection.SimpleQueue(queue)
        try:
            with pytest.raises(simple.Empty):
                simple.get(timeout=timeout)
        finally:
            simple.close()


@pytest.fixture(autouse=True)
def _clear_runs():
    RUNS.clear()


@pytest.mark.django_db(transaction=True)
def test_in_flight_duplicate_is_republished_with_the_same_id_and_retries(celery_broker):
    task_id = str(uuid.uuid4())
    hold(reschedulable, task_id, identity=ELSEWHERE)
    before = datetime.datetime.now(datetime.timezone.utc)
    with captured(signals.duplicate_rescheduled) as seen:
        trace = run_as_worker(reschedulable, task_id, [7], {"flag": "x"}, retries=2)
    assert trace.info.state == "IGNORED"
    assert RUNS == []
    with app.connection_for_read() as connection:
        message = read_queue(connection, "q-unit-reschedule")
    headers = message.headers
    assert headers["id"] == task_id
    assert headers["task"] == "unit.reschedulable"
    assert headers["retries"] == 2
    eta = datetime.datetime.fromisoformat(headers["eta"])
    assert 2.5 <= (eta - before).total_seconds() <= 10
    args, kwargs, _embed = message.decode()
    assert (args, kwargs) == ([7], {"flag": "x"})
    record = DedupRecord.objects.get(key_digest=digest(task_id))
    assert record.rescheduled == 1
    assert seen[0]["countdown"] == 3


@pytest.fixture
def unreachable_database(unreachable_database):
    """The message table on the unreachable alias."""
    with override_settings(DEDUP_CELERY={"DATABASE": unreachable_database, "RETRY_COUNTDOWN": 1}):
        yield unreachable_database


@pytest.fixture
def unreachable_redis():
    """The redis backend pointed at a port where nothing listens."""
    with override_settings(
        DEDUP_CELERY={
            "BACKEND": "redis",
            "OPTIONS": {"url": "redis://127.0.0.1:1/0"},
            "RETRY_COUNTDOWN": 1,
        }
    ):
        yield


@pytest.mark.parametrize("unreachable_store", ["unreachable_database", "unreachable_redis"])
def test_storage_failure_during_the_claim_reschedules_without_running_the_body(
    request, unreachable_store, celery_broker, caplog
):
    request.getfixturevalue(unreachable_store)
    task_id = str(uuid.uuid4())
    trace = run_as_worker(reschedulable, task_id, [1], {}, queue="q-unit-storage")
    assert trace.info.state == "IGNORED"
    assert RUNS == []
    assert "the message store failed during claim" in caplog.text
    with app.connection_for_read() as connection:
        message = read_queue(connection, "q-unit-storage")
    assert message.headers["id"] == task_id
    assert message.headers["retries"] == 0


def test_a_reschedule_that_cannot_be_published_requeues_the_message(unreachable_database):
    unreachable_broker = Celery("unreachable", set_as_current=False)
    unreachable_broker.conf.update(
        broker_url="redis://127.0.0.1:1/0",
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.1,
            "interval_max": 0.1,
        },
        broker_connection_timeout=1,
    )

    @unreachable_broker.task(shared=False, base=DedupTask, name="unit.unpublishable")
    def unpublishable():
        RUNS.append("ran")

    trace = run_as_worker(unpublishable, str(uuid.uuid4()), [], {})
    assert trace.info.state == "REJECTED"
    assert trace.info.retval.requeue is True
    assert RUNS == []


@pytest.fixture
def database_without_the_table(extra_database, tmp_path):
    """A real SQLite database on which the migrations were never run."""
    alias = extra_database("unmigrated", base="sqlite", NAME=str(tmp_path / "unmigrated.sqlite3"))
    with override_settings(DEDUP_CELERY={"DATABASE": alias, "RETRY_COUNTDOWN": 1}):
        yield alias


def test_a_missing_table_is_an_error_that_names_migrate_and_loses_nothing(
    database_without_the_table, celery_broker, caplog
):
    from dedup_celery.checks import log_check_messages

    task_id = str(uuid.uuid4())
    trace = run_as_worker(reschedulable, task_id, [1], {}, queue="q-unit-unmigrated")
    assert trace.info.state == "IGNORED"
    assert RUNS == []
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert any("manage.py migrate dedup_celery" in r.getMessage() for r in errors)
    with app.connection_for_read() as connection:
        assert read_queue(connection, "q-unit-unmigrated").headers["id"] == task_id
    caplog.clear()
    log_check_messages(sender=None)
    assert "the message table does not exist" in caplog.text


@pytest.mark.django_db(transaction=True)  # the FAILURE is stored in the result backend
def test_store_reschedules_are_counted_on_the_copy_and_bounded(celery_broker, caplog):
    # The store stays down: each copy counts one more reschedule in its header,
    # keeps the producer's own headers, and the one past the bound fails loudly.
    task_id = str(uuid.uuid4())
    headers = {"x-tenant": "acme"}
    settings = {
        "BACKEND": "redis",
        "OPTIONS": {"url": "redis://127.0.0.1:1/0"},
        "RETRY_COUNTDOWN": 1,
        "MAX_STORE_RESCHEDULES": 3,
    }
    with override_settings(DEDUP_CELERY=settings):
        for spent in range(3):
            trace = run_as_worker(
                reschedulable, task_id, [1], {}, queue="q-unit-bound", headers=headers
            )
            assert trace.info.state == "IGNORED"
            with app.connection_for_read() as connection:
                headers = read_queue(connection, "q-unit-bound").headers
            assert headers[STORE_RESCHEDULES_HEADER] == spent + 1
            assert (headers["id"], headers["x-tenant"]) == (task_id, "acme")
        caplog.clear()
        trace = run_as_worker(
            reschedulable, task_id, [1], {}, queue="q-unit-bound", headers=headers
        )
    assert trace.info.state == "FAILURE"
    error = trace.info.retval
    assert isinstance(error, StorageError)
    assert "rescheduled 3 times for store failures (MAX_STORE_RESCHEDULES=3)" in str(error)
    assert any(
        r.levelname == "ERROR" and "MAX_STORE_RESCHEDULES=3" in r.getMessage()
        for r in caplog.records
    )
    assert RUNS == []
    with app.connection_for_read() as connection:
        simple = connection.SimpleQueue("q-unit-bound")
        try:
            with pytest.raises(simple.Empty):
                simple.get(timeout=2)  # a copy published past the bound would be here
        finally:
            simple.close()


@app.task(base=DedupTask, name="unit.default_countdown", bind=True)
def default_countdown(self, value):
    RUNS.append(self.request.id)
    return value


@pytest.mark.parametrize(
    ("broken", "countdown"),
    [
        ({"BACKEND": "no.such.Backend", "RETRY_COUNTDOWN": 2}, 2),  # settings still parse
        ({"RETRY_COUNTDOWN": 0}, 5),  # they do not: the default countdown
        ({"BACKEND": "redis", "OPTIONS": {"url": "redis://127.0.0.1:1/0"}}, 5),  # E008
    ],
)
def test_a_configuration_that_breaks_under_a_running_worker_reschedules(
    celery_broker, caplog, broken, countdown
):
    # The worker started with a good configuration; then it breaks (here through
    # override_settings, which drops the cached settings as a change would).
    task = tx_default_countdown if "OPTIONS" in broken else default_countdown
    task_id = str(uuid.uuid4())
    before = datetime.datetime.now(datetime.timezone.utc)
    with override_settings(DEDUP_CELERY=broken):
        trace = run_as_worker(task, task_id, [1], {}, queue="q-unit-misconfigured")
    assert trace.info.state == "IGNORED"  # not FAILURE: the message is not acked away
    assert RUNS == []
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("the dedup configuration is broken" in line for line in errors)
    with app.connection_for_read() as connection:
        headers = read_queue(connection, "q-unit-misconfigured").headers
    assert (headers["id"], headers["retries"]) == (task_id, 0)
    delay = (datetime.datetime.fromisoformat(headers["eta"]) - before).total_seconds()
    assert countdown - 0.5 <= delay <= countdown + 5


@app.task(base=DedupTask, name="unit.tx_default_countdown", bind=True, dedup_transactional=True)
def tx_default_countdown(self, value):
    RUNS.append(self.request.id)
    return value


@pytest.mark.django_db(transaction=True)
def test_a_rescheduled_copy_carries_its_messages_expires_in_a_header_not_the_broker(
    celery_broker,
):
    task_id = str(uuid.uuid4())
    hold(reschedulable, task_id, identity=ELSEWHERE)
    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=60)
    trace = run_as_worker(reschedulable, task_id, [7], {}, expires=expires.isoformat())
    assert trace.info.state == "IGNORED"
    with app.connection_for_read() as connection:
        headers = read_queue(connection, "q-unit-reschedule").headers
    # A broker expires would have the worker revoke a late copy: REVOKED over the
    # original's result, a chord part counted, the id in the revoked set.
    assert headers["expires"] is None
    assert datetime.datetime.fromisoformat(headers[EXPIRES_HEADER]) == expires
    # A copy of that copy keeps the original deadline.
    trace = run_as_worker(reschedulable, task_id, [7], {}, headers={EXPIRES_HEADER: "kept"})
    with app.connection_for_read() as connection:
        assert read_queue(connection, "q-unit-reschedule").headers[EXPIRES_HEADER] == "kept"


@pytest.mark.django_db(transaction=True)
def test_a_copy_past_its_messages_expires_is_skipped_without_a_state_write(celery_broker, caplog):
    task_id = str(uuid.uuid4())
    hold(reschedulable, task_id, identity=ELSEWHERE)
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    with (
        captured(signals.duplicate_skipped) as seen,
        caplog.at_level(logging.INFO, logger="dedup_celery.task"),
    ):
        trace = run_as_worker(
            reschedulable, task_id, [7], {}, headers={EXPIRES_HEADER: past.isoformat()}
        )
    assert trace.info.state == "IGNORED"
    assert RUNS == []
    assert [event["reason"] for event in seen] == ["expired"]
    assert "arrived after its message's expires" in caplog.text
    # Not claimed, not counted as a reschedule: the store was never asked.
    assert DedupRecord.objects.get(key_digest=digest(task_id)).rescheduled == 0
    assert_queue_empty("q-unit-reschedule")
