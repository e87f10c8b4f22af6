"""The storage contract every message-table backend implements.

A backend stores one record per (scope, key digest). Every state change is one
atomic operation conditioned on the current state and, where it says so, on the
owner token; nothing reads a record and then writes it on the strength of what
it read. Times are taken from the store's own clock, never from the worker's.

The status-mode transition table (README, "How it works") is the specification.
"now" is the store's clock; "expired" means ``expires_at < now``.

=============  ===================================================  ==========================
transition     condition, checked by the same operation             result
=============  ===================================================  ==========================
claim          no record; or CONSUMED, FAILED or POISONED and       PROCESSING, new owner,
               expired; or FAILED for another task id or a lower    expires = now + lease,
               attempt (a retry)                                    takeovers = 0
take over      PROCESSING, expired, takeovers < MAX_TAKEOVERS       new owner, takeovers + 1
poison         PROCESSING, expired, takeovers >= MAX_TAKEOVERS      POISONED until RECORD_TTL
count dup.     anything else                                        skipped + 1, or
                                                                    rescheduled + 1 (PROCESSING)
renew          owner = my token, PROCESSING                         expires = now + lease
complete       owner = my token (or no record)                      CONSUMED until RECORD_TTL
fail           owner = my token, PROCESSING                         FAILED until RECORD_TTL
expire lease   owner = the token (or the process) given, PROCESSING  expires = now
release        owner = the token given, PROCESSING or POISONED      record deleted
purge          expired, re-checked on delete                        record deleted
=============  ===================================================  ==========================
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
    #: The body raised (it failed for good, or asked for a retry). Copies of the
    #: same task id with the same or a lower attempt are stale and are skipped.
    FAILED = "failed", _("failed")
    #: Deliveries kept dying while they held the record (MAX_TAKEOVERS reached).
    POISONED = "poisoned", _("poisoned")


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
    max_takeovers: int = 5


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
    #: A copy of a delivery whose body already raised (same task id, no higher attempt).
    STALE = "stale"
    #: The record is POISONED; ``ClaimOutcome.poisoned_now`` says if this claim did it.
    POISONED = "poisoned"

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
    poisoned_now: bool = False


def outcome_for(claim: Claim, record: Record, *, changed_now: bool = False) -> ClaimOutcome:
    """Read a claim's verdict off the record the claim left behind.

    *changed_now* says the claim itself last changed the record (so a POISONED
    record was poisoned by this very claim).
    """
    if record.owner == claim.owner:
        verdict = Verdict.TAKEN_OVER if record.takeovers > 0 else Verdict.CLAIMED
    else:
        verdict = {
            Status.CONSUMED: Verdict.CONSUMED,
            Status.FAILED: Verdict.STALE,
            Status.POISONED: Verdict.POISONED,
        }.get(record.status, Verdict.IN_FLIGHT)
    poisoned_now = verdict is Verdict.POISONED and changed_now
    return ClaimOutcome(verdict=verdict, record=record, poisoned_now=poisoned_now)


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
        """Delete a PROCESSING or POISONED record owned by *owner*; return whether it went.

        Must be atomic (compare-and-delete). With *expired_only*, a PROCESSING
        record goes only if its lease has expired. The admin action and
        ``dedup_release`` use this for an operator's release, and the task after
        a body that raised ``Reject(requeue=True)``.
        """
        raise NotImplementedError

    def fail(self, claim: Claim) -> bool:
        """Turn *claim*'s PROCESSING record into a FAILED one until RECORD_TTL.

        Must be atomic and conditioned on the owner token. The record keeps the
        task id and attempt, so a stale copy of the same delivery is skipped,
        while a retry (a higher attempt) or another task id claims it.
        """
        raise NotImplementedError

    def renew(self, claim: Claim) -> bool:
        """Extend *claim*'s lease to now + lease; False if it no longer owns the record.

        Must be atomic and conditioned on the owner token and PROCESSING.
        """
        raise NotImplementedError

    def expire_lease(self, scope: str, key_digest: str, owner: str) -> bool:
        """End the lease of a PROCESSING record owned by *owner* now (its owner is gone).

        Must be atomic and conditioned on the owner token. The next claim then
        takes the record over, and counts the takeover.
        """
        raise NotImplementedError

    def expire_lease_of_process(
        self, scope: str, key_digest: str, task_id: str, identity: OwnerIdentity
    ) -> bool:
        """End the lease of the PROCESSING record that *identity*'s process holds for *task_id*.

        For the worker's main process, which saw that child die but never knew
        its owner token. Must be atomic and conditioned on the task id and the
        whole identity (host, pid, process start, boot id, pid namespace).
        """
        raise NotImplementedError

    def get(self, scope: str, key_digest: str) -> Record | None:
        """Return the record for (scope, key digest), or None. Read only."""
        raise NotImplementedError

    def purge_expired(
        self, *, batch_size: int = 1000, dry_run: bool = False, pause: float = 0.0
    ) -> int:
        """Delete records whose ``expires_at`` has passed; return how many.

        Each delete re-checks the expiry inside the delete itself, so a record
        renewed or taken over meanwhile survives. With *dry_run*, count only.
        *pause* is a sleep between batches, to spare the store's other users.
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
