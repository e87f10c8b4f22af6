"""Which results are stored on the record, and how a duplicate gets the original's back.

Only business-key tasks need it: with the task id as key, a duplicate is always
a redelivery of the same message, which returns nothing.
"""

from __future__ import annotations

import json
import math
from typing import Any

from kombu.utils import json as kombu_json

from dedup_celery.backends.base import Record
from dedup_celery.delivery.base import Delivery, logger


def unstorable(value: Any) -> str | None:
    """Say why a JSON store would refuse *value* (decoded JSON), or None if every store takes it.

    PostgreSQL's jsonb refuses NUL characters, lone surrogates, NaN and
    Infinity; SQLite's JSON check refuses the last two. A refused write inside
    a transaction would abort the body's transaction, so the value is checked
    before anything is written.
    """
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "the result holds a NUL character, which PostgreSQL's jsonb cannot hold"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "the result holds a lone surrogate, which is not UTF-8"
        elif isinstance(item, float) and not math.isfinite(item):
            return "the result holds NaN or Infinity, which a JSON store cannot hold"
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None


def storable_result(delivery: Delivery, retval: Any) -> Any:
    """Return the value to store for later duplicates, or None to store nothing.

    The value round-trips through kombu's JSON, as the result backend's would.
    One that is not serializable, that a store refuses (:func:`unstorable`) or
    that is over ``RESULT_MAX_BYTES`` is replaced by a note of why, so the
    message is still consumed once.
    """
    options = delivery.options
    if retval is None or options.key_function is None:
        return None
    try:
        text = kombu_json.dumps(retval)
    except (TypeError, ValueError) as exc:
        reason: str | None = f"the result is not JSON-serializable ({exc})"
    else:
        value = json.loads(text)
        reason = unstorable(value)
        if reason is None:
            size = len(text.encode("utf-8"))
            if size <= options.result_max_bytes:
                return {"value": value}
            reason = f"the result is {size} bytes, over RESULT_MAX_BYTES={options.result_max_bytes}"
    logger.warning(
        "%s: %s, so it is not stored; duplicates of this message will return None.",
        delivery.label,
        reason,
    )
    return {"omitted": reason}


def original_result(delivery: Delivery, record: Record) -> Any:
    """Return the consuming delivery's result as it stored it, or None (with a warning why)."""
    stored = record.result
    if not stored:
        return None
    if "value" in stored:
        return kombu_json.loads(json.dumps(stored["value"]))
    logger.warning(
        "%s: duplicate returns None instead of the original's result: %s.",
        delivery.label,
        stored.get("omitted", "it was not stored"),
    )
    return None
