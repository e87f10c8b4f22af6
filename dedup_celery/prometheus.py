"""Prometheus metrics of dedup_celery: ``pip install "dedup-celery[prometheus]"``.

Turned on by ``DEDUP_CELERY["PROMETHEUS"]`` (``True``, or a dict with the
worker's ``port`` and ``addr``). The counters are built on the package's
signals, so they count what the log lines say, in every process that sends
them. Labels are task names and reasons only: never keys, never arguments.

=============================================  ============================================
metric                                         counts
=============================================  ============================================
``dedup_celery_claims_total{task}``            deliveries that claimed their message
``dedup_celery_takeovers_total{task}``         claims that took over an expired lease
``dedup_celery_duplicates_total{task,reason}`` duplicates: ``consumed``, ``stale``,
                                               ``expired``, ``in_flight``,
                                               ``payload_mismatch`` (refused)
``dedup_celery_lease_lost_total{task}``        bodies that finished after losing the lease
``dedup_celery_poisoned_total{task}``          messages that became POISONED
``dedup_celery_payload_mismatches_total``      duplicates with other arguments
``{task}``
``dedup_celery_publish_skipped_total``         sends not published (``dedup_on_enqueue``),
``{task,reason}``                              by the status that answered them
=============================================  ============================================

Under Celery's prefork pool every child counts on its own, so the counters
need prometheus-client's multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` must
be set in the worker's environment before it starts (the library decides
when it is first imported; check ``dedup_celery.W013`` warns without it). At
``worker_init`` the main process deletes the files of processes that are gone
from that directory, and, with a ``port``, serves ``/metrics`` from a thread of its
own; every process forked from it afterwards closes its inherited copy of the
listening socket, so an orphaned child never keeps the port. :func:`metrics_view` serves the same
from Django, for staff; it sees a worker's counters only when it runs on the
same host with the same directory.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from celery import signals as celery_signals
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden

from dedup_celery import signals
from dedup_celery.conf import raw_settings

logger = logging.getLogger("dedup_celery.prometheus")

#: The environment variable of prometheus-client's multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# prometheus-client's files are <kind>_<pid>.db.
_PID_OF_FILE = re.compile(r"_(\d+)\.db$")

_metrics: dict[str, Any] = {}
_metrics_lock = threading.Lock()
_server: Any = None
_server_pid: int | None = None
_fork_hook_registered = False


def _counter(name: str, documentation: str, labels: tuple[str, ...]) -> Any:
    """The process's counter *name*, made on first use (after a fork, in the child)."""
    counter = _metrics.get(name)
    if counter is None:
        from prometheus_client import Counter

        with _metrics_lock:  # the threads pool: one registration per name
            counter = _metrics.get(name)
            if counter is None:
                counter = _metrics[name] = Counter(name, documentation, labels)
    return counter


def _task(sender: Any) -> str:
    return str(getattr(sender, "name", None) or "unknown")


def _claimed(sender: Any = None, **kwargs: Any) -> None:
    _counter("dedup_celery_claims", "Deliveries that claimed their message.", ("task",)).labels(
        _task(sender)
    ).inc()


def _taken_over(sender: Any = None, **kwargs: Any) -> None:
    _counter("dedup_celery_takeovers", "Claims that took over an expired lease.", ("task",)).labels(
        _task(sender)
    ).inc()


def _duplicate(reason: str, sender: Any) -> None:
    _counter("dedup_celery_duplicates", "Duplicates, by what they met.", ("task", "reason")).labels(
        _task(sender), reason
    ).inc()


def _skipped(sender: Any = None, reason: str = "", **kwargs: Any) -> None:
    _duplicate(reason or "consumed", sender)


def _rescheduled(sender: Any = None, **kwargs: Any) -> None:
    _duplicate("in_flight", sender)


def _lease_lost(sender: Any = None, **kwargs: Any) -> None:
    _counter(
        "dedup_celery_lease_lost", "Bodies that finished after losing their lease.", ("task",)
    ).labels(_task(sender)).inc()


def _poisoned(sender: Any = None, **kwargs: Any) -> None:
    _counter("dedup_celery_poisoned", "Messages that became POISONED.", ("task",)).labels(
        _task(sender)
    ).inc()


def _mismatch(sender: Any = None, **kwargs: Any) -> None:
    _counter(
        "dedup_celery_payload_mismatches", "Duplicates with other arguments.", ("task",)
    ).labels(_task(sender)).inc()


def _publish_skipped(sender: Any = None, reason: str = "", **kwargs: Any) -> None:
    _counter(
        "dedup_celery_publish_skipped",
        "Sends not published (dedup_on_enqueue), by the status that answered them.",
        ("task", "reason"),
    ).labels(_task(sender), reason).inc()


_RECEIVERS = (
    (signals.message_claimed, _claimed),
    (signals.claim_taken_over, _taken_over),
    (signals.duplicate_skipped, _skipped),
    (signals.duplicate_rescheduled, _rescheduled),
    (signals.lease_lost, _lease_lost),
    (signals.message_poisoned, _poisoned),
    (signals.payload_mismatch, _mismatch),
    (signals.publish_skipped, _publish_skipped),
)


def install() -> None:
    """Count the package's signals, and serve them from the worker (idempotent).

    Called by the app's ``ready()`` when ``DEDUP_CELERY["PROMETHEUS"]`` is set.
    """
    for signal, receiver in _RECEIVERS:
        signal.connect(receiver, weak=False, dispatch_uid=f"dedup_celery.prometheus.{receiver}")
    celery_signals.worker_init.connect(_worker_init, weak=False, dispatch_uid=__name__)
    celery_signals.worker_process_init.connect(_child_init, weak=False, dispatch_uid=__name__)
    celery_signals.worker_shutdown.connect(_worker_shutdown, weak=False, dispatch_uid=__name__)


def uninstall() -> None:
    """Stop counting (the receivers :func:`install` connected); for tests."""
    for signal, receiver in _RECEIVERS:
        signal.disconnect(receiver, dispatch_uid=f"dedup_celery.prometheus.{receiver}")
    for worker_signal in (
        celery_signals.worker_init,
        celery_signals.worker_process_init,
        celery_signals.worker_shutdown,
    ):
        worker_signal.disconnect(dispatch_uid=__name__)


def options() -> dict[str, Any]:
    """``DEDUP_CELERY["PROMETHEUS"]`` as a dict (``{}`` for True or unset)."""
    raw = raw_settings()
    value = raw.get("PROMETHEUS") if isinstance(raw, dict) else None
    return dict(value) if isinstance(value, dict) else {}


def registry() -> Any:
    """A registry of every process's counters: the multiprocess directory's, or this one's."""
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    if not os.environ.get(MULTIPROC_ENV):
        return REGISTRY
    collected = CollectorRegistry()
    multiprocess.MultiProcessCollector(collected)  # type: ignore[no-untyped-call]
    return collected


def remove_dead_files(directory: Path) -> int:
    """Delete the files of processes that are gone from *directory*; return how many.

    Files of live processes stay, whoever they are (another worker, a web
    process sharing the directory): deleting them would lose their counts. A
    process is judged by its pid on this host, so the directory must not be
    shared across pid namespaces (containers).
    """
    removed = 0
    for path in directory.glob("*.db"):
        found = _PID_OF_FILE.search(path.name)
        if found is None:
            continue
        try:
            os.kill(int(found.group(1)), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            removed += 1
        except PermissionError:
            pass  # alive, another user's
    return removed


def _worker_init(**kwargs: Any) -> None:
    """In the worker's main process, before the pool forks: the directory, then the server."""
    global _server, _server_pid, _fork_hook_registered
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        try:
            path = Path(directory)
            path.mkdir(parents=True, exist_ok=True)
            remove_dead_files(path)
        except OSError as exc:
            logger.error(
                "dedup_celery: could not prepare %s (%s): %s", MULTIPROC_ENV, directory, exc
            )
    port = options().get("port")
    if port is None:
        return
    from prometheus_client import start_http_server

    try:
        _server, _thread = start_http_server(
            int(port), addr=str(options().get("addr") or "127.0.0.1"), registry=registry()
        )
    except OSError as exc:
        logger.error("dedup_celery: could not serve metrics on port %s: %s", port, exc)
        return
    _server_pid = os.getpid()
    if not _fork_hook_registered:
        # Every process forked from here on (pool children, an embedded beat) lets go
        # of its copy of the listening socket, so none keeps the port after a crash.
        os.register_at_fork(after_in_child=_child_init)
        _fork_hook_registered = True


def _child_init(**kwargs: Any) -> None:
    """In a forked child: close the inherited listening socket (never shut it down).

    The solo pool sends ``worker_process_init`` in the main process itself,
    which serves the port: there it does nothing.
    """
    if _server is not None and os.getpid() != _server_pid:
        _server.socket.close()


def _worker_shutdown(**kwargs: Any) -> None:
    global _server
    if _server is not None and os.getpid() == _server_pid:
        _server.shutdown()
        _server.server_close()
        _server = None


def metrics_view(request: HttpRequest) -> HttpResponse:
    """The metrics in Prometheus's text format, for staff (mount it in your URLconf).

    Anyone else gets 403. In multiprocess mode it reads ``PROMETHEUS_MULTIPROC_DIR``
    of the web process: a worker's counters only on the same host with the same
    directory.
    """
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    user = getattr(request, "user", None)
    if not (user is not None and user.is_active and user.is_staff):
        return HttpResponseForbidden("dedup_celery metrics: staff only")

    return HttpResponse(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)
