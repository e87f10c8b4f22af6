"""Enqueue-time dedup: a plain send whose message is already consumed is not published.

With the task option ``dedup_on_enqueue = "consumed"``,
:meth:`DedupTask.apply_async <dedup_celery.task.DedupTask.apply_async>` (so
``delay`` and ``delay_on_commit`` too) looks the key up before publishing. If
the record is CONSUMED, nothing is published and the call returns an
``AsyncResult`` for the original's task id. It is an optimisation on top of the
consume side, never a replacement, so whenever it is not sure it publishes:

* a lookup that fails publishes as usual (a WARNING says so), and so does a
  configuration that does not resolve: never lose a message to save one;
* only plain sends are ever skipped (:func:`plain_send`): not a canvas member,
  not a send with ``link``/``link_error``, not ``self.retry()``, not a
  replacement, and not the package's own reschedules;
* a send whose arguments differ from the record's fingerprint is published,
  so that the worker reports the mismatch (:mod:`dedup_celery.delivery.mismatch`)
  instead of the producer answering it with another call's result;
* with a task-id key the lookup can only hit when the caller passes
  ``task_id``, so without one it is skipped.

Each skipped send logs an INFO line and sends
:data:`~dedup_celery.signals.publish_skipped`, so it is never silent.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from typing import Any

from kombu import serialization

from dedup_celery import signals
from dedup_celery.backends import get_backend
from dedup_celery.backends.base import Record
from dedup_celery.exceptions import (
    DedupConfigurationError,
    DedupKeyError,
    DedupPayloadError,
    StorageError,
)
from dedup_celery.keys import digest, message_key, storable
from dedup_celery.options import TaskOptions, resolve
from dedup_celery.payload import message_fingerprint
from dedup_celery.states import Status

logger = logging.getLogger("dedup_celery.enqueue")

#: Options that make a send part of a canvas (a chain, group or chord), or give it callbacks.
CANVAS_OPTIONS = ("chain", "chord", "group_id", "group_index", "link", "link_error")

# Set while this package republishes a message it already received (a reschedule).
_republishing: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "dedup_celery_republishing", default=False
)


@contextlib.contextmanager
def republishing() -> Iterator[None]:
    """Mark the sends in the block as copies of a received message: never skipped."""
    token = _republishing.set(True)
    try:
        yield
    finally:
        _republishing.reset(token)


def plain_send(options: dict[str, Any]) -> bool:
    """Whether a send with these ``apply_async`` *options* may be skipped at all.

    Celery sends copies of a task through ``apply_async`` itself, and a skipped
    copy is a lost message: ``self.retry()`` (``retries`` above 0), a
    replacement (``replaced_task_nesting``), a canvas member or callback owner
    (:data:`CANVAS_OPTIONS`), and this package's reschedules.
    """
    if _republishing.get():
        return False
    if options.get("retries") or options.get("replaced_task_nesting"):
        return False
    return not any(options.get(name) for name in CANVAS_OPTIONS)


def consumed_original(
    task: Any,
    args: tuple[Any, ...] | list[Any] | None,
    kwargs: dict[str, Any] | None,
    task_id: str | None,
    options: dict[str, Any],
) -> Any:
    """Return an ``AsyncResult`` for the original if this send need not be published, else None.

    Called by :meth:`DedupTask.apply_async` when the task's ``dedup_on_enqueue``
    is set; see the module docstring for when it answers.
    """
    if not plain_send(options) or task.app.conf.task_always_eager:
        return None
    try:
        resolved = resolve(task)
    except DedupConfigurationError:
        return None  # the worker reschedules it loudly (outcomes.misconfigured)
    if resolved.bypass or resolved.on_enqueue != "consumed":
        return None
    args, kwargs = tuple(args or ()), dict(kwargs or {})
    if resolved.key_function is None and task_id is None:
        return None  # a task-id key of a new id: nothing can be there yet
    key = _producer_key(task, resolved, args, kwargs, task_id)
    if key is None:
        return None
    key_digest = digest(key)
    try:
        record = get_backend().peek(resolved.scope, key_digest)
    except StorageError as exc:
        logger.warning(
            "%s: the lookup before publishing failed (%s); the message is published as usual",
            task.name,
            exc,
        )
        return None
    if not _answers(task, resolved, record, args, kwargs, options):
        return None
    assert record is not None
    logger.info(
        "%s: not published; the message (scope %s, key digest %s) was consumed by task id "
        "%s, whose result this call returns (dedup_on_enqueue)",
        task.name,
        resolved.scope,
        key_digest,
        record.task_id,
    )
    if signals.publish_skipped.receivers:
        signals.publish_skipped.send_robust(
            sender=task,
            task_id=storable(task_id) if task_id else None,
            scope=resolved.scope,
            key_digest=key_digest,
            record=record,
            reason="consumed",
        )
    return task.AsyncResult(record.task_id)


def _producer_key(
    task: Any,
    resolved: TaskOptions,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    task_id: str | None,
) -> str | None:
    """The message key as the worker will derive it, from the producer's arguments."""
    request = _SendRequest(task_id or "")
    try:
        return message_key(task, resolved.key_function, request, args, kwargs)
    except DedupKeyError as exc:
        raise DedupKeyError(
            f"{exc} With dedup_on_enqueue the key is also computed in the producer, before "
            "publishing: it must depend only on the task's arguments."
        ) from exc


class _SendRequest:
    """What :func:`~dedup_celery.keys.message_key` reads of a request, for a plain send."""

    replaced_task_nesting = 0

    def __init__(self, task_id: str) -> None:
        self.id = task_id


def _answers(
    task: Any,
    resolved: TaskOptions,
    record: Record | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: dict[str, Any],
) -> bool:
    """Whether *record* is a CONSUMED record this send may be answered from."""
    if record is None or record.status != Status.CONSUMED or record.lease_expired:
        return False  # an expired CONSUMED record is claimed afresh by the next delivery
    if resolved.payload_mismatch == "ignore" or record.payload_digest is None:
        return True
    # What the worker would fingerprint: the arguments as they come out of the message.
    serializer = options.get("serializer") or task.serializer or task.app.conf.task_serializer
    try:
        content_type, encoding, data = serialization.dumps((args, kwargs), serializer)
        decoded = serialization.loads(data, content_type, encoding, accept=[content_type])
    except Exception:
        return False  # the send itself will say what is wrong with the arguments
    try:
        mine = message_fingerprint(task, resolved.payload_function, tuple(decoded[0]), decoded[1])
    except DedupPayloadError:
        return False  # published: the worker fails it with the same error, visibly
    return mine is None or mine == record.payload_digest
