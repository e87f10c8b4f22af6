"""Session services (PostgreSQL, Redis) and helpers shared by the tests."""

from __future__ import annotations

import os

import pytest
from pytest_redis import factories

from tests.celery_app import app as celery_app
from tests.services import PostgresServer

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
def django_db_modify_db_settings(postgres_server):
    """Point the ``default`` alias at the session's PostgreSQL server before setup."""
    from django.db import connections

    connections["default"].settings_dict["PORT"] = str(postgres_server.port)


@pytest.fixture(scope="session")
def redis_url(redis_server):
    return f"redis://{redis_server.host}:{redis_server.port}"


@pytest.fixture(scope="session")
def celery_broker(redis_url):
    """Make the test process publish to the session's Redis (db 0 unless a test says)."""
    celery_app.conf.broker_url = f"{redis_url}/0"
    return celery_app
