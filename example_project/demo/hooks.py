"""Demo-only instrumentation for the worker that demo/run.py starts (never for real use).

It counts body runs and kills a worker child after commit for the task ids
demo/run.py lists, so the report can show what happened. orders/tasks.py knows
nothing of it: the worker imports this module only when SHOP_DEMO_DIR is set.
"""

import os
import signal
from pathlib import Path

from celery.signals import task_postrun, task_prerun
from django.dispatch import receiver

from dedup_celery.signals import message_claimed

DEMO_DIR = Path(os.environ["SHOP_DEMO_DIR"])
KILL_IDS = set((DEMO_DIR / "kill_ids.txt").read_text().split())


def _append(name, line):
    with open(DEMO_DIR / name, "a") as fh:
        fh.write(line + "\n")


@receiver(message_claimed)
def count_dedup_body_run(sender, task_id, **kwargs):
    _append("body_runs.log", f"{sender.name} {task_id}")


@task_prerun.connect
def count_plain_body_run(sender=None, task_id=None, **kwargs):
    if sender is not None and sender.name.endswith("place_order_plain"):
        _append("body_runs.log", f"{sender.name} {task_id}")


@task_postrun.connect
def kill_after_commit(sender=None, task_id=None, **kwargs):
    """SIGKILL this worker child once per listed task id: after commit, before the ack."""
    if task_id not in KILL_IDS:
        return
    try:
        fd = os.open(DEMO_DIR / f"killed-{task_id}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
