"""The Redis backend: each record is a Redis hash, changed only by Lua scripts.

Every transition of the contract (claim, take over, count a duplicate, complete,
release, purge) is one script, so Redis runs it atomically, and each is
conditioned on the current state and the owner token. Times come from Redis
``TIME`` inside the script, never from the worker.

The Redis key is ``key_prefix + sha256(scope) + ":" + key_digest``: raw scopes
and keys are never joined into key names. A CONSUMED record's key expires with
RECORD_TTL. A PROCESSING record's lease is its ``expires_at`` field, judged by
the scripts; its key lives for the lease plus RECORD_TTL, so that an expired
lease is still there to be taken over (and counted), inspected, or completed
late by its owner, as in the database backend.

Requires the ``redis`` package: ``pip install "dedup-celery[redis]"``.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from dedup_celery.backends.base import (
    BaseBackend,
    Claim,
    ClaimOutcome,
    OwnerIdentity,
    Record,
    outcome_for,
)
from dedup_celery.exceptions import DedupConfigurationError, StorageError
from dedup_celery.keys import display_key

T = TypeVar("T")

INSTALL_HINT = 'pip install "dedup-celery[redis]"'

# Bounded defaults: a dead Redis must not hang a worker, and redis-py's own
# default of ten retries with backoff would stall each call for seconds.
DEFAULT_CONNECTION_OPTIONS: dict[str, Any] = {
    "socket_timeout": 5.0,
    "socket_connect_timeout": 2.0,
    "health_check_interval": 30,
}
DEFAULT_RETRIES = 2

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1]: the record. ARGV: owner, lease_ms, ttl_ms, scope, key, key_digest,
# task_id, task_name, attempt, hostname, pid, process_start, boot_id,
# pid_namespace, max_takeovers. Returns the record's fields, then "now" and
# "changed" ("1" if this claim poisoned it).
CLAIM_SCRIPT = (
    _NOW
    + """
local key = KEYS[1]
local owner = ARGV[1]
local lease = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local cap = tonumber(ARGV[15])
local changed = '0'
local function own(takeovers)
  redis.call('HSET', key, 'status', 'processing', 'owner', owner, 'task_id', ARGV[7],
    'task_name', ARGV[8], 'attempt', ARGV[9], 'hostname', ARGV[10], 'pid', ARGV[11],
    'process_start', ARGV[12], 'boot_id', ARGV[13], 'pid_namespace', ARGV[14],
    'updated_at', now, 'expires_at', now + lease, 'key', ARGV[5], 'takeovers', takeovers)
  redis.call('HDEL', key, 'consumed_at', 'heartbeat_at', 'result')
  redis.call('PEXPIRE', key, lease + ttl)
end
local fields = redis.call('HMGET', key, 'owner', 'status', 'expires_at', 'takeovers',
  'task_id', 'attempt')
local current = fields[1]
if not current then
  redis.call('DEL', key)
  redis.call('HSET', key, 'scope', ARGV[4], 'key_digest', ARGV[6], 'created_at', now,
    'skipped', 0, 'rescheduled', 0)
  own(0)
elseif current ~= owner then
  local status = fields[2]
  local expired = tonumber(fields[3]) < now
  local takeovers = tonumber(fields[4])
  local stale = status == 'failed' and not expired and fields[5] == ARGV[7]
    and tonumber(fields[6]) >= tonumber(ARGV[9])
  if status == 'processing' and expired then
    if takeovers < cap then
      own(takeovers + 1)
    else
      redis.call('HSET', key, 'status', 'poisoned', 'updated_at', now, 'expires_at', now + ttl)
      redis.call('PEXPIRE', key, ttl)
      changed = '1'
    end
  elseif ((status == 'consumed' or status == 'poisoned') and expired)
      or (status == 'failed' and not stale) then
    own(0)
  else
    if status == 'processing' then
      redis.call('HINCRBY', key, 'rescheduled', 1)
    else
      redis.call('HINCRBY', key, 'skipped', 1)
    end
    redis.call('HSET', key, 'last_duplicate_at', now)
  end
end
local record = redis.call('HGETALL', key)
table.insert(record, 'now')
table.insert(record, now)
table.insert(record, 'changed')
table.insert(record, changed)
return record
"""
)

# KEYS[1]: the record. ARGV: owner, ttl_ms, result (JSON or ""), then the fields
# to recreate a record that is gone: scope, key, key_digest, task_id, task_name,
# attempt, hostname, pid, process_start, boot_id, pid_namespace.
COMPLETE_SCRIPT = (
    _NOW
    + """
local key = KEYS[1]
local ttl = tonumber(ARGV[2])
local current = redis.call('HGET', key, 'owner')
if current and current ~= ARGV[1] then
  return 0
end
if not current then
  redis.call('DEL', key)
  redis.call('HSET', key, 'scope', ARGV[4], 'key', ARGV[5], 'key_digest', ARGV[6],
    'owner', ARGV[1], 'task_id', ARGV[7], 'task_name', ARGV[8], 'attempt', ARGV[9],
    'hostname', ARGV[10], 'pid', ARGV[11], 'process_start', ARGV[12], 'boot_id', ARGV[13],
    'pid_namespace', ARGV[14], 'created_at', now, 'skipped', 0, 'rescheduled', 0,
    'takeovers', 0)
end
redis.call('HSET', key, 'status', 'consumed', 'consumed_at', now, 'updated_at', now,
  'expires_at', now + ttl)
if ARGV[3] ~= '' then
  redis.call('HSET', key, 'result', ARGV[3])
else
  redis.call('HDEL', key, 'result')
end
redis.call('PEXPIRE', key, ttl)
return 1
"""
)

# KEYS[1]: the record. ARGV: owner, expired_only ("1" or "0").
RELEASE_SCRIPT = (
    _NOW
    + """
local key = KEYS[1]
local fields = redis.call('HMGET', key, 'owner', 'status', 'expires_at')
if fields[1] ~= ARGV[1] then
  return 0
end
if fields[2] == 'processing' then
  if ARGV[2] == '1' and tonumber(fields[3]) >= now then
    return 0
  end
elseif fields[2] ~= 'poisoned' then
  return 0
end
redis.call('DEL', key)
return 1
"""
)

# KEYS[1]: the record. ARGV: owner, what ("fail", "renew" or "expire"), seconds_ms.
# Changes a PROCESSING record this owner holds: FAILED until now + seconds,
# lease renewed to now + seconds, or lease ended now.
OWNED_SCRIPT = (
    _NOW
    + """
local key = KEYS[1]
local fields = redis.call('HMGET', key, 'owner', 'status', 'expires_at')
if fields[1] ~= ARGV[1] or fields[2] ~= 'processing' then
  return 0
end
local ms = tonumber(ARGV[3])
if ARGV[2] == 'fail' then
  redis.call('HSET', key, 'status', 'failed', 'updated_at', now, 'expires_at', now + ms)
  redis.call('PEXPIRE', key, ms)
elseif ARGV[2] == 'renew' then
  redis.call('HSET', key, 'expires_at', now + ms, 'heartbeat_at', now)
  local ttl = redis.call('PTTL', key)
  if ttl >= 0 and ttl < ms then
    redis.call('PEXPIRE', key, ms)
  end
else
  redis.call('HSET', key, 'expires_at', now - 1)
end
return 1
"""
)

# KEYS[1]: the record. ARGV: task_id, hostname, pid, process_start, boot_id,
# pid_namespace. Ends the lease of the PROCESSING record that process holds.
EXPIRE_PROCESS_SCRIPT = (
    _NOW
    + """
local key = KEYS[1]
local f = redis.call('HMGET', key, 'status', 'task_id', 'hostname', 'pid', 'process_start',
  'boot_id', 'pid_namespace')
if f[1] ~= 'processing' then
  return 0
end
for i = 1, 6 do
  if f[i + 1] ~= ARGV[i] then
    return 0
  end
end
redis.call('HSET', key, 'expires_at', now - 1)
return 1
"""
)

GET_SCRIPT = (
    _NOW
    + """
local record = redis.call('HGETALL', KEYS[1])
if #record == 0 then
  return record
end
table.insert(record, 'now')
table.insert(record, now)
return record
"""
)

# KEYS: candidate records. ARGV[1]: "1" to only count. Deletes those whose
# expires_at has passed, judged inside the script.
PURGE_SCRIPT = (
    _NOW
    + """
local count = 0
for _, key in ipairs(KEYS) do
  local expires = redis.call('HGET', key, 'expires_at')
  if expires and tonumber(expires) < now then
    count = count + 1
    if ARGV[1] ~= '1' then
      redis.call('DEL', key)
    end
  end
end
return count
"""
)


def _import_redis() -> Any:
    try:
        import redis
    except ImportError as exc:
        raise DedupConfigurationError(
            "DEDUP_CELERY['BACKEND'] is 'redis', but the redis package is not installed. "
            f"Install it with: {INSTALL_HINT}"
        ) from exc
    return redis


def _storage_errors(method: Callable[..., T]) -> Callable[..., T]:
    """Turn a redis-py error into :class:`StorageError`, keeping the original as the cause."""

    @functools.wraps(method)
    def wrapper(self: RedisBackend, *args: Any, **kwargs: Any) -> T:
        redis = _import_redis()
        try:
            return method(self, *args, **kwargs)
        except redis.RedisError as exc:
            raise StorageError(
                f"the Redis message store at {self.safe_url} failed: {type(exc).__name__}: {exc}"
            ) from exc

    return wrapper


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ms_to_datetime(value: Any) -> datetime.datetime | None:
    if value in (None, b"", ""):
        return None
    return datetime.datetime.fromtimestamp(int(value) / 1000, tz=datetime.timezone.utc)


def _int_or_none(value: Any) -> int | None:
    if value in (None, b"", ""):
        return None
    return int(value)


class RedisBackend(BaseBackend):
    """Stores message records as Redis hashes.

    Options (``DEDUP_CELERY['OPTIONS']``): ``url`` (required), ``key_prefix``
    (default ``"dedup:"``), and any keyword redis-py's ``Redis.from_url``
    accepts (socket timeouts, ``health_check_interval``, ``ssl_*``, ``retry``).
    Socket timeouts are on by default, and redis-py's retries are bounded to
    two. One connection pool serves the whole process (redis-py replaces it in a
    forked child).
    """

    supports_transactional: ClassVar[bool] = False
    accepted_options: ClassVar[tuple[str, ...]] = (
        "url",
        "key_prefix",
        "(any redis-py connection keyword)",
    )

    def __init__(
        self,
        *,
        database: str | None = None,
        url: str | None = None,
        key_prefix: str = "dedup:",
        **connection_options: Any,
    ) -> None:
        super().__init__(database=database)
        if not url or not isinstance(url, str):
            raise DedupConfigurationError(
                "The redis backend needs DEDUP_CELERY['OPTIONS']['url'], for example "
                '"redis://localhost:6379/2"; it never falls back to a default server.'
            )
        if not isinstance(key_prefix, str):
            raise DedupConfigurationError("DEDUP_CELERY['OPTIONS']['key_prefix'] must be a str.")
        redis = _import_redis()
        self.url = url
        self.key_prefix = key_prefix
        options = {**DEFAULT_CONNECTION_OPTIONS, **connection_options}
        if "retry" not in options:
            from redis.backoff import ExponentialWithJitterBackoff
            from redis.retry import Retry

            options["retry"] = Retry(
                ExponentialWithJitterBackoff(base=0.05, cap=0.5), DEFAULT_RETRIES
            )
        # Neither the client nor a connection object touches the network until a
        # command runs; building one connection here rejects a bad keyword now.
        try:
            self.client = redis.Redis.from_url(url, **options)
            pool = self.client.connection_pool
            pool.connection_class(**pool.connection_kwargs)
        except (TypeError, ValueError) as exc:
            raise DedupConfigurationError(
                f"DEDUP_CELERY['OPTIONS'] for the redis backend is not accepted by redis-py: {exc}"
            ) from exc
        self._scripts = {
            name: self.client.register_script(source)
            for name, source in (
                ("claim", CLAIM_SCRIPT),
                ("complete", COMPLETE_SCRIPT),
                ("release", RELEASE_SCRIPT),
                ("owned", OWNED_SCRIPT),
                ("expire_process", EXPIRE_PROCESS_SCRIPT),
                ("get", GET_SCRIPT),
                ("purge", PURGE_SCRIPT),
            )
        }

    @property
    def safe_url(self) -> str:
        """The URL without its password, for messages."""
        scheme, sep, rest = self.url.partition("://")
        if "@" in rest:
            rest = "***@" + rest.split("@", 1)[1]
        return f"{scheme}{sep}{rest}"

    def describe(self) -> str:
        """Name the Redis server and prefix the records are under."""
        return f"Redis at {self.safe_url} (prefix {self.key_prefix!r})"

    def _script(self, name: str) -> Any:
        return self._scripts[name]

    def redis_key(self, scope: str, key_digest: str) -> str:
        """Return the Redis key of a record: prefix, sha256 of the scope, key digest."""
        scope_digest = hashlib.sha256(scope.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self.key_prefix}{scope_digest}:{key_digest}"

    @staticmethod
    def _identity_args(claim: Claim) -> list[Any]:
        ident = claim.identity
        return [
            claim.scope,
            display_key(claim.key),
            claim.key_digest,
            claim.task_id,
            claim.task_name,
            claim.attempt,
            ident.hostname,
            ident.pid,
            "" if ident.process_start is None else ident.process_start,
            ident.boot_id,
            ident.pid_namespace,
        ]

    def _record(self, flat: list[Any]) -> Record | None:
        if not flat:
            return None
        fields = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
        now = int(fields.pop("now"))
        fields.pop("changed", None)
        expires_raw = fields.get("expires_at")
        result = fields.get("result")
        owner = fields.get("owner")
        return Record(
            scope=_text(fields.get("scope", b"")),
            key=_text(fields.get("key", b"")),
            key_digest=_text(fields.get("key_digest", b"")),
            status=_text(fields.get("status", b"")),
            owner=uuid.UUID(_text(owner)).hex if owner else None,
            task_id=_text(fields.get("task_id", b"")),
            task_name=_text(fields.get("task_name", b"")),
            attempt=int(fields.get("attempt", 0)),
            hostname=_text(fields.get("hostname", b"")),
            pid=_int_or_none(fields.get("pid")),
            process_start=_int_or_none(fields.get("process_start")),
            boot_id=_text(fields.get("boot_id", b"")),
            pid_namespace=_text(fields.get("pid_namespace", b"")),
            created_at=_ms_to_datetime(fields.get("created_at")),
            updated_at=_ms_to_datetime(fields.get("updated_at")),
            expires_at=_ms_to_datetime(expires_raw),
            consumed_at=_ms_to_datetime(fields.get("consumed_at")),
            heartbeat_at=_ms_to_datetime(fields.get("heartbeat_at")),
            skipped=int(fields.get("skipped", 0)),
            rescheduled=int(fields.get("rescheduled", 0)),
            takeovers=int(fields.get("takeovers", 0)),
            last_duplicate_at=_ms_to_datetime(fields.get("last_duplicate_at")),
            result=json.loads(result) if result else None,
            payload_digest=None,
            lease_expired=None if expires_raw is None else int(expires_raw) < now,
        )

    @_storage_errors
    def claim(self, claim: Claim) -> ClaimOutcome:
        """Claim, take over or count a duplicate in one script (see :meth:`BaseBackend.claim`)."""
        ident = self._identity_args(claim)
        flat = self._script("claim")(
            keys=[self.redis_key(claim.scope, claim.key_digest)],
            args=[
                claim.owner,
                round(claim.lease_seconds * 1000),
                round(claim.record_ttl * 1000),
                *ident,
                int(claim.max_takeovers),
            ],
        )
        changed_now = _text(flat[-1]) == "1"
        record = self._record(flat)
        assert record is not None
        return outcome_for(claim, record, changed_now=changed_now)

    @_storage_errors
    def complete(self, claim: Claim, result: Any) -> bool:
        """Mark CONSUMED if *claim* still owns the record (see :meth:`BaseBackend.complete`)."""
        payload = "" if result is None else json.dumps(result, separators=(",", ":"))
        ident = self._identity_args(claim)
        done = self._script("complete")(
            keys=[self.redis_key(claim.scope, claim.key_digest)],
            args=[claim.owner, round(claim.record_ttl * 1000), payload, *ident],
        )
        return bool(done)

    @_storage_errors
    def release(self, scope: str, key_digest: str, owner: str, *, expired_only: bool) -> bool:
        """Compare-and-delete a PROCESSING record (see :meth:`BaseBackend.release`)."""
        owner = uuid.UUID(owner).hex
        done = self._script("release")(
            keys=[self.redis_key(scope, key_digest)], args=[owner, "1" if expired_only else "0"]
        )
        return bool(done)

    def _owned(self, scope: str, key_digest: str, owner: str, what: str, seconds: float) -> bool:
        done = self._script("owned")(
            keys=[self.redis_key(scope, key_digest)],
            args=[uuid.UUID(owner).hex, what, round(seconds * 1000)],
        )
        return bool(done)

    @_storage_errors
    def fail(self, claim: Claim) -> bool:
        """Leave a FAILED record for stale copies to meet (see :meth:`BaseBackend.fail`)."""
        return self._owned(claim.scope, claim.key_digest, claim.owner, "fail", claim.record_ttl)

    @_storage_errors
    def renew(self, claim: Claim) -> bool:
        """Extend the lease while the owner still holds it (see :meth:`BaseBackend.renew`)."""
        return self._owned(claim.scope, claim.key_digest, claim.owner, "renew", claim.lease_seconds)

    @_storage_errors
    def expire_lease(self, scope: str, key_digest: str, owner: str) -> bool:
        """End a gone owner's lease now (see :meth:`BaseBackend.expire_lease`)."""
        return self._owned(scope, key_digest, owner, "expire", 0)

    @_storage_errors
    def expire_lease_of_process(
        self, scope: str, key_digest: str, task_id: str, identity: OwnerIdentity
    ) -> bool:
        """End the lease a dead child held (see :meth:`BaseBackend.expire_lease_of_process`)."""
        done = self._script("expire_process")(
            keys=[self.redis_key(scope, key_digest)],
            args=[
                task_id,
                identity.hostname,
                identity.pid,
                "" if identity.process_start is None else identity.process_start,
                identity.boot_id,
                identity.pid_namespace,
            ],
        )
        return bool(done)

    @_storage_errors
    def get(self, scope: str, key_digest: str) -> Record | None:
        """Return the record, with ``lease_expired`` judged by Redis's clock."""
        return self._record(self._script("get")(keys=[self.redis_key(scope, key_digest)]))

    @_storage_errors
    def purge_expired(
        self, *, batch_size: int = 1000, dry_run: bool = False, pause: float = 0.0
    ) -> int:
        """Delete expired PROCESSING records that still wait for their key to expire.

        CONSUMED records expire by themselves through their Redis TTL; this
        sweeps the prefix with SCAN and deletes, in one script per batch, the
        records whose ``expires_at`` has passed.
        """
        total = 0
        batch: list[str] = []
        purge = self._script("purge")
        for key in self.client.scan_iter(match=f"{self.key_prefix}*", count=batch_size):
            batch.append(_text(key))
            if len(batch) >= batch_size:
                total += int(purge(keys=batch, args=["1" if dry_run else "0"]))
                batch = []
                if pause:
                    time.sleep(pause)
        if batch:
            total += int(purge(keys=batch, args=["1" if dry_run else "0"]))
        return total

    @_storage_errors
    def eviction_policy(self) -> str | None:
        """Return Redis's ``maxmemory-policy``, or None if ``CONFIG`` is not allowed."""
        redis = _import_redis()
        try:
            reply = self.client.config_get("maxmemory-policy")
        except redis.ResponseError:
            return None
        value = reply.get("maxmemory-policy") or reply.get(b"maxmemory-policy")
        return None if value is None else _text(value)
