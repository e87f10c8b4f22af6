"""Settings for dedup_celery, read from ``settings.DEDUP_CELERY`` when they are used.

Defaults live in :data:`DEFAULTS` and nowhere else. Nothing is written back into
``django.conf.settings``; the parsed value is cached and dropped whenever Django
sends ``setting_changed`` (``override_settings`` in tests).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from django.conf import settings as django_settings
from django.core import checks
from django.core.signals import setting_changed
from django.dispatch import receiver

from dedup_celery.exceptions import DedupConfigurationError

SETTING_NAME = "DEDUP_CELERY"

DEFAULTS: dict[str, Any] = {
    "BACKEND": "db",
    "OPTIONS": {},
    "DATABASE": None,
    "PROCESSING_TIMEOUT": 600,
    "RETRY_COUNTDOWN": 5,
    "RECORD_TTL": 7 * 24 * 3600,
    "RESULT_MAX_BYTES": 65536,
    "HEARTBEAT_INTERVAL": None,
    "MAX_TAKEOVERS": 5,
    "MAX_STORE_RESCHEDULES": 720,
    "PID_TAKEOVER": True,
    # Run DedupTasks as plain tasks: True for all, or a list of task names (see
    # docs/operating.md, "Bypassing dedup"). Loud on purpose: a check, and a WARNING per delivery.
    "BYPASS": False,
    # What a duplicate whose arguments differ from the original's does: "warn",
    # "raise" or "ignore" (docs/settings.md, PAYLOAD_MISMATCH).
    "PAYLOAD_MISMATCH": "warn",
    # Prometheus metrics (dedup_celery.prometheus): None, True, or {"port": ..., "addr": ...}.
    "PROMETHEUS": None,
}

#: The values of ``PAYLOAD_MISMATCH`` and of the ``dedup_payload_mismatch`` task option.
PAYLOAD_MISMATCH_CHOICES = ("warn", "raise", "ignore")

#: The longest duration a setting or option may have: 100 years. A claim adds
#: its lease and RECORD_TTL to "now", and every store must hold the sum: Python's
#: datetime and MySQL's DATETIME end in the year 9999.
MAX_SECONDS = 100 * 365.25 * 24 * 3600
#: How the bound reads in error messages.
SECONDS_RANGE = f"greater than zero and at most 100 years ({MAX_SECONDS:.0f} s)"

# Keys whose value is a number of seconds that must be greater than zero.
_POSITIVE_SECONDS = ("PROCESSING_TIMEOUT", "RETRY_COUNTDOWN", "RECORD_TTL")


@dataclass(frozen=True)
class Limits:
    """The numbers a delivery works with: the settings', or a task's overrides of them."""

    processing_timeout: float
    retry_countdown: float
    record_ttl: float
    result_max_bytes: int
    heartbeat_interval: float | None
    max_takeovers: int
    max_store_reschedules: int


@dataclass(frozen=True)
class DedupSettings(Limits):
    """The validated content of ``settings.DEDUP_CELERY`` merged over the defaults."""

    backend: str
    options: dict[str, Any] = field(hash=False)
    database: str | None
    pid_takeover: bool = True
    #: True (every DedupTask), or the names of the tasks that run without dedup.
    bypass: bool | frozenset[str] = False
    #: One of :data:`PAYLOAD_MISMATCH_CHOICES`.
    payload_mismatch: str = "warn"


_cached: DedupSettings | None = None


def is_seconds(value: Any) -> TypeGuard[numbers.Real]:
    """Return True if *value* is a real number of seconds in (0, :data:`MAX_SECONDS`]."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and value == value  # rejects NaN
        and 0 < float(value) <= MAX_SECONDS
    )


def raw_settings() -> Any:
    """Return ``settings.DEDUP_CELERY`` as the user wrote it (an empty dict if unset)."""
    return getattr(django_settings, SETTING_NAME, {})


def validate(raw: Any) -> list[checks.CheckMessage]:
    """Return one check error for every problem in *raw* (``settings.DEDUP_CELERY``).

    The same list drives the system checks and the exception raised at use
    time, so both always agree.
    """
    if not isinstance(raw, dict):
        return [
            checks.Error(
                f"settings.{SETTING_NAME} must be a dict, not {type(raw).__name__}.",
                hint=f"Set {SETTING_NAME} = {{}} to use every default.",
                id="dedup_celery.E001",
            )
        ]
    errors: list[checks.CheckMessage] = []
    unknown = sorted(set(raw) - set(DEFAULTS), key=str)
    for key in unknown:
        errors.append(
            checks.Error(
                f"settings.{SETTING_NAME} has an unknown key {key!r}.",
                hint="Known keys: " + ", ".join(DEFAULTS) + ". Check the spelling.",
                id="dedup_celery.E002",
            )
        )
    merged = {**DEFAULTS, **raw}

    def bad(key: str, expected: str) -> None:
        errors.append(
            checks.Error(
                f"settings.{SETTING_NAME}[{key!r}] is {merged[key]!r}; it must be {expected}.",
                hint=f"Fix the value, or remove the key to use the default {DEFAULTS[key]!r}.",
                id="dedup_celery.E003",
            )
        )

    if not isinstance(merged["BACKEND"], str) or not merged["BACKEND"]:
        bad("BACKEND", 'a backend alias ("db") or the dotted path of a backend class')
    if not isinstance(merged["OPTIONS"], dict):
        bad("OPTIONS", "a dict of keyword arguments for the backend")
    for key in _POSITIVE_SECONDS:
        if not is_seconds(merged[key]):
            bad(key, f"a number of seconds {SECONDS_RANGE}")
    heartbeat = merged["HEARTBEAT_INTERVAL"]
    if heartbeat is not None and not is_seconds(heartbeat):
        bad("HEARTBEAT_INTERVAL", f"None (no lease renewal) or a number of seconds {SECONDS_RANGE}")
    for key in ("MAX_TAKEOVERS", "MAX_STORE_RESCHEDULES"):
        count = merged[key]
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            bad(key, "an integer, 1 or more")
    max_bytes = merged["RESULT_MAX_BYTES"]
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
        bad("RESULT_MAX_BYTES", "an integer number of bytes, 0 or more (0 stores no results)")
    if not isinstance(merged["PID_TAKEOVER"], bool):
        bad("PID_TAKEOVER", "True or False")
    bypass = merged["BYPASS"]
    if not isinstance(bypass, bool) and not (
        isinstance(bypass, list | tuple | set | frozenset)
        and all(isinstance(name, str) and name for name in bypass)
    ):
        bad("BYPASS", "True, False, or a list of task names")
    if merged["PAYLOAD_MISMATCH"] not in PAYLOAD_MISMATCH_CHOICES:
        bad("PAYLOAD_MISMATCH", "one of " + ", ".join(map(repr, PAYLOAD_MISMATCH_CHOICES)))
    if not _prometheus_valid(merged["PROMETHEUS"]):
        bad(
            "PROMETHEUS",
            'None (off), True, or a dict with an optional "port" (1-65535) and "addr" (a '
            "host to listen on) for the worker's /metrics",
        )
    database = merged["DATABASE"]
    if database is not None:
        if not isinstance(database, str):
            bad("DATABASE", "None or the alias of a database in settings.DATABASES")
        elif database not in django_settings.DATABASES:
            errors.append(
                checks.Error(
                    f"settings.{SETTING_NAME}['DATABASE'] is {database!r}, which is not "
                    "a key of settings.DATABASES.",
                    hint="Use one of: " + ", ".join(django_settings.DATABASES) + ", or None "
                    "to let the database routers choose.",
                    id="dedup_celery.E005",
                )
            )
    return errors


def _prometheus_valid(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if not isinstance(value, dict) or set(value) - {"port", "addr"}:
        return False
    port = value.get("port", 1)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        return False
    addr = value.get("addr", "127.0.0.1")
    return isinstance(addr, str) and bool(addr)


def get_settings() -> DedupSettings:
    """Return the validated settings, raising :class:`DedupConfigurationError` if invalid."""
    global _cached
    if _cached is None:
        raw = raw_settings()
        errors = validate(raw)
        if errors:
            raise DedupConfigurationError(
                " ".join(f"{e.msg} {e.hint or ''}".strip() for e in errors)
                + f" ({', '.join(str(e.id) for e in errors)})"
            )
        merged = {**DEFAULTS, **raw}
        _cached = DedupSettings(
            backend=merged["BACKEND"],
            options=dict(merged["OPTIONS"]),
            database=merged["DATABASE"],
            processing_timeout=float(merged["PROCESSING_TIMEOUT"]),
            retry_countdown=float(merged["RETRY_COUNTDOWN"]),
            record_ttl=float(merged["RECORD_TTL"]),
            result_max_bytes=int(merged["RESULT_MAX_BYTES"]),
            heartbeat_interval=(
                None
                if merged["HEARTBEAT_INTERVAL"] is None
                else float(merged["HEARTBEAT_INTERVAL"])
            ),
            max_takeovers=int(merged["MAX_TAKEOVERS"]),
            max_store_reschedules=int(merged["MAX_STORE_RESCHEDULES"]),
            pid_takeover=merged["PID_TAKEOVER"],
            bypass=(
                merged["BYPASS"]
                if isinstance(merged["BYPASS"], bool)
                else frozenset(merged["BYPASS"])
            ),
            payload_mismatch=merged["PAYLOAD_MISMATCH"],
        )
    return _cached


def reset() -> None:
    """Forget the cached settings, so the next use reads them again.

    The backend cache listens to the same signal (``dedup_celery.backends``).
    """
    global _cached
    _cached = None


#: Settings whose change invalidates what dedup_celery cached from them.
WATCHED_SETTINGS = (SETTING_NAME, "DATABASES", "DATABASE_ROUTERS")


@receiver(setting_changed)
def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting in WATCHED_SETTINGS:
        reset()
