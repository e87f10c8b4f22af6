"""Storage backends for the message table, and the per-process backend instance."""

from __future__ import annotations

import threading

from django.utils.module_loading import import_string

from dedup_celery.backends.base import BaseBackend
from dedup_celery.conf import get_settings
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
            f"DEDUP_CELERY['BACKEND'] is {name!r}, which is neither a known alias "
            f"({', '.join(sorted(BACKEND_ALIASES))}) nor a dotted path to a backend class."
        )
    try:
        cls = import_string(path)
    except ImportError as exc:
        raise DedupConfigurationError(
            f"DEDUP_CELERY['BACKEND'] is {name!r}, but {path!r} cannot be imported: {exc}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, BaseBackend)):
        raise DedupConfigurationError(
            f"DEDUP_CELERY['BACKEND'] is {name!r}, but {path!r} is not a subclass of "
            "dedup_celery.backends.base.BaseBackend."
        )
    return cls


def build_backend() -> BaseBackend:
    """Create a backend from the current settings (no I/O happens here)."""
    conf = get_settings()
    cls = load_backend_class(conf.backend)
    try:
        return cls(database=conf.database, **conf.options)
    except DedupConfigurationError:
        raise
    except TypeError as exc:
        raise DedupConfigurationError(
            f"DEDUP_CELERY['OPTIONS'] does not fit {cls.__name__}: {exc}. "
            f"Accepted options: {', '.join(cls.accepted_options) or 'none'}."
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
        _instance = None


__all__ = ["BaseBackend", "get_backend", "load_backend_class", "reset_backend"]
