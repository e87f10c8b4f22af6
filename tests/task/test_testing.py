"""dedup_celery.testing, the helper users' own suites deliver duplicates with.

Each test uses the helper as a user would, on tasks of its own, and counts the
effects in the database itself. The controls are the same bodies without
dedup: the helper must show them doing the damage.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
from celery import shared_task

from dedup_celery import DedupTask
from dedup_celery.testing import deliver, deliver_at_once
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)

OVERLAP: dict[str, list[tuple[float, float]]] = {}
_overlap_lock = threading.Lock()


def effect(tag, n, task_id, pause=0.0):
    """Write one effect row and note how long the body ran, to tell overlapping copies.

    The dedup tasks' bodies are instant: their copies overlap only because the
    helper holds the first claim, which is what it promises.
    """
    start = time.monotonic()
    Effect.objects.create(tag=tag, n=n, task_id=task_id, pid=os.getpid())
    time.sleep(pause)
    with _overlap_lock:
        OVERLAP.setdefault(tag, []).append((start, time.monotonic()))
    return {"tag": tag, "task_id": task_id}


def overlapped(tag):
    (_first_start, first_end), (second_start, _second_end) = sorted(OVERLAP[tag])[:2]
    return second_start < first_end


@shared_task(bind=True, base=DedupTask, name="unit.testing.by_id")
def by_id(self, tag):
    return effect(tag, 1, self.request.id)


@shared_task(bind=True, base=DedupTask, name="unit.testing.by_key", dedup_key=lambda tag: tag)
def by_key(self, tag):
    return effect(tag, 1, self.request.id)


@shared_task(bind=True, base=DedupTask, name="unit.testing.tx", dedup_transactional=True)
def transactional(self, tag):
    return effect(tag, 1, self.request.id)


@shared_task(bind=True, name="unit.testing.plain", acks_late=True)
def plain(self, tag):
    return effect(tag, 1, self.request.id, pause=0.3)


def effects(tag):
    return Effect.objects.filter(tag=tag).count()


def test_a_redelivered_message_runs_once_and_the_plain_control_twice():
    tag = uuid.uuid4().hex
    copies = deliver(by_id, args=(tag,))
    assert copies.outcomes == ["ran", "skipped"]
    assert copies.body_runs == 1
    assert effects(tag) == 1
    assert copies[0].task_id == copies[1].task_id
    control = uuid.uuid4().hex
    deliver(plain, args=(control,))
    assert effects(control) == 2  # the helper really delivers twice


def test_a_business_key_sent_twice_under_new_ids_returns_the_first_result():
    tag = uuid.uuid4().hex
    copies = deliver(by_key, args=(tag,), same_id=False, copies=3)
    assert copies.outcomes == ["ran", "skipped", "skipped"]
    assert len({copy.task_id for copy in copies}) == 3
    assert [copy.result for copy in copies] == [copies[0].result] * 3
    assert effects(tag) == 1


@pytest.mark.parametrize("task", [by_id, transactional], ids=["status", "transactional"])
def test_copies_at_once_run_the_body_once_and_the_plain_control_overlaps(task):
    tag = uuid.uuid4().hex
    copies = deliver_at_once(task, args=(tag,), copies=3)
    assert copies.body_runs == 1
    assert effects(tag) == 1
    # The others met the running copy, were rescheduled, then skipped once it was done.
    first_round = [copy.outcome for copy in copies if not copy.redelivery]
    assert sorted(first_round) == ["ran", "rescheduled", "rescheduled"]
    assert [copy.outcome for copy in copies if copy.redelivery] == ["skipped", "skipped"]
    control = uuid.uuid4().hex
    deliver_at_once(plain, args=(control,))
    assert effects(control) == 2
    assert overlapped(control)  # the copies really ran at the same moment


def test_the_helper_publishes_nothing_and_restores_the_broker_path():
    from dedup_celery.delivery import outcomes

    before = outcomes.send_copy
    deliver_at_once(by_id, args=(uuid.uuid4().hex,))
    assert outcomes.send_copy is before
    with pytest.raises(ValueError, match="copies must be 1 or more"):
        deliver(by_id, args=("x",), copies=0)


def _other_sessions():
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def test_the_helper_leaves_no_database_session_behind():
    # A user's suite has no fixture closing the backend's kept connection: the helper does.
    before = _other_sessions()
    deliver(by_id, args=(uuid.uuid4().hex,))
    deliver_at_once(by_id, args=(uuid.uuid4().hex,))
    assert _other_sessions() == before


@shared_task(bind=True, base=DedupTask, name="unit.testing.slow")
def slow(self, tag):
    time.sleep(1.0)
    return effect(tag, 1, self.request.id)


def test_a_body_longer_than_the_hold_still_counts_once_and_one_copy_is_not_held():
    tag = uuid.uuid4().hex
    copies = deliver_at_once(slow, args=(tag,), timeout=0.2)
    assert copies.body_runs == 1
    assert effects(tag) == 1
    assert copies.outcomes.count("ran") == 1
    started = time.monotonic()
    alone = deliver_at_once(by_id, args=(uuid.uuid4().hex,), copies=1, timeout=30)
    assert alone.outcomes == ["ran"]
    assert time.monotonic() - started < 10  # not held for the 30 s: nobody else to wait for


@pytest.mark.django_db(transaction=True, databases=["default", "mysql"])
def test_transactional_copies_at_once_on_mariadb_wait_for_the_lock_and_skip(settings):
    settings.DEDUP_CELERY = {"DATABASE": "mysql", "RETRY_COUNTDOWN": 1}
    tag = uuid.uuid4().hex
    started = time.monotonic()
    copies = deliver_at_once(transactional_mysql, args=(tag,), copies=3, timeout=30)
    assert copies.body_runs == 1
    assert Effect.objects.using("mysql").filter(tag=tag).count() == 1
    assert time.monotonic() - started < 10  # held one second, not the 30 s


@shared_task(bind=True, base=DedupTask, name="unit.testing.tx_mysql", dedup_transactional=True)
def transactional_mysql(self, tag):
    Effect.objects.using("mysql").create(tag=tag, n=1, task_id=self.request.id, pid=os.getpid())
    return tag
