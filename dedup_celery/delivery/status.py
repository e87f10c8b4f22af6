"""Status mode: claim (or take over) a lease, run the body, then mark the record CONSUMED.

The body runs outside any transaction of ours, so any kind of effect is
covered; a worker that dies after the effect and before CONSUMED is the one
window (docs/GUARANTEES.md).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from celery.exceptions import Ignore, Reject

from dedup_celery import signals
from dedup_celery.backends.base import Record, Verdict
from dedup_celery.delivery import outcomes
from dedup_celery.delivery.base import Delivery, logger
from dedup_celery.delivery.results import storable_result
from dedup_celery.exceptions import StorageError
from dedup_celery.identity import earlier_attempt_is_over, owner_is_gone, running_body
from dedup_celery.lease import Heartbeat, retry_in_background
from dedup_celery.states import Status

# Pauses between attempts to mark a record CONSUMED after the body succeeded.
COMPLETE_RETRY_DELAYS = (0.1, 0.5, 1.0)
# How long a release after a failed body keeps retrying a store that is down
# before it hands the retries to a background thread.
RELEASE_RETRY_SECONDS = 2.0


class StatusDelivery(Delivery):
    """One status-mode delivery (see the module docstring)."""

    def run(self) -> Any:
        """Claim, run the body once, and record how it ended."""
        backend, claim = self.backend, self.claim
        try:
            outcome = backend.claim(claim)
            if outcome.verdict is Verdict.IN_FLIGHT and self._owner_gone(outcome.record):
                # The owner died or this process's earlier attempt is over: end
                # its lease and claim again (that counts as a takeover).
                gone = outcome.record
                assert gone is not None
                assert gone.owner is not None
                outcome = backend.take_over(claim, gone.owner)
        except StorageError as exc:
            outcomes.storage_unavailable(self, exc, "claim")
        if not outcome.verdict.claimed:
            return outcomes.duplicate(self, outcome)
        self.claimed(outcome)
        heartbeat = self._start_heartbeat()
        try:
            with running_body():
                retval = self.run_body()
        except Ignore:
            # self.replace() and bodies that ignore their message: the message is handled.
            self._stop(heartbeat)
            self._complete(None)
            raise
        except Reject as exc:
            self._stop(heartbeat)
            # A requeued message comes back as the same delivery and must run again.
            self._after_failure(requeued=bool(getattr(exc, "requeue", False)))
            raise
        except BaseException:
            self._stop(heartbeat)
            self._after_failure(requeued=False)
            raise
        self._stop(heartbeat)
        self._complete(storable_result(self, retval))
        return retval

    def _owner_gone(self, record: Record | None) -> bool:
        # A QUEUED marker's owner is the producer, whose process may end at once.
        if record is None or record.owner is None or record.status != Status.PROCESSING:
            return False
        if owner_is_gone(record):
            logger.warning(
                "%s: the process holding %s (pid %s on %s) is gone; its lease ends now",
                self.task.name,
                record.task_id,
                record.pid,
                record.hostname,
            )
            return True
        if earlier_attempt_is_over(record):
            logger.info(
                "%s: this process's earlier attempt of %s is over; its lease ends now",
                self.task.name,
                record.task_id,
            )
            return True
        return False

    def _start_heartbeat(self) -> Heartbeat | None:
        interval = self.options.heartbeat_interval
        if interval is None:
            return None
        task, request = self.task, self.request
        time_limit = (request.timelimit or (None, None))[0] if request.timelimit else None
        time_limit = time_limit or task.time_limit or task.app.conf.task_time_limit
        heartbeat = Heartbeat(
            self.backend,
            self.claim,
            interval,
            float(time_limit) if time_limit else None,
            self.label,
        )
        heartbeat.start()
        return heartbeat

    @staticmethod
    def _stop(heartbeat: Heartbeat | None) -> None:
        if heartbeat is not None:
            heartbeat.stop()

    def _complete(self, stored: Any) -> None:
        backend, claim = self.backend, self.claim
        completed: bool | None = None
        error: StorageError | None = None
        for delay in (0.0, *COMPLETE_RETRY_DELAYS):
            if delay:
                time.sleep(delay)
            try:
                completed = backend.complete(claim, stored)
                break
            except StorageError as exc:
                error = exc
        if completed is None:
            logger.error(
                "%s: the body succeeded but the record (scope %s, key digest %s) could not "
                "be marked consumed after %d attempts: %s. It stays PROCESSING until its lease "
                "ends; a copy delivered after that runs the body again.",
                self.label,
                claim.scope,
                claim.key_digest,
                len(COMPLETE_RETRY_DELAYS) + 1,
                error,
            )
            return
        if completed:
            return
        current: Record | None = None
        with contextlib.suppress(StorageError):
            current = backend.get(claim.scope, claim.key_digest)
        current_owner = current.owner if current else None
        logger.error(
            "%s: lease lost. The body finished, but the record (scope %s, key digest %s) "
            "now belongs to owner %s, not %s: the lease expired and another delivery took "
            "over, so the effect may have happened twice. Raise PROCESSING_TIMEOUT above the "
            "longest run time of this task.",
            self.label,
            claim.scope,
            claim.key_digest,
            current_owner,
            claim.owner,
        )
        self.send(signals.lease_lost, current, owner=claim.owner, current_owner=current_owner)

    def _after_failure(self, *, requeued: bool) -> None:
        """Let the message run again after the body raised.

        A requeued message (``Reject(requeue=True)``) is the same delivery
        coming back, so its record is deleted. Otherwise the record becomes
        FAILED: a retry (a higher attempt) or another task id claims it, while a
        stale copy of this delivery (same task id and attempt) is skipped. If the
        store is down, the write is retried briefly here, then in the
        background until the lease would have ended.
        """
        backend, claim = self.backend, self.claim

        def write() -> bool:
            if requeued:
                return backend.release(
                    claim.scope, claim.key_digest, claim.owner, expired_only=False
                )
            return backend.fail(claim)

        label = f"{self.label}: {'release' if requeued else 'fail'}"
        deadline = time.monotonic() + RELEASE_RETRY_SECONDS
        delay = 0.1
        while True:
            try:
                done = write()
                break
            except StorageError as exc:
                if time.monotonic() + delay > deadline:
                    logger.error(
                        "%s: the body raised and the record (scope %s, key digest %s) could not "
                        "be updated for %.0f s: %s. Retrying in the background; until then a "
                        "new delivery of this message waits for the lease.",
                        label,
                        claim.scope,
                        claim.key_digest,
                        RELEASE_RETRY_SECONDS,
                        exc,
                    )
                    retry_in_background(write, label=label, until=claim.lease_seconds)
                    return
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        if done:
            reason = "requeued" if requeued else "failed"
            self.send(signals.message_released, None, owner=claim.owner, reason=reason)
        else:
            logger.warning(
                "%s: the body raised and the record (scope %s, key digest %s) was left alone: "
                "owner %s no longer holds it.",
                label,
                claim.scope,
                claim.key_digest,
                claim.owner,
            )
