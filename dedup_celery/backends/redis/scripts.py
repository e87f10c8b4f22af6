"""The Redis backend's Lua scripts: one file per operation, loaded as package data.

Each script is run with a prelude in front that names the statuses from
:mod:`dedup_celery.states` and the claimant's fields from
:data:`~dedup_celery.backends.base.CLAIMANT_FIELDS`, and reads "now" from Redis
``TIME`` in milliseconds, so no status or field list is typed in Lua and no time
comes from a worker.
"""

from __future__ import annotations

import functools
from importlib import resources

from dedup_celery.backends.base import CLAIMANT_FIELDS
from dedup_celery.states import Status

#: The scripts in ``lua/``, one per operation of the backend contract.
SCRIPT_NAMES: tuple[str, ...] = (
    "claim",
    "complete",
    "release",
    "forget",
    "owned",
    "expire_process",
    "get",
    "purge",
    "count_mismatch",
)


def prelude() -> str:
    """The Lua put in front of every script: the status names, claimant fields and clock."""
    names = ", ".join(status.name for status in Status)
    values = ", ".join(f"'{status.value}'" for status in Status)
    fields = ", ".join(f"'{name}'" for name in CLAIMANT_FIELDS)
    return (
        f"local {names} = {values}\n"
        f"local CLAIMANT_FIELDS = {{{fields}}}\n"
        "local t = redis.call('TIME')\n"
        "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    )


@functools.cache
def script_source(name: str) -> str:
    """Return the full source of script *name*: the prelude, then ``lua/<name>.lua``."""
    body = resources.files(__package__).joinpath("lua", f"{name}.lua").read_text("utf-8")
    return prelude() + body
