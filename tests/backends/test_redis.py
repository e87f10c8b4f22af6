"""What only the Redis backend does: key layout, TTLs, scripts under faults, configuration."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from django.test import override_settings

from dedup_celery import DedupConfigurationError, DedupTask, StorageError, get_backend
from dedup_celery.backends.base import OwnerIdentity, Verdict
from dedup_celery.backends.redis import RedisBackend
from dedup_celery.checks import check_backend, check_settings
from dedup_celery.identity import current_identity
from dedup_celery.keys import digest
from tests.celery_app import app
from tests.helpers import make_claim
from tests.services import REPO


@pytest.fixture
def backend(redis_backend):
    """Only the Redis backend here."""
    return redis_backend


def test_the_key_is_built_from_digests_never_from_raw_strings(backend):
    claim = make_claim("Order:1 with spaces", scope="shop.tasks:ship")
    backend.claim(claim)
    keys = [k.decode() for k in backend.client.scan_iter(match=f"{backend.key_prefix}*")]
    scope_digest = hashlib.sha256(b"shop.tasks:ship").hexdigest()
    assert keys == [f"{backend.key_prefix}{scope_digest}:{digest('Order:1 with spaces')}"]


def test_the_value_carries_the_record_and_times_from_redis(backend):
    claim = make_claim()
    backend.claim(claim)
    fields = {
        k.decode(): v.decode()
        for k, v in backend.client.hgetall(backend.redis_key(claim.scope, claim.key_digest)).items()
    }
    assert fields["status"] == "processing"
    assert fields["owner"] == claim.owner
    assert fields["task_id"] == claim.task_id
    assert fields["pid"] == str(current_identity().pid)
    assert fields["boot_id"] == current_identity().boot_id
    redis_ms = int(backend.client.time()[0]) * 1000
    assert abs(int(fields["created_at"]) - redis_ms) < 5000


def _hash(backend, claim):
    stored = backend.client.hgetall(backend.redis_key(claim.scope, claim.key_digest))
    return {k.decode(): v.decode() for k, v in stored.items()}


#: The hash fields whose values are Redis's clock (milliseconds).
TIME_FIELDS = {"created_at", "updated_at", "expires_at", "purge_after", "consumed_at"}


def test_the_hash_layout_of_a_claim_and_a_complete_is_pinned(backend):
    # Old and new workers read each other's records during a rolling deploy: the
    # fields a claim and a complete write (names and values) must never drift.
    identity = OwnerIdentity("host-é", 4242, None, "boot-1", "pid:[1]")
    claim = make_claim(
        "clé ☃ 𝄞", task_name="tâche.x", attempt=2, identity=identity, payload_digest="ab" * 32
    )
    backend.claim(claim)
    claimed = _hash(backend, claim)
    assert {k: v for k, v in claimed.items() if k not in TIME_FIELDS} == {
        "scope": claim.scope, "key_digest": claim.key_digest, "key": "clé ☃ 𝄞",
        "status": "processing", "owner": claim.owner, "task_id": claim.task_id,
        "task_name": "tâche.x", "attempt": "2", "hostname": "host-é", "pid": "4242",
        "process_start": "", "boot_id": "boot-1", "pid_namespace": "pid:[1]",
        "payload_digest": "ab" * 32, "payload_owner": claim.owner,
        "skipped": "0", "rescheduled": "0", "takeovers": "0",
    }  # fmt: skip
    assert set(claimed) & TIME_FIELDS == {"created_at", "updated_at", "expires_at", "purge_after"}
    backend.complete(claim, {"n": 1})
    done = _hash(backend, claim)
    assert done["status"] == "consumed"
    assert done["result"] == '{"n":1}'
    assert set(done) == set(claimed) | {"consumed_at", "result"}
    # A complete that finds its record gone writes the same fields anew (without
    # purge_after: its key's TTL is RECORD_TTL, as a CONSUMED record's).
    backend.client.delete(backend.redis_key(claim.scope, claim.key_digest))
    backend.complete(claim, None)
    recreated = _hash(backend, claim)
    assert set(recreated) == set(claimed) - {"purge_after"} | {"consumed_at"}
    same = set(claimed) - TIME_FIELDS - {"status"}
    assert recreated["status"] == "consumed"
    assert {k: recreated[k] for k in same} == {k: claimed[k] for k in same}


def test_a_digest_left_by_another_claim_than_the_owners_does_not_count(backend):
    # A worker of a release before the fingerprint replaces the claimant's fields it
    # knows (owner, task id, ...) and leaves payload_digest and payload_owner alone.
    claim = make_claim("k-digest", payload_digest="ab" * 32)
    backend.claim(claim)
    assert backend.get(claim.scope, claim.key_digest).payload_digest == "ab" * 32
    key = backend.redis_key(claim.scope, claim.key_digest)
    backend.client.hset(key, mapping={"owner": "f" * 32, "task_id": "old-release"})
    assert backend.get(claim.scope, claim.key_digest).payload_digest is None


def test_leases_and_consumed_records_expire_through_redis_ttls(backend):
    claim = make_claim(lease=30, ttl=100)
    backend.claim(claim)
    key = backend.redis_key(claim.scope, claim.key_digest)
    # A PROCESSING key outlives its lease by RECORD_TTL, so an expired lease can
    # still be taken over (and counted), inspected, or completed late.
    assert 129_000 <= backend.client.pttl(key) <= 130_000
    backend.complete(claim, None)
    assert 99_000 <= backend.client.pttl(key) <= 100_000


class DroppingProxy:
    """A TCP proxy to Redis that forwards the first script call, then drops its reply."""

    def __init__(self, port: int):
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dropped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        upstream = socket.create_connection(self.target)
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    return
                upstream.sendall(data)
                reply = upstream.recv(65536)
                if not self.dropped.is_set() and b"EVAL" in data.upper():
                    self.dropped.set()
                    return  # the script ran; its reply is lost with the connection
                client.sendall(reply)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def close(self):
        self.listener.close()


def test_a_claim_whose_reply_was_lost_and_retried_is_still_its_own(redis_server):
    proxy = DroppingProxy(redis_server.port)
    try:
        backend = RedisBackend(
            url=f"redis://127.0.0.1:{proxy.port}/5", key_prefix=f"lost:{uuid.uuid4().hex[:8]}:"
        )
        claim = make_claim()
        outcome = backend.claim(claim)
        assert proxy.dropped.is_set(), "the proxy did not drop a reply"
        assert outcome.verdict is Verdict.CLAIMED
        assert outcome.record.rescheduled == 0
        assert backend.get(claim.scope, claim.key_digest).owner == claim.owner
    finally:
        proxy.close()


def test_an_unreachable_redis_fails_fast_with_storage_error():
    backend = RedisBackend(url="redis://127.0.0.1:1/0")
    started = time.monotonic()
    for call in (
        lambda: backend.claim(make_claim()),
        lambda: backend.complete(make_claim(), None),
        lambda: backend.release("s", "d", uuid.uuid4().hex, expired_only=False),
        lambda: backend.get("s", "d"),
        lambda: backend.purge_expired(),
    ):
        with pytest.raises(StorageError, match=r"127\.0\.0\.1:1"):
            call()
    assert time.monotonic() - started < 10


def test_the_url_is_required_and_never_defaulted():
    with pytest.raises(DedupConfigurationError, match=r"OPTIONS'\]\['url'\]"):
        RedisBackend()


def test_redis_py_connection_keywords_are_accepted_and_bad_ones_rejected():
    backend = RedisBackend(
        url="redis://127.0.0.1:1/0", socket_timeout=1.5, health_check_interval=10
    )
    assert backend.client.connection_pool.connection_kwargs["socket_timeout"] == 1.5
    tls = RedisBackend(url="rediss://127.0.0.1:1/0", ssl_cert_reqs="none")
    assert tls.client.connection_pool.connection_kwargs["ssl_cert_reqs"] == "none"
    with pytest.raises(DedupConfigurationError, match="not accepted by redis-py"):
        RedisBackend(url="redis://127.0.0.1:1/0", no_such_keyword=1)


def test_defaults_bound_timeouts_and_retries():
    backend = RedisBackend(url="redis://127.0.0.1:1/0")
    kwargs = backend.client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 5.0
    assert kwargs["socket_connect_timeout"] == 2.0
    assert kwargs["retry"].get_retries() == 2


def test_settings_check_reports_a_missing_url(settings):
    settings.DEDUP_CELERY = {"BACKEND": "redis"}
    (message,) = check_settings()
    assert message.id == "dedup_celery.E004"
    assert "url" in message.msg


def test_a_missing_redis_package_names_the_install_command():
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "import django; django.setup()\n"
        "from django.test import override_settings\n"
        "from dedup_celery.checks import check_settings\n"
        "from dedup_celery.backends.redis import RedisBackend\n"
        "with override_settings(DEDUP_CELERY={'BACKEND': 'redis', 'OPTIONS': {'url': 'redis://x'}}):\n"
        "    print([m.id for m in check_settings()], [m.hint for m in check_settings()])\n"
        "try:\n"
        "    RedisBackend(url='redis://x')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"DJANGO_SETTINGS_MODULE": "tests.settings", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert "['dedup_celery.E009']" in done.stdout
    assert 'pip install "dedup-celery[redis]"' in done.stdout
    assert "DedupConfigurationError" in done.stdout


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("noeviction", []),
        ("allkeys-lru", ["dedup_celery.W008"]),
        ("volatile-ttl", ["dedup_celery.W008"]),
    ],
)
def test_an_evicting_maxmemory_policy_is_a_warning(redis_url, redis_server, policy, expected):
    import redis

    admin = redis.Redis(host=redis_server.host, port=redis_server.port)
    admin.config_set("maxmemory-policy", policy)
    try:
        with override_settings(
            DEDUP_CELERY={"BACKEND": "redis", "OPTIONS": {"url": f"{redis_url}/4"}}
        ):
            # The check reached this Redis (an unreachable one also gives no message).
            assert get_backend().eviction_policy() == policy
            assert [m.id for m in check_backend()] == expected
    finally:
        admin.config_set("maxmemory-policy", "noeviction")


def test_the_eviction_check_tolerates_a_forbidden_config(redis_server):
    import redis

    admin = redis.Redis(host=redis_server.host, port=redis_server.port)
    admin.config_set("maxmemory-policy", "allkeys-lru")
    admin.acl_setuser(
        "limited", enabled=True, passwords=["+secret"], keys=["*"], commands=["+@all", "-config"]
    )
    url = f"redis://limited:secret@{redis_server.host}:{redis_server.port}/4"
    try:
        with override_settings(DEDUP_CELERY={"BACKEND": "redis", "OPTIONS": {"url": url}}):
            # Redis answered and refused CONFIG (an unreachable one raises StorageError).
            assert get_backend().eviction_policy() is None
            assert check_backend() == []
    finally:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.acl_deluser("limited")


@app.task(shared=False, base=DedupTask, name="unit.redis_tx", dedup_transactional=True)
def redis_tx():
    return "ran"


def test_transactional_mode_with_redis_is_a_clear_error_never_a_downgrade(redis_url):
    redis_settings = {"BACKEND": "redis", "OPTIONS": {"url": f"{redis_url}/4"}}
    with (
        override_settings(DEDUP_CELERY=redis_settings),
        pytest.raises(DedupConfigurationError, match="has no transactions"),
    ):
        redis_tx.apply().get()
