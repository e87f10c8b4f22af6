"""Add ``last_duplicate_task_id``: the record links to its latest duplicate's task id.

Additive, for rolling deploys: a nullable column with no default, so no table
rewrite on PostgreSQL or MySQL 8+/MariaDB 10.3+. Workers of the previous release
leave it as it is; they read only the columns they know.

On PostgreSQL, ``ADD COLUMN`` takes the table's ACCESS EXCLUSIVE lock for an
instant, but waits for it behind every open transaction on the table (a long
transactional task's), and every claim queues behind that wait. A lock timeout
bounds it: the migration fails after five seconds instead, and is run again.
"""

from typing import Any

from django.db import migrations, models

#: How long the migration may wait for the table lock on PostgreSQL.
LOCK_TIMEOUT = "5s"


class LockTimeoutOnPostgreSQL(migrations.RunSQL):
    """``SET LOCAL lock_timeout`` for the rest of the migration's transaction, on PostgreSQL."""

    def __init__(self, timeout: str) -> None:
        super().__init__(f"SET LOCAL lock_timeout = '{timeout}'", migrations.RunSQL.noop)

    def database_forwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)


class Migration(migrations.Migration):
    dependencies = [
        ("dedup_celery", "0005_forget_permission"),
    ]

    operations = [
        LockTimeoutOnPostgreSQL(LOCK_TIMEOUT),
        migrations.AddField(
            model_name="deduprecord",
            name="last_duplicate_task_id",
            field=models.CharField(
                blank=True,
                help_text="The task id of the latest duplicate counted on this record.",
                max_length=255,
                null=True,
                verbose_name="last duplicate task id",
            ),
        ),
    ]
