"""What an operator does to records: inspect, release, purge (for the admin, commands and beat).

A release is a compare-and-delete in the store (:meth:`BaseBackend.release
<dedup_celery.backends.base.BaseBackend.release>`), by the rule of
:func:`dedup_celery.states.may_release`; nothing is ever re-sent.
"""

from __future__ import annotations

from dedup_celery import signals
from dedup_celery.backends import get_backend
from dedup_celery.backends.base import BaseBackend, Record
from dedup_celery.states import RELEASABLE, may_release


def inspect_record(
    scope: str, key_digest: str, backend: BaseBackend | None = None
) -> Record | None:
    """Return the record of (scope, key digest) in the configured store, or None."""
    return (backend or get_backend()).get(scope, key_digest)


def release_record(
    scope: str,
    key_digest: str,
    owner: str,
    *,
    force: bool,
    backend: BaseBackend | None = None,
) -> bool:
    """Release a PROCESSING or POISONED record for an operator; return whether it was deleted.

    The record goes only if its owner is still *owner* (the token the operator
    was shown) and, unless *force*, only if its lease has expired. Nothing is
    re-sent: the broker's redelivery, or the producer, runs the message again.
    """
    released = (backend or get_backend()).release(scope, key_digest, owner, expired_only=not force)
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


def refusal(record: Record, *, force: bool) -> str | None:
    """Say why a release of *record* as it was read would be refused, or None if it may go.

    The store decides again when it deletes: the owner may have changed since.
    """
    if record.status not in RELEASABLE:
        return f"the record is {record.status}, not processing or poisoned"
    if not may_release(record.status, lease_expired=record.lease_expired, force=force):
        return "its lease is live (use --force only if the owner is gone)"
    return None


def purge_expired(*, batch_size: int = 1000, dry_run: bool = False, pause: float = 0.0) -> int:
    """Delete (or with *dry_run* count) the expired records of the configured store."""
    return get_backend().purge_expired(batch_size=batch_size, dry_run=dry_run, pause=pause)


__all__ = ["inspect_record", "purge_expired", "refusal", "release_record"]
