"""Session services (PostgreSQL, Redis) and helpers shared by the tests."""

from __future__ import annotations

import json
import os

import pytest
from pytest_redis import factories

from tests.celery_app import app as celery_app
from tests.services import MariaDBServer, PostgresServer

redis_server = factories.redis_proc(port=None, db_count=16)


@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer()
    server.init()
    server.start()
    os.environ["DEDUP_TEST_PG_PORT"] = str(server.port)
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def mariadb_server():
    server = MariaDBServer()
    server.init()
    server.start()
    os.environ["DEDUP_TEST_MYSQL_PORT"] = str(server.port)
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def django_db_modify_db_settings(postgres_server, mariadb_server):
    """Point the ``default`` and ``mysql`` aliases at the session's servers before setup."""
    from django.db import connections

    connections["default"].settings_dict["PORT"] = str(postgres_server.port)
    connections["mysql"].settings_dict["PORT"] = str(mariadb_server.port)


@pytest.fixture
def extra_database(django_db_blocker):
    """Add database aliases for one test: ``extra_database(alias, base="default", **settings)``.

    Each is a copy of *base*'s settings with *settings* over it; all are removed
    after the test.
    """
    from django.db import connections

    added = []

    def add(alias, base="default", **overrides):
        connections.settings[alias] = {**connections[base].settings_dict, **overrides}
        added.append(alias)
        return alias

    django_db_blocker.unblock()
    try:
        yield add
    finally:
        for alias in added:
            connections[alias].close()
            del connections[alias]
            del connections.settings[alias]
        django_db_blocker.restore()


@pytest.fixture
def unreachable_database(extra_database):
    """A database alias whose server refuses connections (nothing listens on port 1)."""
    return extra_database("unreachable", PORT="1")


@pytest.fixture(autouse=True)
def _close_kept_connections():
    """Close the database backend's kept connections after each test (tracer-level tests open
    them on the main thread), so no session outlives the test that opened it."""
    yield
    from dedup_celery.backends.db import kept

    kept.close_all()


@pytest.fixture(scope="session")
def redis_url(redis_server):
    return f"redis://{redis_server.host}:{redis_server.port}"


@pytest.fixture(scope="session")
def celery_broker(redis_url):
    """Make the test process publish to the session's Redis (db 0 unless a test says)."""
    celery_app.conf.broker_url = f"{redis_url}/0"
    return celery_app


@pytest.fixture(scope="module")
def start_worker(django_db_setup, celery_broker, redis_url, postgres_server):
    """Start real ``celery worker`` processes (prefork) for a module; all stop at its end."""
    from django.db import connections

    from tests.services import Worker

    started: list[Worker] = []

    def start(
        name,
        *,
        broker_db=0,
        result_backend="",
        visibility_timeout=None,
        concurrency=4,
        store_url="",
        broker_url=None,
        dedup=None,
        env=None,
        queue=None,
        release=None,
        args=(),
    ):
        """Start a worker; *release* (python, project folder) runs another release's code."""
        env = {
            **(env or {}),
            "DEDUP_TEST_DEDUP_EXTRA": json.dumps(dedup or {}),
            "DEDUP_TEST_STORE_URL": store_url,
            "DEDUP_TEST_BROKER_URL": broker_url or f"{redis_url}/{broker_db}",
            "DEDUP_TEST_RESULT_BACKEND": result_backend,
            "DEDUP_TEST_PG_PORT": str(postgres_server.port),
            "DEDUP_TEST_PG_NAME": connections["default"].settings_dict["NAME"],
            "DEDUP_TEST_MYSQL_NAME": connections["mysql"].settings_dict["NAME"],
            "DEDUP_TEST_VISIBILITY_TIMEOUT": str(visibility_timeout or ""),
        }
        where = {} if release is None else {"python": release[0], "cwd": release[1]}
        worker = Worker(
            name, queue=queue or f"q-{name}", env=env, concurrency=concurrency, args=args, **where
        )
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def stores(redis_url):
    """The message stores the scenario workers use, as the test process reads them."""
    from dedup_celery.backends.db import DatabaseBackend
    from dedup_celery.backends.redis import RedisBackend

    url = f"{redis_url}/7"
    return {
        "db": DatabaseBackend(),
        "mariadb": DatabaseBackend(database="mysql"),
        "redis": RedisBackend(url=url, key_prefix="scenario:"),
        "redis_url": url,
    }


SCENARIOS: list[dict] = []
SCENARIO_COLUMNS = (
    "scenario", "task", "sent", "body runs", "effects", "extra effects", "skipped", "lost",
)  # fmt: skip


@pytest.fixture
def report_scenario():
    """Count one scenario for the summary printed at the end.

    ``sent`` is what the test published (*messages*, its input); every other
    number is read back: ``body runs`` from the run log, ``effects``, ``extra
    effects`` (beyond one per message) and ``lost`` (messages in *ns*, the ``n``
    values of the row's messages under *tag*, whose effect never happened) from
    the effect table, ``skipped`` from the records' counters. ``-`` means there
    is nothing to count: no record for a plain task, or no effect where the body
    by design never makes one.
    """
    from collections import Counter

    from tests.scenario import effect_ns, starts

    def report(scenario, task, tag, *, messages, ns=(1,), records=None, effect_expected=True):
        if records is not None:
            assert all(r is not None for r in records), "a dedup message has no record"
        per_n = Counter(effect_ns(tag, ns))
        counted = effect_expected or None
        row = {
            "scenario": scenario,
            "task": task,
            "sent": messages,
            "body runs": sum(run.n in ns for run in starts(tag)),
            "effects": sum(per_n.values()) if counted else "-",
            "extra effects": sum(count - 1 for count in per_n.values()) if counted else "-",
            "skipped": "-" if records is None else sum(r.skipped for r in records),
            "lost": sum(per_n[n] == 0 for n in ns) if counted else "-",
        }
        SCENARIOS.append(row)
        return row

    return report


def pytest_terminal_summary(terminalreporter):
    if not SCENARIOS:
        return
    terminalreporter.section("delivery scenarios (real worker, real broker), all counted")
    terminalreporter.write_line(" | ".join(f"{c:>13}" for c in SCENARIO_COLUMNS))
    for row in SCENARIOS:
        terminalreporter.write_line(" | ".join(f"{row[c]!s:>13}" for c in SCENARIO_COLUMNS))


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's scratch folder, unless something failed (worker logs are there)."""
    import shutil

    if exitstatus == 0 and not os.environ.get("DEDUP_TEST_KEEP"):
        shutil.rmtree(os.environ["DEDUP_TEST_TMP"], ignore_errors=True)
