"""Add the QUEUED status to the choices of ``status`` (``dedup_on_enqueue = "queued"``).

Choices live in Python only: Django runs no SQL for this migration on any
database, so it needs no lock and no rewrite.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("dedup_celery", "0007_payload_mismatches"),
    ]

    operations = [
        migrations.AlterField(
            model_name="deduprecord",
            name="status",
            field=models.CharField(
                choices=[
                    ("processing", "processing"),
                    ("consumed", "consumed"),
                    ("failed", "failed"),
                    ("poisoned", "poisoned"),
                    ("queued", "queued"),
                ],
                max_length=16,
                verbose_name="status",
            ),
        ),
    ]
