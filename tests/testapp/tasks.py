"""Tasks the worker-level tests send; each body records its runs and effects.

A body appends a line to ``<DEDUP_TEST_TMP>/<tag>.runs`` when it starts and when
it ends (outside any transaction, so a rolled-back run is still counted), and
writes an ``Effect`` row: the business effect that must happen once.

``kill`` names the point where the body SIGKILLs its own worker child on the
first delivery only (a marker file remembers it):

* ``before_effect``: after the claim, before the effect;
* ``after_effect``: after the effect, before the body returns;
* ``postrun``: in ``task_postrun``, after commit or CONSUMED, before the ack.
"""

import os
import signal
import time

from celery import shared_task
from celery.signals import task_postrun

from dedup_celery import DedupTask
from tests.testapp.models import Effect

# Several minutes: a redelivery after a crash must not wait for it (fast recovery).
LEASE = 300


def run_log(tag):
    return os.path.join(os.environ["DEDUP_TEST_TMP"], f"{tag}.runs")


def _kill_once(tag, n, point):
    marker = os.path.join(os.environ["DEDUP_TEST_TMP"], f"{tag}-{n}.killed-{point}")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _body(task, tag, n, sleep=0.0, kill=None):
    request = task.request
    with open(run_log(tag), "a") as fh:
        fh.write(f"start {n} {request.id} {request.retries} {os.getpid()} {time.time()}\n")
    if kill == "before_effect":
        _kill_once(tag, n, kill)
    if sleep:
        time.sleep(sleep)
    Effect.objects.create(
        tag=tag, n=n, task_id=request.id, retries=request.retries or 0, pid=os.getpid()
    )
    if kill == "after_effect":
        _kill_once(tag, n, kill)
    with open(run_log(tag), "a") as fh:
        fh.write(f"end {n} {request.id} {request.retries} {os.getpid()} {time.time()}\n")
    return n


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def plain_effect(self, tag, n, sleep=0.0, kill=None):
    """The control: the same body with the same delivery settings, without dedup."""
    return _body(self, tag, n, sleep, kill)


@shared_task(bind=True, base=DedupTask, ignore_result=True, dedup_processing_timeout=LEASE)
def status_effect(self, tag, n, sleep=0.0, kill=None):
    return _body(self, tag, n, sleep, kill)


@shared_task(bind=True, base=DedupTask, ignore_result=True, dedup_transactional=True)
def tx_effect(self, tag, n, sleep=0.0, kill=None):
    return _body(self, tag, n, sleep, kill)


@task_postrun.connect
def _kill_in_postrun(sender=None, kwargs=None, **extra):
    # The tests send every argument as a keyword.
    kwargs = kwargs or {}
    if kwargs.get("kill") == "postrun":
        _kill_once(kwargs["tag"], kwargs["n"], "postrun")


@shared_task(
    bind=True,
    base=DedupTask,
    ignore_result=True,
    max_retries=1,
    dedup_key=lambda tag, mode: f"budget:{tag}",
)
def retry_budget(self, tag, mode):
    """A slow failing copy holds the key while a second copy is rescheduled.

    The second copy then retries once itself: if reschedules spent its retry
    budget, that retry would exceed max_retries=1.
    """
    with open(run_log(tag), "a") as fh:
        fh.write(f"start {mode} {self.request.id} {self.request.retries}\n")
    if mode == "slowfail":
        time.sleep(3)
        raise ValueError("the first copy fails for good")
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return "ok"


@shared_task(bind=True, base=DedupTask, dedup_key=lambda order_no, **kw: f"order:{order_no}")
def order_result(self, order_no, note=""):
    """A business-key task whose result a duplicate must return."""
    return {"order_no": order_no, "note": note, "task_id": self.request.id}


@shared_task(bind=True, base=DedupTask)
def id_result(self, value):
    """A task-id-keyed task for result-backend checks."""
    return {"value": value, "task_id": self.request.id}
