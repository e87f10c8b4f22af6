"""Signals sent by :class:`~dedup_celery.task.DedupTask`.

Every signal is sent with the task instance as ``sender`` (as Celery's own task
signals are), so ``message_claimed.connect(handler, sender=my_task)`` works, and
with these keyword arguments: ``task_id``, ``scope``, ``key_digest`` and
``record`` (a :class:`~dedup_celery.backends.base.Record` snapshot, or None when
the store returned none). Some signals add more, as listed below.
"""

from django.dispatch import Signal

#: A delivery claimed its message and is about to run the body.
message_claimed = Signal()
#: A duplicate was skipped (the body did not run). Adds ``reason``: ``"consumed"``
#: for a copy of a consumed message, ``"stale"`` for a copy of a delivery whose
#: body already raised, ``"expired"`` for a copy made by a reschedule that arrived
#: after its message's ``expires`` (``record`` is None: the store was not asked),
#: ``"payload_mismatch"`` for a copy whose arguments differ, refused (it fails)
#: under ``PAYLOAD_MISMATCH = "raise"``.
duplicate_skipped = Signal()
#: A duplicate of a message still in flight was rescheduled. Adds ``countdown``.
duplicate_rescheduled = Signal()
#: A delivery took over a record whose lease (or RECORD_TTL) had expired.
claim_taken_over = Signal()
#: The body finished, but another owner holds the record: the effect may have
#: happened twice. Adds ``owner`` (ours) and ``current_owner`` (theirs, or None).
lease_lost = Signal()
#: A record was released so the message can run again. Adds ``owner`` and
#: ``reason``: ``"failed"`` (the body raised; the record is now FAILED),
#: ``"requeued"`` (the body raised ``Reject(requeue=True)``; the record is gone),
#: or ``"operator"`` (the admin action or ``dedup_release``; sender is None).
message_released = Signal()
#: An operator forgot a CONSUMED or FAILED record (the admin action or
#: ``dedup_forget``), so the message's next delivery runs the body again.
#: ``sender`` and ``task_id`` are None; adds ``owner`` and ``status`` (the
#: record's status when it was forgotten).
message_forgotten = Signal()
#: Deliveries of a message kept dying in the body and MAX_TAKEOVERS was reached:
#: the record is now POISONED.
message_poisoned = Signal()
#: A duplicate's payload fingerprint differed from the record's (``PAYLOAD_MISMATCH``
#: is not ``"ignore"``); sent once per copy, before the copy is handled. Adds
#: ``original_task_id`` (the record's task id), ``payload_digest`` (the copy's
#: fingerprint) and ``verdict`` (``"consumed"``, ``"in_flight"``, ``"stale"`` or
#: ``"poisoned"``). Never the arguments.
payload_mismatch = Signal()
#: A send was not published (``dedup_on_enqueue``): its message is already
#: consumed (or, with ``"queued"``, queued or running), and the call returned an
#: ``AsyncResult`` for that message. Sent in the producer; ``task_id`` is the id
#: the caller passed, or None. Adds ``reason``, the status of the record that
#: answered it (``"consumed"``, ``"queued"``, ``"processing"``, ``"failed"`` or
#: ``"poisoned"``); ``record`` is that record.
publish_skipped = Signal()
