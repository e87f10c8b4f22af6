"""Management commands of dedup_celery."""
