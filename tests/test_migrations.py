"""The migrations as a rolling deploy meets them, on the session's PostgreSQL."""

from __future__ import annotations

import threading
import time

import pytest
from django.core.management import call_command
from django.db import OperationalError, connection, connections

pytestmark = pytest.mark.django_db(transaction=True)


def _columns():
    with connection.cursor() as cursor:
        return {c.name for c in connection.introspection.get_table_description(
            cursor, "dedup_celery_deduprecord")}  # fmt: skip


def test_0006_gives_up_on_a_held_table_lock_instead_of_queueing_every_claim():
    call_command("migrate", "dedup_celery", "0005", verbosity=0)
    try:
        assert "last_duplicate_task_id" not in _columns()
        # A long transactional task: an open transaction that wrote to the message table.
        held, release = threading.Event(), threading.Event()

        def long_transaction():
            other = connections.create_connection("default")
            try:
                other.set_autocommit(False)
                with other.cursor() as cursor:
                    cursor.execute("LOCK TABLE dedup_celery_deduprecord IN ROW EXCLUSIVE MODE")
                held.set()
                release.wait(30)
                other.rollback()
            finally:
                other.close()

        holder = threading.Thread(target=long_transaction)
        holder.start()
        assert held.wait(10)
        started = time.monotonic()
        with pytest.raises(OperationalError, match="lock timeout"):
            call_command("migrate", "dedup_celery", "0006", verbosity=0)
        waited = time.monotonic() - started
        release.set()
        holder.join(10)
        assert 4 <= waited < 20  # the five seconds of LOCK_TIMEOUT, not until the task ends
        assert "last_duplicate_task_id" not in _columns()  # rolled back whole
        call_command("migrate", "dedup_celery", "0006", verbosity=0)  # run again: it lands
        assert "last_duplicate_task_id" in _columns()
    finally:
        call_command("migrate", "dedup_celery", verbosity=0)
