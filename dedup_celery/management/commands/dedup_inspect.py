"""``manage.py dedup_inspect``: print one message record, from any backend."""

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from dedup_celery.management.commands._records import (
    add_record_arguments,
    key_digest_from,
    show_record,
)


class Command(BaseCommand):
    """Print the record of (scope, key)."""

    help = "Print the dedup_celery record of a message, from whichever backend holds it."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        """Add scope, key and --digest."""
        add_record_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        """Read the record and print it."""
        show_record(self, options["scope"], key_digest_from(options))
