"""Who holds a claim: the owner process's identity, and whether that process is gone.

Host name and pid alone prove nothing (pids are reused, containers share host
names), so a claim also records the process start time, the machine's boot id
and the pid namespace. Together they tell whether the process that holds a
claim is still the same process:

* :func:`owner_is_gone` judges that the owning process no longer exists, so its
  lease can end at once;
* :func:`earlier_attempt_is_over` lets a copy that lands in the owner process
  itself take over, when that process provably runs nothing else
  (:class:`running_body` counts the bodies in progress).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Protocol

from dedup_celery.keys import storable


@dataclass(frozen=True)
class OwnerIdentity:
    """The process that holds a claim, and what proves it is the same process."""

    hostname: str
    pid: int
    process_start: int | None
    boot_id: str
    pid_namespace: str


class HasIdentity(Protocol):
    """Anything that records an owner's identity, read-only (a stored record)."""

    @property
    def hostname(self) -> str: ...  # noqa: D102
    @property
    def pid(self) -> int | None: ...  # noqa: D102
    @property
    def process_start(self) -> int | None: ...  # noqa: D102
    @property
    def boot_id(self) -> str: ...  # noqa: D102
    @property
    def pid_namespace(self) -> str: ...  # noqa: D102


_cache: tuple[int, OwnerIdentity] | None = None
_bodies_lock = threading.Lock()
_bodies_running = 0


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def process_start_ticks(pid: int) -> int | None:
    """Return the start time of *pid* in clock ticks since boot, or None if unknown.

    The worker's main process reads this for every task it hands a child
    (:class:`~dedup_celery.worker.DedupRequest`), so it is three system calls
    and a split, without a file object.
    """
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = stat.rsplit(b")", 1)[-1].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def current_identity() -> OwnerIdentity:
    """Return this process's identity (computed once per pid, so forks get their own)."""
    global _cache
    pid = os.getpid()
    if _cache is None or _cache[0] != pid:
        _cache = (
            pid,
            OwnerIdentity(
                hostname=storable(socket.gethostname()),
                pid=pid,
                process_start=process_start_ticks(pid),
                boot_id=_read("/proc/sys/kernel/random/boot_id")[:64],
                pid_namespace=_pid_namespace()[:64],
            ),
        )
    return _cache[1]


def pid_takeover() -> bool:
    """True unless ``PID_TAKEOVER`` turned the judgements by process identity off."""
    from dedup_celery.conf import get_settings

    return get_settings().pid_takeover


def owner_is_gone(record: HasIdentity) -> bool:
    """True only if the process that holds *record* provably no longer exists.

    Host names and pids prove nothing across machines or containers, so the
    record must carry this machine's boot id and this process's pid namespace.
    Then "gone" needs positive proof: a readable ``/proc/<pid>/stat`` with
    another start time (the pid was reused), or ESRCH from ``kill(pid, 0)``.
    An unreadable stat proves nothing: with ``/proc`` mounted ``hidepid=2``
    (systemd's ``ProtectProc=invisible``) another user's live process reads
    exactly like a dead one. EPERM means a process is there, and anything else
    is unknown; both wait for the lease. Off with ``PID_TAKEOVER = False``.
    """
    if not pid_takeover():
        return False
    me = current_identity()
    if not record.boot_id or record.boot_id != me.boot_id:
        return False
    if not record.pid_namespace or record.pid_namespace != me.pid_namespace:
        return False
    if record.pid is None or record.process_start is None:
        return False
    if record.pid == me.pid:
        return False  # that is this process: see earlier_attempt_is_over()
    started = process_start_ticks(record.pid)
    if started is not None:
        return started != record.process_start
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:  # ESRCH: no process has this pid
        return True
    except OSError:  # EPERM: a process is there, of another user; else unknown
        return False
    return False  # a process is there, and its stat is not readable: unknown


def is_this_process(record: HasIdentity) -> bool:
    """True if *record*'s owner identity is exactly this process."""
    me = current_identity()
    return (
        bool(me.boot_id)
        and record.boot_id == me.boot_id
        and record.pid_namespace == me.pid_namespace
        and record.pid == me.pid
        and record.process_start == me.process_start
    )


def green_threads() -> bool:
    """True if gevent or eventlet patched threading: then greenlets share the main thread."""
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched("threading"):
        return True
    eventlet_patcher = sys.modules.get("eventlet.patcher")
    return eventlet_patcher is not None and eventlet_patcher.is_monkey_patched("thread")


def earlier_attempt_is_over(record: HasIdentity) -> bool:
    """True if *record* is held by this very process and that attempt has ended.

    In the prefork and solo pools a process runs one task at a time, so while
    this delivery runs, no earlier attempt can still be running here. Thread,
    gevent and eventlet pools run several tasks in one process, so there the
    answer is always False.
    """
    if not pid_takeover() or not is_this_process(record):
        return False
    if threading.current_thread() is not threading.main_thread() or green_threads():
        return False
    with _bodies_lock:
        return _bodies_running == 0


class running_body:
    """Count the bodies running in this process (see :func:`earlier_attempt_is_over`)."""

    def __enter__(self) -> None:
        global _bodies_running
        with _bodies_lock:
            _bodies_running += 1

    def __exit__(self, *exc: object) -> None:
        global _bodies_running
        with _bodies_lock:
            _bodies_running -= 1
