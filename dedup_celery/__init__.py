"""Exactly-once effects for Celery tasks in Django projects.

Import :class:`DedupTask` and use it as a task base class::

    @shared_task(base=DedupTask)
    def charge(order_no): ...

Importing this package does not touch Django settings or the app registry, so it
works in a tasks module that Celery imports before Django is set up.
"""

from dedup_celery.backends import get_backend
from dedup_celery.exceptions import (
    DedupConfigurationError,
    DedupError,
    DedupKeyError,
    DuplicateInFlightError,
    OuterTransactionError,
    PoisonMessageError,
    StorageError,
)
from dedup_celery.task import DedupTask

__version__ = "0.1.0"


__all__ = [
    "DedupConfigurationError",
    "DedupError",
    "DedupKeyError",
    "DedupTask",
    "DuplicateInFlightError",
    "OuterTransactionError",
    "PoisonMessageError",
    "StorageError",
    "get_backend",
]
