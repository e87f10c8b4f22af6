"""Metrics from a real prefork worker (four children) in multiprocess mode, scraped over HTTP.

The worker runs with ``PROMETHEUS_MULTIPROC_DIR`` and ``DEDUP_CELERY["PROMETHEUS"]``
with a port: its main process serves ``/metrics`` while the children count. The
control is the same worker without the directory (what check W013 warns of):
its main process serves only its own counters, and the children's are lost.
"""

from __future__ import annotations

import os
import socket
import urllib.request

import pytest

from tests.scenario import new_id, wait_until
from tests.testapp.tasks import order_result

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

BROKER_DB = 15
COPIES = 6


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def without_directory(start_worker):
    port = _free_port()
    worker = start_worker(
        "metrics-alone",
        broker_db=BROKER_DB,
        result_backend="django-db",
        dedup={"PROMETHEUS": {"port": port}},
    )
    return worker, port


@pytest.fixture(scope="module")
def metrics(start_worker, tmp_path_factory):
    port = _free_port()
    directory = tmp_path_factory.mktemp("metrics")
    worker = start_worker(
        "metrics",
        broker_db=BROKER_DB,
        result_backend="django-db",
        dedup={"PROMETHEUS": {"port": port}},
        env={"PROMETHEUS_MULTIPROC_DIR": str(directory)},
    )
    return worker, port, directory


def _scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _sample(text, name, **labels):
    """The value of sample *name* with exactly *labels* in a scrape, or 0."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def _send_twice_and_more(queue, order_no):
    """An order, then COPIES duplicates under their own task ids, each waited for."""
    from tests.celery_app import app

    broker = f"{app.conf.broker_url.rsplit('/', 1)[0]}/{BROKER_DB}"
    with app.connection_for_write(broker) as connection:

        def send():
            return order_result.apply_async(
                kwargs={"order_no": order_no}, queue=queue, connection=connection
            )

        send().get(timeout=30)
        copies = [send() for _ in range(COPIES)]
    for copy in copies:
        copy.get(timeout=30)


def test_duplicates_counted_in_the_children_are_scraped_from_the_main_process(metrics):
    worker, port, directory = metrics
    task = {"task": order_result.name}
    before = _scrape(port)
    claims = _sample(before, "dedup_celery_claims_total", **task)
    consumed = _sample(before, "dedup_celery_duplicates_total", **task, reason="consumed")
    _send_twice_and_more("q-metrics", new_id())

    def counted():
        text = _scrape(port)
        return (
            _sample(text, "dedup_celery_claims_total", **task) - claims,
            _sample(text, "dedup_celery_duplicates_total", **task, reason="consumed") - consumed,
        )

    wait_until(lambda: counted() == (1, COPIES), what="the children's counters")
    # Labels are task names and reasons only: never a key or an argument.
    from prometheus_client.parser import text_string_to_metric_families

    labels = {
        name
        for family in text_string_to_metric_families(_scrape(port))
        if family.name.startswith("dedup_celery_")
        for sample in family.samples
        for name in sample.labels
    }
    assert labels == {"task", "reason"}
    # The counters live in the children's files of the directory, not in the main process.
    assert list(directory.glob("counter_*.db"))
    assert worker.log_text().count("could not serve metrics") == 0


def test_control_without_the_directory_the_childrens_counts_never_reach_the_port(
    without_directory,
):
    assert not os.environ.get("PROMETHEUS_MULTIPROC_DIR"), "the control needs it unset"
    worker, port = without_directory
    _send_twice_and_more("q-metrics-alone", new_id())
    text = _scrape(port)
    task = {"task": order_result.name}
    assert _sample(text, "dedup_celery_claims_total", **task) == 0
    assert _sample(text, "dedup_celery_duplicates_total", **task, reason="consumed") == 0
    assert "Task tests.testapp.tasks.order_result" in worker.log_text()  # it did run them
