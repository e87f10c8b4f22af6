"""Celery tasks shipped with dedup_celery (for ``beat``)."""

from celery import shared_task

from dedup_celery import operator


@shared_task(name="dedup_celery.purge_expired", ignore_result=True)
def purge_expired(batch_size: int = 1000, pause: float = 0.02) -> int:
    """Delete expired message records; schedule it with Celery beat, e.g. hourly."""
    return operator.purge_expired(batch_size=batch_size, pause=pause)
