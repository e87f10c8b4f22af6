"""Lease renewal and the judgement that an owner is gone, on the real stores."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
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


# Runs in a private mount namespace whose /proc is mounted hidepid=2, as root,
# then drops to nobody: another user's processes are hidden from it, as under
# systemd's ProtectProc=invisible.
HIDDEN_PROC_JUDGE = r"""
import json, os, sys, types
import django
django.setup()
from dedup_celery.conf import get_settings
from dedup_celery.identity import current_identity, owner_is_gone, process_start_ticks
get_settings()
me = current_identity()
os.setgid(65534)
os.setuid(65534)
pid, start = int(sys.argv[1]), int(sys.argv[2])
record = types.SimpleNamespace(hostname=me.hostname, pid=pid, process_start=start,
                               boot_id=me.boot_id, pid_namespace=me.pid_namespace)
try:
    open(f"/proc/{pid}/stat").close()
    stat = "readable"
except OSError as exc:
    stat = type(exc).__name__
print(json.dumps({"stat": stat, "ticks": process_start_ticks(pid), "gone": owner_is_gone(record)}))
"""


def judge_with_hidden_proc(pid, start):
    """Judge *pid* from a process that /proc hides it from (hidepid=2, as nobody)."""
    mount_then_judge = 'mount -t proc -o hidepid=2 proc /proc && exec "$0" -c "$1" "$2" "$3"'
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount_then_judge,
         sys.executable, HIDDEN_PROC_JUDGE, str(pid), str(start)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a private /proc; simulated below")
def test_a_live_owner_hidden_by_hidepid_is_not_judged_gone():
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_start_ticks(owner.pid)
        seen = judge_with_hidden_proc(owner.pid, start)
        # The fault: the live owner's stat reads exactly as a dead pid's would.
        assert (seen["stat"], seen["ticks"]) == ("FileNotFoundError", None)
        assert seen["gone"] is False  # kill(pid, 0) said EPERM: a process is there
    finally:
        owner.kill()
        owner.wait()
    assert judge_with_hidden_proc(owner.pid, start)["gone"] is True  # ESRCH: gone


def test_an_unreadable_stat_of_a_live_owner_is_not_proof_that_it_is_gone(monkeypatch):
    # The same judgement where /proc cannot be remounted: the stat read fails as
    # hidepid makes it fail (ENOENT, so no start time), and the pid still lives.
    import dedup_celery.identity as identity

    me = current_identity()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = OwnerIdentity(
            me.hostname, owner.pid, process_start_ticks(owner.pid), me.boot_id, me.pid_namespace
        )
        monkeypatch.setattr(identity, "process_start_ticks", lambda pid: None)
        assert owner_is_gone(record_of(alive)) is False
    finally:
        owner.kill()
        owner.wait()
    assert owner_is_gone(record_of(alive)) is True  # ESRCH, with no stat to read


def test_pid_takeover_off_leaves_every_lease_to_run_out(settings):
    me = current_identity()
    owner = subprocess.Popen([sys.executable, "-c", "pass"])
    owner.wait()
    dead = OwnerIdentity(me.hostname, owner.pid, 1, me.boot_id, me.pid_namespace)
    assert owner_is_gone(record_of(dead)) is True
    assert earlier_attempt_is_over(record_of(me)) is True
    settings.DEDUP_CELERY = {**settings.DEDUP_CELERY, "PID_TAKEOVER": False}
    assert owner_is_gone(record_of(dead)) is False
    assert earlier_attempt_is_over(record_of(me)) is False
