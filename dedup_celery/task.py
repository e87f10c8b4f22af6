"""``DedupTask``: the Celery task base class that gives each message one effect."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from celery.contrib.django.task import DjangoTask

from dedup_celery import enqueue
from dedup_celery.delivery import deliver
from dedup_celery.options import USE_SETTING

if TYPE_CHECKING:
    _Base = DjangoTask[Any, Any]
else:
    _Base = DjangoTask  # Celery's Task is subscriptable only from 5.7


class DedupTask(_Base):
    """A Celery task whose body takes effect once per message, however often it is delivered.

    Use it as the base of a task: ``@shared_task(base=DedupTask)``. Options are
    class attributes that the task decorator can set:

    * ``dedup_key``: None (the task id is the key) or a callable that gets the
      task's args and kwargs and returns a non-empty str, or None to skip dedup
      for that call.
    * ``dedup_transactional``: True runs the claim and the body in one database
      transaction (exactly once for work done in that database).
    * ``dedup_scope``: records are unique per scope; defaults to the task name.
    * ``dedup_bypass``: True runs the task as a plain Celery task, with a
      WARNING per delivery (for store maintenance on idempotent tasks).
    * ``dedup_processing_timeout``, ``dedup_retry_countdown``,
      ``dedup_record_ttl``: per-task overrides of the settings of the same name.
    * ``dedup_heartbeat_interval``: renew the lease this often while the body
      runs; None turns renewal off for this task; left alone, it follows
      ``HEARTBEAT_INTERVAL``.
    * ``dedup_payload``: None (the fingerprint covers all the arguments) or a
      callable that gets the task's args and kwargs and returns the JSON-able
      part that counts (None: no fingerprint for that call).
    * ``dedup_payload_mismatch``: ``"warn"``, ``"raise"`` or ``"ignore"``, what
      a duplicate whose payload differs does; None follows ``PAYLOAD_MISMATCH``.
    * ``dedup_on_enqueue``: False, ``"consumed"`` (a plain send whose message
      is already consumed is not published, and returns an ``AsyncResult`` for
      the original), or ``"queued"`` (also at most one queued or running copy
      per key); see :mod:`dedup_celery.enqueue`.
    * ``dedup_queue_ttl``: how long a ``"queued"`` marker holds its key
      (seconds, default an hour), plus the send's countdown or ETA.

    While the body runs, ``self.request.dedup_owner`` holds this delivery's
    owner token (None when the call runs without dedup), so the body can make its
    own writes conditional on still owning the message.
    """

    #: Ack after the body, so a crash before the ack redelivers the message.
    acks_late = True
    #: Requeue the message of a killed child instead of acking it.
    reject_on_worker_lost = True

    dedup_key: ClassVar[Callable[..., str | None] | None] = None
    dedup_transactional: ClassVar[bool] = False
    #: True runs this task without dedup (loudly): see docs/operating.md, "Bypassing dedup".
    dedup_bypass: ClassVar[bool] = False
    dedup_scope: ClassVar[str | None] = None
    dedup_processing_timeout: ClassVar[float | None] = None
    dedup_retry_countdown: ClassVar[float | None] = None
    dedup_record_ttl: ClassVar[float | None] = None
    dedup_heartbeat_interval: ClassVar[Any] = USE_SETTING  # a number, None, or USE_SETTING
    dedup_payload: ClassVar[Callable[..., Any] | None] = None
    dedup_payload_mismatch: ClassVar[str | None] = None
    dedup_on_enqueue: ClassVar[bool | str] = False
    dedup_queue_ttl: ClassVar[float | None] = None

    #: The worker-side request: when a child dies mid-task, the worker's main
    #: process ends that child's lease so the redelivery runs at once.
    Request = "dedup_celery.worker:DedupRequest"

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        *more: Any,
        **options: Any,
    ) -> Any:
        """Publish the message, unless ``dedup_on_enqueue`` finds it consumed (or queued).

        Then nothing is published and the original's ``AsyncResult`` is
        returned (:func:`dedup_celery.enqueue.send`); otherwise, and with the
        option off, this is Celery's ``apply_async``.
        """
        if self.dedup_on_enqueue and not more:
            return enqueue.send(self, super().apply_async, args, kwargs, task_id, options)
        return super().apply_async(args, kwargs, task_id, *more, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the body at most once per message key (see the class docstring)."""
        if self.request.called_directly:
            # A plain function call carries no message, so there is nothing to dedup.
            return super().__call__(*args, **kwargs)
        # From here on the body runs through self.run(), in the request Celery's
        # tracer pushed: Task.__call__ would push another one, which before
        # Celery 5.7 held only args and kwargs (no id, no retries).
        return deliver(self, args, kwargs)


__all__ = ["USE_SETTING", "DedupTask"]
