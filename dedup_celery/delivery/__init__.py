"""One delivery of one message, in status mode or in transactional mode.

:func:`deliver` is what :meth:`DedupTask.__call__ <dedup_celery.task.DedupTask.__call__>`
hands over to; :mod:`.outcomes` says what a delivery that may not run the body
does, and :mod:`.results` which results are kept for duplicates.
"""

from __future__ import annotations

from typing import Any

from dedup_celery.backends import get_backend
from dedup_celery.backends.base import TransactionalBackend
from dedup_celery.delivery import outcomes
from dedup_celery.delivery.base import Delivery, logger
from dedup_celery.delivery.status import StatusDelivery
from dedup_celery.delivery.transactional import TransactionalDelivery
from dedup_celery.exceptions import DedupConfigurationError
from dedup_celery.keys import message_key
from dedup_celery.options import resolve


def deliver(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run one delivery of *task*'s current request: at most one effect per message key.

    A configuration that does not resolve reschedules the message
    (:func:`.outcomes.misconfigured`); it never runs the body without dedup.
    """
    request = task.request
    request.dedup_owner = None
    try:
        options = resolve(task)
        backend = get_backend()
        if options.transactional and not isinstance(backend, TransactionalBackend):
            raise DedupConfigurationError(
                f"Task {task.name!r} sets dedup_transactional=True, but the "
                f"{type(backend).__name__} backend has no transactions. Use the database "
                "backend (DEDUP_CELERY['BACKEND'] = 'db') or status mode."
            )
    except DedupConfigurationError as exc:
        outcomes.misconfigured(task, exc)
    if options.bypass:  # outside the try: the body's own errors are not a misconfiguration
        return outcomes.bypassed(task, args, kwargs)
    key = message_key(task, options.key_function, request, args, kwargs)
    if key is None:
        logger.debug(
            "%s[%s]: dedup_key returned None, running without dedup", task.name, request.id
        )
        return task.run(*args, **kwargs)
    kind = TransactionalDelivery if options.transactional else StatusDelivery
    delivery = kind(task, options, key, backend, args, kwargs)
    deadline = outcomes.copy_deadline(task, request)
    if deadline is not None:
        outcomes.expired_copy(delivery, deadline)
    return delivery.run()


__all__ = ["Delivery", "StatusDelivery", "TransactionalDelivery", "deliver"]
