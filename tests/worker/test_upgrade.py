"""A rolling deploy: a worker of the previous release beside a new one, on one queue.

The previous release (:data:`PREVIOUS_RELEASE`, main before the ``purge_after``
column and the MySQL collation migration) is installed from git into a second
virtualenv, which shares this one's third-party packages but not its
dedup_celery. Its worker runs that release's code against the new schema, and
writes no ``purge_after``. Both workers take messages from one queue, so copies
of one message meet records the other version wrote; every scenario must still
end with one effect, as the plain control on the same two workers does not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from dedup_celery.models import DedupRecord
from tests.scenario import effects, killed, new_id, record, settle, starts, wait_until
from tests.services import REPO
from tests.testapp.tasks import plain_effect, status_effect, tx_effect

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

#: The release a deploy upgrades from: main before migration 0003.
PREVIOUS_RELEASE = "4d6a5280a80782fb2962fc98564fab292dbce4f1"
TASKS = {"plain": plain_effect, "status": status_effect, "transactional": tx_effect}
QUEUE = "q-upgrade"


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory):
    """(python, project folder) of the previous release, installed in a virtualenv of its own."""
    base = tmp_path_factory.mktemp("previous-release")
    found = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"],
        check=False,
        capture_output=True,
    )
    assert found.returncode == 0, (
        f"commit {PREVIOUS_RELEASE} is not in this clone: the upgrade test needs the "
        "history of main (clone without --depth)"
    )
    source = base / "source"
    source.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", PREVIOUS_RELEASE], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Celery, Django, drivers: this venv's. A path in a .pth file is not scanned
    # for .pth files itself, so this venv's editable dedup_celery stays out.
    with open(os.path.join(site, "shared-packages.pth"), "w") as fh:
        fh.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    project = base / "project"  # the previous release's tests package, without its source
    shutil.copytree(source / "tests", project / "tests")
    where = subprocess.run(
        [python, "-c", "import dedup_celery; print(dedup_celery.__file__)"],
        check=True, capture_output=True, text=True, cwd=project,
        env={**os.environ, "PYTHONPATH": str(project)},
    ).stdout.strip()  # fmt: skip
    assert where.startswith(str(venv)), f"the previous release imported {where}"
    return python, project


@pytest.fixture(scope="module")
def workers(start_worker, previous_release):
    return {
        "previous": start_worker("upgrade-previous", queue=QUEUE, concurrency=2,
                                 release=previous_release),
        "new": start_worker("upgrade-new", queue=QUEUE, concurrency=2),
    }  # fmt: skip


def send(mode, task_id, **kwargs):
    TASKS[mode].apply_async(kwargs=kwargs, task_id=task_id, queue=QUEUE)


def consumed(mode, task_id):
    found = record(TASKS[mode], task_id)
    return found is not None and found.status == "consumed"


def handled_by_both(workers, task_id):
    return all(f"[{task_id}]" in worker.log_text() for worker in workers.values())


@pytest.mark.parametrize("mode", list(TASKS))
def test_copies_in_flight_and_re_sends_across_both_releases(workers, mode, report_scenario):
    tag, task_id = f"upgrade-{mode}-{new_id()[:8]}", new_id()
    for _ in range(4):  # in flight together, on both workers
        send(mode, task_id, tag=tag, n=1, sleep=2.0)
    if mode == "plain":
        wait_until(lambda: effects(tag) == 4, timeout=30, what="the control's four runs")
        report_scenario("upgrade: 4 in flight", mode, tag, messages=4)
        return
    wait_until(lambda: consumed(mode, task_id), timeout=30, what="the message to be consumed")
    for _ in range(4):  # re-sent after it was consumed
        send(mode, task_id, tag=tag, n=1)
    wait_until(lambda: record(TASKS[mode], task_id).skipped >= 7, timeout=60, what="7 skips")
    settle()
    assert effects(tag) == 1
    assert len(starts(tag)) == 1
    assert handled_by_both(workers, task_id), "one release never saw a copy"
    report_scenario("upgrade: 4 in flight + 4 re-sent", mode, tag, messages=8,
                    records=[record(TASKS[mode], task_id)])  # fmt: skip


@pytest.mark.parametrize("mode", list(TASKS))
def test_a_delivery_killed_mid_body_is_redelivered_once_across_both_releases(
    workers, mode, report_scenario
):
    # Several messages, so that both releases die and both take over.
    tag = f"upgrade-kill-{mode}-{new_id()[:8]}"
    point = "before_effect" if mode == "status" else "after_effect"
    ids = [new_id() for _ in range(6)]
    for n, task_id in enumerate(ids, 1):
        send(mode, task_id, tag=tag, n=n, kill=point)
    if mode == "plain":  # the control: every killed message takes effect twice
        wait_until(lambda: effects(tag) == 12, timeout=90, what="the control's twelve effects")
        report_scenario("upgrade: killed mid-body", mode, tag, messages=6, ns=range(1, 7))
        return
    wait_until(lambda: all(consumed(mode, t) for t in ids), timeout=90, what="all six consumed")
    settle()
    assert all(killed(tag, n, point) for n in range(1, 7))
    assert effects(tag) == 6
    assert sorted(run.n for run in starts(tag)) == sorted([*range(1, 7)] * 2)
    records = [record(TASKS[mode], t) for t in ids]
    report_scenario("upgrade: killed mid-body", mode, tag, messages=6, ns=range(1, 7),
                    records=records)  # fmt: skip


def test_both_releases_claim_messages_from_the_one_queue(workers):
    # The previous release writes no purge_after; the new one always does. Ten
    # messages at once: both take some (each claims two at a time).
    tag = f"upgrade-both-{new_id()[:8]}"
    ids = [new_id() for _ in range(10)]
    for n, task_id in enumerate(ids, 1):
        send("status", task_id, tag=tag, n=n, sleep=0.5)
    wait_until(lambda: all(consumed("status", t) for t in ids), timeout=60, what="all ten")
    rows = DedupRecord.objects.filter(task_id__in=ids)
    assert rows.filter(purge_after__isnull=True).exists(), "the previous release claimed nothing"
    assert rows.filter(purge_after__isnull=False).exists(), "the new release claimed nothing"
    assert effects(tag) == 10
