"""The identity of the current process, recorded on every claim it makes.

Host name and pid alone prove nothing (pids are reused, containers share host
names), so the record also carries the process start time, the machine's boot
id and the pid namespace. Together they tell whether the process that holds a
claim is still the same process.
"""

from __future__ import annotations

import os
import socket

from dedup_celery.backends.base import OwnerIdentity

_cache: tuple[int, OwnerIdentity] | None = None


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def process_start_ticks(pid: int) -> int | None:
    """Return the start time of *pid* in clock ticks since boot, or None if unknown."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = stat.rsplit(")", 1)[-1].split()
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
                hostname=socket.gethostname()[:255],
                pid=pid,
                process_start=process_start_ticks(pid),
                boot_id=_read("/proc/sys/kernel/random/boot_id")[:64],
                pid_namespace=_pid_namespace()[:64],
            ),
        )
    return _cache[1]
