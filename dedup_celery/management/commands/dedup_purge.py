"""``manage.py dedup_purge``: delete expired message records."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from dedup_celery.backends import get_backend
from dedup_celery.operator import purge_expired


class Command(BaseCommand):
    """Delete message records whose expiry has passed, in batches."""

    help = "Delete expired dedup_celery message records, in batches."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        """Add --batch-size and --dry-run."""
        parser.add_argument(
            "--batch-size", type=int, default=1000, help="Rows per DELETE (default 1000)."
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Count the expired records, delete nothing."
        )
        parser.add_argument(
            "--pause",
            type=float,
            default=0.02,
            help="Seconds to sleep between batches, so claims meanwhile stay fast (default 0.02).",
        )

    def handle(
        self, *args: Any, batch_size: int, dry_run: bool, pause: float, **options: Any
    ) -> None:
        """Purge and print the count."""
        if batch_size < 1:
            raise CommandError("--batch-size must be 1 or more.")
        if pause < 0:
            raise CommandError("--pause must be 0 or more.")
        count = purge_expired(batch_size=batch_size, dry_run=dry_run, pause=pause)
        verb = "would be deleted" if dry_run else "deleted"
        self.stdout.write(f"{count} expired record(s) {verb} from the {get_backend().describe()}.")
