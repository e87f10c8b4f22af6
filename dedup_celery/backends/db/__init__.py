"""The database backend: the message table is the ``DedupRecord`` model.

The statements live in :mod:`.sql`, the clock SQL in :mod:`dedup_celery.clock`,
the portable claim (MySQL, MariaDB) in :mod:`dedup_celery.managers`, and the
prepared-statement runner in :mod:`.connection`; this module holds the contract.
"""

from __future__ import annotations

import json
import random
import time
from contextlib import AbstractContextManager
from typing import Any, ClassVar

from django.core import checks
from django.db import IntegrityError, OperationalError, connections, router, transaction
from django.db.models import F

from dedup_celery.backends.base import (
    Claim,
    ClaimOutcome,
    OwnerIdentity,
    Record,
    RecordFilter,
    RecordListing,
    TransactionalBackend,
    TransactionalClaim,
    Verdict,
    claimant_tuple,
    first_claim_outcome,
    outcome_for,
)
from dedup_celery.backends.db import sql
from dedup_celery.backends.db.connection import execute, is_deadlock, storage_errors
from dedup_celery.backends.db.kept import KeptConnection
from dedup_celery.backends.db.rows import (
    claim_owner_param,
    created_at_of,
    owner_param,
    record_from_row,
)
from dedup_celery.backends.db.transactional import transactional_block
from dedup_celery.clock import SUPPORTED_VENDORS, NowPlus, StoreNow, now_plus_sql
from dedup_celery.conf import get_settings
from dedup_celery.exceptions import DedupConfigurationError
from dedup_celery.managers import DedupRecordQuerySet
from dedup_celery.models import DedupRecord
from dedup_celery.states import Status, retention

#: How often a status-mode portable claim (MySQL, MariaDB) that lost a deadlock runs again.
PORTABLE_DEADLOCK_RETRIES = 5

# Vendors that run the one-statement claim; the others take the portable path.
_UPSERT_VENDORS = ("postgresql", "sqlite")


def message_table_alias(database: str | None = None) -> str:
    """The database alias of the message table: *database*, or the router's choice for writes.

    The backend, the admin and the commands all use this alias.
    """
    return database or router.db_for_write(DedupRecord)


class DatabaseBackend(TransactionalBackend):
    """Stores message records in the ``DedupRecord`` table through the Django ORM's connections.

    ``DEDUP_CELERY['DATABASE']`` picks the alias; None lets the database routers
    choose (``db_for_write``). This is the only backend that supports
    transactional mode.
    """

    accepted_options: ClassVar[tuple[str, ...]] = ("prepare_statements", "keep_connection")
    table: ClassVar[str] = DedupRecord._meta.db_table

    def __init__(
        self,
        *,
        database: str | None = None,
        prepare_statements: bool = True,
        keep_connection: bool = True,
    ) -> None:
        """Create the backend; no I/O.

        *prepare_statements*: on PostgreSQL with psycopg 3, run the claim and the
        complete as server-side prepared statements, planned once per connection.
        Turn it off behind a connection pooler that cannot keep prepared statements
        (PgBouncer before 1.21 in transaction mode).

        *keep_connection*: on PostgreSQL, run status-mode claims and completes on
        a connection of the backend's own while Celery closes Django's around every
        task (:mod:`.kept`). False runs every statement on Django's connection.
        """
        for name, value in (
            ("prepare_statements", prepare_statements),
            ("keep_connection", keep_connection),
        ):
            if not isinstance(value, bool):
                raise DedupConfigurationError(
                    f"DEDUP_CELERY['OPTIONS']['{name}'] must be True or False, not {value!r}."
                )
        self.database_setting = database
        self.prepare_statements = prepare_statements
        self.keep_connection = keep_connection
        # SQL text per (vendor, statement, ...); built lazily because __init__ does no I/O.
        self._sql: dict[tuple[Any, ...], str] = {}
        # Tests set this to run the portable path on PostgreSQL and SQLite too.
        self._force_generic = False
        self._kept_connection: KeptConnection | None = None

    def _kept_for(self, alias: str) -> KeptConnection:
        """The kept connection (:mod:`.kept`) to *alias*, replaced when the alias changes."""
        kept = self._kept_connection
        if kept is None or kept.alias != alias:
            if kept is not None:
                kept.close()
            kept = self._kept_connection = KeptConnection(alias)
        return kept

    # -- where and how -------------------------------------------------------------

    @property
    def alias(self) -> str:
        """The database alias the message table lives in (asked of the routers every time)."""
        return message_table_alias(self.database_setting)

    def describe(self) -> str:
        """Name the database the records are in."""
        return f"database {self.alias!r} (table {self.table})"

    def _records(self) -> DedupRecordQuerySet:
        return DedupRecord.objects.using(self.alias)

    def _upsert(self, connection: Any) -> bool:
        # The one-statement claim needs INSERT … RETURNING: SQLite has it from 3.35
        # only, and Django 5.2 still runs on 3.31.
        return (
            not self._force_generic
            and connection.vendor in _UPSERT_VENDORS
            and connection.features.can_return_columns_from_insert
        )

    def _statement(self, connection: Any, name: str, *args: Any, **options: Any) -> str:
        # Each call site passes its options in one order, so this key is stable.
        cache_key = (connection.vendor, name, *args, *options.items())
        text = self._sql.get(cache_key)
        if text is None:
            qn = connection.ops.quote_name
            build = getattr(sql, f"{name}_sql")
            text = build(connection.vendor, qn, qn(self.table), *args, **options)
            self._sql[cache_key] = text
        return text

    # -- claims -------------------------------------------------------------------

    def _claim(
        self,
        claim: Claim,
        *,
        transactional: bool,
        gone_owner: str | None = None,
        status: Status | None = None,
    ) -> ClaimOutcome:
        connection = connections[self.alias]
        if not self._upsert(connection):
            return self._claim_portable(
                claim, connection, transactional=transactional, status=status
            )
        kept = not transactional and self._use_kept(connection)
        if status is None:
            status = Status.CONSUMED if transactional else Status.PROCESSING
        params = self._claim_params(claim, connection, status, transactional=transactional)
        if gone_owner is None:
            # A key's first delivery is the common case: insert, or do nothing.
            first = self._statement(connection, "first_claim", transactional=transactional)
            row = self._execute(connection, first, params, fetch=True, kept=kept, resend=True)
            if row is not None:
                created_at = row[0]
                return first_claim_outcome(claim, status.value, lambda: created_at_of(created_at))
        # The key has a record (or, transactional, a copy's open transaction): decide on it.
        text = self._statement(
            connection,
            "claim",
            transactional=transactional,
            max_takeovers=claim.max_takeovers,
            record_ttl=claim.record_ttl,
        )
        if connection.vendor == "postgresql" and not transactional:
            gone = None if gone_owner is None else owner_param(gone_owner, connection)
            params += [gone] * sql.GONE_OWNER_SLOTS
        # Not sent again after a lost connection: a duplicate it counted, or a poisoning
        # it did, would be counted twice, and the poisoning seen as someone else's.
        row = self._execute(connection, text, params, fetch=True, kept=kept, resend=False)
        if row is None:
            return ClaimOutcome(verdict=Verdict.IN_FLIGHT, record=None)
        values = dict(zip(sql.CLAIM_RETURNING, row, strict=True))
        changed_now = bool(values.pop("changed_now"))
        return outcome_for(claim, record_from_row(values), changed_now=changed_now)

    def _claim_portable(
        self,
        claim: Claim,
        connection: Any,
        *,
        transactional: bool,
        status: Status | None = None,
    ) -> ClaimOutcome:
        """The portable claim (:mod:`dedup_celery.managers`), run again after a deadlock.

        Copies that insert and count one key at once can deadlock on InnoDB's
        unique index. In status mode each of the portable claim's statements is a
        transaction of its own and every one is conditioned on the row's state,
        so the victim runs the claim again. Inside a transaction (transactional
        mode, a caller's atomic block, or autocommit turned off) InnoDB rolled
        all of it back, so the error goes up (the delivery is rescheduled).
        """
        records = self._records()
        attempt = 0
        while True:
            try:
                return records.claim_portable(claim, transactional=transactional, status=status)
            except OperationalError as exc:
                if (
                    transactional
                    or connection.in_atomic_block
                    or not connection.get_autocommit()
                    or not is_deadlock(exc)
                    or attempt == PORTABLE_DEADLOCK_RETRIES
                ):
                    raise
            attempt += 1
            time.sleep(random.uniform(0, 0.01 * attempt))

    @staticmethod
    def _claim_params(
        claim: Claim, connection: Any, status: Status, *, transactional: bool
    ) -> list[Any]:
        """The parameters both claim statements share (:func:`.sql.claim_sql`).

        In the columns' order, built positionally: scope, the display key, the
        key digest, the claimant's fields up to its identity, the lease
        (``expires_at``), the payload digest, the retention (``purge_after``).
        """
        vendor = connection.vendor
        key, status_value, owner, *identity, payload_digest = claimant_tuple(claim, status.value)
        params = [
            claim.scope,
            key,
            claim.key_digest,
            status_value,
            claim_owner_param(owner, connection),
            *identity,
        ]
        seconds = claim.record_ttl if transactional else claim.lease_seconds
        params += now_plus_sql(vendor, seconds)[1]
        params.append(payload_digest)
        params += now_plus_sql(vendor, retention(seconds, claim.record_ttl))[1]
        if vendor == "postgresql" and transactional:
            params.append(sql.advisory_lock_key(claim.scope, claim.key_digest))
        return params

    def _execute(
        self,
        connection: Any,
        text: str,
        params: list[Any],
        *,
        fetch: bool,
        kept: bool,
        resend: bool = False,
    ) -> Any:
        """Run a hot-path statement on Django's *connection*, or with *kept* on the kept one.

        Both are connections to one alias with one engine, so the statement and
        its parameters built for either fit the other. *resend*: see
        :meth:`.kept.KeptConnection.execute`.
        """
        if kept:
            return self._kept_for(connection.alias).execute(
                text, params, fetch=fetch, prepare=self.prepare_statements, resend=resend
            )
        return execute(connection, text, params, fetch=fetch, prepare=self.prepare_statements)

    @storage_errors
    def claim(self, claim: Claim) -> ClaimOutcome:
        """Claim in status mode (see :meth:`BaseBackend.claim`)."""
        return self._claim(claim, transactional=False)

    @storage_errors
    def queue(self, claim: Claim) -> ClaimOutcome | None:
        """Write a producer's QUEUED marker (see :meth:`BaseBackend.queue`) in autocommit.

        None when it cannot be written outside the caller's transaction: the
        caller is inside an atomic block on the message table's alias (or turned
        autocommit off), where the marker would commit with the caller, and a
        delivery's claim would wait for that commit.
        """
        connection = connections[self.alias]
        in_transaction = connection.in_atomic_block or not connection.get_autocommit()
        if in_transaction and not self._use_kept(connection):
            return None
        return self._claim(claim, transactional=False, status=Status.QUEUED)

    @storage_errors
    def take_over(self, claim: Claim, gone_owner: str) -> ClaimOutcome:
        """Claim, counting *gone_owner*'s lease as expired (see :meth:`BaseBackend.take_over`).

        On PostgreSQL this is one statement; elsewhere it ends the lease, then claims.
        """
        if connections[self.alias].vendor != "postgresql" or not self._upsert(
            connections[self.alias]
        ):
            return super().take_over(claim, gone_owner)
        return self._claim(claim, transactional=False, gone_owner=gone_owner)

    def _use_kept(self, django_connection: Any) -> bool:
        return self.keep_connection and self._kept_for(django_connection.alias).wanted(
            django_connection
        )

    def close(self) -> None:
        """Close the backend's kept connection (:mod:`.kept`); Django's are Django's to close."""
        if self._kept_connection is not None:
            self._kept_connection.close()

    def claim_in_transaction(self, claim: Claim) -> ClaimOutcome:
        """Insert a CONSUMED record in the open transaction, or count the duplicate."""
        return self._claim(claim, transactional=True)

    def transactional_claim(self, claim: Claim) -> AbstractContextManager[TransactionalClaim]:
        """Claim and run the body in one ``transaction.atomic`` on the message table's alias.

        On PostgreSQL a copy whose transaction is still open makes the claim
        :attr:`Verdict.IN_FLIGHT` at once (``pg_try_advisory_xact_lock``);
        SQLite serialises writers, and MySQL waits for the row lock up to
        ``innodb_lock_wait_timeout``. See
        :meth:`TransactionalBackend.transactional_claim` for the errors, and
        :func:`.transactional.transactional_block` for how.
        """
        return transactional_block(self, claim)

    def still_holds(self, claim: Claim) -> bool:
        """True if the open transaction still holds *claim*'s record (one round trip, MySQL).

        InnoDB rolls back a deadlock victim's whole transaction, claim row
        included, but a body that catches the error leaves Django's atomic block
        unaware, and its later statements run in a new transaction that would
        COMMIT alone. Django's MySQL backend counts found rows, so the no-op
        UPDATE says 1 if the row is there. PostgreSQL needs no such statement
        (:func:`~dedup_celery.backends.db.connection.transaction_broken`).
        """
        rows = self._records().held_by(claim.scope, claim.key_digest, claim.owner)
        return bool(rows.update(updated_at=F("updated_at")))

    def store_result(self, claim: Claim, result: Any) -> None:
        """Store *result* on the record *claim* owns (inside its open transaction)."""
        self._records().held_by(claim.scope, claim.key_digest, claim.owner).update(result=result)

    # -- the owner's transitions -----------------------------------------------------

    @storage_errors
    def complete(self, claim: Claim, result: Any) -> bool:
        """Mark the record CONSUMED if *claim* still owns it (see :meth:`BaseBackend.complete`)."""
        connection = connections[self.alias]
        if not self._upsert(connection):
            updated = (
                self._records()
                .held_by(claim.scope, claim.key_digest, claim.owner)
                .update(
                    status=Status.CONSUMED,
                    expires_at=NowPlus(claim.record_ttl),
                    consumed_at=StoreNow(),
                    updated_at=StoreNow(),
                    result=result,
                )
            )
        else:
            updated = self._execute(
                connection,
                self._statement(connection, "complete"),
                [
                    Status.CONSUMED.value,
                    *now_plus_sql(connection.vendor, claim.record_ttl)[1],
                    None if result is None else json.dumps(result),
                    claim.scope,
                    claim.key_digest,
                    claim_owner_param(claim.owner, connection),
                ],
                fetch=False,
                kept=self._use_kept(connection),
                resend=True,
            )
        if updated:
            return True
        # The record is gone (purged or released after the lease expired) or
        # someone else owns it. Recreate it only if it is gone.
        records = self._records()
        fields = records.claim_fields(claim, transactional=True)
        fields["result"] = result
        try:
            with transaction.atomic(using=self.alias):
                records.create(
                    scope=claim.scope, key_digest=claim.key_digest, created_at=StoreNow(), **fields
                )
        except IntegrityError:
            return False
        return True

    @storage_errors
    def release(self, scope: str, key_digest: str, owner: str, *, expired_only: bool) -> bool:
        """Compare-and-delete a PROCESSING or POISONED record (see :meth:`BaseBackend.release`)."""
        connection = connections[self.alias]
        text = self._statement(connection, "release", expired_only=expired_only)
        with connection.cursor() as cursor:
            cursor.execute(text, [scope, key_digest, owner_param(owner, connection)])
            return bool(cursor.rowcount == 1)

    @storage_errors
    def forget(self, scope: str, key_digest: str, owner: str) -> bool:
        """Compare-and-delete a CONSUMED or FAILED record (see :meth:`BaseBackend.forget`)."""
        connection = connections[self.alias]
        text = self._statement(connection, "forget")
        with connection.cursor() as cursor:
            cursor.execute(text, [scope, key_digest, owner_param(owner, connection)])
            return bool(cursor.rowcount == 1)

    @storage_errors
    def fail(self, claim: Claim) -> bool:
        """Leave a FAILED record for stale copies to meet (see :meth:`BaseBackend.fail`)."""
        return bool(
            self._records()
            .owned(claim.scope, claim.key_digest, claim.owner)
            .update(
                status=Status.FAILED, expires_at=NowPlus(claim.record_ttl), updated_at=StoreNow()
            )
        )

    @storage_errors
    def renew(self, claim: Claim) -> bool:
        """Extend the lease while the owner still holds it (see :meth:`BaseBackend.renew`)."""
        return bool(
            self._records()
            .owned(claim.scope, claim.key_digest, claim.owner)
            .update(
                expires_at=NowPlus(claim.lease_seconds),
                # The record outlives the renewed lease by RECORD_TTL, as after a claim.
                purge_after=NowPlus(retention(claim.lease_seconds, claim.record_ttl)),
                heartbeat_at=StoreNow(),
            )
        )

    @storage_errors
    def expire_lease(self, scope: str, key_digest: str, owner: str) -> bool:
        """End a gone owner's lease now (see :meth:`BaseBackend.expire_lease`)."""
        # A millisecond in the past, so the next statement sees it expired even
        # on a clock (SQLite's) that only counts milliseconds.
        return bool(
            self._records().owned(scope, key_digest, owner).update(expires_at=NowPlus(-0.001))
        )

    @storage_errors
    def expire_lease_of_process(
        self, scope: str, key_digest: str, task_id: str, identity: OwnerIdentity
    ) -> bool:
        """End the lease a dead child held (see :meth:`BaseBackend.expire_lease_of_process`)."""
        return bool(
            self._records()
            .for_key(scope, key_digest)
            .filter(
                status=Status.PROCESSING,
                task_id=task_id,
                hostname=identity.hostname,
                pid=identity.pid,
                process_start=identity.process_start,
                boot_id=identity.boot_id,
                pid_namespace=identity.pid_namespace,
            )
            .update(expires_at=NowPlus(-0.001))
        )

    # -- reading and purging ---------------------------------------------------------

    @storage_errors
    def get(self, scope: str, key_digest: str) -> Record | None:
        """Return the record with a ``lease_expired`` flag computed by the database."""
        return self._records().fetch(scope, key_digest, with_lease=True)

    @storage_errors
    def peek(self, scope: str, key_digest: str) -> Record | None:
        """:meth:`get`, in a savepoint when the caller is inside a transaction on the alias.

        A read that fails (a missing table, a cancelled statement) then rolls
        back only its savepoint, not the caller's transaction on PostgreSQL.
        """
        alias = self.alias
        if not connections[alias].in_atomic_block:
            return self._records().fetch(scope, key_digest, with_lease=True)
        with transaction.atomic(using=alias):
            return self._records().fetch(scope, key_digest, with_lease=True)

    @storage_errors
    def count_payload_mismatch(self, scope: str, key_digest: str) -> bool:
        """One ``UPDATE … SET payload_mismatches = payload_mismatches + 1`` on the record."""
        rows = self._records().for_key(scope, key_digest)
        return bool(rows.update(payload_mismatches=F("payload_mismatches") + 1))

    @storage_errors
    def list_records(self, wanted: RecordFilter) -> RecordListing:
        """The records *wanted* names, newest first, in one query.

        No index is kept for it (every claim would pay for one): on a large
        table it reads the whole table.
        """
        rows = self._records().with_lease_expired()
        if wanted.status:
            rows = rows.filter(status=wanted.status)
        if wanted.scope:
            rows = rows.filter(scope=wanted.scope)
        if wanted.task_name:
            rows = rows.filter(task_name=wanted.task_name)
        if wanted.older_than is not None:
            rows = rows.filter(created_at__lt=NowPlus(-wanted.older_than))
        found = [obj.as_record() for obj in rows.order_by("-created_at")[: wanted.limit + 1]]
        return RecordListing(found[: wanted.limit], truncated=len(found) > wanted.limit)

    @storage_errors
    def purge_expired(
        self, *, batch_size: int = 1000, dry_run: bool = False, pause: float = 0.0
    ) -> int:
        """Delete due records in batches of *batch_size*, each in its own short statement.

        Due: ``expires_at`` and ``purge_after`` passed. A PROCESSING record
        written before ``purge_after`` existed is kept until RECORD_TTL past
        its lease instead.

        *pause* seconds between batches lets the WAL of a large purge drain, so
        the commits of claims running meanwhile are not held up behind it.
        """
        records = self._records()
        ttl = get_settings().record_ttl
        if dry_run:
            return records.purgeable(ttl).count()
        connection = connections[self.alias]
        total = 0
        while True:
            ids = list(
                records.purgeable(ttl)
                .order_by("expires_at")
                .values_list("pk", flat=True)[:batch_size]
            )
            if not ids:
                return total
            qn = connection.ops.quote_name
            text = sql.purge_sql(connection.vendor, qn, qn(self.table), len(ids))
            with connection.cursor() as cursor:
                cursor.execute(text, ids)
                total += int(cursor.rowcount)
            if len(ids) < batch_size:
                return total
            if pause:
                time.sleep(pause)

    # -- checks ----------------------------------------------------------------------

    def check(self) -> list[Any]:
        """Report a database this backend cannot keep records in (``dedup_celery.E010``)."""
        vendor = connections[self.alias].vendor
        if vendor in SUPPORTED_VENDORS:
            return []
        return [
            checks.Error(
                f"The message table's database {self.alias!r} is {vendor!r}; the database "
                "backend supports PostgreSQL, SQLite and MySQL/MariaDB.",
                hint="Point DEDUP_CELERY['DATABASE'] at a supported database, or use "
                "DEDUP_CELERY['BACKEND'] = 'redis'.",
                id="dedup_celery.E010",
            )
        ]

    def table_exists(self) -> bool:
        """True if the message table exists on the backend's database (one catalogue query)."""
        connection = connections[self.alias]
        with connection.cursor() as cursor:
            tables = connection.introspection.table_names(cursor)
        return self.table in tables

    def ready_problems(self) -> list[str]:
        """Say, when a worker starts, that the message table is missing."""
        if self.table_exists():
            return []
        return [
            f"the message table does not exist in the {self.describe()}. Every DedupTask "
            "message is rescheduled until you run 'python manage.py migrate dedup_celery'."
        ]


__all__ = ["DatabaseBackend", "NowPlus", "message_table_alias"]
