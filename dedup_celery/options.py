"""A task's dedup options: read off the task class, validated, and resolved against the settings.

The task, the worker's request and the system checks all read options through
:func:`resolve` and :func:`option_errors`, so they can never disagree.
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dedup_celery.conf import (
    DEFAULTS,
    PAYLOAD_MISMATCH_CHOICES,
    SECONDS_RANGE,
    Limits,
    get_settings,
    is_seconds,
    raw_settings,
)
from dedup_celery.exceptions import DedupConfigurationError
from dedup_celery.keys import scope_for

#: The values of the ``dedup_on_enqueue`` task option (:mod:`dedup_celery.enqueue`).
ON_ENQUEUE_CHOICES: tuple[bool | str, ...] = (False, "consumed", "queued")
#: How long a QUEUED marker (``dedup_on_enqueue = "queued"``) holds its key by default.
DEFAULT_QUEUE_TTL = 3600.0


class _UseSetting:
    """The default of ``dedup_heartbeat_interval``: follow ``HEARTBEAT_INTERVAL``."""

    def __repr__(self) -> str:
        return "USE_SETTING"


#: ``dedup_heartbeat_interval`` left at this follows the ``HEARTBEAT_INTERVAL`` setting.
USE_SETTING: Any = _UseSetting()

#: Per-task overrides of the settings of the same name, in seconds.
SECONDS_OPTIONS = ("dedup_processing_timeout", "dedup_retry_countdown", "dedup_record_ttl")

_VALID_TASK_CLASSES: weakref.WeakSet[type] = weakref.WeakSet()
_LIMIT_FIELDS = tuple(f.name for f in dataclasses.fields(Limits))


@dataclass(frozen=True)
class TaskOptions(Limits):
    """One task's dedup options, resolved against the current settings."""

    scope: str
    transactional: bool
    key_function: Callable[..., Any] | None
    #: Run as a plain task: ``dedup_bypass``, or ``BYPASS`` naming it (or True).
    bypass: bool = False
    #: ``dedup_payload``: what of the arguments the payload fingerprint covers (None: all).
    payload_function: Callable[..., Any] | None = None
    #: ``dedup_payload_mismatch``, else ``PAYLOAD_MISMATCH``: "warn", "raise" or "ignore".
    payload_mismatch: str = "warn"
    #: ``dedup_on_enqueue``: False, "consumed" or "queued" (:mod:`dedup_celery.enqueue`).
    on_enqueue: bool | str = False
    #: ``dedup_queue_ttl``: how long a QUEUED marker holds the key, in seconds.
    queue_ttl: float = DEFAULT_QUEUE_TTL


def key_function(task: Any, option: str = "dedup_key") -> Any:
    """Return a task's ``dedup_key`` (or *option*), unbound: a callable, None, or a wrong value.

    The task decorator puts the option in the class dict, where a plain
    function would become a method; it is read without the descriptor protocol
    so it is always called as a plain function with the task's arguments. A
    value that is neither is returned as it is, for :func:`option_errors` to name.
    ``dedup_payload`` is read the same way.
    """
    func = inspect.getattr_static(task, option, None)
    if isinstance(func, staticmethod | classmethod):
        func = func.__func__
    return func


def option_errors(task: Any) -> list[str]:
    """Return a sentence for every dedup option of *task* that can never work."""
    problems = []
    for option in ("dedup_key", "dedup_payload"):
        func = key_function(task, option)
        if func is not None and not callable(func):
            problems.append(f"{option} is {func!r}; it must be None or a callable")
    on_enqueue = getattr(task, "dedup_on_enqueue", False)
    if on_enqueue not in ON_ENQUEUE_CHOICES or on_enqueue is True:
        problems.append(
            f'dedup_on_enqueue is {on_enqueue!r}; it must be False, "consumed" or "queued"'
        )
    elif on_enqueue == "queued" and task.dedup_transactional is True:
        problems.append(
            'dedup_on_enqueue="queued" needs status mode: a transactional claim of the '
            "queued record would hold its row until the body's commit, and every producer "
            'that meets it would wait (use "consumed")'
        )
    queue_ttl = getattr(task, "dedup_queue_ttl", None)
    if queue_ttl is not None and not is_seconds(queue_ttl):
        problems.append(
            f"dedup_queue_ttl is {queue_ttl!r}; it must be None or seconds {SECONDS_RANGE}"
        )
    mismatch = getattr(task, "dedup_payload_mismatch", None)
    if mismatch is not None and mismatch not in PAYLOAD_MISMATCH_CHOICES:
        choices = ", ".join(map(repr, PAYLOAD_MISMATCH_CHOICES))
        problems.append(
            f"dedup_payload_mismatch is {mismatch!r}; it must be None (follow "
            f"PAYLOAD_MISMATCH) or one of {choices}"
        )
    bypass = task.dedup_bypass
    if not isinstance(bypass, bool):
        problems.append(f"dedup_bypass is {bypass!r}; it must be a bool")
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
    for name in SECONDS_OPTIONS:
        value = getattr(task, name)
        if value is not None and not is_seconds(value):
            problems.append(f"{name} is {value!r}; it must be None or seconds {SECONDS_RANGE}")
    heartbeat = getattr(task, "dedup_heartbeat_interval", USE_SETTING)
    if heartbeat is not USE_SETTING and heartbeat is not None and not is_seconds(heartbeat):
        problems.append(
            f"dedup_heartbeat_interval is {heartbeat!r}; it must be None (off) or seconds "
            f"{SECONDS_RANGE}"
        )
    return problems


def resolve(task: Any) -> TaskOptions:
    """Return *task*'s options over the settings; raise DedupConfigurationError if invalid.

    Options are class attributes, so each task is validated and resolved once
    per process and settings generation (a change of ``DEDUP_CELERY`` through
    Django's ``setting_changed`` starts a new one).
    """
    conf = get_settings()
    cached = _RESOLVED.get(id(task))
    if cached is not None and cached[0] is task and cached[1] is conf:
        return cached[2]
    options = _resolve(task, conf)
    _RESOLVED[id(task)] = (task, conf, options)
    return options


# id(task) -> (task, the settings it was resolved against, its options).
_RESOLVED: dict[int, tuple[Any, Any, TaskOptions]] = {}


def _resolve(task: Any, conf: Any) -> TaskOptions:
    if type(task) not in _VALID_TASK_CLASSES:
        problems = option_errors(task)
        if problems:
            raise DedupConfigurationError(
                f"Task {task.name!r} has invalid dedup options: " + "; ".join(problems) + "."
            )
        _VALID_TASK_CLASSES.add(type(task))
    limits = {name: getattr(conf, name) for name in _LIMIT_FIELDS}
    for option in SECONDS_OPTIONS:  # dedup_record_ttl overrides record_ttl, and so on
        value = getattr(task, option)
        if value is not None:
            limits[option.removeprefix("dedup_")] = float(value)
    heartbeat = task.dedup_heartbeat_interval
    if heartbeat is not USE_SETTING:
        limits["heartbeat_interval"] = None if heartbeat is None else float(heartbeat)
    return TaskOptions(
        **limits,
        scope=scope_for(task),
        transactional=task.dedup_transactional,
        key_function=key_function(task),
        payload_function=key_function(task, "dedup_payload"),
        payload_mismatch=getattr(task, "dedup_payload_mismatch", None) or conf.payload_mismatch,
        on_enqueue=getattr(task, "dedup_on_enqueue", False),
        queue_ttl=float(getattr(task, "dedup_queue_ttl", None) or DEFAULT_QUEUE_TTL),
        bypass=task.dedup_bypass is True
        or conf.bypass is True
        or (isinstance(conf.bypass, frozenset) and task.name in conf.bypass),
    )


def fallback_countdown(task: Any) -> float:
    """Return the retry countdown for *task* when its options or the settings do not resolve.

    The task's ``dedup_retry_countdown``, else ``RETRY_COUNTDOWN``, each only if
    it is still a valid number of seconds, else the default.
    """
    raw = raw_settings()
    candidates = (
        getattr(task, "dedup_retry_countdown", None),
        raw.get("RETRY_COUNTDOWN") if isinstance(raw, dict) else None,
    )
    for value in candidates:
        if is_seconds(value):
            return float(value)
    return float(DEFAULTS["RETRY_COUNTDOWN"])
