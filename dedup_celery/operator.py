"""What an operator does to records: inspect, release, forget, purge (admin, commands, beat).

A release is a compare-and-delete in the store (:meth:`BaseBackend.release
<dedup_celery.backends.base.BaseBackend.release>`), by the rule of
:func:`dedup_celery.states.may_release`; nothing is ever re-sent.
"""

from __future__ import annotations

import logging

from dedup_celery import signals
from dedup_celery.backends import get_backend
from dedup_celery.backends.base import Record

logger = logging.getLogger(__name__)


def inspect_record(scope: str, key_digest: str) -> Record | None:
    """Return the record of (scope, key digest) in the configured store, or None."""
    return get_backend().get(scope, key_digest)


def release_record(
    scope: str,
    key_digest: str,
    owner: str,
    *,
    force: bool,
) -> bool:
    """Release a PROCESSING or POISONED record for an operator; return whether it was deleted.

    The record goes only if its owner is still *owner* (the token the operator
    was shown) and, unless *force*, only if its lease has expired. Nothing is
    re-sent: the broker's redelivery, or the producer, runs the message again.
    """
    released = get_backend().release(scope, key_digest, owner, expired_only=not force)
    if released:
        signals.message_released.send(
            sender=None,
            task_id=None,
            scope=scope,
            key_digest=key_digest,
            record=None,
            owner=owner,
            reason="operator",
        )
    return released


def forget_record(scope: str, key_digest: str, owner: str) -> bool:
    """Forget a CONSUMED or FAILED record for an operator; return whether it was deleted.

    The record goes only if its owner is still *owner* (the token the operator
    was shown), so a message claimed again meanwhile is not touched. The next
    delivery of the message runs the body again; nothing is re-sent from here.
    Sends :data:`~dedup_celery.signals.message_forgotten` and logs a WARNING.
    """
    backend = get_backend()
    record = backend.get(scope, key_digest)
    if not backend.forget(scope, key_digest, owner):
        return False
    status = None if record is None else record.status
    logger.warning(
        "dedup_celery: an operator forgot the %s record of scope %r, key digest %s "
        "(owner %s): the next delivery of its message runs the body again",
        status or "finished",
        scope,
        key_digest,
        owner,
    )
    signals.message_forgotten.send(
        sender=None,
        task_id=None,
        scope=scope,
        key_digest=key_digest,
        record=record,
        owner=owner,
        status=status,
    )
    return True


def purge_expired(*, batch_size: int = 1000, dry_run: bool = False, pause: float = 0.0) -> int:
    """Delete (or with *dry_run* count) the expired records of the configured store."""
    return get_backend().purge_expired(batch_size=batch_size, dry_run=dry_run, pause=pause)


__all__ = ["forget_record", "inspect_record", "purge_expired", "release_record"]
