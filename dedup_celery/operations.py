"""Operator actions shared by the admin and the management commands."""

from __future__ import annotations

from dedup_celery import signals
from dedup_celery.backends.base import BaseBackend


def operator_release(
    backend: BaseBackend, scope: str, key_digest: str, owner: str, *, force: bool
) -> bool:
    """Release a PROCESSING record for an operator; return whether it was deleted.

    The record goes only if its owner is still *owner* (the token the operator
    was shown) and, unless *force*, only if its lease has expired. Nothing is
    re-sent: the broker's redelivery, or the producer, runs the message again.
    """
    released = backend.release(scope, key_digest, owner, expired_only=not force)
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
