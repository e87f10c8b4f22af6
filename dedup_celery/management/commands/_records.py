"""Argument parsing and record printing shared by dedup_inspect and dedup_release."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from django.core.management.base import CommandError, CommandParser

from dedup_celery.backends.base import Record
from dedup_celery.keys import digest, nested_key

_DIGEST = re.compile(r"[0-9a-f]{64}")


def add_record_arguments(parser: CommandParser) -> None:
    """Add ``scope``, ``key``, ``--replaced`` and ``--digest``."""
    parser.add_argument("scope", help="The record's scope (by default the task name).")
    parser.add_argument("key", help="The message key (by default the task id).")
    parser.add_argument(
        "--replaced",
        type=int,
        default=0,
        metavar="N",
        help="The message is a replacement (self.replace()) at this replaced_task_nesting.",
    )
    parser.add_argument(
        "--digest",
        action="store_true",
        help="KEY is the record's sha256 key digest (as logged), not the key itself.",
    )


def key_digest_from(options: dict[str, Any]) -> str:
    """Return the key digest the command's arguments name, derived as a delivery derives it."""
    key, nesting = options["key"], options["replaced"]
    if nesting < 0:
        raise CommandError("--replaced must be 0 or more.")
    if not options["digest"]:
        return digest(nested_key(key, nesting))
    if nesting:
        raise CommandError("--replaced names a key, not a digest: leave out --digest.")
    if not _DIGEST.fullmatch(key):
        raise CommandError("With --digest, KEY must be 64 lowercase hex characters.")
    return str(key)


def format_record(record: Record) -> str:
    """Render a record as ``name: value`` lines."""
    lines = []
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        lines.append(f"{field.name:>18}: {'' if value is None else value}")
    return "\n".join(lines)
