"""Same key, other arguments: a duplicate whose payload fingerprint differs from the record's.

A claim stores its payload fingerprint (:mod:`dedup_celery.payload`) on the
record; a duplicate compares its own with it. A difference is reported once
per copy: a WARNING that names both task ids (never the arguments), the
``payload_mismatch`` signal, and one more on the record's
``payload_mismatches``. ``PAYLOAD_MISMATCH`` (or the task's
``dedup_payload_mismatch``) then says what the copy does:

* ``"warn"``: what any duplicate does (skipped with the original's result, or
  rescheduled while the original runs);
* ``"raise"``: it fails with :class:`~dedup_celery.exceptions.PayloadMismatchError`,
  unless it carries the original's own task id: then it ends with ``Ignore``, so
  that no FAILURE is written over the original's state;
* ``"ignore"``: nothing is computed or compared.

Never a mismatch: a record or copy without a fingerprint (written before it
existed, another serializer, ``dedup_payload`` returned None), and a copy of
the same task id at another attempt (``self.retry(args=...)`` may change the
arguments). A replacement (``self.replace()``) has a key of its own
(:func:`dedup_celery.keys.nested_key`), so it never meets the replaced record.
"""

from __future__ import annotations

from typing import NoReturn

from celery.exceptions import Ignore

from dedup_celery import signals
from dedup_celery.backends.base import ClaimOutcome, Record
from dedup_celery.delivery.base import Delivery, logger
from dedup_celery.exceptions import PayloadMismatchError, StorageError

#: The header on a rescheduled copy whose mismatch was already reported: the task id
#: of the record it was reported against.
REPORTED_HEADER = "dedup_payload_mismatch"


def differs(delivery: Delivery, record: Record | None) -> bool:
    """Whether this delivery's payload differs from *record*'s, in a way that counts."""
    claim = delivery.claim
    mine = claim.payload_digest
    if record is None or mine is None or record.payload_digest is None:
        return False
    if record.payload_digest == mine:
        return False
    # A retry of the same task id may change its arguments (retry(args=...)).
    return not (record.task_id == claim.task_id and record.attempt != claim.attempt)


def reported(delivery: Delivery, record: Record) -> bool:
    """Whether this copy's mismatch with *record*'s message was reported before a reschedule."""
    headers = getattr(delivery.request, "headers", None) or {}
    return bool(headers.get(REPORTED_HEADER)) and headers.get(REPORTED_HEADER) == record.task_id


def check(delivery: Delivery, outcome: ClaimOutcome) -> bool:
    """Report a mismatch of this duplicate once per copy; return whether its payload differs."""
    record = outcome.record
    if delivery.options.payload_mismatch == "ignore" or not differs(delivery, record):
        return False
    assert record is not None
    if reported(delivery, record):
        return True
    claim = delivery.claim
    counted = False
    try:
        counted = delivery.backend.count_payload_mismatch(claim.scope, claim.key_digest)
    except StorageError as exc:
        logger.warning(
            "%s: could not count the payload mismatch on the record (scope %s, key digest %s): %s",
            delivery.label,
            claim.scope,
            claim.key_digest,
            exc,
        )
    logger.warning(
        "%s: payload mismatch: this duplicate's arguments differ from those of task id %s, "
        "which holds the message (scope %s, key digest %s); payload_mismatches=%s. "
        "PAYLOAD_MISMATCH is %r.",
        delivery.label,
        record.task_id,
        claim.scope,
        claim.key_digest,
        record.payload_mismatches + 1 if counted else "?",
        delivery.options.payload_mismatch,
    )
    delivery.send(
        signals.payload_mismatch,
        record,
        original_task_id=record.task_id,
        payload_digest=claim.payload_digest,
        verdict=outcome.verdict.value,
    )
    return True


def refuse(delivery: Delivery, record: Record) -> NoReturn:
    """End a mismatched duplicate under ``"raise"``: fail it, or ``Ignore`` the original's id."""
    claim = delivery.claim
    if record.task_id == claim.task_id:
        # Failing would write FAILURE over the original's own state.
        raise Ignore()
    raise PayloadMismatchError(
        f"{delivery.label}: this duplicate's arguments differ from those of task id "
        f"{record.task_id}, which holds its key (scope {claim.scope}, key digest "
        f"{claim.key_digest}), and PAYLOAD_MISMATCH is 'raise'; the body did not run. "
        "Send it with another key, or leave out of dedup_payload what may change."
    )


def refused(delivery: Delivery, mismatched: bool) -> bool:
    """Whether a mismatched duplicate must be refused (``"raise"``) rather than handled."""
    return mismatched and delivery.options.payload_mismatch == "raise"
