"""The backend variants every backend test runs on, built from real stores."""

from __future__ import annotations

import uuid

import pytest

from dedup_celery.backends.db import DatabaseBackend
from dedup_celery.backends.redis import RedisBackend

#: The database backend on PostgreSQL and SQLite, each with its one-statement
#: upsert and with the portable insert-then-update path, and on MariaDB, which
#: always takes the portable path.
DB_VARIANTS = {
    "db-postgresql": ("default", False),
    "db-sqlite": ("sqlite", False),
    "db-portable-postgresql": ("default", True),
    "db-portable-sqlite": ("sqlite", True),
    "db-mariadb": ("mysql", False),
}


def make_db_backend(variant: str) -> DatabaseBackend:
    """The database backend of one of :data:`DB_VARIANTS`; ``variant`` names it."""
    alias, portable = DB_VARIANTS[variant]
    instance = DatabaseBackend(database=alias)
    instance._force_generic = portable
    instance.variant = variant
    return instance


@pytest.fixture(params=list(DB_VARIANTS))
def db_backend(request):
    """The database backend, once per variant."""
    return make_db_backend(request.param)


@pytest.fixture
def redis_backend(redis_url):
    """The Redis backend on the session's server, under a prefix of its own (emptied after)."""
    instance = RedisBackend(url=f"{redis_url}/3", key_prefix=f"test:{uuid.uuid4().hex}:")
    yield instance
    for key in instance.client.scan_iter(match=f"{instance.key_prefix}*"):
        instance.client.delete(key)


@pytest.fixture(params=[*DB_VARIANTS, "redis"])
def backend(request):
    """Every backend variant: the database ones, and Redis."""
    if request.param == "redis":
        return request.getfixturevalue("redis_backend")
    return make_db_backend(request.param)
