"""Getting a message going again after its owner died, and keeping a live owner's lease.

* :func:`owner_is_gone` judges, from the identity recorded on a claim, that the
  owning process no longer exists, so its lease can end at once.
* :func:`earlier_attempt_is_over` lets a copy that lands in the owner process
  itself take over, when that process provably runs nothing else.
* :class:`Heartbeat` renews a lease while a long body runs.
* :func:`retry_in_background` keeps trying a store write (a release after a
  failed body, while the store is down) without holding the task up.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from dedup_celery.backends.base import BaseBackend, Claim, Record
from dedup_celery.exceptions import StorageError
from dedup_celery.identity import current_identity, process_start_ticks

logger = logging.getLogger(__name__)

_bodies_lock = threading.Lock()
_bodies_running = 0


def owner_is_gone(record: Record) -> bool:
    """True only if the process that holds *record* provably no longer exists.

    Host names and pids prove nothing across machines or containers, so the
    record must carry this machine's boot id and this process's pid namespace.
    Then the pid names the same process only if it still has the recorded start
    time; no such pid, or another start time, means the owner is gone.
    """
    me = current_identity()
    if not record.boot_id or record.boot_id != me.boot_id:
        return False
    if not record.pid_namespace or record.pid_namespace != me.pid_namespace:
        return False
    if record.pid is None or record.process_start is None:
        return False
    if record.pid == me.pid:
        return False  # that is this process: see earlier_attempt_is_over()
    return process_start_ticks(record.pid) != record.process_start


def is_this_process(record: Record) -> bool:
    """True if *record*'s owner identity is exactly this process."""
    me = current_identity()
    return (
        bool(me.boot_id)
        and record.boot_id == me.boot_id
        and record.pid_namespace == me.pid_namespace
        and record.pid == me.pid
        and record.process_start == me.process_start
    )


def _green_threads() -> bool:
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched("threading"):
        return True
    eventlet_patcher = sys.modules.get("eventlet.patcher")
    return eventlet_patcher is not None and eventlet_patcher.is_monkey_patched("thread")


def earlier_attempt_is_over(record: Record) -> bool:
    """True if *record* is held by this very process and that attempt has ended.

    In the prefork and solo pools a process runs one task at a time, so while
    this delivery runs, no earlier attempt can still be running here. Thread,
    gevent and eventlet pools run several tasks in one process, so there the
    answer is always False.
    """
    if not is_this_process(record):
        return False
    if threading.current_thread() is not threading.main_thread() or _green_threads():
        return False
    with _bodies_lock:
        return _bodies_running == 0


class running_body:
    """Count the bodies running in this process (see :func:`earlier_attempt_is_over`)."""

    def __enter__(self) -> None:
        global _bodies_running
        with _bodies_lock:
            _bodies_running += 1

    def __exit__(self, *exc: object) -> None:
        global _bodies_running
        with _bodies_lock:
            _bodies_running -= 1


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
