"""Work beside a running body: renewing its lease, and retrying a store write in the background.

* :class:`Heartbeat` renews a lease while a long body runs.
* :func:`retry_in_background` keeps trying a store write (a release after a
  failed body, while the store is down) without holding the task up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from dedup_celery.backends.base import BaseBackend, Claim
from dedup_celery.exceptions import StorageError

logger = logging.getLogger(__name__)


def _close_thread_connections() -> None:
    # Django connections belong to the thread that opened them.
    from django.db import connections

    connections.close_all()


class Heartbeat(threading.Thread):
    """Renews a claim's lease every *interval* seconds while the body runs.

    Each renewal is conditioned on the owner token, so a delivery that lost its
    claim stops renewing it. Renewal stops at *stop_after* seconds (the task's
    hard time limit), after which Celery kills the body anyway.
    """

    def __init__(
        self,
        backend: BaseBackend,
        claim: Claim,
        interval: float,
        stop_after: float | None,
        label: str,
    ) -> None:
        super().__init__(name=f"dedup-heartbeat-{claim.task_id}", daemon=True)
        self.backend = backend
        self.claim = claim
        self.interval = interval
        self.deadline = None if stop_after is None else time.monotonic() + stop_after
        self.label = label
        self.renewals = 0
        self._stopped = threading.Event()

    def run(self) -> None:
        """Renew until stopped, lost, or past the deadline."""
        try:
            while not self._stopped.wait(self.interval):
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    logger.warning("%s: lease renewal stops at the hard time limit", self.label)
                    return
                try:
                    renewed = self.backend.renew(self.claim)
                except StorageError as exc:
                    logger.warning("%s: could not renew the lease: %s", self.label, exc)
                    continue
                if not renewed:
                    logger.warning(
                        "%s: the lease was lost (another delivery took the record over); "
                        "renewal stops",
                        self.label,
                    )
                    return
                self.renewals += 1
        finally:
            _close_thread_connections()

    def stop(self) -> None:
        """Stop renewing and wait for the thread (it never blocks longer than one call)."""
        self._stopped.set()
        self.join(timeout=10)


def retry_in_background(
    action: Callable[[], Any], *, label: str, until: float, first_delay: float = 0.5
) -> threading.Thread:
    """Keep calling *action* in a daemon thread until it stops raising StorageError.

    Gives up after *until* seconds (the lease would have run out by then) and
    logs an ERROR.
    """

    def run() -> None:
        deadline = time.monotonic() + until
        delay = first_delay
        try:
            while True:
                time.sleep(delay)
                try:
                    action()
                    logger.info("%s: done after the store came back", label)
                    return
                except StorageError as exc:
                    if time.monotonic() + delay >= deadline:
                        logger.error("%s: gave up after %.0f s: %s", label, until, exc)
                        return
                delay = min(delay * 2, 5.0)
        finally:
            _close_thread_connections()

    thread = threading.Thread(target=run, name=f"dedup-retry-{label}", daemon=True)
    thread.start()
    return thread
