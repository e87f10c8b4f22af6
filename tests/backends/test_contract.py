"""The backend contract, built from the status-mode transition table, run on every backend.

Variants: the database backend on PostgreSQL and on SQLite, each with its
one-statement upsert and with the portable insert-then-update path that MySQL
uses, and the Redis backend on a real redis-server. Only the public backend API
is used, so every variant answers to the same assertions.
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing
import pickle
import threading
import time

import pytest
from django.db import connections

from dedup_celery.backends.base import (
    RECORD_FIELDS,
    ClaimOutcome,
    OwnerIdentity,
    Status,
    Verdict,
)
from dedup_celery.backends.redis import RedisBackend
from dedup_celery.identity import current_identity
from dedup_celery.keys import digest, storable
from tests.helpers import make_claim

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "sqlite", "mysql"])

SCOPE = "scope-a"


def store_now(backend):
    """The store's own clock (SQLite's clock is this machine's)."""
    if isinstance(backend, RedisBackend):
        seconds, micros = backend.client.time()
        return datetime.datetime.fromtimestamp(seconds + micros / 1e6, tz=datetime.timezone.utc)
    connection = connections[backend.alias]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT STATEMENT_TIMESTAMP()")
            return cursor.fetchone()[0]
    return datetime.datetime.now(datetime.timezone.utc)


def get(backend, key, scope=SCOPE):
    return backend.get(scope, digest(key))


def keep_until_purged(backend, key, scope=SCOPE):
    """On Redis, drop the key's own TTL, so only a purge can delete the record."""
    if isinstance(backend, RedisBackend):
        backend.client.persist(backend.redis_key(scope, digest(key)))


def test_claim_on_no_record_creates_processing_with_a_lease_from_the_store_clock(backend):
    claim = make_claim(lease=60)
    before = store_now(backend)
    outcome = backend.claim(claim)
    assert outcome.verdict is Verdict.CLAIMED
    record = outcome.record
    assert (record.owner, record.status, record.task_id) == (
        claim.owner,
        Status.PROCESSING,
        claim.task_id,
    )
    assert (record.skipped, record.rescheduled, record.takeovers) == (0, 0, 0)
    assert 59 <= (record.expires_at - before).total_seconds() <= 62
    stored = get(backend, "k-1")
    assert (stored.hostname, stored.pid, stored.boot_id) == (
        current_identity().hostname,
        current_identity().pid,
        current_identity().boot_id,
    )
    assert stored.process_start == current_identity().process_start
    assert stored.lease_expired is False


def test_a_first_claims_record_is_the_stored_record_field_for_field(backend):
    # A first claim builds its record from the claim instead of reading it back;
    # every field must be what the store holds (times to the store's precision).
    claim = make_claim("k-first", lease=60, ttl=3600)
    returned = backend.claim(claim).record
    stored = get(backend, "k-first")
    # PostgreSQL keeps microseconds and returns them exactly; SQLite and Redis, milliseconds.
    exact = not isinstance(backend, RedisBackend) and connections[backend.alias].vendor in (
        "postgresql",
        "mysql",
    )
    precision = datetime.timedelta(0 if exact else 0.001)
    for name in RECORD_FIELDS:
        mine, theirs = getattr(returned, name), getattr(stored, name)
        if isinstance(theirs, datetime.datetime):
            assert abs(mine - theirs) <= precision, name
        else:
            assert mine == theirs, name
    assert returned.lease_expired is not True


def test_a_first_claims_outcome_behaves_as_the_eager_outcome(backend):
    # The first claim's record is built when read; the outcome must still
    # compare, hash, pickle and replace as the plain ClaimOutcome it stands for.
    outcome = backend.claim(make_claim("k-lazy"))
    eager = ClaimOutcome(outcome.verdict, outcome.record, outcome.poisoned_now)
    assert outcome == eager
    assert eager == outcome
    assert hash(outcome) == hash(eager)
    assert outcome != ClaimOutcome(Verdict.CONSUMED, outcome.record)
    copied = pickle.loads(pickle.dumps(outcome))
    assert type(copied) is ClaimOutcome
    assert copied == eager
    replaced = dataclasses.replace(outcome, poisoned_now=True)
    assert type(replaced) is ClaimOutcome
    assert (replaced.verdict, replaced.record, replaced.poisoned_now) == (
        Verdict.CLAIMED,
        outcome.record,
        True,
    )


def test_claim_of_a_live_processing_record_counts_a_rescheduled_duplicate(backend):
    first = make_claim()
    backend.claim(first)
    outcome = backend.claim(make_claim(task_id=first.task_id))
    assert outcome.verdict is Verdict.IN_FLIGHT
    assert outcome.record.owner == first.owner
    assert (outcome.record.rescheduled, outcome.record.skipped) == (1, 0)
    assert outcome.record.last_duplicate_at is not None
    assert outcome.record.last_duplicate_task_id == first.task_id
    other = make_claim()
    counted = backend.claim(other).record
    assert (counted.rescheduled, counted.last_duplicate_task_id) == (2, other.task_id)
    # The record still names its owner's task id: it links to both runs.
    assert counted.task_id == first.task_id


def test_complete_by_the_owner_marks_consumed_and_stores_the_result(backend):
    claim = make_claim(ttl=3600)
    backend.claim(claim)
    before = store_now(backend)
    assert backend.complete(claim, {"value": [1, "two"]}) is True
    stored = get(backend, "k-1")
    assert stored.status == Status.CONSUMED
    assert stored.result == {"value": [1, "two"]}
    assert stored.consumed_at is not None
    assert 3590 <= (stored.expires_at - before).total_seconds() <= 3610


def test_claim_of_a_consumed_record_counts_a_skipped_duplicate(backend):
    claim = make_claim()
    backend.claim(claim)
    backend.complete(claim, None)
    outcome = backend.claim(make_claim(task_id=claim.task_id))
    assert outcome.verdict is Verdict.CONSUMED
    assert outcome.record.task_id == claim.task_id
    assert (outcome.record.skipped, outcome.record.rescheduled) == (1, 0)
    assert get(backend, "k-1").last_duplicate_task_id == claim.task_id
    business_key_copy = make_claim()
    assert backend.claim(business_key_copy).record.last_duplicate_task_id == (
        business_key_copy.task_id
    )


def test_a_first_claim_names_no_duplicate_and_a_later_claim_keeps_the_last_one(backend):
    claim = make_claim(lease=60)
    assert backend.claim(claim).record.last_duplicate_task_id is None
    copy = make_claim()
    backend.claim(copy)
    assert backend.fail(claim) is True
    # The retry claims the FAILED record, like the counters, it keeps the last duplicate.
    retry = make_claim(task_id=claim.task_id, attempt=1)
    outcome = backend.claim(retry)
    assert outcome.verdict is Verdict.CLAIMED
    assert (outcome.record.rescheduled, outcome.record.last_duplicate_task_id) == (
        1,
        copy.task_id,
    )


def test_complete_and_release_by_a_stale_owner_change_nothing(backend):
    claim = make_claim()
    backend.claim(claim)
    stale = make_claim()
    assert backend.complete(stale, {"value": 1}) is False
    assert backend.release(SCOPE, claim.key_digest, stale.owner, expired_only=False) is False
    stored = get(backend, "k-1")
    assert (stored.status, stored.owner, stored.result) == (Status.PROCESSING, claim.owner, None)


def test_release_by_the_owner_deletes_the_processing_record(backend):
    claim = make_claim()
    backend.claim(claim)
    assert backend.release(SCOPE, claim.key_digest, claim.owner, expired_only=False)
    assert get(backend, "k-1") is None
    assert backend.claim(make_claim()).verdict is Verdict.CLAIMED


def test_release_never_deletes_a_consumed_record(backend):
    claim = make_claim()
    backend.claim(claim)
    backend.complete(claim, None)
    assert not backend.release(SCOPE, claim.key_digest, claim.owner, expired_only=False)
    assert get(backend, "k-1").status == Status.CONSUMED


def test_forget_by_the_owner_deletes_a_consumed_or_failed_record(backend):
    # An operator forgets a finished message so that a delivery runs it again.
    done = make_claim("k-done")
    backend.claim(done)
    backend.complete(done, {"n": 1})
    assert backend.forget(SCOPE, done.key_digest, done.owner)
    assert get(backend, "k-done") is None
    assert backend.claim(make_claim("k-done")).verdict is Verdict.CLAIMED
    failed = make_claim("k-failed")
    backend.claim(failed)
    assert backend.fail(failed)
    assert backend.forget(SCOPE, failed.key_digest, failed.owner)
    assert get(backend, "k-failed") is None


def test_forget_spares_an_unfinished_record_and_another_owner_s(backend):
    running = make_claim("k-running")
    backend.claim(running)
    assert not backend.forget(SCOPE, running.key_digest, running.owner)
    assert get(backend, "k-running").status == Status.PROCESSING
    done = make_claim("k-done")
    backend.claim(done)
    backend.complete(done, None)
    assert not backend.forget(SCOPE, done.key_digest, make_claim("k-done").owner)
    assert get(backend, "k-done").status == Status.CONSUMED
    assert not backend.forget(SCOPE, digest("k-none"), done.owner)


def test_an_expired_only_release_spares_a_live_lease(backend):
    claim = make_claim(lease=0.5)
    backend.claim(claim)
    assert not backend.release(SCOPE, claim.key_digest, claim.owner, expired_only=True)
    time.sleep(0.7)
    assert backend.release(SCOPE, claim.key_digest, claim.owner, expired_only=True)


def test_an_expired_lease_is_taken_over_and_the_old_owner_loses_it(backend):
    old = make_claim(lease=0.3)
    backend.claim(old)
    time.sleep(0.5)
    assert get(backend, "k-1").lease_expired is True
    new = make_claim(lease=60)
    outcome = backend.claim(new)
    assert outcome.verdict is Verdict.TAKEN_OVER
    assert (outcome.record.owner, outcome.record.takeovers) == (new.owner, 1)
    assert outcome.record.rescheduled == 0
    assert backend.complete(old, {"value": "late"}) is False
    assert not backend.release(SCOPE, old.key_digest, old.owner, expired_only=False)
    assert get(backend, "k-1").owner == new.owner
    assert backend.complete(new, None) is True


def test_a_late_complete_after_the_lease_with_no_takeover_succeeds(backend):
    claim = make_claim(lease=0.3)
    backend.claim(claim)
    time.sleep(0.5)
    assert backend.complete(claim, None) is True
    assert get(backend, "k-1").status == Status.CONSUMED


def test_a_late_complete_recreates_a_purged_record(backend):
    claim = make_claim(lease=0.2, ttl=0.1, payload_digest="d" * 64)
    backend.claim(claim)
    time.sleep(0.5)
    # Purged (on Redis the key's own TTL, lease + RECORD_TTL, may be first).
    assert backend.purge_expired() == (0 if isinstance(backend, RedisBackend) else 1)
    assert get(backend, "k-1") is None
    assert backend.complete(claim, {"value": 3}) is True
    stored = get(backend, "k-1")
    assert (stored.status, stored.owner, stored.result, stored.payload_digest) == (
        Status.CONSUMED,
        claim.owner,
        {"value": 3},
        "d" * 64,
    )
    assert backend.claim(make_claim()).verdict is Verdict.CONSUMED


def test_a_consumed_record_blocks_duplicates_until_record_ttl(backend):
    claim = make_claim(ttl=0.4)
    backend.claim(claim)
    backend.complete(claim, None)
    assert backend.claim(make_claim()).verdict is Verdict.CONSUMED
    time.sleep(0.6)
    outcome = backend.claim(make_claim())
    assert outcome.verdict.claimed
    assert outcome.record.status == Status.PROCESSING


def test_a_retried_claim_with_the_same_owner_is_still_its_own(backend):
    claim = make_claim()
    backend.claim(claim)
    outcome = backend.claim(claim)
    assert outcome.verdict is Verdict.CLAIMED
    assert outcome.record.rescheduled == 0


def test_scopes_and_keys_that_differ_only_slightly_are_independent(backend):
    keys = ["Order-1", "order-1", "order-1 ", "order-1\x00", "order-1" + "x" * 10_000, "ö\u200b"]
    for key in keys:
        assert backend.claim(make_claim(key)).verdict is Verdict.CLAIMED
    assert backend.claim(make_claim("order-1", scope="scope-b")).verdict is Verdict.CLAIMED
    assert backend.claim(make_claim("order-1", scope="Scope-a")).verdict is Verdict.CLAIMED
    for key in keys:
        assert get(backend, key).key_digest == digest(key)
    assert len(get(backend, "order-1" + "x" * 10_000).key) == 255
    assert get(backend, "order-1\x00").key == "order-1\\x00"


def test_purge_deletes_only_expired_records(backend):
    backend.claim(make_claim("live", lease=60))
    done = make_claim("consumed-live", lease=60)
    backend.claim(done)
    backend.complete(done, None)
    for i in range(5):
        backend.claim(make_claim(f"old-{i}", lease=0.2, ttl=0.1))
        keep_until_purged(backend, f"old-{i}")
    # Its lease ends too, but a later delivery still needs its takeovers count.
    backend.claim(make_claim("unfinished", lease=0.2, ttl=3600))
    time.sleep(0.5)
    assert backend.purge_expired(dry_run=True) == 5
    assert get(backend, "old-0") is not None
    assert backend.purge_expired(batch_size=2) == 5
    assert [get(backend, f"old-{i}") for i in range(5)] == [None] * 5
    assert get(backend, "live") is not None
    assert get(backend, "consumed-live") is not None
    assert get(backend, "unfinished") is not None
    assert backend.purge_expired() == 0


def test_a_purge_between_a_crash_and_the_redelivery_keeps_the_takeovers_count(backend):
    # Each delivery dies holding the message (its lease runs out); an hourly
    # purge lands in each gap. The count must still reach MAX_TAKEOVERS.
    cap = 2
    for attempt in range(cap + 1):
        outcome = backend.claim(make_claim(lease=0.2, ttl=3600, cap=cap))
        assert outcome.verdict is (Verdict.TAKEN_OVER if attempt else Verdict.CLAIMED)
        assert outcome.record.takeovers == attempt
        assert outcome.record.purge_after > outcome.record.expires_at
        time.sleep(0.4)
        assert backend.purge_expired() == 0
        assert get(backend, "k-1").takeovers == attempt
    outcome = backend.claim(make_claim(lease=0.2, ttl=3600, cap=cap))
    assert outcome.verdict is Verdict.POISONED
    assert get(backend, "k-1").status == Status.POISONED


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
    assert get(backend, "race").rescheduled == threads - 1


def _claim_in_child(backend, start, results):
    connections.close_all()  # never share the parent's socket
    start.wait(30)
    try:
        results.put(backend.claim(make_claim("race")).verdict.value)
    except BaseException as exc:
        results.put(repr(exc))
    finally:
        connections.close_all()


def test_claim_race_among_processes_has_exactly_one_winner(backend):
    processes = 8
    context = multiprocessing.get_context("fork")
    start = context.Event()
    results = context.Queue()
    connections.close_all()
    children = [
        context.Process(target=_claim_in_child, args=(backend, start, results))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    start.set()
    verdicts = sorted(results.get(timeout=60) for _ in children)
    for child in children:
        child.join(30)
    assert verdicts == ["claimed"] + ["in_flight"] * (processes - 1)
    assert get(backend, "race").rescheduled == processes - 1


def test_a_failed_body_leaves_a_record_that_skips_only_stale_copies(backend):
    first = make_claim(task_id="tid-1", attempt=0)
    backend.claim(first)
    assert backend.fail(first) is True
    stored = get(backend, "k-1")
    assert (stored.status, stored.attempt, stored.task_id) == (Status.FAILED, 0, "tid-1")
    stale = backend.claim(make_claim(task_id="tid-1", attempt=0))
    assert stale.verdict is Verdict.STALE
    assert stale.record.skipped == 1
    retry = make_claim(task_id="tid-1", attempt=1)
    outcome = backend.claim(retry)
    assert outcome.verdict is Verdict.CLAIMED
    assert (outcome.record.attempt, outcome.record.takeovers) == (1, 0)
    backend.fail(retry)
    assert backend.claim(make_claim(task_id="tid-2")).verdict is Verdict.CLAIMED


def test_task_ids_no_column_holds_keep_their_identity_in_stored_form(backend):
    # Delivery writes every task id in its stored form; two long ids that share
    # their first 300 characters are still two messages.
    first, second = (storable("t" * 300 + end) for end in "ab")
    claim = make_claim(task_id=first, task_name=storable("n" * 300))
    assert backend.claim(claim).verdict is Verdict.CLAIMED
    assert backend.fail(claim) is True
    assert get(backend, "k-1").task_id == first
    assert backend.claim(make_claim(task_id=first)).verdict is Verdict.STALE
    for n, odd in enumerate((second, storable("nul\x00"), storable("surrogate\ud800"))):
        key = f"k-odd-{n}"
        retry = make_claim(key, task_id=odd)
        assert backend.claim(retry).verdict is Verdict.CLAIMED
        assert backend.complete(retry, None) is True
        assert get(backend, key).task_id == odd
        assert backend.claim(make_claim(key, task_id=odd)).verdict is Verdict.CONSUMED
    assert backend.claim(make_claim(task_id=second)).verdict is Verdict.CLAIMED


def test_fail_renew_and_expire_by_a_stale_owner_change_nothing(backend):
    claim = make_claim(lease=60)
    backend.claim(claim)
    stale = make_claim()
    assert backend.fail(stale) is False
    assert backend.renew(stale) is False
    assert backend.expire_lease(SCOPE, claim.key_digest, stale.owner) is False
    stored = get(backend, "k-1")
    assert (stored.status, stored.owner, stored.lease_expired) == (
        Status.PROCESSING,
        claim.owner,
        False,
    )


def test_renew_extends_the_lease_of_its_owner_only_while_processing(backend):
    claim = make_claim(lease=0.5)
    backend.claim(claim)
    for _ in range(3):
        time.sleep(0.3)
        assert backend.renew(claim) is True
    stored = get(backend, "k-1")
    assert stored.lease_expired is False
    assert stored.heartbeat_at is not None
    assert backend.claim(make_claim()).verdict is Verdict.IN_FLIGHT
    backend.complete(claim, None)
    assert backend.renew(claim) is False


def test_expire_lease_ends_a_gone_owners_lease_so_the_next_claim_takes_over(backend):
    dead = make_claim(lease=600)
    backend.claim(dead)
    assert backend.expire_lease(SCOPE, dead.key_digest, dead.owner) is True
    assert get(backend, "k-1").lease_expired is True
    outcome = backend.claim(make_claim())
    assert outcome.verdict is Verdict.TAKEN_OVER
    assert outcome.record.takeovers == 1


def test_expire_lease_of_process_needs_the_task_id_and_the_whole_identity(backend):
    child = OwnerIdentity(
        hostname="host-a",
        pid=4242,
        process_start=777,
        boot_id=current_identity().boot_id,
        pid_namespace="pid:[1]",
    )
    claim = make_claim(lease=600, task_id="tid-9", identity=child)
    backend.claim(claim)
    wrong = [
        ("tid-8", child),
        ("tid-9", dataclasses.replace(child, pid=4243)),
        ("tid-9", dataclasses.replace(child, process_start=778)),
        ("tid-9", dataclasses.replace(child, boot_id="another-boot")),
        ("tid-9", dataclasses.replace(child, pid_namespace="pid:[2]")),
    ]
    for task_id, identity in wrong:
        assert not backend.expire_lease_of_process(SCOPE, claim.key_digest, task_id, identity)
    assert get(backend, "k-1").lease_expired is False
    assert backend.expire_lease_of_process(SCOPE, claim.key_digest, "tid-9", child)
    assert get(backend, "k-1").lease_expired is True


def test_takeovers_stop_at_the_cap_and_the_record_is_poisoned(backend):
    owner_claim = make_claim(lease=0.15, cap=2)
    backend.claim(owner_claim)
    for takeovers in (1, 2):
        time.sleep(0.3)
        outcome = backend.claim(make_claim(lease=0.15, cap=2))
        assert (outcome.verdict, outcome.record.takeovers) == (Verdict.TAKEN_OVER, takeovers)
    time.sleep(0.3)
    poisoned = backend.claim(make_claim(lease=0.15, cap=2))
    assert poisoned.verdict is Verdict.POISONED
    assert poisoned.poisoned_now is True
    assert poisoned.record.status == Status.POISONED
    again = backend.claim(make_claim(lease=0.15, cap=2))
    assert (again.verdict, again.poisoned_now, again.record.skipped) == (Verdict.POISONED, False, 1)
    assert get(backend, "k-1").lease_expired is False  # poisoned until RECORD_TTL
    assert backend.release(SCOPE, again.record.key_digest, again.record.owner, expired_only=True)
    assert backend.claim(make_claim()).verdict is Verdict.CLAIMED


def test_a_poisoned_record_past_record_ttl_is_claimable_again(backend):
    backend.claim(make_claim(lease=0.1, ttl=0.3, cap=1))
    time.sleep(0.2)
    backend.claim(make_claim(lease=0.1, ttl=0.3, cap=1))
    time.sleep(0.2)
    assert backend.claim(make_claim(lease=0.1, ttl=0.3, cap=1)).verdict is Verdict.POISONED
    time.sleep(0.5)
    outcome = backend.claim(make_claim())
    assert (outcome.verdict, outcome.record.takeovers) == (Verdict.CLAIMED, 0)


def test_the_longest_lease_and_record_ttl_a_check_allows_are_stored_and_read_back(backend):
    # PROCESSING_TIMEOUT and RECORD_TTL may each be 100 years; a claim keeps its
    # record for both together, which every store (and Python's datetime) holds.
    from dedup_celery.conf import MAX_SECONDS

    claim = make_claim(lease=MAX_SECONDS, ttl=MAX_SECONDS)
    outcome = backend.claim(claim)
    assert outcome.verdict is Verdict.CLAIMED
    now = store_now(backend)
    years = (outcome.record.expires_at - now).days / 365.25
    assert 99.9 < years < 100.1
    assert backend.complete(claim, {"value": 1}) is True
    assert get(backend, "k-1").status == Status.CONSUMED
    assert backend.claim(make_claim()).verdict is Verdict.CONSUMED


def test_a_renewal_keeps_the_record_record_ttl_past_the_renewed_lease(backend):
    # A heartbeat renews the lease; if the owner then dies, the record (and its
    # takeovers count) must outlive the renewed lease by RECORD_TTL, as after a
    # claim, not vanish with the claim's own retention.
    claim = make_claim(lease=1.0, ttl=1.0)
    started = time.monotonic()
    backend.claim(claim)
    time.sleep(0.8)
    assert backend.renew(claim) is True
    time.sleep(max(0.0, 2.3 - (time.monotonic() - started)))  # the claim's retention has passed
    assert backend.purge_expired() == 0
    stored = get(backend, "k-1")
    assert stored is not None, "the record went before RECORD_TTL past the renewed lease"
    assert stored.status == Status.PROCESSING
    assert backend.claim(make_claim(lease=1.0, ttl=1.0)).verdict is Verdict.TAKEN_OVER


def test_every_duplicate_is_counted_as_what_its_claim_was_told(backend):
    # Copies race the owner's complete: each copy's verdict (rescheduled while
    # in flight, skipped once consumed) must match the counter it left, also on
    # the portable path, where the count and the read-back are two statements.
    verdicts: list[Verdict] = []
    errors: list[Exception] = []

    def copy(barrier, key):
        barrier.wait()
        try:
            verdicts.append(backend.claim(make_claim(key)).verdict)
        except Exception as exc:  # e.g. an InnoDB deadlock the claim did not retry
            errors.append(exc)
        finally:
            connections.close_all()

    def complete(barrier, owner):
        barrier.wait()
        backend.complete(owner, None)
        connections.close_all()

    for round_ in range(4):
        key = f"race-{round_}"
        owner = make_claim(key)
        backend.claim(owner)
        barrier = threading.Barrier(9)
        threads = [threading.Thread(target=copy, args=(barrier, key)) for _ in range(8)]
        threads.append(threading.Thread(target=complete, args=(barrier, owner)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        stored = get(backend, key)
        told = verdicts[-8:]
        assert told.count(Verdict.IN_FLIGHT) == stored.rescheduled, told
        assert told.count(Verdict.CONSUMED) == stored.skipped, told


def test_a_listing_filters_by_status_scope_task_and_age_newest_first(backend):
    from dedup_celery.backends.base import RecordFilter

    old = make_claim("k-old", task_name="tests.old")
    backend.claim(old)
    backend.complete(old, None)
    time.sleep(1.1)
    backend.claim(make_claim("k-new"))
    backend.claim(make_claim("k-other", scope="scope-b"))
    listed = backend.list_records(RecordFilter())
    assert [r.key for r in listed.records][-1] == "k-old"
    assert {r.key for r in listed.records} == {"k-old", "k-new", "k-other"}
    assert listed.complete

    def keys(**wanted):
        return {r.key for r in backend.list_records(RecordFilter(**wanted)).records}

    assert keys(status=Status.CONSUMED) == {"k-old"}
    assert keys(scope="scope-b") == {"k-other"}
    assert keys(task_name="tests.old") == {"k-old"}
    assert keys(older_than=1.0) == {"k-old"}
    assert keys(status=Status.PROCESSING, scope=SCOPE) == {"k-new"}
    first = backend.list_records(RecordFilter(limit=1))
    assert len(first.records) == 1
    assert not first.complete
    processing = backend.list_records(RecordFilter(status=Status.PROCESSING, scope=SCOPE))
    assert processing.records[0].lease_expired is False


def test_a_claim_stores_its_payload_digest_and_a_duplicate_leaves_it(backend):
    first = make_claim("k-payload", payload_digest="a" * 64, lease=60)
    outcome = backend.claim(first)
    assert outcome.record.payload_digest == "a" * 64  # the first claim's record, as built
    assert get(backend, "k-payload").payload_digest == "a" * 64  # and as stored
    copy = make_claim("k-payload", payload_digest="b" * 64)
    assert backend.claim(copy).record.payload_digest == "a" * 64
    assert backend.fail(first) is True
    retry = make_claim("k-payload", task_id=first.task_id, attempt=1, payload_digest="c" * 64)
    assert backend.claim(retry).verdict is Verdict.CLAIMED
    assert get(backend, "k-payload").payload_digest == "c" * 64  # the retry's own arguments
    backend.complete(retry, None)
    assert get(backend, "k-payload").payload_digest == "c" * 64
    assert backend.claim(make_claim("k-none")).record.payload_digest is None
    assert get(backend, "k-none").payload_digest is None


def test_a_payload_mismatch_is_counted_on_the_record_and_never_creates_one(backend):
    claim = make_claim("k-mismatch", payload_digest="a" * 64, lease=60)
    backend.claim(claim)
    assert backend.count_payload_mismatch(SCOPE, claim.key_digest) is True
    assert backend.count_payload_mismatch(SCOPE, claim.key_digest) is True
    stored = get(backend, "k-mismatch")
    assert (stored.payload_mismatches, stored.skipped, stored.status) == (2, 0, Status.PROCESSING)
    backend.complete(claim, None)
    assert get(backend, "k-mismatch").payload_mismatches == 2  # kept by the complete
    missing = make_claim("k-never-claimed")
    assert backend.count_payload_mismatch(SCOPE, missing.key_digest) is False
    assert get(backend, "k-never-claimed") is None
    assert backend.claim(missing).record.payload_mismatches == 0


# -- QUEUED markers (dedup_on_enqueue = "queued") ------------------------------------


def marker(key="k-q", **fields):
    """A producer's claim: its lease is the queue TTL."""
    return make_claim(key, **{"lease": 60, **fields})


def test_a_marker_on_a_new_key_is_queued_and_a_second_producer_meets_it(backend):
    first = marker()
    outcome = backend.queue(first)
    assert outcome.verdict is Verdict.CLAIMED
    stored = get(backend, "k-q")
    assert (stored.status, stored.owner, stored.task_id) == (
        Status.QUEUED,
        first.owner,
        first.task_id,
    )
    assert stored.lease_expired is False
    second = backend.queue(marker())
    assert second.verdict is Verdict.IN_FLIGHT
    assert (second.record.task_id, second.record.status) == (first.task_id, Status.QUEUED)
    # A producer re-sending the marker's own task id does not take the marker either.
    again = backend.queue(marker(task_id=first.task_id))
    assert again.verdict is Verdict.IN_FLIGHT
    assert get(backend, "k-q").owner == first.owner
    assert get(backend, "k-q").rescheduled == 2  # each send that met it is counted


def test_only_a_delivery_of_the_queued_task_id_claims_a_live_marker(backend):
    queued = marker()
    backend.queue(queued)
    other = backend.claim(make_claim("k-q", task_id="another-id"))
    assert other.verdict is Verdict.IN_FLIGHT
    assert get(backend, "k-q").status == Status.QUEUED
    delivery = make_claim("k-q", task_id=queued.task_id)
    claimed = backend.claim(delivery)
    assert claimed.verdict is Verdict.CLAIMED
    stored = get(backend, "k-q")
    assert (stored.status, stored.owner) == (Status.PROCESSING, delivery.owner)
    assert (stored.rescheduled, stored.takeovers) == (1, 0)
    assert backend.complete(delivery, {"n": 1}) is True
    assert backend.queue(marker()).verdict is Verdict.CONSUMED


def test_an_expired_marker_is_claimed_by_any_delivery(backend):
    backend.queue(marker(lease=0.2))
    time.sleep(0.5)
    outcome = backend.claim(make_claim("k-q", task_id="a-later-send"))
    assert outcome.verdict is Verdict.CLAIMED
    assert get(backend, "k-q").task_id == "a-later-send"


def test_a_marker_meets_what_holds_the_key_and_replaces_what_is_over(backend):
    running = make_claim("k-q", lease=60)
    backend.claim(running)
    assert backend.queue(marker()).verdict is Verdict.IN_FLIGHT
    assert get(backend, "k-q").owner == running.owner
    backend.fail(running)
    replaced = marker()
    assert backend.queue(replaced).verdict is Verdict.CLAIMED  # a FAILED message runs again
    assert get(backend, "k-q").status == Status.QUEUED


def test_a_producer_removes_only_its_own_marker(backend):
    queued = marker()
    backend.queue(queued)
    assert backend.release(SCOPE, queued.key_digest, uuid_hex(), expired_only=False) is False
    assert backend.release(SCOPE, queued.key_digest, queued.owner, expired_only=False) is True
    assert get(backend, "k-q") is None


def uuid_hex():
    import uuid

    return uuid.uuid4().hex


def test_a_marker_never_takes_over_or_poisons_a_lapsed_lease(backend):
    lapsed = make_claim("k-q", lease=0.2, cap=1)
    backend.claim(lapsed)
    time.sleep(0.5)
    for _ in range(2):
        outcome = backend.queue(marker(cap=1))
        assert outcome.verdict is Verdict.IN_FLIGHT
    stored = get(backend, "k-q")
    assert (stored.status, stored.owner, stored.takeovers) == (
        Status.PROCESSING,
        lapsed.owner,
        0,
    )
    # The lapsed message's own redelivery takes it over, as always.
    redelivery = backend.claim(make_claim("k-q", task_id=lapsed.task_id, cap=1))
    assert redelivery.verdict is Verdict.TAKEN_OVER
