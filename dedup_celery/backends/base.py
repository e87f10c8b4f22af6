"""The storage contract every message-table backend implements.

A backend stores one record per (scope, key digest). Every state change is one
atomic operation conditioned on the current state and, where it says so, on the
owner token; nothing reads a record and then writes it on the strength of what
it read. Times are taken from the store's own clock, never from the worker's.

The status-mode transition table (docs/how-it-works.md) is the specification.
"now" is the store's clock; "expired" means ``expires_at < now``.

=============  ====================================================  ==========================
transition     condition, checked by the same operation              result
=============  ====================================================  ==========================
claim          no record; or CONSUMED, FAILED or POISONED and        PROCESSING, new owner,
               expired; or FAILED for another task id or a lower     expires = now + lease,
               attempt (a retry)                                     takeovers = 0
take over      PROCESSING, expired, takeovers < MAX_TAKEOVERS        new owner, takeovers + 1
poison         PROCESSING, expired, takeovers >= MAX_TAKEOVERS       POISONED until RECORD_TTL
count dup.     anything else                                         skipped + 1, or
                                                                     rescheduled + 1 (PROCESSING)
renew          owner = my token, PROCESSING                          expires = now + lease
complete       owner = my token (or no record)                       CONSUMED until RECORD_TTL
fail           owner = my token, PROCESSING                          FAILED until RECORD_TTL
expire lease   owner = the token (or the process) given, PROCESSING  expires = now
release        owner = the token given, PROCESSING or POISONED       record deleted
forget         owner = the token given, CONSUMED or FAILED           record deleted
purge          expired, re-checked on delete                         record deleted
=============  ====================================================  ==========================
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
import typing
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

from dedup_celery.identity import OwnerIdentity
from dedup_celery.keys import display_key
from dedup_celery.states import Status, retention


@dataclass(frozen=True)
class Claim:
    """What one delivery of a message asks the store for.

    ``task_id`` and ``task_name`` are in their stored form
    (:func:`~dedup_celery.keys.storable`): the id itself whenever a
    255-character column can hold it.
    """

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
    #: :func:`dedup_celery.payload.fingerprint` of the message's arguments, or None.
    payload_digest: str | None = None


@dataclass(frozen=True)
class Record:
    """A snapshot of one stored record, as the store saw it.

    Its fields are the message table's columns, in order: the model, the SQL,
    the Redis hash, the admin and the commands all follow :data:`RECORD_FIELDS`.
    """

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
    #: Until when a purge keeps the record, whatever its status: a claim sets it to
    #: its lease plus RECORD_TTL, so an unfinished message keeps its takeovers count.
    #: None on records written before the column existed.
    purge_after: datetime.datetime | None
    #: The task id of the latest duplicate counted on the record (stored form), so the
    #: record links to both runs. None before the first duplicate, and on records of
    #: releases before the column existed.
    last_duplicate_task_id: str | None = None
    #: Duplicates whose payload fingerprint differed from :attr:`payload_digest`
    #: (``PAYLOAD_MISMATCH``); 0 on records of releases before the column existed.
    payload_mismatches: int = 0
    #: Judged by the store's clock when the record was read; not a column.
    lease_expired: bool | None = None


@dataclass(frozen=True)
class RecordFilter:
    """Which records an operator's listing asks for (``dedup_inspect`` without a key).

    Every condition given must hold. *older_than* is in seconds of age
    (``created_at``) by the store's clock; *limit* bounds the records returned.
    """

    status: str | None = None
    scope: str | None = None
    task_name: str | None = None
    older_than: float | None = None
    limit: int = 50


#: The most keys a listing reads where no index answers it (the Redis backend's SCAN).
SCAN_LIMIT = 100_000


@dataclass(frozen=True)
class RecordListing:
    """The records a listing found, newest first, and why the search may be incomplete."""

    records: list[Record]
    #: More records matched than the filter's *limit*.
    truncated: bool = False
    #: A store with nothing to query by (Redis) stopped at its scan bound.
    scan_stopped: bool = False
    #: Keys a scan looked at (Redis), or None where one query answered (the database).
    scanned: int | None = None

    @property
    def complete(self) -> bool:
        """Whether every matching record is in :attr:`records`."""
        return not (self.truncated or self.scan_stopped)


#: The stored fields of a record (the message table's columns), in order.
RECORD_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(Record) if f.name != "lease_expired"
)
#: What each field holds: ``"text"``, ``"int"``, ``"datetime"`` or ``"json"``,
#: with ``"?"`` appended where it may be empty; read off :class:`Record`'s types.
FIELD_KINDS: dict[str, str] = {
    name: (
        "json"
        if hint is Any
        else {str: "text", int: "int", datetime.datetime: "datetime"}[
            next(arg for arg in typing.get_args(hint) or (hint,) if arg is not type(None))
        ]
        + ("?" if type(None) in typing.get_args(hint) else "")
    )
    for name, hint in typing.get_type_hints(Record).items()
    if name != "lease_expired"
}
#: The duplicate counters, which start at zero.
COUNTERS: tuple[str, ...] = ("skipped", "rescheduled", "takeovers", "payload_mismatches")
#: Fields a new claim of an existing record keeps; a claim or takeover sets every other one.
KEPT_BY_CLAIMS: tuple[str, ...] = (
    "scope",
    "key_digest",
    "created_at",
    *COUNTERS,
    "last_duplicate_at",
    "last_duplicate_task_id",
)
#: Fields a claim or takeover replaces (``takeovers`` is set by the store's decision).
REPLACED_BY_CLAIMS: tuple[str, ...] = tuple(f for f in RECORD_FIELDS if f not in KEPT_BY_CLAIMS)


#: Fields a claim writes from itself: the display key, the status and the owner's identity.
CLAIMANT_FIELDS: tuple[str, ...] = (
    "key", "status", "owner", "task_id", "task_name", "attempt",
    "hostname", "pid", "process_start", "boot_id", "pid_namespace",
    "payload_digest",
)  # fmt: skip


def claimant_tuple(claim: Claim, status: str) -> tuple[Any, ...]:
    """The values of :data:`CLAIMANT_FIELDS` for *claim*, with *status*, in that order."""
    ident = claim.identity
    return (
        display_key(claim.key),
        status,
        claim.owner,
        claim.task_id,
        claim.task_name,
        claim.attempt,
        ident.hostname,
        ident.pid,
        ident.process_start,
        ident.boot_id,
        ident.pid_namespace,
        claim.payload_digest,
    )


def claimant_values(claim: Claim, status: str) -> dict[str, Any]:
    """Return :data:`CLAIMANT_FIELDS` and their values for *claim*, with *status*.

    Every backend writes a claim's record from this one mapping (or, on the hot
    path, from :func:`claimant_tuple`); the store adds its own times and counters.
    """
    return dict(zip(CLAIMANT_FIELDS, claimant_tuple(claim, status), strict=True))


def first_claim_record(claim: Claim, status: str, now: datetime.datetime | None) -> Record:
    """The record a claim of a key without one wrote at the store's *now*.

    A store's first claim writes every other field from the claim itself, so it
    need not read the record back: its counters are zero, it has no result, and
    it expires after the lease (RECORD_TTL for a transactional CONSUMED record),
    to be kept for :func:`~dedup_celery.states.retention` of that. Built
    positionally (this runs for every delivery): Record's fields are scope,
    key, key_digest, then the rest of :data:`CLAIMANT_FIELDS` in order up to
    ``payload_digest``, which the record keeps after ``result``.
    """
    consumed = status == Status.CONSUMED
    seconds = claim.record_ttl if consumed else claim.lease_seconds
    expires_at = purge_after = None
    if now is not None:
        expires_at = now + datetime.timedelta(seconds=seconds)
        purge_after = now + datetime.timedelta(seconds=retention(seconds, claim.record_ttl))
    key, *claimant, payload_digest = claimant_tuple(claim, status)
    # mypy cannot count a starred tuple; tests/test_layout.py pins the positions.
    return Record(  # type: ignore[call-arg]
        claim.scope,
        key,
        claim.key_digest,
        *claimant,
        now,  # created_at
        now,  # updated_at
        expires_at,
        now if consumed else None,  # consumed_at
        None,  # heartbeat_at
        0,  # skipped
        0,  # rescheduled
        0,  # takeovers
        None,  # last_duplicate_at
        None,  # result
        payload_digest,
        purge_after,
        None,  # last_duplicate_task_id
        0,  # payload_mismatches
        False,  # lease_expired
    )


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


class _FirstClaimOutcome(ClaimOutcome):
    """A CLAIMED outcome whose record is built from the claim when it is first read.

    On the happy path nothing reads it unless a ``message_claimed`` receiver is
    connected, so a first claim costs no Record (:func:`first_claim_outcome`).
    Otherwise it behaves as the eager :class:`ClaimOutcome` it stands for: it
    compares and hashes equal to it, pickles and copies as it, and
    :func:`dataclasses.replace` returns a plain :class:`ClaimOutcome`.
    """

    def __new__(cls, *args: Any, **fields: Any) -> ClaimOutcome:  # type: ignore[misc]
        if fields:  # by field name, as dataclasses.replace builds a copy
            return ClaimOutcome(*args, **fields)
        return super().__new__(cls)

    def __init__(
        self, claim: Claim, status: str, read_now: Callable[[], datetime.datetime | None]
    ) -> None:
        # Frozen: the fields are set as the dataclass's own __init__ sets them.
        object.__setattr__(self, "verdict", Verdict.CLAIMED)
        object.__setattr__(self, "poisoned_now", False)
        object.__setattr__(self, "_first", (claim, status, read_now))

    @functools.cached_property
    def record(self) -> Record:
        """The record the first claim wrote (:func:`first_claim_record`)."""
        claim, status, read_now = self._first  # type: ignore[attr-defined]
        return first_claim_record(claim, status, read_now())

    def _eager(self) -> tuple[Verdict, Record | None, bool]:
        return (self.verdict, self.record, self.poisoned_now)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClaimOutcome):
            return NotImplemented
        return self._eager() == (other.verdict, other.record, other.poisoned_now)

    def __hash__(self) -> int:
        return hash(self._eager())

    def __reduce__(self) -> tuple[Any, ...]:
        return (ClaimOutcome, self._eager())


def first_claim_outcome(
    claim: Claim, status: str, read_now: Callable[[], datetime.datetime | None]
) -> ClaimOutcome:
    """The CLAIMED outcome of a claim that wrote a new record at the store's now.

    *read_now* returns that time (the store's reply, converted only if the
    record is read). The outcome's ``record`` equals :func:`first_claim_record`
    of the same values; it is built the first time it is read.
    """
    return _FirstClaimOutcome(claim, status, read_now)


def outcome_for(claim: Claim, record: Record, *, changed_now: bool = False) -> ClaimOutcome:
    """Read a claim's verdict off the record the claim left behind.

    *changed_now* says the claim itself last changed the record (so a POISONED
    record was poisoned by this very claim).
    """
    if record.owner == claim.owner:
        verdict = Verdict.TAKEN_OVER if record.takeovers > 0 else Verdict.CLAIMED
    else:
        by_status: dict[str, Verdict] = {
            Status.CONSUMED: Verdict.CONSUMED,
            Status.FAILED: Verdict.STALE,
            Status.POISONED: Verdict.POISONED,
        }
        verdict = by_status.get(record.status, Verdict.IN_FLIGHT)
    poisoned_now = verdict is Verdict.POISONED and changed_now
    return ClaimOutcome(verdict=verdict, record=record, poisoned_now=poisoned_now)


class BaseBackend:
    """Base class for message-table backends.

    Subclasses are instantiated once per process by
    :func:`dedup_celery.backends.get_backend`, with ``DEDUP_CELERY['OPTIONS']``
    as keyword arguments. ``__init__`` must not do I/O: it runs at import time
    in some deployments, before any server is reachable. Every method that
    talks to the store raises :class:`~dedup_celery.exceptions.StorageError`
    when the store cannot be reached or refuses the statement.
    """

    #: Keyword arguments ``__init__`` accepts from ``DEDUP_CELERY['OPTIONS']``.
    #: A backend that keeps its records in a Django database also takes
    #: ``database=`` (``DEDUP_CELERY['DATABASE']``) by name; any other is refused it.
    accepted_options: ClassVar[tuple[str, ...]] = ()

    def _missing(self, method: str) -> NotImplementedError:
        return NotImplementedError(
            f"{type(self).__name__} does not implement {method}(); subclasses of "
            f"{BaseBackend.__name__} must provide a {method}() method."
        )

    def claim(self, claim: Claim) -> ClaimOutcome:
        """Claim, take over, or count a duplicate, in one atomic step.

        Must be atomic: of many concurrent callers for one (scope, key), exactly
        one gets :attr:`Verdict.CLAIMED` or :attr:`Verdict.TAKEN_OVER`. A caller
        that does not win has the duplicate counted on the record
        (``skipped`` for CONSUMED, ``rescheduled`` for PROCESSING) by that same
        step. A retried call with the same owner token (for example after a
        lost reply) must report the claim as its own.
        """
        raise self._missing("claim")

    def queue(self, claim: Claim) -> ClaimOutcome | None:
        """Write a producer's QUEUED marker for *claim*, decided as :meth:`claim` decides.

        For ``dedup_on_enqueue = "queued"``: the same atomic step as a claim, with
        status QUEUED and the claim's lease as the queue TTL, never inside the
        caller's transaction, except that a marker never takes over (nor
        poisons) a lapsed lease: the lapsed message comes back by itself.
        CLAIMED means the marker is now *claim*'s and the producer publishes;
        any other verdict returns the record that holds the key (counted as a
        duplicate), and nothing is published. A delivery of
        the marker's task id claims it (:data:`~dedup_celery.states.Status.QUEUED`).
        None: the marker cannot be written here (the producer then publishes as
        ``"consumed"`` would). The default raises ``NotImplementedError``, which
        the producer treats as a store failure: it publishes, with a WARNING.
        """
        raise self._missing("queue")

    def take_over(self, claim: Claim, gone_owner: str) -> ClaimOutcome:
        """Claim a record whose holder *gone_owner* is known to be gone (its process died).

        The gone owner's lease counts as expired, so the claim takes the record
        over (or poisons it after ``MAX_TAKEOVERS``) as it would an expired
        lease; if another owner holds it by now, that is a duplicate as usual.
        The default ends the lease (:meth:`expire_lease`), then claims; a store
        that can do both in one step may.
        """
        self.expire_lease(claim.scope, claim.key_digest, gone_owner)
        return self.claim(claim)

    def close(self) -> None:
        """Let go of what the backend holds open of its own (called when it is replaced)."""

    def complete(self, claim: Claim, result: Any) -> bool:
        """Mark the record CONSUMED if ``owner`` is still *claim*'s token.

        Must be atomic and conditioned on the owner token, not on the lease:
        completing late is correct when nobody took over. If the record is gone
        (purged or released after its lease expired), it is recreated as
        CONSUMED unless another record took its place. *result* is the
        JSON-ready value to store (``None`` stores nothing). Returns False when
        another owner holds the record: the lease was lost.
        """
        raise self._missing("complete")

    def release(self, scope: str, key_digest: str, owner: str, *, expired_only: bool) -> bool:
        """Delete a PROCESSING or POISONED record owned by *owner*; return whether it went.

        Must be atomic (compare-and-delete) and apply
        :func:`dedup_celery.states.may_release` with ``force=not expired_only``:
        with *expired_only*, a PROCESSING record goes only if its lease has
        expired. The admin action and ``dedup_release`` use this for an
        operator's release, and the task after a body that raised
        ``Reject(requeue=True)``.
        """
        raise self._missing("release")

    def forget(self, scope: str, key_digest: str, owner: str) -> bool:
        """Delete a CONSUMED or FAILED record owned by *owner*; return whether it went.

        Must be atomic (compare-and-delete): a record a delivery claimed again
        since the operator read it has another owner and stays. The admin's
        forget action and ``dedup_forget`` use this, so that a finished message
        can run again on purpose (:data:`dedup_celery.states.FORGETTABLE`).
        """
        raise self._missing("forget")

    def fail(self, claim: Claim) -> bool:
        """Turn *claim*'s PROCESSING record into a FAILED one until RECORD_TTL.

        Must be atomic and conditioned on the owner token. The record keeps the
        task id and attempt, so a stale copy of the same delivery is skipped,
        while a retry (a higher attempt) or another task id claims it.
        """
        raise self._missing("fail")

    def renew(self, claim: Claim) -> bool:
        """Extend *claim*'s lease to now + lease; False if it no longer owns the record.

        Must be atomic and conditioned on the owner token and PROCESSING.
        """
        raise self._missing("renew")

    def expire_lease(self, scope: str, key_digest: str, owner: str) -> bool:
        """End the lease of a PROCESSING record owned by *owner* now (its owner is gone).

        Must be atomic and conditioned on the owner token. The next claim then
        takes the record over, and counts the takeover.
        """
        raise self._missing("expire_lease")

    def expire_lease_of_process(
        self, scope: str, key_digest: str, task_id: str, identity: OwnerIdentity
    ) -> bool:
        """End the lease of the PROCESSING record that *identity*'s process holds for *task_id*.

        For the worker's main process, which saw that child die but never knew
        its owner token. Must be atomic and conditioned on the task id and the
        whole identity (host, pid, process start, boot id, pid namespace).
        """
        raise self._missing("expire_lease_of_process")

    def get(self, scope: str, key_digest: str) -> Record | None:
        """Return the record for (scope, key digest), or None. Read only."""
        raise self._missing("get")

    def peek(self, scope: str, key_digest: str) -> Record | None:
        """:meth:`get`, for a producer (``dedup_on_enqueue``), wherever the caller is.

        A store shared with the caller's own work must not let a failed read
        change it (the database backend reads in a savepoint when the caller is
        inside a transaction). The default is :meth:`get`.
        """
        return self.get(scope, key_digest)

    def count_payload_mismatch(self, scope: str, key_digest: str) -> bool:
        """Add one to the record's ``payload_mismatches``; return whether a record was there.

        Called only for a duplicate whose payload differs from the record's, so
        the claim itself stays one step. Must be atomic (an increment in the
        store, never a read then a write) and must not create a record. The
        default keeps no count and returns False: the mismatch still has its
        log line and its signal.
        """
        return False

    def list_records(self, wanted: RecordFilter) -> RecordListing:
        """Return the records *wanted* names, newest first; read only.

        For operators: it may scan (Redis has no secondary index), so it is
        never called on a delivery's path.
        """
        raise self._missing("list_records")

    def purge_expired(
        self, *, batch_size: int = 1000, dry_run: bool = False, pause: float = 0.0
    ) -> int:
        """Delete records whose ``expires_at`` has passed; return how many.

        Each delete re-checks the expiry inside the delete itself, so a record
        renewed or taken over meanwhile survives. With *dry_run*, count only.
        *pause* is a sleep between batches, to spare the store's other users.
        """
        raise self._missing("purge_expired")

    def describe(self) -> str:
        """Return a short human description of where records live (for logs and commands)."""
        return type(self).__name__

    def check(self) -> list[Any]:
        """Return Django system check messages about this store (``dedup_celery.E0xx/W0xx``).

        Called by the system checks once the settings are valid. It may talk to
        the store; a store that cannot be reached gives no message here.
        """
        return []

    def ready_problems(self) -> list[str]:
        """Return problems to log at ERROR when a worker starts (for example a missing table)."""
        return []


class TransactionalClaim:
    """One transactional claim in its open transaction: what the claim found, and what to store.

    Set :attr:`result` (a JSON-ready value) inside the block to store it on the
    record before COMMIT.
    """

    def __init__(self, outcome: ClaimOutcome) -> None:
        self.outcome = outcome
        self.result: Any = None


class TransactionalBackend(BaseBackend):
    """A backend whose store is the body's database: the claim and the body share a transaction.

    Only subclasses of this class run ``dedup_transactional=True`` tasks.
    """

    def transactional_claim(self, claim: Claim) -> AbstractContextManager[TransactionalClaim]:
        """Open a transaction, claim inside it, and COMMIT when the block ends.

        The claim inserts a CONSUMED record, or counts the duplicate; it never
        waits for a copy whose transaction is still open (that is
        :attr:`Verdict.IN_FLIGHT` with ``record=None``). The body runs inside the
        block. Raises:

        * :class:`~dedup_celery.exceptions.OuterTransactionError` before
          anything, if a transaction is already open where this one would be;
        * :class:`~dedup_celery.exceptions.StorageError` if opening, the claim,
          storing the result or COMMIT fails (nothing is committed then);
        * :class:`~dedup_celery.exceptions.DedupError` if the body caught a
          database error and returned, leaving the transaction able only to
          roll back;
        * whatever the body raised, unchanged, after the rollback.
        """
        raise self._missing("transactional_claim")


__all__ = [
    "RECORD_FIELDS",
    "BaseBackend",
    "Claim",
    "ClaimOutcome",
    "OwnerIdentity",
    "Record",
    "Status",
    "TransactionalBackend",
    "TransactionalClaim",
    "Verdict",
    "claimant_values",
    "first_claim_outcome",
    "first_claim_record",
    "outcome_for",
]
