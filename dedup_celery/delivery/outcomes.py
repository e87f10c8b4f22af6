"""What a delivery that may not run the body does: skip, return, fail or reschedule.

* consumed: ``Ignore`` for a redelivery of the consuming message, else the
  original's stored result;
* stale (a copy of a delivery whose body already raised): ``Ignore``;
* poisoned: :class:`~dedup_celery.exceptions.PoisonMessageError`;
* in flight, or the store failing: a reschedule through Celery's retry
  machinery that keeps the retry budget.

Each leaves a log line, and a duplicate a signal, so none is silent. A
duplicate whose arguments differ is reported first (:mod:`.mismatch`).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from typing import Any, NoReturn

from celery.exceptions import Ignore, Reject
from celery.utils.time import maybe_iso8601, maybe_make_aware

from dedup_celery import signals
from dedup_celery.backends.base import ClaimOutcome, Verdict
from dedup_celery.delivery import mismatch
from dedup_celery.delivery.base import Delivery, logger
from dedup_celery.delivery.results import original_result
from dedup_celery.delivery.visibility import announce
from dedup_celery.enqueue import republishing
from dedup_celery.exceptions import (
    DedupConfigurationError,
    DuplicateInFlightError,
    MissingTableError,
    PoisonMessageError,
    StorageError,
    StorageRefusedError,
)
from dedup_celery.options import fallback_countdown


def duplicate(delivery: Delivery, outcome: ClaimOutcome) -> Any:
    """Handle a claim this delivery did not win; return the duplicate's result or raise."""
    claim, record = delivery.claim, outcome.record
    mismatched = mismatch.check(delivery, outcome)
    if outcome.verdict is Verdict.CONSUMED:
        assert record is not None
        if record.task_id != claim.task_id and mismatch.refused(delivery, mismatched):
            delivery.send(signals.duplicate_skipped, record, reason="payload_mismatch")
            mismatch.refuse(delivery, record)
        logger.info(
            "%s: duplicate skipped; the message (scope %s, key digest %s) was consumed "
            "by task id %s (skipped=%d)",
            delivery.label,
            claim.scope,
            claim.key_digest,
            record.task_id,
            record.skipped,
        )
        delivery.send(signals.duplicate_skipped, record, reason="consumed")
        if record.task_id == claim.task_id:
            # A redelivery of the consuming message: leave its stored state alone.
            raise Ignore()
        announce(delivery, record, outcome.verdict)
        return original_result(delivery, record)
    if outcome.verdict is Verdict.STALE:
        assert record is not None
        logger.info(
            "%s: stale copy skipped; this delivery (attempt %d) already ran and raised "
            "(scope %s, key digest %s, recorded attempt %d). A retry, or a new task id, "
            "runs it again.",
            delivery.label,
            claim.attempt,
            claim.scope,
            claim.key_digest,
            record.attempt,
        )
        delivery.send(signals.duplicate_skipped, record, reason="stale")
        raise Ignore()
    if outcome.verdict is Verdict.POISONED:
        assert record is not None
        if outcome.poisoned_now:
            logger.error(
                "%s: POISON MESSAGE. Its deliveries died %d times while running the "
                "body (scope %s, key digest %s); the record is now POISONED and the body "
                "will not run again until an operator releases it (admin action or "
                "dedup_release) or RECORD_TTL passes.",
                delivery.label,
                record.takeovers + 1,
                claim.scope,
                claim.key_digest,
            )
            delivery.send(signals.message_poisoned, record)
        announce(delivery, record, outcome.verdict)
        raise PoisonMessageError(
            f"{delivery.label}: the message (scope {claim.scope}, key digest "
            f"{claim.key_digest}) is POISONED after {record.takeovers} takeovers; its body "
            "does not run until an operator releases the record."
        )
    in_flight(delivery, outcome, mismatched)


def in_flight(delivery: Delivery, outcome: ClaimOutcome, mismatched: bool = False) -> NoReturn:
    """Reschedule a copy of a message that another delivery is still running.

    A copy whose payload differs is refused instead under ``"raise"``, and
    otherwise carries :data:`.mismatch.REPORTED_HEADER`, so its next visits do
    not report it again.
    """
    claim, record = delivery.claim, outcome.record
    if record is not None and mismatch.refused(delivery, mismatched):
        delivery.send(signals.duplicate_skipped, record, reason="payload_mismatch")
        mismatch.refuse(delivery, record)
    if delivery.request.is_eager:
        raise DuplicateInFlightError(
            f"{delivery.label}: a copy of this message (scope {claim.scope}, key digest "
            f"{claim.key_digest}) is still running, and an eager call cannot be rescheduled."
        )
    countdown = delivery.options.retry_countdown
    logger.info(
        "%s: duplicate of a message in flight (scope %s, key digest %s, held by task "
        "id %s); rescheduled in %s s",
        delivery.label,
        claim.scope,
        claim.key_digest,
        record.task_id if record else "an uncommitted transaction",
        countdown,
    )
    delivery.send(signals.duplicate_rescheduled, record, countdown=countdown)
    announce(delivery, record, outcome.verdict)
    reported = {mismatch.REPORTED_HEADER: record.task_id} if mismatched and record else None
    reschedule(delivery, countdown, headers=reported)


#: The header that counts a message's reschedules for a failing store, copy after copy.
STORE_RESCHEDULES_HEADER = "dedup_store_reschedules"
#: The header that carries the message's own ``expires`` on the copies this package makes.
EXPIRES_HEADER = "dedup_expires"


def _header(request: Any, name: str) -> Any:
    """The value of custom header *name* on *request*'s message, or None."""
    return (getattr(request, "headers", None) or {}).get(name)


def copy_deadline(task: Any, request: Any) -> datetime.datetime | None:
    """Return the ``expires`` of the message that *request*'s copy was made from, or None.

    Only copies made by :func:`republish` carry it; Celery judges the
    ``expires`` of every other message itself, before the task runs.
    """
    value = _header(request, EXPIRES_HEADER)
    if not value:
        return None
    try:
        deadline = maybe_iso8601(value)
    except (TypeError, ValueError):
        logger.warning(
            "%s[%s]: ignoring the unreadable %s header %r",
            task.name,
            request.id,
            EXPIRES_HEADER,
            value,
        )
        return None
    if deadline is None:
        return None
    return maybe_make_aware(deadline, task.app.timezone)


def expired_copy(delivery: Delivery, deadline: datetime.datetime) -> None:
    """Skip a copy this package made that arrives after its message's ``expires``, if it did.

    The copy carries no broker ``expires``, so the worker never revokes it:
    that would write REVOKED over the original's result, count a chord part,
    and put the task id in the worker's revoked set. It ends with ``Ignore``
    instead, which writes no state, after a log line and ``duplicate_skipped``.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    if now <= deadline:
        return
    logger.info(
        "%s: copy skipped; it arrived after its message's expires (%s), so it does not run "
        "(scope %s, key digest %s)",
        delivery.label,
        deadline.isoformat(),
        delivery.claim.scope,
        delivery.claim.key_digest,
    )
    delivery.send(signals.duplicate_skipped, None, reason="expired")
    raise Ignore()


def store_reschedules(request: Any) -> int:
    """How many times this message was already rescheduled because the store failed."""
    value = _header(request, STORE_RESCHEDULES_HEADER)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def storage_unavailable(delivery: Delivery, exc: BaseException, phase: str) -> NoReturn:
    """The store failed before the body could run claimed (or at COMMIT).

    An outage is rescheduled, at most ``MAX_STORE_RESCHEDULES`` times per
    message (counted in a header of the copy); a refused statement, and an
    outage past that bound, fail the delivery instead, loudly. Either way the
    body never runs unclaimed.
    """
    done = "the body did not run" if phase == "claim" else "nothing of this delivery committed"
    if isinstance(exc, StorageRefusedError):
        logger.error(
            "%s: the message store refused this message during %s (%s); retrying cannot "
            "fix that, so the delivery fails instead of being rescheduled, and %s.",
            delivery.label,
            phase,
            exc,
            done,
        )
        raise exc
    if delivery.request.is_eager:
        raise StorageError(
            f"{delivery.label}: the message store failed during {phase}, and an eager call "
            f"cannot be rescheduled: {exc}"
        ) from exc
    spent = store_reschedules(delivery.request)
    limit = delivery.options.max_store_reschedules
    if spent >= limit:
        message = (
            f"{delivery.label}: the message store failed during {phase} ({exc}), and this "
            f"message was already rescheduled {spent} times for store failures "
            f"(MAX_STORE_RESCHEDULES={limit}); it fails now instead, and {done}. Send it "
            "again once the store works."
        )
        logger.error("%s", message)
        raise StorageError(message) from exc
    countdown = delivery.options.retry_countdown
    # A missing table is a deployment error, not an outage: say it loudly.
    level = logging.ERROR if isinstance(exc, MissingTableError) else logging.WARNING
    logger.log(
        level,
        "%s: the message store failed during %s (%s); the body did not run unclaimed. "
        "Rescheduled in %s s.",
        delivery.label,
        phase,
        exc,
        countdown,
    )
    reschedule(delivery, countdown, headers={STORE_RESCHEDULES_HEADER: spent + 1})


def misconfigured(task: Any, exc: DedupConfigurationError) -> NoReturn:
    """The dedup configuration broke under a running worker: reschedule, never ack it away.

    A worker with such errors does not start (``checks.refuse_to_start_on_errors``);
    this is for a configuration that breaks after it started. The countdown is
    the task's or the settings' ``RETRY_COUNTDOWN`` where those still parse.
    An eager call raises the error.
    """
    request = task.request
    if request.is_eager:
        raise exc
    label = f"{task.name}[{request.id}]"
    countdown = fallback_countdown(task)
    logger.error(
        "%s: the dedup configuration is broken (%s); the body did not run. Rescheduled in "
        "%s s: the message runs once the configuration is fixed.",
        label,
        exc,
        countdown,
    )
    republish(task, request, label, countdown)


def _apply_async(signature: Any) -> None:
    signature.apply_async()


#: How a rescheduled copy is sent: published to the broker. :mod:`dedup_celery.testing`
#: swaps it for a capture while it runs, to deliver the copies itself.
send_copy: Callable[[Any], None] = _apply_async


def reschedule(
    delivery: Delivery, countdown: float, headers: dict[str, Any] | None = None
) -> NoReturn:
    """Publish this request again after *countdown*, then ack this copy (see :func:`republish`)."""
    republish(delivery.task, delivery.request, delivery.label, countdown, headers)


def republish(
    task: Any,
    request: Any,
    label: str,
    countdown: float,
    headers: dict[str, Any] | None = None,
) -> NoReturn:
    """Publish *request* again after *countdown*, then ack this copy.

    This is what ``Task.retry`` does inside, less what makes it wrong here:
    the copy keeps ``request.retries`` (so the user's ``max_retries`` is not
    spent), no RETRY state is written over the original's result, and a
    failed publish leaves this message unacked instead of dropping it. The
    copy keeps the message's custom headers, with *headers* over them.

    The copy has no broker ``expires`` (a late copy would be revoked, see
    :func:`expired_copy`): the message's own travels in ``dedup_expires``.
    """
    carried = {**request.as_execution_options()["headers"], **(headers or {})}
    if request.expires and not carried.get(EXPIRES_HEADER):
        expires = request.expires
        carried[EXPIRES_HEADER] = expires.isoformat() if hasattr(expires, "isoformat") else expires
    signature = task.signature_from_request(
        request,
        countdown=countdown,
        retries=request.retries or 0,
        expires=None,
        headers=carried,
    )
    try:
        with republishing():  # a copy of a received message: dedup_on_enqueue never skips it
            send_copy(signature)
    except Exception as exc:
        logger.error(
            "%s: could not publish the rescheduled copy (%s); the message is requeued instead.",
            label,
            exc,
        )
        raise Reject(exc, requeue=True) from exc
    raise Ignore()


def bypassed(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run the body as a plain task: dedup is bypassed for *task* (``BYPASS``, ``dedup_bypass``).

    No record is read or written, so a duplicate of this message runs the body
    again; the WARNING on every delivery keeps that from going unnoticed.
    """
    logger.warning(
        "%s[%s]: dedup is bypassed (DEDUP_CELERY['BYPASS'] or dedup_bypass): the body runs "
        "without a claim, and a duplicate of this message would run it again",
        task.name,
        task.request.id,
    )
    return task.run(*args, **kwargs)
