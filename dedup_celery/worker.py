"""``DedupTask.Request``: the worker-side request, used by the worker's main process.

When a prefork child is SIGKILLed (or OOM-killed) mid-task, Celery's main
process gets ``WorkerLostError`` and requeues the message (``reject_on_worker_lost``).
Without help, the redelivery would find the dead child's PROCESSING record and
wait for its whole lease. :class:`DedupRequest` ends that lease first, through
a statement conditioned on the task id and the child's full identity (pid,
start time, boot id, pid namespace), so it never touches another owner's record.
Celery sends no ``task_failure`` for a requeued message, so this is done here.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]  # not in stubs
from billiard.exceptions import WorkerLostError
from celery.worker.request import Request

from dedup_celery.exceptions import DedupKeyError
from dedup_celery.identity import (
    OwnerIdentity,
    current_identity,
    pid_takeover,
    process_start_ticks,
)
from dedup_celery.keys import digest, message_key, storable
from dedup_celery.options import resolve

logger = logging.getLogger(__name__)

#: The main process's event loop waits at most this long for the store.
EXPIRE_TIMEOUT_SECONDS = 2.0


class DedupRequest(Request):
    """Ends a dead child's lease before Celery requeues its message."""

    _dedup_child_start: int | None = None

    def on_accepted(self, pid: Any, time_accepted: float) -> None:
        """Remember the child's start time while it is alive, to name it exactly later."""
        super().on_accepted(pid, time_accepted)
        if pid:
            self._dedup_child_start = process_start_ticks(pid)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        """End the dead child's lease, then let Celery requeue the message."""
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, WorkerLostError):
            try:
                self._expire_dead_child_lease()
            except Exception:
                logger.exception("%s[%s]: could not end the dead child's lease", self.name, self.id)
        return super().on_failure(
            exc_info, send_failed_event=send_failed_event, return_ok=return_ok
        )

    def _expire_dead_child_lease(self) -> None:
        task = self.task
        if not self.worker_pid or not pid_takeover():
            return
        options = resolve(task)
        if options.transactional:
            return  # a transactional claim died with the child's transaction
        try:
            key = message_key(task, options.key_function, self, self.args, self.kwargs)
        except DedupKeyError as exc:
            logger.warning(
                "%s[%s]: could not end the dead child's lease: %s", self.name, self.id, exc
            )
            return
        if key is None:
            return
        me = current_identity()
        child = OwnerIdentity(
            hostname=me.hostname,
            pid=int(self.worker_pid),  # an int pid, whatever the stubs say
            process_start=self._dedup_child_start,
            boot_id=me.boot_id,
            pid_namespace=me.pid_namespace,
        )
        scope = options.scope
        outcome: dict[str, Any] = {}

        def expire() -> None:
            from django.db import connections

            from dedup_celery.backends import get_backend

            try:
                outcome["done"] = get_backend().expire_lease_of_process(
                    scope, digest(key), storable(self.id), child
                )
            except Exception as exc:
                outcome["error"] = exc
            finally:
                connections.close_all()

        # A thread bounds how long the main process's event loop can wait.
        worker = threading.Thread(target=expire, name="dedup-expire-lease", daemon=True)
        worker.start()
        worker.join(EXPIRE_TIMEOUT_SECONDS)
        if worker.is_alive():
            logger.warning(
                "%s[%s]: the store did not answer within %.0f s; the redelivery waits for the "
                "dead child's lease instead.",
                self.name,
                self.id,
                EXPIRE_TIMEOUT_SECONDS,
            )
        elif "error" in outcome:
            logger.warning(
                "%s[%s]: could not end the dead child's lease (%s); the redelivery waits for "
                "it instead.",
                self.name,
                self.id,
                outcome["error"],
            )
        elif outcome.get("done"):
            logger.info(
                "%s[%s]: worker child %s died; its lease ended so the redelivery runs now",
                self.name,
                self.id,
                self.worker_pid,
            )
