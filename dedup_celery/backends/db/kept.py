"""The database backend's kept connection: status-mode statements outlive Celery's per-task close.

Celery's Django fixup closes every Django connection before and after each
task unless ``CELERY_DB_REUSE_MAX`` is set (it does not read ``CONN_MAX_AGE``).
A new PostgreSQL session then loads the message table's catalogue and plans
the claim again for every task, which costs more than the claim itself. The
backend therefore runs its status-mode statements on a connection of its own,
made by Django's own backend class from the alias's settings (so role,
isolation level and time zone are set as on Django's connection), and kept
for the life of the process.

It is used only where it cannot leak or be shared:

* in a worker, inside a delivery that is not eager, on the process's main
  thread (prefork and solo pools); the worker's main process, heartbeat and
  retry threads, and the threads and green pools (gevent, eventlet) use
  Django's connection;
* outside an atomic block on the alias;
* only when Celery closes Django's connection per task: with
  ``CELERY_DB_REUSE_MAX`` set, Django's connection already survives and is
  used, so a well-run deployment pays one connection per process, not two;
* on PostgreSQL, where a new session costs the most;
* unless ``DEDUP_CELERY['OPTIONS']['keep_connection']`` is False: turn it off
  where the message table depends on state set on Django's connection (a
  schema-per-tenant engine's ``search_path``), or where a pooler in session
  mode cannot spare one server connection per worker process.

After a fork the child never uses, or closes, the connection it inherited
(closing it would send the server a Terminate on the parent's socket): its
socket is pointed at ``/dev/null`` in the child and the child opens its own.
A connection that failed, or that the server closed, is dropped and opened
again.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from typing import Any

from celery._state import get_current_task
from django.db import connections
from django.db.utils import load_backend

from dedup_celery.backends.db.connection import DRIVER_ERRORS, execute
from dedup_celery.identity import green_threads

# Every kept connection of this process, so a fork can abandon them all.
_ALL: weakref.WeakSet[KeptConnection] = weakref.WeakSet()


def _reuse_configured(app: Any) -> bool:
    """True if Celery's Django fixup keeps Django's connections open: the setting it reads."""
    return bool(app.conf.get("CELERY_DB_REUSE_MAX"))


class KeptConnection:
    """One Django connection to *alias*, kept across tasks, for one process's main thread."""

    def __init__(self, alias: str) -> None:
        """Remember the alias; the connection is opened at first use, with the settings then."""
        self.alias = alias
        self._wrapper: Any = None
        self._pid = 0
        # Per Celery app: does the fixup keep Django's connection itself?
        self._reuse: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
        _ALL.add(self)

    def wanted(self, django_connection: Any) -> bool:
        """True if this statement should run on the kept connection rather than Django's."""
        if django_connection.in_atomic_block or django_connection.vendor != "postgresql":
            return False
        task = get_current_task()
        if task is None:
            return False
        # First what a well-run deployment answers: the fixup keeps Django's connection.
        app = task.app
        reuse = self._reuse.get(app)
        if reuse is None:
            reuse = self._reuse[app] = _reuse_configured(app)
        if reuse:
            return False
        if threading.current_thread() is not threading.main_thread() or green_threads():
            return False
        request = task.request
        return not (request.is_eager or request.called_directly)

    def get(self) -> Any:
        """The kept connection (a Django ``DatabaseWrapper``), opened on first use."""
        wrapper = self._wrapper
        if wrapper is not None and self._pid == os.getpid():
            return wrapper
        if wrapper is not None:  # inherited through a fork that the hook did not see
            self._abandon()
        settings = dict(connections[self.alias].settings_dict)
        # A pool would hand the connection back between statements; this one is kept.
        settings["OPTIONS"] = {
            k: v for k, v in (settings.get("OPTIONS") or {}).items() if k != "pool"
        }
        settings["CONN_MAX_AGE"] = None
        backend = load_backend(settings["ENGINE"])
        self._wrapper = backend.DatabaseWrapper(settings, self.alias)
        self._pid = os.getpid()
        return self._wrapper

    def execute(
        self, text: str, params: list[Any], *, fetch: bool, prepare: bool, resend: bool
    ) -> Any:
        """Run a statement on the kept connection (see :func:`.connection.execute`).

        After any error the connection is dropped. With *resend*, a statement
        that failed because the connection was lost (the server restarted, or
        closed an idle session) is sent once more on a new one. Only statements
        a replay cannot change are sent so: the first claim and the complete are
        conditioned on this delivery's owner token, and find their own write if
        the first send committed.
        """
        current = self.get()
        try:
            return execute(current, text, params, fetch=fetch, prepare=prepare)
        except DRIVER_ERRORS:
            raw = current.connection
            lost = raw is None or bool(
                getattr(raw, "broken", False) or getattr(raw, "closed", False)
            )
            self.close()
            if not (lost and resend):
                raise
        return execute(self.get(), text, params, fetch=fetch, prepare=prepare)

    def close(self) -> None:
        """Close and forget the connection (from any thread; a fork's copy is only abandoned)."""
        if self._wrapper is not None and self._pid != os.getpid():
            self._abandon()
        wrapper, self._wrapper = self._wrapper, None
        if wrapper is None:
            return
        raw, wrapper.connection = wrapper.connection, None
        if raw is not None:
            with contextlib.suppress(Exception):
                raw.close()

    def _abandon(self) -> None:
        """Let go of a connection inherited through fork without a byte on its socket."""
        wrapper, self._wrapper = self._wrapper, None
        raw = getattr(wrapper, "connection", None)
        if raw is None:
            return
        wrapper.connection = None
        with contextlib.suppress(Exception):
            # The child's copy of the socket now reads and writes /dev/null, so
            # whatever the driver sends when it is collected never reaches the
            # parent's session.
            fd = raw.fileno()
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
        _INHERITED.append(raw)


# Abandoned connections stay referenced, so the driver never finalises them here.
_INHERITED: list[Any] = []


def close_all() -> None:
    """Close every kept connection of this process (tests call it before a database goes)."""
    for kept in list(_ALL):
        kept.close()


def _after_fork_in_child() -> None:
    for kept in list(_ALL):
        kept._abandon()


os.register_at_fork(after_in_child=_after_fork_in_child)
