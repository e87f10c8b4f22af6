"""``manage.py dedup_inspect``: print one message record, or list records, from any backend."""

from __future__ import annotations

import argparse
import datetime
import json
import re
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from dedup_celery.backends import get_backend
from dedup_celery.backends.base import Record, RecordFilter, RecordListing
from dedup_celery.conf import MAX_SECONDS
from dedup_celery.keys import display_key
from dedup_celery.management.commands._records import (
    add_key_options,
    applicable_fields,
    format_record,
    key_digest_from,
    read_record,
)
from dedup_celery.states import Status

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """Parse ``90``, ``90s``, ``15m``, ``2h`` or ``7d`` into seconds (argparse's ``type``)."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an age: give seconds, or a number with s, m, h or d (15m, 2h, 7d)."
        )
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r} is longer than any record lives.")
    return seconds


def _age(record: Record, now: datetime.datetime) -> str:
    """How long ago *record* was created; *now* is aware, in UTC."""
    created = record.created_at
    if created is None:
        return "-"
    if timezone.is_naive(created):  # USE_TZ = False: the stores write UTC
        created = created.replace(tzinfo=datetime.timezone.utc)
    seconds = max(0, int((now - created).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _as_json(record: Record) -> dict[str, Any]:
    return {
        name: value.isoformat() if isinstance(value, datetime.datetime) else value
        for name, value in applicable_fields(record).items()
    }


class Command(BaseCommand):
    """Print the record of (scope, key), or list records by status, scope, task and age."""

    help = (
        "Print the dedup_celery record of a message (give SCOPE and KEY), or list records "
        "(give neither, or only SCOPE), from whichever backend holds them."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        """Add the optional scope and key, the key options and the listing's filters."""
        parser.add_argument(
            "scope", nargs="?", help="The records' scope (by default the task's dotted name)."
        )
        parser.add_argument("key", nargs="?", help="The message key (by default the task id).")
        add_key_options(parser)
        parser.add_argument(
            "--status", choices=[status.value for status in Status], help="List only this status."
        )
        parser.add_argument("--task", help="List only records of this task name.")
        parser.add_argument(
            "--older-than",
            type=duration,
            metavar="AGE",
            help="List only records created longer ago than this (90, 15m, 2h, 7d).",
        )
        parser.add_argument("--limit", type=int, default=50, help="List at most this many (50).")
        parser.add_argument("--json", action="store_true", help="Print JSON instead of text.")

    def handle(self, *args: Any, **options: Any) -> None:
        """Print one record, or the listing."""
        if options["key"] is not None:
            self._one(options)
            return
        if options["digest"] or options["replaced"]:
            raise CommandError("--digest and --replaced name one record: give SCOPE and KEY too.")
        if options["limit"] < 1:
            raise CommandError("--limit must be 1 or more.")
        wanted = RecordFilter(
            status=options["status"],
            scope=options["scope"],
            task_name=options["task"],
            older_than=options["older_than"],
            limit=options["limit"],
        )
        listing = get_backend().list_records(wanted)
        if options["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "records": [_as_json(r) for r in listing.records],
                        "complete": listing.complete,
                        "scanned": listing.scanned,
                    },
                    indent=2,
                    default=str,
                )
            )
            return
        self._table(listing, wanted)

    def _one(self, options: dict[str, Any]) -> None:
        record = read_record(options["scope"], key_digest_from(options))
        if options["json"]:
            self.stdout.write(json.dumps(_as_json(record), indent=2, default=str))
        else:
            self.stdout.write(format_record(record))

    def _table(self, listing: RecordListing, wanted: RecordFilter) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        self.stdout.write(
            f"{'STATUS':<10} {'TASK':<32} {'KEY':<24} {'SKIP':>5} {'RESCH':>5} "
            f"{'TAKE':>4} {'AGE':>5}  OWNER"
        )
        for r in listing.records:
            self.stdout.write(
                f"{r.status:<10} {display_key(r.task_name, 32):<32} {display_key(r.key, 24):<24} "
                f"{r.skipped:>5} {r.rescheduled:>5} {r.takeovers:>4} {_age(r, now):>5}  "
                f"{r.owner or '-'}"
            )
        self.stdout.write(f"{len(listing.records)} record(s) in the {get_backend().describe()}.")
        if listing.truncated:
            self.stdout.write(
                f"More may match: raise --limit (now {wanted.limit}), or narrow with "
                "--status, --task or --older-than."
            )
        if listing.scan_stopped:
            self.stdout.write(
                f"The scan stopped after {listing.scanned} keys: others under the prefix "
                "were not read. Narrow the listing, or purge expired records first."
            )
