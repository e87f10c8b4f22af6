"""Add ``purge_after``: a purge keeps a record until then, whatever its status.

Additive, for rolling deploys: a nullable column (no table rewrite), then its
index, built with ``CREATE INDEX CONCURRENTLY`` on PostgreSQL so claims keep
writing meanwhile. Workers of the previous release write NULL there; a purge
treats NULL as before, except that it keeps an unfinished (PROCESSING) record
until RECORD_TTL past its lease.
"""

from typing import Any

from django.db import migrations, models


class AddIndexConcurrentlyOnPostgreSQL(migrations.AddIndex):
    """``AddIndex`` that does not lock the table for writes on PostgreSQL."""

    def _apply(self, app_label: str, schema_editor: Any, state: Any, action: str) -> None:
        model = state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        postgresql = schema_editor.connection.vendor == "postgresql"
        getattr(schema_editor, action)(
            model, self.index, **({"concurrently": True} if postgresql else {})
        )

    def database_forwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        self._apply(app_label, schema_editor, to_state, "add_index")

    def database_backwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        self._apply(app_label, schema_editor, from_state, "remove_index")


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    atomic = False

    dependencies = [
        ("dedup_celery", "0002_statuses_failed_poisoned"),
    ]

    operations = [
        migrations.AddField(
            model_name="deduprecord",
            name="purge_after",
            field=models.DateTimeField(
                blank=True,
                help_text="A purge keeps the record until then, whatever its status.",
                null=True,
                verbose_name="purge after",
            ),
        ),
        AddIndexConcurrentlyOnPostgreSQL(
            model_name="deduprecord",
            index=models.Index(fields=["purge_after"], name="dedup_celery_purge_idx"),
        ),
    ]
