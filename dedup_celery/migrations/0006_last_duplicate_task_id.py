"""Add ``last_duplicate_task_id``: the record links to its latest duplicate's task id.

Additive, for rolling deploys: a nullable column with no default, so no table
rewrite on PostgreSQL or MySQL 8+/MariaDB 10.3+. Workers of the previous release
leave it as it is; they read only the columns they know.

On PostgreSQL, ``ADD COLUMN`` takes the table's ACCESS EXCLUSIVE lock for an
instant, but waits for it behind every open transaction on the table (a long
transactional task's), and every claim queues behind that wait. A lock timeout
bounds it: the migration fails after five seconds instead, and is run again.
"""

from django.db import migrations, models

from dedup_celery.migrations._operations import LockTimeoutOnPostgreSQL

#: How long the migration may wait for the table lock on PostgreSQL.
LOCK_TIMEOUT = "5s"


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
