"""Duplicates that show outside the package: a Celery event and the result backend's meta.

A duplicate that carries its own task id (a business-key duplicate, or a
producer's re-send under a new id) returns the original's result, so Flower and
a result-backend audit would see a plain SUCCESS. Two traces tell it apart:

* the ``task-deduplicated`` event, sent when the worker sends task events; its
  fields are namespaced (``dedup_original_id``, ``dedup_verdict``,
  ``dedup_scope``, ``dedup_key_digest``), because Celery's event state merges an
  event's fields into the task even after SUCCESS, so a field named ``result``
  or ``state`` would overwrite the original's;
* the same ``dedup_original_id`` and ``dedup_verdict`` merged into
  ``request.meta``, which django-celery-results stores in the duplicate's own
  ``TaskResult`` row with the final write.

A redelivery under the record's own task id gets neither: it is the original
message, and its event or row is the original's.
"""

from __future__ import annotations

from typing import Any

from dedup_celery.backends.base import Record, Verdict
from dedup_celery.delivery.base import Delivery, logger

#: The event's type: Flower and ``celery events`` show it by this name.
EVENT = "task-deduplicated"

#: Whether this worker sends task events (``-E`` or ``worker_send_task_events``), as its
#: main process knew it before the pool forked. None outside a worker.
_worker_task_events: bool | None = None


def remember_task_events(sender: Any = None, **kwargs: Any) -> None:
    """Note whether the starting worker sends task events (connected to ``worker_init``).

    Celery's own task events come from the worker's main process, which knows;
    a pool child only knows what it inherited, so this is read before the fork.
    """
    global _worker_task_events
    _worker_task_events = bool(getattr(sender, "task_events", False))


def task_events_enabled(task: Any) -> bool:
    """True if a ``task-deduplicated`` event should be sent for *task* in this process."""
    if not getattr(task, "send_events", True):
        return False
    if _worker_task_events is not None:
        return _worker_task_events
    return bool(task.app.conf.worker_send_task_events)


def announce(delivery: Delivery, record: Record | None, verdict: Verdict) -> None:
    """Make a duplicate with its own task id visible: merge the meta, send the event.

    Never raises: a duplicate's disposition does not depend on being seen.
    """
    if record is None or record.task_id == delivery.claim.task_id:
        return
    fields = {"dedup_original_id": record.task_id, "dedup_verdict": verdict.value}
    request = delivery.request
    meta = getattr(request, "meta", None)
    # Only a final disposition writes a result row. A rescheduled copy writes none, and its
    # message (headers, a "meta" header among them) is published again as it came.
    if verdict is not Verdict.IN_FLIGHT and (meta is None or isinstance(meta, dict)):
        # A new dict with the old keys: the one the message's headers hold stays untouched.
        request.meta = {**(meta or {}), **fields}
    if request.is_eager or not task_events_enabled(delivery.task):
        return
    try:
        delivery.task.send_event(
            EVENT,
            retry=False,
            dedup_scope=delivery.claim.scope,
            dedup_key_digest=delivery.claim.key_digest,
            **fields,
        )
    except Exception as exc:
        logger.warning(
            "%s: could not send the %s event (%s); the duplicate is still recorded and logged",
            delivery.label,
            EVENT,
            exc,
        )
