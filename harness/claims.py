"""Claims as a delivery would make them, for code that talks to a backend directly."""

from __future__ import annotations

import uuid

from dedup_celery.backends.base import Claim, OwnerIdentity
from dedup_celery.identity import current_identity
from dedup_celery.keys import digest

#: A process on another machine: nothing here can judge whether it is alive.
ELSEWHERE = OwnerIdentity(
    hostname="elsewhere",
    pid=1,
    process_start=1,
    boot_id="another-boot-id",
    pid_namespace="pid:[1]",
)


def make_claim(
    key="k-1",
    *,
    scope="scope-a",
    lease=60.0,
    ttl=3600.0,
    task_id=None,
    task_name="tests.task",
    owner=None,
    attempt=0,
    cap=5,
    identity=None,
    payload_digest=None,
) -> Claim:
    """Return a claim for *key*; every field can be set, the rest are fresh or defaults."""
    return Claim(
        scope=scope,
        key=key,
        key_digest=digest(key),
        owner=owner or uuid.uuid4().hex,
        task_id=task_id or str(uuid.uuid4()),
        task_name=task_name,
        attempt=attempt,
        identity=identity or current_identity(),
        lease_seconds=lease,
        record_ttl=ttl,
        max_takeovers=cap,
        payload_digest=payload_digest,
    )
