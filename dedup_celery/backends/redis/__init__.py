"""The Redis backend: each record is a Redis hash, changed only by Lua scripts.

Every transition of the contract (claim, take over, count a duplicate, complete,
release, purge) is one script in ``lua/``, so Redis runs it atomically, and
each is conditioned on the current state and the owner token. Times come from
Redis ``TIME`` inside the script, never from the worker. The status names and
the clock are put in front of every script from :mod:`dedup_celery.states`
when it is loaded (see :mod:`.scripts`).

The Redis key is ``key_prefix + sha256(scope) + ":" + key_digest``: raw scopes
and keys are never joined into key names. A CONSUMED record's key expires with
RECORD_TTL. A PROCESSING record's lease is its ``expires_at`` field, judged by
the scripts; its key lives for the lease plus RECORD_TTL, so that an expired
lease is still there to be taken over (and counted), inspected, or completed
late by its owner, as in the database backend.

Requires the ``redis`` package: ``pip install "dedup-celery[redis]"``.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from django.core import checks

from dedup_celery.backends.base import (
    FIELD_KINDS,
    RECORD_FIELDS,
    SCAN_LIMIT,
    BaseBackend,
    Claim,
    ClaimOutcome,
    OwnerIdentity,
    Record,
    RecordFilter,
    RecordListing,
    claimant_tuple,
    first_claim_outcome,
    outcome_for,
)
from dedup_celery.backends.redis.scripts import SCRIPT_NAMES, script_source
from dedup_celery.exceptions import DedupConfigurationError, StorageError, StorageRefusedError
from dedup_celery.states import Status, retention

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
        except (redis.DataError, UnicodeError) as exc:
            # A value redis-py cannot send: no retry sends it either.
            raise StorageRefusedError(
                f"the Redis message store at {self.safe_url} refused a value: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        except redis.RedisError as exc:
            raise StorageError(
                f"the Redis message store at {self.safe_url} failed: {type(exc).__name__}: {exc}"
            ) from exc

    return wrapper


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _claimant(claim: Claim, status: str) -> str:
    """The claimant's fields as the scripts take them: one JSON array of strings.

    In :data:`~dedup_celery.backends.base.CLAIMANT_FIELDS` order, None as "";
    the scripts pair them with the field names (one argument instead of 22 is
    most of what a claim costs redis-py to send).
    """
    values = ["" if value is None else str(value) for value in claimant_tuple(claim, status)]
    return json.dumps(values, ensure_ascii=False, separators=(",", ":"))


def _empty(value: Any) -> bool:
    return value in (None, b"", "")


@functools.lru_cache(maxsize=1024)
def _scope_digest(scope: str) -> str:
    return hashlib.sha256(scope.encode("utf-8", "surrogatepass")).hexdigest()


def _ms_to_datetime(value: Any) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(value) / 1000, tz=datetime.timezone.utc)


# How a hash field becomes a Record value, by its kind (FIELD_KINDS).
_DECODE: dict[str, Callable[[Any], Any]] = {
    "text": lambda v: "" if _empty(v) else _text(v),
    "text?": lambda v: None if _empty(v) else _text(v),
    "int": lambda v: 0 if _empty(v) else int(v),
    "int?": lambda v: None if _empty(v) else int(v),
    "datetime": _ms_to_datetime,
    "datetime?": lambda v: None if _empty(v) else _ms_to_datetime(v),
    "json": lambda v: None if _empty(v) else json.loads(v),
}


_EPOCH = datetime.datetime.fromtimestamp(0, tz=datetime.timezone.utc)


def _matches(record: Record, flat: list[Any], wanted: RecordFilter) -> bool:
    """Whether *record* (read with the store's "now", the last pair of *flat*) is *wanted*."""
    if wanted.status and record.status != wanted.status:
        return False
    if wanted.scope and record.scope != wanted.scope:
        return False
    if wanted.task_name and record.task_name != wanted.task_name:
        return False
    if wanted.older_than is not None:
        now = _ms_to_datetime(flat[-1])
        age = now - (record.created_at or now)
        if age.total_seconds() <= wanted.older_than:
            return False
    return True


class RedisBackend(BaseBackend):
    """Stores message records as Redis hashes.

    Options (``DEDUP_CELERY['OPTIONS']``): ``url`` (required), ``key_prefix``
    (default ``"dedup:"``), and any keyword redis-py's ``Redis.from_url``
    accepts (socket timeouts, ``health_check_interval``, ``ssl_*``, ``retry``).
    Socket timeouts are on by default, and redis-py's retries are bounded to
    two. One connection pool serves the whole process (redis-py replaces it in a
    forked child).
    """

    accepted_options: ClassVar[tuple[str, ...]] = (
        "url",
        "key_prefix",
        "(any redis-py connection keyword)",
    )

    def __init__(
        self, *, url: str | None = None, key_prefix: str = "dedup:", **connection_options: Any
    ) -> None:
        """Create the client and register the scripts; no I/O until a command runs."""
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
            name: self.client.register_script(script_source(name)) for name in SCRIPT_NAMES
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

    def key_pattern(self) -> str:
        """The SCAN pattern of this backend's records, and of nothing else under the prefix.

        The prefix is glob-escaped, and the two digests are matched as 64
        characters each, so ``dedup:`` does not also match ``dedup:staging:``.
        """
        prefix = "".join(f"\\{ch}" if ch in "*?[]\\" else ch for ch in self.key_prefix)
        return f"{prefix}{'?' * 64}:{'?' * 64}"

    def redis_key(self, scope: str, key_digest: str) -> str:
        """Return the Redis key of a record: prefix, sha256 of the scope, key digest."""
        return f"{self.key_prefix}{_scope_digest(scope)}:{key_digest}"

    def _run(self, name: str, scope: str, key_digest: str, args: list[Any]) -> Any:
        return self._scripts[name](keys=[self.redis_key(scope, key_digest)], args=args)

    @staticmethod
    def _record(flat: list[Any]) -> Record | None:
        if not flat:
            return None
        fields = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
        now = int(fields["now"])
        values = {name: _DECODE[FIELD_KINDS[name]](fields.get(name)) for name in RECORD_FIELDS}
        if fields.get("payload_owner") != fields.get("owner"):
            # Written by another claim than the owner's (a release that knows no fingerprint).
            values["payload_digest"] = None
        if values["owner"] is not None:
            values["owner"] = uuid.UUID(values["owner"]).hex
        expires = fields.get("expires_at")
        return Record(**values, lease_expired=None if expires is None else int(expires) < now)

    # -- the contract -------------------------------------------------------------

    @_storage_errors
    def claim(self, claim: Claim) -> ClaimOutcome:
        """Claim, take over or count a duplicate in one script (see :meth:`BaseBackend.claim`)."""
        return self._claim(claim, Status.PROCESSING)

    @_storage_errors
    def queue(self, claim: Claim) -> ClaimOutcome:
        """Write a producer's QUEUED marker with the claim script (:meth:`BaseBackend.queue`)."""
        return self._claim(claim, Status.QUEUED)

    def _claim(self, claim: Claim, status: Status) -> ClaimOutcome:
        flat = self._run(
            "claim",
            claim.scope,
            claim.key_digest,
            [
                claim.owner,
                round(claim.lease_seconds * 1000),
                round(claim.record_ttl * 1000),
                int(claim.max_takeovers),
                claim.scope,
                claim.key_digest,
                _claimant(claim, status.value),
            ],
        )
        if len(flat) == 2:  # {"first", now}: the record is what this claim wrote
            now = flat[1]
            return first_claim_outcome(claim, status.value, lambda: _ms_to_datetime(now))
        changed_now = _text(flat[-1]) == "1"
        found = self._record(flat)
        assert found is not None
        return outcome_for(claim, found, changed_now=changed_now)

    @_storage_errors
    def complete(self, claim: Claim, result: Any) -> bool:
        """Mark CONSUMED if *claim* still owns the record (see :meth:`BaseBackend.complete`)."""
        payload = "" if result is None else json.dumps(result, separators=(",", ":"))
        # The claimant goes along every time: a record that is gone is recreated in
        # this same script, so no copy can claim it between two calls.
        args = [
            claim.owner,
            round(claim.record_ttl * 1000),
            payload,
            claim.scope,
            claim.key_digest,
            _claimant(claim, Status.CONSUMED.value),
        ]
        return bool(self._run("complete", claim.scope, claim.key_digest, args))

    @_storage_errors
    def release(self, scope: str, key_digest: str, owner: str, *, expired_only: bool) -> bool:
        """Compare-and-delete a PROCESSING record (see :meth:`BaseBackend.release`)."""
        args = [uuid.UUID(owner).hex, "1" if expired_only else "0"]
        return bool(self._run("release", scope, key_digest, args))

    @_storage_errors
    def forget(self, scope: str, key_digest: str, owner: str) -> bool:
        """Compare-and-delete a CONSUMED or FAILED record (see :meth:`BaseBackend.forget`)."""
        return bool(self._run("forget", scope, key_digest, [uuid.UUID(owner).hex]))

    def _owned(
        self, scope: str, key_digest: str, owner: str, what: str, seconds: float, keep: float = 0
    ) -> bool:
        args = [uuid.UUID(owner).hex, what, round(seconds * 1000), round(keep * 1000)]
        return bool(self._run("owned", scope, key_digest, args))

    @_storage_errors
    def fail(self, claim: Claim) -> bool:
        """Leave a FAILED record for stale copies to meet (see :meth:`BaseBackend.fail`)."""
        return self._owned(claim.scope, claim.key_digest, claim.owner, "fail", claim.record_ttl)

    @_storage_errors
    def renew(self, claim: Claim) -> bool:
        """Extend the lease while the owner still holds it (see :meth:`BaseBackend.renew`)."""
        keep = retention(claim.lease_seconds, claim.record_ttl)
        return self._owned(
            claim.scope, claim.key_digest, claim.owner, "renew", claim.lease_seconds, keep
        )

    @_storage_errors
    def expire_lease(self, scope: str, key_digest: str, owner: str) -> bool:
        """End a gone owner's lease now (see :meth:`BaseBackend.expire_lease`)."""
        return self._owned(scope, key_digest, owner, "expire", 0)

    @_storage_errors
    def expire_lease_of_process(
        self, scope: str, key_digest: str, task_id: str, identity: OwnerIdentity
    ) -> bool:
        """End the lease a dead child held (see :meth:`BaseBackend.expire_lease_of_process`)."""
        # In OwnerIdentity's field order, which the script compares one by one.
        fields = dataclasses.astuple(identity)
        args = [task_id, *("" if value is None else value for value in fields)]
        return bool(self._run("expire_process", scope, key_digest, args))

    @_storage_errors
    def get(self, scope: str, key_digest: str) -> Record | None:
        """Return the record, with ``lease_expired`` judged by Redis's clock."""
        return self._record(self._run("get", scope, key_digest, []))

    @_storage_errors
    def count_payload_mismatch(self, scope: str, key_digest: str) -> bool:
        """``HINCRBY payload_mismatches`` in a script that never creates a record."""
        return bool(self._run("count_mismatch", scope, key_digest, []))

    @_storage_errors
    def list_records(
        self, wanted: RecordFilter, *, scan_limit: int = SCAN_LIMIT, batch: int = 500
    ) -> RecordListing:
        """The records *wanted* names, newest first, from a bounded SCAN of the prefix.

        Redis keeps no second index (a script may only touch keys of one hash
        slot), so this reads each key under the prefix, at most *scan_limit* of
        them, and filters here; a listing that stopped there says so
        (``complete`` is False).
        """
        get = self._scripts["get"]
        found: list[Record] = []
        seen: set[bytes] = set()  # SCAN may return a key more than once
        scanned = 0
        keys = self.client.scan_iter(match=self.key_pattern(), count=batch)
        stopped = False
        while True:
            raw = [key for _, key in zip(range(batch), keys, strict=False)]
            if not raw:
                break
            chunk = [key for key in dict.fromkeys(raw) if key not in seen]
            seen.update(chunk)
            pipe = self.client.pipeline(transaction=False)
            for key in chunk:
                get(keys=[key], args=[], client=pipe)
            for flat in pipe.execute(raise_on_error=False):
                if isinstance(flat, Exception):
                    continue  # not a record hash (WRONGTYPE): nothing to list
                record = self._record(flat)
                if record is not None and _matches(record, flat, wanted):
                    found.append(record)
            scanned += len(chunk)
            if scanned >= scan_limit:
                stopped = True
                break
        found.sort(key=lambda r: r.created_at or _EPOCH, reverse=True)
        return RecordListing(
            found[: wanted.limit],
            truncated=len(found) > wanted.limit,
            scan_stopped=stopped,
            scanned=scanned,
        )

    @_storage_errors
    def purge_expired(
        self, *, batch_size: int = 1000, dry_run: bool = False, pause: float = 0.0
    ) -> int:
        """Delete the due records that still wait for their key to expire.

        Records expire by themselves through their Redis TTL; this sweeps the
        prefix with SCAN and deletes, in one script per batch, those whose
        ``expires_at`` and ``purge_after`` have passed. A PROCESSING record whose
        lease ran out is kept (its key lives RECORD_TTL past the lease), so a
        purge never resets the takeovers count that stops a poison message.
        """
        total = 0
        batch: list[str] = []
        purge = self._scripts["purge"]
        for key in self.client.scan_iter(match=self.key_pattern(), count=batch_size):
            batch.append(_text(key))
            if len(batch) >= batch_size:
                total += int(purge(keys=batch, args=["1" if dry_run else "0"]))
                batch = []
                if pause:
                    time.sleep(pause)
        if batch:
            total += int(purge(keys=batch, args=["1" if dry_run else "0"]))
        return total

    # -- checks ----------------------------------------------------------------------

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

    def check(self) -> list[Any]:
        """Warn when the Redis that holds the records may evict them (``dedup_celery.W008``).

        Every dedup record has a TTL, so an evicting ``maxmemory-policy`` drops
        them first, and a dropped record lets a duplicate run. A server that
        refuses ``CONFIG``, or cannot be reached, gives no message here.
        """
        try:
            policy = self.eviction_policy()
        except StorageError:
            return []
        if policy in (None, "noeviction"):
            return []
        return [
            checks.Warning(
                f"The Redis that holds dedup records ({self.describe()}) has "
                f"maxmemory-policy {policy!r}. Every record has a TTL, so it is evicted first "
                "when memory runs out, and an evicted record lets a duplicate run its body.",
                hint="Set maxmemory-policy to noeviction on that server, or give dedup_celery a "
                "Redis of its own that is configured so.",
                id="dedup_celery.W008",
            )
        ]
