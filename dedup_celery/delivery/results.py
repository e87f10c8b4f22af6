"""Which results are stored on the record, and how a duplicate gets the original's back.

Only business-key tasks need it: with the task id as key, a duplicate is always
a redelivery of the same message, which returns nothing.
"""

from __future__ import annotations

import json
from typing import Any

from kombu.utils import json as kombu_json

from dedup_celery.backends.base import Record
from dedup_celery.delivery.base import Delivery, logger


def storable_result(delivery: Delivery, retval: Any) -> Any:
    """Return the value to store for later duplicates, or None to store nothing.

    The value round-trips through kombu's JSON, as the result backend's would;
    one over ``RESULT_MAX_BYTES`` or not serializable is replaced by a note of why.
    """
    options = delivery.options
    if retval is None or options.key_function is None:
        return None
    try:
        text = kombu_json.dumps(retval)
    except (TypeError, ValueError) as exc:
        reason = f"the result is not JSON-serializable ({exc})"
    else:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size <= options.result_max_bytes:
            return {"value": json.loads(text)}
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
