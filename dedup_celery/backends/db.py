"""The database backend: the message table is the ``DedupRecord`` model.

On PostgreSQL and SQLite a claim is one ``INSERT … ON CONFLICT DO UPDATE …
RETURNING`` statement that claims, takes over or counts the duplicate, decided
by the database on the row it locked. On other databases (MySQL, MariaDB) it is
an insert, then a conditional update, each atomic on its own: the row count of
each statement decides, never a value read earlier.

Every time is computed by the database (``STATEMENT_TIMESTAMP()`` on
PostgreSQL, ``STRFTIME(…, 'NOW')`` on SQLite, ``CURRENT_TIMESTAMP(6)`` on MySQL).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

from django.conf import settings
from django.db import Error, IntegrityError, connections, router, transaction
from django.db.models import (
    BooleanField,
    Case,
    DateTimeField,
    F,
    Func,
    PositiveIntegerField,
    Q,
    Value,
    When,
)
from django.db.models.functions import Now
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from dedup_celery.backends.base import (
    BaseBackend,
    Claim,
    ClaimOutcome,
    OwnerIdentity,
    Record,
    Status,
    Verdict,
    outcome_for,
)
from dedup_celery.exceptions import DedupConfigurationError, MissingTableError, StorageError
from dedup_celery.keys import display_key
from dedup_celery.models import DedupRecord

T = TypeVar("T")

try:  # psycopg 3, for server-side prepared statements; psycopg2 works without them.
    import psycopg as _psycopg
except ImportError:  # pragma: no cover - depends on the installed driver
    _psycopg = None

# Columns a claim writes, in the order of the INSERT (and of :class:`Record`).
_CLAIM_COLUMNS = (
    "scope",
    "key",
    "key_digest",
    "status",
    "owner",
    "task_id",
    "task_name",
    "attempt",
    "hostname",
    "pid",
    "process_start",
    "boot_id",
    "pid_namespace",
    "created_at",
    "updated_at",
    "expires_at",
    "consumed_at",
    "heartbeat_at",
    "skipped",
    "rescheduled",
    "takeovers",
    "last_duplicate_at",
    "result",
    "payload_digest",
)
# Columns a takeover replaces with the new claim's values.
_TAKEOVER_COLUMNS = (
    "key",
    "status",
    "owner",
    "task_id",
    "task_name",
    "attempt",
    "hostname",
    "pid",
    "process_start",
    "boot_id",
    "pid_namespace",
    "updated_at",
    "expires_at",
    "consumed_at",
    "heartbeat_at",
    "result",
    "payload_digest",
)
# Columns every read returns: the same, which is also the order of :class:`Record`.
_RECORD_COLUMNS = _CLAIM_COLUMNS
_DATETIME_COLUMNS = frozenset(
    ("created_at", "updated_at", "expires_at", "consumed_at", "heartbeat_at", "last_duplicate_at")
)

_PQTRANS_INERROR = 3

_NOW_SQL = {
    "postgresql": "STATEMENT_TIMESTAMP()",
    "sqlite": "STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'NOW')",
    "mysql": "CURRENT_TIMESTAMP(6)",
}


def now_sql(vendor: str) -> str:
    """Return the SQL for "now" on the database's own clock, with ``%`` escaped for params."""
    try:
        return _NOW_SQL[vendor]
    except KeyError:
        raise StorageError(
            f"dedup_celery's database backend supports PostgreSQL, SQLite and MySQL/MariaDB, "
            f"not {vendor!r}. Use another backend (DEDUP_CELERY['BACKEND'])."
        ) from None


def now_plus_literal(vendor: str, seconds: float) -> str:
    """Return SQL for "now + *seconds*" with the number written into the text.

    Only for numbers that come from settings (never from a message).
    """
    seconds = float(seconds)
    if vendor == "postgresql":
        return f"(STATEMENT_TIMESTAMP() + MAKE_INTERVAL(secs => {seconds!r}))"
    if vendor == "sqlite":
        return f"STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'NOW', '{seconds:+.6f} seconds')"
    if vendor == "mysql":
        return f"(CURRENT_TIMESTAMP(6) + INTERVAL {round(seconds * 1_000_000)} MICROSECOND)"
    now_sql(vendor)  # raises the "unsupported database" error
    raise AssertionError("unreachable")


def now_plus_sql(vendor: str, seconds: float) -> tuple[str, list[Any]]:
    """Return SQL and params for "now + *seconds*" on the database's clock."""
    if vendor == "postgresql":
        return "(STATEMENT_TIMESTAMP() + MAKE_INTERVAL(secs => %s))", [float(seconds)]
    if vendor == "sqlite":
        return "STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'NOW', %s)", [f"{float(seconds):+.6f} seconds"]
    if vendor == "mysql":
        return "(CURRENT_TIMESTAMP(6) + INTERVAL %s MICROSECOND)", [round(seconds * 1_000_000)]
    now_sql(vendor)  # raises the "unsupported database" error
    raise AssertionError("unreachable")


class NowPlus(Func):
    """``now + seconds`` on the database's clock, as an ORM expression."""

    output_field = DateTimeField()

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = float(seconds)

    def as_sql(self, compiler: Any, connection: Any, **extra_context: Any) -> tuple[str, list]:
        """Compile to the vendor's own interval arithmetic."""
        return now_plus_sql(connection.vendor, self.seconds)


# Prepared statements run on the driver's own cursor, whose errors Django does not wrap.
_DRIVER_ERRORS: tuple[type[Exception], ...] = (
    (Error,) if _psycopg is None else (Error, _psycopg.Error)
)


def _storage_errors(method: Callable[..., T]) -> Callable[..., T]:
    """Turn a database error into :class:`StorageError`, keeping the original as the cause."""

    @functools.wraps(method)
    def wrapper(self: DatabaseBackend, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except _DRIVER_ERRORS as exc:
            connection = connections[self.alias]
            if not connection.in_atomic_block:
                # Drop a broken connection now, so a retry opens a fresh one.
                connection.close_if_unusable_or_obsolete()
            if _is_missing_table(exc):
                raise MissingTableError(
                    f"the message table {DedupRecord._meta.db_table} does not exist on database "
                    f"{self.alias!r}: run 'python manage.py migrate dedup_celery' "
                    f"(--database {self.alias} if it is not the default). ({exc})".strip()
                ) from exc
            raise StorageError(
                f"the message table on database {self.alias!r} failed: "
                f"{type(exc).__name__}: {exc}".strip()
            ) from exc

    return wrapper


def _is_missing_table(exc: Exception) -> bool:
    """True if *exc* says the message table does not exist (PostgreSQL, SQLite, MySQL)."""
    text = str(exc).lower()
    return DedupRecord._meta.db_table in text and (
        "does not exist" in text or "no such table" in text or "doesn't exist" in text
    )


def advisory_lock_key(scope: str, key_digest: str) -> int:
    """Return the signed 64-bit PostgreSQL advisory lock number for a (scope, key)."""
    digest = hashlib.sha256(f"dedup_celery\0{scope}\0{key_digest}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class DatabaseBackend(BaseBackend):
    """Stores message records in the ``DedupRecord`` table through the Django ORM's connections.

    ``DEDUP_CELERY['DATABASE']`` picks the alias; None lets the database routers
    choose (``db_for_write``). This is the only backend that supports
    transactional mode.
    """

    supports_transactional: ClassVar[bool] = True

    accepted_options: ClassVar[tuple[str, ...]] = ("prepare_statements",)

    def __init__(self, *, database: str | None = None, prepare_statements: bool = True) -> None:
        """Create the backend; no I/O.

        *prepare_statements*: on PostgreSQL with psycopg 3, run the claim and the
        complete as server-side prepared statements, planned once per connection.
        Turn it off behind a connection pooler that cannot keep prepared statements
        (PgBouncer before 1.21 in transaction mode).
        """
        super().__init__(database=database)
        if not isinstance(prepare_statements, bool):
            raise DedupConfigurationError(
                "DEDUP_CELERY['OPTIONS']['prepare_statements'] must be True or False."
            )
        self.prepare_statements = prepare_statements
        # SQL text per (vendor, mode, ...); built lazily because __init__ does no I/O.
        self._sql: dict[tuple[Any, ...], str] = {}
        self._force_generic = False

    # -- helpers -----------------------------------------------------------------

    @property
    def alias(self) -> str:
        """The database alias the message table lives in."""
        return self.database_setting or router.db_for_write(DedupRecord)

    def describe(self) -> str:
        """Name the database the records are in."""
        return f"database {self.alias!r} (table {DedupRecord._meta.db_table})"

    def _manager(self) -> Any:
        return DedupRecord._default_manager.using(self.alias)

    def _vendor(self, connection: Any) -> str:
        vendor = connection.vendor
        if self._force_generic or vendor not in ("postgresql", "sqlite"):
            return "generic"
        return vendor

    def _owner_param(self, owner: str, connection: Any) -> Any:
        field = DedupRecord._meta.get_field("owner")
        return field.get_db_prep_value(uuid.UUID(owner), connection)

    @staticmethod
    def _normalise_owner(value: Any) -> str | None:
        if value is None:
            return None
        return uuid.UUID(str(value)).hex

    @staticmethod
    def _to_datetime(value: Any) -> datetime.datetime | None:
        if value is None or isinstance(value, datetime.datetime):
            if value is not None and settings.USE_TZ and timezone.is_naive(value):
                value = timezone.make_aware(value, datetime.timezone.utc)
            return value
        parsed = parse_datetime(str(value))
        if parsed is not None and settings.USE_TZ and timezone.is_naive(parsed):
            parsed = timezone.make_aware(parsed, datetime.timezone.utc)
        return parsed

    def _record_from_row(self, row: dict[str, Any]) -> Record:
        values = dict(row)
        for name in _DATETIME_COLUMNS:
            values[name] = self._to_datetime(values.get(name))
        values["owner"] = self._normalise_owner(values.get("owner"))
        result = values.get("result")
        if isinstance(result, str):
            result = json.loads(result)
        values["result"] = result
        lease_expired = values.pop("lease_expired", None)
        return Record(
            **{name: values[name] for name in _RECORD_COLUMNS},
            lease_expired=None if lease_expired is None else bool(lease_expired),
        )

    def _record_from_model(self, obj: DedupRecord, lease_expired: bool | None) -> Record:
        values = {name: getattr(obj, name) for name in _RECORD_COLUMNS}
        values["owner"] = self._normalise_owner(values["owner"])
        return Record(**values, lease_expired=lease_expired)

    def _claim_values(self, claim: Claim, connection: Any, *, transactional: bool) -> list[Any]:
        ident = claim.identity
        return [
            claim.scope,
            display_key(claim.key),
            claim.key_digest,
            Status.CONSUMED.value if transactional else Status.PROCESSING.value,
            self._owner_param(claim.owner, connection),
            claim.task_id,
            claim.task_name[:255],
            claim.attempt,
            ident.hostname,
            ident.pid,
            ident.process_start,
            ident.boot_id,
            ident.pid_namespace,
        ]

    def _outcome(self, claim: Claim, record: Record, *, changed_now: bool = False) -> ClaimOutcome:
        return outcome_for(claim, record, changed_now=changed_now)

    # -- the upsert claim (PostgreSQL, SQLite) --------------------------------------

    def _upsert_sql(self, connection: Any, claim: Claim, *, transactional: bool) -> str:
        vendor = connection.vendor
        cache_key = (vendor, transactional, claim.max_takeovers, claim.record_ttl)
        sql = self._sql.get(cache_key)
        if sql is not None:
            return sql
        qn = connection.ops.quote_name

        def old(column: str) -> str:
            return f"r.{qn(column)}"

        def new(column: str) -> str:
            return f"excluded.{qn(column)}"

        now = now_sql(vendor)
        status = old("status")
        mine = f"{old('owner')} = {new('owner')}"
        expired = f"{old('expires_at')} < {now}"
        processing = f"{status} = '{Status.PROCESSING.value}'"
        stale = (
            f"({status} = '{Status.FAILED.value}' AND NOT ({expired}) AND "
            f"{old('task_id')} = {new('task_id')} AND {old('attempt')} >= {new('attempt')})"
        )
        take = (
            f"(NOT ({mine}) AND {processing} AND {expired} AND "
            f"{old('takeovers')} < {int(claim.max_takeovers)})"
        )
        poison = (
            f"(NOT ({mine}) AND {processing} AND {expired} AND "
            f"{old('takeovers')} >= {int(claim.max_takeovers)})"
        )
        fresh = (
            f"(NOT ({mine}) AND (({status} IN ('{Status.CONSUMED.value}', "
            f"'{Status.POISONED.value}') AND {expired}) OR ({status} = "
            f"'{Status.FAILED.value}' AND NOT {stale})))"
        )
        claimed = f"({take} OR {fresh})"
        dup = f"(NOT ({mine}) AND NOT {claimed} AND NOT {poison})"
        if vendor == "postgresql":
            assignments = self._pg_assignments(
                qn,
                old,
                new,
                now,
                take=take,
                fresh=fresh,
                poison=poison,
                mine=mine,
                processing=processing,
                poison_expiry=now_plus_literal(vendor, claim.record_ttl),
            )
        else:
            assignments = [
                f"{qn(col)} = CASE WHEN {claimed} THEN {new(col)} ELSE {old(col)} END"
                for col in _TAKEOVER_COLUMNS
                if col not in ("status", "expires_at", "updated_at")
            ]
            assignments += [
                f"{qn('status')} = CASE WHEN {claimed} THEN {new('status')} "
                f"WHEN {poison} THEN '{Status.POISONED.value}' ELSE {status} END",
                f"{qn('expires_at')} = CASE WHEN {claimed} THEN {new('expires_at')} "
                f"WHEN {poison} THEN {now_plus_literal(vendor, claim.record_ttl)} "
                f"ELSE {old('expires_at')} END",
                f"{qn('updated_at')} = CASE WHEN {claimed} OR {poison} THEN {now} "
                f"ELSE {old('updated_at')} END",
                f"{qn('takeovers')} = CASE WHEN {take} THEN {old('takeovers')} + 1 "
                f"WHEN {fresh} THEN 0 ELSE {old('takeovers')} END",
                f"{qn('skipped')} = {old('skipped')} + CASE WHEN {dup} AND NOT {processing} "
                "THEN 1 ELSE 0 END",
                f"{qn('rescheduled')} = {old('rescheduled')} + CASE WHEN {dup} AND "
                f"{processing} THEN 1 ELSE 0 END",
                f"{qn('last_duplicate_at')} = CASE WHEN {dup} THEN {now} "
                f"ELSE {old('last_duplicate_at')} END",
            ]
        result_col = f"{qn('result')}::text" if vendor == "postgresql" else qn("result")
        returning = [qn(c) for c in _RECORD_COLUMNS if c != "result"] + [
            f"{result_col} AS {qn('result')}",
            f"({qn('expires_at')} < {now}) AS {qn('lease_expired')}",
            f"({qn('updated_at')} = {now}) AS {qn('changed_now')}",
        ]
        # created_at, updated_at, expires_at (one parameter: the seconds),
        # consumed_at, then the fixed tail.
        expires, _ = now_plus_sql(vendor, 0)
        consumed = now if transactional else "NULL"
        tail = f"{now}, {now}, {expires}, {consumed}, NULL, 0, 0, 0, NULL, NULL, NULL"
        placeholders = ", ".join(["%s"] * 13) + ", " + tail
        table = qn(DedupRecord._meta.db_table)
        columns = ", ".join(qn(c) for c in _CLAIM_COLUMNS)
        if vendor == "postgresql" and transactional:
            # The advisory lock makes a copy in flight visible without waiting:
            # without the lock, the SELECT yields no row and nothing is inserted.
            # It is a transaction lock, so it ends with the body's transaction.
            source = f"SELECT {placeholders} WHERE pg_try_advisory_xact_lock(%s)"
        else:
            source = f"VALUES ({placeholders})"
        sql = (
            f"INSERT INTO {table} AS r ({columns}) {source} "
            f"ON CONFLICT ({qn('scope')}, {qn('key_digest')}) DO UPDATE SET "
            + ", ".join(assignments)
            + " RETURNING "
            + ", ".join(returning)
        )
        self._sql[cache_key] = sql
        return sql

    def _complete_sql(self, connection: Any) -> str:
        vendor = connection.vendor
        sql = self._sql.get((vendor, "complete"))
        if sql is None:
            qn = connection.ops.quote_name
            now = now_sql(vendor)
            expires, _ = now_plus_sql(vendor, 0)
            result = "%s::jsonb" if vendor == "postgresql" else "%s"
            sql = (
                f"UPDATE {qn(DedupRecord._meta.db_table)} SET {qn('status')} = %s, "
                f"{qn('expires_at')} = {expires}, {qn('consumed_at')} = {now}, "
                f"{qn('updated_at')} = {now}, {qn('result')} = {result} "
                f"WHERE {qn('scope')} = %s AND {qn('key_digest')} = %s AND {qn('owner')} = %s"
            )
            self._sql[(vendor, "complete")] = sql
        return sql

    @staticmethod
    def _pg_assignments(
        qn: Callable[[str], str],
        old: Callable[[str], str],
        new: Callable[[str], str],
        now: str,
        **decide: str,
    ) -> list[str]:
        """One multi-column SET whose decision is computed once, in a sub-select.

        PostgreSQL would otherwise parse and plan each decision again for every
        column it guards, which made the claim the slowest statement of a task.
        """
        d = decide
        columns = [c for c in _TAKEOVER_COLUMNS if c not in ("status", "expires_at", "updated_at")]
        values = [f"CASE WHEN d.claimed THEN {new(c)} ELSE {old(c)} END" for c in columns]
        columns += [
            "status",
            "expires_at",
            "updated_at",
            "takeovers",
            "skipped",
            "rescheduled",
            "last_duplicate_at",
        ]
        values += [
            f"CASE WHEN d.claimed THEN {new('status')} WHEN d.poison THEN "
            f"'{Status.POISONED.value}' ELSE {old('status')} END",
            f"CASE WHEN d.claimed THEN {new('expires_at')} WHEN d.poison THEN "
            f"{d['poison_expiry']} ELSE {old('expires_at')} END",
            f"CASE WHEN d.claimed OR d.poison THEN {now} ELSE {old('updated_at')} END",
            f"CASE WHEN d.take THEN {old('takeovers')} + 1 WHEN d.fresh THEN 0 "
            f"ELSE {old('takeovers')} END",
            f"{old('skipped')} + CASE WHEN d.dup AND NOT d.processing THEN 1 ELSE 0 END",
            f"{old('rescheduled')} + CASE WHEN d.dup AND d.processing THEN 1 ELSE 0 END",
            f"CASE WHEN d.dup THEN {now} ELSE {old('last_duplicate_at')} END",
        ]
        decision = (
            f"SELECT s.take, s.fresh, s.poison, s.processing, s.take OR s.fresh AS claimed, "
            f"NOT s.mine AND NOT (s.take OR s.fresh) AND NOT s.poison AS dup FROM (SELECT "
            f"{d['take']} AS take, {d['fresh']} AS fresh, {d['poison']} AS poison, "
            f"{d['mine']} AS mine, {d['processing']} AS processing) AS s"
        )
        return [
            f"({', '.join(qn(c) for c in columns)}) = (SELECT {', '.join(values)} "
            f"FROM ({decision}) AS d)"
        ]

    def _claim_upsert(self, claim: Claim, connection: Any, *, transactional: bool) -> ClaimOutcome:
        sql = self._upsert_sql(connection, claim, transactional=transactional)
        seconds = claim.record_ttl if transactional else claim.lease_seconds
        params = self._claim_values(claim, connection, transactional=transactional)
        params += now_plus_sql(connection.vendor, seconds)[1]
        if connection.vendor == "postgresql" and transactional:
            params.append(advisory_lock_key(claim.scope, claim.key_digest))
        row, names = self._execute(connection, sql, params, fetch=True)
        if row is None:
            return ClaimOutcome(verdict=Verdict.IN_FLIGHT, record=None)
        values = dict(zip(names, row, strict=True))
        changed_now = bool(values.pop("changed_now"))
        return self._outcome(claim, self._record_from_row(values), changed_now=changed_now)

    def _execute(self, connection: Any, sql: str, params: list[Any], *, fetch: bool) -> Any:
        """Run one hot-path statement, prepared on the server where that is possible.

        A claim statement takes PostgreSQL about a millisecond to plan; prepared,
        it is planned once per connection. Returns (row, column names) with
        *fetch*, else the row count.
        """
        if self.prepare_statements and connection.vendor == "postgresql":
            connection.ensure_connection()
            raw = connection.connection
            if _psycopg is not None and isinstance(raw, _psycopg.Connection):
                # Django leaves prepare_threshold at None, which makes psycopg ignore
                # prepare=True; lift it for this one statement only.
                threshold = raw.prepare_threshold
                if threshold is None:
                    raw.prepare_threshold = 2**31 - 1
                try:
                    with _psycopg.Cursor(raw) as cursor:
                        cursor.execute(sql.replace("%%", "%"), params, prepare=True)
                        if not fetch:
                            return cursor.rowcount
                        row = cursor.fetchone()
                        return row, [column.name for column in cursor.description or ()]
                finally:
                    raw.prepare_threshold = threshold
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            if not fetch:
                return cursor.rowcount
            row = cursor.fetchone()
            return row, [column[0] for column in cursor.description or ()]

    # -- the portable claim (MySQL, MariaDB) ------------------------------------

    def _claim_generic(self, claim: Claim, *, transactional: bool) -> ClaimOutcome:
        manager = self._manager()
        ident = claim.identity
        seconds = claim.record_ttl if transactional else claim.lease_seconds
        fields = {
            "key": display_key(claim.key),
            "status": Status.CONSUMED if transactional else Status.PROCESSING,
            "owner": uuid.UUID(claim.owner),
            "task_id": claim.task_id,
            "task_name": claim.task_name[:255],
            "attempt": claim.attempt,
            "hostname": ident.hostname,
            "pid": ident.pid,
            "process_start": ident.process_start,
            "boot_id": ident.boot_id,
            "pid_namespace": ident.pid_namespace,
            "updated_at": Now(),
            "expires_at": NowPlus(seconds),
            "consumed_at": Now() if transactional else None,
            "heartbeat_at": None,
            "result": None,
            "payload_digest": None,
        }
        ident_filter = {"scope": claim.scope, "key_digest": claim.key_digest}
        for _ in range(3):
            try:
                with transaction.atomic(using=self.alias):
                    manager.create(**ident_filter, created_at=Now(), **fields)
            except IntegrityError:
                pass
            else:
                return self._outcome(claim, self._fetch(claim.scope, claim.key_digest))
            not_mine = ~Q(owner=uuid.UUID(claim.owner))
            expired = Q(expires_at__lt=Now())
            processing = Q(status=Status.PROCESSING)
            stale = (
                Q(status=Status.FAILED)
                & ~expired
                & Q(task_id=claim.task_id, attempt__gte=claim.attempt)
            )
            claimed = (
                manager.filter(**ident_filter)
                .filter(not_mine & processing & expired & Q(takeovers__lt=claim.max_takeovers))
                .update(takeovers=F("takeovers") + 1, **fields)
            )
            if not claimed:
                fresh = (
                    Q(status__in=[Status.CONSUMED, Status.POISONED]) & expired
                    | Q(status=Status.FAILED) & ~stale
                )
                claimed = (
                    manager.filter(**ident_filter)
                    .filter(not_mine & fresh)
                    .update(takeovers=0, **fields)
                )
            poisoned_now = False
            if not claimed:
                poisoned_now = bool(
                    manager.filter(**ident_filter)
                    .filter(not_mine & processing & expired & Q(takeovers__gte=claim.max_takeovers))
                    .update(
                        status=Status.POISONED,
                        expires_at=NowPlus(claim.record_ttl),
                        updated_at=Now(),
                    )
                )
            if not claimed and not poisoned_now:
                manager.filter(**ident_filter).filter(not_mine).update(
                    skipped=Case(
                        When(processing, then=F("skipped")),
                        default=F("skipped") + 1,
                        output_field=PositiveIntegerField(),
                    ),
                    rescheduled=Case(
                        When(processing, then=F("rescheduled") + 1),
                        default=F("rescheduled"),
                        output_field=PositiveIntegerField(),
                    ),
                    last_duplicate_at=Now(),
                )
            record = self._fetch(claim.scope, claim.key_digest)
            if record is not None:
                return self._outcome(claim, record, changed_now=poisoned_now)
            # Purged or released between the statements: claim again.
        raise StorageError("the record kept disappearing while it was being claimed")

    def _fetch(self, scope: str, key_digest: str) -> Record | None:
        obj = self._manager().filter(scope=scope, key_digest=key_digest).first()
        if obj is None:
            return None
        return self._record_from_model(obj, lease_expired=None)

    # -- the contract -------------------------------------------------------------

    @_storage_errors
    def claim(self, claim: Claim) -> ClaimOutcome:
        """Claim in status mode (see :meth:`BaseBackend.claim`)."""
        connection = connections[self.alias]
        if self._vendor(connection) == "generic":
            return self._claim_generic(claim, transactional=False)
        return self._claim_upsert(claim, connection, transactional=False)

    @_storage_errors
    def claim_in_transaction(self, claim: Claim) -> ClaimOutcome:
        """Insert a CONSUMED record inside the caller's open transaction.

        The caller holds ``transaction.atomic(using=self.alias)``. A committed
        record makes the claim a duplicate. On PostgreSQL a copy whose
        transaction is still open makes it :attr:`Verdict.IN_FLIGHT` at once
        (``pg_try_advisory_xact_lock``); SQLite serialises writers, and MySQL
        waits for the row lock up to ``innodb_lock_wait_timeout``.
        """
        connection = connections[self.alias]
        if self._vendor(connection) == "generic":
            return self._claim_generic(claim, transactional=True)
        return self._claim_upsert(claim, connection, transactional=True)

    @_storage_errors
    def store_result(self, claim: Claim, result: Any) -> None:
        """Store *result* on the record *claim* owns, inside the open transaction."""
        self._manager().filter(
            scope=claim.scope, key_digest=claim.key_digest, owner=uuid.UUID(claim.owner)
        ).update(result=result)

    @_storage_errors
    def complete(self, claim: Claim, result: Any) -> bool:
        """Mark the record CONSUMED if *claim* still owns it (see :meth:`BaseBackend.complete`)."""
        manager = self._manager()
        connection = connections[self.alias]
        if self._vendor(connection) == "generic":
            updated = manager.filter(
                scope=claim.scope, key_digest=claim.key_digest, owner=uuid.UUID(claim.owner)
            ).update(
                status=Status.CONSUMED,
                expires_at=NowPlus(claim.record_ttl),
                consumed_at=Now(),
                updated_at=Now(),
                result=result,
            )
        else:
            updated = self._execute(
                connection,
                self._complete_sql(connection),
                [
                    Status.CONSUMED.value,
                    *now_plus_sql(connection.vendor, claim.record_ttl)[1],
                    None if result is None else json.dumps(result),
                    claim.scope,
                    claim.key_digest,
                    self._owner_param(claim.owner, connection),
                ],
                fetch=False,
            )
        if updated:
            return True
        # The record is gone (purged or released after the lease expired) or
        # someone else owns it. Recreate it only if it is gone.
        ident = claim.identity
        try:
            with transaction.atomic(using=self.alias):
                manager.create(
                    scope=claim.scope,
                    key=display_key(claim.key),
                    key_digest=claim.key_digest,
                    status=Status.CONSUMED,
                    owner=uuid.UUID(claim.owner),
                    task_id=claim.task_id,
                    task_name=claim.task_name[:255],
                    attempt=claim.attempt,
                    hostname=ident.hostname,
                    pid=ident.pid,
                    process_start=ident.process_start,
                    boot_id=ident.boot_id,
                    pid_namespace=ident.pid_namespace,
                    created_at=Now(),
                    updated_at=Now(),
                    expires_at=NowPlus(claim.record_ttl),
                    consumed_at=Now(),
                    result=result,
                )
        except IntegrityError:
            return False
        return True

    @_storage_errors
    def release(self, scope: str, key_digest: str, owner: str, *, expired_only: bool) -> bool:
        """Compare-and-delete a PROCESSING or POISONED record (see :meth:`BaseBackend.release`)."""
        connection = connections[self.alias]
        qn = connection.ops.quote_name
        processing = f"{qn('status')} = %s"
        if expired_only:
            processing += f" AND {qn('expires_at')} < {now_sql(connection.vendor)}"
        sql = (
            f"DELETE FROM {qn(DedupRecord._meta.db_table)} WHERE {qn('scope')} = %s "
            f"AND {qn('key_digest')} = %s AND {qn('owner')} = %s "
            f"AND ({qn('status')} = %s OR ({processing}))"
        )
        params = [
            scope,
            key_digest,
            self._owner_param(owner, connection),
            Status.POISONED.value,
            Status.PROCESSING.value,
        ]
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.rowcount == 1

    def _owned(self, scope: str, key_digest: str, owner: str) -> Any:
        return self._manager().filter(
            scope=scope, key_digest=key_digest, owner=uuid.UUID(owner), status=Status.PROCESSING
        )

    @_storage_errors
    def fail(self, claim: Claim) -> bool:
        """Leave a FAILED record for stale copies to meet (see :meth:`BaseBackend.fail`)."""
        return bool(
            self._owned(claim.scope, claim.key_digest, claim.owner).update(
                status=Status.FAILED, expires_at=NowPlus(claim.record_ttl), updated_at=Now()
            )
        )

    @_storage_errors
    def renew(self, claim: Claim) -> bool:
        """Extend the lease while the owner still holds it (see :meth:`BaseBackend.renew`)."""
        return bool(
            self._owned(claim.scope, claim.key_digest, claim.owner).update(
                expires_at=NowPlus(claim.lease_seconds), heartbeat_at=Now()
            )
        )

    @_storage_errors
    def expire_lease(self, scope: str, key_digest: str, owner: str) -> bool:
        """End a gone owner's lease now (see :meth:`BaseBackend.expire_lease`)."""
        # A millisecond in the past, so the next statement sees it expired even
        # on a clock (SQLite's) that only counts milliseconds.
        return bool(self._owned(scope, key_digest, owner).update(expires_at=NowPlus(-0.001)))

    @_storage_errors
    def expire_lease_of_process(
        self, scope: str, key_digest: str, task_id: str, identity: OwnerIdentity
    ) -> bool:
        """End the lease a dead child held (see :meth:`BaseBackend.expire_lease_of_process`)."""
        return bool(
            self._manager()
            .filter(
                scope=scope,
                key_digest=key_digest,
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

    @_storage_errors
    def get(self, scope: str, key_digest: str) -> Record | None:
        """Return the record with a ``lease_expired`` flag computed by the database."""
        obj = (
            self._manager()
            .filter(scope=scope, key_digest=key_digest)
            .annotate(
                _lease_expired=Case(
                    When(expires_at__lt=Now(), then=Value(True)),
                    default=Value(False),
                    output_field=BooleanField(),
                )
            )
            .first()
        )
        if obj is None:
            return None
        return self._record_from_model(obj, lease_expired=bool(obj._lease_expired))

    @_storage_errors
    def purge_expired(
        self, *, batch_size: int = 1000, dry_run: bool = False, pause: float = 0.0
    ) -> int:
        """Delete expired records in batches of *batch_size*, each in its own short statement.

        *pause* seconds between batches lets the WAL of a large purge drain, so
        the commits of claims running meanwhile are not held up behind it.
        """
        manager = self._manager()
        if dry_run:
            return manager.filter(expires_at__lt=Now()).count()
        connection = connections[self.alias]
        qn = connection.ops.quote_name
        total = 0
        while True:
            ids = list(
                manager.filter(expires_at__lt=Now())
                .order_by("expires_at")
                .values_list("pk", flat=True)[:batch_size]
            )
            if not ids:
                return total
            sql = (
                f"DELETE FROM {qn(DedupRecord._meta.db_table)} WHERE {qn('id')} IN "
                f"({', '.join(['%s'] * len(ids))}) AND {qn('expires_at')} < "
                f"{now_sql(connection.vendor)}"
            )
            with connection.cursor() as cursor:
                cursor.execute(sql, ids)
                total += cursor.rowcount
            if len(ids) < batch_size:
                return total
            if pause:
                time.sleep(pause)

    # -- transactional mode --------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Open the transaction that holds a transactional claim and the task body."""
        with transaction.atomic(using=self.alias):
            yield

    def table_exists(self) -> bool:
        """True if the message table exists on the backend's database (one catalogue query)."""
        connection = connections[self.alias]
        with connection.cursor() as cursor:
            tables = connection.introspection.table_names(cursor)
        return DedupRecord._meta.db_table in tables

    def in_outer_transaction(self) -> bool:
        """True if the message table's connection is already inside an atomic block."""
        return connections[self.alias].in_atomic_block

    def transaction_broken(self) -> bool:
        """True if a database error inside the atomic block doomed it to roll back.

        Django flags that only when the error left an inner atomic block. A
        statement that failed and was caught inside the body leaves PostgreSQL's
        transaction aborted, and its COMMIT would silently roll back; libpq
        tracks that state locally, so reading it costs no round trip.
        """
        connection = connections[self.alias]
        if connection.needs_rollback:
            return True
        if connection.vendor != "postgresql" or connection.connection is None:
            return False
        info = getattr(connection.connection, "info", None)
        # PQTransactionStatus: PQTRANS_INERROR is 3 (psycopg and psycopg2 alike).
        return getattr(info, "transaction_status", None) == _PQTRANS_INERROR


__all__ = ["DatabaseBackend", "NowPlus", "advisory_lock_key"]
