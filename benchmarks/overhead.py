"""DedupTask's own Python per delivery, with the store stubbed out: ``make bench-overhead``.

A task with an empty body runs through Celery's tracer, as a worker runs it,
once as a plain task and once as a DedupTask whose backend answers every claim
with "claimed" and every complete with True without any I/O. The difference
per call is what DedupTask's own Python costs on the happy path (status mode);
a third run with ``dedup_payload_mismatch="ignore"`` shows the fingerprint's share.
No server is needed; the settings are benchmarks/settings.py with SQLite.

``--profile`` prints a cProfile of the DedupTask run instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
os.environ.setdefault("DEDUP_BENCH_SQLITE", "1")


def stub_backend_class() -> type:
    """A backend that claims and completes instantly (the benchmark's stand-in for a store)."""
    from dedup_celery.backends.base import BaseBackend, Claim, ClaimOutcome, Verdict

    class InstantBackend(BaseBackend):
        """Every claim is a first claim, every complete lands; nothing is stored."""

        def claim(self, claim: Claim) -> ClaimOutcome:
            return ClaimOutcome(Verdict.CLAIMED, None)

        def complete(self, claim: Claim, result: Any) -> bool:
            return True

    return InstantBackend


def per_call(tracer: Any, calls: int) -> float:
    """Seconds per call of *tracer* over *calls* fresh task ids (best of five batches)."""
    batches = []
    request = {
        "retries": 0,
        "delivery_info": {"exchange": "", "routing_key": "bench", "priority": 0},
        "hostname": "bench@localhost",
        "is_eager": False,
    }
    ids = [str(uuid.uuid4()) for _ in range(calls)]
    for _ in range(5):
        started = time.perf_counter()
        for task_id in ids:
            tracer(task_id, [], {}, {**request, "id": task_id})
        batches.append((time.perf_counter() - started) / calls)
    return min(batches)


def main() -> None:
    """Print plain and DedupTask's time per call through the tracer, and the difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    import django
    from django.conf import settings

    django.setup()
    from celery import Celery
    from celery.app.trace import build_tracer

    from dedup_celery import DedupTask, backends

    globals()["InstantBackend"] = stub_backend_class()
    settings.DEDUP_CELERY = {"BACKEND": f"{__name__}.InstantBackend"}
    backends.reset_backend()
    app = Celery("overhead", set_as_current=False)
    app.conf.task_ignore_result = True

    @app.task(name="bench.plain", acks_late=True, ignore_result=True)
    def plain() -> None:
        return None

    @app.task(name="bench.dedup", base=DedupTask, ignore_result=True)
    def dedup() -> None:
        return None

    @app.task(
        name="bench.unchecked",
        base=DedupTask,
        ignore_result=True,
        dedup_payload_mismatch="ignore",
    )
    def unchecked() -> None:
        return None

    tracers = {
        name: build_tracer(task.name, task, app=app, eager=False, propagate=True)
        for name, task in (("plain", plain), ("dedup", dedup), ("unchecked", unchecked))
    }
    for tracer in tracers.values():
        per_call(tracer, 500)  # warm up
    if args.profile:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.runcall(per_call, tracers["dedup"], args.calls // 5)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        return
    rounds = {name: [] for name in tracers}
    for _ in range(3):
        for name, tracer in tracers.items():
            rounds[name].append(per_call(tracer, args.calls // 5))
    plain_s = statistics.median(rounds["plain"])
    dedup_s = statistics.median(rounds["dedup"])
    unchecked_s = statistics.median(rounds["unchecked"])
    print(f"plain task through the tracer:  {plain_s * 1e6:7.1f} µs per call")
    print(f"DedupTask, store stubbed out:   {dedup_s * 1e6:7.1f} µs per call")
    print(f"DedupTask's own Python:         {(dedup_s - plain_s) * 1e6:7.1f} µs per delivery")
    print(
        f"  of which the fingerprint:     {(dedup_s - unchecked_s) * 1e6:7.1f} µs "
        '(against dedup_payload_mismatch="ignore")'
    )


if __name__ == "__main__":
    main()
