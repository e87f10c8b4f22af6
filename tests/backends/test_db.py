"""What only the database backend does: transactional claims, and the row it writes.

Parametrised over PostgreSQL and SQLite, each with the one-statement upsert and
with the portable insert-then-update path that MySQL uses. The status-mode
contract shared with every backend is in test_contract.py.
"""

from __future__ import annotations

import datetime
import threading
import time
import uuid

import pytest
from django.db import connections, transaction
from django.test.utils import CaptureQueriesContext

from dedup_celery.backends.base import RECORD_FIELDS, Status, Verdict
from dedup_celery.backends.db import DatabaseBackend
from dedup_celery.exceptions import DedupError, OuterTransactionError, StorageError
from dedup_celery.identity import current_identity
from dedup_celery.keys import digest
from dedup_celery.models import DedupRecord
from tests.helpers import make_claim

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "sqlite", "mysql"])


@pytest.fixture
def backend(db_backend):
    """Only the database backend's variants here."""
    return db_backend


def row(backend, claim):
    return DedupRecord.objects.using(backend.alias).get(
        scope=claim.scope, key_digest=claim.key_digest
    )


def test_the_row_holds_the_owner_identity_and_a_display_key(backend):
    claim = make_claim("order-1\x00" + "x" * 300)
    backend.claim(claim)
    stored = row(backend, claim)
    assert stored.owner.hex == claim.owner
    assert (stored.hostname, stored.pid) == (current_identity().hostname, current_identity().pid)
    assert stored.key.startswith("order-1\\x00xxx")
    assert len(stored.key) == 255
    assert stored.key_digest == digest("order-1\x00" + "x" * 300)
    assert str(stored).startswith("scope-a: order-1")


def test_transactional_claim_commits_with_the_transaction(backend):
    claim = make_claim()
    with backend.transactional_claim(claim) as txn:
        assert txn.outcome.verdict is Verdict.CLAIMED
        assert txn.outcome.record.status == Status.CONSUMED
        txn.result = {"value": 7}
    assert row(backend, claim).result == {"value": 7}
    duplicate = make_claim()
    with backend.transactional_claim(duplicate) as txn:
        pass
    assert txn.outcome.verdict is Verdict.CONSUMED
    assert row(backend, claim).skipped == 1


def test_a_transactional_first_claims_record_is_the_committed_row(backend):
    claim = make_claim("k-tx-first", ttl=3600)
    with backend.transactional_claim(claim) as txn:
        returned = txn.outcome.record
    stored = row(backend, claim).as_record()
    exact = connections[backend.alias].vendor != "sqlite"  # SQLite keeps milliseconds
    for name in RECORD_FIELDS:
        mine, theirs = getattr(returned, name), getattr(stored, name)
        if isinstance(theirs, datetime.datetime) and not exact:
            assert abs(mine - theirs) <= datetime.timedelta(milliseconds=1), name
        else:
            assert mine == theirs, name


def test_transactional_claim_leaves_nothing_when_rolled_back(backend):
    claim = make_claim()
    with pytest.raises(RuntimeError, match="the body failed"), backend.transactional_claim(claim):
        raise RuntimeError("the body failed")
    assert backend.get(claim.scope, claim.key_digest) is None
    with backend.transactional_claim(make_claim()) as txn:
        assert txn.outcome.verdict is Verdict.CLAIMED


def test_transactional_claim_refuses_an_outer_transaction_and_reports_a_broken_one(backend):
    with (
        pytest.raises(OuterTransactionError, match="savepoint"),
        transaction.atomic(using=backend.alias),
        backend.transactional_claim(make_claim()),
    ):
        pass
    claim = make_claim("swallowed")
    with (
        pytest.raises(DedupError, match="nothing was committed"),
        backend.transactional_claim(claim),
    ):
        connections[backend.alias].needs_rollback = True
    assert backend.get(claim.scope, claim.key_digest) is None


def test_transactional_claim_meets_an_uncommitted_copy(backend):
    """PostgreSQL answers IN_FLIGHT at once; SQLite fails on its writer lock; MariaDB waits."""
    holding = threading.Event()
    finish = threading.Event()

    def first_copy():
        try:
            with backend.transactional_claim(make_claim("in-flight")):
                holding.set()
                finish.wait(30)
        finally:
            connections.close_all()

    thread = threading.Thread(target=first_copy)
    thread.start()
    try:
        assert holding.wait(10)
        started = time.monotonic()
        if backend.variant == "db-postgresql":
            with backend.transactional_claim(make_claim("in-flight")) as txn:
                pass
            assert txn.outcome.verdict is Verdict.IN_FLIGHT
            assert txn.outcome.record is None
            assert time.monotonic() - started < 1
        elif backend.variant in ("db-portable-postgresql", "db-mariadb"):
            timer = threading.Timer(1.0, finish.set)
            timer.start()
            with backend.transactional_claim(make_claim("in-flight")) as txn:
                pass
            assert txn.outcome.verdict is Verdict.CONSUMED
            assert time.monotonic() - started >= 0.9
        else:
            with (
                pytest.raises(StorageError, match="locked"),
                backend.transactional_claim(make_claim("in-flight")),
            ):
                pass
    finally:
        finish.set()
        thread.join()


def test_an_unreachable_database_raises_storage_error(unreachable_database):
    backend = DatabaseBackend(database=unreachable_database)
    with pytest.raises(StorageError, match="unreachable"):
        backend.claim(make_claim())
    with pytest.raises(StorageError):
        backend.complete(make_claim(), None)
    with pytest.raises(StorageError):
        backend.release("s", "d", uuid.uuid4().hex, expired_only=False)
    with pytest.raises(StorageError), backend.transactional_claim(make_claim()):
        pass


def test_an_sqlite_without_returning_takes_the_portable_path(monkeypatch):
    """SQLite before 3.35 has no RETURNING (this machine's is newer: the feature is turned off)."""
    connection = connections["sqlite"]
    monkeypatch.setattr(connection.features, "can_return_columns_from_insert", False)
    backend = DatabaseBackend(database="sqlite")
    claim = make_claim("old-sqlite")
    with CaptureQueriesContext(connection) as queries:
        assert backend.claim(claim).verdict is Verdict.CLAIMED
        assert backend.complete(claim, {"value": 1}) is True
    assert queries.captured_queries, "nothing ran on the SQLite alias"
    assert [q["sql"] for q in queries if "RETURNING" in q["sql"].upper()] == []
    duplicate = backend.claim(make_claim("old-sqlite"))
    assert (duplicate.verdict, duplicate.record.result) == (Verdict.CONSUMED, {"value": 1})


def test_records_written_before_purge_after_existed_are_purged_as_before_but_unfinished_kept(
    backend, settings
):
    # A worker of the previous release writes no purge_after (NULL). A purge then
    # deletes its expired records as before, except an unfinished (PROCESSING)
    # one, which waits RECORD_TTL past its lease for the redelivery.
    settings.DEDUP_CELERY = {**settings.DEDUP_CELERY, "RECORD_TTL": 1}
    done, unfinished = (
        make_claim("old-done", lease=0.2, ttl=0.1),
        make_claim("old-unfinished", lease=0.2),
    )
    for claim in (done, unfinished):
        backend.claim(claim)
    backend.complete(done, None)
    rows = DedupRecord.objects.using(backend.alias)
    assert rows.filter(purge_after__isnull=True).count() == 0  # this release writes it
    rows.update(purge_after=None)
    time.sleep(0.5)
    assert backend.purge_expired() == 1
    assert list(rows.values_list("key", flat=True)) == ["old-unfinished"]
    time.sleep(1.0)  # RECORD_TTL past its lease
    assert backend.purge_expired() == 1
    assert not rows.exists()


def test_mariadb_sessions_in_other_time_zones_judge_a_lease_alike(extra_database):
    # Django sets no session time zone on MySQL; CURRENT_TIMESTAMP follows it.
    # Two workers whose sessions are ten hours apart must still agree that a
    # fresh 600 s lease is live, and every stored time must be UTC.
    import datetime

    def at_offset(name, offset):
        options = {"charset": "utf8mb4", "init_command": f"SET time_zone = '{offset}'"}
        return DatabaseBackend(database=extra_database(name, base="mysql", OPTIONS=options))

    west, east = at_offset("mysql_west", "-05:00"), at_offset("mysql_east", "+05:00")
    for first, second in ((west, east), (east, west)):
        key = f"tz-{uuid.uuid4().hex[:8]}"
        before = datetime.datetime.now(datetime.timezone.utc)
        claimed = first.claim(make_claim(key, lease=600))
        assert claimed.verdict is Verdict.CLAIMED
        lease = (claimed.record.expires_at - before).total_seconds()
        assert 595 <= lease <= 605, f"the lease ends {lease:.0f} s from now, not 600 s"
        assert second.claim(make_claim(key, lease=600)).verdict is Verdict.IN_FLIGHT
        later = second.get("scope-a", digest(key))
        assert (later.takeovers, later.lease_expired) == (0, False)


def deadlock_in(block, alias="mysql"):
    """Run *block()* (a transaction of its own) so that InnoDB picks it as a deadlock victim.

    Inside the block, the body writes ``first``, locks row x, then row y, while
    another transaction that has written more (so InnoDB spares it) holds y and
    wants x. The body catches the deadlock and writes ``second``. Returns what
    the block raised, or None.
    """
    from django.db import OperationalError

    from tests.testapp.models import Effect

    effects = Effect.objects.using(alias)
    x, y = (effects.create(tag=f"lock-{name}", n=0, task_id="-", pid=0).pk for name in "xy")
    holding, wanted = threading.Event(), threading.Event()
    caught: list[BaseException] = []

    def body(tag):
        effects.create(tag=tag, n=1, task_id="first", pid=0)
        list(effects.select_for_update().filter(pk=x))
        holding.wait(10)
        wanted.set()
        try:
            list(effects.select_for_update().filter(pk=y))
        except OperationalError as exc:  # 1213: the body catches the deadlock
            caught.append(exc)
        effects.create(tag=tag, n=2, task_id="second", pid=0)

    def other():
        try:
            with transaction.atomic(using=alias):
                for n in range(50):  # more work done: InnoDB rolls the body back instead
                    effects.create(tag="heavy", n=n, task_id="-", pid=0)
                list(effects.select_for_update().filter(pk=y))
                holding.set()
                wanted.wait(10)
                time.sleep(0.2)
                list(effects.select_for_update().filter(pk=x))
        finally:
            connections.close_all()

    thread = threading.Thread(target=other)
    thread.start()
    try:
        block(body)
    except BaseException as exc:
        return exc, caught
    finally:
        thread.join(20)
    return None, caught


def test_a_transactional_body_that_catches_a_mariadb_deadlock_commits_nothing():
    from tests.testapp.models import Effect

    backend = DatabaseBackend(database="mysql")
    effects = Effect.objects.using("mysql")

    # The control: a plain transaction. The body's later write commits alone;
    # what it wrote before the deadlock is gone with InnoDB's rollback.
    def plain(body):
        with transaction.atomic(using="mysql"):
            body("plain")

    error, caught = deadlock_in(plain)
    assert error is None
    assert [exc.args[0] for exc in caught] == [1213], "no deadlock happened"
    assert sorted(effects.filter(tag="plain").values_list("n", flat=True)) == [2]

    # The DedupTask's transaction: the claim row went with the rollback, so the
    # COMMIT must not happen: nothing of the body, and a retryable StorageError.
    claim = make_claim("deadlocked")

    def dedup(body):
        with backend.transactional_claim(claim) as txn:
            assert txn.outcome.verdict is Verdict.CLAIMED
            body("dedup")

    effects.filter(tag__startswith="lock-").delete()
    error, caught = deadlock_in(dedup)
    assert [exc.args[0] for exc in caught] == [1213], "no deadlock happened"
    assert isinstance(error, StorageError), error
    assert error.step == "commit"
    assert "record" in str(error)
    assert not effects.filter(tag="dedup").exists()
    assert DedupRecord.objects.using("mysql").filter(key_digest=claim.key_digest).count() == 0
