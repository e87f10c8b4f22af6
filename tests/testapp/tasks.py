"""Tasks the worker-level tests send; each body records its runs and effects.

A body appends a line to ``<DEDUP_TEST_TMP>/<tag>.runs`` when it starts and when
it ends (outside any transaction, so a rolled-back run is still counted), and
writes an ``Effect`` row: the business effect that must happen once.

``kill`` names the point where the worker child SIGKILLs itself, on the first
delivery only (a marker file remembers it):

* ``prerun``: in ``task_prerun``, before the claim;
* ``claimed``: in the ``message_claimed`` signal, after the claim, before the body;
* ``before_effect``: in the body, before the effect;
* ``after_effect``: in the body, after the effect (the last thing it does);
* ``postrun``: in ``task_postrun``, after commit or CONSUMED, before the ack;
* ``always``: in the body, before the effect, on every delivery (a poison message).

``effect_first`` writes the effect before sleeping instead of after; ``fail``
makes the body raise (for good) after sleeping, with no effect.
"""

import os
import signal
import time

from celery import shared_task
from celery.signals import task_postrun, task_prerun
from django.db import InterfaceError, OperationalError
from django.dispatch import receiver

from dedup_celery import DedupTask
from dedup_celery.keys import display_key
from dedup_celery.signals import message_claimed
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


def _log_run(kind, request, tag, n):
    """Append one line to the run log (task ids escaped: they may hold NUL or surrogates)."""
    task_id = display_key(request.id, 10_000)
    with open(run_log(tag), "a") as fh:
        fh.write(f"{kind} {n} {task_id} {request.retries} {os.getpid()} {time.time()}\n")


#: The database the bodies write their effects to (the MariaDB scenario worker sets it).
EFFECT_DATABASE = os.environ.get("DEDUP_TEST_EFFECT_DATABASE", "default")


def _effect(request, tag, n):
    Effect.objects.using(EFFECT_DATABASE).create(
        tag=tag,
        n=n,
        task_id=display_key(request.id, 10_000),
        retries=request.retries or 0,
        pid=os.getpid(),
    )


def _body(task, tag, n, sleep=0.0, kill=None, effect_first=False, fail=False, before_effect=None):
    request = task.request
    _log_run("start", request, tag, n)
    if kill == "before_effect":
        _kill_once(tag, n, kill)
    if kill == "always":
        os.kill(os.getpid(), signal.SIGKILL)
    if before_effect is not None:
        before_effect()
    if effect_first:
        _effect(request, tag, n)
    if sleep:
        time.sleep(sleep)
    if fail:
        raise ValueError("the body fails for good")
    if not effect_first:
        _effect(request, tag, n)
    if kill == "after_effect":
        _kill_once(tag, n, kill)
    _log_run("end", request, tag, n)
    return n


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def plain_effect(self, tag, n, **options):
    """The control: the same body with the same delivery settings, without dedup."""
    return _body(self, tag, n, **options)


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def plain_store_effect(self, tag, n, store_url, **options):
    """A control that also writes to a Redis in its body (the one a store outage stops)."""
    import redis

    client = redis.Redis.from_url(store_url, socket_timeout=2, socket_connect_timeout=2)

    def write():
        client.set(f"control:{tag}:{n}", self.request.id)

    return _body(self, tag, n, before_effect=write, **options)


@shared_task(bind=True, base=DedupTask, ignore_result=True, dedup_processing_timeout=LEASE)
def status_effect(self, tag, n, **options):
    return _body(self, tag, n, **options)


@shared_task(bind=True, base=DedupTask, ignore_result=True, dedup_transactional=True)
def tx_effect(self, tag, n, **options):
    return _body(self, tag, n, **options)


@task_postrun.connect
def _kill_in_postrun(sender=None, kwargs=None, **extra):
    # The tests send every argument as a keyword.
    kwargs = kwargs or {}
    if kwargs.get("kill") == "postrun":
        _kill_once(kwargs["tag"], kwargs["n"], "postrun")


@task_prerun.connect
def _kill_in_prerun(sender=None, kwargs=None, **extra):
    kwargs = kwargs or {}
    if kwargs.get("kill") == "prerun":
        _kill_once(kwargs["tag"], kwargs["n"], "prerun")


@receiver(message_claimed)
def _kill_when_claimed(sender=None, **extra):
    kwargs = sender.request.kwargs or {}
    if kwargs.get("kill") == "claimed":
        _kill_once(kwargs["tag"], kwargs["n"], "claimed")


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


def _priced_key(order_no, qty, **kw):
    return f"priced:{order_no}"


@shared_task(bind=True, base=DedupTask, dedup_key=_priced_key)
def priced_order(self, order_no, qty):
    """A business-key task whose duplicates may come with other arguments (warned)."""
    _effect(self.request, f"priced:{order_no}", qty)
    return {"order_no": order_no, "qty": qty}


@shared_task(bind=True, base=DedupTask, dedup_key=_priced_key, dedup_payload_mismatch="raise")
def strict_order(self, order_no, qty):
    """The same, but a duplicate with other arguments fails."""
    _effect(self.request, f"strict:{order_no}", qty)
    return {"order_no": order_no, "qty": qty}


@shared_task(bind=True, base=DedupTask, dedup_key=_priced_key, dedup_payload_mismatch="ignore")
def unchecked_order(self, order_no, qty):
    """The control: mismatches are not looked for, as before the fingerprint existed."""
    _effect(self.request, f"unchecked:{order_no}", qty)
    return {"order_no": order_no, "qty": qty}


@shared_task(bind=True, base=DedupTask, dedup_key=_priced_key, dedup_on_enqueue="consumed")
def enqueued_order(self, order_no, qty):
    """The same, looked up before publishing: a consumed message is not published again."""
    _effect(self.request, f"enqueued:{order_no}", qty)
    return {"order_no": order_no, "qty": qty}


@shared_task(bind=True, base=DedupTask, dedup_key=_priced_key, dedup_on_enqueue="queued")
def queued_order(self, order_no, qty):
    """At most one queued or running copy per order; the body takes a second."""
    time.sleep(1)
    _effect(self.request, f"queued:{order_no}", qty)
    return {"order_no": order_no, "qty": qty}


@shared_task(bind=True, base=DedupTask, dedup_key=_priced_key, dedup_on_enqueue="consumed")
def slow_enqueued_order(self, order_no, qty):
    """The control of queued_order: looked up, but only consumed messages are answered."""
    time.sleep(1)
    _effect(self.request, f"slow:{order_no}", qty)
    return {"order_no": order_no, "qty": qty}


@shared_task(bind=True, base=DedupTask)
def id_result(self, value):
    """A task-id-keyed task for result-backend checks."""
    return {"value": value, "task_id": self.request.id}


DB_ERRORS = (OperationalError, InterfaceError)


@shared_task(
    bind=True,
    base=DedupTask,
    ignore_result=True,
    dedup_processing_timeout=LEASE,
    autoretry_for=DB_ERRORS,
    retry_kwargs={"max_retries": 60, "countdown": 1},
)
def status_autoretry(self, tag, n, **options):
    """A status-mode task that retries its own database errors, as users should."""
    return _body(self, tag, n, **options)


@shared_task(
    bind=True,
    base=DedupTask,
    ignore_result=True,
    dedup_transactional=True,
    autoretry_for=DB_ERRORS,
    retry_kwargs={"max_retries": 60, "countdown": 1},
)
def tx_autoretry(self, tag, n, **options):
    """A transactional task that retries its own database errors."""
    return _body(self, tag, n, **options)


@shared_task(
    bind=True,
    base=DedupTask,
    ignore_result=True,
    dedup_processing_timeout=2,
    dedup_heartbeat_interval=0.5,
)
def slow_heartbeat(self, tag, n, **options):
    """A body longer than its two-second lease, kept alive by the heartbeat."""
    return _body(self, tag, n, **options)


@shared_task(
    bind=True,
    base=DedupTask,
    ignore_result=True,
    dedup_processing_timeout=2,
    dedup_heartbeat_interval=None,
)
def slow_no_heartbeat(self, tag, n, **options):
    """The same without a heartbeat: the control that loses its lease."""
    return _body(self, tag, n, **options)


def _replace_step(task, tag, n, steps):
    """Write step *n*'s effect, then replace this task with step n + 1 (same queue)."""
    _body(task, tag, n)
    if n < steps:
        queue = (task.request.delivery_info or {}).get("routing_key")
        task.replace(task.si(tag=tag, n=n + 1, steps=steps).set(queue=queue))
    return n


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def plain_replace(self, tag, n, steps):
    """The control: a plain task that replaces itself with its next step."""
    return _replace_step(self, tag, n, steps)


@shared_task(bind=True, base=DedupTask, ignore_result=True, dedup_processing_timeout=LEASE)
def status_replace(self, tag, n, steps):
    """A status-mode task that replaces itself with its next step."""
    return _replace_step(self, tag, n, steps)


@shared_task(bind=True, base=DedupTask, ignore_result=True, dedup_transactional=True)
def tx_replace(self, tag, n, steps):
    """A transactional task that replaces itself with its next step, before its COMMIT."""
    return _replace_step(self, tag, n, steps)


ODD_RESULTS = {
    "nan": float("nan"),
    "infinity": float("inf"),
    "nul": "order\x00note",
    "surrogate": "order\ud800note",
}


def _odd_body(task, tag, n, kind):
    _body(task, tag, n)
    return {"order": n, "note": ODD_RESULTS[kind]}


def _odd_key(tag, n, kind):
    return f"odd:{tag}:{n}"


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def plain_odd_result(self, tag, n, kind):
    """The control: returns a value a JSON store refuses; nothing stores it."""
    return _odd_body(self, tag, n, kind)


@shared_task(
    bind=True,
    base=DedupTask,
    ignore_result=True,
    dedup_processing_timeout=LEASE,
    dedup_key=_odd_key,
)
def status_odd_result(self, tag, n, kind):
    """A business-key status-mode task whose result a JSON store refuses."""
    return _odd_body(self, tag, n, kind)


@shared_task(
    bind=True, base=DedupTask, ignore_result=True, dedup_transactional=True, dedup_key=_odd_key
)
def tx_odd_result(self, tag, n, kind):
    """A business-key transactional task whose result a JSON store refuses."""
    return _odd_body(self, tag, n, kind)


def _deferred_conflict(task, tag, n):
    """A body whose transaction cannot commit: its COMMIT raises an IntegrityError."""
    from tests.testapp.models import DeferredUnique

    request = task.request
    _log_run("start", request, tag, n)
    _effect(request, tag, n)
    DeferredUnique.objects.create(tag=tag)
    DeferredUnique.objects.create(tag=tag)
    return n


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def plain_deferred_conflict(self, tag, n):
    """The control: the same body in its own transaction, without dedup."""
    from django.db import transaction

    with transaction.atomic():
        return _deferred_conflict(self, tag, n)


@shared_task(
    bind=True, base=DedupTask, ignore_result=True, dedup_transactional=True, dedup_retry_countdown=1
)
def tx_deferred_conflict(self, tag, n):
    return _deferred_conflict(self, tag, n)


def _chord_part(task, tag, n, sleep=0.0, resend_countdown=None):
    """A chord header task; with *resend_countdown*, its first run publishes a copy of itself.

    The copy is what a producer re-send or a dedup reschedule is: the same
    message (id, chord, ``expires``), here ``resend_countdown`` seconds later.
    """
    request = task.request
    _log_run("start", request, tag, n)
    if resend_countdown is not None:
        marker = os.path.join(os.environ["DEDUP_TEST_TMP"], f"{tag}-{n}.resent")
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            task.signature_from_request(request, countdown=resend_countdown).apply_async()
    time.sleep(sleep)
    _effect(request, tag, n)
    return n


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True)
def plain_chord_part(self, tag, n, **options):
    """The control: a chord header task without dedup (its result is stored)."""
    return _chord_part(self, tag, n, **options)


@shared_task(bind=True, base=DedupTask, dedup_retry_countdown=6)
def status_chord_part(self, tag, n, **options):
    return _chord_part(self, tag, n, **options)


@shared_task(bind=True, base=DedupTask, dedup_transactional=True, dedup_retry_countdown=6)
def tx_chord_part(self, tag, n, **options):
    return _chord_part(self, tag, n, **options)


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True)
def chord_done(self, results, tag):
    """A chord body: one effect (n 99) per run."""
    _effect(self.request, tag, 99)
    return results
