"""Add ``payload_mismatches``: duplicates whose arguments differed from the record's.

Additive, for rolling deploys: a column with a constant database default (0),
so workers of the previous release, which insert rows without it, keep
working. It is a plain integer with no CHECK constraint, so PostgreSQL 11+
adds it without reading the table and MySQL 8+/MariaDB 10.3+ can add it in
place (a CHECK would be validated by a scan under the table's lock, or force a
table copy). The lock wait is bounded on PostgreSQL as in 0006.
"""

from django.db import migrations, models

from dedup_celery.migrations._operations import LockTimeoutOnPostgreSQL

#: How long the migration may wait for the table lock on PostgreSQL.
LOCK_TIMEOUT = "5s"


class Migration(migrations.Migration):
    dependencies = [
        ("dedup_celery", "0006_last_duplicate_task_id"),
    ]

    operations = [
        LockTimeoutOnPostgreSQL(LOCK_TIMEOUT),
        migrations.AddField(
            model_name="deduprecord",
            name="payload_mismatches",
            field=models.IntegerField(
                db_default=0,
                default=0,
                help_text="Duplicates whose arguments differed from this message's.",
                verbose_name="payload mismatches",
            ),
        ),
    ]
