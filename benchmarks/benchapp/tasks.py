"""The same small task four ways: plain Celery, and DedupTask in each mode."""

from celery import shared_task
from django.db.models.functions import Now

from benchmarks.benchapp.models import Row
from dedup_celery import DedupTask


def write_row(variant, run, n):
    Row.objects.create(variant=variant, run=run, n=n, at=Now())


# The plain task has the delivery settings DedupTask turns on, so the comparison
# measures dedup, not acks_late.
@shared_task(acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def plain_row(variant, run, n):
    write_row(variant, run, n)


@shared_task(base=DedupTask, ignore_result=True)
def status_row(variant, run, n):
    write_row(variant, run, n)


@shared_task(base=DedupTask, ignore_result=True, dedup_transactional=True)
def tx_row(variant, run, n):
    write_row(variant, run, n)
