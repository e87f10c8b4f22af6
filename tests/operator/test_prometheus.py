"""Prometheus metrics in one process: the counters, the Django view, the settings and checks.

tests/worker/test_prometheus.py scrapes a real prefork worker in multiprocess mode.
"""

from __future__ import annotations

import os
import uuid

import pytest
from django.contrib.auth.models import User
from django.test import override_settings
from prometheus_client import REGISTRY

from dedup_celery import DedupTask, prometheus
from dedup_celery.checks import check_settings
from dedup_celery.conf import validate
from tests.celery_app import app
from tests.helpers import run_as_worker


@app.task(base=DedupTask, name="unit.metrics.counted", dedup_key=lambda order: f"o:{order}")
def counted(order):
    return order


@pytest.fixture
def installed():
    prometheus.install()
    yield
    prometheus.uninstall()


def value(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.django_db(transaction=True)
def test_claims_and_duplicates_are_counted_by_task_and_reason(installed):
    task = {"task": counted.name}
    before = (
        value("dedup_celery_claims_total", **task),
        value("dedup_celery_duplicates_total", **task, reason="consumed"),
    )
    order = uuid.uuid4().hex
    for _ in range(3):
        run_as_worker(counted, str(uuid.uuid4()), [order], {})
    assert value("dedup_celery_claims_total", **task) - before[0] == 1
    assert value("dedup_celery_duplicates_total", **task, reason="consumed") - before[1] == 2


@pytest.mark.django_db(transaction=True)
def test_without_install_nothing_is_counted():
    before = value("dedup_celery_claims_total", task=counted.name)
    run_as_worker(counted, str(uuid.uuid4()), [uuid.uuid4().hex], {})
    assert value("dedup_celery_claims_total", task=counted.name) == before


@pytest.mark.django_db(transaction=True)
def test_the_view_serves_the_text_format_to_staff_only(client, installed):
    run_as_worker(counted, str(uuid.uuid4()), [uuid.uuid4().hex], {})
    with override_settings(ROOT_URLCONF="tests.urls_metrics"):
        assert client.get("/metrics").status_code == 403  # anonymous
        User.objects.create_user("someone", password="pw")
        client.login(username="someone", password="pw")
        assert client.get("/metrics").status_code == 403  # not staff
        User.objects.create_user("staff", password="pw", is_staff=True)
        client.login(username="staff", password="pw")
        page = client.get("/metrics")
    assert page.status_code == 200
    assert page["Content-Type"].startswith("text/plain")
    assert f'dedup_celery_claims_total{{task="{counted.name}"}}' in page.content.decode()


@pytest.mark.parametrize(
    "value",
    [None, True, False, {}, {"port": 9808}, {"port": 9808, "addr": "0.0.0.0"}],
)
def test_the_setting_takes_none_true_or_a_port_and_address(value):
    assert validate({"PROMETHEUS": value}) == []


@pytest.mark.parametrize(
    "value",
    [
        "yes",
        {"port": 0},
        {"port": "9808"},
        {"port": 70000},
        {"port": None},
        {"host": "x"},
        {"addr": ""},
        {"addr": None},
    ],
)
def test_a_wrong_setting_is_named(value):
    (error,) = validate({"PROMETHEUS": value})
    assert error.id == "dedup_celery.E003"
    assert "PROMETHEUS" in error.msg


def test_metrics_without_multiprocess_mode_warn(monkeypatch):
    monkeypatch.delenv(prometheus.MULTIPROC_ENV, raising=False)
    with override_settings(DEDUP_CELERY={"PROMETHEUS": True}):
        (warning,) = check_settings()
    assert warning.id == "dedup_celery.W013"
    assert prometheus.MULTIPROC_ENV in warning.msg
    monkeypatch.setenv(prometheus.MULTIPROC_ENV, "/tmp/dedup-metrics")
    with override_settings(DEDUP_CELERY={"PROMETHEUS": True}):
        assert check_settings() == []
    with override_settings(DEDUP_CELERY={}):
        assert check_settings() == []


def test_metrics_without_the_library_are_an_error(monkeypatch):
    from dedup_celery import checks

    real = checks.find_spec
    monkeypatch.setattr(
        checks, "find_spec", lambda name: None if name == "prometheus_client" else real(name)
    )
    with override_settings(DEDUP_CELERY={"PROMETHEUS": True}):
        (error,) = check_settings()
    assert error.id == "dedup_celery.E011"
    assert "dedup-celery[prometheus]" in error.hint


def test_the_worker_deletes_the_files_of_processes_that_are_gone_only(tmp_path):
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid, live_pid = int(gone.stdout), os.getpid()
    (tmp_path / f"counter_{dead_pid}.db").write_bytes(b"x")
    (tmp_path / f"histogram_{dead_pid}.db").write_bytes(b"x")
    (tmp_path / f"counter_{live_pid}.db").write_bytes(b"x")  # another live process's: kept
    (tmp_path / "notes.txt").write_text("not ours")
    assert prometheus.remove_dead_files(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"counter_{live_pid}.db", "notes.txt"]


class _Socket:
    closed = False

    def close(self):
        self.closed = True


def test_a_forked_child_closes_the_listening_socket_and_the_serving_process_does_not(
    monkeypatch,
):
    server = type("Server", (), {"socket": _Socket()})()
    monkeypatch.setattr(prometheus, "_server", server)
    monkeypatch.setattr(prometheus, "_server_pid", os.getpid())
    prometheus._child_init()  # the solo pool sends worker_process_init in the main process
    assert server.socket.closed is False
    monkeypatch.setattr(prometheus, "_server_pid", os.getpid() + 1)  # as in a forked child
    prometheus._child_init()
    assert server.socket.closed is True
