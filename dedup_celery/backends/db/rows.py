"""Rows of the message table as the database backend's raw statements send and return them."""

from __future__ import annotations

import datetime
import json
import uuid
from typing import Any

from django.conf import settings
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from dedup_celery.backends.base import FIELD_KINDS, RECORD_FIELDS, Record
from dedup_celery.models import DedupRecord

_DATETIME_FIELDS = tuple(name for name in RECORD_FIELDS if FIELD_KINDS[name].startswith("datetime"))


_OWNER_FIELD: Any = DedupRecord._meta.get_field("owner")


def owner_param(owner: str, connection: Any) -> Any:
    """The owner token as *connection*'s driver takes it (a uuid column or text)."""
    if connection.vendor == "postgresql":
        return uuid.UUID(owner)  # a native uuid column
    return _OWNER_FIELD.get_db_prep_value(uuid.UUID(owner), connection)


def claim_owner_param(owner: str, connection: Any) -> Any:
    """A claim's own owner token (32 hex digits, from ``uuid4().hex``) as a parameter.

    PostgreSQL reads it as text into the uuid column it is compared with or
    inserted into, which saves making a UUID per statement on the hot path;
    elsewhere it is :func:`owner_param`.
    """
    if connection.vendor == "postgresql":
        return owner
    return owner_param(owner, connection)


def to_datetime(value: Any) -> datetime.datetime | None:
    """A time column's value as an aware datetime (SQLite returns text)."""
    if isinstance(value, datetime.datetime) and value.tzinfo is not None:
        return value  # PostgreSQL's timestamptz, as psycopg returns it
    when: datetime.datetime | None
    if value is None or isinstance(value, datetime.datetime):
        when = value
    else:
        when = parse_datetime(str(value))
    if when is not None and settings.USE_TZ and timezone.is_naive(when):
        when = timezone.make_aware(when, datetime.timezone.utc)
    return when


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def created_at_of(value: Any) -> datetime.datetime | None:
    """The first claim's returned ``created_at`` (:data:`.sql.FIRST_CLAIM_RETURNING`).

    PostgreSQL returns whole microseconds since the epoch; the result is the
    datetime Django would have read (naive in ``TIME_ZONE`` without ``USE_TZ``).
    """
    if not isinstance(value, int):
        return to_datetime(value)
    moment = _EPOCH + datetime.timedelta(microseconds=value)
    if not settings.USE_TZ:
        return timezone.make_naive(moment, timezone.get_default_timezone())
    return moment


def record_from_row(row: dict[str, Any]) -> Record:
    """A :class:`Record` from a row a ``RETURNING`` clause gave, by column name."""
    values = {name: row[name] for name in RECORD_FIELDS}
    for name in _DATETIME_FIELDS:
        values[name] = to_datetime(values[name])
    if values["owner"] is not None:
        values["owner"] = uuid.UUID(str(values["owner"])).hex
    if isinstance(values["result"], str):
        values["result"] = json.loads(values["result"])
    lease_expired = row.get("lease_expired")
    lease_expired = None if lease_expired is None else bool(lease_expired)
    return Record(**values, lease_expired=lease_expired)
