"""``manage.py dedup_release``: release a PROCESSING record, on any backend."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from dedup_celery.management.commands._records import (
    add_owner_argument,
    add_record_arguments,
    key_digest_from,
    owner_from,
    show_record,
)
from dedup_celery.operator import release_record
from dedup_celery.states import RELEASABLE, may_release


class Command(BaseCommand):
    """Release a PROCESSING record so the message's next delivery runs the body."""

    help = (
        "Release a PROCESSING or POISONED dedup_celery record: only an expired lease unless "
        "--force, only if the owner is still the one printed (or given with --owner). "
        "Re-sends nothing."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        """Add scope, key, --digest, --owner and --force."""
        add_record_arguments(parser)
        add_owner_argument(parser, "Release only if this is still the owner token")
        parser.add_argument(
            "--force",
            action="store_true",
            help="Also release a live lease. Only when the owner process is known to be gone.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Compare-and-delete the record and say what happened."""
        scope, key_digest, force = options["scope"], key_digest_from(options), options["force"]
        given_owner = owner_from(options)
        record = show_record(self, scope, key_digest)
        if record.status not in RELEASABLE:
            raise CommandError(
                f"The record is {record.status}, not processing or poisoned: not released."
            )
        owner = given_owner or record.owner
        if owner is None:
            raise CommandError("The record has no owner token to compare against: not released.")
        if not release_record(scope, key_digest, owner, force=force):
            # The store decided; say why, as far as the record read before shows it.
            live = not may_release(record.status, lease_expired=record.lease_expired, force=force)
            reason = (
                "its lease is live (use --force only if the owner is gone)"
                if live
                else "its owner changed"
            )
            raise CommandError(f"Not released: {reason}.")
        self.stdout.write(
            "Released. Nothing was re-sent: the next delivery of the message runs the body."
        )
