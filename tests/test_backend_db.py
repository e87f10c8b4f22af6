"""The backend contract, built from the status-mode transition table, for the db backend.

Parametrised over PostgreSQL and SQLite, each with the one-statement upsert and
with the portable insert-then-update path that MySQL uses.
"""

from __future__ import annotations

import datetime
import threading
import time
import uuid

import pytest
from django.db import connections, transaction

from dedup_celery.backends.base import Claim, Status, Verdict
from dedup_celery.backends.db import DatabaseBackend
from dedup_celery.exceptions import StorageError
from dedup_celery.identity import current_identity
from dedup_celery.keys import digest
from dedup_celery.models import DedupRecord

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "sqlite"])

VARIANTS = {
    "postgresql": ("default", False),
    "sqlite": ("sqlite", False),
    "portable-postgresql": ("default", True),
    "portable-sqlite": ("sqlite", True),
}


@pytest.fixture(params=list(VARIANTS))
def backend(request):
    alias, portable = VARIANTS[request.param]
    instance = DatabaseBackend(database=alias)
    instance._force_generic = portable
    instance.variant = request.param
    return instance


def make_claim(key="k-1", *, scope="scope-a", lease=60.0, ttl=3600.0, task_id=None, owner=None):
    return Claim(
        scope=scope,
        key=key,
        key_digest=digest(key),
        owner=owner or uuid.uuid4().hex,
        task_id=task_id or str(uuid.uuid4()),
        task_name="tests.task",
        attempt=0,
        identity=current_identity(),
        lease_seconds=lease,
        record_ttl=ttl,
    )


def db_now(backend):
    with connections[backend.alias].cursor() as cursor:
        if connections[backend.alias].vendor == "postgresql":
            cursor.execute("SELECT STATEMENT_TIMESTAMP()")
            return cursor.fetchone()[0]
    return datetime.datetime.now(datetime.timezone.utc)


def row(backend, claim):
    return DedupRecord.objects.using(backend.alias).get(
        scope=claim.scope, key_digest=claim.key_digest
    )


def test_claim_on_no_record_creates_processing_with_lease(backend):
    claim = make_claim(lease=60)
    before = db_now(backend)
    outcome = backend.claim(claim)
    assert outcome.verdict is Verdict.CLAIMED
    record = outcome.record
    assert record.owner == claim.owner
    assert record.status == Status.PROCESSING
    assert record.task_id == claim.task_id
    assert (record.skipped, record.rescheduled, record.takeovers) == (0, 0, 0)
    lease = (record.expires_at - before).total_seconds()
    assert 59 <= lease <= 62
    stored = row(backend, claim)
    assert stored.hostname == current_identity().hostname
    assert stored.pid == current_identity().pid


def test_claim_of_live_processing_record_counts_a_rescheduled_duplicate(backend):
    first = make_claim()
    backend.claim(first)
    second = make_claim(task_id=first.task_id)
    outcome = backend.claim(second)
    assert outcome.verdict is Verdict.IN_FLIGHT
    assert outcome.record.owner == first.owner
    assert outcome.record.rescheduled == 1
    assert outcome.record.skipped == 0
    assert row(backend, first).last_duplicate_at is not None
    assert backend.claim(make_claim()).record.rescheduled == 2


def test_complete_by_owner_marks_consumed_and_stores_result(backend):
    claim = make_claim(ttl=3600)
    backend.claim(claim)
    before = db_now(backend)
    assert backend.complete(claim, {"value": [1, "two"]}) is True
    stored = row(backend, claim)
    assert stored.status == Status.CONSUMED
    assert stored.result == {"value": [1, "two"]}
    assert stored.consumed_at is not None
    assert 3590 <= (stored.expires_at - before).total_seconds() <= 3610


def test_claim_of_consumed_record_counts_a_skipped_duplicate(backend):
    claim = make_claim()
    backend.claim(claim)
    backend.complete(claim, None)
    outcome = backend.claim(make_claim(task_id=claim.task_id))
    assert outcome.verdict is Verdict.CONSUMED
    assert outcome.record.task_id == claim.task_id
    assert (outcome.record.skipped, outcome.record.rescheduled) == (1, 0)


def test_complete_and_release_by_a_stale_owner_change_nothing(backend):
    claim = make_claim()
    backend.claim(claim)
    stale = make_claim(owner=uuid.uuid4().hex)
    assert backend.complete(stale, {"value": 1}) is False
    assert backend.release(claim.scope, claim.key_digest, stale.owner, expired_only=False) is False
    stored = row(backend, claim)
    assert stored.status == Status.PROCESSING
    assert stored.owner.hex == claim.owner
    assert stored.result is None


def test_release_by_owner_deletes_the_processing_record(backend):
    claim = make_claim()
    backend.claim(claim)
    assert backend.release(claim.scope, claim.key_digest, claim.owner, expired_only=False)
    assert backend.get(claim.scope, claim.key_digest) is None
    assert backend.claim(make_claim()).verdict is Verdict.CLAIMED


def test_release_never_deletes_a_consumed_record(backend):
    claim = make_claim()
    backend.claim(claim)
    backend.complete(claim, None)
    assert not backend.release(claim.scope, claim.key_digest, claim.owner, expired_only=False)
    assert row(backend, claim).status == Status.CONSUMED


def test_expired_only_release_spares_a_live_lease(backend):
    claim = make_claim(lease=0.5)
    backend.claim(claim)
    assert not backend.release(claim.scope, claim.key_digest, claim.owner, expired_only=True)
    time.sleep(0.7)
    assert backend.release(claim.scope, claim.key_digest, claim.owner, expired_only=True)


def test_expired_lease_is_taken_over_and_the_old_owner_loses_it(backend):
    old = make_claim(lease=0.3)
    backend.claim(old)
    time.sleep(0.5)
    new = make_claim(lease=60)
    outcome = backend.claim(new)
    assert outcome.verdict is Verdict.TAKEN_OVER
    assert outcome.record.owner == new.owner
    assert outcome.record.takeovers == 1
    assert outcome.record.rescheduled == 0
    assert backend.complete(old, {"value": "late"}) is False
    assert row(backend, new).owner.hex == new.owner
    assert backend.complete(new, None) is True


def test_late_complete_after_the_lease_with_no_takeover_succeeds(backend):
    claim = make_claim(lease=0.3)
    backend.claim(claim)
    time.sleep(0.5)
    assert backend.complete(claim, None) is True
    assert row(backend, claim).status == Status.CONSUMED


def test_late_complete_recreates_a_purged_record(backend):
    claim = make_claim(lease=0.2)
    backend.claim(claim)
    time.sleep(0.4)
    assert backend.purge_expired() == 1
    assert backend.complete(claim, {"value": 3}) is True
    stored = row(backend, claim)
    assert (stored.status, stored.owner.hex, stored.result) == (
        Status.CONSUMED,
        claim.owner,
        {"value": 3},
    )
    assert backend.claim(make_claim()).verdict is Verdict.CONSUMED


def test_consumed_record_past_record_ttl_is_claimable_again(backend):
    claim = make_claim(ttl=0.3)
    backend.claim(claim)
    backend.complete(claim, None)
    assert backend.claim(make_claim()).verdict is Verdict.CONSUMED
    time.sleep(0.5)
    outcome = backend.claim(make_claim())
    assert outcome.verdict is Verdict.TAKEN_OVER
    assert outcome.record.status == Status.PROCESSING


def test_a_retried_claim_with_the_same_owner_is_still_its_own(backend):
    claim = make_claim()
    backend.claim(claim)
    outcome = backend.claim(claim)
    assert outcome.verdict is Verdict.CLAIMED
    assert outcome.record.rescheduled == 0


def test_same_key_in_another_scope_and_near_keys_are_independent(backend):
    keys = ["Order-1", "order-1", "order-1 ", "order-1\x00", "order-1" + "x" * 10_000, "ö\u200b"]
    for key in keys:
        assert backend.claim(make_claim(key)).verdict is Verdict.CLAIMED
    assert backend.claim(make_claim("order-1", scope="scope-b")).verdict is Verdict.CLAIMED
    assert DedupRecord.objects.using(backend.alias).count() == len(keys) + 1
    long_record = row(backend, make_claim("order-1" + "x" * 10_000))
    assert len(long_record.key) == 255
    assert row(backend, make_claim("order-1\x00")).key == "order-1\\x00"


def test_purge_deletes_only_expired_records_in_batches(backend):
    live = make_claim("live", lease=60)
    backend.claim(live)
    for i in range(5):
        backend.claim(make_claim(f"old-{i}", lease=0.2))
    time.sleep(0.4)
    assert backend.purge_expired(dry_run=True) == 5
    assert DedupRecord.objects.using(backend.alias).count() == 6
    assert backend.purge_expired(batch_size=2) == 5
    assert list(DedupRecord.objects.using(backend.alias).values_list("key", flat=True)) == ["live"]


def test_get_reports_the_lease_state_from_the_database_clock(backend):
    claim = make_claim(lease=0.3)
    backend.claim(claim)
    assert backend.get(claim.scope, claim.key_digest).lease_expired is False
    time.sleep(0.5)
    assert backend.get(claim.scope, claim.key_digest).lease_expired is True


def test_claim_race_among_threads_has_exactly_one_winner(backend):
    threads = 16
    barrier = threading.Barrier(threads)
    verdicts: list[Verdict] = []
    errors: list[BaseException] = []

    def contender():
        try:
            barrier.wait()
            verdicts.append(backend.claim(make_claim("race")).verdict)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    workers = [threading.Thread(target=contender) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert errors == []
    assert verdicts.count(Verdict.CLAIMED) == 1
    assert verdicts.count(Verdict.IN_FLIGHT) == threads - 1
    assert row(backend, make_claim("race")).rescheduled == threads - 1


def test_transactional_claim_commits_with_the_transaction(backend):
    claim = make_claim()
    with transaction.atomic(using=backend.alias):
        outcome = backend.claim_in_transaction(claim)
        assert outcome.verdict is Verdict.CLAIMED
        assert outcome.record.status == Status.CONSUMED
        backend.store_result(claim, {"value": 7})
    assert row(backend, claim).result == {"value": 7}
    duplicate = make_claim()
    with transaction.atomic(using=backend.alias):
        outcome = backend.claim_in_transaction(duplicate)
    assert outcome.verdict is Verdict.CONSUMED
    assert row(backend, claim).skipped == 1


def test_transactional_claim_leaves_nothing_when_rolled_back(backend):
    claim = make_claim()

    def failing_body():
        with transaction.atomic(using=backend.alias):
            backend.claim_in_transaction(claim)
            raise RuntimeError("the body failed")

    with pytest.raises(RuntimeError):
        failing_body()
    assert backend.get(claim.scope, claim.key_digest) is None
    with transaction.atomic(using=backend.alias):
        assert backend.claim_in_transaction(make_claim()).verdict is Verdict.CLAIMED


def test_transactional_claim_meets_an_uncommitted_copy(backend):
    """PostgreSQL answers IN_FLIGHT at once; SQLite fails on its writer lock; MySQL-style waits."""
    holding = threading.Event()
    finish = threading.Event()

    def first_copy():
        try:
            with transaction.atomic(using=backend.alias):
                backend.claim_in_transaction(make_claim("in-flight"))
                holding.set()
                finish.wait(30)
        finally:
            connections.close_all()

    thread = threading.Thread(target=first_copy)
    thread.start()
    try:
        assert holding.wait(10)
        started = time.monotonic()
        if backend.variant == "postgresql":
            with transaction.atomic(using=backend.alias):
                outcome = backend.claim_in_transaction(make_claim("in-flight"))
            assert outcome.verdict is Verdict.IN_FLIGHT
            assert outcome.record is None
            assert time.monotonic() - started < 1
        elif backend.variant == "portable-postgresql":
            timer = threading.Timer(1.0, finish.set)
            timer.start()
            with transaction.atomic(using=backend.alias):
                outcome = backend.claim_in_transaction(make_claim("in-flight"))
            assert outcome.verdict is Verdict.CONSUMED
            assert time.monotonic() - started >= 0.9
        else:
            with (
                pytest.raises(StorageError, match="locked"),
                transaction.atomic(using=backend.alias),
            ):
                backend.claim_in_transaction(make_claim("in-flight"))
    finally:
        finish.set()
        thread.join()
