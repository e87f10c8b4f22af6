"""One delivery of one message: what every mode needs to claim it and to report what happened."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from dedup_celery import signals
from dedup_celery.backends.base import BaseBackend, Claim, ClaimOutcome, Record, Verdict
from dedup_celery.exceptions import DedupPayloadError
from dedup_celery.identity import current_identity
from dedup_celery.keys import digest, storable
from dedup_celery.options import TaskOptions
from dedup_celery.payload import message_fingerprint

#: Every delivery logs here, whatever module the step lives in.
logger = logging.getLogger("dedup_celery.task")


class Delivery:
    """The state of one delivery: the task, its request, options, claim, backend and arguments.

    Made afresh for every call, so nothing per-call lives on the task
    instance (Celery keeps one per process).
    """

    def __init__(
        self,
        task: Any,
        options: TaskOptions,
        key: str,
        backend: BaseBackend,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        request = task.request
        self.task = task
        self.request = request
        self.options = options
        self.backend = backend
        self.args = args
        self.kwargs = kwargs
        self.claim = Claim(
            scope=options.scope,
            key=key,
            key_digest=digest(key),
            owner=uuid.uuid4().hex,
            task_id=storable(request.id),
            task_name=storable(task.name),
            attempt=request.retries or 0,
            identity=current_identity(),
            lease_seconds=options.processing_timeout,
            record_ttl=options.record_ttl,
            max_takeovers=options.max_takeovers,
            payload_digest=(None if options.payload_mismatch == "ignore" else self._fingerprint()),
        )

    def _fingerprint(self) -> str | None:
        """The delivery's payload fingerprint; None, with a WARNING, if dedup_payload fails.

        A failing callable must not change what happens to the message: a
        redelivery of a consumed one still ends as a duplicate, with nothing
        written over the original's state.
        """
        try:
            return message_fingerprint(
                self.task, self.options.payload_function, self.args, self.kwargs
            )
        except DedupPayloadError as exc:
            logger.warning(
                "%s[%s]: %s This delivery has no payload fingerprint, so no mismatch is "
                "looked for.",
                self.task.name,
                self.request.id,
                exc,
            )
            return None

    @property
    def label(self) -> str:
        """``task.name[task id]``, the prefix of every log line about this delivery."""
        return f"{self.task.name}[{self.claim.task_id}]"

    def run_body(self) -> Any:
        """Run the task's body in the request Celery's tracer pushed."""
        return self.task.run(*self.args, **self.kwargs)

    def claimed(self, outcome: ClaimOutcome) -> None:
        """Note that this delivery owns the message: the request's owner token, logs, signals."""
        claim = self.claim
        self.request.dedup_owner = claim.owner
        if outcome.verdict is Verdict.TAKEN_OVER:
            logger.info(
                "%s: took over the expired record (scope %s, key digest %s); takeovers=%s",
                self.label,
                claim.scope,
                claim.key_digest,
                outcome.record.takeovers if outcome.record else "?",
            )
            self.send(signals.claim_taken_over, outcome.record)
        if signals.message_claimed.receivers:
            # Read only for a receiver: a first claim's record is built on reading.
            self.send(signals.message_claimed, outcome.record)

    def send(self, signal: Any, record: Record | None, **extra: Any) -> None:
        """Send one of :mod:`dedup_celery.signals` for this delivery, sender the task."""
        if not signal.receivers:
            return
        # A failing receiver must not change what happens to the message.
        responses = signal.send_robust(
            sender=self.task,
            task_id=self.claim.task_id,
            scope=self.claim.scope,
            key_digest=self.claim.key_digest,
            record=record,
            **extra,
        )
        for receiver, response in responses:
            if isinstance(response, Exception):
                logger.error(
                    "%s: signal receiver %r raised %r",
                    self.label,
                    receiver,
                    response,
                    exc_info=response,
                )
