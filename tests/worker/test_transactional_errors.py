"""A database error in a transactional claim, or at its COMMIT, reschedules: a real worker.

The errors are real PostgreSQL errors, raised once by triggers this test puts on
the tables: a ``BEFORE INSERT`` trigger on the message table fails the claim,
and a deferred constraint trigger on the effect table fails the COMMIT. A
sequence makes each fire only the first time (``nextval`` is not rolled back).
The plain control (which has no claim) meets the same kind of error on its own
first write, the effect, and loses its message.
"""

from __future__ import annotations

import pytest
from django.db import connection

from dedup_celery.backends.base import Status
from dedup_celery.models import DedupRecord
from tests.scenario import effects, new_id, record, settle, starts, wait_until
from tests.testapp.models import Effect
from tests.testapp.tasks import (
    plain_deferred_conflict,
    plain_effect,
    tx_deferred_conflict,
    tx_effect,
)

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

FAIL_ONCE = """
CREATE OR REPLACE FUNCTION dedup_test_fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF (to_jsonb(NEW) ->> TG_ARGV[2]) = TG_ARGV[0] AND nextval(TG_ARGV[1]::regclass) = 1 THEN
    RAISE EXCEPTION 'injected failure for %', TG_ARGV[0];
  END IF;
  RETURN NEW;
END $$
"""


@pytest.fixture
def fail_once():
    """Make the first INSERT (or, with ``at_commit``, the first COMMIT) of a row fail."""
    made = []

    def install(table, column, value, *, at_commit=False):
        name = f"dedup_test_{len(made)}_{new_id()[:8]}"
        with connection.cursor() as cursor:
            cursor.execute(FAIL_ONCE)
            cursor.execute(f"CREATE SEQUENCE {name}")
            kind = (
                "CONSTRAINT TRIGGER {n} AFTER INSERT ON {t} DEFERRABLE INITIALLY DEFERRED"
                if at_commit
                else "TRIGGER {n} BEFORE INSERT ON {t}"
            ).format(n=name, t=table)
            cursor.execute(
                f"CREATE {kind} FOR EACH ROW EXECUTE FUNCTION "
                f"dedup_test_fail_once('{value}', '{name}', '{column}')"
            )
        made.append((name, table))
        return name

    yield install
    with connection.cursor() as cursor:
        for name, table in made:
            cursor.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
            cursor.execute(f"DROP SEQUENCE IF EXISTS {name}")


@pytest.fixture(scope="module")
def worker(start_worker):
    return start_worker("tx-errors", concurrency=2)


def fired(name):
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT last_value, is_called FROM {name}")
        last_value, is_called = cursor.fetchone()
    return last_value if is_called else 0


@pytest.mark.parametrize("where", ["claim", "commit"])
def test_a_database_error_in_the_claim_or_at_commit_reschedules(
    worker, fail_once, where, report_scenario
):
    table = DedupRecord._meta.db_table if where == "claim" else Effect._meta.db_table
    tag, task_id = f"tx-{where}-{new_id()[:8]}", new_id()
    column, value = ("task_id", task_id) if where == "claim" else ("tag", tag)
    trigger = fail_once(table, column, value, at_commit=where == "commit")
    plain_tag, plain_id = f"plain-{where}-{new_id()[:8]}", new_id()
    plain_trigger = fail_once(Effect._meta.db_table, "tag", plain_tag, at_commit=where == "commit")

    tx_effect.apply_async(kwargs={"tag": tag, "n": 1}, task_id=task_id, queue=worker.queue)
    plain_effect.apply_async(
        kwargs={"tag": plain_tag, "n": 1}, task_id=plain_id, queue=worker.queue
    )

    def done():
        found = record(tx_effect, task_id)
        return found is not None and found.status == Status.CONSUMED

    wait_until(done, timeout=60, what="the transactional message to commit")
    wait_until(lambda: fired(plain_trigger) >= 1, what="the control to meet the error")
    settle()
    # The control: the same error costs the plain task its message.
    assert effects(plain_tag) == 0
    assert len(starts(plain_tag)) == 1
    log = worker.log_text()
    assert f"Task {plain_effect.name}[{plain_id}] raised unexpected" in log
    assert f"injected failure for {plain_tag}" in log
    # The transactional message met the error once, was rescheduled, and took effect once.
    assert fired(trigger) >= 2, "the error was not met, or the message never came back"
    assert effects(tag) == 1
    expected_runs = 1 if where == "claim" else 2  # a failed COMMIT ran the body first
    assert len(starts(tag)) == expected_runs
    assert f"{tx_effect.name}[{task_id}]: the message store failed during {where}" in log
    assert f"injected failure for {value}" in log
    records = [record(tx_effect, task_id)]
    report_scenario(f"DB error at {where}", "transactional", tag, messages=1, records=records)
    report_scenario(f"DB error at {where}", "plain", plain_tag, messages=1)


def test_a_commit_the_database_refuses_fails_once_instead_of_looping(worker, report_scenario):
    # The body breaks a deferred unique constraint: its COMMIT raises an
    # IntegrityError every time, so a reschedule could only run it again and again.
    tag, task_id = f"tx-refused-{new_id()[:8]}", new_id()
    plain_tag, plain_id = f"plain-refused-{new_id()[:8]}", new_id()
    tx_deferred_conflict.apply_async(
        kwargs={"tag": tag, "n": 1}, task_id=task_id, queue=worker.queue
    )
    plain_deferred_conflict.apply_async(
        kwargs={"tag": plain_tag, "n": 1}, task_id=plain_id, queue=worker.queue
    )
    log_line = f"{tx_deferred_conflict.name}[{task_id}]: the message store refused this message"
    wait_until(lambda: log_line in worker.log_text(), timeout=30, what="the refusal")
    wait_until(lambda: starts(plain_tag), timeout=30, what="the control to run")
    settle(4)  # time for a copy that would run it again (RETRY_COUNTDOWN is 1 s)
    log = worker.log_text()
    # The control: the same COMMIT fails once, and the message is gone with nothing done.
    assert (len(starts(plain_tag)), effects(plain_tag)) == (1, 0)
    assert f"Task {plain_deferred_conflict.name}[{plain_id}] raised unexpected" in log
    # The DedupTask's delivery fails the same way, once, naming the cause.
    assert (len(starts(tag)), effects(tag)) == (1, 0)
    assert "during commit" in log.split(log_line, 1)[1].splitlines()[0]
    assert "IntegrityError" in log.split(log_line, 1)[1].splitlines()[0]
    assert f"{tx_deferred_conflict.name}[{task_id}]: the message store failed" not in log
    assert f"Task {tx_deferred_conflict.name}[{task_id}] raised unexpected" in log
    assert DedupRecord.objects.filter(task_id=task_id).count() == 0
    report_scenario("COMMIT refused", "transactional", tag, messages=1, effect_expected=False)
    report_scenario("COMMIT refused", "plain", plain_tag, messages=1, effect_expected=False)
