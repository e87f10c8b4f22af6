"""Enqueue-time dedup: a plain send whose message is consumed, or queued, is not published.

With the task option ``dedup_on_enqueue``,
:meth:`DedupTask.apply_async <dedup_celery.task.DedupTask.apply_async>` (so
``delay`` and ``delay_on_commit`` too) looks the key up before publishing:

* ``"consumed"``: if the record is CONSUMED, nothing is published and the call
  returns an ``AsyncResult`` for the original's task id;
* ``"queued"``: the producer also writes a QUEUED marker (with the task's
  ``dedup_queue_ttl``, plus the send's countdown or ETA) before it publishes,
  in one atomic step of the store (:meth:`~dedup_celery.backends.base.BaseBackend.queue`),
  never inside the caller's transaction. A send that meets a QUEUED,
  PROCESSING or CONSUMED record (or a FAILED one of its own task id, or a
  POISONED one) is answered with that message's ``AsyncResult`` instead. The
  worker's claim turns the marker into PROCESSING, only for the task id that
  queued it. If publishing raises, the marker is removed (compare-and-delete
  on the producer's owner token). A message lost in the broker, or a producer
  that died between the marker and the publish, blocks the key until the
  marker's TTL ends. Where the marker cannot be written outside the caller's
  transaction (the database backend, inside an atomic block on its alias),
  the send is looked up as with ``"consumed"``.

It is an optimisation on top of the consume side, never a replacement, so
whenever it is not sure it publishes:

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
import datetime
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from celery.utils.time import maybe_iso8601, maybe_make_aware
from kombu import serialization

from dedup_celery import signals
from dedup_celery.backends import get_backend
from dedup_celery.backends.base import BaseBackend, Claim, Record
from dedup_celery.exceptions import (
    DedupConfigurationError,
    DedupKeyError,
    DedupPayloadError,
    StorageError,
)
from dedup_celery.identity import current_identity
from dedup_celery.keys import digest, message_key, storable
from dedup_celery.options import TaskOptions, resolve
from dedup_celery.payload import message_fingerprint
from dedup_celery.states import Status

logger = logging.getLogger("dedup_celery.enqueue")

#: Options that make a send part of a canvas (a chain, group or chord), or give it
#: callbacks: a send that carries any of them, even empty, is never skipped.
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
    (:data:`CANVAS_OPTIONS`; a chain's last task carries ``chain=[]``), a
    chain's next task or a ``link`` callback, which the worker sends with the
    ``parent_id`` and ``root_id`` of the task before it (only Celery passes
    those), and this package's reschedules.
    """
    if _republishing.get():
        return False
    if options.get("retries") or options.get("replaced_task_nesting"):
        return False
    if any(name in options for name in CANVAS_OPTIONS):
        return False
    return options.get("parent_id") is None and options.get("root_id") is None


def send(
    task: Any,
    publish: Callable[..., Any],
    args: Any,
    kwargs: Any,
    task_id: str | None,
    options: dict[str, Any],
) -> Any:
    """Publish a send of *task* through *publish* (Celery's ``apply_async``), or answer it.

    Called by :meth:`DedupTask.apply_async` when the task's ``dedup_on_enqueue``
    is set; see the module docstring for when it answers. With ``"queued"``, a
    marker that this send wrote is removed again (compare-and-delete on its
    owner token) if publishing raises.
    """
    decided = _decide(task, args, kwargs, task_id, options)
    if decided is None:
        return publish(args, kwargs, task_id, **options)
    if isinstance(decided, _Answer):
        return decided.result
    try:
        return publish(args, kwargs, decided.task_id, **options)
    except BaseException:
        _remove_marker(task, decided)
        raise


@dataclass(frozen=True)
class _Answer:
    """A send answered by the message that holds its key: nothing is published."""

    result: Any


@dataclass(frozen=True)
class _Marker:
    """A send that wrote (or may have written) the key's QUEUED marker.

    It publishes under the marker's task id, so that a marker whose write
    raised after it landed is still claimed by this very message.
    """

    claim: Claim
    backend: BaseBackend
    #: The id the message is published under (the caller's, or one made for the marker).
    task_id: str


def _decide(
    task: Any,
    args: Any,
    kwargs: Any,
    task_id: str | None,
    options: dict[str, Any],
) -> _Answer | _Marker | None:
    """What this send does: None publishes it as usual."""
    if not plain_send(options) or task.app.conf.task_always_eager:
        return None
    try:
        resolved = resolve(task)
    except DedupConfigurationError:
        return None  # the worker reschedules it loudly (outcomes.misconfigured)
    if resolved.bypass or not resolved.on_enqueue:
        return None
    if resolved.key_function is None and task_id is None:
        return None  # a task-id key of a new id: nothing can be there yet
    decoded = _decoded(task, args, kwargs, options)
    if decoded is None:
        return None  # the publish itself will say what is wrong with the arguments
    # The key and the fingerprint from the arguments as the worker will see them.
    key = _producer_key(task, resolved, *decoded, task_id)
    if key is None:
        return None
    try:
        backend = get_backend()
    except DedupConfigurationError:
        return None  # the worker reschedules it loudly (outcomes.misconfigured)
    mine = _producer_fingerprint(task, resolved, *decoded)
    if resolved.on_enqueue == "queued":
        lease = _marker_lease(task, resolved, options)
        if lease is None:
            return None  # the message expires before a marker could be of use
        publish_id = task_id or str(uuid.uuid4())
        claim = Claim(
            scope=resolved.scope,
            key=key,
            key_digest=digest(key),
            owner=uuid.uuid4().hex,
            task_id=storable(publish_id),
            task_name=storable(task.name),
            attempt=0,
            identity=current_identity(),
            lease_seconds=lease,
            record_ttl=resolved.record_ttl,
            max_takeovers=resolved.max_takeovers,
            payload_digest=None if mine is _UNKNOWN else mine,  # type: ignore[arg-type]
        )
        try:
            outcome = backend.queue(claim)
        except (StorageError, NotImplementedError) as exc:
            # The marker may have landed before the error: publish under its task id, so
            # that this message claims it (or remove it, if the publish fails too).
            _lookup_failed(task, exc)
            return _Marker(claim, backend, publish_id)
        if outcome is not None:
            if outcome.verdict.claimed:
                return _Marker(claim, backend, publish_id)
            return _answer(task, resolved, claim.key_digest, outcome.record, mine, task_id)
        # The marker cannot be written here: look up as "consumed" does.
    try:
        record = backend.peek(resolved.scope, digest(key))
    except StorageError as exc:
        _lookup_failed(task, exc)
        return None
    if record is None or record.status != Status.CONSUMED or record.lease_expired:
        return None  # an expired CONSUMED record is claimed afresh by the next delivery
    return _answer(task, resolved, digest(key), record, mine, task_id)


def _answer(
    task: Any,
    resolved: TaskOptions,
    key_digest: str,
    record: Record | None,
    mine: str | object | None,
    task_id: str | None,
) -> _Answer | None:
    """Answer this send with *record*'s message, unless its payload differs (then publish)."""
    if record is None:
        return None
    if mine is _UNKNOWN:
        return None  # published: the worker will say what is wrong with the arguments
    if mine is not None and record.payload_digest is not None and mine != record.payload_digest:
        return None  # published, so that the worker reports the mismatch
    logger.info(
        "%s: not published; the message (scope %s, key digest %s) is %s under task id %s, "
        "which this call returns (dedup_on_enqueue)",
        task.name,
        resolved.scope,
        key_digest,
        record.status,
        record.task_id,
    )
    if signals.publish_skipped.receivers:
        signals.publish_skipped.send_robust(
            sender=task,
            task_id=storable(task_id) if task_id else None,
            scope=resolved.scope,
            key_digest=key_digest,
            record=record,
            reason=record.status,
        )
    return _Answer(task.AsyncResult(record.task_id))


def _lookup_failed(task: Any, exc: BaseException) -> None:
    logger.warning(
        "%s: the lookup before publishing failed (%s); the message is published as usual",
        task.name,
        exc,
    )


def _remove_marker(task: Any, marker: _Marker) -> None:
    """Compare-and-delete the marker this send wrote, whose message could not be published."""
    claim = marker.claim
    try:
        marker.backend.release(claim.scope, claim.key_digest, claim.owner, expired_only=False)
    except StorageError as exc:
        logger.error(
            "%s[%s]: publishing failed, and the QUEUED marker (scope %s, key digest %s) could "
            "not be removed (%s): the key is blocked until the queue TTL ends.",
            task.name,
            claim.task_id,
            claim.scope,
            claim.key_digest,
            exc,
        )


def _marker_lease(task: Any, resolved: TaskOptions, options: dict[str, Any]) -> float | None:
    """The marker's lease: ``dedup_queue_ttl`` plus the send's delay, capped at its ``expires``.

    A message that expires in the queue (or is revoked) is never delivered, so
    its marker must not outlive it. None: it expires before it may run.
    """
    delay = _delay(task, options)
    lease = resolved.queue_ttl + delay
    expires = _seconds_until(task, options.get("expires", task.expires))
    if expires is None:
        return lease
    if expires <= delay:
        return None
    return min(lease, expires)


def _seconds_until(task: Any, when: Any) -> float | None:
    """Seconds from now until *when* (seconds, a datetime or an ISO 8601 text), or None."""
    if when is None or isinstance(when, bool):
        return None
    if isinstance(when, int | float):
        return float(when)
    try:
        moment = maybe_iso8601(when) if isinstance(when, str) else when
    except (TypeError, ValueError):
        return None
    if not isinstance(moment, datetime.datetime):
        return None
    moment = maybe_make_aware(moment, task.app.timezone)
    return (moment - datetime.datetime.now(datetime.timezone.utc)).total_seconds()


def _delay(task: Any, options: dict[str, Any]) -> float:
    """Seconds until a send with *options* may run: its countdown, or its ETA from now."""
    countdown = options.get("countdown")
    if isinstance(countdown, int | float) and not isinstance(countdown, bool) and countdown > 0:
        return float(countdown)
    eta = options.get("eta")
    if isinstance(eta, int | float):
        return 0.0  # not an ETA Celery takes
    return max(0.0, _seconds_until(task, eta) or 0.0)


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


# dedup_payload fails for a send's arguments: the worker logs it, and compares nothing.
_UNKNOWN = object()


def _decoded(
    task: Any, args: Any, kwargs: Any, options: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The arguments as the worker will decode them from the message, or None.

    Tuples become lists, a dict's integer keys become strings, and so on. None:
    they do not serialize, and the publish itself will say so.
    """
    serializer = options.get("serializer") or task.serializer or task.app.conf.task_serializer
    try:
        content_type, encoding, data = serialization.dumps(
            (tuple(args or ()), dict(kwargs or {})), serializer
        )
        decoded = serialization.loads(data, content_type, encoding, accept=[content_type])
    except Exception:
        return None
    return tuple(decoded[0]), dict(decoded[1])


def _producer_fingerprint(
    task: Any, resolved: TaskOptions, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str | object | None:
    """The fingerprint the worker will compute of these (decoded) arguments.

    None: no fingerprint (``"ignore"``, or none for this call); :data:`_UNKNOWN`:
    ``dedup_payload`` fails for them.
    """
    if resolved.payload_mismatch == "ignore":
        return None
    try:
        return message_fingerprint(task, resolved.payload_function, args, kwargs)
    except DedupPayloadError:
        return _UNKNOWN
