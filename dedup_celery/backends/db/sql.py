"""The database backend's statements, built once per vendor and option set.

On PostgreSQL and SQLite a claim is one ``INSERT … ON CONFLICT DO UPDATE …
RETURNING`` statement that claims, takes over or counts the duplicate, decided
by the database on the row it locked. Columns come from
:data:`~dedup_celery.backends.base.RECORD_FIELDS` and status names from
:mod:`dedup_celery.states`; neither is typed here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from dedup_celery.backends.base import (
    CLAIMANT_FIELDS,
    COUNTERS,
    RECORD_FIELDS,
    REPLACED_BY_CLAIMS,
)
from dedup_celery.clock import now_plus_literal, now_plus_sql, now_sql
from dedup_celery.states import FORGETTABLE, Status

#: Columns a claim's parameters fill, in RECORD_FIELDS order; the rest are the store's.
CLAIM_PARAMETERS: tuple[str, ...] = tuple(
    c for c in RECORD_FIELDS if c in ("scope", "key_digest", *CLAIMANT_FIELDS)
)
# Columns whose new value a claim's own decision (status, expiry, time) sets.
_DECIDED = ("status", "expires_at", "updated_at")


def q(status: Status) -> str:
    """A status as an SQL string literal (status names are plain ASCII words)."""
    return f"'{status.value}'"


def advisory_lock_key(scope: str, key_digest: str) -> int:
    """Return the signed 64-bit PostgreSQL advisory lock number for a (scope, key)."""
    digest = hashlib.sha256(f"dedup_celery\0{scope}\0{key_digest}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def claim_sql(
    vendor: str,
    qn: Callable[[str], str],
    table: str,
    *,
    transactional: bool,
    max_takeovers: int,
    record_ttl: float,
) -> str:
    """Return the one-statement claim: insert, or decide on the existing row, and return it.

    Parameters, in the columns' order: :data:`CLAIM_PARAMETERS` but the last
    (``payload_digest``), then the lease (or RECORD_TTL in transactional mode)
    in seconds (``expires_at``), then ``payload_digest``, then the retention
    (``purge_after``, :func:`~dedup_celery.states.retention`),
    then (PostgreSQL, transactional) the advisory lock key; then (PostgreSQL,
    status mode) :data:`GONE_OWNER_SLOTS` times the owner token of a holder
    known to be gone, or None: its lease counts as expired, so the claim
    takes over from it in this same statement.
    """

    def old(column: str) -> str:
        return f"r.{qn(column)}"

    def new(column: str) -> str:
        return f"excluded.{qn(column)}"

    now = now_sql(vendor)
    status = old("status")
    d = {
        "mine": f"{old('owner')} = {new('owner')}",
        "processing": f"{status} = {q(Status.PROCESSING)}",
    }
    expired = f"{old('expires_at')} < {now}"
    stale = (
        f"({status} = {q(Status.FAILED)} AND NOT ({expired}) AND "
        f"{old('task_id')} = {new('task_id')} AND {old('attempt')} >= {new('attempt')})"
    )
    if vendor == "postgresql" and not transactional:
        lapsing = f"({expired} OR COALESCE({old('owner')} = %s::uuid, FALSE))"
    else:
        lapsing = expired
    # Only a delivery takes over (or poisons) a lapsed lease, never a producer's marker:
    # the lapsed message comes back by itself, and its takeovers count must stay.
    delivery = f"{new('status')} <> {q(Status.QUEUED)}"
    lapsed = (
        f"NOT ({d['mine']}) AND {delivery} AND {d['processing']} AND {lapsing} "
        f"AND {old('takeovers')}"
    )
    d["take"] = f"({lapsed} < {int(max_takeovers)})"
    d["poison"] = f"({lapsed} >= {int(max_takeovers)})"
    # A delivery (not another producer's marker) of the task id that queued the message.
    adopt = (
        f"({status} = {q(Status.QUEUED)} AND {old('task_id')} = {new('task_id')} "
        f"AND {new('status')} <> {q(Status.QUEUED)})"
    )
    ended = ", ".join(q(s) for s in (Status.CONSUMED, Status.POISONED, Status.QUEUED))
    d["fresh"] = (
        f"(NOT ({d['mine']}) AND (({status} IN ({ended}) AND {expired}) OR "
        f"({status} = {q(Status.FAILED)} AND NOT {stale}) OR {adopt}))"
    )
    # A copy that met the message held (running, or queued): rescheduled, not skipped.
    d["held"] = f"{status} IN ({q(Status.PROCESSING)}, {q(Status.QUEUED)})"
    d["claimed"] = f"({d['take']} OR {d['fresh']})"
    d["dup"] = f"(NOT ({d['mine']}) AND NOT {d['claimed']} AND NOT {d['poison']})"
    values = _decided_values(old, new, now, d, now_plus_literal(vendor, record_ttl))
    if vendor == "postgresql":
        assignments = [_pg_assignment(qn, values, d)]
    else:
        # SQLite: each column repeats the decision (it has no multi-column SET from a row).
        assignments = [
            f"{qn(column)} = {value.format(**{k: f'({v})' for k, v in d.items()})}"
            for column, value in values.items()
        ]
    result = f"{qn('result')}::text" if vendor == "postgresql" else qn("result")
    returning = [qn(c) if c != "result" else f"{result} AS {qn('result')}" for c in RECORD_FIELDS]
    returning += [
        f"({qn('expires_at')} < {now}) AS {qn('lease_expired')}",
        f"({qn('updated_at')} = {now}) AS {qn('changed_now')}",
    ]
    return (
        _insert(vendor, qn, table, transactional=transactional)
        + " DO UPDATE SET "
        + ", ".join(assignments)
        + " RETURNING "
        + ", ".join(returning)
    )


#: How often the gone owner's token is a parameter of the status-mode claim on
#: PostgreSQL (the take-over and the poison decisions).
GONE_OWNER_SLOTS = 2
#: The columns :func:`claim_sql` returns, in order: the record's, then two flags.
CLAIM_RETURNING: tuple[str, ...] = (*RECORD_FIELDS, "lease_expired", "changed_now")
#: The column :func:`first_claim_sql` returns: the record's ``created_at``, the
#: store's "now", from which the claim's expiry and retention follow (now + the
#: seconds the claim sent). On PostgreSQL it comes as whole microseconds since
#: the epoch (an int8, exact): reading a ``timestamptz`` through Django's
#: time-zone loader costs the client more than the rest of the row handling
#: (:func:`.rows.created_at_of`).
FIRST_CLAIM_RETURNING: tuple[str, ...] = ("created_at",)


def first_claim_sql(
    vendor: str, qn: Callable[[str], str], table: str, *, transactional: bool
) -> str:
    """Return the claim of a key that has no record yet: insert, or do nothing.

    It takes the parameters of :func:`claim_sql` and inserts the very row that
    statement would, but never looks at an existing one, so it is cheaper to
    run: it returns :data:`FIRST_CLAIM_RETURNING` when it inserted, and no row
    when a record (or, in transactional mode on PostgreSQL, a copy's open
    transaction) was there first. Only then does :func:`claim_sql` decide.
    """
    returned = ", ".join(
        f"(EXTRACT(EPOCH FROM {qn(c)}) * 1000000)::int8" if vendor == "postgresql" else qn(c)
        for c in FIRST_CLAIM_RETURNING
    )
    return (
        _insert(vendor, qn, table, transactional=transactional)
        + " DO NOTHING RETURNING "
        + returned
    )


def _insert(vendor: str, qn: Callable[[str], str], table: str, *, transactional: bool) -> str:
    """``INSERT … ON CONFLICT (scope, key_digest)``: a claim's new row, up to the action."""
    now = now_sql(vendor)
    expires, _ = now_plus_sql(vendor, 0)
    store_values = {
        "created_at": now,
        "updated_at": now,
        "expires_at": expires,
        "purge_after": expires,
        "consumed_at": now if transactional else "NULL",
        **dict.fromkeys(COUNTERS, "0"),
    }
    inserted = ", ".join(
        "%s" if c in CLAIM_PARAMETERS else store_values.get(c, "NULL") for c in RECORD_FIELDS
    )
    if vendor == "postgresql" and transactional:
        # The advisory lock makes a copy in flight visible without waiting:
        # without the lock, the SELECT yields no row and nothing is inserted.
        # It is a transaction lock, so it ends with the body's transaction.
        source = f"SELECT {inserted} WHERE pg_try_advisory_xact_lock(%s)"
    else:
        source = f"VALUES ({inserted})"
    return (
        f"INSERT INTO {table} AS r ({', '.join(qn(c) for c in RECORD_FIELDS)}) {source} "
        f"ON CONFLICT ({qn('scope')}, {qn('key_digest')})"
    )


def _decided_values(
    old: Callable[[str], str],
    new: Callable[[str], str],
    now: str,
    d: dict[str, str],
    poison_expiry: str,
) -> dict[str, str]:
    """Each updated column's new value, with the decisions as ``{claimed}``-style fields."""
    values = {
        column: f"CASE WHEN {{claimed}} THEN {new(column)} ELSE {old(column)} END"
        for column in REPLACED_BY_CLAIMS
        if column not in _DECIDED
    }
    values.update(
        status=f"CASE WHEN {{claimed}} THEN {new('status')} WHEN {{poison}} THEN "
        f"{q(Status.POISONED)} ELSE {old('status')} END",
        expires_at=f"CASE WHEN {{claimed}} THEN {new('expires_at')} WHEN {{poison}} THEN "
        f"{poison_expiry} ELSE {old('expires_at')} END",
        updated_at=f"CASE WHEN {{claimed}} OR {{poison}} THEN {now} ELSE {old('updated_at')} END",
        takeovers=f"CASE WHEN {{take}} THEN {old('takeovers')} + 1 WHEN {{fresh}} THEN 0 "
        f"ELSE {old('takeovers')} END",
        skipped=f"{old('skipped')} + CASE WHEN {{dup}} AND NOT {{held}} THEN 1 ELSE 0 END",
        rescheduled=f"{old('rescheduled')} + CASE WHEN {{dup}} AND {{held}} THEN 1 ELSE 0 END",
        last_duplicate_at=f"CASE WHEN {{dup}} THEN {now} ELSE {old('last_duplicate_at')} END",
        last_duplicate_task_id=f"CASE WHEN {{dup}} THEN {new('task_id')} "
        f"ELSE {old('last_duplicate_task_id')} END",
    )
    return values


def _pg_assignment(qn: Callable[[str], str], values: dict[str, str], d: dict[str, str]) -> str:
    """One multi-column SET whose decision is computed once, in a sub-select.

    PostgreSQL would otherwise parse and plan each decision again for every
    column it guards, which made the claim the slowest statement of a task.
    """
    names = ("take", "fresh", "poison", "held", "claimed", "dup")
    decision = (
        f"SELECT s.take, s.fresh, s.poison, s.held, s.take OR s.fresh AS claimed, "
        f"NOT s.mine AND NOT (s.take OR s.fresh) AND NOT s.poison AS dup FROM (SELECT "
        f"{d['take']} AS take, {d['fresh']} AS fresh, {d['poison']} AS poison, "
        f"{d['mine']} AS mine, {d['held']} AS held) AS s"
    )
    row = ", ".join(v.format(**{n: f"d.{n}" for n in names}) for v in values.values())
    return f"({', '.join(qn(c) for c in values)}) = (SELECT {row} FROM ({decision}) AS d)"


def complete_sql(vendor: str, qn: Callable[[str], str], table: str) -> str:
    """Return the complete: CONSUMED, RECORD_TTL and the result, if the owner still holds it.

    Parameters: status, the RECORD_TTL parameter, the result JSON, scope, key
    digest, owner.
    """
    now = now_sql(vendor)
    expires, _ = now_plus_sql(vendor, 0)
    result = "%s::jsonb" if vendor == "postgresql" else "%s"
    return (
        f"UPDATE {table} SET {qn('status')} = %s, "
        f"{qn('expires_at')} = {expires}, {qn('consumed_at')} = {now}, "
        f"{qn('updated_at')} = {now}, {qn('result')} = {result} "
        f"WHERE {qn('scope')} = %s AND {qn('key_digest')} = %s AND {qn('owner')} = %s"
    )


def release_sql(vendor: str, qn: Callable[[str], str], table: str, *, expired_only: bool) -> str:
    """Return the compare-and-delete of :func:`dedup_celery.states.may_release`.

    Parameters: scope, key digest, owner.
    """
    live_ok = "" if not expired_only else f" AND {qn('expires_at')} < {now_sql(vendor)}"
    return (
        f"DELETE FROM {table} WHERE {qn('scope')} = %s AND {qn('key_digest')} = %s "
        f"AND {qn('owner')} = %s AND ({qn('status')} IN ({q(Status.POISONED)}, "
        f"{q(Status.QUEUED)}) OR ({qn('status')} = {q(Status.PROCESSING)}{live_ok}))"
    )


def forget_sql(vendor: str, qn: Callable[[str], str], table: str) -> str:
    """Return the compare-and-delete of a CONSUMED or FAILED record (``forget``).

    Parameters: scope, key digest, owner.
    """
    statuses = ", ".join(q(status) for status in FORGETTABLE)
    return (
        f"DELETE FROM {table} WHERE {qn('scope')} = %s AND {qn('key_digest')} = %s "
        f"AND {qn('owner')} = %s AND {qn('status')} IN ({statuses})"
    )


def purge_sql(vendor: str, qn: Callable[[str], str], table: str, count: int) -> str:
    """Return the delete of *count* ids that re-checks, in the statement, that each is due.

    Due means ``expires_at`` passed, and ``purge_after`` too where it is set;
    the query that picked the ids also spared the PROCESSING records without
    ``purge_after`` (:meth:`~dedup_celery.managers.DedupRecordQuerySet.purgeable`).
    """
    now = now_sql(vendor)
    return (
        f"DELETE FROM {table} WHERE {qn('id')} IN ({', '.join(['%s'] * count)}) "
        f"AND {qn('expires_at')} < {now} "
        f"AND ({qn('purge_after')} IS NULL OR {qn('purge_after')} < {now})"
    )
