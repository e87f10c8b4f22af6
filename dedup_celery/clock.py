"""The store's clock in SQL: "now" and "now + seconds" for each supported database.

Every time in the message table is computed by the database, never by a
worker, and is UTC: ``STATEMENT_TIMESTAMP()`` on PostgreSQL, ``STRFTIME(…,
'NOW')`` on SQLite, ``UTC_TIMESTAMP(6)`` on MySQL and MariaDB. (MySQL's
``CURRENT_TIMESTAMP`` and ``NOW()``, which Django's ``Now()`` compiles to, follow
the session's time zone, which Django does not set.) The text has ``%``
escaped, for statements that also take parameters.
"""

from __future__ import annotations

from typing import Any

from django.db.models import DateTimeField, Func

from dedup_celery.exceptions import StorageError

NOW_SQL = {
    "postgresql": "STATEMENT_TIMESTAMP()",
    "sqlite": "STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'NOW')",
    "mysql": "UTC_TIMESTAMP(6)",
}
#: The database vendors (Django's ``connection.vendor``) the database backend supports.
SUPPORTED_VENDORS: tuple[str, ...] = tuple(NOW_SQL)


def unsupported(vendor: str) -> StorageError:
    """Return the error a statement raises on a database it cannot run on.

    The system check ``dedup_celery.E010`` reports the same before any task runs.
    """
    return StorageError(
        f"dedup_celery's database backend supports PostgreSQL, SQLite and MySQL/MariaDB, "
        f"not {vendor!r}. Use another backend (DEDUP_CELERY['BACKEND']) or another database "
        "(DEDUP_CELERY['DATABASE'])."
    )


def now_sql(vendor: str) -> str:
    """Return the SQL for "now" on the database's own clock."""
    try:
        return NOW_SQL[vendor]
    except KeyError:
        raise unsupported(vendor) from None


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
        return f"(UTC_TIMESTAMP(6) + INTERVAL {round(seconds * 1_000_000)} MICROSECOND)"
    raise unsupported(vendor)


def now_plus_sql(vendor: str, seconds: float) -> tuple[str, list[Any]]:
    """Return SQL and params for "now + *seconds*" on the database's clock."""
    if vendor == "postgresql":
        return "(STATEMENT_TIMESTAMP() + MAKE_INTERVAL(secs => %s))", [float(seconds)]
    if vendor == "sqlite":
        return "STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'NOW', %s)", [f"{float(seconds):+.6f} seconds"]
    if vendor == "mysql":
        return "(UTC_TIMESTAMP(6) + INTERVAL %s MICROSECOND)", [round(seconds * 1_000_000)]
    raise unsupported(vendor)


class StoreNow(Func):
    """The store's "now" (:func:`now_sql`) as an ORM expression; use it instead of ``Now()``."""

    output_field = DateTimeField()

    def as_sql(  # type: ignore[override]  # the ORM passes only compiler and connection
        self, compiler: Any, connection: Any, **extra_context: Any
    ) -> tuple[str, list[Any]]:
        """Compile to the vendor's UTC clock."""
        return now_sql(connection.vendor), []


class NowPlus(Func):
    """``now + seconds`` on the database's clock, as an ORM expression."""

    output_field = DateTimeField()

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = float(seconds)

    def as_sql(  # type: ignore[override]  # the ORM passes only compiler and connection
        self, compiler: Any, connection: Any, **extra_context: Any
    ) -> tuple[str, list[Any]]:
        """Compile to the vendor's own interval arithmetic."""
        return now_plus_sql(connection.vendor, self.seconds)
