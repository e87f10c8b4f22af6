"""dedup_purge, the purge task for beat, and migrations being up to date."""

from __future__ import annotations

import io
import time
import uuid

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from dedup_celery import get_backend
from dedup_celery.backends.base import Claim
from dedup_celery.identity import current_identity
from dedup_celery.keys import digest
from dedup_celery.models import DedupRecord
from dedup_celery.tasks import purge_expired


def make(key, lease):
    get_backend().claim(
        Claim(
            scope="cmd",
            key=key,
            key_digest=digest(key),
            owner=uuid.uuid4().hex,
            task_id=key,
            task_name="cmd",
            attempt=0,
            identity=current_identity(),
            lease_seconds=lease,
            record_ttl=60,
        )
    )


@pytest.mark.django_db(transaction=True)
def test_dedup_purge_dry_run_then_purge_in_batches():
    make("live", 60)
    for i in range(3):
        make(f"old-{i}", 0.2)
    time.sleep(0.4)
    out = io.StringIO()
    call_command("dedup_purge", "--dry-run", stdout=out)
    assert out.getvalue().startswith("3 expired record(s) would be deleted")
    assert DedupRecord.objects.count() == 4
    out = io.StringIO()
    call_command("dedup_purge", "--batch-size", "2", stdout=out)
    assert out.getvalue().startswith("3 expired record(s) deleted")
    assert list(DedupRecord.objects.values_list("key", flat=True)) == ["live"]


@pytest.mark.django_db(transaction=True)
def test_dedup_purge_rejects_a_bad_batch_size():
    with pytest.raises(CommandError, match="--batch-size"):
        call_command("dedup_purge", "--batch-size", "0")


@pytest.mark.django_db(transaction=True)
def test_the_purge_task_for_beat():
    make("old", 0.2)
    time.sleep(0.4)
    assert purge_expired() == 1
    assert not DedupRecord.objects.exists()


@pytest.mark.django_db
def test_migrations_are_up_to_date():
    call_command("makemigrations", "dedup_celery", "--check", "--dry-run", verbosity=0)
