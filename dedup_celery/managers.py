"""Queries on the message table: the portable claim, owner-conditioned updates, expiry.

The portable claim is the database backend's path on MySQL and MariaDB (and
anywhere ``INSERT … ON CONFLICT … RETURNING`` is missing): an insert, then
conditional updates, each atomic on its own, so the row count of each statement
decides, never a value read earlier.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from django.db import IntegrityError, models, transaction
from django.db.models import BooleanField, Case, F, Q, Value, When

from dedup_celery.backends.base import (
    Claim,
    ClaimOutcome,
    Record,
    Verdict,
    claimant_values,
    outcome_for,
)
from dedup_celery.clock import NowPlus, StoreNow
from dedup_celery.exceptions import StorageError
from dedup_celery.states import Status, retention

if TYPE_CHECKING:
    from dedup_celery.models import DedupRecord


class DedupRecordQuerySet(models.QuerySet["DedupRecord"]):
    """The message table's queries; use ``DedupRecord.objects.using(alias)``."""

    def for_key(self, scope: str, key_digest: str) -> DedupRecordQuerySet:
        """The record of (scope, key digest), if any."""
        return self.filter(scope=scope, key_digest=key_digest)

    def held_by(self, scope: str, key_digest: str, owner: str) -> DedupRecordQuerySet:
        """The record of (scope, key digest) if *owner* still holds it, in any state."""
        return self.for_key(scope, key_digest).filter(owner=uuid.UUID(owner))

    def owned(self, scope: str, key_digest: str, owner: str) -> DedupRecordQuerySet:
        """The PROCESSING record of (scope, key digest) if *owner* still holds it."""
        return self.held_by(scope, key_digest, owner).filter(status=Status.PROCESSING)

    def expired(self) -> DedupRecordQuerySet:
        """Records whose ``expires_at`` has passed, by the database's clock."""
        return self.filter(expires_at__lt=StoreNow())

    def purgeable(self, record_ttl: float) -> DedupRecordQuerySet:
        """Expired records a purge may delete: their ``purge_after`` passed too.

        A PROCESSING record without ``purge_after`` (written before the column
        existed) waits *record_ttl* past its lease, so its takeovers count is
        not lost to a purge between a crash and the redelivery.
        """
        legacy = Q(purge_after__isnull=True) & (
            ~Q(status=Status.PROCESSING) | Q(expires_at__lt=NowPlus(-record_ttl))
        )
        return self.expired().filter(Q(purge_after__lt=StoreNow()) | legacy)

    def with_lease_expired(self) -> DedupRecordQuerySet:
        """Annotate ``lease_expired``: ``expires_at`` has passed, by the database's clock."""
        return self.annotate(
            lease_expired=Case(
                When(expires_at__lt=StoreNow(), then=Value(True)),
                default=Value(False),
                output_field=BooleanField(),
            )
        )

    def claim_fields(
        self, claim: Claim, *, transactional: bool, status: Status | None = None
    ) -> dict[str, Any]:
        """The fields a claim (or takeover, or a producer's QUEUED marker) sets, for the ORM."""
        if status is None:
            status = Status.CONSUMED if transactional else Status.PROCESSING
        fields = claimant_values(claim, status)
        fields["owner"] = uuid.UUID(claim.owner)
        seconds = claim.record_ttl if transactional else claim.lease_seconds
        fields.update(
            updated_at=StoreNow(),
            expires_at=NowPlus(seconds),
            purge_after=NowPlus(retention(seconds, claim.record_ttl)),
            consumed_at=StoreNow() if transactional else None,
            heartbeat_at=None,
            result=None,
        )
        return fields

    def claim_portable(
        self, claim: Claim, *, transactional: bool, status: Status | None = None
    ) -> ClaimOutcome:
        """Claim in statements that every database runs (see the module docstring).

        *status* QUEUED writes a producer's marker instead (``dedup_on_enqueue``).
        """
        fields = self.claim_fields(claim, transactional=transactional, status=status)
        key = {"scope": claim.scope, "key_digest": claim.key_digest}
        record = self.for_key(claim.scope, claim.key_digest)
        not_mine = ~Q(owner=uuid.UUID(claim.owner))
        expired = Q(expires_at__lt=StoreNow())
        processing = Q(status=Status.PROCESSING)
        stale = (
            Q(status=Status.FAILED)
            & ~expired
            & Q(task_id=claim.task_id, attempt__gte=claim.attempt)
        )
        for _ in range(3):
            try:
                with transaction.atomic(using=self.db):
                    self.create(**key, created_at=StoreNow(), **fields)
            except IntegrityError:
                pass
            else:
                created = self.fetch(claim.scope, claim.key_digest)
                if created is None:
                    raise StorageError("the record this claim created was deleted at once")
                return outcome_for(claim, created)
            # Only a delivery takes over (or poisons) a lapsed lease, never a producer's marker.
            delivery = fields["status"] != Status.QUEUED
            claimed = delivery and record.filter(
                not_mine & processing & expired & Q(takeovers__lt=claim.max_takeovers)
            ).update(takeovers=F("takeovers") + 1, **fields)
            if not claimed:
                fresh = (
                    Q(status__in=[Status.CONSUMED, Status.POISONED, Status.QUEUED]) & expired
                    | Q(status=Status.FAILED) & ~stale
                )
                if fields["status"] != Status.QUEUED:
                    # A delivery of the task id that queued the message (sql.claim_sql's adopt).
                    fresh |= Q(status=Status.QUEUED, task_id=claim.task_id)
                claimed = record.filter(not_mine & fresh).update(takeovers=0, **fields)
            poisoned_now = False
            if not claimed and delivery:
                poisoned_now = bool(
                    record.filter(
                        not_mine & processing & expired & Q(takeovers__gte=claim.max_takeovers)
                    ).update(
                        status=Status.POISONED,
                        expires_at=NowPlus(claim.record_ttl),
                        updated_at=StoreNow(),
                    )
                )
            if not claimed and not poisoned_now:
                counted = self._count_duplicate(record.filter(not_mine), claim.task_id)
                if counted is not None:
                    found = self.fetch(claim.scope, claim.key_digest)
                    if found is not None:
                        return ClaimOutcome(verdict=counted, record=found)
            found = self.fetch(claim.scope, claim.key_digest)
            if found is not None:
                return outcome_for(claim, found, changed_now=poisoned_now)
            # Purged or released between the statements: claim again.
        raise StorageError("the record kept disappearing while it was being claimed")

    @staticmethod
    def _count_duplicate(rows: DedupRecordQuerySet, task_id: str) -> Verdict | None:
        """Count a duplicate (of task id *task_id*) on the record as it is now; return its verdict.

        One conditioned UPDATE per status, so the counter and the verdict come
        from the same state of the row: a copy that met a PROCESSING record is
        rescheduled (and counted so) even if the record is CONSUMED by the time
        it is read back. None: no row of another owner was there to count on.
        """
        duplicate = {"last_duplicate_at": StoreNow(), "last_duplicate_task_id": task_id}
        if rows.filter(status__in=[Status.PROCESSING, Status.QUEUED]).update(
            rescheduled=F("rescheduled") + 1, **duplicate
        ):
            return Verdict.IN_FLIGHT
        for status, verdict in (
            (Status.CONSUMED, Verdict.CONSUMED),
            (Status.FAILED, Verdict.STALE),
            (Status.POISONED, Verdict.POISONED),
        ):
            if rows.filter(status=status).update(skipped=F("skipped") + 1, **duplicate):
                return verdict
        return None

    def fetch(self, scope: str, key_digest: str, *, with_lease: bool = False) -> Record | None:
        """Return the :class:`~dedup_celery.backends.base.Record` of (scope, key), or None."""
        rows: DedupRecordQuerySet = self.for_key(scope, key_digest)
        if with_lease:
            rows = rows.with_lease_expired()
        obj: DedupRecord | None = rows.first()
        return None if obj is None else obj.as_record()
