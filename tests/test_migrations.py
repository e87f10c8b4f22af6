"""The migrations as a rolling deploy meets them, on the session's PostgreSQL."""

from __future__ import annotations

import io
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


@pytest.mark.parametrize(
    ("before", "migration", "column"),
    [("0005", "0006", "last_duplicate_task_id"), ("0006", "0007", "payload_mismatches")],
)
def test_an_added_column_gives_up_on_a_held_table_lock_instead_of_queueing_every_claim(
    before, migration, column
):
    call_command("migrate", "dedup_celery", before, verbosity=0)
    try:
        assert column not in _columns()
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
            call_command("migrate", "dedup_celery", migration, verbosity=0)
        waited = time.monotonic() - started
        release.set()
        holder.join(10)
        assert 4 <= waited < 20  # the five seconds of LOCK_TIMEOUT, not until the task ends
        assert column not in _columns()  # rolled back whole
        call_command("migrate", "dedup_celery", migration, verbosity=0)  # run again: it lands
        assert column in _columns()
    finally:
        call_command("migrate", "dedup_celery", verbosity=0)


@pytest.mark.django_db(transaction=True, databases=["default", "mysql"])
@pytest.mark.parametrize("alias", ["default", "mysql"])
def test_payload_mismatches_has_a_database_default_for_the_previous_releases_inserts(alias):
    # Workers of the previous release insert rows without the column.
    schema = "DATABASE()" if connections[alias].vendor == "mysql" else "current_schema()"
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "SELECT column_default FROM information_schema.columns WHERE table_name = "
            "'dedup_celery_deduprecord' AND column_name = 'payload_mismatches' "
            f"AND table_schema = {schema}"
        )
        ((default,),) = cursor.fetchall()
    assert str(default).strip("'()") == "0"


@pytest.mark.django_db(transaction=True, databases=["default", "mysql"])
@pytest.mark.parametrize("alias", ["default", "mysql"])
def test_0007_adds_a_column_without_a_check_that_would_scan_or_copy_the_table(alias):
    out = io.StringIO()
    call_command("sqlmigrate", "dedup_celery", "0007", database=alias, stdout=out)
    statements = out.getvalue()
    assert "ADD COLUMN" in statements.upper()
    assert "CHECK" not in statements.upper()


@pytest.mark.django_db(transaction=True, databases=["default", "mysql"])
@pytest.mark.parametrize("alias", ["default", "mysql"])
def test_0008_changes_python_choices_only_and_runs_no_sql(alias):
    out = io.StringIO()
    call_command("sqlmigrate", "dedup_celery", "0008", database=alias, stdout=out)
    lines = [line for line in out.getvalue().splitlines() if line and not line.startswith("--")]
    assert lines == [] or all(line.upper() in ("BEGIN;", "COMMIT;") for line in lines)
