"""``DedupTask``: the Celery task base class that gives each message one effect."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

from celery.contrib.django.task import DjangoTask
from celery.exceptions import Ignore, Reject
from django.db import Error as DatabaseLibraryError
from kombu.utils import json as kombu_json

from dedup_celery import signals
from dedup_celery.backends import get_backend
from dedup_celery.backends.base import BaseBackend, Claim, ClaimOutcome, Record, Verdict
from dedup_celery.conf import get_settings, is_seconds
from dedup_celery.exceptions import (
    DedupConfigurationError,
    DedupError,
    DedupKeyError,
    DuplicateInFlightError,
    MissingTableError,
    OuterTransactionError,
    PoisonMessageError,
    StorageError,
)
from dedup_celery.identity import current_identity
from dedup_celery.keys import digest
from dedup_celery.recovery import (
    Heartbeat,
    earlier_attempt_is_over,
    owner_is_gone,
    retry_in_background,
    running_body,
)

logger = logging.getLogger(__name__)

# Pauses between attempts to mark a record CONSUMED after the body succeeded.
COMPLETE_RETRY_DELAYS = (0.1, 0.5, 1.0)
# How long a release after a failed body keeps retrying a store that is down
# before it hands the retries to a background thread.
RELEASE_RETRY_SECONDS = 2.0

_TIMEOUT_OPTIONS = ("dedup_processing_timeout", "dedup_retry_countdown", "dedup_record_ttl")

_VALID_TASK_CLASSES: weakref.WeakSet[type] = weakref.WeakSet()


@dataclass(frozen=True)
class _Options:
    """One task's dedup options, resolved against the settings for one delivery."""

    scope: str
    transactional: bool
    key_function: Callable[..., Any] | None
    processing_timeout: float
    retry_countdown: float
    record_ttl: float
    result_max_bytes: int
    heartbeat_interval: float | None
    max_takeovers: int


class _UseSetting:
    """The default of ``dedup_heartbeat_interval``: follow ``HEARTBEAT_INTERVAL``."""

    def __repr__(self) -> str:
        return "USE_SETTING"


#: ``dedup_heartbeat_interval`` left at this follows the ``HEARTBEAT_INTERVAL`` setting.
USE_SETTING: Any = _UseSetting()


def task_key_function(task: Any) -> Callable[..., Any] | None:
    """Return a task's ``dedup_key`` callable, unbound, or None.

    The task decorator puts the option in the class dict, where a plain
    function would become a method; it is read without the descriptor protocol
    so it is always called as a plain function with the task's arguments.
    """
    func = inspect.getattr_static(task, "dedup_key", None)
    if isinstance(func, staticmethod | classmethod):
        func = func.__func__
    return func


def task_option_errors(task: Any) -> list[str]:
    """Return a sentence for every dedup option of *task* that can never work."""
    problems = []
    func = task_key_function(task)
    if func is not None and not callable(func):
        problems.append(f"dedup_key is {func!r}; it must be None or a callable")
    if not isinstance(task.dedup_transactional, bool):
        problems.append(f"dedup_transactional is {task.dedup_transactional!r}; it must be a bool")
    scope = task.dedup_scope
    if scope is not None and (not isinstance(scope, str) or not scope.strip()):
        problems.append(f"dedup_scope is {scope!r}; it must be None or a non-empty str")
    effective_scope = scope if isinstance(scope, str) and scope else task.name
    if isinstance(effective_scope, str) and len(effective_scope) > 255:
        problems.append(
            f"the scope is {len(effective_scope)} characters long; the limit is 255 "
            "(set a shorter dedup_scope)"
        )
    for name in _TIMEOUT_OPTIONS:
        value = getattr(task, name)
        if value is not None and not is_seconds(value):
            problems.append(f"{name} is {value!r}; it must be None or seconds greater than zero")
    heartbeat = getattr(task, "dedup_heartbeat_interval", USE_SETTING)
    if heartbeat is not USE_SETTING and heartbeat is not None and not is_seconds(heartbeat):
        problems.append(
            f"dedup_heartbeat_interval is {heartbeat!r}; it must be None (off) or seconds "
            "greater than zero"
        )
    return problems


class DedupTask(DjangoTask):
    """A Celery task whose body takes effect once per message, however often it is delivered.

    Use it as the base of a task: ``@shared_task(base=DedupTask)``. Options are
    class attributes that the task decorator can set:

    * ``dedup_key``: None (the task id is the key) or a callable that gets the
      task's args and kwargs and returns a non-empty str, or None to skip dedup
      for that call.
    * ``dedup_transactional``: True runs the claim and the body in one database
      transaction (exactly once for work done in that database).
    * ``dedup_scope``: records are unique per scope; defaults to the task name.
    * ``dedup_processing_timeout``, ``dedup_retry_countdown``,
      ``dedup_record_ttl``: per-task overrides of the settings of the same name.
    * ``dedup_heartbeat_interval``: renew the lease this often while the body
      runs; None turns renewal off for this task; left alone, it follows
      ``HEARTBEAT_INTERVAL``.

    While the body runs, ``self.request.dedup_owner`` holds this delivery's
    owner token (None when the call runs without dedup), so the body can make its
    own writes conditional on still owning the message.
    """

    #: Ack after the body, so a crash before the ack redelivers the message.
    acks_late: ClassVar[bool] = True
    #: Requeue the message of a killed child instead of acking it.
    reject_on_worker_lost: ClassVar[bool] = True

    dedup_key: ClassVar[Callable[..., str | None] | None] = None
    dedup_transactional: ClassVar[bool] = False
    dedup_scope: ClassVar[str | None] = None
    dedup_processing_timeout: ClassVar[float | None] = None
    dedup_retry_countdown: ClassVar[float | None] = None
    dedup_record_ttl: ClassVar[float | None] = None
    dedup_heartbeat_interval: ClassVar[Any] = USE_SETTING  # a number, None, or USE_SETTING

    #: The worker-side request: when a child dies mid-task, the worker's main
    #: process ends that child's lease so the redelivery runs at once.
    Request: ClassVar[str] = "dedup_celery.request:DedupRequest"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the body at most once per message key (see the class docstring)."""
        request = self.request
        if request.called_directly:
            # A plain function call carries no message, so there is nothing to dedup.
            return super().__call__(*args, **kwargs)
        # From here on the body runs through self.run(), in the request Celery's
        # tracer pushed: Task.__call__ would push another one, which before
        # Celery 5.7 held only args and kwargs (no id, no retries).
        request.dedup_owner = None
        options = self._dedup_options()
        key = self._dedup_key_for(options, args, kwargs)
        if key is None:
            logger.debug(
                "%s[%s]: dedup_key returned None, running without dedup", self.name, request.id
            )
            return self.run(*args, **kwargs)
        claim = Claim(
            scope=options.scope,
            key=key,
            key_digest=digest(key),
            owner=uuid.uuid4().hex,
            task_id=request.id,
            task_name=self.name,
            attempt=request.retries or 0,
            identity=current_identity(),
            lease_seconds=options.processing_timeout,
            record_ttl=options.record_ttl,
            max_takeovers=options.max_takeovers,
        )
        backend = get_backend()
        if options.transactional:
            return self._call_transactional(backend, claim, options, args, kwargs)
        return self._call_status(backend, claim, options, args, kwargs)

    # -- options and keys ----------------------------------------------------------

    def _dedup_options(self) -> _Options:
        # Options are class attributes: validate each task class once per process.
        if type(self) not in _VALID_TASK_CLASSES:
            problems = task_option_errors(self)
            if problems:
                raise DedupConfigurationError(
                    f"Task {self.name!r} has invalid dedup options: " + "; ".join(problems) + "."
                )
            _VALID_TASK_CLASSES.add(type(self))
        conf = get_settings()

        def pick(name: str, default: float) -> float:
            value = getattr(self, name)
            return default if value is None else float(value)

        return _Options(
            scope=self.dedup_scope or self.name,
            transactional=self.dedup_transactional,
            key_function=task_key_function(self),
            processing_timeout=pick("dedup_processing_timeout", conf.processing_timeout),
            retry_countdown=pick("dedup_retry_countdown", conf.retry_countdown),
            record_ttl=pick("dedup_record_ttl", conf.record_ttl),
            result_max_bytes=conf.result_max_bytes,
            heartbeat_interval=(
                conf.heartbeat_interval
                if self.dedup_heartbeat_interval is USE_SETTING
                else self.dedup_heartbeat_interval
            ),
            max_takeovers=conf.max_takeovers,
        )

    def _dedup_key_for(self, options: _Options, args: tuple, kwargs: dict) -> str | None:
        func = options.key_function
        if func is None:
            return self.request.id
        try:
            key = func(*args, **kwargs)
        except Exception as exc:
            raise DedupKeyError(
                f"dedup_key of task {self.name!r} raised {type(exc).__name__}: {exc}. "
                "The task did not run; fix the callable or the arguments."
            ) from exc
        if key is None:
            return None
        if not isinstance(key, str):
            raise DedupKeyError(
                f"dedup_key of task {self.name!r} returned a {type(key).__name__}; it must "
                "return a non-empty str (or None to skip dedup for this call). The task did "
                "not run."
            )
        if not key:
            raise DedupKeyError(
                f"dedup_key of task {self.name!r} returned an empty string; it must return a "
                "non-empty str (or None to skip dedup for this call). The task did not run."
            )
        return key

    # -- status mode ---------------------------------------------------------------

    def _call_status(
        self, backend: BaseBackend, claim: Claim, options: _Options, args: tuple, kwargs: dict
    ) -> Any:
        try:
            outcome = backend.claim(claim)
            if outcome.verdict is Verdict.IN_FLIGHT and self._owner_gone(outcome.record):
                # The owner died or this process's earlier attempt is over: end
                # its lease and claim again (that counts as a takeover).
                backend.expire_lease(claim.scope, claim.key_digest, outcome.record.owner)
                outcome = backend.claim(claim)
        except StorageError as exc:
            self._storage_unavailable(claim, options, exc, "claim")
        if not outcome.verdict.claimed:
            return self._duplicate(claim, options, outcome)
        self._claimed(claim, outcome)
        heartbeat = self._start_heartbeat(backend, claim, options)
        try:
            with running_body():
                retval = self.run(*args, **kwargs)
        except Ignore:
            # self.replace() and bodies that ignore their message: the message is handled.
            self._stop_heartbeat(heartbeat)
            self._complete(backend, claim, None)
            raise
        except Reject as exc:
            self._stop_heartbeat(heartbeat)
            # A requeued message comes back as the same delivery and must run again.
            self._after_failure(backend, claim, requeued=bool(exc.requeue))
            raise
        except BaseException:
            self._stop_heartbeat(heartbeat)
            self._after_failure(backend, claim, requeued=False)
            raise
        self._stop_heartbeat(heartbeat)
        self._complete(backend, claim, self._storable_result(claim, options, retval))
        return retval

    def _owner_gone(self, record: Record | None) -> bool:
        if record is None or record.owner is None:
            return False
        if owner_is_gone(record):
            logger.warning(
                "%s: the process holding %s (pid %s on %s) is gone; its lease ends now",
                self.name,
                record.task_id,
                record.pid,
                record.hostname,
            )
            return True
        if earlier_attempt_is_over(record):
            logger.info(
                "%s: this process's earlier attempt of %s is over; its lease ends now",
                self.name,
                record.task_id,
            )
            return True
        return False

    def _start_heartbeat(
        self, backend: BaseBackend, claim: Claim, options: _Options
    ) -> Heartbeat | None:
        if options.heartbeat_interval is None:
            return None
        request = self.request
        time_limit = (request.timelimit or (None, None))[0] if request.timelimit else None
        time_limit = time_limit or self.time_limit or self.app.conf.task_time_limit
        heartbeat = Heartbeat(
            backend,
            claim,
            options.heartbeat_interval,
            float(time_limit) if time_limit else None,
            f"{self.name}[{claim.task_id}]",
        )
        heartbeat.start()
        return heartbeat

    @staticmethod
    def _stop_heartbeat(heartbeat: Heartbeat | None) -> None:
        if heartbeat is not None:
            heartbeat.stop()

    def _complete(self, backend: BaseBackend, claim: Claim, stored: Any) -> None:
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
                "%s[%s]: the body succeeded but the record (scope %s, key digest %s) could not "
                "be marked consumed after %d attempts: %s. It stays PROCESSING until its lease "
                "ends; a copy delivered after that runs the body again.",
                self.name,
                claim.task_id,
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
            "%s[%s]: lease lost. The body finished, but the record (scope %s, key digest %s) "
            "now belongs to owner %s, not %s: the lease expired and another delivery took "
            "over, so the effect may have happened twice. Raise PROCESSING_TIMEOUT above the "
            "longest run time of this task.",
            self.name,
            claim.task_id,
            claim.scope,
            claim.key_digest,
            current_owner,
            claim.owner,
        )
        self._send(
            signals.lease_lost, claim, current, owner=claim.owner, current_owner=current_owner
        )

    def _after_failure(self, backend: BaseBackend, claim: Claim, *, requeued: bool) -> None:
        """Let the message run again after the body raised.

        A requeued message (``Reject(requeue=True)``) is the same delivery
        coming back, so its record is deleted. Otherwise the record becomes
        FAILED: a retry (a higher attempt) or another task id claims it, while a
        stale copy of this delivery (same task id and attempt) is skipped. If the
        store is down, the write is retried briefly here, then in the
        background until the lease would have ended.
        """
        if requeued:

            def write() -> bool:
                return backend.release(
                    claim.scope, claim.key_digest, claim.owner, expired_only=False
                )
        else:

            def write() -> bool:
                return backend.fail(claim)

        label = f"{self.name}[{claim.task_id}]: {'release' if requeued else 'fail'}"
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
            self._send(
                signals.message_released,
                claim,
                None,
                owner=claim.owner,
                reason="requeued" if requeued else "failed",
            )
        else:
            logger.warning(
                "%s: the body raised and the record (scope %s, key digest %s) was left alone: "
                "owner %s no longer holds it.",
                label,
                claim.scope,
                claim.key_digest,
                claim.owner,
            )

    # -- transactional mode --------------------------------------------------------

    def _call_transactional(
        self, backend: BaseBackend, claim: Claim, options: _Options, args: tuple, kwargs: dict
    ) -> Any:
        if not backend.supports_transactional:
            raise DedupConfigurationError(
                f"Task {self.name!r} sets dedup_transactional=True, but the "
                f"{type(backend).__name__} backend has no transactions. Use the database "
                "backend (DEDUP_CELERY['BACKEND'] = 'db') or status mode."
            )
        if backend.in_outer_transaction():
            raise OuterTransactionError(
                f"Task {self.name!r} is transactional but was called inside an open "
                f"transaction on the {backend.describe()} (ATOMIC_REQUESTS, an eager call or "
                "apply() inside transaction.atomic). Its record would only be a savepoint. "
                "Send it with delay_on_commit(), or call it outside the atomic block."
            )
        phase = "claim"
        ignored: Ignore | None = None
        retval: Any = None
        outcome: ClaimOutcome | None = None
        try:
            with backend.transaction():
                outcome = backend.claim_in_transaction(claim)
                if outcome.verdict.claimed:
                    self._claimed(claim, outcome)
                    phase = "body"
                    try:
                        retval = self.run(*args, **kwargs)
                    except Ignore as exc:
                        ignored = exc
                    phase = "store"
                    if backend.transaction_broken():
                        raise DedupError(
                            f"{self.name}[{claim.task_id}]: the body caught a database error "
                            "and returned normally, which left its transaction marked for "
                            "rollback; nothing was committed. Let the error propagate, or "
                            "wrap the failing statement in its own transaction.atomic()."
                        )
                    stored = self._storable_result(claim, options, retval)
                    if stored is not None:
                        backend.store_result(claim, stored)
                phase = "commit"
        except (StorageError, DatabaseLibraryError) as exc:
            if phase == "body":
                raise
            # Nothing is lost by rescheduling: if the commit did land, the next
            # delivery is a duplicate and is skipped.
            self._storage_unavailable(claim, options, exc, phase)
        assert outcome is not None
        if not outcome.verdict.claimed:
            return self._duplicate(claim, options, outcome)
        if ignored is not None:
            raise ignored
        return retval

    # -- duplicates ----------------------------------------------------------------

    def _claimed(self, claim: Claim, outcome: ClaimOutcome) -> None:
        self.request.dedup_owner = claim.owner
        if outcome.verdict is Verdict.TAKEN_OVER:
            logger.info(
                "%s[%s]: took over the expired record (scope %s, key digest %s); takeovers=%s",
                self.name,
                claim.task_id,
                claim.scope,
                claim.key_digest,
                outcome.record.takeovers if outcome.record else "?",
            )
            self._send(signals.claim_taken_over, claim, outcome.record)
        self._send(signals.message_claimed, claim, outcome.record)

    def _duplicate(self, claim: Claim, options: _Options, outcome: ClaimOutcome) -> Any:
        record = outcome.record
        if outcome.verdict is Verdict.CONSUMED:
            assert record is not None
            logger.info(
                "%s[%s]: duplicate skipped; the message (scope %s, key digest %s) was consumed "
                "by task id %s (skipped=%d)",
                self.name,
                claim.task_id,
                claim.scope,
                claim.key_digest,
                record.task_id,
                record.skipped,
            )
            self._send(signals.duplicate_skipped, claim, record, reason="consumed")
            if record.task_id == claim.task_id:
                # A redelivery of the consuming message: leave its stored state alone.
                raise Ignore()
            return self._original_result(claim, record)
        if outcome.verdict is Verdict.STALE:
            assert record is not None
            logger.info(
                "%s[%s]: stale copy skipped; this delivery (attempt %d) already ran and raised "
                "(scope %s, key digest %s, recorded attempt %d). A retry, or a new task id, "
                "runs it again.",
                self.name,
                claim.task_id,
                claim.attempt,
                claim.scope,
                claim.key_digest,
                record.attempt,
            )
            self._send(signals.duplicate_skipped, claim, record, reason="stale")
            raise Ignore()
        if outcome.verdict is Verdict.POISONED:
            assert record is not None
            if outcome.poisoned_now:
                logger.error(
                    "%s[%s]: POISON MESSAGE. Its deliveries died %d times while running the "
                    "body (scope %s, key digest %s); the record is now POISONED and the body "
                    "will not run again until an operator releases it (admin action or "
                    "dedup_release) or RECORD_TTL passes.",
                    self.name,
                    claim.task_id,
                    record.takeovers + 1,
                    claim.scope,
                    claim.key_digest,
                )
                self._send(signals.message_poisoned, claim, record)
            raise PoisonMessageError(
                f"{self.name}[{claim.task_id}]: the message (scope {claim.scope}, key digest "
                f"{claim.key_digest}) is POISONED after {record.takeovers} takeovers; its body "
                "does not run until an operator releases the record."
            )
        if self.request.is_eager:
            raise DuplicateInFlightError(
                f"{self.name}[{claim.task_id}]: a copy of this message (scope {claim.scope}, "
                f"key digest {claim.key_digest}) is still running, and an eager call cannot "
                "be rescheduled."
            )
        logger.info(
            "%s[%s]: duplicate of a message in flight (scope %s, key digest %s, held by task "
            "id %s); rescheduled in %s s",
            self.name,
            claim.task_id,
            claim.scope,
            claim.key_digest,
            record.task_id if record else "an uncommitted transaction",
            options.retry_countdown,
        )
        self._send(signals.duplicate_rescheduled, claim, record, countdown=options.retry_countdown)
        self._reschedule(options.retry_countdown)

    def _storage_unavailable(
        self, claim: Claim, options: _Options, exc: BaseException, phase: str
    ) -> NoReturn:
        if self.request.is_eager:
            raise StorageError(
                f"{self.name}[{claim.task_id}]: the message store failed during {phase}, and an "
                f"eager call cannot be rescheduled: {exc}"
            ) from exc
        # A missing table is a deployment error, not an outage: say it loudly.
        level = logging.ERROR if isinstance(exc, MissingTableError) else logging.WARNING
        logger.log(
            level,
            "%s[%s]: the message store failed during %s (%s); the body did not run unclaimed. "
            "Rescheduled in %s s.",
            self.name,
            claim.task_id,
            phase,
            exc,
            options.retry_countdown,
        )
        self._reschedule(options.retry_countdown)

    def _reschedule(self, countdown: float) -> NoReturn:
        """Publish this request again after *countdown*, then ack this copy.

        This is what ``Task.retry`` does inside, less what makes it wrong here:
        the copy keeps ``request.retries`` (so the user's ``max_retries`` is not
        spent), no RETRY state is written over the original's result, and a
        failed publish leaves this message unacked instead of dropping it.
        """
        request = self.request
        signature = self.signature_from_request(
            request, countdown=countdown, retries=request.retries or 0
        )
        try:
            signature.apply_async()
        except Exception as exc:
            logger.error(
                "%s[%s]: could not publish the rescheduled copy (%s); the message is requeued "
                "instead.",
                self.name,
                request.id,
                exc,
            )
            raise Reject(exc, requeue=True) from exc
        raise Ignore()

    # -- results -------------------------------------------------------------------

    def _storable_result(self, claim: Claim, options: _Options, retval: Any) -> Any:
        """Return the value to store for later duplicates, or None to store nothing.

        Only business-key tasks need it: with the task id as key, a duplicate
        is always a redelivery of the same message, which returns nothing.
        """
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
            "%s[%s]: %s, so it is not stored; duplicates of this message will return None.",
            self.name,
            claim.task_id,
            reason,
        )
        return {"omitted": reason}

    def _original_result(self, claim: Claim, record: Record) -> Any:
        stored = record.result
        if not stored:
            return None
        if "value" in stored:
            return kombu_json.loads(json.dumps(stored["value"]))
        logger.warning(
            "%s[%s]: duplicate returns None instead of the original's result: %s.",
            self.name,
            claim.task_id,
            stored.get("omitted", "it was not stored"),
        )
        return None

    def _send(self, signal: Any, claim: Claim, record: Record | None, **extra: Any) -> None:
        # A failing receiver must not change what happens to the message.
        responses = signal.send_robust(
            sender=self,
            task_id=claim.task_id,
            scope=claim.scope,
            key_digest=claim.key_digest,
            record=record,
            **extra,
        )
        for receiver, response in responses:
            if isinstance(response, Exception):
                logger.error(
                    "%s[%s]: signal receiver %r raised %r",
                    self.name,
                    claim.task_id,
                    receiver,
                    response,
                    exc_info=response,
                )
