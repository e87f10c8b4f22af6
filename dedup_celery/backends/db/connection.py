"""Running the database backend's statements: prepared on the server, errors made StorageError."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from django.db import DataError, Error, IntegrityError, connections

from dedup_celery.exceptions import MissingTableError, StorageError, StorageRefusedError

T = TypeVar("T")

_psycopg: Any
try:  # psycopg 3, for server-side prepared statements; psycopg2 works without them.
    import psycopg as _psycopg
except ImportError:  # pragma: no cover - depends on the installed driver
    _psycopg = None

# Prepared statements run on the driver's own cursor, whose errors Django does not wrap.
DRIVER_ERRORS: tuple[type[Exception], ...] = (
    (Error,) if _psycopg is None else (Error, _psycopg.Error)
)
# PQTransactionStatus: PQTRANS_INERROR is 3 (psycopg and psycopg2 alike).
_PQTRANS_INERROR = 3

#: Errors that say the statement's values are wrong, not that the store is down.
REFUSALS: tuple[type[Exception], ...] = (DataError, IntegrityError) + (
    () if _psycopg is None else (_psycopg.DataError, _psycopg.IntegrityError)
)
#: MySQL/MariaDB error numbers of refused values that mysqlclient raises as
#: OperationalError: out of range (1264), a wrong value (1292, 1366), too long
#: for its column (1406), and NULL in a NOT NULL column (1048).
MYSQL_REFUSED_ERRNOS = frozenset({1048, 1264, 1292, 1366, 1406})


def is_refusal(exc: BaseException) -> bool:
    """True if retrying cannot fix *exc*: the store refused the statement's values.

    Decided by the exception's class (Django's and the driver's ``DataError``
    and ``IntegrityError``, SQLSTATE classes 22 and 23), and on MySQL by the
    error number, never by its text.
    """
    if isinstance(exc, REFUSALS):
        return True
    for error in (exc, exc.__cause__):
        args = getattr(error, "args", None) or (None,)
        if isinstance(args[0], int) and args[0] in MYSQL_REFUSED_ERRNOS:
            return True
    return False


#: MySQL/MariaDB's "Deadlock found when trying to get lock": InnoDB rolled the
#: victim's transaction back, and a new one may succeed.
MYSQL_DEADLOCK_ERRNO = 1213


def is_deadlock(exc: BaseException) -> bool:
    """True if *exc* is MySQL/MariaDB's deadlock error (by its number, never by its text)."""
    for error in (exc, exc.__cause__):
        args = getattr(error, "args", None) or (None,)
        if args[0] == MYSQL_DEADLOCK_ERRNO:
            return True
    return False


def is_missing_table(exc: Exception, table: str) -> bool:
    """True if *exc* says *table* does not exist (PostgreSQL, SQLite, MySQL)."""
    text = str(exc).lower()
    return table in text and (
        "does not exist" in text or "no such table" in text or "doesn't exist" in text
    )


def storage_errors(method: Callable[..., T]) -> Callable[..., T]:
    """Turn a database error into :class:`StorageError`, keeping the original as the cause.

    For methods of a backend with ``alias`` and ``table`` attributes.
    """

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except DRIVER_ERRORS as exc:
            raise storage_error(self.alias, self.table, exc) from exc

    return wrapper


def storage_error(alias: str, table: str, exc: Exception, step: str = "") -> StorageError:
    """Return the StorageError for *exc*, dropping a broken connection outside a transaction.

    *step* names what failed (``"claim"``, ``"commit"`` …); it is kept as the
    error's ``step`` attribute for the delivery's log line.
    """
    connection = connections[alias]
    if not connection.in_atomic_block:
        # Drop a broken connection now, so a retry opens a fresh one.
        connection.close_if_unusable_or_obsolete()
    if is_missing_table(exc, table):
        error: StorageError = MissingTableError(
            f"the message table {table} does not exist on database {alias!r}: run "
            f"'python manage.py migrate dedup_celery' (--database {alias} if it is not the "
            f"default). ({exc})".strip()
        )
    elif is_refusal(exc):
        error = StorageRefusedError(
            f"the message table on database {alias!r} refused the statement: "
            f"{type(exc).__name__}: {exc}".strip()
        )
    else:
        error = StorageError(
            f"the message table on database {alias!r} failed: {type(exc).__name__}: {exc}".strip()
        )
    error.step = step
    return error


def execute(connection: Any, sql: str, params: list[Any], *, fetch: bool, prepare: bool) -> Any:
    """Run one hot-path statement, prepared on the server where that is possible.

    A claim statement takes PostgreSQL about a millisecond to plan; prepared,
    it is planned once per connection. Returns the first row (a tuple, or None)
    with *fetch*, else the row count; the caller knows the columns.
    """
    if prepare and connection.vendor == "postgresql":
        raw = connection.connection
        if raw is None:
            connection.ensure_connection()
            raw = connection.connection
        if _psycopg is not None and isinstance(raw, _psycopg.Connection):
            # One driver cursor per connection, kept on it, so none is made per statement.
            cursor = getattr(raw, "_dedup_celery_cursor", None)
            if cursor is None or cursor.closed:
                cursor = raw._dedup_celery_cursor = _psycopg.Cursor(raw)
            # Django leaves prepare_threshold at None, which makes psycopg ignore
            # prepare=True; lift it for this one statement only.
            threshold = raw.prepare_threshold
            if threshold is None:
                raw.prepare_threshold = 2**31 - 1
            try:
                cursor.execute(_driver_text(sql), params, prepare=True)
                return cursor.fetchone() if fetch else cursor.rowcount
            finally:
                raw.prepare_threshold = threshold
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone() if fetch else cursor.rowcount


@functools.lru_cache(maxsize=64)
def _driver_text(sql: str) -> str:
    """*sql* as the driver's own cursor takes it (Django's cursor un-doubles ``%%`` itself)."""
    return sql.replace("%%", "%")


def transaction_broken(connection: Any) -> bool:
    """True if a database error inside the atomic block doomed it to roll back.

    Django flags that only when the error left an inner atomic block. A
    statement that failed and was caught inside the body leaves PostgreSQL's
    transaction aborted, and its COMMIT would silently roll back; libpq
    tracks that state locally, so reading it costs no round trip.
    """
    if connection.needs_rollback:
        return True
    if connection.vendor != "postgresql" or connection.connection is None:
        return False
    info = getattr(connection.connection, "info", None)
    return getattr(info, "transaction_status", None) == _PQTRANS_INERROR
