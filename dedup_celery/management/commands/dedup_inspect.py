"""``manage.py dedup_inspect``: print one message record, from any backend."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from dedup_celery.backends import get_backend
from dedup_celery.management.commands._records import (
    add_record_arguments,
    format_record,
    key_digest_from,
)
from dedup_celery.operator import inspect_record


class Command(BaseCommand):
    """Print the record of (scope, key)."""

    help = "Print the dedup_celery record of a message, from whichever backend holds it."

    def add_arguments(self, parser: CommandParser) -> None:
        """Add scope, key and --digest."""
        add_record_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        """Read the record and print it."""
        record = inspect_record(options["scope"], key_digest_from(options))
        if record is None:
            raise CommandError(
                f"No record for that scope and key in the {get_backend().describe()}."
            )
        self.stdout.write(format_record(record))
