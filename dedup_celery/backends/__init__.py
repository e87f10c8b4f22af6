"""Storage backends for the message table, and the per-process backend instance."""

from __future__ import annotations

import inspect
import threading
from typing import Any

from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string

from dedup_celery.backends.base import BaseBackend
from dedup_celery.conf import SETTING_NAME, WATCHED_SETTINGS, get_settings
from dedup_celery.exceptions import DedupConfigurationError

BACKEND_ALIASES: dict[str, str] = {
    "db": "dedup_celery.backends.db.DatabaseBackend",
    "redis": "dedup_celery.backends.redis.RedisBackend",
}

_lock = threading.Lock()
_instance: BaseBackend | None = None


def resolve_backend_path(name: str) -> str:
    """Turn a ``BACKEND`` value (an alias or a dotted path) into a dotted path."""
    return BACKEND_ALIASES.get(name, name)


def load_backend_class(name: str) -> type[BaseBackend]:
    """Import the backend class named by a ``BACKEND`` value, with a clear error if it fails."""
    path = resolve_backend_path(name)
    if "." not in path:
        raise DedupConfigurationError(
            f"{SETTING_NAME}['BACKEND'] is {name!r}, which is neither a known alias "
            f"({', '.join(sorted(BACKEND_ALIASES))}) nor a dotted path to a backend class.",
            setting="BACKEND",
        )
    try:
        cls = import_string(path)
    except ImportError as exc:
        raise DedupConfigurationError(
            f"{SETTING_NAME}['BACKEND'] is {name!r}, but {path!r} cannot be imported: {exc}",
            setting="BACKEND",
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, BaseBackend)):
        raise DedupConfigurationError(
            f"{SETTING_NAME}['BACKEND'] is {name!r}, but {path!r} is not a subclass of "
            "dedup_celery.backends.base.BaseBackend.",
            setting="BACKEND",
        )
    return cls


def build_backend() -> BaseBackend:
    """Create a backend from the current settings (no I/O happens here).

    ``DATABASE`` is passed as ``database=`` only when it is set, so a backend
    that has no database need not accept it, and setting it for one is an error.
    """
    conf = get_settings()
    cls = load_backend_class(conf.backend)
    kwargs: dict[str, Any] = dict(conf.options)
    if conf.database is not None:
        if "database" not in inspect.signature(cls).parameters:
            raise DedupConfigurationError(
                f"{SETTING_NAME}['DATABASE'] is {conf.database!r}, but the {cls.__name__} "
                "backend does not keep its records in a database. Remove DATABASE, or use "
                "the database backend (BACKEND 'db').",
                setting="DATABASE",
            )
        kwargs["database"] = conf.database
    try:
        return cls(**kwargs)
    except DedupConfigurationError as exc:
        # A backend refuses its OPTIONS (a missing url, a bad keyword value).
        exc.setting = exc.setting or "OPTIONS"
        raise
    except TypeError as exc:
        raise DedupConfigurationError(
            f"{SETTING_NAME}['OPTIONS'] does not fit {cls.__name__}: {exc}. "
            f"Accepted options: {', '.join(cls.accepted_options) or 'none'}.",
            setting="OPTIONS",
        ) from exc


def get_backend() -> BaseBackend:
    """Return this process's backend, creating it on first use."""
    global _instance
    backend = _instance
    if backend is None:
        with _lock:
            if _instance is None:
                _instance = build_backend()
            backend = _instance
    return backend


def reset_backend() -> None:
    """Drop the cached backend; the next :func:`get_backend` builds a new one."""
    global _instance
    with _lock:
        backend, _instance = _instance, None
    if backend is not None:
        backend.close()


@receiver(setting_changed)
def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting in WATCHED_SETTINGS:
        reset_backend()


__all__ = ["BaseBackend", "get_backend", "load_backend_class", "reset_backend"]
