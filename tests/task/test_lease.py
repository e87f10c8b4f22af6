"""Lease renewal and the judgement that an owner is gone, on the real stores."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import threading
import time
import uuid

import pytest

from dedup_celery.backends.base import OwnerIdentity, Record, Status
from dedup_celery.backends.db import DatabaseBackend
from dedup_celery.identity import (
    current_identity,
    earlier_attempt_is_over,
    owner_is_gone,
    process_start_ticks,
    running_body,
)
from dedup_celery.lease import Heartbeat
from tests.helpers import claim_for

pytestmark = pytest.mark.django_db(transaction=True)


def make_claim(lease, identity=None):
    return claim_for("recovery", uuid.uuid4().hex, lease=lease, identity=identity)


def record_of(identity):
    values = {f.name: None for f in dataclasses.fields(Record)}
    values.update(
        scope="s",
        key="k",
        key_digest="d",
        status=Status.PROCESSING,
        owner="o",
        task_id="t",
        task_name="n",
        attempt=0,
        skipped=0,
        rescheduled=0,
        takeovers=0,
        hostname=identity.hostname,
        pid=identity.pid,
        process_start=identity.process_start,
        boot_id=identity.boot_id,
        pid_namespace=identity.pid_namespace,
    )
    return Record(**values)


def test_the_heartbeat_keeps_a_lease_alive_then_it_lapses_within_one_lease():
    backend = DatabaseBackend()
    claim = make_claim(lease=0.6)
    backend.claim(claim)
    heartbeat = Heartbeat(backend, claim, 0.15, None, "test")
    heartbeat.start()
    time.sleep(1.5)
    assert backend.get(claim.scope, claim.key_digest).lease_expired is False
    heartbeat.stop()  # the owner died: nothing renews any more
    assert heartbeat.renewals >= 6
    time.sleep(0.8)
    assert backend.get(claim.scope, claim.key_digest).lease_expired is True


def test_renewal_stops_at_the_hard_time_limit(caplog):
    backend = DatabaseBackend()
    claim = make_claim(lease=0.5)
    backend.claim(claim)
    heartbeat = Heartbeat(backend, claim, 0.1, stop_after=0.55, label="limited")
    with caplog.at_level(logging.WARNING, logger="dedup_celery.lease"):
        heartbeat.start()
        heartbeat.join(5)
    assert not heartbeat.is_alive()
    assert 3 <= heartbeat.renewals <= 6
    assert "stops at the hard time limit" in caplog.text
    time.sleep(0.6)
    assert backend.get(claim.scope, claim.key_digest).lease_expired is True


def test_a_heartbeat_that_lost_its_lease_stops_and_never_takes_it_back(caplog):
    backend = DatabaseBackend()
    claim = make_claim(lease=60)
    backend.claim(claim)
    backend.expire_lease(claim.scope, claim.key_digest, claim.owner)
    thief = dataclasses.replace(claim, owner=uuid.uuid4().hex)
    assert backend.claim(thief).verdict.claimed
    heartbeat = Heartbeat(backend, claim, 0.05, None, "lost")
    with caplog.at_level(logging.WARNING, logger="dedup_celery.lease"):
        heartbeat.start()
        heartbeat.join(5)
    assert not heartbeat.is_alive()
    assert heartbeat.renewals == 0
    assert "lease was lost" in caplog.text
    assert backend.get(claim.scope, claim.key_digest).owner == thief.owner
    assert backend.complete(claim, None) is False


def test_owner_is_gone_only_when_this_machine_and_namespace_prove_it():
    me = current_identity()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        alive = OwnerIdentity(
            me.hostname, child.pid, process_start_ticks(child.pid), me.boot_id, me.pid_namespace
        )
        assert owner_is_gone(record_of(alive)) is False
        assert owner_is_gone(record_of(dataclasses.replace(alive, process_start=1))) is True
        for unprovable in (
            dataclasses.replace(alive, boot_id="other-boot", process_start=1),
            dataclasses.replace(alive, pid_namespace="pid:[1]", process_start=1),
            dataclasses.replace(alive, process_start=None),
            me,  # this very process is judged by earlier_attempt_is_over()
        ):
            assert owner_is_gone(record_of(unprovable)) is False
    finally:
        child.kill()
        child.wait()
    assert owner_is_gone(record_of(alive)) is True  # the pid is gone now


def test_an_earlier_attempt_in_this_process_is_over_only_with_no_body_running():
    mine = record_of(current_identity())
    assert earlier_attempt_is_over(mine) is True
    with running_body():
        assert earlier_attempt_is_over(mine) is False
    seen = []
    thread = threading.Thread(target=lambda: seen.append(earlier_attempt_is_over(mine)))
    thread.start()
    thread.join()
    assert seen == [False], "a thread pool must never use the shortcut"
