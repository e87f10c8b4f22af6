"""The db backend's error path when its database refuses connections."""

import uuid

import pytest
from django.db import connections

from dedup_celery.backends.db import DatabaseBackend
from dedup_celery.exceptions import StorageError
from tests.test_backend_db import make_claim


@pytest.fixture
def unreachable_alias(django_db_blocker):
    """A database alias whose server refuses connections (nothing listens on port 1)."""
    django_db_blocker.unblock()
    connections.settings["unreachable"] = {**connections["default"].settings_dict, "PORT": "1"}
    yield "unreachable"
    connections["unreachable"].close()
    del connections["unreachable"]
    del connections.settings["unreachable"]
    django_db_blocker.restore()


def test_an_unreachable_database_raises_storage_error(unreachable_alias):
    backend = DatabaseBackend(database=unreachable_alias)
    with pytest.raises(StorageError, match="unreachable"):
        backend.claim(make_claim())
    with pytest.raises(StorageError):
        backend.complete(make_claim(), None)
    with pytest.raises(StorageError):
        backend.release("s", "d", uuid.uuid4().hex, expired_only=False)
