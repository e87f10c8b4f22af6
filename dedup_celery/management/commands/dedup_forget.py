"""``manage.py dedup_forget``: forget a finished message so a delivery runs it again."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from dedup_celery.management.commands._records import (
    add_owner_argument,
    add_record_arguments,
    key_digest_from,
    owner_from,
    show_record,
)
from dedup_celery.operator import forget_record
from dedup_celery.states import FORGETTABLE


class Command(BaseCommand):
    """Delete a CONSUMED or FAILED record, after confirmation."""

    help = (
        "Forget a CONSUMED or FAILED dedup_celery record, so that the next delivery of its "
        "message runs the body again. Only if the owner is still the one printed (or given "
        "with --owner). Re-sends nothing."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        """Add scope, key, --digest, --replaced, --owner and --noinput."""
        add_record_arguments(parser)
        add_owner_argument(parser, "Forget only if this is still the owner token")
        parser.add_argument(
            "--noinput",
            "--no-input",
            action="store_false",
            dest="interactive",
            help="Do not ask for confirmation.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Show the record, ask, then compare-and-delete it."""
        scope, key_digest = options["scope"], key_digest_from(options)
        given_owner = owner_from(options)
        record = show_record(self, scope, key_digest)
        if record.status not in FORGETTABLE:
            raise CommandError(
                f"The record is {record.status}, not consumed or failed: not forgotten. "
                "An unfinished (processing or poisoned) record is released with dedup_release."
            )
        owner = given_owner or record.owner
        if owner is None:
            raise CommandError("The record has no owner token to compare against: not forgotten.")
        if options["interactive"]:
            answer = input(
                "Forget this record? The next delivery of its message will run the body "
                "again. Type 'yes' to continue: "
            )
            if answer.strip().lower() != "yes":
                raise CommandError("Not forgotten: not confirmed.")
        if not forget_record(scope, key_digest, owner):
            raise CommandError(
                "Not forgotten: its owner is not the one given with --owner."
                if given_owner and given_owner != record.owner
                else "Not forgotten: the record changed since it was read (its owner changed: "
                "a delivery claimed it again)."
            )
        self.stdout.write(
            "Forgotten. Nothing was re-sent: the next delivery of the message (a redelivery, "
            "or a message the producer sends again) runs the body."
        )
