"""Deliver one message twice, or several copies at once, in your own test suite.

Your task's guarantee is about duplicates, and eager mode (``task.apply()``)
cannot show one: it skips the broker's redelivery and runs copies one inside
the other. These helpers run each copy as a worker would, through Celery's own
tracer (not eagerly) and the configured message store, so your test asserts
the one effect itself::

    import pytest
    from dedup_celery.testing import deliver, deliver_at_once

    from shop.models import Order
    from shop.tasks import place_order


    @pytest.mark.django_db(transaction=True)
    def test_a_redelivered_order_is_placed_once():
        copies = deliver(place_order, args=("A-1",))
        assert copies.body_runs == 1
        assert Order.objects.filter(number="A-1").count() == 1


    @pytest.mark.django_db(transaction=True)
    def test_two_copies_at_once_place_one_order():
        copies = deliver_at_once(place_order, args=("A-2",))
        assert copies.body_runs == 1
        assert Order.objects.filter(number="A-2").count() == 1

Use ``transaction=True``: the copies commit their records for real (a
transactional task refuses to run inside the test's transaction, and copies at
once run on connections of their own). A copy that meets a running one is
rescheduled; the helpers capture that copy instead of publishing it, and
deliver it again once the others are done, as the broker would after the
countdown. Nothing is published to your broker.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from celery.app.trace import build_tracer
from django.db import connections

from dedup_celery import signals
from dedup_celery.backends.db import kept
from dedup_celery.delivery import outcomes

__all__ = ["Delivered", "Deliveries", "deliver", "deliver_at_once"]

#: How many times a rescheduled copy is delivered again before the helper stops.
MAX_REDELIVERIES = 5
#: Seconds a transactional copy is held at most (see :func:`deliver_at_once`).
TRANSACTIONAL_HOLD = 1.0
_running = threading.Lock()


@dataclass(frozen=True)
class Delivered:
    """What one copy of the message did.

    ``outcome`` is ``"ran"`` (it claimed the message and ran the body),
    ``"skipped"`` (a duplicate: the body did not run), ``"rescheduled"`` (it met a
    copy still running and would come back later), or Celery's final state in
    lower case for anything else (``"failure"`` for a poisoned message, a
    store that refused it, or a copy refused for a payload mismatch).
    ``state`` and ``result`` are what Celery's tracer returned; ``redelivery``
    is True for a rescheduled copy delivered again.
    """

    task_id: str
    outcome: str
    state: str
    result: Any
    redelivery: bool = False


class Deliveries(list[Delivered]):
    """Every copy delivered, in the order they ended, redeliveries last."""

    @property
    def body_runs(self) -> int:
        """How many copies ran the body: 1 is the exactly-once effect."""
        return sum(1 for copy in self if copy.outcome == "ran")

    @property
    def outcomes(self) -> list[str]:
        """Each copy's outcome, in order."""
        return [copy.outcome for copy in self]


class _Watch:
    """The package's signals for one task, told apart per thread (each copy has its own)."""

    def __init__(self, hold_first_claim: threading.Event | None, timeout: float):
        self.seen: dict[int, str] = {}
        self.copies: list[tuple[Any, dict[str, Any]]] = []
        self.hold = hold_first_claim
        self.timeout = timeout
        self.claimed = False
        self.lock = threading.Lock()

    def claimed_now(self, sender: Any = None, **kwargs: Any) -> None:
        with self.lock:
            first = not self.claimed
            self.claimed = True
            self.seen[threading.get_ident()] = "ran"
        if first and self.hold is not None:
            # Keep the first copy's claim held, body not yet run, until the others decided.
            self.hold.wait(self.timeout)

    def skipped(self, sender: Any = None, **kwargs: Any) -> None:
        if kwargs.get("reason") == "payload_mismatch":
            return  # refused under PAYLOAD_MISMATCH = "raise": it fails, its state says so
        with self.lock:
            self.seen[threading.get_ident()] = "skipped"

    def capture(self, signature: Any) -> None:
        with self.lock:
            self.seen[threading.get_ident()] = "rescheduled"
            self.copies.append((signature, dict(signature.options)))

    def outcome_of(self, state: str) -> str:
        with self.lock:
            return self.seen.pop(threading.get_ident(), state.lower())


def _real(task: Any) -> Any:
    """The task object itself: ``shared_task`` hands out a proxy, and signals name the task."""
    current = getattr(task, "_get_current_object", None)
    return current() if callable(current) else task


@contextmanager
def _watching(task: Any, hold: threading.Event | None, timeout: float) -> Iterator[_Watch]:
    watch = _Watch(hold, timeout)
    if not _running.acquire(blocking=False):
        raise RuntimeError("dedup_celery.testing: one deliver() at a time per process")
    signals.message_claimed.connect(watch.claimed_now, sender=task, weak=False)
    signals.duplicate_skipped.connect(watch.skipped, sender=task, weak=False)
    previous, outcomes.send_copy = outcomes.send_copy, watch.capture
    try:
        yield watch
    finally:
        outcomes.send_copy = previous
        signals.message_claimed.disconnect(watch.claimed_now, sender=task)
        signals.duplicate_skipped.disconnect(watch.skipped, sender=task)
        # The copies on this thread claimed through the database backend's own kept
        # connection, as a worker's would: close it, or it outlives the test's database.
        kept.close_all()
        _running.release()


def _run(
    task: Any,
    watch: _Watch,
    task_id: str,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    retries: int = 0,
    headers: dict[str, Any] | None = None,
    redelivery: bool = False,
) -> Delivered:
    """One copy through Celery's tracer, with the request a worker would build."""
    tracer = build_tracer(task.name, task, app=task.app, eager=False, propagate=False)
    request = {
        **(headers or {}),
        "id": task_id,
        "task": task.name,
        "retries": retries,
        "delivery_info": {"exchange": "", "routing_key": "dedup-celery-testing", "priority": 0},
        "hostname": "dedup-celery-testing@localhost",
        "is_eager": False,
    }
    trace = tracer(task_id, list(args), kwargs, request)
    state = trace.info.state if trace.info is not None else "SUCCESS"
    return Delivered(task_id, watch.outcome_of(state), state, trace.retval, redelivery)


def _redeliver(task: Any, watch: _Watch, done: Deliveries) -> None:
    """Deliver the captured reschedules again, as the broker would after their countdown."""
    for _round in range(MAX_REDELIVERIES):
        pending, watch.copies = watch.copies, []
        if not pending:
            return
        for signature, options in pending:
            done.append(
                _run(
                    task,
                    watch,
                    options["task_id"],
                    signature.args,
                    dict(signature.kwargs),
                    retries=options.get("retries", 0),
                    headers=options.get("headers"),
                    redelivery=True,
                )
            )


def _ids(copies: int, task_id: str | None, same_id: bool) -> list[str]:
    if copies < 1:
        raise ValueError("copies must be 1 or more")
    first = task_id or str(uuid.uuid4())
    return [first if same_id or n == 0 else str(uuid.uuid4()) for n in range(copies)]


def deliver(
    task: Any,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    copies: int = 2,
    task_id: str | None = None,
    same_id: bool = True,
) -> Deliveries:
    """Deliver the message *copies* times, one after the other, as redeliveries are.

    With *same_id* (the default) every copy has the same task id: a broker's
    redelivery, or a producer's re-send of the same message. ``same_id=False``
    gives each copy a task id of its own, as a producer that sends the same
    business key twice does (the task needs a ``dedup_key`` for those to be
    duplicates).
    """
    task = _real(task)
    with _watching(task, None, 0) as watch:
        done = Deliveries(
            _run(task, watch, copy_id, args, dict(kwargs or {}))
            for copy_id in _ids(copies, task_id, same_id)
        )
        _redeliver(task, watch, done)
    return done


def deliver_at_once(
    task: Any,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    copies: int = 2,
    task_id: str | None = None,
    same_id: bool = True,
    timeout: float = 10.0,
) -> Deliveries:
    """Deliver *copies* copies at the same moment, each in a thread of its own.

    The copy that claims the message first is held, after its claim and before
    its body, until every other copy has met that claim (or *timeout* seconds
    passed), so the copies really overlap. A transactional copy is held one
    second at most: on MySQL/MariaDB and SQLite the other copies wait for its
    lock rather than meet it, and then find it committed (``"skipped"``).
    Rescheduled copies are delivered again afterwards. Each thread closes its
    database connections when done; the helper waits for every body to end.
    """
    task = _real(task)
    ids = _ids(copies, task_id, same_id)
    if getattr(task, "dedup_transactional", False):
        timeout = min(timeout, TRANSACTIONAL_HOLD)
    others_decided = threading.Event()
    if len(ids) == 1:
        others_decided.set()
    finished: list[Delivered] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    with _watching(task, others_decided, timeout) as watch:

        def one(copy_id: str) -> None:
            try:
                delivered = _run(task, watch, copy_id, args, dict(kwargs or {}))
            except BaseException as exc:  # reported below, in the caller's thread
                with lock:
                    errors.append(exc)
                return
            finally:
                connections.close_all()
            with lock:
                finished.append(delivered)
                if sum(1 for copy in finished if copy.outcome != "ran") >= len(ids) - 1:
                    others_decided.set()

        threads = [threading.Thread(target=one, args=(copy_id,)) for copy_id in ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        done = Deliveries(finished)
        _redeliver(task, watch, done)
    return done
