"""The database backend's kept connection (status mode on PostgreSQL), run through Celery's tracer.

Four things are proven here: it survives the Django fixup's per-task close; after
a fork the parent's keeps working and the child opens its own; it survives a
server restart; and it is never used inside an atomic block, nor off the main
thread, nor when ``CELERY_DB_REUSE_MAX`` keeps Django's own connection open.
"""

from __future__ import annotations

import os
import threading
import uuid

import pytest
from celery.app.trace import build_tracer
from celery.fixups.django import DjangoWorkerFixup
from celery.signals import task_postrun, task_prerun
from django.core.management import call_command
from django.db import connections, transaction
from django.test import override_settings

from dedup_celery import DedupTask, get_backend
from dedup_celery.backends.db import kept as kept_module
from dedup_celery.exceptions import DedupConfigurationError
from dedup_celery.models import DedupRecord
from harness.servers import PostgresServer
from tests.celery_app import app
from tests.helpers import claim_for

pytestmark = pytest.mark.django_db(transaction=True)

SEEN: list[dict] = []


@app.task(base=DedupTask, name="unit.kept.pid", bind=True, ignore_result=True)
def report_pids(self, alias="default"):
    """Note which server sessions served the claim and the body."""
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        body_pid = cursor.fetchone()[0]
    SEEN.append({"body": body_pid, "kept": kept_pid()})


@app.task(base=DedupTask, name="unit.kept.atomic", bind=True, ignore_result=True)
def claim_inside_atomic(self, key):
    """Claim another key inside an atomic block that rolls back."""
    with transaction.atomic():
        get_backend().claim(claim_for("unit.kept.atomic.inner", key))
        transaction.set_rollback(True)


def kept_connection():
    """The backend's kept connection object (open or not)."""
    backend = get_backend()
    return backend._kept_for(backend.alias)


def kept_pid():
    """The server pid of the backend's kept connection, or None if it has none open."""
    wrapper = kept_connection()._wrapper
    raw = getattr(wrapper, "connection", None)
    return None if raw is None else raw.info.backend_pid


def run(task, *args, task_id=None):
    tracer = build_tracer(task.name, task, app=task.app, eager=False, propagate=True)
    task_id = task_id or str(uuid.uuid4())
    request = {
        "id": task_id,
        "retries": 0,
        "delivery_info": {"exchange": "", "routing_key": "q-unit-kept", "priority": 0},
        "hostname": "unit@localhost",
        "is_eager": False,
    }
    tracer(task_id, list(args), {}, request)
    return task_id


@pytest.fixture
def per_task_close():
    """Celery's Django fixup as a worker has it: every connection closed around each task."""
    fixup = DjangoWorkerFixup(app)
    assert not fixup.db_reuse_max
    task_prerun.connect(fixup.on_task_prerun)
    task_postrun.connect(fixup.on_task_postrun)
    SEEN.clear()
    yield fixup
    task_prerun.disconnect(fixup.on_task_prerun)
    task_postrun.disconnect(fixup.on_task_postrun)


def last_query(pid):
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", [pid])
        row = cursor.fetchone()
    return row[0] if row else None


def test_the_kept_connection_outlives_the_per_task_close(per_task_close):
    ids = [run(report_pids) for _ in range(3)]
    kept = {seen["kept"] for seen in SEEN}
    bodies = {seen["body"] for seen in SEEN}
    assert len(kept) == 1  # one session served every claim and complete
    assert None not in kept
    assert len(bodies) == 3  # the fixup closed Django's connection around every task
    assert not kept & bodies
    (pid,) = kept
    assert last_query(pid).startswith("UPDATE")  # the last complete ran on it
    records = DedupRecord.objects.filter(task_id__in=ids)
    assert sorted(records.values_list("status", flat=True)) == ["consumed"] * 3


def test_with_db_reuse_max_django_s_connection_is_used(per_task_close, settings):
    app.conf.CELERY_DB_REUSE_MAX = 1000
    try:
        kept_connection()._reuse.clear()
        run(report_pids)
    finally:
        app.conf.CELERY_DB_REUSE_MAX = None
        kept_connection()._reuse.clear()
    assert SEEN[-1]["kept"] is None  # no second connection when Django's survives


def test_keep_connection_false_runs_everything_on_django_s(per_task_close, settings):
    settings.DEDUP_CELERY = {"OPTIONS": {"keep_connection": False}}
    task_id = run(report_pids)
    assert SEEN[-1]["kept"] is None
    assert DedupRecord.objects.get(task_id=task_id).status == "consumed"


def test_keep_connection_must_be_a_bool(settings):
    settings.DEDUP_CELERY = {"OPTIONS": {"keep_connection": "yes"}}
    with pytest.raises(DedupConfigurationError, match=r"keep_connection.*True or False"):
        get_backend()


def test_after_a_fork_the_child_opens_its_own_and_the_parent_s_keeps_working(per_task_close):
    run(report_pids)
    parent_pid = SEEN[-1]["kept"]
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(reader)
            # As a prefork child starts: the inherited Django connections are dropped.
            DjangoWorkerFixup(app).on_worker_process_init()
            task_id = run(report_pids)
            os.write(writer, f"{SEEN[-1]['kept']} {task_id}".encode())
            get_backend().close()
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        child_pid, child_task = pipe.read().split()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert int(child_pid) not in (parent_pid, 0)
    run(report_pids)
    assert SEEN[-1]["kept"] == parent_pid  # the parent's session was never touched
    assert DedupRecord.objects.get(task_id=child_task).status == "consumed"


def test_a_fork_abandons_without_a_byte_on_the_parent_s_socket(per_task_close):
    run(report_pids)
    parent_pid = SEEN[-1]["kept"]
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        import gc

        # Close what the child holds, and let the driver finalise what it inherited.
        get_backend().close()
        kept_module._INHERITED.clear()
        gc.collect()
        os._exit(0)
    os.waitpid(child, 0)
    run(report_pids)
    assert SEEN[-1]["kept"] == parent_pid


def test_a_server_restart_is_survived(extra_database):
    server = PostgresServer()
    server.init()
    server.start()
    try:
        alias = extra_database("restarting", PORT=str(server.port), NAME="postgres")
        call_command("migrate", "dedup_celery", database=alias, verbosity=0)
        with override_settings(DEDUP_CELERY={"DATABASE": alias}):
            fixup = DjangoWorkerFixup(app)
            task_prerun.connect(fixup.on_task_prerun)
            task_postrun.connect(fixup.on_task_postrun)
            try:
                SEEN.clear()
                first = run(report_pids, alias)
                before = SEEN[-1]["kept"]
                server.stop("fast")
                server.start()
                second = run(report_pids, alias)  # the lost session is replaced, once
                after = SEEN[-1]["kept"]
                server.stop("fast")
                server.start()
                # A duplicate after a restart: the first claim is sent again on a new
                # session, and the deciding claim runs on that one, counted once.
                run(report_pids, alias, task_id=first)
                runs = len(SEEN)
                sessions = other_sessions(alias)
                kept_now = kept_pid()
                with connections[alias].cursor() as cursor:
                    cursor.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", [kept_now])
                    deciding = cursor.fetchone()[0]
            finally:
                task_prerun.disconnect(fixup.on_task_prerun)
                task_postrun.disconnect(fixup.on_task_postrun)
                get_backend().close()
            statuses = DedupRecord.objects.using(alias).filter(task_id__in=[first, second])
            assert sorted(statuses.values_list("status", flat=True)) == ["consumed"] * 2
            assert statuses.get(task_id=first).skipped == 1
            assert runs == 2  # the duplicate's body did not run
            assert sessions == {kept_now}  # no session outside the kept one was left open
            assert "DO UPDATE" in deciding  # the deciding claim ran on the current kept one
        assert None not in (before, after)
        assert before != after
    finally:
        connections["restarting"].close()
        server.destroy()


def test_never_inside_an_atomic_block(per_task_close):
    key = uuid.uuid4().hex
    run(claim_inside_atomic, key)
    # On the kept (autocommit) connection the inner claim would have outlived the rollback.
    assert not DedupRecord.objects.filter(scope="unit.kept.atomic.inner").exists()
    assert DedupRecord.objects.filter(scope="unit.kept.atomic").count() == 1


def test_never_off_the_main_thread_or_outside_a_task():
    django_connection = connections["default"]
    kept = kept_connection()
    assert not kept.wanted(django_connection)  # no task is running
    found = []
    thread = threading.Thread(target=lambda: found.append(kept.wanted(django_connection)))
    thread.start()
    thread.join()
    assert found == [False]


def other_sessions(alias="default"):
    """The server pids of the client sessions on *alias*'s database, other than this query's."""
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        return {row[0] for row in cursor.fetchall()}


def test_pg_stat_activity_shows_one_session_per_process(per_task_close):
    for _ in range(5):
        run(report_pids)
    assert other_sessions() == {kept_pid()}  # the kept one; nothing leaked per task
