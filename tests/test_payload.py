"""The payload fingerprint (issue 13's groundwork): canonical, stable, None for non-JSON."""

from __future__ import annotations

import datetime
import decimal
import hashlib
import uuid

import pytest

from dedup_celery import DedupTask
from dedup_celery.keys import digest
from dedup_celery.models import DedupRecord
from dedup_celery.payload import canonical, fingerprint
from tests.celery_app import app
from tests.helpers import run_as_worker


def test_equal_arguments_give_one_digest_whatever_their_order_or_sequence_type():
    a = fingerprint((1, "x"), {"b": 2, "a": {"z": 1, "y": [1, 2]}})
    b = fingerprint([1, "x"], {"a": {"y": (1, 2), "z": 1}, "b": 2})
    assert a == b
    assert len(a) == 64


def test_different_arguments_give_different_digests():
    base = fingerprint((1,), {"note": "x"})
    assert fingerprint((2,), {"note": "x"}) != base
    assert fingerprint((1,), {"note": "y"}) != base
    assert fingerprint((1,), {"note": "x", "extra": None}) != base
    assert fingerprint(("1",), {"note": "x"}) != base  # a string is not a number
    assert fingerprint((), {}) != fingerprint(((),), {})


def test_the_digest_is_the_sha256_of_the_compact_sorted_utf8_json():
    digest = fingerprint(("é", 1.5), {"b": True, "a": None})
    expected = hashlib.sha256('[["é",1.5],{"a":null,"b":true}]'.encode()).hexdigest()
    assert digest == expected


def test_what_kombu_decodes_beyond_json_has_a_digest_too():
    # kombu's JSON carries datetimes, UUIDs and Decimals, and the worker sees them decoded.
    when = datetime.datetime(2026, 12, 4, 12, 0, tzinfo=datetime.timezone.utc)
    args = (when, uuid.UUID(int=7), decimal.Decimal("1.10"))
    assert fingerprint(args, {}) == fingerprint(args, {})
    assert b"2026-12-04" in canonical(list(args))


def test_arguments_json_cannot_hold_have_no_fingerprint():
    assert fingerprint((object(),), {}) is None
    assert fingerprint((), {"f": {1, 2}}) is None


def test_a_lone_surrogate_is_kept_not_dropped():
    assert fingerprint(("\ud800",), {}) != fingerprint(("",), {})


@pytest.mark.django_db(transaction=True)
def test_a_delivery_stores_the_fingerprint_of_its_decoded_arguments():
    task_id = str(uuid.uuid4())
    run_as_worker(fingerprinted, task_id, [7, "x"], {"note": {"b": 1, "a": 2}})
    stored = DedupRecord.objects.get(key_digest=digest(task_id))
    # The call's parameters by name: n, s and note, whatever order the note's keys had.
    expected = hashlib.sha256(canonical({"n": 7, "s": "x", "note": {"a": 2, "b": 1}})).hexdigest()
    assert stored.payload_digest == expected
    other = str(uuid.uuid4())
    run_as_worker(pickled, other, [7], {})
    assert DedupRecord.objects.get(key_digest=digest(other)).payload_digest is None


@app.task(base=DedupTask, name="unit.payload.fingerprinted")
def fingerprinted(n, s, note=None):
    return n


@app.task(base=DedupTask, name="unit.payload.pickled", serializer="pickle")
def pickled(n):
    return n
