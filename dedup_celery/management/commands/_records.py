"""Argument parsing and record printing shared by the operator commands."""

from __future__ import annotations

import dataclasses
import re
import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from dedup_celery.backends import get_backend
from dedup_celery.backends.base import Record
from dedup_celery.keys import digest, nested_key
from dedup_celery.operator import inspect_record
from dedup_celery.states import Status

_DIGEST = re.compile(r"[0-9a-f]{64}")


def add_record_arguments(parser: CommandParser) -> None:
    """Add ``scope``, ``key``, ``--replaced`` and ``--digest``."""
    parser.add_argument("scope", help="The record's scope (by default the task's dotted name).")
    parser.add_argument("key", help="The message key (by default the task id).")
    add_key_options(parser)


def add_key_options(parser: CommandParser) -> None:
    """Add ``--replaced`` and ``--digest``, which say how KEY names the record."""
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


def add_owner_argument(parser: CommandParser, what: str) -> None:
    """Add ``--owner``; *what* starts its help ("Release only if this is still the owner token")."""
    parser.add_argument("--owner", help=f"{what} (as dedup_inspect printed it: 32 hex digits).")


def owner_from(options: dict[str, Any]) -> str | None:
    """Return ``--owner`` as the 32 hex digits every command prints, or None if not given."""
    value = options.get("owner")
    if not value:
        return None
    try:
        return uuid.UUID(value).hex
    except ValueError:
        raise CommandError(
            f"--owner {value!r} is not an owner token: give it as dedup_inspect prints it "
            "(32 hex digits)."
        ) from None


def no_record(scope: str) -> CommandError:
    """The error for a scope and key with no record, with where the two usually come from."""
    return CommandError(
        f"No record for that scope and key in the {get_backend().describe()}. The scope is "
        f"the task's dotted name (for example 'shop.tasks.ship_order'; {scope!r} was given) "
        "unless the task sets dedup_scope, and the key is the task id unless it sets dedup_key."
    )


def applicable_fields(record: Record) -> dict[str, Any]:
    """The record's fields, without ``lease_expired`` unless it is PROCESSING.

    Only a PROCESSING record's lease decides anything, so the flag is noise on
    the others.
    """
    values = dataclasses.asdict(record)
    if record.status != Status.PROCESSING:
        del values["lease_expired"]
    return values


def format_record(record: Record) -> str:
    """Render a record as ``name: value`` lines: the applicable fields that have a value."""
    shown = {name: value for name, value in applicable_fields(record).items() if value is not None}
    width = max(map(len, shown), default=0)
    return "\n".join(f"{name:>{width}}: {value}" for name, value in shown.items())


def read_record(scope: str, key_digest: str) -> Record:
    """Return the record of (scope, key digest); :func:`no_record`'s error if there is none."""
    record = inspect_record(scope, key_digest)
    if record is None:
        raise no_record(scope)
    return record


def show_record(command: BaseCommand, scope: str, key_digest: str) -> Record:
    """Read the record of (scope, key digest), print it on *command*'s stdout, and return it."""
    record = read_record(scope, key_digest)
    command.stdout.write(format_record(record))
    return record
