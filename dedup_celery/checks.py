"""System checks for ``DEDUP_CELERY`` and for the Celery configuration of DedupTasks.

Ids are stable and never reused:

========================  ==========================================================
id                        problem
========================  ==========================================================
``dedup_celery.E001``     ``DEDUP_CELERY`` is not a dict
``dedup_celery.E002``     unknown key in ``DEDUP_CELERY``
``dedup_celery.E003``     a value of the wrong type or range
``dedup_celery.E004``     ``BACKEND`` cannot be loaded, or ``OPTIONS`` does not fit it
``dedup_celery.E005``     ``DATABASE`` is not in ``settings.DATABASES``
``dedup_celery.E006``     a scope used by a status-mode task and a transactional one
``dedup_celery.E007``     a task's dedup options are invalid
``dedup_celery.E008``     a transactional task on a backend without transactions
``dedup_celery.E009``     the redis backend is chosen but the redis package is missing
``dedup_celery.E010``     the message table's database is not one the db backend supports
``dedup_celery.W001``     ``acks_late`` is off on a DedupTask
``dedup_celery.W002``     ``reject_on_worker_lost`` is off on a DedupTask
``dedup_celery.W003``     ``track_started`` is on for a DedupTask
``dedup_celery.W004``     RETRY_COUNTDOWN at or above the broker's visibility timeout
``dedup_celery.W005``     RECORD_TTL shorter than the visibility timeout or retry horizon
``dedup_celery.W006``     PROCESSING_TIMEOUT not above the task's hard time limit
``dedup_celery.W007``     the Celery app's tasks could not be inspected
``dedup_celery.W008``     Redis may evict dedup records (``maxmemory-policy``)
``dedup_celery.W009``     the heartbeat interval is not below half the lease
``dedup_celery.W010``     Celery's Django fixup closes connections per task (worker start)
``dedup_celery.W011``     dedup is bypassed for a task (``BYPASS``, ``dedup_bypass``)
``dedup_celery.W012``     a ``"queued"`` marker's TTL is below the visibility timeout
``dedup_celery.W013``     ``PROMETHEUS`` is on without ``PROMETHEUS_MULTIPROC_DIR``
``dedup_celery.E011``     ``PROMETHEUS`` is on but prometheus-client is not installed
========================  ==========================================================

The checks of Celery configuration never raise, and apart from tasks that can never
work (E006, E007, E008) they are warnings, so they do not stop ``manage.py
migrate``. Celery's worker runs the checks but discards their output, so a worker
with dedup check errors refuses to start (:func:`refuse_to_start_on_errors`, at
``worker_init``, before it consumes anything), and :func:`log_check_messages`
logs the warnings once it is ready.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import import_module
from importlib.util import find_spec
from typing import Any

from django.core import checks

from dedup_celery.conf import DEFAULTS, get_settings, raw_settings, validate
from dedup_celery.exceptions import DedupConfigurationError
from dedup_celery.options import option_errors, resolve

logger = logging.getLogger(__name__)

TAG = "dedup_celery"

# Broker transports that redeliver unacked messages after a visibility timeout.
_VISIBILITY_TIMEOUT_SCHEMES = ("redis", "rediss", "sentinel", "sqs")
_DEFAULT_VISIBILITY_TIMEOUT = 3600


@checks.register(TAG)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Validate ``settings.DEDUP_CELERY`` and that its backend can be built."""
    errors = validate(raw_settings())
    if errors:
        return errors
    from dedup_celery.backends import build_backend, resolve_backend_path

    backend_path = resolve_backend_path({**DEFAULTS, **raw_settings()}["BACKEND"])
    if backend_path == "dedup_celery.backends.redis.RedisBackend" and not find_spec("redis"):
        from dedup_celery.backends.redis import INSTALL_HINT

        return [
            checks.Error(
                "DEDUP_CELERY['BACKEND'] is the redis backend, but the redis package is not "
                "installed.",
                hint=f"Install it with: {INSTALL_HINT}",
                id="dedup_celery.E009",
            )
        ]
    try:
        build_backend()
    except DedupConfigurationError as exc:
        return [checks.Error(str(exc), hint=_backend_hint(exc), id="dedup_celery.E004")]
    return _prometheus_messages()


def _prometheus_messages() -> list[checks.CheckMessage]:
    """E011 and W013: metrics turned on without the library, or without multiprocess mode."""
    if not raw_settings().get("PROMETHEUS"):
        return []
    if not find_spec("prometheus_client"):
        return [
            checks.Error(
                "DEDUP_CELERY['PROMETHEUS'] is on, but prometheus-client is not installed.",
                hint='Install it with: pip install "dedup-celery[prometheus]"',
                id="dedup_celery.E011",
            )
        ]
    from dedup_celery.prometheus import MULTIPROC_ENV

    if os.environ.get(MULTIPROC_ENV):
        return []
    return [
        checks.Warning(
            f"DEDUP_CELERY['PROMETHEUS'] is on, but {MULTIPROC_ENV} is not set: under Celery's "
            "prefork pool each child counts on its own, and the worker's /metrics shows only "
            "the main process, which counts nothing.",
            hint=f"Set {MULTIPROC_ENV} to a directory of the worker's own in its environment, "
            "before it starts (the solo and threads pools need no directory).",
            id="dedup_celery.W013",
        )
    ]


def _backend_hint(exc: DedupConfigurationError) -> str:
    """The hint of ``E004``: what to change in the key the error names (``exc.setting``)."""
    from dedup_celery.backends import BACKEND_ALIASES, load_backend_class

    if exc.setting == "DATABASE":
        return 'Remove DEDUP_CELERY["DATABASE"]: this backend keeps no records in a database.'
    if exc.setting == "OPTIONS":
        cls = load_backend_class(get_settings().backend)  # it loaded: OPTIONS was refused
        accepted = ", ".join(cls.accepted_options) or "none"
        return (
            f'Give DEDUP_CELERY["OPTIONS"] only what the {cls.__name__} backend accepts '
            f"({accepted}), with valid values."
        )
    aliases = ", ".join(repr(alias) for alias in sorted(BACKEND_ALIASES))
    return (
        f'Set DEDUP_CELERY["BACKEND"] to {aliases}, or to the dotted path of a '
        "dedup_celery.backends.base.BaseBackend subclass."
    )


@checks.register(TAG)
def check_backend(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Run the configured backend's own checks (``check()``) once the settings are valid."""
    if validate(raw_settings()):
        return []
    from dedup_celery.backends import get_backend

    try:
        backend = get_backend()
    except DedupConfigurationError:
        return []  # check_settings reports it.
    return list(backend.check())


def _current_celery_app() -> Any:
    from celery import current_app

    return current_app._get_current_object()  # type: ignore[attr-defined]  # a Proxy


def dedup_tasks(app: Any) -> list[Any]:
    """Return the app's DedupTask instances, importing the task modules the worker imports.

    The modules are imported directly (each installed app's ``tasks``, and the
    app's ``imports`` and ``include``), not through the loader's
    ``import_default_modules()``: that sends Celery's ``import_modules`` signal,
    whose Django fixup runs the system checks again, from inside this check.
    """
    from django.utils.module_loading import autodiscover_modules

    from dedup_celery.task import DedupTask

    autodiscover_modules("tasks")
    for module in (*(app.conf.imports or ()), *(app.conf.include or ())):
        import_module(module)
    return [task for _, task in sorted(app.tasks.items()) if isinstance(task, DedupTask)]


def _visibility_timeout(app: Any) -> float | None:
    url = app.conf.broker_read_url or app.conf.broker_url or ""
    if isinstance(url, list | tuple):
        url = url[0] if url else ""
    scheme = str(url).split("://", 1)[0].split("+")[0].lower()
    if scheme not in _VISIBILITY_TIMEOUT_SCHEMES:
        return None
    options = app.conf.broker_transport_options or {}
    return float(options.get("visibility_timeout", _DEFAULT_VISIBILITY_TIMEOUT))


def _retry_horizon(task: Any) -> float | None:
    """Roughly how long after the first delivery a retry of *task* can still arrive."""
    max_retries = task.max_retries
    if max_retries is None:
        return None
    delay = task.default_retry_delay or 0
    if getattr(task, "retry_backoff", False):
        delay = max(delay, getattr(task, "retry_backoff_max", 600) or 0)
    return float(max_retries) * float(delay)


@checks.register(TAG)
def check_celery_tasks(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Check every DedupTask's options and the Celery settings they depend on.

    A finding that concerns several tasks in the same words is one message that
    names them all, not one copy per task.
    """
    if validate(raw_settings()):
        return []  # check_settings reports those; the numbers below would be wrong.
    try:
        app = _current_celery_app()
        tasks = dedup_tasks(app)
        return _grouped(_task_messages(app, tasks))
    except Exception as exc:
        return [
            checks.Warning(
                f"dedup_celery could not inspect the Celery app's tasks: "
                f"{type(exc).__name__}: {exc}",
                hint="Make sure the Celery app is importable from the Django project "
                "(usually in proj/celery.py, imported by proj/__init__.py).",
                id="dedup_celery.W007",
            )
        ]


@dataclass(frozen=True)
class _Finding:
    """One task's finding, before findings in the same words are merged."""

    level: type[checks.CheckMessage]
    id: str
    text: str
    hint: str
    task: str


def _grouped(findings: Iterable[_Finding | checks.CheckMessage]) -> list[checks.CheckMessage]:
    """One message per (id, text, hint), naming every task it concerns, in a stable order."""
    tasks: dict[tuple[Any, str, str, str], list[str]] = defaultdict(list)
    messages: list[checks.CheckMessage] = []
    for finding in findings:
        if isinstance(finding, checks.CheckMessage):
            messages.append(finding)
        else:
            key = (finding.level, finding.id, finding.text, finding.hint)
            tasks[key].append(finding.task)
    for (level, id_, text, hint), names in tasks.items():
        names = sorted(set(names))
        subject = ", ".join(repr(name) for name in names)
        noun = "Task" if len(names) == 1 else f"{len(names)} tasks"
        messages.append(level(f"{noun} {subject}: {text}", hint=hint, obj=", ".join(names), id=id_))
    return sorted(messages, key=lambda m: (m.id or "", str(m.obj)))


def _task_messages(app: Any, tasks: Iterable[Any]) -> Iterable[_Finding | checks.CheckMessage]:
    from dedup_celery.backends import load_backend_class
    from dedup_celery.backends.base import TransactionalBackend

    backend_cls = load_backend_class(get_settings().backend)
    visibility_timeout = _visibility_timeout(app)
    modes: dict[str, dict[bool, list[str]]] = defaultdict(lambda: defaultdict(list))
    for task in tasks:
        problems = option_errors(task)
        if problems:
            yield _Finding(
                checks.Error,
                "dedup_celery.E007",
                "invalid dedup options: " + "; ".join(problems) + ".",
                "Fix the options given to the task decorator.",
                task.name,
            )
            continue
        options = resolve(task)
        modes[options.scope][options.transactional].append(task.name)
        if options.transactional and not issubclass(backend_cls, TransactionalBackend):
            yield _Finding(
                checks.Error,
                "dedup_celery.E008",
                "dedup_transactional=True, but the "
                f"{backend_cls.__name__} backend has no transactions.",
                'Use DEDUP_CELERY["BACKEND"] = "db", or drop dedup_transactional.',
                task.name,
            )
        if options.bypass:
            yield _Finding(
                checks.Warning,
                "dedup_celery.W011",
                "dedup is bypassed (DEDUP_CELERY['BYPASS'] or dedup_bypass): its messages run "
                "as plain tasks, and a duplicate runs the body again.",
                "Turn the bypass off once the store maintenance is done (the docs' "
                '"Operating it" page, "Bypassing dedup").',
                task.name,
            )
        if not task.acks_late:
            yield _Finding(
                checks.Warning,
                "dedup_celery.W001",
                "acks_late=False on a DedupTask: a worker that "
                "dies while it runs loses the message.",
                "Remove acks_late=False from the task (DedupTask turns it on).",
                task.name,
            )
        if not task.reject_on_worker_lost:
            yield _Finding(
                checks.Warning,
                "dedup_celery.W002",
                "reject_on_worker_lost=False on a DedupTask: the "
                "message of a killed worker child is acked instead of redelivered.",
                "Remove reject_on_worker_lost=False from the task (DedupTask turns it on).",
                task.name,
            )
        if task.track_started:
            yield _Finding(
                checks.Warning,
                "dedup_celery.W003",
                "track_started=True on a DedupTask: a redelivered "
                "duplicate writes STARTED over the original's stored SUCCESS before it is "
                "skipped.",
                "Set track_started=False on the task (or task_track_started=False).",
                task.name,
            )
        countdown = options.retry_countdown
        record_ttl = options.record_ttl
        processing_timeout = options.processing_timeout
        if visibility_timeout is not None and countdown >= visibility_timeout:
            yield _Finding(
                checks.Warning,
                "dedup_celery.W004",
                f"RETRY_COUNTDOWN ({countdown:g} s) is not below the "
                f"broker's visibility timeout ({visibility_timeout:g} s), so every "
                "rescheduled duplicate is itself redelivered again.",
                "Lower RETRY_COUNTDOWN (or dedup_retry_countdown) below "
                "broker_transport_options['visibility_timeout'].",
                task.name,
            )
        horizon = _retry_horizon(task)
        limits = [v for v in (visibility_timeout, horizon) if v]
        if limits and record_ttl < max(limits):
            yield _Finding(
                checks.Warning,
                "dedup_celery.W005",
                f"RECORD_TTL ({record_ttl:g} s) is shorter than the "
                f"broker's visibility timeout or the task's retry horizon ({max(limits):g} s); "
                "a copy arriving after the record expired runs the body again.",
                "Raise RECORD_TTL (or dedup_record_ttl) above both.",
                task.name,
            )
        if (
            options.on_enqueue == "queued"
            and visibility_timeout is not None
            and options.queue_ttl < visibility_timeout
        ):
            yield _Finding(
                checks.Warning,
                "dedup_celery.W012",
                f'dedup_queue_ttl ({options.queue_ttl:g} s) of dedup_on_enqueue="queued" is '
                f"below the broker's visibility timeout ({visibility_timeout:g} s): a message "
                "redelivered after it can meet a second copy that a later send published.",
                "Raise dedup_queue_ttl above broker_transport_options['visibility_timeout'] "
                "(a send's countdown or ETA is added to it by itself).",
                task.name,
            )
        heartbeat = options.heartbeat_interval
        if heartbeat is not None and heartbeat * 2 > processing_timeout:
            yield _Finding(
                checks.Warning,
                "dedup_celery.W009",
                f"the heartbeat interval ({heartbeat:g} s) is not below "
                f"half of PROCESSING_TIMEOUT ({processing_timeout:g} s); one late renewal "
                "loses the lease.",
                "Lower HEARTBEAT_INTERVAL (or dedup_heartbeat_interval) to a third of the "
                "lease or less.",
                task.name,
            )
        time_limit = task.time_limit or app.conf.task_time_limit
        # With a heartbeat the lease follows the body, so only without one must
        # the lease outlast the longest possible run.
        if heartbeat is None and time_limit and processing_timeout <= float(time_limit):
            yield _Finding(
                checks.Warning,
                "dedup_celery.W006",
                f"PROCESSING_TIMEOUT ({processing_timeout:g} s) is not "
                f"above its hard time limit ({float(time_limit):g} s); a body still running "
                "when its lease ends can be taken over and run twice.",
                "Raise PROCESSING_TIMEOUT (or dedup_processing_timeout) above the time limit.",
                task.name,
            )
    for scope, by_mode in sorted(modes.items()):
        if len(by_mode) > 1:
            names = sorted(by_mode[True] + by_mode[False])
            yield checks.Error(
                f"Scope {scope!r} is used by status-mode task(s) {sorted(by_mode[False])} and "
                f"transactional task(s) {sorted(by_mode[True])}.",
                hint="Give the tasks different dedup_scope values, or the same mode.",
                obj=", ".join(names),
                id="dedup_celery.E006",
            )


#: Throughput of a one-row task with connections kept, as a multiple of Celery's default
#: close-per-task handling (docs/BENCHMARKS.md, one row, c=4: 647 against 180 tasks/s).
_REUSE_SPEEDUP = "3.6"


def connection_handling_warning(app: Any) -> str | None:
    """Say (``dedup_celery.W010``) when Celery's Django fixup closes connections per task.

    Celery 5.6 and later close every Django database connection before and
    after each task unless ``CELERY_DB_REUSE_MAX`` is set, whatever
    ``CONN_MAX_AGE`` says; 5.4 and 5.5 close only those past their
    ``CONN_MAX_AGE``, which is 0 by default. Either way every task then opens a
    new connection, which costs more than dedup itself. None when connections
    are kept, or when the fixup is not installed.
    """
    import celery
    from django.conf import settings

    if "celery.fixups.django:fixup" not in getattr(app, "fixups", ()) or not settings.DATABASES:
        return None
    version = ".".join(str(part) for part in celery.VERSION[:2])
    cost = (
        "Every task then opens a new database connection, which costs more than dedup "
        f"itself: kept connections made one-row tasks {_REUSE_SPEEDUP} times faster in "
        "dedup_celery's benchmarks."
    )
    if tuple(celery.VERSION[:2]) >= (5, 6):
        if app.conf.get("CELERY_DB_REUSE_MAX"):
            return None
        return (
            f"dedup_celery.W010: Celery {version}'s Django fixup closes every database "
            "connection before and after each task, because CELERY_DB_REUSE_MAX is not set "
            f"(it does not read CONN_MAX_AGE). {cost} HINT: set CELERY_DB_REUSE_MAX = 1000 in "
            "the settings the Celery app reads (a Django setting with namespace='CELERY')."
        )
    closing = sorted(
        alias for alias, db in settings.DATABASES.items() if not db.get("CONN_MAX_AGE")
    )
    if not closing or app.conf.get("CELERY_DB_REUSE_MAX"):
        return None
    return (
        f"dedup_celery.W010: Celery {version}'s Django fixup closes the connections of "
        f"{', '.join(closing)} after each task, because their CONN_MAX_AGE is 0. {cost} "
        "HINT: set CONN_MAX_AGE (for example 600) for those databases, or CELERY_DB_REUSE_MAX."
    )


def refuse_to_start_on_errors(**kwargs: Any) -> None:
    """Stop a starting Celery worker whose dedup configuration has check errors.

    Connected to ``worker_init``, which the worker sends before it starts its
    pool and consumer. A worker that started anyway would fail (and ack) or
    reschedule every message of its DedupTasks, so it exits with the messages
    instead. ``SystemExit`` is the one exception Celery's signal dispatch does
    not swallow. Warnings do not stop it, nor do checks listed in
    ``SILENCED_SYSTEM_CHECKS``; :func:`log_check_messages` logs the warnings.
    """
    from django.core.checks import run_checks

    try:
        messages = run_checks(tags=[TAG])
    except Exception:
        logger.exception("dedup_celery: the system checks could not run")
        return
    errors = [m for m in messages if m.is_serious() and not m.is_silenced()]
    if errors:
        lines = "\n".join(f"  {message}" for message in errors)
        raise SystemExit(
            "dedup_celery: this worker does not start, because its dedup configuration has "
            f"{len(errors)} check error(s); started, it would fail or reschedule every "
            f"message of its DedupTasks:\n{lines}\n"
            "Fix them (python manage.py check --tag dedup_celery lists them), then start "
            "the worker again."
        )


def log_check_messages(**kwargs: Any) -> None:
    """Log dedup_celery's check messages (Celery's worker runs checks but drops the output).

    Also says, at ERROR, when the message table is missing: every message would
    be rescheduled until the migrations run.
    """
    from django.core.checks import run_checks

    try:
        messages = [m for m in run_checks(tags=[TAG]) if not m.is_silenced()]
    except Exception:
        logger.exception("dedup_celery: the system checks could not run")
        return
    for message in messages:
        level = logging.ERROR if message.is_serious() else logging.WARNING
        logger.log(level, "%s", message)
    try:
        connections_warning = connection_handling_warning(_current_celery_app())
    except Exception:
        logger.exception("dedup_celery: could not tell how Celery handles database connections")
    else:
        if connections_warning:
            logger.warning("%s", connections_warning)
    if any(message.is_serious() for message in messages):
        return
    from dedup_celery.backends import get_backend

    try:
        problems = get_backend().ready_problems()
    except Exception as exc:
        logger.warning("dedup_celery: could not look for the message table: %s", exc)
        return
    for problem in problems:
        logger.error("dedup_celery: %s", problem)
