"""Helpers the tests share: claims as a delivery would make them, signal capture, the tracer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.app.trace import build_tracer

from dedup_celery.backends import get_backend
from dedup_celery.backends.base import BaseBackend, Claim
from harness.claims import ELSEWHERE, make_claim


def claim_for(task: Any, key: str, **fields: Any) -> Claim:
    """A claim of *task*'s message *key*, as its delivery would make it.

    *task* is a task (its name is the scope and the task name) or a plain name;
    the key is also the task id unless *task_id* is given. A one-minute
    RECORD_TTL keeps the tests' records short-lived.
    """
    name = task if isinstance(task, str) else task.name
    defaults = {"scope": name, "task_name": name, "task_id": key, "ttl": 60}
    return make_claim(key, **{**defaults, **fields})


def hold(task: Any, key: str, *, backend: BaseBackend | None = None, **fields: Any) -> Claim:
    """Claim *task*'s message *key* in the store (the configured one by default)."""
    claim = claim_for(task, key, **fields)
    (backend or get_backend()).claim(claim)
    return claim


@contextmanager
def captured(*signals: Any) -> Iterator[list[dict[str, Any]]]:
    """Collect what *signals* send while the block runs: one dict per send, with ``signal``."""
    seen: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        # Django passes the signal itself as the keyword ``signal``.
        seen.append({"sender": sender, **kwargs})

    for signal in signals:
        signal.connect(receiver)
    try:
        yield seen
    finally:
        for signal in signals:
            signal.disconnect(receiver)


def run_as_worker(
    task,
    task_id,
    args,
    kwargs,
    *,
    retries=0,
    queue="q-unit-reschedule",
    headers=None,
    expires=None,
):
    """Run *task* through Celery's tracer with a worker-like request (and custom *headers*)."""
    tracer = build_tracer(task.name, task, app=task.app, eager=False, propagate=False)
    request = {
        **(headers or {}),
        "id": task_id,
        "retries": retries,
        "delivery_info": {"exchange": "", "routing_key": queue, "priority": 0},
        "hostname": "unit@localhost",
        "is_eager": False,
        "expires": expires,
    }
    return tracer(task_id, list(args), kwargs, request)


__all__ = ["ELSEWHERE", "captured", "claim_for", "hold", "make_claim", "run_as_worker"]
