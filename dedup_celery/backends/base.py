"""The storage contract every message-table backend implements.

A backend stores one record per (scope, key digest). Every state change is one
atomic operation conditioned on the current state and, where it says so, on the
owner token; nothing reads a record and then writes it on the strength of what
it read. Times are taken from the store's own clock, never from the worker's.

The status-mode transition table (README, "How it works") is the specification:

=================  ============================================  ===========================
transition         condition, checked by the same operation       result
=================  ============================================  ===========================
claim              no record                                     PROCESSING, new owner,
                                                                 expires = now + lease
take over          PROCESSING and expired, or CONSUMED and past  new owner, takeovers + 1
                   RECORD_TTL (``expires_at < now`` in both)
count duplicate    record exists and is not claimable            skipped + 1 (CONSUMED) or
                                                                 rescheduled + 1 (PROCESSING)
complete           owner = my token                              CONSUMED, expires = now +
                                                                 RECORD_TTL, result stored
release            owner = my token, PROCESSING                  record deleted
purge              ``expires_at < now``, re-checked on delete    record deleted
=================  ============================================  ===========================
"""

from __future__ import annotations

import datetime
import enum
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

from django.db import models
from django.utils.translation import gettext_lazy as _


class Status(models.TextChoices):
    """The state of a message record."""

    PROCESSING = "processing", _("processing")
    CONSUMED = "consumed", _("consumed")


@dataclass(frozen=True)
class OwnerIdentity:
    """The process that holds a claim, and what proves it is the same process."""

    hostname: str
    pid: int
    process_start: int | None
    boot_id: str
    pid_namespace: str


@dataclass(frozen=True)
class Claim:
    """What one delivery of a message asks the store for."""

    scope: str
    key: str
    key_digest: str
    owner: str
    task_id: str
    task_name: str
    attempt: int
    identity: OwnerIdentity
    lease_seconds: float
    record_ttl: float


@dataclass(frozen=True)
class Record:
    """A snapshot of one stored record, as the store saw it."""

    scope: str
    key: str
    key_digest: str
    status: str
    owner: str | None
    task_id: str
    task_name: str
    attempt: int
    hostname: str
    pid: int | None
    process_start: int | None
    boot_id: str
    pid_namespace: str
    created_at: datetime.datetime | None
    updated_at: datetime.datetime | None
    expires_at: datetime.datetime | None
    consumed_at: datetime.datetime | None
    heartbeat_at: datetime.datetime | None
    skipped: int
    rescheduled: int
    takeovers: int
    last_duplicate_at: datetime.datetime | None
    result: Any
    payload_digest: str | None
    lease_expired: bool | None = None


class Verdict(enum.Enum):
    """What a claim found."""

    CLAIMED = "claimed"
    TAKEN_OVER = "taken_over"
    CONSUMED = "consumed"
    IN_FLIGHT = "in_flight"

    @property
    def claimed(self) -> bool:
        """True if this delivery now owns the record and may run the body."""
        return self in (Verdict.CLAIMED, Verdict.TAKEN_OVER)


@dataclass(frozen=True)
class ClaimOutcome:
    """The result of :meth:`BaseBackend.claim`.

    ``record`` is the record after the claim. It is None only for an in-flight
    transactional claim that found the key locked by an uncommitted copy.
    """

    verdict: Verdict
    record: Record | None


class BaseBackend:
    """Base class for message-table backends.

    Subclasses are instantiated once per process by
    :func:`dedup_celery.backends.get_backend`. ``__init__`` must not do I/O:
    it runs at import time in some deployments, before any server is reachable.
    Every method that talks to the store raises
    :class:`~dedup_celery.exceptions.StorageError` when the store cannot be
    reached or refuses the statement.
    """

    #: Keyword arguments ``__init__`` accepts from ``DEDUP_CELERY['OPTIONS']``.
    accepted_options: ClassVar[tuple[str, ...]] = ()
    #: Whether ``dedup_transactional=True`` tasks can use this backend.
    supports_transactional: ClassVar[bool] = False

    def __init__(self, *, database: str | None = None) -> None:
        self.database_setting = database

    def claim(self, claim: Claim) -> ClaimOutcome:
        """Claim, take over, or count a duplicate, in one atomic step.

        Must be atomic: of many concurrent callers for one (scope, key), exactly
        one gets :attr:`Verdict.CLAIMED` or :attr:`Verdict.TAKEN_OVER`. A caller
        that does not win has the duplicate counted on the record
        (``skipped`` for CONSUMED, ``rescheduled`` for PROCESSING) by that same
        step. A retried call with the same owner token (for example after a
        lost reply) must report the claim as its own.
        """
        raise NotImplementedError

    def complete(self, claim: Claim, result: Any) -> bool:
        """Mark the record CONSUMED if ``owner`` is still *claim*'s token.

        Must be atomic and conditioned on the owner token, not on the lease:
        completing late is correct when nobody took over. If the record is gone
        (purged or released after its lease expired), it is recreated as
        CONSUMED unless another record took its place. *result* is the
        JSON-ready value to store (``None`` stores nothing). Returns False when
        another owner holds the record: the lease was lost.
        """
        raise NotImplementedError

    def release(self, scope: str, key_digest: str, owner: str, *, expired_only: bool) -> bool:
        """Delete a PROCESSING record if its owner is *owner*; return whether it was deleted.

        Must be atomic (compare-and-delete). With *expired_only*, only a record
        whose lease has expired is deleted. The task uses this after a failed
        body, the admin action and ``dedup_release`` for an operator's release.
        """
        raise NotImplementedError

    def get(self, scope: str, key_digest: str) -> Record | None:
        """Return the record for (scope, key digest), or None. Read only."""
        raise NotImplementedError

    def purge_expired(self, *, batch_size: int = 1000, dry_run: bool = False) -> int:
        """Delete records whose ``expires_at`` has passed; return how many.

        Each delete re-checks the expiry inside the delete itself, so a record
        renewed or taken over meanwhile survives. With *dry_run*, count only.
        """
        raise NotImplementedError

    def describe(self) -> str:
        """Return a short human description of where records live (for logs and commands)."""
        return type(self).__name__

    # Transactional mode: only backends with ``supports_transactional = True``
    # implement these.

    def transaction(self) -> AbstractContextManager[None]:
        """Return the context manager of the transaction holding the claim and the body."""
        raise NotImplementedError

    def in_outer_transaction(self) -> bool:
        """True if a transaction is already open where :meth:`transaction` would open one."""
        raise NotImplementedError

    def transaction_broken(self) -> bool:
        """True if the open transaction can only roll back (a database error was caught)."""
        raise NotImplementedError

    def claim_in_transaction(self, claim: Claim) -> ClaimOutcome:
        """Insert a CONSUMED record inside the open transaction, or count the duplicate.

        Must not wait for a copy whose transaction is still open: that is
        :attr:`Verdict.IN_FLIGHT` with ``record=None``.
        """
        raise NotImplementedError

    def store_result(self, claim: Claim, result: Any) -> None:
        """Store *result* on the record *claim* owns, inside the open transaction."""
        raise NotImplementedError
