"""Fault 11, load: thousands of messages, 30 % of them duplicates, through two workers.

``make test`` sends 5 000; ``make soak`` sets DEDUP_LOAD_MESSAGES=50000. Half go to
a transactional task and half to a status-mode one; every duplicate is a copy of
an earlier message (same task id), sent right after it or later, so some meet a
consumed record and some a running one.
"""

from __future__ import annotations

import os
import random
import time

import pytest
from django.db.models import Count, Sum

from dedup_celery.models import DedupRecord
from tests.scenario import new_id, wait_until
from tests.testapp.models import Effect
from tests.testapp.tasks import status_effect, tx_effect

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

MESSAGES = int(os.environ.get("DEDUP_LOAD_MESSAGES", "5000"))
DUPLICATE_SHARE = 0.3


def test_load_with_duplicates_has_no_duplicate_effect_and_loses_nothing(
    start_worker, report_scenario
):
    queue = "q-load"
    workers = [start_worker(f"load-{i}", concurrency=4, queue=queue) for i in (1, 2)]
    rng = random.Random(20261127)
    unique = round(MESSAGES * (1 - DUPLICATE_SHARE))
    tag = f"load-{new_id()[:8]}"
    messages = [((tx_effect, status_effect)[n % 2], n, new_id()) for n in range(unique)]
    copies = [rng.choice(messages) for _ in range(MESSAGES - unique)]
    started = time.monotonic()
    sent = 0
    copy_at = sorted(rng.sample(range(unique), len(copies)))
    next_copy = 0
    for i, (task, n, task_id) in enumerate(messages):
        task.apply_async(kwargs={"tag": tag, "n": n}, task_id=task_id, queue=queue)
        sent += 1
        while next_copy < len(copies) and copy_at[next_copy] <= i:
            copy_task, copy_n, copy_id = copies[next_copy]
            copy_task.apply_async(kwargs={"tag": tag, "n": copy_n}, task_id=copy_id, queue=queue)
            sent += 1
            next_copy += 1

    def duplicates_seen():
        return (
            DedupRecord.objects.filter(task_id__in=[c[2] for c in copies]).aggregate(
                n=Sum("skipped")
            )["n"]
            or 0
        )

    wait_until(
        lambda: Effect.objects.filter(tag=tag).count() >= unique,
        timeout=max(300, MESSAGES / 10),
        what="every message to take effect",
    )
    wait_until(
        lambda: duplicates_seen() >= len(copies), timeout=120, what="every duplicate to be skipped"
    )
    elapsed = time.monotonic() - started
    time.sleep(2)
    per_message = Effect.objects.filter(tag=tag).values("n").annotate(c=Count("id"))
    doubled = [row["n"] for row in per_message if row["c"] > 1]
    assert doubled == []
    assert per_message.count() == unique  # nothing lost
    assert duplicates_seen() == len(copies)
    # One record per message, every one consumed, each by the message it belongs to.
    records = DedupRecord.objects.filter(task_id__in=[m[2] for m in messages])
    assert records.count() == unique
    assert set(records.values_list("status", flat=True)) == {DedupRecord.Status.CONSUMED}
    for worker in workers:
        log = worker.log_text().lower()
        assert "deadlock" not in log
        assert "unrecoverable" not in log
    report_scenario(
        f"load, {MESSAGES / elapsed:.0f} msg/s end to end",
        "tx+status",
        tag,
        messages=sent,
        ns=range(unique),
        records=list(records),
    )
